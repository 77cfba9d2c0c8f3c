//! Configuration is read from an environment *source*: the process
//! environment in production, a map in tests (no `set_var`). Every value is
//! parsed and validated before a service connects to anything; a bad value
//! is a [`ConfigError`] naming the variable, and the binary exits with 64.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use herald_core::duration::parse_duration;

/// Where configuration values come from.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Source for HashMap<&str, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl<const N: usize> Source for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

/// A configuration variable with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_owned(),
            message: message.into(),
        }
    }
}

/// A value that cannot be taken, and why, before it is known which setting
/// it came from ([`Invalid::of`] names it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// The error of setting `var` to this value.
    pub fn of(self, var: &str) -> ConfigError {
        ConfigError::new(var, self.0)
    }
}

pub const NATS_URL: &str = "HERALD_NATS_URL";
pub const REDIS_URL: &str = "HERALD_REDIS_URL";
pub const LOG_REDIS_URL: &str = "HERALD_LOG_REDIS_URL";
pub const STREAM_REPLICAS: &str = "HERALD_STREAM_REPLICAS";
pub const SHUTDOWN_GRACE: &str = "HERALD_SHUTDOWN_GRACE";

/// Reads `var`, or `default` when unset or empty.
pub fn string(src: &dyn Source, var: &str, default: &str) -> String {
    src.get(var)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Reads `var` when set and not empty.
pub fn optional(src: &dyn Source, var: &str) -> Option<String> {
    src.get(var).filter(|v| !v.trim().is_empty())
}

/// Reads `var`; it must be set.
pub fn required(src: &dyn Source, var: &str) -> Result<String, ConfigError> {
    optional(src, var).ok_or_else(|| ConfigError::new(var, "must be set"))
}

/// Parses `var` with `FromStr`, or `default` when unset.
pub fn parse<T: FromStr>(src: &dyn Source, var: &str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match optional(src, var) {
        None => Ok(default),
        Some(text) => text
            .trim()
            .parse()
            .map_err(|e| ConfigError::new(var, format!("{text:?}: {e}"))),
    }
}

/// Parses a number in `range`.
pub fn number<T>(
    src: &dyn Source,
    var: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy,
    T::Err: std::fmt::Display,
{
    let value = parse(src, var, default)?;
    if !range.contains(&value) {
        return Err(ConfigError::new(
            var,
            format!("{value} is outside {}..={}", range.start(), range.end()),
        ));
    }
    Ok(value)
}

/// Parses `true`/`false` (also `1`/`0`, `yes`/`no`).
pub fn boolean(src: &dyn Source, var: &str, default: bool) -> Result<bool, ConfigError> {
    match optional(src, var).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
        Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
        Some(v) => Err(ConfigError::new(var, format!("{v:?} is not true or false"))),
    }
}

/// Parses a duration like `250ms`, `5s`, `7d`.
pub fn duration(src: &dyn Source, var: &str, default: Duration) -> Result<Duration, ConfigError> {
    match optional(src, var) {
        None => Ok(default),
        Some(text) => parse_duration(&text).map_err(|e| ConfigError::new(var, e.to_string())),
    }
}

/// Parses a socket address like `127.0.0.1:8080`.
/// Where a server listens: an address to bind (port 0: any free one), or
/// a socket bound already. A test binds port 0 itself and keeps the socket
/// for as long as its stack lives, so it knows the port before the service
/// starts, a restarted service listens on the same one, and no other
/// process can take it in between (a "free port" looked up and bound later
/// could be).
#[derive(Debug, Clone)]
pub enum Listen {
    Addr(SocketAddr),
    Bound(std::sync::Arc<std::net::TcpListener>),
}

impl Listen {
    /// Binds a socket on `addr` to be handed to services: `127.0.0.1:0` for
    /// a port of the system's choosing.
    pub fn bound(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self::Bound(std::sync::Arc::new(
            std::net::TcpListener::bind(addr)?,
        )))
    }

    /// The address it listens on (for a bound socket, the port it got).
    pub fn addr(&self) -> SocketAddr {
        match self {
            Listen::Addr(addr) => *addr,
            Listen::Bound(listener) => listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }

    /// A listener for the server to accept on: bound now, or the bound
    /// socket shared (each call a handle of its own on the same socket).
    pub async fn listener(&self) -> std::io::Result<tokio::net::TcpListener> {
        match self {
            Listen::Addr(addr) => tokio::net::TcpListener::bind(addr).await,
            Listen::Bound(listener) => {
                let listener = listener.try_clone()?;
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            }
        }
    }
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Listen::Addr(addr)
    }
}

