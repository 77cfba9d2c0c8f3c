use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// Not one the kernel hands out as a client's source port: a port taken
/// with `bind(0)` and released comes from the ephemeral range, where the
/// next outgoing connection (to NATS, Redis, a receiver) may take it
/// before the server listens on it. So the port is drawn at random below
/// that range, checked free by binding it, and never given twice by one
/// process; what remains is two test processes drawing the same port in
/// the moment between the check and the server's bind, among thousands.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_start);
    if high <= low + 1000 {
        // No room below the ephemeral range: take what the kernel gives.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
    }
    let random = RandomState::new();
    let mut given = GIVEN.lock().expect("ports lock");
    let given = given.get_or_insert_with(HashSet::new);
    for attempt in 0u32.. {
        let draw = random.hash_one((std::process::id(), attempt, Instant::now()));
        let port = low + (draw % u64::from(high - low)) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
        assert!(attempt < 10_000, "no free port in {low}..{high}");
    }
    unreachable!()
}

fn find_binary(name: &str, env_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/usr/bin"),
        PathBuf::from("/usr/local/bin"),
    ];
    std::env::split_paths(&paths)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found on PATH (or {env_var}); `make test` installs it (scripts/install-deps.sh). \
                 Tests never skip a missing server{}",
                if std::env::var_os("CI").is_some() { " and CI=true is set" } else { "" }
            )
        })
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {port} within 20s");
}

/// How a server's port is chosen and learnt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Given on the command line and waited for (a cluster's nodes must
    /// know each other's ports before they start).
    Fixed,
    /// nats-server `-p -1`: the kernel picks a free port as the server
    /// binds it, and `--ports_file_dir` tells which. No race at all.
    NatsPortsFile,
    /// redis-server cannot bind port 0, so a port is drawn and the
    /// server's own log says whether it bound it ("Ready to accept
    /// connections"); a server that lost the port to another process
    /// exits, and another port is drawn.
    RedisLog,
}

type Args = Box<dyn Fn(u16, &Path) -> Vec<OsString> + Send + Sync>;

/// A server process on a loopback port with its own temporary directory,
/// killed on stop and on drop; what differs between servers is only how to
/// run them. A restart keeps the port it first had.
struct Server {
    name: &'static str,
    binary_var: &'static str,
    args: Args,
    how: Port,
    child: Option<Child>,
    /// 0 until the first start has found it.
    port: u16,
    // Kept for the server's life: removed on drop.
    dir: tempfile::TempDir,
}

impl Server {
    fn start(
        name: &'static str,
        binary_var: &'static str,
        how: Port,
        args: impl Fn(u16, &Path) -> Vec<OsString> + Send + Sync + 'static,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = if how == Port::Fixed { free_port() } else { 0 };
        Self::start_with(name, binary_var, how, port, dir, args)
    }

