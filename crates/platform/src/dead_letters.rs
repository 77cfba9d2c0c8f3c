//! The dead-letter stream, `HERALD_DEAD`: messages a consumer cannot process
//! (undecodable, or handed back again and again for Herald's own trouble)
//! are moved there with the reason and where they came from, instead of
//! looping or being dropped. An operator lists them and redrives them
//! (`herald-admin dead-letters`, docs/deploy.md).

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use herald_core::{names, payload};

use crate::nats::{self, PublishError};

/// Times a consumer hands a message back for Herald's own trouble before
/// it moves it to the dead letters instead.
pub const MAX_HAND_BACKS: i64 = 20;
/// Every consumer's `max_deliver`: a backstop a little above
/// [`MAX_HAND_BACKS`], so the consumer always sees the message first.
pub const MAX_DELIVER: i64 = MAX_HAND_BACKS + 5;

/// Why the message is dead.
pub const REASON: &str = "Herald-Dead-Reason";
/// The subject it was published on (where a redrive sends it back).
pub const SUBJECT: &str = "Herald-Dead-Subject";
/// The stream it was read from.
pub const STREAM: &str = "Herald-Dead-Stream";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no dead letter {0}")]
    NotFound(u64),
    #[error("dead letter {0} names no subject to send it back to")]
    NoSubject(u64),
    #[error("cannot read the dead-letter stream: {0}")]
    Read(String),
    #[error("cannot send the dead letter back: {0}")]
    Publish(#[from] PublishError),
    #[error("sent back, but cannot remove dead letter {seq} (it may be redriven twice): {message}")]
    Delete { seq: u64, message: String },
}

/// One message in `HERALD_DEAD`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    /// The stream it came from, e.g. `HERALD_DELIVERIES`.
    pub stream: String,
    /// The subject it was published on.
    pub subject: String,
    pub reason: String,
    /// When it was moved here (RFC 3339).
    pub dead_at: String,
    pub bytes: usize,
}

/// Moves `payload`, read from `stream` on `subject`, to the dead letters.
pub async fn send(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    payload: Bytes,
    reason: &str,
) -> Result<(), PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REASON, reason.replace(['\r', '\n'], " ").as_str());
    headers.insert(SUBJECT, subject);
    headers.insert(STREAM, stream);
    nats::publish(js, names::dead_subject(stream), headers, payload)
        .await
        .map(|_| ())
}

/// Moves a message this consumer cannot process to the dead letters and
/// terminates it; when even that fails it is handed back, to be tried again.
pub async fn terminate(
    js: &jetstream::Context,
    stream: &str,
    message: &jetstream::Message,
    reason: &str,
) -> Result<(), PublishError> {
    // One stored diverted (an ingest lane's) goes back where it was
    // published.
    let subject = herald_core::lanes::undiverted(&message.subject);
    match send(
        js,
        stream,
        subject.as_deref().unwrap_or(&message.subject),
        message.payload.clone(),
        reason,
    )
    .await
    {
        Ok(()) => {
            let _ = message.ack_with(AckKind::Term).await;
            Ok(())
        }
        Err(error) => {
            let _ = message
                .ack_with(AckKind::Nak(Some(std::time::Duration::from_secs(1))))
                .await;
            Err(error)
        }
    }
}

async fn dead_stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream, Error> {
    js.get_stream(names::DEAD_STREAM)
        .await
        .map_err(|e| Error::Read(e.to_string()))
}

/// Up to `limit` dead letters from sequence `from` on, oldest first.
pub async fn list(
    js: &jetstream::Context,
    from: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>, Error> {
    let mut stream = dead_stream(js).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| Error::Read(e.to_string()))?
        .state
        .clone();
    let mut found = Vec::new();
    let mut seq = from.max(state.first_sequence);
    while seq <= state.last_sequence && found.len() < limit {
        if let Some(letter) = get(&stream, seq).await? {
            found.push(letter.0);
        }
        seq += 1;
    }
    Ok(found)
}

async fn get(
    stream: &jetstream::stream::Stream,
    seq: u64,
) -> Result<Option<(DeadLetter, Bytes)>, Error> {
    let message = match stream.get_raw_message(seq).await {
        Ok(message) => message,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(e) => return Err(Error::Read(e.to_string())),
    };
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let dead_at = payload::rfc3339_ms((message.time.unix_timestamp_nanos() / 1_000_000) as i64);
    Ok(Some((
        DeadLetter {
            seq,
            stream: header(STREAM),
            subject: header(SUBJECT),
            reason: header(REASON),
            dead_at,
            bytes: message.payload.len(),
        },
        message.payload,
    )))
}

/// Sends dead letter `seq` back to the subject it came from (its stream
/// takes it in again, as a new message) and removes it from the dead letters.
pub async fn redrive(js: &jetstream::Context, seq: u64) -> Result<DeadLetter, Error> {
    let stream = dead_stream(js).await?;
    let (letter, payload) = get(&stream, seq).await?.ok_or(Error::NotFound(seq))?;
    if letter.subject.is_empty() {
        return Err(Error::NoSubject(seq));
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Herald-Redriven-From", seq.to_string().as_str());
    nats::publish(js, letter.subject.clone(), headers, payload).await?;
    discard_from(&stream, seq).await?;
    Ok(letter)
}

/// Removes dead letter `seq` for good.
pub async fn discard(js: &jetstream::Context, seq: u64) -> Result<(), Error> {
    let stream = dead_stream(js).await?;
    if get(&stream, seq).await?.is_none() {
        return Err(Error::NotFound(seq));
    }
    discard_from(&stream, seq).await
}

async fn discard_from(stream: &jetstream::stream::Stream, seq: u64) -> Result<(), Error> {
    stream
        .delete_message(seq)
        .await
        .map(|_| ())
        .map_err(|e| Error::Delete {
            seq,
            message: e.to_string(),
        })
}
