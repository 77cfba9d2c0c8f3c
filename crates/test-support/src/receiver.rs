use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Never answer (the connection stays open until the client gives up).
    pub hang: bool,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
            hang: false,
        }
    }

    pub fn hang() -> Self {
        Self {
            hang: true,
            ..Self::status(200)
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// The status it was answered with.
    pub status: u16,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `webhook-timestamp` header, in seconds; panics when it is
    /// missing or not a number.
    pub fn timestamp(&self) -> i64 {
        self.header("webhook-timestamp")
            .expect("webhook-timestamp header")
            .parse()
            .expect("webhook-timestamp in seconds")
    }

    /// The request's body as JSON; panics when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// The `id` of the event this request carries (its JSON body's);
    /// panics when the body is not JSON or has no string id.
    pub fn event_id(&self) -> String {
        self.json()["id"].as_str().expect("an event id").to_owned()
    }

    /// The `type` of the event this request carries (its JSON body's);
    /// panics when the body is not JSON or has no string type.
    pub fn event_type(&self) -> String {
        self.json()["type"]
            .as_str()
            .expect("an event type")
            .to_owned()
    }
}

/// A behaviour over time for one path, beside the scripted replies.
#[derive(Debug, Clone)]
enum Mode {
    /// Accepts `per_second` requests a second (a token bucket of that
    /// size); beyond, answers `429 Retry-After: 1`.
    RateLimited {
        per_second: f64,
        tokens: f64,
        last: Instant,
    },
    /// Answers `status` until `until`, then 200.
    FailUntil { status: u16, until: Instant },
    /// Answers `status` to `percent` of requests, picked at random (a fixed
    /// sequence: the same in every run), 200 to the rest.
    FailRandomly {
        status: u16,
        percent: u64,
        draws: u64,
    },
}

#[derive(Default)]
struct State {
    /// Replies per path, used in order; the last one repeats.
    scripts: HashMap<String, Vec<Reply>>,
    modes: HashMap<String, Mode>,
    served: HashMap<String, usize>,
    received: Vec<Received>,
    /// (path, status) of every answer given.
    answers: Vec<(String, u16)>,
    /// Requests being answered now, and the most at once, per path.
    in_flight: HashMap<String, (usize, usize)>,
}

/// An HTTP receiver on 127.0.0.1 that records every request.
#[derive(Clone)]
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let receiver = Self {
            addr,
            state: Arc::default(),
            notify: Arc::new(Notify::new()),
            connections: Arc::default(),
        };
        let server = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                server.connections.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        receiver
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let reply = {
            let mut state = self.state.lock().expect("receiver lock");
            let busy = state.in_flight.entry(path.clone()).or_default();
            busy.0 += 1;
            busy.1 = busy.1.max(busy.0);
            let n = state.served.entry(path.clone()).or_default();
            let i = *n;
            *n += 1;
            let now = Instant::now();
            let moded = match state.modes.get_mut(&path) {
                Some(Mode::RateLimited {
                    per_second,
                    tokens,
                    last,
                }) => {
                    *tokens =
                        (*tokens + last.elapsed().as_secs_f64() * *per_second).min(*per_second);
                    *last = now;
                    if *tokens >= 1.0 {
                        *tokens -= 1.0;
                        Some(Reply::status(200))
                    } else {
                        Some(Reply::status(429).header("Retry-After", "1"))
                    }
                }
                Some(Mode::FailUntil { status, until }) if now < *until => {
                    Some(Reply::status(*status))
                }
                Some(Mode::FailUntil { .. }) => Some(Reply::status(200)),
                Some(Mode::FailRandomly {
                    status,
                    percent,
                    draws,
                }) => {
                    // splitmix64 of the draw's number.
                    *draws += 1;
                    let mut z = draws.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    Some(Reply::status(if z % 100 < *percent {
                        *status
                    } else {
                        200
                    }))
                }
                None => None,
            };
            let reply = moded.unwrap_or_else(|| {
                state
                    .scripts
                    .get(&path)
                    .and_then(|s| s.get(i).or(s.last()).cloned())
                    .unwrap_or_else(|| Reply::status(200))
            });
            state.received.push(Received {
                method: parts.method.to_string(),
                path: path.clone(),
                headers: parts.headers,
                body,
                at: Instant::now(),
                status: reply.status,
            });
            reply
        };
        self.state
            .lock()
            .expect("receiver lock")
            .answers
            .push((path.clone(), reply.status));
        self.notify.notify_waiters();
        if reply.hang {
            std::future::pending::<()>().await;
        }
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        if let Some(busy) = self
            .state
            .lock()
            .expect("receiver lock")
            .in_flight
            .get_mut(&path)
        {
            busy.0 -= 1;
        }
        let mut response = Response::builder().status(reply.status);
        for (name, value) in &reply.headers {
            response = response.header(name, value);
        }
        response
            .body(Full::new(Bytes::from(reply.body)))
            .expect("valid reply")
    }

    /// TCP connections accepted so far (with or without a request).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers requests to `path` with `replies` in order, the last repeating.
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        let mut state = self.state.lock().expect("receiver lock");
        state.scripts.insert(path.to_owned(), replies);
        state.served.remove(path);
    }

    /// Accepts `per_second` requests a second on `path` (a token bucket,
    /// full at the start) and answers `429 Retry-After: 1` beyond.
    pub fn rate_limit(&self, path: &str, per_second: f64) {
        let mut state = self.state.lock().expect("receiver lock");
        state.modes.insert(
            path.to_owned(),
            Mode::RateLimited {
                per_second,
                tokens: per_second,
                last: Instant::now(),
            },
        );
    }

    /// Answers `status` on `path` for `duration` from now, then 200.
    pub fn fail_for(&self, path: &str, status: u16, duration: Duration) {
        let mut state = self.state.lock().expect("receiver lock");
        state.modes.insert(
            path.to_owned(),
            Mode::FailUntil {
                status,
                until: Instant::now() + duration,
            },
        );
    }

    /// Answers `status` to `percent` % of the requests to `path`, picked at
    /// random, and 200 to the others, from now on.
    pub fn fail_randomly(&self, path: &str, status: u16, percent: u64) {
        let mut state = self.state.lock().expect("receiver lock");
        state.modes.insert(
            path.to_owned(),
            Mode::FailRandomly {
                status,
                percent,
                draws: 0,
            },
        );
    }

    /// The most requests to `path` being answered at once so far.
    pub fn max_in_flight(&self, path: &str) -> usize {
        let state = self.state.lock().expect("receiver lock");
        state.in_flight.get(path).map(|b| b.1).unwrap_or(0)
    }

    /// Requests to `path` answered with `status` so far.
    pub fn answered(&self, path: &str, status: u16) -> usize {
        let state = self.state.lock().expect("receiver lock");
        state
            .answers
            .iter()
            .filter(|(p, s)| p == path && *s == status)
            .count()
    }

    /// Everything received on `path` so far.
    pub fn received(&self, path: &str) -> Vec<Received> {
        let state = self.state.lock().expect("receiver lock");
        state
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Everything received on any path.
    pub fn all(&self) -> Vec<Received> {
        self.state.lock().expect("receiver lock").received.clone()
    }

    /// The distinct deliveries (`webhook-id` headers) `path` got so far: a
    /// delivery sent twice (at-least-once) counts once.
    pub fn deliveries(&self, path: &str) -> std::collections::HashSet<String> {
        let state = self.state.lock().expect("receiver lock");
        state
            .received
            .iter()
            .filter(|r| r.path == path)
            .filter_map(|r| r.header("webhook-id").map(str::to_owned))
            .collect()
    }

    /// Waits until `path` got at least `n` distinct deliveries, or
    /// `timeout`; returns the distinct deliveries it got either way.
    pub async fn wait_for_deliveries(
        &self,
        path: &str,
        n: usize,
        timeout: Duration,
    ) -> std::collections::HashSet<String> {
        self.wait_until(timeout, || self.deliveries(path), |got| got.len() >= n)
            .await
    }

    /// Waits until `path` got at least `n` requests, or `timeout`; returns
    /// what it got either way.
    pub async fn wait_for(&self, path: &str, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, || self.received(path), |got| got.len() >= n)
            .await
    }

    /// Reads `what` after every request until `enough` says so, or
    /// `timeout`; answers the last reading either way.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: impl Fn() -> T,
        enough: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let got = what();
            if enough(&got) {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return what();
            }
        }
    }
}
