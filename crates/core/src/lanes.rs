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
/// closed). While open, the lane *promises* to go on to `promised` at least
/// until the time `promised_until_ms`: a view that knows the promise
/// decides every message below it without reading the record again, until
/// then. The lane renews the promise as the stream grows and time passes
/// ([`Lane::renewed`]), so the main consumer skips a long burst on what it
/// heard by the watch. To close, the lane first stops promising
/// (`closing`), and sets `until` only once its last promise has expired
/// everywhere ([`Lane::closed`]: [`CLOCK_SKEW_MS`] after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    pub from: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub promised: u64,
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub promised_until_ms: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub closing: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_ms(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The least a lane promises past the stream's last sequence.
pub const LEAST_PROMISE: u64 = 1_000;
/// How long a promise holds once made.
pub const PROMISE_MS: i64 = 5_000;
/// How far apart two replicas' clocks may be: a promise is taken as held
/// everywhere until this long after it expired.
pub const CLOCK_SKEW_MS: i64 = 2_000;

impl Lane {
    /// A lane opened at `from`, promising nothing yet.
    pub fn opened(from: u64) -> Lane {
        Lane {
            from,
            until: None,
            promised: 0,
            promised_until_ms: 0,
            closing: false,
        }
    }

    /// Whether `seq` is the lane's, when the record is known to be current
    /// for it.
    pub fn holds(&self, seq: u64) -> bool {
        seq >= self.from && self.until.is_none_or(|until| seq < until)
    }

    /// The open lane promising at `now_ms` to go on past `last` (the
    /// stream's last sequence) by `margin` messages at least, for
    /// [`PROMISE_MS`]: `None` when what it promised already reaches half
    /// that far for half that long (nothing to write), or it is closing.
    pub fn renewed(&self, last: u64, margin: u64, now_ms: i64) -> Option<Lane> {
        let promise = last + 1 + margin;
        let short = self.promised < last + 1 + margin / 2
            || self.promised_until_ms < now_ms + PROMISE_MS / 2;
        (self.until.is_none() && !self.closing && short).then_some(Lane {
            promised: self.promised.max(promise),
            promised_until_ms: now_ms + PROMISE_MS,
            ..*self
        })
    }

    /// The lane promising no more, to close ([`Lane::closed`]).
    pub fn closing(&self) -> Lane {
        Lane {
            closing: true,
            ..*self
        }
    }

    /// The margin for a stream that grew by `per_second` messages in the
    /// last second: two seconds of it, [`LEAST_PROMISE`] at least.
    pub fn margin(per_second: u64) -> u64 {
        per_second.saturating_mul(2).max(LEAST_PROMISE)
    }

    /// The closing lane closed at `now_ms`, the stream's last sequence
    /// being `last`: what comes later is the main consumer's again. `None`
    /// while its last promise may still be relied on somewhere.
    pub fn closed(&self, last: u64, now_ms: i64) -> Option<Lane> {
        (self.closing && self.until.is_none() && now_ms >= self.promised_until_ms + CLOCK_SKEW_MS)
            .then_some(Lane {
                until: Some(last + 1),
                ..*self
            })
    }

    /// Whether a closed lane is done and may be removed: its consumer has
    /// worked everything (`drained`), or has acked up to its end
    /// (`ack_floor`: the stream sequence everything up to which is acked).
    pub fn done(&self, drained: bool, ack_floor: u64) -> bool {
        self.until
            .is_some_and(|until| drained || ack_floor + 1 >= until)
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
    /// Whose message `seq` is at `now_ms`. Without a record it is the
    /// main consumer's (a lane opened meanwhile elsewhere works it too,
    /// harmlessly); a closed lane's bounds are final; an open lane's hold
    /// up to what it promised while the promise lasts, and up to
    /// `through`.
    pub fn decides(&self, seq: u64, now_ms: i64) -> Owner {
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
            Some(lane)
                if (seq < lane.promised && now_ms < lane.promised_until_ms)
                    || seq <= self.through =>
            {
                Owner::Lane
            }
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
    /// Ingest's `downstream` is the organization's accepted events waiting
    /// in the matcher's lane.
    pub const INGEST: Open = Open {
        backlog: 300,
        share_percent: 50,
        downstream: 1_000,
    };
    pub const MATCHER: Open = Open {
        backlog: 1_000,
        share_percent: 50,
        downstream: 500,
    };

    /// Whether the organization of the message in hand gets a lane: it
    /// makes most of a large backlog, or the stages after this one are
    /// far behind on its work, or the stage before this one has a lane
    /// open for it (`upstream`: its burst is on its way here, and that
    /// lane paces itself by this one's).
    pub fn now(&self, backlog: u64, share_percent: u64, downstream: u64, upstream: bool) -> bool {
        (backlog >= self.backlog && share_percent >= self.share_percent)
            || (self.downstream > 0 && downstream >= self.downstream)
            || upstream
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
    let mine = recent.filter(|o| *o == org).count() as u64;
    share(mine, n)
}

/// Fewer messages noted than this say nothing of a share: a stage that has
/// just started, having read one message of an organization behind a
/// backlog, would otherwise give it 100% and a lane.
pub const SHARE_SAMPLE: u64 = 32;

/// `mine` of `noted` messages, in hundredths; 0 below [`SHARE_SAMPLE`].
pub fn share(mine: u64, noted: u64) -> u64 {
    if noted < SHARE_SAMPLE {
        return 0;
    }
    mine * 100 / noted
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

/// The subjects of an organization's events *diverted* while its ingest
/// lane is open: the events stream's subject transform (one at a time)
/// stores `herald.events.<org>.<type>` as `herald.lane.<org>.<type>`,
/// outside the main consumer's filter (`herald.events.>`), so the main
/// consumer does not even read the burst it would skip.
pub fn diverted_subjects(org: &str) -> String {
    format!("{DIVERTED_PREFIX}{org}.>")
}

/// The prefix of [`diverted_subjects`].
pub const DIVERTED_PREFIX: &str = "herald.lane.";

/// The subject an event was published to, for one stored diverted
/// (`None`: it was not).
pub fn undiverted(subject: &str) -> Option<String> {
    subject
        .strip_prefix(DIVERTED_PREFIX)
        .map(|rest| format!("herald.events.{rest}"))
}

/// The organization a transform whose source is `source` diverts
/// (`herald.events.<org>.>`), if it is one of the lanes'.
pub fn diverted_org(source: &str) -> Option<&str> {
    source
        .strip_prefix("herald.events.")?
        .strip_suffix(".>")
        .filter(|org| crate::names::valid_org(org))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diverted_event_keeps_its_organization_and_type() {
        assert_eq!(diverted_subjects("acme"), "herald.lane.acme.>");
        for (stored, published) in [
            (
                "herald.lane.acme.workflow.completed",
                Some("herald.events.acme.workflow.completed"),
            ),
            ("herald.events.acme.workflow.completed", None),
            ("herald.accepted.acme", None),
        ] {
            assert_eq!(undiverted(stored).as_deref(), published, "{stored}");
        }
        for (source, org) in [
            ("herald.events.acme.>", Some("acme")),
            ("herald.events.acme", None),
            ("herald.events.*.>", None),
            ("herald.events.a.b.>", None),
            ("other.acme.>", None),
        ] {
            assert_eq!(diverted_org(source), org, "{source}");
        }
    }

    #[test]
    fn who_works_a_message() {
        let open = Some(Lane::opened(100));
        let promising = Some(Lane {
            promised: 300,
            promised_until_ms: 10_000,
            ..Lane::opened(100)
        });
        let closed = Some(Lane {
            until: Some(200),
            ..Lane::opened(100)
        });
        use Owner::{Lane as L, Main, Refresh};
        // For each view (record, current through): sequences and whose
        // (at 5 s; the promise holds until 10 s).
        type View = (Option<Lane>, u64);
        let cases: [(View, &[(u64, Owner)]); 7] = [
            // A promise decides below it however old the view.
            (
                (promising, 0),
                &[(99, Main), (100, L), (299, L), (300, Refresh)],
            ),
            ((promising, 400), &[(400, L), (401, Refresh)]),
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
                assert_eq!(known.decides(seq, 5_000), owner, "{known:?} seq {seq}");
            }
        }
        // An expired promise decides nothing.
        let known = Known {
            lane: promising,
            through: 150,
        };
        assert_eq!(known.decides(200, 10_000), Refresh);
        assert_eq!(known.decides(150, 10_000), L);
    }

    #[test]
    fn a_lane_opens_for_most_of_a_backlog_or_far_behind_downstream() {
        for (rule, backlog, share, downstream, opens) in [
            (Open::INGEST, 299, 100, 0, false),
            (Open::INGEST, 300, 49, 0, false),
            (Open::INGEST, 300, 50, 0, true),
            (Open::INGEST, 0, 0, 999, false),
            (Open::INGEST, 0, 0, 1_000, true),
            (Open::MATCHER, 0, 0, 499, false),
            (Open::MATCHER, 0, 0, 500, true),
            (Open::MATCHER, 5_000, 80, 0, true),
        ] {
            assert_eq!(
                rule.now(backlog, share, downstream, false),
                opens,
                "{rule:?} backlog {backlog} share {share} downstream {downstream}"
            );
        }
    }

    #[test]
    fn a_promise_grows_lasts_and_expires_before_a_close() {
        let open = Lane::opened(100);
        assert_eq!(Lane::margin(0), LEAST_PROMISE);
        assert_eq!(Lane::margin(30_000), 60_000);
        let renewed = open.renewed(1_000, 1_000, 0).unwrap();
        assert_eq!(
            (renewed.promised, renewed.promised_until_ms),
            (2_001, PROMISE_MS)
        );
        // Still reaching half a margin ahead for half its time: nothing to
        // write.
        assert_eq!(renewed.renewed(1_400, 1_000, 1_000), None);
        assert_eq!(
            renewed.renewed(1_600, 1_000, 1_000).unwrap().promised,
            2_601
        );
        // Running out of time: renewed for longer, never for less.
        let later = renewed.renewed(1_400, 0, 3_000).unwrap();
        assert_eq!(
            (later.promised, later.promised_until_ms),
            (2_001, 3_000 + PROMISE_MS)
        );
        // Closing: no more promises; closed only once the last one has
        // expired everywhere, at the stream's end then.
        let closing = later.closing();
        assert_eq!(closing.renewed(9_000, 1_000, 4_000), None);
        assert_eq!(open.closed(1_500, 1_000_000), None, "not closing");
        let expired = later.promised_until_ms + CLOCK_SKEW_MS;
        assert_eq!(closing.closed(1_500, expired - 1), None);
        let closed = closing.closed(1_500, expired).unwrap();
        assert_eq!(closed.until, Some(1_501));
        assert_eq!(closed.renewed(9_000, 1_000, expired), None);
        for (drained, ack_floor, done) in
            [(false, 1_499, false), (true, 0, true), (false, 1_500, true)]
        {
            assert_eq!(
                closed.done(drained, ack_floor),
                done,
                "{drained} {ack_floor}"
            );
        }
        assert!(!open.done(true, 10_000), "an open lane is never done");
    }

    #[test]
    fn a_lane_opens_behind_the_stage_befores() {
        assert!(Open::MATCHER.now(0, 0, 0, true));
        assert!(!Open::MATCHER.now(0, 0, 0, false));
    }

    #[test]
    fn a_lane_closes_when_caught_up_and_paces_while_far_ahead() {
        for (rule, idle, downstream, closes) in [
            (Open::INGEST, 4_999, 0, false),
            (Open::INGEST, 5_000, 500, false),
            (Open::INGEST, 5_000, 499, true),
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
        assert!(!Open::INGEST.paces(999));
        assert!(Open::INGEST.paces(1_000));
        assert!(!Open::MATCHER.paces(499));
        assert!(Open::MATCHER.paces(500));
    }

    #[test]
    fn shares_and_names() {
        let recent = ["a", "b", "a", "a"].repeat(32);
        assert_eq!(share_percent(recent.iter().copied(), "a"), 75);
        assert_eq!(share_percent(recent.iter().copied(), "c"), 0);
        // Too few to say: no share at all.
        assert_eq!(share_percent(["a"].into_iter(), "a"), 0);
        for (mine, noted, want) in [(1, 1, 0), (31, 31, 0), (32, 32, 100), (64, 256, 25)] {
            assert_eq!(share(mine, noted), want, "{mine} of {noted}");
        }
        assert_eq!(share_percent([].iter().copied(), "a"), 0);
        assert_eq!(consumer_name("ingest", "acme", 42), "ingest-lane-acme-42");
        assert_eq!(key("matcher", "acme"), "matcher.acme");
        let json = serde_json::to_string(&Lane::opened(3)).unwrap();
        assert_eq!(json, r#"{"from":3}"#);
        // A record written before promises reads as promising nothing.
        let old: Lane = serde_json::from_str(r#"{"from":3,"until":9}"#).unwrap();
        assert_eq!(old.promised, 0);
        assert!(Lane::opened(3).holds(3));
        assert!(
            !Lane {
                until: Some(4),
                ..Lane::opened(3)
            }
            .holds(4)
        );
    }
}
