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

/// A key's cursor, stored as its latest message on the cursor subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The sequence of the key's last concluded delivery (0: none yet).
    pub concluded: u64,
    /// The queue entry the key is held on (a delivery that gave up on a
    /// webhook that holds its keys), or 0.
    pub held: u64,
    /// The queue entry handed on to the delivery pipeline last, or 0: a
    /// head handed on is not handed on again (its job may wait, parked or
    /// scheduled, for longer than JetStream deduplicates).
    pub handed: u64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{} {} {}", self.concluded, self.held, self.handed)
    }

    /// An absent or unreadable cursor is a key that starts at 1.
    pub fn decode(bytes: &[u8]) -> Cursor {
        let text = std::str::from_utf8(bytes).unwrap_or_default();
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
        match (
            parts.next().flatten(),
            parts.next().flatten(),
            parts.next().flatten(),
        ) {
            (Some(concluded), held, handed) => Cursor {
                concluded,
                held: held.unwrap_or(0),
                handed: handed.unwrap_or(0),
            },
            _ => Cursor::default(),
        }
    }

    /// What the head of the key's queue, entry `head`, may do now.
    pub fn turn(&self, head: u64) -> Turn {
        if self.held != 0 && self.held == head {
            Turn::Held
        } else if self.handed != 0 && self.handed == head {
            Turn::Handed
        } else {
            Turn::Go {
                sequence: self.concluded + 1,
            }
        }
    }

    /// The cursor once the delivery with `sequence` (entry `entry`)
    /// concluded `how` on a webhook that does (or does not) hold its keys.
    pub fn after(&self, sequence: u64, entry: u64, how: Conclusion, hold: bool) -> Cursor {
        match after(how, hold) {
            Next::MoveOn => Cursor {
                concluded: sequence,
                held: 0,
                handed: 0,
            },
            Next::Hold => Cursor {
                concluded: sequence.saturating_sub(1),
                held: entry,
                handed: 0,
            },
        }
    }
}

/// Whether the head of a key's queue may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Hand it on with this sequence.
    Go { sequence: u64 },
    /// The key is held on it: it waits to be recovered.
    Held,
    /// It is in the pipeline already.
    Handed,
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
                held: 0,
                handed: 0,
            },
            Cursor {
                concluded: 7,
                held: 1234,
                handed: 0,
            },
            Cursor {
                concluded: 7,
                held: 0,
                handed: 99,
            },
        ] {
            assert_eq!(Cursor::decode(c.encode().as_bytes()), c);
        }
        assert_eq!(Cursor::decode(b""), Cursor::default());
        assert_eq!(Cursor::decode(b"garbage"), Cursor::default());
        assert_eq!(
            Cursor::decode(b"5"),
            Cursor {
                concluded: 5,
                held: 0,
                handed: 0
            }
        );
    }

    #[test]
    fn whose_turn_it_is() {
        let fresh = Cursor::default();
        assert_eq!(fresh.turn(10), Turn::Go { sequence: 1 });
        let on = Cursor {
            concluded: 3,
            held: 0,
            handed: 0,
        };
        assert_eq!(on.turn(10), Turn::Go { sequence: 4 });
        let held = Cursor {
            concluded: 3,
            held: 10,
            handed: 0,
        };
        assert_eq!(held.turn(10), Turn::Held);
        // Held on an entry no longer at the head (recovered and concluded
        // meanwhile): the head goes.
        assert_eq!(held.turn(11), Turn::Go { sequence: 4 });
        // Handed on already: not again, until it concludes.
        let handed = Cursor {
            concluded: 3,
            held: 0,
            handed: 10,
        };
        assert_eq!(handed.turn(10), Turn::Handed);
        assert_eq!(handed.turn(11), Turn::Go { sequence: 4 });
        assert_eq!(
            handed.after(4, 10, Conclusion::Delivered, false).turn(11),
            Turn::Go { sequence: 5 }
        );
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
        let c = Cursor {
            concluded: 4,
            held: 0,
            handed: 0,
        };
        assert_eq!(
            c.after(5, 99, Failed, true),
            Cursor {
                concluded: 4,
                held: 99,
                handed: 0
            }
        );
        assert_eq!(
            c.after(5, 99, Failed, false),
            Cursor {
                concluded: 5,
                held: 0,
                handed: 0
            }
        );
        // A held key's delivery recovered and delivered moves it on.
        let held = Cursor {
            concluded: 4,
            held: 99,
            handed: 0,
        };
        assert_eq!(
            held.after(5, 99, Delivered, true),
            Cursor {
                concluded: 5,
                held: 0,
                handed: 0
            }
        );
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
