//! NATS: the connection, and the JetStream streams and consumers every
//! service creates idempotently at start (so services may start in any
//! order). Their names live in `herald_core::names`; what each holds is in
//! docs/ARCHITECTURE.md.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use herald_core::names;
use tokio_util::sync::CancellationToken;

use crate::config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot create stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot create consumer {consumer}: {message}")]
    Consumer { consumer: String, message: String },
    #[error("shutting down")]
    Shutdown,
}

/// Connects, retrying until the server answers (or forever in the
/// background, when it goes away later).
pub async fn connect(config: &config::Nats, service: &str) -> Result<async_nats::Client, Error> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("herald-{service}"))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(config.url.as_str())
        .await?;
    Ok(client)
}

/// Stream retention Herald uses.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Events, accepted events and delivery jobs: long enough to outlive the
    /// longest retry delay.
    pub work: Duration,
    /// Attempt results: the log retention, so the index can be rebuilt.
    pub attempts: Duration,
    /// Whether this service owns the attempts stream's retention (only
    /// log-writer, which reads `HERALD_LOG_RETENTION`): others create the
    /// stream when it is missing but never change an existing one's.
    pub owns_attempts: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            work: Duration::from_secs(3 * 86_400),
            attempts: Duration::from_secs(7 * 86_400),
            owns_attempts: false,
        }
    }
}

fn stream_config(
    name: &str,
    subjects: Vec<String>,
    max_age: Duration,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects,
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The configuration of every stream Herald uses.
pub fn streams(replicas: usize, retention: &Retention) -> Vec<stream::Config> {
    let week = Duration::from_secs(7 * 86_400);
    let mut deliveries = stream_config(
        names::DELIVERIES_STREAM,
        vec![
            names::DELIVERIES_SUBJECTS.into(),
            names::SCHEDULES_SUBJECTS.into(),
        ],
        retention.work,
        replicas,
    );
    // Retries are server-side schedules, so a delivery waiting for its next
    // attempt holds no consumer's ack-pending slot.
    deliveries.allow_message_schedules = true;
    deliveries.allow_message_ttl = true;
    vec![
        stream_config(
            names::EVENTS_STREAM,
            vec![names::EVENTS_SUBJECTS.into()],
            retention.work,
            replicas,
        ),
        stream_config(
            names::ACCEPTED_STREAM,
            vec![names::ACCEPTED_SUBJECTS.into()],
            retention.work,
            replicas,
        ),
        stream_config(
            names::REJECTED_STREAM,
            vec![names::REJECTED_SUBJECTS.into()],
            week,
            replicas,
        ),
        deliveries,
        stream_config(
            names::ATTEMPTS_STREAM,
            vec![names::ATTEMPTS_SUBJECTS.into()],
            retention.attempts,
            replicas,
        ),
        stream_config(
            names::SYSTEM_STREAM,
            vec![names::SYSTEM_SUBJECTS.into()],
            week,
            replicas,
        ),
    ]
}

/// Creates or updates every stream, retrying while NATS is unreachable.
pub async fn ensure_streams(
    js: &jetstream::Context,
    replicas: usize,
    retention: &Retention,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    for config in streams(replicas, retention) {
        let name = config.name.clone();
        if name == names::ATTEMPTS_STREAM && !retention.owns_attempts {
            retry(shutdown, || async {
                match js.get_stream(&name).await {
                    Ok(_) => Ok(()),
                    Err(_) => js.create_or_update_stream(config.clone()).await.map(|_| ()),
                }
            })
            .await
            .map_err(|source| Error::Stream {
                stream: name,
                source,
            })?;
            continue;
        }
        retry(shutdown, || js.create_or_update_stream(config.clone()))
            .await
            .map_err(|source| Error::Stream {
                stream: name,
                source,
            })?;
    }
    Ok(())
}

/// A durable pull consumer, created or updated.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
    shutdown: &CancellationToken,
) -> Result<consumer::Consumer<consumer::pull::Config>, Error> {
    let name = config.durable_name.clone().unwrap_or_default();
    let err = |message: String| Error::Consumer {
        consumer: name.clone(),
        message,
    };
    let stream = retry(shutdown, || js.get_stream(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    retry(shutdown, || stream.create_consumer(config.clone()))
        .await
        .map_err(|e| err(e.to_string()))
}

/// Retries `f` with backoff while it fails, until it succeeds or `shutdown`;
/// the last error is returned on shutdown.
async fn retry<T, E, F, Fut>(shutdown: &CancellationToken, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(error) if shutdown.is_cancelled() => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "nats not ready, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Flushes what the client still has to send, giving up after two seconds
/// (at shutdown NATS may already be gone; acks not flushed are redelivered).
pub async fn flush(client: &async_nats::Client) {
    if tokio::time::timeout(Duration::from_secs(2), client.flush())
        .await
        .is_err()
    {
        tracing::warn!("nats flush timed out at shutdown");
    }
}

/// The value of a header, if present.
pub fn header<'a>(headers: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}
