//! Deliverer: POSTs each delivery job to its webhook's URL, as the delivery
//! policy (`herald_core::policy`) says.
//!
//! It consumes `herald.deliveries.<org>.<webhook>`, signs the body (Standard
//! Webhooks and `X-Webhook-Signature`), sends it to a checked public address
//! ([`guard`]), and publishes the attempt to `herald.attempts.<org>.<webhook>`
//! for the log-writer. The modules, one job each:
//!
//! - [`delivery`]: one job's way through: policy, send, carry out.
//! - [`endpoint_state`]: each webhook's healthy / throttled / failing state,
//!   shared by all replicas in Redis (compare-and-set), per replica without.
//! - [`parking`]: deliveries waiting for a failing webhook (HERALD_PARKED),
//!   released on recovery, logged `webhook_disabled` on disable.
//! - [`outbox`]: attempts, delayed jobs (message schedules), probe timers,
//!   system events, dead letters.
//! - [`inflight`]: per-endpoint in-flight limit (adaptive) and deferral.
//! - [`cache`]: the webhook definitions; [`http`], [`guard`], [`outcome`].
//!
//! Nothing waits holding a global slot: a throttled or saturated webhook's
//! jobs are put back as server-side schedules, a failing one's are parked,
//! so one slow, throttled or dead URL never slows the others. On shutdown it
//! stops pulling, lets in-flight deliveries finish for
//! `HERALD_SHUTDOWN_GRACE`, and hands the rest back unacked.

mod cache;
mod delivery;
mod endpoint_state;
mod fair;
pub mod guard;
mod http;
mod inflight;
mod metrics;
mod outbox;
pub mod outcome;
mod parking;

use std::sync::Arc;
use std::time::Duration;

use herald_core::names;
use herald_core::policy::Policy;
use herald_core::retry::RetrySchedule;
use herald_core::secret::Keyring;
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::redis::Redis;
use herald_platform::webhooks::WebhookStore;
use herald_platform::{nats, worker};
use tokio_util::sync::CancellationToken;

pub use crate::fair::Settings as FairShares;
pub use crate::http::{BODY_CAP, Client, SendError};
pub use crate::inflight::deferral_delay;

pub const HEALTH_ADDR: &str = "HERALD_DELIVERER_HEALTH_ADDR";
pub const RETRY_SCHEDULE: &str = "HERALD_RETRY_SCHEDULE";
pub const DISABLE_AFTER: &str = "HERALD_DISABLE_AFTER";
pub const ALLOW_PRIVATE_TARGETS: &str = "HERALD_ALLOW_PRIVATE_TARGETS";
pub const SECRET_KEY: &str = "HERALD_SECRET_KEY";
pub const SECRET_KEY_PREVIOUS: &str = "HERALD_SECRET_KEY_PREVIOUS";
pub const DELIVERY_CONCURRENCY: &str = "HERALD_DELIVERY_CONCURRENCY";
pub const ENDPOINT_CONCURRENCY: &str = "HERALD_ENDPOINT_CONCURRENCY";
pub const LOG_BODY_LIMIT: &str = "HERALD_LOG_BODY_LIMIT";
pub const OWN_FAILURE_GIVE_UP: &str = "HERALD_OWN_FAILURE_GIVE_UP";
pub const RESOLVE_GRACE: &str = "HERALD_RESOLVE_GRACE";
pub const ORDERING_KEY_TTL: &str = "HERALD_ORDERING_KEY_TTL";

