//! Who is calling: every request but health, the console's files and the
//! console-link exchange carries `Authorization: Bearer <token>`, one of
//!
//! - an **API key** made over the API (`hk_…`, [`crate::api_keys`]): found
//!   by the id it embeds, checked against its HMAC-SHA256 under the server
//!   key (`HERALD_API_KEY_HASH_KEY`) in constant time;
//! - a **console session** (`hs_…`, [`crate::console_links`]), made from a
//!   console link: its organization, scope and webhooks are the link's,
//!   and it ends with the link (expiry or revocation);
//! - a **bootstrap key** from `HERALD_API_KEYS_FILE` (re-read when the file
//!   changes, checked every second):
//!
//! ```json
//! {"keys": [{"key_sha256": "<hex sha256 of the key>", "organizations": ["acme"],
//!            "default_organization": "acme", "name": "ops", "scope": "admin"}]}
//! ```
//!
//! `"organizations": ["*"]` may use every organization; its scope is
//! `operator` unless the file says otherwise (other keys default to
//! `admin`). `X-Organization-Id` picks the organization; without it, the
//! key's default is used.
//!
//! Scopes: `operator` (every organization; manages organizations and keys),
//! `admin` (its organizations' webhooks), `read` (every `GET` of its
//! organizations, anything else is a 403 `read_only`). A source address
//! that presented [`MAX_FAILURES`] wrong tokens (or console-link tokens) in
//! a minute gets 429 until the minute is over; counted per replica, by the
//! connection's peer address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::http::request::Parts;
use herald_core::names;
use herald_platform::config::Invalid;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Operator,
    Admin,
    Read,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            "read" => Some(Self::Read),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Read => "read",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub key_sha256: String,
    pub organizations: Vec<String>,
    pub default_organization: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scope: Option<Scope>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

/// The bootstrap keys, by the hex SHA-256 of the key.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_hash: HashMap<String, Arc<Principal>>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Keys {
    pub fn parse(json: &str) -> Result<Self, Invalid> {
        let file: KeysFile =
            serde_json::from_str(json).map_err(|e| Invalid(format!("not a keys file: {e}")))?;
        if file.keys.is_empty() {
            return Err(Invalid(
                "no keys: the admin API refuses to start without keys".into(),
            ));
        }
        let mut by_hash = HashMap::new();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let hash = entry.key_sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Invalid(format!(
                    "keys[{i}].key_sha256 is not 64 hex digits"
                )));
            }
            for org in &entry.organizations {
                if org != "*" && !names::valid_org(org) {
                    return Err(Invalid(format!(
                        "keys[{i}].organizations: {org:?} is not 1-64 of [a-z0-9_-]"
                    )));
                }
            }
            let any = entry.organizations.iter().any(|o| o == "*");
            let principal = Principal {
                // Not secret: 48 bits of the hash of a high-entropy key.
                id: format!("file:{}", &hash[..12]),
                name: entry.name.clone().unwrap_or_default(),
                scope: entry
                    .scope
                    .unwrap_or(if any { Scope::Operator } else { Scope::Admin }),
                organizations: entry.organizations,
                default_organization: entry.default_organization,
                webhook_ids: None,
                kind: Kind::File,
                expires_at_ms: None,
            };
            if principal.scope == Scope::Operator && !any {
                return Err(Invalid(format!(
                    "keys[{i}]: an operator key must have \"organizations\": [\"*\"]"
                )));
            }
            if !names::valid_org(&principal.default_organization)
                || !principal.allows(&principal.default_organization)
            {
                return Err(Invalid(format!(
                    "keys[{i}].default_organization must be one of its organizations"
                )));
            }
            by_hash.insert(hash, Arc::new(principal));
        }
        Ok(Self { by_hash })
    }

    pub fn find(&self, key: &str) -> Option<&Arc<Principal>> {
        self.by_hash.get(&hash_key(key))
    }
}

/// Where a principal comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    ApiKey,
    Session,
}

