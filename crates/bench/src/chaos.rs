//! `herald-bench --chaos` (`make chaos`): faults under a steady load.
//!
//! The five services run as processes from the release binaries, two
//! replicas of each worker and one admin, on a three-node NATS cluster with
//! R3 streams and one Redis. A paced load (`--rate`, 500 events/s by
//! default) goes to one webhook at the benchmark's receiver, and one fault
//! is injected per phase, in turn: `kill -9` of each service replica
//! (started again after `--chaos-down-secs`), `kill -9` of the NATS node
//! leading `HERALD_DELIVERIES` and then of another node (each started again
//! after 10 s), and Redis killed for 10 s (back empty). A phase without a
//! fault comes first: its p99 is the baseline.
//!
//! Per fault it reports what was lost (acknowledged by JetStream, never
//! delivered), duplicated (delivered twice), p50/p99 of deliveries
//! published before, during and after the fault, and how long after the
//! fault latency came back to the baseline: the start of the first
//! one-second slice (by publish time) from which every later slice's p99
//! is under `max(2 × baseline p99, baseline p99 + 50 ms)`. The producer
//! publishes each event until it is acknowledged (same `Nats-Msg-Id`), and
//! latency counts from its first try, so a stalled publish shows.
//!
//! It writes `<target>/bench/chaos.json`, prints the table
//! docs/benchmarks.md shows, and fails when an event is lost. Every loop is
//! bounded: the run stops by itself (about six minutes at the defaults).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use herald_core::names;
use herald_test_support::NatsCluster;
use serde::Serialize;

use crate::load::{Publisher, now_us};
use crate::receiver::Receiver;
use crate::stack::{Backing, CONSUMERS, Stack};

const EVENT_TYPE: &str = "workflow.step.completed";

/// How the suite runs.
pub struct Settings {
    pub rate: f64,
    /// Load before the fault.
    pub before: Duration,
    /// How long a killed service replica stays down.
    pub service_down: Duration,
    /// How long a NATS node or Redis stays down.
    pub server_down: Duration,
    /// Load after the fault is healed.
    pub after: Duration,
    /// Give up waiting for the last deliveries after this long without one.
    pub stall: Duration,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    None,
    /// `kill -9` of `stack.services[i]`.
    Service(usize),
    /// `kill -9` of the node leading `HERALD_DELIVERIES`.
    NatsStreamLeader,
    /// `kill -9` of a node that does not lead `HERALD_DELIVERIES`.
    NatsOtherNode,
    Redis,
}

#[derive(Debug, Default, Serialize)]
pub struct Window {
    pub deliveries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct FaultReport {
    pub fault: String,
    /// What the fault hit, e.g. the NATS node's name.
    pub target: String,
    pub published: u64,
    /// Publishes tried again before their acknowledgement.
    pub publish_retries: u64,
    /// Events the producer gave up on (never acknowledged: not Herald's).
    pub publish_failures: u64,
    pub delivered: u64,
    /// Acknowledged by JetStream and never delivered.
    pub lost: u64,
    pub duplicates: u64,
    pub bad_signatures: u64,
    pub before: Window,
    pub during: Window,
    pub after: Window,
    /// Seconds from the fault until latency stayed at the baseline; `None`
    /// when it never did within the phase.
    pub recovered_s: Option<f64>,
    /// p99 (ms) of each second of the phase, by publish time.
    pub p99_by_second_ms: Vec<f64>,
    /// Seconds (from the phase's start) the fault began and was healed.
    pub fault_at_s: f64,
    pub healed_at_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rate: f64,
    pub baseline_p50_ms: f64,
    pub baseline_p99_ms: f64,
    /// The p99 a second's slice must stay under to count as recovered.
    pub recovered_below_ms: f64,
    pub faults: Vec<FaultReport>,
    pub passed: bool,
}

pub struct Chaos<'a> {
    pub settings: Settings,
    pub cluster: &'a mut NatsCluster,
    pub backing: &'a mut Backing,
    pub stack: &'a mut Stack,
    pub receiver: &'a Receiver,
    pub publisher: &'a Publisher,
    pub js: async_nats::jetstream::Context,
}

