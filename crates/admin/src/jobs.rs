//! Recover and replay (PRODUCT.md, "Recover and replay"): a job that sends a
//! webhook every delivery it missed, or every retained event it matches now.
//!
//! A job is a JSON record in the `herald-jobs` KV bucket
//! (`<org>.<webhook>.<job>`), and `<org>.<webhook>.running` names the one
//! running job of a webhook (created atomically: a second job is a 409).
//! Every admin replica runs a [`Runner`]: it watches the `.running` markers
//! (work in proportion to jobs started and ended, not to the jobs kept),
//! claims a running job whose lease has lapsed (compare-and-set on the
//! record), queues its deliveries to `HERALD_DELIVERIES` a few at a time —
//! never more than [`PACE`] waiting for their outcome, so a job of 100,000
//! deliveries never crowds out live traffic — and saves its progress (a
//! stream sequence, the counts) with the lease, so a crashed replica's job
//! is resumed by another from where it was.
//!
//! A job ends `done`, `failed` with the reason (it never stays `running`
//! because something broke), or `cancelled`: the cancel marks the record and
//! releases the marker; the replica working it sees the marker go (or its
//! next renewal fail) and stops. What it already queued stays queued.
//!
//! - **recover** reads the webhook's attempts (`HERALD_ATTEMPTS`, from
//!   `since`), picks with `core::recovery` the deliveries whose last attempt
//!   failed or was skipped, and sends each again with its own `webhook-id`
//!   as its next attempt (kind `recover`). Run twice, the second run finds
//!   them succeeded.
//! - **replay** reads the organization's accepted events (`HERALD_ACCEPTED`
//!   from `since`, by start time, filtered by the organization's subject) and
//!   queues a new delivery (kind `replay`, id derived from the job and the
//!   event, so a resumed job re-queues nothing twice) for each event the
//!   webhook matches now.
//!
//! `delivered` and `failed` are counted from the attempts the deliverer logs
//! for the job (`job_id` on each attempt).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{self, kv};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::StreamExt;
use herald_core::matching::Subscription;
use herald_core::recovery::{DeliveryKey, Recovery, event_fingerprint};
use herald_core::{ids, matching, names, ordering as order_rules, payload, proto};
use herald_platform::ordering::{self, Queues};
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::{AppState, now_ms};

pub const JOBS_BUCKET: &str = "herald-jobs";
/// Deliveries of one job queued and not yet concluded, at most.
pub const PACE: u64 = 16;
/// How long a claimed job is its replica's without a renewal.
const LEASE_MS: i64 = 15_000;
/// How often a running job saves its progress.
const SAVE_EVERY_MS: i64 = 1_000;
/// How often a runner looks at the leases of the running jobs it knows of.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a runner reads every running job's record again, whatever it
/// believes of its lease (a safety net under the watch).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The keys a runner watches: one marker per webhook with a running job.
const MARKERS: &str = "*.*.running";
/// Consecutive failures to follow the attempts stream before a job gives
/// up counting its outcomes, and fails.
const COUNT_TRIES: u32 = 5;
/// A read that has waited this long for a message asks whether its stream
/// is still there: an ordered consumer retries its own recreation forever
/// and would wait silently on a stream that is gone.
const PROBE_AFTER: Duration = Duration::from_secs(5);
/// Finished jobs are kept this long.
const KEEP_FINISHED: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub kind: String,
    pub organization_id: String,
    pub webhook_id: String,
    pub since_ms: i64,
    pub until_ms: i64,
    #[serde(default)]
    pub event_types: Vec<String>,
    /// `running`, `done`, `failed` (with `error`) or `cancelled`.
    pub status: String,
    pub queued: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Every delivery is queued; what is left is counting outcomes.
    #[serde(default)]
    pub queued_all: bool,
    /// The last source-stream sequence handled (replay).
    #[serde(default)]
    pub cursor: u64,
    #[serde(default)]
    pub error: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub finished_at_ms: i64,
    #[serde(default)]
    pub lease_owner: String,
    #[serde(default)]
    pub lease_until_ms: i64,
}

impl Job {
    fn key(&self) -> String {
        job_key(&self.organization_id, &self.webhook_id, &self.id)
    }

    pub fn to_json(&self) -> Value {
        let time = |ms: i64| (ms > 0).then(|| payload::rfc3339_ms(ms));
        serde_json::json!({
            "id": self.id,
            "kind": self.kind,
            "webhook_id": self.webhook_id,
            "status": self.status,
            "queued": self.queued,
            "delivered": self.delivered,
            "failed": self.failed,
            "since": payload::rfc3339_ms(self.since_ms),
            "until": payload::rfc3339_ms(self.until_ms),
            "event_types": self.event_types,
            "error": (!self.error.is_empty()).then_some(&self.error),
            "created_at": payload::rfc3339_ms(self.created_at_ms),
            "finished_at": time(self.finished_at_ms),
        })
    }
}

