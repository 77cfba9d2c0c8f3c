//! Each organization's subscription set, found in three places in turn: an
//! in-process copy, Redis (shared by all matcher replicas), and the webhooks
//! bucket, which is the truth. Every change on the bucket's feed drops the
//! organization's entry from both caches at once, so a change takes effect
//! on the next event. If Redis is down or slow, matching goes on from the
//! bucket and the in-process copy, and the degradation is counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::matching::SubscriptionSet;
use herald_core::proto;
use herald_platform::redis::Redis;
use herald_platform::webhooks::{StoreError, WebhookStore};
use prometheus_client::metrics::counter::Counter;
use prost::Message;

fn redis_key(org: &str) -> String {
    format!("herald:subs:{org}")
}

#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub local_hits: Counter,
    pub redis_hits: Counter,
    pub rebuilds: Counter,
    pub redis_degraded: Counter,
}

struct Entry {
    set: Arc<SubscriptionSet>,
}

#[derive(Default)]
struct Local {
    entries: HashMap<String, Entry>,
    /// Bumped on every invalidation, so a rebuild that raced with a change
    /// does not store what it read before the change.
    generations: HashMap<String, u64>,
}

#[derive(Clone)]
pub struct Cache {
    store: WebhookStore,
    redis: Redis,
    ttl: Duration,
    local: Arc<Mutex<Local>>,
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
        ..Default::default()
    }
}

impl Cache {
    pub fn new(store: WebhookStore, redis: Redis, ttl: Duration) -> Self {
        Self {
            store,
            redis,
            ttl,
            local: Arc::default(),
            metrics: CacheMetrics::default(),
        }
    }

    pub async fn get(&self, org: &str) -> Result<Arc<SubscriptionSet>, StoreError> {
        let generation = {
            let local = self.local.lock().expect("cache lock");
            if let Some(entry) = local.entries.get(org) {
                self.metrics.local_hits.inc();
                return Ok(entry.set.clone());
            }
            local.generations.get(org).copied().unwrap_or_default()
        };
        let webhooks = match self.read_redis(org).await {
            Some(webhooks) => {
                self.metrics.redis_hits.inc();
                webhooks
            }
            None => {
                self.metrics.rebuilds.inc();
                let webhooks: Vec<proto::Webhook> =
                    self.store.list(org).await?.iter().map(trimmed).collect();
                self.write_redis(org, &webhooks).await;
                webhooks
            }
        };
        let set = Arc::new(SubscriptionSet::from_webhooks(&webhooks));
        let mut local = self.local.lock().expect("cache lock");
        if local.generations.get(org).copied().unwrap_or_default() == generation {
            local
                .entries
                .insert(org.to_owned(), Entry { set: set.clone() });
        }
        Ok(set)
    }

    async fn read_redis(&self, org: &str) -> Option<Vec<proto::Webhook>> {
        let mut conn = self.degraded_unless(self.redis.conn().await)?;
        let cmd = redis::cmd("GET").arg(redis_key(org)).clone();
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        let bytes = self.degraded_unless(
            tokio::time::timeout(self.redis.timeout(), get)
                .await
                .ok()
                .and_then(Result::ok),
        )??;
        decode_list(&bytes)
    }

    async fn write_redis(&self, org: &str, webhooks: &[proto::Webhook]) {
        let Some(mut conn) = self.degraded_unless(self.redis.conn().await) else {
            return;
        };
        let cmd = redis::cmd("SET")
            .arg(redis_key(org))
            .arg(encode_list(webhooks))
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .clone();
        let set = cmd.query_async::<()>(&mut conn);
        self.degraded_unless(
            tokio::time::timeout(self.redis.timeout(), set)
                .await
                .ok()
                .and_then(Result::ok),
        );
    }

    fn degraded_unless<T>(&self, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.metrics.redis_degraded.inc();
        }
        value
    }

    /// Drops `org` from both caches.
    pub async fn invalidate(&self, org: &str) {
        {
            let mut local = self.local.lock().expect("cache lock");
            local.entries.remove(org);
            *local.generations.entry(org.to_owned()).or_default() += 1;
        }
        if let Some(mut conn) = self.redis.conn().await {
            let cmd = redis::cmd("DEL").arg(redis_key(org)).clone();
            let del = cmd.query_async::<()>(&mut conn);
            if tokio::time::timeout(self.redis.timeout(), del)
                .await
                .ok()
                .and_then(Result::ok)
                .is_none()
            {
                self.metrics.redis_degraded.inc();
            }
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

fn encode_list(webhooks: &[proto::Webhook]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in webhooks {
        w.encode_length_delimited(&mut out)
            .expect("encoding into a Vec cannot fail");
    }
    out
}

fn decode_list(mut bytes: &[u8]) -> Option<Vec<proto::Webhook>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        out.push(proto::Webhook::decode_length_delimited(&mut bytes).ok()?);
    }
    Some(out)
}