/// The consumer's ack wait (a job in hand says it is still being worked
/// on every 20 s).
const ACK_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub redis_url: String,
    pub health_addr: config::Listen,
    pub retry: RetrySchedule,
    pub disable_after: u32,
    pub allow_private_targets: bool,
    pub keyring: Keyring,
    /// Deliveries in flight at once, over all webhooks.
    pub concurrency: usize,
    /// Deliveries in flight at once to one webhook.
    pub endpoint_concurrency: usize,
    /// Every organization's default delivery limits (`fair`).
    pub fair: FairShares,
    /// How long in-flight deliveries may finish after shutdown is asked;
    /// the rest are handed back to the stream.
    pub shutdown_grace: Duration,
    /// Bytes of the request body kept in an attempt record.
    pub log_body_limit: usize,
    /// How long a job stopped by Herald's own failures is tried again
    /// (backing off) before it goes to the dead letters.
    pub own_failure_give_up: Duration,
    /// How long a webhook's name may fail to resolve in time, while other
    /// names resolve, before that counts against the webhook (its DNS, not
    /// Herald's resolver).
    pub resolve_grace: Duration,
    /// How long an ordered webhook's key keeps its sequence after its last
    /// delivery concluded (a key quiet for longer starts again at 1).
    pub ordering_key_ttl: Duration,
    /// How webhook host names are resolved (the system resolver; not
    /// configurable by environment, tests put in another).
    pub resolver: guard::Resolver,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let retry = RetrySchedule::parse(&config::string(
            src,
            RETRY_SCHEDULE,
            "5s,1m,10m,1h,4h,12h,24h",
        ))
        .map_err(|e| ConfigError::new(RETRY_SCHEDULE, e.to_string()))?;
        let previous = config::optional(src, SECRET_KEY_PREVIOUS).unwrap_or_default();
        if !previous.is_empty() {
            // Checked on its own, so that an error names the right variable.
            Keyring::parse(&previous, "")
                .map_err(|e| ConfigError::new(SECRET_KEY_PREVIOUS, e.to_string()))?;
        }
        let keyring = Keyring::parse(&config::required(src, SECRET_KEY)?, &previous)
            .map_err(|e| ConfigError::new(SECRET_KEY, e.to_string()))?;
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::redis_url(src)?,
            health_addr: config::listen(src, HEALTH_ADDR, "127.0.0.1:9103")?,
            retry,
            disable_after: config::number(src, DISABLE_AFTER, 3, 0..=1_000_000)?,
            allow_private_targets: config::boolean(src, ALLOW_PRIVATE_TARGETS, false)?,
            keyring,
            concurrency: config::number(src, DELIVERY_CONCURRENCY, 1024, 1..=65_536)?,
            endpoint_concurrency: config::number(src, ENDPOINT_CONCURRENCY, 32, 1..=4096)?,
            fair: FairShares::from_source(src)?,
            shutdown_grace: config::shutdown_grace(src)?,
            log_body_limit: config::number(src, LOG_BODY_LIMIT, 64 * 1024, 0..=1024 * 1024)?,
            own_failure_give_up: config::duration(
                src,
                OWN_FAILURE_GIVE_UP,
                Duration::from_secs(3_600),
            )?,
            resolve_grace: config::duration(src, RESOLVE_GRACE, Duration::from_secs(30))?,
            ordering_key_ttl: config::duration(
                src,
                ORDERING_KEY_TTL,
                herald_platform::ordering::KEY_TTL,
            )?,
            resolver: guard::Resolver::default(),
        })
    }
}

/// Why the service stopped.
pub use herald_platform::service::WorkerError as Error;

/// What every job task shares.
struct State {
    outbox: outbox::Outbox,
    parking: parking::Parking,
    /// Ordered webhooks' queues: a concluded delivery hands on its key's
    /// next.
    queues: herald_platform::ordering::Queues,
    webhooks: cache::Webhooks,
    states: endpoint_state::EndpointStates,
    client: Client,
    policy: Policy,
    config: Config,
    metrics: metrics::Metrics,
    inflight: inflight::InFlight,
    fair: fair::Fair,
    own_failure_warnings: delivery::Warnings,
    /// Cancelled when the grace period after shutdown ends: jobs still in
    /// hand are handed back.
    hard_stop: CancellationToken,
    /// How held jobs released from HERALD_HELD are processed and settled:
    /// as the deliveries consumer's are, on their own stream.
    held: (worker::Spec, worker::Settle),
    /// Recent connection outcomes across hosts: whether Herald's own
    /// network is down (`core::egress`).
    connects: std::sync::Mutex<herald_core::egress::Connects>,
}

/// How often every webhook with parked deliveries has its probe timer set
/// again (and once at start): a deliverer that died between parking and
/// setting the timer, or in the middle of a release, leaves nothing parked
/// for good.
const REARM_PARKED_EVERY: Duration = Duration::from_secs(300);

