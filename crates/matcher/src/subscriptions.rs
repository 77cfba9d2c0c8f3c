//! Each organization's subscription set, found in three places in turn: an
//! in-process copy, Redis (shared by all matcher replicas), and the webhooks
//! bucket, which is the truth.
//!
//! Every change on the bucket's feed drops the organization's in-process
//! copy and bumps its generation in Redis (`herald:subs:{<org>}:gen`). A set
//! in Redis (`herald:subs:{<org>}`) carries the generation it was built at
//! and only counts while that is still current, and a rebuild stores its set
//! only if the generation it started from is still current (checked and set
//! in one script). So a rebuild that read the bucket before a change can
//! never leave a stale set behind, and a change takes effect on the next
//! event after the feed brought it.
//!
//! If Redis is down or slow, matching goes on from the bucket and the
//! in-process copy; the degradation is counted and logged at most every
//! 10 s. An organization whose change could not reach Redis is kept away
//! from Redis until it has, so a Redis that comes back cannot serve a set
//! from before the change.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use futures::StreamExt;
use herald_core::matching::SubscriptionSet;
use herald_core::proto;
use herald_platform::health::Health;
use herald_platform::redis::Redis;
use herald_platform::webhooks::{StoreError, WebhookStore};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio_util::sync::CancellationToken;

fn set_key(org: &str) -> String {
    format!("herald:subs:{{{org}}}")
}

fn generation_key(org: &str) -> String {
    format!("herald:subs:{{{org}}}:gen")
}

/// How long Redis keeps a generation counter after its last change; longer
/// than any set lives, so a counter never restarts under a live set.
const GENERATION_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Stores the set (ARGV[2]) for ARGV[3] ms if the generation is still
/// ARGV[1].
const STORE_IF_CURRENT: &str = r"
local current = redis.call('GET', KEYS[1]) or '0'
if current == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub local_hits: Counter,
    pub redis_hits: Counter,
    pub rebuilds: Counter,
    pub invalidations: Counter,
    pub redis_degraded: Counter,
}

impl CacheMetrics {
    /// The cache's metrics, registered on the matcher's `/metrics`.
    pub fn registered(health: &Health) -> Self {
        Self {
            local_hits: health.counter(
                "subscription_cache_local_hits",
                "Subscription sets found in process",
            ),
            redis_hits: health.counter(
                "subscription_cache_redis_hits",
                "Subscription sets found in Redis",
            ),
            rebuilds: health.counter(
                "subscription_cache_rebuilds",
                "Subscription sets rebuilt from the webhooks bucket",
            ),
            invalidations: health.counter(
                "subscription_cache_invalidations",
                "Organizations dropped from the subscription caches on a webhook change",
            ),
            redis_degraded: health.counter(
                "redis_degraded",
                "Redis calls that failed or timed out; work went on without Redis",
            ),
        }
    }
}

#[derive(Default)]
struct Local {
    entries: HashMap<String, Arc<SubscriptionSet>>,
    /// Bumped on every invalidation, so a rebuild that raced with a change
    /// does not keep what it read before the change.
    generations: HashMap<String, u64>,
    /// Organizations whose last change has not reached Redis yet.
    unsynced: HashSet<String>,
}

/// What Redis said about an organization.
enum Lookup {
    Hit(Vec<proto::Webhook>),
    /// No current set; a rebuild may store one at this generation.
    Miss(u64),
    Unavailable,
}

/// Each organization's subscription set: in process, then Redis, then the
/// webhooks bucket; the bucket's change feed drops an organization from both
/// caches on every change of one of its webhooks (see the
/// module docs).
#[derive(Clone)]
pub struct Cache {
    store: WebhookStore,
    redis: Redis,
    ttl: Duration,
    local: Arc<Mutex<Local>>,
    /// One rebuild per organization at a time; the others wait for it.
    loading: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    store_script: Arc<redis::Script>,
    degraded_log: Arc<Mutex<DegradedLog>>,
    pub metrics: CacheMetrics,
}

/// What matching needs of a webhook: no URL, headers or secrets in Redis.
fn trimmed(w: &proto::Webhook) -> proto::Webhook {
    proto::Webhook {
        id: w.id.clone(),
        organization_id: w.organization_id.clone(),
        event_types: w.event_types.clone(),
        filters: w.filters.clone(),
        enabled: w.enabled,
        ordering: w.ordering.clone(),
        ..Default::default()
    }
}

impl Cache {
    pub fn new(store: WebhookStore, redis: Redis, ttl: Duration, metrics: CacheMetrics) -> Self {
        Self {
            store,
            redis,
            ttl,
            local: Arc::default(),
            loading: Arc::default(),
            store_script: Arc::new(redis::Script::new(STORE_IF_CURRENT)),
            degraded_log: Arc::default(),
            metrics,
        }
    }

