//! Log-writer: stores every delivery attempt in the Redis log index.
//!
//! It consumes `herald.attempts.>` in batches and writes each batch in one
//! Redis round trip before acking it. Writes are idempotent, so a
//! redelivered batch (or an attempt published twice) is stored once.
//!
//! The attempts stream keeps attempts for the log retention. When the index
//! is lost — Redis restarted empty, flushed, or a new Redis — the
//! `herald:logs:{meta}:built3` marker is missing; log-writer checks for it at start
//! and every `HERALD_LOG_INDEX_CHECK` while it runs, and replays the stream
//! into the index when it is gone (see [`rebuild`]). `herald-log-writer
//! rebuild` does the same replay on demand.

mod rebuild;

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use herald_core::{names, proto};
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::health::Health;
use herald_platform::log_index::Stored;
use herald_platform::log_index::{IndexError, LogIndex};
use herald_platform::nats;
use herald_platform::redis::Redis;
use herald_platform::worker::{self, Disposition, Settle, Worker};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub use crate::rebuild::Outcome;

pub const HEALTH_ADDR: &str = "HERALD_LOG_WRITER_HEALTH_ADDR";
pub const LOG_RETENTION: &str = "HERALD_LOG_RETENTION";
pub const LOG_INDEX_CHECK: &str = "HERALD_LOG_INDEX_CHECK";

/// Attempts written to Redis in one round trip (per organization).
const BATCH: usize = 500;
/// How long a batch gathers attempts after its first: at 1,000 attempts a
/// second a batch is then about ten, not one or two, and its script's
/// per-batch trimming and expiries run once for all of them (the
/// log-writer's CPU per attempt halved, Redis's fell by a quarter:
/// docs/benchmarks.md, issue 27). The log shows an attempt at most this
/// much later; deliveries are not delayed.
const LINGER: Duration = Duration::from_millis(10);
/// Bytes of attempt records pulled from NATS at once: a batch is bounded in
/// bytes as well as in count, whatever the bodies' size.
const PULL_BYTES: usize = 8 * 1024 * 1024;
/// Longest wait between two tries to store a batch while Redis is full or
/// failing; well inside the consumer's ack wait, which each wait extends.
const FULL_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    /// The Redis of the log index (`HERALD_LOG_REDIS_URL`, else
    /// `HERALD_REDIS_URL`).
    pub redis_url: String,
    pub health_addr: config::Listen,
    /// How long attempts are kept (index and attempts stream).
    pub retention: Duration,
    /// How often the index is checked for loss (and rebuilt).
    pub index_check: Duration,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let retention = config::duration(src, LOG_RETENTION, Duration::from_secs(7 * 86_400))?;
        if retention < Duration::from_secs(60) {
            return Err(ConfigError::new(LOG_RETENTION, "must be at least 1m"));
        }
        let index_check = config::duration(src, LOG_INDEX_CHECK, Duration::from_secs(5))?;
        if index_check < Duration::from_millis(100) || index_check > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                LOG_INDEX_CHECK,
                "must be between 100ms and 1h",
            ));
        }
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::log_redis_url(src)?,
            health_addr: config::listen(src, HEALTH_ADDR, "127.0.0.1:9104")?,
            retention,
            index_check,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Worker(#[from] herald_platform::service::WorkerError),
    #[error("log index: {0}")]
    Index(#[from] IndexError),
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("attempts stream: {0}")]
    Stream(String),
    #[error("another log-writer is rebuilding the index now; try again when it is done")]
    RebuildBusy,
    #[error("redis lost its data during the rebuild; run it again")]
    RebuildLost,
    #[error("shutting down")]
    Shutdown,
}

