//! Whose failure is it: Herald's own network and resolver, or the
//! receiver's? Two small records the deliverer keeps of what its
//! connections and name lookups did lately, and the rules read off them.
//! No IO and no clock: time comes in as `now_ms`.
//!
//! - [`Connects`]: when connections to several distinct hosts all fail
//!   within a short window and none succeeds, it is Herald's network that
//!   is down (egress cut, no route), not every receiver at once: from then
//!   until any connection succeeds, a failure to connect counts against no
//!   webhook.
//! - [`Lookups`]: a name whose lookups keep timing out while other names
//!   resolve is the tenant's broken DNS, not Herald's resolver, once it has
//!   done so for a grace period; before that, and while no other name
//!   resolves either, it is Herald's.

use std::collections::HashMap;

/// Distinct hosts whose connections must all fail within
/// [`OUTAGE_WINDOW_MS`], none succeeding, for Herald to take its network
/// as down.
pub const OUTAGE_HOSTS: usize = 5;
/// The window of [`OUTAGE_HOSTS`].
pub const OUTAGE_WINDOW_MS: i64 = 10_000;
/// Hosts remembered at most (the oldest failures are forgotten first).
const MAX_HOSTS: usize = 4_096;

/// Recent connection outcomes across distinct hosts.
#[derive(Debug, Clone, Default)]
pub struct Connects {
    /// Host → when a connection to it last failed.
    failed: HashMap<String, i64>,
    /// When a connection (or a request on one) last succeeded.
    last_success_ms: Option<i64>,
    /// Since when Herald's network is taken as down.
    outage_since_ms: Option<i64>,
}

impl Connects {
    /// A connection to `host` succeeded (any answer came back): the network
    /// works.
    pub fn succeeded(&mut self, host: &str, now_ms: i64) {
        self.failed.remove(host);
        self.last_success_ms = Some(now_ms);
        self.outage_since_ms = None;
    }

    /// A connection to `host` failed at `now_ms`. Answers whether Herald's
    /// own network is down (so the failure is not the host's).
    pub fn failed(&mut self, host: &str, now_ms: i64) -> bool {
        self.failed.insert(host.to_owned(), now_ms);
        if self.failed.len() > MAX_HOSTS {
            let since = now_ms - OUTAGE_WINDOW_MS;
            self.failed.retain(|_, at| *at >= since);
        }
        if self.outage_since_ms.is_some() {
            return true;
        }
        let since = now_ms - OUTAGE_WINDOW_MS;
        let recent = self.failed.values().filter(|at| **at >= since).count();
        let none_succeeded = self.last_success_ms.is_none_or(|at| at < since);
        if recent >= OUTAGE_HOSTS && none_succeeded {
            self.outage_since_ms = Some(now_ms);
        }
        self.outage_since_ms.is_some()
    }

    /// Since when Herald's network has been taken as down, if it is.
    pub fn outage_since_ms(&self) -> Option<i64> {
        self.outage_since_ms
    }
}

/// How long a name's lookups may time out, while other names resolve,
/// before that counts as the name's own failure (the tenant's DNS).
pub const LOOKUP_GRACE_MS: i64 = 30_000;

/// Recent name lookups.
#[derive(Debug, Clone, Default)]
pub struct Lookups {
    /// Name → when its lookups began timing out (since its last answer).
    timing_out: HashMap<String, i64>,
    /// When any name last resolved.
    last_resolved_ms: Option<i64>,
}

impl Lookups {
    /// `host` resolved (or answered that it does not exist: the resolver
    /// works).
    pub fn answered(&mut self, host: &str, now_ms: i64) {
        self.timing_out.remove(host);
        self.last_resolved_ms = Some(now_ms);
    }

