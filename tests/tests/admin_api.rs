//! The admin API through HTTP, against a whole running Herald: every route,
//! every field at the edge of its limit, organizations, secrets (shown once,
//! encrypted at rest, rotated with an overlap), concurrent changes, and the
//! JSON error shape of every refusal.

use std::time::Duration;

use herald_core::{proto, signing};
use herald_e2e::{API_KEY, Options, Receiver, Stack, TENANT_KEY};
use herald_platform::webhooks::WebhookStore;
use prost::Message;
use serde_json::{Value, json};

const AUTH: (&str, &str) = ("authorization", "Bearer test-operator-key");
const JSON: (&str, &str) = ("content-type", "application/json");

fn minimal(url: &str) -> Value {
    json!({"name": "n", "url": url, "event_types": ["workflow.completed"]})
}

/// `base` with `field` set to `value`.
fn with(base: &Value, field: &str, value: Value) -> Value {
    let mut body = base.clone();
    body[field] = value;
    body
}

/// Asserts our error shape and answers `(code, field)`.
#[track_caller]
fn error_of(status: u16, expected: u16, body: &Value) -> (String, Option<String>) {
    assert_eq!(status, expected, "{body}");
    let error = &body["error"];
    assert!(error["message"].is_string(), "error shape: {body}");
    (
        error["code"].as_str().expect("code").to_owned(),
        error["field"].as_str().map(str::to_owned),
    )
}

async fn refused(stack: &Stack, body: Value, field: &str) {
    let (status, answer) = stack.api("POST", "/webhooks", Some(body.clone())).await;
    let (code, got_field) = error_of(status, 400, &answer);
    assert_eq!(code, "validation_failed", "{body} -> {answer}");
    assert_eq!(got_field.as_deref(), Some(field), "{body} -> {answer}");
}

