//! Lanes (ARCHITECTURE.md, "Lanes"): a bursting organization's events are
//! read by consumers of their own in ingest and the matcher, so another
//! organization's events are not queued behind the burst; the matcher's
//! lane goes only as fast as the burst's deliveries. Nothing is lost or
//! doubled when a lane opens, closes, or its service restarts mid-burst,
//! and lanes close once the burst is worked through.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use herald_e2e::{Receiver, Stack};
use serde_json::json;

const BURST: usize = 4_000;

async fn create(stack: &Stack, org: &str, url: String) {
    let body = json!({"name": "hook", "url": url, "event_types": ["workflow.completed"]});
    stack.create_webhook_in(org, body).await;
}

async fn lanes_metric(stack: &Stack, service: &str, name: &str) -> f64 {
    stack.metric(service, name).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_lanes_loses_nothing_and_they_close_after_it() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    create(&stack, "burstco", receiver.url("/burst")).await;
    create(&stack, "fastco", receiver.url("/fast")).await;
    stack.wait_deliverer_current().await;

    // fastco: 10 events a second while burstco's burst is worked through.
    let published = std::sync::Mutex::new(HashMap::<String, Instant>::new());
    let fast = stack.publish_paced("fastco", 0..150, Duration::from_millis(100), &published);
    // The burst in two parts: the second once ingest's lane for burstco
    // (if it opens one) diverts its events, so that part is published
    // while they are diverted.
    let bursting = async {
        stack.publish_burst_of("burstco", 0..BURST - 1_000).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut laned = false;
        while !laned && Instant::now() < deadline {
            laned = transform(&stack)
                .await
                .is_ok_and(|t| t.is_some_and(|t| t.source == "herald.events.burstco.>"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack
            .publish_burst_of("burstco", BURST - 1_000..BURST)
            .await;
        laned
    };
    let ((), laned) = tokio::join!(fast, bursting);

    // A lane opened in ingest or the matcher (a backlog mostly burstco's,
    // or burstco's deliveries far behind).
    let opened = lanes_metric(
        &stack,
        "HERALD_INGEST_HEALTH_ADDR",
        "herald_lanes_opened_total",
    )
    .await
        + lanes_metric(
            &stack,
            "HERALD_MATCHER_HEALTH_ADDR",
            "herald_lanes_opened_total",
        )
        .await;
    assert!(opened >= 1.0, "no lane opened for a burst of {BURST}");

    // Ingest's lane diverts the burst it opened for (the events stream's
    // subject transform), so its main consumer does not read it: what
    // burstco published while the lane was open is stored on
    // `herald.lane.burstco.…`, none of fastco's.
    let diverted = |org: &'static str| {
        let filter = format!("herald.lane.{org}.>");
        let stack = &stack;
        async move { stack.stored_count("HERALD_EVENTS", &filter).await }
    };
    eprintln!("burstco's events diverted before the burst's last part: {laned}");
    if laned {
        assert!(
            diverted("burstco").await >= 1_000,
            "the burst's last part not diverted"
        );
    }
    assert_eq!(diverted("fastco").await, 0, "fastco's events diverted");

    // Restarting the matcher and ingest mid-burst: their lanes go on from
    // their consumers (ingest's start sets the stream's configuration
    // again, ending the diversion; what was diverted is still its lane's).
    stack.stop_service("matcher", Duration::from_secs(30)).await;
    stack.start_service("matcher");
    stack.stop_service("ingest", Duration::from_secs(30)).await;
    stack.start_service("ingest");

    let fast_got = receiver
        .wait_for_deliveries("/fast", 150, Duration::from_secs(60))
        .await;
    assert_eq!(fast_got.len(), 150, "fastco's deliveries");
    let burst_got = receiver
        .wait_for_deliveries("/burst", BURST, Duration::from_secs(240))
        .await;
    assert_eq!(burst_got.len(), BURST, "burstco's deliveries");
    // Every event once: ids as published, each delivered by one delivery.
    let ids: HashSet<String> = receiver
        .received("/burst")
        .iter()
        .map(|r| r.event_id())
        .collect();
    assert_eq!(ids.len(), BURST, "distinct burst events delivered");

    let published = published.into_inner().unwrap();
    let mut waits: Vec<Duration> = receiver
        .received("/fast")
        .iter()
        .map(|r| r.at.duration_since(published[&r.event_id()]))
        .collect();
    waits.sort();
    eprintln!(
        "fastco beside a burst of {BURST} (lanes opened: {opened}): p50 {:?}, p99 {:?}",
        waits[waits.len() / 2],
        waits[waits.len() * 99 / 100]
    );

    // Caught up: every lane closes and is removed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = lanes_metric(&stack, "HERALD_INGEST_HEALTH_ADDR", "herald_lanes_open").await
            + lanes_metric(&stack, "HERALD_MATCHER_HEALTH_ADDR", "herald_lanes_open").await;
        if open == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} lanes still open a minute after the burst"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let consumers: Vec<String> = {
        use futures::StreamExt;
        let mut names = Vec::new();
        for stream in ["HERALD_EVENTS", "HERALD_ACCEPTED"] {
            let stream = stack.js.get_stream(stream).await.unwrap();
            let mut listed = stream.consumer_names();
            while let Some(name) = listed.next().await {
                names.push(name.unwrap());
            }
        }
        names
    };
    assert!(
        consumers.iter().all(|c| !c.contains("-lane-")),
        "lane consumers left: {consumers:?}"
    );
    // Nothing more arrived while the lanes closed, and nothing is
    // diverted any more.
    assert_eq!(receiver.received("/burst").len(), BURST);
    let transform = transform(&stack).await.unwrap();
    assert!(transform.is_none(), "still diverted: {transform:?}");
    stack.stop().await;
}

/// HERALD_EVENTS' subject transform now (a lane's diversion), if any.
async fn transform(
    stack: &Stack,
) -> Result<Option<async_nats::jetstream::stream::SubjectTransform>, async_nats::Error> {
    let mut events = stack.js.get_stream("HERALD_EVENTS").await?;
    Ok(events.info().await?.config.subject_transform.clone())
}

/// A diversion that no open lane holds (a lane record removed by hand, or
/// a divert applied after its lane closed) is ended within seconds by
/// ingest, so the organization's events reach the main consumer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diversion_without_its_lane_is_ended() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    create(&stack, "ghostco", receiver.url("/ghost")).await;
    stack.wait_deliverer_current().await;

    let mut events = stack.js.get_stream("HERALD_EVENTS").await.unwrap();
    let mut config = events.info().await.unwrap().config.clone();
    config.subject_transform = Some(async_nats::jetstream::stream::SubjectTransform {
        source: "herald.events.ghostco.>".into(),
        destination: "herald.lane.ghostco.>".into(),
    });
    stack.js.update_stream(&config).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let transform = transform(&stack).await.unwrap();
        if transform.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a diversion without a lane still there after 20 s: {transform:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stack
        .publish("ghostco", "workflow.completed", json!({"id": "evt_after"}))
        .await;
    let got = receiver
        .wait_for_deliveries("/ghost", 1, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 1, "ghostco's event after the diversion ended");
    assert_eq!(
        stack
            .stored_count("HERALD_EVENTS", "herald.lane.ghostco.>")
            .await,
        0
    );
    stack.stop().await;
}
