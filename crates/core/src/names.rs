//! Names of NATS subjects, JetStream streams, consumers and the KV bucket,
//! and the rules for the tokens tenants put into subjects.
//!
//! Tenant data (organization ids, event types, webhook ids) only ever enters
//! a subject after [`valid_org`], [`valid_event_type`] or [`valid_id`] said
//! yes, so it can never become a wildcard.

/// Producers publish events here: `herald.events.<org>.<type>`.
pub const EVENTS_PREFIX: &str = "herald.events";
pub const EVENTS_STREAM: &str = "HERALD_EVENTS";
pub const EVENTS_SUBJECTS: &str = "herald.events.>";

/// Normalized events, ingest → matcher: `herald.accepted.<org>`.
/// Herald's five services, in the order an event meets them (each is the
/// `herald-<name>` binary).
pub const SERVICES: [&str; 5] = ["ingest", "matcher", "deliverer", "log-writer", "admin"];

pub const ACCEPTED_STREAM: &str = "HERALD_ACCEPTED";
pub const ACCEPTED_SUBJECTS: &str = "herald.accepted.>";

/// Events ingest refused, with the reason: `herald.rejected.<org>`.
pub const REJECTED_STREAM: &str = "HERALD_REJECTED";
pub const REJECTED_SUBJECTS: &str = "herald.rejected.>";
/// The organization token used when the subject had no valid one.
pub const REJECTED_UNKNOWN_ORG: &str = "_unknown";

/// Delivery jobs, matcher → deliverer: `herald.deliveries.<org>.<webhook>`.
/// The same stream holds retry schedules, `herald.schedules.<delivery>`,
/// which the server turns back into jobs when they are due.
pub const DELIVERIES_STREAM: &str = "HERALD_DELIVERIES";
pub const DELIVERIES_SUBJECTS: &str = "herald.deliveries.>";
pub const SCHEDULES_SUBJECTS: &str = "herald.schedules.>";

/// Attempt results, deliverer → log-writer: `herald.attempts.<org>.<webhook>`.
pub const ATTEMPTS_STREAM: &str = "HERALD_ATTEMPTS";
pub const ATTEMPTS_SUBJECTS: &str = "herald.attempts.>";

/// Herald's own events, e.g. `herald.system.<org>.webhook.disabled`.
pub const SYSTEM_STREAM: &str = "HERALD_SYSTEM";
pub const SYSTEM_SUBJECTS: &str = "herald.system.>";

/// Deliveries waiting for a failing webhook to recover, in arrival order:
/// `herald.parked.<org>.<webhook>`. Nothing consumes them; the deliverer
/// reads the oldest (a probe) or all (on recovery) by direct get.
pub const PARKED_STREAM: &str = "HERALD_PARKED";
pub const PARKED_SUBJECTS: &str = "herald.parked.>";

/// Ordered webhooks' deliveries waiting for their key's turn, in the order
/// accepted: `herald.ordered.<org>.<webhook>.q.<key token>`, beside each
/// key's cursor (the sequence its last concluded delivery had),
/// `herald.ordered.<org>.<webhook>.c.<key token>` (`core::ordering`).
/// Nothing consumes them: the matcher (or a recover or replay) appends,
/// and whoever concludes a key's delivery hands on the next.
pub const ORDERED_STREAM: &str = "HERALD_ORDERED";
pub const ORDERED_SUBJECTS: &str = "herald.ordered.>";

/// Messages Herald could not process at all, with the reason:
/// `herald.dead.<stream>`. Listed and redriven by operators.
pub const DEAD_STREAM: &str = "HERALD_DEAD";
pub const DEAD_SUBJECTS: &str = "herald.dead.>";

/// The audit trail (admin): every change to organizations, API keys,
/// console links and webhooks, `herald.audit.<org>`; a change that concerns
/// every organization (an operator key) goes to `herald.audit` itself.
pub const AUDIT_STREAM: &str = "HERALD_AUDIT";
pub const AUDIT_PLATFORM_SUBJECT: &str = "herald.audit";
pub const AUDIT_SUBJECTS: &str = "herald.audit.>";

