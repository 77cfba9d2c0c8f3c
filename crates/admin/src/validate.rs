//! What a webhook definition may hold: the limits and the validators the
//! create and patch routes apply, pure functions of their input (and the
//! catalogue), each answering the API error that names the field.

use std::collections::{BTreeMap, HashMap};

use herald_core::{matching, names, proto};
use serde_json::Value;

use crate::AppState;
use crate::error::ApiError;

pub use herald_core::webhook::{DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS};

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
pub const MAX_EVENT_TYPES: usize = 100;
/// Webhooks a list page holds by default, and at most.
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 500;

/// The page a webhook list asks for: `limit`, and the id after which it
/// starts (`cursor`, the `next_cursor` of the page before).
pub fn list_page(query: &HashMap<String, String>) -> Result<(usize, Option<&str>), ApiError> {
    let limit = match query.get("limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::validation(
                    "limit",
                    format!("limit must be an integer 1-{MAX_LIST_LIMIT}"),
                )
            })?,
    };
    let cursor = match query.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(id) if is_webhook_id(id) => Some(id),
        Some(_) => {
            return Err(ApiError::validation(
                "cursor",
                "cursor must be the next_cursor of a page",
            ));
        }
    };
    Ok((limit, cursor))
}

/// `wh_` and 32 lowercase hex digits, as `ids::new_webhook_id` makes them.
fn is_webhook_id(id: &str) -> bool {
    id.strip_prefix("wh_").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
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

/// `ordering`: `None` (JSON null) is unordered; an object is
/// `{"key": <attribute name>, "on_failure": "skip" | "hold"}`, `on_failure`
/// optional (null or absent: `skip`). A delivery that gives up lets its
/// key's next deliveries go on (`skip`), or holds them until it is
/// recovered (`hold`).
pub fn parse_ordering(value: Option<Value>) -> Result<Option<proto::Ordering>, ApiError> {
    let refused = |message: String| ApiError::validation("ordering", message);
    let mut map = match value {
        None => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(refused(
                "ordering must be null (unordered) or an object \
                 {\"key\": <attribute name>, \"on_failure\": \"skip\" | \"hold\"}"
                    .into(),
            ));
        }
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !["key", "on_failure"].contains(&k.as_str()))
    {
        return Err(refused(format!(
            "unknown field {unknown:?} in ordering; known: key, on_failure"
        )));
    }
    let key = match map.remove("key") {
        None | Some(Value::Null) => {
            return Err(refused(
                "ordering.key is required: the name of the event attribute whose value orders deliveries"
                    .into(),
            ));
        }
        Some(Value::String(key)) if names::valid_type_token(&key) => key,
        Some(Value::String(key)) => {
            return Err(refused(format!(
                "ordering.key {key:?} is not an attribute name (1-64 of [A-Za-z0-9_-])"
            )));
        }
        Some(_) => {
            return Err(refused(
                "ordering.key must be a string: an attribute name (1-64 of [A-Za-z0-9_-])".into(),
            ));
        }
    };
    let hold_on_failure = match map.remove("on_failure") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "skip" => false,
        Some(Value::String(s)) if s == "hold" => true,
        Some(other) => {
            return Err(refused(format!(
                "ordering.on_failure must be skip or hold, not {other}"
            )));
        }
    };
    Ok(Some(proto::Ordering {
        key,
        hold_on_failure,
    }))
}

pub fn filters_to_proto(
    filters: BTreeMap<String, Vec<String>>,
) -> HashMap<String, proto::StringList> {
    filters
        .into_iter()
        .map(|(k, values)| (k, proto::StringList { values }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ordering_values() {
        let parse = |v: Value| parse_ordering(Some(v)).map_err(|e| e.field);
        let ordered = |key: &str, hold| {
            Ok(Some(proto::Ordering {
                key: key.into(),
                hold_on_failure: hold,
            }))
        };
        assert_eq!(parse_ordering(None).map_err(|e| e.field), Ok(None));
        assert_eq!(
            parse(json!({"key": "execution"})),
            ordered("execution", false)
        );
        assert_eq!(
            parse(json!({"key": "a-B_9", "on_failure": "skip"})),
            ordered("a-B_9", false)
        );
        assert_eq!(
            parse(json!({"key": "x", "on_failure": "hold"})),
            ordered("x", true)
        );
        assert_eq!(
            parse(json!({"key": "x", "on_failure": null})),
            ordered("x", false)
        );
        assert_eq!(
            parse(json!({"key": "k".repeat(64)})),
            ordered(&"k".repeat(64), false)
        );
        for bad in [
            json!("execution"),
            json!(true),
            json!(["execution"]),
            json!({}),
            json!({"key": null}),
            json!({"key": ""}),
            json!({"key": "k".repeat(65)}),
            json!({"key": "a.b"}),
            json!({"key": "é"}),
            json!({"key": "a\n"}),
            json!({"key": 7}),
            json!({"key": "x", "on_failure": "retry"}),
            json!({"key": "x", "on_failure": "HOLD"}),
            json!({"key": "x", "on_failure": true}),
            json!({"key": "x", "hold": true}),
        ] {
            assert_eq!(parse(bad.clone()), Err(Some("ordering".into())), "{bad}");
        }
    }

    #[test]
    fn list_pages() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let id = "wh_0193a1b2c3d4e5f60718293a4b5c6d7e";
        // (query, the page, or the field refused)
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            Result<(usize, Option<&'a str>), &'a str>,
        );
        let cases: &[Case] = &[
            (&[], Ok((DEFAULT_LIST_LIMIT, None))),
            (&[("limit", "1")], Ok((1, None))),
            (&[("limit", "500"), ("cursor", id)], Ok((500, Some(id)))),
            (&[("cursor", "")], Ok((DEFAULT_LIST_LIMIT, None))),
            (&[("limit", "0")], Err("limit")),
            (&[("limit", "501")], Err("limit")),
            (&[("limit", "x")], Err("limit")),
            (&[("cursor", "wh_123")], Err("cursor")),
            (
                &[("cursor", "WH_0193A1B2C3D4E5F60718293A4B5C6D7E")],
                Err("cursor"),
            ),
        ];
        for (query, expected) in cases {
            let query = q(query);
            match (list_page(&query), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{query:?}"),
                (Err(e), Err(field)) => assert_eq!(e.field.as_deref(), Some(*field), "{query:?}"),
                (got, want) => panic!("{query:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
