//! Deliverer: POSTs each delivery job to its webhook's URL.
//!
//! It consumes `herald.deliveries.<org>.<webhook>`, signs the body (Standard
//! Webhooks and `X-Webhook-Signature`), sends it, and publishes the attempt
//! to `herald.attempts.<org>.<webhook>` for the log-writer. A failed attempt
//! with retries left becomes a JetStream message schedule
//! (`herald.schedules.<delivery>`), which the server republishes as a job
//! when due; the job in hand is acked, so a delivery waiting for its retry
//! holds no ack-pending slot and cannot stall healthy webhooks.
//!
//! Consecutive failed attempts are counted per webhook in Redis, once per
//! attempt however often it is redelivered; past `HERALD_DISABLE_AFTER` the
//! webhook is disabled and `webhook.disabled` is published. Herald's own
//! failures are never counted, and without Redis nothing is disabled.

mod http;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, consumer};
use bytes::Bytes;
use futures::StreamExt;
use herald_core::payload::{self, Format};
use herald_core::retry::RetrySchedule;
use herald_core::secret::Keyring;
use herald_core::signing::{self, SigningKey};
use herald_core::{ids, names, proto};
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::health::Health;
use herald_platform::nats;
use herald_platform::redis::Redis;
use herald_platform::webhooks::WebhookStore;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio_util::sync::CancellationToken;

pub use crate::http::{BODY_CAP, Client};

pub const HEALTH_ADDR: &str = "HERALD_DELIVERER_HEALTH_ADDR";
pub const RETRY_SCHEDULE: &str = "HERALD_RETRY_SCHEDULE";
pub const DISABLE_AFTER: &str = "HERALD_DISABLE_AFTER";
pub const ALLOW_PRIVATE_TARGETS: &str = "HERALD_ALLOW_PRIVATE_TARGETS";
pub const SECRET_KEY: &str = "HERALD_SECRET_KEY";
pub const SECRET_KEY_PREVIOUS: &str = "HERALD_SECRET_KEY_PREVIOUS";
pub const DELIVERY_CONCURRENCY: &str = "HERALD_DELIVERY_CONCURRENCY";
pub const ENDPOINT_CONCURRENCY: &str = "HERALD_ENDPOINT_CONCURRENCY";

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub redis_url: String,
    pub health_addr: SocketAddr,
    pub retry: RetrySchedule,
    pub disable_after: u32,
    pub allow_private_targets: bool,
    pub keyring: Keyring,
    /// Deliveries in flight at once, over all webhooks.
    pub concurrency: usize,
    /// Deliveries in flight at once to one webhook.
    pub endpoint_concurrency: usize,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let retry = RetrySchedule::parse(&config::string(
            src,
            RETRY_SCHEDULE,
            "5s,1m,10m,1h,4h,12h,24h",
        ))
        .map_err(|e| ConfigError::new(RETRY_SCHEDULE, e.to_string()))?;
        let keyring = Keyring::parse(&config::required(src, SECRET_KEY)?, "")
            .map_err(|e| ConfigError::new(SECRET_KEY, e.to_string()))?;
        let keyring = match config::optional(src, SECRET_KEY_PREVIOUS) {
            None => keyring,
            Some(previous) => Keyring::parse(&config::required(src, SECRET_KEY)?, &previous)
                .map_err(|e| ConfigError::new(SECRET_KEY_PREVIOUS, e.to_string()))?,
        };
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::redis_url(src)?,
            health_addr: config::addr(src, HEALTH_ADDR, "127.0.0.1:9103")?,
            retry,
            disable_after: config::number(src, DISABLE_AFTER, 3, 0..=1_000_000)?,
            allow_private_targets: config::boolean(src, ALLOW_PRIVATE_TARGETS, false)?,
            keyring,
            concurrency: config::number(src, DELIVERY_CONCURRENCY, 1024, 1..=65_536)?,
            endpoint_concurrency: config::number(src, ENDPOINT_CONCURRENCY, 32, 1..=4096)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error("health server: {0}")]
    Health(std::io::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("webhook store: {0}")]
    Store(#[from] herald_platform::webhooks::StoreError),
    #[error("consumer: {0}")]
    Consumer(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Default)]
struct Metrics {
    deliveries: Family<OutcomeLabel, Counter>,
    disabled: Counter,
}

