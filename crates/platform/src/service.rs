//! The thin shell every binary is: read configuration (exit 64 naming the
//! bad variable), start logging, turn signals into a cancellation token,
//! run the service, exit.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env, Source};

/// Exit code for a configuration error (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

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
    let config = match load(&Env) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("herald-{service}: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    crate::telemetry::init(service);
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
        run(config, shutdown).await
    });
    match result {
        Ok(()) => {
            tracing::info!(service, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(service, %error, "failed");
            eprintln!("herald-{service}: {error}");
            ExitCode::FAILURE
        }
    }
}
