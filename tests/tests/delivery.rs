//! Deliveries out: retries on a server-side schedule with one `webhook-id`,
//! auto-disable, 410, redirects, Retry-After, secret rotation, isolation of
//! slow and dead endpoints, SSRF refusals, and Redis going away.
//!
//! Every scenario runs the whole stack against real NATS and Redis and
//! asserts on what the test receiver saw and on the attempts the deliverer
//! published to `herald.attempts.<org>.<webhook>`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use herald_core::{names, proto, secret, signing};
use herald_e2e::{Options, Receiver, Reply, Stack};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits until `webhook_id` has attempts that `done` accepts.
async fn attempts_until(
    stack: &Stack,
    webhook_id: &str,
    what: &str,
    done: impl Fn(&[proto::AttemptResult]) -> bool,
) -> Vec<proto::AttemptResult> {
    stack
        .eventually(WAIT, what, || async {
            let got = stack.attempts(webhook_id).await;
            done(&got).then_some(got)
        })
        .await
}

/// Messages stored under `filter` in `stream`.
async fn count(stack: &Stack, stream: &str, filter: &str) -> u64 {
    stack.stored_count(stream, filter).await
}

/// The deliverer's durable consumer as the server sees it now.
async fn deliverer_consumer(stack: &Stack) -> async_nats::jetstream::consumer::Info {
    let mut consumer = stack
        .js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            names::DELIVERER_CONSUMER,
            names::DELIVERIES_STREAM,
        )
        .await
        .expect("deliverer consumer");
    consumer.info().await.expect("consumer info").clone()
}

async fn create(stack: &Stack, url: &str, event_type: &str) -> (String, String) {
    let webhook = stack
        .create_webhook(json!({"name": "hook", "url": url, "event_types": [event_type]}))
        .await;
    (
        webhook["id"].as_str().unwrap().to_owned(),
        webhook["secret"].as_str().unwrap().to_owned(),
    )
}

async fn publish(stack: &Stack, event_type: &str, id: &str) {
    stack
        .publish("acme", event_type, json!({"id": id, "data": {"n": id}}))
        .await;
}

fn statuses(attempts: &[proto::AttemptResult]) -> Vec<proto::AttemptStatus> {
    attempts.iter().map(|a| a.status()).collect()
}

