//! The thin shell every binary is: read configuration (exit 64 naming the
//! bad variable), start logging and tracing, turn signals into a
//! cancellation token, run the service, give it `HERALD_SHUTDOWN_GRACE` to
//! drain after the signal, flush traces, exit.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env, Source};

/// Exit code for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when draining outlasted the grace period.
pub const EXIT_GRACE_EXCEEDED: u8 = 1;

pub fn main<C, E, F, Fut>(
    service: &'static str,
    load: impl FnOnce(&dyn Source) -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let loaded = load(&Env).and_then(|config| {
        let grace = crate::config::shutdown_grace(&Env)?;
        let telemetry = crate::telemetry::Config::from_source(service, &Env)?;
        Ok((config, grace, telemetry))
    });
    let (config, grace, telemetry) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("herald-{service}: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let telemetry = match crate::telemetry::init(service, &telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("herald-{service}: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("herald-{service}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = crate::shutdown::on_signals();
        crate::shutdown::within_grace(run(config, shutdown.clone()), shutdown, grace).await
    });
    let code = match result {
        Some(Ok(())) => {
            tracing::info!(service, "stopped");
            ExitCode::SUCCESS
        }
        Some(Err(error)) => {
            tracing::error!(service, %error, "failed");
            eprintln!("herald-{service}: {error}");
            ExitCode::FAILURE
        }
        None => {
            tracing::error!(
                service,
                grace_seconds = grace.as_secs_f64(),
                "still draining when the shutdown grace ran out; exiting, unacked work will be redelivered"
            );
            ExitCode::from(EXIT_GRACE_EXCEEDED)
        }
    };
    // Tasks still running (a stuck drain) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    telemetry.shutdown();
    code
}

/// Why a worker service stopped: its health server would not start, or
/// NATS, Redis or the webhooks bucket failed it (the log-writer adds
/// reasons of its own).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("health server: {0}")]
    Health(std::io::Error),
    #[error(transparent)]
    Nats(#[from] crate::nats::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("webhook store: {0}")]
    Store(#[from] crate::webhooks::StoreError),
}

/// The first steps every worker service takes: its health server up on
/// `health_addr`, not ready yet (`nats` and `consumer` checks false), then
/// NATS connected, with the `nats` check following the connection from
/// then on. The service registers its metrics and sets `consumer` itself.
pub async fn start_worker(
    service: &'static str,
    health_addr: &crate::config::Listen,
    nats: &crate::config::Nats,
    shutdown: &CancellationToken,
) -> Result<(crate::health::Health, async_nats::Client), WorkerError> {
    let health = crate::health::Health::new(service);
    health.set("nats", false);
    health.set("consumer", false);
    health
        .clone()
        .serve(health_addr, shutdown.clone())
        .await
        .map_err(WorkerError::Health)?;
    let client = crate::nats::connect(nats, service).await?;
    health.watch_nats(client.clone(), shutdown.clone());
    Ok((health, client))
}
