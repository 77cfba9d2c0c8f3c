//! Deliverer: POSTs each delivery job to its webhook's URL.
//!
//! It consumes `herald.deliveries.<org>.<webhook>`, signs the body (Standard
//! Webhooks and `X-Webhook-Signature`), sends it to a checked public address
//! ([`guard`]), and publishes the attempt to `herald.attempts.<org>.<webhook>`
//! for the log-writer. A failed attempt with retries left becomes a
//! JetStream message schedule (`herald.schedules.<delivery>`), which the
//! server republishes as a job when due; the job in hand is acked, so a
//! delivery waiting for its retry holds no ack-pending slot and cannot stall
//! healthy webhooks. A job whose endpoint already has
//! `HERALD_ENDPOINT_CONCURRENCY` requests in flight is deferred the same way
//! instead of waiting in one of the `HERALD_DELIVERY_CONCURRENCY` slots.
//!
//! Consecutive failed attempts are counted per webhook in Redis, once per
//! attempt however often it is redelivered; past `HERALD_DISABLE_AFTER` (or
//! on a 410) the webhook is disabled and `webhook.disabled` is published.
//! Herald's own failures are never counted, and without Redis nothing is
//! disabled. On shutdown it stops pulling, lets in-flight deliveries finish
//! for `HERALD_SHUTDOWN_GRACE`, and hands the rest back unacked.

mod endpoints;
pub mod guard;
mod http;
pub mod outcome;
mod webhooks;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
use herald_platform::redis::Redis;
use herald_platform::webhooks::WebhookStore;
use herald_platform::{metrics, nats, trace};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use crate::endpoints::deferral_delay;
pub use crate::http::{BODY_CAP, Client, SendError};
use crate::outcome::Outcome;

pub const HEALTH_ADDR: &str = "HERALD_DELIVERER_HEALTH_ADDR";
pub const RETRY_SCHEDULE: &str = "HERALD_RETRY_SCHEDULE";
pub const DISABLE_AFTER: &str = "HERALD_DISABLE_AFTER";
pub const ALLOW_PRIVATE_TARGETS: &str = "HERALD_ALLOW_PRIVATE_TARGETS";
pub const SECRET_KEY: &str = "HERALD_SECRET_KEY";
pub const SECRET_KEY_PREVIOUS: &str = "HERALD_SECRET_KEY_PREVIOUS";
pub const DELIVERY_CONCURRENCY: &str = "HERALD_DELIVERY_CONCURRENCY";
pub const ENDPOINT_CONCURRENCY: &str = "HERALD_ENDPOINT_CONCURRENCY";

/// A webhook's timeout when it sets none.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// The longest timeout a webhook may set (the admin API refuses more).
pub const MAX_TIMEOUT_MS: u64 = 30_000;
/// Times a job is put back because its endpoint is saturated before it
/// waits for a turn instead (about five minutes of deferrals).
pub const MAX_DEFERRALS: u32 = 64;
/// The consumer's ack wait, and how often a job in hand says it is still
/// being worked on.
const ACK_WAIT: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: Duration = Duration::from_secs(20);
/// How long a counted failure is remembered (the longest retry schedule
/// runs ~41 h).
const FAILURE_MEMORY: Duration = Duration::from_secs(7 * 86_400);

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
    /// How long in-flight deliveries may finish after shutdown is asked;
    /// the rest are handed back to the stream.
    pub shutdown_grace: Duration,
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
            shutdown_grace: config::shutdown_grace(src)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error(transparent)]
    Start(#[from] herald_platform::service::StartError),
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

#[derive(Clone)]
struct Metrics {
    deliveries: Family<OutcomeLabel, Counter>,
    disabled: Counter,
    attempt_duration: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            deliveries: Family::default(),
            disabled: Counter::default(),
            attempt_duration: metrics::attempt_duration(),
        }
    }
}

