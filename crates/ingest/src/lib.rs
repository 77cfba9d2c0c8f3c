//! Ingest: the front door for producers' events.
//!
//! It consumes `herald.events.<org>.<type>` (stream `HERALD_EVENTS`),
//! validates and normalizes each event, and publishes it as a
//! `herald.v1.Event` to `herald.accepted.<org>` for the matcher; a bad event
//! goes to `herald.rejected.<org>` with its reason. A message is acked only
//! after its outcome is durably published, so nothing is lost; the accepted
//! publish carries `Nats-Msg-Id: <org>:<event id>`, so a redelivery is not a
//! duplicate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use herald_core::catalogue::Catalogue;
use herald_core::event::{self, Envelope, Limits, Rejection};
use herald_core::names;
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::nats::PublishError;
use herald_platform::now_ms;
use herald_platform::{dead_letters, metrics, nats, trace};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub const HEALTH_ADDR: &str = "HERALD_INGEST_HEALTH_ADDR";
pub const MAX_EVENT_BYTES: &str = "HERALD_MAX_EVENT_BYTES";
pub const EXTRA_EVENT_TYPES: &str = "HERALD_EXTRA_EVENT_TYPES";

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub health_addr: SocketAddr,
    pub limits: Limits,
    pub catalogue: Catalogue,
    /// How many events are processed at once.
    pub concurrency: usize,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let extra = config::string(src, EXTRA_EVENT_TYPES, "");
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            health_addr: config::addr(src, HEALTH_ADDR, "127.0.0.1:9101")?,
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
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error(transparent)]
    Start(#[from] herald_platform::service::StartError),
    #[error("consumer: {0}")]
    Consumer(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    ingested: Counter,
    rejected: Family<ReasonLabel, Counter>,
    dead_letters: Counter,
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
        config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = Metrics::default();
    health.register(|r| {
        r.register(
            "events_ingested",
            "Events accepted and passed to the matcher",
            metrics.ingested.clone(),
        );
        r.register(
            "dead_letters",
            "Events moved to HERALD_DEAD because their outcome cannot be published",
            metrics.dead_letters.clone(),
        );
        r.register(
            "events_rejected",
            "Events refused, by reason",
            metrics.rejected.clone(),
        );
    });
    for code in Rejection::CODES {
        let _ = metrics
            .rejected
            .get_or_create(&ReasonLabel { reason: code });
    }

    let js = herald_platform::nats::jetstream(client.clone());
    nats::ensure_streams(&js, config.nats.replicas, &config.nats.streams, &shutdown).await?;
    let consumer = nats::durable_consumer(
        &js,
        names::EVENTS_STREAM,
        consumer::pull::Config {
            durable_name: Some(names::INGEST_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            max_deliver: dead_letters::MAX_DELIVER,
            ..Default::default()
        },
        &shutdown,
    )
    .await?;
    metrics::watch_consumer(&health, &consumer, names::INGEST_CONSUMER, shutdown.clone());
    let mut messages = nats::Pull::new(consumer, 1_000, 0)
        .await
        .map_err(|e| Error::Consumer(e.to_string()))?;
    health.set("consumer", true);
    tracing::info!("ingest consuming {}", names::EVENTS_SUBJECTS);

    let concurrency = config.concurrency;
    let state = Arc::new(State {
        js,
        config,
        metrics,
    });
    messages
        .by_ref()
        .take_until(shutdown.clone().cancelled_owned())
        .for_each_concurrent(concurrency, |message| {
            let state = state.clone();
            async move {
                match message {
                    Ok(message) => {
                        let span = trace::message_span(
                            "ingest",
                            &message.subject,
                            message.headers.as_ref(),
                            "",
                        );
                        state.handle(message).instrument(span).await
                    }
                    Err(error) => tracing::warn!(%error, "event consumer error"),
                }
            }
        })
        .await;
    herald_platform::shutdown::hand_back(&mut messages).await;
    nats::flush(&client).await;
    Ok(())
}

impl State {
    async fn handle(&self, message: jetstream::Message) {
        let headers = message.headers.as_ref();
        let envelope = Envelope {
            subject: message.subject.as_str(),
            content_type: nats::header(headers, "Content-Type"),
            msg_id: nats::header(headers, "Nats-Msg-Id"),
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
            Err(rejection) => self.reject(&message, rejection).await,
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
                if let Err(error) = message.ack().await {
                    tracing::warn!(%error, "ack failed; the event will be redelivered and deduplicated");
                }
            }
            Err(error) => {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                if error.is_permanent() || delivered > dead_letters::MAX_HAND_BACKS {
                    // It will never publish: set it aside rather than loop.
                    let reason = format!("cannot publish the outcome: {error}");
                    tracing::error!(%error, subject = %message.subject, "event moved to the dead letters");
                    self.metrics.dead_letters.inc();
                    if let Err(error) =
                        dead_letters::terminate(&self.js, names::EVENTS_STREAM, &message, &reason)
                            .await
                    {
                        tracing::warn!(%error, "cannot move an event to the dead letters; handed back");
                    }
                    return;
                }
                // Herald's own failure: hand the event back for a later try.
                tracing::warn!(%error, subject = %message.subject, "cannot publish, event handed back");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn accept(&self, event: &herald_core::proto::Event) -> Result<(), PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
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

    async fn reject(
        &self,
        message: &jetstream::Message,
        rejection: &Rejection,
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
        tracing::info!(subject = %message.subject, reason = rejection.code(), error = %rejection, "event rejected");
        let record = serde_json::json!({
            "reason": rejection.code(),
            "message": rejection.to_string(),
            "subject": message.subject.as_str(),
            "body": String::from_utf8_lossy(&message.payload[..message.payload.len().min(64 * 1024)]),
            "rejected_at": herald_core::payload::rfc3339_ms(now_ms()),
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Herald-Reject-Reason", rejection.code());
        if let Ok(info) = message.info() {
            headers.insert(
                "Nats-Msg-Id",
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