    fn start_with(
        name: &'static str,
        binary_var: &'static str,
        how: Port,
        port: u16,
        dir: tempfile::TempDir,
        args: impl Fn(u16, &Path) -> Vec<OsString> + Send + Sync + 'static,
    ) -> Self {
        let mut server = Self {
            name,
            binary_var,
            args: Box::new(args),
            how,
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn command(&self, port: u16) -> Command {
        let mut command = Command::new(find_binary(self.name, self.binary_var));
        command
            .args((self.args)(port, self.dir.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn spawn(&mut self) {
        let first = self.port == 0;
        for _ in 0..20 {
            let port = match self.how {
                Port::RedisLog if first => free_port(),
                _ => self.port,
            };
            let mut child = self
                .command(port)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
            let listening = match self.how {
                Port::Fixed => {
                    wait_listening(port, &mut child, self.name);
                    Some(port)
                }
                Port::NatsPortsFile => Some(wait_ports_file(self.dir.path(), &mut child)),
                Port::RedisLog => wait_redis_ready(self.dir.path(), &mut child).then_some(port),
            };
            match listening {
                Some(port) => {
                    self.port = port;
                    self.child = Some(child);
                    return;
                }
                // Another process had the port: draw another.
                None if first => continue,
                None => panic!("{} cannot listen on {} again", self.name, self.port),
            }
        }
        panic!("{} found no free port in 20 draws", self.name);
    }

    /// Kills the process (SIGKILL: no goodbye to its peers or clients).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client port a nats-server started with `-p -1 --ports_file_dir dir`
/// bound, from the file it writes there once it listens.
fn wait_ports_file(dir: &Path, child: &mut Child) -> u16 {
    let file = dir.join(format!("nats-server_{}.ports", child.id()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let port = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|ports| {
                let url = ports["nats"][0].as_str()?.to_owned();
                url.rsplit(':').next()?.parse::<u16>().ok()
            });
        if let Some(port) = port {
            return port;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nats-server wrote no ports file within 20s");
}

/// Whether a redis-server logging to `dir/redis.log` bound its port (its
/// log says it is ready), or exited (another process had it).
fn wait_redis_ready(dir: &Path, child: &mut Child) -> bool {
    let log = dir.join("redis.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Ready to accept connections") {
            // Only this start's lines count from now on.
            let _ = std::fs::remove_file(&log);
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            let _ = std::fs::remove_file(&log);
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server not ready within 20s");
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// nats-server's arguments for a JetStream server on 127.0.0.1 whose port
/// the kernel picks (`-p -1`) and `--ports_file_dir` reports; a restart
/// asks for the port it had.
fn nats_args(port: u16, dir: &Path, extra: &[String]) -> Vec<OsString> {
    let port = if port == 0 {
        "-1".to_owned()
    } else {
        port.to_string()
    };
    let mut args = os(&["-js", "-a", "127.0.0.1", "-p", &port, "-sd"]);
    args.push(dir.join("js").into());
    args.push("--ports_file_dir".into());
    args.push(dir.into());
    args.extend(extra.iter().map(OsString::from));
    args
}

/// A real `nats-server` with JetStream, on 127.0.0.1.
pub struct NatsServer(Server);

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with more arguments, e.g. `--auth <token>` or `--tls …`.
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self(Server::start(
            "nats-server",
            "NATS_SERVER_BIN",
            Port::NatsPortsFile,
            move |port, dir| nats_args(port, dir, &extra),
        ))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// Kills the server; its data stays for [`NatsServer::restart`].
    pub fn stop(&mut self) {
        self.0.stop();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.0.restart();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.0.pid()
    }
}

/// Three `nats-server`s with JetStream in one cluster (`herald`), on
/// 127.0.0.1: client, route and monitoring ports free ones, each node with
/// its own data directory, named `n0`, `n1`, `n2`. Every node is killed on
/// drop.
pub struct NatsCluster {
    nodes: Vec<Server>,
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts the nodes and waits until JetStream is up on each (a meta
    /// leader elected and every node caught up).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`NatsCluster::start`], with `extra` arguments for every node (a
    /// configuration file: `-c <path>`).
    pub fn start_with(extra: &[&str]) -> Self {
        const SIZE: usize = 3;
        let client: Vec<u16> = (0..SIZE).map(|_| free_port()).collect();
        let route: Vec<u16> = (0..SIZE).map(|_| free_port()).collect();
        let monitor: Vec<u16> = (0..SIZE).map(|_| free_port()).collect();
        let routes: Vec<String> = route
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let routes = routes.join(",");
        // Every node must be spawned before any can answer: wait_listening
        // waits for the client port only, which opens before the cluster
        // has formed.
        let nodes: Vec<Server> = (0..SIZE)
            .map(|i| {
                let dir = tempfile::tempdir().expect("temp dir");
                let mut args = os(&[
                    "-n",
                    &format!("n{i}"),
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &client[i].to_string(),
                    "-m",
                    &monitor[i].to_string(),
                    "--cluster_name",
                    "herald",
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", route[i]),
                    "--routes",
                    &routes,
                    "-sd",
                ]);
                args.push(dir.path().join("js").into());
                args.extend(os(extra));
                Server::start_with(
                    "nats-server",
                    "NATS_SERVER_BIN",
                    Port::Fixed,
                    client[i],
                    dir,
                    move |_, _| args.clone(),
                )
            })
            .collect();
        let cluster = Self {
            nodes,
            monitor_ports: monitor,
        };
        for i in 0..SIZE {
            cluster.wait_healthy(i, Duration::from_secs(30));
        }
        cluster
    }

    /// Each node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The nodes as `HERALD_NATS_URL` takes them: comma-separated.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// The server name of node `i` (`n0`…), as stream and consumer infos
    /// name their leader.
    pub fn name(&self, i: usize) -> String {
        format!("n{i}")
    }

    /// Which node a server name (a leader's, say) is.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|i| self.name(*i) == server_name)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Kills node `i` (SIGKILL); its data stays for [`NatsCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again, same ports and data, and waits until it is
    /// healthy (rejoined and caught up).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].stop();
        self.nodes[i].spawn();
        self.wait_healthy(i, Duration::from_secs(30));
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].pid()
    }

    /// The node leading the JetStream meta group (which places streams and
    /// consumers), from a running node's `/jsz`.
    pub fn meta_leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|i| self.is_running(*i))
            .find_map(|i| {
                let (status, body) = http_get(self.monitor_ports[i], "/jsz")?;
                if status != 200 {
                    return None;
                }
                let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
                self.index_of(jsz["meta_cluster"]["leader"].as_str()?)
            })
    }

    /// The node leading `stream`'s replicas, asked with
    /// `$JS.API.STREAM.INFO.<stream>` of any running node.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let urls: Vec<String> = (0..self.nodes.len())
            .filter(|i| self.is_running(*i))
            .map(|i| self.urls()[i].clone())
            .collect();
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(urls)
            .await
            .ok()?;
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        let reply =
            tokio::time::timeout(Duration::from_secs(5), client.request(subject, "".into()))
                .await
                .ok()?
                .ok()?;
        let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
        self.index_of(info["cluster"]["leader"].as_str()?)
    }

    /// Waits until node `i` answers `/healthz` with 200: JetStream enabled,
    /// the meta group known, its streams and consumers current.
    fn wait_healthy(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = http_get(self.monitor_ports[i], "/healthz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats node n{i} not healthy within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1: status and body (the monitoring
/// port needs nothing more).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// redis-server's arguments: 127.0.0.1:`port`, no persistence, logging to
/// `dir/redis.log` (where [`Port::RedisLog`] reads that it bound the port),
/// then `extra`.
fn redis_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args = os(&[
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
    ]);
    args.push(dir.join("redis.log").into());
    args.push("--dir".into());
    args.push(dir.into());
    args.extend(os(extra));
    args
}

fn redis(extra: &'static [&'static str]) -> Server {
    Server::start(
        "redis-server",
        "REDIS_SERVER_BIN",
        Port::RedisLog,
        move |port, dir| redis_args(port, dir, extra),
    )
}

/// A real `redis-server`, on 127.0.0.1, without persistence.
pub struct RedisServer(Server);

impl RedisServer {
    pub fn start() -> Self {
        Self(redis(&[]))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port)
    }

    pub fn stop(&mut self) {
        self.0.stop();
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.0.restart();
    }
}

/// A real Redis Cluster of three masters (no replicas) on 127.0.0.1, made
/// with `redis-cli --cluster create`; every node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<Server>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<Server> = (0..3)
            .map(|_| {
                Server::start(
                    "redis-server",
                    "REDIS_SERVER_BIN",
                    Port::RedisLog,
                    |port, dir| {
                        let config = dir.join("nodes.conf");
                        let mut args = redis_args(
                            port,
                            dir,
                            &[
                                "--cluster-enabled",
                                "yes",
                                "--cluster-node-timeout",
                                "2000",
                                "--cluster-config-file",
                            ],
                        );
                        args.push(config.into());
                        args
                    },
                )
            })
            .collect();
        let cli = find_binary("redis-cli", "REDIS_CLI_BIN");
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        // Wait until every node agrees the cluster is up.
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &cluster.nodes {
            loop {
                let info = Command::new(&cli)
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "redis cluster not ok within 20s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// The nodes as `HERALD_REDIS_URL` takes them: `redis+cluster://a,b,c`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Each node's own URL (to read what it holds).
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }
}

impl RedisServer {
    /// A server with `maxmemory 8mb` and `noeviction`: once full it refuses
    /// writes, as a production Redis does.
    pub fn start_small() -> Self {
        Self(redis(&[
            "--maxmemory",
            "8mb",
            "--maxmemory-policy",
            "noeviction",
        ]))
    }
}
