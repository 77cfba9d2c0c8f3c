//! A JetStream KV bucket of JSON records, held in memory by every admin
//! replica: organizations, API keys, console links. Each replica loads the
//! bucket once at start (one watch with history) and follows its change
//! feed, so authenticating a request costs no JetStream request, and a
//! change made on one replica (a key revoked) is applied by every other
//! within milliseconds of the write — the feed is pushed, never polled.
//!
//! Writes go to the bucket (compare-and-set where it matters) and are
//! applied to this replica's map at once. Every key keeps the revision of
//! its last change, deletions included, so the feed's older news never
//! undoes a newer write (as in `platform::webhook_view`).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The key exists (create), or changed since it was read (update).
    #[error("changed concurrently")]
    Conflict,
    #[error("{0}")]
    Unavailable(String),
}

impl From<KvError> for ApiError {
    fn from(error: KvError) -> Self {
        match error {
            KvError::Conflict => ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "conflict",
                "changed concurrently; read it again and retry",
            ),
            KvError::Unavailable(message) => {
                tracing::error!(%message, "admin bucket");
                ApiError::unavailable("store unavailable, try again")
            }
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(e.to_string())
}

/// Whether the bucket can hold `key`: 1–255 of `[-_=a-zA-Z0-9/.]` whose
/// dot-separated tokens are none empty (a subject with an empty token has
/// no responder: the server answers 503).
pub fn valid_key(key: &str) -> bool {
    (1..=255).contains(&key.len())
        && key.split('.').all(|token| !token.is_empty())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/' | b'.'))
}

/// Why a bucket could not be opened or made.
pub type OpenError = jetstream::context::CreateKeyValueError;

/// Opens `bucket`, making it (one value per key, on file) when missing.
pub async fn open(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, OpenError> {
    match js.get_key_value(bucket).await {
        Ok(kv) => Ok(kv),
        Err(_) => {
            js.create_key_value(kv::Config {
                bucket: bucket.into(),
                description: description.into(),
                history: 1,
                max_age,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
        }
    }
}

/// A key's last known change and, unless deleted, its record.
struct Slot<T> {
    revision: u64,
    value: Option<Arc<T>>,
    /// For a deletion the feed reported: when. The slot is kept (a
    /// tombstone at the deletion's revision) so that a read of the bucket
    /// made before the deletion, and applied after the feed reported it,
    /// cannot bring the record back on this replica (a revoked key
    /// accepted again); tombstones go after [`TOMBSTONE_KEPT`].
    gone_at: Option<Instant>,
}

/// How long a deletion's tombstone is kept: far longer than any read of
/// the bucket takes.
const TOMBSTONE_KEPT: Duration = Duration::from_secs(300);

pub struct KvMap<T> {
    kv: kv::Store,
    bucket: String,
    slots: Arc<RwLock<BTreeMap<String, Slot<T>>>>,
    /// Whether the first load is complete.
    loaded: watch::Sender<bool>,
}

impl<T> Clone for KvMap<T> {
    fn clone(&self) -> Self {
        Self {
            kv: self.kv.clone(),
            bucket: self.bucket.clone(),
            slots: self.slots.clone(),
            loaded: self.loaded.clone(),
        }
    }
}

impl<T> KvMap<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Starts following `kv`; [`KvMap::is_loaded`] once it has loaded.
    pub fn new(kv: kv::Store, bucket: &str, shutdown: CancellationToken) -> Self {
        let (loaded, _) = watch::channel(false);
        let this = Self {
            kv,
            bucket: bucket.to_owned(),
            slots: Arc::default(),
            loaded,
        };
        tokio::spawn(this.clone().follow(shutdown));
        this
    }

    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Waits (a few seconds at most) for the first load.
    pub async fn wait_loaded(&self) -> Result<(), ApiError> {
        let mut rx = self.loaded.subscribe();
        match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ApiError::unavailable("still loading, try again")),
        }
    }

    /// The record under `key`, as this replica knows it.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        let slots = self.slots.read().expect("kv map lock");
        slots.get(key).and_then(|s| s.value.clone())
    }

    /// Every record, by key.
    pub fn values(&self) -> Vec<Arc<T>> {
        let slots = self.slots.read().expect("kv map lock");
        slots.values().filter_map(|s| s.value.clone()).collect()
    }

