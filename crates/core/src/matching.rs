//! Which webhooks an event goes to.
//!
//! Event-type patterns use NATS token rules: `workflow.completed` is exact,
//! `workflow.*` matches one more token, `workflow.>` one or more. Filters
//! narrow by attribute: for every key given, the event's attribute of that
//! name must match one of the values, where `*` matches any run of
//! characters; an event without the attribute does not match.
//!
//! A [`SubscriptionSet`] answers "which webhooks does this event go to" in
//! time that depends on the webhooks that can match, not on how many the
//! organization has: patterns live in a token trie, and at each place in it
//! subscriptions whose filter names exact values of some attribute are
//! indexed by that value, so an event only meets the webhooks that care
//! about its workflow (or worker, step, status).

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
    Glob::new(glob).matches(value)
}

/// A filter value compiled once: most are exact or a prefix, and those are
/// checked without splitting the glob on every event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    Exact(String),
    Any,
    Prefix(String),
    Suffix(String),
    /// `first*middle*…*last`
    Parts {
        first: String,
        middles: Vec<String>,
        last: String,
    },
}

impl Glob {
    fn new(glob: &str) -> Self {
        if !glob.contains('*') {
            return Self::Exact(glob.to_owned());
        }
        let parts: Vec<&str> = glob.split('*').collect();
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        let middles: Vec<String> = parts[1..parts.len() - 1]
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| (*m).to_owned())
            .collect();
        match (first.is_empty(), middles.is_empty(), last.is_empty()) {
            (true, true, true) => Self::Any,
            (false, true, true) => Self::Prefix(first.to_owned()),
            (true, true, false) => Self::Suffix(last.to_owned()),
            _ => Self::Parts {
                first: first.to_owned(),
                middles,
                last: last.to_owned(),
            },
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == value,
            Self::Any => true,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Parts {
                first,
                middles,
                last,
            } => {
                if value.len() < first.len() + last.len()
                    || !value.starts_with(first.as_str())
                    || !value.ends_with(last.as_str())
                {
                    return false;
                }
                let mut rest = &value[first.len()..value.len() - last.len()];
                for middle in middles {
                    match rest.find(middle.as_str()) {
                        Some(at) => rest = &rest[at + middle.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }

    fn exact(&self) -> Option<&str> {
        match self {
            Self::Exact(value) => Some(value),
            _ => None,
        }
    }
}

/// One webhook's selection rules, compiled for matching.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub webhook_id: String,
    /// The webhook's ordered delivery, if it has one (`core::ordering`).
    pub ordering: Option<proto::Ordering>,
    patterns: Vec<String>,
    filters: Vec<(String, Vec<Glob>)>,
}

impl Subscription {
    pub fn new(
        webhook_id: String,
        patterns: Vec<String>,
        filters: Vec<(String, Vec<String>)>,
    ) -> Self {
        let mut patterns = patterns;
        patterns.sort();
        patterns.dedup();
        Self {
            webhook_id,
            ordering: None,
            patterns,
            filters: filters
                .into_iter()
                .map(|(key, values)| (key, values.iter().map(|v| Glob::new(v)).collect()))
                .collect(),
        }
    }

    pub fn from_webhook(webhook: &proto::Webhook) -> Self {
        let mut filters: Vec<(String, Vec<String>)> = webhook
            .filters
            .iter()
            .map(|(k, v)| (k.clone(), v.values.clone()))
            .collect();
        filters.sort();
        Self {
            ordering: webhook.ordering.clone().filter(|o| !o.key.is_empty()),
            ..Self::new(webhook.id.clone(), webhook.event_types.clone(), filters)
        }
    }

    pub fn matches_type(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| type_matches(p, event_type))
    }

    pub fn matches_attributes(&self, attributes: &HashMap<String, String>) -> bool {
        self.filters.iter().all(|(key, globs)| {
            attributes
                .get(key)
                .is_some_and(|value| globs.iter().any(|g| g.matches(value)))
        })
    }

    pub fn matches(&self, event_type: &str, attributes: &HashMap<String, String>) -> bool {
        self.matches_type(event_type) && self.matches_attributes(attributes)
    }

    /// The filter an index can use: an attribute whose every value is exact,
    /// preferring the attributes that usually tell webhooks apart.
    fn index_key(&self) -> Option<usize> {
        const PREFERRED: [&str; 5] = ["workflow", "worker", "execution", "step", "status"];
        let indexable: Vec<usize> = (0..self.filters.len())
            .filter(|&i| {
                let globs = &self.filters[i].1;
                !globs.is_empty() && globs.iter().all(|g| g.exact().is_some())
            })
            .collect();
        PREFERRED
            .iter()
            .find_map(|p| indexable.iter().copied().find(|&i| self.filters[i].0 == *p))
            .or_else(|| indexable.first().copied())
    }
}

/// Subscriptions that reached one place in the trie, split by whether one of
/// their filters can be looked up by value.
#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Nothing to look up: every event that gets here checks these.
    scan: Vec<u32>,
    /// Attribute name → exact value → subscriptions whose filter on that
    /// attribute lists the value.
    by_value: Vec<(String, HashMap<String, Vec<u32>>)>,
}

impl Bucket {
    fn add(&mut self, i: u32, sub: &Subscription) {
        let Some(f) = sub.index_key() else {
            self.scan.push(i);
            return;
        };
        let (key, globs) = &sub.filters[f];
        let at = match self.by_value.iter().position(|(k, _)| k == key) {
            Some(at) => at,
            None => {
                self.by_value.push((key.clone(), HashMap::new()));
                self.by_value.len() - 1
            }
        };
        let map = &mut self.by_value[at].1;
        for value in globs.iter().filter_map(Glob::exact) {
            let list = map.entry(value.to_owned()).or_default();
            if list.last() != Some(&i) {
                list.push(i);
            }
        }
    }

