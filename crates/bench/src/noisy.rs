//! `herald-bench --noisy-burst N` (`make bench-noisy`): one organization's
//! burst must not slow another's deliveries (issue 29's second mark, with
//! the services as the separate processes they are in production, not in
//! one test process). Organization `bench` sends 10 events a second to its
//! webhook, first alone for 10 s, then while organization `bench-noisy`
//! publishes `N` events at once to a webhook of its own on the same
//! receiver, until the burst is delivered. It reports the quiet
//! organization's publish-to-receipt p50/p99 alone and beside the burst,
//! and their ratio (the mark: within 10× of alone); it fails when
//! a delivery is missing or a signature is wrong.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::load::Publisher;
use crate::receiver::Receiver;
use crate::soak::percentile;
use crate::stack::Stack;

/// The noisy organization.
pub const NOISY_ORG: &str = "bench-noisy";
const EVENT_TYPE: &str = "workflow.completed";
/// The quiet organization's rate, events a second.
const RATE: f64 = 10.0;
const ALONE: Duration = Duration::from_secs(10);
/// The burst must be delivered within this.
const DEADLINE: Duration = Duration::from_secs(600);

/// One of the quiet organization's slowest deliveries beside the burst, and
/// where it waited (from the streams' stored times and the attempt's
/// `attempted_at_ms`; `None` where its record was not found).
#[derive(Debug, Serialize)]
pub struct Slowest {
    /// Seconds after the burst began.
    pub published_at_s: f64,
    pub total_ms: f64,
    /// Publish to stored in HERALD_EVENTS.
    pub to_stored_ms: Option<f64>,
    /// Stored to stored in HERALD_ACCEPTED (ingest).
    pub ingest_ms: Option<f64>,
    /// Accepted to the attempt's start (the matcher and the deliverer).
    pub accepted_to_attempt_ms: Option<f64>,
    /// Of which accepted to the delivery job's publish (the matcher), as a
    /// plain subscription on the job's subject saw it.
    pub matcher_ms: Option<f64>,
    /// The attempt's start to receipt.
    pub attempt_to_receipt_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub burst: u64,
    pub burst_published_s: f64,
    pub burst_delivered_s: f64,
    pub burst_delivered: u64,
    pub alone_events: u64,
    pub alone_p50_ms: f64,
    pub alone_p99_ms: f64,
    pub beside_events: u64,
    pub beside_delivered: u64,
    pub beside_p50_ms: f64,
    pub beside_p99_ms: f64,
    pub beside_max_ms: f64,
    /// Beside the burst's p99 over alone's.
    pub p99_ratio: f64,
    /// The burst's events ingest's main consumer read (stored before the
    /// diversion took effect, or after it ended), and when the first
    /// diverted one was stored, ms after the burst began.
    pub burst_undiverted: usize,
    pub diverted_from_ms: Option<f64>,
    /// The quiet organization's eight slowest deliveries beside the burst.
    pub slowest: Vec<Slowest>,
    pub passed: bool,
}

