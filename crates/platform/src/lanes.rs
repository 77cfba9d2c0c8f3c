//! Lanes (the rules: `core::lanes`): a bursting organization's messages are
//! read by a consumer of their own, so that a stage's main consumer goes on
//! with everybody else's at once.
//!
//! - [`Lanes::main`] wraps a stage's handler for its main consumer: a
//!   message in a lane is acked unread (the lane works it); one of an
//!   organization that makes most of a large backlog (or, in the matcher,
//!   is far behind downstream) opens a lane from that message on.
//! - [`Lanes::run`] works every open lane on every replica (one durable
//!   consumer per lane, shared), closes a lane caught up for a while, and
//!   removes it once everything before its end is worked.
//! - Lane records live in the KV bucket `herald-lanes`, followed by a watch;
//!   a view is read again (the stream's last sequence first) before it
//!   decides a message past what it is current for. When the view cannot be
//!   read, both sides work the message: a duplicate publish is kept once by
//!   its message id, a skipped message would be lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, Message, consumer, kv};
use futures::StreamExt;
use herald_core::lanes::{self, Known, Lane, Open, Owner};
use herald_core::names;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::worker::{Disposition, Handler, Settle, Spec, Worker};
use crate::{dead_letters, nats};

/// The organizations of the last this many messages the main consumer read
/// give each one's share.
const RECENT: usize = 256;
/// Messages of one paced lane worked at once on a replica.
const LANE_CONCURRENCY: usize = 64;
/// How often a lane looks at its consumer (to close, or to go).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often ingest counts the work waiting downstream (the matcher's
/// lanes' events). A budget of 1,000 a count lets ingest's lane go up to 4,000 events a
/// second. Counted every 50 ms instead (up to 20,000 a second), the lane
/// competes for the cores ingest's main consumer needs to read past a
/// burst while it is being published: another organization's p99 beside a
/// 30,000-event burst was 155 and 420 ms in two runs, against 74–216 ms in
/// four at 250 ms.
const COUNT_EVERY: Duration = Duration::from_millis(250);
/// How often the matcher counts its organizations' delivery jobs waiting to
/// be sent. Its lane's budget (500 a count) is what another organization's
/// next job may find in front of it in `HERALD_DELIVERIES`; counted every
/// 250 ms, and not budgeted, the lane sent 500–2,000 at a time, and others'
/// jobs waited 40–230 ms behind them (docs/benchmarks.md).
const DELIVERIES_COUNT_EVERY: Duration = Duration::from_millis(100);
/// The least time between two reads of a lane's record (see
/// [`Lanes::refresh_for`]).
const REFRESH_SPACING: Duration = Duration::from_millis(5);
/// A lane opens only while another organization had a message within this
/// long: alone, an organization's burst delays nobody else, and a lane
/// would only cost it (a second consumer, an ack more per message).
const OTHERS_WITHIN: Duration = Duration::from_secs(10);
/// How long a paced lane waits before looking again.
const PACE_WAIT: Duration = Duration::from_millis(100);
/// How long a diversion may go on without an open lane before it is ended
/// ([`Lanes::mend_diversion`]): longer than a replica takes to hear of a
/// lane just opened.
const STRAY_AFTER: Duration = Duration::from_secs(3);

/// Where a stage reads: its stream, the subject of one organization's
/// messages there, and the rule for its lanes.
#[derive(Clone, Copy)]
pub struct Stage {
    /// `ingest`, `matcher`: the records' and consumers' prefix.
    pub name: &'static str,
    pub stream: &'static str,
    /// The subjects of one organization's messages (a filter).
    pub subjects: fn(&str) -> String,
    pub rule: Open,
    /// The stage before this one, whose open lanes open one here too.
    pub after: Option<&'static str>,
    /// The stage after this one, whose lanes' backlogs pace this one's
    /// ([`Downstream::accepted`]).
    pub next: Option<&'static str>,
    /// Whether a lane's messages are diverted while it is open (the
    /// stream's subject transform, one organization at a time; see
    /// [`lanes::diverted_subjects`]): the main consumer, filtered to
    /// [`Stage::main_filter`], then never reads them.
    pub diverts: bool,
}

impl Stage {
    /// The main consumer's filter with lanes on: what is not diverted.
    pub fn main_filter(&self) -> &'static str {
        if self.diverts {
            names::EVENTS_SUBJECTS
        } else {
            ""
        }
    }
}

/// Whether the stages read with lanes (on by default).
pub const LANES: &str = "HERALD_LANES";

/// Ingest's lanes: `herald.events.<org>.>`.
pub const INGEST: Stage = Stage {
    name: names::INGEST_CONSUMER,
    stream: names::EVENTS_STREAM,
    subjects: |org| format!("herald.events.{org}.>"),
    rule: Open::INGEST,
    after: None,
    next: Some(names::MATCHER_CONSUMER),
    diverts: true,
};

/// The matcher's lanes: `herald.accepted.<org>`, paced by the
/// organization's delivery jobs not yet sent ([`Downstream::deliveries`]).
pub const MATCHER: Stage = Stage {
    name: names::MATCHER_CONSUMER,
    stream: names::ACCEPTED_STREAM,
    subjects: names::accepted_subject,
    rule: Open::MATCHER,
    after: Some(names::INGEST_CONSUMER),
    next: None,
    diverts: false,
};

/// The organization of a message on `herald.<kind>.<org>[.…]`.
fn org_of(subject: &str) -> Option<&str> {
    subject
        .split('.')
        .nth(2)
        .filter(|org| names::valid_org(org))
}

#[derive(Clone)]
pub struct Lanes {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    kv: kv::Store,
    stage: Stage,
    /// What this replica knows of each organization's lane, with the
    /// record's revision.
    view: Mutex<HashMap<String, (Known, u64)>>,
    /// One refresh at a time, and when the last began.
    refreshing: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    recent: Mutex<Recent>,
    /// The organizations with a lane open in the stage before this one.
    upstream: Mutex<std::collections::HashSet<String>>,
    downstream: Option<Downstream>,
    opened: Counter,
    closed: Counter,
    open_now: Gauge,
}

#[derive(Default)]
struct Recent {
    orgs: VecDeque<String>,
    counts: HashMap<String, u64>,
    /// The last two organizations seen, most recent first, and when.
    latest: Vec<(String, tokio::time::Instant)>,
}

