//! Fair shares of the deliverer between organizations, as a pure state
//! machine (sans-IO, like `policy`: time is an argument, tests are tables).
//!
//! The deliverer has `slots` requests in flight at most. While only one
//! organization has work, it may use all of them but a small `reserve`,
//! kept free so that the deliverer keeps pulling jobs and finds another
//! organization's work at once. While several organizations have work, the
//! slots are shared max-min fairly: each gets an equal share, and what an
//! organization does not use (it has fewer requests to make) is shared by
//! the others. An organization may also be capped by its own limits
//! (requests in flight, deliveries a second).
//!
//! A job that arrives for an organization at its share, at its limit, or
//! with older jobs of its own still held back, is *held*: the deliverer
//! stores it aside (holding no slot) and keeps pulling others' work. Held
//! jobs are *released*, oldest first, as the organization's requests
//! complete ([`Scheduler::releases`], a round over the organizations with
//! held jobs, one slot each per turn, so free slots are dealt out evenly).
//!
//! Slots are not the machine, though: a burst to a fast receiver uses few
//! of them and every core, and then every other organization's job waits
//! for a core at every step. So while others have work, the organization
//! sending the most *yields* ([`Yielding`]): each deliverer watches how
//! long the others' jobs waited from being stored to being picked up, and
//! while that grows, the busiest organization's deliveries a second are
//! capped (its jobs over the cap are held like any others), lower each
//! tick; when the others' waits are back to normal the cap rises, and goes.
//!
//! The scheduler counts one deliverer's requests; every replica has its own,
//! so the shares hold per replica (replicas pull from one stream, so each
//! sees every organization's work in proportion).

use std::collections::{BTreeMap, VecDeque};

use crate::proto;
use crate::rate::{Bucket, Rate};

/// The stream of held jobs, `herald.held.<org>.<webhook>`.
pub const HELD_STREAM: &str = "HERALD_HELD";
pub const HELD_PREFIX: &str = "herald.held";

/// Where a held job of `org` for `webhook_id` is stored.
pub fn held_subject(org: &str, webhook_id: &str) -> String {
    format!("{HELD_PREFIX}.{org}.{webhook_id}")
}

/// The Redis key that says an organization's deliveries are held back now
/// (set by the deliverer with a short expiry; read for the webhook's page).
pub fn held_key(org: &str) -> String {
    format!("herald:held:{{{org}}}")
}

/// How long an organization with nothing in flight or held is still shown
/// (its metrics), so that a short lull does not make its series vanish.
pub const SHOWN_FOR_MS: i64 = 5 * 60 * 1000;

/// The slots never given to one organization while it is alone: about one
/// in sixteen, at least one (none when there is a single slot).
pub fn reserve(slots: usize) -> usize {
    (slots / 16).clamp(1, 64).min(slots.saturating_sub(1))
}

/// An organization's delivery limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight at once.
    pub in_flight: Option<u32>,
    /// Deliveries started a second.
    pub per_second: Option<u32>,
}

impl Limits {
    /// `self`, with the defaults where it sets nothing.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            in_flight: self.in_flight.or(defaults.in_flight),
            per_second: self.per_second.or(defaults.per_second),
        }
    }
}

/// What to do with a job that arrives for an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it: it is counted in flight until [`Scheduler::done`].
    Send,
    /// Hold it back, for this reason.
    Hold(Why),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Older jobs of the organization are held: it waits behind them.
    Behind,
    /// The organization holds its fair share while others have work.
    Share,
    /// The organization's own in-flight limit.
    InFlightLimit,
    /// The organization's own rate.
    Rate,
    /// It sends the most, and yields to others' waiting jobs.
    Yield,
}

#[derive(Debug, Default, Clone)]
struct Org {
    in_flight: usize,
    /// Jobs held back (as far as this deliverer knows).
    held: u64,
    /// When the jobs this deliverer held were queued, oldest first.
    held_since: VecDeque<i64>,
    /// When held jobs were first seen by a sweep rather than held here.
    seen_held_ms: Option<i64>,
    bucket: Option<Bucket>,
    last_active_ms: i64,
    /// Jobs sent (or released) since the last [`Scheduler::sent`].
    sent: u64,
    /// Once a released job of its could not be sent (its endpoint at its
    /// limit), until nothing of its is held: how many more may be released
    /// (one more per request of its that ends and per released job sent,
    /// or one per [`RELEASE_PROBE_MS`] without). `None`: as many as the
    /// free slots and its share allow.
    release_credit: Option<Credit>,
}

#[derive(Debug, Clone, Copy)]
struct Credit {
    left: usize,
    /// When the last release without credit was made.
    probed_ms: i64,
}

impl Org {
    fn forget_held(&mut self) {
        self.held = 0;
        self.held_since.clear();
        self.seen_held_ms = None;
        self.release_credit = None;
    }

    /// One more job, queued at `queued_ms`, is held.
    fn hold(&mut self, queued_ms: i64) {
        self.held += 1;
        self.held_since.push_back(queued_ms);
    }

    fn credit(&mut self, slots: usize) {
        if let Some(credit) = &mut self.release_credit {
            credit.left = (credit.left + 1).min(slots);
        }
    }
}

/// How often an organization whose released jobs could not be sent, and
/// which has no request of its own to end meanwhile, gets one released
/// again.
pub const RELEASE_PROBE_MS: i64 = 100;

/// An organization as the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgView {
    pub org: String,
    pub in_flight: usize,
    pub held: u64,
    /// When its oldest held job was queued.
    pub oldest_held_ms: Option<i64>,
    /// The share it would get now.
    pub share: usize,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    /// Requests in flight at most (`HERALD_DELIVERY_CONCURRENCY`).
    slots: usize,
    reserve: usize,
    defaults: Limits,
    limits: BTreeMap<String, Limits>,
    orgs: BTreeMap<String, Org>,
    /// Where the last round of releases stopped, so the next starts after.
    cursor: Option<String>,
    /// The organization yielding to others, and its deliveries a second.
    yielding: Option<(String, u32)>,
}

