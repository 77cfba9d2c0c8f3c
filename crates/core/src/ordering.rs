//! Ordered delivery per key: which deliveries of an ordered webhook share
//! an order, whose turn it is, and what a concluded delivery does to its
//! key. No IO: `platform::ordering` keeps the queues in HERALD_ORDERED.
//!
//! A webhook with `ordering: {key: "execution"}` gets the events that carry
//! the same `execution` attribute one at a time, in the order Herald
//! accepted them. Each key has a queue (its deliveries not yet concluded,
//! oldest first) and a cursor (the sequence of its last concluded delivery,
//! and the entry it is held on, if any). Only the head of a queue is ever
//! in the delivery pipeline, so nothing that reorders there (retries,
//! throttling, parking, replicas) can reorder a key.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::proto;

/// The key an event of `webhook` is ordered by, if the webhook is ordered
/// and the event has the attribute (a missing or empty value: unordered).
pub fn key_of<'a>(
    ordering: Option<&proto::Ordering>,
    attributes: &'a HashMap<String, String>,
) -> Option<&'a str> {
    let name = ordering.map(|o| o.key.as_str()).filter(|k| !k.is_empty())?;
    attributes
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The subject token of a key: attribute values may hold anything, so a
/// key enters a subject as 128 bits of its SHA-256, in hex.
pub fn token(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..16])
}

/// The `Nats-Msg-Id` of the job that hands queue entry `entry` on to the
/// delivery pipeline: a second hand-on of the same entry (the matcher and a
/// concluding deliverer both see it at the head) is stored once.
pub fn turn_msg_id(delivery_id: &str, entry: u64) -> String {
    format!("{delivery_id}.q{entry}")
}

/// How long after a head was claimed (the cursor written to say it is
/// handed on) a hand-on of it may be made again: a claim whose hand-on
/// failed is healed by the next try, and a second hand-on within this time
/// is stored once (JetStream deduplicates for two minutes).
pub const AGAIN_WITHIN_MS: i64 = 60_000;

/// A key's cursor, stored as its latest message on the cursor subject and
/// changed only by compare-and-set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The sequence of the key's last concluded delivery (0: none yet).
    pub concluded: u64,
    /// The queue entry the key is held on (a delivery that gave up on a
    /// webhook that holds its keys), or 0.
    pub held: u64,
    /// The queue entry handed on to the delivery pipeline and not yet
    /// concluded, or 0: it is not handed on again (its job may wait, parked
    /// or scheduled, for longer than JetStream deduplicates).
    pub handed: u64,
    /// The queue entry of the last concluded delivery: a head at or before
    /// it was read before its removal and is not handed on.
    pub last: u64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.concluded, self.held, self.handed, self.last
        )
    }

    /// An absent or unreadable cursor is a key that starts at 1.
    pub fn decode(bytes: &[u8]) -> Cursor {
        let text = std::str::from_utf8(bytes).unwrap_or_default();
        let parts: Vec<Option<u64>> = text.split_whitespace().map(|p| p.parse().ok()).collect();
        let at = |i: usize| parts.get(i).copied().flatten().unwrap_or(0);
        match parts.first() {
            Some(Some(concluded)) => Cursor {
                concluded: *concluded,
                held: at(1),
                handed: at(2),
                last: at(3),
            },
            _ => Cursor::default(),
        }
    }

    /// What the head of the key's queue, entry `head`, may do now, the
    /// cursor having been written `written_ago_ms` ago.
    pub fn turn(&self, head: u64, written_ago_ms: i64) -> Turn {
        let sequence = self.concluded + 1;
        if self.held != 0 && self.held == head {
            Turn::Held
        } else if head <= self.last {
            Turn::Concluded
        } else if self.handed != 0 && head < self.handed {
            Turn::Nothing
        } else if head == self.handed {
            if written_ago_ms < AGAIN_WITHIN_MS {
                Turn::Again { sequence }
            } else {
                Turn::Nothing
            }
        } else {
            Turn::Go { sequence }
        }
    }

    /// The cursor that claims `head` as handed on.
    pub fn handing(&self, head: u64) -> Cursor {
        Cursor {
            handed: head,
            ..*self
        }
    }

    /// The cursor once the delivery with `sequence` (entry `entry`)
    /// concluded `how` on a webhook that does (or does not) hold its keys.
    /// A delivery concluded before (its entry at or before the last
    /// concluded one) changes nothing.
    pub fn after(&self, sequence: u64, entry: u64, how: Conclusion, hold: bool) -> Cursor {
        if entry <= self.last {
            return *self;
        }
        match after(how, hold) {
            Next::MoveOn => Cursor {
                concluded: sequence,
                held: 0,
                handed: 0,
                last: entry,
            },
            Next::Hold => Cursor {
                concluded: sequence.saturating_sub(1),
                held: entry,
                handed: 0,
                last: self.last,
            },
        }
    }
}

