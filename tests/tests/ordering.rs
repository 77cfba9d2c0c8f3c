//! Ordered delivery per key against real NATS, Redis and HTTP: the events
//! of each execution reach an ordered webhook one at a time, in the order
//! published, with gapless `webhook-sequence` numbers — through random
//! failures (the webhook failing and probed), throttling and a deliverer
//! killed mid-load beside another — while an unordered webhook beside it
//! gets the same events in parallel.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_e2e::{Options, Received, Receiver, Reply, Stack};
use serde_json::json;

const ORG: &str = "acme";
const EXECUTIONS: usize = 2_000;
/// Each execution's events, in the order they are published.
const STEPS: [&str; 5] = [
    "workflow.started",
    "workflow.step.started",
    "workflow.step.completed",
    "workflow.step.started",
    "workflow.completed",
];

fn options() -> Options {
    Options::default()
        // Enough attempts that one failing 10% of the time never runs out
        // (10^-9 each), quick enough for the test; the last step, never
        // reached, gives each delivery a deadline past the minute the
        // killed deliverer's jobs wait for their ack wait (a delivery past
        // its deadline fails, and its key moves on).
        .env(
            "HERALD_RETRY_SCHEDULE",
            "100ms,200ms,300ms,300ms,300ms,300ms,300ms,300ms,5m",
        )
        // Failing and probed over and over, never disabled.
        .env("HERALD_DISABLE_AFTER", "1000000")
}

/// Publishes every execution's events, interleaved (step 0 of every
/// execution, then step 1 of every execution…), many in flight.
async fn publish_interleaved(stack: &Stack) {
    let mut acks = Vec::new();
    for (step, event_type) in STEPS.iter().enumerate() {
        let subject = format!("herald.events.{ORG}.{event_type}");
        for ex in 0..EXECUTIONS {
            let body = json!({
                "id": format!("ex{ex}_s{step}"),
                "attributes": {"execution": format!("ex-{ex}")},
                "data": {"step": step},
            })
            .to_string();
            acks.push(
                stack
                    .js
                    .publish(subject.clone(), body.into())
                    .await
                    .expect("publish"),
            );
            if acks.len() == 1_000 {
                for ack in acks.drain(..) {
                    ack.await.expect("ack");
                }
            }
        }
    }
    for ack in acks {
        ack.await.expect("ack");
    }
}

/// `<event id>#<webhook-sequence>` of each request, in the order received.
fn event_and_sequence(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| {
            let sequence = r.header("webhook-sequence").unwrap_or("none");
            format!("{}#{sequence}", r.event_id())
        })
        .collect()
}

