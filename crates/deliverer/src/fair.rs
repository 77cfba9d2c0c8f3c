//! Fair shares of the deliverer between organizations: carries out what
//! `core::fairness` decides.
//!
//! Before a job is sent, [`Fair::admit`] asks the scheduler: the job is sent
//! (its [`Ticket`] counts it in flight until the request is over), or it is
//! *held*: published to `herald.held.<org>.<webhook>` (stream HERALD_HELD,
//! WorkQueue) and acked, so it holds no slot and no ack-pending place while
//! the deliverer pulls other organizations' work from behind it.
//!
//! Held jobs are released oldest first, as their organization's requests
//! complete (a wake-up per completion, and a tick for rates): each
//! organization with held jobs has its own durable consumer
//! (`held_<org>`, filter `herald.held.<org>.>`, removed by the server after
//! 10 idle minutes), so replicas share the releases and a crash redelivers.
//! A released job goes the usual way (`State::handle`), without asking for
//! a share again (it was counted when released).
//!
//! A released job whose endpoint is at its limit is put back for later
//! (deferred); then, until nothing of its organization is held, its
//! releases are earned: one per request of its that ends and per released
//! job sent, or one per `RELEASE_PROBE_MS` (`Scheduler::unsent`), so freed
//! slots do not all go to reading held jobs and putting them back. A job
//! whose organization could not send it after its endpoint's turn is held
//! before waiting for the turn ([`Fair::hold_early`]), so no slot waits on
//! its behalf.
//!
//! Each release reads how many are left held from the last job it read
//! (its `pending`), and every second the stream's subjects say which
//! organizations have held jobs (held by another replica, or before a
//! restart). Every second too the
//! per-organization metrics and the `herald:held:{<org>}` markers (what the
//! webhook's API answer reads) are set. Organizations' own limits come from
//! the `herald-organizations` bucket, followed by its change feed.
//!
//! While others have work, the organization that sent the most yields
//! (`core::fairness::Yielding`): every job of another organization says how
//! long it waited from being stored to being picked up ([`Fair::waited`]),
//! and every 100 ms the cap on the busiest one's deliveries a second is
//! set from those waits ([`Fair::adapt`]). Its jobs over the cap are held,
//! so the matcher's lane for it (paced by its jobs waiting, held ones
//! included) slows with it.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::StreamExt;
use herald_core::fairness::{self, Decision, Limits, Scheduler, Yielding};
use herald_core::{names, proto};
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::nats::{self, PublishError};
use herald_platform::now_ms;
use herald_platform::redis::Redis;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::State;

pub const ORG_CONCURRENCY: &str = "HERALD_ORG_DELIVERY_CONCURRENCY";
pub const ORG_RATE: &str = "HERALD_ORG_DELIVERY_RATE";
pub const YIELD: &str = "HERALD_BUSIEST_YIELDS";

/// The organizations bucket (written by admin).
const ORGANIZATIONS: &str = "herald-organizations";
/// How long a held job is kept at most (as long as the deliveries stream).
const HELD_MAX_AGE: Duration = Duration::from_secs(3 * 24 * 3600);
/// The held stream's first sequence: far above any deliveries stream's, so
/// that ids derived from a job's stream sequence (`park.<seq>`) never meet.
const HELD_FIRST_SEQUENCE: u64 = 1 << 40;
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const SHOW_EVERY: Duration = Duration::from_secs(1);
/// How often held jobs are looked at without a completion (rates).
const TICK: Duration = Duration::from_millis(100);
/// Organizations shown in the metrics at most.
const MAX_SHOWN: usize = 200;
/// How long a `herald:held:{<org>}` marker outlives its last refresh.
const MARKER_TTL_SECS: u64 = 5;

/// The operator's defaults for every organization (`0`: none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    pub org_concurrency: Option<u32>,
    pub org_rate: Option<u32>,
    /// While others wait, the busiest organization yields (on by default).
    pub yields: bool,
}

impl Settings {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let some = |n: u32| (n > 0).then_some(n);
        Ok(Self {
            org_concurrency: some(config::number(src, ORG_CONCURRENCY, 0, 0..=65_536)?),
            org_rate: some(config::number(src, ORG_RATE, 0, 0..=1_000_000)?),
            yields: config::boolean(src, YIELD, true)?,
        })
    }
}

