//! `--ordered-executions N`: ordered delivery per key beside unordered.
//!
//! Two webhooks of their own organization ([`load::ORDERED_ORG`], so no
//! other benchmark webhook gets these events) subscribe to the five event
//! types of a workflow execution ([`load::STEPS`]): one unordered, one
//! with `ordering: {key: "execution"}`; a filter on the `workflow`
//! attribute gives each its own events. The phases:
//!
//! 1. `unordered executions`: N executions × 5 events to the unordered
//!    webhook, interleaved (step 0 of every execution, then step 1, …), as
//!    fast as the publisher goes;
//! 2. `ordered executions`: the same to the ordered webhook, N keys;
//! 3. `ordered@R/s`: `--ordered-rate` events/s (100: under what the
//!    ordered webhook delivered on a 2-core machine, 180–370/s, so the
//!    latency is not a backlog's) for `--latency-secs` to the ordered
//!    webhook, executions interleaved 20 at a time (an execution's five
//!    events are published within a second at 100/s);
//! 4. `ordered@R/s, slow key`: the same with the receiver answering one
//!    key's requests (the phase's first execution) after 2 s each, so its
//!    five deliveries queue behind each other; its latencies are reported
//!    apart, and the phase's latency is the other keys'.
//!
//! The receiver checks every execution's deliveries: one arriving after a
//! later event of its execution is out of order, and a `webhook-sequence`
//! that is not one more than its key's previous (1 for the first), or a
//! `webhook-ordering-key` that is not the execution, is a sequence error.
//! Both must be 0 for the ordered webhook (the run fails otherwise); the
//! unordered webhook's out-of-order count is reported, not judged.

use serde::Serialize;

use crate::load::{self, ORDERED_ORG, STEPS};
use crate::receiver::{self, Receiver};
use crate::stack::Stack;
use crate::{Bench, Drive, PhaseReport, round1, round3};

/// Executions interleaved at a time in the paced phases.
const PACED_GROUP: u64 = 20;

/// Creates the unordered and the ordered webhook and gives the receiver
/// their secrets.
pub async fn create_webhooks(stack: &Stack, receiver: &Receiver) -> anyhow::Result<()> {
    let mut types: Vec<&str> = STEPS.to_vec();
    types.sort_unstable();
    types.dedup();
    for (workflow, ordering) in [
        ("unordered", serde_json::Value::Null),
        ("ordered", serde_json::json!({"key": "execution"})),
    ] {
        let mut body = serde_json::json!({
            "name": format!("bench-{workflow}"),
            "url": receiver.url(&format!("/{workflow}")),
            "event_types": types,
            "filters": {"workflow": [workflow]},
        });
        if !ordering.is_null() {
            body["ordering"] = ordering;
        }
        let (id, secret) = stack.create_webhook_in(ORDERED_ORG, body).await?;
        receiver.add_secret(&id, &secret);
    }
    Ok(())
}

/// What the receiver saw of a phase's executions.
#[derive(Debug, Default, Serialize)]
pub struct OrderingReport {
    /// Whether the webhook was the ordered one.
    pub ordered: bool,
    /// Executions (keys) that got at least one delivery.
    pub keys: u64,
    /// Of those, how many got fewer than 5.
    pub keys_incomplete: u64,
    /// Deliveries that arrived after a later event of their execution.
    pub out_of_order: u64,
    /// Of the ordered webhook: deliveries whose `webhook-sequence` was not
    /// one more than their key's previous one (1 for the first), whose
    /// `webhook-ordering-key` was not their execution, or that had no
    /// `webhook-sequence` at all.
    pub sequence_errors: u64,
    /// Deliveries that carried `webhook-sequence`.
    pub sequenced: u64,
    /// The key answered after `slow_key_answer_ms`, and its deliveries'
    /// publish-to-receipt in arrival order (not in the phase's latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_key_answer_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slow_key_latencies_ms: Vec<f64>,
}

impl OrderingReport {
    pub fn of(ordered: bool, seen: &receiver::Phase, slow_key: Option<String>) -> Self {
        let received: u64 = seen.keys.values().map(|k| u64::from(k.received)).sum();
        let slow = !seen.slow_key_latencies_us.is_empty();
        Self {
            ordered,
            keys: seen.keys.len() as u64,
            keys_incomplete: seen
                .keys
                .values()
                .filter(|k| (k.received as usize) < STEPS.len())
                .count() as u64,
            out_of_order: seen.out_of_order,
            sequence_errors: if ordered {
                seen.sequence_errors + received.saturating_sub(seen.sequenced)
            } else {
                seen.sequence_errors
            },
            sequenced: seen.sequenced,
            slow_key: slow_key.filter(|_| slow),
            slow_key_answer_ms: slow.then(|| receiver::SLOW_KEY_ANSWER.as_millis() as u64),
            slow_key_latencies_ms: seen
                .slow_key_latencies_us
                .iter()
                .map(|us| round1(f64::from(*us) / 1000.0))
                .collect(),
        }
    }
}

