//! Delivery logs: paging, filters, the detail view and its masking,
//! idempotent writes, retention bounds, rebuild after Redis loses its data,
//! the test and retry routes, and what another organization cannot see.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{ids, names, proto};
use herald_e2e::{Options, Receiver, Reply, Stack, TENANT_KEY, fill_redis};
use herald_platform::log_index::{Cursor, LogIndex, Query, Stored};
use herald_platform::redis::Redis;
use herald_test_support::{RedisCluster, RedisServer};
use prost::Message;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A made-up attempt `n` of `webhook_id`, `n` ms·10 older than `base_ms`.
fn attempt(
    org: &str,
    webhook_id: &str,
    n: u32,
    status: proto::AttemptStatus,
    event_type: &str,
    base_ms: i64,
) -> proto::AttemptResult {
    let delivery_id = format!("msg_{webhook_id}_{n:05}");
    let mut a = proto::AttemptResult {
        log_id: ids::log_id(&delivery_id, 1),
        delivery_id,
        organization_id: org.into(),
        webhook_id: webhook_id.into(),
        event_id: format!("evt_{n}"),
        event_type: event_type.into(),
        attempt: 1,
        request: Some(proto::HttpRequest {
            method: "POST".into(),
            url: "http://127.0.0.1:9/hook".into(),
            headers: vec![proto::Header {
                name: "content-type".into(),
                value: "application/json".into(),
            }],
            body: format!(r#"{{"id":"evt_{n}"}}"#).into_bytes().into(),
            ..Default::default()
        }),
        response: Some(proto::HttpResponse {
            status: 200,
            ..Default::default()
        }),
        duration_ms: 3,
        attempted_at_ms: base_ms - n as i64 * 10,
        ..Default::default()
    };
    a.set_status(status);
    a
}

async fn publish_attempt(stack: &Stack, a: &proto::AttemptResult, msg_id: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::MSG_ID_HEADER, msg_id);
    stack
        .js
        .publish_with_headers(
            names::attempt_subject(&a.organization_id, &a.webhook_id),
            headers,
            a.encode_to_vec().into(),
        )
        .await
        .expect("publish attempt")
        .await
        .expect("attempt ack");
}

/// Publishes attempts `ns` of `webhook_id` (organization `acme`), each
/// with its log id as the message id.
async fn publish_attempts(
    stack: &Stack,
    webhook_id: &str,
    ns: std::ops::Range<u32>,
    status: proto::AttemptStatus,
    event_type: &str,
    base_ms: i64,
) {
    for n in ns {
        let a = attempt("acme", webhook_id, n, status, event_type, base_ms);
        publish_attempt(stack, &a, &a.log_id).await;
    }
}

async fn wait_total(stack: &Stack, path: &str, total: u64) -> Value {
    wait_total_within(stack, path, total, WAIT).await
}

/// Waits up to `timeout` until the log list at `path` counts `total`.
async fn wait_total_within(stack: &Stack, path: &str, total: u64, timeout: Duration) -> Value {
    stack
        .eventually(timeout, &format!("{path} total {total}"), || async {
            let (status, body) = stack.api("GET", path, None).await;
            (status == 200 && body["total"] == total).then_some(body)
        })
        .await
}

/// Waits until log-writer's `/ready` answers 200 (`ready`), or 503 for
/// its log index (not `ready`).
async fn wait_log_writer_ready(stack: &Stack, ready: bool) {
    let url = stack.health_url("HERALD_LOG_WRITER_HEALTH_ADDR", "/ready");
    let what = format!("log-writer ready: {ready}");
    stack
        .eventually(WAIT, &what, || async {
            let (status, body) = stack.get(&url).await.ok()?;
            let seen = if ready {
                status == 200
            } else {
                status == 503 && body.contains("\"log_index\":false")
            };
            seen.then_some(())
        })
        .await;
}

/// log-writer's `/metrics` text.
async fn log_writer_metrics(stack: &Stack) -> String {
    let url = stack.health_url("HERALD_LOG_WRITER_HEALTH_ADDR", "/metrics");
    stack.get(&url).await.expect("log-writer metrics").1
}

/// Sets the ACL rule of a Redis's default user (`-@write`: reads only).
async fn set_default_user(conn: &mut redis::aio::MultiplexedConnection, rule: &str) {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(rule)
        .query_async::<()>(conn)
        .await
        .unwrap();
}

