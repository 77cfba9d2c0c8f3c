//! The HTTP client that POSTs to customers: hyper over rustls (webpki
//! roots), pooled keep-alive connections, no proxy from the environment, no
//! redirects followed, a response body read with a cap while reading, and
//! connections only to addresses [`crate::guard`] allows.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Bytes of a response body kept for the log.
pub const BODY_CAP: usize = 8 * 1024;

use crate::guard::{DnsError, Guarded, GuardedResolver, LocalNetwork, Lookups, Refused, Resolver};

pub type Connector = hyper_rustls::HttpsConnector<Guarded<HttpConnector<GuardedResolver>>>;

#[derive(Clone)]
pub struct Client {
    inner: HyperClient<Connector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub truncated: bool,
}

/// Why no response came back. Every variant is the endpoint's failure
/// (counted against the webhook) except `Resolver` and `Network`, which are
/// Herald's own.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0} (Herald's resolver failed; not counted against the webhook)")]
    Resolver(String),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("{0}; not counted against the webhook")]
    Network(String),
    #[error("request failed: {0}")]
    Request(String),
}

impl SendError {
    /// Whether the endpoint is to blame (counts toward auto-disable).
    pub fn endpoint_failure(&self) -> bool {
        !matches!(self, SendError::Resolver(_) | SendError::Network(_))
    }

    fn from_hyper(error: &hyper_util::client::legacy::Error) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return SendError::Refused(refused.to_string());
            }
            if let Some(local) = e.downcast_ref::<LocalNetwork>() {
                return SendError::Network(local.to_string());
            }
            if let Some(dns) = e.downcast_ref::<DnsError>() {
                return if dns.endpoint {
                    SendError::NotFound(dns.to_string())
                } else {
                    SendError::Resolver(dns.to_string())
                };
            }
            source = e.source();
        }
        if error.is_connect() {
            SendError::Connect(error_chain(error))
        } else {
            SendError::Request(error_chain(error))
        }
    }
}

impl Client {
    /// A client that connects only to public addresses unless
    /// `allow_private` (HERALD_ALLOW_PRIVATE_TARGETS), resolving names with
    /// `resolver`; a name whose lookups time out for longer than
    /// `resolve_grace` while others resolve is the endpoint's failure.
    pub fn new(allow_private: bool, resolver: Resolver, resolve_grace: Duration) -> Self {
        let lookups = Lookups::new(resolver, resolve_grace);
        let mut http = HttpConnector::new_with_resolver(GuardedResolver {
            allow_private,
            lookups: lookups.clone(),
        });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Guarded {
                inner: http,
                allow_private,
                lookups,
            });
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            // As many as the default deliveries in flight: with fewer, a
            // busy endpoint's connections beyond the cap are closed whenever
            // the in-flight count dips and opened again (a TLS handshake
            // each) on the next burst (docs/benchmarks.md).
            .pool_max_idle_per_host(1024)
            .build(https);
        Self { inner }
    }

    /// Sends `request`, giving up after `timeout` (connect, headers and the
    /// capped body read included).
    pub async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
        timeout: Duration,
    ) -> (Result<Response, SendError>, Duration) {
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| SendError::from_hyper(&e))?;
            let (parts, mut body) = response.into_parts();
            let mut kept = Vec::new();
            let mut truncated = false;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    let room = BODY_CAP - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if data.len() > room {
                        truncated = true;
                        break;
                    }
                }
            }
            let headers = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            Ok(Response {
                status: parts.status.as_u16(),
                headers,
                body: kept.into(),
                truncated,
            })
        })
        .await
        .unwrap_or(Err(SendError::Timeout(timeout)));
        (result, started.elapsed())
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