    fn local_get(&self, org: &str) -> Option<Arc<SubscriptionSet>> {
        let local = self.local.lock().expect("cache lock");
        let set = local.entries.get(org).cloned();
        if set.is_some() {
            self.metrics.local_hits.inc();
        }
        set
    }

    /// The organization's subscription set.
    pub async fn get(&self, org: &str) -> Result<Arc<SubscriptionSet>, StoreError> {
        if let Some(set) = self.local_get(org) {
            return Ok(set);
        }
        let lock = self
            .loading
            .lock()
            .expect("loading lock")
            .entry(org.to_owned())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.load(org).await
        };
        let mut loading = self.loading.lock().expect("loading lock");
        // Only the map and this call hold it: nobody is waiting.
        if Arc::strong_count(&lock) == 2 {
            loading.remove(org);
        }
        result
    }

    async fn load(&self, org: &str) -> Result<Arc<SubscriptionSet>, StoreError> {
        let (generation, unsynced) = {
            let local = self.local.lock().expect("cache lock");
            if let Some(set) = local.entries.get(org) {
                self.metrics.local_hits.inc();
                return Ok(set.clone());
            }
            (
                local.generations.get(org).copied().unwrap_or_default(),
                local.unsynced.contains(org),
            )
        };
        let lookup = if unsynced {
            Lookup::Unavailable
        } else {
            self.read_redis(org).await
        };
        let webhooks = match lookup {
            Lookup::Hit(webhooks) => {
                self.metrics.redis_hits.inc();
                webhooks
            }
            Lookup::Miss(redis_generation) => {
                let webhooks = self.rebuild(org).await?;
                self.write_redis(org, redis_generation, &webhooks).await;
                webhooks
            }
            Lookup::Unavailable => self.rebuild(org).await?,
        };
        let set = Arc::new(SubscriptionSet::from_webhooks(&webhooks));
        let mut local = self.local.lock().expect("cache lock");
        if local.generations.get(org).copied().unwrap_or_default() == generation {
            local.entries.insert(org.to_owned(), set.clone());
        }
        Ok(set)
    }

    async fn rebuild(&self, org: &str) -> Result<Vec<proto::Webhook>, StoreError> {
        self.metrics.rebuilds.inc();
        Ok(self.store.list(org).await?.iter().map(trimmed).collect())
    }

    async fn read_redis(&self, org: &str) -> Lookup {
        let Some(mut conn) = self.redis.conn().await else {
            self.degraded("redis unavailable");
            return Lookup::Unavailable;
        };
        let cmd = redis::cmd("MGET")
            .arg(generation_key(org))
            .arg(set_key(org))
            .clone();
        let get = cmd.query_async::<(Option<u64>, Option<Vec<u8>>)>(&mut conn);
        let (generation, stored) = match tokio::time::timeout(self.redis.timeout(), get).await {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                self.degraded(&error.to_string());
                return Lookup::Unavailable;
            }
            Err(_) => {
                self.degraded("redis timed out");
                return Lookup::Unavailable;
            }
        };
        let generation = generation.unwrap_or_default();
        match stored.as_deref().and_then(decode_set) {
            Some((at, webhooks)) if at == generation => Lookup::Hit(webhooks),
            _ => Lookup::Miss(generation),
        }
    }

    async fn write_redis(&self, org: &str, generation: u64, webhooks: &[proto::Webhook]) {
        let Some(mut conn) = self.redis.conn().await else {
            self.degraded("redis unavailable");
            return;
        };
        let mut invocation = self.store_script.prepare_invoke();
        invocation
            .key(generation_key(org))
            .key(set_key(org))
            .arg(generation)
            .arg(encode_set(generation, webhooks))
            .arg(self.ttl.as_millis() as u64);
        let store = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.redis.timeout(), store).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => self.degraded(&error.to_string()),
            Err(_) => self.degraded("redis timed out"),
        }
    }

    fn degraded(&self, error: &str) {
        self.metrics.redis_degraded.inc();
        let mut log = self.degraded_log.lock().expect("log lock");
        if log
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            log.suppressed += 1;
            return;
        }
        tracing::warn!(
            error,
            suppressed = log.suppressed,
            "redis unavailable, subscriptions come from the webhooks bucket"
        );
        log.last = Some(Instant::now());
        log.suppressed = 0;
    }

    /// Drops `org` from both caches. Called by one task at a time (the
    /// change feed's).
    pub async fn invalidate(&self, org: &str) {
        self.metrics.invalidations.inc();
        {
            let mut local = self.local.lock().expect("cache lock");
            local.entries.remove(org);
            *local.generations.entry(org.to_owned()).or_default() += 1;
            local.unsynced.insert(org.to_owned());
        }
        if self.bump_redis(org).await {
            self.local.lock().expect("cache lock").unsynced.remove(org);
        }
    }

    /// Moves the organization's generation in Redis on, so that no set built
    /// before now is served or stored any more.
    async fn bump_redis(&self, org: &str) -> bool {
        let Some(mut conn) = self.redis.conn().await else {
            self.degraded("redis unavailable");
            return false;
        };
        let pipe = redis::pipe()
            .atomic()
            .incr(generation_key(org), 1)
            .ignore()
            .pexpire(generation_key(org), GENERATION_TTL.as_millis() as i64)
            .ignore()
            .del(set_key(org))
            .ignore()
            .clone();
        let bump = pipe.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.redis.timeout(), bump).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                self.degraded(&error.to_string());
                false
            }
            Err(_) => {
                self.degraded("redis timed out");
                false
            }
        }
    }

    /// Tries again to tell Redis about changes it missed.
    pub async fn sync_redis(&self) {
        let orgs: Vec<String> = {
            let local = self.local.lock().expect("cache lock");
            local.unsynced.iter().cloned().collect()
        };
        for org in orgs {
            if !self.bump_redis(&org).await {
                return;
            }
            self.local.lock().expect("cache lock").unsynced.remove(&org);
        }
    }

    /// Drops every organization from the in-process copy (when the change
    /// feed was interrupted and changes may have been missed).
    pub fn clear_local(&self) {
        let mut local = self.local.lock().expect("cache lock");
        let orgs: Vec<String> = local.entries.drain().map(|(org, _)| org).collect();
        for org in orgs {
            *local.generations.entry(org).or_default() += 1;
        }
    }
}

