//! Which deliveries a recover job sends again (PRODUCT.md, "Recover and
//! replay"): every delivery of the webhook with an attempt in the window
//! whose last attempt — in the whole attempts stream, not only the window —
//! failed or was skipped. Fed the webhook's attempts in stream order; no IO.
//!
//! A window can hold millions of deliveries, so what is kept of each is
//! small: its id as 16 bytes ([`DeliveryKey`]), the event's place and a
//! hash of its id, the last attempt and status — about 80 bytes a delivery
//! with the map's own, where strings cost several times that.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::proto::{self, AttemptStatus, DeliveryKind};

/// A delivery id in few bytes: Herald's own (`msg_` and 32 hex digits) as
/// the 16 bytes the digits spell, any other as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeliveryKey {
    Herald([u8; 16]),
    Other(Box<str>),
}

impl DeliveryKey {
    pub fn of(id: &str) -> Self {
        let herald = id
            .strip_prefix("msg_")
            .filter(|hex| {
                hex.len() == 32
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            })
            .and_then(|hex| hex::decode(hex).ok())
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok());
        match herald {
            Some(bytes) => Self::Herald(bytes),
            None => Self::Other(id.into()),
        }
    }

    /// The id as it was given.
    pub fn id(&self) -> String {
        match self {
            Self::Herald(bytes) => format!("msg_{}", hex::encode(bytes)),
            Self::Other(id) => id.to_string(),
        }
    }
}

