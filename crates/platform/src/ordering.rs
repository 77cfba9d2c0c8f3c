//! The queues of ordered webhooks (`core::ordering` decides; this keeps
//! them in HERALD_ORDERED).
//!
//! Each key of an ordered webhook has a queue,
//! `herald.ordered.<org>.<webhook>.q.<token>`: its deliveries not yet
//! concluded, oldest first. Only the head is ever handed on to
//! HERALD_DELIVERIES, as a job that carries its place (key, sequence,
//! entry); whoever concludes that job moves the key's cursor
//! (`…c.<token>`, one message, rolled up) and removes the entry, then
//! hands on the next. Every step can be repeated after a crash: a hand-on
//! of the same entry is stored once (`Nats-Msg-Id`), an entry already
//! removed is a delivery already concluded (the deliverer does not send it
//! again), and the cursor is written absolutely, never incremented.
//!
//! What HERALD_ORDERED holds grows with the keys in flight: an entry leaves
//! when its delivery concludes, and a cursor expires
//! `HERALD_ORDERING_KEY_TTL` after its key's last conclusion (a key quiet
//! for longer starts again at 1). A held key's cursor does not expire.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use herald_core::ordering::{self, Conclusion, Cursor, Next, Turn};
use herald_core::{names, proto};
use prost::Message;
use tokio::sync::OnceCell;

use crate::nats::{self, PublishError};
use crate::trace;

/// How long a key's cursor is kept after its last conclusion, by default.
pub const KEY_TTL: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum OrderingError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot read HERALD_ORDERED: {0}")]
    Read(String),
    #[error("cannot remove a concluded delivery from its key's queue: {0}")]
    Delete(String),
    /// Its key's cursor kept changing under compare-and-set.
    #[error("the key's cursor kept changing")]
    Contended,
}

/// Compare-and-set tries of a key's cursor before giving up (the caller
/// tries again later).
const CAS_TRIES: usize = 8;

/// A key's cursor as read.
struct Read {
    cursor: Cursor,
    /// Its message's stream sequence, 0 when there is none.
    seq: u64,
    /// How long ago it was written.
    age_ms: i64,
}

impl OrderingError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, OrderingError::Publish(e) if e.is_permanent())
    }
}

/// The queues of ordered webhooks.
#[derive(Clone)]
pub struct Queues {
    js: jetstream::Context,
    stream: std::sync::Arc<OnceCell<stream::Stream>>,
    key_ttl: Duration,
}

/// What an ordered webhook holds back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Keys with a delivery not yet concluded.
    pub keys_waiting: u64,
    /// Keys with deliveries waiting behind one not yet concluded.
    pub keys_held_back: u64,
    /// Deliveries not yet concluded, over every key.
    pub deliveries_waiting: u64,
    /// The oldest delivery not yet concluded.
    pub oldest: Option<Oldest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Oldest {
    pub delivery_id: String,
    pub event_type: String,
    pub key: String,
    /// When it was queued.
    pub since_ms: i64,
    /// Whether its key is held on it (it gave up, and the webhook holds its
    /// keys): it waits to be recovered.
    pub held: bool,
}

impl Queues {
    pub fn new(js: jetstream::Context, key_ttl: Duration) -> Self {
        Self {
            js,
            stream: Default::default(),
            key_ttl,
        }
    }

    async fn stream(&self) -> Result<&stream::Stream, OrderingError> {
        self.stream
            .get_or_try_init(|| async {
                self.js
                    .get_stream(names::ORDERED_STREAM)
                    .await
                    .map_err(|e| OrderingError::Read(e.to_string()))
            })
            .await
    }

