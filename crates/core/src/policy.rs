//! The delivery policy: what happens to a delivery, and to its webhook's
//! endpoint state, when a job arrives and when an attempt ends. No IO and no
//! clock: time comes in as `now_ms`, so every rule is a row of a table test.
//!
//! The shape (PRODUCT.md, "Deliveries out"):
//! - **healthy**: deliveries are sent.
//! - **throttled until T** (a 429, or a 503 with `Retry-After`): deliveries
//!   wait until T without spending an attempt; the in-flight limit halves.
//!   A pause is never below a second, and throttles in a row back off from
//!   there: `Retry-After` is a lower bound, never an invitation to a loop.
//! - **failing** (an endpoint-attributable failure): nothing is sent but one
//!   *probe* at each step of the retry schedule; everything else is parked
//!   and released in arrival order when a probe succeeds. Failures of
//!   requests already in flight when it became failing do not count again.
//!   More than `disable_after` consecutive failed probes (the first failure
//!   counting as the first) disable the webhook.
//! - Herald's own failures (resolver, secret, NATS) change nothing and spend
//!   nothing: the work waits, backing off from seconds to minutes, and goes
//!   to the dead letters only after `own_failure_give_up` of trying.
//!
//! Every delivery keeps a deadline: the retry schedule's whole span after its
//! first attempt. Past it, a delivery that is still waiting has failed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::RetrySchedule;

/// How long a claimed probe may run before another may be sent (the
/// longest webhook timeout plus a margin for the attempt's bookkeeping).
pub const PROBE_LEASE_MS: i64 = 45_000;
/// A probe timer that fires this much early still counts as due (clocks of
/// the NATS server and the deliverers differ a little).
pub const PROBE_SLACK_MS: i64 = 200;
/// Room past a schedule's span before a waiting delivery is given up.
pub const DEADLINE_SLACK_MS: i64 = 60_000;
/// The shortest pause of a throttled webhook, whatever it asked for.
pub const MIN_THROTTLE_MS: i64 = 1_000;
/// The longest a throttled webhook is paused by the backoff alone (a longer
/// `Retry-After` is honoured up to [`MAX_THROTTLE_MS`]).
pub const MAX_THROTTLE_BACKOFF_MS: i64 = 60_000;
/// The longest pause honoured from `Retry-After` (a longer ask waits this).
pub const MAX_THROTTLE_MS: i64 = 3_600_000;
/// The wait after Herald's own failure stops a job; it doubles with each
/// one in a row…
pub const OWN_FAILURE_FIRST_MS: i64 = 2_000;
/// …up to this (each wait is then spread by ±25%).
pub const OWN_FAILURE_MAX_MS: i64 = 300_000;

/// A webhook's endpoint state, shared by every deliverer replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Endpoint {
    #[default]
    Healthy,
    /// Asked to slow down: nothing is sent before `until_ms`.
    Throttled {
        until_ms: i64,
        /// Throttled rounds in a row (requests sent after the last pause
        /// ended), for the backoff; a success resets it.
        #[serde(default)]
        throttles: u32,
    },
    /// Failing since `since_ms`: only probes are sent.
    Failing {
        since_ms: i64,
        /// When the next probe may be sent; `None`: none ever is, the
        /// webhook is being disabled (a job racing the disable is parked,
        /// never sent).
        #[serde(default, deserialize_with = "next_probe")]
        next_probe_ms: Option<i64>,
        /// Consecutive failed probes (the failure that began it is the first).
        failed_probes: u32,
        /// A probe is in flight until then (0: none).
        probe_until_ms: i64,
        /// The last failure's error, for the disabled reason.
        last_error: String,
    },
}

/// `next_probe_ms` as stored: a number, `null` while disabled, or, as
/// written before it was an `Option`, `i64::MAX` while disabled.
fn next_probe<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(Option::<i64>::deserialize(d)?.filter(|&at| at != i64::MAX))
}

/// When a webhook's probe timer should fire (`Endpoint::probe_timer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeTimer {
    /// Not failing (recovered): what waits can go now.
    NotFailing,
    /// At this time.
    At(i64),
    /// Being disabled: no probe is ever due; what waits is drained once
    /// the disable is seen.
    Disabled,
}

/// Why a webhook was disabled; rendered as its stored `disabled_reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisableReason {
    /// The endpoint answered 410 Gone.
    Gone,
    /// More consecutive probes failed than `disable_after` allows.
    FailedProbes { failed: u32, last_error: String },
    /// A tenant's call disabled it (no reason is stored).
    ByCall,
}

impl DisableReason {
    /// Decided on the endpoint's own answer, not on a count kept in the
    /// shared endpoint state: it stands on one replica's local view too.
    pub fn stands_on_local_view(&self) -> bool {
        matches!(self, DisableReason::Gone)
    }
}

impl std::fmt::Display for DisableReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisableReason::Gone => f.write_str("the endpoint answered 410 Gone"),
            DisableReason::FailedProbes { failed, last_error } => {
                write!(
                    f,
                    "{failed} consecutive failed attempts; last: {last_error}"
                )
            }
            DisableReason::ByCall => Ok(()),
        }
    }
}

