//! Ingest's bounds (PRODUCT.md, "Events in"): what one pull may hold, and
//! an event that ingest cannot conclude however often it is delivered.

use std::time::Duration;

use herald_core::names;
use herald_e2e::{Options, Stack};
use prost::Message as _;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_pull_is_capped_by_bytes_as_well_as_by_count() {
    let stack =
        Stack::start_with(Options::default().env("HERALD_INGEST_PULL_MAX_BYTES", "2MiB")).await;
    let pull = next_pull(&stack).await;
    assert_eq!(pull["batch"], 256, "{pull}");
    assert_eq!(pull["max_bytes"], 2 << 20, "{pull}");
    stack.stop().await;

    // Below the largest message the server takes, the cap is raised to it:
    // a pull smaller than a message would never be answered with it.
    let stack =
        Stack::start_with(Options::default().env("HERALD_INGEST_PULL_MAX_BYTES", "64KiB")).await;
    let largest = stack.client.server_info().max_payload + 64 * 1024;
    let pull = next_pull(&stack).await;
    assert_eq!(pull["max_bytes"], largest, "{pull}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_ingest_keeps_failing_on_is_set_aside_and_rejected_with_the_reason() {
    // HERALD_ACCEPTED refuses everything (a 64-byte limit, discard new):
    // ingest cannot conclude any event, and hands each back again and again.
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_ACCEPTED_MAX_BYTES", "64")
            .env("HERALD_INGEST_MAX_DELIVERIES", "2"),
    )
    .await;
    let event = json!({"id": "evt_stuck", "attributes": {"workflow": "billing"}});
    stack
        .publish("acme", "workflow.completed", event.clone())
        .await;

    // Its third delivery is past the limit: it is filed as rejected, with
    // the reason, for its organization...
    let rejected = stack
        .js
        .get_stream(names::REJECTED_STREAM)
        .await
        .expect("rejected stream");
    let record = stack
        .eventually(Duration::from_secs(20), "the rejection", || {
            let rejected = rejected.clone();
            async move {
                rejected
                    .get_last_raw_message_by_subject(&names::rejected_subject("acme"))
                    .await
                    .ok()
            }
        })
        .await;
    let rejection: Value = serde_json::from_slice(&record.payload).unwrap();
    assert_eq!(rejection["reason"], "redelivered", "{rejection}");
    let text = rejection["message"].as_str().unwrap();
    assert!(text.contains("delivered 3 times"), "{rejection}");
    assert!(text.contains("dead letters"), "{rejection}");
    assert!(
        rejection["body"].as_str().unwrap().contains("evt_stuck"),
        "{rejection}"
    );
    assert_eq!(
        record
            .headers
            .get("Herald-Reject-Reason")
            .map(|v| v.as_str()),
        Some("redelivered")
    );

    // ...and set aside whole in the dead letters, where it can be redriven.
    let dead = stack.js.get_stream(names::DEAD_STREAM).await.unwrap();
    let letter = dead
        .get_last_raw_message_by_subject(&names::dead_subject(names::EVENTS_STREAM))
        .await
        .expect("the event in the dead letters");
    let body: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(body, event);
    assert_eq!(
        letter
            .headers
            .get("Herald-Dead-Subject")
            .map(|v| v.as_str()),
        Some("herald.events.acme.workflow.completed")
    );

    // Ingest holds nothing of it any more: it is not looping.
    let consumer: async_nats::jetstream::consumer::PullConsumer = stack
        .js
        .get_consumer_from_stream(names::INGEST_CONSUMER, names::EVENTS_STREAM)
        .await
        .unwrap();
    stack
        .eventually(Duration::from_secs(10), "ingest's consumer idle", || {
            let mut consumer = consumer.clone();
            async move {
                let info = consumer.info().await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            }
        })
        .await;
    assert_eq!(
        stack
            .metric("HERALD_INGEST_HEALTH_ADDR", "herald_events_set_aside_total")
            .await,
        Some(1.0)
    );
    stack.stop().await;
}

