//! `herald-bench`: Herald end to end — throughput, latency, CPU and memory
//! per service — beside the bare-HTTP ceiling of the same receiver.
//!
//! It starts NATS and Redis (or uses `--nats-url`/`--redis-url`), the five
//! services as processes from the release binaries next to it, a receiver
//! that verifies every signature, and then runs its phases in order:
//! warm-up, throughput to one webhook, fan-out to several, latency at a
//! steady rate and at half the measured peak, with `--ordered-executions`
//! the ordered-delivery phases (crate::ordered), and the ceiling. It writes
//! `<target>/bench/result.json` and ends with one `bench:` summary line; it
//! exits non-zero when a delivery is missing or a signature is wrong.

mod chaos;
mod load;
mod noisy;
mod ops;
mod ordered;
mod receiver;
mod recover;
mod replay;
mod soak;
mod stack;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::load::Publisher;
use crate::receiver::Receiver;
use crate::stack::{Backing, SERVICES, Stack};

const USAGE: &str = "\
usage: herald-bench [options]
  --events N            events to one webhook in the throughput phase (50000)
  --fanout-events N     events in the fan-out phase (events / 10)
  --fanout-webhooks N   webhooks every fan-out event goes to (10)
  --rate N              steady rate of the latency phase, events/s (1000)
  --latency-secs N      length of each latency phase (10)
  --concurrency N       deliveries in flight, the deliverer's and the ceiling's (1024)
  --publish-window N    publishes awaiting their ack at once (1024)
  --warmup N            warm-up events, not measured (2000)
  --ordered-executions N  also the ordered-delivery phases (off: 0; `make bench` users pass
                        10000): N executions x 5 events to an unordered webhook, then to one
                        ordered by `execution`, as fast as the publisher goes; then
                        --ordered-rate events/s for --latency-secs to the ordered webhook,
                        without and with one key whose receiver answers after 2 s
  --ordered-rate N      events/s of those two paced ordered phases (100)
  --stall-secs N        give up when no delivery arrives for this long (30)
  --nats-url URL        use this NATS instead of starting one
  --redis-url URL       use this Redis instead of starting one
  --bin-dir DIR         where herald-{ingest,...} are (next to this binary)
  --out FILE            result JSON (<target>/bench/result.json)
  --env NAME=VALUE      extra environment for the services (repeatable)
  --sync-always         then again on a fresh stack whose nats-server syncs every write to
                        disk (jetstream sync_interval: always): warm-up, throughput and
                        both latency phases, under sync_always in the result
  --cluster             the broker phases on a 3-node NATS cluster, every stream with three
                        replicas (what the Helm chart deploys); with --sync-always, both passes
                        (no operation counts: they are spread over the three nodes)
  --no-tap              count no acks or pull requests (the tap subscribing to $JS.ACK.>
                        and $JS.API.> costs nats-server a little CPU)
  --soak-minutes N      instead: the soak (a 10 s webhook beside a healthy one, 10 events/s)
  --soak-p99-ms N       the soak fails when a minute's healthy p99 exceeds this (1000)
  --replay-events N     instead: replay N events to one webhook beside live traffic at 500/s
  --noisy-burst N       instead: another organization's 10 events/s alone, then beside a burst
                        of N events from organization bench-noisy; its p50/p99 both ways
                        (`make bench-noisy` passes 30000); writes <target>/bench/noisy.json
  --slow-org N          instead: organization bench-slow's N events to 40 webhooks answering
                        after 10 s (40 x N slow deliveries) beside another's 10 events/s for
                        60 s; the other's p50/p99 alone and beside; writes <target>/bench/slow-org.json
  --recover-events N    instead: admin's memory while a recover sends N deliveries of 16 KiB events again
  --chaos               instead: the fault suite on a 3-node NATS cluster, two replicas per worker
                        (--rate defaults to 500); writes <target>/bench/chaos.json
  --chaos-down-secs N   how long a killed service replica stays down (3)
  --chaos-server-down-secs N  how long a NATS node or Redis stays down (10)
  --chaos-phase-secs N  load before a fault, and again after it is healed (5, 10)";

