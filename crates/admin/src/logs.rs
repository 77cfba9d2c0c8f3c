//! The delivery-log routes, read from the Redis log index, and the test and
//! retry routes, which publish one-off delivery jobs whose attempts show up
//! in those logs.
//!
//! What an attempt shows is masked twice: the deliverer masks secret-looking
//! request headers before logging, and here every header, URL and body is
//! masked again by name and scrubbed of the webhook's own secrets, so a
//! secret never leaves through the logs.

use std::collections::HashMap;

use async_nats::jetstream::stream::RawMessageErrorKind;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use herald_core::{ids, names, payload, proto};
use herald_platform::log_index;
use prost::Message;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// The delivery-log routes, and the test and retry routes that produce
/// deliveries shown in the logs.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/webhooks/logs/all", get(list_for_org))
        .route("/webhooks/{id}/logs", get(list_for_webhook))
        .route("/webhooks/{id}/logs/{log_id}", get(detail))
        .route("/webhooks/{id}/logs/{log_id}/retry", post(retry))
        .route("/webhooks/{id}/test", post(test))
}

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;
pub const MAX_OFFSET: usize = 10_000_000;
/// Deepest offset of a list that is filtered or merges webhooks (deeper
/// pages are read with `cursor`).
pub const MAX_MERGED_OFFSET: usize = 10_000;

pub use herald_core::masking::MASK;
use herald_core::masking::{self, secret_name};

/// The event type of test deliveries.
pub const TEST_EVENT_TYPE: &str = "workflow.completed";

fn paging(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let number = |name: &str, default: usize, range: std::ops::RangeInclusive<usize>| match query
        .get(name)
    {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::validation(
                    name,
                    format!(
                        "{name} must be an integer {}-{}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    };
    let limit = number("limit", DEFAULT_LIMIT, 1..=MAX_LIMIT)?;
    let offset = number("offset", 0, 0..=MAX_OFFSET)?;
    Ok((limit, offset))
}

/// A parameter when given and not empty.
fn param<'a>(query: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn time_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(text) = param(query, name) else {
        return Ok(None);
    };
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|_| {
            ApiError::validation(
                name,
                format!("{name} must be an RFC 3339 time like 2026-11-22T10:00:00Z"),
            )
        })
}

/// The list query of a request: paging (`limit` with `offset` or
/// `cursor`), `since`/`until`, and the filters.
fn list_query(
    query: &HashMap<String, String>,
    org: String,
    webhook_id: Option<String>,
) -> Result<log_index::Query, ApiError> {
    let (limit, offset) = paging(query)?;
    let cursor = match param(query, "cursor") {
        None => None,
        Some(text) => Some(log_index::Cursor::parse(text).ok_or_else(|| {
            ApiError::validation(
                "cursor",
                "cursor must be a next_cursor from an earlier page",
            )
        })?),
    };
    if cursor.is_some() && offset > 0 {
        return Err(ApiError::validation(
            "offset",
            "give either offset or cursor, not both",
        ));
    }
    let status = match param(query, "status") {
        None => None,
        Some(s) if log_index::STATUSES.contains(&s) => Some(s.to_owned()),
        Some(_) => {
            return Err(ApiError::validation(
                "status",
                format!("status must be one of {}", log_index::STATUSES.join(", ")),
            ));
        }
    };
    let event_type = match param(query, "event_type") {
        None => None,
        Some(t) if names::valid_event_type(t) => Some(t.to_owned()),
        Some(_) => {
            return Err(ApiError::validation(
                "event_type",
                "event_type must be an event type like workflow.completed",
            ));
        }
    };
    let id = |name: &str| -> Result<Option<String>, ApiError> {
        match param(query, name) {
            None => Ok(None),
            Some(v) if v.len() <= 1024 && !v.chars().any(char::is_control) => {
                Ok(Some(v.to_owned()))
            }
            Some(_) => Err(ApiError::validation(
                name,
                format!("{name} must be at most 1024 printable characters"),
            )),
        }
    };
    let since_ms = time_param(query, "since")?;
    let until_ms = time_param(query, "until")?;
    if let (Some(s), Some(u)) = (since_ms, until_ms)
        && s >= u
    {
        return Err(ApiError::validation("until", "until must be after since"));
    }
    let merged = webhook_id.is_none() || status.is_some() || event_type.is_some();
    if merged && offset > MAX_MERGED_OFFSET {
        return Err(ApiError::validation(
            "offset",
            format!(
                "offset is at most {MAX_MERGED_OFFSET} for filtered and organization-wide lists; use cursor to read further"
            ),
        ));
    }
    Ok(log_index::Query {
        org,
        webhook_id,
        status,
        event_type,
        event_id: id("event_id")?,
        delivery_id: id("delivery_id")?,
        since_ms,
        until_ms,
        cursor,
        offset,
        limit,
    })
}