/// Runs it; phases `first_phase` (alone), `+ 1` (beside) and `+ 2` (the
/// burst) of the receiver.
pub async fn run(
    stack: &Stack,
    receiver: &Receiver,
    js: &async_nats::jetstream::Context,
    first_phase: usize,
    burst: u64,
) -> anyhow::Result<Report> {
    let quiet = quiet(stack, receiver, js, "noisy-quiet").await?;
    let (noisy_id, secret) = stack
        .create_webhook_in(
            NOISY_ORG,
            serde_json::json!({"name": "noisy-burst", "url": receiver.url("/noisy"),
                "event_types": [EVENT_TYPE]}),
        )
        .await?;
    receiver.add_secret(&noisy_id, &secret);
    let noisy = Publisher::new(js.clone(), 1024).in_org(NOISY_ORG);
    let (alone, beside, burst_phase) = (first_phase, first_phase + 1, first_phase + 2);
    let jobs = JobTap::start(js).await?;

    let alone_events = alone_phase(receiver, &quiet, alone, "noisy burst").await;

    eprintln!("noisy burst: {burst} events from {NOISY_ORG} beside {RATE}/s");
    let started = Instant::now();
    let started_us = crate::load::now_us();
    let burst_done = async {
        noisy.burst(burst_phase, EVENT_TYPE, burst).await;
        let published = started.elapsed();
        let deadline = started + DEADLINE;
        while receiver.delivered(burst_phase) < burst && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (published, started.elapsed())
    };
    // The quiet organization goes on, paced from the start, until the
    // burst is delivered.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let quiet_beside = async {
        let mut seq = 0u64;
        let every = Duration::from_secs_f64(1.0 / RATE);
        let from = tokio::time::Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep_until(from + every * seq as u32).await;
            quiet.publish(beside, EVENT_TYPE, seq).await;
            seq += 1;
        }
        quiet.drain().await;
        seq
    };
    let burst_done = async {
        let done = burst_done.await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        done
    };
    let ((published, delivered), beside_events) = tokio::join!(burst_done, quiet_beside);
    settle(receiver, beside, beside_events, Duration::from_secs(30)).await;

    let mut alone_seen = receiver.take(alone);
    let mut beside_seen = receiver.take(beside);
    let burst_seen = receiver.take(burst_phase);
    let slowest = where_waited(js, &slowest(&beside_seen), started_us, &jobs.seen()).await;
    let (burst_undiverted, diverted_from_ms) = diversion(js, started_us).await;
    alone_seen.latencies_us.sort_unstable();
    beside_seen.latencies_us.sort_unstable();
    let alone_p99 = percentile(&alone_seen.latencies_us, 0.99);
    let beside_p99 = percentile(&beside_seen.latencies_us, 0.99);
    let bad = alone_seen.bad_signatures + beside_seen.bad_signatures + burst_seen.bad_signatures;
    Ok(Report {
        burst,
        burst_published_s: published.as_secs_f64(),
        burst_delivered_s: delivered.as_secs_f64(),
        burst_delivered: burst_seen.delivered,
        alone_events,
        alone_p50_ms: percentile(&alone_seen.latencies_us, 0.5),
        alone_p99_ms: alone_p99,
        beside_events,
        beside_delivered: beside_seen.delivered,
        beside_p50_ms: percentile(&beside_seen.latencies_us, 0.5),
        beside_p99_ms: beside_p99,
        beside_max_ms: percentile(&beside_seen.latencies_us, 1.0),
        slowest,
        burst_undiverted,
        diverted_from_ms,
        p99_ratio: if alone_p99 > 0.0 {
            beside_p99 / alone_p99
        } else {
            0.0
        },
        passed: bad == 0
            && burst_seen.delivered == burst
            && alone_seen.delivered == alone_events
            && beside_seen.delivered == beside_events,
    })
}

/// `herald-bench --slow-org N`: issue 29's first mark as a measurement at
/// its full size. Organization `bench-slow` has [`SLOW_WEBHOOKS`] webhooks
/// whose receivers answer after 10 s (`/slow…` on the bench's receiver) and
/// publishes `n` events at once: `SLOW_WEBHOOKS × n` slow deliveries.
/// Organization `bench` sends 10 events a second alone for 10 s, then
/// beside them for [`SLOW_BESIDE`].
#[derive(Debug, Serialize)]
pub struct SlowReport {
    pub slow_webhooks: usize,
    pub slow_events: u64,
    /// Slow deliveries answered by the end of the beside phase.
    pub slow_answered: u64,
    pub alone_p50_ms: f64,
    pub alone_p99_ms: f64,
    pub beside_events: u64,
    pub beside_delivered: u64,
    pub beside_p50_ms: f64,
    pub beside_p99_ms: f64,
    pub beside_max_ms: f64,
    /// The quiet organization's eight slowest beside them.
    pub slowest: Vec<Slowest>,
    pub passed: bool,
}

