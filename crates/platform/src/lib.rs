//! What every Herald service shares: configuration from the environment,
//! logging, shutdown on signals, the health and metrics server, and the
//! connections to NATS (streams, the webhooks bucket) and Redis (the log
//! index, caches and counters), shared metrics, and the trace context that
//! follows an event through NATS headers.

pub mod config;
pub mod health;
pub mod log_index;
pub mod metrics;
pub mod nats;
pub mod redis;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
pub mod webhooks;

pub use tokio_util::sync::CancellationToken;

/// The allocator a service binary may install (`#[global_allocator]`); the
/// deliverer does: glibc's malloc took a quarter of its CPU time. The others
/// keep glibc's, which holds less memory (docs/benchmarks.md, Optimization
/// log). A library never installs it.
pub type Allocator = mimalloc::MiMalloc;