fn kind_name(kind: proto::DeliveryKind) -> &'static str {
    match kind {
        proto::DeliveryKind::Event => "event",
        proto::DeliveryKind::Test => "test",
        proto::DeliveryKind::ManualRetry => "manual_retry",
        proto::DeliveryKind::Recover => "recover",
        proto::DeliveryKind::Replay => "replay",
        proto::DeliveryKind::Probe => "probe",
    }
}

/// The summary of an attempt, as lists show it.
pub fn summary(a: &proto::AttemptResult) -> Value {
    json!({
        "id": a.log_id,
        "webhook_id": a.webhook_id,
        "event_id": a.event_id,
        "event_type": a.event_type,
        "delivery_id": a.delivery_id,
        "kind": kind_name(a.kind()),
        "attempt": a.attempt,
        "status": log_index::status_name(a.status()),
        "response_status": a.response.as_ref().map(|r| r.status),
        "error": if a.error.is_empty() { Value::Null } else { Value::String(a.error.clone()) },
        "duration_ms": a.duration_ms,
        "created_at": payload::rfc3339_ms(a.attempted_at_ms),
        "next_attempt_at": if a.next_attempt_at_ms == 0 { Value::Null } else { Value::String(payload::rfc3339_ms(a.next_attempt_at_ms)) },
    })
}

/// Hides secrets: by header or query-parameter name, and any occurrence of
/// the webhook's own secrets.
struct Masker {
    /// Longest first, so a whole secret goes before a part of it.
    secrets: Vec<String>,
}

impl Masker {
    fn for_webhook(state: &AppState, webhook: &proto::Webhook) -> Self {
        let aad = names::webhook_key(&webhook.organization_id, &webhook.id);
        let mut secrets = Vec::new();
        for encrypted in &webhook.secrets {
            match state.config.keyring.decrypt(encrypted, &aad) {
                Ok(secret) => {
                    // The Standard Webhooks key is the part after `whsec_`.
                    if let Some(key) = secret.strip_prefix("whsec_")
                        && key.len() >= 8
                    {
                        secrets.push(key.to_owned());
                    }
                    secrets.push(secret);
                }
                Err(error) => {
                    tracing::warn!(%error, webhook_id = %webhook.id, "cannot decrypt secret for masking")
                }
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self { secrets }
    }

    fn text(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), MASK);
            }
        }
        text
    }

    fn headers(&self, headers: &[proto::Header]) -> Value {
        headers
            .iter()
            .map(|h| {
                let value = if secret_name(&h.name) {
                    MASK.to_owned()
                } else {
                    self.text(&h.value)
                };
                json!({"name": h.name, "value": value})
            })
            .collect()
    }

    /// `text` with secret-looking query values and a password masked (one
    /// rule with the deliverer's, `core::masking`), then the secrets.
    fn url(&self, text: &str) -> String {
        self.text(&masking::mask_url(text))
    }

    /// A body as JSON fields: UTF-8 text (masked), or base64 when it is not
    /// UTF-8.
    fn body(&self, body: &[u8]) -> (Value, bool) {
        match std::str::from_utf8(body) {
            Ok(text) => (Value::String(self.text(text)), false),
            Err(_) => (Value::String(B64.encode(body)), true),
        }
    }
}