/// (execution, step) of a received event.
fn place(r: &Received) -> (usize, usize) {
    let id = r.event_id();
    let (ex, step) = id
        .strip_prefix("ex")
        .and_then(|rest| rest.split_once("_s"))
        .expect("an id of this test");
    (ex.parse().expect("execution"), step.parse().expect("step"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_execution_arrives_in_order_through_failures_throttling_and_a_killed_deliverer() {
    let mut stack = Stack::start_with(options()).await;
    let receiver = Receiver::start().await;
    // Two deliverers.
    let second = stack.start_service("deliverer");
    let ordered = stack
        .create_webhook(json!({
            "name": "ordered",
            "url": receiver.url("/ordered"),
            "event_types": ["workflow.>"],
            "ordering": {"key": "execution"},
        }))
        .await;
    assert_eq!(ordered["ordering"]["key"], "execution");
    stack
        .create_webhook(json!({
            "name": "plain",
            "url": receiver.url("/plain"),
            "event_types": ["workflow.>"],
        }))
        .await;
    receiver.script(
        "/plain",
        vec![Reply::status(200).delay(Duration::from_millis(5))],
    );
    receiver.fail_randomly("/ordered", 500, 10);
    stack.wait_deliverer_current().await;

    let total = EXECUTIONS * STEPS.len();
    let publishing = publish_interleaved(&stack);
    let delivered = |path: &'static str| {
        let receiver = receiver.clone();
        move || {
            let receiver = receiver.clone();
            async move {
                receiver
                    .all()
                    .iter()
                    .filter(|r| r.path == path && r.status == 200)
                    .map(|r| r.event_id())
                    .collect::<HashSet<_>>()
                    .len()
            }
        }
    };
    let faults = async {
        // A while in, the receiver throttles for 3 s…
        stack
            .eventually(Duration::from_secs(120), "a tenth delivered", || async {
                (delivered("/ordered")().await >= total / 10).then_some(())
            })
            .await;
        receiver.rate_limit("/ordered", 100.0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        receiver.fail_randomly("/ordered", 500, 10);
        // …and one deliverer dies with jobs in hand (its jobs come back to
        // the other after their ack wait).
        stack
            .eventually(Duration::from_secs(120), "a third delivered", || async {
                (delivered("/ordered")().await >= total / 3).then_some(())
            })
            .await;
    };
    tokio::join!(publishing, faults);
    let killed = stack.kill_replica(second).await;
    assert!(killed.is_err_and(|e| e.is_cancelled()), "killed mid-load");

    stack
        .eventually(
            Duration::from_secs(240),
            "every event at both webhooks",
            || async {
                (delivered("/ordered")().await == total && delivered("/plain")().await == total)
                    .then_some(())
            },
        )
        .await;

    // Every execution's requests, in the order received: one step at a
    // time (a step sent again — a retry, or a redelivery after the kill —
    // comes before the next, never after it), with its sequence.
    let received: Vec<Received> = receiver.received("/ordered");
    let mut by_execution: HashMap<usize, Vec<(usize, u64, String)>> = HashMap::new();
    for r in &received {
        let (ex, step) = place(r);
        let sequence: u64 = r
            .header("webhook-sequence")
            .expect("an ordered delivery carries webhook-sequence")
            .parse()
            .expect("a number");
        assert_eq!(
            r.header("webhook-ordering-key"),
            Some(format!("ex-{ex}").as_str())
        );
        by_execution.entry(ex).or_default().push((
            step,
            sequence,
            r.header("webhook-id").unwrap_or_default().to_owned(),
        ));
    }
    assert_eq!(by_execution.len(), EXECUTIONS);
    let mut sent_again = 0;
    for (ex, requests) in &by_execution {
        let steps: Vec<usize> = requests.iter().map(|(s, _, _)| *s).collect();
        assert!(
            steps.windows(2).all(|w| w[0] <= w[1]),
            "execution {ex} out of order: {steps:?}"
        );
        let distinct: HashSet<usize> = steps.iter().copied().collect();
        assert_eq!(distinct.len(), STEPS.len(), "execution {ex}: none lost");
        for (step, sequence, _) in requests {
            assert_eq!(
                *sequence,
                *step as u64 + 1,
                "execution {ex}: gapless sequences from 1"
            );
        }
        sent_again += steps.len() - STEPS.len();
    }
    // Each event succeeded once at least; the delivery ids are each one
    // event's.
    let ok_ids: HashSet<&str> = received
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(ok_ids.len(), total);

    // The unordered webhook got the same events without sequences, many at
    // once; the ordered one many keys at once too.
    let plain = receiver.received("/plain");
    assert!(plain.iter().all(|r| r.header("webhook-sequence").is_none()));
    let (plain_busy, ordered_busy) = (
        receiver.max_in_flight("/plain"),
        receiver.max_in_flight("/ordered"),
    );
    eprintln!(
        "{total} events: ordered sent {} requests ({sent_again} again: retries and redeliveries), \
         {} answered 500, {} answered 429; at most {ordered_busy} in flight at once (ordered), \
         {plain_busy} (unordered)",
        received.len(),
        receiver.answered("/ordered", 500),
        receiver.answered("/ordered", 429),
    );
    assert!(
        plain_busy >= 8,
        "the unordered webhook in parallel: {plain_busy}"
    );
    // (The ordered webhook spends most of the run failing and probed, one
    // request at a time, since a tenth of its answers fail.)
    assert!(
        ordered_busy >= 2,
        "different keys in parallel: {ordered_busy}"
    );
    assert!(receiver.answered("/ordered", 429) > 0, "it was throttled");

    // Nothing left waiting.
    let status = stack
        .eventually(Duration::from_secs(30), "no key waiting", || async {
            let w = stack.webhook(ordered["id"].as_str().unwrap()).await;
            (w["ordering_status"]["keys_waiting"] == 0).then_some(w)
        })
        .await;
    assert!(status["ordering_status"]["oldest"].is_null());
    stack.stop().await;
}

/// A delivery that gives up moves its key on by default (the next goes,
/// the given-up one is logged failed and recoverable); a webhook that holds
/// its keys keeps the next waiting until the given-up one is recovered,
/// and shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_up_delivery_moves_its_key_on_or_holds_it() {
    let stack = Stack::start_with(Options::default().env("HERALD_RETRY_SCHEDULE", "100ms")).await;
    let receiver = Receiver::start().await;
    let mut webhooks = Vec::new();
    for (path, on_failure) in [("/skip", "skip"), ("/hold", "hold")] {
        let w = stack
            .create_webhook(json!({
                "name": path,
                "url": receiver.url(path),
                "event_types": ["workflow.>"],
                "ordering": {"key": "execution", "on_failure": on_failure},
            }))
            .await;
        assert_eq!(w["ordering"]["on_failure"], on_failure);
        // The first event fails for good (its two attempts answered 500),
        // the rest succeed.
        receiver.script(
            path,
            vec![Reply::status(500), Reply::status(500), Reply::status(200)],
        );
        webhooks.push(w);
    }
    stack.wait_deliverer_current().await;
    for (i, t) in ["workflow.started", "workflow.completed"]
        .iter()
        .enumerate()
    {
        stack
            .publish(
                ORG,
                t,
                json!({"id": format!("e{i}"), "attributes": {"execution": "ex-1"}}),
            )
            .await;
    }
    // Skip: the first gives up after its two attempts, the second goes.
    let skip = receiver.wait_for("/skip", 3, Duration::from_secs(30)).await;
    assert_eq!(event_and_sequence(&skip), ["e0#1", "e0#1", "e1#2"]);
    // Hold: the first gives up, the second waits, shown on the webhook.
    let hold_id = webhooks[1]["id"].as_str().unwrap().to_owned();
    let shown = stack
        .eventually(Duration::from_secs(30), "the key held", || async {
            let w = stack.webhook(&hold_id).await;
            (w["ordering_status"]["oldest"]["held"] == true).then_some(w)
        })
        .await;
    assert_eq!(shown["ordering_status"]["keys_waiting"], 1);
    assert_eq!(shown["ordering_status"]["keys_held_back"], 1);
    assert_eq!(shown["ordering_status"]["deliveries_waiting"], 2);
    assert_eq!(shown["ordering_status"]["oldest"]["key"], "ex-1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.received("/hold").len(), 2, "the next one waits");

    // Recovering the held one sends it at its place, then the next.
    let (status, job) = stack
        .api(
            "POST",
            &format!("/webhooks/{hold_id}/recover"),
            Some(json!({
                "since": herald_core::payload::rfc3339_ms(herald_platform::now_ms() - 3_600_000)
            })),
        )
        .await;
    assert!(status == 202 || status == 200, "recover: {status} {job}");
    let hold = receiver.wait_for("/hold", 4, Duration::from_secs(30)).await;
    assert_eq!(event_and_sequence(&hold), ["e0#1", "e0#1", "e0#1", "e1#2"]);
    stack
        .eventually(Duration::from_secs(30), "nothing held", || async {
            let w = stack.webhook(&hold_id).await;
            (w["ordering_status"]["keys_waiting"] == 0).then_some(())
        })
        .await;
    stack.stop().await;
}
