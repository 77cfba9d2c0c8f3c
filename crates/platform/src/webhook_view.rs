//! An in-process view of the whole webhooks bucket, fed by one watch of
//! its change feed, for a service that lists and counts webhooks on every
//! request (admin). Listing the bucket itself costs an ephemeral JetStream
//! consumer per call, and a server holds only about a thousand of those at
//! once: under ordinary API traffic every call would start failing. The
//! view costs one consumer per process, whatever the traffic.
//!
//! Writes go through the view to the bucket (compare-and-set, as with
//! [`WebhookStore`]) and are applied to it at once, so a replica's next
//! list shows its own create; other replicas' writes arrive on the feed
//! within milliseconds. Where a decision must see every replica's writes
//! (a limit checked under the organization's lock), [`WebhookView::caught_up`]
//! waits until the view has applied the bucket's last revision. Single
//! reads ([`WebhookView::get`]) still go to the bucket: they carry the
//! revision a write must compare against.
//!
//! Each key keeps the revision it was last changed at, deletions included,
//! so a change older than what the view holds (the feed reporting a write
//! this replica already applied, or a put older than a delete) is ignored,
//! whatever order local writes and the feed arrive in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use herald_core::proto;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::webhooks::{Change, StoreError, Versioned, WebhookStore};

/// How long a read waits for the view's first load before answering that
/// the store is unavailable.
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(10);
/// How long [`WebhookView::caught_up`] waits for the feed.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct WebhookView {
    store: WebhookStore,
    inner: Arc<RwLock<View>>,
    /// The last revision applied from the feed, and whether the first load
    /// is complete (`None` until then).
    applied: watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for WebhookView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookView").finish_non_exhaustive()
    }
}

/// One key: the revision of its last known change and, unless deleted, the
/// definition.
#[derive(Debug, Clone)]
struct Slot {
    revision: u64,
    webhook: Option<Arc<proto::Webhook>>,
}

/// Every organization's webhooks by id (ids are UUIDv7: creation order).
#[derive(Debug, Default)]
struct View {
    orgs: HashMap<String, Org>,
}

#[derive(Debug, Default)]
struct Org {
    slots: BTreeMap<String, Slot>,
    live: usize,
}

impl View {
    /// Applies a change at `revision` unless the view already holds a newer
    /// one for that key. A deletion reported by the feed leaves nothing
    /// behind: nothing older than it can arrive after it.
    fn apply(
        &mut self,
        org: &str,
        id: &str,
        webhook: Option<Arc<proto::Webhook>>,
        revision: u64,
        from_feed: bool,
    ) {
        let entry = self.orgs.entry(org.to_owned()).or_default();
        let held = entry.slots.get(id);
        if held.is_some_and(|s| s.revision >= revision) {
            return;
        }
        let was_live = held.is_some_and(|s| s.webhook.is_some());
        let is_live = webhook.is_some();
        if from_feed && !is_live {
            entry.slots.remove(id);
        } else {
            entry
                .slots
                .insert(id.to_owned(), Slot { revision, webhook });
        }
        match (was_live, is_live) {
            (false, true) => entry.live += 1,
            (true, false) => entry.live -= 1,
            _ => {}
        }
        if entry.slots.is_empty() {
            self.orgs.remove(org);
        }
    }

    /// A deletion this process made of the definition read at `revision`:
    /// the bucket does not say the deletion's own revision, only that it is
    /// later, so it is held at `revision` (older puts the feed may still
    /// bring are ignored) until the feed reports it.
    fn deleted_locally(&mut self, org: &str, id: &str, revision: u64) {
        let entry = self.orgs.entry(org.to_owned()).or_default();
        let slot = entry.slots.entry(id.to_owned()).or_insert(Slot {
            revision,
            webhook: None,
        });
        if slot.revision <= revision {
            if slot.webhook.take().is_some() {
                entry.live -= 1;
            }
            slot.revision = revision;
        }
    }

    /// After a reload: forgets what the reload did not report and was not
    /// changed since it began (a key purged while the feed was lost).
    fn sweep(&mut self, seen: &HashSet<(String, String)>, before: u64) {
        for (org, entry) in &mut self.orgs {
            let mut gone = 0;
            entry.slots.retain(|id, slot| {
                let keep = slot.revision > before || seen.contains(&(org.clone(), id.clone()));
                if !keep && slot.webhook.is_some() {
                    gone += 1;
                }
                keep
            });
            entry.live -= gone;
        }
        self.orgs.retain(|_, o| !o.slots.is_empty());
    }
}