#[derive(Clone, Default)]
struct Metrics {
    stored: Counter,
    replayed: Counter,
    rebuilds: Counter,
    full: Gauge,
    /// 1 while a batch waits for Redis (full, unreachable or failing).
    waiting: Gauge,
    write_errors: Counter,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (health, client) = herald_platform::service::start_worker(
        "log-writer",
        &config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = Metrics {
        stored: health.counter(
            "attempts_stored",
            "Delivery attempts written to the log index",
        ),
        replayed: health.counter(
            "attempts_replayed",
            "Delivery attempts written to the log index by a rebuild",
        ),
        rebuilds: health.counter(
            "log_index_rebuilds",
            "Rebuilds of the log index from the attempts stream",
        ),
        full: health.gauge(
            "log_index_full",
            "1 while the log index's Redis is full (attempts wait in the stream)",
        ),
        waiting: health.gauge(
            "log_index_waiting",
            "1 while attempts wait in the stream for the log index's Redis (full, unreachable or failing)",
        ),
        write_errors: health.counter(
            "log_index_write_errors",
            "Failed writes to the log index (each is tried again; no attempt is dropped)",
        ),
    };

    let js = herald_platform::nats::jetstream(client.clone());
    let retention = nats::Retention {
        attempts: config.retention,
        owns_attempts: true,
        ..config.nats.streams.clone()
    };
    nats::ensure_streams(&js, config.nats.replicas, &retention, &shutdown).await?;
    let redis = Redis::new(&config.redis_url, Duration::from_millis(500))?;
    health.watch_redis(redis.clone(), shutdown.clone());
    let index = LogIndex::new(redis, config.retention);
    health.set("log_index", true);

    let watcher = tokio::spawn(rebuild::watch(
        js.clone(),
        index.clone(),
        config.index_check,
        metrics.clone(),
        shutdown.clone(),
    ));

    let spec = worker::Spec {
        stream: names::ATTEMPTS_STREAM,
        durable: names::LOG_WRITER_CONSUMER,
        filter: "",
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        batch: 1_000,
        max_bytes: PULL_BYTES,
        // A backstop: nothing here is handed back forever (a batch waits
        // for Redis, with progress acks, instead).
        max_deliveries: herald_platform::dead_letters::MAX_HAND_BACKS,
        progress_every: None,
        operation: "index",
        gather: herald_core::gather::Gather::OFF,
    };
    let worker = Worker::start(&js, &health, spec, None, &shutdown).await?;
    let settle = worker.settler();
    worker
        .batches(BATCH, LINGER, &shutdown, |batch| {
            store_batch(&settle, &index, batch, &metrics, &health, &shutdown)
        })
        .await;
    let _ = watcher.await;
    Ok(())
}

/// Writes one batch of attempts, and says to ack it. While Redis is full,
/// unreachable or failing, the batch is kept (its ack deadline extended)
/// and tried again with a growing pause, for as long as it takes: a full
/// Redis costs a try every few seconds, not a busy loop, and no attempt is
/// dropped (a hand-back would spend the consumer's deliveries, and past its
/// `max_deliver` the attempt would never be indexed). The attempts stay in
/// the stream meanwhile; health says `log_index: false` and the
/// `log_index_waiting` gauge is 1. At shutdown a waiting batch is handed
/// back. What cannot be indexed goes to the dead letters at once.
async fn store_batch(
    settle: &Settle,
    index: &LogIndex,
    batch: Vec<jetstream::Message>,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
) -> Vec<(jetstream::Message, Disposition)> {
    let mut messages = Vec::with_capacity(batch.len());
    let mut attempts = Vec::with_capacity(batch.len());
    for message in batch {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        // What cannot be indexed stays in HERALD_ATTEMPTS; the dead letters
        // show an operator what it was.
        let reason = match proto::AttemptResult::decode(message.payload.clone()) {
            Ok(attempt) if seq > 0 => {
                attempts.push(Stored { attempt, seq });
                messages.push(message);
                continue;
            }
            Ok(_) => "attempt without a stream sequence".to_owned(),
            Err(error) => format!("undecodable attempt: {error}"),
        };
        tracing::error!(subject = %message.subject, reason, "attempt cannot be indexed");
        settle
            .settle(&message, Disposition::DeadLetter(reason))
            .await;
    }
    let mut pause = Duration::from_secs(1);
    loop {
        let error = match index.write(&attempts).await {
            Ok(_) => {
                if metrics.waiting.get() != 0 {
                    metrics.full.set(0);
                    metrics.waiting.set(0);
                    health.set("log_index", true);
                    tracing::info!("log index has room again, catching up");
                }
                metrics.stored.inc_by(attempts.len() as u64);
                return settled(messages, Disposition::Ack);
            }
            Err(error) => error,
        };
        metrics.write_errors.inc();
        let full = matches!(error, IndexError::Full);
        metrics.full.set(i64::from(full));
        if metrics.waiting.get() == 0 {
            metrics.waiting.set(1);
            health.set("log_index", false);
            if full {
                tracing::error!(
                    batch = attempts.len(),
                    "log index redis is full (maxmemory): attempts wait in the stream until it has room"
                );
            } else {
                tracing::error!(
                    %error,
                    batch = attempts.len(),
                    "cannot write the log index: attempts wait in the stream until it can"
                );
            }
        }
        for message in &messages {
            let _ = message.ack_with(AckKind::Progress).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return settled(messages, Disposition::HandBack(Duration::ZERO)),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(FULL_BACKOFF);
    }
}

fn settled(
    messages: Vec<jetstream::Message>,
    disposition: Disposition,
) -> Vec<(jetstream::Message, Disposition)> {
    messages
        .into_iter()
        .map(|message| (message, disposition.clone()))
        .collect()
}

/// `herald-log-writer rebuild`: replays the attempts stream into the index
/// now, whether or not it looks complete, and marks it built. Idempotent;
/// running log-writers may go on meanwhile.
pub async fn rebuild_now(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let client = nats::connect(&config.nats, "log-writer-rebuild").await?;
    let js = herald_platform::nats::jetstream(client.clone());
    let redis = Redis::new(&config.redis_url, Duration::from_millis(2_000))?;
    redis.wait_ready(&shutdown).await.ok_or(Error::Shutdown)?;
    let index = LogIndex::new(redis, config.retention);
    let token = rebuild::token();
    match rebuild::replay(&js, &index, &token, &Metrics::default(), &shutdown).await? {
        Outcome::Built { replayed } => {
            tracing::info!(replayed, "log index rebuilt");
            nats::flush(&client).await;
            Ok(())
        }
        Outcome::Busy => Err(Error::RebuildBusy),
        Outcome::Lost => Err(Error::RebuildLost),
    }
}