/// The slow organization's webhooks (the 40).
pub const SLOW_WEBHOOKS: usize = 40;
/// How long the quiet organization goes on beside them.
const SLOW_BESIDE: Duration = Duration::from_secs(60);
/// The slow organization.
pub const SLOW_ORG: &str = "bench-slow";

/// Runs it; phases `first_phase` (alone) and `+ 1` (beside).
pub async fn slow(
    stack: &Stack,
    receiver: &Receiver,
    js: &async_nats::jetstream::Context,
    first_phase: usize,
    n: u64,
) -> anyhow::Result<SlowReport> {
    let quiet = quiet(stack, receiver, js, "slow-org-quiet").await?;
    for i in 0..SLOW_WEBHOOKS {
        // Within its timeout: each answer is a success that took 10 s.
        stack
            .create_webhook_in(
                SLOW_ORG,
                serde_json::json!({"name": format!("slow-{i}"),
                    "url": receiver.url(&format!("/slow/{i}")),
                    "event_types": [EVENT_TYPE], "timeout_ms": 30_000}),
            )
            .await?;
    }
    let slow = Publisher::new(js.clone(), 1024).in_org(SLOW_ORG);
    let (alone, beside) = (first_phase, first_phase + 1);
    let jobs = JobTap::start(js).await?;

    let alone_events = alone_phase(receiver, &quiet, alone, "slow organization").await;

    eprintln!(
        "slow organization: {n} events to {SLOW_WEBHOOKS} webhooks answering after 10 s, beside {RATE}/s for {SLOW_BESIDE:?}"
    );
    let started_us = crate::load::now_us();
    slow.burst(first_phase + 2, EVENT_TYPE, n).await;
    let beside_events = quiet.paced(beside, EVENT_TYPE, RATE, SLOW_BESIDE).await;
    settle(receiver, beside, beside_events, Duration::from_secs(30)).await;
    let slow_answered = receiver.slow_answered();

    let mut alone_seen = receiver.take(alone);
    let mut beside_seen = receiver.take(beside);
    let slowest = where_waited(js, &slowest(&beside_seen), started_us, &jobs.seen()).await;
    alone_seen.latencies_us.sort_unstable();
    beside_seen.latencies_us.sort_unstable();
    let bad = alone_seen.bad_signatures + beside_seen.bad_signatures;
    Ok(SlowReport {
        slowest,
        slow_webhooks: SLOW_WEBHOOKS,
        slow_events: n,
        slow_answered,
        alone_p50_ms: percentile(&alone_seen.latencies_us, 0.5),
        alone_p99_ms: percentile(&alone_seen.latencies_us, 0.99),
        beside_events,
        beside_delivered: beside_seen.delivered,
        beside_p50_ms: percentile(&beside_seen.latencies_us, 0.5),
        beside_p99_ms: percentile(&beside_seen.latencies_us, 0.99),
        beside_max_ms: percentile(&beside_seen.latencies_us, 1.0),
        passed: bad == 0
            && alone_seen.delivered == alone_events
            && beside_seen.delivered == beside_events
            && slow_answered > 0,
    })
}

/// The eight slowest of `phase` (sent at, unix µs; publish to receipt, µs).
fn slowest(phase: &crate::receiver::Phase) -> Vec<(u64, u32)> {
    let mut slow: Vec<(u64, u32)> = phase
        .sent_us
        .iter()
        .copied()
        .zip(phase.latencies_us.iter().copied())
        .collect();
    slow.sort_by_key(|(_, latency)| std::cmp::Reverse(*latency));
    slow.truncate(8);
    slow
}

