use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
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

/// A server process on a fixed loopback port with its own temporary
/// directory, killed on stop and on drop; what differs between servers is
/// only how to run them.
struct Server {
    name: &'static str,
    binary_var: &'static str,
    args: fn(port: u16, dir: &Path) -> Vec<OsString>,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(
        name: &'static str,
        binary_var: &'static str,
        args: fn(u16, &Path) -> Vec<OsString>,
    ) -> Self {
        let mut server = Self {
            name,
            binary_var,
            args,
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut child = Command::new(find_binary(self.name, self.binary_var))
            .args((self.args)(self.port, self.dir.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        wait_listening(self.port, &mut child, self.name);
        self.child = Some(child);
    }

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
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A real `nats-server` with JetStream, on 127.0.0.1.
pub struct NatsServer(Server);

impl NatsServer {
    pub fn start() -> Self {
        Self(Server::start(
            "nats-server",
            "NATS_SERVER_BIN",
            |port, dir| {
                let mut args = os(&["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]);
                args.push(dir.join("js").into());
                args
            },
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
}

/// A real `redis-server`, on 127.0.0.1, without persistence.
pub struct RedisServer(Server);

impl RedisServer {
    pub fn start() -> Self {
        Self(Server::start(
            "redis-server",
            "REDIS_SERVER_BIN",
            |port, dir| {
                let mut args = os(&[
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                ]);
                args.push(dir.into());
                args
            },
        ))
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
