//! Matching and fan-out against real NATS and Redis: webhook changes take
//! effect on the next event, Redis going away does not stop matching, one
//! event fans out to a thousand webhooks with stable delivery ids, and a
//! matcher stopped or killed mid-stream yields exactly one job (and one
//! `webhook-id` at the receiver) per event and webhook.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use herald_core::{ids, names, proto, secret};
use herald_e2e::{Options, Receiver, Replica, Stack, matcher_idle};
use herald_platform::lanes;
use herald_platform::webhooks::WebhookStore;
use prost::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORG: &str = "acme";

/// A webhook record as the admin API would store it.
fn webhook(
    env: &HashMap<String, String>,
    url: &str,
    event_types: &[&str],
    filters: &[(&str, &[&str])],
) -> proto::Webhook {
    let keyring = secret::Keyring::parse(&env["HERALD_SECRET_KEY"], "").expect("secret key");
    let id = ids::new_webhook_id();
    let now = 1_700_000_000_000;
    proto::Webhook {
        secrets: vec![keyring.encrypt(&secret::generate(), &names::webhook_key(ORG, &id), now)],
        id,
        organization_id: ORG.into(),
        name: "test".into(),
        url: url.into(),
        event_types: event_types.iter().map(|t| (*t).into()).collect(),
        filters: filters
            .iter()
            .map(|(k, v)| {
                let values = v.iter().map(|s| (*s).into()).collect();
                ((*k).into(), proto::StringList { values })
            })
            .collect(),
        timeout_ms: 5_000,
        enabled: true,
        created_at_ms: now,
        updated_at_ms: now,
        ..Default::default()
    }
}

/// One delivery job found in HERALD_DELIVERIES.
#[derive(Debug, Clone)]
struct Job {
    webhook_id: String,
    event_id: String,
    delivery_id: String,
    msg_id: String,
    job: proto::DeliveryJob,
}

