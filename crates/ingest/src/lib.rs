//! Ingest: the front door for producers' events.
//!
//! It consumes `herald.events.<org>.<type>` (stream `HERALD_EVENTS`),
//! validates and normalizes each event, and publishes it as a
//! `herald.v1.Event` to `herald.accepted.<org>` for the matcher; a bad event
//! goes to `herald.rejected.<org>` with its reason. A message is acked only
//! after its outcome is durably published, so nothing is lost; the accepted
//! publish carries `Nats-Msg-Id: <org>:<event id>`, so a redelivery is not a
//! duplicate.
//!
//! What ingest holds is bounded: each pull asks for at most 1,000 messages
//! and [`PULL_MAX_BYTES`] bytes. An event delivered more than
//! [`MAX_DELIVERIES`] times without being concluded (ingest stopped or kept
//! failing while it held it) is not processed again: it is set aside to the
//! dead letters, whole, and a rejection `redelivered` says so on
//! `herald.rejected.<org>`, instead of looping until JetStream drops it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use herald_core::catalogue::Catalogue;
use herald_core::event::{self, Envelope, Limits, Rejection};
use herald_core::gather::Gather;
use herald_core::names;
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::lanes::{self, Lanes};
use herald_platform::nats::PublishError;
use herald_platform::now_ms;
use herald_platform::worker::{self, Disposition, Handler, Worker};
use herald_platform::{dead_letters, nats, trace};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub const HEALTH_ADDR: &str = "HERALD_INGEST_HEALTH_ADDR";
pub const MAX_EVENT_BYTES: &str = "HERALD_MAX_EVENT_BYTES";
pub const EXTRA_EVENT_TYPES: &str = "HERALD_EXTRA_EVENT_TYPES";
/// The most bytes one pull asks for (with at most [`PULL_BATCH`] messages).
pub const PULL_MAX_BYTES: &str = "HERALD_INGEST_PULL_MAX_BYTES";
/// Deliveries of one event, at most, before it is set aside.
pub const MAX_DELIVERIES: &str = "HERALD_INGEST_MAX_DELIVERIES";
/// The longest an event waits for others to be started with (0: never).
pub const GATHER: &str = "HERALD_INGEST_GATHER";

/// What a gathered batch needs to start before its window ends: at 4,000
/// events/s the window is 2 ms, at 8,000/s 1 ms (herald_core::gather).
const GATHER_ENOUGH: usize = 8;
/// The longest [`GATHER`] may be.
const GATHER_MAX: Duration = Duration::from_millis(50);

/// The rejection reason of an event set aside after too many deliveries.
pub const REDELIVERED: &str = "redelivered";

