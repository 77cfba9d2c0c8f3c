//! `/live`, `/ready` and `/metrics` for every service.
//!
//! Liveness says the process answers. Readiness says every dependency the
//! service registered (NATS, Redis, its consumers) is up right now; it turns
//! false again when one is lost. A service that works on without a
//! dependency (the matcher and deliverer without Redis) reports it in
//! `/ready`'s checks as informational, without turning unready. Metrics are
//! Prometheus text.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service's health: named readiness checks and its metrics registry.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    checks: Mutex<BTreeMap<&'static str, bool>>,
    /// Checks reported but not required for readiness.
    informational: Mutex<BTreeSet<&'static str>>,
    registry: Mutex<Registry>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("service", &self.inner.service)
            .finish()
    }
}

impl Health {
    pub fn new(service: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                service,
                checks: Mutex::new(BTreeMap::new()),
                informational: Mutex::new(BTreeSet::new()),
                registry: Mutex::new(Registry::with_prefix("herald")),
            }),
        }
    }

    pub fn service(&self) -> &'static str {
        self.inner.service
    }

    /// Sets a readiness check; a check once named must be true for readiness.
    pub fn set(&self, check: &'static str, ok: bool) {
        self.inner
            .checks
            .lock()
            .expect("health lock")
            .insert(check, ok);
    }

    pub fn is_ready(&self) -> bool {
        let informational = self.inner.informational.lock().expect("health lock");
        let checks = self.inner.checks.lock().expect("health lock");
        !checks.is_empty()
            && checks
                .iter()
                .all(|(name, ok)| *ok || informational.contains(name))
    }

    /// The readiness checks as JSON, e.g. `{"nats":true,"redis":false}`.
    pub fn checks_json(&self) -> String {
        let checks = self.inner.checks.lock().expect("health lock");
        serde_json::to_string(&*checks).unwrap_or_default()
    }

    /// Registers metrics: `register(|r| r.register("name", "help", metric.clone()))`.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.inner.registry.lock().expect("registry lock"));
    }

    /// Registers `metric` on `/metrics` as `herald_<name>` with its help
    /// text and hands it back, so a service builds its metrics where it
    /// names them: `Metrics { jobs: health.metric("jobs", "…", Family::default()) }`.
    pub fn metric<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        self.register(|r| r.register(name, help, metric.clone()));
        metric
    }

    /// A counter registered as [`Health::metric`] does.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.metric(name, help, Counter::default())
    }

    /// A gauge registered as [`Health::metric`] does.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.metric(name, help, Gauge::default())
    }

    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.registry.lock().expect("registry lock");
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Answers a health path, or `None` when `path` is not one of ours.
    pub fn answer(&self, path: &str) -> Option<(StatusCode, &'static str, String)> {
        match path {
            "/live" => Some((
                StatusCode::OK,
                "application/json",
                r#"{"status":"live"}"#.to_owned(),
            )),
            "/ready" => {
                let body = format!(
                    r#"{{"ready":{},"checks":{}}}"#,
                    self.is_ready(),
                    self.checks_json()
                );
                let status = if self.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Some((status, "application/json", body))
            }
            "/metrics" => Some((
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render_metrics(),
            )),
            _ => None,
        }
    }

    /// Serves the health endpoints on `at` until `shutdown`.
    pub async fn serve(
        self,
        at: &crate::config::Listen,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let listener = at.listener().await?;
        tokio::spawn(self.serve_on(listener, shutdown));
        Ok(())
    }

    pub async fn serve_on(self, listener: TcpListener, shutdown: CancellationToken) {
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (status, content_type, body) = self.answer(req.uri().path()).unwrap_or((
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ));
            let response = Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid");
            std::future::ready(Ok::<_, Infallible>(response))
        });
        crate::server::serve(listener, service, shutdown).await;
    }

    /// Keeps the `nats` check in step with the client's connection.
    pub fn watch_nats(&self, client: async_nats::Client, shutdown: CancellationToken) {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let up = client.connection_state() == async_nats::connection::State::Connected;
                health.set("nats", up);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    /// Keeps the `redis` check in step with a PING every second; Redis is
    /// required for readiness (the log-writer and admin cannot work without
    /// the log index).
    pub fn watch_redis(&self, redis: crate::redis::Redis, shutdown: CancellationToken) {
        self.watch_redis_check(redis, shutdown);
    }

    /// Like [`Health::watch_redis`], for a service that works on without
    /// Redis (the matcher, the deliverer): the check is reported, and
    /// `herald_redis_up` drops to 0, but the service stays ready.
    pub fn watch_redis_degradable(&self, redis: crate::redis::Redis, shutdown: CancellationToken) {
        self.inner
            .informational
            .lock()
            .expect("health lock")
            .insert("redis");
        self.watch_redis_check(redis, shutdown);
    }

    fn watch_redis_check(&self, redis: crate::redis::Redis, shutdown: CancellationToken) {
        let up = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        self.register(|r| {
            r.register(
                "redis_up",
                "1 while Redis answers; 0 while the service works on without it",
                up.clone(),
            );
        });
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let ok = redis.ping().await;
                health.set("redis", ok);
                up.set(i64::from(ok));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_required_check_is() {
        let health = Health::new("test");
        assert!(!health.is_ready(), "nothing checked yet");
        health.set("nats", true);
        health.set("consumer", false);
        assert!(!health.is_ready());
        health.set("consumer", true);
        assert!(health.is_ready());
        health.inner.informational.lock().unwrap().insert("redis");
        health.set("redis", false);
        assert!(health.is_ready(), "an informational check does not gate");
        assert_eq!(
            health.answer("/ready").unwrap().2,
            r#"{"ready":true,"checks":{"consumer":true,"nats":true,"redis":false}}"#
        );
        health.set("nats", false);
        assert!(!health.is_ready());
        assert_eq!(
            health.answer("/ready").unwrap().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
