//! Console links (PRODUCT.md, "Tenants"): a platform's backend asks for a
//! short-lived URL that opens the console signed in to one organization,
//! with one scope, optionally limited to some webhooks, and hands it to its
//! signed-in customer (or frames it in its own page).
//!
//! - `POST /organizations/{org}/console-links` `{"scope", "ttl", "webhook_ids"?}`
//!   answers `{"id", "url", "expires_at"}`; the URL is
//!   `<HERALD_CONSOLE_URL or this host>/console#link=<token>`: the token is
//!   in the fragment, which browsers never send to a server, so it is in
//!   no access log.
//! - `POST /console-sessions` `{"token"}` exchanges the link's token, once,
//!   for a session token (`hs_…`) the console then sends as its bearer key.
//!   The session has the link's organization, scope, webhooks and expiry.
//! - `DELETE /organizations/{org}/console-links/{id}` revokes the link and
//!   every session opened with it, on every admin replica.
//!
//! A link is a record in the `herald-console-links` KV bucket holding the
//! HMAC of its token (never the token) and, once exchanged, when. A session
//! token is `hs_<link id>.<random>.<HMAC of both>`: it needs no record of
//! its own, and it is valid only while its link's record is there and not
//! expired, so deleting the record (revocation) ends every session of the
//! link on every replica as soon as the bucket's change feed reaches it.
//! Records outlive their expiry by a day at most (the bucket's max age).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
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

pub const BUCKET: &str = "herald-console-links";
/// The longest a link (and its sessions) may live.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Records are dropped by the bucket this long after their last write:
/// longer than any link lives.
pub const KEEP: Duration = Duration::from_secs(2 * 24 * 3600);
pub const LINK_PREFIX: &str = "hl_";
pub const SESSION_PREFIX: &str = "hs_";
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
const MAX_WEBHOOK_IDS: usize = 100;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleLink {
    pub id: String,
    pub organization: String,
    pub scope: Scope,
    #[serde(default)]
    pub webhook_ids: Option<Vec<String>>,
    /// HMAC-SHA256 of the link's token under the server key, hex.
    pub hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    #[serde(default)]
    pub exchanged_at_ms: Option<i64>,
    pub created_by: String,
}

fn to_json(link: &ConsoleLink) -> Value {
    json!({
        "id": link.id,
        "organization": link.organization,
        "scope": link.scope.name(),
        "webhook_ids": link.webhook_ids,
        "created_at": payload::rfc3339_ms(link.created_at_ms),
        "expires_at": payload::rfc3339_ms(link.expires_at_ms),
        "exchanged_at": link.exchanged_at_ms.map(payload::rfc3339_ms),
        "created_by": link.created_by,
    })
}

/// A new link id: `cl` and 16 lowercase letters and digits.
fn new_id() -> String {
    format!("cl{}", random::id())
}

fn valid_link_id(id: &str) -> bool {
    id.len() == 18 && id.starts_with("cl") && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{delete, get, post};
    axum::Router::new()
        .route("/organizations/{org}/console-links", get(list).post(create))
        .route("/organizations/{org}/console-links/{id}", delete(revoke))
        .route("/console-sessions", post(exchange))
}

/// Operators, and admin keys of the organization, hand out links; a
/// console session never makes another (it would outlive its link).
fn may_manage(caller: &Caller, org: &str) -> Result<(), ApiError> {
    if caller.principal.kind == Kind::Session {
        return Err(ApiError::forbidden(
            "forbidden",
            "a console session cannot manage console links",
        ));
    }
    if !caller.principal.allows(org) {
        return Err(ApiError::not_found("organization"));
    }
    match caller.scope() {
        Scope::Operator | Scope::Admin => Ok(()),
        Scope::Read => Err(ApiError::forbidden("read_only", "this key is read-only")),
    }
}

