//! The system under test: NATS and Redis (started here, or reached by URL)
//! and the five services as separate processes from the release binaries,
//! so each one's CPU time and peak memory can be read from /proc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use herald_core::names;
use herald_test_support::{NatsCluster, NatsServer, RedisServer, free_port};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use herald_core::names::SERVICES;
pub const API_KEY: &str = "bench-operator-key";
pub const ORG: &str = "bench";

/// Where the stack's NATS and Redis come from.
pub struct Backing {
    pub nats_url: String,
    pub redis_url: String,
    /// Process ids of the servers started here, for their CPU time.
    pub pids: Vec<(&'static str, u32)>,
    /// The monitoring endpoint (`http://127.0.0.1:port`) of the NATS
    /// started here, for the operation counts (`/varz`, `/jsz`, `/connz`);
    /// none for a cluster, whose counts are spread over three nodes.
    pub monitor_url: Option<String>,
    _nats: Option<NatsServer>,
    _cluster: Option<NatsCluster>,
    /// The Redis started here (the chaos suite stops and restarts it).
    pub redis: Option<RedisServer>,
}

/// The names the CPU time of a cluster's nodes is reported under.
const CLUSTER_NODES: [&str; 3] = ["nats-server-n0", "nats-server-n1", "nats-server-n2"];

impl Backing {
    pub fn start(nats_url: Option<String>, redis_url: Option<String>) -> Self {
        Self::start_with(nats_url, redis_url, None, false)
    }

    /// [`Backing::start`], the NATS started here (when one is) with a
    /// monitoring port, three nodes in a cluster when `cluster` (the
    /// services are then told to keep three replicas of each stream), and,
    /// when `sync_always_conf` names a file, JetStream writing every
    /// message to disk before it is acknowledged (`sync_interval: always`,
    /// from a configuration file written there).
    pub fn start_with(
        nats_url: Option<String>,
        redis_url: Option<String>,
        sync_always_conf: Option<&Path>,
        cluster: bool,
    ) -> Self {
        let mut extra = Vec::new();
        if let Some(conf) = sync_always_conf.filter(|_| nats_url.is_none()) {
            std::fs::write(conf, "jetstream {\n  sync_interval: always\n}\n")
                .expect("write the nats-server configuration");
            extra.push("-c".to_owned());
            extra.push(conf.display().to_string());
        }
        let monitor_port = free_port();
        let (nats, nodes) = match (&nats_url, cluster) {
            (Some(_), _) => (None, None),
            (None, true) => {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                (None, Some(NatsCluster::start_with(&extra)))
            }
            (None, false) => {
                extra.extend(["-m".to_owned(), monitor_port.to_string()]);
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                (Some(NatsServer::start_with(&extra)), None)
            }
        };
        let monitor_url = nats
            .as_ref()
            .map(|_| format!("http://127.0.0.1:{monitor_port}"));
        let redis = redis_url.is_none().then(RedisServer::start);
        let mut pids = Vec::new();
        // nats-server is started with `-p -1`: its port is not on its
        // command line, but test-support knows its process.
        if let Some(pid) = nats.as_ref().and_then(NatsServer::pid) {
            pids.push(("nats-server", pid));
        }
        if let Some(nodes) = &nodes {
            for (i, name) in CLUSTER_NODES.iter().enumerate() {
                if let Some(pid) = nodes.pid(i) {
                    pids.push((*name, pid));
                }
            }
        }
        if let Some(pid) = redis.as_ref().and_then(|r| {
            let port = r.url().rsplit(':').next()?.parse().ok()?;
            find_server("redis-server", port)
        }) {
            pids.push(("redis-server", pid));
        }
        let started = nats
            .as_ref()
            .map(NatsServer::url)
            .or_else(|| nodes.as_ref().map(NatsCluster::url));
        Self {
            nats_url: nats_url.or(started).expect("a NATS given or started"),
            redis_url: redis_url.unwrap_or_else(|| redis.as_ref().expect("started").url()),
            pids,
            monitor_url,
            _nats: nats,
            _cluster: nodes,
            redis,
        }
    }

    /// The NATS URLs, one per node (`nats_url` is them comma-separated).
    pub fn nats_urls(&self) -> Vec<String> {
        self.nats_url.split(',').map(str::to_owned).collect()
    }
}

/// The process id of our child `name` listening on `port`: test-support
/// starts the servers without telling their ids, so /proc is searched for
/// a child of this process with that name and port in its command line.
fn find_server(name: &str, port: u16) -> Option<u32> {
    let me = std::process::id().to_string();
    let port = port.to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            // redis-server rewrites its command line to `redis-server host:port`.
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let mut words = text.split([' ', ':']);
            let named = words.next()?.ends_with(name);
            let on_port = words.any(|w| w == port);
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let parent = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .to_owned();
            (named && on_port && parent == me).then_some(pid)
        })
}

