//! The webhook routes: create, list, get.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use herald_core::{ids, matching, names, payload, proto, secret};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

pub const RESERVED_HEADER_PREFIXES: &[&str] = &["content-", "webhook-", "x-webhook-"];
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "transfer-encoding",
    "connection",
    "user-agent",
    "traceparent",
];

/// A create request. Unknown fields are refused, so a typo is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    pub name: Option<String>,
    pub url: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub filters: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

pub fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "a JSON object body is required",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| {
                message.starts_with("unknown field") || message.starts_with("missing field")
            })
            .map(str::to_owned);
        ApiError {
            field,
            ..ApiError::bad_request("invalid_json", format!("invalid JSON body: {message}"))
        }
    })
}

/// The JSON form of a webhook; secrets are never part of it.
pub fn to_json(w: &proto::Webhook) -> Value {
    let filters: BTreeMap<&String, &Vec<String>> =
        w.filters.iter().map(|(k, v)| (k, &v.values)).collect();
    let headers: BTreeMap<&String, &String> = w.headers.iter().collect();
    json!({
        "id": w.id,
        "name": w.name,
        "url": w.url,
        "description": w.description,
        "event_types": w.event_types,
        "filters": filters,
        "format": match w.format() { proto::PayloadFormat::Json => "json", proto::PayloadFormat::Xml => "xml" },
        "headers": headers,
        "timeout_ms": w.timeout_ms,
        "enabled": w.enabled,
        "disabled_reason": if w.disabled_reason.is_empty() { Value::Null } else { Value::String(w.disabled_reason.clone()) },
        "created_at": payload::rfc3339_ms(w.created_at_ms),
        "updated_at": payload::rfc3339_ms(w.updated_at_ms),
    })
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 255 {
        return Err(ApiError::validation(
            "name",
            "name must be 1-255 characters",
        ));
    }
    Ok(())
}

pub fn validate_url(url: &str, allow_http: bool) -> Result<(), ApiError> {
    if url.len() > 2048 {
        return Err(ApiError::validation(
            "url",
            "url must be at most 2048 characters",
        ));
    }
    let parsed = url::Url::parse(url)
        .map_err(|e| ApiError::validation("url", format!("url is not valid: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err(ApiError::validation("url", "url must use https")),
        other => {
            return Err(ApiError::validation(
                "url",
                format!("url scheme {other:?} is not https"),
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::validation("url", "url must have a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ApiError::validation(
            "url",
            "url must not carry credentials; use headers",
        ));
    }
    Ok(())
}

pub fn validate_event_types(state: &AppState, types: &[String]) -> Result<(), ApiError> {
    if types.is_empty() {
        return Err(ApiError::validation(
            "event_types",
            "event_types must name at least one type",
        ));
    }
    for t in types {
        if !matching::valid_pattern(t) {
            return Err(ApiError::validation(
                "event_types",
                format!("{t:?} is not an event type or pattern"),
            ));
        }
        if !state.config.catalogue.pattern_selects_any(t) {
            return Err(ApiError::validation(
                "event_types",
                format!("{t:?} selects no type of the catalogue (GET /event-types)"),
            ));
        }
    }
    Ok(())
}

pub fn validate_filters(filters: &BTreeMap<String, Vec<String>>) -> Result<(), ApiError> {
    if filters.len() > 32 {
        return Err(ApiError::validation("filters", "at most 32 filter keys"));
    }
    for (key, values) in filters {
        if !names::valid_type_token(key) {
            return Err(ApiError::validation(
                "filters",
                format!("filter key {key:?} is not 1-64 of [A-Za-z0-9_-]"),
            ));
        }
        if values.is_empty() || values.len() > 100 {
            return Err(ApiError::validation(
                "filters",
                format!("filter {key:?} must have 1-100 values"),
            ));
        }
        if values
            .iter()
            .any(|v| v.is_empty() || v.chars().count() > 256)
        {
            return Err(ApiError::validation(
                "filters",
                format!("values of filter {key:?} must be 1-256 characters"),
            ));
        }
    }
    Ok(())
}

pub fn validate_headers(headers: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if headers.len() > 32 {
        return Err(ApiError::validation("headers", "at most 32 custom headers"));
    }
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str())
            || RESERVED_HEADER_PREFIXES
                .iter()
                .any(|p| lower.starts_with(p))
        {
            return Err(ApiError::validation(
                "headers",
                format!("header {name:?} is reserved"),
            ));
        }
        if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ApiError::validation(
                "headers",
                format!("{name:?} is not a valid header name"),
            ));
        }
        if value.contains(['\r', '\n'])
            || axum::http::HeaderValue::from_str(value).is_err()
            || value.len() > 4096
        {
            return Err(ApiError::validation(
                "headers",
                format!("value of header {name:?} is not valid"),
            ));
        }
    }
    Ok(())
}