/// Messages one pull asks for, at most. Few enough that the backlog a
/// message reports (when it was delivered) is fresh when the main consumer
/// weighs a lane on it: with 1,000, a burst's first thousand messages all
/// reported none, and were worked one by one while every other
/// organization's event waited behind them (docs/benchmarks.md, "Ingest
/// diverts the burst").
const PULL_BATCH: usize = 256;
/// Room above the server's `max_payload` for a message's subject and
/// headers: a pull capped below the largest message would never get it.
const PULL_BYTES_MARGIN: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub health_addr: config::Listen,
    pub limits: Limits,
    pub catalogue: Catalogue,
    /// How many events are processed at once.
    pub concurrency: usize,
    /// Bytes one pull asks for, at most (raised to the server's largest
    /// message if it is below).
    pub pull_max_bytes: usize,
    /// Deliveries of one event before it is set aside.
    pub max_deliveries: i64,
    /// Whether a bursting organization's events are read beside the
    /// others' (`platform::lanes`).
    pub lanes: bool,
    /// How events arriving at a moderate rate are gathered, to be started
    /// together (`herald_core::gather`).
    pub gather: Gather,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let extra = config::string(src, EXTRA_EVENT_TYPES, "");
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            health_addr: config::listen(src, HEALTH_ADDR, "127.0.0.1:9101")?,
            lanes: config::boolean(src, lanes::LANES, true)?,
            limits: Limits {
                max_event_bytes: config::number(
                    src,
                    MAX_EVENT_BYTES,
                    256 * 1024,
                    1..=8 * 1024 * 1024,
                )?,
                ..Limits::default()
            },
            catalogue: Catalogue::with_extra(&extra)
                .map_err(|e| ConfigError::new(EXTRA_EVENT_TYPES, e.to_string()))?,
            concurrency: 256,
            pull_max_bytes: match config::bytes(src, PULL_MAX_BYTES)? {
                0 => 8 << 20,
                n if (64 << 10..=1 << 30).contains(&n) => n as usize,
                _ => {
                    return Err(ConfigError::new(
                        PULL_MAX_BYTES,
                        "must be between 64KiB and 1GiB",
                    ));
                }
            },
            max_deliveries: config::number(
                src,
                MAX_DELIVERIES,
                5,
                1..=dead_letters::MAX_HAND_BACKS,
            )?,
            gather: Gather {
                max: match config::duration(src, GATHER, Duration::from_millis(5))? {
                    max if max <= GATHER_MAX => max,
                    _ => return Err(ConfigError::new(GATHER, "must be at most 50ms")),
                },
                enough: GATHER_ENOUGH,
            },
        })
    }
}

/// Why the service stopped.
pub use herald_platform::service::WorkerError as Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone)]
struct Metrics {
    ingested: Counter,
    rejected: Family<ReasonLabel, Counter>,
    dead_letters: Counter,
    set_aside: Counter,
}

struct State {
    js: jetstream::Context,
    config: Config,
    metrics: Metrics,
}

/// Runs ingest until `shutdown`, then finishes the events in hand.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (health, client) = herald_platform::service::start_worker(
        "ingest",
        &config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = Metrics {
        ingested: health.counter(
            "events_ingested",
            "Events accepted and passed to the matcher",
        ),
        dead_letters: health.counter(
            "dead_letters",
            "Events moved to HERALD_DEAD because their outcome cannot be published",
        ),
        rejected: health.metric(
            "events_rejected",
            "Events refused, by reason",
            Family::default(),
        ),
        set_aside: health.counter(
            "events_set_aside",
            "Events delivered too many times without being concluded, moved to HERALD_DEAD",
        ),
    };
    for code in Rejection::CODES.iter().chain([&REDELIVERED]) {
        let _ = metrics
            .rejected
            .get_or_create(&ReasonLabel { reason: code });
    }

    let js = herald_platform::nats::jetstream(client.clone());
    nats::ensure_streams(&js, config.nats.replicas, &config.nats.streams, &shutdown).await?;
    // A pull capped below the largest message the server takes would
    // never be answered with it.
    let largest = client.server_info().max_payload + PULL_BYTES_MARGIN;
    let pull_max_bytes = config.pull_max_bytes.max(largest);
    let spec = worker::Spec {
        stream: names::EVENTS_STREAM,
        durable: names::INGEST_CONSUMER,
        // With lanes, not what a lane has diverted.
        filter: if config.lanes {
            lanes::INGEST.main_filter()
        } else {
            ""
        },
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        batch: PULL_BATCH,
        max_bytes: pull_max_bytes,
        // Delivered past the limit without being concluded: whatever made
        // ingest stop or fail on it may do so again, so it is set aside
        // (`Handler::exhausted`).
        max_deliveries: config.max_deliveries,
        progress_every: None,
        operation: "ingest",
        gather: config.gather,
    };
    let worker = Worker::start(
        &js,
        &health,
        spec,
        Some(metrics.dead_letters.clone()),
        &shutdown,
    )
    .await?;
    tracing::info!(
        pull_max_bytes,
        "ingest consuming {}",
        names::EVENTS_SUBJECTS
    );

    let (concurrency, with_lanes) = (config.concurrency, config.lanes);
    let replicas = config.nats.replicas;
    let state = Arc::new(State {
        js: js.clone(),
        config,
        metrics,
    });
    if with_lanes {
        // Paced by what the matcher's lane has still to match, so a burst
        // reaches HERALD_ACCEPTED no faster than it is worked there.
        let downstream = lanes::Downstream::accepted(&js, &shutdown);
        let lanes = Lanes::start(
            &js,
            replicas,
            lanes::INGEST,
            Some(downstream),
            &health,
            &shutdown,
        )
        .await?;
        lanes.each(worker, state, concurrency, &shutdown).await;
    } else {
        worker.each(state, concurrency, &shutdown).await;
    }
    Ok(())
}

