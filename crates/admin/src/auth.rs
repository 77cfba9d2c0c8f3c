//! API keys and the organizations each may use, from `HERALD_API_KEYS_FILE`:
//!
//! ```json
//! {"keys": [{"key_sha256": "<hex sha256 of the key>", "organizations": ["acme"],
//!            "default_organization": "acme"}]}
//! ```
//!
//! Only hashes are stored. `"organizations": ["*"]` is an operator key that
//! may use every organization. `X-Organization-Id` picks one; without it,
//! the key's default is used.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use herald_core::names;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::limits::Limiter;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub key_sha256: String,
    pub organizations: Vec<String>,
    pub default_organization: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

/// Keys by the hex SHA-256 of the key.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_hash: HashMap<String, KeyEntry>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Keys {
    pub fn parse(json: &str) -> Result<Self, String> {
        let file: KeysFile =
            serde_json::from_str(json).map_err(|e| format!("not a keys file: {e}"))?;
        if file.keys.is_empty() {
            return Err("no keys: the admin API refuses to start without keys".into());
        }
        let mut by_hash = HashMap::new();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let hash = entry.key_sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("keys[{i}].key_sha256 is not 64 hex digits"));
            }
            for org in &entry.organizations {
                if org != "*" && !names::valid_org(org) {
                    return Err(format!(
                        "keys[{i}].organizations: {org:?} is not 1-64 of [a-z0-9_-]"
                    ));
                }
            }
            if !names::valid_org(&entry.default_organization)
                || !entry.allows(&entry.default_organization)
            {
                return Err(format!(
                    "keys[{i}].default_organization must be one of its organizations"
                ));
            }
            by_hash.insert(hash, entry);
        }
        Ok(Self { by_hash })
    }

    pub fn find(&self, key: &str) -> Option<&KeyEntry> {
        self.by_hash.get(&hash_key(key))
    }
}

impl KeyEntry {
    pub fn allows(&self, org: &str) -> bool {
        self.organizations.iter().any(|o| o == "*" || o == org)
    }
}

/// The organization a request acts for, after authentication.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org: String,
    /// The SHA-256 of the API key it authenticated with: what per-key
    /// limits count by.
    pub key: String,
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync + AsRef<Keys> + AsRef<Limiter>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .ok_or_else(ApiError::unauthorized)?;
        let keys: &Keys = state.as_ref();
        let entry = keys.find(key).ok_or_else(ApiError::unauthorized)?;
        let limiter: &Limiter = state.as_ref();
        limiter.take(&entry.key_sha256, crate::now_ms())?;
        let org = match parts.headers.get("x-organization-id") {
            None => entry.default_organization.clone(),
            Some(value) => {
                let org = value.to_str().unwrap_or_default().trim();
                if !names::valid_org(org) {
                    return Err(ApiError::bad_request(
                        "invalid_organization",
                        "X-Organization-Id must be 1-64 of [a-z0-9_-]",
                    ));
                }
                // Another organization's objects are invisible, not forbidden.
                if !entry.allows(org) {
                    return Err(ApiError::not_found("organization"));
                }
                org.to_owned()
            }
        };
        Ok(Caller {
            org,
            key: entry.key_sha256.clone(),
        })
    }
}
