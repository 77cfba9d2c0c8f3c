//! What an operator relies on: readiness that follows NATS and Redis,
//! metrics that move, a trace that reaches the receiver, and a deliverer
//! stopped under load that loses nothing.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use herald_e2e::{Options, Receiver, Reply, Stack};
use herald_platform::trace::trace_id;
use prost::Message;
use serde_json::{Value, json};

const HEALTH_ADDRS: [&str; 5] = [
    "HERALD_INGEST_HEALTH_ADDR",
    "HERALD_MATCHER_HEALTH_ADDR",
    "HERALD_DELIVERER_HEALTH_ADDR",
    "HERALD_LOG_WRITER_HEALTH_ADDR",
    "HERALD_ADMIN_ADDR",
];

/// The value of the sample `series` (name with its labels, as rendered).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

async fn ready(stack: &Stack, addr_var: &str) -> (u16, Value) {
    let (status, body) = stack
        .get(&stack.health_url(addr_var, "/ready"))
        .await
        .unwrap_or((0, "null".into()));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn wait_ready_state(stack: &Stack, addr_var: &str, want: u16) -> Value {
    stack
        .eventually(
            Duration::from_secs(30),
            &format!("{addr_var} /ready answering {want}"),
            || async {
                let (status, body) = ready(stack, addr_var).await;
                (status == want).then_some(body)
            },
        )
        .await
}

async fn scrape(stack: &Stack, addr_var: &str) -> String {
    let (status, body) = stack
        .get(&stack.health_url(addr_var, "/metrics"))
        .await
        .expect("scrape /metrics");
    assert_eq!(status, 200);
    body
}

async fn hook(stack: &Stack, receiver: &Receiver, event_types: Value) -> String {
    let webhook = stack
        .create_webhook(json!({
            "name": "ops",
            "url": receiver.url("/hook"),
            "event_types": event_types,
        }))
        .await;
    webhook["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_nats_and_redis() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    hook(&stack, &receiver, json!(["workflow.completed"])).await;

    stack.nats.stop();
    for var in HEALTH_ADDRS {
        let body = wait_ready_state(&stack, var, 503).await;
        assert_eq!(body["checks"]["nats"], false, "{var}: {body}");
        // Liveness does not follow dependencies.
        let (status, _) = stack
            .get(&stack.health_url(var, "/live"))
            .await
            .expect("live");
        assert_eq!(status, 200, "{var} /live");
    }
    stack.nats.restart();
    for var in HEALTH_ADDRS {
        wait_ready_state(&stack, var, 200).await;
    }
    // Ready again means working again.
    stack
        .publish("acme", "workflow.completed", json!({"id": "after-nats"}))
        .await;
    let got = receiver.wait_for("/hook", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "delivered after NATS came back");

    // Without Redis the log-writer cannot serve the log index; admin (whose
    // webhooks live in NATS; only its log routes answer 503), the matcher
    // and the deliverer work on and say so.
    stack.redis.stop();
    // (Its index may say so before its Redis check does.)
    stack
        .eventually(
            Duration::from_secs(30),
            "log-writer unready, redis down",
            || async {
                let (status, body) = ready(&stack, "HERALD_LOG_WRITER_HEALTH_ADDR").await;
                (status == 503 && body["checks"]["redis"] == false).then_some(())
            },
        )
        .await;
    for var in [
        "HERALD_ADMIN_HEALTH_ADDR",
        "HERALD_MATCHER_HEALTH_ADDR",
        "HERALD_DELIVERER_HEALTH_ADDR",
    ] {
        let body = stack
            .eventually(Duration::from_secs(10), "redis reported down", || async {
                let (status, body) = ready(&stack, var).await;
                assert_eq!(status, 200, "{var} stays ready without Redis: {body}");
                (body["checks"]["redis"] == false).then_some(body)
            })
            .await;
        assert_eq!(body["ready"], true);
        let metrics = scrape(&stack, var).await;
        assert_eq!(sample(&metrics, "herald_redis_up"), Some(0.0), "{var}");
    }
    stack.redis.restart();
    for var in HEALTH_ADDRS {
        let body = wait_ready_state(&stack, var, 200).await;
        if var != "HERALD_INGEST_HEALTH_ADDR" {
            stack
                .eventually(Duration::from_secs(10), "redis back", || async {
                    let (_, body) = ready(&stack, var).await;
                    (body["checks"]["redis"] == true).then_some(())
                })
                .await;
        } else {
            assert!(
                body["checks"].get("redis").is_none(),
                "ingest uses no Redis"
            );
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_deliveries() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script("/hook", vec![Reply::status(500), Reply::status(200)]);
    hook(&stack, &receiver, json!(["workflow.completed"])).await;

    let deliverer = scrape(&stack, "HERALD_DELIVERER_HEALTH_ADDR").await;
    assert_eq!(
        sample(&deliverer, "herald_delivery_attempt_duration_seconds_count"),
        Some(0.0)
    );

    stack
        .publish("acme", "workflow.completed", json!({"id": "m-1"}))
        .await;
    stack
        .publish("acme", "workflow.unknown_type", json!({"id": "m-2"}))
        .await;
    // First attempt fails, the retry succeeds.
    receiver.wait_for("/hook", 2, Duration::from_secs(10)).await;

    let deliverer = stack
        .eventually(Duration::from_secs(10), "deliverer counters", || async {
            let text = scrape(&stack, "HERALD_DELIVERER_HEALTH_ADDR").await;
            (sample(&text, "herald_deliveries_total{outcome=\"succeeded\"}") == Some(1.0))
                .then_some(text)
        })
        .await;
    assert_eq!(
        sample(&deliverer, "herald_deliveries_total{outcome=\"retrying\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&deliverer, "herald_delivery_attempt_duration_seconds_count"),
        Some(2.0)
    );
    assert_eq!(sample(&deliverer, "herald_redis_up"), Some(1.0));
    for series in [
        "herald_consumer_pending{consumer=\"deliverer\"}",
        "herald_consumer_ack_pending{consumer=\"deliverer\"}",
        "herald_retries_pending",
    ] {
        assert!(
            sample(&deliverer, series).is_some(),
            "{series} in\n{deliverer}"
        );
    }

    let ingest = scrape(&stack, "HERALD_INGEST_HEALTH_ADDR").await;
    assert_eq!(sample(&ingest, "herald_events_ingested_total"), Some(1.0));
    assert_eq!(
        sample(
            &ingest,
            "herald_events_rejected_total{reason=\"unknown_type\"}"
        ),
        Some(1.0),
        "{ingest}"
    );
    assert!(sample(&ingest, "herald_consumer_pending{consumer=\"ingest\"}").is_some());

    let matcher = scrape(&stack, "HERALD_MATCHER_HEALTH_ADDR").await;
    assert_eq!(sample(&matcher, "herald_delivery_jobs_total"), Some(1.0));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_producers_trace_reaches_the_receiver() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    // The first attempt fails, so the trace must also survive a retry.
    receiver.script("/hook", vec![Reply::status(503), Reply::status(200)]);
    hook(&stack, &receiver, json!(["workflow.completed"])).await;

    let producer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // Delivery jobs leave their work-queue stream once done: they are
    // watched as they are published.
    let mut published = stack
        .client
        .subscribe("herald.deliveries.acme.>")
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", producer);
    stack
        .publish_with_headers(
            "acme",
            "workflow.completed",
            json!({"id": "traced"}),
            headers,
        )
        .await;
    // The 503 and the retry's 200 both go to the traced event.
    receiver.wait_for("/hook", 2, Duration::from_secs(10)).await;
    stack
        .publish("acme", "workflow.completed", json!({"id": "untraced"}))
        .await;

    let got = receiver.wait_for("/hook", 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    let of = |id: &str| -> Vec<Option<&str>> {
        got.iter()
            .filter(|r| r.event_id() == id)
            .map(|r| r.header("traceparent"))
            .collect()
    };
    let traced = of("traced");
    assert_eq!(traced.len(), 2, "attempt and retry");
    for traceparent in traced {
        let traceparent = traceparent.expect("traceparent on every POST");
        assert_eq!(trace_id(traceparent), trace_id(producer), "{traceparent}");
    }
    // Without a producer trace and without an exporter, none is invented.
    assert!(of("untraced").iter().all(Option::is_none));

    // The delivery job of the traced event on NATS carried it too.
    let mut jobs = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), published.next()).await
    {
        let job = herald_core::proto::DeliveryJob::decode(message.payload.clone()).unwrap();
        if job.event.as_ref().is_none_or(|e| e.id != "traced") {
            continue;
        }
        let header = message.headers.as_ref().and_then(|h| h.get("traceparent"));
        if job.attempt == 1 && job.deferrals == 0 {
            // The matcher's job.
            let header = header.expect("traceparent on the matcher's job");
            assert_eq!(trace_id(header.as_str()), trace_id(producer));
            jobs += 1;
        } else if let Some(header) = header {
            // A retry fired by a message schedule carries it in the job.
            assert_eq!(trace_id(header.as_str()), trace_id(producer));
        }
    }
    // The retry waited in HERALD_PARKED (the webhook was failing) and was
    // removed from there once sent: its trace is asserted at the receiver.
    assert_eq!(jobs, 1, "the matcher's job carries the trace");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deliverer_stopped_under_load_loses_nothing() {
    const EVENTS: usize = 500;
    let mut stack = Stack::start_with(
        Options::default()
            .env("HERALD_DELIVERY_CONCURRENCY", "10")
            .env("HERALD_RETRY_SCHEDULE", "30s"),
    )
    .await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/hook",
        vec![Reply::status(200).delay(Duration::from_millis(100))],
    );
    hook(&stack, &receiver, json!(["workflow.completed"])).await;

    for i in 0..EVENTS {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("load-{i}")}),
            )
            .await;
    }
    let before = receiver
        .wait_for("/hook", 60, Duration::from_secs(30))
        .await;
    assert!(before.len() < EVENTS / 2, "stopped mid-way");

    // SIGTERM: in-flight deliveries finish, pulled ones are handed back.
    let drained = stack
        .stop_service("deliverer", Duration::from_secs(10))
        .await;
    let at_stop = receiver.received("/hook").len();
    assert!(at_stop < EVENTS, "work was left for the next deliverer");
    stack.start_service("deliverer");

    // Well inside the 60 s ack wait: what was pulled came back at once.
    let ids = stack
        .eventually(Duration::from_secs(30), "every event delivered", || async {
            let ids: HashSet<String> = receiver
                .received("/hook")
                .iter()
                .map(herald_e2e::Received::event_id)
                .collect();
            (ids.len() == EVENTS).then_some(ids)
        })
        .await;
    assert!((0..EVENTS).all(|i| ids.contains(&format!("load-{i}"))));
    let total = receiver.received("/hook").len();
    eprintln!(
        "drained in {drained:?}; {at_stop} delivered before the stop, {total} requests for {EVENTS} events"
    );
    stack.stop().await;
}
