//! The end-to-end harness: a real NATS (JetStream) and Redis, all five
//! services running in this process, an operator API key, and a small HTTP
//! client for the admin API.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use herald_platform::config::{Listen, Source};
use herald_test_support::{NatsServer, RedisServer};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use herald_test_support::{Received, Receiver, Reply};

pub const API_KEY: &str = "test-operator-key";
pub const TENANT_KEY: &str = "test-tenant-key";

/// A running Herald.
pub struct Stack {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub admin_url: String,
    pub env: HashMap<String, String>,
    resolver: Option<herald_deliverer::guard::Resolver>,
    pub shutdown: CancellationToken,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    http: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile_dir::Dir,
    /// The sockets the services listen on, by the variable that names their
    /// address: bound (port 0) when the stack starts and kept until it
    /// stops, so a restarted service listens where it did.
    listeners: HashMap<&'static str, Listen>,
    /// Each running replica of a service, in the order they started.
    services: Vec<Running>,
    /// How many replicas the stack has started, for the next one's number.
    started: usize,
}

/// A replica of a service the stack started, to stop or kill it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub service: &'static str,
    number: usize,
}

/// One running replica: its own token (a child of `shutdown`) and task.
struct Running {
    replica: Replica,
    /// Whether it listens on the stack's addresses (the service's first
    /// replica) rather than on ports of its own (a further one).
    shared: bool,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The variables naming the addresses the stack's services listen on.
const LISTENS: [&str; 6] = [
    herald_admin::ADMIN_ADDR,
    herald_admin::HEALTH_ADDR,
    herald_ingest::HEALTH_ADDR,
    herald_matcher::HEALTH_ADDR,
    herald_deliverer::HEALTH_ADDR,
    herald_log_writer::HEALTH_ADDR,
];

/// The services, by the names [`Stack::stop_service`] takes.
pub use herald_core::names::SERVICES;

/// Each service and the variable naming the address its `/ready` answers on.
const READY: [(&str, &str); 5] = [
    ("ingest", herald_ingest::HEALTH_ADDR),
    ("matcher", herald_matcher::HEALTH_ADDR),
    ("deliverer", herald_deliverer::HEALTH_ADDR),
    ("log-writer", herald_log_writer::HEALTH_ADDR),
    ("admin", herald_admin::ADMIN_ADDR),
];

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Settings a test may change before the stack starts.
#[derive(Default)]
pub struct Options {
    pub env: Vec<(String, String)>,
    /// The deliverer's name resolver (the system's when `None`).
    pub resolver: Option<herald_deliverer::guard::Resolver>,
    /// Services not started with the stack (a test starts them with
    /// [`Stack::start_service`] when it wants them).
    pub without: Vec<&'static str>,
}

impl Options {
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn resolver(mut self, lookup: impl herald_deliverer::guard::Lookup) -> Self {
        self.resolver = Some(herald_deliverer::guard::Resolver(std::sync::Arc::new(
            lookup,
        )));
        self
    }

