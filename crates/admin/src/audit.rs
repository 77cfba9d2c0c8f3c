//! The audit trail (PRODUCT.md, "Tenants"): every change to organizations,
//! API keys, console links and webhooks — which key made it, what it was,
//! when, and the names of the fields it changed, never a value that could
//! be a secret (webhook secrets, header values, keys, tokens). Each change
//! is one JSON message on `HERALD_AUDIT` (`herald.audit.<org>`; a key of
//! every organization on `herald.audit`), kept as long as accepted events
//! (`HERALD_EVENT_RETENTION`).
//!
//! `GET /audit?limit=&cursor=` reads the organization's trail newest first
//! (an operator picks it with `X-Organization-Id`, or reads everything with
//! `?all=true`). A page reads the organization's trail from its start with
//! an ordered consumer: the trail is small next to events, and an audit
//! page is not a hot path.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use axum::Json;
use axum::extract::{Query, State};
use futures::StreamExt;
use herald_core::{names, payload};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub at_ms: i64,
    /// The key (or console session) that made the change: an API key's id,
    /// `file:<hash prefix>` for a bootstrap key, `cs:<link id>` for a
    /// console link's session.
    pub key_id: String,
    /// e.g. `webhook.created`, `api_key.revoked`.
    pub action: String,
    /// `None` for a change that concerns every organization.
    pub organization: Option<String>,
    pub target_type: String,
    pub target_id: String,
    /// The names of the fields given, never their values.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// Appends one change to the trail. A failure is logged, never answered:
/// the change itself is done.
pub async fn record(
    state: &AppState,
    caller: &Caller,
    organization: Option<&str>,
    action: &str,
    (target_type, target_id): (&str, &str),
    fields: Vec<String>,
) {
    let record = Record {
        at_ms: crate::now_ms(),
        key_id: caller.key.clone(),
        action: action.to_owned(),
        organization: organization.map(str::to_owned),
        target_type: target_type.to_owned(),
        target_id: target_id.to_owned(),
        fields,
    };
    let subject = match organization {
        Some(org) => names::audit_subject(org),
        None => names::AUDIT_PLATFORM_SUBJECT.to_owned(),
    };
    let body = match serde_json::to_vec(&record) {
        Ok(body) => body,
        Err(error) => return tracing::error!(%error, "cannot encode audit record"),
    };
    if let Err(error) = herald_platform::nats::publish_patiently(
        &state.js,
        subject,
        async_nats::HeaderMap::new(),
        body.into(),
        Duration::from_secs(5),
    )
    .await
    {
        tracing::error!(%error, action, key_id = %caller.key, "cannot append to the audit trail");
    }
}

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/audit", axum::routing::get(list))
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// A read that has had no message for this long has reached the end.
const IDLE: Duration = Duration::from_secs(5);

/// `GET /audit?limit=&cursor=&all=`: newest first; `next_cursor` reads on.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    caller.refuse_restricted()?;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::validation("limit", format!("limit must be 1 to {MAX_LIMIT}"))
            })?,
    };
    let before = match query.get("cursor") {
        None => u64::MAX,
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| ApiError::validation("cursor", "cursor must be a next_cursor answered"))?,
    };
    let all = match query.get("all").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::validation("all", "all must be true or false")),
    };
    if all && !caller.is_operator() {
        return Err(ApiError::forbidden(
            "operator_only",
            "only an operator key reads every organization's trail",
        ));
    }
    let filter = if all {
        String::new()
    } else {
        names::audit_subject(&caller.org)
    };
    let (page, more) = read_newest(&state, filter, before, limit).await?;
    let next_cursor = if more {
        page.last().map(|(seq, _)| seq.to_string())
    } else {
        None
    };
    let data: Vec<Value> = page
        .into_iter()
        .map(|(seq, r)| {
            json!({
                "id": seq.to_string(),
                "at": payload::rfc3339_ms(r.at_ms),
                "key_id": r.key_id,
                "action": r.action,
                "organization": r.organization,
                "target": {"type": r.target_type, "id": r.target_id},
                "fields": r.fields,
            })
        })
        .collect();
    Ok(Json(json!({"data": data, "next_cursor": next_cursor})))
}

/// The last `limit` records of `filter` (every subject when empty) below
/// sequence `before`, newest first, and whether older ones remain.
async fn read_newest(
    state: &AppState,
    filter: String,
    before: u64,
    limit: usize,
) -> Result<(Vec<(u64, Record)>, bool), ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "audit stream");
        ApiError::unavailable("audit trail unavailable, try again")
    };
    let stream = state
        .js
        .get_stream(names::AUDIT_STREAM)
        .await
        .map_err(|e| unavailable(&e))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
    let mut window: VecDeque<(u64, Record)> = VecDeque::with_capacity(limit + 1);
    let mut older = false;
    while pending > 0 {
        let message = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => return Err(unavailable(&error)),
            Ok(None) | Err(_) => break,
        };
        let info = message.info().map_err(|e| unavailable(&e))?;
        let (seq, left) = (info.stream_sequence, info.pending);
        pending = left;
        if seq >= before {
            break;
        }
        let Ok(record) = serde_json::from_slice::<Record>(&message.payload) else {
            continue;
        };
        window.push_back((seq, record));
        if window.len() > limit {
            window.pop_front();
            older = true;
        }
    }
    Ok((window.into_iter().rev().collect(), older))
}