fn gap(a: &herald_e2e::Received, b: &herald_e2e::Received) -> Duration {
    b.at.duration_since(a.at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flaky_endpoint_is_retried_to_success_with_one_webhook_id() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/flaky",
        vec![Reply::status(500), Reply::status(500), Reply::status(200)],
    );
    let (id, secret) = create(&stack, &receiver.url("/flaky"), "workflow.completed").await;
    publish(&stack, "workflow.completed", "evt_flaky").await;

    let got = receiver.wait_for("/flaky", 3, WAIT).await;
    assert_eq!(got.len(), 3);
    let delivery_id = got[0].header("webhook-id").unwrap();
    for request in &got {
        assert_eq!(request.header("webhook-id"), Some(delivery_id));
        assert_eq!(request.body, got[0].body, "the same body every time");
        let timestamp = request.timestamp();
        assert!(signing::verify_standard(
            &secret,
            delivery_id,
            timestamp,
            &request.body,
            request.header("webhook-signature").unwrap()
        ));
    }
    // HERALD_RETRY_SCHEDULE is 200ms,400ms,800ms with up to 20% jitter: the
    // server-side schedule fires no sooner, and well within a second after.
    let (first, second) = (gap(&got[0], &got[1]), gap(&got[1], &got[2]));
    eprintln!("retries after {first:?} and {second:?}");
    assert!(
        first >= Duration::from_millis(200) && first < Duration::from_millis(1_200),
        "first retry after {first:?}"
    );
    assert!(
        second >= Duration::from_millis(400) && second < Duration::from_millis(1_400),
        "second retry after {second:?}"
    );

    let attempts = attempts_until(&stack, &id, "three attempts", |a| a.len() == 3).await;
    use proto::AttemptStatus::*;
    assert_eq!(statuses(&attempts), [Retrying, Retrying, Succeeded]);
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.attempt, i as u32 + 1);
        assert_eq!(attempt.delivery_id, delivery_id);
        assert_eq!(attempt.event_id, "evt_flaky");
    }
    assert!(attempts[0].next_attempt_at_ms >= attempts[0].attempted_at_ms + 200);
    assert_eq!(attempts[2].next_attempt_at_ms, 0);
    assert_eq!(attempts[0].error, "HTTP 500");
    assert_eq!(attempts[0].response.as_ref().unwrap().status, 500);
    // The logged request masks the signatures.
    let request = attempts[0].request.as_ref().unwrap();
    assert_eq!(request.url, receiver.url("/flaky"));
    let logged = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.clone())
    };
    assert_eq!(logged("webhook-signature").as_deref(), Some("********"));
    assert_eq!(logged("x-webhook-signature").as_deref(), Some("********"));
    assert_eq!(logged("webhook-id").as_deref(), Some(delivery_id));
    assert_eq!(request.body, got[0].body);

    // Success reset the count: the webhook stays enabled.
    assert_eq!(stack.webhook(&id).await["enabled"], true);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_always_failing_webhook_is_disabled_after_its_fourth_failed_attempt() {
    // A schedule long enough for a fifth attempt, which must not happen.
    let stack = Stack::start_with(Options::default().env(
        "HERALD_RETRY_SCHEDULE",
        "100ms,100ms,100ms,100ms,100ms,100ms",
    ))
    .await;
    let mut disabled_events = stack
        .client
        .subscribe("herald.system.acme.webhook.disabled")
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    receiver.script("/down", vec![Reply::status(500)]);
    let (id, _) = create(&stack, &receiver.url("/down"), "workflow.completed").await;
    publish(&stack, "workflow.completed", "evt_1").await;

    let attempts = attempts_until(&stack, &id, "a final attempt", |a| {
        a.iter().any(|a| a.status() == proto::AttemptStatus::Failed)
    })
    .await;
    use proto::AttemptStatus::*;
    assert_eq!(statuses(&attempts), [Retrying, Retrying, Retrying, Failed]);
    assert_eq!(attempts[3].next_attempt_at_ms, 0, "no fifth attempt");
    assert_eq!(receiver.received("/down").len(), 4);

    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], false);
    let reason = webhook["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("4 consecutive failed attempts"), "{reason}");

    let event = tokio::time::timeout(WAIT, disabled_events.next())
        .await
        .expect("webhook.disabled published")
        .unwrap();
    let event: Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["type"], "webhook.disabled");
    assert_eq!(event["webhook_id"], id.as_str());
    assert_eq!(event["data"]["reason"], reason);

    // A job queued before the webhook was disabled is logged as skipped and
    // never sent; a new event is not even matched.
    publish(&stack, "workflow.completed", "evt_2").await;
    queue_job(&stack, &id, "msg_queued").await;
    let attempts = attempts_until(&stack, &id, "a skipped attempt", |a| a.len() == 5).await;
    assert_eq!(attempts[4].status(), Skipped);
    assert_eq!(attempts[4].event_id, "evt_msg_queued");
    assert!(attempts[4].request.is_none());
    assert_eq!(receiver.received("/down").len(), 4);
    stack.stop().await;
}

