//! Log-writer benchmark, against a throwaway nats-server and redis-server on
//! loopback (started and removed by this program):
//!
//! 1. query latency with N attempts stored for one webhook (written straight
//!    into the index with `LogIndex::write`), through the index and through
//!    the admin API over HTTP;
//! 2. log-writer throughput: `through` attempts published to
//!    `herald.attempts.>`, then log-writer started and timed until every one
//!    is stored (a backlog: the index has no built marker, so log-writer
//!    first replays the whole stream, the N of step 1 included), then
//!    `through` more published while it runs (live);
//! 3. rebuild: Redis flushed, timed until log-writer has replayed the stream.
//!
//! `cargo run --release -p herald-log-writer --example log-writer-bench -- [stored] [through] [webhooks]`:
//! `stored` attempts in the index for the memory and query figures (default
//! 100000), `through` attempts for the throughput runs (default: `stored`,
//! at most 200000), `webhooks` the stored attempts are spread over, round
//! robin (default 1; the organization-wide rows then read all of them).
//! Prints a Markdown table.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use herald_core::{ids, names, proto};
use herald_platform::log_index::{LogIndex, Query, Stored};
use herald_platform::redis::Redis;
use herald_test_support::{NatsServer, RedisServer, free_port};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tokio_util::sync::CancellationToken;