struct State {
    js: jetstream::Context,
    webhooks: webhooks::Webhooks,
    client: Client,
    redis: Redis,
    config: Config,
    metrics: Metrics,
    endpoints: endpoints::Limits,
    /// Failure counters whose reset Redis missed.
    pending_resets: Mutex<HashSet<String>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The most jobs one pull asks for.
const PULL_BATCH: usize = 500;
/// How long one pull waits for jobs before the next is made.
const PULL_EXPIRES: Duration = Duration::from_millis(500);

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (health, client) = herald_platform::service::start_worker(
        "deliverer",
        config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = Metrics::default();
    health.register(|r| {
        r.register(
            "deliveries",
            "Delivery jobs handled, by outcome (succeeded, retrying, failed, skipped, deferred)",
            metrics.deliveries.clone(),
        );
        r.register(
            "webhooks_disabled",
            "Webhooks disabled by the deliverer",
            metrics.disabled.clone(),
        );
        r.register(
            "delivery_attempt_duration_seconds",
            "How long customer endpoints took to answer an attempt",
            metrics.attempt_duration.clone(),
        );
    });

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
    health.watch_redis_degradable(redis.clone(), shutdown.clone());
    metrics::watch_retries(&health, js.clone(), shutdown.clone());

    // Jobs waiting for a retry or a deferral are server-side schedules, not
    // unacked messages, so max_ack_pending bounds only work in hand.
    let consumer = nats::durable_consumer(
        &js,
        names::DELIVERIES_STREAM,
        consumer::pull::Config {
            durable_name: Some(names::DELIVERER_CONSUMER.into()),
            filter_subject: names::DELIVERIES_SUBJECTS.into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: (config.concurrency * 2) as i64,
            ..Default::default()
        },
        &shutdown,
    )
    .await?;
    metrics::watch_consumer(
        &health,
        &consumer,
        names::DELIVERER_CONSUMER,
        shutdown.clone(),
    );
    health.set("consumer", true);

    let concurrency = config.concurrency;
    let grace = config.shutdown_grace;
    let hard_stop = CancellationToken::new();
    {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            hard_stop.cancel();
        });
    }
    let state = Arc::new(State {
        js,
        webhooks: webhooks::Webhooks::new(store, shutdown.clone()),
        client: Client::new(config.allow_private_targets),
        redis,
        endpoints: endpoints::Limits::new(config.endpoint_concurrency),
        pending_resets: Mutex::default(),
        config,
        metrics,
    });
    // Each job is its own task (signing and TLS spread over every core),
    // at most `concurrency` at once. Jobs are pulled in batches no larger
    // than the free slots, one short-lived pull request at a time, so on
    // shutdown no pull request is left for nobody to read: every job pulled
    // is either started or handed back at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    while !shutdown.is_cancelled() {
        // Wait for a free slot without holding it.
        let free = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => {
                drop(slot.expect("slots are never closed"));
                slots.available_permits()
            }
        };
        let batch = consumer
            .batch()
            .max_messages(free.min(PULL_BATCH))
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "cannot pull delivery jobs");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "delivery consumer error");
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                // Pulled but not started: another replica takes it now.
                let _ = message.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            // Never more jobs were asked for than slots were free.
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("slots are never closed");
            let (state, hard_stop) = (state.clone(), hard_stop.clone());
            let span =
                trace::message_span("deliver", &message.subject, message.headers.as_ref(), "");
            tasks.spawn(
                async move {
                    state.handle(message, &hard_stop).await;
                    drop(slot);
                }
                .instrument(span),
            );
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    hard_stop.cancel();
    nats::flush(&client).await;
    Ok(())
}

/// What becomes of the job in hand.
enum Done {
    /// Finished (sent, skipped, deferred or scheduled): ack it.
    Ack,
    /// Herald's own trouble (NATS, the webhook store): hand it back as is.
    HandBack(String),
}

