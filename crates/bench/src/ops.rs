//! What a delivery costs in operations, per phase: what NATS did
//! (JetStream messages stored, acks, pull requests, other `$JS.API`
//! requests, messages and bytes in and out, bytes written to disk) and
//! what each process did (system calls, context switches).
//!
//! The server's side is read from nats-server's monitoring endpoints
//! (`/varz`, `/jsz?streams=true&consumers=true`, `/connz`); acks and pull
//! requests, which no endpoint counts, are counted by a tap: a connection
//! of its own subscribed to `$JS.ACK.>` and `$JS.API.>`, which sees every
//! ack and every request as the server does (the server sends each to the
//! tap too, a small cost of its own: `--no-tap` leaves it out). Each
//! process's side is read from `/proc/<pid>/io` and the `status` of its
//! threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::Value;

/// The prefix of the reply subjects of the benchmark's own requests, so
/// the tap tells them from the services' ones.
pub const BENCH_INBOX: &str = "_BENCH_INBOX";
/// The name of the tap's connection (left out of the per-connection counts).
const TAP_NAME: &str = "herald-bench-tap";

/// Pull requests of one consumer, as the tap saw them.
#[derive(Debug, Default, Clone)]
struct Pulls {
    requests: u64,
    batch: u64,
    expires_ms: u64,
    with_heartbeat: u64,
    no_wait: u64,
}

#[derive(Debug, Default, Clone)]
struct TapCounts {
    /// Every message the tap received (all of them also in the server's
    /// `out_msgs`).
    received: u64,
    pulls: BTreeMap<String, Pulls>,
    /// Acks by kind (`+ACK`, `-NAK`, `+WPI`, `+TERM`, …).
    acks: BTreeMap<String, u64>,
    acks_by_consumer: BTreeMap<String, u64>,
    /// Acks that asked for the server's answer (a double ack).
    acks_awaiting_reply: u64,
    /// `$JS.API` requests other than pulls, by kind, the services'.
    api: BTreeMap<String, u64>,
    /// `$JS.API` requests of the benchmark itself (its settle polls).
    bench_api: u64,
}

impl TapCounts {
    fn count(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        self.received += 1;
        let tokens: Vec<&str> = subject.split('.').collect();
        if subject.starts_with("$JS.ACK.") {
            // $JS.ACK.<stream>.<consumer>.… (v1, 9 tokens) or
            // $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.… (v2).
            let consumer = if tokens.len() == 9 {
                tokens.get(3)
            } else {
                tokens.get(5)
            };
            let kind = match payload.split(|b| *b == b' ').next() {
                Some(b"") | None => "+ACK".to_owned(),
                Some(kind) => String::from_utf8_lossy(kind).into_owned(),
            };
            *self.acks.entry(kind).or_default() += 1;
            *self
                .acks_by_consumer
                .entry(consumer.unwrap_or(&"?").to_string())
                .or_default() += 1;
            if reply.is_some_and(|r| !r.is_empty()) {
                self.acks_awaiting_reply += 1;
            }
            return;
        }
        if reply.is_some_and(|r| r.starts_with(BENCH_INBOX)) {
            self.bench_api += 1;
            return;
        }
        // $JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>
        if subject.starts_with("$JS.API.CONSUMER.MSG.NEXT.") {
            let consumer = tokens.get(6).unwrap_or(&"?").to_string();
            let pulls = self.pulls.entry(consumer).or_default();
            pulls.requests += 1;
            let request: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            pulls.batch += request["batch"].as_u64().unwrap_or(1);
            pulls.expires_ms += request["expires"].as_u64().unwrap_or(0) / 1_000_000;
            if request["idle_heartbeat"].as_u64().unwrap_or(0) > 0 {
                pulls.with_heartbeat += 1;
            }
            if request["no_wait"].as_bool().unwrap_or(false) {
                pulls.no_wait += 1;
            }
            return;
        }
        // The kind of request: the two words after $JS.API (STREAM.INFO,
        // CONSUMER.INFO, DIRECT.GET, …).
        let kind = tokens
            .iter()
            .skip(2)
            .take(2)
            .copied()
            .collect::<Vec<_>>()
            .join(".");
        *self.api.entry(kind).or_default() += 1;
    }
}

