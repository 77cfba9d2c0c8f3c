//! The webhooks KV bucket: `herald.v1.Webhook` values under
//! `<org>.<webhook id>`. Writes compare-and-set on the revision, so a lost
//! race is a conflict, never a silent overwrite. The bucket's change feed
//! ([`WebhookStore::watch`]) tells matchers and deliverers what changed.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use herald_core::{names, proto};
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("webhook changed concurrently")]
    Conflict,
    #[error("webhook store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt webhook record {key}: {message}")]
    Corrupt { key: String, message: String },
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A webhook with the KV revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub webhook: proto::Webhook,
    pub revision: u64,
}

/// A change seen on the bucket's feed.
#[derive(Debug, Clone)]
pub struct Change {
    pub org: String,
    pub webhook_id: String,
    /// The new definition; `None` when deleted.
    pub webhook: Option<proto::Webhook>,
    /// The bucket's revision (stream sequence) of this change: the feed is
    /// in order, so a follower that applied revision R has seen every
    /// change up to R.
    pub revision: u64,
}

/// A change seen on [`WebhookStore::organizations_changed`]: whose, and
/// where in the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    /// The organization whose webhook changed (`None`: a key that names
    /// none, which Herald never writes).
    pub org: Option<String>,
    /// The bucket's revision of the change.
    pub revision: u64,
    /// Changes stored after it when it was sent.
    pub pending: u64,
}

#[derive(Clone)]
pub struct WebhookStore {
    kv: kv::Store,
    js: jetstream::Context,
}

impl std::fmt::Debug for WebhookStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookStore").finish_non_exhaustive()
    }
}

