//! Matching throughput: events per second that one core matches against
//! 10, 1,000 and 10,000 webhooks of one organization, with the mix of
//! patterns and filters below. Matching alone: no NATS, no Redis.
//!
//! `cargo bench -p herald-core --bench matching` (add `-- --quick` for a
//! shorter run). Results go to docs/benchmarks.md § Matching.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use herald_core::matching::SubscriptionSet;
use herald_core::proto;

/// A small deterministic generator, so every run measures the same sets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const TYPES: [&str; 14] = [
    "workflow.started",
    "workflow.completed",
    "workflow.failed",
    "workflow.timed_out",
    "workflow.canceled",
    "workflow.waiting",
    "workflow.step.started",
    "workflow.step.completed",
    "workflow.step.failed",
    "workflow.definition.created",
    "workflow.definition.updated",
    "workflow.definition.deleted",
    "worker.connected",
    "worker.disconnected",
];

fn filters(pairs: &[(&str, Vec<String>)]) -> HashMap<String, proto::StringList> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), proto::StringList { values: v.clone() }))
        .collect()
}

/// `n` webhooks: at most 5 per workflow (the product's limit), so there are
/// n/5 workflows; most webhooks filter by workflow, some by worker, a few
/// use globs or nothing at all.
fn webhooks(n: usize, rng: &mut Rng) -> Vec<proto::Webhook> {
    let workflows = (n / 5).max(1);
    (0..n)
        .map(|i| {
            let workflow = format!("wf-{}", i % workflows);
            let (event_types, filters): (Vec<&str>, _) = match i % 20 {
                // Exact types of one workflow.
                0..=6 => (
                    vec![TYPES[rng.below(6)], TYPES[rng.below(6)]],
                    filters(&[("workflow", vec![workflow])]),
                ),
                // Failures of one workflow.
                7..=10 => (
                    vec!["workflow.*"],
                    filters(&[
                        ("workflow", vec![workflow]),
                        ("status", vec!["failed".into(), "timed_out".into()]),
                    ]),
                ),
                // Failed charge steps of one workflow.
                11..=13 => (
                    vec!["workflow.step.>"],
                    filters(&[
                        ("workflow", vec![workflow]),
                        ("step", vec!["charge-*".into()]),
                        ("status", vec!["failed".into()]),
                    ]),
                ),
                // Everything about one workflow.
                14..=16 => (vec!["workflow.>"], filters(&[("workflow", vec![workflow])])),
                // One worker.
                17 | 18 => (
                    vec!["worker.*"],
                    filters(&[("worker", vec![format!("worker-{}", i % 100)])]),
                ),
                // Globs no index can use, and catch-alls: one in 20 of the
                // first hundred webhooks, so their fan-out stays bounded.
                _ if i < 100 => (
                    vec![">"],
                    filters(&[("workflow", vec![format!("wf-{}*", i % 10)])]),
                ),
                _ => (vec!["*.connected"], filters(&[])),
            };
            proto::Webhook {
                id: format!("wh_{i:06}"),
                organization_id: "acme".into(),
                event_types: event_types.into_iter().map(String::from).collect(),
                filters,
                enabled: true,
                ..Default::default()
            }
        })
        .collect()
}

fn events(n_webhooks: usize, rng: &mut Rng) -> Vec<(String, HashMap<String, String>)> {
    let workflows = (n_webhooks / 5).max(1);
    (0..4096)
        .map(|_| {
            let event_type = TYPES[rng.below(TYPES.len())];
            let mut attributes = HashMap::new();
            if event_type.starts_with("worker.") {
                attributes.insert("worker".into(), format!("worker-{}", rng.below(200)));
            } else {
                attributes.insert("workflow".into(), format!("wf-{}", rng.below(workflows)));
                attributes.insert("execution".into(), format!("ex-{}", rng.below(1_000_000)));
                let status = ["succeeded", "failed", "timed_out"][rng.below(3)];
                attributes.insert("status".into(), status.into());
                if event_type.starts_with("workflow.step.") {
                    let step = ["charge-card", "ship", "notify"][rng.below(3)];
                    attributes.insert("step".into(), step.into());
                }
            }
            (event_type.to_owned(), attributes)
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 300 } else { 3000 });
    // The machine may be shared: each round matches every event once, and
    // the median and the best round are reported.
    println!("webhooks  median events/s  best events/s  matches/event");
    for n in [10, 1_000, 10_000] {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let set = SubscriptionSet::from_webhooks(&webhooks(n, &mut rng));
        let events = events(n, &mut rng);
        let mut out = Vec::new();
        let mut matched = 0usize;
        let mut rounds = Vec::new();
        let start = Instant::now();
        while start.elapsed() < budget {
            let round = Instant::now();
            for (event_type, attributes) in &events {
                set.matching_into(black_box(event_type), black_box(attributes), &mut out);
                matched += black_box(&out).len();
            }
            rounds.push(round.elapsed().as_secs_f64());
        }
        rounds.sort_by(f64::total_cmp);
        let per_second = |secs: f64| events.len() as f64 / secs;
        println!(
            "{n:>8}  {:>16.0}  {:>13.0}  {:>13.2}",
            per_second(rounds[rounds.len() / 2]),
            per_second(rounds[0]),
            matched as f64 / (rounds.len() * events.len()) as f64
        );
    }
}