/// Where each of `slow` (sent at, unix µs; publish to receipt, µs) waited:
/// the quiet organization's events as HERALD_EVENTS stored them (the
/// JSON as published, `data.ts_us` its send time), then HERALD_ACCEPTED
/// and HERALD_ATTEMPTS by event id.
async fn where_waited(
    js: &async_nats::jetstream::Context,
    slow: &[(u64, u32)],
    burst_us: u64,
    jobs: &HashMap<String, i128>,
) -> Vec<Slowest> {
    use herald_core::{names, proto};
    use prost::Message;
    let org = crate::stack::ORG;
    let mut by_sent: HashMap<u64, (String, i128)> = HashMap::new();
    // What cannot be read is left out.
    let read = |stream: &'static str, subject: String| async move {
        herald_test_support::stored(js, stream, &subject)
            .await
            .unwrap_or_default()
    };
    let events = read(
        names::EVENTS_STREAM,
        format!("herald.events.{org}.{EVENT_TYPE}"),
    );
    for (payload, at) in events.await {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        if let (Some(id), Some(sent)) = (json["id"].as_str(), json["data"]["ts_us"].as_u64()) {
            by_sent.insert(sent, (id.to_owned(), at));
        }
    }
    let mut accepted = HashMap::new();
    for (payload, at) in read(names::ACCEPTED_STREAM, names::accepted_subject(org)).await {
        if let Ok(event) = proto::Event::decode(payload) {
            accepted.insert(event.id, at);
        }
    }
    let mut attempted = HashMap::new();
    for (payload, _) in read(names::ATTEMPTS_STREAM, format!("herald.attempts.{org}.>")).await {
        if let Ok(attempt) = proto::AttemptResult::decode(payload) {
            attempted
                .entry(attempt.event_id)
                .or_insert(attempt.attempted_at_ms as i128 * 1_000_000);
        }
    }
    let ms = |from: i128, to: i128| (to - from) as f64 / 1e6;
    slow.iter()
        .map(|&(sent_us, latency_us)| {
            let sent = sent_us as i128 * 1_000;
            let received = sent + latency_us as i128 * 1_000;
            let found = by_sent.get(&sent_us);
            let events_at = found.map(|(_, at)| *at);
            let accepted_at = found.and_then(|(id, _)| accepted.get(id).copied());
            let attempt_at = found.and_then(|(id, _)| attempted.get(id).copied());
            let job_at = found.and_then(|(id, _)| jobs.get(id).copied());
            Slowest {
                published_at_s: (sent_us as f64 - burst_us as f64) / 1e6,
                total_ms: latency_us as f64 / 1000.0,
                to_stored_ms: events_at.map(|e| ms(sent, e)),
                ingest_ms: events_at.zip(accepted_at).map(|(e, a)| ms(e, a)),
                accepted_to_attempt_ms: accepted_at.zip(attempt_at).map(|(a, t)| ms(a, t)),
                matcher_ms: accepted_at.zip(job_at).map(|(a, j)| ms(a, j)),
                attempt_to_receipt_ms: attempt_at.map(|t| ms(t, received)),
            }
        })
        .collect()
}

/// How many of the burst's events were stored undiverted, and when the
/// first diverted one was stored (ms after `burst_us`).
async fn diversion(js: &async_nats::jetstream::Context, burst_us: u64) -> (usize, Option<f64>) {
    let read = |subject: String| async move {
        herald_test_support::stored(js, herald_core::names::EVENTS_STREAM, &subject)
            .await
            .unwrap_or_default()
    };
    let undiverted = read(format!("herald.events.{NOISY_ORG}.>")).await.len();
    let first = read(format!("herald.lane.{NOISY_ORG}.>"))
        .await
        .iter()
        .map(|(_, at)| *at)
        .min();
    let from = first.map(|at| (at - burst_us as i128 * 1_000) as f64 / 1e6);
    (undiverted, from)
}

/// When each of the quiet organization's delivery jobs was published, by
/// event id: HERALD_DELIVERIES is a work queue (a job is gone once
/// delivered), so a plain subscription on the jobs' subject times them as
/// the matcher publishes them.
struct JobTap {
    seen: std::sync::Arc<std::sync::Mutex<HashMap<String, i128>>>,
    task: tokio::task::JoinHandle<()>,
}