impl WebhookView {
    /// Starts following the bucket; reads wait for the first load.
    pub fn new(store: WebhookStore, shutdown: CancellationToken) -> Self {
        let (applied, _) = watch::channel(None);
        let this = Self {
            store,
            inner: Arc::default(),
            applied,
        };
        tokio::spawn(this.clone().follow(shutdown));
        this
    }

    /// The bucket itself, for what the view does not answer.
    pub fn store(&self) -> &WebhookStore {
        &self.store
    }

    /// Whether the first load is complete.
    pub fn is_loaded(&self) -> bool {
        self.applied.borrow().is_some()
    }

    /// The last revision applied from the feed (0 before the first load).
    pub fn revision(&self) -> u64 {
        self.applied.borrow().unwrap_or(0)
    }

    async fn loaded(&self) -> Result<(), StoreError> {
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(FIRST_LOAD_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(
                "the webhook list is still loading".into(),
            )),
        }
    }

    /// Waits until the view has applied every change the bucket held when
    /// called: then a list shows every replica's writes made before.
    pub async fn caught_up(&self) -> Result<(), StoreError> {
        self.loaded().await?;
        let last = self.store.last_revision().await?;
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(CATCH_UP_WAIT, rx.wait_for(|r| r.is_some_and(|r| r >= last)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(
                "the webhook list is behind the bucket".into(),
            )),
        }
    }

    /// Every webhook of `org`, in creation order.
    pub async fn list(&self, org: &str) -> Result<Vec<Arc<proto::Webhook>>, StoreError> {
        self.loaded().await?;
        let view = self.inner.read().expect("view lock");
        Ok(view
            .orgs
            .get(org)
            .map(|o| o.slots.values().filter_map(|s| s.webhook.clone()).collect())
            .unwrap_or_default())
    }

    /// A page of `org`'s webhooks after the id `after`, at most `limit`,
    /// and how many the organization has in all.
    pub async fn page(
        &self,
        org: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Arc<proto::Webhook>>, usize), StoreError> {
        use std::ops::Bound;
        self.loaded().await?;
        let view = self.inner.read().expect("view lock");
        let Some(entry) = view.orgs.get(org) else {
            return Ok((Vec::new(), 0));
        };
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_owned()));
        let page = entry
            .slots
            .range((from, Bound::Unbounded))
            .filter_map(|(_, s)| s.webhook.clone())
            .take(limit)
            .collect();
        Ok((page, entry.live))
    }

    /// How many webhooks `org` has.
    pub async fn count(&self, org: &str) -> Result<usize, StoreError> {
        self.loaded().await?;
        let view = self.inner.read().expect("view lock");
        Ok(view.orgs.get(org).map_or(0, |o| o.live))
    }

    /// One webhook with its revision, read from the bucket.
    pub async fn get(&self, org: &str, id: &str) -> Result<Option<Versioned>, StoreError> {
        self.store.get(org, id).await
    }

    pub async fn create(&self, webhook: &proto::Webhook) -> Result<u64, StoreError> {
        let revision = self.store.create(webhook).await?;
        self.remember(webhook.clone(), revision);
        Ok(revision)
    }

    pub async fn update(&self, webhook: &proto::Webhook, revision: u64) -> Result<u64, StoreError> {
        let revision = self.store.update(webhook, revision).await?;
        self.remember(webhook.clone(), revision);
        Ok(revision)
    }

    /// Deletes a webhook read at `revision`. The deletion's own revision is
    /// not reported by the bucket; it is later than `revision`, and the view
    /// holds the deletion at `revision` until the feed reports it, which
    /// ignores the older puts the feed may still bring.
    pub async fn delete(&self, org: &str, id: &str, revision: u64) -> Result<(), StoreError> {
        self.store.delete(org, id, revision).await?;
        self.inner
            .write()
            .expect("view lock")
            .deleted_locally(org, id, revision);
        Ok(())
    }

    fn remember(&self, webhook: proto::Webhook, revision: u64) {
        let (org, id) = (webhook.organization_id.clone(), webhook.id.clone());
        self.inner.write().expect("view lock").apply(
            &org,
            &id,
            Some(Arc::new(webhook)),
            revision,
            false,
        );
    }

    async fn follow(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.load_and_follow(&shutdown).await {
                Ok(()) => return,
                Err(error) => tracing::warn!(%error, "webhook change feed lost; reloading"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Reads the bucket's every key, then follows its changes. Returns
    /// `Ok` only at shutdown.
    async fn load_and_follow(&self, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let last = self.store.last_revision().await?;
        let mut changes = self.store.watch_with_history().await?;
        let mut seen = HashSet::new();
        let mut loading = true;
        if last == 0 {
            self.loaded_at(0, &seen, last);
            loading = false;
        }
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                change = changes.next() => change,
            };
            let (change, current) = match change {
                Some(Ok(found)) => found,
                Some(Err(StoreError::Corrupt { key, message })) => {
                    tracing::warn!(key, message, "skipping a corrupt webhook record");
                    continue;
                }
                Some(Err(error)) => return Err(error),
                None => return Err(StoreError::Unavailable("change feed ended".into())),
            };
            let Change {
                org,
                webhook_id,
                webhook,
                revision,
            } = change;
            if loading {
                seen.insert((org.clone(), webhook_id.clone()));
            }
            self.inner.write().expect("view lock").apply(
                &org,
                &webhook_id,
                webhook.map(Arc::new),
                revision,
                true,
            );
            if loading && (current || revision >= last) {
                self.loaded_at(revision, &seen, last);
                seen = HashSet::new();
                loading = false;
            } else if !loading {
                self.applied.send_replace(Some(revision));
            }
        }
    }

    fn loaded_at(&self, revision: u64, seen: &HashSet<(String, String)>, before: u64) {
        self.inner.write().expect("view lock").sweep(seen, before);
        let previous = self.applied.borrow().unwrap_or(0);
        self.applied.send_replace(Some(revision.max(previous)));
        tracing::debug!(revision, "webhook view loaded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(id: &str) -> Option<Arc<proto::Webhook>> {
        Some(Arc::new(proto::Webhook {
            id: id.into(),
            organization_id: "acme".into(),
            ..Default::default()
        }))
    }

    fn ids(view: &View) -> Vec<(String, u64, bool)> {
        view.orgs
            .get("acme")
            .map(|o| {
                o.slots
                    .iter()
                    .map(|(id, s)| (id.clone(), s.revision, s.webhook.is_some()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn live(view: &View) -> usize {
        view.orgs.get("acme").map_or(0, |o| o.live)
    }

    #[test]
    fn changes_apply_by_revision_whatever_order_they_arrive_in() {
        // (what arrives, from the feed?, the slots after, live count)
        let mut view = View::default();
        // A local create, then the feed reporting the same write: one webhook.
        view.apply("acme", "a", hook("a"), 10, false);
        view.apply("acme", "a", hook("a"), 10, true);
        assert_eq!(ids(&view), vec![("a".into(), 10, true)]);
        assert_eq!(live(&view), 1);
        // An older put from the feed after a newer local update: ignored.
        view.apply("acme", "a", hook("a"), 12, false);
        view.apply("acme", "a", hook("a"), 11, true);
        assert_eq!(ids(&view), vec![("a".into(), 12, true)]);
        // A local delete is held at the revision read: the feed's put of
        // that revision is older; the feed's deletion marker drops it.
        view.deleted_locally("acme", "a", 12);
        assert_eq!(ids(&view), vec![("a".into(), 12, false)]);
        assert_eq!(live(&view), 0);
        view.apply("acme", "a", hook("a"), 12, true);
        assert_eq!(ids(&view), vec![("a".into(), 12, false)]);
        view.apply("acme", "a", None, 13, true);
        assert!(ids(&view).is_empty());
        assert!(view.orgs.is_empty(), "an empty organization is forgotten");
        // A local delete of a key the view never held still hides the
        // older put the feed brings.
        view.deleted_locally("acme", "b", 20);
        view.apply("acme", "b", hook("b"), 19, true);
        assert_eq!(live(&view), 0);
        // A delete from the feed for an unknown key leaves nothing behind.
        let mut fresh = View::default();
        fresh.apply("acme", "b", None, 5, true);
        assert!(fresh.orgs.is_empty());
        assert_eq!(live(&fresh), 0);
    }

    #[test]
    fn a_reload_forgets_keys_it_did_not_see() {
        let mut view = View::default();
        view.apply("acme", "a", hook("a"), 1, true);
        view.apply("acme", "b", hook("b"), 2, true);
        view.apply("acme", "c", hook("c"), 9, false);
        let seen = HashSet::from([("acme".to_owned(), "a".to_owned())]);
        // The reload began at revision 5: b was purged meanwhile, c was
        // written after it began.
        view.sweep(&seen, 5);
        assert_eq!(
            ids(&view),
            vec![("a".into(), 1, true), ("c".into(), 9, true)]
        );
        assert_eq!(live(&view), 2);
    }
}