const KEY: &str = "bench-key";
const TYPES: &[&str] = &[
    "workflow.completed",
    "workflow.failed",
    "workflow.step.completed",
    "worker.connected",
];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A realistic attempt: ids as Herald makes them (a UUIDv7-based event id,
/// the delivery id derived from it), a ~600-byte JSON body, signed headers,
/// a short response; the event itself is in the events stream (the record
/// names its sequence), as the deliverer logs it.
fn attempt(org: &str, webhook_id: &str, n: u64, at_ms: i64) -> proto::AttemptResult {
    let event_id = format!("evt_{:012x}7{:019x}", at_ms, n);
    let delivery_id = ids::delivery_id(org, &event_id, webhook_id);
    let event_type = TYPES[(n % TYPES.len() as u64) as usize];
    let body = format!(
        r#"{{"id":"evt_{n}","type":"{event_type}","timestamp":"2026-11-22T10:00:00.000Z","organization_id":"{org}","webhook_id":"{webhook_id}","attributes":{{"execution":"ex-{n}","status":"succeeded","workflow":"invoice-approval"}},"data":{{"invoice":"INV-{n}","amount":4200,"currency":"EUR","lines":[{{"sku":"A-1","qty":3}},{{"sku":"B-2","qty":1}}],"customer":{{"id":"cus_{n}","name":"Example Customer Ltd","email":"billing@example.com"}}}},"metadata":{{"source":"bench"}}}}"#
    );
    let header = |name: &str, value: &str| proto::Header {
        name: name.into(),
        value: value.into(),
    };
    let mut a = proto::AttemptResult {
        log_id: ids::log_id(&delivery_id, 1),
        delivery_id: delivery_id.clone(),
        organization_id: org.into(),
        webhook_id: webhook_id.into(),
        event_id: event_id.clone(),
        event_type: event_type.into(),
        attempt: 1,
        request: Some(proto::HttpRequest {
            method: "POST".into(),
            url: "https://hooks.example.com/herald/receive".into(),
            headers: vec![
                header("content-type", "application/json"),
                header("user-agent", "Herald/0.1.0"),
                header("webhook-id", &delivery_id),
                header("webhook-timestamp", "1795000000"),
                header("webhook-signature", "********"),
                header("x-webhook-signature", "********"),
            ],
            body: body.into_bytes().into(),
            ..Default::default()
        }),
        response: Some(proto::HttpResponse {
            status: if n.is_multiple_of(10) { 500 } else { 200 },
            headers: vec![header("content-type", "application/json")],
            body: Bytes::from_static(br#"{"ok":true}"#),
            body_truncated: false,
        }),
        duration_ms: 40 + n % 50,
        attempted_at_ms: at_ms,
        event_seq: n + 1,
        ..Default::default()
    };
    a.set_status(if n.is_multiple_of(10) {
        proto::AttemptStatus::Retrying
    } else {
        proto::AttemptStatus::Succeeded
    });
    a
}

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn row(&mut self, what: &str) -> String {
        self.0.sort();
        let at = |q: f64| {
            let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
            self.0[i].as_secs_f64() * 1000.0
        };
        format!(
            "| {what} | {:.2} | {:.2} | {:.2} |",
            at(0.50),
            at(0.99),
            at(1.0)
        )
    }
}

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    async fn call(&self, method: &str, path: &str, body: Option<String>) -> (u16, Bytes) {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {KEY}"));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let response = self.client.request(request).await.expect("admin call");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, bytes)
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish_all(js: &async_nats::jetstream::Context, attempts: &[proto::AttemptResult]) {
    for window in attempts.chunks(2_000) {
        let mut acks = Vec::with_capacity(window.len());
        for a in window {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", a.log_id.as_str());
            acks.push(
                js.publish_with_headers(
                    names::attempt_subject(&a.organization_id, &a.webhook_id),
                    headers,
                    a.encode_to_vec().into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
}

/// Redis's `used_memory`, in bytes.
async fn used_memory(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("attempts: a number"))
        .unwrap_or(100_000);
    let through: u64 = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("throughput attempts: a number"))
        .unwrap_or(n.min(200_000));
    let webhooks: u64 = std::env::args()
        .nth(3)
        .map(|a| a.parse().expect("webhooks: a number"))
        .unwrap_or(1)
        .max(1);
    let queries = 200;
    let nats = NatsServer::start();
    let redis_server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        format!(
            r#"{{"keys":[{{"key_sha256":"{}","organizations":["*"],"default_organization":"acme"}}]}}"#,
            herald_admin::auth::hash_key(KEY)
        ),
    )
    .unwrap();
    let admin_addr = format!("127.0.0.1:{}", free_port());
    let env: HashMap<String, String> = [
        ("HERALD_NATS_URL", nats.url()),
        ("HERALD_REDIS_URL", redis_server.url()),
        ("HERALD_ADMIN_ADDR", admin_addr.clone()),
        ("HERALD_API_KEYS_FILE", keys.display().to_string()),
        (
            "HERALD_SECRET_KEY",
            herald_core::secret::Keyring::generate_key_text(),
        ),
        ("HERALD_ALLOW_HTTP", "true".into()),
        (
            "HERALD_LOG_WRITER_HEALTH_ADDR",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("HERALD_LOG_INDEX_CHECK", "100ms".into()),
        // The bench reads as fast as it can; the per-key rate is not what it measures.
        ("HERALD_API_REQUESTS_PER_MINUTE", "10000000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let shutdown = CancellationToken::new();
    let admin_config = herald_admin::Config::from_source(&env).unwrap();
    tokio::spawn(herald_admin::run(admin_config, shutdown.clone()));
    let http = Http {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: format!("http://{admin_addr}"),
    };
    wait_until("admin", Duration::from_secs(30), || async {
        let request = http::Request::get(format!("{}/ready", http.base))
            .body(Full::new(Bytes::new()))
            .unwrap();
        matches!(http.client.request(request).await, Ok(r) if r.status() == 200)
    })
    .await;
    let (status, created) = http
        .call(
            "POST",
            "/webhooks",
            Some(r#"{"name":"bench","url":"http://127.0.0.1:9/bench","event_types":["workflow.>","worker.>"]}"#.into()),
        )
        .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&created));
    let created: serde_json::Value = serde_json::from_slice(&created).unwrap();
    let webhook_id = created["id"].as_str().unwrap().to_owned();
    // Attempt i belongs to webhook i % webhooks; the first is the one made
    // through the API (the HTTP rows read it), the others only have logs.
    let webhook_ids: Vec<String> = std::iter::once(webhook_id.clone())
        .chain((1..webhooks).map(|w| format!("wh_{w:032x}")))
        .collect();
    let owner = |i: u64| webhook_ids[(i % webhooks) as usize].as_str();

    println!(
        "## Log-writer benchmark: {n} attempts over {webhooks} webhooks, {} CPUs\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // 1. Query latency at n stored attempts, all of one webhook.
    let redis = Redis::new(&redis_server.url(), Duration::from_secs(5)).unwrap();
    let index = LogIndex::new(redis, Duration::from_secs(7 * 86_400));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let base = now_ms();
    // The attempts go to the stream first (so the detail reads them back
    // by sequence, as in production; the stream is empty, so attempt i is
    // at sequence i + 1), then straight into the index.
    let t = Instant::now();
    for chunk_start in (0..n).step_by(10_000) {
        let batch: Vec<_> = (chunk_start..(chunk_start + 10_000).min(n))
            .map(|i| attempt("acme", owner(i), i, base - (n - i) as i64))
            .collect();
        publish_all(&js, &batch).await;
    }
    let first_publish = t.elapsed();
    let mut stream = js.get_stream(names::ATTEMPTS_STREAM).await.unwrap();
    let stream_bytes = stream.info().await.unwrap().state.bytes;
    println!(
        "Attempts stream: {n} attempts published in {:.1} s, {} bytes per attempt\n",
        first_publish.as_secs_f64(),
        stream_bytes / n.max(1)
    );
    let memory_before = used_memory(&redis_server.url()).await;
    let started = Instant::now();
    let mut last_log_id = String::new();
    for chunk_start in (0..n).step_by(1_000) {
        let batch: Vec<_> = (chunk_start..(chunk_start + 1_000).min(n))
            .map(|i| Stored {
                attempt: attempt("acme", owner(i), i, base - (n - i) as i64),
                seq: i + 1,
            })
            .collect();
        if let Some(last) = batch
            .iter()
            .rev()
            .find(|s| s.attempt.webhook_id == webhook_id)
        {
            last_log_id = last.attempt.log_id.clone();
        }
        index.write(&batch).await.unwrap();
    }
    let direct = started.elapsed();
    println!(
        "Direct index writes (LogIndex::write, batches of 1000): {n} in {:.1} s = {:.0} attempts/s\n",
        direct.as_secs_f64(),
        n as f64 / direct.as_secs_f64()
    );

    let per_attempt = (used_memory(&redis_server.url()).await - memory_before) / n.max(1);
    println!(
        "Redis memory: {per_attempt} bytes per stored attempt (used_memory before and after)\n"
    );

    let webhook = |status: Option<&str>| Query {
        org: "acme".into(),
        webhook_id: Some(webhook_id.clone()),
        status: status.map(str::to_owned),
        limit: 50,
        ..Default::default()
    };
    let deep = ((n / webhooks) as usize).saturating_sub(100);
    let org_deep = (n as usize).saturating_sub(100);
    let organization = Query {
        webhook_id: None,
        ..webhook(None)
    };
    let org_deep_cursor = index
        .page(&Query {
            offset: org_deep.saturating_sub(50),
            ..organization.clone()
        })
        .await
        .unwrap()
        .next_cursor;
    // A cursor deep in the list: the one after the page at `deep`.
    let deep_cursor = index
        .page(&Query {
            offset: deep.saturating_sub(50),
            ..webhook(None)
        })
        .await
        .unwrap()
        .next_cursor;
    let index_cases: Vec<(String, Query)> = vec![
        (
            "organization, limit 50, first page".into(),
            organization.clone(),
        ),
        (
            format!("organization, limit 50, cursor at {org_deep}"),
            Query {
                cursor: org_deep_cursor,
                ..organization.clone()
            },
        ),
        (
            "organization, status=retrying, limit 50".into(),
            Query {
                status: Some("retrying".into()),
                ..organization.clone()
            },
        ),
        ("webhook, limit 50, first page".into(), webhook(None)),
        (
            format!("webhook, limit 50, offset {deep}"),
            Query {
                offset: deep,
                ..webhook(None)
            },
        ),
        (
            format!("webhook, limit 50, cursor at {deep}"),
            Query {
                cursor: deep_cursor,
                ..webhook(None)
            },
        ),
        (
            "webhook, limit 500, first page".into(),
            Query {
                limit: 500,
                ..webhook(None)
            },
        ),
        (
            "webhook, status=retrying (a status list), limit 50".into(),
            webhook(Some("retrying")),
        ),
        (
            "webhook, event_type=workflow.failed (scan), limit 50".into(),
            Query {
                event_type: Some("workflow.failed".into()),
                ..webhook(None)
            },
        ),
        (
            "organization, event_type=workflow.failed, limit 50".into(),
            Query {
                webhook_id: None,
                event_type: Some("workflow.failed".into()),
                ..webhook(None)
            },
        ),
        (
            "webhook, delivery_id lookup".into(),
            Query {
                delivery_id: Some(herald_platform::log_index::delivery_of(&last_log_id).to_owned()),
                ..webhook(None)
            },
        ),
    ];
    println!("| query (LogIndex, Redis round trip) | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- |");
    for (what, query) in &index_cases {
        let mut lat = Latencies::default();
        for _ in 0..queries {
            let t = Instant::now();
            let page = index.page(query).await.unwrap();
            lat.0.push(t.elapsed());
            // (Spread over many webhooks, the first holds only every
            // webhooks-th attempt, all of one event type.)
            assert!(!page.items.is_empty() || webhooks > 1, "{what}");
        }
        println!("{}", lat.row(what));
    }
    let mut lat = Latencies::default();
    for _ in 0..queries {
        let t = Instant::now();
        assert!(
            index
                .get("acme", &webhook_id, &last_log_id)
                .await
                .unwrap()
                .is_some()
        );
        lat.0.push(t.elapsed());
    }
    println!("{}", lat.row("one attempt by log id (get)"));

    let http_cases = vec![
        format!("/webhooks/{webhook_id}/logs"),
        format!("/webhooks/{webhook_id}/logs?limit=50&offset={deep}"),
        format!("/webhooks/{webhook_id}/logs?limit=500"),
        format!("/webhooks/{webhook_id}/logs?status=retrying"),
        format!("/webhooks/{webhook_id}/logs?event_type=workflow.failed"),
        "/webhooks/logs/all?event_type=workflow.failed".to_owned(),
        format!("/webhooks/{webhook_id}/logs/{last_log_id}"),
    ];
    println!("\n| GET (admin API over HTTP, loopback) | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- |");
    for path in &http_cases {
        let mut lat = Latencies::default();
        for _ in 0..queries {
            let t = Instant::now();
            let (status, body) = http.call("GET", path, None).await;
            lat.0.push(t.elapsed());
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        }
        let shown = path
            .replace(&last_log_id, "{log_id}")
            .replace(&webhook_id, "{id}");
        println!("{}", lat.row(&format!("`{shown}`")));
    }

    // 2. Throughput: a backlog, then live.
    let backlog: Vec<_> = (0..through)
        .map(|i| attempt("tp", "wh_backlog", i, now_ms()))
        .collect();
    let t = Instant::now();
    publish_all(&js, &backlog).await;
    let published = t.elapsed();
    let org_total = |org: &'static str| {
        let index = index.clone();
        async move {
            let query = Query {
                org: org.into(),
                limit: 1,
                ..Default::default()
            };
            index
                .page(&query)
                .await
                .ok()
                .and_then(|p| p.total)
                .unwrap_or(0)
        }
    };
    let writer_config = herald_log_writer::Config::from_source(&env).unwrap();
    let t = Instant::now();
    tokio::spawn(herald_log_writer::run(writer_config, shutdown.clone()));
    wait_until("backlog stored", Duration::from_secs(600), || async {
        org_total("tp").await >= through
    })
    .await;
    let backlog_time = t.elapsed();

    let live: Vec<_> = (0..through)
        .map(|i| attempt("live", "wh_live", i, now_ms()))
        .collect();
    let t = Instant::now();
    publish_all(&js, &live).await;
    wait_until("live stored", Duration::from_secs(600), || async {
        org_total("live").await >= through
    })
    .await;
    let live_time = t.elapsed();

    // 3. Rebuild after FLUSHALL: everything in the stream (n + 2 through).
    let flush = redis::Client::open(redis_server.url()).unwrap();
    let mut conn = flush.get_multiplexed_async_connection().await.unwrap();
    let t = Instant::now();
    redis::cmd("FLUSHALL")
        .arg("ASYNC")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    wait_until("rebuilt", Duration::from_secs(3_600), || async {
        org_total("tp").await >= through
            && org_total("live").await >= through
            && index.is_built().await.unwrap_or(false)
    })
    .await;
    let rebuild_time = t.elapsed();

    let rate = |count: u64, d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "\n| log-writer (published to NATS, consumed, stored in Redis) | attempts | seconds | attempts/s |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| publish only (JetStream, acked, windows of 2000) | {through} | {:.1} | {:.0} |",
        published.as_secs_f64(),
        rate(through, published)
    );
    println!(
        "| backlog: log-writer started after the publish, through the whole stream | {} | {:.1} | {:.0} |",
        n + through,
        backlog_time.as_secs_f64(),
        rate(n + through, backlog_time)
    );
    println!(
        "| live: published while log-writer runs, until all stored | {through} | {:.1} | {:.0} |",
        live_time.as_secs_f64(),
        rate(through, live_time)
    );
    println!(
        "| rebuild after FLUSHALL (replay of the stream) | {} | {:.1} | {:.0} |",
        n + 2 * through,
        rebuild_time.as_secs_f64(),
        rate(n + 2 * through, rebuild_time)
    );
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
}
