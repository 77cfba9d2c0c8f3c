//! Which webhooks an event goes to.
//!
//! Event-type patterns use NATS token rules: `workflow.completed` is exact,
//! `workflow.*` matches one more token, `workflow.>` one or more. Filters
//! narrow by attribute: for every key given, the event's attribute of that
//! name must match one of the values, where `*` matches any run of
//! characters; an event without the attribute does not match.

use std::collections::HashMap;

use crate::names::valid_type_token;
use crate::proto;

/// Whether `pattern` is a valid event-type pattern.
pub fn valid_pattern(pattern: &str) -> bool {
    if pattern.is_empty() || pattern.len() > 255 {
        return false;
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| *t == "*" || (*t == ">" && i == tokens.len() - 1) || valid_type_token(t))
}

/// Whether the event type `event_type` is selected by `pattern`.
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    let mut types = event_type.split('.');
    for p in pattern.split('.') {
        if p == ">" {
            return types.next().is_some();
        }
        match types.next() {
            Some(t) if p == "*" || p == t => {}
            _ => return false,
        }
    }
    types.next().is_none()
}

/// Glob match where `*` matches any run of characters (also empty).
pub fn glob_matches(glob: &str, value: &str) -> bool {
    if !glob.contains('*') {
        return glob == value;
    }
    let parts: Vec<&str> = glob.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if value.len() < first.len() + last.len() || !value.starts_with(first) || !value.ends_with(last)
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// One webhook's selection rules, compiled for matching.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub webhook_id: String,
    patterns: Vec<String>,
    filters: Vec<(String, Vec<String>)>,
}

impl Subscription {
    pub fn new(
        webhook_id: String,
        patterns: Vec<String>,
        filters: Vec<(String, Vec<String>)>,
    ) -> Self {
        Self {
            webhook_id,
            patterns,
            filters,
        }
    }

    pub fn from_webhook(webhook: &proto::Webhook) -> Self {
        let mut filters: Vec<(String, Vec<String>)> = webhook
            .filters
            .iter()
            .map(|(k, v)| (k.clone(), v.values.clone()))
            .collect();
        filters.sort();
        Self::new(webhook.id.clone(), webhook.event_types.clone(), filters)
    }

    fn is_exact(&self) -> bool {
        self.patterns.iter().all(|p| !p.contains(['*', '>']))
    }

    pub fn matches_type(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| type_matches(p, event_type))
    }

    pub fn matches_attributes(&self, attributes: &HashMap<String, String>) -> bool {
        self.filters.iter().all(|(key, globs)| {
            attributes
                .get(key)
                .is_some_and(|value| globs.iter().any(|g| glob_matches(g, value)))
        })
    }

    pub fn matches(&self, event_type: &str, attributes: &HashMap<String, String>) -> bool {
        self.matches_type(event_type) && self.matches_attributes(attributes)
    }
}

/// The subscriptions of one organization, indexed so that an event is only
/// checked against webhooks that can select its type: exact types are looked
/// up in a map, patterns are scanned.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionSet {
    subscriptions: Vec<Subscription>,
    by_type: HashMap<String, Vec<usize>>,
    with_patterns: Vec<usize>,
}

