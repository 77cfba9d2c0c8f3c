//! `herald-bench --recover-events N`: admin's memory while a recover job
//! sends N deliveries of 16 KiB events again. A webhook whose URL answers
//! 500 becomes failing at its first delivery, and the others wait parked;
//! disabled by a call, its waiting deliveries are logged failed
//! (`webhook_disabled`). It is then pointed at a healthy URL, re-enabled,
//! and recovered from the start. Reports admin's peak resident memory
//! (VmHWM) before and after the job, and how long the job took.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::json;

use crate::load::Publisher;
use crate::receiver::Receiver;
use crate::stack::{SERVICES, Stack};

const TYPE: &str = "workflow.definition.updated";
const EVENT_BYTES: usize = 16 * 1024;

#[derive(Debug, Serialize)]
pub struct Report {
    pub events: u64,
    pub event_bytes: usize,
    pub admin_peak_mib_before: f64,
    pub admin_peak_mib_after: f64,
    pub recover_secs: f64,
    pub recovered: u64,
    pub job: serde_json::Value,
    pub passed: bool,
}

fn admin_peak(stack: &Stack) -> f64 {
    let i = SERVICES.iter().position(|s| *s == "admin").expect("admin");
    stack.peak_memory_mib()[i]
}

pub async fn run(
    stack: &Stack,
    receiver: &Receiver,
    publisher: &Publisher,
    js: &async_nats::jetstream::Context,
    phase: usize,
    events: u64,
) -> anyhow::Result<Report> {
    let since = herald_core::payload::rfc3339_ms((crate::load::now_us() / 1000) as i64 - 1_000);
    let (id, secret) = stack
        .create_webhook("recover-target", &receiver.url("/fail"), TYPE)
        .await?;
    receiver.add_secret(&id, &secret);
    eprintln!("recover: publishing {events} events of 16 KiB to a URL that answers 500");
    publisher
        .with_padding(EVENT_BYTES)
        .burst(phase, TYPE, events)
        .await;
    // Every delivery parked before the webhook is disabled.
    use herald_core::names;
    use herald_platform::metrics::consumer_idle;
    let deadline = Instant::now() + Duration::from_secs(900);
    while !(consumer_idle(js, names::EVENTS_STREAM, names::INGEST_CONSUMER).await
        && consumer_idle(js, names::ACCEPTED_STREAM, names::MATCHER_CONSUMER).await
        && consumer_idle(js, names::DELIVERIES_STREAM, names::DELIVERER_CONSUMER).await)
    {
        if Instant::now() > deadline {
            bail!("recover: the pipeline never caught up with {events} events");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, changed) = stack
        .call(
            "PATCH",
            &format!("{}/webhooks/{id}", stack.admin_url),
            Some(&json!({"enabled": false})),
        )
        .await?;
    if status != 200 {
        bail!("recover: disable answered {status}: {changed}");
    }
    eprintln!("recover: disabled; waiting for every delivery to be logged");
    let logs = format!("{}/webhooks/{id}/logs?limit=1", stack.admin_url);
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (_, page) = stack.call("GET", &logs, None).await?;
        let total = page["total"].as_u64().unwrap_or(0);
        if total >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!("recover: only {total} of {events} attempts logged");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, changed) = stack
        .call(
            "PATCH",
            &format!("{}/webhooks/{id}", stack.admin_url),
            Some(&json!({"url": receiver.url("/recovered"), "enabled": true})),
        )
        .await?;
    if status != 200 {
        bail!("recover: re-enable answered {status}: {changed}");
    }
    let before = admin_peak(stack);
    eprintln!("recover: admin peak {before:.1} MiB before the job; recovering");
    let (status, job) = stack
        .call(
            "POST",
            &format!("{}/webhooks/{id}/recover", stack.admin_url),
            Some(&json!({"since": since})),
        )
        .await?;
    if status != 202 {
        bail!("recover: HTTP {status}: {job}");
    }
    let job_url = format!(
        "{}/webhooks/{id}/jobs/{}",
        stack.admin_url,
        job["id"].as_str().unwrap_or_default()
    );
    let started = Instant::now();
    let mut state = job;
    while started.elapsed() < Duration::from_secs(1800) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (_, now) = stack.call("GET", &job_url, None).await?;
        state = now;
        eprintln!(
            "  {:.0}s: {} delivered, {} received, admin peak {:.1} MiB",
            started.elapsed().as_secs_f64(),
            state["delivered"],
            receiver.delivered(phase),
            admin_peak(stack)
        );
        if state["status"] != "running" {
            break;
        }
    }
    let recovered = receiver.delivered(phase);
    let after = admin_peak(stack);
    Ok(Report {
        events,
        event_bytes: EVENT_BYTES,
        admin_peak_mib_before: before,
        admin_peak_mib_after: after,
        recover_secs: started.elapsed().as_secs_f64(),
        recovered,
        passed: state["status"] == "done" && recovered >= events && after < 100.0,
        job: state,
    })
}