impl Endpoint {
    /// The name the API shows: `healthy`, `throttled` or `failing`.
    pub fn name(&self) -> &'static str {
        match self {
            Endpoint::Healthy => "healthy",
            Endpoint::Throttled { .. } => "throttled",
            Endpoint::Failing { .. } => "failing",
        }
    }

    /// When a failing webhook's probe timer should fire: its next probe
    /// time, or, while a probe is claimed, when that claim lapses (a timer
    /// that fired earlier would find the probe taken, and come back at
    /// once: a loop).
    pub fn probe_timer(&self) -> ProbeTimer {
        match self {
            Endpoint::Failing {
                next_probe_ms: Some(next),
                probe_until_ms,
                ..
            } => ProbeTimer::At((*next).max(*probe_until_ms)),
            Endpoint::Failing {
                next_probe_ms: None,
                ..
            } => ProbeTimer::Disabled,
            _ => ProbeTimer::NotFailing,
        }
    }

    /// Being disabled: failing with no probe ever due.
    pub fn disabled(&self) -> bool {
        self.probe_timer() == ProbeTimer::Disabled
    }

    /// The probe claimed at arrival could not be made for Herald's own
    /// failure (nothing reached the receiver): its claim is given back, so
    /// the next delivery due (or this one, after its wait) probes instead
    /// of everything waiting out the claim. `None` when there is no claim
    /// to give back (disabled, or not failing).
    pub fn release_probe(&self, now_ms: i64) -> Option<Endpoint> {
        match self {
            Endpoint::Failing {
                since_ms,
                next_probe_ms,
                failed_probes,
                probe_until_ms,
                last_error,
            } if next_probe_ms.is_some() && *probe_until_ms > now_ms => Some(Endpoint::Failing {
                since_ms: *since_ms,
                next_probe_ms: *next_probe_ms,
                failed_probes: *failed_probes,
                probe_until_ms: 0,
                last_error: last_error.clone(),
            }),
            _ => None,
        }
    }
}

/// What the policy needs to know of the job in hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// The attempt this job would make (1-based).
    pub attempt: u32,
    /// When the delivery's first attempt was made; 0 before it.
    pub first_attempt_at_ms: i64,
    /// Retried on the schedule (events); tests, manual retries, recover and
    /// replay get one attempt.
    pub scheduled: bool,
    /// Herald's own failures in a row that stopped this job so far.
    pub own_failures: u32,
    /// When the first of them happened; 0 when none did.
    pub own_failure_since_ms: i64,
}

/// An attempt that has ended: whether it was the endpoint's probe, when it
/// started, and how it is classified.
#[derive(Debug, Clone, Copy)]
pub struct Attempted<'a> {
    pub probe: bool,
    pub started_ms: i64,
    pub class: &'a Class,
}

/// What to do with a job that has arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Send it now.
    Send,
    /// Send it now as the failing webhook's probe (the returned state
    /// claims the probe).
    Probe,
    /// Keep it, in arrival order, until the webhook recovers.
    Park,
    /// Put it back until then (throttled); no attempt is spent.
    Wait { until_ms: i64 },
    /// Its deadline has passed while it waited: it has failed.
    Expire,
}

/// How an attempt ended, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    Success,
    /// 429, or 503 with `Retry-After`.
    Throttled {
        retry_after_ms: Option<i64>,
    },
    /// The endpoint's own failure; `gone` for a 410.
    Endpoint {
        gone: bool,
        error: String,
    },
    /// Herald's own failure: nothing about the endpoint is learnt.
    Herald,
}

/// Why a delivery failed for good; `AttemptResult.failure_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The schedule ran out (or the deadline passed while waiting).
    Exhausted,
    /// The webhook was disabled while the delivery waited.
    WebhookDisabled,
    /// The endpoint answered 410 Gone.
    Gone,
    /// A one-attempt delivery (test, manual retry, recover, replay) failed.
    Failed,
}

impl FailureReason {
    pub fn code(self) -> &'static str {
        match self {
            FailureReason::Exhausted => "exhausted",
            FailureReason::WebhookDisabled => "webhook_disabled",
            FailureReason::Gone => "gone",
            FailureReason::Failed => "failed",
        }
    }
}

/// What happens to the delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delivered.
    Done,
    /// Throttled: try it again at `until_ms`, with no attempt spent.
    Wait { until_ms: i64 },
    /// The webhook is failing: park it (its attempt was spent) until a probe
    /// succeeds.
    Park,
    /// Herald's own failure: try again at `at_ms`, with no attempt spent.
    Retry { at_ms: i64 },
    /// Failed for good.
    Fail(FailureReason),
    /// Herald's own failures went on for the give-up time: the job goes to
    /// the dead-letter stream for an operator.
    DeadLetter,
}

/// A change the rest of the world hears about (PRODUCT.md, System events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `webhook.failing`
    Failing,
    /// `webhook.recovered`; parked deliveries are released.
    Recovered,
    /// `webhook.disabled`, with the reason.
    Disable(DisableReason),
    /// `delivery.exhausted`
    Exhausted,
}

/// The outcome of a decision: the new endpoint state (`None`: unchanged),
/// what becomes of the delivery, and what to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub endpoint: Option<Endpoint>,
    pub action: Action,
    pub notices: Vec<Notice>,
}

/// The policy's settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub schedule: RetrySchedule,
    /// Consecutive failed probes tolerated; one more disables.
    pub disable_after: u32,
    /// How long a job is tried again for Herald's own failures before it
    /// goes to the dead letters.
    pub own_failure_give_up_ms: i64,
}

impl Policy {
    /// The delivery's deadline: the schedule's whole span after its first
    /// attempt, with room for the schedule's jitter (+20%, and a quarter
    /// here) and [`DEADLINE_SLACK_MS`] for the bookkeeping between
    /// attempts (`None` before the first attempt).
    pub fn deadline_ms(&self, job: &Job) -> Option<i64> {
        let span = self.schedule.span().as_millis() as i64;
        (job.first_attempt_at_ms > 0)
            .then(|| job.first_attempt_at_ms + span + span / 4 + DEADLINE_SLACK_MS)
    }

    fn expired(&self, job: &Job, now_ms: i64) -> bool {
        self.deadline_ms(job).is_some_and(|d| now_ms > d)
    }

    /// The delay before the probe after `failed_probes` consecutive
    /// failures: the schedule's steps, its last step repeated.
    fn probe_delay(&self, failed_probes: u32, jitter: f64) -> Duration {
        let last = self.schedule.max_attempts().saturating_sub(1).max(1);
        self.schedule
            .delay_after(failed_probes.clamp(1, last), jitter)
            .unwrap_or(Duration::from_secs(5))
    }