impl Recent {
    /// Whether an organization other than `org` had a message within
    /// [`OTHERS_WITHIN`]: there is someone for a lane to keep the burst
    /// away from.
    fn others_active(&self, org: &str) -> bool {
        self.latest
            .iter()
            .find(|(o, _)| o != org)
            .is_some_and(|(_, at)| at.elapsed() < OTHERS_WITHIN)
    }

    /// Notes that `org` had a message now.
    fn seen(&mut self, org: &str) {
        let now = tokio::time::Instant::now();
        match self.latest.first_mut() {
            Some((first, at)) if first == org => *at = now,
            _ => {
                self.latest.insert(0, (org.to_owned(), now));
                self.latest.truncate(2);
            }
        }
    }

    /// Notes `org` among the recent messages and answers its share of them.
    fn note(&mut self, org: &str) -> u64 {
        self.orgs.push_back(org.to_owned());
        *self.counts.entry(org.to_owned()).or_default() += 1;
        if self.orgs.len() > RECENT
            && let Some(old) = self.orgs.pop_front()
            && let Some(n) = self.counts.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&old);
            }
        }
        lanes::share(
            self.counts.get(org).copied().unwrap_or(0),
            self.orgs.len() as u64,
        )
    }
}

impl Lanes {
    /// Opens (or makes) the bucket and follows this stage's records.
    pub async fn start(
        js: &jetstream::Context,
        replicas: usize,
        stage: Stage,
        downstream: Option<Downstream>,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<Self, nats::Error> {
        let kv = nats::retry(shutdown, || async {
            match js.get_key_value(lanes::BUCKET).await {
                Ok(kv) => Ok(kv),
                Err(_) => {
                    js.create_key_value(kv::Config {
                        bucket: lanes::BUCKET.into(),
                        description: "Herald: organizations read beside the others (lanes)".into(),
                        history: 1,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                }
            }
        })
        .await
        .map_err(|e| nats::Error::Consumer {
            consumer: lanes::BUCKET.into(),
            message: e.to_string(),
        })?;
        let lanes = Self {
            inner: Arc::new(Inner {
                js: js.clone(),
                kv,
                stage,
                view: Mutex::default(),
                refreshing: tokio::sync::Mutex::default(),
                recent: Mutex::default(),
                upstream: Mutex::default(),
                downstream,
                opened: health.counter(
                    "lanes_opened",
                    "Lanes opened: an organization's burst read beside the others' messages",
                ),
                closed: health.counter("lanes_closed", "Lanes worked to their end and removed"),
                open_now: health.gauge("lanes_open", "Lanes open now"),
            }),
        };
        tokio::spawn(lanes.clone().follow(shutdown.clone()));
        Ok(lanes)
    }

    /// Works the stage's main consumer with `worker` (`handler`, up to
    /// `concurrency` at once) and its lanes beside it, until `shutdown`;
    /// returns once both have finished what they had started.
    pub async fn each<H: Handler>(
        self,
        worker: Worker,
        handler: Arc<H>,
        concurrency: usize,
        shutdown: &CancellationToken,
    ) {
        let (spec, settle) = (worker.spec().clone(), worker.settler());
        let lanes = self
            .clone()
            .run(handler.clone(), spec, settle, concurrency, shutdown.clone());
        let main = worker.each(self.main(handler), concurrency, shutdown);
        tokio::join!(main, lanes);
    }

    /// The stage's handler for its main consumer.
    pub fn main<H: Handler>(&self, handler: Arc<H>) -> Arc<MainSide<H>> {
        Arc::new(MainSide {
            lanes: self.clone(),
            inner: handler,
        })
    }

    fn prefix(&self) -> String {
        format!("{}.", self.inner.stage.name)
    }

    /// Follows the records of this stage into the view (and the stage
    /// before's, into `upstream`).
    async fn follow(self, shutdown: CancellationToken) {
        loop {
            let watch = self.inner.kv.watch_with_history(">").await;
            let mut watch = match watch {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!(%error, "cannot follow the lanes; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => self.seen(&entry),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "lanes watch");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// A record (or its removal) as the watch or a read saw it.
    fn seen(&self, entry: &kv::Entry) {
        let Some(org) = entry.key.strip_prefix(&self.prefix()) else {
            self.seen_other(entry);
            return;
        };
        let lane = match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Lane>(&entry.value) {
                Ok(lane) => Some(lane),
                Err(error) => {
                    tracing::warn!(%error, key = %entry.key, "unreadable lane record; ignored");
                    return;
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => None,
        };
        self.learn(org, lane, entry.revision, None);
    }

    /// A record of another stage: an open lane in the stage before this
    /// one is a reason to open one here; a lane in the stage after it is
    /// what paces this one's ([`Downstream::accepted`]).
    fn seen_other(&self, entry: &kv::Entry) {
        let stage = self.inner.stage;
        let org_in = |other: Option<&str>| {
            other
                .and_then(|other| entry.key.strip_prefix(other))
                .and_then(|key| key.strip_prefix('.'))
        };
        let lane = (entry.operation == kv::Operation::Put)
            .then(|| serde_json::from_slice::<Lane>(&entry.value).ok())
            .flatten();
        if let Some(org) = org_in(stage.after) {
            let mut upstream = self.inner.upstream.lock().expect("upstream");
            if lane.is_some_and(|l| l.until.is_none()) {
                upstream.insert(org.to_owned());
            } else {
                upstream.remove(org);
            }
        }
        if let Some(org) = org_in(stage.next)
            && let Some(downstream) = &self.inner.downstream
        {
            downstream.next_lane(org, lane.map(|l| l.from));
        }
    }

    /// Puts what was read into the view unless the view knows a later
    /// revision. `through`: the stream's last sequence read before the
    /// record, when it was read so; a record heard of otherwise is current
    /// for nothing until read again.
    fn learn(&self, org: &str, lane: Option<Lane>, revision: u64, through: Option<u64>) {
        let mut view = self.inner.view.lock().expect("lanes view");
        let known = view.get(org).copied();
        if known.is_some_and(|(_, r)| r > revision) {
            return;
        }
        let through = through.unwrap_or_else(|| match known {
            // The same record: what the view was current for still holds.
            Some((k, r)) if r == revision && k.lane == lane => k.through,
            _ => 0,
        });
        match lane {
            Some(lane) => {
                view.insert(
                    org.to_owned(),
                    (
                        Known {
                            lane: Some(lane),
                            through,
                        },
                        revision,
                    ),
                );
            }
            None => {
                view.remove(org);
            }
        }
        self.inner
            .open_now
            .set(view.values().filter(|(k, _)| k.lane.is_some()).count() as i64);
    }

    /// Makes the view current for message `seq` of `org`: one refresh at a
    /// time, at most one per [`REFRESH_SPACING`]. The messages of a lane's
    /// organization that arrive meanwhile wait for the next, which covers
    /// them all; a trickle of them costs a few reads a second, not one
    /// each. `through`: a stream sequence known to be stored before now
    /// (the message's own sequence plus the messages its consumer had
    /// pending after it), so the record is all there is to read.
    async fn refresh_for(
        &self,
        org: &str,
        seq: u64,
        through: u64,
    ) -> Result<(), async_nats::Error> {
        let mut last = self.inner.refreshing.lock().await;
        // A refresh made while this one waited may have covered it.
        if self
            .known(org)
            .is_none_or(|(known, _)| known.decides(seq, crate::now_ms()) != Owner::Refresh)
        {
            return Ok(());
        }
        if let Some(at) = *last {
            tokio::time::sleep_until(at + REFRESH_SPACING).await;
        }
        *last = Some(tokio::time::Instant::now());
        self.refresh(org, Some(through)).await
    }

    /// Reads `org`'s record again, after the stream's last sequence
    /// (`through`, when one stored before now is known already: a view is
    /// current for every message up to a sequence the stream held before
    /// the record was read, and one taken from a message in hand is such a
    /// sequence, at no cost).
    async fn refresh(&self, org: &str, through: Option<u64>) -> Result<(), async_nats::Error> {
        let through = match through {
            Some(through) => through,
            None => {
                let stream = self.inner.js.get_stream(self.inner.stage.stream).await?;
                stream.cached_info().state.last_sequence
            }
        };
        let key = lanes::key(self.inner.stage.name, org);
        match self.inner.kv.entry(&key).await? {
            Some(entry) => {
                let mut lane = match entry.operation {
                    kv::Operation::Put => Some(serde_json::from_slice::<Lane>(&entry.value)?),
                    _ => None,
                };
                let mut revision = entry.revision;
                // An open lane whose promise the stream has outgrown is
                // made to promise more (anyone may: a close keeps it), so
                // the messages after this one need no read of their own.
                // Written by somebody else meanwhile, what was read still
                // holds up to `through`.
                if let Some(open) = lane
                    && through >= open.promised
                    && let Some(renewed) = open.renewed(
                        through,
                        Lane::margin(through.saturating_sub(open.promised.max(open.from))),
                        crate::now_ms(),
                    )
                    && let Ok(value) = serde_json::to_vec(&renewed)
                    && let Ok(written) = self.inner.kv.update(&key, value.into(), revision).await
                {
                    (lane, revision) = (Some(renewed), written);
                }
                self.learn(org, lane, revision, Some(through));
            }
            None => {
                self.inner.view.lock().expect("lanes view").remove(org);
            }
        }
        Ok(())
    }

    /// Whose message `seq` of `org` is (`through`: see
    /// [`Lanes::refresh_for`]), reading the record again when the view may
    /// be too old for it. `Owner::Refresh`: it could not be read.
    async fn owner(&self, org: &str, seq: u64, through: u64) -> Owner {
        for _ in 0..2 {
            let known = self
                .inner
                .view
                .lock()
                .expect("lanes view")
                .get(org)
                .map(|(k, _)| *k);
            let Some(known) = known else {
                return Owner::Main;
            };
            match known.decides(seq, crate::now_ms()) {
                Owner::Refresh => {
                    if let Err(error) = self.refresh_for(org, seq, through).await {
                        tracing::warn!(%error, org, "cannot read the lane; the message is worked here");
                        return Owner::Refresh;
                    }
                }
                owner => return owner,
            }
        }
        Owner::Refresh
    }

    /// Opens a lane for `org` from `seq` on, promising to go on past the
    /// `pending` messages behind it; false when one could not be made
    /// (another replica's may have been: the view is read again).
    async fn open(&self, org: &str, seq: u64, pending: u64) -> bool {
        let lane = Lane::opened(seq)
            .renewed(seq + pending, lanes::LEAST_PROMISE, crate::now_ms())
            .expect("a lane just opened promises");
        let key = lanes::key(self.inner.stage.name, org);
        let value = serde_json::to_vec(&lane).expect("a lane serializes");
        // The stream's configuration is read while the record is created:
        // every round trip before the transform is a few thousand of a
        // burst's events more for the main consumer to read through.
        let diversion = async {
            if self.inner.stage.diverts {
                Some(self.diversion().await)
            } else {
                None
            }
        };
        let (created, diversion) =
            tokio::join!(self.inner.kv.create(&key, value.into()), diversion);
        match created {
            Ok(revision) => {
                // Current up to `seq` at least: a close comes later.
                self.learn(org, Some(lane), revision, Some(seq));
                self.inner.opened.inc();
                tracing::info!(
                    stage = self.inner.stage.name,
                    org,
                    from = seq,
                    "lane opened"
                );
                if let Some(diversion) = diversion {
                    self.divert(org, diversion).await;
                }
                true
            }
            Err(error) => {
                if error.kind() != kv::CreateErrorKind::AlreadyExists {
                    tracing::warn!(%error, org, "cannot open a lane");
                }
                let _ = self.refresh(org, None).await;
                false
            }
        }
    }

    /// Whether `org` gets a lane now, the message in hand having `pending`
    /// behind it in the main consumer.
    fn should_open(&self, org: &str, pending: u64) -> bool {
        let rule = self.inner.stage.rule;
        let (share, others) = {
            let mut recent = self.inner.recent.lock().expect("recent");
            recent.seen(org);
            // Shares matter only behind a backlog that may open a lane.
            let share = if pending >= rule.backlog {
                recent.note(org)
            } else {
                0
            };
            (share, recent.others_active(org))
        };
        let downstream = self.downstream(org);
        let upstream = self.inner.upstream.lock().expect("upstream").contains(org);
        others && rule.now(pending, share, downstream, upstream)
    }

    fn downstream(&self, org: &str) -> u64 {
        self.inner.downstream.as_ref().map_or(0, |d| d.of(org))
    }

    /// Whether a paced lane of `org` may work its next message now.
    fn may_go(&self, org: &str) -> bool {
        let rule = self.inner.stage.rule;
        match &self.inner.downstream {
            Some(downstream) => downstream.take(org, rule.downstream),
            None => true,
        }
    }

    /// Works every open lane until `shutdown`: on every replica, a worker
    /// per lane on its shared consumer, running `handler` as the main
    /// consumer would (settled with `settle`, within `spec`'s limits).
    pub async fn run<H: Handler>(
        self,
        handler: Arc<H>,
        spec: Spec,
        settle: Settle,
        concurrency: usize,
        shutdown: CancellationToken,
    ) {
        let mut running: HashMap<(String, u64), CancellationToken> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let (mut stray, mut mended) = (None, tokio::time::Instant::now());
        loop {
            if mended.elapsed() >= CHECK_EVERY {
                self.mend_diversion(&mut stray).await;
                mended = tokio::time::Instant::now();
            }
            let open: Vec<(String, u64)> = self
                .inner
                .view
                .lock()
                .expect("lanes view")
                .iter()
                .filter_map(|(org, (k, _))| k.lane.map(|l| (org.clone(), l.from)))
                .collect();
            running.retain(|lane, token| {
                let keep = open.contains(lane);
                if !keep {
                    token.cancel();
                }
                keep
            });
            for lane in open {
                if running.contains_key(&lane) {
                    continue;
                }
                let token = shutdown.child_token();
                running.insert(lane.clone(), token.clone());
                let side = Arc::new(LaneSide {
                    lanes: self.clone(),
                    inner: handler.clone(),
                    stop: token.clone(),
                });
                let work = self.clone().work(
                    lane.clone(),
                    side,
                    (spec.clone(), concurrency),
                    settle.clone(),
                    token,
                );
                tasks.spawn(async move {
                    work.await;
                    lane
                });
            }
            // A lane whose worker ended while its record is still there (its
            // consumer could not be read, or removing it failed) is taken
            // up again.
            while let Some(done) = tasks.try_join_next() {
                if let Ok(lane) = done {
                    running.remove(&lane);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// One lane on this replica: its worker, and a look at its consumer
    /// every second to close the lane once caught up, and to remove it once
    /// everything before its end is worked.
    async fn work<H: Handler>(
        self,
        (org, from): (String, u64),
        side: Arc<LaneSide<H>>,
        (spec, concurrency): (Spec, usize),
        settle: Settle,
        token: CancellationToken,
    ) {
        let stage = self.inner.stage;
        let name = lanes::consumer_name(stage.name, &org, from);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subjects: if stage.diverts {
                vec![(stage.subjects)(&org), lanes::diverted_subjects(&org)]
            } else {
                vec![(stage.subjects)(&org)]
            },
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_ack_pending: spec.max_ack_pending,
            max_deliver: dead_letters::MAX_DELIVER,
            ..Default::default()
        };
        // A closed lane's consumer is never made again: one that is gone was
        // removed, its lane worked to the end (made again, it would work
        // the lane a second time from `from`). Only its record may be left.
        let closed = self
            .known(&org)
            .is_some_and(|(k, _)| k.lane.is_some_and(|l| l.until.is_some()));
        let consumer = if closed {
            let stream = self.inner.js.get_stream(stage.stream).await;
            match stream {
                Ok(stream) => match stream.get_consumer(&name).await {
                    Ok(consumer) => consumer,
                    Err(_) => {
                        self.remove(&org, &name).await;
                        return;
                    }
                },
                Err(_) => return,
            }
        } else {
            match nats::durable_consumer(&self.inner.js, stage.stream, config, &token).await {
                Ok(consumer) => consumer,
                Err(_) => return,
            }
        };
        // A paced lane holds messages in hand while it waits: they keep
        // their claim meanwhile.
        let mut spec = spec;
        if stage.rule.paces(u64::MAX) && spec.progress_every.is_none() {
            spec.progress_every = Some(spec.ack_wait / 3);
        }
        let worker = Worker::on(&self.inner.js, consumer.clone(), spec, settle);
        // A paced lane holds what it waits with in hand, so it pulls only
        // what it can start; one that is not goes as fast as the main
        // consumer would.
        let working = async {
            if stage.rule.paces(u64::MAX) {
                let slots = Arc::new(Semaphore::new(LANE_CONCURRENCY));
                worker.each_within(side, slots, &token).await
            } else {
                worker.each(side, concurrency, &token).await
            }
        };
        let watching = self.watch_lane(&org, from, consumer, &name, &token);
        tokio::join!(working, watching);
    }

    fn known(&self, org: &str) -> Option<(Known, u64)> {
        self.inner
            .view
            .lock()
            .expect("lanes view")
            .get(org)
            .copied()
    }

    async fn watch_lane(
        &self,
        org: &str,
        from: u64,
        mut consumer: consumer::Consumer<consumer::pull::Config>,
        name: &str,
        stop: &CancellationToken,
    ) {
        let mut idle_ms = 0i64;
        let mut last_seen: Option<u64> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let Some((
                Known {
                    lane: Some(lane), ..
                },
                revision,
            )) = self.known(org)
            else {
                stop.cancel();
                return;
            };
            if lane.from != from {
                stop.cancel();
                return;
            }
            let info = match consumer.info().await {
                Ok(info) => info.clone(),
                Err(error) => {
                    tracing::debug!(%error, org, "lane consumer info");
                    // Removed by another replica: the record may be left.
                    if lane.until.is_some() && self.remove(org, name).await {
                        stop.cancel();
                        return;
                    }
                    continue;
                }
            };
            let drained = info.num_pending == 0 && info.num_ack_pending == 0;
            match lane.until {
                None => {
                    let last = match self.last_sequence().await {
                        Ok(last) => last,
                        Err(error) => {
                            tracing::debug!(%error, org, "cannot read the stream's last sequence");
                            continue;
                        }
                    };
                    let grown = last.saturating_sub(*last_seen.get_or_insert(last));
                    last_seen = Some(last);
                    // Keeping up with what arrives: nothing to protect the
                    // others from any more.
                    idle_ms = if info.num_pending < lanes::CLOSE_BACKLOG {
                        idle_ms + CHECK_EVERY.as_millis() as i64
                    } else {
                        0
                    };
                    let now = crate::now_ms();
                    // A closing lane ends only once its events go back to
                    // the main consumer: nothing is diverted past its end.
                    if lane.closing && self.undivert(org).await.is_none() {
                        continue;
                    }
                    let change = if lane.closing {
                        lane.closed(last, now).map(|closed| (closed, "lane closed"))
                    } else if self.inner.stage.rule.closes(idle_ms, self.downstream(org)) {
                        Some((lane.closing(), "lane closing"))
                    } else {
                        lane.renewed(last, Lane::margin(grown), now)
                            .map(|renewed| (renewed, "lane renewed"))
                    };
                    if let Some((changed, what)) = change
                        && self.change(org, changed, revision, last, what).await
                        && changed.closing
                    {
                        self.undivert(org).await;
                    }
                }
                // Its consumer goes only while nothing of its organization is
                // diverted: one diverted past the end (a divert applied
                // late) is still read by it, and worked.
                Some(_) => {
                    if self.undivert(org).await == Some(false)
                        && lane.done(drained, info.ack_floor.stream_sequence)
                        && self.remove(org, name).await
                    {
                        stop.cancel();
                        return;
                    }
                }
            }
        }
    }

    /// The stage's stream's last sequence now.
    async fn last_sequence(&self) -> Result<u64, async_nats::Error> {
        let stream = self.inner.js.get_stream(self.inner.stage.stream).await?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Writes the lane's record changed (closed, or promising more), the
    /// stream's last sequence being `last`; a record changed meanwhile by
    /// another replica is read again instead.
    async fn change(&self, org: &str, changed: Lane, revision: u64, last: u64, what: &str) -> bool {
        let result: Result<(), async_nats::Error> = async {
            let key = lanes::key(self.inner.stage.name, org);
            let value = serde_json::to_vec(&changed)?;
            let revision = self.inner.kv.update(&key, value.into(), revision).await?;
            self.learn(org, Some(changed), revision, Some(last));
            if what != "lane renewed" {
                tracing::info!(
                    stage = self.inner.stage.name,
                    org,
                    from = changed.from,
                    until = changed.until,
                    "{what}"
                );
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => true,
            Err(error) => {
                // Another replica changed it, or NATS is away: looked at again.
                tracing::debug!(%error, org, "{what}: not now");
                let _ = self.refresh(org, None).await;
                false
            }
        }
    }

    /// Diverts `org`'s events to its lane's own subjects
    /// ([`lanes::diverted_subjects`]) if this stage diverts and the
    /// stream's transform is free (another organization's lane may hold
    /// it: then this lane's messages are skipped by the main consumer
    /// as before). Only the replica that opened the lane, just after:
    /// a replica that had not heard of the lane closing yet could
    /// otherwise divert past its end. `diversion` is the stream's
    /// configuration, read while the lane's record was being created.
    async fn divert(
        &self,
        org: &str,
        diversion: Result<(jetstream::stream::Config, Option<String>), async_nats::Error>,
    ) {
        let stage = self.inner.stage;
        if !stage.diverts {
            return;
        }
        let result: Result<bool, async_nats::Error> = async {
            let (mut config, _) = diversion?;
            if config.subject_transform.is_some() {
                return Ok(false);
            }
            config.subject_transform = Some(jetstream::stream::SubjectTransform {
                source: (stage.subjects)(org),
                destination: lanes::diverted_subjects(org),
            });
            self.inner.js.update_stream(&config).await?;
            Ok(true)
        }
        .await;
        match result {
            Ok(true) => tracing::info!(org, "lane's events diverted"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, org, "cannot divert a lane's events"),
        }
    }

    /// The stage's stream's configuration now, and the organization whose
    /// events its transform diverts, if any.
    async fn diversion(
        &self,
    ) -> Result<(jetstream::stream::Config, Option<String>), async_nats::Error> {
        // One request: the stream's info comes with it.
        let stream = self.inner.js.get_stream(self.inner.stage.stream).await?;
        let config = stream.cached_info().config.clone();
        let org = config
            .subject_transform
            .as_ref()
            .and_then(|t| lanes::diverted_org(&t.source))
            .map(str::to_owned);
        Ok((config, org))
    }

    /// Ends the diversion of `org`'s events, if the stream has it: once it
    /// has none, whether there was one to end (`None`: it could not be
    /// looked at or ended).
    async fn undivert(&self, org: &str) -> Option<bool> {
        let stage = self.inner.stage;
        if !stage.diverts {
            return Some(false);
        }
        let result: Result<bool, async_nats::Error> = async {
            let (mut config, diverted) = self.diversion().await?;
            let ours = diverted.as_deref() == Some(org);
            if ours {
                config.subject_transform = None;
                self.inner.js.update_stream(&config).await?;
                tracing::info!(org, "lane's events no longer diverted");
            }
            Ok(ours)
        }
        .await;
        match result {
            Ok(ended) => Some(ended),
            Err(error) => {
                tracing::warn!(%error, org, "cannot end a lane's diversion");
                None
            }
        }
    }

    /// A diversion whose organization has had no open lane for
    /// [`STRAY_AFTER`] (its record was removed by hand, or a divert was
    /// applied after the lane closed): ended, so the main consumer sees
    /// the organization's events again, and logged as an error.
    async fn mend_diversion(&self, stray: &mut Option<(String, tokio::time::Instant)>) {
        if !self.inner.stage.diverts {
            return;
        }
        let Ok((_, diverted)) = self.diversion().await else {
            return;
        };
        let Some(org) = diverted else {
            *stray = None;
            return;
        };
        let live = self
            .known(&org)
            .is_some_and(|(k, _)| k.lane.is_some_and(|l| !l.closing && l.until.is_none()));
        if live {
            *stray = None;
            return;
        }
        match stray {
            Some((o, since)) if *o == org => {
                if since.elapsed() >= STRAY_AFTER && self.undivert(&org).await.is_some() {
                    tracing::error!(
                        org,
                        "a diversion outlived its lane; ended (events diverted after the lane's \
                         consumer was removed are read by no consumer: see docs/ARCHITECTURE.md, Lanes)"
                    );
                    *stray = None;
                }
            }
            _ => *stray = Some((org, tokio::time::Instant::now())),
        }
    }

    /// Everything before the lane's end is worked: its consumer goes, then
    /// its record (never the other way round: a record without its
    /// consumer is only removed, a consumer is never left without one).
    /// False when either could not be removed now.
    async fn remove(&self, org: &str, name: &str) -> bool {
        let stream = self.inner.stage.stream;
        match self
            .inner
            .js
            .delete_consumer_from_stream(name, stream)
            .await
        {
            Ok(_) => {}
            Err(error) if error.to_string().contains("not found") => {}
            Err(error) => {
                tracing::warn!(%error, org, "cannot remove a lane's consumer");
                return false;
            }
        }
        let key = lanes::key(self.inner.stage.name, org);
        let removed = match self.inner.kv.delete(&key).await {
            Ok(()) => {
                self.inner.closed.inc();
                tracing::info!(stage = self.inner.stage.name, org, "lane worked to its end");
                true
            }
            Err(error) => {
                tracing::warn!(%error, org, "cannot remove a lane record");
                false
            }
        };
        let _ = self.refresh(org, None).await;
        removed
    }
}

/// The main consumer's handler: a lane's messages are acked unread.
pub struct MainSide<H> {
    lanes: Lanes,
    inner: Arc<H>,
}

/// A message's organization and stream sequence, and the messages its
/// consumer had pending after it (so the stream held at least `seq +
/// pending` messages before it was delivered).
fn position(message: &Message) -> Option<(&str, u64, u64)> {
    let info = message.info().ok()?;
    Some((
        org_of(&message.subject)?,
        info.stream_sequence,
        info.pending,
    ))
}

impl<H: Handler> Handler for MainSide<H> {
    async fn handle(&self, message: &Message) -> Disposition {
        if let Some((org, seq, pending)) = position(message) {
            match self.lanes.owner(org, seq, seq + pending).await {
                Owner::Lane => return Disposition::Ack,
                // Could not be read: worked here too.
                Owner::Main | Owner::Refresh => {}
            }
            let downstream = self.lanes.inner.downstream.as_ref();
            if let Some(downstream) = downstream {
                downstream.learn(org).await;
            }
            if self.lanes.should_open(org, pending) && self.lanes.open(org, seq, pending).await {
                return Disposition::Ack;
            }
            if let Some(downstream) = downstream {
                downstream.in_hand(org);
            }
        }
        self.inner.handle(message).await
    }

    fn in_order(&self) -> Option<&crate::worker::InOrder> {
        self.inner.in_order()
    }

    fn unread(&self, message: &Message) -> bool {
        position(message).is_some_and(|(org, seq, _)| {
            self.lanes
                .known(org)
                .is_some_and(|(known, _)| known.decides(seq, crate::now_ms()) == Owner::Lane)
        })
    }

    async fn exhausted(&self, message: &Message, delivered: i64) -> Disposition {
        if let Some((org, seq, pending)) = position(message)
            && self.lanes.owner(org, seq, seq + pending).await == Owner::Lane
        {
            return Disposition::Ack;
        }
        self.inner.exhausted(message, delivered).await
    }
}

/// `message` under the subject it was published to, if it was stored
/// diverted ([`lanes::undiverted`]): ingest works it as any other.
pub fn published(message: &Message) -> std::borrow::Cow<'_, Message> {
    match lanes::undiverted(&message.subject) {
        Some(subject) => {
            let mut published = message.clone();
            published.message.subject = subject.into();
            std::borrow::Cow::Owned(published)
        }
        None => std::borrow::Cow::Borrowed(message),
    }
}

/// A lane's handler: what is the main consumer's again (past the lane's
/// end) is acked unread; the rest is worked, paced when the stage says so.
pub struct LaneSide<H> {
    lanes: Lanes,
    inner: Arc<H>,
    /// The lane's worker stops (shutdown, or the lane is gone).
    stop: CancellationToken,
}

/// What a lane does with a message it was given.
enum Turn {
    /// The main consumer's (past the lane's end): acked unread.
    Skip,
    Work,
    /// Stopped while paced: handed back, worked after the restart.
    Later,
}

impl<H: Handler> LaneSide<H> {
    async fn turn(&self, message: &Message) -> Turn {
        let Some((org, seq, pending)) = position(message) else {
            return Turn::Work;
        };
        // Diverted: the main consumer never reads it, so it is the lane's
        // wherever the lane ends.
        let owner = if message.subject.starts_with(lanes::DIVERTED_PREFIX) {
            Owner::Lane
        } else {
            self.lanes.owner(org, seq, seq + pending).await
        };
        match owner {
            Owner::Main => Turn::Skip,
            // Could not be read: worked here too.
            Owner::Lane | Owner::Refresh => {
                while !self.lanes.may_go(org) {
                    tokio::select! {
                        _ = self.stop.cancelled() => return Turn::Later,
                        _ = tokio::time::sleep(PACE_WAIT) => {}
                    }
                }
                Turn::Work
            }
        }
    }
}

impl<H: Handler> Handler for LaneSide<H> {
    fn in_order(&self) -> Option<&crate::worker::InOrder> {
        self.inner.in_order()
    }

    async fn handle(&self, message: &Message) -> Disposition {
        match self.turn(message).await {
            Turn::Skip => Disposition::Ack,
            Turn::Later => Disposition::HandBack(Duration::ZERO),
            Turn::Work => self.inner.handle(message).await,
        }
    }

    async fn exhausted(&self, message: &Message, delivered: i64) -> Disposition {
        match self.turn(message).await {
            Turn::Skip => Disposition::Ack,
            Turn::Later => Disposition::HandBack(Duration::ZERO),
            Turn::Work => self.inner.exhausted(message, delivered).await,
        }
    }
}

/// Each organization's work waiting downstream, counted now and then: for
/// the matcher (every [`DELIVERIES_COUNT_EVERY`]), its delivery jobs not yet
/// sent (`HERALD_DELIVERIES`, and those held back in `HERALD_HELD`); for
/// ingest (every [`COUNT_EVERY`]),
/// its accepted events the matcher's lane has not matched yet. A paced lane
/// is budgeted: between two counts it takes no more than the count left
/// room for under its mark, so the work comes evenly rather than a count's
/// interval worth at once. The matcher's main consumer also counts, between
/// counts, the jobs each event it takes in hand will store (its
/// organization's last fan-out, [`Downstream::matched`]), so that a
/// fan-out's flood opens a lane before the next count sees it.
#[derive(Clone)]
pub struct Downstream {
    counts: Arc<Mutex<Counts>>,
    kind: Kind,
    /// Ingest's: the matcher's lanes (organization → the lane's `from`),
    /// as the watch of the lanes' records heard of them.
    next_lanes: Arc<Mutex<HashMap<String, u64>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Deliveries,
    Accepted,
}

impl Kind {
    fn every(self) -> Duration {
        match self {
            Kind::Deliveries => DELIVERIES_COUNT_EVERY,
            Kind::Accepted => COUNT_EVERY,
        }
    }
}

#[derive(Default)]
struct Counts {
    /// The last count.
    counted: HashMap<String, u64>,
    /// Messages a paced lane took here since (a budget spent).
    taken: HashMap<String, u64>,
    /// Delivery jobs the matcher's main consumer took in hand since (each
    /// event as many as its organization's last fan-out).
    in_hand: HashMap<String, u64>,
    /// Each organization's last fan-out (kept across counts).
    fan_out: HashMap<String, u64>,
    /// Organizations whose first event is being matched, to learn their
    /// fan-out: their other events wait for it ([`Downstream::learn`]).
    learning: HashMap<String, Arc<Notify>>,
}

/// How long the main consumer's events of an organization whose fan-out is
/// not known yet wait for its first one to be matched.
const LEARN_WITHIN: Duration = Duration::from_millis(50);

impl Downstream {
    /// The matcher's: each organization's delivery jobs not yet sent.
    pub fn deliveries(js: &jetstream::Context, shutdown: &CancellationToken) -> Self {
        Self::start(js, shutdown, Kind::Deliveries)
    }

    /// Ingest's: each organization's accepted events waiting in the
    /// matcher's lane (an organization without one has none: the matcher
    /// keeps up with it). An ingest lane paced by it turns a burst into
    /// accepted events no faster than the matcher's lane takes them, so
    /// the matcher's main consumer never has thousands of the burst's to
    /// skip before another organization's event.
    pub fn accepted(js: &jetstream::Context, shutdown: &CancellationToken) -> Self {
        Self::start(js, shutdown, Kind::Accepted)
    }

    fn start(js: &jetstream::Context, shutdown: &CancellationToken, kind: Kind) -> Self {
        let downstream = Self {
            counts: Arc::default(),
            kind,
            next_lanes: Arc::default(),
        };
        let (js, shutdown, counting) = (js.clone(), shutdown.clone(), downstream.clone());
        tokio::spawn(async move {
            loop {
                let mut now = HashMap::new();
                counting.count(&js, &mut now).await;
                {
                    let mut counts = counting.counts.lock().expect("downstream");
                    counts.counted = now;
                    counts.taken.clear();
                    counts.in_hand.clear();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(counting.kind.every()) => {}
                }
            }
        });
        downstream
    }

    /// Counts into `now`.
    async fn count(&self, js: &jetstream::Context, now: &mut HashMap<String, u64>) {
        match self.kind {
            Kind::Deliveries => {
                for (stream, subjects) in [
                    (names::DELIVERIES_STREAM, names::DELIVERIES_SUBJECTS),
                    (herald_core::fairness::HELD_STREAM, "herald.held.>"),
                ] {
                    if let Err(error) = count(js, stream, subjects, now).await {
                        tracing::debug!(%error, stream, "cannot count the work downstream");
                    }
                }
            }
            Kind::Accepted => {
                let lanes: Vec<(String, u64)> = self
                    .next_lanes
                    .lock()
                    .expect("next lanes")
                    .iter()
                    .map(|(org, from)| (org.clone(), *from))
                    .collect();
                if lanes.is_empty() {
                    return;
                }
                match js.get_stream(MATCHER.stream).await {
                    Ok(stream) => {
                        for (org, from) in lanes {
                            let name = lanes::consumer_name(MATCHER.name, &org, from);
                            if let Ok(mut consumer) =
                                stream.get_consumer::<consumer::pull::Config>(&name).await
                                && let Ok(info) = consumer.info().await
                            {
                                *now.entry(org).or_default() += info.num_pending;
                            }
                        }
                    }
                    Err(error) => tracing::debug!(%error, "cannot count the matcher's lanes"),
                }
            }
        }
    }

    /// The next stage's lane of `org` starts at `from` (`None`: it has
    /// none).
    fn next_lane(&self, org: &str, from: Option<u64>) {
        let mut lanes = self.next_lanes.lock().expect("next lanes");
        match from {
            Some(from) => {
                lanes.insert(org.to_owned(), from);
            }
            None => {
                lanes.remove(org);
            }
        }
    }

    /// Takes one message of `org`'s budget, if the last count and what was
    /// taken since leave it under `limit`.
    fn take(&self, org: &str, limit: u64) -> bool {
        let mut counts = self.counts.lock().expect("downstream");
        let counted = counts.counted.get(org).copied().unwrap_or(0);
        let taken = counts.taken.entry(org.to_owned()).or_default();
        if counted + *taken < limit {
            *taken += 1;
            true
        } else {
            false
        }
    }

    /// An event of `org` matched `n` webhooks (the matcher's, main
    /// consumer or lane): its next events are taken to match as many.
    pub fn matched(&self, org: &str, n: u64) {
        let mut counts = self.counts.lock().expect("downstream");
        match counts.fan_out.get_mut(org) {
            Some(fan_out) => *fan_out = n,
            None => {
                counts.fan_out.insert(org.to_owned(), n);
                if let Some(learnt) = counts.learning.remove(org) {
                    learnt.notify_waiters();
                }
            }
        }
    }

    /// Before the matcher's main consumer decides on an event of `org`:
    /// while the organization's fan-out is not known (its first events
    /// since the matcher started), one is matched first and the others
    /// wait for it, up to [`LEARN_WITHIN`], so that they count as the jobs
    /// they will store. Without it, a fan-out's first 128 events (the
    /// matcher's concurrency) were all in hand before any was matched:
    /// 5,000 jobs of 40 webhooks in front of every other organization's.
    async fn learn(&self, org: &str) {
        if self.kind != Kind::Deliveries {
            return;
        }
        let learning = {
            let mut counts = self.counts.lock().expect("downstream");
            if counts.fan_out.contains_key(org) {
                return;
            }
            match counts.learning.get(org) {
                Some(learning) => learning.clone(),
                None => {
                    counts.learning.insert(org.to_owned(), Arc::default());
                    return;
                }
            }
        };
        let learnt = learning.notified();
        // Matched meanwhile: `learnt` would never hear of it.
        if self
            .counts
            .lock()
            .expect("downstream")
            .fan_out
            .contains_key(org)
        {
            return;
        }
        let _ = tokio::time::timeout(LEARN_WITHIN, learnt).await;
    }

    /// The main consumer took an event of `org` in hand: until the next
    /// count, the jobs it will store (as many as the organization's last
    /// fan-out) add to its work waiting downstream.
    fn in_hand(&self, org: &str) {
        let mut counts = self.counts.lock().expect("downstream");
        let Some(&n) = counts.fan_out.get(org) else {
            return;
        };
        *counts.in_hand.entry(org.to_owned()).or_default() += n;
    }

    /// `org`'s work waiting downstream, for whether it gets a lane and
    /// whether its lane may close: the last count, and what the main
    /// consumer took in hand since. (A fan-out of 300 events to 40
    /// webhooks stores 12,000 jobs in a fifth of a second: by the count
    /// alone, the main consumer had taken all of it in hand, up to its
    /// concurrency at once, before its lane opened.)
    fn of(&self, org: &str) -> u64 {
        let counts = self.counts.lock().expect("downstream");
        let of = |map: &HashMap<String, u64>| map.get(org).copied().unwrap_or(0);
        of(&counts.counted) + of(&counts.in_hand)
    }
}

/// Adds the messages on each organization's subjects of `stream` to
/// `counts`.
async fn count(
    js: &jetstream::Context,
    stream: &str,
    subjects: &str,
    counts: &mut HashMap<String, u64>,
) -> Result<(), async_nats::Error> {
    let stream = js.get_stream(stream).await?;
    let mut listed = stream.info_with_subjects(subjects).await?;
    while let Some(entry) = listed.next().await {
        let (subject, n) = entry?;
        if let Some(org) = org_of(&subject) {
            *counts.entry(org.to_owned()).or_default() += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_last_messages() {
        let mut recent = Recent::default();
        for _ in 0..RECENT {
            recent.note("a");
        }
        assert_eq!(recent.note("b"), 0);
        for _ in 0..RECENT / 2 {
            recent.note("b");
        }
        assert_eq!(recent.note("b"), 50);
        assert_eq!(recent.orgs.len(), RECENT);
        assert_eq!(recent.counts.values().sum::<u64>(), RECENT as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_is_for_when_others_are_about() {
        let mut recent = Recent::default();
        recent.seen("a");
        assert!(!recent.others_active("a"), "alone");
        recent.seen("b");
        recent.seen("a");
        assert!(recent.others_active("a"));
        assert!(recent.others_active("b"));
        tokio::time::advance(OTHERS_WITHIN).await;
        recent.seen("a");
        assert!(!recent.others_active("a"), "b is long gone");
    }

    #[test]
    fn a_budget_is_what_the_last_count_left_room_for() {
        let downstream = Downstream {
            counts: Arc::default(),
            kind: Kind::Accepted,
            next_lanes: Arc::default(),
        };
        downstream
            .counts
            .lock()
            .unwrap()
            .counted
            .insert("a".into(), 997);
        let taken = (0..10).filter(|_| downstream.take("a", 1_000)).count();
        assert_eq!(taken, 3, "room for 3 under 1,000");
        // Events the main consumer took in hand since the count will store
        // as many jobs as their organization's last fan-out: waiting too,
        // for a lane's opening.
        assert_eq!(downstream.of("a"), 997);
        downstream.in_hand("a");
        assert_eq!(downstream.of("a"), 997, "no fan-out known yet");
        downstream.matched("a", 40);
        downstream.in_hand("a");
        downstream.in_hand("a");
        assert_eq!(downstream.of("a"), 1_077);
        assert_eq!(downstream.of("b"), 0);
        assert_eq!((0..5).filter(|_| downstream.take("b", 4)).count(), 4);
        // A new count gives a new budget.
        *downstream.counts.lock().unwrap() = Counts::default();
        assert!(downstream.take("a", 1_000));
        assert_eq!(downstream.of("a"), 0, "the count has them now");
        downstream.next_lane("a", Some(7));
        assert_eq!(downstream.next_lanes.lock().unwrap().get("a"), Some(&7));
        downstream.next_lane("a", None);
        assert!(downstream.next_lanes.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_organizations_first_event_is_matched_before_the_others_are_counted() {
        let downstream = Downstream {
            counts: Arc::default(),
            kind: Kind::Deliveries,
            next_lanes: Arc::default(),
        };
        // The first goes at once; the next wait for its fan-out.
        downstream.learn("a").await;
        let waiting = {
            let d = downstream.clone();
            tokio::spawn(async move {
                d.learn("a").await;
                d.in_hand("a");
                d.of("a")
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for a's first match");
        downstream.matched("a", 40);
        assert_eq!(waiting.await.unwrap(), 40, "counted as 40 jobs");
        // Known: nobody waits.
        downstream.learn("a").await;
        // A first event never matched: the others go after LEARN_WITHIN.
        downstream.learn("b").await;
        let started = tokio::time::Instant::now();
        downstream.learn("b").await;
        assert_eq!(started.elapsed(), LEARN_WITHIN);
        // Ingest's counts have no fan-out: nothing waits.
        let accepted = Downstream {
            kind: Kind::Accepted,
            ..downstream.clone()
        };
        accepted.learn("c").await;
        accepted.learn("c").await;
    }

    #[test]
    fn the_organization_is_the_third_token() {
        assert_eq!(
            org_of("herald.events.acme.workflow.completed"),
            Some("acme")
        );
        assert_eq!(org_of("herald.accepted.acme"), Some("acme"));
        assert_eq!(org_of("herald.events"), None);
        assert_eq!(org_of("herald.events.Not Valid.x"), None);
    }
}
