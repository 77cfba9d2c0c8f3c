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
//! Manual sends and API requests are rate-limited per API key ([`Limiter`]).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use herald_core::proto;
use herald_core::rate::{Bucket, Rate};

use crate::error::ApiError;
use crate::{AppState, now_ms};

pub const LOCKS_BUCKET: &str = "herald-admin-locks";
/// How long a lock holds when its holder never releases it.
pub const LEASE: Duration = Duration::from_secs(10);
/// How long a write waits for the lock before answering 409.
const WAIT: Duration = Duration::from_secs(5);

pub async fn open_locks(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, String> {
    match js.get_key_value(LOCKS_BUCKET).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: LOCKS_BUCKET.into(),
                description: "Herald admin: short-lived per-organization locks".into(),
                history: 1,
                max_age: Duration::from_secs(3600),
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
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

/// A token bucket per caller, counted in this admin replica; a caller over
/// it gets 429 with `Retry-After`. Two are used: manual sends
/// (`POST /webhooks/{id}/test`, `.../retry`, and starting `recover` or
/// `replay`) per API key (`HERALD_MANUAL_SENDS_PER_MINUTE`), so a key
/// holder cannot use Herald as an HTTP relay; and every authenticated request per API key
/// (`HERALD_API_REQUESTS_PER_MINUTE`), so one key cannot take the API from
/// the others. Herald sends what it asks receivers to honour.
pub struct Limiter {
    rate: Rate,
    /// What is limited, for the refusal: "… a minute per …".
    what: &'static str,
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

/// Callers remembered before full buckets are forgotten.
const MAX_TRACKED: usize = 10_000;

impl Limiter {
    pub fn new(per_minute: u32, burst: u32, what: &'static str) -> Self {
        Self {
            rate: Rate {
                per_minute,
                burst: burst.max(1),
            },
            what,
            buckets: Default::default(),
        }
    }

    /// Manual sends: bursts of up to 20.
    pub fn manual_sends(per_minute: u32) -> Self {
        Self::new(
            per_minute,
            per_minute.clamp(1, 20),
            "test events, manual retries, recovers and replays a minute per API key \
             (HERALD_MANUAL_SENDS_PER_MINUTE)",
        )
    }

    /// API requests per key: bursts of up to a tenth of the minute's rate.
    pub fn api_requests(per_minute: u32) -> Self {
        Self::new(
            per_minute,
            (per_minute / 10).max(10),
            "API requests a minute per API key (HERALD_API_REQUESTS_PER_MINUTE)",
        )
    }

    pub fn take(&self, who: &str, now_ms: i64) -> Result<(), ApiError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, b| !self.rate.refilled(b, now_ms));
        }
        let bucket = buckets
            .get(who)
            .copied()
            .unwrap_or_else(|| self.rate.full(now_ms));
        match self.rate.take(bucket, now_ms) {
            Ok(after) => {
                buckets.insert(who.to_owned(), after);
                Ok(())
            }
            Err(wait_ms) => Err(ApiError::rate_limited(
                format!("at most {} {}", self.rate.per_minute, self.what),
                wait_ms,
            )),
        }
    }
}

/// Refuses a new webhook when the organization already has the maximum
/// (`HERALD_MAX_WEBHOOKS_PER_ORG`). Call it holding the organization's
/// [`OrgLock`].
pub async fn check_org_limit(state: &AppState, org: &str) -> Result<(), ApiError> {
    let max = state.config.max_webhooks_per_org;
    state.store.caught_up().await?;
    let count = state.store.count(org).await?;
    if count >= max {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "limit_reached",
            format!(
                "the organization already has {count} webhooks, the maximum is {max} \
                 (HERALD_MAX_WEBHOOKS_PER_ORG)"
            ),
        ));
    }
    Ok(())
}
