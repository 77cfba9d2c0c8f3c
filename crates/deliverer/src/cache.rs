//! The deliverer's in-process copy of webhook definitions, read from the
//! webhooks bucket on first use and dropped on every change the bucket's
//! feed reports, so a deleted or disabled webhook gets nothing more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use herald_core::proto;
use herald_platform::webhooks::{StoreError, WebhookStore};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

/// Definitions by (organization, webhook id); `None` remembers a deletion.
type Local = HashMap<(String, String), Option<Arc<proto::Webhook>>>;

#[derive(Clone)]
pub struct Webhooks {
    store: WebhookStore,
    local: Arc<Mutex<Local>>,
    /// The last revision of the bucket applied from its feed.
    revision: Gauge,
}

impl Webhooks {
    pub fn new(store: WebhookStore, revision: Gauge, shutdown: CancellationToken) -> Self {
        let this = Self {
            store,
            local: Arc::default(),
            revision,
        };
        tokio::spawn(this.clone().follow(shutdown));
        this
    }

    pub fn store(&self) -> &WebhookStore {
        &self.store
    }

    /// Takes `webhook` as the current definition: a change this deliverer
    /// made itself, before the change feed reports it.
    pub fn remember(&self, webhook: proto::Webhook) {
        let key = (webhook.organization_id.clone(), webhook.id.clone());
        self.local
            .lock()
            .expect("webhooks lock")
            .insert(key, Some(Arc::new(webhook)));
    }

    /// The current definition, or `None` when the webhook does not exist.
    pub async fn get(
        &self,
        org: &str,
        id: &str,
    ) -> Result<Option<Arc<proto::Webhook>>, StoreError> {
        let key = (org.to_owned(), id.to_owned());
        if let Some(found) = self.local.lock().expect("webhooks lock").get(&key) {
            return Ok(found.clone());
        }
        let found = self.store.get(org, id).await?.map(|v| Arc::new(v.webhook));
        // A change the feed delivered meanwhile is newer than what was read.
        Ok(self
            .local
            .lock()
            .expect("webhooks lock")
            .entry(key)
            .or_insert(found)
            .clone())
    }

    async fn follow(self, shutdown: CancellationToken) {
        loop {
            match self.store.watch().await {
                Ok(mut changes) => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        change = changes.next() => match change {
                            Some(Ok(change)) => {
                                let key = (change.org, change.webhook_id);
                                self.local.lock().expect("webhooks lock").insert(key, change.webhook.map(Arc::new));
                                self.revision.set(i64::try_from(change.revision).unwrap_or(i64::MAX));
                            }
                            Some(Err(error)) => tracing::warn!(%error, "webhook change feed"),
                            None => break,
                        }
                    }
                },
                Err(error) => tracing::warn!(%error, "cannot watch webhook changes"),
            }
            self.local.lock().expect("webhooks lock").clear();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}
