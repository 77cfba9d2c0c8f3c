//! Recover and replay (PRODUCT.md, "Recover and replay"): a job that sends a
//! webhook every delivery it missed, or every retained event it matches now.
//!
//! A job is a JSON record in the `herald-jobs` KV bucket
//! (`<org>.<webhook>.<job>`), and `<org>.<webhook>.running` names the one
//! running job of a webhook (created atomically: a second job is a 409).
//! Every admin replica runs a [`Runner`]: it claims a running job whose lease
//! has lapsed (compare-and-set on the record), queues its deliveries to
//! `HERALD_DELIVERIES` a few at a time — never more than [`PACE`] waiting for
//! their outcome, so a job of 100,000 deliveries never crowds out live
//! traffic — and saves its progress (a stream sequence) with the lease, so
//! a crashed replica's job is resumed by another from where it was.
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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{self, kv};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::{StreamExt, TryStreamExt};
use herald_core::matching::Subscription;
use herald_core::recovery::Recovery;
use herald_core::{ids, matching, names, payload, proto};
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
/// How often a runner looks for jobs to claim.
const SCAN_EVERY: Duration = Duration::from_secs(1);
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
    /// `running`, `done` or `failed`.
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

pub async fn open_bucket(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, String> {
    match js.get_key_value(JOBS_BUCKET).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: JOBS_BUCKET.into(),
                description: "Herald: recover and replay jobs".into(),
                history: 1,
                max_age: KEEP_FINISHED,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/webhooks/{id}/recover", post(recover))
        .route("/webhooks/{id}/replay", post(replay))
        .route("/webhooks/{id}/jobs/{job_id}", get(get_job))
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
    state.manual_sends.take(&caller.key, now)?;
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
    let running = running_key(&caller.org, &webhook.id);
    // At most one running job per webhook: the marker is created atomically.
    loop {
        match state.jobs.create(&running, job.id.clone().into()).await {
            Ok(_) => break,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = state
                    .jobs
                    .get(&running)
                    .await
                    .map_err(|e| unavailable(&e))?;
                let Some(holder) = holder else { continue };
                let holder = String::from_utf8_lossy(&holder).into_owned();
                let other = read(state, &caller.org, &webhook.id, &holder).await?;
                match other {
                    Some(other) if other.status == "running" => {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            "job_running",
                            format!(
                                "job {holder} is running for this webhook; wait for it to finish"
                            ),
                        ));
                    }
                    // A marker its job outlived: clear it and try again.
                    _ => {
                        let _ = state.jobs.delete(&running).await;
                    }
                }
            }
            Err(e) => return Err(unavailable(&e)),
        }
    }
    let encoded = serde_json::to_vec(&job).expect("a job serializes");
    if let Err(e) = state.jobs.put(job.key(), encoded.into()).await {
        let _ = state.jobs.delete(&running).await;
        return Err(unavailable(&e));
    }
    Ok((StatusCode::ACCEPTED, Json(job.to_json())))
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

/// Claims and runs jobs on this replica until `shutdown`.
pub struct Runner {
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub store: herald_platform::webhooks::WebhookStore,
    pub owner: String,
}

