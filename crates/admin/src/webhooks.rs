//! The webhook routes: create, list, get, patch, delete, rotate-secret.
//!
//! Every write goes to the webhooks KV bucket with compare-and-set on the
//! revision read, so matchers and deliverers hear of it on the bucket's
//! change feed and a concurrent change is never overwritten: a write that
//! lost the race is applied again to the new definition, or answered 409
//! when the caller pinned the revision with `If-Match` (each single-webhook
//! answer carries it as `ETag`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::policy::Endpoint;
use herald_core::{ids, names, payload, proto, secret};
use herald_platform::endpoint_state;
use herald_platform::ordering::Status;
use herald_platform::webhooks::{StoreError, Versioned};
use serde_json::{Value, json};

use crate::AppState;
use crate::audit;
use crate::auth::Caller;
use crate::body::{Fields, JsonBody};
use crate::error::ApiError;
use crate::limits::{self, OrgLock};
use crate::validate::*;

/// A webhook answer waits this long for its ordering status, then shows
/// `ordering_status: null`.
const ORDERING_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

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
    "ordering",
    "enabled",
];

/// How a header value is shown: its last four characters (nothing of a
/// value shorter than 8).
pub const HEADER_MASK: &str = "••••";

pub fn mask_header(value: &str) -> String {
    let n = value.chars().count();
    if n < 8 {
        return HEADER_MASK.to_owned();
    }
    let last: String = value.chars().skip(n - 4).collect();
    format!("{HEADER_MASK}{last}")
}

/// A webhook's custom headers with their values, decrypted.
fn header_values(keyring: &secret::Keyring, w: &proto::Webhook) -> BTreeMap<String, String> {
    let mut headers: BTreeMap<String, String> = w.headers.clone().into_iter().collect();
    for (name, sealed) in &w.encrypted_headers {
        let aad = secret::header_aad(&w.organization_id, &w.id, name);
        let value = keyring.decrypt(sealed, &aad).unwrap_or_else(|error| {
            tracing::warn!(%error, webhook_id = %w.id, header = %name, "cannot decrypt header value");
            String::new()
        });
        headers.insert(name.clone(), value);
    }
    headers
}

/// Custom header values encrypted for storage.
fn seal_headers(
    keyring: &secret::Keyring,
    w: &proto::Webhook,
    headers: BTreeMap<String, String>,
    now: i64,
) -> std::collections::HashMap<String, proto::EncryptedSecret> {
    headers
        .into_iter()
        .map(|(name, value)| {
            let aad = secret::header_aad(&w.organization_id, &w.id, &name);
            let sealed = keyring.encrypt(&value, &aad, now);
            (name, sealed)
        })
        .collect()
}

/// The JSON form of a webhook; secrets are never part of it, header values
/// are masked.
pub fn to_json(keyring: &secret::Keyring, w: &proto::Webhook) -> Value {
    let filters: BTreeMap<&String, &Vec<String>> =
        w.filters.iter().map(|(k, v)| (k, &v.values)).collect();
    let headers: BTreeMap<String, String> = header_values(keyring, w)
        .into_iter()
        .map(|(name, value)| (name, mask_header(&value)))
        .collect();
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
        "ordering": ordering_json(w.ordering.as_ref()),
        "enabled": w.enabled,
        "disabled_reason": if w.disabled_reason.is_empty() { Value::Null } else { Value::String(w.disabled_reason.clone()) },
        "created_at": payload::rfc3339_ms(w.created_at_ms),
        "updated_at": payload::rfc3339_ms(w.updated_at_ms),
    })
}

/// `ordering` as answered: null when unordered (no ordering, or an empty
/// key, which orders nothing).
fn ordering_json(ordering: Option<&proto::Ordering>) -> Value {
    match ordering.filter(|o| !o.key.is_empty()) {
        None => Value::Null,
        Some(o) => json!({
            "key": o.key,
            "on_failure": if o.hold_on_failure { "hold" } else { "skip" },
        }),
    }
}

/// What an ordered webhook holds back, as `ordering_status` shows it.
fn status_json(status: &Status) -> Value {
    json!({
        "keys_waiting": status.keys_waiting,
        "keys_held_back": status.keys_held_back,
        "deliveries_waiting": status.deliveries_waiting,
        "oldest": status.oldest.as_ref().map(|o| json!({
            "delivery_id": o.delivery_id,
            "event_type": o.event_type,
            "key": o.key,
            "since": payload::rfc3339_ms(o.since_ms),
            "held": o.held,
        })),
    })
}