impl WebhookStore {
    /// Opens the bucket, creating it when missing.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, StoreError> {
        let kv = match js.get_key_value(names::WEBHOOKS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: names::WEBHOOKS_BUCKET.into(),
                    description: "Herald webhook definitions".into(),
                    history: 5,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?,
        };
        Ok(Self { kv, js: js.clone() })
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<proto::Webhook, StoreError> {
        proto::Webhook::decode(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        })
    }

    pub async fn get(&self, org: &str, id: &str) -> Result<Option<Versioned>, StoreError> {
        if !names::valid_org(org) || !names::valid_id(id) {
            return Ok(None);
        }
        let key = names::webhook_key(org, id);
        match self.kv.entry(key.as_str()).await.map_err(unavailable)? {
            Some(entry) if entry.operation == kv::Operation::Put => Ok(Some(Versioned {
                webhook: Self::decode(&key, &entry.value)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// An ordered consumer on the bucket's stream, delivered to a new inbox.
    async fn ordered(
        &self,
        config: jetstream::consumer::push::OrderedConfig,
    ) -> Result<jetstream::consumer::Consumer<jetstream::consumer::push::OrderedConfig>, StoreError>
    {
        let stream = self
            .js
            .get_stream(names::WEBHOOKS_STREAM)
            .await
            .map_err(unavailable)?;
        stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                ..config
            })
            .await
            .map_err(unavailable)
    }

    /// Every webhook of `org`, in creation order.
    pub async fn list(&self, org: &str) -> Result<Vec<proto::Webhook>, StoreError> {
        if !names::valid_org(org) {
            return Ok(Vec::new());
        }
        let consumer = self
            .ordered(jetstream::consumer::push::OrderedConfig {
                filter_subject: names::webhooks_subject(&format!("{org}.>")),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut webhooks = Vec::with_capacity(remaining as usize);
        if remaining == 0 {
            return Ok(webhooks);
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while remaining > 0 {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .map_err(|_| unavailable("listing webhooks timed out"))?
                .ok_or_else(|| unavailable("listing webhooks ended early"))?
                .map_err(unavailable)?;
            remaining = message.info().map_err(unavailable)?.pending;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            if !deleted {
                webhooks.push(Self::decode(&message.subject, &message.payload)?);
            }
        }
        webhooks.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(webhooks)
    }

    /// Stores a new webhook; fails with `Conflict` when the id exists.
    pub async fn create(&self, webhook: &proto::Webhook) -> Result<u64, StoreError> {
        let key = names::webhook_key(&webhook.organization_id, &webhook.id);
        self.kv
            .create(key, webhook.encode_to_vec().into())
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                _ => unavailable(e),
            })
    }

    /// Replaces a webhook read at `revision`; `Conflict` if it changed since.
    pub async fn update(&self, webhook: &proto::Webhook, revision: u64) -> Result<u64, StoreError> {
        let key = names::webhook_key(&webhook.organization_id, &webhook.id);
        self.kv
            .update(key, webhook.encode_to_vec().into(), revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
                _ => unavailable(e),
            })
    }

    /// Deletes a webhook read at `revision`; `Conflict` if it changed since.
    pub async fn delete(&self, org: &str, id: &str, revision: u64) -> Result<(), StoreError> {
        let key = names::webhook_key(org, id);
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| match e.kind() {
                kv::DeleteErrorKind::WrongLastRevision => StoreError::Conflict,
                _ => unavailable(e),
            })
    }

    /// Applies `change` to the current definition, retrying on conflicts.
    /// `change` returns false to leave the webhook as it is. Returns the
    /// stored webhook, or `None` when it does not exist.
    pub async fn modify(
        &self,
        org: &str,
        id: &str,
        mut change: impl FnMut(&mut proto::Webhook) -> bool,
    ) -> Result<Option<proto::Webhook>, StoreError> {
        for _ in 0..10 {
            let Some(Versioned {
                mut webhook,
                revision,
            }) = self.get(org, id).await?
            else {
                return Ok(None);
            };
            if !change(&mut webhook) {
                return Ok(Some(webhook));
            }
            match self.update(&webhook, revision).await {
                Ok(_) => return Ok(Some(webhook)),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Every change from now on.
    pub async fn watch(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Change, StoreError>> + use<>, StoreError> {
        let watch = self.kv.watch_all().await.map_err(unavailable)?;
        Ok(watch.map(|entry| Ok(Self::change(entry.map_err(unavailable)?)?.0)))
    }

    /// Which organizations' webhooks change, from `start` on: headers only
    /// (no definitions are read), for a follower that only invalidates what
    /// it holds per organization. Also answers how many changes were
    /// already stored when it began (the backlog to catch up on).
    pub async fn organizations_changed(
        &self,
        start: jetstream::consumer::DeliverPolicy,
    ) -> Result<
        (
            impl futures::Stream<Item = Result<Touch, StoreError>> + use<>,
            u64,
        ),
        StoreError,
    > {
        let consumer = self
            .ordered(jetstream::consumer::push::OrderedConfig {
                filter_subject: names::webhooks_subject(">"),
                deliver_policy: start,
                headers_only: true,
                ..Default::default()
            })
            .await?;
        let backlog = consumer.cached_info().num_pending;
        let feed = consumer.messages().await.map_err(unavailable)?;
        let touches = feed.map(|message| {
            let message = message.map_err(unavailable)?;
            let info = message.info().map_err(unavailable)?;
            Ok(Touch {
                org: names::parse_webhooks_subject(&message.subject).map(|(org, _)| org.to_owned()),
                revision: info.stream_sequence,
                pending: info.pending,
            })
        });
        Ok((touches, backlog))
    }

    /// Every key's last change, then every change from then on; each with
    /// whether the feed has reached what the bucket held when it began.
    pub async fn watch_with_history(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<(Change, bool), StoreError>> + use<>, StoreError>
    {
        let watch = self.kv.watch_with_history(">").await.map_err(unavailable)?;
        Ok(watch.map(|entry| Self::change(entry.map_err(unavailable)?)))
    }

    fn change(entry: kv::Entry) -> Result<(Change, bool), StoreError> {
        let (org, id) =
            names::parse_webhook_key(&entry.key).ok_or_else(|| StoreError::Corrupt {
                key: entry.key.clone(),
                message: "bad key".into(),
            })?;
        let webhook = match entry.operation {
            kv::Operation::Put => Some(Self::decode(&entry.key, &entry.value)?),
            _ => None,
        };
        let change = Change {
            org: org.to_owned(),
            webhook_id: id.to_owned(),
            webhook,
            revision: entry.revision,
        };
        Ok((change, entry.seen_current))
    }

    /// The bucket's last revision: every change up to it has been stored.
    pub async fn last_revision(&self) -> Result<u64, StoreError> {
        // Getting the stream is one info request; its answer is the state.
        let stream = self
            .js
            .get_stream(names::WEBHOOKS_STREAM)
            .await
            .map_err(unavailable)?;
        Ok(stream.cached_info().state.last_sequence)
    }
}