/// How long an event handed back for Herald's own trouble waits before it
/// is delivered again: 1 s, doubling to 16 s, so the deliveries before it
/// is set aside span a short outage rather than a second or two.
fn hand_back_delay(delivered: i64) -> Duration {
    Duration::from_secs(1 << (delivered.clamp(1, 5) - 1))
}

impl Handler for State {
    async fn handle(&self, message: &jetstream::Message) -> Disposition {
        // Stored diverted while its organization's lane was open: read as
        // published.
        let message = &*lanes::published(message);
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let headers = message.headers.as_ref();
        let envelope = Envelope {
            subject: message.subject.as_str(),
            content_type: nats::header(headers, "Content-Type"),
            msg_id: nats::header(headers, names::MSG_ID_HEADER),
            traceparent: nats::header(headers, "traceparent"),
            position: message.info().ok().map(|i| {
                (
                    i.stream_sequence,
                    (i.published.unix_timestamp_nanos() / 1_000_000) as i64,
                )
            }),
        };
        let outcome = event::normalize(
            &envelope,
            &message.payload,
            &self.config.limits,
            &self.config.catalogue,
            now_ms(),
        );
        let published = match &outcome {
            Ok(event) => self.accept(event).await,
            Err(rejection) => {
                self.reject(message, rejection.code(), &rejection.to_string())
                    .await
            }
        };
        match published {
            Ok(()) => {
                match &outcome {
                    Ok(_) => self.metrics.ingested.inc(),
                    Err(rejection) => self
                        .metrics
                        .rejected
                        .get_or_create(&ReasonLabel {
                            reason: rejection.code(),
                        })
                        .inc(),
                };
                Disposition::Ack
            }
            Err(error) if error.is_permanent() => {
                // It will never publish: set it aside rather than loop.
                tracing::error!(%error, subject = %message.subject, "event moved to the dead letters");
                Disposition::DeadLetter(format!("cannot publish the outcome: {error}"))
            }
            Err(error) => {
                // Herald's own failure: hand the event back for a later try.
                tracing::warn!(%error, subject = %message.subject, "cannot publish, event handed back");
                Disposition::HandBack(hand_back_delay(delivered))
            }
        }
    }

    /// Moves an event delivered too many times to the dead letters, whole
    /// (an operator redrives it once the cause is fixed), and files a
    /// rejection `redelivered` for its organization saying so.
    async fn exhausted(&self, message: &jetstream::Message, delivered: i64) -> Disposition {
        let message = &*lanes::published(message);
        let reason = format!(
            "delivered {delivered} times without being concluded (ingest stopped or failed while \
             handling it); set aside to the dead letters"
        );
        tracing::error!(subject = %message.subject, delivered, "event set aside after too many deliveries");
        // The dead letter first: once it is there the event is safe, and the
        // rejection only tells.
        if let Err(error) = dead_letters::send(
            &self.js,
            names::EVENTS_STREAM,
            &message.subject,
            message.payload.clone(),
            &reason,
        )
        .await
        {
            tracing::warn!(%error, "cannot set an event aside; handed back");
            return Disposition::HandBack(hand_back_delay(delivered));
        }
        self.metrics.set_aside.inc();
        if let Err(error) = self.reject(message, REDELIVERED, &reason).await {
            tracing::warn!(%error, "cannot file the rejection of an event set aside (it is in the dead letters)");
        } else {
            self.metrics
                .rejected
                .get_or_create(&ReasonLabel {
                    reason: REDELIVERED,
                })
                .inc();
        }
        Disposition::Term
    }
}

