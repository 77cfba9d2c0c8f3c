//! Where a webhook's endpoint state (healthy, throttled, failing) lives:
//! Redis, `herald:endpoint:{<webhook>}`, shared by every deliverer replica,
//! changed only by compare-and-set so concurrent replicas cannot lose each
//! other's transitions. The decisions themselves are `core::policy`'s; this
//! module only reads and writes them.
//!
//! Reads are cached in-process for [`FRESH`], so the healthy path costs no
//! round trip per delivery, and a healthy endpoint has no key at all. With
//! Redis down the state is kept per replica instead ([`Source::Local`]):
//! deliveries go on, throttling and probing still work on each replica, and
//! nothing is ever disabled on such a view.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald_core::names;
use herald_core::policy::Endpoint;
use herald_platform::redis::Redis;

/// How long a read state is trusted before Redis is asked again.
pub const FRESH: Duration = Duration::from_millis(250);
/// How long a state key outlives its last change (longer than any
/// schedule, so a failing webhook is never forgotten).
const KEEP: Duration = Duration::from_secs(8 * 86_400);
/// Compare-and-set attempts before a change gives up and the decision is
/// taken on the latest state read, unwritten ([`Source::Contended`]). A
/// throttled endpoint's answers all change its state at once (dozens in
/// flight), so the tries back off a little, with jitter, between them.
const CAS_TRIES: u32 = 12;

/// Where a state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis: every replica sees the same.
    Shared,
    /// This replica's own view, while Redis is unreachable.
    Local,
    /// Redis kept changing under the compare-and-set: the decision was
    /// taken on the latest state read and not written. Like [`Source::Local`],
    /// nothing may be disabled on it; unlike a hand-back, a request already
    /// sent is not sent again.
    Contended,
}

/// Sets KEYS[1] to ARGV[2] (or deletes it when ARGV[2] is empty) only if it
/// still holds ARGV[1] (empty: absent).
const CAS: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1";

pub struct EndpointStates {
    redis: Redis,
    cas: redis::Script,
    /// (state, when read) by webhook id; also the fallback while Redis is
    /// down.
    cache: Mutex<HashMap<String, (Endpoint, Instant)>>,
}

fn encode(state: &Endpoint) -> String {
    match state {
        Endpoint::Healthy => String::new(),
        other => serde_json::to_string(other).expect("endpoint state encodes"),
    }
}

fn decode(text: &str) -> Endpoint {
    if text.is_empty() {
        return Endpoint::Healthy;
    }
    serde_json::from_str(text).unwrap_or_else(|error| {
        tracing::warn!(%error, "unreadable endpoint state, taken as healthy");
        Endpoint::Healthy
    })
}

impl EndpointStates {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            cas: redis::Script::new(CAS),
            cache: Mutex::default(),
        }
    }

    fn cached(&self, webhook: &str, fresh_only: bool) -> Option<Endpoint> {
        let cache = self.cache.lock().expect("endpoint cache");
        let (state, at) = cache.get(webhook)?;
        (!fresh_only || at.elapsed() < FRESH).then(|| state.clone())
    }

    fn remember(&self, webhook: &str, state: &Endpoint) {
        let mut cache = self.cache.lock().expect("endpoint cache");
        if *state == Endpoint::Healthy && cache.len() > 100_000 {
            cache.remove(webhook);
            return;
        }
        cache.insert(webhook.to_owned(), (state.clone(), Instant::now()));
    }

    async fn read_raw(&self, webhook: &str) -> Option<String> {
        let key = names::endpoint_key(webhook);
        self.redis
            .run("read endpoint state", |mut conn| async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await
            .map(Option::unwrap_or_default)
    }

    /// The webhook's state, from the cache when fresh.
    pub async fn get(&self, webhook: &str) -> (Endpoint, Source) {
        if let Some(state) = self.cached(webhook, true) {
            return (state, Source::Shared);
        }
        match self.read_raw(webhook).await {
            Some(raw) => {
                let state = decode(&raw);
                self.remember(webhook, &state);
                (state, Source::Shared)
            }
            None => (
                self.cached(webhook, false).unwrap_or_default(),
                Source::Local,
            ),
        }
    }

    /// Applies `decide` to the current state: it answers the new state
    /// (`None`: unchanged) and a result. Retried on a concurrent change;
    /// when Redis keeps changing under it, decided once more on the latest
    /// state read, unwritten, and answered as [`Source::Contended`].
    pub async fn update<R>(
        &self,
        webhook: &str,
        mut decide: impl FnMut(&Endpoint) -> (Option<Endpoint>, R),
    ) -> (R, Endpoint, Source) {
        let key = names::endpoint_key(webhook);
        let mut latest = Endpoint::Healthy;
        for tries in 0..CAS_TRIES {
            if tries > 0 {
                let cap = 1u64 << tries.min(5);
                let pause = (cap as f64 * rand::random::<f64>()) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let Some(raw) = self.read_raw(webhook).await else {
                // Redis is down: this replica's own view.
                let current = self.cached(webhook, false).unwrap_or_default();
                return self.decide_unwritten(webhook, current, decide, Source::Local);
            };
            let current = decode(&raw);
            let (next, result) = decide(&current);
            let Some(next) = next.filter(|n| *n != current) else {
                self.remember(webhook, &current);
                return (result, current, Source::Shared);
            };
            let (cas, key, new) = (&self.cas, key.clone(), encode(&next));
            let swapped = self
                .redis
                .run("change endpoint state", |mut conn| async move {
                    cas.key(&key)
                        .arg(&raw)
                        .arg(&new)
                        .arg(KEEP.as_secs())
                        .invoke_async::<i64>(&mut conn)
                        .await
                })
                .await;
            match swapped {
                Some(1) => {
                    self.remember(webhook, &next);
                    return (result, next, Source::Shared);
                }
                Some(_) => latest = current,
                None => return self.decide_unwritten(webhook, current, decide, Source::Local),
            }
        }
        tracing::debug!(
            webhook_id = webhook,
            "endpoint state kept changing; decided unwritten"
        );
        self.remember(webhook, &latest);
        self.decide_unwritten(webhook, latest, decide, Source::Contended)
    }

    /// Decides on `current` without writing to Redis. A local view keeps
    /// the outcome as this replica's state; a contended one only keeps what
    /// Redis said last.
    fn decide_unwritten<R>(
        &self,
        webhook: &str,
        current: Endpoint,
        mut decide: impl FnMut(&Endpoint) -> (Option<Endpoint>, R),
        source: Source,
    ) -> (R, Endpoint, Source) {
        let (next, result) = decide(&current);
        let state = next.unwrap_or(current);
        if source == Source::Local {
            self.remember(webhook, &state);
        }
        (result, state, source)
    }
}