/// Webhook definitions, key `<org>.<webhook id>`.
pub const WEBHOOKS_BUCKET: &str = "herald-webhooks";
/// The stream that holds the webhooks bucket (JetStream names a bucket's
/// stream `KV_<bucket>`).
pub const WEBHOOKS_STREAM: &str = "KV_herald-webhooks";

/// The NATS header that deduplicates a publish: JetStream stores a message
/// once per id within the stream's duplicate window.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

pub const INGEST_CONSUMER: &str = "ingest";
pub const MATCHER_CONSUMER: &str = "matcher";
pub const DELIVERER_CONSUMER: &str = "deliverer";
pub const LOG_WRITER_CONSUMER: &str = "log-writer";

pub fn accepted_subject(org: &str) -> String {
    format!("herald.accepted.{org}")
}

pub fn rejected_subject(org: &str) -> String {
    format!("herald.rejected.{org}")
}

pub fn delivery_subject(org: &str, webhook_id: &str) -> String {
    format!("herald.deliveries.{org}.{webhook_id}")
}

pub fn schedule_subject(delivery_id: &str) -> String {
    format!("herald.schedules.{delivery_id}")
}

/// The probe timer of a failing webhook: one schedule per webhook, which
/// the server turns into a probe job on its delivery subject when due.
pub fn probe_schedule_subject(org: &str, webhook_id: &str) -> String {
    format!("herald.schedules.probe.{org}.{webhook_id}")
}

pub fn parked_subject(org: &str, webhook_id: &str) -> String {
    format!("herald.parked.{org}.{webhook_id}")
}

/// The queue of one key of an ordered webhook (`token`:
/// `ordering::token` of the key).
pub fn ordered_subject(org: &str, webhook_id: &str, token: &str) -> String {
    format!("herald.ordered.{org}.{webhook_id}.q.{token}")
}

/// Every key's queue of an ordered webhook.
pub fn ordered_queues(org: &str, webhook_id: &str) -> String {
    format!("herald.ordered.{org}.{webhook_id}.q.*")
}

/// The cursor of one key of an ordered webhook.
pub fn ordered_cursor_subject(org: &str, webhook_id: &str, token: &str) -> String {
    format!("herald.ordered.{org}.{webhook_id}.c.{token}")
}

pub fn dead_subject(stream: &str) -> String {
    format!("herald.dead.{stream}")
}

pub fn attempt_subject(org: &str, webhook_id: &str) -> String {
    format!("herald.attempts.{org}.{webhook_id}")
}

pub fn system_subject(org: &str, event_type: &str) -> String {
    format!("herald.system.{org}.{event_type}")
}

pub fn audit_subject(org: &str) -> String {
    format!("herald.audit.{org}")
}

pub fn webhook_key(org: &str, webhook_id: &str) -> String {
    format!("{org}.{webhook_id}")
}

/// Redis: a webhook's endpoint state (healthy, throttled, failing), shared
/// by every deliverer replica. The hash tag keeps it in one slot of a Redis
/// Cluster.
pub fn endpoint_key(webhook_id: &str) -> String {
    format!("herald:endpoint:{{{webhook_id}}}")
}

/// The subject in [`WEBHOOKS_STREAM`] of the bucket keys `keys` names (a
/// key, or a filter such as `acme.>`): JetStream stores key `k` of bucket
/// `b` on `$KV.b.k`.
pub fn webhooks_subject(keys: &str) -> String {
    format!("$KV.{WEBHOOKS_BUCKET}.{keys}")
}

/// The organization and webhook id of a subject in [`WEBHOOKS_STREAM`].
pub fn parse_webhooks_subject(subject: &str) -> Option<(&str, &str)> {
    let key = subject
        .strip_prefix("$KV.")?
        .strip_prefix(WEBHOOKS_BUCKET)?
        .strip_prefix('.')?;
    parse_webhook_key(key)
}

/// Splits a webhooks-bucket key into organization and webhook id.
pub fn parse_webhook_key(key: &str) -> Option<(&str, &str)> {
    let (org, id) = key.split_once('.')?;
    (valid_org(org) && valid_id(id)).then_some((org, id))
}