async fn accepted(stack: &Stack, body: Value) -> Value {
    let (status, answer) = stack.api("POST", "/webhooks", Some(body.clone())).await;
    assert_eq!(status, 201, "{body} -> {answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_get_list_and_every_limit_at_its_edge() {
    let stack = Stack::start().await;
    let base = minimal("https://example.com/hook");

    let full = accepted(
        &stack,
        json!({
            "name": "invoices", "url": "https://example.com/in", "description": "d",
            "event_types": ["workflow.completed", "workflow.step.*", "worker.>"],
            "filters": {"workflow": ["invoice-approval"], "status": ["failed", "timed_*"]},
            "format": "xml", "headers": {"X-Tenant": "t1"}, "timeout_ms": 1500, "enabled": false,
        }),
    )
    .await;
    let id = full["id"].as_str().unwrap().to_owned();
    assert!(full["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(full["format"], "xml");
    assert_eq!(full["timeout_ms"], 1500);
    assert_eq!(full["enabled"], false);
    assert_eq!(full["disabled_reason"], Value::Null);
    // Header values are masked in every answer (their last four characters
    // from 8 on; nothing of a shorter one).
    assert_eq!(full["headers"], json!({"X-Tenant": "••••"}));
    assert_eq!(full["filters"]["status"], json!(["failed", "timed_*"]));
    assert!(full["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(full["created_at"], full["updated_at"]);

    let (status, got) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert_eq!(status, 200);
    let mut expected = full.clone();
    expected.as_object_mut().unwrap().remove("secret");
    assert_eq!(
        got, expected,
        "GET answers what create did, without the secret"
    );

    // Defaults.
    let plain = accepted(&stack, base.clone()).await;
    assert_eq!(plain["timeout_ms"], 5000);
    assert_eq!(plain["format"], "json");
    assert_eq!(plain["enabled"], true);
    assert_eq!(plain["description"], "");
    assert_eq!(plain["filters"], json!({}));

    let (status, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 2);
    assert_eq!(list["data"][0]["id"], id.as_str(), "oldest first");
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w.get("secret").is_none())
    );

    // Each limit at its edge: accepted at it, refused past it.
    let url_of = |n: usize| format!("https://example.com/{}", "a".repeat(n - 20));
    assert_eq!(url_of(2048).len(), 2048);
    for (field, value) in [
        ("name", json!("é".repeat(255))),
        ("url", json!(url_of(2048))),
        ("description", json!("d".repeat(1024))),
        ("timeout_ms", json!(30_000)),
        // Event types: exact or patterns.
        ("event_types", json!(["workflow.*", "workflow.>"])),
        ("headers", json!({"Authorization": "Bearer x"})),
    ] {
        accepted(&stack, with(&base, field, value)).await;
    }
    let own = accepted(&stack, with(&base, "secret", json!("s".repeat(255)))).await;
    assert_eq!(
        own["secret"],
        "s".repeat(255),
        "an own secret is shown once too"
    );

    // Each refusal names its field.
    let refusals = [
        ("name", json!("é".repeat(256))),
        ("name", json!("   ")),
        ("url", json!(url_of(2049))),
        ("url", json!("ftp://example.com/")),
        ("url", json!("not a url")),
        ("url", json!("https://u:p@example.com/")),
        ("description", json!("d".repeat(1025))),
        ("timeout_ms", json!(30_001)),
        ("timeout_ms", json!(0)),
        ("timeout_ms", json!(-1)),
        ("timeout_ms", json!("5000")),
        ("secret", json!("s".repeat(256))),
        ("secret", json!("")),
        ("format", json!("yaml")),
        // Event types are checked against the catalogue.
        ("event_types", json!([])),
        ("event_types", json!(["nothing.here"])),
        ("event_types", json!(["billing.*"])),
        ("event_types", json!(["workflow..x"])),
        ("event_types", json!(["workflow.>.x"])),
        ("event_types", json!("workflow.completed")),
        // Custom headers: CR/LF, bad names and values refused.
        ("headers", json!({"X-A": "a\r\nX-B: b"})),
        ("headers", json!({"X-A": "a\nb"})),
        ("headers", json!({"bad name": "v"})),
        ("headers", json!({"X-A": "caf\u{e9}"})),
        ("headers", json!({"X-A": "\u{84}"})),
        ("headers", json!({"X-A": "a\u{7f}"})),
        ("filters", json!({"workflow": []})),
        ("filters", json!({"a.b": ["x"]})),
        ("filters", json!({"workflow": [""]})),
        ("filters", json!({"workflow": "x"})),
        // Unknown and read-only fields.
        ("colour", json!("red")),
        ("id", json!("wh_mine")),
        ("disabled_reason", json!("x")),
    ];
    for (field, value) in refusals {
        refused(&stack, with(&base, field, value), field).await;
    }
    // Reserved header names.
    for name in [
        "Host",
        "content-type",
        "Content-Length",
        "Transfer-Encoding",
        "webhook-id",
        "Webhook-Signature",
        "X-Webhook-Signature",
        "x-webhook-anything",
    ] {
        refused(
            &stack,
            with(&base, "headers", json!({name: "v"})),
            "headers",
        )
        .await;
    }
    // Required fields: missing or null.
    for field in ["name", "url", "event_types"] {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(field);
        refused(&stack, body, field).await;
        refused(&stack, with(&base, field, Value::Null), field).await;
    }

    // The catalogue, and the document that describes the API.
    let (status, types) = stack.api("GET", "/event-types", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = types["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"workflow.completed") && names.contains(&"worker.disconnected"));
    assert!(types["data"][0]["description"].is_string());
    let (status, headers, doc) = stack.send("GET", "/openapi.json", &[], "").await;
    assert_eq!(status, 200, "no key needed for the description");
    assert_eq!(headers["content-type"], "application/json");
    let doc: Value = serde_json::from_slice(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/webhooks/{id}/rotate-secret"]["post"].is_object());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_refusal_is_json_in_our_shape() {
    let stack = Stack::start_with(Options::default().env("HERALD_ALLOW_HTTP", "false")).await;
    let body = minimal("https://example.com/hook").to_string();

    // 401: no key, a wrong key, another scheme; on every route but health.
    for (method, path) in [
        ("GET", "/webhooks"),
        ("POST", "/webhooks"),
        ("GET", "/webhooks/wh_x"),
        ("PATCH", "/webhooks/wh_x"),
        ("DELETE", "/webhooks/wh_x"),
        ("POST", "/webhooks/wh_x/rotate-secret"),
        ("GET", "/event-types"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic dGVzdA=="),
            Some("Bearer "),
        ] {
            let mut headers = vec![JSON];
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            let (status, h, bytes) = stack.send(method, path, &headers, body.clone()).await;
            assert_eq!(h["content-type"], "application/json", "{method} {path}");
            let json: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                error_of(status, 401, &json).0,
                "unauthorized",
                "{method} {path} {auth:?}"
            );
        }
    }
    let (status, _, _) = stack.send("GET", "/ready", &[], "").await;
    assert_eq!(status, 200, "health needs no key");

    let check = |status: u16, headers: &http::HeaderMap, bytes: &[u8], want: u16, code: &str| {
        assert_eq!(
            headers["content-type"],
            "application/json",
            "{want} {}",
            String::from_utf8_lossy(bytes)
        );
        let json: Value = serde_json::from_slice(bytes).expect("JSON error body");
        assert_eq!(error_of(status, want, &json).0, code, "{json}");
    };

    // 404 for an unknown route and an unknown webhook; 405 for a wrong method.
    let (s, h, b) = stack.send("GET", "/nothing/here", &[AUTH], "").await;
    check(s, &h, &b, 404, "not_found");
    let (s, h, b) = stack.send("GET", "/webhooks/wh_missing", &[AUTH], "").await;
    check(s, &h, &b, 404, "not_found");
    let (s, h, b) = stack.send("GET", "/webhooks/a%FFb", &[AUTH], "").await;
    assert!(s == 400 || s == 404, "{s}");
    check(
        s,
        &h,
        &b,
        s,
        if s == 400 { "bad_request" } else { "not_found" },
    );
    let (s, h, b) = stack
        .send("PUT", "/webhooks", &[AUTH, JSON], body.clone())
        .await;
    check(s, &h, &b, 405, "method_not_allowed");
    let (s, h, b) = stack.send("DELETE", "/event-types", &[AUTH], "").await;
    check(s, &h, &b, 405, "method_not_allowed");

    // 413: a body over the limit, declared or chunked.
    let big = format!(
        r#"{{"name":"n","url":"https://example.com/","event_types":["workflow.completed"],"description":"{}"}}"#,
        "x".repeat(herald_admin::MAX_BODY_BYTES)
    );
    let (s, h, b) = stack
        .send("POST", "/webhooks", &[AUTH, JSON], big.clone())
        .await;
    check(s, &h, &b, 413, "payload_too_large");
    let (s, h, b) = stack
        .send("PATCH", "/webhooks/wh_x", &[AUTH, JSON], big)
        .await;
    assert!(s == 413 || s == 404, "{s}");
    check(
        s,
        &h,
        &b,
        s,
        if s == 413 {
            "payload_too_large"
        } else {
            "not_found"
        },
    );

    // 415: a body not declared JSON; 400: a body that is not a JSON object.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let headers = [AUTH, ("content-type", content_type)];
        let (s, h, b) = stack
            .send("POST", "/webhooks", &headers, body.clone())
            .await;
        check(s, &h, &b, 415, "unsupported_media_type");
    }
    let (s, h, b) = stack.send("POST", "/webhooks", &[AUTH], body.clone()).await;
    check(s, &h, &b, 415, "unsupported_media_type");
    for bad in ["{", "[1,2]", "\"x\"", "null", "{\"name\": }"] {
        let (s, h, b) = stack.send("POST", "/webhooks", &[AUTH, JSON], bad).await;
        check(s, &h, &b, 400, "invalid_json");
    }
    let (s, h, b) = stack.send("POST", "/webhooks", &[AUTH, JSON], "").await;
    check(s, &h, &b, 400, "invalid_json");

    // An organization header that is not an organization id.
    let headers = [AUTH, ("x-organization-id", "Not Valid")];
    let (s, h, b) = stack.send("GET", "/webhooks", &headers, "").await;
    check(s, &h, &b, 400, "invalid_organization");

    // https only, unless the operator allows plain http.
    refused(&stack, minimal("http://example.com/hook"), "url").await;
    accepted(&stack, minimal("https://example.com/hook")).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_sees_only_its_own_organizations() {
    let stack = Stack::start().await;
    let body = minimal("https://example.com/hook");
    // The operator key: default organization acme, any other by header.
    let acme = accepted(&stack, body.clone()).await;
    let acme_id = acme["id"].as_str().unwrap().to_owned();
    let (status, globex) = stack
        .api_as(
            API_KEY,
            Some("globex"),
            "POST",
            "/webhooks",
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 201);
    let globex_id = globex["id"].as_str().unwrap().to_owned();

    // The tenant key's default organization is globex, and only it.
    let (status, list) = stack
        .api_as(TENANT_KEY, None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1);
    assert_eq!(list["data"][0]["id"], globex_id.as_str());
    let (status, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!((status, list["total"].clone()), (200, json!(1)));
    assert_eq!(list["data"][0]["id"], acme_id.as_str());

    // Another organization's webhook is a 404 on every route, never a 403.
    let acme_path = format!("/webhooks/{acme_id}");
    for (method, path, body) in [
        ("GET", acme_path.clone(), None),
        ("PATCH", acme_path.clone(), Some(json!({"name": "stolen"}))),
        ("DELETE", acme_path.clone(), None),
        ("POST", format!("{acme_path}/rotate-secret"), None),
        ("GET", format!("{acme_path}/logs"), None),
    ] {
        let (status, answer) = stack.api_as(TENANT_KEY, None, method, &path, body).await;
        assert_eq!(
            error_of(status, 404, &answer).0,
            "not_found",
            "{method} {path}"
        );
    }
    // Asking for another organization outright is a 404 too.
    let (status, answer) = stack
        .api_as(TENANT_KEY, Some("acme"), "GET", "/webhooks", None)
        .await;
    error_of(status, 404, &answer);
    let (status, answer) = stack
        .api_as(TENANT_KEY, Some("acme"), "POST", "/webhooks", Some(body))
        .await;
    error_of(status, 404, &answer);
    // The operator reading globex's webhook from acme does not find it either.
    let (status, _) = stack
        .api("GET", &format!("/webhooks/{globex_id}"), None)
        .await;
    assert_eq!(status, 404);

    // Nothing changed in acme.
    let (status, got) = stack.api("GET", &acme_path, None).await;
    assert_eq!((status, got["name"].clone()), (200, json!("n")));
    // The tenant key with its own organization named explicitly works.
    let (status, _) = stack
        .api_as(
            TENANT_KEY,
            Some("globex"),
            "GET",
            &format!("/webhooks/{globex_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    // The scheme is case-insensitive; the key is not.
    for auth in ["bearer test-operator-key", "BEARER  test-operator-key"] {
        let (status, _, _) = stack
            .send("GET", "/webhooks", &[("authorization", auth)], "")
            .await;
        assert_eq!(status, 200, "{auth}");
    }
    // Keys are compared whole: a prefix or a differently cased key is not one.
    for key in [
        "test-operator-ke",
        "TEST-OPERATOR-KEY",
        "test-operator-key2",
    ] {
        let (status, _) = stack.api_as(key, None, "GET", "/webhooks", None).await;
        assert_eq!(status, 401, "{key}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_changes_only_the_fields_given() {
    let stack = Stack::start().await;
    let created = accepted(
        &stack,
        json!({"name": "a", "url": "https://example.com/a", "description": "keep",
               "event_types": ["workflow.failed"], "filters": {"status": ["failed"]},
               "headers": {"X-A": "1"}, "timeout_ms": 2000}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/webhooks/{id}");

    let (status, patched) = stack.api("PATCH", &path, Some(json!({"name": "b"}))).await;
    assert_eq!(status, 200, "{patched}");
    for field in [
        "url",
        "description",
        "event_types",
        "filters",
        "headers",
        "timeout_ms",
        "format",
        "enabled",
        "created_at",
    ] {
        assert_eq!(patched[field], created[field], "{field} unchanged");
    }
    assert_eq!(patched["name"], "b");
    assert!(patched.get("secret").is_none());
    let store = WebhookStore::open(&stack.js, 1).await.unwrap();
    let stored = store.get("acme", &id).await.unwrap().unwrap().webhook;
    assert_eq!(stored.name, "b");
    assert!(stored.updated_at_ms >= stored.created_at_ms);
    assert_eq!(
        patched["updated_at"],
        herald_core::payload::rfc3339_ms(stored.updated_at_ms)
    );

    // null resets an optional field; required fields cannot be null.
    let (status, patched) = stack
        .api(
            "PATCH",
            &path,
            Some(json!({"description": null, "headers": null, "timeout_ms": null})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["description"], "");
    assert_eq!(patched["headers"], json!({}));
    assert_eq!(patched["timeout_ms"], 5000);
    assert_eq!(patched["filters"], json!({"status": ["failed"]}));
    for (field, value) in [
        ("name", Value::Null),
        ("url", Value::Null),
        ("event_types", Value::Null),
        ("enabled", Value::Null),
        ("name", json!("x".repeat(256))),
        ("timeout_ms", json!(30_001)),
        ("event_types", json!(["nope.*"])),
        ("headers", json!({"Content-Type": "text/plain"})),
        ("id", json!("wh_other")),
    ] {
        let (status, answer) = stack.api("PATCH", &path, Some(json!({field: value}))).await;
        assert_eq!(
            error_of(status, 400, &answer).1.as_deref(),
            Some(field),
            "{answer}"
        );
    }
    let (status, after) = stack.api("GET", &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(after["name"], "b", "a refused patch changed nothing");
    let (status, answer) = stack
        .api("PATCH", "/webhooks/wh_nope", Some(json!({"name": "x"})))
        .await;
    error_of(status, 404, &answer);

    // enabled: true re-enables, clears the reason and resets the count.
    store
        .modify("acme", &id, |w| {
            w.enabled = false;
            w.disabled_reason = "4 consecutive failed attempts".into();
            true
        })
        .await
        .unwrap();
    let mut redis = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The deliverer's endpoint state for it: failing, probes spent.
    let failures = herald_core::names::endpoint_key(&id);
    redis::cmd("SET")
        .arg(&failures)
        .arg(
            serde_json::to_string(&herald_core::policy::Endpoint::Failing {
                since_ms: 1,
                next_probe_ms: None,
                failed_probes: 4,
                probe_until_ms: 0,
                last_error: "HTTP 500".into(),
            })
            .unwrap(),
        )
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    let (_, disabled) = stack.api("GET", &path, None).await;
    assert_eq!(disabled["enabled"], false);
    assert_eq!(disabled["disabled_reason"], "4 consecutive failed attempts");
    assert_eq!(disabled["state"], "disabled");
    let (status, enabled) = stack
        .api("PATCH", &path, Some(json!({"enabled": true})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(enabled["enabled"], true);
    assert_eq!(enabled["disabled_reason"], Value::Null);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&failures)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists, "endpoint state reset");
    assert_eq!(enabled["state"], "healthy");
    let (_, off) = stack
        .api("PATCH", &path, Some(json!({"enabled": false})))
        .await;
    assert_eq!(
        (off["enabled"].clone(), off["disabled_reason"].clone()),
        (json!(false), Value::Null)
    );

    // If-Match: the ETag of what was read; an older one is a 409.
    let (status, headers, _) = stack.send("GET", &path, &[AUTH], "").await;
    assert_eq!(status, 200);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let (status, _, _) = stack
        .send(
            "PATCH",
            &path,
            &[AUTH, JSON, ("if-match", &etag)],
            r#"{"name":"c"}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, bytes) = stack
        .send(
            "PATCH",
            &path,
            &[AUTH, JSON, ("if-match", &etag)],
            r#"{"name":"d"}"#,
        )
        .await;
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error_of(status, 409, &answer).0, "conflict");
    let (status, _, _) = stack
        .send("DELETE", &path, &[AUTH, ("if-match", &etag)], "")
        .await;
    assert_eq!(status, 409, "a stale delete is refused");

    // Concurrent patches of different fields: every one lands, none is lost.
    let mut calls = Vec::new();
    for i in 0..6 {
        let field = if i % 2 == 0 { "name" } else { "description" };
        let body = json!({field: format!("{field}-{i}")});
        let stack = &stack;
        let path = path.clone();
        calls.push(async move { stack.api("PATCH", &path, Some(body)).await.0 });
    }
    let statuses = futures::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (_, after) = stack.api("GET", &path, None).await;
    assert!(
        after["name"].as_str().unwrap().starts_with("name-"),
        "{after}"
    );
    assert!(
        after["description"]
            .as_str()
            .unwrap()
            .starts_with("description-"),
        "{after}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sixth_webhook_on_a_workflow_is_refused() {
    let stack = Stack::start().await;
    let on = |workflows: Value| {
        json!({"name": "n", "url": "https://example.com/", "event_types": ["workflow.>"],
               "filters": {"workflow": workflows}})
    };
    for _ in 0..5 {
        accepted(&stack, on(json!(["invoice-approval"]))).await;
    }
    let (status, answer) = stack
        .api(
            "POST",
            "/webhooks",
            Some(on(json!(["other", "invoice-approval"]))),
        )
        .await;
    let (code, field) = error_of(status, 400, &answer);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("validation_failed", Some("filters"))
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invoice-approval")
    );

    // Other workflows, other organizations, and webhooks without a workflow
    // filter are not counted.
    let other = accepted(&stack, on(json!(["other"]))).await;
    accepted(&stack, minimal("https://example.com/")).await;
    let (status, _) = stack
        .api_as(
            API_KEY,
            Some("globex"),
            "POST",
            "/webhooks",
            Some(on(json!(["invoice-approval"]))),
        )
        .await;
    assert_eq!(status, 201);

    // A patch that would make it six is refused too; one that keeps a
    // webhook's own workflow is not.
    let other_path = format!("/webhooks/{}", other["id"].as_str().unwrap());
    let (status, answer) = stack
        .api(
            "PATCH",
            &other_path,
            Some(json!({"filters": {"workflow": ["invoice-approval"]}})),
        )
        .await;
    error_of(status, 400, &answer);
    let (_, list) = stack.api("GET", "/webhooks", None).await;
    let first = list["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{first}"),
            Some(json!({"filters": {"workflow": ["invoice-approval"], "status": ["failed"]}})),
        )
        .await;
    assert_eq!(status, 200);

    // Deleting one frees a place.
    let (status, _) = stack
        .api("DELETE", &format!("/webhooks/{first}"), None)
        .await;
    assert_eq!(status, 204);
    accepted(&stack, on(json!(["invoice-approval"]))).await;

    // The lock that serializes those checks: a lease left by a crashed admin
    // is taken over once expired; a live one makes a create wait, then 409.
    let locks = stack.js.get_key_value("herald-admin-locks").await.unwrap();
    locks.put("workflows.acme", "1".into()).await.unwrap();
    accepted(&stack, on(json!(["after-a-crash"]))).await;
    let far = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000)
        .to_string();
    locks.put("workflows.acme", far.into()).await.unwrap();
    let (status, answer) = stack
        .api("POST", "/webhooks", Some(on(json!(["locked"]))))
        .await;
    assert_eq!(error_of(status, 409, &answer).0, "conflict");
    // Every create counts the organization's webhooks under the lock too.
    let (status, answer) = stack
        .api("POST", "/webhooks", Some(minimal("https://example.com/")))
        .await;
    assert_eq!(error_of(status, 409, &answer).0, "conflict");
    locks.delete("workflows.acme").await.unwrap();
    accepted(&stack, minimal("https://example.com/")).await;

    // Concurrent creates on a fresh workflow: exactly five win.
    let calls = (0..8).map(|_| {
        let stack = &stack;
        async move {
            stack
                .api("POST", "/webhooks", Some(on(json!(["race"]))))
                .await
                .0
        }
    });
    let mut statuses = futures::future::join_all(calls).await;
    statuses.sort();
    assert_eq!(statuses, vec![201, 201, 201, 201, 201, 400, 400, 400]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_are_shown_once_and_encrypted_at_rest() {
    let stack = Stack::start().await;
    let own = "my-own-very-recognisable-secret-42";
    let mine = accepted(
        &stack,
        with(&minimal("https://example.com/"), "secret", json!(own)),
    )
    .await;
    let generated = accepted(&stack, minimal("https://example.com/")).await;

    let kv = stack.js.get_key_value("herald-webhooks").await.unwrap();
    for (webhook, secret) in [
        (&mine, own.to_owned()),
        (&generated, generated["secret"].as_str().unwrap().to_owned()),
    ] {
        let id = webhook["id"].as_str().unwrap();
        let raw = kv.get(format!("acme.{id}")).await.unwrap().expect("stored");
        let contains = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        assert!(
            !contains(secret.as_bytes()),
            "secret in clear in the KV value"
        );
        if let Some(b64) = secret.strip_prefix("whsec_") {
            use base64::Engine;
            let key = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            assert!(!contains(&key), "secret key bytes in clear in the KV value");
        }
        let stored = proto::Webhook::decode(raw).unwrap();
        assert_eq!(stored.secrets.len(), 1);
        assert_eq!(stored.secrets[0].nonce.len(), 24);
        assert!(!stored.secrets[0].key_id.is_empty());

        // Never shown again: get, list, patch.
        let (_, got) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
        assert!(got.get("secret").is_none());
        let (_, patched) = stack
            .api(
                "PATCH",
                &format!("/webhooks/{id}"),
                Some(json!({"name": "m"})),
            )
            .await;
        assert!(patched.get("secret").is_none());
    }
    let (_, list) = stack.api("GET", "/webhooks", None).await;
    assert!(!list.to_string().contains(own));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_secret_signs_alongside_the_new_one() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let created = accepted(
        &stack,
        json!({"name": "r", "url": receiver.url("/hook"), "event_types": ["workflow.completed"]}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let old = created["secret"].as_str().unwrap().to_owned();

    let (status, rotated) = stack
        .api("POST", &format!("/webhooks/{id}/rotate-secret"), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    let (_, got) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert!(got.get("secret").is_none(), "shown once");

    // The stored secrets: new first, the old one expiring in 24 h.
    let store = WebhookStore::open(&stack.js, 1).await.unwrap();
    let stored = store.get("acme", &id).await.unwrap().unwrap().webhook;
    assert_eq!(stored.secrets.len(), 2);
    assert_eq!(stored.secrets[0].expires_at_ms, 0);
    let in_a_day = stored.secrets[1].expires_at_ms - stored.updated_at_ms;
    assert_eq!(in_a_day, 24 * 3600 * 1000);

    stack
        .publish(
            "acme",
            "workflow.completed",
            json!({"attributes": {"workflow": "w"}}),
        )
        .await;
    let got = receiver.wait_for("/hook", 1, Duration::from_secs(15)).await;
    let request = &got[0];
    let msg_id = request.header("webhook-id").unwrap();
    let timestamp = request.timestamp();
    let header = request.header("webhook-signature").unwrap();
    let signatures: Vec<&str> = header.split(' ').collect();
    assert_eq!(signatures.len(), 2, "{header}");
    assert!(signatures.iter().all(|s| s.starts_with("v1,")));
    for secret in [&old, &new] {
        let expected =
            signing::SigningKey::new(secret).standard_signature(msg_id, timestamp, &request.body);
        assert!(
            signatures.contains(&expected.as_str()),
            "signed with {secret}"
        );
    }

    // A rotation to an own secret; a webhook that does not exist is a 404.
    let (status, own) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/rotate-secret"),
            Some(json!({"secret": "mine-now"})),
        )
        .await;
    assert_eq!((status, own["secret"].clone()), (200, json!("mine-now")));
    let stored = store.get("acme", &id).await.unwrap().unwrap().webhook;
    assert_eq!(
        stored.secrets.len(),
        3,
        "new, previous, and the first until its day is over"
    );
    let (status, answer) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/rotate-secret"),
            Some(json!({"secret": ""})),
        )
        .await;
    assert_eq!(error_of(status, 400, &answer).1.as_deref(), Some("secret"));
    let (status, _) = stack
        .api("POST", "/webhooks/wh_nope/rotate-secret", None)
        .await;
    assert_eq!(status, 404);

    // PATCH secret replaces every secret at once.
    let (status, _) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(json!({"secret": "only-this"})),
        )
        .await;
    assert_eq!(status, 200);
    let stored = store.get("acme", &id).await.unwrap().unwrap().webhook;
    assert_eq!(stored.secrets.len(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_webhook_gets_nothing() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let doomed = accepted(
        &stack,
        json!({"name": "gone", "url": receiver.url("/gone"), "event_types": ["workflow.completed"]}),
    )
    .await;
    accepted(
        &stack,
        json!({"name": "kept", "url": receiver.url("/kept"), "event_types": ["workflow.completed"]}),
    )
    .await;
    let path = format!("/webhooks/{}", doomed["id"].as_str().unwrap());

    let (status, body) = stack.api("DELETE", &path, None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, _) = stack.api("GET", &path, None).await;
    assert_eq!(status, 404);
    let (status, _) = stack.api("DELETE", &path, None).await;
    assert_eq!(status, 404, "deleting twice");
    let (_, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(list["total"], 1);

    stack
        .publish("acme", "workflow.completed", json!({"attributes": {}}))
        .await;
    receiver.wait_for("/kept", 1, Duration::from_secs(15)).await;
    // The kept webhook's delivery ran alongside; give a stray one a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.received("/gone").is_empty(),
        "a deleted webhook got a delivery"
    );
    stack.stop().await;
}

/// One raw HTTP/1.0 exchange: the whole answer, head and body, as text.
async fn raw_http(addr: &str, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Asserts that a [`raw_http`] answer is a 429 and answers its
/// `Retry-After` in seconds.
#[track_caller]
fn retry_after_of_429(answer: &str) -> u64 {
    assert!(
        answer.starts_with("HTTP/1.0 429") || answer.starts_with("HTTP/1.1 429"),
        "{answer}"
    );
    answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_owned)
        })
        .expect("Retry-After")
        .trim()
        .parse()
        .expect("Retry-After in seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_are_paged_an_organization_has_a_limit_and_manual_sends_a_rate() {
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_MAX_WEBHOOKS_PER_ORG", "3")
            .env("HERALD_MANUAL_SENDS_PER_MINUTE", "2"),
    )
    .await;
    let receiver = Receiver::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(accepted(&stack, minimal(&receiver.url("/hook"))).await["id"].clone());
    }
    // The fourth is over the organization's limit; another organization's
    // first is not.
    let (status, answer) = stack
        .api("POST", "/webhooks", Some(minimal(&receiver.url("/hook"))))
        .await;
    assert_eq!(error_of(status, 409, &answer).0, "limit_reached");
    let (status, _) = stack
        .api_as(
            API_KEY,
            Some("initech"),
            "POST",
            "/webhooks",
            Some(minimal(&receiver.url("/hook"))),
        )
        .await;
    assert_eq!(status, 201);

    // Pages of two, oldest first, with a cursor to the next.
    let (status, first) = stack.api("GET", "/webhooks?limit=2", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["total"], 3);
    let page: Vec<Value> = first["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].clone())
        .collect();
    assert_eq!(page, ids[..2]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, second) = stack
        .api("GET", &format!("/webhooks?limit=2&cursor={cursor}"), None)
        .await;
    assert_eq!(second["data"].as_array().unwrap().len(), 1);
    assert_eq!(second["data"][0]["id"], ids[2]);
    assert!(second["next_cursor"].is_null(), "{second}");
    let (status, answer) = stack.api("GET", "/webhooks?cursor=nope", None).await;
    assert_eq!(error_of(status, 400, &answer).1.as_deref(), Some("cursor"));

    // Two test events a minute: the third is refused with Retry-After, for
    // this organization only.
    let id = ids[0].as_str().unwrap();
    for _ in 0..2 {
        let (status, answer) = stack
            .api("POST", &format!("/webhooks/{id}/test"), None)
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let addr = stack.env["HERALD_ADMIN_ADDR"].clone();
    let answer = raw_http(
        &addr,
        format!(
            "POST /webhooks/{id}/test HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 0\r\n\r\n"
        ),
    )
    .await;
    let retry_after = retry_after_of_429(&answer);
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(answer.contains("\"rate_limited\""), "{answer}");
    // Starting a recover spends from the same key's budget…
    let (status, answer) = stack
        .api(
            "POST",
            &format!("/webhooks/{id}/recover"),
            Some(json!({"since": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(error_of(status, 429, &answer).0, "rate_limited");
    // …and another key has a budget of its own.
    let (status, created) = stack
        .api_as(
            TENANT_KEY,
            None,
            "POST",
            "/webhooks",
            Some(minimal(&receiver.url("/tenant"))),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let tenant_hook = created["id"].as_str().unwrap().to_owned();
    let (status, answer) = stack
        .api_as(
            TENANT_KEY,
            None,
            "POST",
            &format!("/webhooks/{tenant_hook}/test"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    receiver.wait_for("/hook", 2, Duration::from_secs(10)).await;

    // Metrics are on the admin's health port, not on the public API port.
    let metrics = |addr: String| async move {
        raw_http(
            &addr,
            format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
        )
        .await
    };
    let public = metrics(addr.clone()).await;
    assert!(!public.contains(" 200 "), "{public}");
    let health = metrics(stack.env["HERALD_ADMIN_HEALTH_ADDR"].clone()).await;
    assert!(health.contains(" 200 OK"), "{health}");
    let ready = raw_http(
        &addr,
        format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await;
    assert!(ready.contains(" 200 OK"), "{ready}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_api_key_has_a_request_rate_and_is_told_when_to_come_back() {
    // 60 a minute, in bursts of 10.
    let stack =
        Stack::start_with(Options::default().env("HERALD_API_REQUESTS_PER_MINUTE", "60")).await;
    for i in 0..10 {
        let (status, answer) = stack.api("GET", "/webhooks", None).await;
        assert_eq!(status, 200, "request {i}: {answer}");
    }
    let addr = stack.env["HERALD_ADMIN_ADDR"].clone();
    let answer = raw_http(
        &addr,
        format!(
            "GET /webhooks HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\n\r\n"
        ),
    )
    .await;
    let retry_after = retry_after_of_429(&answer);
    assert!(
        answer.contains("HERALD_API_REQUESTS_PER_MINUTE"),
        "{answer}"
    );
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    // Another key is not held back by this one; a wrong key is still a 401.
    let (status, answer) = stack
        .api_as(TENANT_KEY, None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = stack
        .api_as("not-a-key", None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 401);
    // Once the bucket has refilled, the key is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, answer) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(status, 200, "{answer}");
    stack.stop().await;
}

/// About a thousand lists and creates within seconds once exhausted the
/// server's ephemeral consumers (one per call) and every later call
/// answered 503. Admin answers them from its view of the bucket now; a
/// create is in the next list of the same replica, and the limit checks see
/// every write. `HERALD_TEST_API_CALLS` runs more (the figure in
/// docs/benchmarks.md is 100,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_lists_and_creates_across_organizations_all_succeed() {
    let calls: usize = std::env::var("HERALD_TEST_API_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_400);
    let stack = std::sync::Arc::new(
        Stack::start_with(
            Options::default()
                .env("HERALD_API_REQUESTS_PER_MINUTE", "10000000")
                .env("HERALD_MAX_WEBHOOKS_PER_ORG", "100000"),
        )
        .await,
    );
    const ORGS: usize = 40;
    const WORKERS: usize = 8;
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut created = 0usize;
            for i in (worker..calls).step_by(WORKERS) {
                let org = format!("org-{}", i % ORGS);
                let t = std::time::Instant::now();
                if i % 4 == 0 {
                    let body = minimal("https://example.com/hook");
                    let (status, answer) = stack
                        .api_as(API_KEY, Some(&org), "POST", "/webhooks", Some(body))
                        .await;
                    assert_eq!(status, 201, "create {i} in {org}: {answer}");
                    created += 1;
                    // The same replica's next list shows it.
                    let id = answer["id"].as_str().unwrap().to_owned();
                    let (status, page) = stack
                        .api_as(API_KEY, Some(&org), "GET", &format!("/webhooks/{id}"), None)
                        .await;
                    assert_eq!(status, 200, "{page}");
                    let (status, list) = stack
                        .api_as(API_KEY, Some(&org), "GET", "/webhooks?limit=100", None)
                        .await;
                    assert_eq!(status, 200, "list after create {i}: {list}");
                    let total = list["total"].as_u64().unwrap() as usize;
                    let listed = list["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|w| w["id"] == id.as_str());
                    assert!(
                        listed || total > 100,
                        "a create is in the same replica's next list"
                    );
                } else {
                    let (status, answer) = stack
                        .api_as(API_KEY, Some(&org), "GET", "/webhooks", None)
                        .await;
                    assert_eq!(status, 200, "list {i} in {org}: {answer}");
                }
                latencies.push(t.elapsed());
            }
            (latencies, created)
        }));
    }
    let mut latencies = Vec::new();
    let mut created = 0;
    for task in tasks {
        let (l, c) = task.await.expect("worker");
        latencies.extend(l);
        created += c;
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{calls} calls ({created} creates) in {:?}: p50 {:?}, p99 {:?}, max {:?}",
        started.elapsed(),
        p(0.5),
        p(0.99),
        latencies.last().unwrap()
    );
    // Every create is counted, in every organization.
    let mut total = 0;
    for org in 0..ORGS {
        let (status, list) = stack
            .api_as(
                API_KEY,
                Some(&format!("org-{org}")),
                "GET",
                "/webhooks?limit=1",
                None,
            )
            .await;
        assert_eq!(status, 200);
        total += list["total"].as_u64().unwrap() as usize;
    }
    assert_eq!(total, created);
    // A deletion leaves the next list.
    let (_, list) = stack
        .api_as(API_KEY, Some("org-0"), "GET", "/webhooks?limit=1", None)
        .await;
    let id = list["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = stack
        .api_as(
            API_KEY,
            Some("org-0"),
            "DELETE",
            &format!("/webhooks/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (_, after) = stack
        .api_as(API_KEY, Some("org-0"), "GET", "/webhooks?limit=500", None)
        .await;
    assert_eq!(
        after["total"].as_u64().unwrap() + 1,
        list["total"].as_u64().unwrap()
    );
    assert!(
        !after["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == id.as_str())
    );
}

/// Webhooks live in NATS: with Redis gone admin stays ready (so Kubernetes
/// keeps it in its Service) and serves webhooks, tests, rotations and the
/// catalogue; only the log routes answer 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_serves_webhooks_while_redis_is_down() {
    let mut stack = Stack::start().await;
    let created = accepted(&stack, minimal("https://example.com/before")).await;
    let id = created["id"].as_str().unwrap().to_owned();
    stack.redis.stop();
    let ready = format!("{}/ready", stack.admin_url);
    // Long enough for the health watch to have seen Redis go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = stack.get(&ready).await.expect("ready answers");
    assert_eq!(status, 200, "admin stays ready without Redis: {body}");
    assert!(body.contains("\"redis\":false"), "{body}");

    let other = accepted(&stack, minimal("https://example.com/during")).await;
    let (status, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 2);
    let (status, one) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert_eq!(status, 200, "{one}");
    let (status, changed) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!((status, changed["name"].clone()), (200, json!("renamed")));
    let (status, rotated) = stack
        .api("POST", &format!("/webhooks/{id}/rotate-secret"), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    let (status, sent) = stack
        .api("POST", &format!("/webhooks/{id}/test"), None)
        .await;
    assert_eq!(status, 202, "{sent}");
    let (status, types) = stack.api("GET", "/event-types", None).await;
    assert_eq!(status, 200, "{types}");
    let (status, logs) = stack
        .api("GET", &format!("/webhooks/{id}/logs"), None)
        .await;
    assert_eq!(status, 503, "{logs}");
    assert!(logs["error"]["message"].is_string(), "{logs}");
    let other_id = other["id"].as_str().unwrap();
    let (status, _) = stack
        .api("DELETE", &format!("/webhooks/{other_id}"), None)
        .await;
    assert_eq!(status, 204);
    stack.stop().await;
}
