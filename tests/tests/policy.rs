//! The delivery policy end to end (PRODUCT.md, "Deliveries out"): a
//! receiver that throttles gets everything at the pace it asks for; one that
//! blips gets everything once it is back, after a few probes, not hundreds
//! of requests; one that is dead is disabled after exactly
//! `HERALD_DISABLE_AFTER`+1 failed probes, with `webhook.disabled` delivered
//! to another webhook of the organization and the waiting deliveries logged
//! failed `webhook_disabled`. Herald's own failures (a resolver that hangs
//! or fails) spend nothing; what cannot be processed goes to the dead
//! letters, never loops, and can be redriven.

use std::collections::HashSet;
use std::time::Duration;

use herald_admin::dead_letters::{self, CommandError};
use herald_core::{names, proto};
use herald_e2e::{Options, Received, Receiver, Reply, Stack};
use prost::Message;
use serde_json::{Value, json};

async fn create(stack: &Stack, url: &str, event_types: &[&str]) -> String {
    let webhook = stack
        .create_webhook(json!({"name": "hook", "url": url, "event_types": event_types}))
        .await;
    webhook["id"].as_str().unwrap().to_owned()
}

async fn burst(stack: &Stack, prefix: &str, n: usize) {
    for i in 0..n {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("{prefix}_{i}"), "data": {"i": i}}),
            )
            .await;
    }
}

/// The distinct event ids `path` received.
fn distinct(receiver: &Receiver, path: &str) -> HashSet<String> {
    receiver
        .received(path)
        .iter()
        .filter(|r| r.header("webhook-id").is_some())
        .map(Received::event_id)
        .collect()
}

