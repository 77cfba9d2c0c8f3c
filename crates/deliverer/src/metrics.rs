//! The deliverer's metrics, registered on its `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    pub deliveries: Family<OutcomeLabel, Counter>,
    pub disabled: Counter,
    pub herald_failures: Counter,
    pub dead_letters: Counter,
    pub attempt_duration: Histogram,
    /// The webhooks bucket's revision this deliverer's definitions are
    /// current to.
    pub webhooks_revision: Gauge,
}

impl Metrics {
    /// The deliverer's metrics, registered on its `/metrics`.
    pub fn registered(health: &herald_platform::health::Health) -> Self {
        Self {
            deliveries: health.metric(
                "deliveries",
                "Delivery jobs handled, by outcome (succeeded, retrying, throttled, waiting, parked, deferred, held, failed, skipped, herald_failure)",
                Family::default(),
            ),
            disabled: health.counter("webhooks_disabled", "Webhooks disabled by the deliverer"),
            herald_failures: health.counter(
                "herald_failures",
                "Deliveries that waited or were handed back for Herald's own failure (resolver, secret, NATS, Redis); never counted against a webhook",
            ),
            dead_letters: health.counter(
                "dead_letters",
                "Delivery jobs moved to HERALD_DEAD because Herald cannot process them",
            ),
            attempt_duration: health.metric(
                "delivery_attempt_duration_seconds",
                "How long customer endpoints took to answer an attempt",
                herald_platform::metrics::attempt_duration(),
            ),
            webhooks_revision: health.gauge(
                "webhooks_revision",
                "The webhooks bucket's revision (stream sequence) whose changes this deliverer has applied; behind the bucket's last sequence while a change is on its way",
            ),
        }
    }
}