/// Whether the head of a key's queue may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Its turn: hand it on with this sequence, then claim it (the cursor,
    /// by compare-and-set, says it is handed on).
    Go { sequence: u64 },
    /// Claimed within [`AGAIN_WITHIN_MS`]: hand it on again with this
    /// sequence (stored once), in case the claim's hand-on failed.
    Again { sequence: u64 },
    /// In the pipeline for longer: nothing to do.
    Nothing,
    /// Concluded already, its entry not yet removed (a read that raced the
    /// removal, or a conclusion cut short before it): remove it, and look
    /// at the next.
    Concluded,
    /// The key is held on it: it waits to be recovered.
    Held,
}

/// How a key's current delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conclusion {
    /// The receiver took it.
    Delivered,
    /// It gave up: out of attempts, past its deadline, refused for good,
    /// or its webhook was disabled while it waited. Logged failed, so
    /// recover finds it.
    Failed,
    /// Not sent at all: its webhook was deleted or disabled.
    Skipped,
}

/// What a key does after its current delivery concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The next delivery of the key goes.
    MoveOn,
    /// The key waits on the failed one until it is recovered.
    Hold,
}

/// What a key does after its delivery concluded `how`, on a webhook that
/// holds its keys on a failure (`hold`) or not.
pub fn after(how: Conclusion, hold: bool) -> Next {
    match how {
        Conclusion::Delivered => Next::MoveOn,
        Conclusion::Failed if hold => Next::Hold,
        Conclusion::Failed => Next::MoveOn,
        // Nothing to wait for: a deleted or disabled webhook is sent
        // nothing, in order or not.
        Conclusion::Skipped => Next::MoveOn,
    }
}