    /// A job arrives at a webhook in `state`. Returns what to do, and the
    /// new state when the job claims the probe.
    pub fn on_arrival(
        &self,
        state: &Endpoint,
        job: &Job,
        now_ms: i64,
    ) -> (Arrival, Option<Endpoint>) {
        if self.expired(job, now_ms) {
            return (Arrival::Expire, None);
        }
        match state {
            Endpoint::Healthy => (Arrival::Send, None),
            Endpoint::Throttled { until_ms, .. } if now_ms < *until_ms => (
                Arrival::Wait {
                    until_ms: *until_ms,
                },
                None,
            ),
            Endpoint::Throttled { .. } => (Arrival::Send, None),
            Endpoint::Failing {
                next_probe_ms,
                probe_until_ms,
                ..
            } => {
                let due = next_probe_ms.is_some_and(|next| now_ms + PROBE_SLACK_MS >= next);
                if due && *probe_until_ms <= now_ms {
                    let mut claimed = state.clone();
                    if let Endpoint::Failing { probe_until_ms, .. } = &mut claimed {
                        *probe_until_ms = now_ms + PROBE_LEASE_MS;
                    }
                    (Arrival::Probe, Some(claimed))
                } else {
                    (Arrival::Park, None)
                }
            }
        }
    }

    /// An attempt ended at `now_ms`, the endpoint being in `state` now. `jitter` in
    /// `[0, 1)` spreads waits.
    pub fn on_outcome(
        &self,
        state: &Endpoint,
        job: &Job,
        attempt: Attempted<'_>,
        now_ms: i64,
        jitter: f64,
    ) -> Decision {
        let Attempted {
            probe,
            started_ms,
            class,
        } = attempt;
        let first = if job.first_attempt_at_ms > 0 {
            job.first_attempt_at_ms
        } else {
            started_ms
        };
        let job = Job {
            first_attempt_at_ms: first,
            ..*job
        };
        match class {
            Class::Success => {
                let recovered = matches!(state, Endpoint::Failing { .. });
                Decision {
                    endpoint: (*state != Endpoint::Healthy).then_some(Endpoint::Healthy),
                    action: Action::Done,
                    notices: if recovered {
                        vec![Notice::Recovered]
                    } else {
                        vec![]
                    },
                }
            }
            Class::Herald => Decision {
                endpoint: None,
                action: self.on_own_failure(&job, now_ms, jitter),
                notices: vec![],
            },
            Class::Throttled { retry_after_ms } => {
                // A round of throttling is the requests sent after the last
                // pause ended: answers to requests already in flight (or
                // sent on a replica's stale view) during a pause extend it
                // but do not count again, so a burst backs off once.
                let throttles = match state {
                    Endpoint::Throttled {
                        until_ms,
                        throttles,
                    } if started_ms >= *until_ms => throttles.saturating_add(1),
                    Endpoint::Throttled { throttles, .. } => (*throttles).max(1),
                    _ => 1,
                };
                // At least the backoff (never below a second), at least what
                // the endpoint asked for: a `Retry-After: 0`, or a date in
                // the past, is a floor, not a loop.
                let pause = retry_after_ms
                    .map_or(0, |ms| ms.clamp(0, MAX_THROTTLE_MS))
                    .max(throttle_backoff_ms(throttles));
                let mut until_ms = now_ms + pause;
                if let Endpoint::Throttled { until_ms: u, .. } = state {
                    until_ms = until_ms.max(*u);
                }
                // The endpoint answered: a failing one is alive again, but
                // busy.
                let endpoint = Endpoint::Throttled {
                    until_ms,
                    throttles,
                };
                let notices = if matches!(state, Endpoint::Failing { .. }) {
                    vec![Notice::Recovered]
                } else {
                    vec![]
                };
                if self.expired(&job, until_ms) {
                    let mut d = self.fail(Some(endpoint), FailureReason::Exhausted, notices);
                    d.notices.push(Notice::Exhausted);
                    return d;
                }
                // Spread the waiters over up to a second after the pause.
                let spread = (pause.clamp(100, 1_000) as f64 * jitter) as i64;
                Decision {
                    endpoint: Some(endpoint),
                    action: Action::Wait {
                        until_ms: until_ms + spread,
                    },
                    notices,
                }
            }
            Class::Endpoint { gone: true, .. } => Decision {
                endpoint: None,
                action: Action::Fail(FailureReason::Gone),
                notices: vec![Notice::Disable(DisableReason::Gone)],
            },
            Class::Endpoint { gone: false, error } => {
                self.on_failure(state, &job, probe, started_ms, error, now_ms, jitter)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_failure(
        &self,
        state: &Endpoint,
        job: &Job,
        probe: bool,
        started_ms: i64,
        error: &str,
        now_ms: i64,
        jitter: f64,
    ) -> Decision {
        let (endpoint, mut notices) = match state {
            // Already failing: only the probe's failure counts. A request
            // that started before the webhook became failing was part of
            // the burst that made it fail, and one sent on a stale view of
            // the state is not a probe.
            Endpoint::Failing {
                since_ms,
                failed_probes,
                ..
            } if probe && started_ms >= *since_ms => {
                let failed_probes = failed_probes + 1;
                (
                    Endpoint::Failing {
                        since_ms: *since_ms,
                        next_probe_ms: Some(
                            now_ms + self.probe_delay(failed_probes, jitter).as_millis() as i64,
                        ),
                        failed_probes,
                        probe_until_ms: 0,
                        last_error: error.to_owned(),
                    },
                    vec![],
                )
            }
            Endpoint::Failing { .. } => (state.clone(), vec![]),
            Endpoint::Healthy | Endpoint::Throttled { .. } => (
                Endpoint::Failing {
                    since_ms: now_ms,
                    next_probe_ms: Some(now_ms + self.probe_delay(1, jitter).as_millis() as i64),
                    failed_probes: 1,
                    probe_until_ms: 0,
                    last_error: error.to_owned(),
                },
                vec![Notice::Failing],
            ),
        };
        let changed = endpoint != *state;
        if let Endpoint::Failing {
            failed_probes,
            last_error,
            ..
        } = &endpoint
            && *failed_probes > self.disable_after
            && changed
        {
            notices.push(Notice::Disable(DisableReason::FailedProbes {
                failed: *failed_probes,
                last_error: last_error.clone(),
            }));
            let reason = if job.scheduled {
                FailureReason::WebhookDisabled
            } else {
                FailureReason::Failed
            };
            // It stays failing, with no probe ever due, while disabled: a
            // job racing the disable is parked (and logged with the
            // reason), never sent. Re-enabling forgets the state.
            let endpoint = match endpoint {
                Endpoint::Failing {
                    since_ms,
                    failed_probes,
                    last_error,
                    ..
                } => Endpoint::Failing {
                    since_ms,
                    next_probe_ms: None,
                    failed_probes,
                    probe_until_ms: 0,
                    last_error,
                },
                other => other,
            };
            return self.fail(Some(endpoint), reason, notices);
        }
        let endpoint = changed.then_some(endpoint);
        if !job.scheduled {
            return self.fail(endpoint, FailureReason::Failed, notices);
        }
        if job.attempt >= self.schedule.max_attempts() || self.expired(job, now_ms) {
            notices.push(Notice::Exhausted);
            return self.fail(endpoint, FailureReason::Exhausted, notices);
        }
        Decision {
            endpoint,
            action: Action::Park,
            notices,
        }
    }

    /// `decision`, made by `on_outcome` on one replica's own view of the
    /// endpoint state (Redis unreachable, refusing writes, or contended)
    /// rather than the shared one: a disable that rests on the shared count
    /// of failed probes is not made on it, and the delivery is parked (out
    /// of attempts, it fails as exhausted) instead. A 410 stands: it is the
    /// endpoint's own answer.
    pub fn on_local_view(&self, mut decision: Decision, job: &Job) -> Decision {
        let disabling = decision
            .notices
            .iter()
            .any(|n| matches!(n, Notice::Disable(r) if !r.stands_on_local_view()));
        if disabling {
            decision
                .notices
                .retain(|n| !matches!(n, Notice::Disable(_)));
            decision.action = if job.scheduled && job.attempt < self.schedule.max_attempts() {
                Action::Park
            } else {
                Action::Fail(FailureReason::Exhausted)
            };
        }
        decision
    }

    /// Herald's own failure (its resolver, a secret it cannot decrypt, NATS,
    /// the webhook store) stopped `job` at `now_ms`: try again after a wait
    /// that doubles with each failure in a row ([`own_failure_delay_ms`]),
    /// or, once they have gone on for the give-up time, dead-letter it.
    /// Nothing is spent and the delivery's deadline does not apply: the
    /// receiver had no part in it.
    pub fn on_own_failure(&self, job: &Job, now_ms: i64, jitter: f64) -> Action {
        let since = if job.own_failure_since_ms > 0 {
            job.own_failure_since_ms
        } else {
            now_ms
        };
        if now_ms - since >= self.own_failure_give_up_ms {
            return Action::DeadLetter;
        }
        Action::Retry {
            at_ms: now_ms + own_failure_delay_ms(job.own_failures.saturating_add(1), jitter),
        }
    }

    fn fail(
        &self,
        endpoint: Option<Endpoint>,
        reason: FailureReason,
        notices: Vec<Notice>,
    ) -> Decision {
        Decision {
            endpoint,
            action: Action::Fail(reason),
            notices,
        }
    }
}

/// The least pause after `throttles` throttled rounds in a row:
/// [`MIN_THROTTLE_MS`] doubling, at most [`MAX_THROTTLE_BACKOFF_MS`].
pub fn throttle_backoff_ms(throttles: u32) -> i64 {
    (MIN_THROTTLE_MS << throttles.saturating_sub(1).min(10)).min(MAX_THROTTLE_BACKOFF_MS)
}

/// The wait after the `failures`-th of Herald's own failures in a row:
/// [`OWN_FAILURE_FIRST_MS`] doubling up to [`OWN_FAILURE_MAX_MS`], spread
/// by `jitter` in `[0, 1)` over ±25% so that the jobs one outage stopped
/// do not all come back at once.
pub fn own_failure_delay_ms(failures: u32, jitter: f64) -> i64 {
    let base = (OWN_FAILURE_FIRST_MS << failures.saturating_sub(1).min(20)).min(OWN_FAILURE_MAX_MS);
    base * 3 / 4 + (base as f64 / 2.0 * jitter.clamp(0.0, 1.0)) as i64
}

/// The in-flight limit to one endpoint, additive increase and
/// multiplicative decrease as TCP's congestion avoidance does it: halved on
/// a throttled answer, and one more for each limit's worth of successes
/// (`1 / limit` per success), within `1..=max`. Growing by a whole request
/// per success would double the limit with each round of answers, and a
/// rate-limited receiver would get as many requests over its limit after
/// each pause as before the first. The limit is fractional; requests in
/// flight are its whole part.
pub fn next_limit(limit: f64, max: usize, throttled: bool) -> f64 {
    let max = max.max(1) as f64;
    let limit = limit.clamp(1.0, max);
    if throttled {
        (limit / 2.0).max(1.0)
    } else {
        (limit + 1.0 / limit).min(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            // 4 attempts: 1 s, 10 s, 100 s apart; span 111 s.
            schedule: RetrySchedule::parse("1s,10s,100s").unwrap(),
            disable_after: 2,
            own_failure_give_up_ms: 3_600_000,
        }
    }

    fn job(attempt: u32, first: i64) -> Job {
        Job {
            attempt,
            first_attempt_at_ms: first,
            scheduled: true,
            own_failures: 0,
            own_failure_since_ms: 0,
        }
    }

    fn failing(since: i64, next: i64, probes: u32, probe_until: i64) -> Endpoint {
        Endpoint::Failing {
            since_ms: since,
            next_probe_ms: Some(next),
            failed_probes: probes,
            probe_until_ms: probe_until,
            last_error: "HTTP 500".into(),
        }
    }

    /// Failing with no probe ever due: being disabled.
    fn disabled(since: i64, probes: u32) -> Endpoint {
        Endpoint::Failing {
            since_ms: since,
            next_probe_ms: None,
            failed_probes: probes,
            probe_until_ms: 0,
            last_error: "HTTP 500".into(),
        }
    }

    fn throttled(until: i64, n: u32) -> Endpoint {
        Endpoint::Throttled {
            until_ms: until,
            throttles: n,
        }
    }

    #[test]
    fn arrivals() {
        let p = policy();
        let t = 1_000_000;
        // (state, job, expected arrival at `t`, claims the probe)
        let cases: Vec<(Endpoint, Job, Arrival, bool)> = vec![
            (Endpoint::Healthy, job(1, 0), Arrival::Send, false),
            (Endpoint::Healthy, job(3, t - 5_000), Arrival::Send, false),
            // Deadline: first attempt + the 111 s span, a quarter more, 60 s.
            (
                Endpoint::Healthy,
                job(3, t - 198_751),
                Arrival::Expire,
                false,
            ),
            (Endpoint::Healthy, job(3, t - 198_750), Arrival::Send, false),
            (
                throttled(t + 500, 1),
                job(1, 0),
                Arrival::Wait { until_ms: t + 500 },
                false,
            ),
            (throttled(t, 1), job(1, 0), Arrival::Send, false),
            (throttled(t - 1, 3), job(2, t - 9_000), Arrival::Send, false),
            // Failing, probe not yet due: parked.
            (
                failing(t - 100, t + 5_000, 1, 0),
                job(1, 0),
                Arrival::Park,
                false,
            ),
            // Due (with slack), nobody probing: this one probes.
            (
                failing(t - 100, t + 200, 1, 0),
                job(1, 0),
                Arrival::Probe,
                true,
            ),
            (
                failing(t - 100, t - 3, 1, 0),
                job(2, t - 100),
                Arrival::Probe,
                true,
            ),
            // A probe is in flight: parked.
            (
                failing(t - 100, t - 3, 1, t + 10),
                job(1, 0),
                Arrival::Park,
                false,
            ),
            // A stale claim (the prober died) is taken over.
            (
                failing(t - 100, t - 3, 1, t),
                job(1, 0),
                Arrival::Probe,
                true,
            ),
            (
                failing(t - 100, t - 3, 1, 0),
                job(2, t - 200_000),
                Arrival::Expire,
                false,
            ),
        ];
        for (state, j, expected, claims) in cases {
            let now = t;
            let (arrival, next) = p.on_arrival(&state, &j, now);
            assert_eq!(arrival, expected, "{state:?} {j:?}");
            assert_eq!(next.is_some(), claims, "{state:?} {j:?}");
            if let Some(Endpoint::Failing { probe_until_ms, .. }) = next {
                assert_eq!(probe_until_ms, now + PROBE_LEASE_MS);
            }
        }
    }

    #[test]
    fn probe_timers_wait_for_a_claim_and_a_claim_is_given_back() {
        let t = 1_000_000;
        // (state, timer at, state after the probe's own failure)
        let cases: Vec<(Endpoint, ProbeTimer, Option<Endpoint>)> = vec![
            (Endpoint::Healthy, ProbeTimer::NotFailing, None),
            (throttled(t + 5, 1), ProbeTimer::NotFailing, None),
            // Not claimed: the next probe time, nothing to give back.
            (
                failing(t - 100, t + 5_000, 1, 0),
                ProbeTimer::At(t + 5_000),
                None,
            ),
            (failing(t - 100, t - 3, 1, 0), ProbeTimer::At(t - 3), None),
            // Claimed: the timer waits out the claim (it once fired every
            // 100 ms meanwhile); the claim is given back.
            (
                failing(t - 100, t - 3, 1, t + PROBE_LEASE_MS),
                ProbeTimer::At(t + PROBE_LEASE_MS),
                Some(failing(t - 100, t - 3, 1, 0)),
            ),
            // A lapsed claim is nothing to give back.
            (
                failing(t - 100, t - 3, 1, t - 1),
                ProbeTimer::At(t - 1),
                None,
            ),
            // Disabled: no probe, ever, and no claim.
            (disabled(t - 100, 3), ProbeTimer::Disabled, None),
        ];
        for (state, timer, released) in cases {
            assert_eq!(state.probe_timer(), timer, "{state:?}");
            assert_eq!(state.disabled(), timer == ProbeTimer::Disabled);
            assert_eq!(state.release_probe(t), released, "{state:?}");
        }
    }

    fn endpoint_failure() -> Class {
        Class::Endpoint {
            gone: false,
            error: "HTTP 500".into(),
        }
    }

    /// (state, job, probe, started, class, now) → (new state, action, notices)
    #[allow(clippy::type_complexity)]
    fn check(
        cases: Vec<(
            Endpoint,
            Job,
            bool,
            i64,
            Class,
            i64,
            Option<Endpoint>,
            Action,
            Vec<Notice>,
        )>,
    ) {
        let p = policy();
        for (state, j, probe, started, class, now, endpoint, action, notices) in cases {
            let d = p.on_outcome(
                &state,
                &j,
                Attempted {
                    probe,
                    started_ms: started,
                    class: &class,
                },
                now,
                0.0,
            );
            let what = format!("{state:?} {j:?} probe={probe} {class:?}");
            assert_eq!(d.endpoint, endpoint, "endpoint: {what}");
            assert_eq!(d.action, action, "action: {what}");
            assert_eq!(d.notices, notices, "notices: {what}");
        }
    }

    #[test]
    fn successes() {
        let t = 1_000_000;
        check(vec![
            (
                Endpoint::Healthy,
                job(1, 0),
                false,
                t,
                Class::Success,
                t,
                None,
                Action::Done,
                vec![],
            ),
            (
                throttled(t - 1, 2),
                job(1, 0),
                false,
                t,
                Class::Success,
                t,
                Some(Endpoint::Healthy),
                Action::Done,
                vec![],
            ),
            (
                failing(t - 10, t, 1, t + 9),
                job(2, t - 10),
                true,
                t,
                Class::Success,
                t,
                Some(Endpoint::Healthy),
                Action::Done,
                vec![Notice::Recovered],
            ),
            // A success even off-probe proves the endpoint is back.
            (
                failing(t - 10, t + 50, 2, 0),
                job(1, 0),
                false,
                t,
                Class::Success,
                t,
                Some(Endpoint::Healthy),
                Action::Done,
                vec![Notice::Recovered],
            ),
        ]);
    }

    #[test]
    fn endpoint_failures_open_the_breaker_once_and_probes_count() {
        let t = 1_000_000;
        let f = endpoint_failure;
        check(vec![
            // First failure: failing, next probe after the first step (1 s).
            (
                Endpoint::Healthy,
                job(1, 0),
                false,
                t,
                f(),
                t + 20,
                Some(failing(t + 20, t + 1_020, 1, 0)),
                Action::Park,
                vec![Notice::Failing],
            ),
            (
                throttled(t - 5, 1),
                job(1, 0),
                false,
                t,
                f(),
                t + 20,
                Some(failing(t + 20, t + 1_020, 1, 0)),
                Action::Park,
                vec![Notice::Failing],
            ),
            // The rest of the burst (in flight when it began) counts no more.
            (
                failing(t + 20, t + 1_020, 1, 0),
                job(1, 0),
                false,
                t,
                f(),
                t + 30,
                None,
                Action::Park,
                vec![],
            ),
            // Not a probe (a replica's stale view): counts no more either.
            (
                failing(t + 20, t + 1_020, 1, 0),
                job(1, 0),
                false,
                t + 25,
                f(),
                t + 30,
                None,
                Action::Park,
                vec![],
            ),
            // A failed probe: two in a row; the next probe after 10 s.
            (
                failing(t, t + 1_000, 1, t + 46_000),
                job(2, t),
                true,
                t + 1_000,
                f(),
                t + 1_100,
                Some(failing(t, t + 11_100, 2, 0)),
                Action::Park,
                vec![],
            ),
        ]);
    }

    #[test]
    fn the_probe_after_the_limit_disables_and_waiting_work_fails_with_the_reason() {
        let t = 1_000_000;
        let reason = DisableReason::FailedProbes {
            failed: 3,
            last_error: "HTTP 500".into(),
        };
        assert_eq!(
            reason.to_string(),
            "3 consecutive failed attempts; last: HTTP 500"
        );
        assert!(!reason.stands_on_local_view());
        assert!(DisableReason::Gone.stands_on_local_view());
        check(vec![
            (
                failing(t, t + 11_000, 2, t + 46_000),
                job(3, t),
                true,
                t + 11_000,
                endpoint_failure(),
                t + 11_100,
                Some(disabled(t, 3)),
                Action::Fail(FailureReason::WebhookDisabled),
                vec![Notice::Disable(reason)],
            ),
            // 410: disabled at once, whatever the state.
            (
                Endpoint::Healthy,
                job(1, 0),
                false,
                t,
                Class::Endpoint {
                    gone: true,
                    error: "HTTP 410".into(),
                },
                t,
                None,
                Action::Fail(FailureReason::Gone),
                vec![Notice::Disable(DisableReason::Gone)],
            ),
        ]);
        // disable_after 0: the first failure disables.
        let p = Policy {
            disable_after: 0,
            ..policy()
        };
        let d = p.on_outcome(
            &Endpoint::Healthy,
            &job(1, 0),
            Attempted {
                probe: false,
                started_ms: t,
                class: &endpoint_failure(),
            },
            t,
            0.0,
        );
        assert!(
            matches!(d.notices.last(), Some(Notice::Disable(_))),
            "{d:?}"
        );
    }

    #[test]
    fn exhausted_and_one_shot_deliveries() {
        let t = 1_000_000;
        check(vec![
            // The last attempt of the schedule (4) failed.
            (
                Endpoint::Healthy,
                job(4, t - 111_000),
                false,
                t,
                endpoint_failure(),
                t,
                Some(failing(t, t + 1_000, 1, 0)),
                Action::Fail(FailureReason::Exhausted),
                vec![Notice::Failing, Notice::Exhausted],
            ),
            // Past its deadline.
            (
                failing(t - 500_000, t, 1, 0),
                job(2, t - 200_000),
                true,
                t,
                endpoint_failure(),
                t,
                Some(failing(t - 500_000, t + 10_000, 2, 0)),
                Action::Fail(FailureReason::Exhausted),
                vec![Notice::Exhausted],
            ),
            // A test delivery is not retried, but still opens the breaker.
            (
                Endpoint::Healthy,
                Job {
                    scheduled: false,
                    ..job(1, 0)
                },
                false,
                t,
                endpoint_failure(),
                t,
                Some(failing(t, t + 1_000, 1, 0)),
                Action::Fail(FailureReason::Failed),
                vec![Notice::Failing],
            ),
        ]);
    }

    #[test]
    fn throttling_waits_and_never_counts() {
        let t = 1_000_000;
        let th = |ms: Option<i64>| Class::Throttled { retry_after_ms: ms };
        check(vec![
            (
                Endpoint::Healthy,
                job(1, 0),
                false,
                t,
                th(Some(1_000)),
                t,
                Some(throttled(t + 1_000, 1)),
                Action::Wait {
                    until_ms: t + 1_000,
                },
                vec![],
            ),
            // No time named: backoff 1 s, 2 s, 4 s...
            (
                throttled(t - 1, 1),
                job(1, t - 5_000),
                false,
                t,
                th(None),
                t,
                Some(throttled(t + 2_000, 2)),
                Action::Wait {
                    until_ms: t + 2_000,
                },
                vec![],
            ),
            // A pause in force is never shortened; a request sent before
            // it ended (in flight, or on a stale view) does not count as
            // another round.
            (
                throttled(t + 9_000, 1),
                job(1, 0),
                false,
                t,
                th(Some(1_000)),
                t,
                Some(throttled(t + 9_000, 1)),
                Action::Wait {
                    until_ms: t + 9_000,
                },
                vec![],
            ),
            // Throttled on the last attempt: still not spent.
            (
                Endpoint::Healthy,
                job(4, t - 1_000),
                false,
                t,
                th(Some(1_000)),
                t,
                Some(throttled(t + 1_000, 1)),
                Action::Wait {
                    until_ms: t + 1_000,
                },
                vec![],
            ),
            // A throttled probe: the endpoint is alive, only busy.
            (
                failing(t - 9, t, 2, t + 40_000),
                job(2, t - 9),
                true,
                t,
                th(Some(5_000)),
                t,
                Some(throttled(t + 5_000, 1)),
                Action::Wait {
                    until_ms: t + 5_000,
                },
                vec![Notice::Recovered],
            ),
            // Waiting past the deadline fails it.
            (
                Endpoint::Healthy,
                job(2, t - 195_000),
                false,
                t,
                th(Some(5_000)),
                t,
                Some(throttled(t + 5_000, 1)),
                Action::Fail(FailureReason::Exhausted),
                vec![Notice::Exhausted],
            ),
        ]);
        // Jitter spreads the waiters over at most a second past the pause.
        let d = policy().on_outcome(
            &Endpoint::Healthy,
            &job(1, 0),
            Attempted {
                probe: false,
                started_ms: t,
                class: &th(Some(3_000)),
            },
            t,
            0.5,
        );
        assert_eq!(
            d.action,
            Action::Wait {
                until_ms: t + 3_500
            }
        );
    }

    #[test]
    fn a_throttle_pause_has_a_floor_and_backs_off_in_a_row() {
        let t = 1_000_000;
        let th = |ms: Option<i64>| Class::Throttled { retry_after_ms: ms };
        // (state, started, Retry-After) → (paused until, throttled rounds)
        let cases: Vec<(Endpoint, i64, Option<i64>, i64, u32)> = vec![
            // `Retry-After: 0` (or a date in the past, parsed as 0): a
            // second, never a loop.
            (Endpoint::Healthy, t, Some(0), t + 1_000, 1),
            (Endpoint::Healthy, t, None, t + 1_000, 1),
            // Sent after the pause ended: another round, twice the pause.
            (throttled(t - 5, 1), t - 2, Some(0), t + 2_000, 2),
            (throttled(t - 5, 3), t - 2, Some(0), t + 8_000, 4),
            (throttled(t - 5, 6), t - 2, Some(0), t + 60_000, 7),
            // The backoff stops at a minute, however long it goes on.
            (throttled(t - 5, 40), t - 2, Some(0), t + 60_000, 41),
            (
                throttled(t - 5, u32::MAX),
                t - 2,
                None,
                t + 60_000,
                u32::MAX,
            ),
            // What the endpoint asks for is a lower bound: a longer ask
            // wins over the backoff, a shorter one does not.
            (throttled(t - 5, 1), t - 2, Some(30_000), t + 30_000, 2),
            (throttled(t - 5, 4), t - 2, Some(3_000), t + 16_000, 5),
            // Sent before the pause ended (the rest of a burst in flight):
            // the same round, so the pause is not doubled again, only held.
            (throttled(t + 500, 2), t - 100, Some(0), t + 2_000, 2),
            (throttled(t + 5_000, 2), t - 100, Some(0), t + 5_000, 2),
            // A state written before the count existed counts as one.
            (throttled(t + 500, 0), t - 100, Some(0), t + 1_000, 1),
            // A throttled probe of a failing webhook starts from one.
            (failing(t - 9, t, 2, t + 40_000), t, Some(0), t + 1_000, 1),
        ];
        for (state, started, retry_after, until, rounds) in cases {
            let d = policy().on_outcome(
                &state,
                &job(1, t - 10_000),
                Attempted {
                    probe: false,
                    started_ms: started,
                    class: &th(retry_after),
                },
                t,
                0.0,
            );
            let what = format!("{state:?} started {started} Retry-After {retry_after:?}");
            assert_eq!(d.endpoint, Some(throttled(until, rounds)), "{what}");
            assert_eq!(d.action, Action::Wait { until_ms: until }, "{what}");
        }
        // An answer right after a success (a fresh round) starts over.
        let d = policy().on_outcome(
            &Endpoint::Healthy,
            &job(1, 0),
            Attempted {
                probe: false,
                started_ms: t,
                class: &th(Some(0)),
            },
            t,
            0.99,
        );
        // Spread over at most a second past the pause, never below it.
        assert!(
            matches!(d.action, Action::Wait { until_ms } if (t + 1_000..t + 2_000).contains(&until_ms)),
            "{d:?}"
        );
    }

    #[test]
    fn heralds_own_failures_change_nothing_and_spend_nothing() {
        let t = 1_000_000;
        for state in [
            Endpoint::Healthy,
            throttled(t + 5, 1),
            failing(t - 5, t, 1, t + 40),
        ] {
            let d = policy().on_outcome(
                &state,
                &job(3, t - 1_000),
                Attempted {
                    probe: true,
                    started_ms: t,
                    class: &Class::Herald,
                },
                t,
                0.0,
            );
            assert_eq!(
                d,
                Decision {
                    endpoint: None,
                    action: Action::Retry { at_ms: t + 1_500 },
                    notices: vec![]
                },
                "{state:?}"
            );
        }
        // Past the delivery's deadline it is still tried: the deadline is
        // the receiver's schedule, and the receiver had no part in this.
        let d = policy().on_outcome(
            &Endpoint::Healthy,
            &job(3, t - 197_000),
            Attempted {
                probe: false,
                started_ms: t,
                class: &Class::Herald,
            },
            t,
            0.5,
        );
        assert_eq!(d.action, Action::Retry { at_ms: t + 2_000 });
    }

    #[test]
    fn heralds_own_failures_back_off_and_give_up_after_the_time_set() {
        let t = 1_700_000_000_000;
        let hour = 3_600_000;
        // (failures so far, since, jitter) → action
        let cases: Vec<(u32, i64, f64, Action)> = vec![
            // The first: 2 s, spread over ±25%.
            (0, 0, 0.5, Action::Retry { at_ms: t + 2_000 }),
            (0, 0, 0.0, Action::Retry { at_ms: t + 1_500 }),
            (0, 0, 0.999_999, Action::Retry { at_ms: t + 2_499 }),
            // Doubling with each in a row…
            (1, t - 2_000, 0.5, Action::Retry { at_ms: t + 4_000 }),
            (2, t - 6_000, 0.5, Action::Retry { at_ms: t + 8_000 }),
            (7, t - 500_000, 0.5, Action::Retry { at_ms: t + 256_000 }),
            // …up to 5 minutes.
            (8, t - 800_000, 0.5, Action::Retry { at_ms: t + 300_000 }),
            (8, t - 800_000, 0.0, Action::Retry { at_ms: t + 225_000 }),
            (500, t - 800_000, 0.5, Action::Retry { at_ms: t + 300_000 }),
            // Tried for just under the give-up time: once more.
            (12, t - hour + 1, 0.5, Action::Retry { at_ms: t + 300_000 }),
            // For the give-up time: the dead letters.
            (12, t - hour, 0.5, Action::DeadLetter),
            (3, t - 5 * hour, 0.5, Action::DeadLetter),
        ];
        for (failures, since, jitter, expected) in cases {
            let j = Job {
                own_failures: failures,
                own_failure_since_ms: since,
                ..job(2, t - 50_000)
            };
            assert_eq!(
                policy().on_own_failure(&j, t, jitter),
                expected,
                "{failures} failures since {since}"
            );
        }
        // Giving up at once is a setting like any other.
        let now = Policy {
            own_failure_give_up_ms: 0,
            ..policy()
        };
        assert_eq!(now.on_own_failure(&job(1, 0), t, 0.5), Action::DeadLetter);
        // Waits grow: 1.5–2.5 s, 3–5 s, 6–10 s, … never more than 6.25 min.
        let waits: Vec<_> = (1..=12).map(|n| own_failure_delay_ms(n, 0.5)).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(own_failure_delay_ms(u32::MAX, 1.0) <= OWN_FAILURE_MAX_MS * 5 / 4);
    }

    #[test]
    fn probes_follow_the_schedule_and_repeat_its_last_step() {
        let p = policy();
        let ms = |n| p.probe_delay(n, 0.0).as_millis();
        assert_eq!(
            (ms(0), ms(1), ms(2), ms(3), ms(9)),
            (1_000, 1_000, 10_000, 100_000, 100_000)
        );
        let none = Policy {
            schedule: RetrySchedule::parse("").unwrap(),
            ..policy()
        };
        assert_eq!(none.probe_delay(1, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn limits_and_backoff() {
        assert_eq!(next_limit(32.0, 32, true), 16.0);
        assert_eq!(next_limit(1.0, 32, true), 1.0);
        assert_eq!(next_limit(1.0, 32, false), 2.0);
        assert_eq!(next_limit(16.0, 32, false), 16.0625);
        assert_eq!(next_limit(32.0, 32, false), 32.0);
        assert_eq!(next_limit(40.0, 32, false), 32.0);
        // From 1, ten successes (a 10/s receiver's second) allow 4 in
        // flight, not 11: few requests beyond its limit after each pause.
        let grown = (0..10).fold(1.0, |l, _| next_limit(l, 32, false));
        assert_eq!(grown as usize, 4);
        // Back from 1 to the whole 32 takes some 500 successes.
        let mut limit = 1.0;
        let steps = std::iter::from_fn(|| {
            limit = next_limit(limit, 32, false);
            (limit < 32.0).then_some(())
        })
        .count();
        assert!((480..=520).contains(&steps), "{steps}");
        assert_eq!(throttle_backoff_ms(1), 1_000);
        assert_eq!(throttle_backoff_ms(3), 4_000);
        assert_eq!(throttle_backoff_ms(100), MAX_THROTTLE_BACKOFF_MS);
    }

    #[test]
    fn a_throttled_state_written_without_its_count_still_reads() {
        assert_eq!(
            serde_json::from_str::<Endpoint>(r#"{"state":"throttled","until_ms":5}"#).unwrap(),
            throttled(5, 0)
        );
    }

    #[test]
    fn on_a_local_view_only_a_410_disables() {
        let p = policy();
        let max = p.schedule.max_attempts();
        let by_probes = Notice::Disable(DisableReason::FailedProbes {
            failed: 3,
            last_error: "HTTP 500".into(),
        });
        let disabling = |notices: Vec<Notice>| Decision {
            endpoint: None,
            action: Action::Fail(FailureReason::WebhookDisabled),
            notices,
        };
        let one_off = Job {
            scheduled: false,
            ..job(1, 0)
        };
        // (decision on the local view, job, what is done instead)
        let cases = vec![
            (
                disabling(vec![Notice::Failing, by_probes.clone()]),
                job(2, 1),
                Action::Park,
                vec![Notice::Failing],
            ),
            (
                disabling(vec![by_probes.clone()]),
                job(max, 1),
                Action::Fail(FailureReason::Exhausted),
                vec![],
            ),
            (
                disabling(vec![by_probes]),
                one_off,
                Action::Fail(FailureReason::Exhausted),
                vec![],
            ),
            // The endpoint's own answer stands.
            (
                disabling(vec![Notice::Disable(DisableReason::Gone)]),
                job(2, 1),
                Action::Fail(FailureReason::WebhookDisabled),
                vec![Notice::Disable(DisableReason::Gone)],
            ),
        ];
        for (decision, job, action, notices) in cases {
            let d = p.on_local_view(decision, &job);
            assert_eq!((d.action, d.notices), (action, notices), "{job:?}");
        }
    }

    #[test]
    fn a_disabled_state_written_with_the_old_sentinel_still_reads_as_disabled() {
        let old = r#"{"state":"failing","since_ms":1,"next_probe_ms":9223372036854775807,"failed_probes":3,"probe_until_ms":9223372036854775807,"last_error":"HTTP 500"}"#;
        let state = serde_json::from_str::<Endpoint>(old).unwrap();
        assert!(state.disabled(), "{state:?}");
        assert_eq!(state.release_probe(2), None);
        assert_eq!(policy().on_arrival(&state, &job(2, 1), 10).0, Arrival::Park);
    }

    #[test]
    fn state_round_trips_as_json() {
        for state in [
            Endpoint::Healthy,
            throttled(5, 1),
            failing(1, 2, 3, 4),
            disabled(1, 3),
        ] {
            let text = serde_json::to_string(&state).unwrap();
            assert_eq!(
                serde_json::from_str::<Endpoint>(&text).unwrap(),
                state,
                "{text}"
            );
        }
    }
}
