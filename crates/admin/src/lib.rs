//! Admin: the HTTP API tenants use to manage webhooks and read delivery
//! logs (see PRODUCT.md, "Webhooks (admin API)"). Webhooks live in the
//! JetStream KV bucket; every write there is seen by matchers and
//! deliverers on the bucket's change feed. Logs are read from the Redis log
//! index that log-writer maintains. `/live`, `/ready` and `/metrics` are
//! served on the health port (`HERALD_ADMIN_HEALTH_ADDR`) like every
//! service's, and `/live` and `/ready` on the API port too, for a load
//! balancer; the metrics are not public.

pub mod api_keys;
pub mod audit;
pub mod auth;
mod body;
mod console;
pub mod console_links;
pub mod dead_letters;
pub mod error;
pub mod jobs;
pub mod kv_map;
pub mod limits;
mod logs;
pub mod organizations;
mod random;
mod validate;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::catalogue::Catalogue;
use herald_core::secret::Keyring;
use herald_platform::config::{self, ConfigError, Source};
use herald_platform::health::Health;
use herald_platform::log_index::LogIndex;
use herald_platform::nats;
use herald_platform::redis::Redis;
use herald_platform::webhook_view::WebhookView;
use herald_platform::webhooks::WebhookStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{FileKeys, HashKey, Keys};
use crate::error::ApiError;

pub const ADMIN_ADDR: &str = "HERALD_ADMIN_ADDR";
pub const HEALTH_ADDR: &str = "HERALD_ADMIN_HEALTH_ADDR";
pub const API_KEYS_FILE: &str = "HERALD_API_KEYS_FILE";
pub const SECRET_KEY: &str = "HERALD_SECRET_KEY";
pub const SECRET_KEY_PREVIOUS: &str = "HERALD_SECRET_KEY_PREVIOUS";
pub const ALLOW_HTTP: &str = "HERALD_ALLOW_HTTP";
pub const MAX_WEBHOOKS_PER_WORKFLOW: &str = "HERALD_MAX_WEBHOOKS_PER_WORKFLOW";
pub const MAX_WEBHOOKS_PER_ORG: &str = "HERALD_MAX_WEBHOOKS_PER_ORG";
pub const MANUAL_SENDS_PER_MINUTE: &str = "HERALD_MANUAL_SENDS_PER_MINUTE";
pub const AUTH_FAILURES_PER_MINUTE: &str = "HERALD_AUTH_FAILURES_PER_MINUTE";
pub const API_REQUESTS_PER_MINUTE: &str = "HERALD_API_REQUESTS_PER_MINUTE";
pub const EXTRA_EVENT_TYPES: &str = "HERALD_EXTRA_EVENT_TYPES";
pub const LOG_RETENTION: &str = "HERALD_LOG_RETENTION";
pub const API_KEY_HASH_KEY: &str = "HERALD_API_KEY_HASH_KEY";
pub const CONSOLE_URL: &str = "HERALD_CONSOLE_URL";
pub const CONSOLE_FRAME_ANCESTORS: &str = "HERALD_CONSOLE_FRAME_ANCESTORS";