    /// Appends `job` (encoded as `payload`, its `ordered.key` set) to its
    /// key's queue, stored once per `msg_id`, and hands the key's head on
    /// if it may go (the job itself, when the key had nothing waiting).
    pub async fn enqueue(
        &self,
        job: &proto::DeliveryJob,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<(), OrderingError> {
        self.append(job, payload, msg_id).await?.await?;
        self.hand_on_job(job).await
    }

    /// Sends `job` to the end of its key's queue: once this returns, what
    /// is appended after it on this connection is stored after it. The
    /// stream's acknowledgement is the future returned; then
    /// [`Queues::hand_on_job`].
    pub async fn append(
        &self,
        job: &proto::DeliveryJob,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<impl Future<Output = Result<(), OrderingError>> + use<>, OrderingError> {
        let key = place(job).map(|p| p.key.as_str()).unwrap_or_default();
        let subject =
            names::ordered_subject(&job.organization_id, &job.webhook_id, &ordering::token(key));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::MSG_ID_HEADER, msg_id);
        let fail =
            |subject, source| OrderingError::Publish(PublishError::Publish { subject, source });
        match self
            .js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
        {
            Ok(ack) => Ok(async move { ack.await.map(|_| ()).map_err(|e| fail(subject, e)) }),
            Err(source) => Err(fail(subject, source)),
        }
    }

    /// [`Queues::hand_on`] for `job`'s key.
    pub async fn hand_on_job(&self, job: &proto::DeliveryJob) -> Result<(), OrderingError> {
        let key = place(job).map(|p| p.key.as_str()).unwrap_or_default();
        self.hand_on(&job.organization_id, &job.webhook_id, key)
            .await
    }

    /// Hands the head of `key`'s queue on to HERALD_DELIVERIES with its
    /// sequence, unless the key is held, has nothing waiting, or its head
    /// is in the pipeline already: published (`Nats-Msg-Id` of the entry),
    /// then claimed (the cursor says it is handed on, by compare-and-set),
    /// so that it is not handed on again once JetStream no longer
    /// deduplicates. Two hand-ons racing store it once.
    pub async fn hand_on(
        &self,
        org: &str,
        webhook_id: &str,
        key: &str,
    ) -> Result<(), OrderingError> {
        self.hand_on_with(org, webhook_id, key, None).await
    }

    /// [`Queues::hand_on`], the key's cursor known at first (just written).
    async fn hand_on_with(
        &self,
        org: &str,
        webhook_id: &str,
        key: &str,
        mut known: Option<Read>,
    ) -> Result<(), OrderingError> {
        let subject = names::ordered_subject(org, webhook_id, &ordering::token(key));
        for _ in 0..CAS_TRIES {
            let stream = self.stream().await?;
            let Some(head) = found(stream.get_first_raw_message_by_subject(&subject, 1).await)?
            else {
                return Ok(());
            };
            let read = match known.take() {
                Some(read) => read,
                None => self.read_cursor(org, webhook_id, key).await?,
            };
            let (sequence, claim) = match read.cursor.turn(head.sequence, read.age_ms) {
                Turn::Held | Turn::Nothing => return Ok(()),
                // Its conclusion was cut short before the removal (or
                // this read raced it): removed, and the next looked at.
                Turn::Concluded => {
                    self.remove(head.sequence).await?;
                    known = Some(read);
                    continue;
                }
                Turn::Again { sequence } => (sequence, false),
                Turn::Go { sequence } => (sequence, true),
            };
            let Ok(mut job) = proto::DeliveryJob::decode(head.payload.clone()) else {
                // Nothing can ever deliver it: it must not block its key.
                tracing::error!(
                    entry = head.sequence,
                    "undecodable entry in an ordered queue; removed"
                );
                self.remove(head.sequence).await?;
                continue;
            };
            job.ordered = Some(proto::OrderedPlace {
                key: key.to_owned(),
                sequence,
                entry: head.sequence,
            });
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                names::MSG_ID_HEADER,
                ordering::turn_msg_id(&job.delivery_id, head.sequence).as_str(),
            );
            if let Some(event) = &job.event {
                trace::inject(&mut headers, &event.traceparent);
            }
            // Published before it is claimed: a hand-on cut short in
            // between is made again by the next (stored once), where a claim
            // without its publish would leave the key waiting for nothing.
            nats::publish(
                &self.js,
                names::delivery_subject(org, webhook_id),
                headers,
                job.encode_to_vec().into(),
            )
            .await?;
            if !claim
                || self
                    .write_cursor(
                        org,
                        webhook_id,
                        key,
                        read.cursor.handing(head.sequence),
                        read.seq,
                    )
                    .await?
                    .is_some()
            {
                return Ok(());
            }
            // The cursor changed since it was read (another hand-on of the
            // same head claimed it, or the key moved on): look again.
        }
        Err(OrderingError::Contended)
    }

