//! Lanes: one organization's burst read beside everybody else's events.
//!
//! Ingest and the matcher each read one stream, first come, first served.
//! An organization that publishes a burst puts thousands of messages in
//! front of everyone else's, and each of them would wait for the burst to
//! be worked through. A *lane* takes the bursting organization out of the
//! way: its messages from a sequence on are read by a consumer of their own
//! (`<prefix>.<org>.>`), and the stage's main consumer acks them unread, so
//! it goes on with the others' at once.
//!
//! A lane is a record `{from, until}` in a KV bucket: the organization's
//! messages with `from <= seq < until` are the lane's, the rest the main
//! consumer's. `until` is set once, when the lane closes: the stream's last
//! sequence then, plus one. Whoever skips a message (the main consumer) or
//! works it (the lane) first makes sure its view of the record is current
//! for that sequence ([`Known::decides`]): a view read after the stream's
//! last sequence was `through` is current for every message up to
//! `through`, because a close written later sets `until` above it. So a
//! message is never skipped by both. Both may work a message while a lane
//! opens (a replica that has not heard of it yet): what they publish
//! carries the same message id, and JetStream keeps it once.
//!
//! When to open and close a lane, and how fast a lane may go, are the rules
//! below; the IO is `platform::lanes`.

use serde::{Deserialize, Serialize};

/// The bucket of lane records, `<stage>.<org>`.
pub const BUCKET: &str = "herald-lanes";

/// A lane: the organization's messages from `from` on, until `until` (once
/// closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    pub from: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl Lane {
    /// Whether `seq` is the lane's, when the record is known to be current
    /// for it.
    pub fn holds(&self, seq: u64) -> bool {
        seq >= self.from && self.until.is_none_or(|until| seq < until)
    }
}

/// What a replica knows of one organization's lane: the record (none: no
/// lane) as read after the stream's last sequence was `through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub lane: Option<Lane>,
    pub through: u64,
}

/// Whose message is it?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Main,
    Lane,
    /// The view may be older than the message: read the record again (and
    /// the stream's last sequence first), then ask again.
    Refresh,
}

impl Known {
    /// Whose message `seq` is. Without a record it is the main consumer's
    /// (a lane opened meanwhile elsewhere works it too, harmlessly); a
    /// closed lane's bounds are final; an open lane's hold only up to
    /// `through`.
    pub fn decides(&self, seq: u64) -> Owner {
        match self.lane {
            None => Owner::Main,
            Some(lane) if seq < lane.from => Owner::Main,
            Some(Lane {
                until: Some(until), ..
            }) => {
                if seq < until {
                    Owner::Lane
                } else {
                    Owner::Main
                }
            }
            Some(_) if seq <= self.through => Owner::Lane,
            Some(_) => Owner::Refresh,
        }
    }
}

/// When a stage's main consumer opens a lane for an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// Messages behind the one in hand in the main consumer, at least.
    pub backlog: u64,
    /// The organization's share of the messages the main consumer read
    /// last, at least (in hundredths).
    pub share_percent: u64,
    /// Or: the organization's work waiting downstream (its delivery jobs not
    /// yet sent), at least; 0: not a reason.
    pub downstream: u64,
}

impl Open {
    pub const INGEST: Open = Open {
        backlog: 1_000,
        share_percent: 50,
        downstream: 0,
    };
    pub const MATCHER: Open = Open {
        backlog: 1_000,
        share_percent: 50,
        downstream: 500,
    };

    /// Whether the organization of the message in hand gets a lane: it
    /// makes most of a large backlog, or the stages after this one are
    /// far behind on its work.
    pub fn now(&self, backlog: u64, share_percent: u64, downstream: u64) -> bool {
        (backlog >= self.backlog && share_percent >= self.share_percent)
            || (self.downstream > 0 && downstream >= self.downstream)
    }

    /// Whether a lane that has kept up for `idle_ms`, and `downstream` of
    /// its organization's work waiting after this stage, closes: it has
    /// been caught up for a while, and (where that is a reason to open one)
    /// the work downstream is well below the mark.
    pub fn closes(&self, idle_ms: i64, downstream: u64) -> bool {
        idle_ms >= CLOSE_IDLE_MS && (self.downstream == 0 || downstream < self.downstream / 2)
    }

    /// Whether a lane waits before working its next message: its
    /// organization already has this much waiting downstream. What is not
    /// matched yet waits in the stream, not in front of others' jobs.
    pub fn paces(&self, downstream: u64) -> bool {
        self.downstream > 0 && downstream >= self.downstream
    }
}

