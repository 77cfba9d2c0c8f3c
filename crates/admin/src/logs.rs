//! The delivery-log routes, read from the Redis log index.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use herald_core::{payload, proto};
use herald_platform::log_index::{self, Scope};
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// The delivery-log routes, and the test and retry routes that produce
/// deliveries shown in the logs.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new().route("/webhooks/{id}/logs", get(list_for_webhook))
}

pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;

fn paging(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match query.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    ApiError::validation(name, format!("{name} must be an integer 0-{max}"))
                }),
        }
    };
    let limit = number("limit", DEFAULT_LIMIT, MAX_LIMIT)?;
    if limit == 0 {
        return Err(ApiError::validation(
            "limit",
            format!("limit must be an integer 1-{MAX_LIMIT}"),
        ));
    }
    Ok((limit, number("offset", 0, 10_000_000)?))
}

/// The summary of an attempt, as lists show it.
pub fn summary(a: &proto::AttemptResult) -> Value {
    json!({
        "id": a.log_id,
        "webhook_id": a.webhook_id,
        "event_id": a.event_id,
        "event_type": a.event_type,
        "delivery_id": a.delivery_id,
        "attempt": a.attempt,
        "status": log_index::status_name(a.status()),
        "response_status": a.response.as_ref().map(|r| r.status),
        "error": if a.error.is_empty() { Value::Null } else { Value::String(a.error.clone()) },
        "duration_ms": a.duration_ms,
        "created_at": payload::rfc3339_ms(a.attempted_at_ms),
        "next_attempt_at": if a.next_attempt_at_ms == 0 { Value::Null } else { Value::String(payload::rfc3339_ms(a.next_attempt_at_ms)) },
    })
}

fn page_json(page: log_index::Page, limit: usize, offset: usize) -> Value {
    let data: Vec<Value> = page.items.iter().map(summary).collect();
    json!({"data": data, "total": page.total, "limit": limit, "offset": offset})
}

fn index_error(error: log_index::IndexError) -> ApiError {
    tracing::warn!(%error, "log index");
    ApiError::unavailable("delivery logs are unavailable right now, try again")
}

pub async fn list_for_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, offset) = paging(&query)?;
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some(s) if log_index::STATUSES.contains(&s) => Some(s.to_owned()),
        Some(_) => {
            return Err(ApiError::validation(
                "status",
                format!("status must be one of {}", log_index::STATUSES.join(", ")),
            ));
        }
    };
    state
        .store
        .get(&caller.org, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook"))?;
    let scope = Scope::Webhook {
        org: caller.org,
        webhook_id: id,
        status,
    };
    let page = state
        .logs
        .page(&scope, limit, offset)
        .await
        .map_err(index_error)?;
    Ok(Json(page_json(page, limit, offset)))
}