/// `ordering_status` of a single-webhook answer: null for an unordered
/// webhook, and when HERALD_ORDERED cannot say (the answer never fails for
/// it). Lists leave it out: it is a read of the stream per webhook.
async fn ordering_status(state: &AppState, w: &proto::Webhook) -> Value {
    if ordering_json(w.ordering.as_ref()).is_null() {
        return Value::Null;
    }
    let read = state.ordering.status(&w.organization_id, &w.id);
    match tokio::time::timeout(ORDERING_STATUS_TIMEOUT, read).await {
        Ok(Ok(status)) => status_json(&status),
        Ok(Err(error)) => {
            tracing::warn!(%error, webhook_id = %w.id, "cannot read the ordering status");
            Value::Null
        }
        Err(_) => {
            tracing::warn!(webhook_id = %w.id, "the ordering status did not come in time");
            Value::Null
        }
    }
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
    let fields = req.names();
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
    let ordering = parse_ordering(req.optional("ordering")?)?;
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
    let mut webhook = proto::Webhook {
        id,
        organization_id: caller.org.clone(),
        name,
        url,
        description,
        event_types,
        filters: filters_to_proto(filters),
        format: format as i32,
        secrets: vec![state.config.keyring.encrypt(&secret, &aad, now)],
        timeout_ms,
        ordering,
        enabled,
        disabled_reason: String::new(),
        created_at_ms: now,
        updated_at_ms: now,
        ..Default::default()
    };
    webhook.encrypted_headers = seal_headers(&state.config.keyring, &webhook, headers, now);
    // The limits are checked and the webhook stored under the
    // organization's lock, so two creates cannot both take the last place.
    let revision = OrgLock::holding(&state, &caller.org, true, async {
        limits::check_org_limit(&state, &caller.org).await?;
        limits::check_workflow_limit(&state, &webhook).await?;
        Ok::<_, ApiError>(state.store.create(&webhook).await?)
    })
    .await?;
    audit::record(
        &state,
        &caller,
        Some(&caller.org),
        "webhook.created",
        ("webhook", &webhook.id),
        fields,
    )
    .await;
    // A new webhook has no endpoint state yet: healthy.
    let mut body = with_state(
        to_json(&state.config.keyring, &webhook),
        &webhook,
        Some(Endpoint::Healthy),
    );
    body["ordering_status"] = ordering_status(&state, &webhook).await;
    body["secret"] = Value::String(secret);
    let mut response = answer(StatusCode::CREATED, body, revision);
    if let Ok(location) = HeaderValue::from_str(&format!("/webhooks/{}", webhook.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /webhooks?limit&cursor`: the organization's webhooks, oldest
/// first, a page at a time; `next_cursor` reads the next page.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, after) = list_page(&query)?;
    let (mut page, mut total) = state.store.page(&caller.org, after, limit + 1).await?;
    if caller.principal.webhook_ids.is_some() {
        // A console link limited to some webhooks: those, on one page.
        page = state.store.list(&caller.org).await?;
        page.retain(|w| caller.sees_webhook(&w.id));
        total = page.len();
    }
    let next_cursor = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|w| w.id.clone())
    });
    let states = endpoint_states(&state, page.iter().map(|w| w.id.as_str()).collect()).await;
    let data: Vec<Value> = page
        .iter()
        .zip(states)
        .map(|(w, endpoint)| with_state(to_json(&state.config.keyring, w), w, endpoint))
        .collect();
    Ok(Json(
        json!({"data": data, "total": total, "next_cursor": next_cursor.flatten()}),
    ))
}

/// The deliverer's view of each webhook's endpoint (`core::policy`); an
/// unknown one (Redis down) is `None`.
async fn endpoint_states(state: &AppState, ids: Vec<&str>) -> Vec<Option<Endpoint>> {
    if ids.is_empty() {
        return Vec::new();
    }
    let keys: Vec<String> = ids.iter().map(|id| names::endpoint_key(id)).collect();
    let n = keys.len();
    // One key per call keeps it valid on a Redis Cluster (keys of different
    // webhooks live in different slots), pipelined in one round trip.
    let found = state
        .redis
        .run("read endpoint states", |mut conn| async move {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("GET").arg(key);
            }
            pipe.query_async::<Vec<Option<String>>>(&mut conn).await
        })
        .await;
    match found {
        Some(values) => values
            .into_iter()
            .map(|v| Some(endpoint_state::decode(v.as_deref().unwrap_or_default())))
            .collect(),
        None => vec![None; n],
    }
}

/// Adds `state`: `disabled`, or the endpoint's `healthy` / `throttled` /
/// `failing` (with when it began failing and the next probe).
fn with_state(mut body: Value, w: &proto::Webhook, endpoint: Option<Endpoint>) -> Value {
    body["state"] = match (&endpoint, w.enabled) {
        (_, false) => json!("disabled"),
        (Some(e), true) => json!(e.name()),
        (None, true) => Value::Null,
    };
    if w.enabled
        && let Some(Endpoint::Failing {
            since_ms,
            next_probe_ms,
            last_error,
            ..
        }) = &endpoint
    {
        body["failing_since"] = json!(payload::rfc3339_ms(*since_ms));
        // None is due while it is being disabled.
        body["next_probe_at"] = match next_probe_ms {
            Some(at) => json!(payload::rfc3339_ms(*at)),
            None => Value::Null,
        };
        body["last_error"] = json!(last_error);
    }
    body
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
        shown(&state, &found.webhook).await,
        found.revision,
    ))
}

/// The webhook as the API shows it, with its current state and, when
/// ordered, what it holds back.
async fn shown(state: &AppState, w: &proto::Webhook) -> Value {
    let endpoint = endpoint_states(state, vec![w.id.as_str()])
        .await
        .pop()
        .flatten();
    let mut body = with_state(to_json(&state.config.keyring, w), w, endpoint);
    // Its organization's deliveries held back by its fair share or limits:
    // a marker the deliverers keep for a few seconds while they hold some.
    if w.enabled && held_back(state, &w.organization_id).await {
        body["held_back"] = json!(true);
    }
    body["ordering_status"] = ordering_status(state, w).await;
    body
}

async fn held_back(state: &AppState, org: &str) -> bool {
    let key = herald_core::fairness::held_key(org);
    state
        .redis
        .run("read the held marker", |mut conn| async move {
            redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<bool>(&mut conn)
                .await
        })
        .await
        .unwrap_or(false)
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
    /// `Some(None)`: ordering turned off.
    ordering: Option<Option<proto::Ordering>>,
    enabled: Option<bool>,
    /// The names of the fields given, for the audit trail.
    fields: Vec<String>,
}

impl Patch {
    /// Null resets an optional field to its default (`ordering`: off);
    /// required fields and `secret`/`enabled` cannot be null.
    fn parse(state: &AppState, mut req: Fields) -> Result<Self, ApiError> {
        req.only(FIELDS)?;
        let fields = req.names();
        let patch = Self {
            fields,
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
            ordering: req
                .nullable::<Value>("ordering")?
                .map(parse_ordering)
                .transpose()?,
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
            // A masked value as answered stands for the value it masks
            // (checked against the webhook in `keep_masked`).
            let given: BTreeMap<String, String> = headers
                .iter()
                .filter(|(_, v)| !v.starts_with(HEADER_MASK))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            validate_headers(&given)?;
            let masked: BTreeMap<String, String> =
                headers.keys().map(|k| (k.clone(), "x".into())).collect();
            validate_headers(&masked)?;
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
            // A masked value keeps the value it masks.
            let current = header_values(&state.config.keyring, w);
            let values: BTreeMap<String, String> = v
                .iter()
                .map(|(name, value)| {
                    let kept = current
                        .get(name)
                        .filter(|old| value.starts_with(HEADER_MASK) && mask_header(old) == *value);
                    (name.clone(), kept.cloned().unwrap_or_else(|| value.clone()))
                })
                .collect();
            w.headers.clear();
            w.encrypted_headers = seal_headers(&state.config.keyring, w, values, now);
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
        if let Some(v) = &self.ordering {
            w.ordering = v.clone();
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

/// Refuses a masked header value that is not the mask of the webhook's
/// current value of that header (a typo, or a stale copy).
fn keep_masked(state: &AppState, w: &proto::Webhook, patch: &Patch) -> Result<(), ApiError> {
    let Some(headers) = &patch.headers else {
        return Ok(());
    };
    let current = header_values(&state.config.keyring, w);
    for (name, value) in headers {
        if value.starts_with(HEADER_MASK)
            && current
                .get(name)
                .is_none_or(|old| mask_header(old) != *value)
        {
            return Err(ApiError::validation(
                "headers",
                format!(
                    "the value of header {name:?} is masked but is not the mask of its current value; \
                     send the value itself"
                ),
            ));
        }
    }
    Ok(())
}

/// Forgets a webhook's endpoint state (failing, its failed probes): the
/// deliverer's, in Redis.
async fn reset_endpoint_state(state: &AppState, webhook_id: &str) -> Result<(), ApiError> {
    let redis = &state.redis;
    let unavailable = || {
        ApiError::unavailable(
            "cannot reset the failure count (Redis unavailable); the webhook was not re-enabled, try again",
        )
    };
    let mut conn = redis.conn().await.ok_or_else(unavailable)?;
    let cmd = redis::cmd("DEL")
        .arg(names::endpoint_key(webhook_id))
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
/// Reads the webhook and writes what `write` makes of it, reading again
/// when it changed meanwhile — unless pinned to a revision by `If-Match`,
/// when a change is a 409.
async fn compare_and_set<T, F, Fut>(
    state: &AppState,
    org: &str,
    id: &str,
    pinned: Option<u64>,
    mut write: F,
) -> Result<T, ApiError>
where
    F: FnMut(Versioned) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for _ in 0..WRITE_ATTEMPTS {
        let found = find(state, org, id).await?;
        if pinned.is_some_and(|p| p != found.revision) {
            return Err(ApiError::conflict());
        }
        match write(found).await {
            Ok(written) => return Ok(written),
            Err(StoreError::Conflict) if pinned.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict())
}

async fn write_back(
    state: &AppState,
    org: &str,
    id: &str,
    pinned: Option<u64>,
    mut change: impl FnMut(&mut proto::Webhook),
) -> Result<(proto::Webhook, u64), ApiError> {
    compare_and_set(state, org, id, pinned, |found| {
        let mut webhook = found.webhook;
        change(&mut webhook);
        async move {
            let revision = state.store.update(&webhook, found.revision).await?;
            Ok((webhook, revision))
        }
    })
    .await
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
    let current = find(&state, &caller.org, &id).await?.webhook;
    keep_masked(&state, &current, &patch)?;
    if patch.enabled == Some(true) {
        reset_endpoint_state(&state, &id).await?;
    }
    let locked = patch.adds_workflows();
    let (webhook, revision) = OrgLock::holding(&state, &caller.org, locked, async {
        if locked {
            let mut preview = find(&state, &caller.org, &id).await?.webhook;
            patch.apply(&state, &mut preview, 0);
            limits::check_workflow_limit(&state, &preview).await?;
        }
        let now = crate::now_ms();
        write_back(&state, &caller.org, &id, pinned, |w| {
            patch.apply(&state, w, now)
        })
        .await
    })
    .await?;
    if patch.enabled == Some(true) {
        // Failures of attempts already in flight while it was re-enabled.
        let _ = reset_endpoint_state(&state, &id).await;
    }
    audit::record(
        &state,
        &caller,
        Some(&caller.org),
        "webhook.updated",
        ("webhook", &id),
        patch.fields.clone(),
    )
    .await;
    Ok(answer(
        StatusCode::OK,
        shown(&state, &webhook).await,
        revision,
    ))
}

pub async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let pinned = if_match(&headers)?;
    let (org, store) = (&caller.org, &state.store);
    compare_and_set(&state, org, &id, pinned, |found| {
        let id = &id;
        async move { store.delete(org, id, found.revision).await }
    })
    .await?;
    let _ = reset_endpoint_state(&state, &id).await;
    audit::record(
        &state,
        &caller,
        Some(&caller.org),
        "webhook.deleted",
        ("webhook", &id),
        Vec::new(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
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
    audit::record(
        &state,
        &caller,
        Some(&caller.org),
        "webhook.secret_rotated",
        ("webhook", &id),
        vec!["secret".into()],
    )
    .await;
    let mut body = shown(&state, &webhook).await;
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
    fn header_values_show_their_last_four_characters_from_eight_on() {
        for (value, shown) in [
            ("", "••••"),
            ("t1", "••••"),
            ("1234567", "••••"),
            ("12345678", "••••5678"),
            ("Bearer abcdé", "••••bcdé"),
        ] {
            assert_eq!(mask_header(value), shown, "{value}");
        }
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
