//! Logs and traces. Logs are JSON lines on stderr with structured fields
//! (and, while a message is handled, a `span` object with its subject and
//! `trace_id`), the level set by `RUST_LOG` (default `info`);
//! `HERALD_LOG_FORMAT=text` gives human lines. Traces are exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, under the service name
//! `OTEL_SERVICE_NAME` or `herald-<service>`; how a trace follows an event
//! through NATS is in [`crate::trace`].

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{self, ConfigError, Source};

pub const LOG_FORMAT: &str = "HERALD_LOG_FORMAT";
/// Where traces go (the OpenTelemetry SDK's own variable); unset, no traces.
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The service name traces carry (the OpenTelemetry SDK's own variable).
pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// Telemetry settings, read with the rest of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub json: bool,
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl Config {
    pub fn from_source(service: &str, src: &dyn Source) -> Result<Self, ConfigError> {
        let json = match config::string(src, LOG_FORMAT, "json").trim() {
            "json" => true,
            "text" => false,
            other => {
                return Err(ConfigError::new(
                    LOG_FORMAT,
                    format!("{other:?} is neither json nor text"),
                ));
            }
        };
        let otlp_endpoint = config::optional(src, OTLP_ENDPOINT);
        if let Some(endpoint) = &otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            // The exporter is built without TLS: traces go to a collector
            // beside the service (an agent or sidecar), which forwards them.
            return Err(ConfigError::new(
                OTLP_ENDPOINT,
                format!("{endpoint:?} is not a plain-http URL like http://otel-collector:4318"),
            ));
        }
        Ok(Self {
            json,
            otlp_endpoint,
            service_name: config::string(src, SERVICE_NAME, &format!("herald-{service}")),
        })
    }
}

/// What must be flushed before the process exits.
#[derive(Debug, Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered; call once, outside the async runtime.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(error) = provider.shutdown()
        {
            eprintln!("cannot flush traces: {error}");
        }
    }
}

/// Installs the global logger, and the trace exporter when configured.
/// Must be called outside the async runtime (the exporter owns its thread).
pub fn init(service: &'static str, config: &Config) -> Result<Telemetry, ConfigError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let mut telemetry = Telemetry::default();
    let otel_layer = match &config.otlp_endpoint {
        None => None,
        Some(_) => {
            // The exporter reads OTEL_EXPORTER_OTLP_* itself (endpoint,
            // headers, timeout), as every OpenTelemetry SDK does.
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
                .map_err(|e| ConfigError::new(OTLP_ENDPOINT, e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(config.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer(service);
            telemetry.traces = Some(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = if config.json {
        registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()
    } else {
        registry.with(fmt).try_init()
    };
    if result.is_ok() {
        tracing::info!(
            service,
            version = herald_core::VERSION,
            traces = config.otlp_endpoint.is_some(),
            "starting"
        );
    }
    Ok(telemetry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_checks_its_variables() {
        let config = Config::from_source("ingest", &[("UNSET", "")]).unwrap();
        assert_eq!(
            config,
            Config {
                json: true,
                otlp_endpoint: None,
                service_name: "herald-ingest".into()
            }
        );
        let config = Config::from_source(
            "ingest",
            &[
                (OTLP_ENDPOINT, "http://collector:4318"),
                (SERVICE_NAME, "edge-ingest"),
                (LOG_FORMAT, "text"),
            ],
        )
        .unwrap();
        assert!(!config.json);
        assert_eq!(config.service_name, "edge-ingest");
        assert_eq!(
            Config::from_source("ingest", &[(LOG_FORMAT, "xml")])
                .unwrap_err()
                .var,
            LOG_FORMAT
        );
        assert_eq!(
            Config::from_source("ingest", &[(OTLP_ENDPOINT, "collector:4318")])
                .unwrap_err()
                .var,
            OTLP_ENDPOINT
        );
    }
}