/// A delivery job as the matcher published it, or `None` for the
/// deliverer's own retries and deferrals (they come back into the same
/// subjects).
fn matcher_job(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<Job> {
    let job = proto::DeliveryJob::decode(payload).expect("job decodes");
    if job.attempt != 1 || job.deferrals != 0 {
        return None;
    }
    let msg_id = headers
        .and_then(|h| h.get(names::MSG_ID_HEADER))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Some(Job {
        webhook_id: job.webhook_id.clone(),
        event_id: job.event.as_ref().map(|e| e.id.clone()).unwrap_or_default(),
        delivery_id: job.delivery_id.clone(),
        msg_id,
        job,
    })
}

/// Every delivery job of `ORG` still in the stream, in order. The stream is
/// a work queue (a job leaves it once the deliverer is done with it), so
/// tests that read jobs here run no deliverer meanwhile; and a work queue
/// allows no second consumer over the same subjects, so this reads each
/// sequence by a plain get.
async fn jobs(js: &jetstream::Context) -> Vec<Job> {
    let mut stream = js
        .get_stream(names::DELIVERIES_STREAM)
        .await
        .expect("stream");
    let state = stream.info().await.expect("stream info").state.clone();
    let prefix = format!("herald.deliveries.{ORG}.");
    let mut out = Vec::with_capacity(state.messages as usize);
    if state.messages == 0 {
        return out;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        // Gaps are jobs already done (or schedules already fired).
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        if !message.subject.as_str().starts_with(&prefix) {
            continue;
        }
        out.extend(matcher_job(Some(&message.headers), &message.payload));
    }
    out
}

/// Messages in HERALD_DELIVERIES (cheap; no reading of messages).
async fn job_count(js: &jetstream::Context) -> u64 {
    let mut stream = js
        .get_stream(names::DELIVERIES_STREAM)
        .await
        .expect("stream");
    stream.info().await.expect("stream info").state.messages
}

/// Polls `f` every 20 ms until it is true; panics after `timeout`.
async fn until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric's value from a service's `/metrics`, 0 when absent.
async fn metric(addr: &str, name: &str) -> f64 {
    let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
        return 0.0;
    };
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("read");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const INVALIDATIONS: &str = "herald_subscription_cache_invalidations_total";
const DEGRADED: &str = "herald_redis_degraded_total";

/// Runs `change` and waits until the matcher has seen it on the change feed.
/// The product promises that within a second under normal load; a test
/// machine running every test at once is not, so this allows 5 s and prints
/// how long it took.
async fn changed<Fut: Future>(stack: &Stack, change: Fut) -> Fut::Output {
    let addr = stack.env["HERALD_MATCHER_HEALTH_ADDR"].clone();
    let before = metric(&addr, INVALIDATIONS).await;
    let out = change.await;
    let started = Instant::now();
    until(
        Duration::from_secs(5),
        "the change to reach the matcher",
        || {
            let addr = addr.clone();
            async move { metric(&addr, INVALIDATIONS).await > before }
        },
    )
    .await;
    eprintln!("change seen by the matcher after {:?}", started.elapsed());
    out
}

/// A `workflow.completed` event of [`ORG`].
fn completed(id: &str) -> proto::Event {
    proto::Event {
        id: id.into(),
        organization_id: ORG.into(),
        r#type: "workflow.completed".into(),
        ..Default::default()
    }
}

/// Publishes `event` as ingest publishes one it accepted, for the matcher.
async fn publish_accepted(js: &jetstream::Context, event: &proto::Event) {
    js.publish(names::accepted_subject(ORG), event.encode_to_vec().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
}

/// Changes webhook `id` of [`ORG`] in the bucket and waits for the
/// matcher to see the change.
async fn modify(
    stack: &Stack,
    store: &WebhookStore,
    id: &str,
    mut change: impl FnMut(&mut proto::Webhook),
) {
    let changing = store.modify(ORG, id, |w| {
        change(w);
        true
    });
    changed(stack, changing)
        .await
        .expect("modify")
        .expect("exists");
}

/// Waits up to 10 s for `n` requests to `path` and asserts that exactly
/// `n` came.
async fn got_exactly(receiver: &Receiver, path: &str, n: usize) {
    let got = receiver.wait_for(path, n, Duration::from_secs(10)).await;
    assert_eq!(got.len(), n, "requests to {path}");
}

/// The webhook of a matcher's job for `event_id` seen on the wire.
fn webhook_of(message: &async_nats::Message, event_id: &str) -> Option<String> {
    matcher_job(message.headers.as_ref(), &message.payload)
        .filter(|job| job.event_id == event_id)
        .map(|job| job.webhook_id)
}

/// Publishes one event and answers which webhooks got a job for it, once
/// the matcher is done with it. `sentinel` matches every event, so its job
/// says the event got through.
async fn routed(
    stack: &Stack,
    sentinel: &str,
    event_id: &str,
    event_type: &str,
    attributes: serde_json::Value,
) -> HashSet<String> {
    // The deliverer runs, and takes jobs out of the stream as it goes: what
    // the matcher published is watched as it is published.
    let mut published = stack
        .client
        .subscribe(format!("herald.deliveries.{ORG}.>"))
        .await
        .expect("subscribe");
    stack
        .publish(
            ORG,
            event_type,
            json!({"id": event_id, "attributes": attributes}),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = HashSet::new();
    loop {
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(20), published.next()).await
        {
            found.extend(webhook_of(&message, event_id));
        }
        if found.contains(sentinel) && matcher_idle(&stack.js).await {
            break;
        }
        assert!(Instant::now() < deadline, "timed out matching {event_id}");
    }
    // The matcher acks an event after its jobs are stored, so they are all
    // on their way here; take what is still in flight.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), published.next()).await
    {
        found.extend(webhook_of(&message, event_id));
    }
    found.remove(sentinel);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_changes_take_effect_on_the_next_event() {
    let stack = Stack::start().await;
    let store = WebhookStore::open(&stack.js, 1).await.expect("store");
    let receiver = Receiver::start().await;
    let sentinel = changed(
        &stack,
        stack.create_webhook(json!({
            "name": "sentinel", "url": receiver.url("/sentinel"), "event_types": [">"],
        })),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let target = changed(
        &stack,
        stack.create_webhook(json!({
            "name": "target", "url": receiver.url("/target"),
            "event_types": ["workflow.completed"],
            "filters": {"workflow": ["invoice-*"]},
        })),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let only_target: HashSet<String> = [target.clone()].into();
    let none = HashSet::new();
    let completed = "workflow.completed";
    let invoice = json!({"workflow": "invoice-approval"});
    let payroll = json!({"workflow": "payroll"});
    let route = async |event_id, event_type, attributes: &serde_json::Value| {
        routed(&stack, &sentinel, event_id, event_type, attributes.clone()).await
    };

    assert_eq!(route("e1", completed, &invoice).await, only_target);
    assert_eq!(route("e2", completed, &payroll).await, none);

    // Patch the filters: the next event follows the new ones.
    modify(&stack, &store, &target, |w| {
        w.filters.insert(
            "workflow".into(),
            proto::StringList {
                values: vec!["payroll".into()],
            },
        );
    })
    .await;
    assert_eq!(route("e3", completed, &payroll).await, only_target);
    assert_eq!(route("e4", completed, &invoice).await, none);

    // Patch the event types.
    let step_failed = "workflow.step.failed";
    assert_eq!(route("e5", step_failed, &payroll).await, none);
    modify(&stack, &store, &target, |w| {
        w.event_types = vec!["workflow.>".into()]
    })
    .await;
    assert_eq!(route("e6", step_failed, &payroll).await, only_target);

    // Disable, then enable again.
    modify(&stack, &store, &target, |w| {
        w.enabled = false;
        w.disabled_reason = "test".into();
    })
    .await;
    assert_eq!(route("e7", completed, &payroll).await, none);
    modify(&stack, &store, &target, |w| w.enabled = true).await;
    assert_eq!(route("e8", completed, &payroll).await, only_target);

    // Delete.
    let revision = store.get(ORG, &target).await.unwrap().unwrap().revision;
    changed(&stack, store.delete(ORG, &target, revision))
        .await
        .expect("delete");
    assert_eq!(route("e9", completed, &payroll).await, none);

    // A webhook created behind the API's back is matched too.
    let created = webhook(&stack.env, &receiver.url("/new"), &["workflow.*"], &[]);
    changed(&stack, store.create(&created))
        .await
        .expect("create");
    assert_eq!(
        route("e10", completed, &payroll).await,
        [created.id.clone()].into()
    );

    // What the matcher routed is what receivers got.
    let got = receiver
        .wait_for("/target", 4, Duration::from_secs(10))
        .await;
    let mut events: Vec<String> = got
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].to_string())
        .collect();
    events.sort();
    assert_eq!(events, ["\"e1\"", "\"e3\"", "\"e6\"", "\"e8\""]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matching_goes_on_without_redis_and_counts_it() {
    let mut stack = Stack::start().await;
    let store = WebhookStore::open(&stack.js, 1).await.expect("store");
    let receiver = Receiver::start().await;
    let a = webhook(
        &stack.env,
        &receiver.url("/a"),
        &["workflow.completed"],
        &[],
    );
    changed(&stack, store.create(&a)).await.expect("create a");
    stack.publish(ORG, "workflow.completed", json!({})).await;
    receiver.wait_for("/a", 1, Duration::from_secs(10)).await;

    let addr = stack.env["HERALD_MATCHER_HEALTH_ADDR"].clone();
    let degraded_before = metric(&addr, DEGRADED).await;
    stack.redis.stop();

    // A change while Redis is down still takes effect: the set comes from
    // the bucket, and Redis is not trusted for it until told of the change.
    let b = webhook(&stack.env, &receiver.url("/b"), &["workflow.*"], &[]);
    changed(&stack, store.create(&b)).await.expect("create b");
    for _ in 0..3 {
        stack.publish(ORG, "workflow.completed", json!({})).await;
    }
    got_exactly(&receiver, "/a", 4).await;
    got_exactly(&receiver, "/b", 3).await;
    assert!(
        metric(&addr, DEGRADED).await > degraded_before,
        "the degradation is counted"
    );

    // Redis comes back empty; matching uses it again.
    stack.redis.restart();
    let c = webhook(&stack.env, &receiver.url("/c"), &["workflow.>"], &[]);
    changed(&stack, store.create(&c)).await.expect("create c");
    stack.publish(ORG, "workflow.completed", json!({})).await;
    got_exactly(&receiver, "/a", 5).await;
    got_exactly(&receiver, "/c", 1).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_fans_out_to_a_thousand_webhooks_once_each() {
    // No deliverer runs: a matcher lane would wait for the jobs to be sent.
    // The jobs are read back from the stream before anything delivers them.
    let options = Options::default()
        .without(&["deliverer"])
        .env(lanes::LANES, "false");
    let mut stack = Stack::start_with(options).await;
    let store = WebhookStore::open(&stack.js, 1).await.expect("store");
    let receiver = Receiver::start().await;
    let url = receiver.url("/fan");
    type Shape<'a> = (&'a [&'a str], &'a [(&'a str, &'a [&'a str])]);
    let matching: [Shape; 5] = [
        (
            &["workflow.completed"],
            &[("workflow", &["invoice-approval"])],
        ),
        (&["workflow.*"], &[("status", &["succeeded", "failed"])]),
        (&["workflow.>"], &[("workflow", &["invoice-*"])]),
        (&[">"], &[]),
        (
            &["workflow.failed", "workflow.completed"],
            &[("execution", &["ex-*"])],
        ),
    ];
    let other: [Shape; 4] = [
        (&["workflow.failed"], &[]),
        (&["workflow.>"], &[("workflow", &["payroll"])]),
        (&["worker.*"], &[]),
        (&["workflow.completed"], &[("step", &["*"])]),
    ];
    let mut expected = HashSet::new();
    let mut records = Vec::new();
    for i in 0..1000 {
        let (types, filters) = matching[i % matching.len()];
        let w = webhook(&stack.env, &url, types, filters);
        expected.insert(w.id.clone());
        records.push(w);
    }
    for i in 0..100 {
        let (types, filters) = other[i % other.len()];
        records.push(webhook(&stack.env, &url, types, filters));
    }
    // Disabled webhooks match nothing.
    for _ in 0..20 {
        let mut w = webhook(&stack.env, &url, &[">"], &[]);
        w.enabled = false;
        records.push(w);
    }
    let creates = records.iter().map(|w| store.create(w));
    futures::future::try_join_all(creates)
        .await
        .expect("create");

    let started = Instant::now();
    stack
        .publish(
            ORG,
            "workflow.completed",
            json!({"id": "evt_fan", "attributes": {
                "workflow": "invoice-approval", "execution": "ex-1", "status": "succeeded"}}),
        )
        .await;
    until(Duration::from_secs(30), "1,000 jobs", || async {
        job_count(&stack.js).await >= 1000 && matcher_idle(&stack.js).await
    })
    .await;
    eprintln!(
        "1,000-webhook fan-out matched and stored in {:?}",
        started.elapsed()
    );
    let found = jobs(&stack.js).await;
    assert_eq!(found.len(), 1000);
    let got: HashSet<String> = found.iter().map(|j| j.webhook_id.clone()).collect();
    assert_eq!(got, expected, "exactly the matching webhooks");
    for j in &found {
        assert_eq!(j.event_id, "evt_fan");
        assert_eq!(
            j.delivery_id,
            ids::delivery_id(ORG, "evt_fan", &j.webhook_id)
        );
        assert_eq!(j.msg_id, format!("{}.1", j.delivery_id));
        assert_eq!(j.job.attempt, 1);
    }

    // The same event matched again (as after a partial failure) publishes
    // the same ids, which the stream drops as duplicates.
    let event = found[0].job.event.clone().expect("event");
    publish_accepted(&stack.js, &event).await;
    let jobs_metric = "herald_delivery_jobs_total";
    let addr = stack.env["HERALD_MATCHER_HEALTH_ADDR"].clone();
    until(
        Duration::from_secs(30),
        "the event matched again",
        || async { metric(&addr, jobs_metric).await >= 2000.0 && matcher_idle(&stack.js).await },
    )
    .await;
    assert_eq!(job_count(&stack.js).await, 1000, "no duplicate job");

    // Each webhook got the event once, under its own webhook-id, and the
    // work left the stream once done.
    stack.start_service("deliverer");
    let got = receiver
        .wait_for("/fan", 1000, Duration::from_secs(60))
        .await;
    let ids: HashSet<&str> = got.iter().filter_map(|r| r.header("webhook-id")).collect();
    assert_eq!(got.len(), 1000);
    assert_eq!(ids.len(), 1000);
    until(Duration::from_secs(10), "the stream to empty", || async {
        job_count(&stack.js).await == 0
    })
    .await;
    stack.stop().await;
}

/// The stack without a matcher or a deliverer: the test starts matchers
/// (and a deliverer) itself; events go straight to `herald.accepted`.
fn without_matching() -> Options {
    Options::default()
        .without(&["matcher", "deliverer"])
        // No deliverer works the jobs these tests count: a matcher lane
        // would wait for them to be sent (tests/tests/lanes.rs).
        .env(lanes::LANES, "false")
        .env(herald_matcher::ACK_WAIT, "2s")
}

/// `n` webhooks of every workflow event, at an address nothing answers,
/// created 500 at a time.
async fn create_webhooks(stack: &Stack, n: usize) {
    let store = WebhookStore::open(&stack.js, 1).await.expect("store");
    let creates: Vec<proto::Webhook> = (0..n)
        .map(|_| webhook(&stack.env, "http://127.0.0.1:9/", &["workflow.>"], &[]))
        .collect();
    for chunk in creates.chunks(500) {
        futures::future::try_join_all(chunk.iter().map(|w| store.create(w)))
            .await
            .expect("create");
    }
}

/// A matcher started on its own token, answered once it has published its
/// first job.
async fn matcher_past_its_first_job(stack: &mut Stack) -> Replica {
    let mut published = stack
        .client
        .subscribe(format!("herald.deliveries.{ORG}.>"))
        .await
        .expect("subscribe");
    let matcher = stack.start_service("matcher");
    published.next().await.expect("a first job");
    matcher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_matcher_stopped_or_killed_mid_stream_yields_one_job_per_pair() {
    // Several times what a matcher works on at once (128), so that a stop
    // leaves some untouched, and a matcher killed right after its first
    // job, however late this test gets to the kill, is still mid-stream.
    const EVENTS: usize = 600;
    const WEBHOOKS: usize = 4;
    let mut stack = Stack::start_with(without_matching()).await;
    let receiver = Receiver::start().await;
    let store = WebhookStore::open(&stack.js, 1).await.expect("store");
    let mut webhooks = Vec::new();
    for i in 0..WEBHOOKS {
        let patterns: &[&str] = [&["workflow.completed"][..], &["workflow.*"], &[">"]][i % 3];
        let w = webhook(&stack.env, &receiver.url("/hook"), patterns, &[]);
        store.create(&w).await.expect("create");
        webhooks.push(w.id);
    }
    for i in 0..EVENTS {
        let event = proto::Event {
            id: format!("evt_{i}"),
            organization_id: ORG.into(),
            r#type: "workflow.completed".into(),
            occurred_at_ms: 1_700_000_000_000,
            received_at_ms: 1_700_000_000_000,
            ..Default::default()
        };
        publish_accepted(&stack.js, &event).await;
    }
    let total = (EVENTS * WEBHOOKS) as u64;

    // Stopped as SIGTERM would, right after its first job: in-flight events
    // finish, the rest are handed back.
    let matcher = matcher_past_its_first_job(&mut stack).await;
    stack.stop_replica(matcher, Duration::from_secs(10)).await;
    let after_stop = job_count(&stack.js).await;
    assert!(after_stop < total, "stopped mid-stream");

    // Killed right after its first job: jobs published, events not acked.
    // `abort` only asks: the count waits until the task is gone (its work
    // under way aborted with it), so that it is what the killed matcher
    // left rather than a glimpse of a matcher still publishing.
    let matcher = matcher_past_its_first_job(&mut stack).await;
    let killed = stack.kill_replica(matcher).await;
    assert!(
        killed.is_err_and(|e| e.is_cancelled()),
        "killed, not finished"
    );
    let after_kill = job_count(&stack.js).await;
    assert!(after_kill < total, "killed mid-stream");
    eprintln!("jobs: {after_stop} after the stop, {after_kill} after the kill, of {total}");

    // A fresh matcher finishes the stream.
    stack.start_service("matcher");
    until(Duration::from_secs(30), "every job", || async {
        job_count(&stack.js).await >= total && matcher_idle(&stack.js).await
    })
    .await;
    let found = jobs(&stack.js).await;
    assert_eq!(found.len() as u64, total, "one job per event and webhook");
    let pairs: HashSet<(String, String)> = found
        .iter()
        .map(|j| (j.event_id.clone(), j.webhook_id.clone()))
        .collect();
    assert_eq!(pairs.len() as u64, total);
    for j in &found {
        assert_eq!(
            j.delivery_id,
            ids::delivery_id(ORG, &j.event_id, &j.webhook_id)
        );
        assert_eq!(j.msg_id, format!("{}.1", j.delivery_id));
    }

    // Receivers saw each delivery once.
    stack.start_service("deliverer");
    let got = receiver
        .wait_for("/hook", total as usize, Duration::from_secs(60))
        .await;
    let delivered: HashSet<&str> = got.iter().filter_map(|r| r.header("webhook-id")).collect();
    assert_eq!(delivered.len() as u64, total);
    assert_eq!(got.len() as u64, total, "no webhook-id twice");
    stack.stop().await;
}

/// Many events, each to many webhooks, at once: the matcher's publishes in
/// flight stay bounded without any fan-out waiting on another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_large_fan_outs_at_once_complete() {
    const EVENTS: usize = 150;
    const WEBHOOKS: usize = 1000;
    let mut stack = Stack::start_with(without_matching()).await;
    create_webhooks(&stack, WEBHOOKS).await;
    for i in 0..EVENTS {
        publish_accepted(&stack.js, &completed(&format!("evt_{i}"))).await;
    }
    let started = Instant::now();
    stack.start_service("matcher");
    let total = (EVENTS * WEBHOOKS) as u64;
    until(Duration::from_secs(60), "every job", || async {
        job_count(&stack.js).await >= total && matcher_idle(&stack.js).await
    })
    .await;
    eprintln!(
        "{total} jobs from {EVENTS} events in {:?}",
        started.elapsed()
    );
    assert_eq!(job_count(&stack.js).await, total);
    stack.stop().await;
}

/// One event to 10,000 webhooks takes longer than the matcher's ack wait
/// here (300 ms): progress acks keep the event its matcher's, so it is never
/// redelivered and fanned out twice meanwhile, and every webhook gets
/// exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_out_longer_than_the_ack_wait_is_done_once() {
    const WEBHOOKS: usize = 10_000;
    let options = without_matching().env(herald_matcher::ACK_WAIT, "300ms");
    let mut stack = Stack::start_with(options).await;
    create_webhooks(&stack, WEBHOOKS).await;
    publish_accepted(&stack.js, &completed("evt_wide")).await;
    let started = Instant::now();
    stack.start_service("matcher");
    until(Duration::from_secs(90), "every job", || async {
        job_count(&stack.js).await >= WEBHOOKS as u64 && matcher_idle(&stack.js).await
    })
    .await;
    eprintln!(
        "one event to {WEBHOOKS} webhooks: {WEBHOOKS} jobs in {:?}",
        started.elapsed()
    );
    let info = stack
        .js
        .get_stream(names::ACCEPTED_STREAM)
        .await
        .expect("stream")
        .get_consumer::<jetstream::consumer::pull::Config>(names::MATCHER_CONSUMER)
        .await
        .expect("consumer")
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.num_redelivered, 0, "the event was fanned out once");
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "delivered to a matcher once"
    );
    assert_eq!(job_count(&stack.js).await, WEBHOOKS as u64);
    stack.stop().await;
}