struct State {
    js: jetstream::Context,
    webhooks: webhooks::Webhooks,
    client: Client,
    redis: Redis,
    config: Config,
    metrics: Metrics,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let health = Health::new("deliverer");
    health.set("nats", false);
    health.set("consumer", false);
    let metrics = Metrics::default();
    health.register(|r| {
        r.register(
            "deliveries",
            "Delivery attempts, by outcome",
            metrics.deliveries.clone(),
        );
        r.register(
            "webhooks_disabled",
            "Webhooks disabled by the deliverer",
            metrics.disabled.clone(),
        );
    });
    health
        .clone()
        .serve(config.health_addr, shutdown.clone())
        .await
        .map_err(Error::Health)?;

    let client = nats::connect(&config.nats, "deliverer").await?;
    health.watch_nats(client.clone(), shutdown.clone());
    let js = jetstream::new(client.clone());
    nats::ensure_streams(
        &js,
        config.nats.replicas,
        &nats::Retention::default(),
        &shutdown,
    )
    .await?;
    let store = WebhookStore::open(&js, config.nats.replicas).await?;
    let redis = Redis::new(&config.redis_url, Duration::from_millis(250))?;

    let consumer = nats::durable_consumer(
        &js,
        names::DELIVERIES_STREAM,
        consumer::pull::Config {
            durable_name: Some(names::DELIVERER_CONSUMER.into()),
            filter_subject: names::DELIVERIES_SUBJECTS.into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: (config.concurrency * 2) as i64,
            ..Default::default()
        },
        &shutdown,
    )
    .await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(config.concurrency.min(1000))
        .messages()
        .await
        .map_err(|e| Error::Consumer(e.to_string()))?;
    health.set("consumer", true);

    let concurrency = config.concurrency;
    let state = Arc::new(State {
        js,
        webhooks: webhooks::Webhooks::new(store, shutdown.clone()),
        client: Client::new(),
        redis,
        config,
        metrics,
    });
    messages
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(concurrency, |message| {
            let state = state.clone();
            async move {
                match message {
                    Ok(message) => state.handle(message).await,
                    Err(error) => tracing::warn!(%error, "delivery consumer error"),
                }
            }
        })
        .await;
    client.flush().await.ok();
    Ok(())
}

/// How one attempt ended.
struct Outcome {
    status: proto::AttemptStatus,
    response: Option<http::Response>,
    error: String,
    /// The endpoint's fault: counts toward auto-disable.
    endpoint_failure: bool,
    /// 410 Gone: disable now.
    gone: bool,
    /// A `Retry-After` the endpoint asked for.
    retry_after: Option<Duration>,
}

