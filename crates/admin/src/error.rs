//! API errors: `{"error": {"code", "message", "field"}}` with 400 for bad
//! input, 401 without a valid key, 403 for what the key's scope does not
//! allow (`read_only`, `operator_only`, `restricted`), 404 for what the caller cannot see, 409
//! for a conflicting concurrent change, 413 for an oversize body, 415 for a
//! body that is not declared JSON, 429 (with `Retry-After`) for a caller
//! over a rate limit. Every error the API answers has this
//! shape, axum's own rejections included ([`json_errors`]).

use axum::Json;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds a rate-limited caller should wait (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "validation_failed", message)
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <api key>` is required",
        )
    }

    /// The caller is known but may not do this (a read-only key that
    /// writes, a tenant key on an operator route).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "the webhook was changed concurrently; read it again and retry",
        )
    }

    pub fn payload_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max} bytes"),
        )
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Over a rate limit; a token is there again in `wait_ms`.
    pub fn rate_limited(message: impl Into<String>, wait_ms: u64) -> Self {
        Self {
            retry_after: Some(wait_ms.div_ceil(1000).max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}

impl From<herald_platform::webhooks::StoreError> for ApiError {
    fn from(error: herald_platform::webhooks::StoreError) -> Self {
        use herald_platform::webhooks::StoreError;
        match error {
            StoreError::Conflict => Self::conflict(),
            StoreError::Unavailable(_) | StoreError::Corrupt { .. } => {
                tracing::error!(%error, "webhook store");
                Self::unavailable("webhook store unavailable, try again")
            }
        }
    }
}

/// The code our error shape uses for an HTTP status.
fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "unavailable",
        _ => "error",
    }
}

/// Middleware: an error response that is not already JSON — one of axum's
/// own rejections (a path that does not decode, a body over the limit) —
/// is rewritten into our error shape, keeping its text as the message. A
/// 422 becomes a 400, as PRODUCT.md promises 400 for bad input.
pub async fn json_errors(mut response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if matches!(status.as_u16(), 408 | 413) {
        // The body was not read to its end: the connection cannot carry
        // another request, and the client must not try.
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let allow = response.headers().get(header::ALLOW).cloned();
    let body: Body = response.into_body();
    let text = match http_body_util::Limited::new(body, 4096).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
            .trim()
            .to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    } else {
        text
    };
    let mut response = ApiError::new(status, code_for(status), message).into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}
