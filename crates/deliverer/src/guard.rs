//! SSRF protection: which addresses Herald refuses to connect to, and the
//! connector pieces that enforce it on the address actually connected to.
//!
//! A host name is resolved by [`GuardedResolver`], which drops every refused
//! address before the connector sees the list, so a name that resolves to
//! loopback (or re-resolves to it later: DNS rebinding) is never connected
//! to. An IP-literal host never reaches a resolver, so [`Guarded`] checks it
//! before connecting. Both answer errors that [`crate::http`] recognizes in
//! the error chain: [`Refused`] is the endpoint's failure, [`DnsError`] may be
//! Herald's own, [`LocalNetwork`] is.
//!
//! Lookups run on bounded terms ([`Lookups`]): one lookup in flight per name
//! (others asking for it share its answer), a few per domain, [`MAX_LOOKUPS`]
//! in all, so a tenant whose name servers never answer holds a few of the
//! system resolver's blocking threads, never all of them. A name whose
//! lookups time out while other names resolve is the tenant's failure after
//! a grace period (`herald_core::egress::Lookups`); before that, Herald's.
//!
//! A connection that fails because the local side has no network (no route
//! to the address in Herald's own routing table, the network down, no usable
//! source address) is Herald's failure ([`LocalNetwork`]), never the
//! receiver's.

use std::collections::HashMap;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::FutureExt;

