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
//!
//! A Redis that answers reads but refuses writes (full, with `noeviction`)
//! is the same as a down one for the webhook whose change it refused: from
//! the failed write on, that webhook's state is this replica's own view,
//! and Redis is not read for it (what Redis holds is older than what this
//! replica has decided since: a breaker acting on it would send a failing
//! URL a burst every time the cache expired). At most every
//! [`WRITE_RETRY`] a change tries to write the local view back; once a
//! write succeeds, Redis is the webhook's state again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald_core::names;
use herald_core::policy::Endpoint;
use herald_platform::endpoint_state::{decode, encode};
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
/// How often a webhook whose state this replica keeps on its own (a write
/// failed) tries to write it back to Redis.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// Where a state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Redis: every replica sees the same.
    Shared,
    /// This replica's own view, while Redis is unreachable or refuses to
    /// store the webhook's state.
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
    /// Webhooks whose state is this replica's own (a write to Redis
    /// failed), with when to try writing it back.
    local: Mutex<HashMap<String, Instant>>,
}

impl EndpointStates {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            cas: redis::Script::new(CAS),
            cache: Mutex::default(),
            local: Mutex::default(),
        }
    }

    /// `Some(due)` while the webhook's state is this replica's own, `due`
    /// saying whether it is time to try writing it back.
    fn local_view(&self, webhook: &str) -> Option<bool> {
        let local = self.local.lock().expect("endpoint local views");
        local
            .get(webhook)
            .map(|retry_at| *retry_at <= Instant::now())
    }

    /// A write failed (or Redis did not answer): the webhook's state is this
    /// replica's own until a write succeeds.
    fn go_local(&self, webhook: &str) {
        let mut local = self.local.lock().expect("endpoint local views");
        if local.len() < 100_000 || local.contains_key(webhook) {
            local.insert(webhook.to_owned(), Instant::now() + WRITE_RETRY);
        }
    }

    fn go_shared(&self, webhook: &str) {
        self.local
            .lock()
            .expect("endpoint local views")
            .remove(webhook);
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

    /// Compare-and-set of the state stored at `key`: `new` replaces `raw`
    /// when Redis still holds `raw`. Answers the script's result (1 when it
    /// swapped), or `None` when Redis refused or did not answer.
    async fn swap(&self, what: &str, key: &str, raw: &str, new: &str) -> Option<i64> {
        let cas = &self.cas;
        self.redis
            .run(what, |mut conn| async move {
                cas.key(key)
                    .arg(raw)
                    .arg(new)
                    .arg(KEEP.as_secs())
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await
    }

    /// The webhook's state, from the cache when fresh.
    pub async fn get(&self, webhook: &str) -> (Endpoint, Source) {
        if self.local_view(webhook).is_some() {
            return (
                self.cached(webhook, false).unwrap_or_default(),
                Source::Local,
            );
        }
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
        match self.local_view(webhook) {
            Some(false) => {
                let current = self.cached(webhook, false).unwrap_or_default();
                return self.decide_unwritten(webhook, current, decide, Source::Local);
            }
            Some(true) => {
                if let Some(done) = self.write_back(webhook, &key, &mut decide).await {
                    return done;
                }
            }
            None => {
                // A healthy endpoint read within `FRESH` that the decision
                // leaves healthy (a success, the common case) needs no
                // round trip: nothing is written, as Redis would have been
                // asked only to be told the same. A change another replica
                // made within `FRESH` is then not undone by this success
                // (the next probe does that); every other decision reads
                // Redis and swaps under compare-and-set as before.
                if let Some(cached) = self
                    .cached(webhook, true)
                    .filter(|c| *c == Endpoint::Healthy)
                {
                    let (next, result) = decide(&cached);
                    if next.is_none_or(|n| n == cached) {
                        return (result, cached, Source::Shared);
                    }
                }
            }
        }
        let mut latest = Endpoint::Healthy;
        for tries in 0..CAS_TRIES {
            if tries > 0 {
                let cap = 1u64 << tries.min(5);
                let pause = (cap as f64 * rand::random::<f64>()) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let Some(raw) = self.read_raw(webhook).await else {
                // Redis is down: this replica's own view.
                self.go_local(webhook);
                let current = self.cached(webhook, false).unwrap_or_default();
                return self.decide_unwritten(webhook, current, decide, Source::Local);
            };
            let current = decode(&raw);
            let (next, result) = decide(&current);
            let Some(next) = next.filter(|n| *n != current) else {
                self.remember(webhook, &current);
                return (result, current, Source::Shared);
            };
            let swapped = self
                .swap("change endpoint state", &key, &raw, &encode(&next))
                .await;
            match swapped {
                Some(1) => {
                    self.remember(webhook, &next);
                    return (result, next, Source::Shared);
                }
                Some(_) => latest = current,
                // Refused (full) or unanswered: from here on this replica
                // decides for the webhook on its own view, starting from
                // what Redis said, and Redis's copy is not read again until
                // a write succeeds.
                None => {
                    tracing::debug!(
                        webhook_id = webhook,
                        "endpoint state not stored; deciding on this replica's view"
                    );
                    self.go_local(webhook);
                    return self.decide_unwritten(webhook, current, decide, Source::Local);
                }
            }
        }
        tracing::debug!(
            webhook_id = webhook,
            "endpoint state kept changing; decided unwritten"
        );
        self.remember(webhook, &latest);
        self.decide_unwritten(webhook, latest, decide, Source::Contended)
    }

    /// The webhook's state is this replica's own and it is time to try
    /// writing it back: decides on the local view and stores the result in
    /// Redis. `None` when another replica changed Redis meanwhile (Redis
    /// takes writes again: decide on its state as usual).
    async fn write_back<R>(
        &self,
        webhook: &str,
        key: &str,
        decide: &mut impl FnMut(&Endpoint) -> (Option<Endpoint>, R),
    ) -> Option<(R, Endpoint, Source)> {
        let current = self.cached(webhook, false).unwrap_or_default();
        let (next, result) = decide(&current);
        let state = next.unwrap_or(current);
        let Some(raw) = self.read_raw(webhook).await else {
            self.go_local(webhook);
            self.remember(webhook, &state);
            return Some((result, state, Source::Local));
        };
        let new = encode(&state);
        if raw == new {
            // Redis holds what this replica decided: nothing to write.
            self.go_shared(webhook);
            self.remember(webhook, &state);
            return Some((result, state, Source::Shared));
        }
        let swapped = self
            .swap("write back endpoint state", key, &raw, &new)
            .await;
        match swapped {
            Some(1) => {
                tracing::debug!(
                    webhook_id = webhook,
                    "endpoint state stored again; shared from here on"
                );
                self.go_shared(webhook);
                self.remember(webhook, &state);
                Some((result, state, Source::Shared))
            }
            Some(_) => {
                self.go_shared(webhook);
                None
            }
            None => {
                self.go_local(webhook);
                self.remember(webhook, &state);
                Some((result, state, Source::Local))
            }
        }
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
