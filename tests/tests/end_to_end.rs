//! One event, all the way: webhook created over HTTP, event published to
//! NATS, signed POST at the receiver, attempt in the logs.

use std::time::Duration;

use herald_core::signing;
use herald_e2e::{Receiver, Stack};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_matching_event_is_delivered_signed_and_logged() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;

    let webhook = stack
        .create_webhook(json!({
            "name": "invoices",
            "url": receiver.url("/hook"),
            "event_types": ["workflow.completed"],
            "filters": {"workflow": ["invoice-approval"]},
        }))
        .await;
    let secret = webhook["secret"]
        .as_str()
        .expect("secret shown on create")
        .to_owned();
    assert!(secret.starts_with("whsec_"));
    let id = webhook["id"].as_str().unwrap().to_owned();

    // The secret is never shown again.
    let (status, fetched) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert_eq!(status, 200);
    assert!(fetched.get("secret").is_none(), "{fetched}");

    // Another type and another workflow are not delivered.
    stack
        .publish_each([
            (
                "acme",
                "workflow.failed",
                json!({"attributes": {"workflow": "invoice-approval"}}),
            ),
            (
                "acme",
                "workflow.completed",
                json!({"attributes": {"workflow": "other"}}),
            ),
        ])
        .await;
    // Another organization's identical event is not delivered either.
    stack
        .publish_each([
            ("globex", "workflow.completed", json!({"attributes": {"workflow": "invoice-approval"}})),
            ("acme", "workflow.completed", json!({"id": "evt_123", "occurred_at": "2026-11-22T10:00:00Z", "attributes": {"workflow": "invoice-approval", "execution": "ex-42", "status": "succeeded"}, "data": {"amount": 42}, "metadata": {"source": "test"}})),
        ])
        .await;

    let got = receiver.wait_for("/hook", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "exactly the matching event");
    let request = &got[0];
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["id"], "evt_123");
    assert_eq!(body["type"], "workflow.completed");
    assert_eq!(body["timestamp"], "2026-11-22T10:00:00.000Z");
    assert_eq!(body["organization_id"], "acme");
    assert_eq!(body["webhook_id"], id.as_str());
    assert_eq!(body["attributes"]["execution"], "ex-42");
    assert_eq!(body["data"], json!({"amount": 42}));
    assert_eq!(body["metadata"], json!({"source": "test"}));

    let msg_id = request.header("webhook-id").unwrap();
    let timestamp = request.timestamp();
    let signature = request.header("webhook-signature").unwrap();
    assert!(
        signing::verify_standard(&secret, msg_id, timestamp, &request.body, signature),
        "standard signature"
    );
    assert_eq!(
        request.header("x-webhook-signature").unwrap(),
        signing::SigningKey::new(&secret).body_signature(&request.body)
    );
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert!(request.header("user-agent").unwrap().starts_with("Herald/"));

    // The attempt shows in the logs.
    let logs = stack
        .eventually(Duration::from_secs(10), "log entry", || async {
            let (status, logs) = stack
                .api("GET", &format!("/webhooks/{id}/logs"), None)
                .await;
            (status == 200 && logs["total"] == 1).then_some(logs)
        })
        .await;
    let entry = &logs["data"][0];
    assert_eq!(entry["status"], "succeeded");
    assert_eq!(entry["event_id"], "evt_123");
    assert_eq!(entry["delivery_id"], msg_id);
    assert_eq!(entry["response_status"], 200);

    // Nothing else arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.all().len(), 1);
    stack.stop().await;
}