/// One service process (one replica of a service), killed on drop; it
/// keeps how it was started so it can be started again.
pub struct Service {
    pub name: &'static str,
    /// Which replica of `name` (0 for the first).
    pub replica: usize,
    child: Child,
    binary: PathBuf,
    env: HashMap<String, String>,
    log: PathBuf,
    /// `/ready` of this replica.
    pub ready_url: String,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(binary: &Path, env: &HashMap<String, String>, log: &Path) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))
    }

    /// `kill -9`: no drain, no goodbye; what it held is redelivered after
    /// the consumer's ack wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again (after [`Service::kill`]) as it was first started.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = Self::spawn(&self.binary, &self.env, &self.log)?;
        Ok(())
    }

    /// `name`, or `name#replica` when there are several.
    pub fn label(&self) -> String {
        format!("{}#{}", self.name, self.replica)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The health address variable of each worker service.
fn health_var(service: &str) -> Option<&'static str> {
    match service {
        "ingest" => Some("HERALD_INGEST_HEALTH_ADDR"),
        "matcher" => Some("HERALD_MATCHER_HEALTH_ADDR"),
        "deliverer" => Some("HERALD_DELIVERER_HEALTH_ADDR"),
        "log-writer" => Some("HERALD_LOG_WRITER_HEALTH_ADDR"),
        _ => None,
    }
}

pub struct Stack {
    pub services: Vec<Service>,
    pub admin_url: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Stack {
    /// Starts the five services from `bin_dir` and waits for `/ready` on each.
    pub async fn start(
        backing: &Backing,
        bin_dir: &Path,
        work_dir: &Path,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_replicas(backing, bin_dir, work_dir, extra_env, 1).await
    }

    /// Starts `workers` replicas of each worker service (ingest, matcher,
    /// deliverer, log-writer) and one admin, each replica its own process
    /// with its own health address, and waits for `/ready` on each.
    pub async fn start_replicas(
        backing: &Backing,
        bin_dir: &Path,
        work_dir: &Path,
        extra_env: &[(String, String)],
        workers: usize,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let keys_file = work_dir.join("keys.json");
        let keys = serde_json::json!({"keys": [{
            "key_sha256": hex::encode(Sha256::digest(API_KEY.as_bytes())),
            "organizations": ["*"],
            "default_organization": ORG,
        }]});
        std::fs::write(&keys_file, keys.to_string())?;
        let admin_addr = format!("127.0.0.1:{}", free_port());
        let mut env: HashMap<String, String> = HashMap::from([
            ("HERALD_NATS_URL".into(), backing.nats_url.clone()),
            ("HERALD_REDIS_URL".into(), backing.redis_url.clone()),
            ("HERALD_ADMIN_ADDR".into(), admin_addr.clone()),
            (
                "HERALD_API_KEYS_FILE".into(),
                keys_file.display().to_string(),
            ),
            (
                "HERALD_SECRET_KEY".into(),
                herald_core::secret::Keyring::generate_key_text(),
            ),
            ("HERALD_ALLOW_HTTP".into(), "true".into()),
            ("HERALD_ALLOW_PRIVATE_TARGETS".into(), "true".into()),
        ]);
        for (k, v) in extra_env {
            env.insert(k.clone(), v.clone());
        }

        let mut services = Vec::new();
        for name in SERVICES {
            let binary = bin_dir.join(format!("herald-{name}"));
            if !binary.is_file() {
                bail!(
                    "{} not found; build the services first: cargo build --release --bins",
                    binary.display()
                );
            }
            let replicas = if health_var(name).is_some() {
                workers.max(1)
            } else {
                1
            };
            for replica in 0..replicas {
                let mut env = env.clone();
                let ready_url = match health_var(name) {
                    Some(var) => {
                        let addr = format!("127.0.0.1:{}", free_port());
                        env.insert(var.into(), addr.clone());
                        format!("http://{addr}/ready")
                    }
                    None => {
                        let addr = format!("127.0.0.1:{}", free_port());
                        env.insert("HERALD_ADMIN_HEALTH_ADDR".into(), addr);
                        format!("http://{admin_addr}/ready")
                    }
                };
                let log = work_dir.join(if replicas > 1 {
                    format!("{name}-{replica}.log")
                } else {
                    format!("{name}.log")
                });
                let _ = std::fs::remove_file(&log);
                let child = Service::spawn(&binary, &env, &log)?;
                services.push(Service {
                    name,
                    replica,
                    child,
                    binary: binary.clone(),
                    env,
                    log,
                    ready_url,
                });
            }
        }
        let stack = Self {
            services,
            admin_url: format!("http://{admin_addr}"),
            http: Client::builder(TokioExecutor::new()).build_http(),
        };
        // Every replica creates the streams at start; ten of them asking a
        // three-node cluster at once for R3 streams take a while to agree.
        for i in 0..stack.services.len() {
            stack
                .wait_ready(i, Duration::from_secs(120))
                .await
                .with_context(|| format!("service logs are in {}", work_dir.display()))?;
        }
        Ok(stack)
    }

    /// Waits until service `i` answers `/ready` with 200.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let url = &self.services[i].ready_url;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.call("GET", url, None).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{url} not ready in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.call_in(ORG, method, url, body).await
    }

