//! Everything the deliverer publishes: attempt records, delayed jobs
//! (waits after Herald's own failures, throttled waits, deferrals) as
//! JetStream message schedules, the probe timer of a failing webhook,
//! system events, and dead letters.
//! Every publish waits for JetStream's acknowledgement
//! (`platform::nats::publish`), so a job is acked only after what it
//! produced is stored.

use async_nats::jetstream;
use bytes::Bytes;
use herald_core::{ids, names, payload, proto};
use herald_platform::nats::{self, PublishError};
use herald_platform::trace;
use prost::Message;

/// Response headers kept in an attempt record: at most this many…
pub const MAX_RESPONSE_HEADERS: usize = 64;
/// …and this many bytes of names and values in all.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 8 * 1024;

/// How long a publish that follows a POST already made is tried again
/// before the job is handed back (which makes the POST again): long enough
/// to outlast a stream leader election in a NATS cluster (a few seconds),
/// well inside the job's claim, which progress acks keep.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Clone)]
pub struct Outbox {
    js: jetstream::Context,
}

/// A system event (PRODUCT.md, System events).
pub struct SystemEvent<'a> {
    pub r#type: &'static str,
    pub webhook: &'a proto::Webhook,
    /// Makes the event's id stable, so a job decided twice publishes it once.
    pub dedupe: String,
    pub attributes: Vec<(&'static str, String)>,
    pub data: serde_json::Value,
    pub now_ms: i64,
}

