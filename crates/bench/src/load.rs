//! What drives the load: a JetStream publisher with a bounded window of
//! publishes awaiting their ack, and the bare-HTTP ceiling — the same
//! receiver driven by a loop that signs and POSTs directly, no broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use herald_core::payload::{self, Format};
use herald_core::signing::SigningKey;
use herald_core::{ids, proto};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::receiver::Receiver;
use crate::stack::ORG;

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// The headers of the event `id`: its id as the `Nats-Msg-Id`, so
/// JetStream drops a duplicate, and its content type.
fn headers(id: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("Content-Type", "application/json");
    headers
}

/// The organization of the ordered-delivery phases' webhooks and events,
/// so that no other benchmark webhook gets them.
pub const ORDERED_ORG: &str = "bench-ordered";

/// The event types of one workflow execution, in the order it publishes them.
pub const STEPS: [&str; 5] = [
    "workflow.started",
    "workflow.step.started",
    "workflow.step.completed",
    "workflow.step.started",
    "workflow.completed",
];

/// The `execution` attribute of execution `e` of `phase`: each phase has
/// keys of its own, so each key's `webhook-sequence` starts at 1.
pub fn execution(phase: usize, e: u64) -> String {
    format!("ex-{phase}-{e}")
}

/// Publishes benchmark events; at most `window` publishes await their ack.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    window: Arc<Semaphore>,
    size: u32,
    run: String,
    /// Bytes of filler in each event's data, for events of a given size.
    padding: Arc<String>,
    /// The organization whose events [`Publisher::publish`] sends.
    org: Arc<str>,
    pub errors: Arc<AtomicU64>,
}

impl Publisher {
    pub fn new(js: jetstream::Context, window: usize) -> Self {
        Self {
            js,
            window: Arc::new(Semaphore::new(window)),
            size: window as u32,
            run: format!("{:x}", now_us()),
            padding: Arc::default(),
            org: ORG.into(),
            errors: Arc::default(),
        }
    }

    /// The same publisher, its events sent as organization `org`'s (the
    /// window is shared: give a publisher that must not wait for another's
    /// acks a window of its own, [`Publisher::new`]).
    pub fn in_org(&self, org: &str) -> Self {
        Self {
            org: org.into(),
            ..self.clone()
        }
    }

    /// The same publisher, its events carrying `bytes` of filler.
    pub fn with_padding(&self, bytes: usize) -> Self {
        Self {
            padding: Arc::new("x".repeat(bytes)),
            ..self.clone()
        }
    }

    /// A place in the window, held until the publish's ack.
    async fn slot(&self) -> OwnedSemaphorePermit {
        self.window
            .clone()
            .acquire_owned()
            .await
            .expect("window never closes")
    }

    /// Publishes event `seq` of `phase`; its ack is awaited in the background.
    pub async fn publish(&self, phase: usize, event_type: &str, seq: u64) {
        let permit = self.slot().await;
        let id = format!("bench-{}-{phase}-{seq}", self.run);
        let body = format!(
            r#"{{"id":"{id}","type":"{event_type}","attributes":{{"workflow":"bench","execution":"ex-{seq}","status":"succeeded"}},"data":{{"phase":{phase},"seq":{seq},"ts_us":{},"pad":"{}"}}}}"#,
            now_us(),
            self.padding
        );
        let subject = format!("herald.events.{}.{event_type}", self.org);
        self.send(permit, subject, &id, body).await;
    }

