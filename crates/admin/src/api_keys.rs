//! API keys as data (PRODUCT.md, "Tenants"): `POST /api-keys` makes a key
//! and answers it once (`hk_<id>_<secret>`), `GET /api-keys` lists them
//! (never the key), `DELETE /api-keys/{id}` revokes one. Operator keys
//! only.
//!
//! A key is a record in the `herald-api-keys` KV bucket under its id,
//! holding the HMAC-SHA256 of the whole key under the server key
//! ([`crate::auth::HashKey`]), never the key. The token embeds the id, so a
//! request finds its record directly and compares hashes in constant time.
//! Every admin replica follows the bucket ([`crate::kv_map`]): a revoked
//! key's deletion reaches each one on the change feed, within milliseconds.
//! A key this replica has not heard of yet is read from the bucket, so a
//! new key works at once on every replica.
//!
//! `last_used_at` is written lazily: at most once a minute per key and
//! replica, after the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_core::{names, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::audit;
use crate::auth::{Caller, Kind, Principal, Scope};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::kv_map::KvError;
use crate::random;

pub const BUCKET: &str = "herald-api-keys";
/// Every API key starts with this.
pub const PREFIX: &str = "hk_";
/// How often `last_used_at` is written per key, at most.
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to recognize it by.
    pub prefix: String,
    /// HMAC-SHA256 of the key under the server key, hex.
    pub hash: String,
    pub scope: Scope,
    pub organizations: Vec<String>,
    pub default_organization: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub last_used_at_ms: Option<i64>,
    /// The key that made it.
    #[serde(default)]
    pub created_by: String,
}

impl ApiKey {
    fn principal(&self) -> Principal {
        Principal {
            id: self.id.clone(),
            name: self.name.clone(),
            scope: self.scope,
            organizations: self.organizations.clone(),
            default_organization: self.default_organization.clone(),
            webhook_ids: None,
            kind: Kind::ApiKey,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

fn to_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "scope": k.scope.name(),
        "organizations": k.organizations,
        "default_organization": k.default_organization,
        "created_at": payload::rfc3339_ms(k.created_at_ms),
        "last_used_at": k.last_used_at_ms.map(payload::rfc3339_ms),
        "expires_at": k.expires_at_ms.map(payload::rfc3339_ms),
        "created_by": k.created_by,
    })
}

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{delete, get};
    axum::Router::new()
        .route("/api-keys", get(list).post(create))
        .route("/api-keys/{id}", delete(revoke))
}

/// The principal of an `hk_` token, `rest` being what follows the prefix.
pub async fn authenticate(state: &AppState, token: &str, rest: &str) -> Option<Arc<Principal>> {
    let (id, _) = rest.split_once('_')?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let key_id = format!("key_{id}");
    let record = match state.api_keys.get(&key_id) {
        Some(record) => record,
        // Made a moment ago on another replica: the bucket knows it.
        None => Arc::new(state.api_keys.fetch(&key_id).await.ok()??.0),
    };
    if !state.config.hash_key.verify(token, &record.hash) {
        return None;
    }
    Some(Arc::new(record.principal()))
}