/// Counters of one process, from /proc.
#[derive(Debug, Default, Clone, Copy)]
struct Proc {
    syscalls: u64,
    context_switches: u64,
    write_bytes: u64,
}

impl Proc {
    fn read(pid: u32) -> Self {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let field = |text: &str, name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut context_switches = 0;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                context_switches += field(&status, "voluntary_ctxt_switches:")
                    + field(&status, "nonvoluntary_ctxt_switches:");
            }
        }
        Self {
            syscalls: field(&io, "syscr:") + field(&io, "syscw:"),
            context_switches,
            write_bytes: field(&io, "write_bytes:"),
        }
    }
}

/// Everything counted, at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
    /// Last sequence of each stream.
    stream_seq: BTreeMap<String, u64>,
    /// Messages delivered by each consumer (redeliveries included).
    consumer_delivered: BTreeMap<String, u64>,
    consumer_redelivered: BTreeMap<String, u64>,
    /// Messages in and out of each named connection.
    connections: BTreeMap<String, (u64, u64)>,
    tap: TapCounts,
    procs: BTreeMap<String, Proc>,
    /// Redis: commands processed, reads of its clients' sockets (a
    /// pipeline is one), and calls by command.
    redis_commands: u64,
    redis_reads: u64,
    redis_calls: BTreeMap<String, u64>,
}

/// Per delivery, what one phase cost in operations.
#[derive(Debug, Default, Serialize)]
pub struct OpsReport {
    /// JetStream messages stored (every stream's last sequence moved).
    pub messages_stored: f64,
    pub messages_stored_by_stream: BTreeMap<String, f64>,
    /// Messages the consumers delivered (pulled), and of those redelivered.
    pub consumer_deliveries: f64,
    pub redeliveries: f64,
    /// Acks of every kind, and by kind and consumer (from the tap).
    pub acks: Option<f64>,
    pub acks_by_kind: BTreeMap<String, f64>,
    pub acks_by_consumer: BTreeMap<String, f64>,
    /// Acks that waited for the server's answer (double acks).
    pub acks_awaiting_reply: Option<f64>,
    /// Pull requests (`$JS.API.CONSUMER.MSG.NEXT`), all and per consumer.
    pub pull_requests: Option<f64>,
    pub pull_requests_by_consumer: BTreeMap<String, f64>,
    /// Per consumer, the messages one pull request asked for on average,
    /// and its mean expiry in ms.
    pub mean_pull_batch: BTreeMap<String, f64>,
    pub mean_pull_expires_ms: BTreeMap<String, f64>,
    /// Other `$JS.API` requests of the services, all and by kind.
    pub api_requests: Option<f64>,
    pub api_requests_by_kind: BTreeMap<String, f64>,
    /// The benchmark's own `$JS.API` requests in the phase (not per
    /// delivery; left out of the rest).
    pub bench_api_requests: Option<u64>,
    /// Messages into and out of nats-server (`/varz`, the tap's copies
    /// taken out of `out`), and their bytes.
    pub nats_in_msgs: f64,
    pub nats_out_msgs: f64,
    pub nats_in_bytes: f64,
    pub nats_out_bytes: f64,
    /// Messages in and out of each service's connections, per delivery.
    pub msgs_in_by_connection: BTreeMap<String, f64>,
    pub msgs_out_by_connection: BTreeMap<String, f64>,
    /// Bytes nats-server wrote to its store (`/proc/<pid>/io` write_bytes).
    pub disk_write_bytes: f64,
    /// System calls (read and write kinds) and context switches of each
    /// process (the services, nats-server and redis-server).
    pub syscalls_by_process: BTreeMap<String, f64>,
    pub context_switches_by_process: BTreeMap<String, f64>,
    /// Redis commands, and round trips (`total_reads_processed`: each
    /// read of a client's socket, so a pipeline counts once), and
    /// commands by name (`INFO commandstats`).
    pub redis_commands: f64,
    pub redis_round_trips: f64,
    pub redis_calls_by_command: BTreeMap<String, f64>,
}