async fn webhook(stack: &Stack, url: &str, extra: Value) -> (String, String) {
    let mut body = json!({"name": "logs", "url": url, "event_types": ["workflow.>"]});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let created = stack.create_webhook(body).await;
    (
        created["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    )
}

/// A webhook whose filter no published event passes: its log holds
/// exactly the attempts a test publishes for it.
async fn hand_fed_webhook(stack: &Stack, url: &str) -> String {
    let filters = json!({"filters": {"workflow": ["only-these-logs"]}});
    webhook(stack, url, filters).await.0
}

fn ids_of(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn flushall(stack: &Stack) {
    let client = redis::Client::open(stack.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_filters_and_organizations() {
    let stack = Stack::start().await;
    let (id, _) = webhook(&stack, "http://127.0.0.1:9/a", json!({})).await;
    let (other, _) = webhook(&stack, "http://127.0.0.1:9/b", json!({})).await;
    let base = now_ms();
    let status_of = |n: u32| match n % 4 {
        0 => proto::AttemptStatus::Failed,
        1 => proto::AttemptStatus::Retrying,
        _ => proto::AttemptStatus::Succeeded,
    };
    let type_of = |n: u32| {
        if n.is_multiple_of(3) {
            "workflow.failed"
        } else {
            "workflow.completed"
        }
    };
    for n in 0..120 {
        let a = attempt("acme", &id, n, status_of(n), type_of(n), base);
        publish_attempt(&stack, &a, &a.log_id).await;
    }
    for n in 0..5 {
        let a = attempt(
            "acme",
            &other,
            n,
            proto::AttemptStatus::Succeeded,
            "worker.connected",
            base - 5,
        );
        publish_attempt(&stack, &a, &a.log_id).await;
    }
    let path = format!("/webhooks/{id}/logs");
    wait_total(&stack, &path, 120).await;
    wait_total(&stack, "/webhooks/logs/all", 125).await;

    // Pages of 50, newest first, without overlaps or gaps.
    let expected: Vec<String> = (0..120)
        .map(|n| ids::log_id(&format!("msg_{id}_{n:05}"), 1))
        .collect();
    let mut seen = Vec::new();
    for (offset, len) in [(0, 50), (50, 50), (100, 20), (150, 0)] {
        let (status, page) = stack
            .api("GET", &format!("{path}?limit=50&offset={offset}"), None)
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 120);
        assert_eq!(page["limit"], 50);
        assert_eq!(page["offset"], offset);
        assert_eq!(page["data"].as_array().unwrap().len(), len);
        seen.extend(ids_of(&page));
    }
    assert_eq!(seen, expected);

    // The default page is 50; a summary says what happened.
    let (_, page) = stack.api("GET", &path, None).await;
    assert_eq!(page["limit"], 50);
    assert_eq!(page["data"].as_array().unwrap().len(), 50);
    let first = &page["data"][0];
    assert_eq!(first["webhook_id"], id.as_str());
    assert_eq!(first["event_id"], "evt_0");
    assert_eq!(first["event_type"], "workflow.failed");
    assert_eq!(first["status"], "failed");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["response_status"], 200);

    // Status filter.
    for (status, count) in [("failed", 30), ("retrying", 30), ("succeeded", 60)] {
        let (code, page) = stack
            .api("GET", &format!("{path}?status={status}&limit=500"), None)
            .await;
        assert_eq!(code, 200);
        assert_eq!(page["total"], count, "{status}");
        let data = page["data"].as_array().unwrap();
        assert_eq!(data.len(), count);
        assert!(data.iter().all(|e| e["status"] == status));
    }
    let (_, page) = stack
        .api("GET", &format!("{path}?status=skipped"), None)
        .await;
    assert_eq!(page["total"], 0);

    // The organization's logs, by event type. `/webhooks/logs/all` is not
    // taken for a webhook called "logs".
    let (code, page) = stack
        .api(
            "GET",
            "/webhooks/logs/all?event_type=workflow.failed&limit=500",
            None,
        )
        .await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["total"], 40);
    assert!(
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["event_type"] == "workflow.failed")
    );
    let (_, page) = stack
        .api(
            "GET",
            "/webhooks/logs/all?event_type=worker.connected",
            None,
        )
        .await;
    assert_eq!(page["total"], 5);
    assert!(ids_of(&page).iter().all(|l| l.contains(&other)));
    let (_, page) = stack
        .api("GET", "/webhooks/logs/all?limit=10&offset=118", None)
        .await;
    assert_eq!(page["total"], 125);
    assert_eq!(page["data"].as_array().unwrap().len(), 7);

    // Another organization sees none of it.
    let log_id = &expected[0];
    for path in [
        format!("/webhooks/{id}/logs"),
        format!("/webhooks/{id}/logs/{log_id}"),
    ] {
        let (code, body) = stack.api_as(TENANT_KEY, None, "GET", &path, None).await;
        assert_eq!(code, 404, "{path}: {body}");
    }
    let (code, body) = stack
        .api_as(
            TENANT_KEY,
            None,
            "POST",
            &format!("/webhooks/{id}/logs/{log_id}/retry"),
            None,
        )
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, page) = stack
        .api_as(TENANT_KEY, None, "GET", "/webhooks/logs/all", None)
        .await;
    assert_eq!((code, page["total"].clone()), (200, json!(0)));
    // Not even through a webhook of its own.
    let (code, own) = stack
        .api_as(
            TENANT_KEY,
            None,
            "POST",
            "/webhooks",
            Some(
                json!({"name": "g", "url": "http://127.0.0.1:9/g", "event_types": ["workflow.>"]}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{own}");
    let own = own["id"].as_str().unwrap();
    let (code, _) = stack
        .api_as(
            TENANT_KEY,
            None,
            "GET",
            &format!("/webhooks/{own}/logs/{log_id}"),
            None,
        )
        .await;
    assert_eq!(code, 404);
    // Nor through another webhook of the same organization.
    let (code, _) = stack
        .api("GET", &format!("/webhooks/{other}/logs/{log_id}"), None)
        .await;
    assert_eq!(code, 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_parameters_are_400s() {
    let stack = Stack::start().await;
    let (id, _) = webhook(&stack, "http://127.0.0.1:9/a", json!({})).await;
    let cases = [
        (format!("/webhooks/{id}/logs?limit=0"), "limit"),
        (format!("/webhooks/{id}/logs?limit=501"), "limit"),
        (format!("/webhooks/{id}/logs?limit=ten"), "limit"),
        (format!("/webhooks/{id}/logs?limit=-1"), "limit"),
        (format!("/webhooks/{id}/logs?offset=-1"), "offset"),
        (format!("/webhooks/{id}/logs?offset=1.5"), "offset"),
        (format!("/webhooks/{id}/logs?status=bogus"), "status"),
        ("/webhooks/logs/all?limit=1000".to_owned(), "limit"),
        ("/webhooks/logs/all?offset=x".to_owned(), "offset"),
        (
            "/webhooks/logs/all?event_type=a..b".to_owned(),
            "event_type",
        ),
        ("/webhooks/logs/all?event_type=*".to_owned(), "event_type"),
    ];
    for (path, field) in cases {
        let (status, body) = stack.api("GET", &path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "validation_failed", "{path}");
        assert_eq!(body["error"]["field"], field, "{path}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    for path in [
        format!("/webhooks/{id}/logs?limit=500&offset=0"),
        format!("/webhooks/{id}/logs?limit=1&status="),
        "/webhooks/logs/all?limit=1".to_owned(),
    ] {
        let (status, body) = stack.api("GET", &path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = stack.api("GET", "/webhooks/wh_missing/logs", None).await;
    assert_eq!(status, 404);
    let (status, _) = stack
        .api("GET", &format!("/webhooks/{id}/logs/msg_missing-1"), None)
        .await;
    assert_eq!(status, 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attempt_delivered_twice_is_stored_once() {
    let stack = Stack::start().await;
    let (id, _) = webhook(&stack, "http://127.0.0.1:9/a", json!({})).await;
    let base = now_ms();
    let twice = attempt(
        "acme",
        &id,
        1,
        proto::AttemptStatus::Succeeded,
        "workflow.completed",
        base,
    );
    // Different Nats-Msg-Id, so JetStream keeps both messages.
    publish_attempt(&stack, &twice, "first").await;
    publish_attempt(&stack, &twice, "second").await;
    let after = attempt(
        "acme",
        &id,
        2,
        proto::AttemptStatus::Failed,
        "workflow.completed",
        base,
    );
    publish_attempt(&stack, &after, "third").await;
    let info = stack
        .js
        .get_stream(names::ATTEMPTS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 3, "the stream holds both copies");
    // The consumer stores in stream order, so once the third is visible the
    // duplicate has been written too.
    let path = format!("/webhooks/{id}/logs");
    let page = stack
        .eventually(WAIT, "third attempt", || async {
            let (_, page) = stack.api("GET", &path, None).await;
            ids_of(&page).contains(&after.log_id).then_some(page)
        })
        .await;
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(
        ids_of(&page),
        vec![twice.log_id.clone(), after.log_id.clone()]
    );
    let (_, all) = stack.api("GET", "/webhooks/logs/all", None).await;
    assert_eq!(all["total"], 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detail_shows_request_and_response_with_secrets_masked() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (id, shown) = webhook(
        &stack,
        &format!("{}?token=hunter2&page=1", receiver.url("/hook")),
        json!({"secret": secret, "headers": {"X-Api-Key": "k-123456", "X-Echo": secret}}),
    )
    .await;
    assert_eq!(shown, secret);
    // First attempt: a 500 that echoes the secret; then a 10 KiB answer.
    receiver.script(
        "/hook",
        vec![
            Reply::status(500)
                .header("x-echo", secret)
                .header("set-cookie", "session=abc")
                .body(&format!("no thanks {secret}")),
            Reply::status(200).body(&"x".repeat(10 * 1024)),
        ],
    );
    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": "evt_detail", "attributes": {"workflow": "w"}, "data": {"n": 1}}),
        )
        .await;
    receiver.wait_for("/hook", 2, WAIT).await;
    let path = format!("/webhooks/{id}/logs");
    let list = wait_total(&stack, &path, 2).await;
    let mut bodies = vec![list.to_string()];

    // Retries are listed, newest first.
    let data = list["data"].as_array().unwrap();
    assert_eq!(data[0]["attempt"], 2);
    assert_eq!(data[0]["status"], "succeeded");
    assert_eq!(data[1]["attempt"], 1);
    assert_eq!(data[1]["status"], "retrying");
    assert_eq!(data[1]["error"], "HTTP 500");
    assert!(data[1]["next_attempt_at"].is_string());
    assert_eq!(data[0]["delivery_id"], data[1]["delivery_id"]);

    let first_id = data[1]["id"].as_str().unwrap();
    let (status, first) = stack.api("GET", &format!("{path}/{first_id}"), None).await;
    assert_eq!(status, 200, "{first}");
    bodies.push(first.to_string());
    assert_eq!(first["id"], first_id);
    assert_eq!(first["event_id"], "evt_detail");
    assert_eq!(first["kind"], "event");
    assert!(first["duration_ms"].is_u64());
    assert!(first["next_attempt_at"].is_string());
    let request = &first["request"];
    assert_eq!(request["method"], "POST");
    let url = request["url"].as_str().unwrap();
    assert!(url.starts_with(&receiver.url("/hook")), "{url}");
    assert!(!url.contains("hunter2") && url.contains("page=1"), "{url}");
    let header = |h: &Value, name: &str| -> String {
        h.as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"].as_str().unwrap().eq_ignore_ascii_case(name))
            .map(|x| x["value"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("header {name} in {h}"))
    };
    assert_eq!(header(&request["headers"], "webhook-signature"), "********");
    assert_eq!(
        header(&request["headers"], "x-webhook-signature"),
        "********"
    );
    assert_eq!(header(&request["headers"], "x-api-key"), "********");
    assert_eq!(header(&request["headers"], "x-echo"), "********");
    assert_eq!(
        header(&request["headers"], "content-type"),
        "application/json"
    );
    assert_eq!(request["body_base64"], false);
    let sent: Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["id"], "evt_detail");
    assert_eq!(sent["data"], json!({"n": 1}));
    let response = &first["response"];
    assert_eq!(response["status"], 500);
    assert_eq!(response["body"], "no thanks ********");
    assert_eq!(response["body_base64"], false);
    assert_eq!(response["body_truncated"], false);
    assert_eq!(header(&response["headers"], "x-echo"), "********");
    assert_eq!(header(&response["headers"], "set-cookie"), "********");

    // The second answer was cut at 8 KiB.
    let second_id = data[0]["id"].as_str().unwrap();
    let (_, second) = stack.api("GET", &format!("{path}/{second_id}"), None).await;
    bodies.push(second.to_string());
    assert_eq!(second["response"]["status"], 200);
    assert_eq!(second["response"]["body_truncated"], true);
    assert_eq!(second["response"]["body"].as_str().unwrap().len(), 8 * 1024);
    assert!(second["next_attempt_at"].is_null());

    let (_, all) = stack.api("GET", "/webhooks/logs/all", None).await;
    bodies.push(all.to_string());
    let key = secret.strip_prefix("whsec_").unwrap();
    for body in &bodies {
        assert!(!body.contains(key), "secret in a log response: {body}");
        assert!(!body.contains("k-123456"), "api key in a log response");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_and_retry_deliver_now_and_show_in_the_logs() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    // Disabled, and subscribed to another type: a test still goes out.
    let (id, _) = webhook(
        &stack,
        &receiver.url("/t"),
        json!({"enabled": false, "event_types": ["worker.connected"]}),
    )
    .await;
    receiver.script("/t", vec![Reply::status(500), Reply::status(204)]);

    let (status, queued) = stack
        .api("POST", &format!("/webhooks/{id}/test"), None)
        .await;
    assert_eq!(status, 202, "{queued}");
    let delivery_id = queued["delivery_id"].as_str().unwrap().to_owned();
    let log_id = queued["log_id"].as_str().unwrap().to_owned();
    let got = receiver.wait_for("/t", 1, WAIT).await;
    assert_eq!(got[0].header("webhook-id"), Some(delivery_id.as_str()));
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["type"], "workflow.completed");
    assert_eq!(body["webhook_id"], id.as_str());
    let event_id = body["id"].as_str().unwrap().to_owned();

    // It failed, and a test is not retried.
    let path = format!("/webhooks/{id}/logs/{log_id}");
    let entry = stack
        .eventually(WAIT, "test attempt", || async {
            let (status, entry) = stack.api("GET", &path, None).await;
            (status == 200).then_some(entry)
        })
        .await;
    assert_eq!(entry["kind"], "test");
    assert_eq!(entry["status"], "failed");
    assert_eq!(entry["response"]["status"], 500);
    assert!(entry["next_attempt_at"].is_null());
    assert_eq!(entry["delivery_id"], delivery_id.as_str());

    // Retry it: the same event, delivered again now.
    let (status, again) = stack.api("POST", &format!("{path}/retry"), None).await;
    assert_eq!(status, 202, "{again}");
    let retry_delivery = again["delivery_id"].as_str().unwrap();
    assert_ne!(retry_delivery, delivery_id);
    let got = receiver.wait_for("/t", 2, WAIT).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].header("webhook-id"), Some(retry_delivery));
    let body: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(body["id"], event_id.as_str());
    assert_eq!(body["type"], "workflow.completed");

    let logs = wait_total(&stack, &format!("/webhooks/{id}/logs"), 2).await;
    assert_eq!(logs["data"][0]["id"], again["log_id"]);
    assert_eq!(logs["data"][0]["kind"], "manual_retry");
    assert_eq!(logs["data"][0]["status"], "succeeded");
    assert_eq!(logs["data"][0]["event_id"], event_id.as_str());

    // Unknown webhook, unknown log, another organization: 404.
    for (key, method, path) in [
        (
            herald_e2e::API_KEY,
            "POST",
            "/webhooks/wh_missing/test".to_owned(),
        ),
        (
            herald_e2e::API_KEY,
            "POST",
            format!("/webhooks/{id}/logs/msg_x-1/retry"),
        ),
        (TENANT_KEY, "POST", format!("/webhooks/{id}/test")),
    ] {
        let (status, body) = stack.api_as(key, None, method, &path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_index_is_rebuilt_after_redis_loses_it() {
    let mut stack =
        Stack::start_with(Options::default().env("HERALD_LOG_INDEX_CHECK", "200ms")).await;
    let (id, _) = webhook(&stack, "http://127.0.0.1:9/a", json!({})).await;
    let base = now_ms();
    publish_attempts(
        &stack,
        &id,
        0..30,
        proto::AttemptStatus::Succeeded,
        "workflow.completed",
        base,
    )
    .await;
    let path = format!("/webhooks/{id}/logs?limit=500");
    let before = wait_total(&stack, &path, 30).await;

    flushall(&stack).await;
    // Everything was acked long ago: only a replay can bring it back.
    let after = wait_total(&stack, &path, 30).await;
    assert_eq!(ids_of(&after), ids_of(&before));
    let (_, all) = stack.api("GET", "/webhooks/logs/all", None).await;
    assert_eq!(all["total"], 30);

    // Redis restarted empty: the same.
    stack.redis.restart();
    wait_total(&stack, &path, 30).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rebuild_command_restores_the_index() {
    // Checks so rare that only the command can rebuild within the test.
    let stack = Stack::start_with(Options::default().env("HERALD_LOG_INDEX_CHECK", "1h")).await;
    let (id, _) = webhook(&stack, "http://127.0.0.1:9/a", json!({})).await;
    let base = now_ms();
    publish_attempts(
        &stack,
        &id,
        0..12,
        proto::AttemptStatus::Failed,
        "workflow.failed",
        base,
    )
    .await;
    let path = format!("/webhooks/{id}/logs");
    wait_total(&stack, &path, 12).await;
    flushall(&stack).await;
    let (_, empty) = stack.api("GET", &path, None).await;
    assert_eq!(empty["total"], 0);

    let config = herald_log_writer::Config::from_source(&stack.env).unwrap();
    herald_log_writer::rebuild_now(config, stack.shutdown.clone())
        .await
        .expect("rebuild");
    let (_, page) = stack.api("GET", &path, None).await;
    assert_eq!(page["total"], 12);
    let (_, page) = stack
        .api("GET", "/webhooks/logs/all?event_type=workflow.failed", None)
        .await;
    assert_eq!(page["total"], 12);
    stack.stop().await;
}

fn index(redis: &RedisServer) -> LogIndex {
    let redis = Redis::new(&redis.url(), Duration::from_secs(2)).unwrap();
    LogIndex::new(redis, Duration::from_secs(60))
}

fn query(webhook: Option<&str>) -> Query {
    Query {
        org: "acme".into(),
        webhook_id: webhook.map(str::to_owned),
        limit: 500,
        ..Default::default()
    }
}

fn stored(attempts: &[proto::AttemptResult], first_seq: u64) -> Vec<Stored> {
    attempts
        .iter()
        .enumerate()
        .map(|(i, a)| Stored {
            attempt: a.clone(),
            seq: first_seq + i as u64,
        })
        .collect()
}

fn log_ids(page: &herald_platform::log_index::Page) -> Vec<String> {
    page.items
        .iter()
        .map(|e| e.attempt.log_id.clone())
        .collect()
}

#[tokio::test]
async fn the_index_keeps_the_retention_for_every_webhook_however_busy() {
    let server = RedisServer::start();
    let index = index(&server);
    let base = now_ms();
    let kind = |n: u32| {
        if n.is_multiple_of(2) {
            "workflow.completed"
        } else {
            "workflow.failed"
        }
    };
    let status = |n: u32| {
        if n.is_multiple_of(3) {
            proto::AttemptStatus::Failed
        } else {
            proto::AttemptStatus::Succeeded
        }
    };
    let busy: Vec<_> = (0..300)
        .map(|n| attempt("acme", "wh_busy", n, status(n), kind(n), base))
        .collect();
    let quiet: Vec<_> = (0..5)
        .map(|n| attempt("acme", "wh_quiet", n, status(n), kind(n), base))
        .collect();
    // Older than the retention: not stored.
    let stale = attempt("acme", "wh_quiet", 99, status(0), kind(0), base - 61_000);
    // Written oldest first, as they happen; twice, which changes nothing.
    for _ in 0..2 {
        for (i, a) in busy.iter().enumerate().rev() {
            index
                .write(&stored(std::slice::from_ref(a), 1 + i as u64))
                .await
                .unwrap();
        }
        index.write(&stored(&quiet, 1000)).await.unwrap();
        index
            .write(&stored(std::slice::from_ref(&stale), 2000))
            .await
            .unwrap();
    }

    // Nothing of a busy webhook is forgotten inside the retention.
    let page = index.page(&query(Some("wh_busy"))).await.unwrap();
    assert_eq!(page.total, Some(300));
    let newest: Vec<_> = busy.iter().map(|a| a.log_id.clone()).collect();
    assert_eq!(log_ids(&page), newest[..300]);
    // Lists carry summaries, and where the attempt is in the stream.
    let first = &page.items[0];
    assert!(first.attempt.request.is_none());
    assert_eq!(first.attempt.response.as_ref().map(|r| r.status), Some(200));
    assert_eq!(first.seq, 1);
    assert_eq!(first.attempt.webhook_id, "wh_busy");
    assert_eq!(first.attempt.event_id, "evt_0");
    assert_eq!(first.attempt.attempted_at_ms, busy[0].attempted_at_ms);
    let found = index
        .get("acme", "wh_busy", &busy[7].log_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.seq, 8);
    assert_eq!(found.attempt.delivery_id, busy[7].delivery_id);
    assert!(
        index
            .get("acme", "wh_quiet", &busy[7].log_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        index
            .get("acme", "wh_quiet", &stale.log_id)
            .await
            .unwrap()
            .is_none()
    );

    let total = |q: Query| {
        let index = index.clone();
        async move { index.page(&q).await.unwrap().total }
    };
    assert_eq!(total(query(None)).await, Some(305));
    let by_type = |t: &str| Query {
        event_type: Some(t.into()),
        ..query(None)
    };
    assert_eq!(
        total(by_type("workflow.completed")).await.unwrap()
            + total(by_type("workflow.failed")).await.unwrap(),
        305
    );
    let by_status = |s: &str| Query {
        status: Some(s.into()),
        ..query(Some("wh_busy"))
    };
    assert_eq!(total(by_status("failed")).await, Some(100));
    assert_eq!(total(by_status("succeeded")).await, Some(200));
    assert_eq!(total(query(Some("wh_quiet"))).await, Some(5));

    // Pages beyond the end are empty, not errors.
    let page = index
        .page(&Query {
            offset: 305,
            limit: 10,
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!((page.total, page.items.len()), (Some(305), 0));

    // Every key expires with the retention.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("herald:log*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for key in keys {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((1..=60).contains(&ttl), "{key} ttl {ttl}");
    }
}

#[tokio::test]
async fn cursors_time_windows_and_lookups() {
    let server = RedisServer::start();
    let index = index(&server);
    let base = now_ms();
    let mut attempts: Vec<_> = (0..120)
        .map(|n| {
            attempt(
                "acme",
                if n % 3 == 0 { "wh_a" } else { "wh_b" },
                n,
                if n % 4 == 0 {
                    proto::AttemptStatus::Throttled
                } else {
                    proto::AttemptStatus::Succeeded
                },
                "workflow.completed",
                base,
            )
        })
        .collect();
    // Three attempts of one event's delivery to wh_a, one a manual retry
    // (a delivery of its own).
    let delivery = ids::delivery_id("acme", "evt_x", "wh_a");
    for (n, log_id, delivery_id) in [
        (1, ids::log_id(&delivery, 1), delivery.clone()),
        (2, ids::throttled_log_id(&delivery, 2, 1), delivery.clone()),
        (3, "msg_manual-1".to_owned(), "msg_manual".to_owned()),
    ] {
        let mut a = attempt(
            "acme",
            "wh_a",
            500 + n,
            proto::AttemptStatus::Failed,
            "workflow.failed",
            base,
        );
        a.log_id = log_id;
        a.delivery_id = delivery_id;
        a.event_id = "evt_x".into();
        attempts.push(a);
    }
    index.write(&stored(&attempts, 1)).await.unwrap();

    // A cursor walks every attempt once, newest first, while newer ones
    // arrive in between.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut arrivals = 0;
    loop {
        let page = index
            .page(&Query {
                limit: 17,
                cursor: cursor.clone(),
                ..query(None)
            })
            .await
            .unwrap();
        seen.extend(log_ids(&page));
        let newer = attempt(
            "acme",
            "wh_c",
            arrivals,
            proto::AttemptStatus::Succeeded,
            "workflow.completed",
            base + 20_000,
        );
        index
            .write(&stored(
                std::slice::from_ref(&newer),
                5_000 + arrivals as u64,
            ))
            .await
            .unwrap();
        arrivals += 1;
        match page.next_cursor {
            Some(next) => cursor = Some(Cursor::parse(&next.encode()).unwrap()),
            None => break,
        }
    }
    let mut expected: Vec<_> = attempts.clone();
    expected.sort_by(|a, b| (b.attempted_at_ms, &b.log_id).cmp(&(a.attempted_at_ms, &a.log_id)));
    let expected: Vec<String> = expected.into_iter().map(|a| a.log_id).collect();
    assert_eq!(seen, expected);

    // The same through a filter that reads the webhook's list, and through
    // a status list.
    for (webhook, status, count) in [
        (Some("wh_b"), Some("succeeded"), 60),
        (None, Some("throttled"), 30),
        (Some("wh_a"), Some("failed"), 3),
    ] {
        let mut seen = 0;
        let mut cursor = None;
        loop {
            let page = index
                .page(&Query {
                    limit: 7,
                    cursor: cursor.clone(),
                    status: status.map(str::to_owned),
                    ..query(webhook)
                })
                .await
                .unwrap();
            assert!(
                page.items
                    .iter()
                    .all(
                        |e| Some(herald_platform::log_index::status_name(e.attempt.status()))
                            == status
                    )
            );
            seen += page.items.len();
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, count, "{webhook:?} {status:?}");
    }

    // since is inclusive, until exclusive.
    let window = index
        .page(&Query {
            since_ms: Some(base - 500),
            until_ms: Some(base - 200),
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(window.total, Some(30));
    assert!(
        window
            .items
            .iter()
            .all(|e| (base - 500..base - 200).contains(&e.attempt.attempted_at_ms))
    );

    // What happened to this event: its delivery's attempts and the retry.
    let by_event = index
        .page(&Query {
            event_id: Some("evt_x".into()),
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(by_event.total, Some(3));
    assert!(
        by_event
            .items
            .iter()
            .all(|e| e.attempt.webhook_id == "wh_a" && e.attempt.event_id == "evt_x")
    );
    let by_delivery = index
        .page(&Query {
            delivery_id: Some(delivery.clone()),
            ..query(Some("wh_a"))
        })
        .await
        .unwrap();
    assert_eq!(by_delivery.total, Some(2));
    let none = index
        .page(&Query {
            delivery_id: Some(delivery.clone()),
            ..query(Some("wh_b"))
        })
        .await
        .unwrap();
    assert_eq!(none.total, Some(0));
}

/// Redis bytes of everything the index holds, per attempt.
async fn index_bytes(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("herald:logs:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut total = 0;
    for key in keys {
        let bytes: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        eprintln!("{key}: {bytes}");
        total += bytes;
    }
    total
}

#[tokio::test]
async fn redis_holds_under_400_bytes_per_attempt_whatever_the_event_size() {
    const N: u32 = 3_000;
    let webhook = herald_core::ids::new_webhook_id();
    for size in [1024, 64 * 1024] {
        let server = RedisServer::start();
        let index = index(&server);
        let base = now_ms();
        let data = "x".repeat(size);
        let mut seq = 1;
        for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
            let batch: Vec<_> = chunk
                .iter()
                .map(|&n| {
                    let mut a = attempt(
                        "acme",
                        &webhook,
                        n,
                        proto::AttemptStatus::Succeeded,
                        "workflow.completed",
                        base,
                    );
                    // Ids as Herald makes them: a UUIDv7-based event id,
                    // the delivery id derived from it.
                    a.event_id = format!("evt_{}", uuid_like(n));
                    let delivery = ids::delivery_id("acme", &a.event_id, &webhook);
                    a.log_id = ids::log_id(&delivery, 1);
                    a.delivery_id = delivery;
                    a.request.as_mut().unwrap().body =
                        format!(r#"{{"data":"{data}"}}"#).into_bytes().into();
                    a
                })
                .collect();
            let batch = stored(&batch, seq);
            seq += batch.len() as u64;
            index.write(&batch).await.unwrap();
        }
        let per_attempt = index_bytes(&server.url()).await / N as u64;
        eprintln!("{size} B events: {per_attempt} B of Redis per attempt");
        assert!(
            per_attempt <= 400,
            "{size} B events: {per_attempt} B per attempt"
        );
    }
}

/// An event id as long as a UUID-based one.
fn uuid_like(n: u32) -> String {
    format!("{n:032x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_index_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_REDIS_URL", &cluster.url())
            .env("HERALD_LOG_INDEX_CHECK", "200ms"),
    )
    .await;
    let receiver = Receiver::start().await;
    let (id, _) = webhook(&stack, &receiver.url("/c"), json!({})).await;
    let base = now_ms();
    publish_attempts(
        &stack,
        &id,
        0..40,
        proto::AttemptStatus::Succeeded,
        "workflow.completed",
        base,
    )
    .await;
    // A real delivery too, for the detail read back from the stream.
    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": "evt_cluster", "attributes": {"workflow": "w"}}),
        )
        .await;
    let path = format!("/webhooks/{id}/logs?limit=500");
    let before = wait_total(&stack, &path, 41).await;
    let (_, first) = stack
        .api("GET", &format!("/webhooks/{id}/logs?limit=20"), None)
        .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = stack
        .api(
            "GET",
            &format!("/webhooks/{id}/logs?limit=30&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(second["data"].as_array().unwrap().len(), 21);
    assert!(second["next_cursor"].is_null());
    let (_, found) = stack
        .api(
            "GET",
            &format!("/webhooks/{id}/logs?event_id=evt_cluster"),
            None,
        )
        .await;
    assert_eq!(found["total"], 1, "{found}");
    let log_id = found["data"][0]["id"].as_str().unwrap();
    let (status, detail) = stack
        .api("GET", &format!("/webhooks/{id}/logs/{log_id}"), None)
        .await;
    assert_eq!(status, 200, "{detail}");
    assert!(
        detail["request"]["body"]
            .as_str()
            .unwrap()
            .contains("evt_cluster")
    );

    // Every node flushed: the index is rebuilt from the stream.
    for url in cluster.node_urls() {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let after = wait_total(&stack, &path, 41).await;
    assert_eq!(ids_of(&after), ids_of(&before));
    stack.stop().await;
}

/// A full index Redis (maxmemory, noeviction): log-writer says so and keeps
/// the attempts in the stream, the failure counters in the other Redis
/// still disable a failing webhook, and once there is room the index
/// catches up with everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_index_redis_loses_nothing_and_counters_keep_working() {
    let small = RedisServer::start_small();
    let mut stack = Stack::start_with(
        Options::default()
            .env("HERALD_LOG_REDIS_URL", &small.url())
            .env("HERALD_DISABLE_AFTER", "1"),
    )
    .await;
    let client = redis::Client::open(small.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Fill it up to its limit.
    fill_redis(&small).await;
    // Its filter keeps the event below (for the other webhook) away from it:
    // its log holds exactly the 50 attempts published here.
    let id = hand_fed_webhook(&stack, "http://127.0.0.1:9/full").await;
    let base = now_ms();
    // A Redis just filled may still take one write (its memory dips back
    // under the limit once the refused SET is gone), so one attempt goes
    // first, alone (the log-writer gathers what comes within 10 ms into
    // one write), and the rest after it.
    for (range, pause) in [(0..1, Duration::from_millis(500)), (1..50, Duration::ZERO)] {
        publish_attempts(
            &stack,
            &id,
            range,
            proto::AttemptStatus::Succeeded,
            "workflow.completed",
            base,
        )
        .await;
        tokio::time::sleep(pause).await;
    }
    // log-writer says so, and keeps the attempts in the stream.
    wait_log_writer_ready(&stack, false).await;
    let text = log_writer_metrics(&stack).await;
    assert!(text.contains("herald_log_index_full 1"), "{text}");
    let mut stream = stack.js.get_stream(names::ATTEMPTS_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 50);

    // Failure counting lives in the other Redis and still disables.
    let receiver = Receiver::start().await;
    receiver.script("/dead", vec![Reply::status(500); 10]);
    let (dead, _) = webhook(&stack, &receiver.url("/dead"), json!({})).await;
    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"id": "evt_full", "attributes": {"workflow": "w"}}),
        )
        .await;
    stack
        .eventually(Duration::from_secs(30), "webhook disabled", || async {
            let (_, body) = stack.api("GET", &format!("/webhooks/{dead}"), None).await;
            (body["enabled"] == false).then_some(())
        })
        .await;

    // Room again: the index catches up with everything.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // Catching up may take a while.
    wait_total_within(
        &stack,
        &format!("/webhooks/{id}/logs"),
        50,
        Duration::from_secs(60),
    )
    .await;
    wait_log_writer_ready(&stack, true).await;
    stack.redis.stop();
    drop(small);
    stack.stop().await;
}

/// Bytes a stream holds now.
async fn stream_bytes(stack: &Stack, name: &str) -> (u64, u64) {
    let mut stream = stack.js.get_stream(name).await.unwrap();
    let state = &stream.info().await.unwrap().state;
    (state.bytes, state.messages)
}

/// What a delivery leaves in NATS once it is done: the attempt record, a
/// little more than the body sent (no second copy of the event, headers
/// capped), and nothing in the work-queue stream of deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_done_delivery_leaves_its_attempt_and_no_work_behind() {
    const N: usize = 100;
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    stack
        .create_webhook(json!({
            "name": "sizes", "url": receiver.url("/sizes"), "event_types": ["workflow.completed"],
        }))
        .await;
    let mut delivered = 0;
    for size in [1024, 16 * 1024] {
        let (before, _) = stream_bytes(&stack, names::ATTEMPTS_STREAM).await;
        let data = "x".repeat(size);
        for i in 0..N {
            stack
                .publish(
                    "acme",
                    "workflow.completed",
                    json!({"id": format!("evt_{size}_{i}"), "data": data}),
                )
                .await;
        }
        delivered += N;
        let got = receiver.wait_for("/sizes", delivered, WAIT).await;
        let sent = got[delivered - N..]
            .iter()
            .map(|r| r.body.len())
            .sum::<usize>() as u64;
        let (after, _) = stack
            .eventually(WAIT, "every attempt stored", || async {
                let (bytes, messages) = stream_bytes(&stack, names::ATTEMPTS_STREAM).await;
                (messages >= delivered as u64).then_some((bytes, messages))
            })
            .await;
        let per_attempt = (after - before) / N as u64;
        let body = sent / N as u64;
        eprintln!(
            "{size} B of data: {body} B sent, {per_attempt} B of HERALD_ATTEMPTS per attempt"
        );
        assert!(
            per_attempt * 10 <= body * 12 + 10 * 1024,
            "{per_attempt} B per attempt for a {body} B body"
        );
    }
    stack
        .eventually(WAIT, "the deliveries stream empty", || async {
            let (bytes, messages) = stream_bytes(&stack, names::DELIVERIES_STREAM).await;
            (messages == 0).then_some(bytes)
        })
        .await;
    stack.stop().await;
}

/// An index Redis that refuses writes for longer than the consumer's
/// delivery budget (25 deliveries, a second apart when handed back) keeps
/// its data, so no rebuild would cover a dropped attempt: log-writer holds
/// the batch for as long as it takes, says so in health and metrics, and
/// indexes every attempt once Redis writes again. Meanwhile admin stays
/// ready and serves webhooks; only the log routes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_redis_failing_longer_than_the_delivery_budget_loses_nothing() {
    let index_redis = RedisServer::start();
    let stack =
        Stack::start_with(Options::default().env("HERALD_LOG_REDIS_URL", &index_redis.url())).await;
    let id = hand_fed_webhook(&stack, "http://127.0.0.1:9/failing").await;
    let base = now_ms();
    publish_attempts(
        &stack,
        &id,
        0..10,
        proto::AttemptStatus::Succeeded,
        "workflow.completed",
        base,
    )
    .await;
    wait_total(&stack, &format!("/webhooks/{id}/logs"), 10).await;

    // Writes refused (reads still answer, the index's marker stays).
    let client = redis::Client::open(index_redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    set_default_user(&mut conn, "-@write").await;
    publish_attempts(
        &stack,
        &id,
        10..30,
        proto::AttemptStatus::Failed,
        "workflow.completed",
        base,
    )
    .await;
    wait_log_writer_ready(&stack, false).await;
    let text = log_writer_metrics(&stack).await;
    assert!(text.contains("herald_log_index_waiting 1"), "{text}");
    // Longer than 25 hand-backs a second apart.
    tokio::time::sleep(Duration::from_secs(32)).await;
    let text = log_writer_metrics(&stack).await;
    assert!(text.contains("herald_log_index_waiting 1"), "{text}");
    assert!(
        !text.contains("herald_log_index_write_errors_total 0\n"),
        "errors counted: {text}"
    );

    set_default_user(&mut conn, "+@all").await;
    wait_total_within(
        &stack,
        &format!("/webhooks/{id}/logs"),
        30,
        Duration::from_secs(30),
    )
    .await;
    wait_log_writer_ready(&stack, true).await;
    drop(index_redis);
    stack.stop().await;
}

/// Sorted-set reads Redis has carried out so far, scripts' calls included.
async fn zset_reads(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| {
            [
                "zrevrange:",
                "zcount:",
                "zrangebyscore:",
                "zrange:",
                "zrevrangebyscore:",
            ]
            .iter()
            .any(|c| l.starts_with(&format!("cmdstat_{c}")))
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// An organization's log page reads the organization's own list and one
/// entry per row: the same work with 3 webhooks or 300 (the merge it
/// replaced read every webhook's list). Filtered pages read the list in
/// chunks, whatever the number of webhooks, and page on by cursor with
/// nothing shown twice.
#[tokio::test]
async fn an_organization_page_costs_the_same_whatever_its_number_of_webhooks() {
    let server = RedisServer::start();
    let index = index(&server);
    let base = now_ms();
    let mut reads = Vec::new();
    let mut seq = 1;
    for webhooks in [3usize, 300] {
        let org = format!("org-{webhooks}");
        let batch: Vec<_> = (0..webhooks * 4)
            .map(|n| {
                let webhook = format!("wh_{:032x}", n % webhooks);
                let event_type = ["workflow.completed", "workflow.failed"][n % 2];
                attempt(
                    &org,
                    &webhook,
                    n as u32,
                    proto::AttemptStatus::Succeeded,
                    event_type,
                    base,
                )
            })
            .collect();
        let batch = stored(&batch, seq);
        seq += batch.len() as u64;
        index.write(&batch).await.unwrap();
        let q = Query {
            org: org.clone(),
            limit: 10,
            ..Default::default()
        };
        let before = zset_reads(&server.url()).await;
        let page = index.page(&q).await.unwrap();
        reads.push(zset_reads(&server.url()).await - before);
        assert_eq!(page.items.len(), 10);
        assert_eq!(page.total, Some((webhooks * 4) as u64));
        let times: Vec<i64> = page
            .items
            .iter()
            .map(|e| e.attempt.attempted_at_ms)
            .collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
        assert!(
            page.items
                .iter()
                .all(|e| e.attempt.webhook_id.starts_with("wh_"))
        );

        // Filtered by event type: every page holds only that type, and the
        // pages together hold each such attempt once.
        let mut seen = std::collections::HashSet::new();
        let mut cursor = None;
        loop {
            let page = index
                .page(&Query {
                    event_type: Some("workflow.failed".into()),
                    cursor: cursor.clone(),
                    ..q.clone()
                })
                .await
                .unwrap();
            for e in &page.items {
                assert_eq!(e.attempt.event_type, "workflow.failed");
                assert!(seen.insert(e.attempt.log_id.clone()), "shown twice");
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), webhooks * 2);
    }
    eprintln!("sorted-set reads for one page: {reads:?} (3 webhooks, 300)");
    assert_eq!(reads[0], reads[1], "the same reads whatever the webhooks");
}