fn job_key(org: &str, webhook: &str, job: &str) -> String {
    format!("{org}.{webhook}.{job}")
}

fn running_key(org: &str, webhook: &str) -> String {
    format!("{org}.{webhook}.running")
}

pub async fn open_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, crate::kv_map::OpenError> {
    let description = "Herald: recover and replay jobs";
    crate::kv_map::open(js, JOBS_BUCKET, description, KEEP_FINISHED, replicas).await
}

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/webhooks/{id}/recover", post(recover))
        .route("/webhooks/{id}/replay", post(replay))
        .route("/webhooks/{id}/jobs/{job_id}", get(get_job))
        .route("/webhooks/{id}/jobs/{job_id}/cancel", post(cancel_job))
}

fn unavailable(error: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(%error, "jobs bucket");
    ApiError::unavailable("cannot reach the jobs store right now, try again")
}

/// `since` and `until` of a request: RFC 3339, `since` before `until`
/// (default: now), `until` not in the future.
fn window(since: &str, until: Option<&str>, now: i64) -> Result<(i64, i64), ApiError> {
    let parse = |field: &str, text: &str| {
        payload::parse_rfc3339_ms(text)
            .ok_or_else(|| ApiError::validation(field, format!("{field} must be an RFC 3339 time")))
    };
    let since_ms = parse("since", since)?;
    let until_ms = match until {
        Some(text) => parse("until", text)?,
        None => now,
    };
    if since_ms > now {
        return Err(ApiError::validation("since", "since is in the future"));
    }
    if until_ms < since_ms {
        return Err(ApiError::validation("until", "until is before since"));
    }
    Ok((since_ms, until_ms.min(now)))
}

async fn start(
    state: &AppState,
    caller: &Caller,
    id: &str,
    kind: &str,
    body: JsonBody,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !names::valid_id(id) {
        return Err(ApiError::not_found("webhook"));
    }
    let webhook = state
        .store
        .get(&caller.org, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?
        .webhook;
    let mut req = body
        .0
        .ok_or_else(|| ApiError::bad_request("invalid_json", "a JSON object body is required"))?;
    let known: &[&str] = if kind == "replay" {
        &["since", "until", "event_types"]
    } else {
        &["since", "until"]
    };
    req.only(known)?;
    let since: String = req.required("since")?;
    let until: Option<String> = req.optional("until")?;
    let event_types: Vec<String> = if kind == "replay" {
        req.optional("event_types")?.unwrap_or_default()
    } else {
        Vec::new()
    };
    if let Some(bad) = event_types.iter().find(|t| !matching::valid_pattern(t)) {
        return Err(ApiError::validation(
            "event_types",
            format!("{bad:?} is not an event type or pattern"),
        ));
    }
    let now = now_ms();
    let (since_ms, until_ms) = window(&since, until.as_deref(), now)?;
    if !webhook.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_disabled",
            "the webhook is disabled; enable it before recovering or replaying",
        ));
    }
    // A job sends again what was sent: it counts as a manual send.
    state.manual_sends.take(caller).await?;
    let job = Job {
        id: format!("job_{}", &ids::new_event_id()[4..]),
        kind: kind.into(),
        organization_id: caller.org.clone(),
        webhook_id: webhook.id.clone(),
        since_ms,
        until_ms,
        event_types,
        status: "running".into(),
        queued: 0,
        delivered: 0,
        failed: 0,
        queued_all: false,
        cursor: 0,
        error: String::new(),
        created_at_ms: now,
        finished_at_ms: 0,
        lease_owner: String::new(),
        lease_until_ms: 0,
    };
    // The record first, then the marker: a marker always names a record.
    let encoded = serde_json::to_vec(&job).expect("a job serializes");
    state
        .jobs
        .put(job.key(), encoded.into())
        .await
        .map_err(|e| unavailable(&e))?;
    let running = running_key(&caller.org, &webhook.id);
    // At most one running job per webhook: the marker is created atomically.
    let refused = loop {
        match state.jobs.create(&running, job.id.clone().into()).await {
            Ok(_) => break None,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = match state.jobs.entry(&running).await {
                    Ok(Some(holder)) if holder.operation == kv::Operation::Put => holder,
                    Ok(_) => continue,
                    Err(e) => break Some(unavailable(&e)),
                };
                let holder_id = String::from_utf8_lossy(&holder.value).into_owned();
                match read(state, &caller.org, &webhook.id, &holder_id).await {
                    Ok(Some(other)) if other.status == "running" => {
                        break Some(ApiError::new(
                            StatusCode::CONFLICT,
                            "job_running",
                            format!(
                                "job {holder_id} is running for this webhook; wait for it to finish or cancel it"
                            ),
                        ));
                    }
                    // A marker its job outlived: clear it (unless it just
                    // changed hands) and try again.
                    Ok(_) => {
                        let _ = state
                            .jobs
                            .delete_expect_revision(&running, Some(holder.revision))
                            .await;
                    }
                    Err(e) => break Some(e),
                }
            }
            Err(e) => break Some(unavailable(&e)),
        }
    };
    if let Some(refused) = refused {
        // Never started: no marker names it, no runner will see it.
        let _ = state.jobs.delete(job.key()).await;
        return Err(refused);
    }
    Ok((StatusCode::ACCEPTED, Json(job.to_json())))
}

