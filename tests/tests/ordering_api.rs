//! Ordered delivery per key through the admin API (PRODUCT.md, "Ordered
//! delivery (per key)"): the webhook field `ordering` on create, PATCH and
//! every answer, its validation, and `ordering_status`, what an ordered
//! webhook holds back, in single-webhook answers — against a whole running
//! Herald.

use std::time::Duration;

use herald_e2e::{Receiver, Reply, Stack};
use herald_platform::webhooks::WebhookStore;
use serde_json::{Value, json};

fn minimal(ordering: Value) -> Value {
    json!({
        "name": "ordered", "url": "https://example.com/hook",
        "event_types": ["workflow.completed"], "ordering": ordering,
    })
}

/// What an ordered webhook with nothing waiting shows.
fn idle() -> Value {
    json!({"keys_waiting": 0, "keys_held_back": 0, "deliveries_waiting": 0, "oldest": null})
}

/// Asserts a 400 `validation_failed` naming `field`.
#[track_caller]
fn refused_naming(status: u16, answer: &Value, field: &str, what: &Value) {
    assert_eq!(status, 400, "{what} -> {answer}");
    assert_eq!(
        answer["error"]["code"], "validation_failed",
        "{what} -> {answer}"
    );
    assert_eq!(answer["error"]["field"], field, "{what} -> {answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordering_is_set_validated_shown_and_turned_off() {
    let stack = Stack::start().await;

    // Created ordered: `on_failure` defaults to skip; the status shows
    // nothing waiting.
    let skip = stack
        .create_webhook(minimal(json!({"key": "execution"})))
        .await;
    assert_eq!(
        skip["ordering"],
        json!({"key": "execution", "on_failure": "skip"})
    );
    assert_eq!(skip["ordering_status"], idle(), "{skip}");
    let skip_id = skip["id"].as_str().unwrap().to_owned();

    let hold = stack
        .create_webhook(minimal(json!({"key": "run_id-2", "on_failure": "hold"})))
        .await;
    assert_eq!(
        hold["ordering"],
        json!({"key": "run_id-2", "on_failure": "hold"})
    );
    let hold_id = hold["id"].as_str().unwrap().to_owned();
    let store = WebhookStore::open(&stack.js, 1).await.unwrap();
    let stored = store.get("acme", &hold_id).await.unwrap().unwrap().webhook;
    let ordering = stored.ordering.expect("stored with its ordering");
    assert_eq!(
        (ordering.key.as_str(), ordering.hold_on_failure),
        ("run_id-2", true)
    );

    // Unordered: absent, or null, or an explicit null on_failure's default.
    let (status, plain) = stack
        .api(
            "POST",
            "/webhooks",
            Some(json!({"name": "plain", "url": "https://example.com/p", "event_types": ["workflow.completed"]})),
        )
        .await;
    assert_eq!(status, 201, "{plain}");
    assert_eq!(plain["ordering"], Value::Null);
    assert_eq!(plain["ordering_status"], Value::Null);
    let plain_id = plain["id"].as_str().unwrap().to_owned();
    let nulled = stack.create_webhook(minimal(Value::Null)).await;
    assert_eq!(
        (&nulled["ordering"], &nulled["ordering_status"]),
        (&Value::Null, &Value::Null)
    );
    let defaulted = stack
        .create_webhook(minimal(json!({"key": "k", "on_failure": null})))
        .await;
    assert_eq!(
        defaulted["ordering"],
        json!({"key": "k", "on_failure": "skip"})
    );
    // The longest key.
    let long = "k".repeat(64);
    let longest = stack.create_webhook(minimal(json!({"key": long}))).await;
    assert_eq!(longest["ordering"]["key"], long.as_str());

    // Refused, naming the field: on create and on PATCH alike (one of each
    // kind here; every rule is a row of validate.rs's `ordering_values`).
    for bad in [
        json!("execution"),
        json!({}),
        json!({"key": "execution.id"}),
        json!({"key": "execution", "on_failure": "retry"}),
        json!({"key": "execution", "hold_on_failure": true}),
    ] {
        let (status, answer) = stack
            .api("POST", "/webhooks", Some(minimal(bad.clone())))
            .await;
        refused_naming(status, &answer, "ordering", &bad);
        let (status, answer) = stack
            .api(
                "PATCH",
                &format!("/webhooks/{skip_id}"),
                Some(json!({"ordering": bad})),
            )
            .await;
        refused_naming(status, &answer, "ordering", &bad);
    }
    let (status, answer) = stack
        .api(
            "POST",
            "/webhooks",
            Some(minimal(json!({"key": "execution", "on_failure": "retry"}))),
        )
        .await;
    refused_naming(status, &answer, "ordering", &json!("on_failure retry"));
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("skip or hold"),
        "{answer}"
    );
    // Nothing refused was changed.
    assert_eq!(
        stack.webhook(&skip_id).await["ordering"],
        json!({"key": "execution", "on_failure": "skip"})
    );

    // GET one: the status of an ordered webhook, null for an unordered one.
    let got = stack.webhook(&skip_id).await;
    assert_eq!(got["ordering_status"], idle(), "{got}");
    let got = stack.webhook(&plain_id).await;
    assert_eq!(got["ordering"], Value::Null);
    assert_eq!(got["ordering_status"], Value::Null, "{got}");
    // Lists show `ordering`, not the status (a read per webhook).
    let (status, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(status, 200, "{list}");
    for w in list["data"].as_array().unwrap() {
        assert!(w.get("ordering").is_some(), "{w}");
        assert!(w.get("ordering_status").is_none(), "{w}");
    }
    let listed = |id: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .unwrap()["ordering"]
            .clone()
    };
    assert_eq!(
        listed(&hold_id),
        json!({"key": "run_id-2", "on_failure": "hold"})
    );
    assert_eq!(listed(&plain_id), Value::Null);

    // PATCH: ordering on an unordered webhook, changed, then off with null;
    // a PATCH without it leaves it as it is.
    let (status, patched) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{plain_id}"),
            Some(json!({"ordering": {"key": "workflow", "on_failure": "hold"}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["ordering"],
        json!({"key": "workflow", "on_failure": "hold"})
    );
    assert_eq!(patched["ordering_status"], idle(), "{patched}");
    let (status, patched) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{plain_id}"),
            Some(json!({"description": "still ordered"})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["ordering"],
        json!({"key": "workflow", "on_failure": "hold"})
    );
    let (status, patched) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{plain_id}"),
            Some(json!({"ordering": {"key": "workflow"}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["ordering"],
        json!({"key": "workflow", "on_failure": "skip"}),
        "on_failure left out is skip"
    );
    let (status, patched) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{hold_id}"),
            Some(json!({"ordering": null})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["ordering"], Value::Null);
    assert_eq!(patched["ordering_status"], Value::Null);
    let got = stack.webhook(&hold_id).await;
    assert_eq!(
        (&got["ordering"], &got["ordering_status"]),
        (&Value::Null, &Value::Null),
        "{got}"
    );
    let stored = store.get("acme", &hold_id).await.unwrap().unwrap().webhook;
    assert_eq!(stored.ordering, None, "turned off at rest too");

    // The audit trail names the field changed, never its value.
    let (status, audit) = stack.api("GET", "/audit", None).await;
    assert_eq!(status, 200, "{audit}");
    let off = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "webhook.updated" && r["target"]["id"] == hold_id.as_str())
        .unwrap_or_else(|| panic!("the PATCH in the audit trail: {audit}"));
    assert_eq!(off["fields"], json!(["ordering"]), "{off}");
    stack.stop().await;
}

/// A key whose first delivery is still being attempted holds back the
/// ones after it: the status counts them and shows the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordering_status_shows_what_waits() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    // The first request is never answered (until the timeout): the key's
    // first delivery stays in flight while the next two wait behind it.
    receiver.script("/ordered", vec![Reply::hang(), Reply::status(200)]);
    let w = stack
        .create_webhook(json!({
            "name": "ordered", "url": receiver.url("/ordered"),
            "event_types": ["workflow.completed"], "timeout_ms": 8000,
            "ordering": {"key": "execution"},
        }))
        .await;
    let id = w["id"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        stack
            .publish(
                "acme",
                "workflow.completed",
                json!({"id": format!("evt_ordered_{n}"), "attributes": {"execution": "ex-1"}}),
            )
            .await;
    }
    let status = stack
        .eventually(
            Duration::from_secs(20),
            "three deliveries waiting on one key",
            || async {
                let status = stack.webhook(&id).await["ordering_status"].clone();
                (status["deliveries_waiting"] == 3 && !status["oldest"].is_null()).then_some(status)
            },
        )
        .await;
    assert_eq!(status["keys_waiting"], 1, "{status}");
    assert_eq!(status["keys_held_back"], 1, "{status}");
    let oldest = &status["oldest"];
    assert_eq!(oldest["key"], "ex-1", "{status}");
    assert_eq!(oldest["event_type"], "workflow.completed", "{status}");
    assert_eq!(oldest["held"], false, "{status}");
    assert!(
        oldest["delivery_id"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{status}"
    );
    assert!(
        oldest["since"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{status}"
    );
    // The oldest is the one the receiver holds: the first event's.
    let first = receiver
        .wait_for("/ordered", 1, Duration::from_secs(10))
        .await;
    assert_eq!(first[0].event_id(), "evt_ordered_1");
    assert_eq!(
        first[0].header("webhook-id"),
        oldest["delivery_id"].as_str(),
        "{status}"
    );
    stack.stop().await;
}