tokio::task_local! {
    /// Set around a released job: it was counted when released. What
    /// became of it.
    static RELEASED: Cell<Released>;
}

/// What became of a released job.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Released {
    Started,
    /// Sent ([`Fair::admit`]).
    Sent,
    /// Put back for later, its endpoint at its limit ([`Fair::deferred`]).
    Deferred,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgLabel {
    org: String,
}

struct Metrics {
    held: Family<OrgLabel, Gauge>,
    in_flight: Family<OrgLabel, Gauge>,
    oldest: Family<OrgLabel, Gauge<f64, AtomicU64>>,
    shown: Mutex<HashSet<String>>,
    yield_cap: Gauge,
}

struct Inner {
    scheduler: Mutex<Scheduler>,
    /// `None`: nobody yields (`HERALD_BUSIEST_YIELDS=false`).
    yielding: Option<Mutex<Yield>>,
    wake: Notify,
    js: jetstream::Context,
    redis: Redis,
    consumers: tokio::sync::Mutex<HashMap<String, consumer::PullConsumer>>,
    metrics: Metrics,
}

/// Who yields, and by how much.
struct Yield {
    control: Yielding,
    /// The organization that sent the most in the last tick, while others
    /// were active: its own jobs' waits do not count.
    busiest: Option<String>,
}

#[derive(Clone)]
pub struct Fair {
    inner: Arc<Inner>,
}

/// What [`Fair::admit`] says.
pub enum Admission {
    /// Send it; the ticket (none for a released job, counted already) is
    /// its place until the request is over.
    Send(Option<Ticket>),
    /// Hold it back ([`Fair::hold`]).
    Hold,
}

/// One request of an organization in flight.
pub struct Ticket {
    inner: Arc<Inner>,
    org: String,
    /// A released job put back for later, its endpoint at its limit
    /// (`Scheduler::unsent`).
    unsent: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler lock");
        if self.unsent {
            scheduler.unsent(&self.org, now_ms());
        } else {
            scheduler.done(&self.org, now_ms());
        }
        drop(scheduler);
        self.inner.wake.notify_one();
    }
}