fn window(mut us: Vec<u32>) -> Window {
    if us.is_empty() {
        return Window::default();
    }
    us.sort_unstable();
    let at = |p: f64| {
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        us[rank - 1] as f64 / 1000.0
    };
    Window {
        deliveries: us.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// The start (seconds after the fault) of the first slice from which every
/// slice is under `limit_ms`; slices before the fault are ignored.
fn recovered_after(p99_by_second: &[f64], fault_at_s: f64, limit_ms: f64) -> Option<f64> {
    let first = fault_at_s.floor() as usize;
    let slices = p99_by_second.get(first..)?;
    let bad = slices.iter().rposition(|p99| *p99 > limit_ms);
    match bad {
        None => Some(0.0),
        Some(i) if i + 1 < slices.len() => Some(((first + i + 1) as f64 - fault_at_s).max(0.0)),
        Some(_) => None,
    }
}

impl Chaos<'_> {
    pub async fn run(&mut self) -> anyhow::Result<Report> {
        let mut faults = vec![Fault::None];
        faults.extend((0..self.stack.services.len()).map(Fault::Service));
        faults.extend([Fault::NatsStreamLeader, Fault::NatsOtherNode, Fault::Redis]);
        let mut reports: Vec<FaultReport> = Vec::new();
        let mut limit_ms = f64::INFINITY;
        for (phase, fault) in faults.into_iter().enumerate() {
            let mut report = self.phase(phase, fault, limit_ms).await?;
            if matches!(fault, Fault::None) {
                limit_ms = (2.0 * report.before.p99_ms).max(report.before.p99_ms + 50.0);
                report.recovered_s = Some(0.0);
            }
            eprintln!(
                "  {} {}: lost {}, duplicates {}, p99 before {:.1} ms, during {:.1} ms, after {:.1} ms, recovered {}",
                report.fault,
                report.target,
                report.lost,
                report.duplicates,
                report.before.p99_ms,
                report.during.p99_ms,
                report.after.p99_ms,
                report
                    .recovered_s
                    .map_or("never".to_owned(), |s| format!("after {s:.0} s")),
            );
            reports.push(report);
        }
        let baseline = &reports[0].before;
        Ok(Report {
            rate: self.settings.rate,
            baseline_p50_ms: baseline.p50_ms,
            baseline_p99_ms: baseline.p99_ms,
            recovered_below_ms: limit_ms,
            passed: reports
                .iter()
                .all(|r| r.lost == 0 && r.bad_signatures == 0 && r.publish_failures == 0),
            faults: reports,
        })
    }

    async fn phase(
        &mut self,
        phase: usize,
        fault: Fault,
        limit_ms: f64,
    ) -> anyhow::Result<FaultReport> {
        let s = &self.settings;
        let down = match fault {
            Fault::None => Duration::ZERO,
            Fault::Service(_) => s.service_down,
            _ => s.server_down,
        };
        let total = s.before + down + s.after;
        let (rate, before) = (s.rate, s.before);
        let retries = Arc::new(AtomicU64::new(0));
        let errors_before = self.publisher.errors.load(Ordering::Relaxed);
        let started_us = now_us();
        let started = Instant::now();
        let load = {
            let (publisher, retries) = (self.publisher.clone(), retries.clone());
            tokio::spawn(async move {
                let n = (rate * total.as_secs_f64()).round() as u64;
                let start = tokio::time::Instant::now();
                for seq in 0..n {
                    let due = start + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due).await;
                    publisher
                        .publish_until_acked(
                            phase,
                            EVENT_TYPE,
                            seq,
                            Duration::from_secs(60),
                            retries.clone(),
                        )
                        .await;
                }
                publisher.drain().await;
                n
            })
        };

        tokio::time::sleep(before).await;
        let fault_at = started.elapsed();
        let target = self.inject(fault).await?;
        tokio::time::sleep(down).await;
        let healed_at = started.elapsed();
        self.heal(fault).await?;
        let published = load.await.context("load task")?;

        // Wait for the stragglers (redeliveries after an ack wait).
        let mut last = (self.receiver.delivered(phase), Instant::now());
        while self.receiver.delivered(phase) < published && last.1.elapsed() < self.settings.stall {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.receiver.delivered(phase);
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        // A late duplicate (a job redelivered after its ack wait) still
        // counts; the consumers catching up keeps the next phase clean.
        self.settle().await;
        let seen = self.receiver.take(phase);

        let fault_at_s = fault_at.as_secs_f64();
        let healed_at_s = healed_at.as_secs_f64();
        let (mut b, mut d, mut a) = (Vec::new(), Vec::new(), Vec::new());
        let seconds = total.as_secs() as usize + 1;
        let mut by_second: Vec<Vec<u32>> = vec![Vec::new(); seconds];
        for (latency, sent) in seen.latencies_us.iter().zip(&seen.sent_us) {
            let at = sent.saturating_sub(started_us) as f64 / 1e6;
            if at < fault_at_s {
                b.push(*latency);
            } else if at < healed_at_s {
                d.push(*latency);
            } else {
                a.push(*latency);
            }
            by_second[(at as usize).min(seconds - 1)].push(*latency);
        }
        let p99_by_second_ms: Vec<f64> = by_second
            .into_iter()
            .map(|us| (window(us).p99_ms * 10.0).round() / 10.0)
            .collect();
        let publish_failures = self.publisher.errors.load(Ordering::Relaxed) - errors_before;
        let acknowledged = published - publish_failures;
        Ok(FaultReport {
            fault: match fault {
                Fault::None => "none (baseline)".into(),
                Fault::Service(i) => format!("kill -9 {}", self.stack.services[i].label()),
                Fault::NatsStreamLeader => "kill -9 NATS node leading HERALD_DELIVERIES".into(),
                Fault::NatsOtherNode => "kill -9 another NATS node".into(),
                Fault::Redis => "Redis down".into(),
            },
            target,
            published,
            publish_retries: retries.load(Ordering::Relaxed),
            publish_failures,
            delivered: seen.delivered,
            lost: acknowledged.saturating_sub(seen.delivered),
            duplicates: seen.duplicates,
            bad_signatures: seen.bad_signatures,
            before: window(b),
            during: window(d),
            after: window(a),
            recovered_s: recovered_after(&p99_by_second_ms, fault_at_s, limit_ms),
            p99_by_second_ms,
            fault_at_s: (fault_at_s * 10.0).round() / 10.0,
            healed_at_s: (healed_at_s * 10.0).round() / 10.0,
        })
    }

    /// Carries out `fault`; answers what it hit.
    async fn inject(&mut self, fault: Fault) -> anyhow::Result<String> {
        Ok(match fault {
            Fault::None => String::new(),
            Fault::Service(i) => {
                self.stack.services[i].kill();
                format!("pid {}", self.stack.services[i].pid())
            }
            Fault::NatsStreamLeader | Fault::NatsOtherNode => {
                let leader = self
                    .cluster
                    .stream_leader(names::DELIVERIES_STREAM)
                    .await
                    .context("no leader for HERALD_DELIVERIES")?;
                let node = if matches!(fault, Fault::NatsStreamLeader) {
                    leader
                } else {
                    // The other node that leads the most of Herald's
                    // streams and consumers: one leading nothing (the node
                    // just restarted, say) would test nothing.
                    let mut best = (0, None);
                    for i in (0..self.cluster.len()).filter(|i| *i != leader) {
                        let n = self.leaderships(i).await.len();
                        if best.1.is_none() || n > best.0 {
                            best = (n, Some(i));
                        }
                    }
                    best.1.expect("three nodes")
                };
                let leads = self.leaderships(node).await;
                self.cluster.kill(node);
                format!("{} (led: {})", self.cluster.name(node), leads.join(", "))
            }
            Fault::Redis => {
                if let Some(redis) = self.backing.redis.as_mut() {
                    redis.stop();
                }
                self.backing.redis_url.clone()
            }
        })
    }

    async fn heal(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::None => {}
            Fault::Service(i) => {
                self.stack.services[i].restart()?;
                self.stack.wait_ready(i, Duration::from_secs(30)).await?;
            }
            Fault::NatsStreamLeader | Fault::NatsOtherNode => {
                for i in 0..self.cluster.len() {
                    if !self.cluster.is_running(i) {
                        self.cluster.restart(i);
                    }
                }
            }
            Fault::Redis => {
                if let Some(redis) = self.backing.redis.as_mut() {
                    redis.restart();
                }
            }
        }
        Ok(())
    }

    /// The streams and Herald consumers whose leader is `node`: what its
    /// loss sends to an election.
    async fn leaderships(&self, node: usize) -> Vec<String> {
        let name = self.cluster.name(node);
        let mut led = Vec::new();
        for (stream, consumer) in CONSUMERS {
            let Ok(mut s) = self.js.get_stream(stream).await else {
                continue;
            };
            if let Ok(info) = s.info().await
                && info.cluster.as_ref().and_then(|c| c.leader.as_deref()) == Some(name.as_str())
            {
                led.push(stream.to_owned());
            }
            if let Ok(info) = s.consumer_info(consumer).await
                && info.cluster.as_ref().and_then(|c| c.leader.as_deref()) == Some(name.as_str())
            {
                led.push(format!("consumer {consumer}"));
            }
        }
        led
    }

    /// Waits (up to 60 s) until every Herald consumer has nothing pending.
    async fn settle(&self) {
        crate::stack::settle(&self.js, Duration::from_millis(200)).await;
    }
}