    /// Starts the stack without these services, e.g. `&["matcher",
    /// "deliverer"]`.
    pub fn without(mut self, services: &[&'static str]) -> Self {
        for service in services {
            assert!(SERVICES.contains(service), "no service {service:?}");
        }
        self.without.extend_from_slice(services);
        self
    }
}

fn hash(key: &str) -> String {
    herald_admin::auth::hash_key(key)
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let dir = std::env::temp_dir().join(format!(
            "herald-e2e-{}-{}",
            std::process::id(),
            herald_core::ids::new_delivery_id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let keys_file = dir.join("keys.json");
        let keys = serde_json::json!({"keys": [
            {"key_sha256": hash(API_KEY), "organizations": ["*"], "default_organization": "acme"},
            {"key_sha256": hash(TENANT_KEY), "organizations": ["globex"], "default_organization": "globex"},
        ]});
        std::fs::write(&keys_file, keys.to_string()).expect("write keys");
        let listeners: HashMap<&'static str, Listen> = LISTENS
            .iter()
            .map(|&var| {
                let at = Listen::bound(([127, 0, 0, 1], 0).into()).expect("bind port 0");
                (var, at)
            })
            .collect();
        let mut env: HashMap<String, String> = [
            ("HERALD_NATS_URL", nats.url()),
            ("HERALD_REDIS_URL", redis.url()),
            ("HERALD_API_KEYS_FILE", keys_file.display().to_string()),
            (
                "HERALD_SECRET_KEY",
                herald_core::secret::Keyring::generate_key_text(),
            ),
            ("HERALD_ALLOW_HTTP", "true".into()),
            ("HERALD_ALLOW_PRIVATE_TARGETS", "true".into()),
            ("HERALD_RETRY_SCHEDULE", "200ms,400ms,800ms".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            listeners
                .iter()
                .map(|(var, at)| (var.to_string(), at.addr().to_string())),
        )
        .collect();
        let mut listeners = listeners;
        for (k, v) in options.env {
            // An address the test sets itself is bound by the service.
            listeners.remove(k.as_str());
            env.insert(k, v);
        }
        let shutdown = CancellationToken::new();
        // The stack's own client goes where the services go: a test may
        // point `HERALD_NATS_URL` at a cluster (its own server then idles).
        let nats_config = herald_platform::config::Nats::from_source(&env).expect("nats config");
        let client = herald_platform::nats::connect_once(&nats_config, "herald-e2e")
            .await
            .expect("connect nats");
        let js = async_nats::jetstream::new(client.clone());
        let http = Client::builder(TokioExecutor::new()).build_http();
        let mut stack = Stack {
            nats,
            redis,
            admin_url: format!("http://{}", env[herald_admin::ADMIN_ADDR]),
            env,
            resolver: options.resolver,
            shutdown,
            client,
            js,
            http,
            _dir: tempfile_dir::Dir(dir),
            listeners,
            services: Vec::new(),
            started: 0,
        };
        for service in SERVICES {
            if !options.without.contains(&service) {
                stack.start_service(service);
            }
        }
        stack.wait_ready().await;
        stack
    }

    /// Starts a replica of one service with the stack's environment, under
    /// its own token. The service's first replica running listens on the
    /// stack's addresses, as one that replaces a stopped one would; another
    /// started beside it (a second matcher) listens on ports of its own.
    pub fn start_service(&mut self, service: &'static str) -> Replica {
        let shared = !self
            .services
            .iter()
            .any(|running| running.replica.service == service && running.shared);
        let listeners = &self.listeners;
        let listen = |var: &str| -> Option<Listen> {
            if shared {
                listeners.get(var).cloned()
            } else {
                Some(Listen::bound(([127, 0, 0, 1], 0).into()).expect("bind port 0"))
            }
        };
        let src: &dyn Source = &self.env;
        let token = self.shutdown.child_token();
        macro_rules! spawn {
            ($krate:ident) => {
                spawn!($krate, |_config: &mut $krate::Config| {})
            };
            ($krate:ident, $adjust:expr) => {{
                let mut config =
                    $krate::Config::from_source(src).expect(concat!(stringify!($krate), " config"));
                if let Some(at) = listen($krate::HEALTH_ADDR) {
                    config.health_addr = at;
                }
                $adjust(&mut config);
                let token = token.clone();
                tokio::spawn(async move {
                    if let Err(error) = $krate::run(config, token).await {
                        panic!("{} failed: {error}", stringify!($krate));
                    }
                })
            }};
        }
        let task = match service {
            "ingest" => spawn!(herald_ingest),
            "matcher" => spawn!(herald_matcher),
            "deliverer" => {
                let resolver = self.resolver.clone();
                spawn!(herald_deliverer, |config: &mut herald_deliverer::Config| {
                    if let Some(resolver) = resolver {
                        config.resolver = resolver;
                    }
                })
            }
            "log-writer" => spawn!(herald_log_writer),
            "admin" => {
                let at = listen(herald_admin::ADMIN_ADDR);
                spawn!(herald_admin, |config: &mut herald_admin::Config| {
                    if let Some(at) = at {
                        config.addr = at;
                    }
                })
            }
            other => panic!("no service {other:?}"),
        };
        self.started += 1;
        let replica = Replica {
            service,
            number: self.started,
        };
        self.services.push(Running {
            replica,
            shared,
            token,
            task,
        });
        replica
    }

    /// Stops one service (its only replica running) as SIGTERM would and
    /// waits for it to drain, as [`Stack::stop_replica`] does.
    pub async fn stop_service(&mut self, service: &str, grace: Duration) -> Duration {
        let mut replicas = self
            .services
            .iter()
            .filter(|running| running.replica.service == service);
        let replica = match (replicas.next(), replicas.next()) {
            (Some(running), None) => running.replica,
            (None, _) => panic!("{service} is not running"),
            (Some(_), Some(_)) => panic!("several {service} replicas run: stop one by its replica"),
        };
        self.stop_replica(replica, grace).await
    }

    /// Stops one replica as SIGTERM would (cancels its token) and waits for
    /// it to drain; answers how long draining took. Panics if it takes more
    /// than `grace`.
    pub async fn stop_replica(&mut self, replica: Replica, grace: Duration) -> Duration {
        let service = replica.service;
        let Running { token, task, .. } = self.take(replica);
        let started = tokio::time::Instant::now();
        token.cancel();
        tokio::time::timeout(grace, task)
            .await
            .unwrap_or_else(|_| panic!("{service} still draining after {grace:?}"))
            .unwrap_or_else(|error| panic!("{service} failed while draining: {error}"));
        started.elapsed()
    }

    /// Kills one replica as SIGKILL would: aborts its task, with no graceful
    /// stop (then cancels its token, for what it spawned apart), and waits
    /// until the task is gone, its work under way aborted with it. Answers
    /// how the task ended: cancelled, unless it had finished first. Panics
    /// if it is not gone in 10 s.
    pub async fn kill_replica(&mut self, replica: Replica) -> Result<(), tokio::task::JoinError> {
        let service = replica.service;
        let Running { token, task, .. } = self.take(replica);
        task.abort();
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("{service} still there 10s after the kill"))
    }

    /// Takes `replica` out of the running ones; panics if it is not running.
    fn take(&mut self, replica: Replica) -> Running {
        let at = self
            .services
            .iter()
            .position(|running| running.replica == replica)
            .unwrap_or_else(|| panic!("{replica:?} is not running"));
        self.services.remove(at)
    }

    /// The URL of `path` on a service's health server, e.g.
    /// `health_url("HERALD_DELIVERER_HEALTH_ADDR", "/metrics")`.
    pub fn health_url(&self, addr_var: &str, path: &str) -> String {
        format!("http://{}{path}", self.env[addr_var])
    }

    /// A plain GET: status and body text.
    pub async fn get(&self, url: &str) -> Result<(u16, String), String> {
        self.raw("GET", url, None, &[])
            .await
            .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Waits until every service running on the stack's addresses answers
    /// `/ready` (one left out or stopped is not waited for).
    pub async fn wait_ready(&self) {
        // A just-formed 3-node cluster on a loaded machine can take most of
        // a minute to answer its first JetStream requests.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for (service, var) in READY {
            let running = self
                .services
                .iter()
                .any(|running| running.replica.service == service && running.shared);
            if !running {
                continue;
            }
            let url = format!("http://{}/ready", self.env[var]);
            loop {
                if let Ok((200, _)) = self.raw("GET", &url, None, &[]).await {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{var} not ready in 60s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Stops every service and waits for them to drain; fails the test,
    /// naming them, when a service failed, panicked, or was still draining
    /// 30 s after the shutdown.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let stopping = self
            .services
            .drain(..)
            .map(|Running { replica, task, .. }| async move {
                let service = replica.service;
                match tokio::time::timeout(Duration::from_secs(30), task).await {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(format!("{service} failed or panicked: {error}")),
                    Err(_) => Some(format!("{service} still draining 30s after shutdown")),
                }
            });
        let failed: Vec<String> = futures::future::join_all(stopping)
            .await
            .into_iter()
            .flatten()
            .collect();
        assert!(
            failed.is_empty(),
            "the stack did not stop cleanly: {}",
            failed.join("; ")
        );
    }

    async fn raw(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Bytes), String> {
        let mut builder = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.http.request(request))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Sends exactly this request to the admin API (`path` after the host):
    /// any headers, any body bytes. Answers status, headers and body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (u16, http::HeaderMap, Bytes) {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.admin_url));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(body.into())).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(20), self.http.request(request))
            .await
            .expect("admin API answers in time")
            .expect("admin API call");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("response body")
            .to_bytes();
        (status, headers, bytes)
    }

    /// Calls the admin API with the operator key; answers status and JSON.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(API_KEY, None, method, path, body).await
    }

    /// Calls the admin API with `key` and an optional organization.
    pub async fn api_as(
        &self,
        key: &str,
        org: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(org) = org {
            headers.push(("x-organization-id", org));
        }
        let url = format!("{}{path}", self.admin_url);
        let (status, bytes) = self
            .raw(method, &url, body.as_ref(), &headers)
            .await
            .expect("admin API call");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, json)
    }

    /// Creates a webhook (operator key, organization `acme`); answers its JSON.
    pub async fn create_webhook(&self, body: Value) -> Value {
        let (status, json) = self.api("POST", "/webhooks", Some(body)).await;
        assert_eq!(status, 201, "create webhook: {json}");
        json
    }

    /// Creates a webhook in `org` (operator key); answers its JSON.
    pub async fn create_webhook_in(&self, org: &str, body: Value) -> Value {
        let (status, json) = self
            .api_as(API_KEY, Some(org), "POST", "/webhooks", Some(body))
            .await;
        assert_eq!(status, 201, "create webhook in {org}: {json}");
        json
    }

    /// A webhook's JSON (operator key, organization `acme`); it must exist.
    pub async fn webhook(&self, id: &str) -> Value {
        let (status, json) = self.api("GET", &format!("/webhooks/{id}"), None).await;
        assert_eq!(status, 200, "{json}");
        json
    }

    /// Waits up to `timeout` until webhook `id`'s `field` is `value` (its
    /// `state` `"failing"`, `enabled` `false`, …).
    pub async fn wait_webhook(&self, id: &str, field: &str, value: Value, timeout: Duration) {
        let what = format!("webhook {id}'s {field} {value}");
        self.eventually(timeout, &what, || async {
            (self.webhook(id).await[field] == value).then_some(())
        })
        .await;
    }

    /// Publishes a JSON event with a JetStream publish and waits for the ack.
    pub async fn publish(&self, org: &str, event_type: &str, body: Value) {
        self.publish_with_headers(org, event_type, body, async_nats::HeaderMap::new())
            .await
    }

    /// Publishes each (organization, type, body), in order.
    pub async fn publish_each<const N: usize>(&self, events: [(&str, &str, Value); N]) {
        for (org, event_type, body) in events {
            self.publish(org, event_type, body).await;
        }
    }

    /// Publishes `n` events of `event_type` for `org`, in order, with ids
    /// `{prefix}_0` to `{prefix}_{n-1}` and no other field.
    pub async fn publish_numbered(&self, org: &str, event_type: &str, prefix: &str, n: usize) {
        for i in 0..n {
            let body = serde_json::json!({"id": format!("{prefix}_{i}")});
            self.publish(org, event_type, body).await;
        }
    }

    /// Publishes `n` `workflow.completed` events of `org` (ids `burst_0`…)
    /// as fast as their acks come back, 1,000 in flight.
    pub async fn publish_burst(&self, org: &str, n: usize) {
        self.publish_burst_of(org, 0..n).await
    }

    /// Publishes `workflow.completed` events of `org` with ids `burst_<i>`
    /// for `i` in `ids`, 1,000 in flight at a time.
    pub async fn publish_burst_of(&self, org: &str, ids: std::ops::Range<usize>) {
        let subject = format!("herald.events.{org}.workflow.completed");
        let mut acks = Vec::new();
        for i in ids {
            let body = serde_json::json!({"id": format!("burst_{i}")}).to_string();
            let ack = self.js.publish(subject.clone(), body.into()).await;
            acks.push(ack.expect("publish"));
            if acks.len() == 1_000 {
                for ack in acks.drain(..) {
                    ack.await.expect("ack");
                }
            }
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }

    /// Publishes `workflow.completed` events of `org` with ids `fast_<i>`
    /// for `i` in `ids`, one every `every`, noting in `published` when each
    /// was published (for its time to receipt).
    pub async fn publish_paced(
        &self,
        org: &str,
        ids: std::ops::Range<usize>,
        every: Duration,
        published: &std::sync::Mutex<HashMap<String, std::time::Instant>>,
    ) {
        let mut tick = tokio::time::interval(every);
        for i in ids {
            tick.tick().await;
            let id = format!("fast_{i}");
            let now = std::time::Instant::now();
            published.lock().expect("published").insert(id.clone(), now);
            let body = serde_json::json!({"id": id});
            self.publish(org, "workflow.completed", body).await;
        }
    }

    /// Every attempt logged for `webhook_id` (organization `acme`), in order.
    pub async fn attempts(&self, webhook_id: &str) -> Vec<herald_core::proto::AttemptResult> {
        let stored = self.attempts_stored(webhook_id).await;
        stored.into_iter().map(|(attempt, _)| attempt).collect()
    }

    /// Every attempt logged for `webhook_id` (organization `acme`), in
    /// order, each with when the stream stored it (unix nanoseconds).
    pub async fn attempts_stored(
        &self,
        webhook_id: &str,
    ) -> Vec<(herald_core::proto::AttemptResult, i128)> {
        use prost::Message;
        let subject = herald_core::names::attempt_subject("acme", webhook_id);
        self.stored(herald_core::names::ATTEMPTS_STREAM, &subject)
            .await
            .into_iter()
            .map(|(payload, stored)| {
                let attempt =
                    herald_core::proto::AttemptResult::decode(payload).expect("attempt decodes");
                (attempt, stored)
            })
            .collect()
    }

    /// Messages stored under `filter` in `stream` now (0 when the stream
    /// cannot be read).
    pub async fn stored_count(&self, stream: &str, filter: &str) -> u64 {
        use futures::StreamExt;
        let Ok(stream) = self.js.get_stream(stream).await else {
            return 0;
        };
        let Ok(mut subjects) = stream.info_with_subjects(filter).await else {
            return 0;
        };
        let mut n = 0;
        while let Some(Ok((_, count))) = subjects.next().await {
            n += count as u64;
        }
        n
    }

    /// Every message of `stream` on `subject` (a filter), in order, each
    /// with when the stream stored it (unix nanoseconds).
    pub async fn stored(&self, stream: &str, subject: &str) -> Vec<(bytes::Bytes, i128)> {
        herald_test_support::stored(&self.js, stream, subject)
            .await
            .expect("the stream's messages")
    }

    /// Publishes delivery `jobs` to the subjects `subject` names for their
    /// webhooks (of HERALD_DELIVERIES or HERALD_PARKED), a few hundred acks
    /// in flight at a time, and waits until JetStream has stored them all.
    pub async fn publish_jobs(
        &self,
        subject: fn(&str, &str) -> String,
        jobs: impl IntoIterator<Item = herald_core::proto::DeliveryJob>,
    ) {
        use prost::Message;
        let mut acks = Vec::new();
        for job in jobs {
            let ack = self
                .js
                .publish(
                    subject(&job.organization_id, &job.webhook_id),
                    job.encode_to_vec().into(),
                )
                .await
                .expect("publish a delivery job");
            acks.push(ack);
            if acks.len() == 256 {
                for ack in acks.drain(..) {
                    ack.await.expect("delivery job stored");
                }
            }
        }
        for ack in acks {
            ack.await.expect("delivery job stored");
        }
    }

    pub async fn publish_with_headers(
        &self,
        org: &str,
        event_type: &str,
        body: Value,
        headers: async_nats::HeaderMap,
    ) {
        self.js
            .publish_with_headers(
                format!("herald.events.{org}.{event_type}"),
                headers,
                body.to_string().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    /// Waits until every event published so far is accepted and matched
    /// (nothing pending or unacknowledged on ingest's or the matcher's
    /// consumer).
    pub async fn wait_matched(&self) {
        self.eventually(Duration::from_secs(30), "the matcher idle", || async {
            events_matched(&self.js).await.then_some(())
        })
        .await;
    }

    /// A metric's value from a service's `/metrics` (`addr_var` names its
    /// health address), or `None` when the service does not answer or does
    /// not report it.
    pub async fn metric(&self, addr_var: &str, name: &str) -> Option<f64> {
        let (_, text) = self
            .get(&self.health_url(addr_var, "/metrics"))
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until the deliverer has applied every change made to the
    /// webhooks bucket so far (its feed is eventually consistent: a job
    /// handled a moment after a delete may still find the old definition).
    pub async fn wait_deliverer_current(&self) {
        let bucket = format!("KV_{}", herald_core::names::WEBHOOKS_BUCKET);
        let mut stream = self.js.get_stream(&bucket).await.expect("webhooks bucket");
        let last = stream
            .info()
            .await
            .expect("bucket info")
            .state
            .last_sequence as f64;
        self.eventually(
            Duration::from_secs(30),
            "the deliverer's webhooks current",
            || async {
                let seen = self
                    .metric("HERALD_DELIVERER_HEALTH_ADDR", "herald_webhooks_revision")
                    .await?;
                (seen >= last).then_some(())
            },
        )
        .await;
    }

    /// Polls `f` until it returns `Some`, or panics after `timeout`.
    pub async fn eventually<T, F, Fut>(&self, timeout: Duration, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A first-attempt delivery job of organization `acme` for `webhook_id`,
/// as the matcher queues it: event `event_id` of `event_type`, no data.
pub fn delivery_job(
    webhook_id: &str,
    delivery_id: &str,
    event_id: &str,
    event_type: &str,
) -> herald_core::proto::DeliveryJob {
    use herald_core::proto;
    proto::DeliveryJob {
        delivery_id: delivery_id.into(),
        organization_id: "acme".into(),
        webhook_id: webhook_id.into(),
        event: Some(proto::Event {
            id: event_id.into(),
            organization_id: "acme".into(),
            r#type: event_type.into(),
            ..Default::default()
        }),
        attempt: 1,
        ..Default::default()
    }
}

/// Whether the matcher has nothing pending or unacknowledged.
pub async fn matcher_idle(js: &async_nats::jetstream::Context) -> bool {
    use herald_core::names;
    herald_platform::metrics::consumer_idle(js, names::ACCEPTED_STREAM, names::MATCHER_CONSUMER)
        .await
}

/// Whether ingest and the matcher have nothing pending or unacknowledged:
/// every event published so far is accepted and matched.
pub async fn events_matched(js: &async_nats::jetstream::Context) -> bool {
    use herald_core::names;
    herald_platform::metrics::consumer_idle(js, names::EVENTS_STREAM, names::INGEST_CONSUMER).await
        && matcher_idle(js).await
}

/// Writes to `redis` until it refuses: full, with `noeviction` (as
/// [`RedisServer::start_small`] starts it).
pub async fn fill_redis(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for n in 0.. {
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{n}"))
            .arg("x".repeat(64 * 1024))
            .query_async(&mut conn)
            .await;
        if set.is_err() {
            return;
        }
        assert!(n < 1000, "8mb never filled");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