impl Runner {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut held: HashSet<String> = HashSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SCAN_EVERY) => {}
            }
            while let Ok(key) = done_rx.try_recv() {
                held.remove(&key);
            }
            let Ok(keys) = self.jobs.keys().await else {
                continue;
            };
            let keys: Vec<String> = keys.try_collect().await.unwrap_or_default();
            for key in keys.into_iter().filter(|k| !k.ends_with(".running")) {
                if held.contains(&key) {
                    continue;
                }
                let Some((job, revision)) = self.claim(&key).await else {
                    continue;
                };
                held.insert(key.clone());
                let (this, token, done) = (self.clone(), shutdown.clone(), done_tx.clone());
                tokio::spawn(async move {
                    this.drive(job, revision, token).await;
                    let _ = done.send(key);
                });
            }
        }
    }

    /// The job at `key` if it is running and its lease lapsed, now ours.
    async fn claim(&self, key: &str) -> Option<(Job, u64)> {
        let entry = self.jobs.entry(key).await.ok()??;
        let mut job: Job = serde_json::from_slice(&entry.value).ok()?;
        let now = now_ms();
        if job.status != "running" || job.lease_until_ms > now {
            return None;
        }
        job.lease_owner = self.owner.clone();
        job.lease_until_ms = now + LEASE_MS;
        let revision = self
            .jobs
            .update(key, serde_json::to_vec(&job).ok()?.into(), entry.revision)
            .await
            .ok()?;
        Some((job, revision))
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

    async fn drive(&self, mut job: Job, mut revision: u64, shutdown: CancellationToken) {
        let counts = Arc::new(Counts::default());
        let counting = tokio::spawn(count_outcomes(self.js.clone(), job.clone(), counts.clone()));
        let result = async {
            if !job.queued_all {
                match job.kind.as_str() {
                    "replay" => {
                        self.queue_replay(&mut job, &mut revision, &counts, &shutdown)
                            .await?
                    }
                    _ => {
                        self.queue_recover(&mut job, &mut revision, &counts, &shutdown)
                            .await?
                    }
                }
                job.queued_all = true;
            }
            // Wait for the outcomes of what was queued.
            loop {
                counts.read_into(&mut job);
                if job.delivered + job.failed >= job.queued {
                    return Ok(());
                }
                revision = self.save(&mut job, revision).await.ok_or(Stop::Lost)?;
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Stop::Shutdown),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
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
            // Another replica has it, or it resumes after a restart.
            Err(Stop::Lost) | Err(Stop::Shutdown) => {
                if matches!(result, Err(Stop::Shutdown)) {
                    job.lease_until_ms = 0;
                    let _ = self
                        .jobs
                        .update(
                            job.key(),
                            serde_json::to_vec(&job).unwrap_or_default().into(),
                            revision,
                        )
                        .await;
                }
                return;
            }
        }
        job.finished_at_ms = now_ms();
        if self.save(&mut job, revision).await.is_some() {
            let _ = self
                .jobs
                .delete(running_key(&job.organization_id, &job.webhook_id))
                .await;
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
        shutdown: &CancellationToken,
    ) -> Result<(), Stop> {
        loop {
            counts.read_into(job);
            // Progress is saved (and the lease renewed) about once a second:
            // `save` sets the lease to LEASE_MS from then.
            if now_ms() > job.lease_until_ms - LEASE_MS + SAVE_EVERY_MS {
                *revision = self.save(job, *revision).await.ok_or(Stop::Lost)?;
            }
            if job.queued < job.delivered + job.failed + PACE {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Stop::Shutdown),
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
            let delivery = proto::DeliveryJob {
                delivery_id: delivery_id.clone(),
                organization_id: job.organization_id.clone(),
                webhook_id: webhook.id.clone(),
                event: Some(event),
                attempt: 1,
                kind: proto::DeliveryKind::Replay as i32,
                event_seq: seq,
                job_id: job.id.clone(),
                ..Default::default()
            };
            self.publish(&delivery, &ids::job_msg_id(&delivery_id, 1))
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
        self.webhook(job).await?;
        let mut recovery = Recovery::new(job.since_ms, job.until_ms);
        // Deliveries this job already queued (it is resuming): their own
        // attempts are the latest of each, so one that this job already
        // delivered is no candidate any more.
        let mut own = HashSet::new();
        for a in attempts_since(&self.js, job, job.since_ms, shutdown).await? {
            if a.job_id == job.id {
                own.insert(a.delivery_id.clone());
            }
            recovery.observe(&a);
        }
        let candidates = recovery.candidates();
        let again: HashSet<&str> = candidates.iter().map(|c| c.delivery_id.as_str()).collect();
        job.queued = own.iter().filter(|d| !again.contains(d.as_str())).count() as u64;
        let accepted = self
            .js
            .get_stream(names::ACCEPTED_STREAM)
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?;
        for candidate in candidates {
            let event = match &candidate.event {
                Some(event) => event.clone(),
                None => match accepted.get_raw_message(candidate.event_seq).await {
                    Ok(m) => match proto::Event::decode(m.payload.as_ref()) {
                        Ok(e) if e.id == candidate.event_id => e,
                        _ => continue,
                    },
                    // No longer retained: nothing to send.
                    Err(_) => continue,
                },
            };
            self.pace(job, revision, counts, shutdown).await?;
            let delivery = proto::DeliveryJob {
                delivery_id: candidate.delivery_id.clone(),
                organization_id: job.organization_id.clone(),
                webhook_id: job.webhook_id.clone(),
                event: Some(event),
                attempt: candidate.attempt + 1,
                kind: proto::DeliveryKind::Recover as i32,
                event_seq: candidate.event_seq,
                job_id: job.id.clone(),
                // Its deadline starts now: it is one attempt, made today.
                ..Default::default()
            };
            let msg_id = format!(
                "{}.{}.{}",
                candidate.delivery_id,
                candidate.attempt + 1,
                job.id
            );
            self.publish(&delivery, &msg_id).await?;
            job.queued += 1;
        }
        Ok(())
    }

    async fn publish(&self, delivery: &proto::DeliveryJob, msg_id: &str) -> Result<(), Stop> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
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

enum Stop {
    Failed(String),
    Lost,
    Shutdown,
}

/// Outcomes counted from the attempts stream.
#[derive(Default)]
struct Counts {
    delivered: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl Counts {
    fn read_into(&self, job: &mut Job) {
        use std::sync::atomic::Ordering::Relaxed;
        job.delivered = self.delivered.load(Relaxed);
        job.failed = self.failed.load(Relaxed);
    }
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
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Err(Stop::Shutdown),
            message = self.messages.next() => message,
        };
        let what = self.what;
        let message = match message {
            Some(Ok(message)) => message,
            _ if shutdown.is_cancelled() => return Err(Stop::Shutdown),
            Some(Err(e)) => return Err(Stop::Failed(format!("reading {what}: {e}"))),
            None => return Err(Stop::Failed(format!("the {what} stream ended early"))),
        };
        self.pending = message.info().map(|i| i.pending).unwrap_or(0);
        Ok(Some(message))
    }
}

/// The webhook's attempts from `since_ms` to the end of the stream as it is
/// now, decoded, in order; all of them or an error (a partial read would
/// take a delivery that later succeeded for a failed one).
async fn attempts_since(
    js: &jetstream::Context,
    job: &Job,
    since_ms: i64,
    shutdown: &CancellationToken,
) -> Result<Vec<proto::AttemptResult>, Stop> {
    let mut attempts = ToNow::open(
        js,
        names::ATTEMPTS_STREAM,
        names::attempt_subject(&job.organization_id, &job.webhook_id),
        since(since_ms)?,
        "attempts",
    )
    .await?;
    let mut out = Vec::new();
    while let Some(message) = attempts.next(shutdown).await? {
        if let Ok(a) = proto::AttemptResult::decode(message.payload.clone()) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Follows the webhook's attempts from the job's creation and counts the
/// concluded deliveries of this job, once each.
async fn count_outcomes(js: jetstream::Context, job: Job, counts: Arc<Counts>) {
    use std::sync::atomic::Ordering::Relaxed;
    let Ok(stream) = js.get_stream(names::ATTEMPTS_STREAM).await else {
        return;
    };
    let Ok(from) = since(job.created_at_ms) else {
        return;
    };
    let Ok(consumer) = stream
        .create_consumer(OrderedConfig {
            filter_subject: names::attempt_subject(&job.organization_id, &job.webhook_id),
            deliver_policy: from,
            ..Default::default()
        })
        .await
    else {
        return;
    };
    let Ok(mut messages) = consumer.messages().await else {
        return;
    };
    let mut seen = HashSet::new();
    while let Some(Ok(message)) = messages.next().await {
        let Ok(a) = proto::AttemptResult::decode(message.payload.clone()) else {
            continue;
        };
        if a.job_id != job.id || !seen.insert(a.delivery_id.clone()) {
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
                seen.remove(&a.delivery_id);
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