    fn collect(&self, attributes: &HashMap<String, String>, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.scan);
        for (key, map) in &self.by_value {
            if let Some(list) = attributes.get(key).and_then(|v| map.get(v)) {
                out.extend_from_slice(list);
            }
        }
    }
}

/// A token trie of event-type patterns.
#[derive(Debug, Clone, Default)]
struct Node {
    children: HashMap<String, Node>,
    star: Option<Box<Node>>,
    /// Patterns that end here.
    end: Bucket,
    /// Patterns that end here with `>`: one or more tokens follow.
    rest: Bucket,
}

impl Node {
    fn insert(&mut self, pattern: &str, i: u32, sub: &Subscription) {
        let mut node = self;
        for token in pattern.split('.') {
            match token {
                ">" => return node.rest.add(i, sub),
                "*" => node = node.star.get_or_insert_with(Box::default),
                _ => node = node.children.entry(token.to_owned()).or_default(),
            }
        }
        node.end.add(i, sub);
    }

    /// Collects what the tokens of `remaining` (none left when `None`) reach.
    fn walk(
        &self,
        remaining: Option<&str>,
        attributes: &HashMap<String, String>,
        out: &mut Vec<u32>,
    ) {
        let Some(remaining) = remaining else {
            return self.end.collect(attributes, out);
        };
        self.rest.collect(attributes, out);
        let (token, rest) = match remaining.split_once('.') {
            Some((token, rest)) => (token, Some(rest)),
            None => (remaining, None),
        };
        if let Some(child) = self.children.get(token) {
            child.walk(rest, attributes, out);
        }
        if let Some(star) = &self.star {
            star.walk(rest, attributes, out);
        }
    }
}