    /// The cursor of `key`, with its stream sequence (0: none) for a
    /// compare-and-set, and how long ago it was written.
    async fn read_cursor(
        &self,
        org: &str,
        webhook_id: &str,
        key: &str,
    ) -> Result<Read, OrderingError> {
        let subject = names::ordered_cursor_subject(org, webhook_id, &ordering::token(key));
        let last = found(
            self.stream()
                .await?
                .get_last_raw_message_by_subject(&subject)
                .await,
        )?;
        Ok(match last {
            Some(m) => Read {
                cursor: Cursor::decode(&m.payload),
                seq: m.sequence,
                age_ms: crate::now_ms() - (m.time.unix_timestamp_nanos() / 1_000_000) as i64,
            },
            None => Read {
                cursor: Cursor::default(),
                seq: 0,
                age_ms: i64::MAX,
            },
        })
    }

    /// The delivery `key` is held on (it gave up on a webhook that holds
    /// its keys), if it is: recovering it sends it at its place, with its
    /// sequence, and the key goes on once it concludes.
    pub async fn held(
        &self,
        org: &str,
        webhook_id: &str,
        key: &str,
    ) -> Result<Option<Held>, OrderingError> {
        let cursor = self.read_cursor(org, webhook_id, key).await?.cursor;
        if cursor.held == 0 {
            return Ok(None);
        }
        let entry = found(self.stream().await?.get_raw_message(cursor.held).await)?;
        Ok(entry
            .and_then(|m| proto::DeliveryJob::decode(m.payload).ok())
            .map(|job| Held {
                entry: cursor.held,
                sequence: cursor.concluded + 1,
                delivery_id: job.delivery_id,
            }))
    }

    /// Whether the delivery at `place` is still its key's to conclude (its
    /// entry is queued): false once it concluded, so a job delivered
    /// again after its conclusion is not sent again.
    pub async fn is_open(
        &self,
        org: &str,
        webhook_id: &str,
        place: &proto::OrderedPlace,
    ) -> Result<bool, OrderingError> {
        let entry = found(self.stream().await?.get_raw_message(place.entry).await)?;
        let queue = names::ordered_subject(org, webhook_id, &ordering::token(&place.key));
        Ok(entry.is_some_and(|m| m.subject.as_str() == queue))
    }

    /// `job`'s delivery concluded `how`: moves its key's cursor (or holds
    /// the key on it, when `hold` and it failed), removes its entry and
    /// hands on the next. A job that is not ordered is left alone.
    pub async fn conclude(
        &self,
        job: &proto::DeliveryJob,
        how: Conclusion,
        hold: bool,
    ) -> Result<(), OrderingError> {
        let Some(place) = place(job).filter(|p| p.entry > 0) else {
            return Ok(());
        };
        let (org, webhook_id, key) = (
            job.organization_id.as_str(),
            job.webhook_id.as_str(),
            place.key.as_str(),
        );
        for _ in 0..CAS_TRIES {
            let read = self.read_cursor(org, webhook_id, key).await?;
            let next = read.cursor.after(place.sequence, place.entry, how, hold);
            if next == read.cursor {
                // Concluded before (a conclusion cut short after its cursor,
                // or a second copy): its next is handed on, once.
                return self.hand_on_with(org, webhook_id, key, Some(read)).await;
            }
            let Some(seq) = self
                .write_cursor(org, webhook_id, key, next, read.seq)
                .await?
            else {
                continue;
            };
            if ordering::after(how, hold) == Next::Hold {
                return Ok(());
            }
            self.remove(place.entry).await?;
            let written = Read {
                cursor: next,
                seq,
                age_ms: 0,
            };
            return self.hand_on_with(org, webhook_id, key, Some(written)).await;
        }
        Err(OrderingError::Contended)
    }