impl State {
    async fn accept(&self, event: &herald_core::proto::Event) -> Result<(), PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            names::MSG_ID_HEADER,
            format!("{}:{}", event.organization_id, event.id).as_str(),
        );
        trace::inject(&mut headers, &event.traceparent);
        nats::publish(
            &self.js,
            names::accepted_subject(&event.organization_id),
            headers,
            event.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
    }

    /// Files `message` on `herald.rejected.<org>` with its reason: `code`
    /// (a [`Rejection`] code, or [`REDELIVERED`]) and `text`.
    async fn reject(
        &self,
        message: &jetstream::Message,
        code: &'static str,
        text: &str,
    ) -> Result<(), PublishError> {
        let org = names::parse_event_subject(&message.subject)
            .map(|(org, _)| org)
            .or_else(|_| {
                // A subject with a valid organization but a bad type still
                // files the rejection under that organization.
                let org = message.subject.split('.').nth(2).unwrap_or_default();
                if names::valid_org(org) {
                    Ok(org)
                } else {
                    Err(())
                }
            })
            .unwrap_or(names::REJECTED_UNKNOWN_ORG);
        tracing::info!(subject = %message.subject, reason = code, error = text, "event rejected");
        let record = serde_json::json!({
            "reason": code,
            "message": text,
            "subject": message.subject.as_str(),
            "body": String::from_utf8_lossy(&message.payload[..message.payload.len().min(64 * 1024)]),
            "rejected_at": herald_core::payload::rfc3339_ms(now_ms()),
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Herald-Reject-Reason", code);
        if let Ok(info) = message.info() {
            headers.insert(
                names::MSG_ID_HEADER,
                format!("rejected:{}", info.stream_sequence).as_str(),
            );
        }
        nats::publish(
            &self.js,
            names::rejected_subject(org),
            headers,
            record.to_string().into(),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_set_aside_before_jetstream_would_drop_it() {
        // The worker sets aside what was delivered more than
        // `max_deliveries` times; JetStream's own backstop drops it silently
        // after `MAX_DELIVER`.
        let most = Config::from_source(&[(MAX_DELIVERIES, "20")])
            .unwrap()
            .max_deliveries;
        assert!(most < dead_letters::MAX_DELIVER);
    }

    #[test]
    fn hand_backs_wait_longer_each_time() {
        let delays: Vec<u64> = (1..=7).map(|d| hand_back_delay(d).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(hand_back_delay(0).as_secs(), 1);
    }

    #[test]
    fn configuration() {
        let config = Config::from_source(&[("UNUSED", "")]).unwrap();
        assert_eq!((config.pull_max_bytes, config.max_deliveries), (8 << 20, 5));
        let config = Config::from_source(&[(PULL_MAX_BYTES, "2MiB")]).unwrap();
        assert_eq!(config.pull_max_bytes, 2 << 20);
        let gather = |value| Config::from_source(&[(GATHER, value)]).unwrap().gather.max;
        assert_eq!(gather("0ms"), Duration::ZERO);
        assert_eq!(gather("20ms"), Duration::from_millis(20));
        assert_eq!(
            Config::from_source(&[("UNUSED", "")]).unwrap().gather.max,
            Duration::from_millis(5)
        );
        for (var, value) in [
            (GATHER, "51ms"),
            (GATHER, "soon"),
            (PULL_MAX_BYTES, "1KiB"),
            (PULL_MAX_BYTES, "lots"),
            (MAX_DELIVERIES, "0"),
            (MAX_DELIVERIES, "21"),
        ] {
            assert_eq!(
                Config::from_source(&[(var, value)]).unwrap_err().var,
                var,
                "{var}={value}"
            );
        }
    }
}
