//! The delivery-log index in Redis: written by log-writer, read by admin.
//!
//! - `herald:log:<log_id>`: the attempt (protobuf), expiring after the
//!   retention period.
//! - Sorted sets of log ids scored by attempt time, one per query the API
//!   answers: per webhook (`herald:logs:w:<org>:<webhook>`), per webhook and
//!   status (`...:s:<status>`), per organization (`herald:logs:o:<org>`) and
//!   per organization and event type (`herald:logs:t:<org>:<type>`).
//!
//! Writes are idempotent (same member, same score), so an attempt delivered
//! twice is stored once. Entries older than the retention are trimmed on
//! write and ignored on read; each webhook keeps at most `max_per_webhook`.
//! Everything here can be rebuilt from the attempts stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::proto;
use prost::Message;

use crate::redis::Redis;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("redis unavailable")]
    Unavailable,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub fn status_name(status: proto::AttemptStatus) -> &'static str {
    match status {
        proto::AttemptStatus::Succeeded => "succeeded",
        proto::AttemptStatus::Failed => "failed",
        proto::AttemptStatus::Retrying => "retrying",
        proto::AttemptStatus::Skipped => "skipped",
        proto::AttemptStatus::Unspecified => "unknown",
    }
}

pub const STATUSES: &[&str] = &["succeeded", "failed", "retrying", "skipped"];

/// Which attempts a query reads.
#[derive(Debug, Clone)]
pub enum Scope {
    Webhook {
        org: String,
        webhook_id: String,
        status: Option<String>,
    },
    Organization {
        org: String,
        event_type: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Page {
    pub total: u64,
    pub items: Vec<proto::AttemptResult>,
}

#[derive(Debug, Clone)]
pub struct LogIndex {
    redis: Redis,
    retention: Duration,
    max_per_webhook: usize,
}

fn entry_key(log_id: &str) -> String {
    format!("herald:log:{log_id}")
}

fn webhook_key(org: &str, webhook_id: &str) -> String {
    format!("herald:logs:w:{org}:{webhook_id}")
}

fn webhook_status_key(org: &str, webhook_id: &str, status: &str) -> String {
    format!("herald:logs:w:{org}:{webhook_id}:s:{status}")
}

fn org_key(org: &str) -> String {
    format!("herald:logs:o:{org}")
}

fn org_type_key(org: &str, event_type: &str) -> String {
    format!("herald:logs:t:{org}:{event_type}")
}

/// Set once the index holds everything of the attempts stream it should;
/// missing after a Redis loss, which makes log-writer rebuild.
pub const BUILT_MARKER: &str = "herald:logs:built";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl LogIndex {
    pub fn new(redis: Redis, retention: Duration, max_per_webhook: usize) -> Self {
        Self {
            redis,
            retention,
            max_per_webhook,
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn cutoff_ms(&self) -> i64 {
        now_ms() - self.retention.as_millis() as i64
    }

    /// Stores a batch of attempts in one round trip.
    pub async fn write(&self, attempts: &[proto::AttemptResult]) -> Result<(), IndexError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut conn = self.redis.conn().await.ok_or(IndexError::Unavailable)?;
        let cutoff = self.cutoff_ms();
        let ttl = self.retention.as_secs().max(1);
        let mut pipe = redis::pipe();
        let mut touched = std::collections::BTreeSet::new();
        for a in attempts {
            if a.attempted_at_ms < cutoff {
                continue;
            }
            let age_s = ((now_ms() - a.attempted_at_ms).max(0) / 1000) as u64;
            pipe.set_ex(
                entry_key(&a.log_id),
                a.encode_to_vec(),
                ttl.saturating_sub(age_s).max(1),
            )
            .ignore();
            let status = status_name(a.status());
            for key in [
                webhook_key(&a.organization_id, &a.webhook_id),
                webhook_status_key(&a.organization_id, &a.webhook_id, status),
                org_key(&a.organization_id),
                org_type_key(&a.organization_id, &a.event_type),
            ] {
                pipe.zadd(&key, &a.log_id, a.attempted_at_ms).ignore();
                touched.insert(key);
            }
        }
        for key in &touched {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({cutoff}"))
                .ignore();
            if key.starts_with("herald:logs:w:") {
                pipe.cmd("ZREMRANGEBYRANK")
                    .arg(key)
                    .arg(0)
                    .arg(-(self.max_per_webhook as i64) - 1)
                    .ignore();
            }
            pipe.expire(key, ttl as i64).ignore();
        }
        tokio::time::timeout(self.redis.timeout() * 4, pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| IndexError::Unavailable)??;
        Ok(())
    }

    /// Attempts newest first, with the total count of the scope.
    pub async fn page(
        &self,
        scope: &Scope,
        limit: usize,
        offset: usize,
    ) -> Result<Page, IndexError> {
        let mut conn = self.redis.conn().await.ok_or(IndexError::Unavailable)?;
        let key = match scope {
            Scope::Webhook {
                org,
                webhook_id,
                status: None,
            } => webhook_key(org, webhook_id),
            Scope::Webhook {
                org,
                webhook_id,
                status: Some(s),
            } => webhook_status_key(org, webhook_id, s),
            Scope::Organization {
                org,
                event_type: None,
            } => org_key(org),
            Scope::Organization {
                org,
                event_type: Some(t),
            } => org_type_key(org, t),
        };
        let cutoff = self.cutoff_ms();
        let (total, ids): (u64, Vec<String>) = redis::pipe()
            .cmd("ZCOUNT")
            .arg(&key)
            .arg(cutoff)
            .arg("+inf")
            .cmd("ZREVRANGEBYSCORE")
            .arg(&key)
            .arg("+inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(offset)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        let items = self.load(&mut conn, &ids).await?;
        Ok(Page { total, items })
    }

    async fn load(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        ids: &[String],
    ) -> Result<Vec<proto::AttemptResult>, IndexError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| entry_key(id)).collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        Ok(values
            .into_iter()
            .flatten()
            .filter_map(|bytes| proto::AttemptResult::decode(bytes.as_slice()).ok())
            .collect())
    }

    /// One attempt in full.
    pub async fn get(&self, log_id: &str) -> Result<Option<proto::AttemptResult>, IndexError> {
        let mut conn = self.redis.conn().await.ok_or(IndexError::Unavailable)?;
        Ok(self.load(&mut conn, &[log_id.to_owned()]).await?.pop())
    }
}