    /// Writes `cursor` if the key's cursor is still the message `expected`
    /// (0: none), answering the new message's sequence: `None` when another
    /// writer came first.
    async fn write_cursor(
        &self,
        org: &str,
        webhook_id: &str,
        key: &str,
        cursor: Cursor,
        expected: u64,
    ) -> Result<Option<u64>, OrderingError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let ttl = if cursor.held != 0 {
            "never".to_owned()
        } else {
            format!("{}s", self.key_ttl.as_secs().max(1))
        };
        headers.insert("Nats-TTL", ttl.as_str());
        match nats::publish(
            &self.js,
            names::ordered_cursor_subject(org, webhook_id, &ordering::token(key)),
            headers,
            cursor.encode().into(),
        )
        .await
        {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(PublishError::Publish { source, .. })
                if source.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
            {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn remove(&self, entry: u64) -> Result<(), OrderingError> {
        nats::remove_message(&self.js, names::ORDERED_STREAM, entry)
            .await
            .map(|_| ())
            .map_err(|e| OrderingError::Delete(e.to_string()))
    }

    /// What `webhook_id`'s keys hold back.
    pub async fn status(&self, org: &str, webhook_id: &str) -> Result<Status, OrderingError> {
        let stream = self.stream().await?;
        let filter = names::ordered_queues(org, webhook_id);
        let mut status = Status::default();
        let mut subjects = stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| OrderingError::Read(e.to_string()))?;
        while let Some(subject) = subjects.next().await {
            let (_, n) = subject.map_err(|e| OrderingError::Read(e.to_string()))?;
            status.keys_waiting += 1;
            status.deliveries_waiting += n as u64;
            if n >= 2 {
                status.keys_held_back += 1;
            }
        }
        if status.keys_waiting == 0 {
            return Ok(status);
        }
        let Some(oldest) = found(stream.get_first_raw_message_by_subject(&filter, 1).await)? else {
            return Ok(status);
        };
        if let Ok(job) = proto::DeliveryJob::decode(oldest.payload.clone()) {
            let key = place(&job).map(|p| p.key.clone()).unwrap_or_default();
            let cursor = self.read_cursor(org, webhook_id, &key).await?.cursor;
            status.oldest = Some(Oldest {
                delivery_id: job.delivery_id.clone(),
                event_type: job.event.map(|e| e.r#type).unwrap_or_default(),
                held: cursor.turn(oldest.sequence, 0) == Turn::Held,
                key,
                since_ms: (oldest.time.unix_timestamp_nanos() / 1_000_000) as i64,
            });
        }
        Ok(status)
    }
}

/// The delivery a key is held on ([`Queues::held`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub entry: u64,
    pub sequence: u64,
    pub delivery_id: String,
}

/// A read of HERALD_ORDERED: `None` when there is no such message.
fn found(
    read: Result<jetstream::message::StreamMessage, stream::RawMessageError>,
) -> Result<Option<jetstream::message::StreamMessage>, OrderingError> {
    match read {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(OrderingError::Read(e.to_string())),
    }
}

fn place(job: &proto::DeliveryJob) -> Option<&proto::OrderedPlace> {
    job.ordered.as_ref().filter(|p| !p.key.is_empty())
}