/// An organization id: 1–64 of `[a-z0-9_-]`.
pub fn valid_org(org: &str) -> bool {
    (1..=64).contains(&org.len())
        && org
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One token of an event type: 1–64 of `[A-Za-z0-9_-]`.
pub fn valid_type_token(token: &str) -> bool {
    (1..=64).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An event type: dot-separated valid tokens, at most 255 bytes.
pub fn valid_event_type(event_type: &str) -> bool {
    !event_type.is_empty() && event_type.len() <= 255 && event_type.split('.').all(valid_type_token)
}

/// Ids Herald makes or accepts in subjects and keys: 1–128 of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a subject is not `herald.events.<org>.<type>` with valid tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject does not start with herald.events.")]
    Prefix,
    #[error("organization token {0:?} is not 1-64 of [a-z0-9_-]")]
    Organization(String),
    #[error("event type {0:?} is not dot-separated tokens of [A-Za-z0-9_-]")]
    EventType(String),
}

/// Parses `herald.events.<org>.<type>` into `(org, type)`.
pub fn parse_event_subject(subject: &str) -> Result<(&str, &str), SubjectError> {
    let rest = subject
        .strip_prefix(EVENTS_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(SubjectError::Prefix)?;
    let (org, event_type) = rest.split_once('.').unwrap_or((rest, ""));
    if !valid_org(org) {
        return Err(SubjectError::Organization(org.to_owned()));
    }
    if !valid_event_type(event_type) {
        return Err(SubjectError::EventType(event_type.to_owned()));
    }
    Ok((org, event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhooks_bucket_layout() {
        assert_eq!(WEBHOOKS_STREAM, format!("KV_{WEBHOOKS_BUCKET}"));
        let subject = webhooks_subject(&webhook_key("acme", "wh_1"));
        assert_eq!(subject, "$KV.herald-webhooks.acme.wh_1");
        assert_eq!(parse_webhooks_subject(&subject), Some(("acme", "wh_1")));
        assert_eq!(parse_webhooks_subject("$KV.other.acme.wh_1"), None);
        assert_eq!(parse_webhooks_subject("herald-webhooks.acme.wh_1"), None);
        assert_eq!(webhooks_subject("acme.>"), "$KV.herald-webhooks.acme.>");
    }

    fn check(subject: &str, expected: Result<(&str, &str), &str>) {
        let got = parse_event_subject(subject).map_err(|e| match e {
            SubjectError::Prefix => "prefix",
            SubjectError::Organization(_) => "org",
            SubjectError::EventType(_) => "type",
        });
        assert_eq!(got, expected, "{subject}");
    }

    #[test]
    fn event_subjects() {
        check(
            "herald.events.acme.workflow.completed",
            Ok(("acme", "workflow.completed")),
        );
        check(
            "herald.events.a-b_9.worker.connected",
            Ok(("a-b_9", "worker.connected")),
        );
        check(
            "herald.events.acme.Custom_Type-1",
            Ok(("acme", "Custom_Type-1")),
        );
        check("herald.events.acme", Err("type"));
        check("herald.events.acme.", Err("type"));
        check("herald.events.acme.workflow..completed", Err("type"));
        check("herald.events.acme.workflow.*", Err("type"));
        check("herald.events.acme.>", Err("type"));
        check("herald.events.*.workflow.completed", Err("org"));
        check("herald.events.ACME.workflow.completed", Err("org"));
        check("herald.events..workflow.completed", Err("org"));
        check(&format!("herald.events.{}.x", "a".repeat(65)), Err("org"));
        check(
            &format!("herald.events.{}.x", "a".repeat(64)),
            Ok((&"a".repeat(64), "x")),
        );
        check("herald.eventsx.acme.x", Err("prefix"));
        check("other.events.acme.x", Err("prefix"));
    }

    #[test]
    fn webhook_keys() {
        assert_eq!(parse_webhook_key("acme.wh_1"), Some(("acme", "wh_1")));
        assert_eq!(parse_webhook_key("acme"), None);
        assert_eq!(parse_webhook_key("acme.wh.1"), None);
    }
}
