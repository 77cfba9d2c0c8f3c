//! Herald's own faults against the delivery policy (PRODUCT.md, "Deliveries
//! out" and "Delivery logs"): a Redis that is full holds the breaker as a
//! healthy one does; Herald's lost network or a tenant's broken DNS never
//! count against the wrong party; deliveries parked behind a failing
//! webhook survive the deliverer that parked them.

use std::collections::HashSet;
use std::time::Duration;

use herald_core::names;
use herald_e2e::{Options, Receiver, Stack, fill_redis};
use herald_test_support::RedisServer;
use serde_json::{Value, json};

async fn create(stack: &Stack, url: &str) -> String {
    let webhook = stack
        .create_webhook(json!({"name": "hook", "url": url, "event_types": ["workflow.completed"]}))
        .await;
    webhook["id"].as_str().unwrap().to_owned()
}

/// Publishes a first event (`evt_first`) and waits until its failed
/// delivery has made webhook `id` failing.
async fn first_event_fails(stack: &Stack, id: &str) {
    stack
        .publish("acme", "workflow.completed", json!({"id": "evt_first"}))
        .await;
    stack
        .wait_webhook(id, "state", json!("failing"), Duration::from_secs(20))
        .await;
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

/// A steady load of `workflow.completed` events of `acme`: event `i`
/// (from 0) is published, then the load waits until `every * (i + 1)`
/// after its start, so a slow publish does not slow the load down.
struct SteadyLoad {
    start: tokio::time::Instant,
    every: Duration,
}

impl SteadyLoad {
    fn start(every: Duration) -> Self {
        Self {
            start: tokio::time::Instant::now(),
            every,
        }
    }

    async fn publish(&self, stack: &Stack, i: usize, event: Value) {
        stack.publish("acme", "workflow.completed", event).await;
        let due = self.start + self.every * (i as u32 + 1);
        tokio::time::sleep_until(due).await;
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
        fill_redis(&small).await;
    }
    receiver.fail_for("/flaky", 500, Duration::from_secs(6));
    const EVENTS: usize = 400;
    let load = SteadyLoad::start(Duration::from_millis(20));
    for i in 0..EVENTS {
        let event = json!({"id": format!("evt_{i}"), "data": {"i": i}});
        load.publish(&stack, i, event).await;
    }
    stack
        .eventually(Duration::from_secs(40), "every event delivered", || async {
            (distinct(&receiver, "/flaky").len() == EVENTS).then_some(())
        })
        .await;
    let failed = receiver.answered("/flaky", 500);
    let webhook = stack.webhook(&id).await;
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

/// Parks `n` deliveries for `webhook_id` as the deliverer does (the
/// webhook's subject of HERALD_PARKED), `prefix` naming their events.
async fn park(stack: &Stack, webhook_id: &str, prefix: &str, n: usize) {
    let jobs = (0..n).map(|i| {
        let (delivery_id, event_id) = (format!("dlv_{prefix}_{i}"), format!("{prefix}_{i}"));
        let mut job =
            herald_e2e::delivery_job(webhook_id, &delivery_id, &event_id, "workflow.completed");
        job.event.as_mut().unwrap().data_json = format!("{{\"i\":{i}}}").into_bytes().into();
        job
    });
    stack.publish_jobs(names::parked_subject, jobs).await;
}

/// How many deliveries are parked for `webhook_id`.
async fn parked(stack: &Stack, webhook_id: &str) -> u64 {
    let subject = names::parked_subject("acme", webhook_id);
    stack.stored_count(names::PARKED_STREAM, &subject).await
}

/// The last sequence HERALD_PARKED has stored: how many parkings there
/// ever were.
async fn parkings(stack: &Stack) -> u64 {
    let mut stream = stack.js.get_stream(names::PARKED_STREAM).await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_a_dead_deliverer_left_parked_is_delivered_by_the_next_one() {
    // Probes an hour apart: no timer fires during the test unless the
    // deliverer sets one.
    let mut stack = Stack::start_with(
        Options::default()
            .env("HERALD_RETRY_SCHEDULE", "1h,1h")
            .env("HERALD_DISABLE_AFTER", "100"),
    )
    .await;
    let receiver = Receiver::start().await;
    receiver.fail_for("/down", 500, Duration::from_secs(3_600));
    let id = create(&stack, &receiver.url("/down")).await;
    first_event_fails(&stack, &id).await;
    stack
        .publish_numbered("acme", "workflow.completed", "evt", 30)
        .await;
    stack
        .eventually(Duration::from_secs(20), "31 deliveries parked", || async {
            (parked(&stack, &id).await == 31).then_some(())
        })
        .await;

    // The deliverer dies in the middle of releasing them: the probe had
    // succeeded (the state says healthy), the release had not finished,
    // and no timer is left (the next probe's was replaced by nothing).
    stack
        .stop_service("deliverer", Duration::from_secs(30))
        .await;
    receiver.fail_for("/down", 500, Duration::ZERO);
    let client = redis::Client::open(stack.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL")
        .arg(names::endpoint_key(&id))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let deliveries = stack.js.get_stream(names::DELIVERIES_STREAM).await.unwrap();
    deliveries
        .purge()
        .filter(names::probe_schedule_subject("acme", &id))
        .await
        .unwrap();

    // A new deliverer finds them and delivers every one.
    stack.start_service("deliverer");
    stack
        .eventually(Duration::from_secs(30), "every parked delivery", || async {
            (distinct(&receiver, "/down").len() == 31).then_some(())
        })
        .await;
    stack
        .eventually(Duration::from_secs(10), "nothing parked", || async {
            (parked(&stack, &id).await == 0).then_some(())
        })
        .await;
    stack.stop().await;
}

/// Resolves every name to an address where nothing listens (the
/// endpoint's failure: connection refused), then fails as a resolver does
/// (Herald's own failure), then to the receiver.
#[derive(Clone, Default)]
struct SwitchedResolver {
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

const REFUSED: u8 = 0;
const BROKEN: u8 = 1;
const MENDED: u8 = 2;

impl SwitchedResolver {
    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }
}

impl herald_deliverer::guard::Lookup for SwitchedResolver {
    fn lookup(&self, _host: &str) -> herald_deliverer::guard::LookupFuture {
        let mode = self.mode.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            match mode {
                REFUSED => Ok(vec![std::net::Ipv4Addr::new(127, 0, 0, 2).into()]),
                BROKEN => Err(std::io::Error::other(
                    "Temporary failure in name resolution",
                )),
                _ => Ok(vec![std::net::Ipv4Addr::LOCALHOST.into()]),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_probe_stopped_by_heralds_own_failure_does_not_spin() {
    let resolver = SwitchedResolver::default();
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_RETRY_SCHEDULE", "1s,1h")
            .env("HERALD_DISABLE_AFTER", "100")
            .resolver(resolver.clone()),
    )
    .await;
    let receiver = Receiver::start().await;
    let url = format!("http://hook.example:{}/spin", receiver.addr().port());
    let id = create(&stack, &url).await;
    first_event_fails(&stack, &id).await;
    // The probe, a second later, cannot resolve the name: Herald's own
    // failure, with the probe claimed.
    resolver.set(BROKEN);
    stack
        .publish_numbered("acme", "workflow.completed", "evt", 5)
        .await;
    stack
        .eventually(Duration::from_secs(20), "6 deliveries parked", || async {
            (parked(&stack, &id).await >= 5).then_some(())
        })
        .await;
    let before = parkings(&stack).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = parkings(&stack).await - before;
    eprintln!("8 s of a probe failing for Herald's own reason: {during} parkings");
    // Each parking was a delivery taken out and parked again behind a
    // claimed probe, its timer set for a time already past: once, ten a
    // second until the 45 s claim lapsed.
    assert!(during <= 4, "{during} parkings in 8 s: a loop");

    // Mended, the probe goes out (its wait has grown to 8 s at most
    // meanwhile) and everything follows.
    resolver.set(MENDED);
    stack
        .eventually(Duration::from_secs(30), "every delivery", || async {
            (distinct(&receiver, "/spin").len() == 6).then_some(())
        })
        .await;
    stack.stop().await;
}

async fn set_attempts_max_bytes(stack: &Stack, max_bytes: i64) {
    let mut stream = stack.js.get_stream(names::ATTEMPTS_STREAM).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_bytes = max_bytes;
    stack.js.update_stream(config).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disable_concludes_its_backlog_at_stream_speed_and_a_reenable_delivers_what_waits() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_RETRY_SCHEDULE", "1s,1h")
            .env("HERALD_DISABLE_AFTER", "1"),
    )
    .await;
    let receiver = Receiver::start().await;
    receiver.fail_for("/dead", 500, Duration::from_secs(3_600));
    let dead = stack
        .create_webhook(json!({"name": "dead", "url": receiver.url("/dead"), "event_types": ["workflow.completed"]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    const BACKLOG: usize = 3_000;
    park(&stack, &dead, "evt_old", BACKLOG).await;
    // Its first failure, then its probe (the oldest parked) disables it.
    stack
        .publish("acme", "workflow.completed", json!({"id": "evt_new"}))
        .await;
    stack
        .wait_webhook(&dead, "enabled", json!(false), Duration::from_secs(30))
        .await;
    stack
        .eventually(Duration::from_secs(30), "the backlog concluded", || async {
            (parked(&stack, &dead).await == 0).then_some(())
        })
        .await;
    // Every one is in the log, failed `webhook_disabled`; how fast, as the
    // stream stored their records (once 21–85 a second, one by one).
    let drained = stack
        .eventually(Duration::from_secs(30), "every delivery logged", || async {
            let drained: Vec<_> = stack
                .attempts_stored(&dead)
                .await
                .into_iter()
                .filter(|(a, _)| a.failure_reason == "webhook_disabled" && a.request.is_none())
                .map(|(_, at)| at)
                .collect();
            (drained.len() == BACKLOG).then_some(drained)
        })
        .await;
    let took = Duration::from_nanos(
        (*drained.iter().max().unwrap() - *drained.iter().min().unwrap()) as u64,
    );
    let rate = BACKLOG as f64 / took.as_secs_f64().max(0.001);
    eprintln!(
        "a disabled webhook's {BACKLOG} parked deliveries logged failed in {took:?}: {rate:.0} a second"
    );
    assert!(rate >= 2_000.0, "{rate:.0} deliveries concluded a second");

    // Another webhook's backlog, its conclusion stalled midway (the
    // attempts stream is full after about a third of it): re-enabled
    // meanwhile, what still waits is delivered, not marked failed.
    let again = stack
        .create_webhook(json!({"name": "again", "url": receiver.url("/again"), "event_types": ["workflow.failed"]}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    receiver.fail_for("/again", 500, Duration::from_secs(3_600));
    park(&stack, &again, "evt_again", BACKLOG).await;
    let mut attempts = stack.js.get_stream(names::ATTEMPTS_STREAM).await.unwrap();
    let state = attempts.info().await.unwrap().state.clone();
    let per_record = state.bytes / state.messages.max(1);
    set_attempts_max_bytes(&stack, (state.bytes + per_record * 1_000) as i64).await;
    stack
        .publish("acme", "workflow.failed", json!({"id": "evt_again_new"}))
        .await;
    stack
        .wait_webhook(&again, "enabled", json!(false), Duration::from_secs(30))
        .await;
    // Concluding has stalled: nothing moves for 2 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = u64::MAX;
    loop {
        let now = parked(&stack, &again).await;
        if now == last && now < BACKLOG as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stalled: {now} parked"
        );
        last = now;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    receiver.fail_for("/again", 500, Duration::ZERO);
    let (status, body) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{again}"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    set_attempts_max_bytes(&stack, -1).await;
    // Each delivery is either delivered or logged failed (recover finds
    // those): none is left waiting, and what still waited at the re-enable
    // was delivered, not marked failed afterwards.
    stack
        .eventually(
            Duration::from_secs(40),
            "every delivery concluded",
            || async {
                let failed = stack
                    .attempts_stored(&again)
                    .await
                    .iter()
                    .filter(|(a, _)| a.failure_reason == "webhook_disabled" && a.request.is_none())
                    .count();
                let delivered = distinct(&receiver, "/again").len();
                // (`delivered` counts the probe's failed request too.)
                (failed + delivered == BACKLOG + 1 && parked(&stack, &again).await == 0)
                    .then_some((failed, delivered))
            },
        )
        .await;
    let failed = BACKLOG + 1 - distinct(&receiver, "/again").len();
    eprintln!("re-enabled midway: {failed} of {BACKLOG} logged failed, the rest delivered");
    assert!(
        failed < BACKLOG / 2,
        "{failed} of {BACKLOG} marked failed after the re-enable"
    );
    stack.stop().await;
}

/// Tenants' names: `*.hang.example` never answers, `gone.example` does not
/// exist, every other name is this machine.
struct TenantNames;

impl herald_deliverer::guard::Lookup for TenantNames {
    fn lookup(&self, host: &str) -> herald_deliverer::guard::LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            if host.ends_with("hang.example") {
                std::future::pending().await
            } else if host == "gone.example" {
                Err(std::io::Error::other("Name or service not known"))
            } else {
                Ok(vec![std::net::Ipv4Addr::LOCALHOST.into()])
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_broken_dns_is_its_own_failure_and_starves_no_one() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_RESOLVE_GRACE", "3s")
            .env("HERALD_RETRY_SCHEDULE", "1s,1s,1s,1s,1s,1s,1s,1s")
            .env("HERALD_DISABLE_AFTER", "100")
            .resolver(TenantNames),
    )
    .await;
    let receiver = Receiver::start().await;
    // Each answer closes its connection: every delivery looks its name up.
    receiver.script(
        "/ok",
        vec![herald_e2e::Reply::status(200).header("connection", "close")],
    );
    let port = receiver.addr().port();
    let hang = create(&stack, &format!("http://www.hang.example:{port}/hang")).await;
    let gone = create(&stack, &format!("http://gone.example:{port}/gone")).await;
    create(&stack, &format!("http://ok.example:{port}/ok")).await;

    // Events, four a second, for 12 s.
    const EVENTS: usize = 48;
    let load = SteadyLoad::start(Duration::from_millis(250));
    for i in 0..EVENTS {
        load.publish(&stack, i, json!({"id": format!("evt_{i}")}))
            .await;
        if i == 8 {
            // A name that does not exist is the endpoint's failure at once.
            let webhook = stack.webhook(&gone).await;
            assert_eq!(webhook["state"], "failing", "{webhook}");
            // A name that hangs, within its grace: Herald's, nothing counted.
            let webhook = stack.webhook(&hang).await;
            assert_eq!(webhook["state"], "healthy", "{webhook}");
            assert!(stack.attempts_stored(&hang).await.is_empty());
        }
    }
    // Past the grace, with other names resolving all along: its own.
    let webhook = stack
        .eventually(
            Duration::from_secs(20),
            "the hanging name failing",
            || async {
                let webhook = stack.webhook(&hang).await;
                (webhook["state"] == "failing").then_some(webhook)
            },
        )
        .await;
    assert!(
        webhook["last_error"]
            .as_str()
            .unwrap()
            .contains("while other names resolve"),
        "{webhook}"
    );
    // Everyone else's lookups went on: every event arrived, each about when
    // it was published.
    stack
        .eventually(Duration::from_secs(10), "every event delivered", || async {
            (distinct(&receiver, "/ok").len() == EVENTS).then_some(())
        })
        .await;
    let last = receiver.received("/ok").last().unwrap().at;
    assert!(
        last.duration_since(load.start.into_std()) < Duration::from_secs(16),
        "the healthy webhook fell behind"
    );
    stack.stop().await;
}

/// Every name is an address of this machine where nothing listens
/// (connection refused) until the network is back, then the receiver's.
#[derive(Clone, Default)]
struct Egress {
    back: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl herald_deliverer::guard::Lookup for Egress {
    fn lookup(&self, _host: &str) -> herald_deliverer::guard::LookupFuture {
        let back = self.back.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            Ok(vec![if back {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::new(127, 0, 0, 2).into()
            }])
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_endpoint_failing_at_once_is_heralds_network_and_disables_none() {
    let egress = Egress::default();
    let stack = Stack::start_with(
        Options::default()
            .env(
                "HERALD_RETRY_SCHEDULE",
                "300ms,300ms,300ms,300ms,300ms,300ms",
            )
            .env("HERALD_DISABLE_AFTER", "2")
            .resolver(egress.clone()),
    )
    .await;
    let receiver = Receiver::start().await;
    let port = receiver.addr().port();
    const HOOKS: usize = 8;
    let mut ids = Vec::new();
    for i in 0..HOOKS {
        ids.push(create(&stack, &format!("http://r{i}.example:{port}/r{i}")).await);
    }
    stack
        .publish_numbered("acme", "workflow.completed", "evt", 3)
        .await;
    // Three failed probes 300 ms apart would disable a webhook: 8 s of
    // every connection failing disables none.
    tokio::time::sleep(Duration::from_secs(8)).await;
    for id in &ids {
        let webhook = stack.webhook(id).await;
        assert_eq!(webhook["enabled"], true, "{webhook}");
    }
    // The network is back: everything arrives.
    egress.back.store(true, std::sync::atomic::Ordering::SeqCst);
    stack
        .eventually(Duration::from_secs(40), "every delivery", || async {
            (0..HOOKS)
                .all(|i| distinct(&receiver, &format!("/r{i}")).len() == 3)
                .then_some(())
        })
        .await;
    stack.stop().await;
}