impl JobTap {
    async fn start(js: &async_nats::jetstream::Context) -> anyhow::Result<Self> {
        use futures::StreamExt;
        use herald_core::proto;
        use prost::Message;
        let client = js.client();
        let mut jobs = client
            .subscribe(format!("herald.deliveries.{}.>", crate::stack::ORG))
            .await?;
        // The subscription is in place once the server has it.
        client.flush().await?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = jobs.next().await {
                let at = crate::load::now_us() as i128 * 1_000;
                if let Ok(job) = proto::DeliveryJob::decode(message.payload)
                    && let Some(event) = job.event
                {
                    into.lock().unwrap().entry(event.id).or_insert(at);
                }
            }
        });
        Ok(Self { seen, task })
    }

    fn seen(&self) -> HashMap<String, i128> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for JobTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The quiet organization's webhook (`name`), and its publisher: a window
/// of its own, so its publishes never wait for the other's acks.
async fn quiet(
    stack: &Stack,
    receiver: &Receiver,
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<Publisher> {
    let (id, secret) = stack
        .create_webhook(name, &receiver.url("/quiet"), EVENT_TYPE)
        .await?;
    receiver.add_secret(&id, &secret);
    Ok(Publisher::new(js.clone(), 16))
}

/// The quiet organization alone, [`RATE`] for [`ALONE`], as `phase`; the
/// events it sent.
async fn alone_phase(receiver: &Receiver, quiet: &Publisher, phase: usize, mode: &str) -> u64 {
    eprintln!("{mode}: the quiet organization alone, {RATE}/s for {ALONE:?}");
    let sent = quiet.paced(phase, EVENT_TYPE, RATE, ALONE).await;
    settle(receiver, phase, sent, Duration::from_secs(10)).await;
    sent
}

/// Waits (at most `within`) until `phase` has `n` deliveries.
async fn settle(receiver: &Receiver, phase: usize, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while receiver.delivered(phase) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The report as lines, as docs/benchmarks.md shows it.
pub fn table(r: &Report) -> String {
    let part = |p: Option<f64>| p.map_or("?".to_owned(), |p| format!("{p:.1}"));
    format!(
        "  burst of {}: published in {:.2} s, delivered in {:.1} s ({} delivered)\n  \
         quiet organization alone: {} events, p50 {:.1} ms, p99 {:.1} ms\n  \
         beside the burst: {}/{} delivered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (p99 {:.1}x alone)\n  burst read by the main consumer: {} (diverted from +{} ms)\n  \
         slowest beside the burst:{}\n",
        r.burst,
        r.burst_published_s,
        r.burst_delivered_s,
        r.burst_delivered,
        r.alone_events,
        r.alone_p50_ms,
        r.alone_p99_ms,
        r.beside_delivered,
        r.beside_events,
        r.beside_p50_ms,
        r.beside_p99_ms,
        r.beside_max_ms,
        r.p99_ratio,
        r.burst_undiverted,
        part(r.diverted_from_ms),
        slowest_lines(&r.slowest)
    )
}

/// The slowest deliveries and where they waited, a line each.
pub fn slowest_lines(slowest: &[Slowest]) -> String {
    let part = |p: Option<f64>| p.map_or("?".to_owned(), |p| format!("{p:.1}"));
    slowest
        .iter()
        .map(|s| {
            format!(
                "\n    {:.1} ms, published at +{:.2} s: to stored {}, ingest {}, \
                 accepted to attempt {} (matcher {}), attempt to receipt {}",
                s.total_ms,
                s.published_at_s,
                part(s.to_stored_ms),
                part(s.ingest_ms),
                part(s.accepted_to_attempt_ms),
                part(s.matcher_ms),
                part(s.attempt_to_receipt_ms)
            )
        })
        .collect::<Vec<_>>()
        .concat()
}
