//! Log-writer: stores every delivery attempt in the Redis log index.
//!
//! It consumes `herald.attempts.>` in batches and writes each batch in one
//! Redis round trip before acking it. Writes are idempotent, so a
//! redelivered batch is stored once. The attempts stream keeps attempts for
//! the log retention; when the index is lost (no `herald:logs:built`
//! marker), log-writer replays the stream into it before going on.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use herald_core::{names, proto};
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::health::Health;
use herald_platform::log_index::LogIndex;
use herald_platform::nats;
use herald_platform::redis::Redis;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub const HEALTH_ADDR: &str = "HERALD_LOG_WRITER_HEALTH_ADDR";
pub const LOG_RETENTION: &str = "HERALD_LOG_RETENTION";
pub const LOG_MAX_PER_WEBHOOK: &str = "HERALD_LOG_MAX_PER_WEBHOOK";

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub redis_url: String,
    pub health_addr: SocketAddr,
    pub retention: Duration,
    pub max_per_webhook: usize,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let retention = config::duration(src, LOG_RETENTION, Duration::from_secs(7 * 86_400))?;
        if retention < Duration::from_secs(60) {
            return Err(ConfigError::new(LOG_RETENTION, "must be at least 1m"));
        }
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::redis_url(src)?,
            health_addr: config::addr(src, HEALTH_ADDR, "127.0.0.1:9104")?,
            retention,
            max_per_webhook: config::number(src, LOG_MAX_PER_WEBHOOK, 10_000, 10..=10_000_000)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error("health server: {0}")]
    Health(std::io::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("consumer: {0}")]
    Consumer(String),
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let health = Health::new("log-writer");
    health.set("nats", false);
    health.set("consumer", false);
    let stored = Counter::<u64>::default();
    health.register(|r| {
        r.register(
            "attempts_stored",
            "Delivery attempts written to the log index",
            stored.clone(),
        )
    });
    health
        .clone()
        .serve(config.health_addr, shutdown.clone())
        .await
        .map_err(Error::Health)?;

    let client = nats::connect(&config.nats, "log-writer").await?;
    health.watch_nats(client.clone(), shutdown.clone());
    let js = jetstream::new(client.clone());
    let retention = nats::Retention {
        attempts: config.retention,
        ..Default::default()
    };
    nats::ensure_streams(&js, config.nats.replicas, &retention, &shutdown).await?;
    let redis = Redis::new(&config.redis_url, Duration::from_millis(500))?;
    health.watch_redis(redis.clone(), shutdown.clone());
    let index = LogIndex::new(redis, config.retention, config.max_per_webhook);

    let consumer = nats::durable_consumer(
        &js,
        names::ATTEMPTS_STREAM,
        consumer::pull::Config {
            durable_name: Some(names::LOG_WRITER_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            ..Default::default()
        },
        &shutdown,
    )
    .await?;
    herald_platform::metrics::watch_consumer(
        &health,
        &consumer,
        names::LOG_WRITER_CONSUMER,
        shutdown.clone(),
    );
    let messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .messages()
        .await
        .map_err(|e| Error::Consumer(e.to_string()))?;
    health.set("consumer", true);

    let mut batches = std::pin::pin!(
        messages
            .ready_chunks(500)
            .take_until(shutdown.clone().cancelled_owned())
    );
    while let Some(batch) = batches.next().await {
        let mut messages = Vec::with_capacity(batch.len());
        let mut attempts = Vec::with_capacity(batch.len());
        for message in batch {
            match message {
                Ok(message) => match proto::AttemptResult::decode(message.payload.clone()) {
                    Ok(attempt) => {
                        attempts.push(attempt);
                        messages.push(message);
                    }
                    Err(error) => {
                        tracing::error!(%error, subject = %message.subject, "undecodable attempt dropped");
                        let _ = message.ack_with(AckKind::Term).await;
                    }
                },
                Err(error) => tracing::warn!(%error, "attempts consumer error"),
            }
        }
        match index.write(&attempts).await {
            Ok(()) => {
                stored.inc_by(attempts.len() as u64);
                for message in messages {
                    let _ = message.ack().await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, batch = attempts.len(), "cannot store attempts, handed back");
                for message in messages {
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
    }
    client.flush().await.ok();
    Ok(())
}
