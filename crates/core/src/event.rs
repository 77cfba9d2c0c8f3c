//! Event validation and normalization: what ingest accepts from producers.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::catalogue::Catalogue;
use crate::names::{SubjectError, parse_event_subject};
use crate::{ids, proto};

/// Limits on what a producer may send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_event_bytes: usize,
    pub max_attributes: usize,
    pub max_attribute_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 256 * 1024,
            max_attributes: 32,
            max_attribute_len: 256,
        }
    }
}

/// Why an event was refused. The code is stable (metrics label, rejected
/// record); the message is for the producer's developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("bad subject: {0}")]
    Subject(#[from] SubjectError),
    #[error("event is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("malformed protobuf: {0}")]
    MalformedProtobuf(String),
    #[error("unsupported content type {0:?}: use application/json or application/protobuf")]
    ContentType(String),
    #[error("event type {0:?} is not in the catalogue")]
    UnknownType(String),
    #[error("event type {0:?} is reserved for Herald's own system events")]
    SystemType(String),
    #[error("event type {body:?} differs from the subject's {subject:?}")]
    TypeMismatch { subject: String, body: String },
    #[error("bad id: {0}")]
    BadId(String),
    #[error("bad occurred_at: {0}")]
    BadTimestamp(String),
    #[error("bad attributes: {0}")]
    BadAttributes(String),
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Subject(_) => "bad_subject",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::MalformedJson(_) => "malformed_json",
            Rejection::MalformedProtobuf(_) => "malformed_protobuf",
            Rejection::ContentType(_) => "unsupported_content_type",
            Rejection::UnknownType(_) => "unknown_type",
            Rejection::SystemType(_) => "system_type",
            Rejection::TypeMismatch { .. } => "type_mismatch",
            Rejection::BadId(_) => "bad_id",
            Rejection::BadTimestamp(_) => "bad_timestamp",
            Rejection::BadAttributes(_) => "bad_attributes",
        }
    }

    /// Every code, for metrics that should show zeros too.
    pub const CODES: &'static [&'static str] = &[
        "bad_subject",
        "too_large",
        "malformed_json",
        "system_type",
        "malformed_protobuf",
        "unsupported_content_type",
        "unknown_type",
        "type_mismatch",
        "bad_id",
        "bad_timestamp",
        "bad_attributes",
    ];
}

/// What ingest knows of one message besides its body.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    pub subject: &'a str,
    pub content_type: Option<&'a str>,
    pub msg_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    /// Where the message sits in the events stream: its sequence and the
    /// time the stream stored it (ms). The same on every redelivery.
    pub position: Option<(u64, i64)>,
}

#[derive(Deserialize)]
struct JsonEvent<'a> {
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, rename = "type", borrow)]
    event_type: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    occurred_at: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    attributes: Option<HashMap<String, serde_json::Value>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