use hyper_util::client::legacy::connect::dns::Name;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an address is refused, or `None` when Herald may connect to it.
pub fn refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
        ([100, 64, 0, 0], 10, "shared address space (100.64.0.0/10)"),
        ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
        ([169, 254, 169, 254], 32, "cloud metadata (169.254.169.254)"),
        ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
        ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
        (
            [192, 0, 0, 0],
            24,
            "IETF protocol assignments (192.0.0.0/24)",
        ),
        ([192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"),
        ([192, 88, 99, 0], 24, "6to4 relay anycast (192.88.99.0/24)"),
        ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
        ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
        ([198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"),
        ([203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"),
        ([224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"),
        ([255, 255, 255, 255], 32, "broadcast (255.255.255.255)"),
        ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    // Forms that carry an IPv4 address are judged by that address.
    if in_v6(ip, [0, 0, 0, 0, 0, 0xffff, 0, 0], 96) {
        return refused_v4(Ipv4Addr::from(bits as u32));
    }
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return refused_v4(Ipv4Addr::from(bits as u32));
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return refused_v4(Ipv4Addr::from((bits >> 80) as u32));
    }
    const RANGES: &[([u16; 8], u32, &str)] = &[
        ([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified (::)"),
        ([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback (::1)"),
        (
            [0, 0, 0, 0, 0, 0, 0, 0],
            96,
            "IPv4-compatible IPv6 (::/96, deprecated)",
        ),
        (
            [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
            48,
            "local-use NAT64 (64:ff9b:1::/48)",
        ),
        ([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only (100::/64)"),
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo (2001::/32)"),
        (
            [0x2001, 0x2, 0, 0, 0, 0, 0, 0],
            48,
            "benchmarking (2001:2::/48)",
        ),
        (
            [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
            32,
            "documentation (2001:db8::/32)",
        ),
        (
            [0x3fff, 0, 0, 0, 0, 0, 0, 0],
            20,
            "documentation (3fff::/20)",
        ),
        (
            [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254],
            128,
            "cloud metadata (fd00:ec2::254)",
        ),
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique-local (fc00::/7)"),
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local (fe80::/10)"),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local (fec0::/10)"),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast (ff00::/8)"),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

/// The target's address is one Herald refuses to connect to.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused to connect to {host}: {reason}; only public addresses are allowed")]
pub struct Refused {
    pub host: String,
    pub reason: String,
}

/// Resolving the target's host name failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resolve {host}: {message}")]
pub struct DnsError {
    pub host: String,
    pub message: String,
    /// The name's own fault: it does not exist, or its lookups have timed
    /// out past the grace period while other names resolve. Otherwise
    /// Herald's resolver failed and the webhook is not blamed.
    pub endpoint: bool,
}

/// Connecting failed because Herald's own side has no network for the
/// address: Herald's failure, not the receiver's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot connect to {host}: {message} (Herald's own network)")]
pub struct LocalNetwork {
    pub host: String,
    pub message: String,
}

/// Whether a connect error of `kind` says the local side has no network:
/// `Some(true)` it does (the network is down, no usable source address),
/// `Some(false)` it does not, `None` when it depends on whether the local
/// routing table has a route to the address ([`has_route`]): "unreachable"
/// comes from the local stack when it has none, and from a router on the
/// way (the receiver's side) when it has.
pub fn local_network_failure(kind: ErrorKind) -> Option<bool> {
    match kind {
        ErrorKind::NetworkDown | ErrorKind::AddrNotAvailable => Some(true),
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => None,
        _ => Some(false),
    }
}

/// Whether this host's routing table has a route (and a source address) to
/// `ip`: connecting a UDP socket sends nothing, it only looks the route up.
pub fn has_route(ip: IpAddr) -> bool {
    let unspecified: IpAddr = match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    match std::net::UdpSocket::bind(SocketAddr::new(unspecified, 0)) {
        Ok(socket) => match socket.connect(SocketAddr::new(ip, 9)) {
            Ok(()) => true,
            Err(error) => local_network_failure(error.kind()) == Some(false),
        },
        // No socket of that family at all: no network for it here.
        Err(_) => false,
    }
}

/// The first `io::Error` in an error chain.
fn io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = e.source();
    }
    None
}

/// How long the system resolver may take before Herald gives up on it.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What resolving a name answers.
pub type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;

/// A name resolver: the system's (`getaddrinfo`) in production, another in
/// tests (one that hangs or fails, to show that is Herald's failure).
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> LookupFuture;
}

/// The system resolver.
#[derive(Debug, Clone, Copy)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// The resolver the deliverer's client uses (the system's by default).
#[derive(Clone)]
pub struct Resolver(pub Arc<dyn Lookup>);

impl Default for Resolver {
    fn default() -> Self {
        Self(Arc::new(SystemLookup))
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Lookups in flight at once over all names (the system resolver holds a
/// blocking thread for each, for as long as `getaddrinfo` takes, which may
/// be far longer than [`RESOLVE_TIMEOUT`]).
pub const MAX_LOOKUPS: usize = 64;
/// Lookups in flight at once for the names of one domain (its last two
/// labels): a tenant's broken zone holds no more.
pub const MAX_LOOKUPS_PER_DOMAIN: usize = 4;

/// A lookup's answer, shared by everyone who asked for the name meanwhile.
type Answer = Result<Vec<IpAddr>, (ErrorKind, String)>;
type SharedLookup = futures::future::Shared<Pin<Box<dyn Future<Output = Answer> + Send>>>;

/// [`Resolver`] on bounded terms (see the module), with the record of
/// which names time out while others resolve.
#[derive(Clone)]
pub struct Lookups(Arc<LookupsInner>);

struct LookupsInner {
    resolver: Resolver,
    slots: Arc<tokio::sync::Semaphore>,
    grace_ms: i64,
    state: Mutex<LookupState>,
}

#[derive(Default)]
struct LookupState {
    /// Name → (which lookup, when it started, its answer to come).
    in_flight: HashMap<String, (u64, std::time::Instant, SharedLookup)>,
    started: u64,
    per_domain: HashMap<String, usize>,
    record: herald_core::egress::Lookups,
}

impl std::fmt::Debug for Lookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lookups")
    }
}

/// The domain a name's lookups are bounded under: its last two labels.
fn domain_of(host: &str) -> String {
    let host = host.trim_end_matches('.');
    let mut labels = host.rsplitn(3, '.');
    match (labels.next(), labels.next()) {
        (Some(tld), Some(name)) => format!("{name}.{tld}"),
        _ => host.to_owned(),
    }
}

impl Lookups {
    /// `grace`: how long a name's lookups may time out while others
    /// resolve before it counts against the webhook.
    pub fn new(resolver: Resolver, grace: std::time::Duration) -> Self {
        Self(Arc::new(LookupsInner {
            resolver,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)),
            grace_ms: grace.as_millis() as i64,
            state: Mutex::default(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LookupState> {
        self.0.state.lock().expect("lookups")
    }

    /// The name's lookup in flight, started if none is (or if the one in
    /// flight has outlived [`RESOLVE_TIMEOUT`]: its callers have given up
    /// on it); `None` when its domain already has
    /// [`MAX_LOOKUPS_PER_DOMAIN`] in flight.
    fn start(&self, host: &str) -> Option<SharedLookup> {
        let mut state = self.state();
        if let Some((_, started, lookup)) = state.in_flight.get(host)
            && started.elapsed() < RESOLVE_TIMEOUT
        {
            return Some(lookup.clone());
        }
        let domain = domain_of(host);
        let n = state.per_domain.entry(domain.clone()).or_default();
        if *n >= MAX_LOOKUPS_PER_DOMAIN {
            return None;
        }
        *n += 1;
        state.started += 1;
        let id = state.started;
        let this = self.clone();
        let name = host.to_owned();
        // A task of its own: it holds its slot until the resolver answers,
        // however long after the callers gave up that is.
        let task = tokio::spawn(async move {
            let answer = match this.0.slots.clone().acquire_owned().await {
                Ok(_slot) => this
                    .0
                    .resolver
                    .0
                    .lookup(&name)
                    .await
                    .map_err(|e| (e.kind(), e.to_string())),
                Err(_) => Err((ErrorKind::Other, "resolver closed".to_owned())),
            };
            let mut state = this.state();
            if state.in_flight.get(&name).is_some_and(|(i, _, _)| *i == id) {
                state.in_flight.remove(&name);
            }
            if let Some(n) = state.per_domain.get_mut(&domain) {
                *n -= 1;
                if *n == 0 {
                    state.per_domain.remove(&domain);
                }
            }
            answer
        });
        let lookup: Pin<Box<dyn Future<Output = Answer> + Send>> = Box::pin(task.map(|joined| {
            joined.unwrap_or_else(|e| Err((ErrorKind::Other, format!("lookup failed: {e}"))))
        }));
        let shared = lookup.shared();
        state.in_flight.insert(
            host.to_owned(),
            (id, std::time::Instant::now(), shared.clone()),
        );
        Some(shared)
    }

    /// Resolves `host`, waiting at most [`RESOLVE_TIMEOUT`].
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let answer = match self.start(host) {
            Some(lookup) => tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await.ok(),
            // Its domain's lookups are all hanging: as good as timed out.
            None => None,
        };
        let now = herald_platform::now_ms();
        match answer {
            Some(Ok(addrs)) => {
                self.state().record.answered(host, now);
                Ok(addrs)
            }
            Some(Err((_, message))) => {
                let error = dns_error(host, message);
                if error.endpoint {
                    // NXDOMAIN: the resolver works.
                    self.state().record.answered(host, now);
                }
                Err(error)
            }
            None => {
                let grace = self.0.grace_ms;
                let endpoint = self.state().record.timed_out(host, now, grace);
                Err(DnsError {
                    host: host.to_owned(),
                    message: if endpoint {
                        format!(
                            "no answer within {RESOLVE_TIMEOUT:?}, for more than {} while other names resolve",
                            herald_core::duration::format_duration(
                                std::time::Duration::from_millis(grace as u64)
                            )
                        )
                    } else {
                        format!("no answer within {RESOLVE_TIMEOUT:?}")
                    },
                    endpoint,
                })
            }
        }
    }
}

/// Resolves with [`Lookups`] and drops refused addresses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
    pub lookups: Lookups,
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        let lookups = self.lookups.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // A resolver that hangs is Herald's failure, not the endpoint's
            // (until the grace says otherwise): it must not surface as the
            // webhook's timeout.
            let addrs: Vec<SocketAddr> = lookups
                .resolve(&host)
                .await
                .map_err(|e| Box::new(e) as BoxError)?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if allow_private {
                return Ok(addrs.into_iter());
            }
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match refused(a.ip()) {
                    None => true,
                    Some(why) => {
                        // The tenant sees this text: it names the range,
                        // never the internal address the name resolved to.
                        first_refusal
                            .get_or_insert_with(|| format!("it resolves to a {why} address"));
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(match first_refusal {
                    Some(reason) => Box::new(Refused { host, reason }) as BoxError,
                    None => Box::new(DnsError {
                        host,
                        message: "no addresses".into(),
                        endpoint: true,
                    }),
                });
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Classifies a `getaddrinfo` failure: a name that does not exist is the
/// endpoint's fault; a resolver that cannot answer is Herald's.
fn dns_error(host: &str, message: String) -> DnsError {
    let not_found = [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
    ]
    .iter()
    .any(|m| message.contains(m));
    DnsError {
        host: host.to_owned(),
        message,
        endpoint: not_found,
    }
}

/// Wraps a connector: refuses IP-literal hosts that [`refused`] names, since
/// those bypass the resolver, and tells a connection that failed for want
/// of Herald's own network ([`LocalNetwork`]) from the receiver's failure.
#[derive(Debug, Clone)]
pub struct Guarded<C> {
    pub inner: C,
    pub allow_private: bool,
    pub lookups: Lookups,
}

/// Whether a failed connection to `host` says Herald's side has no
/// network: the error's kind, and for "unreachable" whether the local
/// routing table has a route to any of the host's addresses.
async fn local_failure(lookups: &Lookups, host: &str, error: &BoxError) -> Option<LocalNetwork> {
    let (kind, message) = {
        let io = io_error(error.as_ref())?;
        (io.kind(), io.to_string())
    };
    let local = match local_network_failure(kind) {
        Some(local) => local,
        None => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let addrs = match bare.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => lookups.resolve(host).await.ok()?,
            };
            !addrs.is_empty() && !addrs.into_iter().any(has_route)
        }
    };
    local.then(|| LocalNetwork {
        host: host.to_owned(),
        message,
    })
}

impl<C> Service<http::Uri> for Guarded<C>
where
    C: Service<http::Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        if !self.allow_private
            && let Some(host) = uri.host()
            && let Ok(ip) = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            && let Some(why) = refused(ip)
        {
            let error = Refused {
                host: host.to_owned(),
                reason: format!("{ip} is {why}"),
            };
            return Box::pin(async move { Err(Box::new(error) as BoxError) });
        }
        let call = self.inner.call(uri.clone());
        let lookups = self.lookups.clone();
        Box::pin(async move {
            let error: BoxError = match call.await {
                Ok(connection) => return Ok(connection),
                Err(error) => error.into(),
            };
            let host = uri.host().unwrap_or_default();
            match local_failure(&lookups, host, &error).await {
                Some(local) => Err(Box::new(local) as BoxError),
                None => Err(error),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `address` (or the host of a URL, as the url crate normalizes it)
    /// is refused, or not.
    fn check(address: &str, expect_refused: bool) {
        let ip: IpAddr = match address.parse() {
            Ok(ip) => ip,
            Err(_) => match url::Url::parse(address).expect(address).host() {
                Some(url::Host::Ipv4(v4)) => v4.into(),
                Some(url::Host::Ipv6(v6)) => v6.into(),
                other => panic!("{address}: host {other:?} is not an address"),
            },
        };
        assert_eq!(
            refused(ip).is_some(),
            expect_refused,
            "{address} ({ip}): {:?}",
            refused(ip)
        );
    }

    #[test]
    fn address_table() {
        for (address, expect_refused) in [
            // Public addresses pass.
            ("93.184.215.14", false),
            ("8.8.8.8", false),
            ("1.1.1.1", false),
            ("100.63.255.255", false),
            ("100.128.0.0", false),
            ("172.15.255.255", false),
            ("172.32.0.0", false),
            ("192.169.0.1", false),
            ("198.20.0.1", false),
            ("2606:4700:4700::1111", false),
            ("2a00:1450:4001:82a::200e", false),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::808:808", false),
            ("2002:0808:0808::1", false),
            // Loopback, unspecified, private.
            ("127.0.0.1", true),
            ("127.255.255.254", true),
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("10.0.0.1", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("192.168.1.1", true),
            ("100.64.0.1", true),
            ("100.127.255.255", true),
            // Link-local and cloud metadata.
            ("169.254.0.1", true),
            ("169.254.169.254", true),
            ("fe80::1", true),
            ("fd00:ec2::254", true),
            // Documentation, benchmarking, reserved, multicast, broadcast.
            ("192.0.0.8", true),
            ("192.0.2.1", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("198.18.0.1", true),
            ("198.19.255.255", true),
            ("192.88.99.1", true),
            ("224.0.0.1", true),
            ("239.255.255.250", true),
            ("240.0.0.1", true),
            ("255.255.255.255", true),
            ("2001:db8::1", true),
            ("3fff::1", true),
            ("2001:2::1", true),
            ("ff02::1", true),
            ("100::1", true),
            // IPv6 forms of loopback and private IPv4.
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:10.0.0.1", true),
            ("::127.0.0.1", true),
            ("::8.8.8.8", true),
            ("64:ff9b::7f00:1", true),
            ("64:ff9b:1::1", true),
            ("2002:7f00:0001::1", true),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", true),
            ("fc00::1", true),
            ("fd12:3456:789a::1", true),
            ("fec0::1", true),
            // Numeric host tricks, as the url crate reads them.
            ("http://2130706433/", true),
            ("http://0x7f000001/", true),
            ("http://0177.0.0.1/", true),
            ("http://0x7f.1/", true),
            ("http://127.1/", true),
            ("http://017700000001/", true),
            ("http://0/", true),
            ("http://[::ffff:7f00:1]/", true),
            ("http://[0:0:0:0:0:ffff:127.0.0.1]/", true),
            ("http://3232235777/", true),
            ("http://134744072/", false),
        ] {
            check(address, expect_refused);
        }
    }

    #[test]
    fn refusal_names_the_range() {
        assert_eq!(
            refused("169.254.169.254".parse().unwrap()),
            Some("cloud metadata (169.254.169.254)")
        );
        assert_eq!(
            refused("::ffff:127.0.0.1".parse().unwrap()),
            Some("loopback (127.0.0.0/8)")
        );
    }

    #[test]
    fn which_connect_errors_are_heralds_network() {
        for (kind, local) in [
            (ErrorKind::NetworkDown, Some(true)),
            (ErrorKind::AddrNotAvailable, Some(true)),
            // Depends on whether the local routing table has a route.
            (ErrorKind::NetworkUnreachable, None),
            (ErrorKind::HostUnreachable, None),
            (ErrorKind::ConnectionRefused, Some(false)),
            (ErrorKind::ConnectionReset, Some(false)),
            (ErrorKind::TimedOut, Some(false)),
            (ErrorKind::Other, Some(false)),
        ] {
            assert_eq!(local_network_failure(kind), local, "{kind:?}");
        }
        assert!(has_route(Ipv4Addr::LOCALHOST.into()));
    }

    /// Hangs for names under `hang.test`, answers NXDOMAIN for `gone.test`,
    /// loopback for the rest; counts the lookups it was asked for.
    #[derive(Default)]
    struct Names {
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Lookup for Names {
        fn lookup(&self, host: &str) -> LookupFuture {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let host = host.to_owned();
            Box::pin(async move {
                if host.ends_with("hang.test") {
                    std::future::pending().await
                } else if host == "gone.test" {
                    Err(std::io::Error::other("Name or service not known"))
                } else {
                    Ok(vec![Ipv4Addr::LOCALHOST.into()])
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_domain_holds_a_few_lookups_and_never_the_others() {
        let names = Arc::new(Names::default());
        let lookups = Lookups::new(Resolver(names.clone()), std::time::Duration::from_secs(30));
        // A hundred lookups of one hanging name at once: one is made.
        let many = (0..100).map(|_| lookups.resolve("a.hang.test"));
        let answers = futures::future::join_all(many).await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().is_err_and(|e| !e.endpoint))
        );
        assert_eq!(names.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Many names of the hanging domain: a few are looked up, the rest
        // time out at once.
        let many = (0..20).map(|i| {
            let lookups = lookups.clone();
            async move { lookups.resolve(&format!("n{i}.hang.test")).await }
        });
        futures::future::join_all(many).await;
        assert!(
            names.asked.load(std::sync::atomic::Ordering::SeqCst) <= MAX_LOOKUPS_PER_DOMAIN + 1
        );
        // Meanwhile other names resolve, and a name that does not exist is
        // the endpoint's.
        assert_eq!(
            lookups.resolve("ok.test").await.unwrap(),
            vec![IpAddr::from(Ipv4Addr::LOCALHOST)]
        );
        let gone = lookups.resolve("gone.test").await.unwrap_err();
        assert!(gone.endpoint, "{gone}");
    }

    #[tokio::test]
    async fn resolver_drops_refused_addresses() {
        let mut guarded = GuardedResolver {
            allow_private: false,
            lookups: Lookups::new(Resolver::default(), std::time::Duration::from_secs(30)),
        };
        let error = guarded
            .call("localhost".parse().unwrap())
            .await
            .expect_err("localhost is refused");
        let refused = error.downcast_ref::<Refused>().expect("a refusal");
        assert!(refused.reason.contains("loopback"), "{refused}");
        // The tenant's log never learns the internal address.
        assert!(!refused.to_string().contains("127.0.0.1"), "{refused}");
        assert!(!refused.to_string().contains("::1"), "{refused}");

        let mut open = GuardedResolver {
            allow_private: true,
            lookups: Lookups::new(Resolver::default(), std::time::Duration::from_secs(30)),
        };
        let addrs: Vec<_> = open
            .call("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
