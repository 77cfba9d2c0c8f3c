//! Organizations as data (PRODUCT.md, "Tenants"): `POST/GET /organizations`,
//! `GET/PATCH/DELETE /organizations/{org}`, for operator keys. A record in
//! the `herald-organizations` KV bucket (key: the organization's id) holds
//! its display name, free-form metadata and the limits that override the
//! operator's defaults for it (webhooks, API requests and manual sends a
//! minute, delivery requests in flight and a second); every admin replica
//! follows the bucket ([`KvMap`]), and so does every deliverer.
//!
//! An organization without a record still works as it always has: its id
//! is valid wherever a key allows it, and the defaults apply. Deleting one
//! deletes its webhooks (so no delivery starts for them afterwards), its
//! API keys and console links, then the record; its events, attempts and
//! audit trail age out with their streams' retention.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::{names, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::audit;
use crate::auth::Caller;
use crate::body::{Fields, JsonBody};
use crate::error::ApiError;
use crate::kv_map::KvError;
use crate::limits::OrgLock;

pub const BUCKET: &str = "herald-organizations";
/// The largest metadata object, as JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Organization {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub limits: Limits,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Limits of one organization; `None` keeps the operator's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default)]
    pub max_webhooks: Option<u32>,
    /// API requests a minute per key acting for the organization.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Test events, manual retries, recovers and replays a minute per key.
    #[serde(default)]
    pub manual_sends_per_minute: Option<u32>,
    /// Delivery requests in flight at once (read by the deliverer).
    #[serde(default)]
    pub max_deliveries_in_flight: Option<u32>,
    /// Delivery requests started a second (read by the deliverer).
    #[serde(default)]
    pub deliveries_per_second: Option<u32>,
}

const LIMITS: &[(&str, u32, u32)] = &[
    ("max_webhooks", 1, 100_000),
    ("requests_per_minute", 1, 10_000_000),
    ("manual_sends_per_minute", 1, 60_000),
    ("max_deliveries_in_flight", 1, 65_536),
    ("deliveries_per_second", 1, 1_000_000),
];

impl Limits {
    fn slot(&mut self, name: &str) -> &mut Option<u32> {
        match name {
            "max_webhooks" => &mut self.max_webhooks,
            "requests_per_minute" => &mut self.requests_per_minute,
            "max_deliveries_in_flight" => &mut self.max_deliveries_in_flight,
            "deliveries_per_second" => &mut self.deliveries_per_second,
            _ => &mut self.manual_sends_per_minute,
        }
    }

    /// Applies `{"<limit>": n | null, …}`: a number sets, null resets.
    fn merge(&mut self, given: Map<String, Value>) -> Result<Vec<String>, ApiError> {
        let mut changed = Vec::new();
        for (name, value) in given {
            let Some(&(_, min, max)) = LIMITS.iter().find(|(n, ..)| *n == name) else {
                let known: Vec<&str> = LIMITS.iter().map(|(n, ..)| *n).collect();
                return Err(ApiError::validation(
                    "limits",
                    format!("unknown limit {name:?}; known: {}", known.join(", ")),
                ));
            };
            let parsed = match value {
                Value::Null => None,
                Value::Number(n) => Some(
                    n.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            ApiError::validation(
                                "limits",
                                format!("limits.{name} must be {min} to {max}, or null"),
                            )
                        })?,
                ),
                _ => {
                    return Err(ApiError::validation(
                        "limits",
                        format!("limits.{name} must be a number or null"),
                    ));
                }
            };
            *self.slot(&name) = parsed;
            changed.push(format!("limits.{name}"));
        }
        Ok(changed)
    }
}

fn to_json(o: &Organization) -> Value {
    json!({
        "id": o.id,
        "name": o.name,
        "metadata": o.metadata,
        "limits": {
            "max_webhooks": o.limits.max_webhooks,
            "requests_per_minute": o.limits.requests_per_minute,
            "manual_sends_per_minute": o.limits.manual_sends_per_minute,
            "max_deliveries_in_flight": o.limits.max_deliveries_in_flight,
            "deliveries_per_second": o.limits.deliveries_per_second,
        },
        "created_at": payload::rfc3339_ms(o.created_at_ms),
        "updated_at": payload::rfc3339_ms(o.updated_at_ms),
    })
}

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/organizations", get(list).post(create))
        .route(
            "/organizations/{org}",
            get(get_one).patch(patch).delete(delete_one),
        )
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 255 {
        return Err(ApiError::validation(
            "name",
            "name must be 1 to 255 characters",
        ));
    }
    Ok(())
}

fn validate_metadata(metadata: &Map<String, Value>) -> Result<(), ApiError> {
    let size = serde_json::to_vec(metadata).map_or(usize::MAX, |v| v.len());
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::validation(
            "metadata",
            format!("metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"),
        ));
    }
    Ok(())
}

