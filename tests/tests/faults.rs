//! Herald's own faults against the delivery policy (PRODUCT.md, "Deliveries
//! out" and "Delivery logs"): a Redis that is full holds the breaker as a
//! healthy one does; Herald's lost network or a tenant's broken DNS never
//! count against the wrong party; deliveries parked behind a failing
//! webhook survive the deliverer that parked them.

use std::collections::HashSet;
use std::time::Duration;

use herald_e2e::{Options, Receiver, Stack};
use herald_test_support::RedisServer;
use serde_json::{Value, json};

async fn create(stack: &Stack, url: &str) -> String {
    let webhook = stack
        .create_webhook(json!({"name": "hook", "url": url, "event_types": ["workflow.completed"]}))
        .await;
    webhook["id"].as_str().unwrap().to_owned()
}

async fn webhook_json(stack: &Stack, id: &str) -> Value {
    let (status, json) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert_eq!(status, 200, "{json}");
    json
}

/// Distinct event ids `path` received.
fn distinct(receiver: &Receiver, path: &str) -> HashSet<String> {
    receiver
        .received(path)
        .iter()
        .filter_map(|r| {
            serde_json::from_slice::<Value>(&r.body).ok()?["id"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Writes to `redis` until it refuses: full, with `noeviction`.
async fn fill(redis: &RedisServer) {
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

/// One webhook whose URL fails for its first 6 s of a steady load of
/// events (50 a second for 8 s); the main Redis full or not. Answers the
/// failed requests the URL got, once every event has arrived.
async fn a_url_failing_under_load(full_redis: bool) -> usize {
    let small = RedisServer::start_small();
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_REDIS_URL", &small.url())
            .env("HERALD_RETRY_SCHEDULE", "1s,2s,4s,8s"),
    )
    .await;
    let receiver = Receiver::start().await;
    let id = create(&stack, &receiver.url("/flaky")).await;
    stack.wait_deliverer_current().await;
    if full_redis {
        // Every write of the endpoint state is refused from here on; reads
        // still answer (healthy: no key).
        fill(&small).await;
    }
    receiver.fail_for("/flaky", 500, Duration::from_secs(6));
    const EVENTS: usize = 400;
    let start = tokio::time::Instant::now();
    for i in 0..EVENTS {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("evt_{i}"), "data": {"i": i}}),
            )
            .await;
        tokio::time::sleep_until(start + Duration::from_millis(20 * (i as u64 + 1))).await;
    }
    stack
        .eventually(Duration::from_secs(40), "every event delivered", || async {
            (distinct(&receiver, "/flaky").len() == EVENTS).then_some(())
        })
        .await;
    let failed = receiver.answered("/flaky", 500);
    let webhook = webhook_json(&stack, &id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    eprintln!(
        "{EVENTS} events over 8 s to a URL failing for 6 s, Redis {}: {failed} failed requests",
        if full_redis { "full" } else { "healthy" }
    );
    stack.stop().await;
    failed
}

/// The failure that makes the webhook failing, the requests already in
/// flight with it, and probes at 1 s and 3 s: a handful (the one at 7 s
/// succeeds). A breaker that
/// acted on a stale state would send a burst every time its cache expired.
const FEW_FAILURES: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_url_gets_a_few_requests_with_a_healthy_redis() {
    let failed = a_url_failing_under_load(false).await;
    assert!(failed <= FEW_FAILURES, "{failed} failed requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_redis_holds_the_breaker_as_a_healthy_one_does() {
    let failed = a_url_failing_under_load(true).await;
    assert!(
        failed <= FEW_FAILURES,
        "{failed} failed requests with a full Redis: the breaker acted on a stale state"
    );
}
