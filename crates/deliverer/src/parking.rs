//! Deliveries waiting for a failing webhook: parked in arrival order on
//! `herald.parked.<org>.<webhook>` (stream HERALD_PARKED), one stored copy
//! each, holding no slot of any consumer. Nothing consumes that stream; the
//! deliverer reads the oldest parked delivery by direct get and moves it
//! back to the delivery subject, publishing before deleting, so a crash in
//! between leaves a duplicate (deduplicated by `Nats-Msg-Id`) and never a
//! loss.
//!
//! - a probe timer that fires releases the oldest one: it arrives as a job
//!   and becomes the probe;
//! - a recovery releases them all, oldest first;
//! - a disable drains them, each logged failed with `webhook_disabled`.
//!
//! Releases and drains go a batch at a time ([`Parking::take`]): read in
//! order through one ordered consumer, the batch's publishes in flight
//! together, then one purge of the subject up to the batch's last sequence,
//! so thousands move in a second rather than a few dozen.
//!
//! Nothing here expires by age: a parked delivery leaves only by a release
//! or a drain, each of which logs or delivers it. The probe timer that
//! would release or drain it is re-armed after any error, and every
//! deliverer re-arms the timers of all webhooks with parked deliveries at
//! start and every few minutes ([`Parking::parked_webhooks`]), so one that
//! died mid-release leaves nothing stranded.

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use herald_core::{names, proto};
use herald_platform::nats::{self, PublishError};
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum ParkingError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot read parked deliveries: {0}")]
    Read(String),
    #[error("cannot remove a released delivery: {0}")]
    Delete(String),
}

/// The most deliveries one release or drain moves; what is left is moved by
/// the next probe timer (a drain or release re-arms it).
const MAX_PER_PASS: usize = 100_000;
/// Deliveries concluded together by a release or a drain: read in order,
/// their publishes in flight at once, removed by one purge.
pub const BATCH: usize = 256;
/// How long the reading of a batch waits for the next parked delivery
/// before it takes what it has (the server said more were pending, but
/// another replica may have taken them).
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One parked delivery.
pub struct Parked {
    pub seq: u64,
    pub job: proto::DeliveryJob,
    pub payload: Bytes,
}

#[derive(Clone)]
pub struct Parking {
    js: jetstream::Context,
}

impl Parking {
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    async fn stream(&self) -> Result<jetstream::stream::Stream, ParkingError> {
        self.js
            .get_stream(names::PARKED_STREAM)
            .await
            .map_err(|e| ParkingError::Read(e.to_string()))
    }

    /// Parks `job`. `source` (the job message's stream sequence) makes a
    /// redelivered job park once.
    pub async fn park(&self, job: &proto::DeliveryJob, source: u64) -> Result<(), ParkingError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::MSG_ID_HEADER, format!("park.{source}").as_str());
        nats::publish(
            &self.js,
            names::parked_subject(&job.organization_id, &job.webhook_id),
            headers,
            job.encode_to_vec().into(),
        )
        .await?;
        Ok(())
    }

    /// The oldest delivery parked for the webhook, if any.
    pub async fn oldest(
        &self,
        org: &str,
        webhook_id: &str,
    ) -> Result<Option<Parked>, ParkingError> {
        let stream = self.stream().await?;
        match stream
            .direct_get_first_for_subject(names::parked_subject(org, webhook_id))
            .await
        {
            Ok(message) => {
                let payload = message.payload.clone();
                match proto::DeliveryJob::decode(payload.clone()) {
                    Ok(job) => Ok(Some(Parked {
                        seq: message.sequence,
                        job,
                        payload,
                    })),
                    Err(error) => {
                        // Only the deliverer writes there; drop what it cannot
                        // have written rather than block the queue behind it.
                        tracing::error!(%error, seq = message.sequence, "undecodable parked delivery removed");
                        self.remove(message.sequence).await?;
                        Ok(None)
                    }
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::stream::DirectGetErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(error) => Err(ParkingError::Read(error.to_string())),
        }
    }

    /// Forgets parked delivery `seq` (already gone: another replica's
    /// release removed it).
    pub async fn remove(&self, seq: u64) -> Result<(), ParkingError> {
        nats::remove_message(&self.js, names::PARKED_STREAM, seq)
            .await
            .map(|_| ())
            .map_err(|e| ParkingError::Delete(e.to_string()))
    }

    /// Moves `parked` back to its delivery subject, then forgets it.
    pub async fn release(&self, parked: &Parked) -> Result<(), ParkingError> {
        self.republish(parked).await?;
        self.remove(parked.seq).await
    }

    /// Releases the oldest parked delivery (a probe timer fired); whether
    /// there was one.
    pub async fn release_oldest(&self, org: &str, webhook_id: &str) -> Result<bool, ParkingError> {
        match self.oldest(org, webhook_id).await? {
            Some(parked) => {
                self.release(&parked).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Releases every parked delivery of the webhook, oldest first, a batch
    /// at a time (publishes in flight together, one purge); how many.
    pub async fn release_all(&self, org: &str, webhook_id: &str) -> Result<usize, ParkingError> {
        let mut batches = self.batches(org, webhook_id).await?;
        let mut n = 0;
        while let Some(batch) = batches.next().await? {
            // All in flight together, sent in order.
            let publishes: Vec<_> = batch.parked.iter().map(|p| self.republish(p)).collect();
            futures::future::try_join_all(publishes).await?;
            batches.remove(&batch).await?;
            n += batch.parked.len();
        }
        Ok(n)
    }

    /// Moves `parked` back to its delivery subject (it stays parked until
    /// removed).
    async fn republish(&self, parked: &Parked) -> Result<(), ParkingError> {
        let job = &parked.job;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            names::MSG_ID_HEADER,
            format!("unpark.{}", parked.seq).as_str(),
        );
        nats::publish(
            &self.js,
            names::delivery_subject(&job.organization_id, &job.webhook_id),
            headers,
            parked.payload.clone(),
        )
        .await?;
        Ok(())
    }

    /// The webhook's parked deliveries, oldest first, in batches of at most
    /// [`BATCH`] read through one ordered consumer. Whoever takes a batch
    /// concludes it (delivers or logs each) and then [`Batches::remove`]s
    /// it; a crash in between leaves it parked, to be concluded again (the
    /// publishes carry ids that deduplicate).
    pub async fn batches(&self, org: &str, webhook_id: &str) -> Result<Batches, ParkingError> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let subject = names::parked_subject(org, webhook_id);
        let stream = self.stream().await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ParkingError::Read(e.to_string()))?;
        let messages = if consumer.cached_info().num_pending == 0 {
            None
        } else {
            Some(
                consumer
                    .messages()
                    .await
                    .map_err(|e| ParkingError::Read(e.to_string()))?,
            )
        };
        Ok(Batches {
            stream,
            subject,
            messages,
            taken: 0,
        })
    }

    /// The webhooks that have deliveries parked, as (organization, webhook).
    pub async fn parked_webhooks(&self) -> Result<Vec<(String, String)>, ParkingError> {
        let stream = self.stream().await?;
        let mut subjects = stream
            .info_with_subjects(names::PARKED_SUBJECTS)
            .await
            .map_err(|e| ParkingError::Read(e.to_string()))?;
        let mut found = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|e| ParkingError::Read(e.to_string()))?;
            if let Some((org, webhook)) = subject
                .strip_prefix("herald.parked.")
                .and_then(|rest| rest.split_once('.'))
            {
                found.push((org.to_owned(), webhook.to_owned()));
            }
        }
        Ok(found)
    }
}