/// A server's address from `var` (`default` when unset).
pub fn listen(src: &dyn Source, var: &str, default: &str) -> Result<Listen, ConfigError> {
    addr(src, var, default).map(Listen::Addr)
}

pub fn addr(src: &dyn Source, var: &str, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = string(src, var, default);
    text.parse().map_err(|_| {
        ConfigError::new(
            var,
            format!("{text:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

pub const NATS_TOKEN: &str = "HERALD_NATS_TOKEN";
pub const NATS_CREDS: &str = "HERALD_NATS_CREDS";
pub const NATS_NKEY: &str = "HERALD_NATS_NKEY";
pub const NATS_TLS_CA: &str = "HERALD_NATS_TLS_CA";
pub const NATS_TLS_CERT: &str = "HERALD_NATS_TLS_CERT";
pub const NATS_TLS_KEY: &str = "HERALD_NATS_TLS_KEY";
pub const NATS_TLS_REQUIRED: &str = "HERALD_NATS_TLS_REQUIRED";

/// How a service proves who it is to NATS (one way at a time).
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Auth {
    #[default]
    None,
    /// `nats://user:password@host`.
    UserPassword { user: String, password: String },
    /// `HERALD_NATS_TOKEN`, or `nats://token@host`.
    Token(String),
    /// `HERALD_NATS_NKEY`: a user NKey seed.
    Nkey(String),
    /// `HERALD_NATS_CREDS`: a credentials file (user JWT and NKey seed).
    Creds(std::path::PathBuf),
}

/// Secrets never appear in a `Debug` (configurations are logged).
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Auth::Token(_) => f.write_str("Token(***)"),
            Auth::Nkey(_) => f.write_str("Nkey(***)"),
            Auth::Creds(path) => write!(f, "Creds({})", path.display()),
        }
    }
}

/// TLS to NATS: a `tls://` URL, a server that requires it, or
/// `HERALD_NATS_TLS_REQUIRED` turn it on; the system roots are trusted
/// unless a CA file is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// `HERALD_NATS_TLS_CA`: PEM roots to trust.
    pub ca: Option<std::path::PathBuf>,
    /// `HERALD_NATS_TLS_CERT` and `HERALD_NATS_TLS_KEY`: a client
    /// certificate, for servers that verify clients.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// `HERALD_NATS_TLS_REQUIRED`: refuse a server that does not speak TLS.
    pub required: bool,
}

/// The largest size, in bytes, of each stream (0: no limit). A stream at
/// its limit refuses new messages (JetStream `discard: new`): whoever
/// publishes gets an error and keeps the work, nothing stored is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaxBytes {
    pub events: i64,
    pub accepted: i64,
    pub rejected: i64,
    pub deliveries: i64,
    pub attempts: i64,
    pub system: i64,
    pub parked: i64,
    pub dead: i64,
}

/// Stream retention Herald uses.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Producers' events and delivery jobs: long enough to outlive the
    /// longest retry delay.
    pub work: Duration,
    /// Accepted events, which replay and manual retry read back
    /// (`HERALD_EVENT_RETENTION`).
    pub events: Duration,
    /// Attempt results: the log retention, so the index can be rebuilt.
    pub attempts: Duration,
    /// Whether this service owns the attempts stream's retention (only
    /// log-writer, which reads `HERALD_LOG_RETENTION`): others create the
    /// stream when it is missing but never change an existing one's.
    pub owns_attempts: bool,
    pub max_bytes: MaxBytes,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            work: Duration::from_secs(3 * 86_400),
            events: Duration::from_secs(7 * 86_400),
            attempts: Duration::from_secs(7 * 86_400),
            owns_attempts: false,
            max_bytes: MaxBytes::default(),
        }
    }
}

impl Retention {
    /// The retention settings every service reads from its environment.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            events: event_retention(src)?,
            max_bytes: stream_max_bytes(src)?,
            ..Self::default()
        })
    }
}

/// Settings every service that talks to NATS shares.
#[derive(Debug, Clone)]
pub struct Nats {
    /// The servers to try, in order (`HERALD_NATS_URL`, comma-separated),
    /// without credentials (those are in `auth`). The client learns the
    /// rest of a cluster from the first one it reaches.
    pub servers: Vec<async_nats::ServerAddr>,
    pub auth: Auth,
    pub tls: Tls,
    /// Replicas of the streams and bucket a service creates (3 on a cluster).
    pub replicas: usize,
    /// Retention and size limits of the streams (give every service the
    /// same values: each creates and updates the streams it uses).
    pub streams: Retention,
}