    /// The record under `key` read from the bucket itself, with its
    /// revision (what a compare-and-set compares against).
    pub async fn fetch(&self, key: &str) -> Result<Option<(T, u64)>, KvError> {
        // A key the bucket cannot hold (from a URL, say) names nothing.
        if !valid_key(key) {
            return Ok(None);
        }
        let Some(entry) = self.kv.entry(key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let value: T = serde_json::from_slice(&entry.value)
            .map_err(|e| unavailable(format!("corrupt record {key:?}: {e}")))?;
        self.apply(key, Some(Arc::new(value.clone())), entry.revision, false);
        Ok(Some((value, entry.revision)))
    }

    /// Stores a new record; [`KvError::Conflict`] when `key` exists.
    pub async fn create(&self, key: &str, value: T) -> Result<u64, KvError> {
        let bytes = serde_json::to_vec(&value).map_err(unavailable)?;
        let revision = match self.kv.create(key, bytes.into()).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                return Err(KvError::Conflict);
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.apply(key, Some(Arc::new(value)), revision, false);
        Ok(revision)
    }

    /// Replaces the record read at `revision`; [`KvError::Conflict`] when it
    /// changed (or was deleted) since.
    pub async fn update(&self, key: &str, value: T, revision: u64) -> Result<u64, KvError> {
        let bytes = serde_json::to_vec(&value).map_err(unavailable)?;
        let revision = match self.kv.update(key, bytes.into(), revision).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                return Err(KvError::Conflict);
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.apply(key, Some(Arc::new(value)), revision, false);
        Ok(revision)
    }

    /// Deletes `key` (a no-op when it is not there).
    pub async fn delete(&self, key: &str) -> Result<(), KvError> {
        let known = {
            let slots = self.slots.read().expect("kv map lock");
            slots.get(key).map_or(0, |s| s.revision)
        };
        self.kv.delete(key).await.map_err(unavailable)?;
        // The deletion's own revision is not answered; held at the one
        // known, so older puts from the feed are ignored until the feed
        // reports the deletion.
        let mut slots = self.slots.write().expect("kv map lock");
        let slot = slots.entry(key.to_owned()).or_insert(Slot {
            revision: known,
            value: None,
            gone_at: None,
        });
        if slot.revision <= known {
            slot.value = None;
        }
        Ok(())
    }

    fn apply(&self, key: &str, value: Option<Arc<T>>, revision: u64, from_feed: bool) {
        let mut slots = self.slots.write().expect("kv map lock");
        admit(&mut slots, key, value, revision, from_feed, Instant::now());
    }

    async fn follow(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.load_and_follow(&shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, bucket = %self.bucket, "change feed lost; reloading")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Reads every key, then follows the changes; `Ok` only at shutdown.
    async fn load_and_follow(&self, shutdown: &CancellationToken) -> Result<(), KvError> {
        let mut info = self.kv.stream.clone();
        let last = info.info().await.map_err(unavailable)?.state.last_sequence;
        let mut changes = self.kv.watch_with_history(">").await.map_err(unavailable)?;
        let mut seen = HashSet::new();
        let mut loading = last > 0;
        if !loading {
            self.loaded(&seen, last);
        }
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                entry = changes.next() => entry,
            };
            let entry = match entry {
                Some(Ok(entry)) => entry,
                Some(Err(error)) => return Err(unavailable(error)),
                None => return Err(unavailable("change feed ended")),
            };
            let value = match entry.operation {
                kv::Operation::Put => match serde_json::from_slice::<T>(&entry.value) {
                    Ok(value) => Some(Arc::new(value)),
                    Err(error) => {
                        tracing::warn!(%error, key = %entry.key, bucket = %self.bucket, "skipping a corrupt record");
                        continue;
                    }
                },
                _ => None,
            };
            if loading {
                seen.insert(entry.key.clone());
            }
            self.apply(&entry.key, value, entry.revision, true);
            if loading && (entry.seen_current || entry.revision >= last) {
                self.loaded(&seen, last);
                seen = HashSet::new();
                loading = false;
            }
        }
    }