/// Deletes the webhook's `.running` marker if it still names `job_id` (a
/// newer job's marker is left alone).
async fn release_marker(jobs: &kv::Store, org: &str, webhook: &str, job_id: &str) {
    let marker = running_key(org, webhook);
    if let Ok(Some(entry)) = jobs.entry(&marker).await
        && entry.operation == kv::Operation::Put
        && entry.value == job_id.as_bytes()
        && let Err(error) = jobs
            .delete_expect_revision(&marker, Some(entry.revision))
            .await
    {
        tracing::warn!(%error, job_id, "cannot release a job's running marker");
    }
}

async fn read(
    state: &AppState,
    org: &str,
    webhook: &str,
    job: &str,
) -> Result<Option<Job>, ApiError> {
    let found = state
        .jobs
        .get(job_key(org, webhook, job))
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(found.and_then(|b| serde_json::from_slice(&b).ok()))
}

/// `POST /webhooks/{id}/recover {"since", "until"?}`
pub async fn recover(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    start(&state, &caller, &id, "recover", body).await
}

/// `POST /webhooks/{id}/replay {"since", "until"?, "event_types"?}`
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: JsonBody,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    start(&state, &caller, &id, "replay", body).await
}

/// `GET /webhooks/{id}/jobs/{job_id}`
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, job_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !names::valid_id(&id) || !names::valid_id(&job_id) {
        return Err(ApiError::not_found("job"));
    }
    read(&state, &caller.org, &id, &job_id)
        .await?
        .map(|j| Json(j.to_json()))
        .ok_or_else(|| ApiError::not_found("job"))
}

/// `POST /webhooks/{id}/jobs/{job_id}/cancel`: marks a running job
/// `cancelled` and releases its webhook for a new job. The replica working
/// it stops when it sees the marker go, or at its next renewal at the
/// latest; what it queued before stays queued.
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, job_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !names::valid_id(&id) || !names::valid_id(&job_id) {
        return Err(ApiError::not_found("job"));
    }
    let key = job_key(&caller.org, &id, &job_id);
    let job = loop {
        let entry = state
            .jobs
            .entry(&key)
            .await
            .map_err(|e| unavailable(&e))?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| ApiError::not_found("job"))?;
        let mut job: Job =
            serde_json::from_slice(&entry.value).map_err(|_| ApiError::not_found("job"))?;
        if job.status != "running" {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_finished",
                format!(
                    "job {job_id} has already ended ({}); only a running job can be cancelled",
                    job.status
                ),
            ));
        }
        job.status = "cancelled".into();
        job.finished_at_ms = now_ms();
        job.lease_until_ms = 0;
        let encoded = serde_json::to_vec(&job).expect("a job serializes");
        match state
            .jobs
            .update(&key, encoded.into(), entry.revision)
            .await
        {
            Ok(_) => break job,
            // Its runner saved progress meanwhile (or finished it): look again.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(unavailable(&e)),
        }
    };
    release_marker(&state.jobs, &caller.org, &id, &job_id).await;
    tracing::info!(job_id = %job.id, kind = %job.kind, queued = job.queued, "recover/replay job cancelled");
    Ok(Json(job.to_json()))
}

/// Claims and runs jobs on this replica until `shutdown`.
pub struct Runner {
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub store: herald_platform::webhooks::WebhookStore,
    pub owner: String,
}

/// A running job this replica knows of, by its webhook's marker.
struct Tracked {
    job_key: String,
    /// Its lease as last read: nothing to try before then.
    lease_until_ms: i64,
    /// Set while this replica works it: cancelling it stops the work.
    held: Option<CancellationToken>,
}

/// What a claim found.
enum Claim {
    Ours(Box<Job>, u64),
    /// Another replica holds it until then.
    Leased(i64),
    /// Not running any more (or gone).
    Ended,
    /// Cannot tell now.
    Unknown,
}

/// Tells the runner a job's work on this replica is over, even if it panicked.
struct Done {
    tx: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    marker: String,
    job_key: String,
}

impl Drop for Done {
    fn drop(&mut self) {
        let _ = self.tx.send((
            std::mem::take(&mut self.marker),
            std::mem::take(&mut self.job_key),
        ));
    }
}