/// The key as the `webhook-ordering-key` header value: visible ASCII as it
/// is, anything else (and `%`) percent-encoded byte by byte.
pub fn header_value(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordering(key: &str) -> proto::Ordering {
        proto::Ordering {
            key: key.into(),
            hold_on_failure: false,
        }
    }

    #[test]
    fn which_events_are_ordered_and_by_what() {
        let attrs: HashMap<String, String> = [
            ("execution".to_string(), "ex-1".to_string()),
            ("empty".to_string(), String::new()),
        ]
        .into();
        let cases: [(Option<proto::Ordering>, Option<&str>); 5] = [
            (None, None),
            (Some(ordering("")), None),
            (Some(ordering("execution")), Some("ex-1")),
            (Some(ordering("workflow")), None),
            (Some(ordering("empty")), None),
        ];
        for (o, want) in cases {
            assert_eq!(key_of(o.as_ref(), &attrs), want, "{o:?}");
        }
    }

    #[test]
    fn a_key_is_a_subject_token_whatever_it_holds() {
        for key in ["ex-1", "a.b.*", "with space >", "ünïcode", ""] {
            let t = token(key);
            assert_eq!(t.len(), 32);
            assert!(crate::names::valid_id(&t), "{t}");
        }
        assert_eq!(token("ex-1"), token("ex-1"));
        assert_ne!(token("ex-1"), token("ex-2"));
    }

    #[test]
    fn cursors_round_trip_and_default_to_the_start() {
        for c in [
            Cursor::default(),
            Cursor {
                concluded: 7,
                held: 1234,
                handed: 0,
                last: 1200,
            },
            Cursor {
                concluded: 7,
                held: 0,
                handed: 99,
                last: 98,
            },
        ] {
            assert_eq!(Cursor::decode(c.encode().as_bytes()), c);
        }
        assert_eq!(Cursor::decode(b""), Cursor::default());
        assert_eq!(Cursor::decode(b"garbage"), Cursor::default());
        // Fewer fields (an older writer): the rest are 0.
        assert_eq!(
            Cursor::decode(b"5 7"),
            Cursor {
                concluded: 5,
                held: 7,
                ..Cursor::default()
            }
        );
    }

    #[test]
    fn whose_turn_it_is() {
        use Turn::*;
        let c = |concluded, held, handed, last| Cursor {
            concluded,
            held,
            handed,
            last,
        };
        let long_ago = AGAIN_WITHIN_MS;
        // (cursor, head, written ms ago, turn)
        let cases = [
            // A fresh key: the first goes as 1.
            (Cursor::default(), 10, 0, Go { sequence: 1 }),
            (c(3, 0, 0, 9), 10, 0, Go { sequence: 4 }),
            // Held on it: it waits; a later head (the held one recovered
            // and concluded meanwhile) goes.
            (c(3, 10, 0, 9), 10, 0, Held),
            (c(3, 10, 0, 9), 11, 0, Go { sequence: 4 }),
            // Claimed just now: handed on again (stored once); claimed
            // long ago: it is in the pipeline, not handed on again.
            (c(3, 0, 10, 9), 10, 5, Again { sequence: 4 }),
            (c(3, 0, 10, 9), 10, long_ago, Nothing),
            // A head concluded, not yet removed (read before its removal,
            // or a conclusion cut short).
            (c(4, 0, 0, 10), 10, 0, Concluded),
            (c(4, 0, 0, 10), 9, 0, Concluded),
            (c(4, 0, 11, 10), 10, 0, Concluded),
            (c(4, 0, 12, 10), 11, 0, Nothing),
        ];
        for (cursor, head, ago, want) in cases {
            assert_eq!(
                cursor.turn(head, ago),
                want,
                "{cursor:?} head {head} {ago} ms"
            );
        }
    }

    #[test]
    fn what_a_conclusion_does_to_its_key() {
        use Conclusion::*;
        let cases = [
            (Delivered, false, Next::MoveOn),
            (Delivered, true, Next::MoveOn),
            (Failed, false, Next::MoveOn),
            (Failed, true, Next::Hold),
            (Skipped, false, Next::MoveOn),
            (Skipped, true, Next::MoveOn),
        ];
        for (how, hold, want) in cases {
            assert_eq!(after(how, hold), want, "{how:?} hold={hold}");
        }
        let handed = Cursor {
            concluded: 4,
            held: 0,
            handed: 99,
            last: 90,
        };
        // Held: the key waits on the failed one, which is not handed on.
        let held = handed.after(5, 99, Failed, true);
        assert_eq!(
            held,
            Cursor {
                concluded: 4,
                held: 99,
                handed: 0,
                last: 90
            }
        );
        assert_eq!(held.turn(99, 0), Turn::Held);
        // Moved on: the next goes with the next sequence; the concluded one,
        // read before its removal, does not.
        let on = handed.after(5, 99, Failed, false);
        assert_eq!(on.turn(100, 0), Turn::Go { sequence: 6 });
        assert_eq!(on.turn(99, 0), Turn::Concluded);
        // A held key's delivery recovered and delivered moves it on.
        assert_eq!(
            held.after(5, 99, Delivered, true).turn(100, 0),
            Turn::Go { sequence: 6 }
        );
        // A second conclusion of one concluded before changes nothing.
        assert_eq!(on.after(5, 99, Delivered, false), on);
        assert_eq!(on.after(4, 80, Failed, true), on);
        // Claiming keeps the rest.
        assert_eq!(on.handing(100), Cursor { handed: 100, ..on });
    }

    #[test]
    fn keys_in_headers() {
        let cases = [
            ("ex-1", "ex-1"),
            ("a b", "a b"),
            ("50%", "50%25"),
            ("line\nbreak", "line%0Abreak"),
            ("é", "%C3%A9"),
        ];
        for (key, want) in cases {
            assert_eq!(header_value(key), want);
        }
    }
}