pub fn parse_format(format: &str) -> Result<proto::PayloadFormat, ApiError> {
    match format {
        "json" => Ok(proto::PayloadFormat::Json),
        "xml" => Ok(proto::PayloadFormat::Xml),
        _ => Err(ApiError::validation("format", "format must be json or xml")),
    }
}

pub fn validate_secret(secret: &str) -> Result<(), ApiError> {
    if secret.is_empty() || secret.chars().count() > 255 {
        return Err(ApiError::validation(
            "secret",
            "secret must be 1-255 characters",
        ));
    }
    Ok(())
}

pub fn validate_timeout(timeout_ms: u32) -> Result<(), ApiError> {
    if !(1..=30_000).contains(&timeout_ms) {
        return Err(ApiError::validation(
            "timeout_ms",
            "timeout_ms must be 1-30000",
        ));
    }
    Ok(())
}

pub fn filters_to_proto(
    filters: BTreeMap<String, Vec<String>>,
) -> HashMap<String, proto::StringList> {
    filters
        .into_iter()
        .map(|(k, values)| (k, proto::StringList { values }))
        .collect()
}

/// The webhook routes (the log, test and retry routes are in `logs`).
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/webhooks", get(list).post(create))
        .route("/webhooks/{id}", get(get_one))
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CreateWebhook = parse_json(&body)?;
    let name = req
        .name
        .ok_or_else(|| ApiError::validation("name", "name is required"))?;
    validate_name(&name)?;
    let url = req
        .url
        .ok_or_else(|| ApiError::validation("url", "url is required"))?;
    validate_url(&url, state.config.allow_http)?;
    let description = req.description.unwrap_or_default();
    if description.chars().count() > 1024 {
        return Err(ApiError::validation(
            "description",
            "description must be at most 1024 characters",
        ));
    }
    let event_types = req
        .event_types
        .ok_or_else(|| ApiError::validation("event_types", "event_types is required"))?;
    validate_event_types(&state, &event_types)?;
    let filters = req.filters.unwrap_or_default();
    validate_filters(&filters)?;
    let format = parse_format(req.format.as_deref().unwrap_or("json"))?;
    let headers = req.headers.unwrap_or_default();
    validate_headers(&headers)?;
    let timeout_ms = req.timeout_ms.unwrap_or(5_000);
    validate_timeout(timeout_ms)?;
    let secret = match req.secret {
        Some(s) => {
            validate_secret(&s)?;
            s
        }
        None => secret::generate(),
    };

    let now = crate::now_ms();
    let id = ids::new_webhook_id();
    let aad = names::webhook_key(&caller.org, &id);
    let webhook = proto::Webhook {
        id,
        organization_id: caller.org.clone(),
        name,
        url,
        description,
        event_types,
        filters: filters_to_proto(filters),
        format: format as i32,
        headers: headers.into_iter().collect(),
        secrets: vec![state.config.keyring.encrypt(&secret, &aad, now)],
        timeout_ms,
        enabled: req.enabled.unwrap_or(true),
        disabled_reason: String::new(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    crate::limits::check_workflow_limit(&state, &webhook, None).await?;
    state.store.create(&webhook).await?;
    let mut body = to_json(&webhook);
    body["secret"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let webhooks = state.store.list(&caller.org).await?;
    let data: Vec<Value> = webhooks.iter().map(to_json).collect();
    Ok(Json(json!({"data": data, "total": data.len()})))
}

pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = state
        .store
        .get(&caller.org, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    Ok(Json(to_json(&found.webhook)))
}