struct Args {
    events: u64,
    fanout_events: Option<u64>,
    fanout_webhooks: usize,
    rate: f64,
    latency_secs: u64,
    concurrency: usize,
    publish_window: usize,
    warmup: u64,
    ordered_executions: u64,
    ordered_rate: f64,
    stall_secs: u64,
    nats_url: Option<String>,
    redis_url: Option<String>,
    bin_dir: PathBuf,
    out: Option<PathBuf>,
    env: Vec<(String, String)>,
    soak_minutes: Option<usize>,
    soak_p99_ms: f64,
    replay_events: Option<u64>,
    recover_events: Option<u64>,
    noisy_burst: Option<u64>,
    slow_org: Option<u64>,
    chaos: bool,
    cluster: bool,
    sync_always: bool,
    tap: bool,
    rate_given: bool,
    chaos_down_secs: u64,
    chaos_server_down_secs: u64,
    chaos_phase_secs: Option<u64>,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut args = Self {
            events: 50_000,
            fanout_events: None,
            fanout_webhooks: 10,
            rate: 1_000.0,
            latency_secs: 10,
            concurrency: 1024,
            publish_window: 1024,
            warmup: 2_000,
            ordered_executions: 0,
            ordered_rate: 100.0,
            stall_secs: 30,
            nats_url: None,
            redis_url: None,
            bin_dir: stack::own_dir(),
            out: None,
            env: Vec::new(),
            soak_minutes: None,
            soak_p99_ms: 1_000.0,
            replay_events: None,
            recover_events: None,
            noisy_burst: None,
            slow_org: None,
            chaos: false,
            cluster: false,
            sync_always: false,
            tap: true,
            rate_given: false,
            chaos_down_secs: 3,
            chaos_server_down_secs: 10,
            chaos_phase_secs: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                return Err(String::new());
            }
            if flag == "--chaos" {
                args.chaos = true;
                continue;
            }
            if flag == "--cluster" {
                args.cluster = true;
                continue;
            }
            if flag == "--sync-always" {
                args.sync_always = true;
                continue;
            }
            if flag == "--no-tap" {
                args.tap = false;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
                v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
            }
            match flag.as_str() {
                "--events" => args.events = num(&flag, &value)?,
                "--fanout-events" => args.fanout_events = Some(num(&flag, &value)?),
                "--fanout-webhooks" => args.fanout_webhooks = num(&flag, &value)?,
                "--rate" => {
                    args.rate = num(&flag, &value)?;
                    args.rate_given = true;
                }
                "--chaos-down-secs" => args.chaos_down_secs = num(&flag, &value)?,
                "--chaos-server-down-secs" => args.chaos_server_down_secs = num(&flag, &value)?,
                "--chaos-phase-secs" => args.chaos_phase_secs = Some(num(&flag, &value)?),
                "--latency-secs" => args.latency_secs = num(&flag, &value)?,
                "--concurrency" => args.concurrency = num(&flag, &value)?,
                "--publish-window" => args.publish_window = num(&flag, &value)?,
                "--warmup" => args.warmup = num(&flag, &value)?,
                "--ordered-executions" => args.ordered_executions = num(&flag, &value)?,
                "--ordered-rate" => args.ordered_rate = num(&flag, &value)?,
                "--stall-secs" => args.stall_secs = num(&flag, &value)?,
                "--nats-url" => args.nats_url = Some(value),
                "--redis-url" => args.redis_url = Some(value),
                "--bin-dir" => args.bin_dir = value.into(),
                "--out" => args.out = Some(value.into()),
                "--soak-minutes" => args.soak_minutes = Some(num(&flag, &value)?),
                "--soak-p99-ms" => args.soak_p99_ms = num(&flag, &value)?,
                "--replay-events" => args.replay_events = Some(num(&flag, &value)?),
                "--recover-events" => args.recover_events = Some(num(&flag, &value)?),
                "--noisy-burst" => args.noisy_burst = Some(num(&flag, &value)?),
                "--slow-org" => args.slow_org = Some(num(&flag, &value)?),
                "--env" => {
                    let (k, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("--env wants NAME=VALUE, got {value}"))?;
                    args.env.push((k.into(), v.into()));
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if args.events == 0
            || args.rate <= 0.0
            || args.ordered_rate <= 0.0
            || args.concurrency == 0
            || args.publish_window == 0
        {
            return Err(
                "--events, --rate, --ordered-rate, --concurrency and --publish-window must be positive"
                    .into(),
            );
        }
        if args.cluster && args.nats_url.is_some() {
            return Err(
                "--cluster starts its own three nodes: leave out --nats-url (or give a cluster's \
                 URLs with --env HERALD_STREAM_REPLICAS=3)"
                    .into(),
            );
        }
        if args.chaos && !args.rate_given {
            args.rate = 500.0;
        }
        Ok(args)
    }
}

#[derive(Debug, Default, Serialize)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u32>) -> Self {
        if us.is_empty() {
            return Self::default();
        }
        us.sort_unstable();
        let at = |p: f64| {
            let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
            us[rank - 1] as f64 / 1000.0
        };
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct PhaseReport {
    name: String,
    events: u64,
    webhooks: usize,
    /// Events per second offered, for a paced phase.
    offered_rate: Option<f64>,
    expected: u64,
    delivered: u64,
    missing: u64,
    duplicates: u64,
    bad_signatures: u64,
    malformed: u64,
    publish_errors: u64,
    /// First publish to the last delivery's receipt.
    seconds: f64,
    deliveries_per_s: f64,
    latency: Latency,
    /// CPU seconds of each service from the phase's start until every
    /// consumer had caught up (the log-writer included).
    service_cpu_s: BTreeMap<String, f64>,
    cpu_ms_per_delivery: f64,
    /// CPU seconds of NATS and Redis, when started by the benchmark.
    server_cpu_s: BTreeMap<String, f64>,
    /// CPU ms per delivery of every process, services and servers, and
    /// of each.
    all_cpu_ms_per_delivery: f64,
    cpu_ms_per_delivery_by_process: BTreeMap<String, f64>,
    /// Operations per delivery (crate::ops), when NATS was started here.
    ops: Option<ops::OpsReport>,
    /// CPU seconds of this process (publisher and receiver).
    bench_cpu_s: f64,
    /// Share of the whole machine busy during the phase, all processes.
    machine_busy_pct: f64,
    /// TCP connections the receiver accepted during the phase.
    connections_opened: u64,
    /// Of a phase of executions (crate::ordered): what the receiver saw of
    /// each execution's order.
    #[serde(skip_serializing_if = "Option::is_none")]
    ordering: Option<ordered::OrderingReport>,
}

enum Drive {
    Burst {
        event_type: String,
        n: u64,
    },
    Paced {
        event_type: String,
        rate: f64,
        secs: u64,
    },
    Ceiling {
        n: u64,
    },
    /// `n` executions of 5 events (crate::load `executions`).
    Executions {
        workflow: &'static str,
        ordered: bool,
        n: u64,
        group: u64,
        rate: Option<f64>,
    },
}

struct Bench {
    args: Args,
    receiver: Receiver,
    stack: Stack,
    publisher: Publisher,
    js: async_nats::jetstream::Context,
    servers: Vec<(&'static str, u32)>,
    phase: usize,
    ops: Option<ops::Ops>,
    // Dropped after the stack: the services stop before their servers.
    _backing: Backing,
}

impl Bench {
    async fn run(
        &mut self,
        name: &str,
        webhooks: usize,
        drive: Drive,
    ) -> anyhow::Result<PhaseReport> {
        let phase = self.phase;
        self.phase += 1;
        let ops_pids = self.ops_pids();
        let ops_before = match &self.ops {
            Some(ops) => Some(ops.snapshot(&ops_pids).await),
            None => None,
        };
        let cpu_before = self.stack.cpu();
        let servers_before: Vec<f64> = self
            .servers
            .iter()
            .map(|(_, pid)| stack::cpu_seconds(*pid))
            .collect();
        let bench_before = stack::cpu_seconds(std::process::id());
        let machine_before = stack::machine_jiffies();
        let connections_before = self.receiver.connections();
        let errors_before = self
            .publisher
            .errors
            .load(std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let mut report = PhaseReport {
            name: name.into(),
            webhooks,
            ..Default::default()
        };
        let mut ceiling_failures = 0;
        let receiver = self.receiver.clone();
        let publisher = self.publisher.clone();
        let concurrency = self.args.concurrency;
        let events = match &drive {
            Drive::Burst { n, .. } | Drive::Ceiling { n } => *n,
            Drive::Paced { rate, secs, .. } => (rate * *secs as f64).round() as u64,
            Drive::Executions { n, .. } => *n * load::STEPS.len() as u64,
        };
        report.events = events;
        match &drive {
            Drive::Paced { rate, .. }
            | Drive::Executions {
                rate: Some(rate), ..
            } => report.offered_rate = Some(*rate),
            _ => {}
        }
        let ordered = match &drive {
            Drive::Executions { ordered, .. } => Some(*ordered),
            _ => None,
        };
        let is_ceiling = matches!(drive, Drive::Ceiling { .. });
        report.expected = events * webhooks as u64;
        let driver = tokio::spawn(async move {
            match drive {
                Drive::Burst { event_type, n } => {
                    publisher.burst(phase, &event_type, n).await;
                    0
                }
                Drive::Paced {
                    event_type,
                    rate,
                    secs,
                } => {
                    publisher
                        .paced(phase, &event_type, rate, Duration::from_secs(secs))
                        .await;
                    0
                }
                Drive::Ceiling { n } => load::ceiling(&receiver, phase, n, concurrency).await,
                Drive::Executions {
                    workflow,
                    n,
                    group,
                    rate,
                    ..
                } => {
                    publisher.executions(phase, workflow, n, group, rate).await;
                    0
                }
            }
        });

        // Wait for every delivery, or until they stop coming.
        let mut last_count = 0;
        let mut last_progress = Instant::now();
        let mut last_print = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let delivered = self.receiver.delivered(phase);
            if delivered != last_count {
                last_count = delivered;
                last_progress = Instant::now();
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "  {name}: {delivered}/{} delivered in {secs:.1}s ({:.0}/s)",
                    report.expected,
                    delivered as f64 / secs
                );
            }
            if delivered >= report.expected && driver.is_finished() {
                break;
            }
            let exited = self.stack.exited();
            if !exited.is_empty() {
                bail!("services exited: {exited:?}");
            }
            if last_progress.elapsed() > Duration::from_secs(self.args.stall_secs) {
                eprintln!(
                    "  {name}: no delivery for {}s; giving up",
                    self.args.stall_secs
                );
                break;
            }
        }
        if driver.is_finished() {
            ceiling_failures = driver.await.unwrap_or(0);
        } else {
            driver.abort();
        }
        // Let a late duplicate show up and the log-writer catch up, so the
        // CPU of this phase is not billed to the next one.
        if !is_ceiling {
            self.settle().await;
        }