/// A short fingerprint of an event id, to check that the event read back
/// by its place is the one the delivery carried.
pub fn event_fingerprint(event_id: &str) -> u64 {
    let digest = Sha256::digest(event_id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What a recover needs of a delivery to send it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub delivery_id: String,
    /// The last attempt made; the recover's is the next.
    pub attempt: u32,
    /// [`event_fingerprint`] of the event's id.
    pub event_fingerprint: u64,
    /// The event's place in `HERALD_ACCEPTED` (0: the event travels in
    /// `event`).
    pub event_seq: u64,
    pub event: Option<proto::Event>,
    pub first_attempt_at_ms: i64,
}

#[derive(Debug, Clone)]
struct Last {
    /// When it was first seen, for the order of the candidates.
    order: u32,
    attempt: u32,
    status: AttemptStatus,
    in_window: bool,
    event_seq: u64,
    event_fingerprint: u64,
    /// Only for a delivery whose event is not in the accepted stream.
    event: Option<Box<proto::Event>>,
    first_attempt_at_ms: i64,
}

/// The deliveries seen so far, by id.
#[derive(Debug, Default)]
pub struct Recovery {
    since_ms: i64,
    until_ms: i64,
    deliveries: HashMap<DeliveryKey, Last>,
}

impl Recovery {
    pub fn new(since_ms: i64, until_ms: i64) -> Self {
        Self {
            since_ms,
            until_ms,
            ..Default::default()
        }
    }

    /// One more attempt, later in the stream than every one before.
    pub fn observe(&mut self, a: &proto::AttemptResult) {
        // Test deliveries are not the tenant's events; manual retries are
        // deliveries of their own and recovered like any other.
        if a.kind == DeliveryKind::Test as i32 || a.delivery_id.is_empty() {
            return;
        }
        let in_window = (self.since_ms..=self.until_ms).contains(&a.attempted_at_ms);
        let order = u32::try_from(self.deliveries.len()).unwrap_or(u32::MAX);
        let entry = self
            .deliveries
            .entry(DeliveryKey::of(&a.delivery_id))
            .or_insert_with(|| Last {
                order,
                attempt: 0,
                status: AttemptStatus::Unspecified,
                in_window: false,
                event_seq: a.event_seq,
                event_fingerprint: event_fingerprint(&a.event_id),
                event: None,
                first_attempt_at_ms: a.attempted_at_ms,
            });
        entry.in_window |= in_window;
        entry.status = a.status();
        entry.attempt = entry.attempt.max(a.attempt);
        if a.event_seq != 0 {
            entry.event_seq = a.event_seq;
        }
        if let Some(event) = &a.event {
            entry.event = Some(Box::new(event.clone()));
        }
    }

    /// How many deliveries it remembers.
    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// The deliveries to send again, oldest first, each made when asked
    /// for (so a million of them are never all strings at once).
    pub fn candidates(&self) -> impl Iterator<Item = Candidate> + '_ {
        let mut due: Vec<(&DeliveryKey, &Last)> = self
            .deliveries
            .iter()
            .filter(|(_, l)| {
                l.in_window && matches!(l.status, AttemptStatus::Failed | AttemptStatus::Skipped)
            })
            .collect();
        due.sort_unstable_by_key(|(_, l)| l.order);
        due.into_iter().map(|(key, l)| Candidate {
            delivery_id: key.id(),
            attempt: l.attempt,
            event_fingerprint: l.event_fingerprint,
            event_seq: l.event_seq,
            event: l.event.as_deref().cloned(),
            first_attempt_at_ms: l.first_attempt_at_ms,
        })
    }

    /// Whether `delivery_id` is among the candidates.
    pub fn is_candidate(&self, delivery_id: &str) -> bool {
        self.deliveries
            .get(&DeliveryKey::of(delivery_id))
            .is_some_and(|l| {
                l.in_window && matches!(l.status, AttemptStatus::Failed | AttemptStatus::Skipped)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(delivery: &str, n: u32, at: i64, status: AttemptStatus) -> proto::AttemptResult {
        let mut a = proto::AttemptResult {
            delivery_id: delivery.into(),
            attempt: n,
            attempted_at_ms: at,
            event_id: format!("evt_{delivery}"),
            event_seq: 7,
            kind: DeliveryKind::Event as i32,
            ..Default::default()
        };
        a.set_status(status);
        a
    }

    fn check(window: (i64, i64), attempts: &[proto::AttemptResult], expected: &[(&str, u32)]) {
        let mut r = Recovery::new(window.0, window.1);
        for a in attempts {
            r.observe(a);
        }
        let got: Vec<(String, u32)> = r.candidates().map(|c| (c.delivery_id, c.attempt)).collect();
        let expected: Vec<(String, u32)> =
            expected.iter().map(|(d, n)| (d.to_string(), *n)).collect();
        assert_eq!(got, expected, "{attempts:?}");
    }

    #[test]
    fn the_last_attempt_decides() {
        use AttemptStatus::*;
        check(
            (100, 200),
            &[
                // Failed for good: recovered, after its last attempt (2).
                attempt("a", 1, 110, Retrying),
                attempt("a", 2, 120, Failed),
                // Skipped (webhook disabled meanwhile): recovered.
                attempt("b", 1, 130, Skipped),
                // Succeeded: not.
                attempt("c", 1, 140, Succeeded),
                // Failed, then recovered by an earlier job: not.
                attempt("d", 1, 150, Failed),
                attempt("d", 2, 260, Succeeded),
                // Still on its schedule: not.
                attempt("e", 1, 160, Retrying),
                // Throttled and waiting: not.
                attempt("f", 1, 170, Throttled),
                // Outside the window: not, even though failed.
                attempt("g", 1, 50, Failed),
                attempt("h", 1, 250, Failed),
            ],
            &[("a", 2), ("b", 1)],
        );
    }

    #[test]
    fn a_failure_after_the_window_of_a_delivery_begun_in_it_counts() {
        use AttemptStatus::*;
        check(
            (100, 200),
            &[attempt("a", 1, 190, Retrying), attempt("a", 2, 300, Failed)],
            &[("a", 2)],
        );
    }

    #[test]
    fn delivery_keys_are_16_bytes_for_herald_ids_and_round_trip() {
        let herald = "msg_0123456789abcdef0123456789abcdef";
        assert!(matches!(DeliveryKey::of(herald), DeliveryKey::Herald(_)));
        for id in [
            herald,
            "msg_short",
            "msg_0123456789ABCDEF0123456789ABCDEF",
            "other",
            "",
        ] {
            assert_eq!(DeliveryKey::of(id).id(), id);
        }
        // Herald's ids keep their first-seen order among others.
        let mut r = Recovery::new(0, 10);
        for (i, d) in ["z", herald, "a"].iter().enumerate() {
            r.observe(&attempt(d, 1, i as i64, AttemptStatus::Failed));
        }
        let got: Vec<String> = r.candidates().map(|c| c.delivery_id).collect();
        assert_eq!(got, ["z", herald, "a"]);
        assert!(r.is_candidate(herald) && !r.is_candidate("nope"));
    }

    #[test]
    fn test_deliveries_are_never_recovered() {
        let mut t = attempt("t", 1, 150, AttemptStatus::Failed);
        t.kind = DeliveryKind::Test as i32;
        check((100, 200), &[t], &[]);
    }
}