impl State {
    async fn handle(&self, message: jetstream::Message, hard_stop: &CancellationToken) {
        let job = match proto::DeliveryJob::decode(message.payload.clone()) {
            Ok(job) => job,
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "undecodable delivery job dropped");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let deliver = self.deliver(&job);
        tokio::pin!(deliver);
        // A job that waits long for its endpoint's turn keeps its claim
        // rather than being redelivered to another replica meanwhile.
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let done = loop {
            tokio::select! {
                done = &mut deliver => break done,
                // The grace period is over: another replica (or this one,
                // restarted) will make the attempt.
                _ = hard_stop.cancelled() => break Done::HandBack("shutting down".into()),
                _ = progress.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        };
        match done {
            Done::Ack => {
                let _ = message.ack().await;
            }
            Done::HandBack(error) => {
                tracing::warn!(%error, delivery_id = %job.delivery_id, attempt = job.attempt, "delivery handed back");
                let delay = if hard_stop.is_cancelled() {
                    None
                } else {
                    Some(Duration::from_secs(1))
                };
                let _ = message.ack_with(AckKind::Nak(delay)).await;
            }
        }
    }

    async fn deliver(&self, job: &proto::DeliveryJob) -> Done {
        let webhook = match self
            .webhooks
            .get(&job.organization_id, &job.webhook_id)
            .await
        {
            Ok(webhook) => webhook,
            Err(error) => return Done::HandBack(error.to_string()),
        };
        let event = job.event.clone().unwrap_or_default();
        let mut attempt = proto::AttemptResult {
            log_id: ids::log_id(&job.delivery_id, job.attempt),
            delivery_id: job.delivery_id.clone(),
            organization_id: job.organization_id.clone(),
            webhook_id: job.webhook_id.clone(),
            event_id: event.id.clone(),
            event_type: event.r#type.clone(),
            attempt: job.attempt,
            attempted_at_ms: now_ms(),
            kind: job.kind,
            event: job.event.clone(),
            ..Default::default()
        };
        // Test and manual deliveries go to a disabled webhook too: that is
        // how a tenant checks it before re-enabling it.
        let Some(webhook) =
            webhook.filter(|w| w.enabled || job.kind != proto::DeliveryKind::Event as i32)
        else {
            attempt.set_status(proto::AttemptStatus::Skipped);
            attempt.error = "webhook deleted or disabled; not sent".into();
            self.count("skipped");
            return self.finish(self.publish_attempt(&attempt).await);
        };

        let key = (webhook.organization_id.clone(), webhook.id.clone());
        let permit = match self.endpoints.acquire_if_moving(&key).await {
            Some(permit) => permit,
            None if job.deferrals < MAX_DEFERRALS => {
                // Its endpoint is at its limit and stalled: rather than
                // holding one of the global slots, come back a little later.
                let delay = deferral_delay(job.deferrals, rand::random::<f64>());
                let next = proto::DeliveryJob {
                    deferrals: job.deferrals + 1,
                    not_before_ms: now_ms() + delay.as_millis() as i64,
                    ..job.clone()
                };
                self.count("deferred");
                return self.finish(self.schedule(&next).await);
            }
            // Deferred long enough: wait for a turn (bounded by the
            // endpoint's timeout, as every request holding a permit is).
            None => self.endpoints.acquire(&key).await,
        };
        attempt.attempted_at_ms = now_ms();
        let outcome = self.send(job, &event, &webhook, &mut attempt).await;
        drop(permit);
        self.conclude(job, &webhook, attempt, outcome).await
    }

    fn finish(&self, result: Result<(), String>) -> Done {
        match result {
            Ok(()) => Done::Ack,
            Err(error) => Done::HandBack(error),
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Builds, signs and sends the request; fills in what was sent and got.
    async fn send(
        &self,
        job: &proto::DeliveryJob,
        event: &proto::Event,
        webhook: &proto::Webhook,
        attempt: &mut proto::AttemptResult,
    ) -> Outcome {
        let url = match url::Url::parse(&webhook.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            Ok(url) => {
                return Outcome::failed(format!("unsupported URL scheme {}", url.scheme()), true);
            }
            Err(error) => return Outcome::failed(format!("invalid URL: {error}"), true),
        };
        let format = Format::from(webhook.format());
        let body = Bytes::from(payload::render(event, &webhook.id, format));
        let keys = match self.signing_keys(webhook, attempt.attempted_at_ms) {
            Ok(keys) if !keys.is_empty() => keys,
            Ok(_) => {
                return Outcome::failed("webhook has no live secret; not sent".into(), false);
            }
            Err(error) => {
                // Herald's own configuration (HERALD_SECRET_KEY): not the
                // endpoint's fault.
                return Outcome::failed(format!("cannot decrypt the secret: {error}"), false);
            }
        };
        let timestamp = attempt.attempted_at_ms / 1000;
        // The url crate normalizes the host: numeric forms like 2130706433
        // become the dotted address the SSRF guard checks.
        let mut builder = ::http::Request::post(url.as_str())
            .header("content-type", format.content_type())
            .header("user-agent", concat!("Herald/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", &job.delivery_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signing::standard_signatures(&keys, &job.delivery_id, timestamp, &body),
            )
            .header("x-webhook-signature", keys[0].body_signature(&body));
        if let Some(traceparent) = trace::outgoing(&event.traceparent) {
            builder = builder.header("traceparent", traceparent);
        }
        for (name, value) in &webhook.headers {
            builder = builder.header(name, value);
        }
        let request = match builder.body(http_body_util::Full::new(body.clone())) {
            Ok(request) => request,
            Err(error) => return Outcome::failed(format!("invalid request: {error}"), true),
        };
        attempt.request = Some(logged_request(&request, &body));
        let timeout = Duration::from_millis(match webhook.timeout_ms {
            0 => DEFAULT_TIMEOUT_MS,
            ms => u64::from(ms).min(MAX_TIMEOUT_MS),
        });
        let (result, took) = self.client.send(request, timeout).await;
        attempt.duration_ms = took.as_millis() as u64;
        self.metrics.attempt_duration.observe(took.as_secs_f64());
        outcome::classify(result, SystemTime::now())
    }

    /// Counts, disables, schedules the retry and publishes the attempt.
    async fn conclude(
        &self,
        job: &proto::DeliveryJob,
        webhook: &proto::Webhook,
        mut attempt: proto::AttemptResult,
        outcome: Outcome,
    ) -> Done {
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
        let succeeded = outcome.succeeded();

        let mut disable = outcome
            .gone
            .then(|| "the endpoint answered 410 Gone".to_owned());
        if !succeeded
            && outcome.endpoint_failure
            && let Some(count) = self.count_failure(webhook, &attempt.log_id).await
            && count > self.config.disable_after as i64
        {
            disable.get_or_insert_with(|| {
                format!(
                    "{count} consecutive failed attempts; last: {}",
                    outcome.error
                )
            });
        }
        let next =
            if succeeded || disable.is_some() || job.kind != proto::DeliveryKind::Event as i32 {
                None
            } else {
                self.config
                    .retry
                    .delay_after(job.attempt, rand::random::<f64>())
                    .map(|d| d.max(outcome.retry_after.unwrap_or_default()))
            };
        attempt.set_status(match (succeeded, next) {
            (true, _) => proto::AttemptStatus::Succeeded,
            (false, Some(_)) => proto::AttemptStatus::Retrying,
            (false, None) => proto::AttemptStatus::Failed,
        });
        if let Some(reason) = &disable
            && let Err(error) = self.disable(webhook, reason).await
        {
            // Counting is idempotent per attempt: the redelivered job comes
            // to the same decision.
            return Done::HandBack(format!("cannot disable webhook: {error}"));
        }
        if let Some(delay) = next {
            attempt.next_attempt_at_ms = now_ms() + delay.as_millis() as i64;
            let retry = proto::DeliveryJob {
                attempt: job.attempt + 1,
                not_before_ms: attempt.next_attempt_at_ms,
                deferrals: 0,
                ..job.clone()
            };
            if let Err(error) = self.schedule(&retry).await {
                return Done::HandBack(error);
            }
        }
        self.count(match attempt.status() {
            proto::AttemptStatus::Succeeded => "succeeded",
            proto::AttemptStatus::Retrying => "retrying",
            _ => "failed",
        });
        if !succeeded {
            tracing::info!(
                webhook_id = %webhook.id,
                delivery_id = %job.delivery_id,
                attempt = job.attempt,
                error = %outcome.error,
                next_attempt_at_ms = attempt.next_attempt_at_ms,
                "delivery attempt failed"
            );
        }
        if let Err(error) = self.publish_attempt(&attempt).await {
            return Done::HandBack(error);
        }
        if succeeded {
            self.reset_failures(webhook).await;
        }
        Done::Ack
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

    /// Publishes `job` as a JetStream message schedule that the server
    /// turns back into a delivery job at `job.not_before_ms`. One schedule
    /// per delivery: a newer one replaces an older one.
    async fn schedule(&self, job: &proto::DeliveryJob) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        trace::inject(
            &mut headers,
            job.event
                .as_ref()
                .map(|e| e.traceparent.as_str())
                .unwrap_or_default(),
        );
        headers.insert(
            "Nats-Schedule",
            format!("@at {}", payload::rfc3339_ms(job.not_before_ms)).as_str(),
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
                job.encode_to_vec().into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Counts a failed attempt once, however often it is redelivered, and
    /// answers the webhook's consecutive failures; `None` when Redis cannot
    /// say (then nothing is disabled). A reset that Redis missed (it was
    /// down when a delivery succeeded) is applied first, so a stale count
    /// never disables a webhook.
    async fn count_failure(&self, webhook: &proto::Webhook, log_id: &str) -> Option<i64> {
        let key = failures_key(webhook);
        let reset_first = self
            .pending_resets
            .lock()
            .expect("resets lock")
            .contains(&key);
        let mut conn = self.redis.conn().await?;
        let script = redis::Script::new(
            r"if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
              if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
                local n = redis.call('INCR', KEYS[1])
                redis.call('EXPIRE', KEYS[1], ARGV[1])
                return n
              end
              return tonumber(redis.call('GET', KEYS[1]) or '0')",
        );
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&key)
            .key(format!("herald:failseen:{log_id}"))
            .arg(FAILURE_MEMORY.as_secs())
            .arg(if reset_first { "1" } else { "0" });
        let call = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.redis.timeout(), call).await {
            Ok(Ok(count)) => {
                if reset_first {
                    self.pending_resets
                        .lock()
                        .expect("resets lock")
                        .remove(&key);
                }
                Some(count)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, webhook_id = %webhook.id, "cannot count failure; not disabling");
                None
            }
            Err(_) => {
                tracing::warn!(webhook_id = %webhook.id, "counting failure timed out; not disabling");
                None
            }
        }
    }

    async fn reset_failures(&self, webhook: &proto::Webhook) {
        let key = failures_key(webhook);
        let done = match self.redis.conn().await {
            Some(mut conn) => {
                let cmd = redis::cmd("DEL").arg(&key).clone();
                let del = cmd.query_async::<()>(&mut conn);
                matches!(
                    tokio::time::timeout(self.redis.timeout(), del).await,
                    Ok(Ok(()))
                )
            }
            None => false,
        };
        let mut pending = self.pending_resets.lock().expect("resets lock");
        if done {
            pending.remove(&key);
        } else {
            pending.insert(key);
        }
    }

    /// Disables the webhook and publishes `webhook.disabled`, once.
    async fn disable(&self, webhook: &proto::Webhook, reason: &str) -> Result<(), String> {
        let now = now_ms();
        let mut changed = false;
        let stored = self
            .webhooks
            .store()
            .modify(&webhook.organization_id, &webhook.id, |w| {
                changed = w.enabled;
                if w.enabled {
                    w.enabled = false;
                    w.disabled_reason = reason.to_owned();
                    w.updated_at_ms = now;
                }
                changed
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(w) = stored else {
            return Ok(());
        };
        // Jobs already queued are skipped from now on, without waiting for
        // the bucket's change feed.
        self.webhooks.remember(w.clone());
        if !changed {
            return Ok(());
        }
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
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let published = match self
            .js
            .publish_with_headers(subject, headers, event.to_string().into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = published {
            tracing::warn!(%error, webhook_id = %w.id, "cannot publish webhook.disabled");
        }
        Ok(())
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