/// Validates one producer message and returns the normalized event.
pub fn normalize(
    envelope: &Envelope<'_>,
    body: &[u8],
    limits: &Limits,
    catalogue: &Catalogue,
    now_ms: i64,
) -> Result<proto::Event, Rejection> {
    let (org, subject_type) = parse_event_subject(envelope.subject)?;
    if body.len() > limits.max_event_bytes {
        return Err(Rejection::TooLarge {
            size: body.len(),
            limit: limits.max_event_bytes,
        });
    }
    let content_type = envelope.content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let mut event = match content_type.as_deref() {
        None | Some("") | Some("application/json") => from_json(body)?,
        Some("application/protobuf") | Some("application/x-protobuf") => from_protobuf(body)?,
        Some(other) => return Err(Rejection::ContentType(other.to_owned())),
    };

    if event.r#type.is_empty() {
        event.r#type = subject_type.to_owned();
    } else if event.r#type != subject_type {
        return Err(Rejection::TypeMismatch {
            subject: subject_type.to_owned(),
            body: event.r#type,
        });
    }
    if crate::catalogue::is_system(&event.r#type) {
        return Err(Rejection::SystemType(event.r#type));
    }
    if !catalogue.contains(&event.r#type) {
        return Err(Rejection::UnknownType(event.r#type));
    }
    if event.id.is_empty() {
        event.id = match envelope.msg_id {
            Some(id) if !id.is_empty() => id.to_owned(),
            // Derived from its place in the stream, so a redelivered event
            // keeps its id (and the receiver one `webhook-id`).
            _ => match envelope.position {
                Some((seq, stored_ms)) => ids::stream_event_id(seq, stored_ms),
                None => ids::new_event_id(),
            },
        };
    }
    if !valid_event_id(&event.id) {
        return Err(Rejection::BadId(format!(
            "{:?} is not 1-128 of [A-Za-z0-9_.:-]",
            event.id
        )));
    }
    if event.attributes.len() > limits.max_attributes {
        return Err(Rejection::BadAttributes(format!(
            "{} attributes, more than the limit of {}",
            event.attributes.len(),
            limits.max_attributes
        )));
    }
    for (name, value) in &event.attributes {
        if !crate::names::valid_type_token(name) {
            return Err(Rejection::BadAttributes(format!(
                "name {name:?} is not 1-64 of [A-Za-z0-9_-]"
            )));
        }
        if value.chars().count() > limits.max_attribute_len {
            return Err(Rejection::BadAttributes(format!(
                "value of {name:?} is longer than {} characters",
                limits.max_attribute_len
            )));
        }
    }
    if event.occurred_at_ms == 0 {
        event.occurred_at_ms = now_ms;
    }
    event.organization_id = org.to_owned();
    event.received_at_ms = now_ms;
    event.traceparent = envelope.traceparent.unwrap_or_default().to_owned();
    Ok(event)
}

fn valid_event_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn from_json(body: &[u8]) -> Result<proto::Event, Rejection> {
    // serde would read a struct from a JSON array too; an event is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Rejection::MalformedJson("an event is a JSON object".into()));
    }
    let parsed: JsonEvent<'_> =
        serde_json::from_slice(body).map_err(|e| Rejection::MalformedJson(e.to_string()))?;
    let occurred_at_ms = match parsed.occurred_at.as_deref() {
        None => 0,
        Some(text) => {
            let t = OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|e| Rejection::BadTimestamp(format!("{text:?} is not RFC 3339: {e}")))?;
            (t.unix_timestamp_nanos() / 1_000_000) as i64
        }
    };
    let mut attributes = HashMap::new();
    for (name, value) in parsed.attributes.unwrap_or_default() {
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(Rejection::BadAttributes(format!(
                    "value of {name:?} must be a string, number or boolean"
                )));
            }
        };
        attributes.insert(name, text);
    }
    let raw = |v: Option<&RawValue>| {
        v.map(|r| bytes::Bytes::copy_from_slice(r.get().as_bytes()))
            .unwrap_or_default()
    };
    Ok(proto::Event {
        id: parsed.id.map(Into::into).unwrap_or_default(),
        r#type: parsed.event_type.map(Into::into).unwrap_or_default(),
        occurred_at_ms,
        attributes,
        data_json: raw(parsed.data),
        metadata_json: raw(parsed.metadata),
        ..Default::default()
    })
}