/// The table docs/benchmarks.md shows.
pub fn table(report: &Report) -> String {
    let ms = |w: &Window| {
        if w.deliveries == 0 {
            "–".to_owned()
        } else {
            format!("{:.0}", w.p99_ms)
        }
    };
    let mut out = format!(
        "{} events/s; baseline p50 {:.1} ms, p99 {:.1} ms; recovered = every later second's p99 under {:.0} ms\n\n",
        report.rate, report.baseline_p50_ms, report.baseline_p99_ms, report.recovered_below_ms
    );
    out.push_str(
        "| fault | lost | duplicated | p99 before ms | p99 during ms | p99 after ms | back to baseline after |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for f in &report.faults {
        let name = if f.fault.contains("NATS") {
            format!("{} ({})", f.fault, f.target)
        } else {
            f.fault.clone()
        };
        out.push_str(&format!(
            "| {name} | {} of {} | {} | {} | {} | {} | {} |\n",
            f.lost,
            f.published - f.publish_failures,
            f.duplicates,
            ms(&f.before),
            ms(&f.during),
            ms(&f.after),
            f.recovered_s
                .map_or("not within the phase".to_owned(), |s| format!("{s:.0} s")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_is_the_first_slice_after_the_last_slow_one() {
        // (p99 per second, fault at, expected)
        for (slices, fault_at, expected) in [
            (vec![5.0, 5.0, 900.0, 800.0, 5.0, 5.0], 2.0, Some(2.0)),
            (vec![5.0, 5.0, 5.0, 5.0], 2.0, Some(0.0)),
            (vec![5.0, 5.0, 900.0, 5.0, 900.0, 5.0], 2.5, Some(2.5)),
            (vec![5.0, 5.0, 900.0, 900.0], 2.0, None),
            // A slow slice before the fault is not the fault's.
            (vec![900.0, 5.0, 5.0], 1.0, Some(0.0)),
        ] {
            assert_eq!(
                recovered_after(&slices, fault_at, 100.0),
                expected,
                "{slices:?} at {fault_at}"
            );
        }
    }

    #[test]
    fn windows_are_nearest_rank() {
        let w = window((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(
            (w.deliveries, w.p50_ms, w.p99_ms, w.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(window(Vec::new()).deliveries, 0);
    }
}