/// A batch of parked deliveries, oldest first.
pub struct Batch {
    pub parked: Vec<Parked>,
    /// The stream sequence of the last message read into it (decodable or
    /// not).
    last: u64,
}

/// A webhook's parked deliveries, read a batch at a time
/// ([`Parking::batches`]).
pub struct Batches {
    stream: jetstream::stream::Stream,
    subject: String,
    /// `None` once every delivery parked when the reading started was read.
    messages: Option<jetstream::consumer::pull::Ordered>,
    taken: usize,
}

impl Batches {
    /// The next batch, or `None` when every delivery parked when the
    /// reading started has been read (or [`MAX_PER_PASS`] were).
    pub async fn next(&mut self) -> Result<Option<Batch>, ParkingError> {
        let read = |e: &dyn std::fmt::Display| ParkingError::Read(e.to_string());
        if self.taken >= MAX_PER_PASS {
            self.messages = None;
        }
        let Some(messages) = self.messages.as_mut() else {
            return Ok(None);
        };
        let mut batch = Batch {
            parked: Vec::with_capacity(BATCH),
            last: 0,
        };
        let mut caught_up = false;
        while batch.parked.len() < BATCH {
            // Nothing more within the wait: another replica took them.
            let Ok(next) = tokio::time::timeout(READ_WAIT, messages.next()).await else {
                caught_up = true;
                break;
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(read(&error)),
                None => {
                    caught_up = true;
                    break;
                }
            };
            let (seq, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(error) => return Err(read(&error)),
            };
            batch.last = seq;
            match proto::DeliveryJob::decode(message.payload.clone()) {
                Ok(job) => batch.parked.push(Parked {
                    seq,
                    job,
                    payload: message.payload.clone(),
                }),
                // Only the deliverer writes there; what it cannot have
                // written is removed with the batch rather than block the
                // queue behind it.
                Err(error) => {
                    tracing::error!(%error, seq, "undecodable parked delivery removed");
                }
            }
            if pending == 0 {
                caught_up = true;
                break;
            }
        }
        if caught_up {
            self.messages = None;
        }
        if batch.last == 0 {
            return Ok(None);
        }
        self.taken += batch.parked.len();
        Ok(Some(batch))
    }

    /// Removes a concluded batch (and anything older on the subject): one
    /// purge.
    pub async fn remove(&mut self, batch: &Batch) -> Result<(), ParkingError> {
        // (`&mut`: the reader is not `Sync`, and a job's future must be
        // `Send`.)
        self.stream
            .purge()
            .filter(self.subject.clone())
            .sequence(batch.last + 1)
            .await
            .map_err(|e| ParkingError::Delete(e.to_string()))?;
        Ok(())
    }
}
