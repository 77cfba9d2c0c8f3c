//! `herald-bench --soak-minutes N` (`make soak`): one slow customer must not
//! slow the others, however long it lasts. A webhook whose URL answers after
//! 10 s gets 10 events a second beside a healthy webhook getting the same
//! events, for N minutes; the healthy webhook's publish-to-receipt p50/p99
//! is reported per minute, and the run fails when a healthy delivery is
//! missing or a minute's p99 exceeds `--soak-p99-ms` (1000 ms: the baseline
//! is a few milliseconds, the regression it guards against was 13–23 s).

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::load::Publisher;
use crate::receiver::Receiver;
use crate::stack::Stack;

const SOAK_TYPE: &str = "workflow.completed";
const RATE: f64 = 10.0;

#[derive(Debug, Serialize)]
pub struct Minute {
    pub minute: usize,
    pub delivered: u64,
    pub expected: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Minute {
    /// Its line in [`table`].
    fn cells(&self) -> [String; 5] {
        [
            self.minute.to_string(),
            format!("{}/{}", self.delivered, self.expected),
            format!("{:.1}", self.p50_ms),
            format!("{:.1}", self.p99_ms),
            format!("{:.1}", self.max_ms),
        ]
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub minutes: Vec<Minute>,
    pub slow_answered: u64,
    pub slow_offered: u64,
    pub passed: bool,
}

/// The `q` quantile of sorted microseconds, in milliseconds.
pub(crate) fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs the soak; `first_phase` is the receiver phase the first minute uses.
pub async fn run(
    stack: &Stack,
    receiver: &Receiver,
    publisher: &Publisher,
    first_phase: usize,
    minutes: usize,
    p99_limit_ms: f64,
) -> anyhow::Result<Report> {
    let (healthy, secret) = stack
        .create_webhook("soak-healthy", &receiver.url("/healthy"), SOAK_TYPE)
        .await?;
    receiver.add_secret(&healthy, &secret);
    // The longest timeout a webhook may have, so the slow answer is a
    // success that takes 10 s, not a timeout.
    stack
        .create_webhook_with(serde_json::json!({
            "name": "soak-slow", "url": receiver.url("/slow"),
            "event_types": [SOAK_TYPE], "timeout_ms": 30_000,
        }))
        .await?;
    let per_minute = (RATE * 60.0) as u64;
    let started = Instant::now();
    for m in 0..minutes {
        publisher
            .paced(first_phase + m, SOAK_TYPE, RATE, Duration::from_secs(60))
            .await;
        let delivered = receiver.delivered(first_phase + m);
        eprintln!(
            "  soak minute {}: healthy {delivered}/{per_minute} so far, slow answered {} ({:.0}s)",
            m + 1,
            receiver.slow_answered(),
            started.elapsed().as_secs_f64()
        );
    }
    // The last minute's stragglers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.delivered(first_phase + minutes - 1) < per_minute && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut report = Report {
        minutes: Vec::new(),
        slow_answered: receiver.slow_answered(),
        slow_offered: per_minute * minutes as u64,
        passed: true,
    };
    for m in 0..minutes {
        let mut seen = receiver.take(first_phase + m);
        seen.latencies_us.sort_unstable();
        let minute = Minute {
            minute: m + 1,
            delivered: seen.delivered,
            expected: per_minute,
            p50_ms: percentile(&seen.latencies_us, 0.50),
            p99_ms: percentile(&seen.latencies_us, 0.99),
            max_ms: percentile(&seen.latencies_us, 1.0),
        };
        if minute.delivered < minute.expected
            || minute.p99_ms > p99_limit_ms
            || seen.bad_signatures > 0
        {
            report.passed = false;
        }
        report.minutes.push(minute);
    }
    if report.minutes.is_empty() {
        bail!("no minutes soaked");
    }
    Ok(report)
}

/// The per-minute table, as docs/benchmarks.md shows it.
pub fn table(report: &Report) -> String {
    let columns = ["minute", "healthy delivered", "p50 ms", "p99 ms", "max ms"];
    let mut out = crate::markdown_table(columns, report.minutes.iter().map(Minute::cells));
    out.push_str(&format!(
        "\nslow webhook: {} of {} offered deliveries answered (10 s each)\n",
        report.slow_answered, report.slow_offered
    ));
    out
}