/// An attempt in full: the summary, the request sent and the response got.
fn detail_json(a: &proto::AttemptResult, masker: &Masker) -> Value {
    let mut out = summary(a);
    out["error"] = match &out["error"] {
        Value::String(e) => Value::String(masker.text(e)),
        other => other.clone(),
    };
    out["request"] = match &a.request {
        None => Value::Null,
        Some(r) => {
            let (body, base64) = masker.body(&r.body);
            json!({
                "method": r.method,
                "url": masker.url(&r.url),
                "headers": masker.headers(&r.headers),
                "body": body,
                "body_base64": base64,
                "body_truncated": r.body_truncated,
                "body_size": if r.body_size == 0 { r.body.len() as u64 } else { r.body_size },
            })
        }
    };
    out["response"] = match &a.response {
        None => Value::Null,
        Some(r) => {
            let (body, base64) = masker.body(&r.body);
            json!({
                "status": r.status,
                "headers": masker.headers(&r.headers),
                "body": body,
                "body_base64": base64,
                "body_truncated": r.body_truncated,
            })
        }
    };
    out
}

/// A page of summaries. Summaries carry no headers or bodies, and their
/// error texts are Herald's and the network's, so nothing there is secret.
fn page_json(page: log_index::Page, q: &log_index::Query) -> Value {
    let data: Vec<Value> = page
        .items
        .iter()
        .map(|e| {
            let mut s = summary(&e.attempt);
            if e.error_truncated {
                s["error_truncated"] = Value::Bool(true);
            }
            s
        })
        .collect();
    json!({
        "data": data,
        "total": page.total,
        "limit": q.limit,
        "offset": q.offset,
        "next_cursor": page.next_cursor.map(|c| c.encode()),
    })
}

fn index_error(error: log_index::IndexError) -> ApiError {
    tracing::warn!(%error, "log index");
    ApiError::unavailable("delivery logs are unavailable right now, try again")
}

/// The caller's webhook, or 404.
async fn webhook(state: &AppState, caller: &Caller, id: &str) -> Result<proto::Webhook, ApiError> {
    if !names::valid_id(id) {
        return Err(ApiError::not_found("webhook"));
    }
    Ok(state
        .store
        .get(&caller.org, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?
        .webhook)
}

/// An attempt of the caller's webhook in full, or 404: found in the index,
/// read from the attempts stream by its sequence. When the stream no longer
/// has it (its size limit dropped it), the summary stands in.
async fn attempt(
    state: &AppState,
    webhook: &proto::Webhook,
    log_id: &str,
) -> Result<proto::AttemptResult, ApiError> {
    if !names::valid_id(log_id) {
        return Err(ApiError::not_found("log"));
    }
    let entry = state
        .logs
        .get(&webhook.organization_id, &webhook.id, log_id)
        .await
        .map_err(index_error)?
        .ok_or_else(|| ApiError::not_found("log"))?;
    let unavailable = |error: &dyn std::fmt::Display| {
        tracing::warn!(%error, seq = entry.seq, "cannot read an attempt");
        ApiError::unavailable("cannot read the attempt right now, try again")
    };
    let stream = state
        .js
        .get_stream(names::ATTEMPTS_STREAM)
        .await
        .map_err(|e| unavailable(&e))?;
    let full = match stream.direct_get(entry.seq).await {
        Ok(message) => proto::AttemptResult::decode(message.payload.as_ref()).ok(),
        Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => None,
        Err(e) => return Err(unavailable(&e)),
    };
    Ok(full
        .filter(|a| {
            a.log_id == log_id
                && a.organization_id == webhook.organization_id
                && a.webhook_id == webhook.id
        })
        .unwrap_or(entry.attempt))
}

/// `GET /webhooks/{id}/logs?limit&offset&cursor&status&event_type&event_id&delivery_id&since&until`
pub async fn list_for_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let q = list_query(&query, caller.org.clone(), Some(id.clone()))?;
    webhook(&state, &caller, &id).await?;
    let page = state.logs.page(&q).await.map_err(index_error)?;
    Ok(Json(page_json(page, &q)))
}

