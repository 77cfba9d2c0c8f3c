//! Metrics every service shares, and the samplers that keep the gauges
//! current. Names follow `herald_<thing>_<unit>` (the registry adds the
//! `herald_` prefix, counters get `_total`); label values are static strings,
//! so recording costs no allocation.
//!
//! - `herald_consumer_pending{consumer}`: messages a durable consumer has not
//!   yet been given (its lag), sampled every 5 s.
//! - `herald_consumer_ack_pending{consumer}`: messages given and not yet acked.
//! - `herald_retries_pending`: deliveries waiting for their next attempt (the
//!   retry schedules in `HERALD_DELIVERIES`), sampled every 10 s.
//! - `herald_redis_up`: 1 while Redis answers, 0 while the service works on
//!   without it (see [`Health::watch_redis`]).
//! - `herald_delivery_attempt_duration_seconds`: see [`attempt_duration`].

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use herald_core::names;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabel {
    consumer: &'static str,
}

/// A histogram of HTTP attempt durations in seconds, 5 ms to about 41 s.
pub fn attempt_duration() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Samples `consumer`'s lag into `herald_consumer_pending{consumer=name}`
/// and `herald_consumer_ack_pending` until `shutdown`.
pub fn watch_consumer(
    health: &Health,
    consumer: &consumer::Consumer<consumer::pull::Config>,
    name: &'static str,
    shutdown: CancellationToken,
) {
    let pending = Family::<ConsumerLabel, Gauge>::default();
    let ack_pending = Family::<ConsumerLabel, Gauge>::default();
    health.register(|r| {
        r.register(
            "consumer_pending",
            "Messages the consumer has not been given yet (lag)",
            pending.clone(),
        );
        r.register(
            "consumer_ack_pending",
            "Messages given to the consumer and not yet acknowledged",
            ack_pending.clone(),
        );
    });
    let label = ConsumerLabel { consumer: name };
    let consumer = consumer.clone();
    tokio::spawn(async move {
        loop {
            match consumer.get_info().await {
                Ok(info) => {
                    pending.get_or_create(&label).set(info.num_pending as i64);
                    ack_pending
                        .get_or_create(&label)
                        .set(info.num_ack_pending as i64);
                }
                Err(error) => tracing::debug!(%error, consumer = name, "cannot sample consumer"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

/// Samples how many deliveries wait for a retry into `herald_retries_pending`
/// until `shutdown`.
/// Whether the durable `consumer` of `stream` has nothing pending and
/// nothing unacknowledged: every message so far is handled (tests and the
/// benchmark wait for the matcher with it).
pub async fn consumer_idle(js: &jetstream::Context, stream: &str, consumer: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    let Ok(mut consumer) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(consumer)
        .await
    else {
        return false;
    };
    consumer
        .info()
        .await
        .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
}

pub fn watch_retries(health: &Health, js: jetstream::Context, shutdown: CancellationToken) {
    let gauge = Gauge::<i64>::default();
    health.register(|r| {
        r.register(
            "retries_pending",
            "Deliveries waiting for their next attempt",
            gauge.clone(),
        );
    });
    tokio::spawn(async move {
        loop {
            match count_schedules(&js).await {
                Ok(n) => {
                    gauge.set(n as i64);
                }
                Err(error) => tracing::debug!(%error, "cannot count retry schedules"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    });
}

async fn count_schedules(js: &jetstream::Context) -> Result<usize, async_nats::Error> {
    let stream = js.get_stream(names::DELIVERIES_STREAM).await?;
    let mut subjects = stream.info_with_subjects(names::SCHEDULES_SUBJECTS).await?;
    let mut total = 0;
    while let Some(entry) = subjects.next().await {
        total += entry?.1;
    }
    Ok(total)
}
