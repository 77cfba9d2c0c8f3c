//! `herald-bench --replay-events N`: a replay of N events must not starve
//! live traffic. N events are published before any webhook wants them; then
//! a live webhook gets a steady 500 events/s while a second webhook
//! replays the N. The live webhook's publish-to-receipt latency is reported
//! for a baseline window before the replay and for each window while it
//! runs, beside the replay's own progress.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::json;

use crate::load::Publisher;
use crate::receiver::Receiver;
use crate::soak::percentile;
use crate::stack::Stack;

const LIVE_TYPE: &str = "workflow.completed";
// Types none of the throughput phases' webhooks take (they exist in every run).
const REPLAY_TYPE: &str = "workflow.definition.updated";
const LIVE_RATE: f64 = 500.0;
const WINDOW: Duration = Duration::from_secs(5);
/// The most windows the replay may take before the run gives up.
const MAX_WINDOWS: usize = 120;

#[derive(Debug, Serialize)]
pub struct Window {
    /// `baseline`, or the window's end in seconds since the replay began.
    pub label: String,
    pub live_delivered: u64,
    pub live_expected: u64,
    pub live_p50_ms: f64,
    pub live_p99_ms: f64,
    /// Replayed deliveries received by the end of the window.
    pub replayed: u64,
}

impl Window {
    /// Its line in [`table`].
    fn cells(&self) -> [String; 5] {
        [
            self.label.clone(),
            format!("{}/{}", self.live_delivered, self.live_expected),
            format!("{:.1}", self.live_p50_ms),
            format!("{:.1}", self.live_p99_ms),
            self.replayed.to_string(),
        ]
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub events: u64,
    pub windows: Vec<Window>,
    pub replay_secs: f64,
    pub replay_per_sec: f64,
    pub job: serde_json::Value,
    pub passed: bool,
}

/// Runs it; phases from `first_phase` on are this run's.
pub async fn run(
    stack: &Stack,
    receiver: &Receiver,
    publisher: &Publisher,
    js: &async_nats::jetstream::Context,
    first_phase: usize,
    events: u64,
) -> anyhow::Result<Report> {
    let replay_phase = first_phase;
    let since = herald_core::payload::rfc3339_ms((crate::load::now_us() / 1000) as i64 - 1_000);
    eprintln!("replay: publishing {events} events nobody wants yet");
    publisher.burst(replay_phase, REPLAY_TYPE, events).await;
    // Matched (to nothing) before the webhooks exist: wait for the matcher.
    let deadline = Instant::now() + Duration::from_secs(300);
    use herald_core::names;
    use herald_platform::metrics::consumer_idle;
    while !(consumer_idle(js, names::EVENTS_STREAM, names::INGEST_CONSUMER).await
        && consumer_idle(js, names::ACCEPTED_STREAM, names::MATCHER_CONSUMER).await)
    {
        if Instant::now() > deadline {
            bail!("replay: the matcher never caught up with {events} events");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (live, secret) = stack
        .create_webhook("replay-live", &receiver.url("/live-hook"), LIVE_TYPE)
        .await?;
    receiver.add_secret(&live, &secret);
    let (target, secret) = stack
        .create_webhook("replay-target", &receiver.url("/replayed"), REPLAY_TYPE)
        .await?;
    receiver.add_secret(&target, &secret);

    let mut report = Report {
        events,
        windows: Vec::new(),
        replay_secs: 0.0,
        replay_per_sec: 0.0,
        job: serde_json::Value::Null,
        passed: true,
    };
    let mut phase = first_phase + 1;
    let window = |label: String, phase: usize, replayed: u64| {
        let mut seen = receiver.take(phase);
        seen.latencies_us.sort_unstable();
        let expected = (LIVE_RATE * WINDOW.as_secs_f64()) as u64;
        Window {
            label,
            live_delivered: seen.delivered,
            live_expected: expected,
            live_p50_ms: percentile(&seen.latencies_us, 0.5),
            live_p99_ms: percentile(&seen.latencies_us, 0.99),
            replayed,
        }
    };

    // Baseline: live traffic alone.
    publisher.paced(phase, LIVE_TYPE, LIVE_RATE, WINDOW).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.windows.push(window("baseline".into(), phase, 0));
    phase += 1;

    let (status, job) = stack
        .call(
            "POST",
            &format!("{}/webhooks/{target}/replay", stack.admin_url),
            Some(&json!({"since": since})),
        )
        .await?;
    if status != 202 {
        bail!("replay: HTTP {status}: {job}");
    }
    let job_url = format!(
        "{}/webhooks/{target}/jobs/{}",
        stack.admin_url,
        job["id"].as_str().unwrap_or_default()
    );
    let started = Instant::now();
    let mut done = false;
    for _ in 0..MAX_WINDOWS {
        publisher.paced(phase, LIVE_TYPE, LIVE_RATE, WINDOW).await;
        let replayed = receiver.delivered(replay_phase);
        let label = format!("{:.0}s", started.elapsed().as_secs_f64());
        eprintln!("  replay {label}: {replayed}/{events} replayed");
        let (_, state) = stack.call("GET", &job_url, None).await?;
        report.job = state.clone();
        tokio::time::sleep(Duration::from_millis(500)).await;
        report.windows.push(window(label, phase, replayed));
        phase += 1;
        if replayed >= events || state["status"] != "running" {
            done = true;
            break;
        }
    }
    let replayed = receiver.delivered(replay_phase);
    report.replay_secs = started.elapsed().as_secs_f64();
    report.replay_per_sec = replayed as f64 / report.replay_secs;
    report.passed = done
        && replayed == events
        && report
            .windows
            .iter()
            .all(|w| w.live_delivered == w.live_expected);
    Ok(report)
}

/// The windows as docs/benchmarks.md shows them.
pub fn table(report: &Report) -> String {
    let columns = [
        "window",
        "live delivered",
        "live p50 ms",
        "live p99 ms",
        "replayed so far",
    ];
    let mut out = crate::markdown_table(columns, report.windows.iter().map(Window::cells));
    out.push_str(&format!(
        "\nreplay: {} events in {:.1} s ({:.0}/s); job {}\n",
        report.events, report.replay_secs, report.replay_per_sec, report.job
    ));
    out
}