/// What a token may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Not secret: what the audit trail names and per-key limits count by.
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// `["*"]`: every organization.
    pub organizations: Vec<String>,
    pub default_organization: String,
    /// A console link limited to some webhooks.
    pub webhook_ids: Option<Vec<String>>,
    pub kind: Kind,
    pub expires_at_ms: Option<i64>,
}

impl Principal {
    pub fn allows(&self, org: &str) -> bool {
        self.organizations.iter().any(|o| o == "*" || o == org)
    }

    pub fn any_organization(&self) -> bool {
        self.organizations.iter().any(|o| o == "*")
    }
}

/// The server key API keys and console tokens are hashed with
/// (`HERALD_API_KEY_HASH_KEY`, or derived from `HERALD_SECRET_KEY`).
#[derive(Clone)]
pub struct HashKey(Arc<Vec<u8>>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(***)")
    }
}

impl HashKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(Arc::new(bytes.to_vec()))
    }

    /// Derived from another secret (`HERALD_SECRET_KEY`'s text) when no
    /// key of its own is configured.
    pub fn derive(from: &str) -> Self {
        let mut mac = Self::mac_with(from.as_bytes());
        mac.update(b"herald api key hash key v1");
        Self::new(&mac.finalize().into_bytes())
    }

    fn mac_with(key: &[u8]) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
    }

    /// HMAC-SHA256 of `token`, hex.
    pub fn hash(&self, token: &str) -> String {
        let mut mac = Self::mac_with(&self.0);
        mac.update(token.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `stored` (hex) is the hash of `token`, in constant time.
    pub fn verify(&self, token: &str, stored: &str) -> bool {
        let Ok(expected) = hex::decode(stored) else {
            return false;
        };
        let mut mac = Self::mac_with(&self.0);
        mac.update(token.as_bytes());
        mac.verify_slice(&expected).is_ok()
    }
}

/// The keys file, re-read when its modification time or size changes.
pub struct FileKeys {
    path: PathBuf,
    keys: RwLock<Arc<Keys>>,
}

impl FileKeys {
    pub fn new(path: PathBuf, keys: Keys) -> Arc<Self> {
        Arc::new(Self {
            path,
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    pub fn current(&self) -> Arc<Keys> {
        self.keys.read().expect("keys lock").clone()
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// Checks the file every second and loads it again when it changed; a
    /// file that does not parse is logged and the keys loaded before stay.
    pub fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut seen = self.stamp();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let now = self.stamp();
                if now == seen {
                    continue;
                }
                seen = now;
                match std::fs::read_to_string(&self.path)
                    .map_err(|e| Invalid(e.to_string()))
                    .and_then(|json| Keys::parse(&json))
                {
                    Ok(keys) => {
                        tracing::info!(path = %self.path.display(), keys = keys.by_hash.len(), "keys file loaded again");
                        *self.keys.write().expect("keys lock") = Arc::new(keys);
                    }
                    Err(error) => tracing::error!(
                        %error,
                        path = %self.path.display(),
                        "keys file changed but does not load; keeping the keys loaded before"
                    ),
                }
            }
        });
    }
}

/// Failed authentications allowed per source address and minute, by
/// default (`HERALD_AUTH_FAILURES_PER_MINUTE`).
pub const MAX_FAILURES: u32 = 20;
const FAILURE_WINDOW_MS: i64 = 60_000;
/// Sources remembered before finished windows are forgotten.
const MAX_SOURCES: usize = 10_000;

/// Failed authentications per source address, in this replica: fixed
/// windows of a minute.
pub struct Failures {
    by_source: Mutex<HashMap<IpAddr, (i64, u32)>>,
    max: u32,
}

impl Default for Failures {
    fn default() -> Self {
        Self::new(MAX_FAILURES)
    }
}

impl Failures {
    pub fn new(max: u32) -> Self {
        Self {
            by_source: Mutex::default(),
            max: max.max(1),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// `Some(wait_ms)` when `source` is over the limit.
    pub fn blocked(&self, source: IpAddr, now_ms: i64) -> Option<u64> {
        let map = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&source) {
            Some(&(start, n)) if n >= self.max && now_ms - start < FAILURE_WINDOW_MS => {
                Some((start + FAILURE_WINDOW_MS - now_ms) as u64)
            }
            _ => None,
        }
    }

    pub fn failed(&self, source: IpAddr, now_ms: i64) {
        let mut map = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SOURCES {
            map.retain(|_, (start, _)| now_ms - *start < FAILURE_WINDOW_MS);
        }
        let entry = map.entry(source).or_insert((now_ms, 0));
        if now_ms - entry.0 >= FAILURE_WINDOW_MS {
            *entry = (now_ms, 0);
        }
        entry.1 += 1;
    }
}

/// The source address of a request (the peer; behind a proxy, the proxy).
pub fn source(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<herald_platform::server::Peer>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip())
}

/// The source address of a request, as an extractor.
#[derive(Debug, Clone, Copy)]
pub struct Source(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(source(parts)))
    }
}