    /// [`Stack::call`] in organization `org` (`X-Organization-Id`).
    pub async fn call_in(
        &self,
        org: &str,
        method: &str,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let request = http::Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("x-organization-id", org)
            .header("content-type", "application/json")
            .body(Full::new(
                body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            ))?;
        let response =
            tokio::time::timeout(Duration::from_secs(10), self.http.request(request)).await??;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Creates a webhook to `url` for `event_type`; answers (id, secret).
    pub async fn create_webhook(
        &self,
        name: &str,
        url: &str,
        event_type: &str,
    ) -> anyhow::Result<(String, String)> {
        self.create_webhook_with(
            serde_json::json!({"name": name, "url": url, "event_types": [event_type]}),
        )
        .await
    }

    /// Creates a webhook from a full request body; its id and secret.
    pub async fn create_webhook_with(
        &self,
        body: serde_json::Value,
    ) -> anyhow::Result<(String, String)> {
        self.create_webhook_in(ORG, body).await
    }

    /// [`Stack::create_webhook_with`] in organization `org`.
    pub async fn create_webhook_in(
        &self,
        org: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<(String, String)> {
        let (status, json) = self
            .call_in(
                org,
                "POST",
                &format!("{}/webhooks", self.admin_url),
                Some(&body),
            )
            .await?;
        if status != 201 {
            bail!("create webhook: HTTP {status}: {json}");
        }
        let field = |f: &str| json[f].as_str().map(str::to_owned);
        match (field("id"), field("secret")) {
            (Some(id), Some(secret)) => Ok((id, secret)),
            _ => bail!("create webhook: unexpected answer {json}"),
        }
    }

    /// CPU seconds used so far by each service.
    pub fn cpu(&self) -> Vec<f64> {
        self.services.iter().map(|s| cpu_seconds(s.pid())).collect()
    }

    /// Peak resident memory (VmHWM) of each service, in MiB.
    pub fn peak_memory_mib(&self) -> Vec<f64> {
        self.services
            .iter()
            .map(|s| {
                std::fs::read_to_string(format!("/proc/{}/status", s.pid()))
                    .ok()
                    .and_then(|status| {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix("VmHWM:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    })
                    .map_or(0.0, |kb: f64| kb / 1024.0)
            })
            .collect()
    }

    /// Names of services that have exited (and were not killed on purpose).
    pub fn exited(&mut self) -> Vec<&'static str> {
        self.services
            .iter_mut()
            .filter_map(|s| matches!(s.child.try_wait(), Ok(Some(_))).then_some(s.name))
            .collect()
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Herald's durable consumers, by stream.
pub const CONSUMERS: [(&str, &str); 4] = [
    (names::EVENTS_STREAM, names::INGEST_CONSUMER),
    (names::ACCEPTED_STREAM, names::MATCHER_CONSUMER),
    (names::DELIVERIES_STREAM, names::DELIVERER_CONSUMER),
    (names::ATTEMPTS_STREAM, names::LOG_WRITER_CONSUMER),
];

/// Waits (up to 60 s, looking every `poll`) until every Herald consumer has
/// nothing pending.
pub async fn settle(js: &async_nats::jetstream::Context, poll: Duration) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    'wait: while std::time::Instant::now() < deadline {
        tokio::time::sleep(poll).await;
        for (stream, consumer) in CONSUMERS {
            let Ok(stream) = js.get_stream(stream).await else {
                continue 'wait;
            };
            match stream.consumer_info(consumer).await {
                Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
                _ => continue 'wait,
            }
        }
        return;
    }
    eprintln!("  consumers still busy after 60s; going on");
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_ticks(&stat))
        .map_or(0.0, |ticks| ticks as f64 / clock_ticks())
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; fields are counted
    // after its last ')'. What follows starts at field 3 (state); utime is
    // field 14 and stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
pub fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle + iowait
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The directory holding this binary (target/release under cargo run).
pub fn own_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_counts_fields_after_the_command_name() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    731 269 0 0 20 0 9 0 12345 123456789 4321 18446744073709551615";
        assert_eq!(stat_ticks(stat), Some(731 + 269));
        assert_eq!(stat_ticks("4242 (truncated"), None);
        assert_eq!(stat_ticks("4242 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_cpu_is_readable() {
        // Spin until the kernel has counted a tick of this process's CPU
        // (on a loaded machine 30 ms of wall time may not be one).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cpu_seconds(std::process::id()) <= 0.0 {
            assert!(std::time::Instant::now() < deadline, "no CPU time counted");
            let spin = std::time::Instant::now();
            while spin.elapsed() < Duration::from_millis(10) {}
        }
    }
}
