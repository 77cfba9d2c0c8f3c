//! Recover and replay end to end (PRODUCT.md, "Recover and replay"): after
//! an outage one call sends a webhook every delivery it missed, with the
//! webhook-ids it first had; a replay backfills a new webhook from the
//! retained events; both run as jobs whose progress the API shows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use herald_core::payload;
use herald_e2e::{Options, Receiver, Stack, TENANT_KEY};
use serde_json::{Value, json};

async fn job_done(stack: &Stack, webhook: &str, job: &Value) -> Value {
    let path = format!("/webhooks/{webhook}/jobs/{}", job["id"].as_str().unwrap());
    stack
        .eventually(Duration::from_secs(60), "the job finished", || async {
            let (status, job) = stack.api("GET", &path, None).await;
            assert_eq!(status, 200, "{job}");
            (job["status"] != "running").then_some(job)
        })
        .await
}

/// The webhook-id of each event id `path` received with `status`.
fn ids_by_event(receiver: &Receiver, path: &str) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in receiver.received(path) {
        let event = serde_json::from_slice::<Value>(&r.body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        out.entry(event)
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
    for i in 0..5 {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("evt_lost_{i}")}),
            )
            .await;
    }
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

    let (status, job) = stack
        .api("POST", &path, Some(json!({"since": since})))
        .await;
    assert_eq!(status, 202, "{job}");
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
    let (status, again) = stack
        .api("POST", &path, Some(json!({"since": since})))
        .await;
    assert_eq!(status, 202, "{again}");
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
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": "evt_other", "attributes": {"workflow": "hr"}}),
        )
        .await;
    stack
        .publish(
            "acme",
            "workflow.failed",
            json!({"id": "evt_failed", "attributes": {"workflow": "billing"}}),
        )
        .await;
    stack
        .publish(
            "globex",
            "workflow.completed",
            json!({"id": "evt_globex", "attributes": {"workflow": "billing"}}),
        )
        .await;
    // Matched (to nothing) before the webhook exists.
    stack.wait_matched().await;
    let webhook = stack
        .create_webhook(json!({"name": "new", "url": receiver.url("/new"),
            "event_types": ["workflow.completed"], "filters": {"workflow": ["billing"]}}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    let path = format!("/webhooks/{id}/replay");

    let (status, job) = stack
        .api("POST", &path, Some(json!({"since": since})))
        .await;
    assert_eq!(status, 202, "{job}");
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
    let (_, again) = stack
        .api("POST", &path, Some(json!({"since": since})))
        .await;
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
    let n = 300;
    for i in 0..n {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("evt_bulk_{i}")}),
            )
            .await;
    }
    // All matched (to nothing) before the webhook exists: the replay alone
    // sends them.
    stack.wait_matched().await;
    let webhook = stack
        .create_webhook(json!({"name": "bulk", "url": receiver.url("/slow"),
            "event_types": ["workflow.completed"]}))
        .await;
    let id = webhook["id"].as_str().unwrap().to_owned();
    let (status, job) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/replay"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let job_path = format!("/webhooks/{id}/jobs/{}", job["id"].as_str().unwrap());
    stack
        .eventually(Duration::from_secs(30), "the job under way", || async {
            let (_, job) = stack.api("GET", &job_path, None).await;
            (job["queued"].as_u64().unwrap_or(0) >= 20).then_some(())
        })
        .await;
    // Paced: never far ahead of what the receiver has taken.
    let (_, mid) = stack.api("GET", &job_path, None).await;
    assert!(mid["queued"].as_u64().unwrap() < n, "{mid}");
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
    assert_eq!(got.len(), n as usize);
    let received = receiver.received("/slow").len();
    assert_eq!(received, n as usize, "each event sent once");
    stack.stop().await;
}