/// Where the console is: `HERALD_CONSOLE_URL`, else this request's host
/// (with `X-Forwarded-Proto`'s scheme, http when none).
fn console_base(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    if let Some(base) = &state.config.console_url {
        return Ok(base.trim_end_matches('/').to_owned());
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .ok_or_else(|| {
            ApiError::bad_request(
                "no_console_url",
                "no Host header to build the link from; set HERALD_CONSOLE_URL",
            )
        })?;
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    Ok(format!("{scheme}://{host}"))
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    if !names::valid_org(&org) {
        return Err(ApiError::not_found("organization"));
    }
    may_manage(&caller, &org)?;
    let mut req = body.0.unwrap_or_default();
    req.only(&["scope", "ttl", "webhook_ids"])?;
    let fields = req.names();
    let scope_text: String = req.optional("scope")?.unwrap_or_else(|| "admin".into());
    let scope = match scope_text.as_str() {
        "admin" => Scope::Admin,
        "read" => Scope::Read,
        _ => return Err(ApiError::validation("scope", "scope must be admin or read")),
    };
    if caller.scope() == Scope::Admin && scope == Scope::Operator {
        return Err(ApiError::validation("scope", "scope must be admin or read"));
    }
    let ttl = match req.optional::<String>("ttl")? {
        None => DEFAULT_TTL,
        Some(text) => herald_core::duration::parse_duration(&text)
            .ok()
            .filter(|d| *d >= Duration::from_secs(1) && *d <= MAX_TTL)
            .ok_or_else(|| {
                ApiError::validation("ttl", "ttl must be a duration from 1s to 24h, like 1h")
            })?,
    };
    let webhook_ids: Option<Vec<String>> = req.optional("webhook_ids")?;
    if let Some(ids) = &webhook_ids {
        if ids.is_empty() || ids.len() > MAX_WEBHOOK_IDS {
            return Err(ApiError::validation(
                "webhook_ids",
                format!("webhook_ids must name 1 to {MAX_WEBHOOK_IDS} webhooks"),
            ));
        }
        for id in ids {
            let found = names::valid_id(id) && state.store.get(&org, id).await?.is_some();
            if !found {
                return Err(ApiError::validation(
                    "webhook_ids",
                    format!("no webhook {id:?} in organization {org:?}"),
                ));
            }
        }
    }
    let base = console_base(&state, &headers)?;
    let now = crate::now_ms();
    let id = new_id();
    let token = format!("{LINK_PREFIX}{id}_{}", random::text(32));
    let link = ConsoleLink {
        id: id.clone(),
        organization: org.clone(),
        scope,
        webhook_ids,
        hash: state.config.hash_key.hash(&token),
        created_at_ms: now,
        expires_at_ms: now + ttl.as_millis() as i64,
        exchanged_at_ms: None,
        created_by: caller.key.clone(),
    };
    state.links.create(&id, link.clone()).await?;
    audit::record(
        &state,
        &caller,
        Some(&org),
        "console_link.created",
        ("console_link", &id),
        fields,
    )
    .await;
    let mut body = to_json(&link);
    body["url"] = Value::String(format!("{base}/console#link={token}"));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /organizations/{org}/console-links`: the links not yet expired.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !names::valid_org(&org) {
        return Err(ApiError::not_found("organization"));
    }
    may_manage(&caller, &org)?;
    state.links.wait_loaded().await?;
    let now = crate::now_ms();
    let mut links: Vec<_> = state
        .links
        .values()
        .into_iter()
        .filter(|l| l.organization == org && l.expires_at_ms > now)
        .collect();
    links.sort_by_key(|l| l.created_at_ms);
    let data: Vec<Value> = links.iter().map(|l| to_json(l)).collect();
    Ok(Json(json!({"data": data})))
}

async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    may_manage(&caller, &org)?;
    let found = if valid_link_id(&id) {
        state.links.fetch(&id).await?
    } else {
        None
    };
    match found {
        Some((link, _)) if link.organization == org => {}
        _ => return Err(ApiError::not_found("console link")),
    }
    state.links.delete(&id).await?;
    audit::record(
        &state,
        &caller,
        Some(&org),
        "console_link.revoked",
        ("console_link", &id),
        Vec::new(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

fn invalid_link() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_link",
        "this console link is invalid, expired, revoked or already used",
    )
}

/// `POST /console-sessions` `{"token": "<the link's token>"}`: the link's
/// one exchange, for a session token.
async fn exchange(
    State(state): State<AppState>,
    crate::auth::Source(source): crate::auth::Source,
    body: JsonBody,
) -> Result<Response, ApiError> {
    crate::auth::check_source(&state, source)?;
    let mut req = body
        .0
        .ok_or_else(|| ApiError::validation("token", "token is required"))?;
    req.only(&["token"])?;
    let token: String = req.required("token")?;
    match exchange_token(&state, &token).await? {
        Some(answer) => Ok((StatusCode::CREATED, Json(answer)).into_response()),
        None => {
            state.auth_failures.failed(source, crate::now_ms());
            Err(invalid_link())
        }
    }
}

/// The session for a link's token, or `None` when the token is not a live,
/// unused link's.
async fn exchange_token(state: &AppState, token: &str) -> Result<Option<Value>, ApiError> {
    let Some(id) = token
        .strip_prefix(LINK_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .filter(|id| valid_link_id(id))
    else {
        return Ok(None);
    };
    let now = crate::now_ms();
    for _ in 0..5 {
        let Some((mut link, revision)) = state.links.fetch(id).await? else {
            return Ok(None);
        };
        if !state.config.hash_key.verify(token, &link.hash)
            || link.expires_at_ms <= now
            || link.exchanged_at_ms.is_some()
        {
            return Ok(None);
        }
        link.exchanged_at_ms = Some(now);
        match state.links.update(id, link.clone(), revision).await {
            Ok(_) => {}
            // Changed meanwhile: read again (an exchange that won is seen).
            Err(KvError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
        let session = session_token(state, &link.id);
        let principal = principal(&link);
        let session_caller = Caller {
            org: link.organization.clone(),
            key: principal.id.clone(),
            principal: Arc::new(principal),
        };
        audit::record(
            state,
            &session_caller,
            Some(&link.organization),
            "console_link.exchanged",
            ("console_link", &link.id),
            Vec::new(),
        )
        .await;
        return Ok(Some(json!({
            "session": session,
            "organization": link.organization,
            "scope": link.scope.name(),
            "webhook_ids": link.webhook_ids,
            "expires_at": payload::rfc3339_ms(link.expires_at_ms),
        })));
    }
    Err(ApiError::conflict())
}

fn session_token(state: &AppState, link_id: &str) -> String {
    let body = format!("{link_id}.{}", random::text(16));
    let mac = state.config.hash_key.hash(&format!("session:{body}"));
    format!("{SESSION_PREFIX}{body}.{mac}")
}

fn principal(link: &ConsoleLink) -> Principal {
    Principal {
        id: format!("cs:{}", link.id),
        name: String::new(),
        scope: link.scope,
        organizations: vec![link.organization.clone()],
        default_organization: link.organization.clone(),
        webhook_ids: link.webhook_ids.clone(),
        kind: Kind::Session,
        expires_at_ms: Some(link.expires_at_ms),
    }
}

/// The principal of an `hs_` session token while its link lives.
pub async fn authenticate(state: &AppState, token: &str) -> Option<Arc<Principal>> {
    let rest = token.strip_prefix(SESSION_PREFIX)?;
    let (body, mac) = rest.rsplit_once('.')?;
    if !state
        .config
        .hash_key
        .verify(&format!("session:{body}"), mac)
    {
        return None;
    }
    let (link_id, _) = body.split_once('.')?;
    // Only the replica's view: a revoked link's sessions end when the
    // change feed brings its deletion, and a session exists only after an
    // exchange that wrote the record.
    let link = match state.links.get(link_id) {
        Some(link) => link,
        None => Arc::new(state.links.fetch(link_id).await.ok()??.0),
    };
    // Sessions exist only after the exchange.
    link.exchanged_at_ms?;
    Some(Arc::new(principal(&link)))
}

/// An organization is being deleted: its links (and their sessions) go.
pub async fn remove_organization(
    state: &AppState,
    caller: &Caller,
    org: &str,
) -> Result<(), ApiError> {
    state.links.wait_loaded().await?;
    let mut gone: HashMap<String, ()> = HashMap::new();
    for link in state.links.values() {
        if link.organization == org {
            state.links.delete(&link.id).await?;
            gone.insert(link.id.clone(), ());
        }
    }
    for id in gone.keys() {
        audit::record(
            state,
            caller,
            Some(org),
            "console_link.revoked",
            ("console_link", id),
            Vec::new(),
        )
        .await;
    }
    Ok(())
}