/// Largest request body accepted; more is a 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: config::Nats,
    pub redis_url: String,
    /// The Redis of the log index (`HERALD_LOG_REDIS_URL`, else the same).
    pub log_redis_url: String,
    pub addr: config::Listen,
    /// `/live`, `/ready` and `/metrics`.
    pub health_addr: config::Listen,
    /// The bootstrap keys as read at start, and their file (re-read when
    /// it changes).
    pub keys: Keys,
    pub keys_path: std::path::PathBuf,
    /// What API keys and console tokens are hashed with.
    pub hash_key: HashKey,
    /// Where console links point (`HERALD_CONSOLE_URL`; else the request's
    /// host).
    pub console_url: Option<String>,
    /// Origins allowed to frame the console (`HERALD_CONSOLE_FRAME_ANCESTORS`).
    pub frame_ancestors: Vec<String>,
    pub keyring: Keyring,
    pub allow_http: bool,
    pub max_webhooks_per_workflow: usize,
    pub max_webhooks_per_org: usize,
    pub manual_sends_per_minute: u32,
    /// Failed authentications allowed per source address and minute.
    pub auth_failures_per_minute: u32,
    pub api_requests_per_minute: u32,
    pub catalogue: Catalogue,
    pub log_retention: Duration,
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let keys_path = config::required(src, API_KEYS_FILE)?;
        let keys_json = std::fs::read_to_string(&keys_path).map_err(|e| {
            ConfigError::new(API_KEYS_FILE, format!("cannot read {keys_path:?}: {e}"))
        })?;
        let keys = Keys::parse(&keys_json).map_err(|e| e.of(API_KEYS_FILE))?;
        let current = config::required(src, SECRET_KEY)?;
        let previous = config::string(src, SECRET_KEY_PREVIOUS, "");
        let keyring = Keyring::parse(&current, &previous).map_err(|e| {
            let var = if Keyring::parse(&current, "").is_ok() {
                SECRET_KEY_PREVIOUS
            } else {
                SECRET_KEY
            };
            ConfigError::new(var, e.to_string())
        })?;
        let extra = config::string(src, EXTRA_EVENT_TYPES, "");
        let hash_key = match config::optional(src, API_KEY_HASH_KEY) {
            Some(text) if text.trim().len() >= 32 => HashKey::new(text.trim().as_bytes()),
            Some(_) => {
                return Err(ConfigError::new(
                    API_KEY_HASH_KEY,
                    "must be at least 32 characters (e.g. `openssl rand -base64 32`)",
                ));
            }
            // Stable as long as HERALD_SECRET_KEY is (docs/configuration.md).
            None => HashKey::derive(current.trim()),
        };
        let console_url = config::optional(src, CONSOLE_URL)
            .map(|text| console::parse_console_url(&text))
            .transpose()
            .map_err(|e| e.of(CONSOLE_URL))?;
        let frame_ancestors =
            console::parse_frame_ancestors(&config::string(src, CONSOLE_FRAME_ANCESTORS, ""))
                .map_err(|e| e.of(CONSOLE_FRAME_ANCESTORS))?;
        Ok(Self {
            nats: config::Nats::from_source(src)?,
            redis_url: config::redis_url(src)?,
            log_redis_url: config::log_redis_url(src)?,
            addr: config::listen(src, ADMIN_ADDR, "127.0.0.1:8080")?,
            health_addr: config::listen(src, HEALTH_ADDR, "127.0.0.1:9105")?,
            keys,
            keys_path: keys_path.into(),
            hash_key,
            console_url,
            frame_ancestors,
            keyring,
            allow_http: config::boolean(src, ALLOW_HTTP, false)?,
            max_webhooks_per_workflow: config::number(
                src,
                MAX_WEBHOOKS_PER_WORKFLOW,
                5,
                1..=10_000,
            )?,
            max_webhooks_per_org: config::number(src, MAX_WEBHOOKS_PER_ORG, 1_000, 1..=100_000)?,
            manual_sends_per_minute: config::number(src, MANUAL_SENDS_PER_MINUTE, 60, 1..=60_000)?,
            auth_failures_per_minute: config::number(
                src,
                AUTH_FAILURES_PER_MINUTE,
                auth::MAX_FAILURES,
                1..=10_000_000,
            )?,
            api_requests_per_minute: config::number(
                src,
                API_REQUESTS_PER_MINUTE,
                6_000,
                1..=10_000_000,
            )?,
            catalogue: Catalogue::with_extra(&extra)
                .map_err(|e| ConfigError::new(EXTRA_EVENT_TYPES, e.to_string()))?,
            log_retention: config::duration(src, LOG_RETENTION, Duration::from_secs(7 * 86_400))?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nats(#[from] nats::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("webhook store: {0}")]
    Store(#[from] herald_platform::webhooks::StoreError),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

pub struct Inner {
    pub config: Config,
    /// The webhooks bucket, listed from this replica's view of it.
    pub store: WebhookView,
    pub logs: LogIndex,
    /// Everything in Redis but the log index: the deliverer's endpoint
    /// states, shown as a webhook's `state` and reset on re-enable.
    pub redis: Redis,
    pub js: jetstream::Context,
    /// Ordered webhooks' queues, read for a webhook's `ordering_status`.
    pub ordering: herald_platform::ordering::Queues,
    pub health: Health,
    /// Short-lived per-organization locks (see `limits`).
    pub locks: async_nats::jetstream::kv::Store,
    /// Recover and replay jobs (`jobs`).
    pub jobs: async_nats::jetstream::kv::Store,
    /// Test events and manual retries, per organization.
    pub manual_sends: limits::Limiter,
    pub api_requests: limits::Limiter,
    /// Organizations, API keys and console links, as this replica follows
    /// their buckets.
    pub orgs: kv_map::KvMap<organizations::Organization>,
    pub api_keys: kv_map::KvMap<api_keys::ApiKey>,
    pub links: kv_map::KvMap<console_links::ConsoleLink>,
    /// The keys file, as last read.
    pub file_keys: Arc<FileKeys>,
    /// Failed authentications per source address.
    pub auth_failures: auth::Failures,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

pub(crate) use herald_platform::now_ms;

/// Binds `config.addr` and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = config
        .addr
        .listener()
        .await
        .map_err(|source| Error::Listen {
            addr: config.addr.addr(),
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let health = Health::new("admin");
    health.set("nats", false);
    health.set("store", false);
    health
        .clone()
        .serve(&config.health_addr, shutdown.clone())
        .await
        .map_err(|source| Error::Listen {
            addr: config.health_addr.addr(),
            source,
        })?;
    let client = nats::connect(&config.nats, "admin").await?;
    health.watch_nats(client.clone(), shutdown.clone());
    let js = herald_platform::nats::jetstream(client.clone());
    nats::ensure_streams(&js, config.nats.replicas, &config.nats.streams, &shutdown).await?;
    let replicas = config.nats.replicas;
    let store = nats::retry(&shutdown, || WebhookStore::open(&js, replicas)).await?;
    let locks = nats::retry(&shutdown, || limits::open_locks(&js, replicas))
        .await
        .map_err(unavailable)?;
    let jobs = nats::retry(&shutdown, || jobs::open_bucket(&js, replicas))
        .await
        .map_err(unavailable)?;
    let orgs = follow(
        &js,
        (organizations::BUCKET, "Herald admin: organizations"),
        Duration::ZERO,
        replicas,
        &shutdown,
    )
    .await?;
    let api_keys = follow(
        &js,
        (api_keys::BUCKET, "Herald admin: API keys"),
        Duration::ZERO,
        replicas,
        &shutdown,
    )
    .await?;
    let links = follow(
        &js,
        (console_links::BUCKET, "Herald admin: console links"),
        console_links::KEEP,
        replicas,
        &shutdown,
    )
    .await?;
    let file_keys = FileKeys::new(config.keys_path.clone(), config.keys.clone());
    file_keys.clone().watch(shutdown.clone());
    let store = WebhookView::new(store, shutdown.clone());
    // Ready once the view has loaded: lists answer from it.
    tokio::spawn({
        let (store, health) = (store.clone(), health.clone());
        let (orgs, api_keys, links) = (orgs.clone(), api_keys.clone(), links.clone());
        async move {
            while !(store.is_loaded()
                && orgs.is_loaded()
                && api_keys.is_loaded()
                && links.is_loaded())
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            health.set("store", true);
        }
    });
    let redis = Redis::new(&config.redis_url, Duration::from_millis(500))?;
    // Webhooks, tests, rotations, jobs and the catalogue are served without
    // Redis; only the log routes need it (and answer 503 meanwhile), so a
    // Redis outage must not take every admin replica out of its Service.
    health.watch_redis_degradable(redis.clone(), shutdown.clone());
    let log_redis = if config.log_redis_url == config.redis_url {
        redis.clone()
    } else {
        Redis::new(&config.log_redis_url, Duration::from_millis(500))?
    };
    let logs = LogIndex::new(log_redis, config.log_retention);
    let manual_sends =
        limits::Limiter::manual_sends(config.manual_sends_per_minute, redis.clone(), orgs.clone());
    let api_requests =
        limits::Limiter::api_requests(config.api_requests_per_minute, redis.clone(), orgs.clone());
    let state = AppState {
        inner: Arc::new(Inner {
            manual_sends,
            api_requests,
            orgs,
            api_keys,
            links,
            file_keys,
            auth_failures: auth::Failures::new(config.auth_failures_per_minute),
            config,
            store,
            logs,
            redis,
            ordering: herald_platform::ordering::Queues::new(
                js.clone(),
                herald_platform::ordering::KEY_TTL,
            ),
            js,
            health,
            locks,
            jobs: jobs.clone(),
        }),
    };
    // This replica's share of recover and replay jobs.
    let runner = Arc::new(jobs::Runner {
        js: state.js.clone(),
        jobs,
        store: state.store.store().clone(),
        owner: herald_core::ids::new_event_id().replacen("evt_", "admin_", 1),
    });
    tokio::spawn(runner.run(shutdown.clone()));

    tracing::info!(addr = %listener.local_addr().map_err(Error::Serve)?, "admin API listening");
    let router = router(state);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut router = router.clone();
        tower_service::Service::call(&mut router, req)
    });
    herald_platform::server::serve(listener, service, shutdown).await;
    Ok(())
}

/// Opens a bucket (with the start-up retry) and follows it.
async fn follow<T>(
    js: &jetstream::Context,
    (bucket, description): (&'static str, &'static str),
    max_age: Duration,
    replicas: usize,
    shutdown: &CancellationToken,
) -> Result<kv_map::KvMap<T>, Error>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let kv = nats::retry(shutdown, || {
        kv_map::open(js, bucket, description, max_age, replicas)
    })
    .await
    .map_err(unavailable)?;
    Ok(kv_map::KvMap::new(kv, bucket, shutdown.clone()))
}

/// A bucket admin needs could not be opened.
fn unavailable(error: kv_map::OpenError) -> Error {
    Error::Store(herald_platform::webhooks::StoreError::Unavailable(
        error.to_string(),
    ))
}

/// The OpenAPI 3.1 description of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(webhooks::routes())
        .merge(logs::routes())
        .merge(jobs::routes())
        .merge(organizations::routes())
        .merge(api_keys::routes())
        .merge(console_links::routes())
        .merge(audit::routes())
        .route("/event-types", get(event_types))
        .route("/me", get(me))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(axum::middleware::map_response(console::api_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .route("/live", get(health))
        .route("/ready", get(health))
        .merge(console::routes())
        .merge(api)
        .with_state(state)
}

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

async fn event_types(
    State(state): State<AppState>,
    _caller: auth::Caller,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"data": state.config.catalogue.types()}))
}

/// `GET /me`: what the caller's key may use — its organizations (`["*"]`
/// for a key of every organization), its default, the one this request
/// acts for, its scope and, for a console link's session, the webhooks it
/// is limited to. The console's organization picker reads it.
async fn me(caller: auth::Caller) -> axum::Json<serde_json::Value> {
    let p = &caller.principal;
    axum::Json(serde_json::json!({
        "organizations": p.organizations,
        "any_organization": p.any_organization(),
        "default_organization": p.default_organization,
        "organization": caller.org,
        "key_id": p.id,
        "name": p.name,
        "scope": p.scope.name(),
        "session": p.kind == auth::Kind::Session,
        "webhook_ids": p.webhook_ids,
        "expires_at": p.expires_at_ms.map(herald_core::payload::rfc3339_ms),
    }))
}

async fn health(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    match state.health.answer(uri.path()) {
        Some((status, content_type, body)) => {
            (status, [("content-type", content_type)], body).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/webhooks",
            "/webhooks/{id}",
            "/webhooks/{id}/rotate-secret",
            "/webhooks/{id}/test",
            "/webhooks/{id}/logs",
            "/webhooks/logs/all",
            "/webhooks/{id}/logs/{log_id}",
            "/webhooks/{id}/logs/{log_id}/retry",
            "/event-types",
            "/me",
            "/openapi.json",
            "/organizations",
            "/organizations/{org}",
            "/organizations/{org}/console-links",
            "/organizations/{org}/console-links/{id}",
            "/console-sessions",
            "/api-keys",
            "/api-keys/{id}",
            "/audit",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} not described");
        }
    }
}
