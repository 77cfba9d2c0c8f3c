//! The webhook routes: create, list, get, patch, delete, rotate-secret.
//!
//! Every write goes to the webhooks KV bucket with compare-and-set on the
//! revision read, so matchers and deliverers hear of it on the bucket's
//! change feed and a concurrent change is never overwritten: a write that
//! lost the race is applied again to the new definition, or answered 409
//! when the caller pinned the revision with `If-Match` (each single-webhook
//! answer carries it as `ETag`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{ids, matching, names, payload, proto, secret};
use herald_platform::webhooks::{StoreError, Versioned};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::body::{Fields, JsonBody};
use crate::error::ApiError;
use crate::limits::{self, OrgLock};

pub const RESERVED_HEADER_PREFIXES: &[&str] = &["content-", "webhook-", "x-webhook-"];
pub const RESERVED_HEADERS: &[&str] = &[
    "host",
    "transfer-encoding",
    "connection",
    "user-agent",
    "traceparent",
];

pub const MAX_NAME: usize = 255;
pub const MAX_URL: usize = 2048;
pub const MAX_DESCRIPTION: usize = 1024;
pub const MAX_SECRET: usize = 255;
pub const DEFAULT_TIMEOUT_MS: u32 = 5_000;
pub const MAX_TIMEOUT_MS: u32 = 30_000;
pub const MAX_EVENT_TYPES: usize = 100;
/// After a rotation the previous secret keeps signing this long.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Secrets a webhook signs with at once, the newest included; a rotation
/// beyond drops the oldest.
pub const MAX_LIVE_SECRETS: usize = 5;
/// Times a write is applied again after losing a race, before a 409: each
/// loss is another writer's win, so fewer than this many concurrent
/// writers of one webhook all succeed.
const WRITE_ATTEMPTS: usize = 10;

const FIELDS: &[&str] = &[
    "name",
    "url",
    "description",
    "event_types",
    "filters",
    "format",
    "headers",
    "secret",
    "timeout_ms",
    "enabled",
];

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

/// A webhook answer with its revision as `ETag`.
fn answer(status: StatusCode, body: Value, revision: u64) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// The revision `If-Match` pins, if any (`*` pins nothing).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| {
            ApiError::validation(
                "If-Match",
                "If-Match must be an ETag this API answered, e.g. \"42\"",
            )
        })
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || chars(name) > MAX_NAME {
        return Err(ApiError::validation(
            "name",
            format!("name must be 1-{MAX_NAME} characters, not blank"),
        ));
    }
    Ok(())
}