    /// Publishes `body` (event `id`) to `subject` holding `permit`, a place
    /// in the window, until its ack.
    async fn send(&self, permit: OwnedSemaphorePermit, subject: String, id: &str, body: String) {
        let headers = headers(id);
        match self
            .js
            .publish_with_headers(subject, headers, body.into())
            .await
        {
            Ok(ack) => {
                let errors = self.errors.clone();
                tokio::spawn(async move {
                    if ack.await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Publishes event `seq` of `phase` and, in the background, again with
    /// the same id and body until JetStream acknowledges it or `give_up`
    /// passes, as a producer that must not lose an event does (the
    /// `Nats-Msg-Id` makes a retry that did land a duplicate JetStream
    /// drops). The body's `ts_us` is the first try's, so a delivery's
    /// latency includes the producer's retries. Counts retries in
    /// `retries` and events given up in `errors`.
    pub async fn publish_until_acked(
        &self,
        phase: usize,
        event_type: &str,
        seq: u64,
        give_up: Duration,
        retries: Arc<AtomicU64>,
    ) {
        let permit = self.slot().await;
        let id = format!("bench-{}-{phase}-{seq}", self.run);
        let body = Bytes::from(format!(
            r#"{{"id":"{id}","type":"{event_type}","attributes":{{"workflow":"bench","execution":"ex-{seq}","status":"succeeded"}},"data":{{"phase":{phase},"seq":{seq},"ts_us":{}}}}}"#,
            now_us()
        ));
        let headers = headers(&id);
        let subject = format!("herald.events.{ORG}.{event_type}");
        let (js, errors) = (self.js.clone(), self.errors.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + give_up;
            loop {
                let acked = match js
                    .publish_with_headers(subject.clone(), headers.clone(), body.clone())
                    .await
                {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if acked {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            drop(permit);
        });
    }

    /// `n` executions of [`STEPS`] to organization [`ORDERED_ORG`], their
    /// attribute `workflow` set to `workflow`, interleaved `group`
    /// executions at a time: step 0 of each execution of the group, then
    /// step 1 of each, …, then the next group. As fast as the window
    /// allows, or at `rate` events/s (paced from the start) when given.
    /// Event `step` of execution `e` carries `data.step` and the
    /// `execution` attribute [`execution`]`(phase, e)`.
    pub async fn executions(
        &self,
        phase: usize,
        workflow: &str,
        n: u64,
        group: u64,
        rate: Option<f64>,
    ) {
        let start = tokio::time::Instant::now();
        let group = group.max(1);
        let mut published = 0u64;
        let mut first = 0;
        while first < n {
            let end = (first + group).min(n);
            for (step, event_type) in STEPS.iter().enumerate() {
                for e in first..end {
                    if let Some(rate) = rate {
                        let due = start + Duration::from_secs_f64(published as f64 / rate);
                        if due > tokio::time::Instant::now() {
                            tokio::time::sleep_until(due).await;
                        }
                    }
                    let permit = self.slot().await;
                    let id = format!("bench-{}-{phase}-{e}-{step}", self.run);
                    let body = format!(
                        r#"{{"id":"{id}","type":"{event_type}","attributes":{{"workflow":"{workflow}","execution":"{}"}},"data":{{"phase":{phase},"step":{step},"ts_us":{}}}}}"#,
                        execution(phase, e),
                        now_us()
                    );
                    let subject = format!("herald.events.{ORDERED_ORG}.{event_type}");
                    self.send(permit, subject, &id, body).await;
                    published += 1;
                }
            }
            first = end;
        }
        self.drain().await;
    }

    /// `n` events as fast as the window allows.
    pub async fn burst(&self, phase: usize, event_type: &str, n: u64) {
        for seq in 0..n {
            self.publish(phase, event_type, seq).await;
        }
        self.drain().await;
    }

    /// Events at `rate` per second for `duration`, paced from the start so a
    /// late tick catches up instead of drifting.
    pub async fn paced(
        &self,
        phase: usize,
        event_type: &str,
        rate: f64,
        duration: Duration,
    ) -> u64 {
        let n = (rate * duration.as_secs_f64()).round() as u64;
        let start = tokio::time::Instant::now();
        for seq in 0..n {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            self.publish(phase, event_type, seq).await;
        }
        self.drain().await;
        n
    }

    /// Waits until every publish has its ack.
    pub async fn drain(&self) {
        let all = self
            .window
            .acquire_many(self.size)
            .await
            .expect("window never closes");
        drop(all);
    }
}

/// Settings of the deliverer's HTTP client, repeated for the ceiling: keep-
/// alive, nodelay, up to 1024 idle connections per host. One client for
/// the whole run, so the ceiling's warm-up leaves its connections open for
/// the measured phase, as the warm-up does for the deliverer.
fn http_client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Full<Bytes>>> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_keepalive(Some(Duration::from_secs(60)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(http)
    })
}

/// The ceiling: `n` deliveries rendered, signed and POSTed the way the
/// deliverer does, `concurrency` at once, with no broker in between.
/// Answers how many requests failed.
pub async fn ceiling(receiver: &Receiver, phase: usize, n: u64, concurrency: usize) -> u64 {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let webhook_id = "wh_ceiling";
    receiver.add_secret(webhook_id, SECRET);
    let key = SigningKey::new(SECRET);
    let client = http_client();
    let url = receiver.url("/ceiling");
    let failures = AtomicU64::new(0);
    let run = now_us();
    futures::stream::iter(0..n)
        .for_each_concurrent(concurrency, |seq| {
            let (key, url, failures) = (&key, &url, &failures);
            async move {
                let event = proto::Event {
                    id: format!("ceiling-{run}-{seq}"),
                    organization_id: ORG.into(),
                    r#type: "workflow.step.completed".into(),
                    occurred_at_ms: (now_us() / 1000) as i64,
                    attributes: [
                        ("workflow".to_owned(), "bench".to_owned()),
                        ("execution".to_owned(), format!("ex-{seq}")),
                        ("status".to_owned(), "succeeded".to_owned()),
                    ]
                    .into(),
                    data_json: format!(r#"{{"phase":{phase},"seq":{seq},"ts_us":{}}}"#, now_us())
                        .into(),
                    ..Default::default()
                };
                let body = Bytes::from(payload::render(&event, webhook_id, Format::Json));
                let delivery_id = ids::delivery_id(ORG, &event.id, webhook_id);
                let timestamp = (now_us() / 1_000_000) as i64;
                let request = http::Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .header("user-agent", "Herald/bench")
                    .header("webhook-id", &delivery_id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        key.standard_signature(&delivery_id, timestamp, &body),
                    )
                    .header("x-webhook-signature", key.body_signature(&body))
                    .body(Full::new(body))
                    .expect("valid request");
                let ok = match client.request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
    failures.load(Ordering::Relaxed)
}