/// Refuses a source over the limit of failed authentications.
pub fn check_source(state: &AppState, source: IpAddr) -> Result<(), ApiError> {
    match state.auth_failures.blocked(source, crate::now_ms()) {
        Some(wait_ms) => Err(ApiError::rate_limited(
            format!(
                "too many failed authentications from this address; at most {} a minute \
                 (HERALD_AUTH_FAILURES_PER_MINUTE)",
                state.auth_failures.max()
            ),
            wait_ms,
        )),
        None => Ok(()),
    }
}

/// The principal `token` names, if it is valid now.
pub async fn authenticate(state: &AppState, token: &str) -> Option<Arc<Principal>> {
    let now = crate::now_ms();
    let found = if let Some(rest) = token.strip_prefix(crate::api_keys::PREFIX) {
        // A key of the keys file may start like one made over the API (the
        // dev stack's does): the file is asked when the API's keys say no.
        match crate::api_keys::authenticate(state, token, rest).await {
            Some(found) => Some(found),
            None => state.file_keys.current().find(token).cloned(),
        }
    } else if token.starts_with(crate::console_links::SESSION_PREFIX) {
        crate::console_links::authenticate(state, token).await
    } else {
        state.file_keys.current().find(token).cloned()
    }?;
    if found.expires_at_ms.is_some_and(|at| at <= now) {
        return None;
    }
    Some(found)
}

/// The organization a request acts for, after authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org: String,
    /// The principal's id: what per-key limits count by and the audit
    /// trail names.
    pub key: String,
    pub principal: Arc<Principal>,
}

impl Caller {
    pub fn scope(&self) -> Scope {
        self.principal.scope
    }

