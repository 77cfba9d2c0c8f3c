//! Recover and replay end to end (PRODUCT.md, "Recover and replay"): after
//! an outage one call sends a webhook every delivery it missed, with the
//! webhook-ids it first had; a replay backfills a new webhook from the
//! retained events; both run as jobs whose progress the API shows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_core::payload;
use herald_e2e::{Options, Receiver, Stack, TENANT_KEY};
use serde_json::{Value, json};

/// Starts a `kind` job ("recover" or "replay") on webhook `id` for what
/// came since `since`; answers the job as the API accepted it (202).
async fn start_job(stack: &Stack, id: &str, kind: &str, since: &str) -> Value {
    let (status, job) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/{kind}"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    job
}

async fn job_done(stack: &Stack, webhook: &str, job: &Value) -> Value {
    job_until(
        stack,
        webhook,
        job,
        "the job finished",
        Duration::from_secs(60),
        |j| j["status"] != "running",
    )
    .await
}

/// The webhook-id of each event id `path` received with `status`.
fn ids_by_event(receiver: &Receiver, path: &str) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in receiver.received(path) {
        out.entry(r.event_id())
            .or_default()
            .insert(r.header("webhook-id").unwrap().to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_sends_what_an_outage_lost_with_its_webhook_ids_once() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_RETRY_SCHEDULE", "200ms")
            .env("HERALD_DISABLE_AFTER", "1000"),
    )
    .await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    // Down long enough for every delivery to run out of attempts.
    receiver.fail_for("/r", 500, Duration::from_secs(8));
    let webhook = stack
        .create_webhook(json!({"name": "r", "url": receiver.url("/r"),
            "event_types": ["workflow.completed"]}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    stack
        .publish_numbered("acme", "workflow.completed", "evt_lost", 5)
        .await;
    stack
        .eventually(Duration::from_secs(30), "every delivery failed", || async {
            let (_, logs) = stack
                .api("GET", &format!("/webhooks/{id}/logs?status=failed"), None)
                .await;
            (logs["data"].as_array().map_or(0, Vec::len) == 5).then_some(())
        })
        .await;
    let failed_ids = ids_by_event(&receiver, "/r");
    assert_eq!(failed_ids.len(), 5);
    // The URL is back.
    tokio::time::sleep(Duration::from_secs(8)).await;

    // Refused: a bad window, another organization's webhook.
    let path = format!("/webhooks/{id}/recover");
    let (status, error) = stack
        .api("POST", &path, Some(json!({"since": "last tuesday"})))
        .await;
    assert_eq!(
        (status, error["error"]["field"].clone()),
        (400, json!("since")),
        "{error}"
    );
    let (status, _) = stack
        .api_as(
            TENANT_KEY,
            None,
            "POST",
            &path,
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 404);

    let job = start_job(&stack, &id, "recover", &since).await;
    assert_eq!(job["status"], "running");
    let done = job_done(&stack, &id, &job).await;
    assert_eq!(
        (
            done["status"].clone(),
            done["queued"].clone(),
            done["delivered"].clone(),
            done["failed"].clone()
        ),
        (json!("done"), json!(5), json!(5), json!(0)),
        "{done}"
    );
    // Each event arrived once more, under the webhook-id it failed with.
    let after = ids_by_event(&receiver, "/r");
    assert_eq!(after, failed_ids, "same webhook-ids");
    assert_eq!(receiver.answered("/r", 200), 5);
    let (_, logs) = stack
        .api(
            "GET",
            &format!("/webhooks/{id}/logs?status=succeeded"),
            None,
        )
        .await;
    let logs = logs["data"].as_array().unwrap().clone();
    assert_eq!(logs.len(), 5);
    assert!(logs.iter().all(|l| l["kind"] == "recover"), "{logs:?}");

    // Running it again delivers nothing twice.
    let again = start_job(&stack, &id, "recover", &since).await;
    let again = job_done(&stack, &id, &again).await;
    assert_eq!(again["queued"], 0, "{again}");
    assert_eq!(receiver.answered("/r", 200), 5);

    // Another organization cannot read the job; a disabled webhook refuses.
    let job_path = format!("/webhooks/{id}/jobs/{}", job["id"].as_str().unwrap());
    let (status, _) = stack.api_as(TENANT_KEY, None, "GET", &job_path, None).await;
    assert_eq!(status, 404);
    let (status, _) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, error) = stack
        .api("POST", &path, Some(json!({"since": since})))
        .await;
    assert_eq!(
        (status, error["error"]["code"].clone()),
        (409, json!("webhook_disabled"))
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_backfills_a_new_webhook_with_what_it_matches_now() {
    let stack = Stack::start().await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    // Events published before the webhook existed.
    for i in 0..3 {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("evt_old_{i}"), "attributes": {"workflow": "billing"}}),
            )
            .await;
    }
    stack
        .publish_each([
            (
                "acme",
                "workflow.completed",
                json!({"id": "evt_other", "attributes": {"workflow": "hr"}}),
            ),
            (
                "acme",
                "workflow.failed",
                json!({"id": "evt_failed", "attributes": {"workflow": "billing"}}),
            ),
            (
                "globex",
                "workflow.completed",
                json!({"id": "evt_globex", "attributes": {"workflow": "billing"}}),
            ),
        ])
        .await;
    // Matched (to nothing) before the webhook exists.
    stack.wait_matched().await;
    let webhook = stack
        .create_webhook(json!({"name": "new", "url": receiver.url("/new"),
            "event_types": ["workflow.completed"], "filters": {"workflow": ["billing"]}}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    let path = format!("/webhooks/{id}/replay");

    let job = start_job(&stack, &id, "replay", &since).await;
    let done = job_done(&stack, &id, &job).await;
    assert_eq!(
        (
            done["status"].clone(),
            done["queued"].clone(),
            done["delivered"].clone()
        ),
        (json!("done"), json!(3), json!(3)),
        "{done}"
    );
    let first = ids_by_event(&receiver, "/new");
    let events: HashSet<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(
        events,
        HashSet::from(["evt_old_0", "evt_old_1", "evt_old_2"])
    );

    // A second replay is new deliveries: new webhook-ids, so a receiver that
    // deduplicated the first still takes them.
    let again = start_job(&stack, &id, "replay", &since).await;
    assert_eq!(job_done(&stack, &id, &again).await["delivered"], 3);
    let second = ids_by_event(&receiver, "/new");
    for (event, ids) in &second {
        assert_eq!(ids.len(), 2, "{event}: {ids:?}");
    }

    // event_types narrows what the webhook matches; it never widens it.
    let (_, narrowed) = stack
        .api(
            "POST",
            &path,
            Some(json!({"since": since, "event_types": ["workflow.failed"]})),
        )
        .await;
    assert_eq!(job_done(&stack, &id, &narrowed).await["queued"], 0);
    let (status, error) = stack
        .api(
            "POST",
            &path,
            Some(json!({"since": since, "event_types": ["not a type!"]})),
        )
        .await;
    assert_eq!(
        (status, error["error"]["field"].clone()),
        (400, json!("event_types"))
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_survives_its_admin_stopping_and_sends_each_event_once() {
    let mut stack = Stack::start().await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    // Slow enough that the job is still queueing when admin stops.
    receiver.script(
        "/slow",
        vec![herald_e2e::Reply::status(200).delay(Duration::from_millis(500)); 400],
    );
    let n: usize = 300;
    stack
        .publish_numbered("acme", "workflow.completed", "evt_bulk", n)
        .await;
    // All matched (to nothing) before the webhook exists: the replay alone
    // sends them.
    stack.wait_matched().await;
    let webhook = stack
        .create_webhook(json!({"name": "bulk", "url": receiver.url("/slow"),
            "event_types": ["workflow.completed"]}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    let job = start_job(&stack, &id, "replay", &since).await;
    let job_path = format!("/webhooks/{id}/jobs/{}", job["id"].as_str().unwrap());
    stack
        .eventually(Duration::from_secs(30), "the job under way", || async {
            let (_, job) = stack.api("GET", &job_path, None).await;
            (job["queued"].as_u64().unwrap_or(0) >= 20).then_some(())
        })
        .await;
    // Paced: never far ahead of what the receiver has taken.
    let (_, mid) = stack.api("GET", &job_path, None).await;
    assert!(mid["queued"].as_u64().unwrap() < n as u64, "{mid}");
    stack.stop_service("admin", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.start_service("admin");
    stack.wait_ready().await;
    let done = job_done(&stack, &id, &job).await;
    assert_eq!(
        (
            done["status"].clone(),
            done["queued"].clone(),
            done["delivered"].clone()
        ),
        (json!("done"), json!(n), json!(n)),
        "{done}"
    );
    let got = ids_by_event(&receiver, "/slow");
    assert_eq!(got.len(), n);
    let received = receiver.received("/slow").len();
    assert_eq!(received, n, "each event sent once");
    stack.stop().await;
}

/// Polls a job until `ready` says it is what the caller waits for.
async fn job_until(
    stack: &Stack,
    webhook: &str,
    job: &Value,
    what: &str,
    timeout: Duration,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/webhooks/{webhook}/jobs/{}", job["id"].as_str().unwrap());
    stack
        .eventually(timeout, what, || async {
            let (status, job) = stack.api("GET", &path, None).await;
            assert_eq!(status, 200, "{job}");
            ready(&job).then_some(job)
        })
        .await
}

/// Publishes `n` events before the webhook exists (matched to nothing), so
/// a replay alone sends them; the webhook, to `path` of `receiver`.
async fn webhook_with_a_backlog(
    stack: &Stack,
    receiver: &Receiver,
    path: &str,
    n: usize,
) -> String {
    stack
        .publish_numbered("acme", "workflow.completed", "evt_backlog", n)
        .await;
    stack.wait_matched().await;
    let webhook = stack
        .create_webhook(json!({"name": "backlog", "url": receiver.url(path),
            "event_types": ["workflow.completed"]}))
        .await;
    webhook["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_job_shows_its_progress_and_is_cancelled_and_its_webhook_is_free_again() {
    let stack = Stack::start().await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    // One second a reply: the job runs for a while.
    receiver.script(
        "/slow",
        vec![herald_e2e::Reply::status(200).delay(Duration::from_secs(1)); 400],
    );
    let n = 300;
    let id = webhook_with_a_backlog(&stack, &receiver, "/slow", n).await;
    let job = start_job(&stack, &id, "replay", &since).await;
    let job_path = format!("/webhooks/{id}/jobs/{}", job["id"].as_str().unwrap());

    // Progress is visible while it runs: outcomes are counted as they come.
    let mid = job_until(
        &stack,
        &id,
        &job,
        "deliveries counted while the job runs",
        Duration::from_secs(30),
        |j| j["status"] == "running" && j["delivered"].as_u64().unwrap_or(0) >= 5,
    )
    .await;
    assert!(mid["queued"].as_u64().unwrap() >= 5, "{mid}");

    // Another organization cannot see it, nor cancel it; an unknown job is 404.
    let cancel = format!("{job_path}/cancel");
    let (status, _) = stack.api_as(TENANT_KEY, None, "POST", &cancel, None).await;
    assert_eq!(status, 404);
    let (status, error) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/jobs/job_nothing/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 404, "{error}");

    let (status, cancelled) = stack.api("POST", &cancel, None).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["finished_at"].is_string(), "{cancelled}");

    // The runner stops: what reaches the receiver settles far short of the
    // backlog (what was queued before the cancel is still delivered).
    let mut last = receiver.received("/slow").len();
    let mut stable = 0;
    stack
        .eventually(Duration::from_secs(40), "deliveries to settle", || {
            let now = receiver.received("/slow").len();
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                (stable >= 8).then_some(())
            }
        })
        .await;
    let settled = receiver.received("/slow").len();
    let queued_at_cancel = cancelled["queued"].as_u64().unwrap() as usize;
    assert!(
        settled < n / 2 && settled <= queued_at_cancel + 2 * herald_admin::jobs::PACE as usize,
        "{settled} delivered of {n} after a cancel at {cancelled}"
    );
    // Its runner did not overwrite the cancel.
    let (_, after) = stack.api("GET", &job_path, None).await;
    assert_eq!(after["status"], "cancelled", "{after}");

    // Cancelling it again is a conflict that says why.
    let (status, error) = stack.api("POST", &cancel, None).await;
    assert_eq!(
        (status, error["error"]["code"].clone()),
        (409, json!("job_finished")),
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{error}"
    );

    // The webhook is free for a new job at once.
    let next = start_job(&stack, &id, "recover", &since).await;
    let next = job_done(&stack, &id, &next).await;
    assert_eq!(next["status"], "done", "{next}");
    // A finished job cannot be cancelled either.
    let (status, _) = stack
        .api(
            "POST",
            &format!(
                "/webhooks/{id}/jobs/{}/cancel",
                next["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(status, 409);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_cannot_count_its_outcomes_fails_with_the_reason() {
    let stack = Stack::start().await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    receiver.script(
        "/slow",
        vec![herald_e2e::Reply::status(200).delay(Duration::from_secs(5)); 10],
    );
    let id = webhook_with_a_backlog(&stack, &receiver, "/slow", 3).await;
    let job = start_job(&stack, &id, "replay", &since).await;
    job_until(
        &stack,
        &id,
        &job,
        "every delivery queued",
        Duration::from_secs(30),
        |j| j["queued"] == 3,
    )
    .await;

    // The attempts stream goes away under the job: its outcomes can no
    // longer be counted.
    stack
        .js
        .delete_stream(herald_core::names::ATTEMPTS_STREAM)
        .await
        .expect("delete the attempts stream");
    let ended = job_done(&stack, &id, &job).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    let reason = ended["error"].as_str().unwrap_or_default();
    assert!(reason.contains("count"), "the reason: {ended}");

    // Put it back; the webhook takes a new job at once.
    let nats = herald_platform::config::Nats::from_source(&stack.env).unwrap();
    herald_platform::nats::ensure_streams(
        &stack.js,
        1,
        &nats.streams,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("streams back");
    let next = start_job(&stack, &id, "recover", &since).await;
    assert_eq!(job_done(&stack, &id, &next).await["status"], "done");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_job_runner_reads_no_job_records() {
    let stack = Stack::start().await;
    let since = payload::rfc3339_ms(herald_platform::now_ms() - 1_000);
    let receiver = Receiver::start().await;
    let webhook = stack
        .create_webhook(json!({"name": "quiet", "url": receiver.url("/q"),
            "event_types": ["workflow.completed"]}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    // A week's worth of finished jobs, in miniature.
    for _ in 0..5 {
        let job = start_job(&stack, &id, "recover", &since).await;
        assert_eq!(job_done(&stack, &id, &job).await["status"], "done");
    }
    // Every JetStream API request about the jobs bucket (listing keys makes
    // a consumer, reading a record is a direct get), for five idle seconds.
    let mut requests = stack
        .client
        .subscribe("$JS.API.>")
        .await
        .expect("subscribe");
    stack.client.flush().await.unwrap();
    let mut seen = Vec::new();
    let window = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            Some(request) = futures::StreamExt::next(&mut requests) => {
                if request.subject.contains("herald-jobs") {
                    seen.push(request.subject.to_string());
                }
            }
        }
    }
    assert!(
        seen.is_empty(),
        "an idle runner touches the jobs bucket: {seen:?}"
    );

    // It still picks up a new job at once, through its watch.
    let job = start_job(&stack, &id, "recover", &since).await;
    assert_eq!(job_done(&stack, &id, &job).await["status"], "done");
    stack.stop().await;
}
