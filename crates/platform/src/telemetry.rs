//! Logs: JSON lines on stderr with structured fields, the level set by
//! `RUST_LOG` (default `info`). `HERALD_LOG_FORMAT=text` gives human lines.

use tracing_subscriber::EnvFilter;

pub const LOG_FORMAT: &str = "HERALD_LOG_FORMAT";

pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let text = std::env::var(LOG_FORMAT).is_ok_and(|v| v == "text");
    let result = if text {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
    if result.is_ok() {
        tracing::info!(service, version = herald_core::VERSION, "starting");
    }
}