    pub fn is_operator(&self) -> bool {
        self.principal.scope == Scope::Operator
    }

    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "operator_only",
                "this route needs an operator key",
            ))
        }
    }

    /// Whether a webhook is one this caller may see (a console link may be
    /// limited to some).
    pub fn sees_webhook(&self, id: &str) -> bool {
        self.principal
            .webhook_ids
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| i == id))
    }

    /// Refuses a caller limited to some webhooks, for an organization-wide
    /// route.
    pub fn refuse_restricted(&self) -> Result<(), ApiError> {
        match self.principal.webhook_ids {
            None => Ok(()),
            Some(_) => Err(ApiError::forbidden(
                "restricted",
                "this console session is limited to some webhooks",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let source = source(parts);
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        // Only a token that was tried counts as a failure: a request
        // without one guesses nothing.
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        // (So a request without a token is told to authenticate, 401, even
        // from a source that is blocked for the tokens it tried.)
        check_source(state, source)?;
        let principal = if token.len() <= 512 {
            authenticate(state, token).await
        } else {
            None
        };
        let Some(principal) = principal else {
            state.auth_failures.failed(source, crate::now_ms());
            return Err(ApiError::unauthorized());
        };
        let org = match parts.headers.get("x-organization-id") {
            None => principal.default_organization.clone(),
            Some(value) => {
                let org = value.to_str().unwrap_or_default().trim();
                if !names::valid_org(org) {
                    return Err(ApiError::bad_request(
                        "invalid_organization",
                        "X-Organization-Id must be 1-64 of [a-z0-9_-]",
                    ));
                }
                // Another organization's objects are invisible, not forbidden.
                if !principal.allows(org) {
                    return Err(ApiError::not_found("organization"));
                }
                org.to_owned()
            }
        };
        let caller = Caller {
            org,
            key: principal.id.clone(),
            principal,
        };
        state.api_requests.take(&caller).await?;
        if caller.scope() == Scope::Read && !matches!(parts.method, Method::GET | Method::HEAD) {
            return Err(ApiError::forbidden(
                "read_only",
                "this key (or console session) is read-only: it may only read",
            ));
        }
        if caller.principal.webhook_ids.is_some() {
            restrict_to_webhooks(&caller, &parts.method, parts.uri.path())?;
        }
        if caller.principal.kind == Kind::ApiKey {
            crate::api_keys::touch(state, &caller.principal.id);
        }
        Ok(caller)
    }
}

/// A caller limited to some webhooks sees only those: another webhook is
/// a 404, creating one or reading the organization's log is a 403.
fn restrict_to_webhooks(caller: &Caller, method: &Method, path: &str) -> Result<(), ApiError> {
    let mut segments = path.trim_start_matches('/').split('/');
    if segments.next() != Some("webhooks") {
        return Ok(());
    }
    match segments.next() {
        None | Some("") if method == Method::POST => Err(ApiError::forbidden(
            "restricted",
            "this console session is limited to some webhooks and cannot create one",
        )),
        Some("logs") => caller.refuse_restricted(),
        Some(id) if !caller.sees_webhook(id) => Err(ApiError::not_found("webhook")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_verifies_in_constant_time_and_only_its_own_tokens() {
        let key = HashKey::new(b"0123456789abcdef0123456789abcdef");
        let stored = key.hash("hk_abc_secret");
        assert!(key.verify("hk_abc_secret", &stored));
        assert!(!key.verify("hk_abc_secreT", &stored));
        assert!(!key.verify("hk_abc_secret", "zz"));
        // Another server key makes another hash.
        assert!(!HashKey::new(b"another key").verify("hk_abc_secret", &stored));
        // A derived key is stable.
        assert_eq!(
            HashKey::derive("k1:x").hash("t"),
            HashKey::derive("k1:x").hash("t")
        );
    }

    #[test]
    fn file_keys_scopes() {
        let file = |entry: serde_json::Value| {
            Keys::parse(&serde_json::json!({"keys": [entry]}).to_string())
        };
        let h = hash_key("k");
        let keys = file(serde_json::json!({"key_sha256": h, "organizations": ["*"], "default_organization": "a"})).unwrap();
        assert_eq!(keys.find("k").unwrap().scope, Scope::Operator);
        let keys = file(serde_json::json!({"key_sha256": h, "organizations": ["a"], "default_organization": "a"})).unwrap();
        assert_eq!(keys.find("k").unwrap().scope, Scope::Admin);
        let keys = file(serde_json::json!({"key_sha256": h, "organizations": ["a"], "default_organization": "a", "scope": "read"})).unwrap();
        assert_eq!(keys.find("k").unwrap().scope, Scope::Read);
        assert!(file(serde_json::json!({"key_sha256": h, "organizations": ["a"], "default_organization": "a", "scope": "operator"})).is_err());
    }

    #[test]
    fn failures_block_a_source_for_the_rest_of_its_minute() {
        let f = Failures::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        for _ in 0..MAX_FAILURES {
            assert_eq!(f.blocked(ip, 1_000), None);
            f.failed(ip, 1_000);
        }
        assert_eq!(f.blocked(ip, 2_000), Some(59_000));
        assert_eq!(f.blocked(IpAddr::from([10, 0, 0, 2]), 2_000), None);
        assert_eq!(f.blocked(ip, 61_000), None);
    }
}