impl Scheduler {
    pub fn new(slots: usize, defaults: Limits) -> Self {
        Self {
            slots,
            reserve: reserve(slots),
            defaults,
            limits: BTreeMap::new(),
            orgs: BTreeMap::new(),
            cursor: None,
            yielding: None,
        }
    }

    /// Caps `org`'s deliveries a second while it yields; `None`: nobody
    /// yields.
    pub fn set_yield(&mut self, yielding: Option<(String, u32)>) {
        self.yielding = yielding;
    }

    /// The organization yielding now.
    pub fn yielding(&self) -> Option<&str> {
        self.yielding.as_ref().map(|(org, _)| org.as_str())
    }

    /// Each organization's jobs sent since the last call, most first, of
    /// those active within `within_ms`.
    pub fn sent(&mut self, within_ms: i64, now_ms: i64) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .orgs
            .iter_mut()
            .filter(|(_, o)| now_ms - o.last_active_ms < within_ms || o.in_flight > 0)
            .map(|(name, o)| (name.clone(), std::mem::take(&mut o.sent)))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// The organization's own limits (from its record); `None` forgets them.
    pub fn set_limits(&mut self, org: &str, limits: Option<Limits>) {
        match limits {
            Some(l) => {
                self.limits.insert(org.to_owned(), l);
            }
            None => {
                self.limits.remove(org);
            }
        }
    }

    fn limits(&self, org: &str) -> Limits {
        self.limits
            .get(org)
            .copied()
            .unwrap_or_default()
            .or(self.defaults)
    }

    fn rate(limits: Limits) -> Option<Rate> {
        limits.per_second.map(|n| Rate {
            per_minute: n.saturating_mul(60),
            burst: n.max(1),
        })
    }

    /// The rate `org` is held to: its own, or lower while it yields (with
    /// a tenth of a second's burst, so that it does not spend a second's
    /// worth at once).
    fn rate_of(&self, org: &str, limits: Limits) -> Option<(Rate, Why)> {
        let own = Self::rate(limits).map(|r| (r, Why::Rate));
        let yielded = self
            .yielding
            .as_ref()
            .filter(|(o, _)| o == org)
            .map(|(_, n)| Rate {
                per_minute: n.saturating_mul(60),
                burst: (n / 10).max(1),
            });
        match (own, yielded) {
            (Some((own, why)), Some(y)) if own.per_minute <= y.per_minute => Some((own, why)),
            (_, Some(y)) => Some((y, Why::Yield)),
            (own, None) => own,
        }
    }

    /// The slots shared between organizations.
    fn shared(&self) -> usize {
        self.slots - self.reserve
    }

    /// The requests `org` may have in flight now: max-min fair over the
    /// organizations with work, `org` counted as wanting more. Another
    /// organization wants what it has in flight and holds, up to its limit.
    pub fn share(&self, org: &str) -> usize {
        let mut wants: Vec<usize> = self
            .orgs
            .iter()
            .filter(|(name, o)| name.as_str() != org && (o.in_flight > 0 || o.held > 0))
            .map(|(name, o)| {
                let want = o
                    .in_flight
                    .saturating_add(o.held.min(usize::MAX as u64) as usize);
                match self.limits(name).in_flight {
                    Some(cap) => want.min(cap as usize),
                    None => want,
                }
            })
            .collect();
        wants.sort_unstable();
        let mut left = self.shared();
        let mut sharing = wants.len() + 1;
        for want in wants {
            let level = left / sharing;
            if want >= level {
                break;
            }
            left -= want;
            sharing -= 1;
        }
        (left / sharing).max(1)
    }

    fn org(&mut self, org: &str, now_ms: i64) -> &mut Org {
        let o = self.orgs.entry(org.to_owned()).or_default();
        o.last_active_ms = now_ms;
        o
    }

    /// Whether one more request of `org` fits its in-flight limit and
    /// share now.
    fn room(&self, org: &str, limits: Limits) -> Result<(), Why> {
        let in_flight = self.orgs.get(org).map_or(0, |o| o.in_flight);
        if let Some(cap) = limits.in_flight
            && in_flight >= cap as usize
        {
            return Err(Why::InFlightLimit);
        }
        if in_flight >= self.share(org) {
            return Err(Why::Share);
        }
        Ok(())
    }

    /// Whether one more request of `org` fits its limits and share now
    /// (taking a token of its rate when it does).
    fn fits(&mut self, org: &str, now_ms: i64) -> Result<(), Why> {
        let limits = self.limits(org);
        self.room(org, limits)?;
        if let Some((rate, why)) = self.rate_of(org, limits) {
            let bucket = self
                .orgs
                .get(org)
                .and_then(|o| o.bucket)
                .unwrap_or_else(|| rate.full(now_ms));
            let taken = rate.take(bucket, now_ms).map_err(|_| why)?;
            self.org(org, now_ms).bucket = Some(taken);
        }
        Ok(())
    }

    /// A job of `org`, queued at `queued_ms`, arrives.
    pub fn arrive(&mut self, org: &str, queued_ms: i64, now_ms: i64) -> Decision {
        let held = self.orgs.get(org).is_some_and(|o| o.held > 0);
        let decision = if held {
            Decision::Hold(Why::Behind)
        } else {
            match self.fits(org, now_ms) {
                Ok(()) => Decision::Send,
                Err(why) => Decision::Hold(why),
            }
        };
        let o = self.org(org, now_ms);
        match decision {
            Decision::Send => {
                o.in_flight += 1;
                o.sent += 1;
            }
            Decision::Hold(_) => o.hold(queued_ms),
        }
        decision
    }

    /// A job of `org` about to wait for its endpoint's turn: held now
    /// instead (counted as [`Scheduler::arrive`] counts a held one) when its
    /// organization has older jobs held or no room in its share or
    /// in-flight limit, since it would be held once it had the turn. A
    /// rate is left to `arrive`, which takes its token. Waiting for the
    /// turn would hold one of the deliverer's slots, and in a fan-out's
    /// flood every slot left (the reserve, what another organization's
    /// job needs) went to such waits.
    pub fn hold_early(&mut self, org: &str, queued_ms: i64, now_ms: i64) -> Option<Why> {
        let why = if self.orgs.get(org).is_some_and(|o| o.held > 0) {
            Why::Behind
        } else {
            self.room(org, self.limits(org)).err()?
        };
        self.org(org, now_ms).hold(queued_ms);
        Some(why)
    }

