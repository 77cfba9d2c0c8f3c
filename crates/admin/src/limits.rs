//! At most `HERALD_MAX_WEBHOOKS_PER_WORKFLOW` webhooks of an organization may
//! name the same workflow in their `workflow` filter (exact values; a glob
//! such as `invoice-*` counts as a workflow of its own).
//!
//! Counting and writing are not atomic, so a write that adds a workflow
//! holds the organization's lock while it counts and writes: a key in the
//! `herald-admin-locks` KV bucket, created with compare-and-set and holding
//! a lease, so a crashed admin blocks the organization for at most
//! [`LEASE`]. Two admin replicas creating the sixth webhook at once get one
//! 201 and one 400. The organization's own limit of webhooks
//! (`HERALD_MAX_WEBHOOKS_PER_ORG`) is counted under the same lock.
//!
//! Manual sends and API requests are rate-limited per API key ([`Limiter`]),
//! counted in Redis so that every replica shares one count.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use herald_core::proto;
use herald_core::rate::{Bucket, Rate};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::kv_map::KvMap;
use crate::organizations::{Limits, Organization};
use crate::{AppState, now_ms};
use herald_platform::redis::Redis;

pub const LOCKS_BUCKET: &str = "herald-admin-locks";
/// How long a lock holds when its holder never releases it.
pub const LEASE: Duration = Duration::from_secs(10);
/// How long a write waits for the lock before answering 409.
const WAIT: Duration = Duration::from_secs(5);

pub async fn open_locks(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, crate::kv_map::OpenError> {
    let description = "Herald admin: short-lived per-organization locks";
    let max_age = Duration::from_secs(3600);
    crate::kv_map::open(js, LOCKS_BUCKET, description, max_age, replicas).await
}

/// A held organization lock. Taken and released around one piece of work by
/// [`OrgLock::holding`], so no path forgets to release it (one that panics
/// leaves it to its lease).
pub struct OrgLock {
    kv: kv::Store,
    key: String,
    revision: u64,
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "locks bucket");
    ApiError::unavailable("webhook store unavailable, try again")
}

impl OrgLock {
    /// Runs `work` holding the organization's lock when `needed`, and
    /// releases it whatever `work` answers.
    pub async fn holding<T>(
        state: &AppState,
        org: &str,
        needed: bool,
        work: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        if !needed {
            return work.await;
        }
        let lock = Self::acquire(state, org).await?;
        let result = work.await;
        lock.release().await;
        result
    }