/// A delivery job for `webhook_id`, as the matcher would have queued it.
async fn queue_job(stack: &Stack, webhook_id: &str, delivery_id: &str) {
    let event_id = format!("evt_{delivery_id}");
    let job = herald_e2e::delivery_job(webhook_id, delivery_id, &event_id, "workflow.completed");
    stack.publish_jobs(names::delivery_subject, [job]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_queued_for_a_deleted_webhook_are_skipped() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let (id, _) = create(&stack, &receiver.url("/deleted"), "workflow.completed").await;
    // Deleted through the store: the DELETE route is another branch's.
    let store = herald_platform::webhooks::WebhookStore::open(&stack.js, 1)
        .await
        .unwrap();
    let revision = store.get("acme", &id).await.unwrap().unwrap().revision;
    store.delete("acme", &id, revision).await.unwrap();
    stack.wait_deliverer_current().await;
    queue_job(&stack, &id, "msg_after_delete").await;
    let attempts = attempts_until(&stack, &id, "the skipped attempt", |a| !a.is_empty()).await;
    assert_eq!(attempts[0].status(), proto::AttemptStatus::Skipped);
    assert!(attempts[0].request.is_none());
    assert_eq!(receiver.connections(), 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gone_disables_at_once() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script("/gone", vec![Reply::status(410)]);
    let (id, _) = create(&stack, &receiver.url("/gone"), "workflow.completed").await;
    publish(&stack, "workflow.completed", "evt_1").await;

    let attempts = attempts_until(&stack, &id, "the 410 attempt", |a| !a.is_empty()).await;
    assert_eq!(attempts[0].status(), proto::AttemptStatus::Failed);
    assert_eq!(attempts[0].next_attempt_at_ms, 0);
    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], false);
    assert!(
        webhook["disabled_reason"].as_str().unwrap().contains("410"),
        "{webhook}"
    );
    assert_eq!(receiver.received("/gone").len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirects_are_not_followed() {
    let stack = Stack::start_with(Options::default().env("HERALD_DISABLE_AFTER", "1000")).await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/moved",
        vec![Reply::status(302).header("location", &receiver.url("/target"))],
    );
    let (id, _) = create(&stack, &receiver.url("/moved"), "workflow.completed").await;
    publish(&stack, "workflow.completed", "evt_1").await;

    // All four attempts are made and fail; none reaches the target.
    let attempts = attempts_until(&stack, &id, "the final attempt", |a| {
        a.iter().any(|a| a.status() == proto::AttemptStatus::Failed)
    })
    .await;
    assert_eq!(attempts.len(), 4);
    for attempt in &attempts {
        assert_eq!(attempt.response.as_ref().unwrap().status, 302);
        assert!(
            attempt.error.contains("redirects are not followed"),
            "{}",
            attempt.error
        );
    }
    assert_eq!(receiver.received("/moved").len(), 4);
    assert!(receiver.received("/target").is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_is_respected() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/busy",
        vec![
            Reply::status(429).header("retry-after", "2"),
            Reply::status(503).header("retry-after", "1"),
            Reply::status(200),
        ],
    );
    let (id, _) = create(&stack, &receiver.url("/busy"), "workflow.completed").await;
    publish(&stack, "workflow.completed", "evt_1").await;

    let got = receiver.wait_for("/busy", 3, WAIT).await;
    assert_eq!(got.len(), 3);
    // The schedule says 200ms and 400ms; the endpoint asked for 2s and 1s.
    let (first, second) = (gap(&got[0], &got[1]), gap(&got[1], &got[2]));
    assert!(first >= Duration::from_secs(2), "{first:?}");
    assert!(second >= Duration::from_secs(1), "{second:?}");
    assert!(first < Duration::from_secs(4), "{first:?}");
    let attempts = attempts_until(&stack, &id, "three attempts", |a| a.len() == 3).await;
    assert!(attempts[0].next_attempt_at_ms >= attempts[0].attempted_at_ms + 2_000);
    assert_eq!(attempts[2].status(), proto::AttemptStatus::Succeeded);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn during_a_rotation_every_live_secret_signs() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let (id, old_secret) = create(&stack, &receiver.url("/rotating"), "workflow.completed").await;

    // What a rotation stores: a new current secret first, the old one
    // expiring in 24 h, and (here) one that expired already.
    let keyring = secret::Keyring::parse(&stack.env["HERALD_SECRET_KEY"], "").unwrap();
    let store = herald_platform::webhooks::WebhookStore::open(&stack.js, 1)
        .await
        .unwrap();
    let new_secret = secret::generate();
    let expired_secret = secret::generate();
    let aad = names::webhook_key("acme", &id);
    let now = now_ms();
    store
        .modify("acme", &id, |w| {
            let mut old = w.secrets[0].clone();
            old.expires_at_ms = now + 86_400_000;
            let mut expired = keyring.encrypt(&expired_secret, &aad, now - 100_000);
            expired.expires_at_ms = now - 1;
            w.secrets = vec![keyring.encrypt(&new_secret, &aad, now), old, expired];
            true
        })
        .await
        .unwrap()
        .expect("webhook exists");
    publish(&stack, "workflow.completed", "evt_1").await;

    let got = receiver.wait_for("/rotating", 1, WAIT).await;
    let request = &got[0];
    let (msg_id, body) = (request.header("webhook-id").unwrap(), &request.body);
    let timestamp = request.timestamp();
    let signatures = request.header("webhook-signature").unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    for secret in [&new_secret, &old_secret] {
        assert!(signing::verify_standard(
            secret, msg_id, timestamp, body, signatures
        ));
    }
    assert!(!signing::verify_standard(
        &expired_secret,
        msg_id,
        timestamp,
        body,
        signatures
    ));
    // The body-only signature uses the newest secret.
    assert_eq!(
        request.header("x-webhook-signature").unwrap(),
        signing::SigningKey::new(&new_secret).body_signature(body)
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn xml_bodies_and_custom_headers() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let webhook = stack
        .create_webhook(json!({
            "name": "xml", "url": receiver.url("/xml"), "event_types": ["workflow.completed"],
            "format": "xml", "headers": {"X-Tenant": "t-1", "Authorization": "Bearer abc"},
        }))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    publish(&stack, "workflow.completed", "evt_xml").await;

    let got = receiver.wait_for("/xml", 1, WAIT).await;
    let request = &got[0];
    assert_eq!(request.header("content-type"), Some("application/xml"));
    assert_eq!(request.header("x-tenant"), Some("t-1"));
    assert_eq!(request.header("authorization"), Some("Bearer abc"));
    let body = std::str::from_utf8(&request.body).unwrap();
    assert!(body.contains("<id>evt_xml</id>"), "{body}");
    assert!(
        body.contains(&format!("<webhook_id>{id}</webhook_id>")),
        "{body}"
    );

    let attempts = attempts_until(&stack, &id, "the attempt", |a| !a.is_empty()).await;
    let headers = &attempts[0].request.as_ref().unwrap().headers;
    let logged = |name: &str| {
        headers
            .iter()
            .find(|h| h.name == name)
            .unwrap()
            .value
            .clone()
    };
    assert_eq!(logged("x-tenant"), "t-1");
    assert_eq!(logged("authorization"), "********");
    stack.stop().await;
}

/// Publishes one `workflow.completed` event for the healthy webhook and
/// answers how long until the receiver had it.
async fn latency(stack: &Stack, receiver: &Receiver, path: &str, n: usize) -> Duration {
    let started = Instant::now();
    publish(stack, "workflow.completed", &format!("evt_healthy_{n}")).await;
    let got = receiver.wait_for(path, n, WAIT).await;
    assert_eq!(got.len(), n, "healthy delivery {n} arrived");
    got[n - 1].at.duration_since(started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_does_not_slow_a_healthy_one() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_DELIVERY_CONCURRENCY", "16")
            .env("HERALD_ENDPOINT_CONCURRENCY", "4")
            .env("HERALD_SHUTDOWN_GRACE", "500ms"),
    )
    .await;
    let receiver = Receiver::start().await;
    receiver.script("/hang", vec![Reply::hang()]);
    stack
        .create_webhook(json!({
            "name": "hanging", "url": receiver.url("/hang"),
            "event_types": ["workflow.failed"], "timeout_ms": 30000,
        }))
        .await;
    create(&stack, &receiver.url("/healthy"), "workflow.completed").await;

    let mut baseline = Duration::ZERO;
    for n in 1..=5 {
        baseline = baseline.max(latency(&stack, &receiver, "/healthy", n).await);
    }

    // Far more hanging deliveries than the deliverer has slots.
    for i in 0..64 {
        publish(&stack, "workflow.failed", &format!("evt_hang_{i}")).await;
    }
    let hung = receiver.wait_for("/hang", 4, WAIT).await;
    assert_eq!(hung.len(), 4, "the endpoint limit is reached");

    let mut loaded = Duration::ZERO;
    for n in 6..=15 {
        loaded = loaded.max(latency(&stack, &receiver, "/healthy", n).await);
    }
    // Without isolation each would wait for the 30 s timeouts.
    assert!(
        loaded < baseline + Duration::from_secs(2),
        "healthy latency {loaded:?} beside a hanging endpoint, {baseline:?} alone"
    );
    // The endpoint limit holds: never more than 4 requests in flight.
    assert_eq!(receiver.received("/hang").len(), 4);
    eprintln!("healthy latency: alone {baseline:?}, beside a hanging endpoint {loaded:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_deliveries_waiting_for_retry_do_not_slow_a_healthy_webhook() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_RETRY_SCHEDULE", "10m")
            .env("HERALD_DISABLE_AFTER", "1000000")
            .env("HERALD_DELIVERY_CONCURRENCY", "8"),
    )
    .await;
    let receiver = Receiver::start().await;
    // Nothing listens there: every attempt fails at once.
    let dead_url = format!("http://127.0.0.1:{}/dead", herald_test_support::free_port());
    let (dead, _) = create(&stack, &dead_url, "workflow.failed").await;
    create(&stack, &receiver.url("/healthy"), "workflow.completed").await;
    let baseline = latency(&stack, &receiver, "/healthy", 1).await;

    let jobs = (0..1000).map(|i| {
        let (delivery_id, event_id) = (format!("msg_dead_{i}"), format!("evt_dead_{i}"));
        herald_e2e::delivery_job(&dead, &delivery_id, &event_id, "workflow.failed")
    });
    stack.publish_jobs(names::delivery_subject, jobs).await;
    // The first failures make the webhook failing; from then on nothing is
    // sent to it but a probe every 10 minutes, and all 1000 wait parked in
    // HERALD_PARKED, one copy each, none in the consumer's hands
    // (max_ack_pending is 16 here).
    stack
        .eventually(
            Duration::from_secs(60),
            "1000 deliveries parked",
            || async {
                let n = count(
                    &stack,
                    names::PARKED_STREAM,
                    &names::parked_subject("acme", &dead),
                )
                .await;
                (n == 1000).then_some(())
            },
        )
        .await;
    let sent = count(
        &stack,
        names::ATTEMPTS_STREAM,
        &names::attempt_subject("acme", &dead),
    )
    .await;
    assert!(sent <= 8, "only the burst in flight was sent: {sent}");
    let info = deliverer_consumer(&stack).await;
    assert_eq!(info.num_ack_pending, 0, "{info:?}");

    let mut loaded = Duration::ZERO;
    for n in 2..=6 {
        loaded = loaded.max(latency(&stack, &receiver, "/healthy", n).await);
    }
    assert!(
        loaded < baseline + Duration::from_secs(2),
        "healthy latency {loaded:?} with 1000 retries waiting, {baseline:?} before"
    );
    eprintln!("healthy latency: before {baseline:?}, with 1000 retries waiting {loaded:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_targets_are_refused_without_a_connection() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_ALLOW_PRIVATE_TARGETS", "false")
            .env("HERALD_RETRY_SCHEDULE", "10m")
            .env("HERALD_DISABLE_AFTER", "0"),
    )
    .await;
    let receiver = Receiver::start().await;
    let port = receiver.addr().port();
    let urls = [
        format!("http://127.0.0.1:{port}/a"),
        format!("http://localhost:{port}/b"),
        format!("http://2130706433:{port}/c"),
        format!("http://0x7f000001:{port}/d"),
        format!("http://0177.0.0.1:{port}/e"),
        format!("http://127.1:{port}/f"),
        format!("http://[::ffff:127.0.0.1]:{port}/g"),
        format!("http://[::1]:{port}/h"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://0.0.0.0/".to_owned(),
    ];
    let mut ids = Vec::new();
    for url in &urls {
        ids.push(create(&stack, url, "workflow.completed").await.0);
    }
    publish(&stack, "workflow.completed", "evt_ssrf").await;

    for (url, id) in urls.iter().zip(&ids) {
        let attempts = attempts_until(&stack, id, &format!("the refused attempt to {url}"), |a| {
            !a.is_empty()
        })
        .await;
        let attempt = &attempts[0];
        assert!(
            attempt.error.contains("refused to connect"),
            "{url}: {}",
            attempt.error
        );
        assert!(attempt.response.is_none(), "{url}");
        // A refusal is the endpoint's failure: with HERALD_DISABLE_AFTER=0
        // the first one disables.
        let webhook = stack
            .eventually(WAIT, "disabled", || async {
                let w = stack.webhook(id).await;
                (w["enabled"] == false).then_some(w)
            })
            .await;
        assert!(
            webhook["disabled_reason"]
                .as_str()
                .unwrap()
                .contains("refused to connect"),
            "{webhook}"
        );
    }
    assert_eq!(
        receiver.connections(),
        0,
        "no connection reached the receiver"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_deliveries_go_on_and_nothing_is_disabled() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script("/down", vec![Reply::status(500)]);
    let (failing, _) = create(&stack, &receiver.url("/down"), "workflow.failed").await;
    create(&stack, &receiver.url("/healthy"), "workflow.completed").await;

    stack.redis.stop();
    for i in 0..10 {
        publish(&stack, "workflow.completed", &format!("evt_ok_{i}")).await;
    }
    publish(&stack, "workflow.failed", "evt_fail").await;

    let healthy = receiver.wait_for("/healthy", 10, WAIT).await;
    let mut ids: Vec<String> = healthy.iter().map(herald_e2e::Received::event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "every event delivered");

    // Four failed attempts, which with Redis would disable the webhook.
    let attempts = attempts_until(&stack, &failing, "the final attempt", |a| {
        a.iter().any(|a| a.status() == proto::AttemptStatus::Failed)
    })
    .await;
    assert_eq!(attempts.len(), 4);
    assert_eq!(receiver.received("/down").len(), 4);
    assert_eq!(stack.webhook(&failing).await["enabled"], true);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_shutdown_in_flight_deliveries_finish_or_are_handed_back() {
    let stack = Stack::start_with(Options::default().env("HERALD_SHUTDOWN_GRACE", "1s")).await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/slow",
        vec![Reply::status(200).delay(Duration::from_millis(300))],
    );
    receiver.script("/hang", vec![Reply::hang()]);
    let (slow, _) = create(&stack, &receiver.url("/slow"), "workflow.completed").await;
    let (hang, _) = create(&stack, &receiver.url("/hang"), "workflow.failed").await;
    publish(&stack, "workflow.completed", "evt_slow").await;
    publish(&stack, "workflow.failed", "evt_hang").await;
    assert_eq!(receiver.wait_for("/slow", 1, WAIT).await.len(), 1);
    assert_eq!(receiver.wait_for("/hang", 1, WAIT).await.len(), 1);

    // Both are in flight now.
    stack.shutdown.cancel();
    // The one that answers within the grace period is finished and logged.
    let finished = attempts_until(&stack, &slow, "the slow attempt", |a| !a.is_empty()).await;
    assert_eq!(finished[0].status(), proto::AttemptStatus::Succeeded);
    // The other is handed back (a NAK, not left to the 60 s ack wait),
    // with no attempt logged.
    assert!(stack.attempts(&hang).await.is_empty());

    // A deliverer started later makes that attempt at once: nothing was
    // lost, and no attempt was spent.
    receiver.script("/hang", vec![Reply::status(200)]);
    let mut env = stack.env.clone();
    env.insert(herald_deliverer::HEALTH_ADDR.into(), "127.0.0.1:0".into());
    let config = herald_deliverer::Config::from_source(&env).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let deliverer = tokio::spawn(herald_deliverer::run(config, token.clone()));
    let later = attempts_until(&stack, &hang, "the handed-back attempt", |a| !a.is_empty()).await;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].attempt, 1, "handing back spends no attempt");
    assert_eq!(later[0].status(), proto::AttemptStatus::Succeeded);
    assert_eq!(receiver.received("/hang").len(), 2);
    token.cancel();
    deliverer.await.unwrap().unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_endpoint_times_out_and_a_long_answer_is_kept_to_8_kib() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.script(
        "/slow",
        vec![
            Reply::status(200).delay(Duration::from_secs(3)),
            Reply::status(500).body(&"x".repeat(20_000)),
            Reply::status(200),
        ],
    );
    let slow = stack
        .create_webhook(json!({
            "name": "slow", "url": receiver.url("/slow"),
            "event_types": ["workflow.completed"], "timeout_ms": 300,
        }))
        .await;
    let id = slow["id"].as_str().unwrap().to_owned();
    publish(&stack, "workflow.completed", "evt_slow").await;

    let attempts = attempts_until(&stack, &id, "three attempts", |a| a.len() == 3).await;
    use proto::AttemptStatus::*;
    assert_eq!(statuses(&attempts), [Retrying, Retrying, Succeeded]);
    assert!(
        attempts[0].error.contains("timed out after 300ms"),
        "{}",
        attempts[0].error
    );
    assert!(attempts[0].response.is_none());
    assert!(
        attempts[0].duration_ms < 2_000,
        "{}",
        attempts[0].duration_ms
    );
    let long = attempts[1].response.as_ref().unwrap();
    assert_eq!(long.status, 500);
    assert_eq!(long.body.len(), herald_deliverer::BODY_CAP);
    assert!(long.body_truncated);
    stack.stop().await;
}