    /// A request of `org` (sent, or released and sent) is over.
    pub fn done(&mut self, org: &str, now_ms: i64) {
        let slots = self.slots;
        let o = self.org(org, now_ms);
        o.in_flight = o.in_flight.saturating_sub(1);
        o.credit(slots);
    }

    /// A released job of `org` was sent: one more may be released (as
    /// TCP's slow start grows, so releases of jobs that can be sent double
    /// each round).
    pub fn released_sent(&mut self, org: &str, now_ms: i64) {
        let slots = self.slots;
        self.org(org, now_ms).credit(slots);
    }

    /// A released job of `org` is over without a request (its endpoint was
    /// at its limit, and it was put back for later): from now on, until
    /// nothing of `org` is held, its releases are earned: one per request
    /// of its that ends and per released job sent (or one per
    /// [`RELEASE_PROBE_MS`] without). Released freely, every slot freed
    /// went to reading held jobs and putting them back, as fast as the
    /// deliverer could (a slow organization's, hundreds a second for as
    /// long as it had jobs held).
    pub fn unsent(&mut self, org: &str, now_ms: i64) {
        let o = self.org(org, now_ms);
        o.in_flight = o.in_flight.saturating_sub(1);
        o.release_credit.get_or_insert(Credit {
            left: 0,
            probed_ms: now_ms,
        });
    }

    /// Whether `org` may have one more released now.
    fn may_release(&self, org: &str, now_ms: i64) -> bool {
        match self.orgs.get(org).and_then(|o| o.release_credit) {
            None => true,
            Some(credit) => credit.left > 0 || now_ms - credit.probed_ms >= RELEASE_PROBE_MS,
        }
    }

    /// One more of `org` is released: a credit taken, or the probe made.
    fn take_release_credit(&mut self, org: &str, now_ms: i64) {
        if let Some(credit) = self
            .orgs
            .get_mut(org)
            .and_then(|o| o.release_credit.as_mut())
        {
            if credit.left > 0 {
                credit.left -= 1;
            } else {
                credit.probed_ms = now_ms;
            }
        }
    }

    /// How many held jobs of each organization to release now, with `free`
    /// slots free: a round over the organizations with held jobs, one each
    /// per turn, starting after where the last round stopped. What is
    /// released counts in flight at once (until [`Scheduler::done`], or
    /// [`Scheduler::released`] says fewer came).
    pub fn releases(&mut self, free: usize, now_ms: i64) -> Vec<(String, usize)> {
        let mut free = free.saturating_sub(self.reserve);
        let mut order: Vec<String> = self
            .orgs
            .iter()
            .filter(|(_, o)| o.held > 0)
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(cursor) = &self.cursor {
            let at = order.partition_point(|name| name <= cursor);
            order.rotate_left(at);
        }
        let mut out: Vec<(String, usize)> = Vec::new();
        let mut moving = true;
        while free > 0 && moving {
            moving = false;
            for name in &order {
                if free == 0 {
                    break;
                }
                if self.orgs.get(name).is_none_or(|o| o.held == 0)
                    || !self.may_release(name, now_ms)
                    || self.fits(name, now_ms).is_err()
                {
                    continue;
                }
                self.take_release_credit(name, now_ms);
                let o = self.org(name, now_ms);
                o.held -= 1;
                o.held_since.pop_front();
                o.in_flight += 1;
                o.sent += 1;
                free -= 1;
                moving = true;
                self.cursor = Some(name.clone());
                match out.iter_mut().find(|(n, _)| n == name) {
                    Some((_, n)) => *n += 1,
                    None => out.push((name.clone(), 1)),
                }
            }
        }
        out
    }

    /// Of `asked` jobs of `org` released, `got` could be read: the others
    /// are not in flight, and none are left held (another deliverer took
    /// them, or they were fewer than counted). `left`: how many the stream
    /// said were still held after the last one read, the truth where it
    /// differs from the count (another replica held more, or released
    /// some).
    pub fn released(
        &mut self,
        org: &str,
        asked: usize,
        got: usize,
        left: Option<u64>,
        now_ms: i64,
    ) {
        let o = self.org(org, now_ms);
        o.in_flight = o.in_flight.saturating_sub(asked.saturating_sub(got));
        match left {
            Some(0) if got > 0 => o.forget_held(),
            Some(left) if got > 0 => {
                if left > o.held {
                    o.seen_held_ms.get_or_insert(now_ms);
                }
                o.held = left;
                let extra = o.held_since.len().saturating_sub(left as usize);
                o.held_since.drain(..extra);
            }
            _ if got < asked => o.forget_held(),
            _ => {}
        }
    }

    /// What is stored held for each organization (read from the stream by
    /// every deliverer now and then): held jobs this deliverer did not hold
    /// itself (another replica, or before a restart) get released too.
    pub fn seen_held(&mut self, held: &BTreeMap<String, u64>, now_ms: i64) {
        for (org, &n) in held {
            let o = self.org(org, now_ms);
            if n > o.held {
                o.held = n;
                o.seen_held_ms.get_or_insert(now_ms);
            }
        }
        // Forget organizations with nothing for a while.
        self.orgs.retain(|_, o| {
            o.in_flight > 0 || o.held > 0 || now_ms - o.last_active_ms < SHOWN_FOR_MS
        });
    }

    /// Whether `org` has jobs held back now.
    pub fn holding(&self, org: &str) -> bool {
        self.orgs.get(org).is_some_and(|o| o.held > 0)
    }

    /// The organizations with work in the last [`SHOWN_FOR_MS`], at most
    /// `max`, those holding the most first.
    pub fn views(&self, max: usize, now_ms: i64) -> Vec<OrgView> {
        let mut views: Vec<OrgView> = self
            .orgs
            .iter()
            .filter(|(_, o)| {
                o.in_flight > 0 || o.held > 0 || now_ms - o.last_active_ms < SHOWN_FOR_MS
            })
            .map(|(name, o)| OrgView {
                org: name.clone(),
                in_flight: o.in_flight,
                held: o.held,
                oldest_held_ms: if o.held == 0 {
                    None
                } else {
                    o.held_since.front().copied().or(o.seen_held_ms)
                },
                share: self.share(name),
            })
            .collect();
        views.sort_by_key(|v| std::cmp::Reverse((v.held, v.in_flight)));
        views.truncate(max);
        views
    }
}