        let seen = self.receiver.take(phase);
        let last = seen.last_at.unwrap_or(started);
        report.seconds = last.duration_since(started).as_secs_f64();
        report.delivered = seen.delivered;
        report.missing = report.expected.saturating_sub(seen.delivered);
        report.duplicates = seen.duplicates;
        report.bad_signatures = seen.bad_signatures;
        report.malformed = seen.malformed;
        report.publish_errors = self
            .publisher
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
            - errors_before
            + ceiling_failures;
        report.deliveries_per_s = if report.seconds > 0.0 {
            seen.delivered as f64 / report.seconds
        } else {
            0.0
        };
        if let Some(ordered) = ordered {
            report.ordering = Some(ordered::OrderingReport::of(
                ordered,
                &seen,
                self.receiver.slow_key(),
            ));
        }
        report.latency = Latency::of(seen.latencies_us);
        let cpu_after = self.stack.cpu();
        let mut total = 0.0;
        for ((name, before), after) in SERVICES.iter().zip(cpu_before).zip(cpu_after) {
            total += after - before;
            report
                .service_cpu_s
                .insert((*name).into(), round3(after - before));
        }
        report.cpu_ms_per_delivery = if seen.delivered > 0 {
            round3(total * 1000.0 / seen.delivered as f64)
        } else {
            0.0
        };
        for ((name, pid), before) in self.servers.iter().zip(servers_before) {
            let used = stack::cpu_seconds(*pid) - before;
            total += used;
            report.server_cpu_s.insert((*name).into(), round3(used));
        }
        let per_delivery = |s: f64| {
            if seen.delivered > 0 {
                round3(s * 1000.0 / seen.delivered as f64)
            } else {
                0.0
            }
        };
        report.all_cpu_ms_per_delivery = per_delivery(total);
        report.cpu_ms_per_delivery_by_process = report
            .service_cpu_s
            .iter()
            .chain(&report.server_cpu_s)
            .map(|(name, s)| (name.clone(), per_delivery(*s)))
            .collect();
        // The ceiling does not go through the broker.
        if let (Some(ops), Some(before), false) = (&self.ops, &ops_before, is_ceiling) {
            let after = ops.snapshot(&ops_pids).await;
            report.ops = Some(ops::report(before, &after, seen.delivered, ops.tapping()));
        }
        report.connections_opened = self.receiver.connections() - connections_before;
        if let Some(o) = &report.ordering {
            eprintln!(
                "  {name}: {} keys, {} out of order, {} sequence errors, {} with webhook-sequence",
                o.keys, o.out_of_order, o.sequence_errors, o.sequenced
            );
        }
        report.bench_cpu_s = round3(stack::cpu_seconds(std::process::id()) - bench_before);
        let machine_after = stack::machine_jiffies();
        let (busy, all) = (
            machine_after.0 - machine_before.0,
            machine_after.1 - machine_before.1,
        );
        report.machine_busy_pct = if all > 0 {
            round3(100.0 * busy as f64 / all as f64)
        } else {
            0.0
        };
        eprintln!(
            "{name}: {}/{} delivered, {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, {:.3} CPU ms/delivery, {} duplicates, {} bad signatures\n    cpu s: {:?} servers {:?} bench {} machine busy {}%, {} connections opened",
            report.delivered,
            report.expected,
            report.deliveries_per_s,
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.latency.p999_ms,
            report.cpu_ms_per_delivery,
            report.duplicates,
            report.bad_signatures,
            report.service_cpu_s,
            report.server_cpu_s,
            report.bench_cpu_s,
            report.machine_busy_pct,
            report.connections_opened,
        );
        Ok(report)
    }

