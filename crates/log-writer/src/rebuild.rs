//! Rebuilding the log index from the attempts stream.
//!
//! The `herald:logs:{meta}:built3` marker says the index is complete. When it is
//! missing, one log-writer replica takes the rebuild lock, notes the
//! stream's last sequence, and replays the attempts of the retention up to
//! it with an ordered consumer; the live consumer keeps storing newer
//! attempts meanwhile (writes are idempotent, so overlap is harmless). The
//! lock lives in Redis too: if Redis loses its data during the replay, the
//! lock is gone, the marker is not set, and the next check starts over.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use herald_core::{names, proto};
use herald_platform::log_index::{LogIndex, Stored};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::{Error, Metrics};
use herald_platform::now_ms;

/// How long the rebuild lock outlives a replica that stopped renewing it.
const LOCK_TTL: Duration = Duration::from_secs(30);

/// Attempts replayed per Redis round trip.
const REPLAY_BATCH: usize = 1_000;

/// How a rebuild ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The index holds the stream's attempts and is marked built.
    Built { replayed: u64 },
    /// Another replica holds the rebuild lock.
    Busy,
    /// Redis lost its data meanwhile; the index is not marked built.
    Lost,
}

/// A token naming this process as the rebuild lock's holder.
pub(crate) fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Checks the marker now and every `every`, rebuilding when it is missing,
/// until `shutdown`.
pub(crate) async fn watch(
    js: jetstream::Context,
    index: LogIndex,
    every: Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let token = token();
    loop {
        match index.is_built().await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("log index missing, rebuilding from the attempts stream");
                match replay(&js, &index, &token, &metrics, &shutdown).await {
                    Ok(Outcome::Built { replayed }) => {
                        metrics.rebuilds.inc();
                        tracing::info!(replayed, "log index rebuilt");
                    }
                    Ok(Outcome::Busy) => tracing::debug!("another log-writer is rebuilding"),
                    Ok(Outcome::Lost) => tracing::warn!("redis lost data during the rebuild"),
                    Err(Error::Shutdown) => return,
                    Err(error) => tracing::warn!(%error, "log index rebuild failed"),
                }
            }
            // Redis down: the live consumer hands attempts back meanwhile.
            Err(error) => tracing::debug!(%error, "cannot check the log index"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Replays the attempts stream (the part inside the retention, up to its
/// current last message) into the index and marks it built.
pub(crate) async fn replay(
    js: &jetstream::Context,
    index: &LogIndex,
    token: &str,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    if !index.lock_rebuild(token, LOCK_TTL).await? {
        return Ok(Outcome::Busy);
    }
    let stream_error = |e: &dyn std::fmt::Display| Error::Stream(e.to_string());
    let mut stream = js
        .get_stream(names::ATTEMPTS_STREAM)
        .await
        .map_err(|e| stream_error(&e))?;
    let state = &stream.info().await.map_err(|e| stream_error(&e))?.state;
    let (last, messages) = (state.last_sequence, state.messages);
    let mut replayed = 0u64;
    if messages > 0 {
        let start_ms = now_ms() - index.retention().as_millis() as i64;
        let start_time = async_nats::datetime::from_nanos(start_ms as i128 * 1_000_000)
            .map_err(|e| stream_error(&e))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
                max_batch: REPLAY_BATCH as i64,
                max_bytes: 8 * 1024 * 1024,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_error(&e))?;
        if consumer.cached_info().num_pending > 0 {
            let messages = consumer.messages().await.map_err(|e| stream_error(&e))?;
            let mut chunks = std::pin::pin!(messages.ready_chunks(REPLAY_BATCH));
            loop {
                let chunk = tokio::select! {
                    _ = shutdown.cancelled() => return Err(Error::Shutdown),
                    chunk = chunks.next() => chunk,
                };
                let Some(chunk) = chunk else { break };
                let mut attempts = Vec::with_capacity(chunk.len());
                let mut done = false;
                for message in chunk {
                    let message = message.map_err(|e| stream_error(&e))?;
                    let info = message.info().map_err(|e| stream_error(&e))?;
                    if info.stream_sequence > last {
                        done = true;
                        break;
                    }
                    done = info.stream_sequence == last || info.pending == 0;
                    match proto::AttemptResult::decode(message.payload.clone()) {
                        Ok(attempt) => attempts.push(Stored {
                            attempt,
                            seq: info.stream_sequence,
                        }),
                        Err(error) => {
                            tracing::warn!(%error, seq = info.stream_sequence, "undecodable attempt skipped")
                        }
                    }
                    if done {
                        break;
                    }
                }
                index.write(&attempts).await?;
                replayed += attempts.len() as u64;
                metrics.replayed.inc_by(attempts.len() as u64);
                if !index.keep_rebuild(token, LOCK_TTL).await? {
                    return Ok(Outcome::Lost);
                }
                if done {
                    break;
                }
            }
        }
    }
    if index.finish_rebuild(token).await? {
        Ok(Outcome::Built { replayed })
    } else {
        Ok(Outcome::Lost)
    }
}