/// Reads the counters; the tap runs from [`Ops::start`] on.
pub struct Ops {
    monitor_url: String,
    /// host:port of the Redis, for `INFO`.
    redis_addr: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    tap: Option<(async_nats::Client, Arc<Mutex<TapCounts>>)>,
}

impl Ops {
    /// Counts on the NATS at `nats_url` whose monitoring endpoint is
    /// `monitor_url`; with `tap`, acks and requests too.
    pub async fn start(
        monitor_url: String,
        nats_url: &str,
        redis_url: &str,
        tap: bool,
    ) -> anyhow::Result<Self> {
        let tap = if tap {
            let client = async_nats::ConnectOptions::new()
                .name(TAP_NAME)
                .subscription_capacity(1 << 16)
                .connect(nats_url)
                .await?;
            let counts = Arc::new(Mutex::new(TapCounts::default()));
            let mut acks = client.subscribe("$JS.ACK.>").await?;
            let mut api = client.subscribe("$JS.API.>").await?;
            client.flush().await?;
            let c = counts.clone();
            tokio::spawn(async move {
                loop {
                    let message = tokio::select! {
                        Some(m) = acks.next() => m,
                        Some(m) = api.next() => m,
                        else => break,
                    };
                    c.lock().expect("tap counts").count(
                        message.subject.as_str(),
                        message.reply.as_ref().map(|r| r.as_str()),
                        &message.payload,
                    );
                }
            });
            Some((client, counts))
        } else {
            None
        };
        let redis_addr = redis_url
            .strip_prefix("redis://")
            .map(|rest| rest.trim_end_matches('/').to_owned());
        Ok(Self {
            monitor_url,
            redis_addr,
            http: Client::builder(TokioExecutor::new()).build_http(),
            tap,
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let uri = format!("{}{path}", self.monitor_url);
        let response =
            tokio::time::timeout(Duration::from_secs(10), self.http.get(uri.parse()?)).await??;
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Everything counted now; `pids` are the processes to read.
    pub async fn snapshot(&self, pids: &[(String, u32)]) -> Snapshot {
        let mut snap = Snapshot::default();
        if let Some((client, counts)) = &self.tap {
            // What the server sent the tap before this reached it is read
            // once the flush is answered; a moment for the counting task.
            let _ = client.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            snap.tap = counts.lock().expect("tap counts").clone();
        }
        if let Ok(varz) = self.get("/varz").await {
            let n = |f: &str| varz[f].as_u64().unwrap_or(0);
            (snap.in_msgs, snap.out_msgs) = (n("in_msgs"), n("out_msgs"));
            (snap.in_bytes, snap.out_bytes) = (n("in_bytes"), n("out_bytes"));
        }
        if let Ok(jsz) = self.get("/jsz?streams=true&consumers=true").await {
            for account in jsz["account_details"].as_array().into_iter().flatten() {
                for stream in account["stream_detail"].as_array().into_iter().flatten() {
                    let name = stream["name"].as_str().unwrap_or("?").to_owned();
                    let seq = stream["state"]["last_seq"].as_u64().unwrap_or(0);
                    snap.stream_seq.insert(name, seq);
                    for consumer in stream["consumer_detail"].as_array().into_iter().flatten() {
                        let name = consumer["name"].as_str().unwrap_or("?").to_owned();
                        let delivered = consumer["delivered"]["consumer_seq"].as_u64();
                        let redelivered = consumer["num_redelivered"].as_u64();
                        snap.consumer_delivered
                            .insert(name.clone(), delivered.unwrap_or(0));
                        snap.consumer_redelivered
                            .insert(name, redelivered.unwrap_or(0));
                    }
                }
            }
        }
        if let Ok(connz) = self.get("/connz?limit=4096").await {
            for conn in connz["connections"].as_array().into_iter().flatten() {
                let name = conn["name"].as_str().unwrap_or("").to_owned();
                if name == TAP_NAME {
                    continue;
                }
                let name = if name.is_empty() {
                    "(unnamed)".to_owned()
                } else {
                    name
                };
                let entry = snap.connections.entry(name).or_default();
                entry.0 += conn["in_msgs"].as_u64().unwrap_or(0);
                entry.1 += conn["out_msgs"].as_u64().unwrap_or(0);
            }
        }
        for (name, pid) in pids {
            snap.procs.insert(name.clone(), Proc::read(*pid));
        }
        if let Some(info) = self.redis_info().await {
            for line in info.lines() {
                let line = line.trim();
                if let Some((key, value)) = line.split_once(':') {
                    let n = || value.parse::<u64>().unwrap_or(0);
                    match key {
                        "total_commands_processed" => snap.redis_commands = n(),
                        "total_reads_processed" => snap.redis_reads = n(),
                        _ => {}
                    }
                    if let Some(command) = key.strip_prefix("cmdstat_") {
                        let calls = value
                            .split(',')
                            .find_map(|f| f.strip_prefix("calls="))
                            .and_then(|c| c.parse().ok())
                            .unwrap_or(0);
                        snap.redis_calls.insert(command.to_owned(), calls);
                    }
                }
            }
        }
        snap
    }

    /// `INFO stats commandstats` of the Redis, as text (an inline command
    /// over a plain connection: no client library needed).
    async fn redis_info(&self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.redis_addr.as_ref()?;
        let read = async {
            let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
            conn.write_all(b"INFO stats commandstats\r\n").await.ok()?;
            let mut reply = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = conn.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                reply.extend_from_slice(&buf[..n]);
                // "$<len>\r\n<len bytes>\r\n"
                let text = String::from_utf8_lossy(&reply);
                let (head, body) = text.split_once("\r\n")?;
                let len: usize = head.strip_prefix('$')?.parse().ok()?;
                if body.len() >= len {
                    return Some(body[..len].to_owned());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
            .flatten()
    }

    pub fn tapping(&self) -> bool {
        self.tap.is_some()
    }
}

fn per(x: u64, deliveries: u64) -> f64 {
    if deliveries == 0 {
        return 0.0;
    }
    (x as f64 / deliveries as f64 * 1000.0).round() / 1000.0
}

fn delta_map<V>(
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
    value: impl Fn(&V) -> u64,
    deliveries: u64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let was = before.get(k).map_or(0, &value);
            (k.clone(), per(value(v).saturating_sub(was), deliveries))
        })
        .collect()
}

/// `map` without its zeros.
fn nonzero(map: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    map.into_iter().filter(|(_, v)| *v != 0.0).collect()
}

/// What happened between `before` and `after`, per delivery.
pub fn report(before: &Snapshot, after: &Snapshot, deliveries: u64, tapped: bool) -> OpsReport {
    let d = deliveries;
    let stored = nonzero(delta_map(&before.stream_seq, &after.stream_seq, |v| *v, d));
    let tap_out = after.tap.received.saturating_sub(before.tap.received);
    let mut r = OpsReport {
        messages_stored: per(
            after.stream_seq.values().sum::<u64>() - before.stream_seq.values().sum::<u64>(),
            d,
        ),
        messages_stored_by_stream: stored,
        consumer_deliveries: per(
            after.consumer_delivered.values().sum::<u64>()
                - before
                    .consumer_delivered
                    .iter()
                    .filter(|(k, _)| after.consumer_delivered.contains_key(*k))
                    .map(|(_, v)| v)
                    .sum::<u64>(),
            d,
        ),
        redeliveries: per(
            after
                .consumer_redelivered
                .values()
                .sum::<u64>()
                .saturating_sub(before.consumer_redelivered.values().sum()),
            d,
        ),
        nats_in_msgs: per(after.in_msgs - before.in_msgs, d),
        nats_out_msgs: per(
            (after.out_msgs - before.out_msgs).saturating_sub(tap_out),
            d,
        ),
        nats_in_bytes: per(after.in_bytes - before.in_bytes, d),
        nats_out_bytes: per(after.out_bytes - before.out_bytes, d),
        msgs_in_by_connection: nonzero(delta_map(
            &before.connections,
            &after.connections,
            |v| v.0,
            d,
        )),
        msgs_out_by_connection: nonzero(delta_map(
            &before.connections,
            &after.connections,
            |v| v.1,
            d,
        )),
        disk_write_bytes: after
            .procs
            .get("nats-server")
            .zip(before.procs.get("nats-server"))
            .map_or(0.0, |(a, b)| per(a.write_bytes - b.write_bytes, d)),
        syscalls_by_process: delta_map(&before.procs, &after.procs, |p| p.syscalls, d),
        context_switches_by_process: delta_map(
            &before.procs,
            &after.procs,
            |p| p.context_switches,
            d,
        ),
        redis_commands: per(after.redis_commands - before.redis_commands, d),
        redis_round_trips: per(after.redis_reads - before.redis_reads, d),
        redis_calls_by_command: nonzero(delta_map(
            &before.redis_calls,
            &after.redis_calls,
            |v| *v,
            d,
        )),
        ..Default::default()
    };
    if tapped {
        let (b, a) = (&before.tap, &after.tap);
        r.acks = Some(per(
            a.acks.values().sum::<u64>() - b.acks.values().sum::<u64>(),
            d,
        ));
        r.acks_by_kind = nonzero(delta_map(&b.acks, &a.acks, |v| *v, d));
        r.acks_by_consumer = nonzero(delta_map(
            &b.acks_by_consumer,
            &a.acks_by_consumer,
            |v| *v,
            d,
        ));
        r.acks_awaiting_reply = Some(per(a.acks_awaiting_reply - b.acks_awaiting_reply, d));
        let requests = |p: &Pulls| p.requests;
        r.pull_requests_by_consumer = nonzero(delta_map(&b.pulls, &a.pulls, requests, d));
        r.pull_requests =
            Some((r.pull_requests_by_consumer.values().sum::<f64>() * 1000.0).round() / 1000.0);
        for (consumer, pulls) in &a.pulls {
            let was = b.pulls.get(consumer).cloned().unwrap_or_default();
            let n = pulls.requests - was.requests;
            if n > 0 {
                let mean = |x: u64| (x as f64 / n as f64 * 10.0).round() / 10.0;
                r.mean_pull_batch
                    .insert(consumer.clone(), mean(pulls.batch - was.batch));
                r.mean_pull_expires_ms
                    .insert(consumer.clone(), mean(pulls.expires_ms - was.expires_ms));
            }
        }
        r.api_requests_by_kind = nonzero(delta_map(&b.api, &a.api, |v| *v, d));
        r.api_requests = Some(per(
            a.api.values().sum::<u64>() - b.api.values().sum::<u64>(),
            d,
        ));
        r.bench_api_requests = Some(a.bench_api - b.bench_api);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tap_tells_acks_pulls_and_requests_apart() {
        let mut t = TapCounts::default();
        t.count("$JS.ACK.S.c.1.2.3.4.0", None, b"+ACK");
        t.count("$JS.ACK.S.c.1.2.3.4.0", Some("_INBOX.x"), b"");
        t.count("$JS.ACK.dom.hash.S.d.1.2.3.4.0.tok", None, b"+WPI");
        t.count(
            "$JS.API.CONSUMER.MSG.NEXT.S.c",
            Some("_INBOX.y"),
            br#"{"batch":500,"expires":5000000000,"idle_heartbeat":1000000000}"#,
        );
        t.count("$JS.API.CONSUMER.INFO.S.c", Some("_INBOX.z"), b"");
        t.count("$JS.API.STREAM.INFO.S", Some("_BENCH_INBOX.q"), b"");
        assert_eq!(t.received, 6);
        assert_eq!(t.acks["+ACK"], 2);
        assert_eq!(t.acks["+WPI"], 1);
        assert_eq!(t.acks_by_consumer["c"], 2);
        assert_eq!(t.acks_by_consumer["d"], 1);
        assert_eq!(t.acks_awaiting_reply, 1);
        let pulls = &t.pulls["c"];
        assert_eq!(
            (
                pulls.requests,
                pulls.batch,
                pulls.expires_ms,
                pulls.with_heartbeat
            ),
            (1, 500, 5000, 1)
        );
        assert_eq!(t.api["CONSUMER.INFO"], 1);
        assert_eq!(t.bench_api, 1);
    }
}
