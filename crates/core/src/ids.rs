//! Identifiers. Webhook and event ids are random (UUIDv7, so they sort by
//! time); delivery ids are derived, so that an event matched twice (after a
//! crash between publishing jobs and acking the event) yields the same
//! delivery id and the receiver sees one `webhook-id`.

use sha2::{Digest, Sha256};

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

pub fn new_webhook_id() -> String {
    new_id("wh")
}

pub fn new_event_id() -> String {
    new_id("evt")
}

/// The id of an event published without one: from its sequence in the
/// events stream and when the stream stored it (so a stream recreated from
/// sequence 1 does not repeat ids).
pub fn stream_event_id(seq: u64, stored_ms: i64) -> String {
    format!("evt_{stored_ms}.{seq}")
}

/// The `Nats-Msg-Id` of attempt `attempt` of a delivery's job, so a job
/// published twice (a redelivered event, a resumed replay) is stored once.
pub fn job_msg_id(delivery_id: &str, attempt: u32) -> String {
    format!("{delivery_id}.{attempt}")
}

/// The `Nats-Msg-Id` of a delivery's first job: what the matcher and the
/// one-off sends publish.
pub fn first_job_msg_id(delivery_id: &str) -> String {
    job_msg_id(delivery_id, 1)
}

/// The `Nats-Msg-Id` of the job a recover or replay `job` publishes for
/// attempt `attempt` of a delivery: a resumed job publishes it again, and
/// it is stored once; another job's is a new message.
pub fn manual_job_msg_id(delivery_id: &str, attempt: u32, job: &str) -> String {
    format!("{delivery_id}.{attempt}.{job}")
}

/// A delivery id for a one-off delivery (test events).
pub fn new_delivery_id() -> String {
    new_id("msg")
}

/// The delivery id of `event_id` (of `org`) to `webhook_id`: the same inputs
/// always give the same id.
pub fn delivery_id(org: &str, event_id: &str, webhook_id: &str) -> String {
    let mut hash = Sha256::new();
    for part in [org, event_id, webhook_id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    format!("msg_{}", hex::encode(&hash.finalize()[..16]))
}

/// The log id of one attempt of a delivery.
pub fn log_id(delivery_id: &str, attempt: u32) -> String {
    format!("{delivery_id}-{attempt}")
}

/// The log id of a throttled answer: it spends no attempt, so the attempt
/// that follows keeps `log_id(delivery_id, attempt)`.
pub fn throttled_log_id(delivery_id: &str, attempt: u32, throttles: u32) -> String {
    format!("{delivery_id}-{attempt}-t{throttles}")
}

/// The id of a system event about `webhook_id`, stable for the same
/// `dedupe` (the transition it announces), so that announcing it twice
/// publishes it once.
pub fn system_event_id(event_type: &str, webhook_id: &str, dedupe: &str) -> String {
    let mut hash = Sha256::new();
    for part in [event_type, webhook_id, dedupe] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    format!("evt_sys_{}", hex::encode(&hash.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let a = delivery_id("acme", "evt_1", "wh_1");
        assert_eq!(a, delivery_id("acme", "evt_1", "wh_1"));
        assert_ne!(a, delivery_id("acme", "evt_1", "wh_2"));
        // Length-prefixing keeps concatenations apart.
        assert_ne!(delivery_id("ab", "c", "d"), delivery_id("a", "bc", "d"));
        assert!(crate::names::valid_id(&a));
        assert!(crate::names::valid_id(&new_webhook_id()));
    }
}