    async fn acquire(state: &AppState, org: &str) -> Result<Self, ApiError> {
        let kv = state.locks.clone();
        let key = format!("workflows.{org}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let lease = (now_ms() + LEASE.as_millis() as i64).to_string();
            match kv.create(&key, lease.clone().into()).await {
                Ok(revision) => return Ok(Self { kv, key, revision }),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Taken: take it over only when its lease ran out.
                    if let Some(entry) = kv.entry(&key).await.map_err(unavailable)? {
                        let expired = std::str::from_utf8(&entry.value)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                            .is_none_or(|until| until < now_ms());
                        if expired
                            && entry.operation == kv::Operation::Put
                            && let Ok(revision) =
                                kv.update(&key, lease.into(), entry.revision).await
                        {
                            return Ok(Self { kv, key, revision });
                        }
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "conflict",
                    "another change to this organization's webhooks is in progress; retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn release(self) {
        if let Err(error) = self
            .kv
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            tracing::warn!(%error, key = %self.key, "cannot release lock; its lease will expire");
        }
    }
}

/// The workflows a webhook names in its `workflow` filter.
pub fn workflows(webhook: &proto::Webhook) -> &[String] {
    webhook
        .filters
        .get("workflow")
        .map(|f| f.values.as_slice())
        .unwrap_or_default()
}

/// Refuses `webhook` when one of its workflows already has the maximum of
/// other webhooks. Call it holding the organization's [`OrgLock`].
pub async fn check_workflow_limit(
    state: &AppState,
    webhook: &proto::Webhook,
) -> Result<(), ApiError> {
    let mine = workflows(webhook);
    if mine.is_empty() {
        return Ok(());
    }
    let max = state.config.max_webhooks_per_workflow;
    state.store.caught_up().await?;
    let existing = state.store.list(&webhook.organization_id).await?;
    for workflow in mine {
        let count = existing
            .iter()
            .filter(|w| w.id != webhook.id)
            .filter(|w| workflows(w).contains(workflow))
            .count();
        if count >= max {
            return Err(ApiError::validation(
                "filters",
                format!(
                    "workflow {workflow:?} already has {count} webhooks, the maximum is {max} \
                     (HERALD_MAX_WEBHOOKS_PER_WORKFLOW)"
                ),
            ));
        }
    }
    Ok(())
}

/// A token bucket per caller, shared by every admin replica: counted in
/// Redis by one script (`LIMIT_SCRIPT`, Redis's own clock), so two replicas
/// allow what one does. While Redis is unreachable each replica counts in
/// its own memory (the admin API keeps serving without Redis). A caller
/// over it gets 429 with `Retry-After`. Two are used: manual sends
/// (`POST /webhooks/{id}/test`, `.../retry`, and starting `recover` or
/// `replay`) per API key (`HERALD_MANUAL_SENDS_PER_MINUTE`), so a key
/// holder cannot use Herald as an HTTP relay; and every authenticated
/// request per API key (`HERALD_API_REQUESTS_PER_MINUTE`), so one key
/// cannot take the API from the others. An organization's record may set
/// its own rates (`limits` in `organizations`); they apply to every key
/// acting for it. Herald sends what it asks receivers to honour.
pub struct Limiter {
    per_minute: u32,
    burst: fn(u32) -> u32,
    /// What is limited, for the refusal: "… a minute per …".
    what: &'static str,
    /// The Redis key's last part.
    name: &'static str,
    /// The organization's own rate, if it sets one.
    pick: fn(&Limits) -> Option<u32>,
    orgs: Option<KvMap<Organization>>,
    redis: Option<Redis>,
    /// Until when Redis is not asked again after it failed.
    redis_down_until: std::sync::Mutex<Option<std::time::Instant>>,
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

/// Callers remembered before full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;
/// After Redis failed, the limits are counted in memory this long before
/// Redis is tried again (so a down Redis does not slow every request).
const REDIS_RETRY: Duration = Duration::from_secs(2);

/// A token bucket in Redis: `KEYS[1]` holds `<units>:<at ms>` (a token is
/// 60000 units, `ARGV[2]` per minute add `ARGV[2]` units a millisecond, at
/// most `ARGV[1]` units), on Redis's clock. Answers 0 when a token was
/// taken, else the milliseconds until one is there. The key expires once
/// the bucket would be full again.
const LIMIT_SCRIPT: &str = r#"
local cap = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local units = cap
local at = now
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, ':', 1, true)
  if sep then
    units = tonumber(string.sub(v, 1, sep - 1)) or cap
    at = tonumber(string.sub(v, sep + 1)) or now
  end
end
local elapsed = now - at
if elapsed < 0 then elapsed = 0 end
units = math.min(units + elapsed * per, cap)
if units >= 60000 then
  units = units - 60000
  if now > at then at = now end
  local ttl = math.ceil((cap - units) / per) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', units, at), 'PX', ttl)
  return 0
end
return math.ceil((60000 - units) / per)
"#;

fn limit_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(LIMIT_SCRIPT))
}

/// Manual sends: bursts of up to 20.
fn manual_burst(per_minute: u32) -> u32 {
    per_minute.clamp(1, 20)
}

/// API requests: bursts of a tenth of the minute's rate, at least 10 but
/// never more than the minute's rate.
fn request_burst(per_minute: u32) -> u32 {
    (per_minute / 10).max(10).min(per_minute)
}