/// `GET /webhooks/logs/all?…`: the same query over every webhook of the
/// organization.
pub async fn list_for_org(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let q = list_query(&query, caller.org.clone(), None)?;
    let page = state.logs.page(&q).await.map_err(index_error)?;
    Ok(Json(page_json(page, &q)))
}

/// `GET /webhooks/{id}/logs/{log_id}`
pub async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, log_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let webhook = webhook(&state, &caller, &id).await?;
    let attempt = attempt(&state, &webhook, &log_id).await?;
    Ok(Json(detail_json(
        &attempt,
        &Masker::for_webhook(&state, &webhook),
    )))
}

/// Publishes a one-off delivery job (first attempt, never retried).
async fn publish_job(
    state: &AppState,
    webhook: &proto::Webhook,
    event: proto::Event,
    kind: proto::DeliveryKind,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let delivery_id = ids::new_delivery_id();
    let job = proto::DeliveryJob {
        delivery_id: delivery_id.clone(),
        organization_id: webhook.organization_id.clone(),
        webhook_id: webhook.id.clone(),
        event: Some(event),
        attempt: 1,
        kind: kind as i32,
        ..Default::default()
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        names::MSG_ID_HEADER,
        ids::first_job_msg_id(&delivery_id).as_str(),
    );
    herald_platform::nats::publish(
        &state.js,
        names::delivery_subject(&webhook.organization_id, &webhook.id),
        headers,
        job.encode_to_vec().into(),
    )
    .await
    .map_err(|error| {
        tracing::warn!(%error, webhook_id = %webhook.id, "cannot publish delivery job");
        ApiError::unavailable("cannot queue the delivery right now, try again")
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "delivery_id": delivery_id,
            "log_id": ids::log_id(&delivery_id, 1),
        })),
    ))
}