#[derive(Default)]
struct DegradedLog {
    last: Option<Instant>,
    suppressed: u64,
}

fn encode_set(generation: u64, webhooks: &[proto::Webhook]) -> Vec<u8> {
    let mut out = generation.to_be_bytes().to_vec();
    for w in webhooks {
        w.encode_length_delimited(&mut out)
            .expect("encoding into a Vec cannot fail");
    }
    out
}

fn decode_set(bytes: &[u8]) -> Option<(u64, Vec<proto::Webhook>)> {
    let (generation, mut bytes) = bytes.split_at_checked(8)?;
    let generation = u64::from_be_bytes(generation.try_into().ok()?);
    let mut out = Vec::new();
    while !bytes.is_empty() {
        out.push(proto::Webhook::decode_length_delimited(&mut bytes).ok()?);
    }
    Some((generation, out))
}

/// Follows the webhooks bucket's changes and invalidates each changed
/// organization, and retries what Redis missed.
///
/// It starts `lookback` in the past (the cache TTL and a margin), so that a
/// change made while no matcher was running still clears a set Redis may
/// hold from before it; `ready` fires once that backlog is done. After an
/// interruption it resumes where it stopped, having dropped the in-process
/// copy.
pub async fn follow_changes(
    store: WebhookStore,
    cache: Cache,
    lookback: Duration,
    ready: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut ready = Some(ready);
    let start = time::OffsetDateTime::now_utc() - lookback;
    let mut policy = consumer::DeliverPolicy::ByStartTime { start_time: start };
    let mut sync = tokio::time::interval(Duration::from_secs(1));
    loop {
        match store.organizations_changed(policy).await {
            Ok((changes, backlog)) => {
                let mut changes = std::pin::pin!(changes);
                if backlog == 0
                    && let Some(ready) = ready.take()
                {
                    let _ = ready.send(());
                }
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = sync.tick() => cache.sync_redis().await,
                        change = changes.next() => match change {
                            Some(Ok(change)) => {
                                if let Some(org) = &change.org {
                                    cache.invalidate(org).await;
                                }
                                policy = consumer::DeliverPolicy::ByStartSequence {
                                    start_sequence: change.revision + 1,
                                };
                                if change.pending == 0
                                    && let Some(ready) = ready.take()
                                {
                                    let _ = ready.send(());
                                }
                            }
                            Some(Err(error)) => {
                                tracing::warn!(%error, "webhook change feed");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot follow webhook changes"),
        }
        cache.clear_local();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_carry_their_generation() {
        let w = proto::Webhook {
            id: "wh_1".into(),
            event_types: vec!["workflow.>".into()],
            enabled: true,
            ..Default::default()
        };
        let bytes = encode_set(7, &[w.clone(), w.clone()]);
        assert_eq!(decode_set(&bytes), Some((7, vec![w.clone(), w])));
        assert_eq!(decode_set(&encode_set(0, &[])), Some((0, vec![])));
        assert_eq!(decode_set(b"short"), None);
        assert_eq!(decode_set(b"\0\0\0\0\0\0\0\x01\xff"), None);
    }

    /// Against real NATS and Redis: two caches stand for two replicas.
    mod redis_races {
        use super::*;
        use herald_test_support::{NatsServer, RedisServer};

        struct Env {
            _nats: NatsServer,
            _redis: RedisServer,
            store: WebhookStore,
            redis_url: String,
        }

        async fn env() -> Env {
            let nats = NatsServer::start();
            let redis = RedisServer::start();
            let client = async_nats::connect(nats.url()).await.unwrap();
            let store = WebhookStore::open(&async_nats::jetstream::new(client), 1)
                .await
                .unwrap();
            let redis_url = redis.url();
            Env {
                _nats: nats,
                _redis: redis,
                store,
                redis_url,
            }
        }

        impl Env {
            fn cache(&self) -> Cache {
                let redis = Redis::new(&self.redis_url, Duration::from_millis(500)).unwrap();
                Cache::new(
                    self.store.clone(),
                    redis,
                    Duration::from_secs(60),
                    CacheMetrics::default(),
                )
            }

            async fn add(&self, id: &str) {
                let w = proto::Webhook {
                    id: id.into(),
                    organization_id: "acme".into(),
                    event_types: vec![">".into()],
                    enabled: true,
                    ..Default::default()
                };
                self.store.create(&w).await.unwrap();
            }
        }

        #[tokio::test]
        async fn replicas_share_sets_through_redis() {
            let env = env().await;
            env.add("wh_1").await;
            let (a, b) = (env.cache(), env.cache());
            assert_eq!(a.get("acme").await.unwrap().len(), 1);
            assert_eq!(a.metrics.rebuilds.get(), 1);
            assert_eq!(a.get("acme").await.unwrap().len(), 1);
            assert_eq!(a.metrics.local_hits.get(), 1);
            assert_eq!(b.get("acme").await.unwrap().len(), 1);
            assert_eq!(
                (b.metrics.redis_hits.get(), b.metrics.rebuilds.get()),
                (1, 0)
            );

            // A change seen by one replica is not served from Redis to another.
            env.add("wh_2").await;
            a.invalidate("acme").await;
            let c = env.cache();
            assert_eq!(c.get("acme").await.unwrap().len(), 2);
            assert_eq!(
                (c.metrics.redis_hits.get(), c.metrics.rebuilds.get()),
                (0, 1)
            );
            assert_eq!(a.metrics.redis_degraded.get(), 0);
        }

        #[tokio::test]
        async fn a_rebuild_that_raced_a_change_is_not_stored() {
            let env = env().await;
            env.add("wh_1").await;
            let a = env.cache();
            // A rebuild reads the generation and the bucket...
            let Lookup::Miss(generation) = a.read_redis("acme").await else {
                panic!("nothing cached yet");
            };
            let stale = a.rebuild("acme").await.unwrap();
            // ...then a webhook is added and the change seen...
            env.add("wh_2").await;
            a.invalidate("acme").await;
            // ...and only then does the rebuild try to store what it read.
            a.write_redis("acme", generation, &stale).await;
            let b = env.cache();
            assert_eq!(b.get("acme").await.unwrap().len(), 2, "not the stale set");
            assert_eq!(b.metrics.redis_hits.get(), 0);

            // A set stored under an old generation is never served.
            let mut conn = a.redis.conn().await.unwrap();
            let _: () = redis::cmd("SET")
                .arg(set_key("acme"))
                .arg(encode_set(generation, &stale))
                .query_async(&mut conn)
                .await
                .unwrap();
            let c = env.cache();
            assert_eq!(c.get("acme").await.unwrap().len(), 2);
            assert_eq!(
                (c.metrics.redis_hits.get(), c.metrics.rebuilds.get()),
                (0, 1)
            );
        }

        #[tokio::test]
        async fn without_redis_sets_come_from_the_bucket() {
            let mut env = env().await;
            env.add("wh_1").await;
            let a = env.cache();
            env._redis.stop();
            assert_eq!(a.get("acme").await.unwrap().len(), 1);
            env.add("wh_2").await;
            a.invalidate("acme").await;
            assert_eq!(a.get("acme").await.unwrap().len(), 2);
            assert!(a.metrics.redis_degraded.get() >= 2);
            assert!(a.local.lock().unwrap().unsynced.contains("acme"));
            // Redis back: the missed change reaches it.
            env._redis.restart();
            tokio::time::timeout(Duration::from_secs(5), async {
                while a.local.lock().unwrap().unsynced.contains("acme") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    a.sync_redis().await;
                }
            })
            .await
            .expect("synced once Redis is back");
        }
    }
}
