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