/// Writes the key's `last_used_at`, at most once a minute per key and
/// replica, after the request (never in its way).
pub fn touch(state: &AppState, id: &str) {
    static LAST: Mutex<Option<HashMap<String, i64>>> = Mutex::new(None);
    let now = crate::now_ms();
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        if last.len() > 10_000 {
            last.retain(|_, at| now - *at < TOUCH_EVERY_MS);
        }
        match last.get(id) {
            Some(at) if now - at < TOUCH_EVERY_MS => return,
            _ => last.insert(id.to_owned(), now),
        };
    }
    let (keys, id) = (state.api_keys.clone(), id.to_owned());
    tokio::spawn(async move {
        // A compare-and-set: a key revoked meanwhile is not brought back.
        if let Ok(Some((mut record, revision))) = keys.fetch(&id).await {
            if record
                .last_used_at_ms
                .is_some_and(|at| now - at < TOUCH_EVERY_MS)
            {
                return;
            }
            record.last_used_at_ms = Some(now);
            if let Err(error) = keys.update(&id, record, revision).await {
                tracing::debug!(%error, key_id = %id, "last_used_at not written");
            }
        }
    });
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let mut req = body
        .0
        .ok_or_else(|| ApiError::bad_request("invalid_json", "a JSON object body is required"))?;
    req.only(&[
        "name",
        "scope",
        "organizations",
        "default_organization",
        "expires_at",
        "ttl",
    ])?;
    let fields = req.names();
    let name: String = req.required("name")?;
    if name.trim().is_empty() || name.chars().count() > 255 {
        return Err(ApiError::validation(
            "name",
            "name must be 1 to 255 characters",
        ));
    }
    let scope_text: String = req.required("scope")?;
    let scope = Scope::parse(&scope_text)
        .ok_or_else(|| ApiError::validation("scope", "scope must be operator, admin or read"))?;
    let organizations: Vec<String> = match scope {
        Scope::Operator => req
            .optional("organizations")?
            .unwrap_or_else(|| vec!["*".into()]),
        _ => req.required("organizations")?,
    };
    if organizations.is_empty() || organizations.len() > 100 {
        return Err(ApiError::validation(
            "organizations",
            "organizations must name 1 to 100 organizations",
        ));
    }
    for org in &organizations {
        let allowed = if scope == Scope::Operator {
            org == "*"
        } else {
            names::valid_org(org)
        };
        if !allowed {
            return Err(ApiError::validation(
                "organizations",
                if scope == Scope::Operator {
                    "an operator key's organizations are [\"*\"]".to_owned()
                } else {
                    format!("{org:?} is not 1-64 of [a-z0-9_-]")
                },
            ));
        }
    }
    let default_organization: String = match req.optional("default_organization")? {
        Some(org) => org,
        None if scope == Scope::Operator => {
            return Err(ApiError::validation(
                "default_organization",
                "an operator key needs a default_organization",
            ));
        }
        None => organizations[0].clone(),
    };
    let any = organizations.iter().any(|o| o == "*");
    if !names::valid_org(&default_organization)
        || !(any || organizations.contains(&default_organization))
    {
        return Err(ApiError::validation(
            "default_organization",
            "default_organization must be one of its organizations",
        ));
    }
    let now = crate::now_ms();
    let expires_at_ms = match (
        req.optional::<String>("expires_at")?,
        req.optional::<String>("ttl")?,
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "ttl",
                "give expires_at or ttl, not both",
            ));
        }
        (Some(at), None) => Some(
            time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .ok()
                .filter(|at| *at > now)
                .ok_or_else(|| {
                    ApiError::validation("expires_at", "expires_at must be a future RFC 3339 time")
                })?,
        ),
        (None, Some(ttl)) => {
            let ttl = herald_core::duration::parse_duration(&ttl)
                .ok()
                .filter(|d| d.as_millis() >= 1000)
                .ok_or_else(|| {
                    ApiError::validation("ttl", "ttl must be a duration like 1h or 90d")
                })?;
            Some(now + ttl.as_millis() as i64)
        }
        (None, None) => None,
    };
    let short = random::id();
    let id = format!("key_{short}");
    let token = format!("{PREFIX}{short}_{}", random::text(32));
    let record = ApiKey {
        id: id.clone(),
        name,
        prefix: token[..PREFIX.len() + 8].to_owned(),
        hash: state.config.hash_key.hash(&token),
        scope,
        organizations,
        default_organization,
        created_at_ms: now,
        expires_at_ms,
        last_used_at_ms: None,
        created_by: caller.key.clone(),
    };
    state.api_keys.create(&id, record.clone()).await?;
    record_change(&state, &caller, &record, "api_key.created", fields).await;
    let mut body = to_json(&record);
    body["key"] = Value::String(token);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// One audit record per organization the key names (one platform-wide
/// record for a key of every organization).
async fn record_change(
    state: &AppState,
    caller: &Caller,
    key: &ApiKey,
    action: &str,
    fields: Vec<String>,
) {
    if key.organizations.iter().any(|o| o == "*") {
        audit::record(state, caller, None, action, ("api_key", &key.id), fields).await;
        return;
    }
    for org in &key.organizations {
        audit::record(
            state,
            caller,
            Some(org),
            action,
            ("api_key", &key.id),
            fields.clone(),
        )
        .await;
    }
}

/// `GET /api-keys`: every key made over the API (not the keys file's),
/// oldest first; `?organization=` keeps the keys that may use it.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.require_operator()?;
    state.api_keys.wait_loaded().await?;
    let mut keys = state.api_keys.values();
    if let Some(org) = query.get("organization") {
        keys.retain(|k| k.organizations.iter().any(|o| o == org));
    }
    keys.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let data: Vec<Value> = keys.iter().map(|k| to_json(k)).collect();
    Ok(Json(json!({"data": data, "total": data.len()})))
}

async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_operator()?;
    let (record, _) = state
        .api_keys
        .fetch(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    state.api_keys.delete(&id).await?;
    record_change(&state, &caller, &record, "api_key.revoked", Vec::new()).await;
    Ok(StatusCode::NO_CONTENT)
}

/// An organization is being deleted: its keys go with it; a key of other
/// organizations too only loses this one.
pub async fn remove_organization(
    state: &AppState,
    caller: &Caller,
    org: &str,
) -> Result<(), ApiError> {
    state.api_keys.wait_loaded().await?;
    for key in state.api_keys.values() {
        if !key.organizations.iter().any(|o| o == org) {
            continue;
        }
        for _ in 0..10 {
            let Some((mut record, revision)) = state.api_keys.fetch(&key.id).await? else {
                break;
            };
            record.organizations.retain(|o| o != org);
            if record.organizations.is_empty() {
                state.api_keys.delete(&key.id).await?;
                audit::record(
                    state,
                    caller,
                    Some(org),
                    "api_key.revoked",
                    ("api_key", &key.id),
                    Vec::new(),
                )
                .await;
                break;
            }
            if record.default_organization == org {
                record.default_organization = record.organizations[0].clone();
            }
            match state.api_keys.update(&key.id, record, revision).await {
                Ok(_) => {
                    audit::record(
                        state,
                        caller,
                        Some(org),
                        "api_key.updated",
                        ("api_key", &key.id),
                        vec!["organizations".into()],
                    )
                    .await;
                    break;
                }
                Err(KvError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