impl Nats {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let (servers, url_auth) = nats_servers(&string(src, NATS_URL, "nats://127.0.0.1:4222"))?;
        Ok(Self {
            servers,
            auth: nats_auth(src, url_auth)?,
            tls: nats_tls(src)?,
            replicas: number(src, STREAM_REPLICAS, 1usize, 1..=5)?,
            streams: Retention::from_source(src)?,
        })
    }

    /// The servers as one line for messages (no credentials).
    pub fn urls(&self) -> String {
        let urls: Vec<&str> = self.servers.iter().map(|s| s.as_url_str()).collect();
        urls.join(",")
    }
}

/// Splits `HERALD_NATS_URL` into its servers, and takes out the
/// `user:password@` (or `token@`) they carry: async-nats ignores credentials
/// in a URL, so they become the connection's `Auth`. Every server that
/// carries credentials must carry the same.
fn nats_servers(text: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<Auth>), ConfigError> {
    let bad = |message: String| ConfigError::new(NATS_URL, message);
    let mut servers = Vec::new();
    let mut auth: Option<Auth> = None;
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad(format!("{text:?} has an empty server in its list")));
        }
        let with_scheme = if part.contains("://") {
            part.to_owned()
        } else {
            format!("nats://{part}")
        };
        let mut url = url::Url::parse(&with_scheme).map_err(|e| {
            bad(format!(
                "{:?} is not a NATS URL like nats://host:4222: {e}",
                redact(part)
            ))
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("{:?} has no host", redact(part))));
        }
        if !matches!(url.scheme(), "nats" | "tls") {
            return Err(bad(format!(
                "{:?}: the scheme must be nats:// or tls://",
                redact(part)
            )));
        }
        let user = percent_decode(url.username());
        let here = match (user.is_empty(), url.password()) {
            (true, _) => None,
            (false, None) => Some(Auth::Token(user)),
            (false, Some(password)) => Some(Auth::UserPassword {
                user,
                password: percent_decode(password),
            }),
        };
        if let Some(here) = here {
            match &auth {
                Some(first) if *first != here => {
                    return Err(bad(
                        "servers carry different credentials; give them once (every server gets the same)"
                            .into(),
                    ));
                }
                _ => auth = Some(here),
            }
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
        servers.push(async_nats::ServerAddr::from_url(url).map_err(|e| bad(e.to_string()))?);
    }
    Ok((servers, auth))
}

/// `part` with what sits between `://` and `@` hidden, for messages.
fn redact(part: &str) -> String {
    match (part.find("://"), part.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &part[..s + 3], &part[at..]),
        (None, Some(at)) => format!("***{}", &part[at..]),
        _ => part.to_owned(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One way to authenticate: credentials in the URL, `HERALD_NATS_TOKEN`,
/// `HERALD_NATS_NKEY` or `HERALD_NATS_CREDS`; two at once is an error.
fn nats_auth(src: &dyn Source, from_url: Option<Auth>) -> Result<Auth, ConfigError> {
    let mut chosen: Vec<(&str, Auth)> = Vec::new();
    if let Some(auth) = from_url {
        chosen.push((NATS_URL, auth));
    }
    if let Some(token) = optional(src, NATS_TOKEN) {
        chosen.push((NATS_TOKEN, Auth::Token(token.trim().to_owned())));
    }
    if let Some(seed) = optional(src, NATS_NKEY) {
        let seed = seed.trim().to_owned();
        let base32 = seed
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
        if !(seed.starts_with("SU") && seed.len() == 58 && base32) {
            return Err(ConfigError::new(
                NATS_NKEY,
                "is not a user NKey seed (58 characters starting with SU, as `nk -gen user` prints)",
            ));
        }
        chosen.push((NATS_NKEY, Auth::Nkey(seed)));
    }
    if let Some(path) = optional(src, NATS_CREDS) {
        let path = std::path::PathBuf::from(path.trim());
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::new(NATS_CREDS, format!("cannot read {}: {e}", path.display()))
        })?;
        if let Err(e) = async_nats::ConnectOptions::with_credentials(&text) {
            return Err(ConfigError::new(
                NATS_CREDS,
                format!("{} is not a NATS credentials file: {e}", path.display()),
            ));
        }
        chosen.push((NATS_CREDS, Auth::Creds(path)));
    }
    match chosen.len() {
        0 => Ok(Auth::None),
        1 => Ok(chosen.remove(0).1),
        _ => Err(ConfigError::new(
            chosen[1].0,
            format!(
                "give NATS one way to authenticate; {} is set too",
                chosen[0].0
            ),
        )),
    }
}

