//! The delivery-log index in Redis: written by log-writer, read by admin.
//!
//! - `herald:log:<log_id>`: a hash holding the attempt (`pb`, protobuf),
//!   its summary (`s`: the attempt without request, response headers and
//!   bodies, or event — what a list shows, a tenth of the bytes) and its
//!   event type (`t`, so that an evicted entry can be taken out of its
//!   event-type list), expiring when the attempt leaves the retention.
//! - Sorted sets of log ids scored by attempt time, one per query the API
//!   answers: per webhook (`herald:logs:w:<org>:<webhook>`), per webhook and
//!   status (`...:s:<status>`), per organization (`herald:logs:o:<org>`) and
//!   per organization and event type (`herald:logs:t:<org>:<type>`).
//!
//! Each attempt is written by one Lua script, so its five keys change
//! together. Writes are idempotent (same member, same score, same value):
//! an attempt delivered twice is stored once. Entries older than the
//! retention are trimmed on write and ignored on read, and every key expires
//! with the retention, so an idle webhook's logs go away by themselves.
//! Each webhook keeps at most `max_per_webhook` attempts: the oldest beyond
//! that are deleted from every list they are in, which bounds the memory a
//! busy webhook can take.
//!
//! A page is one script too: count, ranks and entries in one round trip,
//! reading by rank from the newest end (O(log n + limit), whatever the
//! offset).
//!
//! Everything here can be rebuilt from the attempts stream; [`BUILT_MARKER`]
//! says that it was.

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
    #[error("unexpected answer from redis: {0}")]
    Answer(String),
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

/// The statuses a log query may filter on.
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

impl Scope {
    fn key(&self) -> String {
        match self {
            Scope::Webhook {
                org,
                webhook_id,
                status: None,
            } => webhook_key(org, webhook_id),
            Scope::Webhook {
                org,
                webhook_id,
                status: Some(s),
            } => format!("{}:s:{s}", webhook_key(org, webhook_id)),
            Scope::Organization {
                org,
                event_type: None,
            } => format!("herald:logs:o:{org}"),
            Scope::Organization {
                org,
                event_type: Some(t),
            } => format!("herald:logs:t:{org}:{t}"),
        }
    }
}

/// One page of attempts, newest first, and how many the scope holds. The
/// attempts are summaries: no request, no response headers or body, no
/// event ([`LogIndex::get`] has those).
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

fn webhook_key(org: &str, webhook_id: &str) -> String {
    format!("herald:logs:w:{org}:{webhook_id}")
}

/// Set once the index holds everything of the attempts stream it should;
/// missing after a Redis loss, which makes log-writer rebuild.
pub const BUILT_MARKER: &str = "herald:logs:built";

/// Held (with a token) by the log-writer replica that rebuilds the index; it
/// vanishes with everything else when Redis loses its data, which is how a
/// rebuild learns that what it wrote so far is gone.
pub const REBUILD_LOCK: &str = "herald:logs:rebuilding";

/// ARGV: log id, org, webhook, status, event type, score (ms), attempt
/// (protobuf), entry ttl (s), list ttl (s), cutoff (ms), max per webhook,
/// summary (protobuf).
const WRITE_SCRIPT: &str = r"
local id, org, wh, status, etype = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local score, ttl, list_ttl = ARGV[6], tonumber(ARGV[8]), tonumber(ARGV[9])
local cutoff, max = ARGV[10], tonumber(ARGV[11])
local entry = 'herald:log:' .. id
redis.call('HSET', entry, 'pb', ARGV[7], 's', ARGV[12], 't', etype)
redis.call('EXPIRE', entry, ttl)
local wk = 'herald:logs:w:' .. org .. ':' .. wh
local ok = 'herald:logs:o:' .. org
for _, key in ipairs({wk, wk .. ':s:' .. status, ok, 'herald:logs:t:' .. org .. ':' .. etype}) do
  redis.call('ZADD', key, score, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. cutoff)
  redis.call('EXPIRE', key, list_ttl)
end
local over = redis.call('ZCARD', wk) - max
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', wk, 0, over - 1)) do
    local old_entry = 'herald:log:' .. old
    local old_type = redis.call('HGET', old_entry, 't')
    redis.call('ZREM', wk, old)
    for _, s in ipairs({'succeeded', 'failed', 'retrying', 'skipped', 'unknown'}) do
      redis.call('ZREM', wk .. ':s:' .. s, old)
    end
    redis.call('ZREM', ok, old)
    if old_type then
      redis.call('ZREM', 'herald:logs:t:' .. org .. ':' .. old_type, old)
    end
    redis.call('DEL', old_entry)
  end
end
return 1
";