/// How long a lane must have kept up (fewer than [`CLOSE_BACKLOG`]
/// messages waiting for it) before it closes.
pub const CLOSE_IDLE_MS: i64 = 5_000;
/// A lane with fewer messages than this waiting keeps up with what
/// arrives: its organization no longer bursts.
pub const CLOSE_BACKLOG: u64 = 100;

/// The organization's share of `recent` (the organizations of the last
/// messages read), in hundredths.
pub fn share_percent<'a>(recent: impl ExactSizeIterator<Item = &'a str>, org: &str) -> u64 {
    let n = recent.len() as u64;
    if n == 0 {
        return 0;
    }
    let mine = recent.filter(|o| *o == org).count() as u64;
    mine * 100 / n
}

/// The durable name of a lane's consumer: unique per lane, so that a lane
/// opened again later never meets the consumer of one not yet removed.
pub fn consumer_name(stage: &str, org: &str, from: u64) -> String {
    format!("{stage}-lane-{org}-{from}")
}

/// The record's key in [`BUCKET`].
pub fn key(stage: &str, org: &str) -> String {
    format!("{stage}.{org}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_works_a_message() {
        let open = Some(Lane {
            from: 100,
            until: None,
        });
        let closed = Some(Lane {
            from: 100,
            until: Some(200),
        });
        use Owner::{Lane as L, Main, Refresh};
        // For each view (record, current through): sequences and whose.
        type View = (Option<Lane>, u64);
        let cases: [(View, &[(u64, Owner)]); 5] = [
            ((None, 1_000), &[(5, Main), (5_000, Main)]),
            // An open lane read after the stream reached 150; past that a
            // close may have come.
            (
                (open, 150),
                &[(99, Main), (100, L), (150, L), (151, Refresh)],
            ),
            ((open, 0), &[(100, Refresh)]),
            // A closed lane's bounds are final, however old the view.
            ((closed, 0), &[(99, Main), (100, L), (199, L), (200, Main)]),
            ((closed, 10_000), &[(5_000, Main)]),
        ];
        for ((lane, through), sequences) in cases {
            let known = Known { lane, through };
            for &(seq, owner) in sequences {
                assert_eq!(known.decides(seq), owner, "{known:?} seq {seq}");
            }
        }
    }

    #[test]
    fn a_lane_opens_for_most_of_a_backlog_or_far_behind_downstream() {
        for (rule, backlog, share, downstream, opens) in [
            (Open::INGEST, 999, 100, 0, false),
            (Open::INGEST, 1_000, 49, 0, false),
            (Open::INGEST, 1_000, 50, 0, true),
            (Open::INGEST, 0, 0, 1_000_000, false),
            (Open::MATCHER, 0, 0, 499, false),
            (Open::MATCHER, 0, 0, 500, true),
            (Open::MATCHER, 5_000, 80, 0, true),
        ] {
            assert_eq!(
                rule.now(backlog, share, downstream),
                opens,
                "{rule:?} backlog {backlog} share {share} downstream {downstream}"
            );
        }
    }

    #[test]
    fn a_lane_closes_when_caught_up_and_paces_while_far_ahead() {
        for (rule, idle, downstream, closes) in [
            (Open::INGEST, 4_999, 0, false),
            (Open::INGEST, 5_000, 10_000, true),
            (Open::MATCHER, 5_000, 250, false),
            (Open::MATCHER, 5_000, 249, true),
            (Open::MATCHER, 100, 0, false),
        ] {
            assert_eq!(
                rule.closes(idle, downstream),
                closes,
                "{rule:?} {idle} {downstream}"
            );
        }
        assert!(!Open::INGEST.paces(u64::MAX));
        assert!(!Open::MATCHER.paces(499));
        assert!(Open::MATCHER.paces(500));
    }

    #[test]
    fn shares_and_names() {
        let recent = ["a", "b", "a", "a"];
        assert_eq!(share_percent(recent.iter().copied(), "a"), 75);
        assert_eq!(share_percent(recent.iter().copied(), "c"), 0);
        assert_eq!(share_percent([].iter().copied(), "a"), 0);
        assert_eq!(consumer_name("ingest", "acme", 42), "ingest-lane-acme-42");
        assert_eq!(key("matcher", "acme"), "matcher.acme");
        let json = serde_json::to_string(&Lane {
            from: 3,
            until: None,
        })
        .unwrap();
        assert_eq!(json, r#"{"from":3}"#);
        assert!(
            Lane {
                from: 3,
                until: None
            }
            .holds(3)
        );
        assert!(
            !Lane {
                from: 3,
                until: Some(4)
            }
            .holds(4)
        );
    }
}