    /// After a (re)load: forgets keys the load did not report and that were
    /// not changed since it began (deleted while the feed was lost).
    fn loaded(&self, seen: &HashSet<String>, before: u64) {
        let mut slots = self.slots.write().expect("kv map lock");
        slots.retain(|key, slot| slot.revision > before || seen.contains(key));
        drop(slots);
        self.loaded.send_replace(true);
    }
}

/// Puts what was read of `key` at `revision` into `slots`, unless they hold
/// a later revision (a read made before a change and applied after it
/// changes nothing). A deletion the feed reported stays as a tombstone for
/// [`TOMBSTONE_KEPT`]; older tombstones go when another deletion comes.
fn admit<T>(
    slots: &mut BTreeMap<String, Slot<T>>,
    key: &str,
    value: Option<Arc<T>>,
    revision: u64,
    from_feed: bool,
    now: Instant,
) {
    if slots.get(key).is_some_and(|s| s.revision >= revision) {
        return;
    }
    let gone_at = (from_feed && value.is_none()).then_some(now);
    if gone_at.is_some() {
        slots.retain(|_, s| s.gone_at.is_none_or(|at| now - at < TOMBSTONE_KEPT));
    }
    slots.insert(
        key.to_owned(),
        Slot {
            revision,
            value,
            gone_at,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one replica sees, in order: (key, from the feed?, revision, the
    /// record or its deletion, seconds since the start).
    type Step = (&'static str, bool, u64, Option<&'static str>, u64);

    /// The record `k` ends with, and how many slots (tombstones included).
    fn seen(steps: &[Step]) -> (Option<String>, usize) {
        let start = Instant::now();
        let mut slots = BTreeMap::new();
        for &(key, from_feed, revision, value, at) in steps {
            let value = value.map(|v| Arc::new(v.to_owned()));
            let now = start + Duration::from_secs(at);
            admit(&mut slots, key, value, revision, from_feed, now);
        }
        let value = slots
            .get("k")
            .and_then(|s: &Slot<String>| s.value.as_deref().cloned());
        (value, slots.len())
    }

    #[test]
    fn a_read_older_than_what_the_feed_said_changes_nothing() {
        let cases: &[(&str, &[Step], Option<&str>, usize)] = &[
            (
                "made, then read",
                &[("k", true, 1, Some("a"), 0), ("k", false, 1, Some("a"), 0)],
                Some("a"),
                1,
            ),
            (
                "changed, then an older read",
                &[("k", true, 2, Some("b"), 0), ("k", false, 1, Some("a"), 0)],
                Some("b"),
                1,
            ),
            // The revoked key brought back by a read made before the
            // revocation and applied after the feed reported it.
            (
                "deleted, then an older read",
                &[
                    ("k", true, 1, Some("a"), 0),
                    ("k", true, 3, None, 0),
                    ("k", false, 2, Some("a"), 0),
                ],
                None,
                1,
            ),
            (
                "deleted, then made again",
                &[("k", true, 3, None, 0), ("k", true, 4, Some("c"), 0)],
                Some("c"),
                1,
            ),
            (
                "a read before the feed",
                &[("k", false, 2, Some("a"), 0), ("k", true, 1, Some("x"), 0)],
                Some("a"),
                1,
            ),
            // A tombstone goes once it is old and another deletion comes.
            (
                "tombstones expire",
                &[
                    ("k", true, 3, None, 0),
                    ("o", true, 5, Some("o"), 400),
                    ("o", true, 6, None, 400),
                ],
                None,
                1,
            ),
            (
                "tombstones kept while young",
                &[
                    ("k", true, 3, None, 0),
                    ("o", true, 5, Some("o"), 100),
                    ("o", true, 6, None, 100),
                ],
                None,
                2,
            ),
        ];
        for (name, steps, want, len) in cases {
            assert_eq!(seen(steps), (want.map(str::to_owned), *len), "{name}");
        }
    }

    #[test]
    fn keys_the_bucket_can_hold() {
        for (key, want) in [
            ("acme", true),
            ("acme.wh_1", true),
            ("a/b=c-d_e", true),
            ("", false),
            (".acme", false),
            ("acme.", false),
            ("0..0", false),
            ("a b", false),
            ("a*", false),
            ("a>", false),
            (&"k".repeat(255), true),
            (&"k".repeat(256), false),
        ] {
            assert_eq!(valid_key(key), want, "{key:?}");
        }
    }
}