impl Outbox {
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    /// Publishes an attempt record. One that NATS refuses for its size (it
    /// cannot be, given the caps, but a future field might) is published
    /// again without bodies rather than looping.
    pub async fn attempt(&self, attempt: &proto::AttemptResult) -> Result<(), PublishError> {
        let subject = names::attempt_subject(&attempt.organization_id, &attempt.webhook_id);
        let publish = |payload: Vec<u8>| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(names::MSG_ID_HEADER, attempt.log_id.as_str());
            nats::publish_patiently(&self.js, subject.clone(), headers, payload.into(), PATIENCE)
        };
        match publish(attempt.encode_to_vec()).await {
            Err(error) if error.is_permanent() => {
                tracing::warn!(%error, log_id = %attempt.log_id, "attempt record too large, stored without bodies");
                let mut lean = attempt.clone();
                lean.event = None;
                if let Some(r) = &mut lean.request {
                    r.body = Bytes::new();
                    r.body_truncated = true;
                }
                if let Some(r) = &mut lean.response {
                    r.body = Bytes::new();
                    r.body_truncated = true;
                    r.headers.clear();
                }
                publish(lean.encode_to_vec()).await.map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    /// Publishes `job` as a message schedule that the server turns back into
    /// a delivery job at `job.not_before_ms`. One schedule per delivery: a
    /// newer one replaces an older one, so waiting never multiplies copies.
    pub async fn schedule(&self, job: &proto::DeliveryJob) -> Result<(), PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        trace::inject(
            &mut headers,
            job.event
                .as_ref()
                .map(|e| e.traceparent.as_str())
                .unwrap_or_default(),
        );
        schedule_headers(&mut headers, job, job.not_before_ms);
        // A patient publish may send it again after an ack that came late;
        // without an id, that second copy could land after the first had
        // already fired (a 1 s pause is shorter than a slow ack) and fire
        // again: the same attempt twice. The id names this very schedule,
        // its time included, so a later reschedule of the same job is new.
        let id = format!(
            "{}.{}.t{}.d{}@{}",
            job.delivery_id, job.attempt, job.throttles, job.deferrals, job.not_before_ms
        );
        headers.insert(names::MSG_ID_HEADER, id.as_str());
        nats::publish_patiently(
            &self.js,
            names::schedule_subject(&job.delivery_id),
            headers,
            job.encode_to_vec().into(),
            PATIENCE,
        )
        .await
        .map(|_| ())
    }

    /// (Re)sets the failing webhook's probe timer to `at_ms`: one timer per
    /// webhook, a newer one replacing an older one.
    pub async fn probe_timer(
        &self,
        org: &str,
        webhook_id: &str,
        at_ms: i64,
        now_ms: i64,
    ) -> Result<(), PublishError> {
        let job = proto::DeliveryJob {
            organization_id: org.to_owned(),
            webhook_id: webhook_id.to_owned(),
            kind: proto::DeliveryKind::Probe as i32,
            not_before_ms: at_ms.max(now_ms + 100),
            ..Default::default()
        };
        self.probe_schedule(&job).await
    }

    /// Publishes a probe timer `job` (kind probe) as its webhook's one timer,
    /// firing at `job.not_before_ms`.
    pub async fn probe_schedule(&self, job: &proto::DeliveryJob) -> Result<(), PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        schedule_headers(&mut headers, job, job.not_before_ms);
        nats::publish(
            &self.js,
            names::probe_schedule_subject(&job.organization_id, &job.webhook_id),
            headers,
            job.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
    }

    /// Announces a system event twice: as JSON on
    /// `herald.system.<org>.<type>` for operators, and as an accepted event
    /// of the organization, so that its webhooks subscribed to the type get
    /// it like any other (the matcher never sends it to the webhook it is
    /// about).
    pub async fn system_event(&self, event: SystemEvent<'_>) -> Result<(), PublishError> {
        let w = event.webhook;
        let id = ids::system_event_id(event.r#type, &w.id, &event.dedupe);
        let json = serde_json::json!({
            "id": id,
            "type": event.r#type,
            "timestamp": payload::rfc3339_ms(event.now_ms),
            "organization_id": w.organization_id,
            "webhook_id": w.id,
            "data": event.data,
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        headers.insert(names::MSG_ID_HEADER, id.as_str());
        nats::publish(
            &self.js,
            names::system_subject(&w.organization_id, event.r#type),
            headers,
            json.to_string().into(),
        )
        .await?;
        let accepted = proto::Event {
            id: id.clone(),
            organization_id: w.organization_id.clone(),
            r#type: event.r#type.to_owned(),
            occurred_at_ms: event.now_ms,
            received_at_ms: event.now_ms,
            attributes: event
                .attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            data_json: event.data.to_string().into_bytes().into(),
            ..Default::default()
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            names::MSG_ID_HEADER,
            format!("{}:{}", w.organization_id, id).as_str(),
        );
        nats::publish(
            &self.js,
            names::accepted_subject(&w.organization_id),
            headers,
            accepted.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
    }

    /// Moves a message Herald cannot process to the dead letters
    /// (`herald_platform::dead_letters`).
    pub async fn dead_letter(
        &self,
        stream: &str,
        subject: &str,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), PublishError> {
        herald_platform::dead_letters::send(&self.js, stream, subject, payload, reason).await
    }
}

fn schedule_headers(headers: &mut async_nats::HeaderMap, job: &proto::DeliveryJob, at_ms: i64) {
    headers.insert(
        "Nats-Schedule",
        format!("@at {}", payload::rfc3339_ms(at_ms)).as_str(),
    );
    headers.insert(
        "Nats-Schedule-Target",
        names::delivery_subject(&job.organization_id, &job.webhook_id).as_str(),
    );
}

/// Response headers as recorded: in order, within the caps.
pub fn capped_headers(headers: &[(String, String)]) -> Vec<proto::Header> {
    let mut bytes = 0;
    headers
        .iter()
        .take(MAX_RESPONSE_HEADERS)
        .take_while(|(n, v)| {
            bytes += n.len() + v.len();
            bytes <= MAX_RESPONSE_HEADER_BYTES
        })
        .map(|(n, v)| proto::Header {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_headers_are_capped_in_count_and_bytes() {
        let many: Vec<_> = (0..100)
            .map(|i| (format!("h{i}"), "v".to_owned()))
            .collect();
        assert_eq!(capped_headers(&many).len(), MAX_RESPONSE_HEADERS);
        let big: Vec<_> = (0..10)
            .map(|i| (format!("h{i}"), "x".repeat(3_000)))
            .collect();
        assert_eq!(capped_headers(&big).len(), 2);
    }
}