impl Limiter {
    /// Test events, manual retries, recovers and replays per key.
    pub fn manual_sends(per_minute: u32, redis: Redis, orgs: KvMap<Organization>) -> Self {
        Self {
            per_minute,
            burst: manual_burst,
            what: "test events, manual retries, recovers and replays a minute per API key \
                   (HERALD_MANUAL_SENDS_PER_MINUTE, or the organization's limit)",
            name: "manual",
            pick: |l| l.manual_sends_per_minute,
            orgs: Some(orgs),
            redis: Some(redis),
            redis_down_until: Default::default(),
            buckets: Default::default(),
        }
    }

    /// Every authenticated request per key.
    pub fn api_requests(per_minute: u32, redis: Redis, orgs: KvMap<Organization>) -> Self {
        Self {
            per_minute,
            burst: request_burst,
            what: "API requests a minute per API key (HERALD_API_REQUESTS_PER_MINUTE, \
                   or the organization's limit)",
            name: "requests",
            pick: |l| l.requests_per_minute,
            orgs: Some(orgs),
            redis: Some(redis),
            redis_down_until: Default::default(),
            buckets: Default::default(),
        }
    }

    /// The rate that applies to `caller`: its organization's, else the
    /// default.
    fn rate(&self, org: &str) -> Rate {
        let per_minute = self
            .orgs
            .as_ref()
            .and_then(|orgs| orgs.get(org))
            .and_then(|o| (self.pick)(&o.limits))
            .unwrap_or(self.per_minute);
        Rate {
            per_minute,
            burst: (self.burst)(per_minute).max(1),
        }
    }

    /// Takes one token of `caller`'s key, or refuses with 429.
    pub async fn take(&self, caller: &Caller) -> Result<(), ApiError> {
        let rate = self.rate(&caller.org);
        let waited = match self.take_shared(&caller.key, rate).await {
            Some(wait_ms) => wait_ms,
            None => self.take_local(&caller.key, rate, now_ms()),
        };
        match waited {
            0 => Ok(()),
            wait_ms => Err(ApiError::rate_limited(
                format!("at most {} {}", rate.per_minute, self.what),
                wait_ms,
            )),
        }
    }

    /// In Redis: `Some(0)` taken, `Some(wait)` refused, `None` when Redis
    /// cannot answer.
    async fn take_shared(&self, who: &str, rate: Rate) -> Option<u64> {
        let redis = self.redis.as_ref()?;
        {
            let down = self
                .redis_down_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if down.is_some_and(|until| std::time::Instant::now() < until) {
                return None;
            }
        }
        let key = format!("herald:limit:{{{who}}}:{}", self.name);
        let capacity = i64::from(rate.burst) * 60_000;
        let answer = redis
            .run("rate limit", |mut conn| async move {
                limit_script()
                    .key(key)
                    .arg(capacity)
                    .arg(rate.per_minute)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if answer.is_none() {
            *self
                .redis_down_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now() + REDIS_RETRY);
        }
        answer.map(|wait| wait.max(0) as u64)
    }

    /// In this replica's memory: 0 taken, else the wait.
    fn take_local(&self, who: &str, rate: Rate, now_ms: i64) -> u64 {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, b| !rate.refilled(b, now_ms));
        }
        let bucket = buckets
            .get(who)
            .copied()
            .unwrap_or_else(|| rate.full(now_ms));
        match rate.take(bucket, now_ms) {
            Ok(after) => {
                buckets.insert(who.to_owned(), after);
                0
            }
            Err(wait_ms) => wait_ms.max(1),
        }
    }
}

/// Refuses a new webhook when the organization already has the maximum
/// (`HERALD_MAX_WEBHOOKS_PER_ORG`). Call it holding the organization's
/// [`OrgLock`].
pub async fn check_org_limit(state: &AppState, org: &str) -> Result<(), ApiError> {
    let max = crate::organizations::limit(state, org, |l| l.max_webhooks)
        .map_or(state.config.max_webhooks_per_org, |n| n as usize);
    state.store.caught_up().await?;
    let count = state.store.count(org).await?;
    if count >= max {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "limit_reached",
            format!(
                "the organization already has {count} webhooks, the maximum is {max} \
                 (HERALD_MAX_WEBHOOKS_PER_ORG, or the organization's limit)"
            ),
        ));
    }
    Ok(())
}