impl Runner {
    /// Follows the `.running` markers with one watch and keeps the running
    /// jobs in memory: a new marker is a job to claim, a marker gone is a
    /// job ended or cancelled (stopped here if this replica works it), a
    /// marker touched is a lease released. Each second it claims the jobs
    /// whose known lease lapsed; every [`SWEEP_EVERY`] it reads them all again.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running: HashMap<String, Tracked> = HashMap::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let mut watch: Option<kv::Watch> = None;
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if watch.is_none() {
                match self.jobs.watch_with_history(MARKERS).await {
                    Ok(opened) => {
                        // The watch replays the markers as they are now;
                        // what changed while none ran is forgotten.
                        running.retain(|_, t| t.held.is_some());
                        watch = Some(opened);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot watch the running jobs; trying again");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                }
            }
            let markers = watch.as_mut().expect("opened above");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                entry = markers.next() => match entry {
                    Some(Ok(entry)) => marker_changed(&entry, &mut running),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the running jobs' watch failed; watching again");
                        watch = None;
                    }
                    None => watch = None,
                },
                Some((marker, job_key)) = done_rx.recv() => {
                    if let Some(t) = running.get_mut(&marker)
                        && t.job_key == job_key
                    {
                        // Finished, lost or stopped here: see what it is now.
                        t.held = None;
                        t.lease_until_ms = 0;
                    }
                }
                _ = check.tick() => self.claim_lapsed(&mut running, &shutdown, &done_tx).await,
                _ = sweep.tick() => {
                    for t in running.values_mut().filter(|t| t.held.is_none()) {
                        t.lease_until_ms = 0;
                    }
                }
            }
        }
    }

    /// Claims the known running jobs whose lease lapsed, and starts them.
    async fn claim_lapsed(
        self: &Arc<Self>,
        running: &mut HashMap<String, Tracked>,
        shutdown: &CancellationToken,
        done: &tokio::sync::mpsc::UnboundedSender<(String, String)>,
    ) {
        let now = now_ms();
        let due: Vec<(String, String)> = running
            .iter()
            .filter(|(_, t)| t.held.is_none() && t.lease_until_ms <= now)
            .map(|(marker, t)| (marker.clone(), t.job_key.clone()))
            .collect();
        for (marker, job_key) in due {
            let claim = self.claim(&job_key).await;
            let Some(tracked) = running.get_mut(&marker) else {
                continue;
            };
            match claim {
                Claim::Ours(job, revision) => {
                    let stop = shutdown.child_token();
                    tracked.held = Some(stop.clone());
                    let (this, shutdown) = (self.clone(), shutdown.clone());
                    let done = Done {
                        tx: done.clone(),
                        marker,
                        job_key,
                    };
                    tokio::spawn(async move {
                        let _done = done;
                        this.drive(*job, revision, shutdown, stop).await;
                    });
                }
                Claim::Leased(until) => tracked.lease_until_ms = until,
                Claim::Ended => {
                    // Its runner ended it but could not release the marker.
                    let (org, webhook) = marker_webhook(&marker);
                    let job_id = job_key.rsplit('.').next().unwrap_or_default();
                    release_marker(&self.jobs, org, webhook, job_id).await;
                    running.remove(&marker);
                }
                Claim::Unknown => tracked.lease_until_ms = now + CHECK_EVERY.as_millis() as i64,
            }
        }
    }

    /// The job at `key` if it is running and its lease lapsed, now ours.
    async fn claim(&self, key: &str) -> Claim {
        let entry = match self.jobs.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return Claim::Ended,
            Err(error) => {
                tracing::debug!(%error, key, "cannot read a job");
                return Claim::Unknown;
            }
        };
        let Ok(mut job) = serde_json::from_slice::<Job>(&entry.value) else {
            return Claim::Ended;
        };
        let now = now_ms();
        if job.status != "running" {
            return Claim::Ended;
        }
        if job.lease_until_ms > now {
            return Claim::Leased(job.lease_until_ms);
        }
        job.lease_owner = self.owner.clone();
        job.lease_until_ms = now + LEASE_MS;
        let encoded = serde_json::to_vec(&job).expect("a job serializes");
        match self.jobs.update(key, encoded.into(), entry.revision).await {
            Ok(revision) => Claim::Ours(Box::new(job), revision),
            // Another replica was first: its lease runs from about now.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Claim::Leased(now + LEASE_MS)
            }
            Err(_) => Claim::Unknown,
        }
    }

    /// Saves `job` if it is still ours; the new revision.
    async fn save(&self, job: &mut Job, revision: u64) -> Option<u64> {
        job.lease_until_ms = now_ms() + LEASE_MS;
        let encoded = serde_json::to_vec(&*job).ok()?;
        self.jobs
            .update(job.key(), encoded.into(), revision)
            .await
            .ok()
    }

    /// Saves progress and renews the lease about once a second.
    async fn renew(&self, job: &mut Job, revision: &mut u64, counts: &Counts) -> Result<(), Stop> {
        counts.read_into(job)?;
        // `save` sets the lease to LEASE_MS from then.
        if now_ms() > job.lease_until_ms - LEASE_MS + SAVE_EVERY_MS {
            *revision = self.save(job, *revision).await.ok_or(Stop::Lost)?;
        }
        Ok(())
    }

    /// Works `job` until it ends, this replica stops (`shutdown`: the lease
    /// is released for another replica) or `stop` (the job was cancelled).
    async fn drive(
        &self,
        mut job: Job,
        mut revision: u64,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) {
        let counts = Arc::new(Counts::default());
        let counting = tokio::spawn(count_outcomes(self.js.clone(), job.clone(), counts.clone()));
        let result = async {
            if !job.queued_all {
                match job.kind.as_str() {
                    "replay" => {
                        self.queue_replay(&mut job, &mut revision, &counts, &stop)
                            .await?
                    }
                    _ => {
                        self.queue_recover(&mut job, &mut revision, &counts, &stop)
                            .await?
                    }
                }
                job.queued_all = true;
            }
            // Wait for the outcomes of what was queued.
            loop {
                self.renew(&mut job, &mut revision, &counts).await?;
                if job.delivered + job.failed >= job.queued {
                    return Ok(());
                }
                tokio::select! {
                    _ = stop.cancelled() => return Err(Stop::Stopped),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        .await;
        counting.abort();
        match result {
            Ok(()) => job.status = "done".into(),
            Err(Stop::Failed(error)) => {
                tracing::warn!(%error, job_id = %job.id, "recover/replay job failed");
                job.status = "failed".into();
                job.error = error;
            }
            // Another replica has it.
            Err(Stop::Lost) => return,
            Err(Stop::Stopped) if shutdown.is_cancelled() => {
                // This replica stops: hand the job over now rather than
                // after its lease, and touch its marker so that the other
                // replicas look at it at once.
                job.lease_until_ms = 0;
                let encoded = serde_json::to_vec(&job).expect("a job serializes");
                if self
                    .jobs
                    .update(job.key(), encoded.into(), revision)
                    .await
                    .is_ok()
                {
                    let marker = running_key(&job.organization_id, &job.webhook_id);
                    if let Ok(Some(entry)) = self.jobs.entry(&marker).await
                        && entry.operation == kv::Operation::Put
                        && entry.value == job.id.as_bytes()
                    {
                        let _ = self.jobs.update(&marker, entry.value, entry.revision).await;
                    }
                }
                return;
            }
            // Cancelled: the record already says so.
            Err(Stop::Stopped) => {
                tracing::info!(job_id = %job.id, queued = job.queued, "recover/replay job stopped: cancelled");
                return;
            }
        }
        job.finished_at_ms = now_ms();
        if self.save(&mut job, revision).await.is_some() {
            release_marker(&self.jobs, &job.organization_id, &job.webhook_id, &job.id).await;
            tracing::info!(job_id = %job.id, kind = %job.kind, status = %job.status, queued = job.queued, delivered = job.delivered, failed = job.failed, "recover/replay job finished");
        }
    }

    /// Waits until fewer than [`PACE`] of the job's deliveries are waiting
    /// for their outcome, saving progress (and the lease) meanwhile.
    async fn pace(
        &self,
        job: &mut Job,
        revision: &mut u64,
        counts: &Counts,
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        loop {
            self.renew(job, revision, counts).await?;
            if job.queued < job.delivered + job.failed + PACE {
                return Ok(());
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Stop::Stopped),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    async fn webhook(&self, job: &Job) -> Result<proto::Webhook, Stop> {
        match self.store.get(&job.organization_id, &job.webhook_id).await {
            Ok(Some(found)) if found.webhook.enabled => Ok(found.webhook),
            Ok(Some(_)) => Err(Stop::Failed("the webhook was disabled".into())),
            Ok(None) => Err(Stop::Failed("the webhook was deleted".into())),
            Err(e) => Err(Stop::Failed(format!("cannot read the webhook: {e}"))),
        }
    }

    async fn queue_replay(
        &self,
        job: &mut Job,
        revision: &mut u64,
        counts: &Counts,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let webhook = self.webhook(job).await?;
        let subscription = Subscription::from_webhook(&webhook);
        let queues = Queues::new(self.js.clone(), ordering::KEY_TTL);
        let from = if job.cursor > 0 {
            DeliverPolicy::ByStartSequence {
                start_sequence: job.cursor + 1,
            }
        } else {
            since(job.since_ms)?
        };
        let mut events = ToNow::open(
            &self.js,
            names::ACCEPTED_STREAM,
            names::accepted_subject(&job.organization_id),
            from,
            "events",
        )
        .await?;
        while let Some(message) = events.next(shutdown).await? {
            // A window of events the webhook does not match keeps the lease
            // (and saves the cursor) while it is read.
            self.renew(job, revision, counts).await?;
            let Ok(info) = message.info() else { continue };
            let (seq, stored_ms) = (
                info.stream_sequence,
                (info.published.unix_timestamp_nanos() / 1_000_000) as i64,
            );
            if stored_ms > job.until_ms {
                break;
            }
            // The cursor passes an event only once it is queued or skipped,
            // so a job resumed from a saved cursor misses none.
            let Ok(event) = proto::Event::decode(message.payload.clone()) else {
                job.cursor = seq;
                continue;
            };
            let wanted = job.event_types.is_empty()
                || job
                    .event_types
                    .iter()
                    .any(|p| matching::type_matches(p, &event.r#type));
            // A webhook is never sent system events about itself.
            let about_itself = event.attributes.get("webhook") == Some(&webhook.id);
            if !wanted || about_itself || !subscription.matches(&event.r#type, &event.attributes) {
                job.cursor = seq;
                continue;
            }
            self.pace(job, revision, counts, shutdown).await?;
            let delivery_id = ids::delivery_id(
                &job.organization_id,
                &format!("{}/{}", event.id, job.id),
                &webhook.id,
            );
            let ordered =
                order_rules::key_of(webhook.ordering.as_ref(), &event.attributes).map(|key| {
                    proto::OrderedPlace {
                        key: key.to_owned(),
                        ..Default::default()
                    }
                });
            let delivery = proto::DeliveryJob {
                delivery_id: delivery_id.clone(),
                organization_id: job.organization_id.clone(),
                webhook_id: webhook.id.clone(),
                event: Some(event),
                attempt: 1,
                kind: proto::DeliveryKind::Replay as i32,
                event_seq: seq,
                job_id: job.id.clone(),
                ordered,
                ..Default::default()
            };
            // An ordered webhook's replays join their keys' queues, in the
            // stream's order (this loop's).
            self.publish(&queues, &delivery, &ids::first_job_msg_id(&delivery_id))
                .await?;
            job.queued += 1;
            job.cursor = seq;
        }
        Ok(())
    }

    async fn queue_recover(
        &self,
        job: &mut Job,
        revision: &mut u64,
        counts: &Counts,
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        let webhook = self.webhook(job).await?;
        let mut recovery = Recovery::new(job.since_ms, job.until_ms);
        // Deliveries this job already queued (it is resuming): their own
        // attempts are the latest of each, so one that this job already
        // delivered is no candidate any more.
        let mut own: HashSet<DeliveryKey> = HashSet::new();
        // All of the window or an error: a partial read would take a
        // delivery that later succeeded for a failed one.
        let mut attempts = ToNow::open(
            &self.js,
            names::ATTEMPTS_STREAM,
            names::attempt_subject(&job.organization_id, &job.webhook_id),
            since(job.since_ms)?,
            "attempts",
        )
        .await?;
        while let Some(message) = attempts.next(shutdown).await? {
            if let Ok(a) = proto::AttemptResult::decode(message.payload.clone()) {
                if a.job_id == job.id {
                    own.insert(DeliveryKey::of(&a.delivery_id));
                }
                recovery.observe(&a);
            }
            // A long window keeps its lease while it is read.
            self.renew(job, revision, counts).await?;
        }
        job.queued = own
            .iter()
            .filter(|d| !recovery.is_candidate(&d.id()))
            .count() as u64;
        drop(own);
        let queues = Queues::new(self.js.clone(), ordering::KEY_TTL);
        let accepted = self
            .js
            .get_stream(names::ACCEPTED_STREAM)
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let mut candidates: Vec<_> = recovery.candidates().collect();
        // An ordered webhook's deliveries are recovered in the order their
        // events were accepted, each at the end of its key's queue (or, for
        // the one its key is held on, at its own place).
        if webhook.ordering.is_some() {
            candidates.sort_by_key(|c| c.event_seq);
        }
        for candidate in candidates {
            let event = match &candidate.event {
                Some(event) => event.clone(),
                None => match accepted.get_raw_message(candidate.event_seq).await {
                    Ok(m) => match proto::Event::decode(m.payload.as_ref()) {
                        Ok(e) if event_fingerprint(&e.id) == candidate.event_fingerprint => e,
                        _ => continue,
                    },
                    // No longer retained: nothing to send.
                    Err(_) => continue,
                },
            };
            self.pace(job, revision, counts, shutdown).await?;
            let ordered = match order_rules::key_of(webhook.ordering.as_ref(), &event.attributes) {
                None => None,
                Some(key) => Some(
                    match queues
                        .held(&job.organization_id, &job.webhook_id, key)
                        .await
                        .map_err(|e| Stop::Failed(e.to_string()))?
                    {
                        Some(held) if held.delivery_id == candidate.delivery_id => {
                            proto::OrderedPlace {
                                key: key.to_owned(),
                                sequence: held.sequence,
                                entry: held.entry,
                            }
                        }
                        _ => proto::OrderedPlace {
                            key: key.to_owned(),
                            ..Default::default()
                        },
                    },
                ),
            };
            let delivery = proto::DeliveryJob {
                delivery_id: candidate.delivery_id.clone(),
                organization_id: job.organization_id.clone(),
                webhook_id: job.webhook_id.clone(),
                event: Some(event),
                attempt: candidate.attempt + 1,
                kind: proto::DeliveryKind::Recover as i32,
                event_seq: candidate.event_seq,
                job_id: job.id.clone(),
                ordered,
                // Its deadline starts now: it is one attempt, made today.
                ..Default::default()
            };
            let msg_id =
                ids::manual_job_msg_id(&candidate.delivery_id, candidate.attempt + 1, &job.id);
            self.publish(&queues, &delivery, &msg_id).await?;
            job.queued += 1;
        }
        Ok(())
    }

    /// Queues `delivery`: an ordered one not yet at its place joins the end
    /// of its key's queue; any other goes to the delivery subject.
    async fn publish(
        &self,
        queues: &Queues,
        delivery: &proto::DeliveryJob,
        msg_id: &str,
    ) -> Result<(), Stop> {
        if delivery
            .ordered
            .as_ref()
            .is_some_and(|p| !p.key.is_empty() && p.entry == 0)
        {
            return queues
                .enqueue(delivery, delivery.encode_to_vec().into(), msg_id)
                .await
                .map_err(|e| Stop::Failed(format!("cannot queue a delivery: {e}")));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(names::MSG_ID_HEADER, msg_id);
        herald_platform::nats::publish(
            &self.js,
            names::delivery_subject(&delivery.organization_id, &delivery.webhook_id),
            headers,
            delivery.encode_to_vec().into(),
        )
        .await
        .map(|_| ())
        .map_err(|e| Stop::Failed(format!("cannot queue a delivery: {e}")))
    }
}

/// Why a job's work on this replica ended before the job did.
enum Stop {
    /// The job cannot go on: it ends `failed` with this reason.
    Failed(String),
    /// Its record changed under this replica (another replica claimed it
    /// after a lapsed lease, or it was cancelled).
    Lost,
    /// This replica stops, or the job was cancelled.
    Stopped,
}

/// Outcomes counted from the attempts stream, or why they cannot be.
#[derive(Default)]
struct Counts {
    delivered: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    error: std::sync::OnceLock<String>,
}

impl Counts {
    fn read_into(&self, job: &mut Job) -> Result<(), Stop> {
        use std::sync::atomic::Ordering::Relaxed;
        job.delivered = self.delivered.load(Relaxed);
        job.failed = self.failed.load(Relaxed);
        match self.error.get() {
            Some(error) => Err(Stop::Failed(error.clone())),
            None => Ok(()),
        }
    }
}

/// A change to a `.running` marker, applied to the running jobs known.
fn marker_changed(entry: &kv::Entry, running: &mut HashMap<String, Tracked>) {
    match entry.operation {
        kv::Operation::Put => {
            let (org, webhook) = marker_webhook(&entry.key);
            let job_id = String::from_utf8_lossy(&entry.value);
            let job_key = job_key(org, webhook, &job_id);
            let tracked = running.entry(entry.key.clone()).or_insert(Tracked {
                job_key: job_key.clone(),
                lease_until_ms: 0,
                held: None,
            });
            if tracked.job_key != job_key {
                // Its job was ended by someone else and a new one started.
                if let Some(stop) = tracked.held.take() {
                    stop.cancel();
                }
                tracked.job_key = job_key;
            }
            // New, or touched by a replica that let its lease go: look now.
            tracked.lease_until_ms = 0;
        }
        // The job ended or was cancelled: stop it if it is worked here.
        kv::Operation::Delete | kv::Operation::Purge => {
            if let Some(stop) = running.remove(&entry.key).and_then(|t| t.held) {
                stop.cancel();
            }
        }
    }
}

/// The organization and webhook of a marker key `<org>.<webhook>.running`.
fn marker_webhook(marker: &str) -> (&str, &str) {
    let mut parts = marker.splitn(3, '.');
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

fn since(ms: i64) -> Result<DeliverPolicy, Stop> {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(|start_time| DeliverPolicy::ByStartTime { start_time })
        .map_err(|e| Stop::Failed(e.to_string()))
}

/// An ordered read of one subject of a stream, from a start to what the
/// stream holds now. It fails rather than end early: a job reading a
/// window must see all of it.
struct ToNow {
    messages: jetstream::consumer::pull::Ordered,
    stream: jetstream::stream::Stream,
    pending: u64,
    what: &'static str,
}

impl ToNow {
    async fn open(
        js: &jetstream::Context,
        stream: &str,
        subject: String,
        from: DeliverPolicy,
        what: &'static str,
    ) -> Result<Self, Stop> {
        let failed = |e: &dyn std::fmt::Display| Stop::Failed(format!("reading {what}: {e}"));
        let stream = js.get_stream(stream).await.map_err(|e| failed(&e))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject,
                deliver_policy: from,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| failed(&e))?;
        Ok(Self {
            messages,
            stream,
            pending,
            what,
        })
    }

    /// The next message, or `None` past the last one there was at `open`.
    /// The stream ends or fails when this replica stops: the job is not
    /// finished then, another replica resumes it.
    async fn next(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<jetstream::Message>, Stop> {
        if self.pending == 0 {
            return Ok(None);
        }
        let what = self.what;
        let message = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Stop::Stopped),
                message = self.messages.next() => break message,
                _ = tokio::time::sleep(PROBE_AFTER) => {
                    if let Err(e) = self.stream.info().await {
                        return Err(Stop::Failed(format!("reading {what}: {e}")));
                    }
                }
            }
        };
        let message = match message {
            Some(Ok(message)) => message,
            _ if shutdown.is_cancelled() => return Err(Stop::Stopped),
            Some(Err(e)) => return Err(Stop::Failed(format!("reading {what}: {e}"))),
            None => return Err(Stop::Failed(format!("the {what} stream ended early"))),
        };
        self.pending = message.info().map(|i| i.pending).unwrap_or(0);
        Ok(Some(message))
    }
}

/// Follows the webhook's attempts from the job's creation and counts the
/// concluded deliveries of this job, once each. A broken read is resumed
/// where it stopped; after [`COUNT_TRIES`] failures in a row the job fails
/// with the reason instead of waiting for outcomes it can no longer see.
async fn count_outcomes(js: jetstream::Context, job: Job, counts: Arc<Counts>) {
    let mut seen: HashSet<DeliveryKey> = HashSet::new();
    let mut next_seq = 0;
    let mut failures = 0;
    let error = loop {
        let from = if next_seq > 0 {
            Ok(DeliverPolicy::ByStartSequence {
                start_sequence: next_seq,
            })
        } else {
            since(job.created_at_ms)
        };
        let Ok(from) = from else {
            break "the job's creation time is out of range".to_owned();
        };
        let before = next_seq;
        let error = follow_outcomes(&js, &job, from, &mut seen, &mut next_seq, &counts).await;
        if next_seq != before {
            failures = 0;
        }
        failures += 1;
        if failures >= COUNT_TRIES {
            break error;
        }
        tracing::warn!(%error, job_id = %job.id, "counting a job's outcomes failed; resuming");
        tokio::time::sleep(Duration::from_millis(500 << failures)).await;
    };
    let _ = counts
        .error
        .set(format!("cannot count the job's outcomes: {error}"));
}

/// One read of [`count_outcomes`], until it fails; why.
async fn follow_outcomes(
    js: &jetstream::Context,
    job: &Job,
    from: DeliverPolicy,
    seen: &mut HashSet<DeliveryKey>,
    next_seq: &mut u64,
    counts: &Counts,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let stream = match js.get_stream(names::ATTEMPTS_STREAM).await {
        Ok(stream) => stream,
        Err(e) => return format!("reading attempts: {e}"),
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: names::attempt_subject(&job.organization_id, &job.webhook_id),
            deliver_policy: from,
            ..Default::default()
        })
        .await;
    let mut messages = match consumer {
        Ok(consumer) => match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return format!("reading attempts: {e}"),
        },
        Err(e) => return format!("reading attempts: {e}"),
    };
    let mut stream = stream;
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = tokio::time::sleep(PROBE_AFTER) => match stream.info().await {
                Ok(_) => continue,
                Err(e) => return format!("reading attempts: {e}"),
            },
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(e)) => return format!("reading attempts: {e}"),
            None => return "the attempts stream ended".to_owned(),
        };
        if let Ok(info) = message.info() {
            *next_seq = info.stream_sequence + 1;
        }
        let Ok(a) = proto::AttemptResult::decode(message.payload.clone()) else {
            continue;
        };
        if a.job_id != job.id || !seen.insert(DeliveryKey::of(&a.delivery_id)) {
            continue;
        }
        match a.status() {
            proto::AttemptStatus::Succeeded => {
                counts.delivered.fetch_add(1, Relaxed);
            }
            proto::AttemptStatus::Failed | proto::AttemptStatus::Skipped => {
                counts.failed.fetch_add(1, Relaxed);
            }
            // Not concluded: wait for the attempt that concludes it.
            _ => {
                seen.remove(&DeliveryKey::of(&a.delivery_id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let now = payload::parse_rfc3339_ms("2026-12-02T10:00:00Z").unwrap();
        let w = |since: &str, until: Option<&str>| {
            window(since, until, now).map_err(|e| (e.field.unwrap_or_default(), e.message))
        };
        assert_eq!(w("2026-12-02T09:00:00Z", None), Ok((now - 3_600_000, now)));
        assert_eq!(
            w("2026-12-02T09:00:00Z", Some("2026-12-02T09:30:00Z")),
            Ok((now - 3_600_000, now - 1_800_000))
        );
        // An until in the future is now.
        assert_eq!(
            w("2026-12-02T09:00:00Z", Some("2027-01-01T00:00:00Z")),
            Ok((now - 3_600_000, now))
        );
        assert_eq!(w("yesterday", None).unwrap_err().0, "since");
        assert_eq!(w("2026-12-02T11:00:00Z", None).unwrap_err().0, "since");
        assert_eq!(
            w("2026-12-02T09:00:00Z", Some("2026-12-02T08:00:00Z"))
                .unwrap_err()
                .0,
            "until"
        );
    }
}