/// The requests in flight an endpoint gets for its latency: `cap` up to a
/// second per request; above, fewer in proportion (a 10 s endpoint gets a
/// tenth), never below 2 (1 when `cap` is 1). A slow endpoint's requests
/// hold slots a fast one would turn over thousands of times.
pub fn endpoint_limit(cap: usize, latency_ms: u64) -> usize {
    let cap = cap.max(1);
    if latency_ms <= 1_000 {
        return cap;
    }
    let scaled = (cap as u64).saturating_mul(1_000) / latency_ms;
    (scaled as usize).clamp(2.min(cap), cap)
}

/// How often [`Yielding::tick`] adapts the cap.
pub const YIELD_TICK_MS: i64 = 100;
/// Others' jobs waiting longer than this beyond the least wait seen are
/// waiting for the busiest organization's work.
pub const YIELD_EXCESS_MS: i64 = 4;

/// Since when a job has waited for Herald alone, for [`Yielding::waited`]:
/// an event's first attempt, from when ingest accepted the event, so that
/// the wait covers every stage after ingest (the matcher and both streams)
/// and not only the deliverer's queue. `None` for a job that waits on
/// purpose or for longer than Herald's stages: a retry, a test, recover or
/// replay, a job deferred, throttled, scheduled for later, stopped by
/// Herald's own failure, or ordered behind its key.
pub fn waiting_since_ms(job: &proto::DeliveryJob) -> Option<i64> {
    let event = job.event.as_ref()?;
    let fresh = job.kind == proto::DeliveryKind::Event as i32
        && job.attempt <= 1
        && job.deferrals == 0
        && job.throttles == 0
        && job.own_failures == 0
        && job.not_before_ms == 0
        && job.ordered.is_none()
        && event.received_at_ms > 0;
    fresh.then_some(event.received_at_ms)
}
/// The lowest cap, deliveries a second: however long others wait, the
/// yielding organization moves.
pub const YIELD_LEAST: f64 = 100.0;
/// Above this cap the organization no longer yields.
pub const YIELD_MOST: f64 = 100_000.0;
/// The least wait is the least of this window and the one before.
pub const YIELD_WINDOW_MS: i64 = 60_000;
/// The cap grows quickly up to this fraction of its ceiling, the rate at
/// which others last waited ([`Yielding`]).
pub const YIELD_NEAR: f64 = 0.85;
/// Near its ceiling the cap grows this much a tick: about eight quiet ticks
/// from [`YIELD_NEAR`] back to the ceiling.
pub const YIELD_PROBE: f64 = 1.02;
/// This far past its ceiling the cap forgets it (the machine has room
/// again) and grows quickly.
pub const YIELD_PAST: f64 = 1.1;
/// Others count as active for this long after their last job.
pub const YIELD_OTHERS_WITHIN_MS: i64 = 2_000;

/// Who yields for the next tick, from `sent` (each active organization's
/// jobs sent in the last tick, most first, [`Scheduler::sent`]) and who
/// yielded in it: nobody unless another organization is active; the one
/// yielding while it still sends at least as much as any other (its cap
/// holds it, so it sends less than it would); otherwise the one that sent
/// the most, and the cap moves to it (`true`: start its cap afresh). So of
/// two organizations each wanting more than half of the machine, neither
/// is held at the least while the other takes the rest.
pub fn yielder(sent: &[(String, u64)], yielding: Option<&str>) -> (Option<String>, bool) {
    if sent.len() < 2 {
        return (None, yielding.is_some());
    }
    let of = |org: &str| sent.iter().find(|(o, _)| o == org).map_or(0, |(_, n)| *n);
    let most = &sent[0];
    match yielding {
        Some(y) if of(y) >= most.1 => (Some(y.to_owned()), false),
        other => (Some(most.0.clone()), other.is_some()),
    }
}

/// The cap on the busiest organization's deliveries a second while others
/// wait: a delay-based background class, as LEDBAT is for TCP. The wait of
/// each job of another organization, from its event's acceptance to the
/// job's pickup ([`waiting_since_ms`]), is set beside the least such wait lately (what a job nobody is in front
/// of waits, plus any offset between the server's clock and this one).
/// While the others wait more than [`YIELD_EXCESS_MS`] beyond it, the cap
/// falls to 70% of what the organization sent in the tick (never below
/// [`YIELD_LEAST`]); a tick whose jobs of others all waited less grows it:
/// by 25% up to [`YIELD_NEAR`] of the rate at which others last waited
/// (its *ceiling*), then by [`YIELD_PROBE`] a tick (so it overshoots what
/// the machine bears once in many ticks rather than every third one: each
/// overshoot is another organization's job waiting), and by 25% again once
/// [`YIELD_PAST`] beyond it; past [`YIELD_MOST`] it goes. A tick with no job of
/// another organization leaves it as it is: an organization sending ten
/// events a second has a job in one tick of two, and no news is not good
/// news. Once nobody else has work, the cap goes ([`Yielding::stop`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Yielding {
    cap: Option<f64>,
    /// What the organization sent a second when others last waited for it.
    ceiling: Option<f64>,
    /// The least wait of this window and of the last one.
    base: [i64; 2],
    window_from_ms: i64,
    /// The longest wait of another organization's job this tick.
    worst: Option<i64>,
}

impl Yielding {
    pub fn new(now_ms: i64) -> Self {
        Self {
            cap: None,
            ceiling: None,
            base: [i64::MAX; 2],
            window_from_ms: now_ms,
            worst: None,
        }
    }

    /// Deliveries a second; `None`: no cap.
    pub fn cap(&self) -> Option<u32> {
        self.cap.map(|c| c as u32)
    }

