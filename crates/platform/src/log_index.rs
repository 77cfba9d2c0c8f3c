//! The delivery-log index in Redis: written by log-writer, read by admin.
//!
//! The index holds what lists and filters need, never bodies: the attempt
//! in full (request, response, error) stays in the attempts stream, and the
//! index keeps its stream sequence so admin reads it back by direct get.
//! Per attempt it costs about 370 bytes whatever the event's size (see
//! `docs/benchmarks.md`, Log-writer): Herald's own ids are stored as 16 bytes, not 32
//! hex digits, and numbers as varints, so that a member fits a 96- or
//! 112-byte allocation.
//!
//! Every key of an organization carries the hash tag `{<org>}`, so on a
//! Redis Cluster one organization's logs live in one slot and every script
//! touches only keys of that slot, all passed to it as `KEYS`:
//!
//! - `herald:logs:{<org>}:w2:<webhook>` (`2`: the member layout's version;
//!   an index of another layout is rebuilt beside it, and the old one
//!   expires; the marker's `3` says the organization-wide lists are built): a sorted set of the webhook's attempts scored by attempt
//!   time (ms); each member *is* the attempt's summary (a compact binary
//!   record, [`encode_member`]), so a page is one range read. Members start with the log id, which orders attempts of
//!   the same millisecond and makes a member easy to recognize.
//! - `…:w2:<webhook>:s:<status>`: the same, only for the statuses that are
//!   not `succeeded` (the rare ones users filter on); a succeeded attempt
//!   is in one sorted set, a failed one in two.
//! - `herald:logs:{<org>}:h2:<webhook>`: a hash from 6 bytes of SHA-1 of a
//!   (packed) delivery id to the times of its attempts (6 bytes each),
//!   which finds a delivery's attempts (and one attempt by log id) without
//!   a scan. Throttled answers, which a delivery may get thousands of, are
//!   kept apart in chunks of 64 (fields `<that>#<n>`, the highest `n` in
//!   `<that>#`), so logging one costs the same whatever the delivery's
//!   history; and from `e:<event id>` to the deliveries of that event whose id is not
//!   the one derived from (organization, event, webhook). Two deliveries
//!   whose 6 bytes collide share a field: a lookup then reads the other's
//!   members too and keeps only the delivery asked for.
//! - `herald:logs:{<org>}:o2` (and `…:o2:s:<status>` for the statuses that
//!   are not `succeeded`): the organization-wide lists, sorted sets scored
//!   by attempt time whose members are references — the summary's log-id
//!   prefix, then the packed webhook id — so an organization's page is one
//!   range read plus one read per row in the webhooks' lists, whatever the
//!   number of webhooks (about 135 bytes per attempt).
//! - `herald:logs:{<org>}:webhooks`: the webhooks that have logs, which an
//!   organization-wide list filtered by event type or by `succeeded` merges,
//!   as do event lookups.
//!
//! Retention is by time only, for every webhook however busy: writes drop
//! what fell out of it (a bounded number per write), reads ignore it, and
//! every key expires with the retention, so an idle webhook's logs go away
//! by themselves. Writes are idempotent: an attempt stored twice (a
//! redelivery, or the same attempt published twice) is stored once.
//!
//! Everything here can be rebuilt from the attempts stream; [`BUILT_MARKER`]
//! says that it was.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use herald_core::proto;

use crate::now_ms;
use crate::redis::{Conn, Redis};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("redis unavailable")]
    Unavailable,
    #[error("redis is full (maxmemory reached)")]
    Full,
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("unexpected answer from redis: {0}")]
    Answer(String),
}

impl From<redis::RedisError> for IndexError {
    fn from(error: redis::RedisError) -> Self {
        if error.code() == Some("OOM") || error.to_string().contains("OOM ") {
            IndexError::Full
        } else {
            IndexError::Redis(error)
        }
    }
}

pub fn status_name(status: proto::AttemptStatus) -> &'static str {
    match status {
        proto::AttemptStatus::Succeeded => "succeeded",
        proto::AttemptStatus::Failed => "failed",
        proto::AttemptStatus::Retrying => "retrying",
        proto::AttemptStatus::Skipped => "skipped",
        proto::AttemptStatus::Throttled => "throttled",
        proto::AttemptStatus::Unspecified => "unknown",
    }
}

fn status_by_name(name: &str) -> Option<proto::AttemptStatus> {
    [
        proto::AttemptStatus::Succeeded,
        proto::AttemptStatus::Failed,
        proto::AttemptStatus::Retrying,
        proto::AttemptStatus::Skipped,
        proto::AttemptStatus::Throttled,
    ]
    .into_iter()
    .find(|s| status_name(*s) == name)
}

/// The statuses a log query may filter on.
pub const STATUSES: &[&str] = &["succeeded", "failed", "retrying", "throttled", "skipped"];

/// Set once the index holds everything of the attempts stream it should;
/// missing after a Redis loss, which makes log-writer rebuild.
pub const BUILT_MARKER: &str = "herald:logs:{meta}:built3";

/// Held (with a token) by the log-writer replica that rebuilds the index; it
/// vanishes with everything else when Redis loses its data, which is how a
/// rebuild learns that what it wrote so far is gone. Same slot as the
/// marker, so one script can check the one and set the other.
pub const REBUILD_LOCK: &str = "herald:logs:{meta}:rebuilding";

/// Longest error text a summary keeps (the detail has all of it).
pub const SUMMARY_ERROR_BYTES: usize = 128;

/// Entries a filtered list reads at most per request before it answers
/// with what it found and a cursor to go on from.
pub const SCAN_BUDGET: usize = 10_000;

/// Most attempts one event or delivery lookup answers.
pub const LOOKUP_LIMIT: usize = 10_000;

fn webhook_key(org: &str, webhook_id: &str) -> String {
    format!("herald:logs:{{{org}}}:w2:{webhook_id}")
}

fn status_key(org: &str, webhook_id: &str, status: &str) -> String {
    format!("{}:s:{status}", webhook_key(org, webhook_id))
}

fn lookup_key(org: &str, webhook_id: &str) -> String {
    format!("herald:logs:{{{org}}}:h2:{webhook_id}")
}

fn webhooks_key(org: &str) -> String {
    format!("herald:logs:{{{org}}}:webhooks")
}

/// The organization-wide list: every attempt of the organization, scored by
/// time, each member a reference (the summary's log-id prefix, then the
/// packed webhook id) that the webhook's own list resolves to the summary.
fn org_key(org: &str) -> String {
    format!("herald:logs:{{{org}}}:o2")
}

fn org_status_key(org: &str, status: &str) -> String {
    format!("{}:s:{status}", org_key(org))
}

