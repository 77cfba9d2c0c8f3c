//! What every Herald service shares: configuration from the environment,
//! logging, shutdown on signals, the health and metrics server, and the
//! connections to NATS (streams, the webhooks bucket) and Redis (the log
//! index, caches and counters), shared metrics, and the trace context that
//! follows an event through NATS headers.

pub mod config;
pub mod dead_letters;
pub mod endpoint_state;
pub mod health;
pub mod lanes;
pub mod log_index;
pub mod metrics;
pub mod nats;
pub mod ordering;
pub mod redis;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
pub mod webhook_view;
pub mod webhooks;
pub mod worker;

pub use tokio_util::sync::CancellationToken;

/// Now, in unix milliseconds: the one clock reading of every service.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