    /// A lookup of `host` timed out at `now_ms`. Answers whether that is the
    /// name's own failure: its lookups have timed out for longer than
    /// `grace_ms` and another name resolved meanwhile (a resolver that
    /// answers nothing at all is Herald's).
    pub fn timed_out(&mut self, host: &str, now_ms: i64, grace_ms: i64) -> bool {
        if self.timing_out.len() >= MAX_HOSTS && !self.timing_out.contains_key(host) {
            let oldest = now_ms - 10 * grace_ms.max(1);
            self.timing_out.retain(|_, since| *since >= oldest);
        }
        let since = *self.timing_out.entry(host.to_owned()).or_insert(now_ms);
        // A name that answered since clears its entry, so an answer after
        // `since` is another name's.
        let others_resolve = self.last_resolved_ms.is_some_and(|at| at > since);
        now_ms - since > grace_ms && others_resolve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Step {
        Ok(&'static str, i64),
        /// (host, at, expected: Herald's network down)
        Fail(&'static str, i64, bool),
    }
    use Step::*;

    fn check(steps: &[Step]) {
        let mut connects = Connects::default();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Ok(host, at) => connects.succeeded(host, *at),
                Fail(host, at, expected) => {
                    assert_eq!(
                        connects.failed(host, *at),
                        *expected,
                        "step {i}: {host} at {at}"
                    )
                }
            }
        }
    }

    #[test]
    fn every_distinct_host_failing_at_once_is_heralds_network() {
        // Four hosts failing: each its own failure.
        check(&[
            Fail("a", 0, false),
            Fail("b", 1, false),
            Fail("c", 2, false),
            Fail("d", 3, false),
            Fail("a", 4, false),
        ]);
        // The fifth distinct host within the window: Herald's, and it stays
        // so, however slowly failures come, until a connection succeeds.
        check(&[
            Fail("a", 0, false),
            Fail("b", 1_000, false),
            Fail("c", 2_000, false),
            Fail("d", 3_000, false),
            Fail("e", 4_000, true),
            Fail("a", 5_000, true),
            Fail("f", 600_000, true),
            Ok("g", 601_000),
            Fail("a", 602_000, false),
        ]);
        // Spread over more than the window: each host's own.
        check(&[
            Fail("a", 0, false),
            Fail("b", 3_000, false),
            Fail("c", 6_000, false),
            Fail("d", 9_000, false),
            Fail("e", 12_000, false),
        ]);
        // A success within the window: some receivers answer, so the
        // failing ones are failing.
        check(&[
            Ok("z", 0),
            Fail("a", 1, false),
            Fail("b", 2, false),
            Fail("c", 3, false),
            Fail("d", 4, false),
            Fail("e", 5, false),
        ]);
        // …but a success older than the window does not hold it off.
        check(&[
            Ok("z", 0),
            Fail("a", 20_000, false),
            Fail("b", 20_001, false),
            Fail("c", 20_002, false),
            Fail("d", 20_003, false),
            Fail("e", 20_004, true),
        ]);
        // One host failing many times is one host.
        check(&[
            Fail("a", 0, false),
            Fail("a", 1, false),
            Fail("a", 2, false),
            Fail("a", 3, false),
            Fail("a", 4, false),
            Fail("a", 5, false),
        ]);
        // A host that answered again is no longer among the failing.
        check(&[
            Fail("a", 0, false),
            Fail("b", 1, false),
            Fail("c", 2, false),
            Fail("d", 3, false),
            Ok("d", 4),
            Fail("e", 20_000, false),
        ]);
    }

    #[test]
    fn a_name_timing_out_while_others_resolve_is_the_names_own_after_the_grace() {
        const G: i64 = 30_000;
        // (steps: Ok(host, at) answered, Fail(host, at, expected: the name's own))
        let cases: Vec<Vec<Step>> = vec![
            // Within the grace: Herald's, whatever others do.
            vec![Fail("x", 0, false), Ok("y", 1), Fail("x", 29_000, false)],
            // Past it, with another name resolving meanwhile: the name's.
            vec![
                Fail("x", 0, false),
                Ok("y", 10_000),
                Fail("x", 30_001, true),
                Fail("x", 90_000, true),
            ],
            // Past it, but nothing else resolved since it began: the
            // resolver itself is down: Herald's.
            vec![Ok("y", 0), Fail("x", 1, false), Fail("x", 60_000, false)],
            // An answer of its own starts it over.
            vec![
                Fail("x", 0, false),
                Ok("y", 10_000),
                Ok("x", 20_000),
                Fail("x", 40_000, false),
                Ok("y", 50_000),
                Fail("x", 70_001, true),
            ],
        ];
        for steps in cases {
            let mut lookups = Lookups::default();
            for (i, step) in steps.iter().enumerate() {
                match step {
                    Ok(host, at) => lookups.answered(host, *at),
                    Fail(host, at, expected) => assert_eq!(
                        lookups.timed_out(host, *at, G),
                        *expected,
                        "step {i}: {host} at {at}"
                    ),
                }
            }
        }
    }
}