/// The delivery an attempt's log id belongs to: `<delivery>-<attempt>` or
/// `<delivery>-<attempt>-t<n>` (a throttled answer).
pub fn delivery_of(log_id: &str) -> &str {
    fn strip<'a>(s: &'a str, marker: &str) -> Option<&'a str> {
        let (head, tail) = s.rsplit_once(marker)?;
        (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit())).then_some(head)
    }
    let id = strip(log_id, "-t").unwrap_or(log_id);
    strip(id, "-").unwrap_or(id)
}

const FLAG_RESPONSE: u8 = 1;
const FLAG_ERROR_CUT: u8 = 2;
const FLAG_EVENT_MAPPED: u8 = 4;

/// An id as the index stores it. Herald's own ids (`msg_`, `evt_`, `job_`
/// followed by 32 hex digits, then anything) take 16 bytes for the digits:
/// `0x00`, the prefix's length, the prefix, the 16 bytes, the rest. Any
/// other id is kept as is (behind `0x01` if it starts with a byte below
/// `0x02`, so that it cannot be read as packed). About 15 bytes saved per
/// id is what keeps a member in a smaller allocation.
pub fn pack_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    if let Some(us) = b.iter().take(9).position(|&c| c == b'_')
        && us > 0
        && b[..us].iter().all(u8::is_ascii_alphanumeric)
        && b.len() >= us + 33
        && b[us + 1..us + 33]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    {
        let mut out = Vec::with_capacity(b.len() - 15);
        out.extend_from_slice(&[0, us as u8]);
        out.extend_from_slice(&b[..us]);
        let digits = hex::decode(&b[us + 1..us + 33]).expect("hex digits");
        out.extend_from_slice(&digits);
        out.extend_from_slice(&b[us + 33..]);
        return out;
    }
    match b.first() {
        Some(0 | 1) => [&[1u8][..], b].concat(),
        _ => b.to_vec(),
    }
}

/// Reads [`pack_id`] back.
pub fn unpack_id(packed: &[u8]) -> Option<String> {
    match packed.first() {
        Some(0) => {
            let n = *packed.get(1)? as usize;
            let prefix = std::str::from_utf8(packed.get(2..2 + n)?).ok()?;
            let digits = hex::encode(packed.get(2 + n..18 + n)?);
            let rest = std::str::from_utf8(&packed[18 + n..]).ok()?;
            Some(format!("{prefix}_{digits}{rest}"))
        }
        Some(1) => String::from_utf8(packed[1..].to_vec()).ok(),
        _ => String::from_utf8(packed.to_vec()).ok(),
    }
}

/// A length as the member stores it: one byte under 128, else two (the
/// first with its top bit set). Lua reads it with `len()`.
fn put_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        out.extend_from_slice(&((n as u16) | 0x8000).to_be_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

/// `s` cut at `max` bytes, on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Puts `s` cut at `max` bytes; true when cut.
fn put_str(out: &mut Vec<u8>, s: &str, max: usize) -> bool {
    let kept = cut(s, max.min(0x7fff));
    put_bytes(out, kept.as_bytes());
    kept.len() < s.len()
}

/// An id packed, and cut at `max` bytes when it is not one of Herald's.
fn put_id(out: &mut Vec<u8>, id: &str, max: usize) {
    let packed = pack_id(id);
    if packed.len() <= max {
        put_bytes(out, &packed);
    } else {
        put_bytes(out, &pack_id(cut(id, max)));
    }
}

/// An attempt's summary as stored in the index: what a list shows, and
/// the attempt's place in the attempts stream (`seq`). `None` for a log id
/// that cannot be an index member (over 255 bytes packed).
///
/// Layout (version 2, the `2` of the key names): the packed log id behind
/// its length (one byte), status, flags, then the length-prefixed packed
/// event id, event type and packed delivery id (empty when the log id
/// names it) — all that the Lua scripts read, at fixed places — then kind,
/// attempt, HTTP status, duration, next attempt time and stream sequence
/// as varints, and the error (cut), failure reason and packed job id.
pub fn encode_member(a: &proto::AttemptResult, seq: u64, event_mapped: bool) -> Option<Vec<u8>> {
    let log_id = pack_id(&a.log_id);
    if a.log_id.is_empty() || log_id.len() > 255 {
        return None;
    }
    let mut out = Vec::with_capacity(64 + a.event_id.len() + a.event_type.len());
    out.push(log_id.len() as u8);
    out.extend_from_slice(&log_id);
    out.push(a.status as u8);
    let flags_at = out.len();
    out.push(0);
    let mut flags = 0;
    if a.response.is_some() {
        flags |= FLAG_RESPONSE;
    }
    if event_mapped {
        flags |= FLAG_EVENT_MAPPED;
    }
    put_id(&mut out, &a.event_id, 1024);
    put_str(&mut out, &a.event_type, 1024);
    let delivery = if delivery_of(&a.log_id) == a.delivery_id {
        ""
    } else {
        &a.delivery_id
    };
    put_id(&mut out, delivery, 1024);
    out.push(a.kind as u8);
    let status = a.response.as_ref().map_or(0, |r| r.status);
    for n in [
        u64::from(a.attempt),
        u64::from(status),
        a.duration_ms,
        a.next_attempt_at_ms.max(0) as u64,
        seq,
    ] {
        prost::encoding::encode_varint(n, &mut out);
    }
    if put_str(&mut out, &a.error, SUMMARY_ERROR_BYTES) {
        flags |= FLAG_ERROR_CUT;
    }
    put_str(&mut out, &a.failure_reason, 256);
    put_id(&mut out, &a.job_id, 256);
    out[flags_at] = flags;
    Some(out)
}

/// One attempt as the index knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The attempt without request, response headers and bodies, or event;
    /// its error cut at [`SUMMARY_ERROR_BYTES`] (`error_truncated`).
    pub attempt: proto::AttemptResult,
    pub error_truncated: bool,
    /// Its sequence in the attempts stream, where it is in full.
    pub seq: u64,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn varint(&mut self) -> Option<u64> {
        prost::encoding::decode_varint(&mut self.0).ok()
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let a = self.u8()? as usize;
        let n = if a < 0x80 {
            a
        } else {
            ((a & 0x7f) << 8) | self.u8()? as usize
        };
        self.take(n)
    }
    fn str(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn id(&mut self) -> Option<String> {
        unpack_id(self.bytes()?)
    }
}

/// Reads a member back ([`encode_member`]); `score` is its attempt time.
pub fn decode_member(member: &[u8], score: i64) -> Option<Entry> {
    let mut r = Reader(member);
    let n = r.u8()? as usize;
    let log_id = unpack_id(r.take(n)?)?;
    let status = r.u8()? as i32;
    let flags = r.u8()?;
    let event_id = r.id()?;
    let event_type = r.str()?;
    let delivery = r.id()?;
    let kind = r.u8()? as i32;
    let attempt = u32::try_from(r.varint()?).ok()?;
    let response_status = u32::try_from(r.varint()?).ok()?;
    let duration_ms = r.varint()?;
    let next_attempt_at_ms = i64::try_from(r.varint()?).ok()?;
    let seq = r.varint()?;
    let error = r.str()?;
    let failure_reason = r.str()?;
    let job_id = r.id()?;
    let delivery_id = if delivery.is_empty() {
        delivery_of(&log_id).to_owned()
    } else {
        delivery
    };
    Some(Entry {
        attempt: proto::AttemptResult {
            log_id,
            delivery_id,
            event_id,
            event_type,
            attempt,
            status,
            kind,
            response: (flags & FLAG_RESPONSE != 0).then(|| proto::HttpResponse {
                status: response_status,
                ..Default::default()
            }),
            error,
            duration_ms,
            attempted_at_ms: score,
            next_attempt_at_ms,
            failure_reason,
            job_id,
            ..Default::default()
        },
        error_truncated: flags & FLAG_ERROR_CUT != 0,
        seq,
    })
}

/// Where a list goes on from: after the attempt at `score` with this log id
/// (newest first, ties by log id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    score: i64,
    /// The member's first bytes: the log id's length, then the log id.
    prefix: Vec<u8>,
}

