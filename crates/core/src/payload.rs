//! The body of the POST a receiver gets, in JSON or XML.
//!
//! Both carry `id`, `type`, `timestamp`, `organization_id`, `webhook_id`,
//! `attributes`, `data` and `metadata`. The producer's `data` and `metadata`
//! are passed through byte for byte in JSON; in XML, objects become elements,
//! arrays repeat `<item>`, and keys that are not XML names become
//! `<item key="...">`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::proto;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Xml => "application/xml",
        }
    }
}

impl From<proto::PayloadFormat> for Format {
    fn from(f: proto::PayloadFormat) -> Self {
        match f {
            proto::PayloadFormat::Json => Format::Json,
            proto::PayloadFormat::Xml => Format::Xml,
        }
    }
}

/// RFC 3339 in UTC with exactly three fractional digits
/// (`2026-11-22T10:00:00.000Z`), so that timestamps sort as strings.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time into unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn raw(json: &[u8]) -> &RawValue {
    // Ingest only stores valid JSON here; anything else becomes null.
    std::str::from_utf8(json)
        .ok()
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok())
        .unwrap_or_else(|| serde_json::from_str("null").expect("null is JSON"))
}

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: String,
    organization_id: &'a str,
    webhook_id: &'a str,
    attributes: BTreeMap<&'a str, &'a str>,
    data: &'a RawValue,
    metadata: &'a RawValue,
}

/// Renders the body of `event` for `webhook_id`.
pub fn render(event: &proto::Event, webhook_id: &str, format: Format) -> Vec<u8> {
    let body = Body {
        id: &event.id,
        event_type: &event.r#type,
        timestamp: rfc3339_ms(event.occurred_at_ms),
        organization_id: &event.organization_id,
        webhook_id,
        attributes: event
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        data: raw(&event.data_json),
        metadata: raw(&event.metadata_json),
    };
    match format {
        Format::Json => serde_json::to_vec(&body).expect("serializing to memory cannot fail"),
        Format::Xml => render_xml(&body).into_bytes(),
    }
}

fn render_xml(body: &Body<'_>) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<webhook>");
    for (name, value) in [
        ("id", body.id),
        ("type", body.event_type),
        ("timestamp", &body.timestamp),
        ("organization_id", body.organization_id),
        ("webhook_id", body.webhook_id),
    ] {
        let _ = write!(out, "<{name}>{}</{name}>", escape(value));
    }
    out.push_str("<attributes>");
    for (k, v) in &body.attributes {
        let _ = write!(
            out,
            "<attribute name=\"{}\">{}</attribute>",
            escape(k),
            escape(v)
        );
    }
    out.push_str("</attributes>");
    for (name, json) in [("data", body.data), ("metadata", body.metadata)] {
        let value: serde_json::Value = serde_json::from_str(json.get()).unwrap_or_default();
        out.push('<');
        out.push_str(name);
        out.push('>');
        xml_value(&mut out, &value);
        let _ = write!(out, "</{name}>");
    }
    out.push_str("</webhook>");
    out
}

fn xml_value(out: &mut String, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&escape(s)),
        Value::Array(items) => {
            for item in items {
                out.push_str("<item>");
                xml_value(out, item);
                out.push_str("</item>");
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                if xml_name(key) {
                    let _ = write!(out, "<{key}>");
                    xml_value(out, item);
                    let _ = write!(out, "</{key}>");
                } else {
                    let _ = write!(out, "<item key=\"{}\">", escape(key));
                    xml_value(out, item);
                    out.push_str("</item>");
                }
            }
        }
    }
}

fn xml_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.to_ascii_lowercase().starts_with("xml")
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all are dropped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> proto::Event {
        proto::Event {
            id: "evt_1".into(),
            organization_id: "acme".into(),
            r#type: "workflow.completed".into(),
            occurred_at_ms: 1_795_341_600_000,
            attributes: [("workflow".to_string(), "a<b".to_string())].into(),
            data_json: bytes::Bytes::from_static(br#"{"n":1,"list":[true,"x"],"9bad":null}"#),
            ..Default::default()
        }
    }

    #[test]
    fn json_body() {
        let body = String::from_utf8(render(&event(), "wh_1", Format::Json)).unwrap();
        assert_eq!(
            body,
            r#"{"id":"evt_1","type":"workflow.completed","timestamp":"2026-11-22T10:00:00.000Z","organization_id":"acme","webhook_id":"wh_1","attributes":{"workflow":"a<b"},"data":{"n":1,"list":[true,"x"],"9bad":null},"metadata":null}"#
        );
    }

    #[test]
    fn xml_body() {
        let body = String::from_utf8(render(&event(), "wh_1", Format::Xml)).unwrap();
        assert!(body.contains("<type>workflow.completed</type>"), "{body}");
        assert!(
            body.contains("<attribute name=\"workflow\">a&lt;b</attribute>"),
            "{body}"
        );
        assert!(body.contains("<data><item key=\"9bad\"></item><list><item>true</item><item>x</item></list><n>1</n></data>"), "{body}");
        assert!(body.contains("<metadata></metadata>"), "{body}");
    }
}
