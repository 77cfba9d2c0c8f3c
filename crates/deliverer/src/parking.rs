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

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
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
        headers.insert("Nats-Msg-Id", format!("park.{source}").as_str());
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

    pub async fn remove(&self, seq: u64) -> Result<(), ParkingError> {
        let stream = self.stream().await?;
        match stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            // Already removed by another replica's release.
            Err(error)
                if matches!(
                    error.kind(),
                    stream::DeleteMessageErrorKind::JetStream(e)
                        if e.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(ParkingError::Delete(error.to_string())),
        }
    }

    /// Moves `parked` back to its delivery subject, then forgets it.
    pub async fn release(&self, parked: &Parked) -> Result<(), ParkingError> {
        let job = &parked.job;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("unpark.{}", parked.seq).as_str());
        nats::publish(
            &self.js,
            names::delivery_subject(&job.organization_id, &job.webhook_id),
            headers,
            parked.payload.clone(),
        )
        .await?;
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

    /// Releases every parked delivery of the webhook, oldest first; how many.
    pub async fn release_all(&self, org: &str, webhook_id: &str) -> Result<usize, ParkingError> {
        let mut n = 0;
        while n < MAX_PER_PASS {
            let Some(parked) = self.oldest(org, webhook_id).await? else {
                break;
            };
            self.release(&parked).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Takes every parked delivery of the webhook out, oldest first, handing
    /// each to `each` (which records it) before it is removed; how many.
    pub async fn drain<F, Fut>(
        &self,
        org: &str,
        webhook_id: &str,
        mut each: F,
    ) -> Result<usize, ParkingError>
    where
        F: FnMut(proto::DeliveryJob) -> Fut,
        Fut: std::future::Future<Output = Result<(), PublishError>>,
    {
        let mut n = 0;
        while n < MAX_PER_PASS {
            let Some(parked) = self.oldest(org, webhook_id).await? else {
                break;
            };
            each(parked.job).await?;
            self.remove(parked.seq).await?;
            n += 1;
        }
        Ok(n)
    }
}