fn body_of(body: JsonBody) -> Result<Fields, ApiError> {
    body.0
        .ok_or_else(|| ApiError::bad_request("invalid_json", "a JSON object body is required"))
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let mut req = body_of(body)?;
    req.only(&["id", "name", "metadata", "limits"])?;
    let fields = req.names();
    let id: String = req.required("id")?;
    if !names::valid_org(&id) {
        return Err(ApiError::validation("id", "id must be 1-64 of [a-z0-9_-]"));
    }
    let name: String = req.optional("name")?.unwrap_or_else(|| id.clone());
    validate_name(&name)?;
    let metadata: Map<String, Value> = req.optional("metadata")?.unwrap_or_default();
    validate_metadata(&metadata)?;
    let mut limits = Limits::default();
    if let Some(given) = req.optional::<Map<String, Value>>("limits")? {
        limits.merge(given)?;
    }
    let now = crate::now_ms();
    let org = Organization {
        id: id.clone(),
        name,
        metadata,
        limits,
        created_at_ms: now,
        updated_at_ms: now,
    };
    match state.orgs.create(&id, org.clone()).await {
        Ok(_) => {}
        Err(KvError::Conflict) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("organization {id:?} already exists"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    audit::record(
        &state,
        &caller,
        Some(&id),
        "organization.created",
        ("organization", &id),
        fields,
    )
    .await;
    Ok((StatusCode::CREATED, Json(to_json(&org))).into_response())
}

/// `GET /organizations?limit&cursor`: by id; `next_cursor` reads on.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    state.orgs.wait_loaded().await?;
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::validation("limit", "limit must be 1 to 1000"))?,
    };
    let after = query.get("cursor").cloned().unwrap_or_default();
    let all = state.orgs.values();
    let total = all.len();
    let mut page: Vec<_> = all.into_iter().filter(|o| o.id > after).collect();
    let next_cursor = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|o| o.id.clone())
    });
    let data: Vec<Value> = page.iter().map(|o| to_json(o)).collect();
    Ok(Json(
        json!({"data": data, "total": total, "next_cursor": next_cursor.flatten()}),
    ))
}

/// Operators read any organization; another key only its own.
async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !names::valid_org(&org) || (!caller.is_operator() && !caller.principal.allows(&org)) {
        return Err(ApiError::not_found("organization"));
    }
    let (found, _) = state
        .orgs
        .fetch(&org)
        .await?
        .ok_or_else(|| ApiError::not_found("organization"))?;
    Ok(Json(to_json(&found)))
}

async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    body: JsonBody,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    if !names::valid_org(&org) {
        return Err(ApiError::not_found("organization"));
    }
    let mut req = body_of(body)?;
    req.only(&["name", "metadata", "limits"])?;
    let mut fields = req.names();
    let name: Option<String> = req.not_null("name")?;
    if let Some(name) = &name {
        validate_name(name)?;
    }
    let metadata: Option<Map<String, Value>> =
        req.nullable("metadata")?.map(Option::unwrap_or_default);
    if let Some(metadata) = &metadata {
        validate_metadata(metadata)?;
    }
    let limits: Option<Map<String, Value>> = req.nullable("limits")?.map(Option::unwrap_or_default);
    for _ in 0..10 {
        let (mut found, revision) = state
            .orgs
            .fetch(&org)
            .await?
            .ok_or_else(|| ApiError::not_found("organization"))?;
        if let Some(name) = &name {
            found.name = name.clone();
        }
        if let Some(metadata) = &metadata {
            found.metadata = metadata.clone();
        }
        if let Some(limits) = &limits {
            let changed = found.limits.merge(limits.clone())?;
            fields.retain(|f| f != "limits");
            fields.extend(changed);
        }
        found.updated_at_ms = crate::now_ms();
        match state.orgs.update(&org, found.clone(), revision).await {
            Ok(_) => {
                audit::record(
                    &state,
                    &caller,
                    Some(&org),
                    "organization.updated",
                    ("organization", &org),
                    fields,
                )
                .await;
                return Ok(Json(to_json(&found)));
            }
            Err(KvError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict())
}

/// Deletes the organization's webhooks, keys and console links, then its
/// record.
async fn delete_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_operator()?;
    if !names::valid_org(&org) || state.orgs.fetch(&org).await?.is_none() {
        return Err(ApiError::not_found("organization"));
    }
    crate::api_keys::remove_organization(&state, &caller, &org).await?;
    crate::console_links::remove_organization(&state, &caller, &org).await?;
    // Under the organization's lock, which every webhook create holds: no
    // webhook is created between the list and the deletes.
    let deleted = OrgLock::holding(&state, &org, true, delete_webhooks(&state, &org)).await?;
    for id in &deleted {
        audit::record(
            &state,
            &caller,
            Some(&org),
            "webhook.deleted",
            ("webhook", id),
            Vec::new(),
        )
        .await;
    }
    state.orgs.delete(&org).await?;
    audit::record(
        &state,
        &caller,
        Some(&org),
        "organization.deleted",
        ("organization", &org),
        Vec::new(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes every webhook of `org`; answers their ids.
async fn delete_webhooks(state: &AppState, org: &str) -> Result<Vec<String>, ApiError> {
    state.store.caught_up().await?;
    let mut deleted = Vec::new();
    for webhook in state.store.list(org).await? {
        for attempt in 0.. {
            let Some(found) = state.store.get(org, &webhook.id).await? else {
                break;
            };
            match state.store.delete(org, &webhook.id, found.revision).await {
                Ok(()) => {
                    deleted.push(webhook.id.clone());
                    break;
                }
                Err(herald_platform::webhooks::StoreError::Conflict) if attempt < 10 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Its endpoint state, best effort (rebuildable, keyed by the id).
        let key = names::endpoint_key(&webhook.id);
        let _ = state
            .redis
            .run("forget endpoint state", |mut conn| async move {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }
    Ok(deleted)
}

/// The organization's own limit of `pick`, if it has a record that sets
/// one.
pub fn limit(state: &AppState, org: &str, pick: fn(&Limits) -> Option<u32>) -> Option<u32> {
    state.orgs.get(org).and_then(|o| pick(&o.limits))
}