fn from_protobuf(body: &[u8]) -> Result<proto::Event, Rejection> {
    use prost::Message;
    let event =
        proto::Event::decode(body).map_err(|e| Rejection::MalformedProtobuf(e.to_string()))?;
    for (name, json) in [
        ("data_json", &event.data_json),
        ("metadata_json", &event.metadata_json),
    ] {
        if !json.is_empty() {
            serde_json::from_slice::<&RawValue>(json)
                .map_err(|e| Rejection::MalformedProtobuf(format!("{name} is not JSON: {e}")))?;
        }
    }
    Ok(proto::Event {
        id: event.id,
        r#type: event.r#type,
        occurred_at_ms: event.occurred_at_ms,
        attributes: event.attributes,
        data_json: event.data_json,
        metadata_json: event.metadata_json,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    fn check(subject: &str, body: &str) -> Result<proto::Event, &'static str> {
        let envelope = Envelope {
            subject,
            content_type: None,
            msg_id: Some("msg-1"),
            traceparent: None,
            position: None,
        };
        normalize(
            &envelope,
            body.as_bytes(),
            &Limits::default(),
            &Catalogue::default(),
            NOW,
        )
        .map_err(|e| e.code())
    }

    #[test]
    fn accepts_and_normalizes() {
        let e = check(
            "herald.events.acme.workflow.completed",
            r#"{"id":"evt_1","type":"workflow.completed","occurred_at":"2026-11-22T10:00:00Z",
                "attributes":{"workflow":"invoice-approval","attempt":3},"data":{"a":[1,2]},"metadata":{"m":true}}"#,
        )
        .unwrap();
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.organization_id, "acme");
        assert_eq!(e.occurred_at_ms, 1_795_341_600_000);
        assert_eq!(e.attributes["attempt"], "3");
        assert_eq!(&e.data_json[..], br#"{"a":[1,2]}"#);
        assert_eq!(&e.metadata_json[..], br#"{"m":true}"#);

        let e = check("herald.events.acme.worker.connected", "{}").unwrap();
        assert_eq!(
            (e.id.as_str(), e.r#type.as_str(), e.occurred_at_ms),
            ("msg-1", "worker.connected", NOW)
        );
    }

    #[test]
    fn rejects() {
        let table = [
            ("herald.events.acme.workflow.*", "{}", "bad_subject"),
            ("herald.events.Acme.workflow.completed", "{}", "bad_subject"),
            (
                "herald.events.acme.workflow.completed",
                "{",
                "malformed_json",
            ),
            (
                "herald.events.acme.workflow.completed",
                "[]",
                "malformed_json",
            ),
            ("herald.events.acme.workflow.exploded", "{}", "unknown_type"),
            ("herald.events.acme.webhook.disabled", "{}", "system_type"),
            (
                "herald.events.acme.workflow.completed",
                r#"{"type":"workflow.failed"}"#,
                "type_mismatch",
            ),
            (
                "herald.events.acme.workflow.completed",
                r#"{"id":"a b"}"#,
                "bad_id",
            ),
            (
                "herald.events.acme.workflow.completed",
                r#"{"occurred_at":"yesterday"}"#,
                "bad_timestamp",
            ),
            (
                "herald.events.acme.workflow.completed",
                r#"{"attributes":{"a":{"b":1}}}"#,
                "bad_attributes",
            ),
            (
                "herald.events.acme.workflow.completed",
                r#"{"attributes":{"a b":"x"}}"#,
                "bad_attributes",
            ),
        ];
        for (subject, body, code) in table {
            assert_eq!(
                check(subject, body).map(|_| ()),
                Err(code),
                "{subject} {body}"
            );
        }
        let long = format!(r#"{{"attributes":{{"a":"{}"}}}}"#, "x".repeat(257));
        assert_eq!(
            check("herald.events.acme.workflow.completed", &long).map(|_| ()),
            Err("bad_attributes")
        );
        let ok = format!(r#"{{"attributes":{{"a":"{}"}}}}"#, "é".repeat(256));
        assert!(check("herald.events.acme.workflow.completed", &ok).is_ok());
        let many: Vec<String> = (0..33).map(|i| format!(r#""a{i}":"x""#)).collect();
        let many = format!(r#"{{"attributes":{{{}}}}}"#, many.join(","));
        assert_eq!(
            check("herald.events.acme.workflow.completed", &many).map(|_| ()),
            Err("bad_attributes")
        );
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(256 * 1024));
        assert_eq!(
            check("herald.events.acme.workflow.completed", &big).map(|_| ()),
            Err("too_large")
        );
    }

    #[test]
    fn protobuf_events() {
        use prost::Message;
        let body = proto::Event {
            r#type: "workflow.failed".into(),
            data_json: bytes::Bytes::from_static(b"{\"x\":1}"),
            ..Default::default()
        }
        .encode_to_vec();
        let envelope = Envelope {
            subject: "herald.events.acme.workflow.failed",
            content_type: Some("application/protobuf"),
            ..Default::default()
        };
        let e = normalize(
            &envelope,
            &body,
            &Limits::default(),
            &Catalogue::default(),
            NOW,
        )
        .unwrap();
        assert_eq!(e.r#type, "workflow.failed");
        assert!(e.id.starts_with("evt_"));
        // Without an id or Nats-Msg-Id, the id comes from the stream
        // position: the same for every redelivery of the message.
        let placed = Envelope {
            position: Some((42, NOW)),
            ..envelope.clone()
        };
        let ids: Vec<String> = (0..2)
            .map(|_| {
                normalize(
                    &placed,
                    &body,
                    &Limits::default(),
                    &Catalogue::default(),
                    NOW,
                )
                .unwrap()
                .id
            })
            .collect();
        assert_eq!(ids, vec![format!("evt_{NOW}.42"); 2]);
        let envelope = Envelope {
            content_type: Some("text/plain"),
            ..envelope
        };
        assert_eq!(
            normalize(
                &envelope,
                &body,
                &Limits::default(),
                &Catalogue::default(),
                NOW
            )
            .map_err(|e| e.code())
            .map(|_| ()),
            Err("unsupported_content_type")
        );
    }
}