/// Sets the probe timer of every webhook with parked deliveries a few
/// seconds ahead, at start and every [`REARM_PARKED_EVERY`]. A timer that
/// fires early sets itself again for the webhook's next probe; one for a
/// recovered webhook releases what waits; one for a disabled or deleted
/// webhook logs it.
async fn rearm_parked(state: Arc<State>, shutdown: CancellationToken) {
    loop {
        match state.parking.parked_webhooks().await {
            Ok(webhooks) => {
                if !webhooks.is_empty() {
                    tracing::debug!(
                        webhooks = webhooks.len(),
                        "probe timers set for parked deliveries"
                    );
                }
                for (org, id) in webhooks {
                    let now = herald_platform::now_ms();
                    let at = now + 1_000 + (4_000.0 * rand::random::<f64>()) as i64;
                    if let Err(error) = state.outbox.probe_timer(&org, &id, at, now).await {
                        tracing::warn!(%error, webhook_id = %id, "cannot set the probe timer of parked deliveries");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list the webhooks with parked deliveries"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REARM_PARKED_EVERY) => {}
        }
    }
}

/// The most jobs one pull asks for.
const PULL_BATCH: usize = 500;
/// How often a job in hand says it is still being worked on (a third of
/// the ack wait): one waiting long for its endpoint keeps its claim rather
/// than being redelivered to another replica meanwhile.
const PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// The deliverer's consumer of the deliveries stream. Jobs waiting for a
/// retry or a deferral are server-side schedules, not unacked messages, so
/// `max_ack_pending` bounds only work in hand.
fn spec(concurrency: usize) -> worker::Spec {
    worker::Spec {
        stream: names::DELIVERIES_STREAM,
        durable: names::DELIVERER_CONSUMER,
        filter: names::DELIVERIES_SUBJECTS,
        ack_wait: ACK_WAIT,
        max_ack_pending: (concurrency * 2) as i64,
        batch: PULL_BATCH.min(concurrency),
        // No byte cap: a pull asks for no more jobs than slots are free,
        // and every job pulled is started at once (what is in memory is
        // bounded by the slots). A cap cost CPU per delivery (make bench).
        max_bytes: 0,
        // Naks are the last resort, when not even a schedule could be
        // published; their delays back off like schedules, so this many
        // span about the default give-up time.
        max_deliveries: herald_platform::dead_letters::MAX_HAND_BACKS,
        progress_every: Some(PROGRESS_EVERY),
        operation: "deliver",
        gather: herald_core::gather::Gather::OFF,
    }
}

/// The worker loop's handler: each job through [`State::handle`].
struct Jobs(Arc<State>);

impl worker::Handler for Jobs {
    fn handle(
        &self,
        message: &async_nats::jetstream::Message,
    ) -> impl std::future::Future<Output = worker::Disposition> + Send {
        self.0.handle(message)
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let (health, client) = herald_platform::service::start_worker(
        "deliverer",
        &config.health_addr,
        &config.nats,
        &shutdown,
    )
    .await?;
    let metrics = metrics::Metrics::registered(&health);

    let js = herald_platform::nats::jetstream(client.clone());
    nats::ensure_streams(&js, config.nats.replicas, &config.nats.streams, &shutdown).await?;
    let store = nats::retry(&shutdown, || WebhookStore::open(&js, config.nats.replicas)).await?;
    let redis = Redis::new(&config.redis_url, Duration::from_millis(250))?;
    health.watch_redis_degradable(redis.clone(), shutdown.clone());
    herald_platform::metrics::watch_retries(&health, js.clone(), shutdown.clone());

    let spec = spec(config.concurrency);
    let worker = worker::Worker::start(
        &js,
        &health,
        spec.clone(),
        Some(metrics.dead_letters.clone()),
        &shutdown,
    )
    .await?;

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
    let fair = nats::retry(&shutdown, || {
        fair::Fair::open(
            &js,
            config.nats.replicas,
            redis.clone(),
            config.concurrency,
            config.fair,
            &health,
        )
    })
    .await?;
    let state = Arc::new(State {
        outbox: outbox::Outbox::new(js.clone()),
        parking: parking::Parking::new(js.clone()),
        queues: herald_platform::ordering::Queues::new(js.clone(), config.ordering_key_ttl),
        webhooks: cache::Webhooks::new(store, metrics.webhooks_revision.clone(), shutdown.clone()),
        states: endpoint_state::EndpointStates::new(redis),
        fair,
        client: Client::new(
            config.allow_private_targets,
            config.resolver.clone(),
            config.resolve_grace,
        ),
        connects: std::sync::Mutex::default(),
        policy: Policy {
            schedule: config.retry.clone(),
            disable_after: config.disable_after,
            own_failure_give_up_ms: config.own_failure_give_up.as_millis() as i64,
        },
        inflight: inflight::InFlight::new(config.endpoint_concurrency),
        own_failure_warnings: delivery::Warnings::default(),
        hard_stop: hard_stop.clone(),
        held: (
            spec,
            worker::Settle::new(
                js.clone(),
                herald_core::fairness::HELD_STREAM,
                Some(metrics.dead_letters.clone()),
            ),
        ),
        config,
        metrics,
    });
    tokio::spawn(rearm_parked(state.clone(), shutdown.clone()));
    // Each job is its own task (signing and TLS spread over every core),
    // at most `concurrency` at once, held jobs released beside them
    // (an organization over its share) included.
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    tokio::spawn(fair::run(state.clone(), slots.clone(), shutdown.clone()));
    worker
        .each_within(Arc::new(Jobs(state)), slots.clone(), &shutdown)
        .await;
    // Released jobs too hold a slot until they end.
    let _ = slots.acquire_many(concurrency as u32).await;
    hard_stop.cancel();
    nats::flush(&client).await;
    Ok(())
}