    /// Nobody yields any more (nobody else is about): no cap.
    pub fn stop(&mut self) {
        self.cap = None;
        self.ceiling = None;
    }

    /// A job of another organization waited `wait_ms` to be picked up.
    pub fn waited(&mut self, wait_ms: i64) {
        self.base[0] = self.base[0].min(wait_ms);
        self.worst = Some(self.worst.map_or(wait_ms, |w| w.max(wait_ms)));
    }

    /// Every [`YIELD_TICK_MS`]: `sent`, what the yielding organization sent
    /// in the tick (a second's worth), sets the cap for the next.
    pub fn tick(&mut self, now_ms: i64, sent_per_second: f64) {
        let base = self.base[0].min(self.base[1]);
        self.cap = match self.worst {
            Some(worst) if worst.saturating_sub(base) > YIELD_EXCESS_MS => {
                let went = self.cap.map_or(sent_per_second, |c| c.min(sent_per_second));
                self.ceiling = Some(went);
                Some((went * 0.7).max(YIELD_LEAST))
            }
            Some(_) => {
                if let (Some(cap), Some(ceiling)) = (self.cap, self.ceiling)
                    && cap >= ceiling * YIELD_PAST
                {
                    self.ceiling = None;
                }
                let grown = match (self.cap, self.ceiling) {
                    (Some(cap), Some(ceiling)) if cap >= ceiling * YIELD_NEAR => {
                        Some(cap * YIELD_PROBE)
                    }
                    (Some(cap), Some(ceiling)) => Some((cap * 1.25).min(ceiling * YIELD_NEAR)),
                    (cap, _) => cap.map(|c| c * 1.25),
                };
                grown.filter(|c| *c < YIELD_MOST)
            }
            None => self.cap,
        };
        if self.cap.is_none() {
            self.ceiling = None;
        }
        self.worst = None;
        if now_ms - self.window_from_ms >= YIELD_WINDOW_MS {
            self.base = [i64::MAX, self.base[0]];
            self.window_from_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Limits = Limits {
        in_flight: None,
        per_second: None,
    };

    /// Runs `steps` on a scheduler of `slots`: `"a+"` a job of a arrives
    /// (expected `S`end, or `H`old), `"a-"` a request of a is done,
    /// `"r5"` releases with 5 free slots (expected `a1 b2` …).
    fn check(slots: usize, limits: &[(&str, Limits)], steps: &[(&str, &str)]) {
        let mut s = Scheduler::new(slots, NONE);
        for (org, l) in limits {
            s.set_limits(org, Some(*l));
        }
        for (i, (step, want)) in steps.iter().enumerate() {
            let now = i as i64 * 10;
            let got = if let Some(org) = step.strip_suffix('+') {
                match s.arrive(org, now, now) {
                    Decision::Send => "S".to_owned(),
                    Decision::Hold(why) => format!("H {why:?}"),
                }
            } else if let Some(org) = step.strip_suffix('-') {
                s.done(org, now);
                String::new()
            } else if let Some(free) = step.strip_prefix('r') {
                s.releases(free.parse().unwrap(), now)
                    .iter()
                    .map(|(o, n)| format!("{o}{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                panic!("unknown step {step}")
            };
            // "H" is any hold.
            if *want == "H" {
                assert!(got.starts_with('H'), "step {i} ({step}): {got}");
            } else {
                assert_eq!(got, *want, "step {i} ({step})");
            }
        }
    }

    fn repeat(
        step: &'static str,
        want: &'static str,
        n: usize,
    ) -> Vec<(&'static str, &'static str)> {
        vec![(step, want); n]
    }

    #[test]
    fn the_reserve_is_small_and_never_everything() {
        for (slots, want) in [(1, 0), (2, 1), (16, 1), (64, 4), (1024, 64), (65_536, 64)] {
            assert_eq!(reserve(slots), want, "{slots} slots");
        }
    }

    #[test]
    fn an_organization_alone_uses_all_but_the_reserve() {
        // 20 slots, reserve 1: 19 go, the 20th is held.
        let mut steps = repeat("a+", "S", 19);
        steps.push(("a+", "H"));
        check(20, &[], &steps);
    }

    #[test]
    fn another_organization_gets_in_at_once_and_the_first_is_cut_to_its_share() {
        // a fills 15 of 16 (reserve 1); b arrives: its share is half.
        let mut steps = repeat("a+", "S", 15);
        steps.extend([("b+", "S"), ("b+", "S")]);
        // a is over its share now (b wants more): a's next are held.
        steps.push(("a+", "H Share"));
        // and behind that one, whatever the share.
        steps.extend([("a-", ""), ("a+", "H Behind")]);
        check(16, &[], &steps);
    }

    #[test]
    fn held_jobs_are_released_as_requests_complete_within_the_share() {
        // 16 slots, 15 shared: a fills them, b gets half.
        let mut steps = repeat("a+", "S", 15);
        steps.extend(repeat("b+", "S", 7));
        steps.extend([("b+", "H Share"), ("a+", "H Share")]);
        // Both at or above their share: nothing released.
        steps.push(("r10", ""));
        // a's requests complete: a wants less, so both may have more.
        steps.extend(repeat("a-", "", 10));
        steps.push(("r10", "a1 b1"));
        // Nothing held: a's next arrival is sent.
        steps.push(("a+", "S"));
        check(16, &[], &steps);
    }

    #[test]
    fn releases_go_round_the_organizations_evenly() {
        let mut s = Scheduler::new(100, NONE); // reserve 6
        let held: BTreeMap<String, u64> = [
            ("a".to_owned(), 50),
            ("b".to_owned(), 50),
            ("c".to_owned(), 1),
        ]
        .into();
        s.seen_held(&held, 0);
        // 6 free beyond the reserve: one each per turn.
        assert_eq!(
            s.releases(12, 1),
            vec![("a".into(), 3), ("b".into(), 2), ("c".into(), 1)]
        );
        // The next round starts after the last released (a); c has none.
        assert_eq!(s.releases(9, 2), vec![("b".into(), 2), ("a".into(), 1)]);
    }

    #[test]
    fn fewer_read_than_released_means_none_are_left() {
        let mut s = Scheduler::new(100, NONE);
        s.seen_held(&[("a".to_owned(), 10)].into(), 0);
        assert_eq!(s.releases(20, 1), vec![("a".into(), 10)]);
        s.released("a", 10, 3, None, 2);
        assert!(!s.holding("a"));
        assert_eq!(s.views(10, 3)[0].in_flight, 3);
    }

    #[test]
    fn what_the_stream_says_is_left_is_what_is_held() {
        // (held before, released, read, left after the last read) → held.
        let cases: &[(u64, usize, usize, Option<u64>, u64)] = &[
            // Another replica held more behind them: all of it is held.
            (10, 10, 10, Some(40), 40),
            // Another replica released some: fewer are.
            (10, 5, 5, Some(2), 2),
            // Nothing left.
            (10, 5, 5, Some(0), 0),
            // Fewer read than released, nothing said: none are left.
            (10, 10, 3, None, 0),
            // Fewer read, but the stream says more came meanwhile.
            (10, 10, 3, Some(7), 7),
            // All read, nothing said: the count goes on.
            (10, 4, 4, None, 6),
            // Nothing read: none are left, whatever was said before.
            (10, 4, 0, Some(9), 0),
        ];
        for &(before, asked, got, left, after) in cases {
            let mut s = Scheduler::new(100, NONE);
            s.seen_held(&[("a".to_owned(), before)].into(), 0);
            assert_eq!(s.releases(asked + 6, 1), vec![("a".into(), asked)]);
            s.released("a", asked, got, left, 2);
            let held = s.views(10, 3).first().map_or(0, |v| v.held);
            assert_eq!(
                held, after,
                "{before} held, {asked} released, {got} read, {left:?} left"
            );
            assert_eq!(s.holding("a"), after > 0);
        }
    }

    #[test]
    fn a_job_about_to_wait_for_its_endpoint_is_held_when_it_would_be_after() {
        // (a's in flight, b's in flight, a's held, a's own cap) → held why.
        type Case = (usize, usize, u64, Option<u32>, Option<Why>);
        let cases: &[Case] = &[
            // Alone, room in all but the reserve (100 slots: 94 shared).
            (10, 0, 0, None, None),
            (94, 0, 0, None, Some(Why::Share)),
            // b has one in flight: a may have the other 93.
            (46, 1, 0, None, None),
            (93, 1, 0, None, Some(Why::Share)),
            // Older jobs of a's are held: behind them.
            (0, 0, 3, None, Some(Why::Behind)),
            // Its own cap.
            (5, 0, 0, Some(5), Some(Why::InFlightLimit)),
        ];
        for &(a, b, held, cap, why) in cases {
            let mut s = Scheduler::new(100, NONE);
            s.set_limits(
                "a",
                Some(Limits {
                    in_flight: cap,
                    per_second: None,
                }),
            );
            for _ in 0..a {
                assert_eq!(s.arrive("a", 0, 0), Decision::Send);
            }
            for _ in 0..b {
                s.arrive("b", 0, 0);
            }
            if held > 0 {
                s.seen_held(&[("a".to_owned(), held)].into(), 0);
            }
            assert_eq!(s.hold_early("a", 1, 1), why, "{a} {b} {held} {cap:?}");
            let counted = s
                .views(10, 2)
                .iter()
                .find(|v| v.org == "a")
                .map_or(0, |v| v.held);
            assert_eq!(counted, held + u64::from(why.is_some()), "counted held");
        }
    }

    #[test]
    fn released_jobs_that_cannot_be_sent_are_released_as_requests_end() {
        let mut s = Scheduler::new(100, NONE); // reserve 6
        s.seen_held(&[("a".to_owned(), 1_000)].into(), 0);
        for _ in 0..10 {
            assert_eq!(s.arrive("a", 0, 0), Decision::Hold(Why::Behind));
        }
        assert_eq!(s.releases(50, 1), vec![("a".into(), 44)]);
        // Sent: they end, and the next go as freely.
        for _ in 0..44 {
            s.released_sent("a", 2);
            s.done("a", 2);
        }
        assert_eq!(s.releases(50, 3), vec![("a".into(), 44)]);
        // Put back unsent (their endpoints at their limits): their slots
        // free, but no more are released until a request of a's ends ...
        for _ in 0..40 {
            s.unsent("a", 4);
        }
        assert_eq!(s.releases(50, 5), vec![], "no credit");
        // ... one each,
        s.done("a", 6);
        s.done("a", 6);
        assert_eq!(s.releases(50, 7), vec![("a".into(), 2)]);
        assert_eq!(s.releases(50, 8), vec![]);
        // (one put back again changes nothing)
        s.unsent("a", 8);
        assert_eq!(s.releases(50, 9), vec![]);
        // or one per RELEASE_PROBE_MS when none ends;
        assert_eq!(s.releases(50, 4 + RELEASE_PROBE_MS), vec![("a".into(), 1)]);
        assert_eq!(s.releases(50, 5 + RELEASE_PROBE_MS), vec![]);
        // and one per released job sent: those that can be sent double.
        s.released_sent("a", 150);
        assert_eq!(s.releases(50, 151), vec![("a".into(), 1)]);
        s.released_sent("a", 152);
        s.done("a", 153);
        assert_eq!(s.releases(50, 154), vec![("a".into(), 2)]);
        // Nothing held any more: free again.
        s.released("a", 1, 0, None, 155);
        s.seen_held(&[("a".to_owned(), 100)].into(), 156);
        assert_eq!(s.releases(50, 157), vec![("a".into(), 44)]);
    }

    #[test]
    fn an_organization_using_little_leaves_the_rest_to_others() {
        let mut s = Scheduler::new(101, NONE); // reserve 6: 95 shared
        for _ in 0..5 {
            s.arrive("b", 0, 0);
        }
        // b wants 5: a may have the other 90.
        assert_eq!(s.share("a"), 90);
        // c has 100 waiting: a and c split what b leaves.
        s.seen_held(&[("c".to_owned(), 100)].into(), 0);
        assert_eq!(s.share("a"), 45);
        // a has nothing: b and c halve it all.
        assert_eq!(s.share("b"), 47);
    }

    #[test]
    fn an_in_flight_limit_caps_an_organization_even_alone() {
        let capped = Limits {
            in_flight: Some(3),
            per_second: None,
        };
        let mut steps = repeat("a+", "S", 3);
        steps.push(("a+", "H InFlightLimit"));
        steps.push(("a-", ""));
        steps.push(("r50", "a1"));
        steps.push(("r50", ""));
        check(100, &[("a", capped)], &steps);
    }

    #[test]
    fn a_rate_limit_holds_what_is_over_it_and_releases_it_as_tokens_come() {
        let mut s = Scheduler::new(100, NONE);
        s.set_limits(
            "a",
            Some(Limits {
                in_flight: None,
                per_second: Some(2),
            }),
        );
        assert_eq!(s.arrive("a", 0, 0), Decision::Send);
        assert_eq!(s.arrive("a", 0, 0), Decision::Send);
        assert_eq!(s.arrive("a", 0, 0), Decision::Hold(Why::Rate));
        assert_eq!(s.arrive("a", 0, 0), Decision::Hold(Why::Behind));
        assert_eq!(s.releases(50, 100), vec![]);
        // Half a second: one token.
        assert_eq!(s.releases(50, 500), vec![("a".into(), 1)]);
        assert_eq!(s.releases(50, 1_000), vec![("a".into(), 1)]);
        assert!(!s.holding("a"));
    }

    #[test]
    fn default_limits_apply_where_an_organization_sets_none() {
        let mut s = Scheduler::new(
            100,
            Limits {
                in_flight: Some(1),
                per_second: None,
            },
        );
        s.set_limits(
            "big",
            Some(Limits {
                in_flight: Some(2),
                per_second: None,
            }),
        );
        assert_eq!(s.arrive("a", 0, 0), Decision::Send);
        assert_eq!(s.arrive("a", 0, 0), Decision::Hold(Why::InFlightLimit));
        assert_eq!(s.arrive("big", 0, 0), Decision::Send);
        assert_eq!(s.arrive("big", 0, 0), Decision::Send);
        assert_eq!(s.arrive("big", 0, 0), Decision::Hold(Why::InFlightLimit));
    }

    #[test]
    fn views_show_recent_organizations_with_their_oldest_held_job() {
        let mut s = Scheduler::new(2, NONE); // reserve 1: one shared slot
        assert_eq!(s.arrive("a", 100, 100), Decision::Send);
        assert!(matches!(s.arrive("a", 150, 200), Decision::Hold(_)));
        assert!(matches!(s.arrive("a", 300, 300), Decision::Hold(_)));
        let v = &s.views(10, 400)[0];
        assert_eq!((v.in_flight, v.held, v.oldest_held_ms), (1, 2, Some(150)));
        s.done("a", 500);
        assert_eq!(s.releases(2, 500), vec![("a".into(), 1)]);
        assert_eq!(s.views(10, 600)[0].oldest_held_ms, Some(300));
        // Idle for longer than it is shown: gone.
        s.done("a", 700);
        assert_eq!(s.releases(2, 700), vec![("a".into(), 1)]);
        s.done("a", 700);
        s.arrive("b", 700, 700);
        s.seen_held(&BTreeMap::new(), 700 + SHOWN_FOR_MS);
        let shown: Vec<String> = s
            .views(10, 700 + SHOWN_FOR_MS)
            .into_iter()
            .map(|v| v.org)
            .collect();
        assert_eq!(shown, vec!["b".to_owned()]);
    }

    #[test]
    fn slow_endpoints_get_fewer_requests_in_flight() {
        for (cap, latency_ms, want) in [
            (32, 5, 32),
            (32, 1_000, 32),
            (32, 2_000, 16),
            (32, 10_000, 3),
            (32, 60_000, 2),
            (1, 60_000, 1),
            (4096, 10_000, 409),
        ] {
            assert_eq!(
                endpoint_limit(cap, latency_ms),
                want,
                "{cap} at {latency_ms} ms"
            );
        }
    }

    #[test]
    fn the_busiest_yields_while_others_wait_and_less_as_they_do_not() {
        let mut y = Yielding::new(0);
        // (others' waits this tick, what the busiest sent a second) → cap.
        let cases: [(&[i64], f64, Option<u32>); 10] = [
            // Others wait no more than the least wait: no cap.
            (&[1, 2, 1], 2_400.0, None),
            // 6 ms beyond the least (1): 70% of what it sent.
            (&[7], 2_400.0, Some(1_680)),
            (&[9], 1_680.0, Some(1_176)),
            // Within 4 ms of the least: 25% more, up to 85% of the rate
            // others last waited at (1,680).
            (&[3], 1_176.0, Some(1_428)),
            // No job of another organization this tick: as it was.
            (&[], 1_428.0, Some(1_428)),
            // It sent less than its cap: 70% of what it sent.
            (&[12], 500.0, Some(350)),
            (&[12], 100.0, Some(100)),
            (&[12], 100.0, Some(100)),
            // Near the rate others waited at (100): 2% a tick.
            (&[2], 100.0, Some(102)),
            (&[1, 3], 100.0, Some(104)),
        ];
        for (i, (waits, sent, cap)) in cases.into_iter().enumerate() {
            for w in waits {
                y.waited(*w);
            }
            y.tick((i as i64 + 1) * YIELD_TICK_MS, sent);
            assert_eq!(y.cap(), cap, "tick {i}");
        }
        let mut ticks = 0;
        while y.cap().is_some() {
            ticks += 1;
            y.waited(1);
            y.tick(10_000 + ticks * YIELD_TICK_MS, 100.0);
        }
        assert_eq!(ticks, 34, "about 3.4 s from 104/s to no cap");
        // Capped again, then nobody else is about.
        y.waited(50);
        y.tick(20_000, 1_000.0);
        assert_eq!(y.cap(), Some(700));
        y.stop();
        assert_eq!(y.cap(), None);
    }

    #[test]
    fn the_cap_comes_back_quickly_near_where_others_waited_then_slowly() {
        // The machine bears 1,000/s of the busiest beside the others: above
        // that, their jobs wait. Ticks between the overshoots (each one a
        // job of another organization that waited) over 20 s.
        let mut y = Yielding::new(0);
        // Before the burst: others' jobs wait 1 ms.
        y.waited(1);
        y.tick(0, 0.0);
        let (mut overshoots, mut capped) = (0, 0.0);
        for tick in 1..=200 {
            let sent = y.cap().map_or(3_000.0, |c| f64::from(c).min(3_000.0));
            y.waited(if sent > 1_000.0 { 20 } else { 1 });
            overshoots += u32::from(sent > 1_000.0);
            capped += sent;
            y.tick(tick * YIELD_TICK_MS, sent);
        }
        // Once every nine ticks or so (about 70 times with 25% a tick,
        // every third tick), and it still sends most of what the machine
        // bears.
        assert!(overshoots <= 25, "{overshoots} overshoots");
        assert!(capped / 200.0 > 850.0, "{} a second", capped / 200.0);
        // A machine with room again: the cap goes past its ceiling and on.
        let mut ticks = 0;
        while y.cap().is_some() {
            ticks += 1;
            y.waited(1);
            y.tick(30_000 + ticks * YIELD_TICK_MS, 1_000.0);
        }
        assert!(ticks < 60, "{ticks} ticks to no cap");
    }

    #[test]
    fn only_a_fresh_event_delivery_says_how_long_others_wait() {
        let fresh = proto::DeliveryJob {
            kind: proto::DeliveryKind::Event as i32,
            attempt: 1,
            event: Some(proto::Event {
                received_at_ms: 1_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(waiting_since_ms(&fresh), Some(1_000));
        type Change = fn(&mut proto::DeliveryJob);
        let cases: [(&str, Change); 9] = [
            ("a retry", |j| j.attempt = 2),
            ("a test", |j| j.kind = proto::DeliveryKind::Test as i32),
            ("a replay", |j| j.kind = proto::DeliveryKind::Replay as i32),
            ("deferred", |j| j.deferrals = 1),
            ("throttled", |j| j.throttles = 1),
            ("Herald's own failure", |j| j.own_failures = 1),
            ("scheduled", |j| j.not_before_ms = 5),
            ("ordered", |j| {
                j.ordered = Some(proto::OrderedPlace::default())
            }),
            ("no acceptance time", |j| {
                j.event.as_mut().unwrap().received_at_ms = 0
            }),
        ];
        for (what, change) in cases {
            let mut job = fresh.clone();
            change(&mut job);
            assert_eq!(waiting_since_ms(&job), None, "{what}");
        }
    }

    #[test]
    fn who_yields() {
        let sent = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(o, n)| (o.to_string(), *n)).collect()
        };
        // (sent this tick, most first; yielding) → (yielding next, afresh)
        type Case<'a> = (&'a [(&'a str, u64)], Option<&'a str>, Option<&'a str>, bool);
        let cases: [Case; 7] = [
            // Alone: nobody yields, and a cap goes.
            (&[("a", 240)], None, None, false),
            (&[("a", 240)], Some("a"), None, true),
            (&[], Some("a"), None, true),
            // Others about: the busiest.
            (&[("a", 240), ("b", 1)], None, Some("a"), false),
            // Yielding, and still sending the most: it goes on.
            (&[("a", 120), ("b", 1)], Some("a"), Some("a"), false),
            (&[("a", 120), ("b", 120)], Some("b"), Some("b"), false),
            // Another sends more than the one held: the cap moves.
            (&[("b", 300), ("a", 100)], Some("a"), Some("b"), true),
        ];
        for (sent_now, yielding, next, afresh) in cases {
            assert_eq!(
                yielder(&sent(sent_now), yielding),
                (next.map(str::to_owned), afresh),
                "{sent_now:?} {yielding:?}"
            );
        }
    }

    #[test]
    fn the_least_wait_is_of_the_last_two_windows() {
        // A clock 50 ms ahead of the server's: every wait reads 50 ms
        // more, and only what exceeds the least counts.
        let mut y = Yielding::new(0);
        for (wait, at) in [(51, 1), (53, 2)] {
            y.waited(wait);
            y.tick(at * YIELD_TICK_MS, 1_000.0);
            assert_eq!(y.cap(), None);
        }
        // Two windows on, the 51 is forgotten.
        y.tick(YIELD_WINDOW_MS, 1_000.0);
        y.tick(2 * YIELD_WINDOW_MS, 1_000.0);
        for (wait, cap) in [(60, None), (64, None), (65, Some(700))] {
            y.waited(wait);
            y.tick(2 * YIELD_WINDOW_MS + 1, 1_000.0);
            assert_eq!(y.cap(), cap, "{wait}");
        }
    }

    #[test]
    fn a_yielding_organization_is_held_to_its_cap_with_a_short_burst() {
        let mut s = Scheduler::new(64, NONE);
        s.set_yield(Some(("burst".into(), 100)));
        // A tenth of a second's burst (10), then one every 10 ms.
        let sent = (0..20)
            .filter(|_| s.arrive("burst", 0, 0) == Decision::Send)
            .count();
        assert_eq!(sent, 10);
        assert_eq!(s.arrive("burst", 0, 0), Decision::Hold(Why::Behind));
        assert_eq!(s.arrive("quiet", 0, 0), Decision::Send);
        for _ in 0..10 {
            s.done("burst", 5);
        }
        assert_eq!(s.releases(64, 15), vec![("burst".into(), 1)]);
        assert_eq!(
            s.sent(YIELD_OTHERS_WITHIN_MS, 20),
            vec![("burst".into(), 11), ("quiet".into(), 1)]
        );
        assert_eq!(
            s.sent(YIELD_OTHERS_WITHIN_MS, 20),
            vec![("burst".into(), 0), ("quiet".into(), 0)]
        );
        // Its own lower rate still holds.
        s.set_limits(
            "burst",
            Some(Limits {
                in_flight: None,
                per_second: Some(20),
            }),
        );
        assert_eq!(s.rate_of("burst", s.limits("burst")).unwrap().1, Why::Rate);
        s.set_yield(None);
        assert_eq!(s.yielding(), None);
    }
}