async fn all_arrive(stack: &Stack, receiver: &Receiver, path: &str, n: usize, within: Duration) {
    stack
        .eventually(within, "every event delivered", || async {
            (distinct(receiver, path).len() == n).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_receiver_gets_every_event_at_its_pace_and_stays_enabled() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    receiver.rate_limit("/limited", 10.0);
    let id = create(&stack, &receiver.url("/limited"), &["workflow.completed"]).await;

    burst(&stack, "evt_burst", 60).await;
    all_arrive(&stack, &receiver, "/limited", 60, Duration::from_secs(60)).await;
    // Arrived is not accepted: wait until every delivery got its 200.
    stack
        .eventually(Duration::from_secs(60), "every event accepted", || async {
            (receiver.answered("/limited", 200) >= 60).then_some(())
        })
        .await;

    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    let ok = receiver.answered("/limited", 200);
    let throttled = receiver.answered("/limited", 429);
    eprintln!("60 events to a 10/s receiver: {ok} accepted, {throttled} throttled");
    // The first burst overshoots (32 in flight at once); afterwards the
    // paused, halved in-flight limit keeps most requests within the limit.
    assert!(
        throttled < 60,
        "{throttled} throttled answers for 60 events"
    );
    // Every throttled answer is one log entry: an attempt whose endpoint
    // state change loses to the burst's others is concluded, not sent again
    // (which logged one entry for two answers, under one log id).
    stack
        .eventually(
            Duration::from_secs(30),
            "every throttled answer in the log",
            || async {
                let logged = stack
                    .attempts(&id)
                    .await
                    .iter()
                    .filter(|a| a.status() == proto::AttemptStatus::Throttled)
                    .count();
                let throttled = receiver.answered("/limited", 429);
                if logged != throttled {
                    eprintln!("{logged} throttled attempts logged, {throttled} answered");
                }
                (logged == throttled).then_some(())
            },
        )
        .await;
    // Throttling spends no attempt: every delivery succeeded on attempt 1.
    assert!(
        stack
            .attempts(&id)
            .await
            .iter()
            .filter(|a| a.status() == proto::AttemptStatus::Succeeded)
            .all(|a| a.attempt == 1)
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_asking_for_no_pause_gets_a_request_a_second_at_most_and_stays_enabled() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    // `Retry-After: 0` to every request, forever (a date in the past parses
    // the same): once, this was a hot loop of some 40 requests a second.
    receiver.script("/zero", vec![Reply::status(429).header("retry-after", "0")]);
    let id = create(&stack, &receiver.url("/zero"), &["workflow.completed"]).await;

    const EVENTS: usize = 10;
    burst(&stack, "evt_zero", EVENTS).await;
    let first = receiver.wait_for("/zero", 1, Duration::from_secs(20)).await[0].at;
    // Watch it for 7 s after the first request.
    const WATCH: Duration = Duration::from_secs(7);
    tokio::time::sleep_until((first + WATCH).into()).await;
    let times: Vec<_> = receiver
        .received("/zero")
        .iter()
        .map(|r| r.at.duration_since(first))
        .filter(|at| *at <= WATCH)
        .collect();
    let burst = times
        .iter()
        .filter(|at| **at < Duration::from_secs(1))
        .count();
    let after = times.len() - burst;
    eprintln!(
        "{EVENTS} events to a `429 Retry-After: 0` receiver: {burst} requests in the first second, {after} in the next 6 s"
    );
    // The first second is the burst already in flight (at most one per
    // event); after it, at most one and a half a second on average, on a
    // loaded machine (the floor and backoff make it 1 s, 2 s, 4 s apart,
    // a round being the first request after a pause and whatever left with
    // it before its answer came back).
    assert!(burst <= EVENTS, "{burst} requests in the first second");
    assert!(
        after <= 9,
        "{after} requests in the 6 s after the first second: a hot loop"
    );
    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    assert_eq!(webhook["state"], "throttled", "{webhook}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_failing_for_seconds_gets_the_whole_burst_after_a_few_probes() {
    // A 10 s blip; the schedule's first three steps span 14 s, so the URL is
    // back within them.
    let stack =
        Stack::start_with(Options::default().env("HERALD_RETRY_SCHEDULE", "2s,4s,8s,16s")).await;
    let receiver = Receiver::start().await;
    receiver.fail_for("/blip", 500, Duration::from_secs(10));
    let id = create(&stack, &receiver.url("/blip"), &["workflow.completed"]).await;

    burst(&stack, "evt_blip", 300).await;
    all_arrive(&stack, &receiver, "/blip", 300, Duration::from_secs(60)).await;

    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    let failed = receiver.answered("/blip", 500);
    eprintln!("300 events to a URL failing for 10 s: {failed} failed requests");
    assert!(
        failed <= 40,
        "{failed} failed requests: the breaker should have held them"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_receiver_is_disabled_after_its_probes_and_nothing_is_thrown_away() {
    let stack = Stack::start_with(
        Options::default()
            // Probes two seconds apart: the 20 deliveries published once
            // it is failing have seconds to park before it is disabled,
            // however loaded the machine.
            .env("HERALD_RETRY_SCHEDULE", "2s,2s,2s,2s,2s,2s")
            .env("HERALD_DISABLE_AFTER", "2"),
    )
    .await;
    let receiver = Receiver::start().await;
    receiver.fail_for("/dead", 500, Duration::from_secs(3600));
    let dead = create(&stack, &receiver.url("/dead"), &["workflow.completed"]).await;
    // Another webhook of the organization subscribes to Herald's own events.
    let ops = create(&stack, &receiver.url("/ops"), &["webhook.*"]).await;

    // One event first: its attempts are the probes.
    burst(&stack, "evt_first", 1).await;
    stack
        .wait_webhook(&dead, "state", json!("failing"), Duration::from_secs(20))
        .await;
    // Then more, which wait parked behind it.
    burst(&stack, "evt_waiting", 20).await;
    stack
        .eventually(Duration::from_secs(10), "20 deliveries parked", || async {
            let stream = stack.js.get_stream(names::PARKED_STREAM).await.unwrap();
            let mut stream = stream;
            let n = stream
                .info()
                .await
                .map(|i| i.state.messages)
                .unwrap_or_default();
            (n >= 20).then_some(())
        })
        .await;
    stack
        .wait_webhook(&dead, "enabled", json!(false), Duration::from_secs(30))
        .await;
    // HERALD_DISABLE_AFTER 2: the third failed probe disables it (the first
    // failure counting as the first probe).
    assert_eq!(receiver.answered("/dead", 500), 3);
    let webhook = stack.webhook(&dead).await;
    assert_eq!(webhook["state"], "disabled");
    assert!(
        webhook["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("3 consecutive failed attempts"),
        "{webhook}"
    );

    // The ops webhook got webhook.failing and webhook.disabled about it;
    // the webhook itself got no system event about itself.
    let ops_got = |event_type: &str| {
        receiver
            .received("/ops")
            .iter()
            .any(|r| r.event_type() == event_type)
    };
    stack
        .eventually(
            Duration::from_secs(20),
            "system events delivered",
            || async { (ops_got("webhook.failing") && ops_got("webhook.disabled")).then_some(()) },
        )
        .await;
    for r in receiver.received("/ops") {
        let body = r.json();
        assert_eq!(body["attributes"]["webhook"], dead.as_str(), "{body}");
    }
    assert!(
        receiver
            .received("/dead")
            .iter()
            .all(|r| !r.event_type().starts_with("webhook.")),
        "no system event about itself"
    );

    // Nothing is thrown away: every event is in the log as failed
    // `webhook_disabled`, where recover finds it.
    stack
        .eventually(
            Duration::from_secs(20),
            "waiting deliveries logged",
            || async {
                let ended: HashSet<_> = stack
                    .attempts(&dead)
                    .await
                    .into_iter()
                    .filter(|a| {
                        (a.status() == proto::AttemptStatus::Failed
                            && a.failure_reason == "webhook_disabled")
                            || a.status() == proto::AttemptStatus::Skipped
                    })
                    .map(|a| a.event_id)
                    .collect();
                (ended.len() == 21).then_some(())
            },
        )
        .await;
    let disabled_logged = stack
        .attempts(&dead)
        .await
        .iter()
        .filter(|a| a.failure_reason == "webhook_disabled")
        .count();
    assert!(
        disabled_logged >= 1,
        "the probe that disabled it and those parked"
    );
    let _ = ops;
    stack.stop().await;
}

/// A resolver that hangs on the first lookup, fails (SERVFAIL-like) on the
/// second and answers loopback after that.
struct FlakyResolver {
    calls: std::sync::atomic::AtomicUsize,
}

impl herald_deliverer::guard::Lookup for FlakyResolver {
    fn lookup(&self, _host: &str) -> herald_deliverer::guard::LookupFuture {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            match call {
                0 => std::future::pending().await,
                1 => Err(std::io::Error::other(
                    "Temporary failure in name resolution",
                )),
                _ => Ok(vec![std::net::Ipv4Addr::LOCALHOST.into()]),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resolver_that_hangs_or_fails_is_heralds_failure_and_spends_nothing() {
    // With HERALD_DISABLE_AFTER=0 any failure counted against the webhook
    // would disable it, and a one-step schedule leaves no attempt to spend.
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_DISABLE_AFTER", "0")
            .env("HERALD_RETRY_SCHEDULE", "200ms")
            .resolver(FlakyResolver {
                calls: Default::default(),
            }),
    )
    .await;
    let receiver = Receiver::start().await;
    let url = format!("http://hook.example:{}/dns", receiver.addr().port());
    let id = create(&stack, &url, &["workflow.completed"]).await;

    burst(&stack, "evt_dns", 1).await;
    all_arrive(&stack, &receiver, "/dns", 1, Duration::from_secs(30)).await;

    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    assert_eq!(webhook["state"], "healthy", "{webhook}");
    let got = stack
        .eventually(Duration::from_secs(10), "the success logged", || async {
            let got = stack.attempts(&id).await;
            got.iter()
                .any(|a| a.status() == proto::AttemptStatus::Succeeded)
                .then_some(got)
        })
        .await;
    let success = got
        .iter()
        .find(|a| a.status() == proto::AttemptStatus::Succeeded)
        .unwrap();
    assert_eq!(
        success.attempt, 1,
        "no attempt of the schedule spent: {got:?}"
    );
    let (_, metrics) = stack
        .get(&stack.health_url("HERALD_DELIVERER_HEALTH_ADDR", "/metrics"))
        .await
        .unwrap();
    let herald_failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_herald_failures_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("herald_failures metric in {metrics}"));
    assert!(
        herald_failures >= 2,
        "both resolver failures counted: {metrics}"
    );
    stack.stop().await;
}

/// A resolver that fails (SERVFAIL-like) until it is mended, noting when
/// it was asked.
#[derive(Clone, Default)]
struct BrokenResolver {
    asked: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    mended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl herald_deliverer::guard::Lookup for BrokenResolver {
    fn lookup(&self, _host: &str) -> herald_deliverer::guard::LookupFuture {
        self.asked.lock().unwrap().push(std::time::Instant::now());
        let mended = self.mended.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if mended {
                Ok(vec![std::net::Ipv4Addr::LOCALHOST.into()])
            } else {
                Err(std::io::Error::other(
                    "Temporary failure in name resolution",
                ))
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heralds_own_failures_back_off_unlogged_and_go_to_the_dead_letters_after_the_give_up_time()
{
    let resolver = BrokenResolver::default();
    // Given up after 3 s of trying: the waits are 1.5–2.5 s, then 3–5 s,
    // so the third failure (4.5–7.5 s after the first) is the last.
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_OWN_FAILURE_GIVE_UP", "3s")
            .resolver(resolver.clone()),
    )
    .await;
    let receiver = Receiver::start().await;
    let url = format!("http://hook.example:{}/own", receiver.addr().port());
    let id = create(&stack, &url, &["workflow.completed"]).await;

    burst(&stack, "evt_own", 1).await;
    let letter = stack
        .eventually(Duration::from_secs(30), "a dead letter", || async {
            // (Listing an empty stream is an error.)
            herald_platform::dead_letters::list(&stack.js, 0, 10)
                .await
                .unwrap_or_default()
                .into_iter()
                .next()
        })
        .await;
    assert_eq!(letter.stream, names::DELIVERIES_STREAM, "{letter:?}");
    assert!(
        letter.reason.starts_with("herald's own failure for ")
            && letter.reason.contains("resolver"),
        "{letter:?}"
    );
    // It backed off: each wait at least the lower end of its step (a
    // fixed 2–5 s retry, as before, would not give up for the delivery's
    // whole deadline, some 51 hours).
    let asked = resolver.asked.lock().unwrap().clone();
    let gaps: Vec<_> = asked.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("resolver asked {} times, {gaps:?} apart", asked.len());
    assert!(
        (2..=4).contains(&asked.len()),
        "asked {} times before giving up",
        asked.len()
    );
    assert!(gaps[0] >= Duration::from_millis(1_400), "{gaps:?}");
    assert!(
        asked[asked.len() - 1] - asked[0] >= Duration::from_secs(3),
        "{gaps:?}"
    );
    // Not the receiver's attempts: nothing logged, nothing counted against
    // the webhook.
    assert!(stack.attempts(&id).await.is_empty());
    let webhook = stack.webhook(&id).await;
    assert_eq!(webhook["enabled"], true, "{webhook}");
    assert_eq!(webhook["state"], "healthy", "{webhook}");
    let failures = stack
        .metric(
            "HERALD_DELIVERER_HEALTH_ADDR",
            "herald_herald_failures_total",
        )
        .await
        .unwrap_or_default();
    assert!(failures >= asked.len() as f64, "{failures}");

    // Redriven once Herald is well again, it is delivered, as a new start
    // (the failures it carried are forgotten).
    resolver
        .mended
        .store(true, std::sync::atomic::Ordering::SeqCst);
    herald_platform::dead_letters::redrive(&stack.js, letter.seq)
        .await
        .unwrap();
    receiver.wait_for("/own", 1, Duration::from_secs(20)).await;
    stack
        .eventually(Duration::from_secs(10), "the success logged", || async {
            let got = stack.attempts(&id).await;
            (got.len() == 1 && got[0].status() == proto::AttemptStatus::Succeeded).then_some(())
        })
        .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_too_large_to_log_in_full_is_posted_once_and_logged() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let webhook = stack
        .create_webhook(json!({"name": "xml", "url": receiver.url("/xml"),
            "event_types": ["workflow.completed"], "format": "xml"}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    // ~240 KB of zeros: its XML rendering is about 7× that, over what NATS
    // accepts in one message.
    let zeros = vec![0; 120_000];
    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": "evt_big", "data": {"zeros": zeros}}),
        )
        .await;
    receiver.wait_for("/xml", 1, Duration::from_secs(20)).await;
    let got = stack
        .eventually(Duration::from_secs(20), "the attempt logged", || async {
            let got = stack.attempts(&id).await;
            (!got.is_empty()).then_some(got)
        })
        .await;
    // Long enough for a loop to show (the old one re-POSTed every second).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.received("/xml").len(), 1, "posted once");
    let logged = &got[0];
    assert_eq!(logged.status(), proto::AttemptStatus::Succeeded);
    let request = logged.request.as_ref().expect("request recorded");
    assert!(request.body_truncated, "body cut to the log limit");
    assert!(request.body_size > 1_000_000, "{}", request.body_size);
    assert!(request.body.len() <= 64 * 1024, "{}", request.body.len());
    assert_eq!(stack.attempts(&id).await.len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_cannot_be_processed_is_dead_lettered_listed_and_redriven() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    create(&stack, &receiver.url("/dead"), &["workflow.completed"]).await;
    let src = stack.env.clone();
    let tool = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let src = src.clone();
        async move { dead_letters::run(&args, &src).await }
    };

    // Garbage where the matcher reads accepted events: dead-lettered, once.
    let ack = stack
        .js
        .publish(
            names::accepted_subject("acme"),
            "not protobuf \u{1}\u{2}".into(),
        )
        .await
        .unwrap();
    ack.await.unwrap();
    let listed = stack
        .eventually(Duration::from_secs(10), "a dead letter", || async {
            let out = tool(&["list"]).await.unwrap();
            (!out.is_empty()).then_some(out)
        })
        .await;
    let letter: Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(letter["stream"], names::ACCEPTED_STREAM, "{letter}");
    assert_eq!(
        letter["subject"],
        names::accepted_subject("acme"),
        "{letter}"
    );
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .starts_with("undecodable accepted event"),
        "{letter}"
    );
    let seq = letter["seq"].as_u64().unwrap().to_string();
    assert_eq!(
        tool(&["discard", &seq]).await.unwrap(),
        format!("discarded {seq}\n")
    );
    assert_eq!(tool(&["list"]).await.unwrap(), "");
    assert!(
        tool(&["discard", &seq])
            .await
            .unwrap_err()
            .to_string()
            .contains("no dead letter")
    );
    let usage = tool(&["frobnicate"]).await.unwrap_err();
    assert!(matches!(usage, CommandError::Usage(_)), "{usage}");
    assert!(usage.to_string().contains("usage"));

    // A good event that had been dead-lettered is delivered once redriven.
    let event = proto::Event {
        id: "evt_redriven".into(),
        organization_id: "acme".into(),
        r#type: "workflow.completed".into(),
        occurred_at_ms: 1,
        received_at_ms: 1,
        data_json: b"{}".as_slice().into(),
        ..Default::default()
    };
    herald_platform::dead_letters::send(
        &stack.js,
        names::ACCEPTED_STREAM,
        &names::accepted_subject("acme"),
        event.encode_to_vec().into(),
        "test",
    )
    .await
    .unwrap();
    let out = tool(&["redrive", "all"]).await.unwrap();
    assert!(out.starts_with("redriven "), "{out}");
    let got = receiver.wait_for("/dead", 1, Duration::from_secs(10)).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].body).unwrap()["id"],
        "evt_redriven"
    );
    assert_eq!(tool(&["list"]).await.unwrap(), "");
    stack.stop().await;
}

#[tokio::test]
async fn logging_a_throttled_answer_costs_the_same_whatever_the_deliverys_history() {
    use herald_platform::log_index::{LogIndex, Query, Stored};
    let server = herald_test_support::RedisServer::start();
    let redis = herald_platform::redis::Redis::new(&server.url(), Duration::from_secs(2)).unwrap();
    let index = LogIndex::new(redis, Duration::from_secs(30));
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lookup = "herald:logs:{acme}:h2:wh_1";
    let delivery = herald_core::ids::delivery_id("acme", "evt_1", "wh_1");
    let now = herald_platform::now_ms();
    let throttled = |n: u32, at: i64| Stored {
        attempt: proto::AttemptResult {
            log_id: herald_core::ids::throttled_log_id(&delivery, 1, n),
            delivery_id: delivery.clone(),
            organization_id: "acme".into(),
            webhook_id: "wh_1".into(),
            event_id: "evt_1".into(),
            event_type: "workflow.completed".into(),
            attempt: 1,
            attempted_at_ms: at,
            status: proto::AttemptStatus::Throttled as i32,
            ..Default::default()
        },
        seq: n.into(),
    };
    let count = |q: Query| {
        let index = &index;
        async move { index.page(&q).await.unwrap().total.unwrap() }
    };
    let by_delivery = || Query {
        org: "acme".into(),
        webhook_id: Some("wh_1".into()),
        delivery_id: Some(delivery.clone()),
        limit: 10,
        ..Default::default()
    };
    // 300 throttled answers to one delivery, one write each (as a quiet
    // log-writer makes them); the first 200 about to leave the retention.
    for n in 1..=300u32 {
        let at = if n <= 200 {
            now - 25_000 + i64::from(n)
        } else {
            now + i64::from(n)
        };
        index.write(&[throttled(n, at)]).await.unwrap();
    }
    // What a write rewrites is bounded: no field of the lookup hash grows
    // with the delivery's history (it held 6 bytes per answer, each write
    // reading and rewriting them all).
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(lookup)
        .query_async(&mut conn)
        .await
        .unwrap();
    let longest = fields.iter().map(|(_, v)| v.len()).max().unwrap();
    assert!(longest <= 64 * 6, "a field of {longest} bytes");
    // And every answer is still found by its delivery, and by its log id.
    assert_eq!(count(by_delivery()).await, 300);
    let first = index
        .get(
            "acme",
            "wh_1",
            &herald_core::ids::throttled_log_id(&delivery, 1, 1),
        )
        .await
        .unwrap();
    assert!(first.is_some(), "the first throttled answer by its log id");

    // Once the first 200 are out of the retention, the next write trims
    // them and the chunks that held them: nothing is left behind.
    let wait = now + 5_500 - herald_platform::now_ms();
    tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
    index
        .write(&[throttled(301, herald_platform::now_ms())])
        .await
        .unwrap();
    assert_eq!(count(by_delivery()).await, 101);
    let fields: usize = redis::cmd("HLEN")
        .arg(lookup)
        .query_async(&mut conn)
        .await
        .unwrap();
    // 201–255 in the chunk of 192–255, 256–301 in the next, and the
    // delivery's highest chunk.
    assert_eq!(fields, 3);
}