pub fn validate_url(url: &str, allow_http: bool) -> Result<(), ApiError> {
    if chars(url) > MAX_URL {
        return Err(ApiError::validation(
            "url",
            format!("url must be at most {MAX_URL} characters"),
        ));
    }
    let parsed = url::Url::parse(url)
        .map_err(|e| ApiError::validation("url", format!("url is not valid: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(ApiError::validation(
                "url",
                "url must use https (the operator has not allowed plain http)",
            ));
        }
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

pub fn validate_description(description: &str) -> Result<(), ApiError> {
    if chars(description) > MAX_DESCRIPTION {
        return Err(ApiError::validation(
            "description",
            format!("description must be at most {MAX_DESCRIPTION} characters"),
        ));
    }
    Ok(())
}

pub fn validate_event_types(state: &AppState, types: &[String]) -> Result<(), ApiError> {
    if types.is_empty() || types.len() > MAX_EVENT_TYPES {
        return Err(ApiError::validation(
            "event_types",
            format!("event_types must name 1-{MAX_EVENT_TYPES} types or patterns"),
        ));
    }
    for t in types {
        if !matching::valid_pattern(t) {
            return Err(ApiError::validation(
                "event_types",
                format!(
                    "{t:?} is not an event type or pattern (`workflow.*` one token, `workflow.>` any depth)"
                ),
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
        if values.iter().any(|v| v.is_empty() || chars(v) > 256) {
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
        // Visible ASCII, space and tab: `HeaderValue` would also take bytes
        // above 0x7f, which receivers read in differing charsets.
        if !value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
            || value.len() > 4096
        {
            return Err(ApiError::validation(
                "headers",
                format!(
                    "value of header {name:?} must be at most 4096 visible ASCII characters, no CR/LF"
                ),
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
    if secret.is_empty() || chars(secret) > MAX_SECRET {
        return Err(ApiError::validation(
            "secret",
            format!("secret must be 1-{MAX_SECRET} characters"),
        ));
    }
    Ok(())
}

pub fn validate_timeout(timeout_ms: u32) -> Result<(), ApiError> {
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::validation(
            "timeout_ms",
            format!("timeout_ms must be 1-{MAX_TIMEOUT_MS}"),
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
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/webhooks", get(list).post(create))
        .route(
            "/webhooks/{id}",
            get(get_one).patch(patch).delete(delete_one),
        )
        .route("/webhooks/{id}/rotate-secret", post(rotate_secret))
}

fn required_body(body: JsonBody) -> Result<Fields, ApiError> {
    body.0
        .ok_or_else(|| ApiError::bad_request("invalid_json", "a JSON object body is required"))
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let mut req = required_body(body)?;
    req.only(FIELDS)?;
    let name: String = req.required("name")?;
    validate_name(&name)?;
    let url: String = req.required("url")?;
    validate_url(&url, state.config.allow_http)?;
    let description: String = req.optional("description")?.unwrap_or_default();
    validate_description(&description)?;
    let event_types: Vec<String> = req.required("event_types")?;
    validate_event_types(&state, &event_types)?;
    let filters: BTreeMap<String, Vec<String>> = req.optional("filters")?.unwrap_or_default();
    validate_filters(&filters)?;
    let format: String = req.optional("format")?.unwrap_or_else(|| "json".into());
    let format = parse_format(&format)?;
    let headers: BTreeMap<String, String> = req.optional("headers")?.unwrap_or_default();
    validate_headers(&headers)?;
    let timeout_ms: u32 = req.optional("timeout_ms")?.unwrap_or(DEFAULT_TIMEOUT_MS);
    validate_timeout(timeout_ms)?;
    let enabled: bool = req.optional("enabled")?.unwrap_or(true);
    let secret = match req.optional::<String>("secret")? {
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
        enabled,
        disabled_reason: String::new(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let revision = if limits::workflows(&webhook).is_empty() {
        state.store.create(&webhook).await?
    } else {
        let lock = OrgLock::acquire(&state, &caller.org).await?;
        let result = async {
            limits::check_workflow_limit(&state, &webhook).await?;
            Ok::<_, ApiError>(state.store.create(&webhook).await?)
        }
        .await;
        lock.release().await;
        result?
    };
    let mut body = to_json(&webhook);
    body["secret"] = Value::String(secret);
    let mut response = answer(StatusCode::CREATED, body, revision);
    if let Ok(location) = HeaderValue::from_str(&format!("/webhooks/{}", webhook.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let webhooks = state.store.list(&caller.org).await?;
    let data: Vec<Value> = webhooks.iter().map(to_json).collect();
    Ok(Json(json!({"data": data, "total": data.len()})))
}

async fn find(state: &AppState, org: &str, id: &str) -> Result<Versioned, ApiError> {
    state
        .store
        .get(org, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))
}

pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let found = find(&state, &caller.org, &id).await?;
    Ok(answer(
        StatusCode::OK,
        to_json(&found.webhook),
        found.revision,
    ))
}

/// A validated PATCH: `None` leaves a field as it is.
#[derive(Debug, Default)]
struct Patch {
    name: Option<String>,
    url: Option<String>,
    description: Option<String>,
    event_types: Option<Vec<String>>,
    filters: Option<BTreeMap<String, Vec<String>>>,
    format: Option<proto::PayloadFormat>,
    headers: Option<BTreeMap<String, String>>,
    secret: Option<String>,
    timeout_ms: Option<u32>,
    enabled: Option<bool>,
}

impl Patch {
    /// Null resets an optional field to its default; required fields and
    /// `secret`/`enabled` cannot be null.
    fn parse(state: &AppState, mut req: Fields) -> Result<Self, ApiError> {
        req.only(FIELDS)?;
        let patch = Self {
            name: req.not_null("name")?,
            url: req.not_null("url")?,
            description: req
                .nullable::<String>("description")?
                .map(Option::unwrap_or_default),
            event_types: req.not_null("event_types")?,
            filters: req.nullable("filters")?.map(Option::unwrap_or_default),
            format: req
                .nullable::<String>("format")?
                .map(|f| parse_format(f.as_deref().unwrap_or("json")))
                .transpose()?,
            headers: req.nullable("headers")?.map(Option::unwrap_or_default),
            secret: req.not_null("secret")?,
            timeout_ms: req
                .nullable::<u32>("timeout_ms")?
                .map(|t| t.unwrap_or(DEFAULT_TIMEOUT_MS)),
            enabled: req.not_null("enabled")?,
        };
        if let Some(name) = &patch.name {
            validate_name(name)?;
        }
        if let Some(url) = &patch.url {
            validate_url(url, state.config.allow_http)?;
        }
        if let Some(description) = &patch.description {
            validate_description(description)?;
        }
        if let Some(types) = &patch.event_types {
            validate_event_types(state, types)?;
        }
        if let Some(filters) = &patch.filters {
            validate_filters(filters)?;
        }
        if let Some(headers) = &patch.headers {
            validate_headers(headers)?;
        }
        if let Some(secret) = &patch.secret {
            validate_secret(secret)?;
        }
        if let Some(timeout_ms) = patch.timeout_ms {
            validate_timeout(timeout_ms)?;
        }
        Ok(patch)
    }

    /// Whether the patch may raise a workflow's count of webhooks.
    fn adds_workflows(&self) -> bool {
        self.filters
            .as_ref()
            .is_some_and(|f| f.get("workflow").is_some_and(|v| !v.is_empty()))
    }

    fn apply(&self, state: &AppState, w: &mut proto::Webhook, now: i64) {
        if let Some(v) = &self.name {
            w.name = v.clone();
        }
        if let Some(v) = &self.url {
            w.url = v.clone();
        }
        if let Some(v) = &self.description {
            w.description = v.clone();
        }
        if let Some(v) = &self.event_types {
            w.event_types = v.clone();
        }
        if let Some(v) = &self.filters {
            w.filters = filters_to_proto(v.clone());
        }
        if let Some(v) = self.format {
            w.format = v as i32;
        }
        if let Some(v) = &self.headers {
            w.headers = v.clone().into_iter().collect();
        }
        if let Some(secret) = &self.secret {
            // A secret set by PATCH replaces every other at once; a rotation
            // with overlap is `POST /webhooks/{id}/rotate-secret`.
            let aad = names::webhook_key(&w.organization_id, &w.id);
            w.secrets = vec![state.config.keyring.encrypt(secret, &aad, now)];
        }
        if let Some(v) = self.timeout_ms {
            w.timeout_ms = v;
        }
        match self.enabled {
            Some(true) => {
                w.enabled = true;
                w.disabled_reason.clear();
            }
            Some(false) => w.enabled = false,
            None => {}
        }
        w.updated_at_ms = now;
    }
}

/// Forgets a webhook's consecutive failures (the deliverer's Redis counter).
async fn reset_failures(state: &AppState, webhook_id: &str) -> Result<(), ApiError> {
    let redis = state.logs.redis();
    let unavailable = || {
        ApiError::unavailable(
            "cannot reset the failure count (Redis unavailable); the webhook was not re-enabled, try again",
        )
    };
    let mut conn = redis.conn().await.ok_or_else(unavailable)?;
    let cmd = redis::cmd("DEL")
        .arg(format!("herald:failures:{webhook_id}"))
        .clone();
    match tokio::time::timeout(redis.timeout(), cmd.query_async::<()>(&mut conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::warn!(%error, webhook_id, "cannot reset failure count");
            Err(unavailable())
        }
        Err(_) => Err(unavailable()),
    }
}

/// Reads, changes and writes back with compare-and-set, applying the change
/// again to a newer definition after a lost race — unless `pinned` (the
/// caller's `If-Match`) says which revision it meant, then it is a 409.
async fn write_back(
    state: &AppState,
    org: &str,
    id: &str,
    pinned: Option<u64>,
    mut change: impl FnMut(&mut proto::Webhook),
) -> Result<(proto::Webhook, u64), ApiError> {
    for _ in 0..WRITE_ATTEMPTS {
        let Versioned {
            mut webhook,
            revision,
        } = find(state, org, id).await?;
        if pinned.is_some_and(|p| p != revision) {
            return Err(ApiError::conflict());
        }
        change(&mut webhook);
        match state.store.update(&webhook, revision).await {
            Ok(revision) => return Ok((webhook, revision)),
            Err(StoreError::Conflict) if pinned.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict())
}

pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let pinned = if_match(&headers)?;
    let patch = Patch::parse(&state, required_body(body)?)?;
    // Found before anything else happens, so another organization's id is a
    // 404 whatever the body says.
    find(&state, &caller.org, &id).await?;
    if patch.enabled == Some(true) {
        reset_failures(&state, &id).await?;
    }
    let lock = if patch.adds_workflows() {
        Some(OrgLock::acquire(&state, &caller.org).await?)
    } else {
        None
    };
    let result = async {
        if lock.is_some() {
            let mut preview = find(&state, &caller.org, &id).await?.webhook;
            patch.apply(&state, &mut preview, 0);
            limits::check_workflow_limit(&state, &preview).await?;
        }
        let now = crate::now_ms();
        write_back(&state, &caller.org, &id, pinned, |w| {
            patch.apply(&state, w, now)
        })
        .await
    }
    .await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    let (webhook, revision) = result?;
    if patch.enabled == Some(true) {
        // Failures of attempts already in flight while it was re-enabled.
        let _ = reset_failures(&state, &id).await;
    }
    Ok(answer(StatusCode::OK, to_json(&webhook), revision))
}

pub async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let pinned = if_match(&headers)?;
    for _ in 0..WRITE_ATTEMPTS {
        let found = find(&state, &caller.org, &id).await?;
        if pinned.is_some_and(|p| p != found.revision) {
            return Err(ApiError::conflict());
        }
        match state.store.delete(&caller.org, &id, found.revision).await {
            Ok(()) => {
                let _ = reset_failures(&state, &id).await;
                return Ok(StatusCode::NO_CONTENT);
            }
            Err(StoreError::Conflict) if pinned.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict())
}

/// The secrets after a rotation to `new`: the new one first, the previous
/// ones signing until `now + ROTATION_OVERLAP` (or their earlier expiry),
/// expired ones dropped, at most [`MAX_LIVE_SECRETS`] in all.
pub fn rotated(
    mut previous: Vec<proto::EncryptedSecret>,
    new: proto::EncryptedSecret,
    now_ms: i64,
) -> Vec<proto::EncryptedSecret> {
    let until = now_ms + ROTATION_OVERLAP.as_millis() as i64;
    previous.retain(|s| s.expires_at_ms == 0 || s.expires_at_ms > now_ms);
    for s in &mut previous {
        if s.expires_at_ms == 0 || s.expires_at_ms > until {
            s.expires_at_ms = until;
        }
    }
    let mut secrets = vec![new];
    secrets.extend(previous);
    secrets.truncate(MAX_LIVE_SECRETS);
    secrets
}

pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let pinned = if_match(&headers)?;
    let own = match body.0 {
        Some(mut req) => {
            req.only(&["secret"])?;
            req.optional::<String>("secret")?
        }
        None => None,
    };
    if let Some(s) = &own {
        validate_secret(s)?;
    }
    let secret = own.unwrap_or_else(secret::generate);
    let now = crate::now_ms();
    let aad = names::webhook_key(&caller.org, &id);
    let sealed = state.config.keyring.encrypt(&secret, &aad, now);
    let (webhook, revision) = write_back(&state, &caller.org, &id, pinned, |w| {
        w.secrets = rotated(std::mem::take(&mut w.secrets), sealed.clone(), now);
        w.updated_at_ms = now;
    })
    .await?;
    let mut body = to_json(&webhook);
    body["secret"] = Value::String(secret);
    Ok(answer(StatusCode::OK, body, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(created: i64, expires: i64) -> proto::EncryptedSecret {
        proto::EncryptedSecret {
            key_id: format!("k{created}"),
            created_at_ms: created,
            expires_at_ms: expires,
            ..Default::default()
        }
    }

    #[test]
    fn rotation_keeps_the_previous_secret_for_a_day() {
        let day = ROTATION_OVERLAP.as_millis() as i64;
        let now = 1_000_000;
        // The current secret gets an expiry; one already expired is dropped;
        // one expiring sooner keeps its own expiry.
        let got = rotated(
            vec![sealed(3, 0), sealed(2, now + 10), sealed(1, now - 1)],
            sealed(4, 0),
            now,
        );
        let summary: Vec<(i64, i64)> = got
            .iter()
            .map(|s| (s.created_at_ms, s.expires_at_ms))
            .collect();
        assert_eq!(summary, vec![(4, 0), (3, now + day), (2, now + 10)]);

        let many: Vec<_> = (0..10).map(|i| sealed(100 - i, 0)).collect();
        let got = rotated(many, sealed(200, 0), now);
        assert_eq!(got.len(), MAX_LIVE_SECRETS);
        assert_eq!(got[0].created_at_ms, 200);
        assert_eq!(got[1].created_at_ms, 100);
    }

    #[test]
    fn if_match_values() {
        let check = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
            }
            if_match(&h).map_err(|e| e.code)
        };
        assert_eq!(check(None), Ok(None));
        assert_eq!(check(Some("*")), Ok(None));
        assert_eq!(check(Some("\"42\"")), Ok(Some(42)));
        assert_eq!(check(Some("W/\"7\"")), Ok(Some(7)));
        assert_eq!(check(Some("nope")), Err("validation_failed"));
    }
}