impl SubscriptionSet {
    /// Builds the set from the enabled webhooks among `webhooks`; disabled
    /// webhooks match nothing.
    pub fn from_webhooks<'a>(webhooks: impl IntoIterator<Item = &'a proto::Webhook>) -> Self {
        Self::new(
            webhooks
                .into_iter()
                .filter(|w| w.enabled)
                .map(Subscription::from_webhook)
                .collect(),
        )
    }

    pub fn new(subscriptions: Vec<Subscription>) -> Self {
        let mut by_type: HashMap<String, Vec<usize>> = HashMap::new();
        let mut with_patterns = Vec::new();
        for (i, s) in subscriptions.iter().enumerate() {
            if s.is_exact() {
                let mut types: Vec<&String> = s.patterns.iter().collect();
                types.sort();
                types.dedup();
                for t in types {
                    by_type.entry(t.clone()).or_default().push(i);
                }
            } else {
                with_patterns.push(i);
            }
        }
        Self {
            subscriptions,
            by_type,
            with_patterns,
        }
    }

    pub fn len(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// The subscriptions the event matches, each once.
    pub fn matching<'a>(
        &'a self,
        event_type: &'a str,
        attributes: &'a HashMap<String, String>,
    ) -> impl Iterator<Item = &'a Subscription> + 'a {
        let exact = self
            .by_type
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let exact = exact
            .iter()
            .map(|&i| &self.subscriptions[i])
            .filter(move |s| s.matches_attributes(attributes));
        let patterns = self
            .with_patterns
            .iter()
            .map(|&i| &self.subscriptions[i])
            .filter(move |s| s.matches(event_type, attributes));
        exact.chain(patterns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        let table = [
            ("workflow.completed", "workflow.completed", true),
            ("workflow.completed", "workflow.failed", false),
            ("workflow.completed", "workflow.completed.x", false),
            ("workflow.*", "workflow.completed", true),
            ("workflow.*", "workflow.step.completed", false),
            ("workflow.*", "workflow", false),
            ("workflow.>", "workflow.completed", true),
            ("workflow.>", "workflow.step.completed", true),
            ("workflow.>", "workflow", false),
            ("workflow.step.*", "workflow.step.failed", true),
            ("*.connected", "worker.connected", true),
            ("*.connected", "workflow.step.connected", false),
            (">", "worker.connected", true),
            ("*", "worker.connected", false),
            ("workflow.*.failed", "workflow.step.failed", true),
            ("workflow.*.failed", "workflow.failed", false),
        ];
        for (pattern, event_type, expected) in table {
            assert_eq!(
                type_matches(pattern, event_type),
                expected,
                "{pattern} vs {event_type}"
            );
        }
    }

    #[test]
    fn pattern_validity() {
        for ok in [
            "workflow.completed",
            "workflow.*",
            "workflow.>",
            ">",
            "*",
            "a.*.b",
            "Custom-Type_1",
        ] {
            assert!(valid_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            "workflow.",
            ".x",
            "workflow.>.x",
            "work flow",
            "a..b",
            "wf.com*",
            ">.x",
        ] {
            assert!(!valid_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn globs() {
        let table = [
            ("charge-*", "charge-card", true),
            ("charge-*", "charge-", true),
            ("charge-*", "refund-card", false),
            ("*", "", true),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*-7", "worker-7", true),
            ("*-7", "worker-77", false),
            ("ab*ba", "aba", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("invoice-*", "invoice-approval", true),
        ];
        for (glob, value, expected) in table {
            assert_eq!(glob_matches(glob, value), expected, "{glob} vs {value}");
        }
    }

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn sub(id: &str, patterns: &[&str], filters: &[(&str, &[&str])]) -> Subscription {
        Subscription::new(
            id.into(),
            patterns.iter().map(|p| (*p).into()).collect(),
            filters
                .iter()
                .map(|(k, v)| ((*k).into(), v.iter().map(|s| (*s).into()).collect()))
                .collect(),
        )
    }

    /// The filters of the seed products: by workflow, execution status, step,
    /// step outcome and worker name.
    #[test]
    fn filters() {
        type Case<'a> = (Subscription, &'a str, &'a [(&'a str, &'a str)], bool);
        let table: &[Case] = &[
            (
                sub(
                    "a",
                    &["workflow.completed"],
                    &[("workflow", &["invoice-approval"])],
                ),
                "workflow.completed",
                &[("workflow", "invoice-approval")],
                true,
            ),
            (
                sub(
                    "a",
                    &["workflow.completed"],
                    &[("workflow", &["invoice-approval"])],
                ),
                "workflow.completed",
                &[("workflow", "other")],
                false,
            ),
            (
                sub(
                    "a",
                    &["workflow.completed"],
                    &[("workflow", &["invoice-approval"])],
                ),
                "workflow.completed",
                &[],
                false,
            ),
            (
                sub(
                    "b",
                    &["workflow.*"],
                    &[("status", &["failed", "timed_out"])],
                ),
                "workflow.failed",
                &[("status", "timed_out")],
                true,
            ),
            (
                sub(
                    "b",
                    &["workflow.*"],
                    &[("status", &["failed", "timed_out"])],
                ),
                "workflow.failed",
                &[("status", "succeeded")],
                false,
            ),
            (
                sub(
                    "c",
                    &["workflow.step.>"],
                    &[("step", &["charge-*"]), ("status", &["failed"])],
                ),
                "workflow.step.failed",
                &[("step", "charge-card"), ("status", "failed")],
                true,
            ),
            (
                sub(
                    "c",
                    &["workflow.step.>"],
                    &[("step", &["charge-*"]), ("status", &["failed"])],
                ),
                "workflow.step.failed",
                &[("step", "charge-card")],
                false,
            ),
            (
                sub("d", &["worker.*"], &[("worker", &["worker-7"])]),
                "worker.connected",
                &[("worker", "worker-7")],
                true,
            ),
            (
                sub("d", &["worker.*"], &[("worker", &["worker-7"])]),
                "worker.connected",
                &[("worker", "worker-8")],
                false,
            ),
            (sub("e", &["worker.*"], &[]), "workflow.started", &[], false),
        ];
        for (s, event_type, a, expected) in table {
            assert_eq!(
                s.matches(event_type, &attrs(a)),
                *expected,
                "{s:?} vs {event_type} {a:?}"
            );
        }
    }

    #[test]
    fn a_set_matches_each_webhook_once() {
        let set = SubscriptionSet::new(vec![
            sub("exact", &["workflow.completed", "workflow.completed"], &[]),
            sub("both", &["workflow.completed", "workflow.*"], &[]),
            sub("other", &["workflow.failed"], &[]),
            sub("filtered", &["workflow.>"], &[("workflow", &["x"])]),
        ]);
        let a = attrs(&[("workflow", "y")]);
        let got: Vec<&str> = set
            .matching("workflow.completed", &a)
            .map(|s| s.webhook_id.as_str())
            .collect();
        assert_eq!(got, ["exact", "both"]);
    }

    #[test]
    fn disabled_webhooks_match_nothing() {
        let mut w = proto::Webhook {
            id: "w".into(),
            event_types: vec![">".into()],
            enabled: false,
            ..Default::default()
        };
        assert!(SubscriptionSet::from_webhooks([&w]).is_empty());
        w.enabled = true;
        assert_eq!(SubscriptionSet::from_webhooks([&w]).len(), 1);
    }
}