impl Fair {
    /// Creates the held stream when missing and registers the metrics.
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        redis: Redis,
        slots: usize,
        settings: Settings,
        health: &herald_platform::health::Health,
    ) -> Result<Self, nats::Error> {
        js.get_or_create_stream(stream::Config {
            name: fairness::HELD_STREAM.into(),
            description: Some(
                "delivery jobs held back by their organization's share or limits".into(),
            ),
            subjects: vec![format!("{}.>", fairness::HELD_PREFIX)],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: HELD_MAX_AGE,
            num_replicas: replicas,
            first_sequence: Some(HELD_FIRST_SEQUENCE),
            ..Default::default()
        })
        .await
        .map_err(|source| nats::Error::Stream {
            stream: fairness::HELD_STREAM.into(),
            source,
        })?;
        let defaults = Limits {
            in_flight: settings.org_concurrency,
            per_second: settings.org_rate,
        };
        let inner = Arc::new(Inner {
            scheduler: Mutex::new(Scheduler::new(slots, defaults)),
            yielding: settings.yields.then(|| {
                Mutex::new(Yield {
                    control: Yielding::new(now_ms()),
                    busiest: None,
                })
            }),
            wake: Notify::new(),
            js: js.clone(),
            redis,
            consumers: tokio::sync::Mutex::default(),
            metrics: Metrics {
                held: health.metric(
                    "organization_held_deliveries",
                    "Delivery jobs held back by their organization's share or limits, by organization (organizations with work in the last 5 minutes)",
                    Family::default(),
                ),
                in_flight: health.metric(
                    "organization_deliveries_in_flight",
                    "Delivery requests in flight, by organization",
                    Family::default(),
                ),
                oldest: health.metric(
                    "organization_oldest_held_seconds",
                    "How long the organization's oldest held delivery has waited",
                    Family::default(),
                ),
                shown: Mutex::default(),
                yield_cap: health.gauge(
                    "busiest_organization_yield_cap",
                    "Deliveries a second the busiest organization is capped at while others' jobs wait (0: no cap)",
                ),
            },
        });
        Ok(Self { inner })
    }

    /// May `job` be sent now, or is it held back by its organization's
    /// share or limits?
    pub fn admit(&self, job: &proto::DeliveryJob) -> Admission {
        if RELEASED.try_with(|r| r.set(Released::Sent)).is_ok() {
            self.inner
                .scheduler
                .lock()
                .expect("scheduler lock")
                .released_sent(&job.organization_id, now_ms());
            return Admission::Send(None);
        }
        let now = now_ms();
        let decision = self.inner.scheduler.lock().expect("scheduler lock").arrive(
            &job.organization_id,
            now,
            now,
        );
        match decision {
            Decision::Send => Admission::Send(Some(Ticket {
                inner: self.inner.clone(),
                org: job.organization_id.clone(),
                unsent: false,
            })),
            Decision::Hold(why) => {
                tracing::trace!(org = %job.organization_id, ?why, "delivery held back");
                Admission::Hold
            }
        }
    }

    /// The job in hand is put back for later, its endpoint at its limit:
    /// when it was released, its organization's releases are earned from
    /// now on (`Scheduler::unsent`).
    pub fn deferred(&self) {
        let _ = RELEASED.try_with(|r| r.set(Released::Deferred));
    }

    /// Whether `job`, about to wait for its endpoint's turn, is held now
    /// instead: its organization could not send it after the turn either
    /// (`Scheduler::hold_early`). A released job never is.
    pub fn hold_early(&self, job: &proto::DeliveryJob) -> bool {
        if RELEASED.try_with(|_| ()).is_ok() {
            return false;
        }
        let now = now_ms();
        let held = self
            .inner
            .scheduler
            .lock()
            .expect("scheduler lock")
            .hold_early(&job.organization_id, now, now);
        if let Some(why) = held {
            tracing::trace!(org = %job.organization_id, ?why, "delivery held back before its endpoint's turn");
        }
        held.is_some()
    }

    /// `job` (its message's `info`) is picked up: unless it is the busiest
    /// organization's, released (it waited held, on purpose), redelivered
    /// (it waited for an ack wait, not for a core) or not a fresh event
    /// delivery (`fairness::waiting_since_ms`), how long it waited since
    /// ingest accepted its event counts toward whether the busiest yields.
    pub fn waited(&self, info: &jetstream::message::Info, job: &proto::DeliveryJob) {
        let Some(yielding) = &self.inner.yielding else {
            return;
        };
        if RELEASED.try_with(|_| ()).is_ok() || info.delivered > 1 {
            return;
        }
        let Some(since_ms) = fairness::waiting_since_ms(job) else {
            return;
        };
        let mut y = yielding.lock().expect("yield lock");
        if y.busiest.as_deref() != Some(job.organization_id.as_str()) {
            y.control.waited(now_ms() - since_ms);
        }
    }

    /// Every [`fairness::YIELD_TICK_MS`]: who sent the most, and the cap it
    /// yields to while others are active.
    fn adapt(&self) {
        let Some(yielding) = &self.inner.yielding else {
            return;
        };
        let now = now_ms();
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler lock");
        let sent = scheduler.sent(fairness::YIELD_OTHERS_WITHIN_MS, now);
        let mut y = yielding.lock().expect("yield lock");
        let per_second = |org: &str| {
            sent.iter().find(|(o, _)| o == org).map_or(0, |(_, n)| *n) as f64 * 1_000.0
                / fairness::YIELD_TICK_MS as f64
        };
        let (busiest, afresh) = fairness::yielder(&sent, scheduler.yielding());
        if afresh {
            y.control.stop();
        }
        let sent_by = busiest.as_deref().map_or(0.0, per_second);
        y.control.tick(now, sent_by);
        if busiest.is_none() {
            y.control.stop();
        }
        let cap = y.control.cap();
        scheduler.set_yield(busiest.clone().zip(cap));
        y.busiest = busiest;
        self.inner.metrics.yield_cap.set(cap.map_or(0, i64::from));
    }

    /// Stores `job` held; `source` (the job message's stream sequence)
    /// makes a redelivered job held once.
    pub async fn hold(&self, job: &proto::DeliveryJob, source: u64) -> Result<(), PublishError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::MSG_ID_HEADER, format!("held.{source}").as_str());
        nats::publish(
            &self.inner.js,
            fairness::held_subject(&job.organization_id, &job.webhook_id),
            headers,
            job.encode_to_vec().into(),
        )
        .await?;
        Ok(())
    }

    async fn consumer(&self, org: &str) -> Result<consumer::PullConsumer, nats::Error> {
        let mut consumers = self.inner.consumers.lock().await;
        if let Some(c) = consumers.get(org) {
            return Ok(c.clone());
        }
        let failed = |message: String| nats::Error::Consumer {
            consumer: format!("held_{org}"),
            message,
        };
        let stream = self
            .inner
            .js
            .get_stream(fairness::HELD_STREAM)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let c = stream
            .get_or_create_consumer(
                &format!("held_{org}"),
                consumer::pull::Config {
                    durable_name: Some(format!("held_{org}")),
                    filter_subject: format!("{}.{org}.>", fairness::HELD_PREFIX),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: crate::ACK_WAIT,
                    max_deliver: herald_platform::dead_letters::MAX_DELIVER,
                    inactive_threshold: Duration::from_secs(600),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        consumers.insert(org.to_owned(), c.clone());
        Ok(c)
    }

    /// Reads up to `n` held jobs of `org` (counted in flight already) and
    /// starts each, with a global slot, as a released job.
    async fn release(&self, state: &Arc<State>, org: &str, n: usize, slots: &Arc<Semaphore>) {
        let mut got = 0;
        // Held after the last one read, as the stream says.
        let mut left = None;
        let fetched = match self.consumer(org).await {
            Ok(c) => c
                .fetch()
                .max_messages(n)
                .messages()
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match fetched {
            Ok(mut batch) => {
                while got < n {
                    let message =
                        match tokio::time::timeout(Duration::from_secs(2), batch.next()).await {
                            Ok(Some(Ok(message))) => message,
                            Ok(Some(Err(error))) => {
                                tracing::debug!(%error, org, "reading held deliveries");
                                break;
                            }
                            Ok(None) | Err(_) => break,
                        };
                    got += 1;
                    left = message.info().ok().map(|info| info.pending);
                    let mut ticket = Ticket {
                        inner: self.inner.clone(),
                        org: org.to_owned(),
                        unsent: false,
                    };
                    let slot = slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("slots are never closed");
                    let state = state.clone();
                    let span = herald_platform::trace::message_span(
                        "deliver",
                        &message.subject,
                        message.headers.as_ref(),
                        "",
                    );
                    tokio::spawn(
                        RELEASED
                            .scope(Cell::new(Released::Started), async move {
                                let (spec, settle) = &state.held;
                                let jobs = crate::Jobs(state.clone());
                                herald_platform::worker::process(&jobs, settle, spec, message)
                                    .await;
                                ticket.unsent = RELEASED.with(Cell::get) == Released::Deferred;
                                drop(ticket);
                                drop(slot);
                            })
                            .instrument(span),
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, org, "cannot read held deliveries");
                // Forget the consumer: it is made again next time.
                self.inner.consumers.lock().await.remove(org);
            }
        }
        self.inner
            .scheduler
            .lock()
            .expect("scheduler lock")
            .released(org, n, got, left, now_ms());
    }

    /// Which organizations have held jobs, from the stream's subjects.
    async fn sweep(&self) {
        let stream = match self.inner.js.get_stream(fairness::HELD_STREAM).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "cannot read the held deliveries");
                return;
            }
        };
        let mut subjects = match stream
            .info_with_subjects(format!("{}.>", fairness::HELD_PREFIX))
            .await
        {
            Ok(subjects) => subjects,
            Err(error) => {
                tracing::debug!(%error, "cannot read the held deliveries");
                return;
            }
        };
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        while let Some(Ok((subject, count))) = subjects.next().await {
            let org = subject
                .strip_prefix(fairness::HELD_PREFIX)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.split('.').next());
            if let Some(org) = org {
                *held.entry(org.to_owned()).or_default() += count as u64;
            }
        }
        self.inner
            .scheduler
            .lock()
            .expect("scheduler lock")
            .seen_held(&held, now_ms());
    }

    /// Sets the metrics of the organizations with recent work, and the
    /// markers of those holding jobs back.
    async fn show(&self) {
        let now = now_ms();
        let views = self
            .inner
            .scheduler
            .lock()
            .expect("scheduler lock")
            .views(MAX_SHOWN, now);
        let m = &self.inner.metrics;
        let mut shown = HashSet::new();
        for v in &views {
            let label = OrgLabel { org: v.org.clone() };
            m.held.get_or_create(&label).set(v.held as i64);
            m.in_flight.get_or_create(&label).set(v.in_flight as i64);
            let age = v
                .oldest_held_ms
                .map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0);
            m.oldest.get_or_create(&label).set(age);
            shown.insert(v.org.clone());
        }
        {
            let mut before = m.shown.lock().expect("shown lock");
            for gone in before.difference(&shown) {
                let label = OrgLabel { org: gone.clone() };
                m.held.remove(&label);
                m.in_flight.remove(&label);
                m.oldest.remove(&label);
            }
            *before = shown;
        }
        let holding: Vec<(String, u64)> = views
            .iter()
            .filter(|v| v.held > 0)
            .map(|v| (fairness::held_key(&v.org), v.held))
            .collect();
        if holding.is_empty() {
            return;
        }
        // One key per command keeps it valid on a Redis Cluster.
        self.inner
            .redis
            .run("mark held deliveries", |mut conn| async move {
                let mut pipe = redis::pipe();
                for (key, held) in &holding {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(held)
                        .arg("EX")
                        .arg(MARKER_TTL_SECS)
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            })
            .await;
    }

    /// Follows the organizations bucket for their delivery limits, once it
    /// exists (admin makes it).
    async fn follow_limits(self, shutdown: CancellationToken) {
        loop {
            if let Ok(kv) = self.inner.js.get_key_value(ORGANIZATIONS).await {
                match kv.watch_with_history(">").await {
                    Ok(mut changes) => loop {
                        let entry = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            entry = changes.next() => entry,
                        };
                        let Some(Ok(entry)) = entry else { break };
                        let limits = match entry.operation {
                            kv::Operation::Put => Some(limits_of(&entry.value)),
                            _ => None,
                        };
                        self.inner
                            .scheduler
                            .lock()
                            .expect("scheduler lock")
                            .set_limits(&entry.key, limits);
                    },
                    Err(error) => tracing::debug!(%error, "cannot follow the organizations"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    }
}

/// The delivery limits in an organization's record (JSON, written by admin).
fn limits_of(record: &[u8]) -> Limits {
    let value: serde_json::Value = serde_json::from_slice(record).unwrap_or_default();
    let limit = |name: &str| {
        value["limits"][name]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
    };
    Limits {
        in_flight: limit("max_deliveries_in_flight"),
        per_second: limit("deliveries_per_second"),
    }
}

/// Releases held jobs as requests complete, until shutdown; sweeps the held
/// stream, sets the metrics and follows the organizations' limits.
pub async fn run(state: Arc<State>, slots: Arc<Semaphore>, shutdown: CancellationToken) {
    let fair = state.fair.clone();
    tokio::spawn(fair.clone().follow_limits(shutdown.clone()));
    let start = tokio::time::Instant::now();
    let mut sweep = tokio::time::interval_at(start, SWEEP_EVERY);
    let mut show = tokio::time::interval_at(start, SHOW_EVERY);
    let mut adapt =
        tokio::time::interval_at(start, Duration::from_millis(fairness::YIELD_TICK_MS as u64));
    adapt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    show.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = fair.inner.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = sweep.tick() => fair.sweep().await,
            _ = show.tick() => fair.show().await,
            _ = adapt.tick() => fair.adapt(),
        }
        let releases = fair
            .inner
            .scheduler
            .lock()
            .expect("scheduler lock")
            .releases(slots.available_permits(), now_ms());
        for (org, n) in releases {
            fair.release(&state, &org, n, &slots).await;
        }
    }
}