fn readable_file(src: &dyn Source, var: &str) -> Result<Option<std::path::PathBuf>, ConfigError> {
    let Some(path) = optional(src, var).map(|p| std::path::PathBuf::from(p.trim())) else {
        return Ok(None);
    };
    std::fs::File::open(&path)
        .map_err(|e| ConfigError::new(var, format!("cannot read {}: {e}", path.display())))?;
    Ok(Some(path))
}

fn nats_tls(src: &dyn Source) -> Result<Tls, ConfigError> {
    let ca = readable_file(src, NATS_TLS_CA)?;
    let client_cert = match (
        readable_file(src, NATS_TLS_CERT)?,
        readable_file(src, NATS_TLS_KEY)?,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                NATS_TLS_KEY,
                format!("must be set with {NATS_TLS_CERT}"),
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                NATS_TLS_CERT,
                format!("must be set with {NATS_TLS_KEY}"),
            ));
        }
    };
    Ok(Tls {
        ca,
        client_cert,
        required: boolean(src, NATS_TLS_REQUIRED, false)?,
    })
}

/// The Redis URL (one server, or a cluster's nodes), checked for form.
pub fn redis_url(src: &dyn Source) -> Result<String, ConfigError> {
    let url = string(src, REDIS_URL, "redis://127.0.0.1:6379");
    crate::redis::parse_url(&url).map_err(|e| e.of(REDIS_URL))?;
    Ok(url)
}

/// The Redis of the delivery-log index: `HERALD_LOG_REDIS_URL`, or
/// `HERALD_REDIS_URL` when that is unset.
pub fn log_redis_url(src: &dyn Source) -> Result<String, ConfigError> {
    match optional(src, LOG_REDIS_URL) {
        None => redis_url(src),
        Some(url) => {
            crate::redis::parse_url(&url).map_err(|e| e.of(LOG_REDIS_URL))?;
            Ok(url.trim().to_owned())
        }
    }
}

pub const EVENT_RETENTION: &str = "HERALD_EVENT_RETENTION";

/// How long accepted events are kept for replay and manual retry.
pub fn event_retention(src: &dyn Source) -> Result<Duration, ConfigError> {
    let d = duration(src, EVENT_RETENTION, Duration::from_secs(7 * 86_400))?;
    if d < Duration::from_secs(60) {
        return Err(ConfigError::new(EVENT_RETENTION, "must be at least 1m"));
    }
    Ok(d)
}

/// A byte size: a number with an optional unit (`KiB`, `MiB`, `GiB`,
/// `TiB`; `k`/`m`/`g`/`t` the same), 0 for no limit.
pub fn bytes(src: &dyn Source, var: &str) -> Result<i64, ConfigError> {
    let Some(text) = optional(src, var) else {
        return Ok(0);
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(ConfigError::new(var, format!("{text:?}: unknown unit"))),
    };
    digits
        .parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| ConfigError::new(var, format!("{text:?} is not a size like 10GiB")))
}

/// The `HERALD_<STREAM>_MAX_BYTES` settings.
pub fn stream_max_bytes(src: &dyn Source) -> Result<MaxBytes, ConfigError> {
    Ok(MaxBytes {
        events: bytes(src, "HERALD_EVENTS_MAX_BYTES")?,
        accepted: bytes(src, "HERALD_ACCEPTED_MAX_BYTES")?,
        rejected: bytes(src, "HERALD_REJECTED_MAX_BYTES")?,
        deliveries: bytes(src, "HERALD_DELIVERIES_MAX_BYTES")?,
        attempts: bytes(src, "HERALD_ATTEMPTS_MAX_BYTES")?,
        system: bytes(src, "HERALD_SYSTEM_MAX_BYTES")?,
        parked: bytes(src, "HERALD_PARKED_MAX_BYTES")?,
        dead: bytes(src, "HERALD_DEAD_MAX_BYTES")?,
    })
}