/// The sample event a test delivery carries.
pub fn test_event(org: &str, now_ms: i64) -> proto::Event {
    let attributes = [
        ("workflow", "herald-test"),
        ("execution", "test"),
        ("status", "succeeded"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    proto::Event {
        id: ids::new_event_id(),
        organization_id: org.to_owned(),
        r#type: TEST_EVENT_TYPE.to_owned(),
        occurred_at_ms: now_ms,
        attributes,
        data_json: br#"{"test":true,"message":"A test event sent by Herald"}"#
            .as_slice()
            .into(),
        metadata_json: Default::default(),
        received_at_ms: now_ms,
        traceparent: String::new(),
    }
}

/// `POST /webhooks/{id}/test`: a test `workflow.completed` event to this
/// webhook alone, even when it is disabled.
pub async fn test(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let webhook = webhook(&state, &caller, &id).await?;
    state.manual_sends.take(&caller).await?;
    let event = test_event(&caller.org, crate::now_ms());
    publish_job(&state, &webhook, event, proto::DeliveryKind::Test).await
}

/// `POST /webhooks/{id}/logs/{log_id}/retry`: that attempt's event to that
/// webhook again, now, as a new delivery (its own `webhook-id`; the event id
/// in the body is the same).
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, log_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let webhook = webhook(&state, &caller, &id).await?;
    let attempt = attempt(&state, &webhook, &log_id).await?;
    state.manual_sends.take(&caller).await?;
    let event = match attempt.event {
        Some(event) => event,
        None => accepted_event(&state, attempt.event_seq, &attempt.event_id).await?,
    };
    publish_job(&state, &webhook, event, proto::DeliveryKind::ManualRetry).await
}

/// The event an attempt delivered, read back from the accepted-events stream
/// by its sequence (attempt records do not carry a second copy of it).
pub async fn accepted_event(
    state: &AppState,
    seq: u64,
    event_id: &str,
) -> Result<proto::Event, ApiError> {
    let gone = || {
        ApiError::bad_request(
            "not_retryable",
            "this attempt's event is no longer retained and cannot be delivered again",
        )
    };
    if seq == 0 {
        return Err(gone());
    }
    let unavailable = |error: &dyn std::fmt::Display| {
        tracing::warn!(%error, seq, "cannot read an accepted event");
        ApiError::unavailable("cannot read the event right now, try again")
    };
    let stream = state
        .js
        .get_stream(names::ACCEPTED_STREAM)
        .await
        .map_err(|e| unavailable(&e))?;
    let message = match stream.get_raw_message(seq).await {
        Ok(message) => message,
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Err(gone()),
        Err(e) => return Err(unavailable(&e)),
    };
    match proto::Event::decode(message.payload.as_ref()) {
        Ok(event) if event.id == event_id => Ok(event),
        _ => Err(gone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker() -> Masker {
        let mut secrets = vec![
            "whsec_c2VjcmV0LWJ5dGVzLWhlcmU=".to_owned(),
            "c2VjcmV0LWJ5dGVzLWhlcmU=".to_owned(),
        ];
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Masker { secrets }
    }

    #[test]
    fn texts_lose_the_webhook_secrets() {
        let m = masker();
        for (input, expected) in [
            ("plain", "plain"),
            (
                "got whsec_c2VjcmV0LWJ5dGVzLWhlcmU= back",
                "got ******** back",
            ),
            ("key c2VjcmV0LWJ5dGVzLWhlcmU=", "key ********"),
            ("", ""),
        ] {
            assert_eq!(m.text(input), expected, "{input}");
        }
    }

    #[test]
    fn headers_are_masked_by_name_and_by_value() {
        let m = masker();
        let h = |name: &str, value: &str| proto::Header {
            name: name.into(),
            value: value.into(),
        };
        let shown = m.headers(&[
            h("Authorization", "Bearer abc"),
            h("X-Api-Key", "abc"),
            h("webhook-signature", "v1,abc"),
            h("Set-Cookie", "s=1"),
            h("X-Plain", "whsec_c2VjcmV0LWJ5dGVzLWhlcmU="),
            h("Content-Type", "application/json"),
        ]);
        let values: Vec<&str> = shown
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"].as_str().unwrap())
            .collect();
        assert_eq!(values, [MASK, MASK, MASK, MASK, MASK, "application/json"]);
    }

    #[test]
    fn urls_lose_secret_query_values_and_passwords() {
        let m = masker();
        for (input, expected) in [
            ("https://a.example/h", "https://a.example/h"),
            (
                "https://a.example/h?token=t1&page=2",
                "https://a.example/h?token=********&page=2",
            ),
            (
                "https://a.example/h?API_KEY=x",
                "https://a.example/h?API_KEY=********",
            ),
            ("https://u:p@a.example/", "https://u:********@a.example/"),
        ] {
            assert_eq!(m.url(input), expected, "{input}");
        }
    }

    #[test]
    fn bodies_are_text_or_flagged_base64() {
        let m = masker();
        assert_eq!(m.body(b"{\"a\":1}"), (json!("{\"a\":1}"), false));
        assert_eq!(m.body(&[0xff, 0x00, 0x01]), (json!("/wAB"), true));
        assert_eq!(m.body(b""), (json!(""), false));
    }

    #[test]
    fn paging_defaults_and_bounds() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(paging(&q(&[])).unwrap(), (50, 0));
        assert_eq!(
            paging(&q(&[("limit", "500"), ("offset", "7")])).unwrap(),
            (500, 7)
        );
        for (name, value) in [
            ("limit", "0"),
            ("limit", "501"),
            ("limit", " 5"),
            ("offset", "-1"),
            ("offset", "99999999999"),
        ] {
            let error = paging(&q(&[(name, value)])).unwrap_err();
            assert_eq!(error.field.as_deref(), Some(name), "{name}={value}");
        }
    }
}