    /// The processes whose system calls and context switches are counted.
    fn ops_pids(&self) -> Vec<(String, u32)> {
        self.stack
            .services
            .iter()
            .map(|s| (s.name.to_owned(), s.pid()))
            .chain(self.servers.iter().map(|(n, p)| ((*n).to_owned(), *p)))
            .collect()
    }

    /// Waits (up to 60 s) until every Herald consumer has nothing pending.
    async fn settle(&self) {
        stack::settle(&self.js, Duration::from_millis(100)).await;
    }
}

/// Writes `report` as pretty JSON to `name` in `target`/bench (made if
/// need be); answers the file's path.
fn write_report(
    target: &std::path::Path,
    name: &str,
    report: &impl Serialize,
) -> anyhow::Result<PathBuf> {
    let out = target.join("bench").join(name);
    std::fs::create_dir_all(target.join("bench"))?;
    std::fs::write(&out, serde_json::to_vec_pretty(report)?)?;
    Ok(out)
}

/// A Markdown table: a header line of `columns`, then a line for each
/// row of cells.
fn markdown_table<const N: usize>(
    columns: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut out = format!("| {} |\n|{}\n", columns.join(" | "), " --- |".repeat(N));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[derive(Serialize)]
struct Report {
    started_at_unix: u64,
    host: Host,
    settings: Settings,
    phases: Vec<PhaseReport>,
    peak_memory_mib: BTreeMap<String, f64>,
    summary: Summary,
    /// With `--ordered-executions`: ordered beside unordered delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    ordered: Option<ordered::Summary>,
    /// With `--sync-always`: the broker phases again on a nats-server that
    /// syncs every write.
    sync_always: Option<SyncAlways>,
    failures: Vec<String>,
}

#[derive(Serialize)]
struct SyncAlways {
    nats_server_config: &'static str,
    deliveries_per_s: f64,
    all_cpu_ms_per_delivery: f64,
    phases: Vec<PhaseReport>,
}

const SINGLE: &str = "workflow.step.completed";
const FANOUT: &str = "workflow.step.failed";

/// NATS, Redis and the services for one pass, with the benchmark's
/// webhooks made and their secrets given to the receiver; with
/// `sync_always`, nats-server syncs every write to disk.
async fn start_pass(
    args: &Args,
    receiver: &Receiver,
    work_dir: &std::path::Path,
    service_env: &[(String, String)],
    sync_always: bool,
) -> anyhow::Result<(Backing, Stack, async_nats::jetstream::Context)> {
    std::fs::create_dir_all(work_dir)?;
    let conf = work_dir.join("nats-sync-always.conf");
    let backing = Backing::start_with(
        args.nats_url.clone(),
        args.redis_url.clone(),
        sync_always.then_some(conf.as_path()),
        args.cluster,
    );
    let stack = Stack::start(&backing, &args.bin_dir, work_dir, service_env).await?;
    // The benchmark's own requests are told from the services' ones by
    // their reply subjects (crate::ops).
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(ops::BENCH_INBOX)
        .connect(backing.nats_urls())
        .await
        .context("connect to NATS")?;
    let js = async_nats::jetstream::new(client);
    let (id, secret) = stack
        .create_webhook("bench-single", &receiver.url("/single"), SINGLE)
        .await?;
    receiver.add_secret(&id, &secret);
    for i in 0..args.fanout_webhooks {
        let (id, secret) = stack
            .create_webhook(
                &format!("bench-fanout-{i}"),
                &receiver.url(&format!("/fanout/{i}")),
                FANOUT,
            )
            .await?;
        receiver.add_secret(&id, &secret);
    }
    if args.ordered_executions > 0 {
        ordered::create_webhooks(&stack, receiver).await?;
    }
    Ok((backing, stack, js))
}

/// The operation counters, when the NATS was started here.
async fn start_ops(args: &Args, backing: &Backing) -> anyhow::Result<Option<ops::Ops>> {
    Ok(match &backing.monitor_url {
        Some(url) => Some(
            ops::Ops::start(url.clone(), &backing.nats_url, &backing.redis_url, args.tap).await?,
        ),
        None => None,
    })
}

/// The phases through the broker: warm-up, throughput to one webhook,
/// fan-out (when `fanout_events` and webhooks), and latency at the steady
/// rate and at half the throughput phase's rate.
async fn broker_phases(bench: &mut Bench, fanout_events: u64) -> anyhow::Result<Vec<PhaseReport>> {
    let a = &bench.args;
    let (events, warmup, fanout_webhooks, rate, latency_secs) = (
        a.events,
        a.warmup,
        a.fanout_webhooks,
        a.rate,
        a.latency_secs,
    );
    let mut phases = Vec::new();
    eprintln!("warm-up: {warmup} events");
    let burst = |n| Drive::Burst {
        event_type: SINGLE.into(),
        n,
    };
    phases.push(bench.run("warm-up", 1, burst(warmup)).await?);
    eprintln!("throughput: {events} events to 1 webhook");
    let single = bench.run("throughput", 1, burst(events)).await?;
    let peak = single.deliveries_per_s;
    phases.push(single);
    if fanout_webhooks > 0 && fanout_events > 0 {
        eprintln!("fan-out: {fanout_events} events to {fanout_webhooks} webhooks");
        let drive = Drive::Burst {
            event_type: FANOUT.into(),
            n: fanout_events,
        };
        phases.push(bench.run("fan-out", fanout_webhooks, drive).await?);
    }
    for rate in [rate, (peak / 2.0).round().max(1.0)] {
        eprintln!("latency: {rate} events/s for {latency_secs}s");
        let drive = Drive::Paced {
            event_type: SINGLE.into(),
            rate,
            secs: latency_secs,
        };
        phases.push(bench.run(&format!("latency@{rate}/s"), 1, drive).await?);
    }
    Ok(phases)
}

/// Operations per delivery of each phase through the broker, a line each.
fn ops_table(title: &str, phases: &[PhaseReport]) -> String {
    let mut out = format!(
        "operations per delivery, {title}:\n  {:<16} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}\n",
        "phase",
        "deliv/s",
        "cpu ms",
        "nats",
        "stored",
        "acks",
        "pulls",
        "api",
        "in msg",
        "out msg",
        "disk B",
        "syscall",
        "ctxsw",
        "redis",
        "r trip"
    );
    let opt = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
    for p in phases {
        let Some(o) = &p.ops else { continue };
        let nats_cpu = p
            .cpu_ms_per_delivery_by_process
            .get("nats-server")
            .copied()
            .unwrap_or(0.0);
        out += &format!(
            "  {:<16} {:>7.0} {:>6.3} {:>6.3} {:>6.2} {:>6} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.0} {:>7.1} {:>6.1} {:>6.2} {:>6.2}\n",
            p.name,
            p.deliveries_per_s,
            p.all_cpu_ms_per_delivery,
            nats_cpu,
            o.messages_stored,
            opt(o.acks),
            opt(o.pull_requests),
            opt(o.api_requests),
            o.nats_in_msgs,
            o.nats_out_msgs,
            o.disk_write_bytes,
            o.syscalls_by_process.values().sum::<f64>(),
            o.context_switches_by_process.values().sum::<f64>(),
            o.redis_commands,
            o.redis_round_trips,
        );
    }
    out
}

#[derive(Serialize)]
struct Host {
    cpus: usize,
    load_average_at_start: String,
    load_average_at_end: String,
}

#[derive(Serialize)]
struct Settings {
    events: u64,
    fanout_events: u64,
    fanout_webhooks: usize,
    rate: f64,
    latency_secs: u64,
    concurrency: usize,
    publish_window: usize,
    warmup: u64,
    ordered_executions: u64,
    ordered_rate: f64,
    /// 1, or 3 for `--cluster`.
    nats_nodes: usize,
    service_env: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Summary {
    deliveries_per_s: f64,
    fanout_deliveries_per_s: f64,
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    steady_p999_ms: f64,
    half_peak_p50_ms: f64,
    half_peak_p99_ms: f64,
    half_peak_p999_ms: f64,
    ceiling_per_s: f64,
    ratio: f64,
    cpu_ms_per_delivery: f64,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("herald-bench: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match bench(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("herald-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<bool> {
    let target = stack::own_dir()
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench").join("result.json"));
    let work_dir = target.join("bench").join("run");
    let load_at_start = load_average();
    eprintln!(
        "herald-bench: {} cpus, load average {load_at_start}; services from {}, logs in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.bin_dir.display(),
        work_dir.display()
    );

    if args.chaos {
        return chaos(args, &target, &work_dir).await;
    }
    let receiver = Receiver::start().await?;
    let mut service_env = vec![(
        "HERALD_DELIVERY_CONCURRENCY".to_owned(),
        args.concurrency.to_string(),
    )];
    if args.cluster {
        service_env.push(("HERALD_STREAM_REPLICAS".to_owned(), "3".to_owned()));
    }
    service_env.extend(args.env.iter().cloned());
    let (backing, stack, js) = start_pass(&args, &receiver, &work_dir, &service_env, false).await?;
    let fanout_events = args.fanout_events.unwrap_or((args.events / 10).max(1));

    let publisher = Publisher::new(js.clone(), args.publish_window);
    if let Some(events) = args.recover_events.filter(|n| *n > 0) {
        let report = recover::run(&stack, &receiver, &publisher, &js, 0, events).await?;
        let out = write_report(&target, "recover.json", &report)?;
        println!(
            "recover: {} of {events} deliveries of 16 KiB events again in {:.1} s; admin peak {:.1} MiB before, {:.1} MiB after, {} ({})",
            report.recovered,
            report.recover_secs,
            report.admin_peak_mib_before,
            report.admin_peak_mib_after,
            if report.passed { "passed" } else { "FAILED" },
            out.display()
        );
        return Ok(report.passed);
    }
    if let Some(burst) = args.noisy_burst.filter(|n| *n > 0) {
        let report = noisy::run(&stack, &receiver, &js, 0, burst).await?;
        let out = write_report(&target, "noisy.json", &report)?;
        eprint!("{}", noisy::table(&report));
        println!(
            "noisy burst: {burst} events; the other organization's p99 {:.1} ms alone, {:.1} ms beside ({:.1}x), {} ({})",
            report.alone_p99_ms,
            report.beside_p99_ms,
            report.p99_ratio,
            if report.passed { "passed" } else { "FAILED" },
            out.display()
        );
        return Ok(report.passed);
    }
    if let Some(events) = args.slow_org.filter(|n| *n > 0) {
        let r = noisy::slow(&stack, &receiver, &js, 0, events).await?;
        let out = write_report(&target, "slow-org.json", &r)?;
        eprintln!("  slowest beside them:{}", noisy::slowest_lines(&r.slowest));
        println!(
            "slow organization: {events} events to {} webhooks answering after 10 s ({} answered in the time); \
             the other organization's p50/p99 {:.1}/{:.1} ms alone, {:.1}/{:.1} ms beside (max {:.1} ms, {}/{} delivered), {} ({})",
            r.slow_webhooks,
            r.slow_answered,
            r.alone_p50_ms,
            r.alone_p99_ms,
            r.beside_p50_ms,
            r.beside_p99_ms,
            r.beside_max_ms,
            r.beside_delivered,
            r.beside_events,
            if r.passed { "passed" } else { "FAILED" },
            out.display()
        );
        return Ok(r.passed);
    }
    if let Some(events) = args.replay_events.filter(|n| *n > 0) {
        let report = replay::run(&stack, &receiver, &publisher, &js, 0, events).await?;
        let out = write_report(&target, "replay.json", &report)?;
        eprint!("{}", replay::table(&report));
        let worst = report
            .windows
            .iter()
            .skip(1)
            .map(|w| w.live_p99_ms)
            .fold(0.0, f64::max);
        println!(
            "replay: {events} events at {:.0}/s, live p99 {:.1} ms before, worst {worst:.1} ms during, {} ({})",
            report.replay_per_sec,
            report.windows[0].live_p99_ms,
            if report.passed { "passed" } else { "FAILED" },
            out.display()
        );
        return Ok(report.passed);
    }
    if let Some(minutes) = args.soak_minutes.filter(|m| *m > 0) {
        eprintln!("soak: {minutes} minutes, a 10 s webhook beside a healthy one, 10 events/s");
        let report = soak::run(&stack, &receiver, &publisher, 0, minutes, args.soak_p99_ms).await?;
        let out = write_report(&target, "soak.json", &report)?;
        eprint!("{}", soak::table(&report));
        let worst = report.minutes.iter().map(|m| m.p99_ms).fold(0.0, f64::max);
        println!(
            "soak: {minutes} min, healthy p99 worst minute {worst:.1} ms, {} ({})",
            if report.passed { "passed" } else { "FAILED" },
            out.display()
        );
        // The services are killed when `stack` drops.
        return Ok(report.passed);
    }
    let ops = start_ops(&args, &backing).await?;
    let mut bench = Bench {
        receiver,
        stack,
        publisher,
        js,
        servers: backing.pids.clone(),
        phase: 0,
        args,
        ops,
        _backing: backing,
    };
    let a = &bench.args;
    let (events, warmup, fanout_webhooks, rate, latency_secs, concurrency) = (
        a.events,
        a.warmup,
        a.fanout_webhooks,
        a.rate,
        a.latency_secs,
        a.concurrency,
    );
    let mut phases = broker_phases(&mut bench, fanout_events).await?;
    let ordered_executions = bench.args.ordered_executions;
    let ordered = if ordered_executions > 0 {
        let ordered_phases = ordered::phases(&mut bench, ordered_executions).await?;
        let summary = ordered::summary(ordered_executions, &ordered_phases);
        phases.extend(ordered_phases);
        Some(summary)
    } else {
        None
    };
    let ceiling_warmup = warmup.max(2 * concurrency as u64);
    eprintln!("ceiling warm-up: {ceiling_warmup} signed POSTs, {concurrency} at once");
    phases.push(
        bench
            .run("ceiling warm-up", 1, Drive::Ceiling { n: ceiling_warmup })
            .await?,
    );
    eprintln!("ceiling: {events} signed POSTs, {concurrency} at once, no broker");
    phases.push(
        bench
            .run("ceiling", 1, Drive::Ceiling { n: events })
            .await?,
    );

    let peak_memory_mib = SERVICES
        .iter()
        .map(|s| (*s).to_owned())
        .zip(bench.stack.peak_memory_mib().into_iter().map(round1))
        .collect();
    eprint!("{}", ops_table("default sync", &phases));

    // The same broker phases on a fresh stack whose nats-server writes
    // every message to disk before acknowledging it.
    let sync_always = if bench.args.sync_always {
        let Bench {
            receiver,
            args,
            phase,
            stack,
            ops,
            _backing,
            ..
        } = bench;
        drop(ops);
        drop(stack);
        drop(_backing);
        eprintln!(
            "sync always: a fresh stack, {} with jetstream sync_interval: always",
            if args.cluster {
                "3 NATS nodes"
            } else {
                "nats-server"
            }
        );
        let (backing, stack, js) =
            start_pass(&args, &receiver, &work_dir, &service_env, true).await?;
        let ops = start_ops(&args, &backing).await?;
        let publisher = Publisher::new(js.clone(), args.publish_window);
        bench = Bench {
            receiver,
            stack,
            publisher,
            js,
            servers: backing.pids.clone(),
            phase,
            args,
            ops,
            _backing: backing,
        };
        let sync_phases = broker_phases(&mut bench, 0).await?;
        eprint!("{}", ops_table("sync always", &sync_phases));
        let find = |prefix: &str| sync_phases.iter().find(|p| p.name.starts_with(prefix));
        Some(SyncAlways {
            nats_server_config: "jetstream { sync_interval: always }",
            deliveries_per_s: find("throughput").map_or(0.0, |p| p.deliveries_per_s.round()),
            all_cpu_ms_per_delivery: find("throughput").map_or(0.0, |p| p.all_cpu_ms_per_delivery),
            phases: sync_phases,
        })
    } else {
        None
    };

    let find = |prefix: &str| phases.iter().find(|p| p.name.starts_with(prefix));
    let throughput = find("throughput").map_or(0.0, |p| p.deliveries_per_s);
    let ceiling = phases
        .iter()
        .find(|p| p.name == "ceiling")
        .map_or(0.0, |p| p.deliveries_per_s);
    let latency_phases: Vec<&PhaseReport> = phases
        .iter()
        .filter(|p| p.name.starts_with("latency@"))
        .collect();
    let (steady, half) = (&latency_phases[0].latency, &latency_phases[1].latency);
    let summary = Summary {
        deliveries_per_s: throughput.round(),
        fanout_deliveries_per_s: find("fan-out").map_or(0.0, |p| p.deliveries_per_s.round()),
        steady_p50_ms: steady.p50_ms,
        steady_p99_ms: steady.p99_ms,
        steady_p999_ms: steady.p999_ms,
        half_peak_p50_ms: half.p50_ms,
        half_peak_p99_ms: half.p99_ms,
        half_peak_p999_ms: half.p999_ms,
        ceiling_per_s: ceiling.round(),
        ratio: if ceiling > 0.0 {
            round3(throughput / ceiling)
        } else {
            0.0
        },
        cpu_ms_per_delivery: find("throughput").map_or(0.0, |p| p.cpu_ms_per_delivery),
    };
    let mut failures = Vec::new();
    for p in phases
        .iter()
        .chain(sync_always.iter().flat_map(|s| &s.phases))
    {
        if p.missing > 0 {
            failures.push(format!(
                "{}: {} of {} deliveries missing",
                p.name, p.missing, p.expected
            ));
        }
        if p.bad_signatures > 0 {
            failures.push(format!("{}: {} bad signatures", p.name, p.bad_signatures));
        }
        if p.malformed > 0 {
            failures.push(format!("{}: {} malformed requests", p.name, p.malformed));
        }
        if p.publish_errors > 0 {
            failures.push(format!("{}: {} publish errors", p.name, p.publish_errors));
        }
        if let Some(o) = p.ordering.as_ref().filter(|o| o.ordered) {
            if o.out_of_order > 0 {
                failures.push(format!(
                    "{}: {} deliveries out of order",
                    p.name, o.out_of_order
                ));
            }
            if o.sequence_errors > 0 {
                failures.push(format!(
                    "{}: {} webhook-sequence errors",
                    p.name, o.sequence_errors
                ));
            }
        }
    }
    let result = Report {
        started_at_unix: load::now_us() / 1_000_000,
        host: Host {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_average_at_start: load_at_start,
            load_average_at_end: load_average(),
        },
        settings: Settings {
            events,
            fanout_events,
            fanout_webhooks,
            rate,
            latency_secs,
            concurrency,
            publish_window: bench.args.publish_window,
            warmup,
            ordered_executions,
            ordered_rate: bench.args.ordered_rate,
            nats_nodes: if bench.args.cluster { 3 } else { 1 },
            service_env: service_env.into_iter().collect(),
        },
        phases,
        peak_memory_mib,
        summary,
        ordered,
        sync_always,
        failures,
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&result)? + "\n")?;
    eprintln!("peak memory (MiB): {:?}", result.peak_memory_mib);
    for failure in &result.failures {
        eprintln!("FAILED: {failure}");
    }
    eprintln!("wrote {}", out.display());
    if let Some(o) = &result.ordered {
        println!("{}", ordered::line(o));
    }
    let s = &result.summary;
    println!(
        "bench: deliveries/s={} p50_ms={} p99_ms={} ceiling/s={} ratio={}",
        s.deliveries_per_s,
        round1(s.steady_p50_ms),
        round1(s.steady_p99_ms),
        s.ceiling_per_s,
        s.ratio
    );
    Ok(result.failures.is_empty())
}

/// `--chaos`: the fault suite (crate::chaos).
async fn chaos(
    args: Args,
    target: &std::path::Path,
    work_dir: &std::path::Path,
) -> anyhow::Result<bool> {
    let mut cluster = herald_test_support::NatsCluster::start();
    let mut backing = Backing::start(Some(cluster.url()), args.redis_url.clone());
    let receiver = Receiver::start().await?;
    let mut service_env = vec![
        ("HERALD_STREAM_REPLICAS".to_owned(), "3".to_owned()),
        (
            "HERALD_DELIVERY_CONCURRENCY".to_owned(),
            args.concurrency.to_string(),
        ),
    ];
    service_env.extend(args.env.iter().cloned());
    eprintln!(
        "chaos: 3 NATS nodes ({}), R3 streams, two replicas of each worker, {} events/s",
        cluster.url(),
        args.rate
    );
    let mut stack =
        Stack::start_replicas(&backing, &args.bin_dir, work_dir, &service_env, 2).await?;
    let client = async_nats::connect(cluster.urls())
        .await
        .context("connect to NATS")?;
    let js = async_nats::jetstream::new(client);
    let (id, secret) = stack
        .create_webhook("chaos", &receiver.url("/chaos"), "workflow.step.completed")
        .await?;
    receiver.add_secret(&id, &secret);
    let publisher = Publisher::new(js.clone(), args.publish_window);
    let (before, after) = match args.chaos_phase_secs {
        Some(s) => (s, s),
        None => (5, 10),
    };
    let report = chaos::Chaos {
        settings: chaos::Settings {
            rate: args.rate,
            before: Duration::from_secs(before),
            service_down: Duration::from_secs(args.chaos_down_secs),
            server_down: Duration::from_secs(args.chaos_server_down_secs),
            after: Duration::from_secs(after),
            stall: Duration::from_secs(args.stall_secs),
        },
        cluster: &mut cluster,
        backing: &mut backing,
        stack: &mut stack,
        receiver: &receiver,
        publisher: &publisher,
        js,
    }
    .run()
    .await?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench").join("chaos.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprint!("{}", chaos::table(&report));
    let lost: u64 = report.faults.iter().map(|f| f.lost).sum();
    println!(
        "chaos: {} faults, {lost} lost, {} ({})",
        report.faults.len() - 1,
        if report.passed { "passed" } else { "FAILED" },
        out.display()
    );
    Ok(report.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let latency = Latency::of((1..=1000).rev().collect());
        assert_eq!(latency.p50_ms, 0.5);
        assert_eq!(latency.p99_ms, 0.99);
        assert_eq!(latency.p999_ms, 0.999);
        assert_eq!(latency.max_ms, 1.0);
        assert_eq!(Latency::of(vec![7_000]).p50_ms, 7.0);
        assert_eq!(Latency::of(Vec::new()).p99_ms, 0.0);
    }

    #[test]
    fn a_markdown_table_has_a_header_a_rule_and_a_line_a_row() {
        let rows = [["1".to_owned(), "2/3".to_owned()]];
        assert_eq!(
            markdown_table(["minute", "delivered"], rows),
            "| minute | delivered |\n| --- | --- |\n| 1 | 2/3 |\n"
        );
    }
}