/// Ingest's next pull request, as the server gets it (a pull expires after
/// 5 s, so another comes soon).
async fn next_pull(stack: &Stack) -> Value {
    let mut pulls = stack
        .client
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            names::EVENTS_STREAM,
            names::INGEST_CONSUMER
        ))
        .await
        .expect("subscribe");
    let pull = tokio::time::timeout(
        Duration::from_secs(15),
        futures::StreamExt::next(&mut pulls),
    )
    .await
    .expect("a pull request within 15 s")
    .expect("subscription open");
    serde_json::from_slice(&pull.payload).expect("a JSON pull request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_at_a_moderate_rate_are_accepted_together_and_each_once() {
    // Events 5 ms apart: once ingest has seen the rate, it gathers them up
    // to 8 at a time (or 50 ms) and publishes each batch at once
    // (herald_core::gather), instead of one every 5 ms.
    let mut stack = Stack::start_with(Options::default().env("HERALD_INGEST_GATHER", "50ms")).await;
    let n = 120u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..n {
        tick.tick().await;
        publish_evt(&stack, i).await;
    }
    let accepted = stack
        .js
        .get_stream(names::ACCEPTED_STREAM)
        .await
        .expect("accepted stream");
    let first = accepted_from(&stack, &accepted, 1, n).await;
    let mut ids: std::collections::BTreeSet<String> =
        first.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), n as usize, "each event accepted once");
    // Past the first 60 (while the rate is learnt), most events are stored
    // within 2 ms of the one before: they were published together.
    let close = first[60..]
        .windows(2)
        .filter(|w| w[1].1 - w[0].1 < 2_000)
        .count();
    assert!(
        close > 40,
        "{close} of 59 stored within 2 ms of the previous"
    );

    // Ingest stops while it gathers. What it gathered is handed back, and
    // the next ingest accepts it, well before the 30 s ack wait would bring
    // it back (without the hand-back, this part fails).
    let mut published = n;
    for _ in 0..40 {
        tick.tick().await;
        publish_evt(&stack, published).await;
        published += 1;
    }
    // Stopped once some are in its hands, not yet accepted (a batch waits
    // up to 50 ms); while none are (a batch of 8 had just gone), another
    // event is published first.
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut stream = accepted.clone();
        if stream.info().await.expect("stream info").state.messages < published {
            break;
        }
        tick.tick().await;
        publish_evt(&stack, published).await;
        published += 1;
    }
    stack.stop_service("ingest", Duration::from_secs(10)).await;
    stack.start_service("ingest");
    let after = accepted_from(&stack, &accepted, n + 1, published).await;
    ids.extend(after.into_iter().map(|(id, _)| id));
    assert_eq!(ids.len(), published as usize, "each event accepted once");
    stack.stop().await;
}

/// Publishes acme's `workflow.completed` with id `evt_<i>`.
async fn publish_evt(stack: &Stack, i: u64) {
    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": format!("evt_{i}")}),
        )
        .await;
}

/// Waits (20 s at most, less than the 30 s ack wait) until HERALD_ACCEPTED holds `last` events, and
/// reads those from sequence `from` on: each one's id, and when it was
/// stored (µs).
async fn accepted_from(
    stack: &Stack,
    accepted: &async_nats::jetstream::stream::Stream,
    from: u64,
    last: u64,
) -> Vec<(String, i128)> {
    stack
        .eventually(Duration::from_secs(20), "the events accepted", || {
            let mut accepted = accepted.clone();
            async move { (accepted.info().await.ok()?.state.messages >= last).then_some(()) }
        })
        .await;
    let mut events = Vec::new();
    for seq in from..=last {
        let message = accepted.get_raw_message(seq).await.expect("accepted event");
        let event = herald_core::proto::Event::decode(message.payload.as_ref()).unwrap();
        events.push((event.id, message.time.unix_timestamp_nanos() / 1_000));
    }
    events
}