/// KEYS: the list. ARGV: cutoff (ms), offset, limit. Answers the total,
/// then the attempts of the page.
const PAGE_SCRIPT: &str = r"
local total = redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {total}
if offset >= total or limit <= 0 then return out end
local last = math.min(offset + limit, total) - 1
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], offset, last)) do
  local entry = 'herald:log:' .. id
  local s = redis.call('HGET', entry, 's') or redis.call('HGET', entry, 'pb')
  if s then out[#out + 1] = s end
end
return out
";

/// KEYS: lock. ARGV: token, ttl (s). Takes the lock if free or ours.
const LOCK_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
";

/// KEYS: lock. ARGV: token, ttl (s). Extends the lock if still ours.
const KEEP_LOCK_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// KEYS: lock, marker. ARGV: token. Sets the marker if the lock is still
/// ours (so Redis kept everything the rebuild wrote), and releases it.
const FINISH_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], '1')
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// What a list shows of an attempt.
pub fn summary(a: &proto::AttemptResult) -> proto::AttemptResult {
    proto::AttemptResult {
        request: None,
        response: a.response.as_ref().map(|r| proto::HttpResponse {
            status: r.status,
            ..Default::default()
        }),
        event: None,
        ..a.clone()
    }
}

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

    pub fn retention(&self) -> Duration {
        self.retention
    }

    fn cutoff_ms(&self) -> i64 {
        now_ms() - self.retention.as_millis() as i64
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, IndexError> {
        self.redis.conn().await.ok_or(IndexError::Unavailable)
    }

    /// Bounds a Redis call by the connection's timeout (scaled for big
    /// batches), so a hung Redis is an error, not a stall.
    async fn bounded<T>(
        &self,
        scale: u32,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, IndexError> {
        tokio::time::timeout(self.redis.timeout() * scale, call)
            .await
            .map_err(|_| IndexError::Unavailable)?
            .map_err(IndexError::from)
    }

    /// Stores a batch of attempts in one round trip. Attempts already older
    /// than the retention are skipped.
    pub async fn write(&self, attempts: &[proto::AttemptResult]) -> Result<(), IndexError> {
        let now = now_ms();
        let cutoff = now - self.retention.as_millis() as i64;
        let retention_s = self.retention.as_secs().max(1) as i64;
        let script = redis::Script::new(WRITE_SCRIPT);
        let mut pipe = redis::pipe();
        pipe.load_script(&script).ignore();
        let mut count = 0usize;
        for a in attempts.iter().filter(|a| a.attempted_at_ms >= cutoff) {
            // The entry lives as long as the attempt stays in the retention.
            let left_ms = a.attempted_at_ms + self.retention.as_millis() as i64 - now;
            let ttl = (left_ms / 1000).clamp(1, retention_s);
            let mut invocation = script.prepare_invoke();
            invocation
                .arg(&a.log_id)
                .arg(&a.organization_id)
                .arg(&a.webhook_id)
                .arg(status_name(a.status()))
                .arg(&a.event_type)
                .arg(a.attempted_at_ms)
                .arg(a.encode_to_vec())
                .arg(ttl)
                .arg(retention_s)
                .arg(cutoff)
                .arg(self.max_per_webhook.min(i64::MAX as usize) as i64)
                .arg(summary(a).encode_to_vec());
            pipe.invoke_script(&invocation).ignore();
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let scale = 4 + (count / 100) as u32;
        self.bounded(scale, pipe.query_async::<()>(&mut conn)).await
    }

    /// Attempts newest first, with the total count of the scope.
    pub async fn page(
        &self,
        scope: &Scope,
        limit: usize,
        offset: usize,
    ) -> Result<Page, IndexError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(PAGE_SCRIPT);
        let mut invocation = script.key(scope.key());
        invocation.arg(self.cutoff_ms()).arg(offset).arg(limit);
        let answer: Vec<redis::Value> = self.bounded(4, invocation.invoke_async(&mut conn)).await?;
        let mut answer = answer.into_iter();
        let total = match answer.next() {
            Some(redis::Value::Int(n)) => n.max(0) as u64,
            other => return Err(IndexError::Answer(format!("{other:?}"))),
        };
        let items = answer
            .filter_map(|v| match v {
                redis::Value::BulkString(bytes) => {
                    proto::AttemptResult::decode(bytes.as_slice()).ok()
                }
                _ => None,
            })
            .collect();
        Ok(Page { total, items })
    }

    /// One attempt in full, if it is still kept.
    pub async fn get(&self, log_id: &str) -> Result<Option<proto::AttemptResult>, IndexError> {
        let mut conn = self.conn().await?;
        let cmd = redis::cmd("HGET")
            .arg(format!("herald:log:{log_id}"))
            .arg("pb")
            .clone();
        let bytes: Option<Vec<u8>> = self.bounded(1, cmd.query_async(&mut conn)).await?;
        Ok(bytes
            .and_then(|b| proto::AttemptResult::decode(b.as_slice()).ok())
            .filter(|a| a.attempted_at_ms >= self.cutoff_ms()))
    }

    /// Whether the index is complete (no rebuild needed).
    pub async fn is_built(&self) -> Result<bool, IndexError> {
        let mut conn = self.conn().await?;
        let cmd = redis::cmd("EXISTS").arg(BUILT_MARKER).clone();
        self.bounded(1, cmd.query_async(&mut conn)).await
    }

    /// Takes the rebuild lock for `token` (free, or already `token`'s),
    /// unless another rebuild holds it.
    pub async fn lock_rebuild(&self, token: &str, ttl: Duration) -> Result<bool, IndexError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(LOCK_SCRIPT);
        let mut invocation = script.key(REBUILD_LOCK);
        invocation.arg(token).arg(ttl.as_secs().max(1));
        let taken: i64 = self.bounded(1, invocation.invoke_async(&mut conn)).await?;
        Ok(taken == 1)
    }

    /// Extends the rebuild lock; false when it is no longer ours (Redis lost
    /// its data, or the lock expired and another replica took it).
    pub async fn keep_rebuild(&self, token: &str, ttl: Duration) -> Result<bool, IndexError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(KEEP_LOCK_SCRIPT);
        let mut invocation = script.key(REBUILD_LOCK);
        invocation.arg(token).arg(ttl.as_secs().max(1));
        let kept: i64 = self.bounded(1, invocation.invoke_async(&mut conn)).await?;
        Ok(kept == 1)
    }

    /// Marks the index built if the rebuild lock is still ours; false when
    /// it is not (what the rebuild wrote may be lost: rebuild again).
    pub async fn finish_rebuild(&self, token: &str) -> Result<bool, IndexError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(FINISH_SCRIPT);
        let mut invocation = script.key(REBUILD_LOCK);
        invocation.key(BUILT_MARKER).arg(token);
        let done: i64 = self.bounded(1, invocation.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }
}