/// How long a service may take to drain on SIGTERM.
pub fn shutdown_grace(src: &dyn Source) -> Result<Duration, ConfigError> {
    duration(src, SHUTDOWN_GRACE, Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bound_socket_keeps_its_port_for_each_server_started_on_it() {
        let at = Listen::bound("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = at.addr().port();
        assert_ne!(port, 0);
        for _ in 0..2 {
            // A server started, then stopped (its listener dropped): the
            // next one listens on the same port.
            let listener = at.listener().await.unwrap();
            assert_eq!(listener.local_addr().unwrap().port(), port);
            let connect = tokio::net::TcpStream::connect(at.addr());
            let (accepted, connected) = tokio::join!(listener.accept(), connect);
            accepted.unwrap();
            connected.unwrap();
        }
        let env: HashMap<String, String> = [("A".to_owned(), "127.0.0.1:0".to_owned())].into();
        let Listen::Addr(addr) = listen(&env, "A", "127.0.0.1:1").unwrap() else {
            panic!("an address from the environment is bound by the server");
        };
        assert_eq!(addr.port(), 0);
    }

    #[test]
    fn parsing_names_the_variable() {
        let src = &[
            ("A", "x"),
            ("B", "70"),
            ("C", "maybe"),
            ("D", "5 s"),
            ("E", "localhost"),
        ];
        assert_eq!(number(src, "B", 1u32, 1..=64).unwrap_err().var, "B");
        assert_eq!(number(src, "A", 1u32, 1..=64).unwrap_err().var, "A");
        assert_eq!(boolean(src, "C", false).unwrap_err().var, "C");
        assert_eq!(duration(src, "D", Duration::ZERO).unwrap_err().var, "D");
        assert_eq!(addr(src, "E", "").unwrap_err().var, "E");
        assert_eq!(number(src, "UNSET", 7u32, 1..=64), Ok(7));
        assert!(boolean(&[("X", "TRUE")], "X", false).unwrap());
    }

    #[test]
    fn sizes_take_units() {
        for (text, expected) in [
            ("0", Some(0)),
            ("1024", Some(1024)),
            ("10GiB", Some(10 << 30)),
            ("5 m", Some(5 << 20)),
            ("2TB", Some(2 << 40)),
            ("x", None),
            ("-1", None),
            ("9999999999T", None),
        ] {
            let got = bytes(&[("S", text)], "S").ok();
            assert_eq!(got, expected, "{text}");
        }
        assert_eq!(bytes(&[("S", "")], "S"), Ok(0));
    }

    /// `HERALD_NATS_URL` → the servers (as URLs) and the auth taken from
    /// them, or the error's message.
    fn servers(text: &str) -> Result<(Vec<String>, String), String> {
        Nats::from_source(&[(NATS_URL, text)])
            .map(|n| {
                let urls = n.servers.iter().map(|s| s.as_url_str().to_owned());
                (urls.collect(), format!("{:?}", n.auth))
            })
            .map_err(|e| {
                assert_eq!(e.var, NATS_URL);
                e.message
            })
    }

    #[test]
    fn nats_url_takes_a_list_and_credentials() {
        let ok = |urls: &[&str], auth: &str| {
            Ok((
                urls.iter().map(|u| u.to_string()).collect(),
                auth.to_owned(),
            ))
        };
        for (text, expected) in [
            (
                "nats://127.0.0.1:4222",
                ok(&["nats://127.0.0.1:4222"], "None"),
            ),
            (
                "nats://a:4222,nats://b:4223, nats://c:4224",
                ok(&["nats://a:4222", "nats://b:4223", "nats://c:4224"], "None"),
            ),
            ("a:4222,b", ok(&["nats://a:4222", "nats://b"], "None")),
            (
                "tls://nats.example:4222",
                ok(&["tls://nats.example:4222"], "None"),
            ),
            (
                "nats://herald:s%40cret@a:4222,nats://b:4222",
                ok(
                    &["nats://a:4222", "nats://b:4222"],
                    "UserPassword(herald, ***)",
                ),
            ),
            (
                "nats://herald:x@a:4222,nats://herald:x@b:4222",
                ok(
                    &["nats://a:4222", "nats://b:4222"],
                    "UserPassword(herald, ***)",
                ),
            ),
            ("nats://t0ken@a:4222", ok(&["nats://a:4222"], "Token(***)")),
        ] {
            assert_eq!(servers(text), expected, "{text}");
        }
        for (text, message) in [
            ("nats://a:4222,", "empty server"),
            ("nats://a:notaport", "not a NATS URL"),
            ("http://a:4222", "scheme must be nats:// or tls://"),
            ("nats://u:one@a,nats://u:two@b", "different credentials"),
        ] {
            let error = servers(text).expect_err(text);
            assert!(error.contains(message), "{text}: {error}");
            assert!(
                !error.contains("one") || !text.contains("one@"),
                "{error} shows a password"
            );
        }
        let pass = Nats::from_source(&[(NATS_URL, "nats://u:hunter2@a:bad")]).unwrap_err();
        assert!(!pass.message.contains("hunter2"), "{pass}");
    }

    #[test]
    fn nats_auth_is_one_way_and_checked() {
        let dir = tempfile_dir();
        let creds = dir.join("herald.creds");
        std::fs::write(&creds, CREDS).unwrap();
        let not_creds = dir.join("not.creds");
        std::fs::write(&not_creds, "hello").unwrap();
        let (creds, not_creds) = (creds.display().to_string(), not_creds.display().to_string());
        let seed = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU";
        let auth = |vars: &[(&str, &str)]| {
            let src: HashMap<&str, String> =
                vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
            Nats::from_source(&src).map(|n| format!("{:?}", n.auth))
        };
        assert_eq!(auth(&[(NATS_TOKEN, "s3cret")]), Ok("Token(***)".into()));
        assert_eq!(auth(&[(NATS_NKEY, seed)]), Ok("Nkey(***)".into()));
        assert_eq!(auth(&[(NATS_CREDS, &creds)]), Ok(format!("Creds({creds})")));
        for (vars, var) in [
            (vec![(NATS_NKEY, "SUshort")], NATS_NKEY),
            (vec![(NATS_CREDS, "/nonexistent/herald.creds")], NATS_CREDS),
            (vec![(NATS_CREDS, not_creds.as_str())], NATS_CREDS),
            (vec![(NATS_TOKEN, "t"), (NATS_NKEY, seed)], NATS_NKEY),
            (
                vec![(NATS_URL, "nats://u:p@a"), (NATS_TOKEN, "t")],
                NATS_TOKEN,
            ),
        ] {
            assert_eq!(auth(&vars).unwrap_err().var, var, "{vars:?}");
        }
    }

    #[test]
    fn nats_tls_files_must_be_readable_and_paired() {
        let dir = tempfile_dir();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----").unwrap();
        let pem = pem.display().to_string();
        let tls = |vars: &[(&str, &str)]| {
            let src: HashMap<&str, String> =
                vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
            Nats::from_source(&src).map(|n| n.tls)
        };
        let got = tls(&[
            (NATS_TLS_CA, &pem),
            (NATS_TLS_CERT, &pem),
            (NATS_TLS_KEY, &pem),
            (NATS_TLS_REQUIRED, "true"),
        ])
        .unwrap();
        assert!(got.required && got.ca.is_some() && got.client_cert.is_some());
        assert_eq!(tls(&[]).unwrap(), Tls::default());
        for (vars, var) in [
            (vec![(NATS_TLS_CA, "/nonexistent/ca.pem")], NATS_TLS_CA),
            (vec![(NATS_TLS_CERT, pem.as_str())], NATS_TLS_KEY),
            (vec![(NATS_TLS_KEY, pem.as_str())], NATS_TLS_CERT),
            (vec![(NATS_TLS_REQUIRED, "maybe")], NATS_TLS_REQUIRED),
        ] {
            assert_eq!(tls(&vars).unwrap_err().var, var, "{vars:?}");
        }
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "herald-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A user credentials file in the form `nsc` writes (the JWT is not
    /// checked by the client, the seed is the one async-nats documents).
    const CREDS: &str = "-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJMN1dBT1hJU0tPSUZNM1QyNEhMQ09ENzJRT1czQkNVWEdETjRKVU1SSUtHTlQ3RzdZVFRRIiwiaWF0IjoxNjUxNzkwOTgyLCJpc3MiOiJBRFRRUzdaQ0ZWSk5XNTcyNkdPWVhXNVRTQ1pGTklRU0hLMlpHWVVCQ0Q1RDc3T1ROTE9PS1pPWiIsIm5hbWUiOiJUZXN0VXNlciIsInN1YiI6IlVBRkhHNkZVRDJVVTRTREZWQUZVTDVMREZPMlhNNFdZTTc2VU5YVFBKWUpLN0VFTVlSQkhUMlZFIiwibmF0cyI6eyJwdWIiOnt9LCJzdWIiOnt9LCJzdWJzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJ0eXBlIjoidXNlciIsInZlcnNpb24iOjJ9fQ.bp2-Jsy33l4ayF7Ku1MNdJby4WiMKUrG-rSVYGBusAtV3xP4EdCa-zhSNUaBVIL3uYPPCQYCEoM1pCUdOnoJBg
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM
------END USER NKEY SEED------
";
}
