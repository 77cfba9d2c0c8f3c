//! The benchmark's receiver: a keep-alive hyper server that verifies every
//! signature, counts each delivery once by `webhook-id`, and records how
//! long it took from publish to receipt (the publish time travels in the
//! event's `data.ts_us`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde::Deserialize;
use tokio::net::TcpListener;

/// What the receiver saw of one phase.
#[derive(Debug, Default)]
pub struct Phase {
    /// Distinct deliveries (by `webhook-id`).
    pub delivered: u64,
    pub duplicates: u64,
    pub bad_signatures: u64,
    /// Requests whose body or headers were not what Herald sends.
    pub malformed: u64,
    /// Publish-to-receipt, microseconds, one per distinct delivery.
    pub latencies_us: Vec<u32>,
    /// When each of those was published (unix microseconds), in the same
    /// order: the chaos suite places a delivery before, during or after a
    /// fault by it.
    pub sent_us: Vec<u64>,
    pub last_at: Option<Instant>,
    seen: HashSet<String>,
    /// Of the deliveries of executions (events with `data.step`, crate::load
    /// `executions`): each execution's progress, by its `execution`
    /// attribute.
    pub keys: HashMap<String, KeyTrack>,
    /// Deliveries that arrived after a later event of their execution.
    pub out_of_order: u64,
    /// Deliveries that carried `webhook-sequence`.
    pub sequenced: u64,
    /// Deliveries whose `webhook-sequence` was not one more than their
    /// key's previous one (1 for the first), or whose
    /// `webhook-ordering-key` was not their `execution` attribute.
    pub sequence_errors: u64,
    /// Publish-to-receipt of the deliveries of the slow key
    /// ([`Receiver::set_slow_key`]), microseconds, in arrival order; these
    /// are not in `latencies_us`.
    pub slow_key_latencies_us: Vec<u32>,
}

/// What the receiver saw of one execution.
#[derive(Debug, Default)]
pub struct KeyTrack {
    /// Distinct deliveries.
    pub received: u32,
    /// The highest `data.step` received.
    pub max_step: Option<u32>,
    /// The last `webhook-sequence` received (0: none yet).
    pub last_sequence: u64,
}

impl Phase {
    /// Checks a new delivery of `step` of `execution` against what its
    /// execution got before.
    fn track(
        &mut self,
        execution: &str,
        step: u32,
        sequence: Option<u64>,
        ordering_key: Option<&str>,
    ) {
        let key = self.keys.entry(execution.to_owned()).or_default();
        if key.max_step.is_some_and(|max| step < max) {
            self.out_of_order += 1;
        }
        key.max_step = key.max_step.max(Some(step));
        key.received += 1;
        if let Some(sequence) = sequence {
            self.sequenced += 1;
            if sequence != key.last_sequence + 1 || ordering_key != Some(execution) {
                self.sequence_errors += 1;
            }
            key.last_sequence = sequence;
        }
    }
}

#[derive(Default)]
struct State {
    /// Secrets by webhook id.
    secrets: RwLock<HashMap<String, String>>,
    phases: Mutex<Vec<Phase>>,
    /// Requests to `/slow…` paths, answered after [`SLOW_ANSWER`] and not
    /// recorded in any phase (the soak's slow customer).
    slow: AtomicU64,
    /// The `webhook-ordering-key` whose requests are answered after
    /// [`SLOW_KEY_ANSWER`] (recorded on receipt, before the wait).
    slow_key: RwLock<Option<String>>,
}

/// How long a request of the slow key takes to answer.
pub const SLOW_KEY_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a `/slow…` path takes to answer.
pub const SLOW_ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    connections: Arc<AtomicU64>,
}

#[derive(Deserialize)]
struct Body {
    webhook_id: String,
    #[serde(default)]
    attributes: HashMap<String, String>,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    phase: usize,
    ts_us: u64,
    /// Which step of its execution the event is (crate::load `executions`).
    #[serde(default)]
    step: Option<u32>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let accepted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            connections,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connections accepted so far: keep-alive working means few.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn add_secret(&self, webhook_id: &str, secret: &str) {
        self.state
            .secrets
            .write()
            .expect("secrets lock")
            .insert(webhook_id.to_owned(), secret.to_owned());
    }

    /// From now on, answers the requests whose `webhook-ordering-key` is
    /// `key` after [`SLOW_KEY_ANSWER`] (none with `None`).
    pub fn set_slow_key(&self, key: Option<String>) {
        *self.state.slow_key.write().expect("slow key lock") = key;
    }

    /// The key [`Receiver::set_slow_key`] set.
    pub fn slow_key(&self) -> Option<String> {
        self.state.slow_key.read().expect("slow key lock").clone()
    }