/// The four phases, in order; `n` executions in each of the first two.
pub async fn phases(bench: &mut Bench, n: u64) -> anyhow::Result<Vec<PhaseReport>> {
    let (rate, secs) = (bench.args.ordered_rate, bench.args.latency_secs);
    let events = n * STEPS.len() as u64;
    let burst = |workflow, ordered| Drive::Executions {
        workflow,
        ordered,
        n,
        group: n,
        rate: None,
    };
    let mut phases = Vec::new();
    eprintln!("unordered executions: {n} executions x 5 events ({events}), interleaved");
    phases.push(
        bench
            .run("unordered executions", 1, burst("unordered", false))
            .await?,
    );
    eprintln!("ordered executions: {n} executions x 5 events ({events}), one key each");
    phases.push(
        bench
            .run("ordered executions", 1, burst("ordered", true))
            .await?,
    );
    let paced_n = ((rate * secs as f64) / STEPS.len() as f64).round().max(1.0) as u64;
    let paced = || Drive::Executions {
        workflow: "ordered",
        ordered: true,
        n: paced_n,
        group: PACED_GROUP,
        rate: Some(rate),
    };
    eprintln!("ordered latency: {rate} events/s for {secs}s, {paced_n} executions");
    phases.push(bench.run(&format!("ordered@{rate}/s"), 1, paced()).await?);
    let slow = load::execution(bench.phase, 0);
    eprintln!(
        "ordered latency, slow key: the same, {slow} answered after {:?}",
        receiver::SLOW_KEY_ANSWER
    );
    bench.receiver.set_slow_key(Some(slow));
    let slow_phase = bench
        .run(&format!("ordered@{rate}/s, slow key"), 1, paced())
        .await;
    bench.receiver.set_slow_key(None);
    phases.push(slow_phase?);
    Ok(phases)
}

/// One webhook's burst of the executions.
#[derive(Debug, Default, Serialize)]
pub struct Burst {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The services' CPU ms per delivery, and every process's (NATS and
    /// Redis too).
    pub cpu_ms_per_delivery: f64,
    pub all_cpu_ms_per_delivery: f64,
}

impl Burst {
    fn of(p: &PhaseReport) -> Self {
        Self {
            per_s: p.deliveries_per_s.round(),
            p50_ms: p.latency.p50_ms,
            p99_ms: p.latency.p99_ms,
            cpu_ms_per_delivery: p.cpu_ms_per_delivery,
            all_cpu_ms_per_delivery: p.all_cpu_ms_per_delivery,
        }
    }
}

/// Ordered beside unordered, from [`phases`]' reports.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub executions: u64,
    pub unordered: Burst,
    pub ordered: Burst,
    /// ordered.per_s / unordered.per_s.
    pub ordered_share: f64,
    /// Of the ordered phases, all four: must be 0.
    pub out_of_order: u64,
    pub sequence_errors: u64,
    /// Of the unordered webhook, for comparison.
    pub unordered_out_of_order: u64,
    /// The paced phases: the rate, the p50/p99 without a slow key, the
    /// other keys' p50/p99 beside the slow key, and the slow key's.
    pub paced_rate: f64,
    pub paced_p50_ms: f64,
    pub paced_p99_ms: f64,
    pub beside_slow_key_p50_ms: f64,
    pub beside_slow_key_p99_ms: f64,
    pub slow_key_answer_ms: u64,
    pub slow_key_latencies_ms: Vec<f64>,
}

pub fn summary(executions: u64, phases: &[PhaseReport]) -> Summary {
    let find = |name: &str| phases.iter().find(|p| p.name == name);
    let paced: Vec<&PhaseReport> = phases
        .iter()
        .filter(|p| p.name.starts_with("ordered@"))
        .collect();
    let mut s = Summary {
        executions,
        ..Default::default()
    };
    if let Some(u) = find("unordered executions") {
        s.unordered = Burst::of(u);
        s.unordered_out_of_order = u.ordering.as_ref().map_or(0, |o| o.out_of_order);
    }
    if let Some(o) = find("ordered executions") {
        s.ordered = Burst::of(o);
    }
    if s.unordered.per_s > 0.0 {
        s.ordered_share = round3(s.ordered.per_s / s.unordered.per_s);
    }
    for p in phases {
        if let Some(o) = p.ordering.as_ref().filter(|o| o.ordered) {
            s.out_of_order += o.out_of_order;
            s.sequence_errors += o.sequence_errors;
        }
    }
    if let [without, with, ..] = paced[..] {
        s.paced_rate = without.offered_rate.unwrap_or(0.0);
        s.paced_p50_ms = without.latency.p50_ms;
        s.paced_p99_ms = without.latency.p99_ms;
        s.beside_slow_key_p50_ms = with.latency.p50_ms;
        s.beside_slow_key_p99_ms = with.latency.p99_ms;
        if let Some(o) = &with.ordering {
            s.slow_key_answer_ms = o.slow_key_answer_ms.unwrap_or(0);
            s.slow_key_latencies_ms = o.slow_key_latencies_ms.clone();
        }
    }
    s
}

/// The `ordered:` summary line.
pub fn line(s: &Summary) -> String {
    format!(
        "ordered: {} executions x 5; unordered {}/s p50 {} ms p99 {} ms {} cpu ms; ordered {}/s ({:.0}%) p50 {} ms p99 {} ms {} cpu ms; {} out of order, {} sequence errors; at {}/s p99 {} ms, beside a {} ms key {} ms, the slow key's {:?} ms",
        s.executions,
        s.unordered.per_s,
        round1(s.unordered.p50_ms),
        round1(s.unordered.p99_ms),
        s.unordered.cpu_ms_per_delivery,
        s.ordered.per_s,
        s.ordered_share * 100.0,
        round1(s.ordered.p50_ms),
        round1(s.ordered.p99_ms),
        s.ordered.cpu_ms_per_delivery,
        s.out_of_order,
        s.sequence_errors,
        s.paced_rate,
        round1(s.paced_p99_ms),
        s.slow_key_answer_ms,
        round1(s.beside_slow_key_p99_ms),
        s.slow_key_latencies_ms,
    )
}
