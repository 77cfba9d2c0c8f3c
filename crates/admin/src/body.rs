//! Request bodies: a JSON object, declared `application/json`, at most
//! [`crate::MAX_BODY_BYTES`], read within [`BODY_TIMEOUT`]. Fields are read
//! one by one so that every error names its field, and an unknown field is
//! refused, so a typo is an error rather than a silent no-op.

use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::MAX_BODY_BYTES;
use crate::error::ApiError;

/// A client that stops sending its body gets a 408 after this long.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of a JSON route: `None` when it was empty.
#[derive(Debug)]
pub struct JsonBody(pub Option<Fields>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_owned());
        let declared_length = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
        }
        let bytes = match tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state)).await
        {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                ));
            }
            Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
            }
            Ok(Err(rejection)) => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!("cannot read the request body: {}", rejection.body_text()),
                ));
            }
            Ok(Ok(bytes)) => bytes,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::unsupported_media_type());
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        })?;
        match value {
            Value::Object(map) => Ok(Self(Some(Fields(map)))),
            _ => Err(ApiError::bad_request(
                "invalid_json",
                "the body must be a JSON object",
            )),
        }
    }
}

/// `application/json`, `application/<x>+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The fields of a JSON object body, taken one at a time.
#[derive(Debug, Default)]
pub struct Fields(Map<String, Value>);

impl Fields {
    /// Refuses any field not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(ApiError::validation(
                unknown,
                format!("unknown field {unknown:?}; known: {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// The names of the fields given (what the audit trail records).
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// `None` when absent, `Some(None)` when null, `Some(Some(v))` otherwise.
    pub fn nullable<T: DeserializeOwned>(
        &mut self,
        field: &str,
    ) -> Result<Option<Option<T>>, ApiError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(value) => serde_json::from_value(value)
                .map(|v| Some(Some(v)))
                .map_err(|e| ApiError::validation(field, format!("{field}: {e}"))),
        }
    }

    /// Absent or null is `None`.
    pub fn optional<T: DeserializeOwned>(&mut self, field: &str) -> Result<Option<T>, ApiError> {
        Ok(self.nullable(field)?.flatten())
    }

    /// Absent is `None`; null is refused.
    pub fn not_null<T: DeserializeOwned>(&mut self, field: &str) -> Result<Option<T>, ApiError> {
        match self.nullable(field)? {
            None => Ok(None),
            Some(None) => Err(ApiError::validation(
                field,
                format!("{field} cannot be null"),
            )),
            Some(value) => Ok(value),
        }
    }

    pub fn required<T: DeserializeOwned>(&mut self, field: &str) -> Result<T, ApiError> {
        self.not_null(field)?
            .ok_or_else(|| ApiError::validation(field, format!("{field} is required")))
    }
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        for (ct, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
            ("", false),
        ] {
            assert_eq!(is_json(ct), ok, "{ct}");
        }
    }
}