    /// Requests answered on `/slow…` paths so far.
    pub fn slow_answered(&self) -> u64 {
        self.state.slow.load(Ordering::Relaxed)
    }

    /// Distinct deliveries of `phase` so far.
    pub fn delivered(&self, phase: usize) -> u64 {
        self.state
            .phases
            .lock()
            .expect("phases lock")
            .get(phase)
            .map_or(0, |p| p.delivered)
    }

    /// Takes what was recorded for `phase`.
    pub fn take(&self, phase: usize) -> Phase {
        let mut phases = self.state.phases.lock().expect("phases lock");
        phases
            .get_mut(phase)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

impl State {
    async fn handle(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        if parts.uri.path().starts_with("/fail") {
            let _ = body.collect().await;
            return reply(500);
        }
        if parts.uri.path().starts_with("/slow") {
            let _ = body.collect().await;
            tokio::time::sleep(SLOW_ANSWER).await;
            self.slow.fetch_add(1, Ordering::Relaxed);
            return reply(200);
        }
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return reply(400),
        };
        let received_us = now_us();
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(msg_id), Some(timestamp), Some(signature), Ok(parsed)) = (
            header("webhook-id"),
            header("webhook-timestamp").and_then(|t| t.parse::<i64>().ok()),
            header("webhook-signature"),
            serde_json::from_slice::<Body>(&body),
        ) else {
            self.record_malformed(&body);
            return reply(400);
        };
        let valid = self
            .secrets
            .read()
            .expect("secrets lock")
            .get(&parsed.webhook_id)
            .is_some_and(|secret| {
                herald_core::signing::verify_standard(secret, msg_id, timestamp, &body, signature)
            });
        let latency = received_us.saturating_sub(parsed.data.ts_us);
        let sequence = header("webhook-sequence").and_then(|s| s.parse::<u64>().ok());
        let ordering_key = header("webhook-ordering-key");
        let slow = ordering_key.is_some()
            && self.slow_key.read().expect("slow key lock").as_deref() == ordering_key;
        // A block, not drop(): the guard must not be held across the await.
        {
            let mut phases = self.phases.lock().expect("phases lock");
            if phases.len() <= parsed.data.phase {
                phases.resize_with(parsed.data.phase + 1, Phase::default);
            }
            let phase = &mut phases[parsed.data.phase];
            if !valid {
                phase.bad_signatures += 1;
            }
            if phase.seen.insert(msg_id.to_owned()) {
                phase.delivered += 1;
                let latency = latency.min(u32::MAX as u64) as u32;
                if slow {
                    phase.slow_key_latencies_us.push(latency);
                } else {
                    phase.latencies_us.push(latency);
                    phase.sent_us.push(parsed.data.ts_us);
                }
                phase.last_at = Some(Instant::now());
                if let Some(step) = parsed.data.step {
                    let execution = parsed
                        .attributes
                        .get("execution")
                        .map_or("", String::as_str);
                    phase.track(execution, step, sequence, ordering_key);
                }
            } else {
                phase.duplicates += 1;
            }
        }
        if slow {
            tokio::time::sleep(SLOW_KEY_ANSWER).await;
        }
        reply(if valid { 200 } else { 401 })
    }

    fn record_malformed(&self, body: &[u8]) {
        #[derive(Deserialize)]
        struct PhaseOnly {
            data: Data,
        }
        let index = serde_json::from_slice::<PhaseOnly>(body)
            .map(|b| b.data.phase)
            .unwrap_or(0);
        let mut phases = self.phases.lock().expect("phases lock");
        if phases.len() <= index {
            phases.resize_with(index + 1, Phase::default);
        }
        phases[index].malformed += 1;
    }
}

fn reply(status: u16) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = http::StatusCode::from_u16(status).expect("valid status");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_execution_is_checked_for_order_and_a_gapless_sequence() {
        let mut phase = Phase::default();
        // In order, numbered 1, 2, 3.
        for (step, seq) in [(0, 1), (1, 2), (2, 3)] {
            phase.track("ex-a", step, Some(seq), Some("ex-a"));
        }
        assert_eq!((phase.out_of_order, phase.sequence_errors), (0, 0));
        // Step 1 after step 2: one out of order; sequence 3 after 1: a gap;
        // the wrong key: an error; no header: not counted as sequenced.
        phase.track("ex-b", 0, Some(1), Some("ex-b"));
        phase.track("ex-b", 2, Some(3), Some("ex-b"));
        phase.track("ex-b", 1, Some(4), Some("ex-c"));
        phase.track("ex-d", 0, None, None);
        assert_eq!(phase.out_of_order, 1);
        assert_eq!(phase.sequence_errors, 2);
        assert_eq!(phase.sequenced, 6);
        assert_eq!(phase.keys["ex-b"].received, 3);
        assert_eq!(phase.keys.len(), 3);
    }
}
