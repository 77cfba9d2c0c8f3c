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

pub const NATS_URL: &str = "HERALD_NATS_URL";
pub const REDIS_URL: &str = "HERALD_REDIS_URL";
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
pub fn addr(src: &dyn Source, var: &str, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = string(src, var, default);
    text.parse().map_err(|_| {
        ConfigError::new(
            var,
            format!("{text:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

/// Settings every service that talks to NATS shares.
#[derive(Debug, Clone)]
pub struct Nats {
    pub url: String,
    /// Replicas of the streams and bucket a service creates (3 on a cluster).
    pub replicas: usize,
}

impl Nats {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let url = string(src, NATS_URL, "nats://127.0.0.1:4222");
        if !url.split(',').all(|u| u.contains("://") || u.contains(':')) {
            return Err(ConfigError::new(
                NATS_URL,
                format!("{url:?} is not a NATS URL like nats://host:4222"),
            ));
        }
        Ok(Self {
            url,
            replicas: number(src, STREAM_REPLICAS, 1usize, 1..=5)?,
        })
    }
}

/// The Redis URL, checked for form.
pub fn redis_url(src: &dyn Source) -> Result<String, ConfigError> {
    let url = string(src, REDIS_URL, "redis://127.0.0.1:6379");
    ::redis::Client::open(url.as_str())
        .map_err(|e| ConfigError::new(REDIS_URL, format!("{url:?}: {e}")))?;
    Ok(url)
}

/// How long a service may take to drain on SIGTERM.
pub fn shutdown_grace(src: &dyn Source) -> Result<Duration, ConfigError> {
    duration(src, SHUTDOWN_GRACE, Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