impl Cursor {
    fn of(score: i64, member: &[u8]) -> Option<Self> {
        let n = *member.first()? as usize;
        (member.len() > n).then(|| Self {
            score,
            prefix: member[..=n].to_vec(),
        })
    }

    /// The opaque text given to clients.
    pub fn encode(&self) -> String {
        let mut bytes = self.score.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.prefix);
        B64URL.encode(bytes)
    }

    /// Reads a client's cursor; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = B64URL.decode(text).ok()?;
        if bytes.len() < 10 {
            return None;
        }
        let score = i64::from_be_bytes(bytes[..8].try_into().ok()?);
        let prefix = bytes[8..].to_vec();
        (prefix[0] as usize + 1 == prefix.len()).then_some(Self { score, prefix })
    }

    /// Whether an attempt at (`score`, `member`) comes after the cursor.
    fn passes(&self, score: i64, member: &[u8]) -> bool {
        score < self.score
            || (score == self.score && member_prefix(member) < self.prefix.as_slice())
    }
}

fn member_prefix(member: &[u8]) -> &[u8] {
    let n = member.first().map_or(0, |n| *n as usize);
    &member[..(n + 1).min(member.len())]
}

/// What a list asks for. Lists are newest first; `since` is inclusive,
/// `until` exclusive (ms).
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub org: String,
    /// One webhook's attempts; all of the organization's when `None`.
    pub webhook_id: Option<String>,
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    pub delivery_id: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub cursor: Option<Cursor>,
    pub offset: usize,
    pub limit: usize,
}

/// One page of attempts, newest first. `total` is how many the query
/// matches in all, when known without reading more than [`SCAN_BUDGET`]
/// entries (always for unfiltered lists, lookups and status lists).
#[derive(Debug, Clone)]
pub struct Page {
    pub total: Option<u64>,
    pub items: Vec<Entry>,
    pub next_cursor: Option<Cursor>,
}

/// Shared Lua helpers: the member layout of [`encode_member`] and the
/// lookup fields.
const LUA_HELPERS: &str = r"
local function len(m, p)
  local a = m:byte(p)
  if a < 128 then return a, p + 1 end
  return (a - 128) * 256 + m:byte(p + 1), p + 2
end
local function prefix(m) return m:sub(1, 1 + m:byte(1)) end
local function strip(s)
  local d = (s:gsub('%-t%d+$', ''))
  return (d:gsub('%-%d+$', ''))
end
-- the packed delivery id a packed log id names (pack_id, delivery_of)
local function derive(log_id)
  if log_id:byte(1) == 0 then
    local head = 18 + log_id:byte(2)
    return log_id:sub(1, head) .. strip(log_id:sub(head + 1))
  end
  return strip(log_id)
end
-- packed log id, status, flags, packed event id, event type, packed
-- delivery id
local function fields(m)
  local n = m:byte(1)
  local log_id = m:sub(2, 1 + n)
  local p = n + 4
  local el el, p = len(m, p) local event_id = m:sub(p, p + el - 1) p = p + el
  local tl tl, p = len(m, p) local etype = m:sub(p, p + tl - 1) p = p + tl
  local dl dl, p = len(m, p) local delivery = m:sub(p, p + dl - 1)
  if dl == 0 then delivery = derive(log_id) end
  return log_id, m:byte(2 + n), m:byte(3 + n), event_id, etype, delivery