/// The subscriptions of one organization, indexed so that an event is only
/// checked against webhooks that can select it (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct SubscriptionSet {
    subscriptions: Vec<Subscription>,
    root: Node,
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
        let mut root = Node::default();
        for (i, s) in subscriptions.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 webhooks");
            for pattern in &s.patterns {
                root.insert(pattern, i, s);
            }
        }
        Self {
            subscriptions,
            root,
        }
    }

    pub fn len(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// The subscriptions the event matches, each once, in the order the set
    /// was built in.
    pub fn matching(
        &self,
        event_type: &str,
        attributes: &HashMap<String, String>,
    ) -> Vec<&Subscription> {
        let mut found = Vec::new();
        self.matching_into(event_type, attributes, &mut found);
        found.into_iter().map(|i| self.get(i)).collect()
    }

    /// Like [`matching`](Self::matching), into a buffer the caller reuses,
    /// as indexes for [`get`](Self::get); allocates nothing once the buffer
    /// has grown.
    pub fn matching_into(
        &self,
        event_type: &str,
        attributes: &HashMap<String, String>,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        self.root.walk(Some(event_type), attributes, out);
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
        // The trie settled the type and at most one filter; check them all.
        out.retain(|&i| self.subscriptions[i as usize].matches_attributes(attributes));
    }

    pub fn get(&self, i: u32) -> &Subscription {
        &self.subscriptions[i as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table the console's pattern rule is tested against too
    /// (tests/console/patterns.mjs, run by tests/tests/type_patterns.rs).
    #[test]
    fn type_patterns_follow_the_shared_table() {
        let table: serde_json::Value =
            serde_json::from_str(include_str!("../tests/type_patterns.json")).unwrap();
        let cases = table["cases"].as_array().unwrap();
        assert!(cases.len() > 10);
        for case in cases {
            let (pattern, event_type) = (case[0].as_str().unwrap(), case[1].as_str().unwrap());
            assert!(valid_pattern(pattern), "{pattern}");
            assert_eq!(
                type_matches(pattern, event_type),
                case[2].as_bool().unwrap(),
                "{pattern} selects {event_type}"
            );
        }
    }

    #[test]
    fn type_patterns() {
        let table = [
            ("workflow.completed", "workflow.completed", true),
            ("workflow.completed", "workflow.failed", false),
            ("workflow.completed", "workflow.completed.x", false),
            ("workflow.completed", "workflow", false),
            ("workflow.*", "workflow.completed", true),
            ("workflow.*", "workflow.step.completed", false),
            ("workflow.*", "workflow", false),
            ("workflow.*", "worker.connected", false),
            ("workflow.>", "workflow.completed", true),
            ("workflow.>", "workflow.step.completed", true),
            ("workflow.>", "workflow.definition.updated", true),
            ("workflow.>", "workflow", false),
            ("workflow.>", "worker.connected", false),
            ("workflow.step.*", "workflow.step.failed", true),
            ("workflow.step.*", "workflow.failed", false),
            ("workflow.step.>", "workflow.step", false),
            ("*.connected", "worker.connected", true),
            ("*.connected", "workflow.step.connected", false),
            (">", "worker.connected", true),
            (">", "a", true),
            ("*", "worker.connected", false),
            ("*", "worker", true),
            ("*.*", "worker.connected", true),
            ("*.>", "workflow.step.failed", true),
            ("*.>", "workflow", false),
            ("workflow.*.failed", "workflow.step.failed", true),
            ("workflow.*.failed", "workflow.failed", false),
            // Tokens compare whole and case-sensitively.
            ("workflow.complete", "workflow.completed", false),
            ("Workflow.completed", "workflow.completed", false),
            ("work", "workflow", false),
        ];
        for (pattern, event_type, expected) in table {
            assert_eq!(
                type_matches(pattern, event_type),
                expected,
                "{pattern} vs {event_type}"
            );
            // The trie agrees with the reference rule.
            let set = SubscriptionSet::new(vec![sub("s", &[pattern], &[])]);
            assert_eq!(
                set.matching(event_type, &HashMap::new()).len() == 1,
                expected,
                "set: {pattern} vs {event_type}"
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
            "a.b>",
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
            ("charge-*", "charge", false),
            ("*", "", true),
            ("*", "anything", true),
            ("**", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b*c", "acb", false),
            ("a**c", "ac", true),
            ("*-7", "worker-7", true),
            ("*-7", "worker-77", false),
            ("*card*", "charge-card-eu", true),
            ("*card*", "charge-cash", false),
            ("ab*ba", "aba", false),
            ("ab*ba", "abba", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("exact", "Exact", false),
            ("", "", true),
            ("", "x", false),
            ("invoice-*", "invoice-approval", true),
            ("é*", "été", true),
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

    type Filters<'a> = &'a [(&'a str, &'a [&'a str])];
    type Attrs<'a> = &'a [(&'a str, &'a str)];

    /// One webhook's patterns and filters against one event, checked both
    /// by the subscription alone and through a set.
    fn check(patterns: &[&str], filters: Filters, event_type: &str, a: Attrs, expected: bool) {
        let s = sub("w", patterns, filters);
        let a = attrs(a);
        assert_eq!(
            s.matches(event_type, &a),
            expected,
            "{patterns:?} {filters:?} vs {event_type} {a:?}"
        );
        let set = SubscriptionSet::new(vec![s]);
        assert_eq!(
            set.matching(event_type, &a).len() == 1,
            expected,
            "set: {patterns:?} {filters:?} vs {event_type} {a:?}"
        );
    }

    /// The filters users know: by workflow (state machine, flow, rule), by
    /// execution status, by step (activity), by step outcome, by worker.
    #[test]
    fn filters() {
        let wf: Filters = &[("workflow", &["invoice-approval"])];
        let completed = "workflow.completed";
        #[rustfmt::skip]
        let table: &[(&[&str], Filters, &str, Attrs, bool)] = &[
            // By workflow.
            (&[completed], wf, completed, &[("workflow", "invoice-approval")], true),
            (&[completed], wf, completed, &[("workflow", "other")], false),
            (&[completed], wf, completed, &[], false),
            (&[completed], wf, completed, &[("execution", "invoice-approval")], false),
            (&[completed], wf, "workflow.failed", &[("workflow", "invoice-approval")], false),
            (&["workflow.>"], &[("workflow", &["invoice-*"])], "workflow.step.failed", &[("workflow", "invoice-refund")], true),
            (&["workflow.>"], &[("workflow", &["invoice-*"])], "workflow.step.failed", &[("workflow", "payroll")], false),
            (&["workflow.>"], &[("workflow", &["a", "b"])], "workflow.started", &[("workflow", "b")], true),
            // By execution status.
            (&["workflow.*"], &[("status", &["failed", "timed_out"])], "workflow.failed", &[("status", "timed_out")], true),
            (&["workflow.*"], &[("status", &["failed", "timed_out"])], "workflow.failed", &[("status", "succeeded")], false),
            (&["workflow.*"], &[("status", &["failed", "timed_out"])], "workflow.step.failed", &[("status", "failed")], false),
            // By step (activity) and step outcome.
            (&["workflow.step.>"], &[("step", &["charge-*"]), ("status", &["failed"])], "workflow.step.failed", &[("step", "charge-card"), ("status", "failed")], true),
            (&["workflow.step.>"], &[("step", &["charge-*"]), ("status", &["failed"])], "workflow.step.failed", &[("step", "charge-card")], false),
            (&["workflow.step.>"], &[("step", &["charge-*"]), ("status", &["failed"])], "workflow.step.failed", &[("step", "refund"), ("status", "failed")], false),
            (&["workflow.step.completed", "workflow.step.failed"], &[("step", &["ship"])], "workflow.step.completed", &[("step", "ship")], true),
            (&["workflow.step.completed", "workflow.step.failed"], &[("step", &["ship"])], "workflow.step.started", &[("step", "ship")], false),
            // By worker name.
            (&["worker.*"], &[("worker", &["worker-7"])], "worker.connected", &[("worker", "worker-7")], true),
            (&["worker.*"], &[("worker", &["worker-7"])], "worker.connected", &[("worker", "worker-8")], false),
            (&["worker.*"], &[("worker", &["worker-*"])], "worker.disconnected", &[("worker", "worker-8")], true),
            // Every key must match; extra attributes don't matter.
            (&[">"], &[("workflow", &["w"]), ("status", &["failed"]), ("step", &["s*"])], "workflow.step.failed", &[("workflow", "w"), ("status", "failed"), ("step", "s1"), ("x", "y")], true),
            (&[">"], &[("workflow", &["w"]), ("status", &["failed"]), ("step", &["s*"])], "workflow.step.failed", &[("workflow", "w"), ("status", "failed")], false),
            // A `*` value still needs the attribute to be there.
            (&[">"], &[("worker", &["*"])], "worker.connected", &[("worker", "")], true),
            (&[">"], &[("worker", &["*"])], "worker.connected", &[], false),
            // An empty value list matches nothing.
            (&[">"], &[("worker", &[])], "worker.connected", &[("worker", "w")], false),
            // No filters: the type decides.
            (&["worker.*"], &[], "workflow.started", &[], false),
            (&["worker.*"], &[], "worker.connected", &[], true),
            // Values compare whole and case-sensitively.
            (&[completed], wf, completed, &[("workflow", "Invoice-Approval")], false),
            (&[completed], wf, completed, &[("workflow", "invoice-approval-2")], false),
        ];
        for (patterns, filters, event_type, a, expected) in table {
            check(patterns, filters, event_type, a, *expected);
        }
    }

    fn ids<'a>(set: &'a SubscriptionSet, event_type: &str, a: Attrs) -> Vec<&'a str> {
        set.matching(event_type, &attrs(a))
            .into_iter()
            .map(|s| s.webhook_id.as_str())
            .collect()
    }

    #[test]
    fn a_set_matches_each_webhook_once_in_order() {
        let set = SubscriptionSet::new(vec![
            sub("exact", &["workflow.completed", "workflow.completed"], &[]),
            sub(
                "both",
                &["workflow.*", "workflow.completed", "workflow.>"],
                &[],
            ),
            sub("other", &["workflow.failed"], &[]),
            sub("filtered", &["workflow.>"], &[("workflow", &["x"])]),
            sub(
                "two-values",
                &["workflow.>", ">"],
                &[("workflow", &["y", "y", "z"])],
            ),
            sub("all", &[">"], &[]),
        ]);
        let a: Attrs = &[("workflow", "y")];
        assert_eq!(
            ids(&set, "workflow.completed", a),
            ["exact", "both", "two-values", "all"]
        );
        assert_eq!(
            ids(&set, "workflow.step.completed", a),
            ["both", "two-values", "all"]
        );
        assert_eq!(ids(&set, "worker.connected", a), ["two-values", "all"]);
        assert_eq!(
            ids(&set, "workflow.failed", &[("workflow", "x")]),
            ["both", "other", "filtered", "all"]
        );
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
        w.filters.insert(
            "workflow".into(),
            proto::StringList {
                values: vec!["a".into()],
            },
        );
        let set = SubscriptionSet::from_webhooks([&w]);
        assert_eq!(ids(&set, "x", &[("workflow", "a")]), ["w"]);
        assert!(ids(&set, "x", &[("workflow", "b")]).is_empty());
    }

    /// The indexed set answers exactly what checking every subscription
    /// would, over many generated webhooks and events.
    #[test]
    fn the_index_agrees_with_checking_every_webhook() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let patterns = [
            "workflow.completed",
            "workflow.failed",
            "workflow.*",
            "workflow.>",
            "workflow.step.*",
            "workflow.step.>",
            "*.connected",
            "worker.*",
            ">",
            "*.*",
        ];
        let keys = ["workflow", "status", "step", "worker"];
        let values = ["a", "b", "c", "a*", "*", "*c", "b*c"];
        let subscriptions: Vec<Subscription> = (0..400)
            .map(|i| {
                let ps: Vec<String> = (0..1 + next(2))
                    .map(|_| patterns[next(patterns.len())].into())
                    .collect();
                let fs: Vec<(String, Vec<String>)> = (0..next(3))
                    .map(|_| {
                        let vs = (0..1 + next(2))
                            .map(|_| values[next(values.len())].into())
                            .collect();
                        (keys[next(keys.len())].into(), vs)
                    })
                    .collect();
                Subscription::new(format!("w{i}"), ps, fs)
            })
            .collect();
        let set = SubscriptionSet::new(subscriptions.clone());
        let types = [
            "workflow.completed",
            "workflow.failed",
            "workflow.step.failed",
            "worker.connected",
            "workflow",
            "other.thing.here",
        ];
        let mut checked = 0;
        for _ in 0..2000 {
            let event_type = types[next(types.len())];
            let a: HashMap<String, String> = (0..next(4))
                .map(|_| {
                    let v = ["a", "b", "c", "abc", "bc", ""][next(6)];
                    (keys[next(keys.len())].into(), v.into())
                })
                .collect();
            let want: Vec<&str> = subscriptions
                .iter()
                .filter(|s| s.matches(event_type, &a))
                .map(|s| s.webhook_id.as_str())
                .collect();
            let got: Vec<&str> = set
                .matching(event_type, &a)
                .into_iter()
                .map(|s| s.webhook_id.as_str())
                .collect();
            assert_eq!(got, want, "{event_type} {a:?}");
            checked += want.len();
        }
        assert!(checked > 10_000, "the generated cases match often enough");
    }
}
