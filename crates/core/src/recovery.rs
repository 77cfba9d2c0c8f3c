//! Which deliveries a recover job sends again (PRODUCT.md, "Recover and
//! replay"): every delivery of the webhook with an attempt in the window
//! whose last attempt — in the whole attempts stream, not only the window —
//! failed or was skipped. Fed the webhook's attempts in stream order; no IO.

use std::collections::HashMap;

use crate::proto::{self, AttemptStatus, DeliveryKind};

/// What a recover needs of a delivery to send it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub delivery_id: String,
    /// The last attempt made; the recover's is the next.
    pub attempt: u32,
    pub event_id: String,
    /// The event's place in `HERALD_ACCEPTED` (0: the event travels in
    /// `event`).
    pub event_seq: u64,
    pub event: Option<proto::Event>,
    pub first_attempt_at_ms: i64,
}

#[derive(Debug, Clone)]
struct Last {
    candidate: Candidate,
    status: AttemptStatus,
    in_window: bool,
}

/// The deliveries seen so far, by id, in the order first seen.
#[derive(Debug, Default)]
pub struct Recovery {
    since_ms: i64,
    until_ms: i64,
    deliveries: HashMap<String, Last>,
    order: Vec<String>,
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
        let entry = self
            .deliveries
            .entry(a.delivery_id.clone())
            .or_insert_with(|| {
                self.order.push(a.delivery_id.clone());
                Last {
                    candidate: Candidate {
                        delivery_id: a.delivery_id.clone(),
                        attempt: 0,
                        event_id: a.event_id.clone(),
                        event_seq: a.event_seq,
                        event: None,
                        first_attempt_at_ms: a.attempted_at_ms,
                    },
                    status: AttemptStatus::Unspecified,
                    in_window: false,
                }
            });
        entry.in_window |= in_window;
        entry.status = a.status();
        entry.candidate.attempt = entry.candidate.attempt.max(a.attempt);
        if a.event_seq != 0 {
            entry.candidate.event_seq = a.event_seq;
        }
        if a.event.is_some() {
            entry.candidate.event = a.event.clone();
        }
    }

    /// The deliveries to send again, oldest first.
    pub fn candidates(&self) -> Vec<&Candidate> {
        self.order
            .iter()
            .filter_map(|id| self.deliveries.get(id))
            .filter(|l| {
                l.in_window && matches!(l.status, AttemptStatus::Failed | AttemptStatus::Skipped)
            })
            .map(|l| &l.candidate)
            .collect()
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
        let got: Vec<(&str, u32)> = r
            .candidates()
            .iter()
            .map(|c| (c.delivery_id.as_str(), c.attempt))
            .collect();
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
    fn test_deliveries_are_never_recovered() {
        let mut t = attempt("t", 1, 150, AttemptStatus::Failed);
        t.kind = DeliveryKind::Test as i32;
        check((100, 200), &[t], &[]);
    }
}