end
-- Lookup fields and times take 6 bytes each: an 8-byte string would take a
-- 16-byte allocation, a 6-byte one takes 8 (with its header and NUL).
local function field(s)
  local h = redis.sha1hex(s)
  local out = {}
  for i = 1, 12, 2 do out[#out + 1] = string.char(tonumber(h:sub(i, i + 1), 16)) end
  return table.concat(out)
end
local function t6(score) return struct.pack('>I6', score) end
local function has6(s, x)
  for i = 1, #s, 6 do if s:sub(i, i + 5) == x then return true end end
  return false
end
local function drop6(s, x)
  local out = {}
  for i = 1, #s, 6 do local c = s:sub(i, i + 5) if c ~= x then out[#out + 1] = c end end
  return table.concat(out)
end
-- A throttled answer's time goes to a chunk of its delivery's, 64 answers
-- each (by the n of its log id's `-t<n>`), and the highest chunk to one
-- more field: logging one costs the same however many came before it.
-- The chunk of an attempt, nil for any but a throttled answer (status 5).
local function chunk(log_id, status)
  if status ~= 5 then return nil end
  local n = log_id:match('%-t(%d+)$')
  if not n then return nil end
  return math.floor(tonumber(n) / 64)
end
local function chunk_field(df, c) return field(df .. '#' .. c) end
local function top_field(df) return field(df .. '#') end
-- every time of the delivery whose field is df
local function times_of(h, df)
  local out = {redis.call('HGET', h, df) or ''}
  local top = tonumber(redis.call('HGET', h, top_field(df)) or '-1')
  for c = 0, top do out[#out + 1] = redis.call('HGET', h, chunk_field(df, c)) or '' end
  return table.concat(out)
end
";

/// KEYS: the organization's webhooks set, its organization-wide list, then
/// the keys of the batch (all of one organization). ARGV: cutoff (ms), ttl
/// (s), then per attempt: W, S (0: none) and H key indexes, score, member,
/// delivery id, event id (or empty when the delivery id is the derived
/// one), webhook id, packed webhook id, and the organization's status list
/// key index (0: none); ids packed ([`pack_id`]), as in the member.
const WRITE_BODY: &str = r"
local cutoff, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local touched, org_touched, stored = {}, {}, 0
for i = 3, #ARGV, 10 do
  local w, si, h = KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1]), KEYS[tonumber(ARGV[i + 2])]
  local score_s, member = ARGV[i + 3], ARGV[i + 4]
  local score = tonumber(score_s)
  touched[w] = h
  if score >= cutoff then
    local p, seen = prefix(member), false
    -- The organization's list: added even when the webhook's has it (a
    -- rebuild of an index from before the organization's list).
    local ref = p .. ARGV[i + 8]
    local o, os = KEYS[2], tonumber(ARGV[i + 9])
    redis.call('ZADD', o, score_s, ref)
    org_touched[o] = true
    if os > 0 then
      redis.call('ZADD', KEYS[os], score_s, ref)
      org_touched[KEYS[os]] = true
    end
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', w, score_s, score_s)) do
      if m:sub(1, #p) == p then seen = true break end
    end
    if not seen then
      redis.call('ZADD', w, score_s, member)
      if si > 0 then
        local s = KEYS[si]
        redis.call('ZADD', s, score_s, member)
        redis.call('ZREMRANGEBYSCORE', s, '-inf', '(' .. ARGV[1])
        redis.call('EXPIRE', s, ttl)
      end
      local log_id, status = fields(member)
      local df, t = field(ARGV[i + 5]), t6(score)
      local c, tf = chunk(log_id, status), df
      if c then
        tf = chunk_field(df, c)
        local top = top_field(df)
        if c > tonumber(redis.call('HGET', h, top) or '-1') then redis.call('HSET', h, top, c) end
      end
      local cur = redis.call('HGET', h, tf) or ''
      if not has6(cur, t) then redis.call('HSET', h, tf, cur .. t) end
      if ARGV[i + 6] ~= '' then
        local ef = field('e:' .. ARGV[i + 6])
        local ev = redis.call('HGET', h, ef) or ''
        if not has6(ev, df) then redis.call('HSET', h, ef, ev .. df) end
      end
      redis.call('SADD', KEYS[1], ARGV[i + 7])
      stored = stored + 1
    end
  end
end
for w, h in pairs(touched) do
  local old = redis.call('ZRANGEBYSCORE', w, '-inf', '(' .. ARGV[1], 'WITHSCORES', 'LIMIT', 0, 256)
  for j = 1, #old, 2 do
    local m, score = old[j], tonumber(old[j + 1])
    local log_id, status, flags, event_id, _, delivery = fields(m)
    local df, t = field(delivery), t6(score)
    local c, tf = chunk(log_id, status), df
    if c then tf = chunk_field(df, c) end
    local cur = redis.call('HGET', h, tf) or ''
    -- (a throttled answer indexed before chunks has its time in df)
    if c and not has6(cur, t) then
      tf, c = df, nil
      cur = redis.call('HGET', h, df) or ''
    end
    local rest = drop6(cur, t)
    if rest == '' then
      redis.call('HDEL', h, tf)
      local top = top_field(df)
      if c then
        local left = false
        for k = 0, tonumber(redis.call('HGET', h, top) or '-1') do
          if redis.call('HEXISTS', h, chunk_field(df, k)) == 1 then left = true break end
        end
        if not left then redis.call('HDEL', h, top) end
      end
      if bit.band(flags, 4) ~= 0 and redis.call('HEXISTS', h, df) == 0
          and redis.call('HEXISTS', h, top) == 0 then
        local ef = field('e:' .. event_id)
        local ev = drop6(redis.call('HGET', h, ef) or '', df)
        if ev == '' then redis.call('HDEL', h, ef) else redis.call('HSET', h, ef, ev) end
      end
    else
      redis.call('HSET', h, tf, rest)
    end
    redis.call('ZREM', w, m)
  end
  redis.call('EXPIRE', w, ttl)
  redis.call('EXPIRE', h, ttl)
end
for o, _ in pairs(org_touched) do
  redis.call('ZREMRANGEBYSCORE', o, '-inf', '(' .. ARGV[1])
  redis.call('EXPIRE', o, ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
return stored
";

/// KEYS: an organization-wide list. ARGV: min score (inclusive), until
/// (exclusive, or +inf), cursor score (or empty) and prefix, how many.
/// Answers score and reference of up to that many entries after the
/// cursor, newest first.
const REFS_BODY: &str = r"
local k, min, untl = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local cs, cp, want = nil, ARGV[4], tonumber(ARGV[5])
if ARGV[3] ~= '' then cs = tonumber(ARGV[3]) end
local pos = 0
if cs then pos = redis.call('ZCOUNT', k, '(' .. ARGV[3], '+inf')
elseif untl ~= '+inf' then pos = redis.call('ZCOUNT', k, untl, '+inf') end
local out = {}
while #out < want * 2 do
  local chunk = redis.call('ZREVRANGE', k, pos, pos + 255, 'WITHSCORES')
  if #chunk == 0 then break end
  pos = pos + #chunk / 2
  for j = 1, #chunk, 2 do
    local m, sc = chunk[j], tonumber(chunk[j + 1])
    if sc < min then return out end
    if not (cs and sc == cs and prefix(m) >= cp) then
      out[#out + 1] = chunk[j + 1]
      out[#out + 1] = m
      if #out >= want * 2 then break end
    end
  end
end
return out
";

/// KEYS: the webhooks' lists a page's references name, in order. ARGV:
/// per reference its score and its log-id prefix. Answers each summary (or
/// an empty string when the webhook's list no longer holds it).
const RESOLVE_BODY: &str = r"
local out = {}
for i = 1, #KEYS do
  local score_s, p, found = ARGV[2 * i - 1], ARGV[2 * i], ''
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], score_s, score_s)) do
    if prefix(m) == p then found = m break end
  end
  out[#out + 1] = found
end
return out
";

/// KEYS: sorted sets of summaries to merge. ARGV: min score (inclusive),
/// until (exclusive, or +inf), cursor score (or empty), cursor prefix,
/// offset, limit, status (0: any), event type (or empty), scan budget.
/// Answers: total (-1 when unknown), next cursor score and prefix (empty:
/// none), then score, member and key number of each attempt of the page.
const PAGE_BODY: &str = r"
local min, untl = tonumber(ARGV[1]), ARGV[2]
local cs = nil
if ARGV[3] ~= '' then cs = tonumber(ARGV[3]) end
local cp = ARGV[4]
local offset, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local want_status, want_type = tonumber(ARGV[7]), ARGV[8]
local filtered = want_status > 0 or want_type ~= ''
local fast = #KEYS == 1 and not filtered
local need = offset + limit + 1
if fast then need = limit + 1 end
local per_key = math.max(need, math.floor(tonumber(ARGV[9]) / #KEYS))
local function passes(m)
  if not filtered then return true end
  local _, status, _, _, etype = fields(m)
  if want_status > 0 and status ~= want_status then return false end
  if want_type ~= '' and etype ~= want_type then return false end
  return true
end
local function newer(s1, p1, s2, p2) return s1 > s2 or (s1 == s2 and p1 > p2) end
local items, frontier, complete, matched = {}, nil, true, 0
for ki, k in ipairs(KEYS) do
  local pos = 0
  if cs then pos = redis.call('ZCOUNT', k, '(' .. ARGV[3], '+inf')
  elseif untl ~= '+inf' then pos = redis.call('ZCOUNT', k, untl, '+inf') end
  if fast and not cs then pos = pos + offset end
  local scanned, got, done, stop = 0, 0, false, nil
  while not done and not stop do
    local chunk = redis.call('ZREVRANGE', k, pos, pos + 255, 'WITHSCORES')
    if #chunk == 0 then done = true break end
    pos = pos + #chunk / 2
    for j = 1, #chunk, 2 do
      local m, s = chunk[j], tonumber(chunk[j + 1])
      if s < min then done = true break end
      if not (cs and s == cs and prefix(m) >= cp) then
        scanned = scanned + 1
        if passes(m) then
          got = got + 1
          if got <= need then items[#items + 1] = {s, m, ki} end
          if got == need and not filtered then stop = {s, prefix(m)} break end
        end
        if scanned >= per_key then
          if got >= need then stop = {items[#items][1], prefix(items[#items][2])}
          else stop = {s, prefix(m)} end
          break
        end
      end
    end
  end
  matched = matched + got
  if not done then
    complete = false
    if stop and (frontier == nil or newer(stop[1], stop[2], frontier[1], frontier[2])) then
      frontier = stop
    end
  end
end
table.sort(items, function(a, b) return newer(a[1], prefix(a[2]), b[1], prefix(b[2])) end)
local valid = {}
for _, it in ipairs(items) do
  if frontier and newer(frontier[1], frontier[2], it[1], prefix(it[2])) then break end
  valid[#valid + 1] = it
end
local first = offset + 1
if fast then first = 1 end
local total = -1
if not filtered then
  total = 0
  local hi = '+inf'
  if untl ~= '+inf' then hi = '(' .. untl end
  for _, k in ipairs(KEYS) do total = total + redis.call('ZCOUNT', k, ARGV[1], hi) end
elseif complete and not cs then
  total = matched
end
local out = {total, '', ''}
local last = first + limit - 1
for i = first, math.min(last, #valid) do
  out[#out + 1] = string.format('%d', valid[i][1])
  out[#out + 1] = valid[i][2]
  out[#out + 1] = valid[i][3]
end
local shown = (#out - 3) / 3
if #valid > last then
  out[2], out[3] = out[#out - 2], prefix(out[#out - 1])
elseif frontier then
  if shown == limit then out[2], out[3] = out[#out - 2], prefix(out[#out - 1])
  else out[2], out[3] = string.format('%d', frontier[1]), frontier[2] end
end
return out
";

/// KEYS: pairs of W and H keys. ARGV: `d` and a delivery id, or `e` and an
/// event id, then the most to answer, then (for `e`) each webhook's
/// derived delivery id for it; ids packed ([`pack_id`]). Answers score, member and pair number of
/// every attempt found.
const LOOKUP_BODY: &str = r"
local out, limit = {}, tonumber(ARGV[3])
for i = 1, #KEYS, 2 do
  local w, h = KEYS[i], KEYS[i + 1]
  local wanted = {}
  if ARGV[1] == 'd' then
    wanted[field(ARGV[2])] = true
  else
    local derived = ARGV[3 + (i + 1) / 2]
    if derived ~= '' then wanted[field(derived)] = true end
    local mapped = redis.call('HGET', h, field('e:' .. ARGV[2])) or ''
    for j = 1, #mapped, 6 do wanted[mapped:sub(j, j + 5)] = true end
  end
  for df, _ in pairs(wanted) do
    local times = times_of(h, df)
    for j = 1, #times, 6 do
      local t = struct.unpack('>I6', times:sub(j, j + 5))
      local ts = string.format('%d', t)
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', w, ts, ts)) do
        local _, _, _, event_id, _, delivery = fields(m)
        if field(delivery) == df and (ARGV[1] == 'd' or event_id == ARGV[2]) then
          if #out < limit * 3 then
            out[#out + 1] = ts
            out[#out + 1] = m
            out[#out + 1] = (i + 1) / 2
          end
        end
      end
    end
  end
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

/// What the page script answers, before members become entries: the
/// members with their score and the number of the key they came from.
struct RawPage {
    total: Option<u64>,
    items: Vec<(i64, Vec<u8>, usize)>,
    next_cursor: Option<Cursor>,
}

/// An attempt to store and its sequence in the attempts stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub attempt: proto::AttemptResult,
    pub seq: u64,
}

#[derive(Debug, Clone)]
pub struct LogIndex {
    redis: Redis,
    retention: Duration,
    write: std::sync::Arc<redis::Script>,
    page: std::sync::Arc<redis::Script>,
    lookup: std::sync::Arc<redis::Script>,
    resolve: std::sync::Arc<redis::Script>,
    refs: std::sync::Arc<redis::Script>,
}

impl LogIndex {
    pub fn new(redis: Redis, retention: Duration) -> Self {
        let script =
            |body: &str| std::sync::Arc::new(redis::Script::new(&format!("{LUA_HELPERS}{body}")));
        Self {
            redis,
            retention,
            write: script(WRITE_BODY),
            page: script(PAGE_BODY),
            lookup: script(LOOKUP_BODY),
            resolve: script(RESOLVE_BODY),
            refs: script(REFS_BODY),
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

    async fn conn(&self) -> Result<Conn, IndexError> {
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

    /// Stores a batch of attempts: one script per organization in the batch
    /// (one slot each). Attempts already older than the retention are
    /// skipped. Answers how many were new.
    pub async fn write(&self, attempts: &[Stored]) -> Result<u64, IndexError> {
        let cutoff = self.cutoff_ms();
        let ttl = self.retention.as_secs().max(1);
        let mut by_org: BTreeMap<&str, Vec<&Stored>> = BTreeMap::new();
        for s in attempts
            .iter()
            .filter(|s| s.attempt.attempted_at_ms >= cutoff)
        {
            by_org
                .entry(&s.attempt.organization_id)
                .or_default()
                .push(s);
        }
        let mut stored = 0;
        for (org, batch) in by_org {
            let mut keys: Vec<String> = vec![webhooks_key(org), org_key(org)];
            let index_of = |key: String, keys: &mut Vec<String>| -> usize {
                match keys.iter().position(|k| *k == key) {
                    Some(i) => i + 1,
                    None => {
                        keys.push(key);
                        keys.len()
                    }
                }
            };
            let mut args: Vec<Vec<u8>> = vec![cutoff.to_string().into(), ttl.to_string().into()];
            for s in batch {
                let a = &s.attempt;
                let derived = herald_core::ids::delivery_id(org, &a.event_id, &a.webhook_id);
                let mapped = a.delivery_id != derived && !a.event_id.is_empty();
                let Some(member) = encode_member(a, s.seq, mapped) else {
                    tracing::warn!(log_id = %a.log_id, "attempt with an unusable log id not indexed");
                    continue;
                };
                let w = index_of(webhook_key(org, &a.webhook_id), &mut keys);
                let status = status_name(a.status());
                let si = if a.status() == proto::AttemptStatus::Succeeded {
                    0
                } else {
                    index_of(status_key(org, &a.webhook_id, status), &mut keys)
                };
                let h = index_of(lookup_key(org, &a.webhook_id), &mut keys);
                let os = if a.status() == proto::AttemptStatus::Succeeded {
                    0
                } else {
                    index_of(org_status_key(org, status), &mut keys)
                };
                args.extend([
                    w.to_string().into_bytes(),
                    si.to_string().into_bytes(),
                    h.to_string().into_bytes(),
                    a.attempted_at_ms.to_string().into_bytes(),
                    member,
                    pack_id(&a.delivery_id),
                    if mapped {
                        pack_id(&a.event_id)
                    } else {
                        Vec::new()
                    },
                    a.webhook_id.clone().into_bytes(),
                    pack_id(&a.webhook_id),
                    os.to_string().into_bytes(),
                ]);
            }
            if args.len() == 2 {
                continue;
            }
            let count = (args.len() - 2) / 10;
            let mut invocation = self.write.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg.as_slice());
            }
            let mut conn = self.conn().await?;
            let scale = 4 + (count / 100) as u32;
            let n: u64 = self
                .bounded(scale, invocation.invoke_async(&mut conn))
                .await?;
            stored += n;
        }
        Ok(stored)
    }

    /// A page of attempts, newest first.
    pub async fn page(&self, q: &Query) -> Result<Page, IndexError> {
        let min = q.since_ms.unwrap_or(i64::MIN).max(self.cutoff_ms());
        if q.event_id.is_some() || q.delivery_id.is_some() {
            return self.lookup_page(q, min).await;
        }
        let mut conn = self.conn().await?;
        // The organization's own lists answer every organization-wide page
        // but those filtered by event type or by `succeeded` (a filter the
        // references cannot apply), whatever the number of webhooks.
        let org_list = match (&q.webhook_id, q.status.as_deref(), &q.event_type) {
            (None, None, None) => Some(org_key(&q.org)),
            (None, Some(s), None) if s != "succeeded" => Some(org_status_key(&q.org, s)),
            _ => None,
        };
        if let Some(key) = org_list {
            let raw = self.run_page(&mut conn, &[key], q, min, 0).await?;
            return self.resolve(&mut conn, q, raw).await;
        }
        let Some(webhook) = &q.webhook_id else {
            return self.org_scan(&mut conn, q, min).await;
        };
        let webhooks = [webhook.clone()];
        // A status other than succeeded has lists of its own; a succeeded
        // or event-type filter is read from the webhook's list.
        let mut want_status = 0;
        let keys: Vec<String> = match q.status.as_deref() {
            Some(s) if s != "succeeded" => {
                webhooks.iter().map(|w| status_key(&q.org, w, s)).collect()
            }
            other => {
                if let Some(name) = other {
                    want_status = status_by_name(name).map_or(-1, |s| s as i32);
                }
                webhooks.iter().map(|w| webhook_key(&q.org, w)).collect()
            }
        };
        let raw = self.run_page(&mut conn, &keys, q, min, want_status).await?;
        let items = raw
            .items
            .into_iter()
            .filter_map(|(score, member, k)| {
                let mut entry = decode_member(&member, score)?;
                entry.attempt.organization_id = q.org.clone();
                entry.attempt.webhook_id = webhooks.get(k.wrapping_sub(1)).cloned()?;
                Some(entry)
            })
            .collect();
        Ok(Page {
            total: raw.total,
            items,
            next_cursor: raw.next_cursor,
        })
    }

    /// Runs the page script over `keys` (merged, newest first).
    async fn run_page(
        &self,
        conn: &mut Conn,
        keys: &[String],
        q: &Query,
        min: i64,
        want_status: i32,
    ) -> Result<RawPage, IndexError> {
        let mut invocation = self.page.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        let (cursor_score, cursor_prefix) = match &q.cursor {
            Some(c) => (c.score.to_string(), c.prefix.clone()),
            None => (String::new(), Vec::new()),
        };
        invocation
            .arg(min)
            .arg(q.until_ms.map_or("+inf".to_owned(), |u| u.to_string()))
            .arg(cursor_score)
            .arg(cursor_prefix)
            .arg(q.offset)
            .arg(q.limit)
            .arg(want_status)
            .arg(q.event_type.as_deref().unwrap_or(""))
            .arg(SCAN_BUDGET);
        let answer: Vec<redis::Value> = self.bounded(8, invocation.invoke_async(conn)).await?;
        let mut answer = answer.into_iter();
        let total = match answer.next() {
            Some(redis::Value::Int(n)) => u64::try_from(n).ok(),
            other => return Err(IndexError::Answer(format!("{other:?}"))),
        };
        let bytes = |v: Option<redis::Value>| match v {
            Some(redis::Value::BulkString(b)) => Some(b),
            _ => None,
        };
        let score_of = |b: &[u8]| {
            std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
        };
        let next_score = bytes(answer.next()).unwrap_or_default();
        let next_prefix = bytes(answer.next()).unwrap_or_default();
        let next_cursor = score_of(&next_score)
            .filter(|_| !next_prefix.is_empty())
            .map(|score| Cursor {
                score,
                prefix: next_prefix,
            });
        let mut items = Vec::new();
        while let (Some(score), Some(member), Some(redis::Value::Int(k))) =
            (bytes(answer.next()), bytes(answer.next()), answer.next())
        {
            items.push((score_of(&score).unwrap_or_default(), member, k as usize));
        }
        Ok(RawPage {
            total,
            items,
            next_cursor,
        })
    }

    /// Reads the summaries a page of the organization's list refers to from
    /// the webhooks' lists, in one round trip.
    async fn resolve(&self, conn: &mut Conn, q: &Query, raw: RawPage) -> Result<Page, IndexError> {
        let refs: Vec<(i64, Vec<u8>)> = raw.items.into_iter().map(|(s, r, _)| (s, r)).collect();
        let items = self
            .resolve_refs(conn, &q.org, &refs)
            .await?
            .into_iter()
            .map(|(_, entry)| entry)
            .collect();
        Ok(Page {
            total: raw.total,
            items,
            next_cursor: raw.next_cursor,
        })
    }

    /// The summaries that references of the organization's list name, each
    /// with its place (score and prefix); references whose summary the
    /// webhook's list no longer holds are left out.
    async fn resolve_refs(
        &self,
        conn: &mut Conn,
        org: &str,
        refs: &[(i64, Vec<u8>)],
    ) -> Result<Vec<(Cursor, Entry)>, IndexError> {
        let refs: Vec<(i64, &[u8], String)> = refs
            .iter()
            .filter_map(|(score, reference)| {
                let p = member_prefix(reference);
                let webhook = unpack_id(reference.get(p.len()..)?)?;
                Some((*score, p, webhook))
            })
            .collect();
        let mut found = Vec::with_capacity(refs.len());
        if refs.is_empty() {
            return Ok(found);
        }
        let mut invocation = self.resolve.prepare_invoke();
        for (score, p, webhook) in &refs {
            invocation
                .key(webhook_key(org, webhook))
                .arg(score.to_string())
                .arg(*p);
        }
        let members: Vec<Vec<u8>> = self.bounded(2, invocation.invoke_async(conn)).await?;
        for ((score, p, webhook), member) in refs.iter().zip(members) {
            if let Some(mut entry) = decode_member(&member, *score) {
                entry.attempt.organization_id = org.to_owned();
                entry.attempt.webhook_id = webhook.clone();
                let place = Cursor {
                    score: *score,
                    prefix: p.to_vec(),
                };
                found.push((place, entry));
            }
        }
        Ok(found)
    }

    /// An organization-wide list filtered by what references do not carry
    /// (event type, `succeeded`): the organization's list read in chunks,
    /// each resolved and filtered, until the page is full or
    /// [`SCAN_BUDGET`] entries were read — whatever the number of webhooks.
    async fn org_scan(&self, conn: &mut Conn, q: &Query, min: i64) -> Result<Page, IndexError> {
        const CHUNK: usize = 500;
        let key = org_key(&q.org);
        let want_status = q.status.as_deref().map(status_by_name);
        let need = q.offset + q.limit + 1;
        let mut matched: Vec<(Cursor, Entry)> = Vec::new();
        let mut cursor = q.cursor.clone();
        let mut scanned = 0;
        let mut exhausted = false;
        while matched.len() < need && scanned < SCAN_BUDGET {
            let (cursor_score, cursor_prefix) = match &cursor {
                Some(c) => (c.score.to_string(), c.prefix.clone()),
                None => (String::new(), Vec::new()),
            };
            let mut invocation = self.refs.prepare_invoke();
            invocation
                .key(&key)
                .arg(min)
                .arg(q.until_ms.map_or("+inf".to_owned(), |u| u.to_string()))
                .arg(cursor_score)
                .arg(cursor_prefix)
                .arg(CHUNK);
            let answer: Vec<Vec<u8>> = self.bounded(2, invocation.invoke_async(conn)).await?;
            let refs: Vec<(i64, Vec<u8>)> = answer
                .chunks(2)
                .filter_map(|pair| {
                    let score = std::str::from_utf8(pair.first()?).ok()?.parse().ok()?;
                    Some((score, pair.get(1)?.clone()))
                })
                .collect();
            let Some((last_score, last_ref)) = refs.last() else {
                exhausted = true;
                break;
            };
            cursor = Cursor::of(*last_score, last_ref);
            scanned += refs.len();
            let short = refs.len() < CHUNK;
            for (place, entry) in self.resolve_refs(conn, &q.org, &refs).await? {
                let status_ok = match want_status {
                    None => true,
                    Some(Some(s)) => entry.attempt.status() == s,
                    Some(None) => false,
                };
                let type_ok = q
                    .event_type
                    .as_ref()
                    .is_none_or(|t| entry.attempt.event_type == *t);
                if status_ok && type_ok {
                    matched.push((place, entry));
                }
            }
            if short {
                exhausted = true;
                break;
            }
        }
        let more = matched.len() > q.offset + q.limit;
        let total = (exhausted && q.cursor.is_none()).then_some(matched.len() as u64);
        let page: Vec<(Cursor, Entry)> = matched.into_iter().skip(q.offset).take(q.limit).collect();
        // Past the page: the last shown, or (the budget spent before the
        // page filled) the last read, to go on from.
        let next_cursor = if more || (!exhausted && page.len() == q.limit) {
            page.last().map(|(c, _)| c.clone())
        } else if !exhausted {
            cursor
        } else {
            None
        };
        Ok(Page {
            total,
            items: page.into_iter().map(|(_, e)| e).collect(),
            next_cursor,
        })
    }

    async fn lookup_page(&self, q: &Query, min: i64) -> Result<Page, IndexError> {
        let mut conn = self.conn().await?;
        let webhooks = match &q.webhook_id {
            Some(id) => vec![id.clone()],
            None => {
                let cmd = redis::cmd("SMEMBERS").arg(webhooks_key(&q.org)).clone();
                let mut ids: Vec<String> = self.bounded(1, cmd.query_async(&mut conn)).await?;
                ids.sort();
                ids
            }
        };
        let mut found = Vec::new();
        if !webhooks.is_empty() {
            let mut invocation = self.lookup.prepare_invoke();
            for w in &webhooks {
                invocation
                    .key(webhook_key(&q.org, w))
                    .key(lookup_key(&q.org, w));
            }
            match (&q.delivery_id, &q.event_id) {
                (Some(d), _) => {
                    invocation.arg("d").arg(pack_id(d)).arg(LOOKUP_LIMIT);
                }
                (None, Some(e)) => {
                    invocation.arg("e").arg(pack_id(e)).arg(LOOKUP_LIMIT);
                    for w in &webhooks {
                        invocation.arg(pack_id(&herald_core::ids::delivery_id(&q.org, e, w)));
                    }
                }
                (None, None) => unreachable!("a lookup names an event or a delivery"),
            }
            let answer: Vec<redis::Value> =
                self.bounded(4, invocation.invoke_async(&mut conn)).await?;
            for triple in answer.chunks(3) {
                let [
                    redis::Value::BulkString(score),
                    redis::Value::BulkString(member),
                    redis::Value::Int(k),
                ] = triple
                else {
                    continue;
                };
                let score = std::str::from_utf8(score)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or_default();
                if let Some(mut entry) = decode_member(member, score) {
                    entry.attempt.organization_id = q.org.clone();
                    entry.attempt.webhook_id = webhooks
                        .get((*k as usize).wrapping_sub(1))
                        .cloned()
                        .unwrap_or_default();
                    found.push((score, member.clone(), entry));
                }
            }
        }
        let want_status = q.status.as_deref().and_then(status_by_name);
        found.retain(|(score, member, e)| {
            *score >= min
                && q.until_ms.is_none_or(|u| *score < u)
                && want_status.is_none_or(|s| e.attempt.status() == s)
                && q.event_type
                    .as_ref()
                    .is_none_or(|t| e.attempt.event_type == *t)
                && q.delivery_id
                    .as_ref()
                    .is_none_or(|d| e.attempt.delivery_id == *d)
                && q.event_id
                    .as_ref()
                    .is_none_or(|ev| e.attempt.event_id == *ev)
                && q.cursor.as_ref().is_none_or(|c| c.passes(*score, member))
        });
        found.sort_by(|a, b| (b.0, member_prefix(&b.1)).cmp(&(a.0, member_prefix(&a.1))));
        found.dedup_by(|a, b| a.0 == b.0 && member_prefix(&a.1) == member_prefix(&b.1));
        let total = (q.cursor.is_none()).then_some(found.len() as u64);
        let more = found.len() > q.offset + q.limit;
        let items: Vec<(i64, Vec<u8>, Entry)> =
            found.into_iter().skip(q.offset).take(q.limit).collect();
        let next_cursor = if more {
            items.last().and_then(|(s, m, _)| Cursor::of(*s, m))
        } else {
            None
        };
        let items: Vec<Entry> = items.into_iter().map(|(_, _, e)| e).collect();
        Ok(Page {
            total,
            items,
            next_cursor,
        })
    }

    /// One attempt of a webhook by log id, if the index still holds it.
    pub async fn get(
        &self,
        org: &str,
        webhook_id: &str,
        log_id: &str,
    ) -> Result<Option<Entry>, IndexError> {
        let q = Query {
            org: org.to_owned(),
            webhook_id: Some(webhook_id.to_owned()),
            delivery_id: Some(delivery_of(log_id).to_owned()),
            limit: LOOKUP_LIMIT,
            ..Default::default()
        };
        let page = self.lookup_page(&q, self.cutoff_ms()).await?;
        Ok(page.items.into_iter().find(|e| e.attempt.log_id == log_id))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ids_name_their_delivery() {
        for (log_id, delivery) in [
            ("msg_ab12-1", "msg_ab12"),
            ("msg_ab12-12-t3", "msg_ab12"),
            ("msg_a-b-2", "msg_a-b"),
            ("plain", "plain"),
            ("msg_x-t", "msg_x-t"),
            ("msg_x-", "msg_x-"),
        ] {
            assert_eq!(delivery_of(log_id), delivery, "{log_id}");
        }
    }

    #[test]
    fn members_round_trip() {
        let mut a = proto::AttemptResult {
            log_id: "msg_0123-2".into(),
            delivery_id: "msg_0123".into(),
            event_id: "evt_1".into(),
            event_type: "workflow.completed".into(),
            attempt: 2,
            response: Some(proto::HttpResponse {
                status: 503,
                ..Default::default()
            }),
            error: "é".repeat(100),
            duration_ms: 42,
            attempted_at_ms: 1_700_000_000_123,
            next_attempt_at_ms: 1_700_000_005_000,
            failure_reason: "exhausted".into(),
            job_id: "job_1".into(),
            ..Default::default()
        };
        a.set_status(proto::AttemptStatus::Retrying);
        a.set_kind(proto::DeliveryKind::Replay);
        let member = encode_member(&a, 77, true).unwrap();
        let entry = decode_member(&member, a.attempted_at_ms).unwrap();
        assert_eq!(entry.seq, 77);
        assert!(entry.error_truncated);
        assert_eq!(entry.attempt.error, "é".repeat(64));
        let expected = proto::AttemptResult {
            error: "é".repeat(64),
            ..a.clone()
        };
        assert_eq!(entry.attempt, expected);
        // The delivery id is stored only when the log id does not name it.
        let other = proto::AttemptResult {
            delivery_id: "msg_other".into(),
            ..a.clone()
        };
        let longer = encode_member(&other, 77, false).unwrap();
        assert_eq!(longer.len(), member.len() + "msg_other".len());
        assert_eq!(
            decode_member(&longer, 0).unwrap().attempt.delivery_id,
            "msg_other"
        );
        assert!(encode_member(&proto::AttemptResult::default(), 1, false).is_none());
    }

    #[test]
    fn herald_ids_pack_into_16_bytes_and_others_stay_as_they_are() {
        let hex = "0123456789abcdef0123456789abcdef";
        for (id, packed_len) in [
            (format!("msg_{hex}"), 2 + 3 + 16),
            (format!("msg_{hex}-3-t2"), 2 + 3 + 16 + 5),
            (format!("evt_{hex}"), 2 + 3 + 16),
            // Not Herald's: upper-case digits, too few, no prefix, a NUL.
            (format!("msg_{}", hex.to_uppercase()), 36),
            ("msg_0123-1".to_owned(), 10),
            (format!("_{hex}"), 33),
            ("evt_1700000000000.5".to_owned(), 19),
            ("\u{0}odd".to_owned(), 5),
            (String::new(), 0),
        ] {
            let packed = pack_id(&id);
            assert_eq!(packed.len(), packed_len, "{id:?}");
            assert_eq!(unpack_id(&packed).as_deref(), Some(id.as_str()), "{id:?}");
        }
    }

    #[test]
    fn a_member_of_herald_ids_fits_a_small_allocation() {
        let hex = "0123456789abcdef0123456789abcdef";
        let mut a = proto::AttemptResult {
            log_id: format!("msg_{hex}-1"),
            delivery_id: format!("msg_{hex}"),
            event_id: format!("evt_{hex}"),
            event_type: "workflow.execution.completed".into(),
            attempt: 1,
            response: Some(proto::HttpResponse {
                status: 200,
                ..Default::default()
            }),
            duration_ms: 3,
            ..Default::default()
        };
        a.set_status(proto::AttemptStatus::Succeeded);
        let member = encode_member(&a, 123_456_789, false).unwrap();
        // With Redis's sds header and NUL: jemalloc's 96-byte class.
        assert!(member.len() + 4 <= 96, "{} bytes", member.len());
        assert_eq!(decode_member(&member, 0).unwrap().attempt.log_id, a.log_id);
    }

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let a = proto::AttemptResult {
            log_id: "msg_1-1".into(),
            ..Default::default()
        };
        let member = encode_member(&a, 5, false).unwrap();
        let cursor = Cursor::of(1234, &member).unwrap();
        assert_eq!(Cursor::parse(&cursor.encode()), Some(cursor.clone()));
        for junk in [
            "",
            "x",
            "!!!",
            &B64URL.encode([0u8; 9]),
            &B64URL.encode([0u8; 12]),
        ] {
            assert_eq!(Cursor::parse(junk), None, "{junk}");
        }
        assert!(cursor.passes(1233, &member));
        assert!(!cursor.passes(1234, &member));
        assert!(!cursor.passes(1235, &member));
    }
}