impl State {
    async fn handle(&self, message: jetstream::Message) {
        let job = match proto::DeliveryJob::decode(message.payload.clone()) {
            Ok(job) => job,
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "undecodable delivery job dropped");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        match self.deliver(&job).await {
            Ok(()) => {
                let _ = message.ack().await;
            }
            Err(error) => {
                // Herald's own trouble (NATS): hand the job back untouched.
                tracing::warn!(%error, delivery_id = %job.delivery_id, "delivery handed back");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    async fn deliver(&self, job: &proto::DeliveryJob) -> Result<(), String> {
        let event = job.event.clone().unwrap_or_default();
        let webhook = self
            .webhooks
            .get(&job.organization_id, &job.webhook_id)
            .await
            .map_err(|e| e.to_string())?;
        let attempted_at_ms = now_ms();
        let mut attempt = proto::AttemptResult {
            log_id: ids::log_id(&job.delivery_id, job.attempt),
            delivery_id: job.delivery_id.clone(),
            organization_id: job.organization_id.clone(),
            webhook_id: job.webhook_id.clone(),
            event_id: event.id.clone(),
            event_type: event.r#type.clone(),
            attempt: job.attempt,
            attempted_at_ms,
            kind: job.kind,
            event: job.event.clone(),
            ..Default::default()
        };
        let Some(webhook) =
            webhook.filter(|w| w.enabled || job.kind != proto::DeliveryKind::Event as i32)
        else {
            attempt.set_status(proto::AttemptStatus::Skipped);
            attempt.error = "webhook deleted or disabled; not sent".into();
            self.metrics
                .deliveries
                .get_or_create(&OutcomeLabel { outcome: "skipped" })
                .inc();
            return self.publish_attempt(&attempt).await;
        };

        let format = Format::from(webhook.format());
        let body = Bytes::from(payload::render(&event, &webhook.id, format));
        let keys = self.signing_keys(&webhook, attempted_at_ms)?;
        let timestamp = attempted_at_ms / 1000;
        let mut builder = ::http::Request::post(&webhook.url)
            .header("content-type", format.content_type())
            .header("user-agent", concat!("Herald/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", &job.delivery_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signing::standard_signatures(&keys, &job.delivery_id, timestamp, &body),
            );
        if let Some(current) = keys.first() {
            builder = builder.header("x-webhook-signature", current.body_signature(&body));
        }
        if !event.traceparent.is_empty() {
            builder = builder.header("traceparent", &event.traceparent);
        }
        for (name, value) in &webhook.headers {
            builder = builder.header(name, value);
        }
        let request = builder.body(http_body_util::Full::new(body.clone()));
        let timeout = Duration::from_millis(if webhook.timeout_ms == 0 {
            5_000
        } else {
            webhook.timeout_ms as u64
        });

        let outcome = match request {
            Err(error) => Outcome {
                status: proto::AttemptStatus::Failed,
                response: None,
                error: format!("invalid request: {error}"),
                endpoint_failure: true,
                gone: false,
                retry_after: None,
            },
            Ok(request) => {
                attempt.request = Some(logged_request(&request, &body));
                let (result, took) = self.client.send(request, timeout).await;
                attempt.duration_ms = took.as_millis() as u64;
                classify(result)
            }
        };
        attempt.error = outcome.error.clone();
        attempt.response = outcome.response.as_ref().map(|r| proto::HttpResponse {
            status: r.status as u32,
            headers: r
                .headers
                .iter()
                .map(|(n, v)| proto::Header {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            body: r.body.clone(),
            body_truncated: r.truncated,
        });

        let succeeded = outcome.status == proto::AttemptStatus::Succeeded;
        let mut next: Option<Duration> = None;
        if !succeeded && !outcome.gone && job.kind == proto::DeliveryKind::Event as i32 {
            next = self
                .config
                .retry
                .delay_after(job.attempt, rand::random::<f64>())
                .map(|d| d.max(outcome.retry_after.unwrap_or_default()));
        }
        attempt.set_status(match (succeeded, next) {
            (true, _) => proto::AttemptStatus::Succeeded,
            (false, Some(_)) => proto::AttemptStatus::Retrying,
            (false, None) => proto::AttemptStatus::Failed,
        });
        if let Some(delay) = next {
            attempt.next_attempt_at_ms = attempted_at_ms + delay.as_millis() as i64;
            self.schedule_retry(job, attempt.next_attempt_at_ms).await?;
        }
        self.metrics
            .deliveries
            .get_or_create(&OutcomeLabel {
                outcome: if succeeded { "succeeded" } else { "failed" },
            })
            .inc();
        self.publish_attempt(&attempt).await?;

        if succeeded {
            self.reset_failures(&webhook).await;
        } else if outcome.gone {
            self.disable(&webhook, "endpoint answered 410 Gone").await;
        } else if outcome.endpoint_failure
            && let Some(count) = self.count_failure(&webhook, &attempt.log_id).await
            && count > self.config.disable_after as i64
        {
            let reason = format!(
                "{count} consecutive failed attempts; last: {}",
                outcome.error
            );
            self.disable(&webhook, &reason).await;
        }
        Ok(())
    }

    fn signing_keys(
        &self,
        webhook: &proto::Webhook,
        now_ms: i64,
    ) -> Result<Vec<SigningKey>, String> {
        let aad = names::webhook_key(&webhook.organization_id, &webhook.id);
        webhook
            .secrets
            .iter()
            .filter(|s| s.expires_at_ms == 0 || s.expires_at_ms > now_ms)
            .map(|s| {
                self.config
                    .keyring
                    .decrypt(s, &aad)
                    .map(|plain| SigningKey::new(&plain))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    async fn publish_attempt(&self, attempt: &proto::AttemptResult) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", attempt.log_id.as_str());
        let ack = self
            .js
            .publish_with_headers(
                names::attempt_subject(&attempt.organization_id, &attempt.webhook_id),
                headers,
                attempt.encode_to_vec().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn schedule_retry(&self, job: &proto::DeliveryJob, at_ms: i64) -> Result<(), String> {
        let next = proto::DeliveryJob {
            attempt: job.attempt + 1,
            not_before_ms: at_ms,
            deferrals: 0,
            ..job.clone()
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Schedule",
            format!("@at {}", payload::rfc3339_ms(at_ms)).as_str(),
        );
        headers.insert(
            "Nats-Schedule-Target",
            names::delivery_subject(&job.organization_id, &job.webhook_id).as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(
                names::schedule_subject(&job.delivery_id),
                headers,
                next.encode_to_vec().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Counts a failed attempt once, however often it is redelivered;
    /// `None` when Redis cannot say (then nothing is disabled).
    async fn count_failure(&self, webhook: &proto::Webhook, log_id: &str) -> Option<i64> {
        let mut conn = self.redis.conn().await?;
        let script = redis::Script::new(
            r"if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
                return redis.call('INCR', KEYS[1])
              end
              return tonumber(redis.call('GET', KEYS[1]) or '0')",
        );
        let mut invocation = script.prepare_invoke();
        invocation
            .key(failures_key(webhook))
            .key(format!("herald:failseen:{log_id}"))
            .arg(7 * 86_400);
        let call = invocation.invoke_async::<i64>(&mut conn);
        tokio::time::timeout(self.redis.timeout(), call)
            .await
            .ok()?
            .ok()
    }

    async fn reset_failures(&self, webhook: &proto::Webhook) {
        if let Some(mut conn) = self.redis.conn().await {
            let cmd = redis::cmd("DEL").arg(failures_key(webhook)).clone();
            let del = cmd.query_async::<()>(&mut conn);
            let _ = tokio::time::timeout(self.redis.timeout(), del).await;
        }
    }

    async fn disable(&self, webhook: &proto::Webhook, reason: &str) {
        let now = now_ms();
        let result = self
            .webhooks
            .store()
            .modify(&webhook.organization_id, &webhook.id, |w| {
                if !w.enabled {
                    return false;
                }
                w.enabled = false;
                w.disabled_reason = reason.to_owned();
                w.updated_at_ms = now;
                true
            })
            .await;
        match result {
            Ok(Some(w)) if !w.enabled && w.updated_at_ms == now => {
                self.metrics.disabled.inc();
                tracing::warn!(webhook_id = %w.id, org = %w.organization_id, reason, "webhook disabled");
                let event = serde_json::json!({
                    "id": ids::new_event_id(),
                    "type": "webhook.disabled",
                    "timestamp": payload::rfc3339_ms(now),
                    "organization_id": w.organization_id,
                    "webhook_id": w.id,
                    "data": {"reason": reason, "url": w.url, "name": w.name},
                });
                let subject = names::system_subject(&w.organization_id, "webhook.disabled");
                if let Ok(ack) = self.js.publish(subject, event.to_string().into()).await {
                    let _ = ack.await;
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, webhook_id = %webhook.id, "cannot disable webhook")
            }
        }
    }
}

fn failures_key(webhook: &proto::Webhook) -> String {
    format!("herald:failures:{}", webhook.id)
}

/// Request headers as logged: signatures and anything secret-looking masked.
fn logged_request(
    request: &::http::Request<http_body_util::Full<Bytes>>,
    body: &Bytes,
) -> proto::HttpRequest {
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let n = name.as_str();
            let secret = n.contains("signature")
                || n.contains("authorization")
                || n.contains("token")
                || n.contains("secret")
                || n.contains("key")
                || n.contains("cookie")
                || n.contains("password");
            let value = if secret {
                "********".to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            proto::Header {
                name: n.to_owned(),
                value,
            }
        })
        .collect();
    proto::HttpRequest {
        method: "POST".into(),
        url: request.uri().to_string(),
        headers,
        body: body.clone(),
    }
}

fn classify(result: Result<http::Response, http::SendError>) -> Outcome {
    match result {
        Ok(response) => {
            let status = response.status;
            let retry_after = response
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
                .filter(|_| status == 429 || status == 503);
            let ok = (200..300).contains(&status);
            Outcome {
                status: if ok {
                    proto::AttemptStatus::Succeeded
                } else {
                    proto::AttemptStatus::Failed
                },
                error: match status {
                    200..=299 => String::new(),
                    300..=399 => format!("HTTP {status}: redirects are not followed"),
                    _ => format!("HTTP {status}"),
                },
                response: Some(response),
                endpoint_failure: !ok,
                gone: status == 410,
                retry_after,
            }
        }
        Err(error) => Outcome {
            status: proto::AttemptStatus::Failed,
            response: None,
            error: error.to_string(),
            endpoint_failure: true,
            gone: false,
            retry_after: None,
        },
    }
}
