//! The trace follows an event through NATS headers: each service handles a
//! message inside a span that is a child of the message's W3C `traceparent`,
//! and forwards its own span's context on what it publishes (and the
//! deliverer on its POST). So the receiver's `traceparent` carries the
//! producer's trace id, and the spans between are exported when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Without an exporter (or with the
//! span filtered out by `RUST_LOG`) the received `traceparent` is forwarded
//! as is, so the trace id still reaches the receiver.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: &str = "traceparent";

struct Incoming<'a>(&'a str);

impl Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// A span for handling one message: `operation` (`ingest`, `match`,
/// `deliver`), a child of the message's `traceparent` header, else of
/// `fallback` (the traceparent the event carries).
pub fn message_span(
    operation: &'static str,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    fallback: &str,
) -> tracing::Span {
    let span = tracing::info_span!(
        "herald.message",
        otel.name = operation,
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.destination.name = subject,
        trace_id = tracing::field::Empty,
    );
    let incoming = crate::nats::header(headers, TRACEPARENT).unwrap_or(fallback);
    if valid(incoming) {
        let parent = TraceContextPropagator::new().extract(&Incoming(incoming));
        // Fails only when no OpenTelemetry layer is installed.
        let _ = span.set_parent(parent);
    }
    // Log lines written while handling the message carry its trace id, so
    // logs and traces meet even without an exporter.
    let context = span.context();
    let recorded = context.span().span_context().trace_id();
    if recorded != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(recorded));
    } else if let Some(id) = trace_id(incoming) {
        span.record("trace_id", id);
    }
    span
}

/// The `traceparent` to send on: the current span's when traces are
/// recorded, else `received` when it is a valid one.
pub fn outgoing(received: &str) -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let current = span.span_context();
    if current.is_valid() {
        return Some(format!(
            "00-{}-{}-{:02x}",
            current.trace_id(),
            current.span_id(),
            current.trace_flags().to_u8()
        ));
    }
    valid(received).then(|| received.to_owned())
}

/// Sets `traceparent` on a message about to be published (see [`outgoing`]).
pub fn inject(headers: &mut async_nats::HeaderMap, received: &str) {
    if let Some(traceparent) = outgoing(received) {
        headers.insert(TRACEPARENT, traceparent.as_str());
    }
}

/// The trace id of a W3C `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    valid(traceparent).then(|| &traceparent[3..35])
}

/// A well-formed version-00 `traceparent` with non-zero ids.
fn valid(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(traceparent: &str) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TRACEPARENT, traceparent);
        headers
    }

    #[test]
    fn checks_the_form_of_a_traceparent() {
        assert_eq!(trace_id(PRODUCER), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn without_an_exporter_the_received_traceparent_goes_on() {
        let span = message_span("deliver", "s", Some(&headers(PRODUCER)), "");
        let sent = async { outgoing("") }.instrument(span).await;
        assert_eq!(sent, None, "nothing recorded and nothing received");
        let span = message_span("deliver", "s", None, PRODUCER);
        let sent = async { outgoing(PRODUCER) }.instrument(span).await;
        assert_eq!(sent.as_deref(), Some(PRODUCER));
        assert_eq!(outgoing("not-a-traceparent"), None);
    }

    #[tokio::test]
    async fn with_traces_recorded_each_hop_is_a_child_in_the_same_trace() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);

        // The header wins over the event's own traceparent.
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let span = message_span("match", "s", Some(&headers(PRODUCER)), other);
        let first = async { outgoing(other) }.instrument(span).await.unwrap();
        assert_eq!(trace_id(&first), trace_id(PRODUCER));
        assert_ne!(first, PRODUCER, "a new span id for this hop");

        let span = message_span("deliver", "s", Some(&headers(&first)), "");
        let second = async {
            let mut published = async_nats::HeaderMap::new();
            inject(&mut published, "");
            published.get(TRACEPARENT).unwrap().as_str().to_owned()
        }
        .instrument(span)
        .await;
        assert_eq!(trace_id(&second), trace_id(PRODUCER));
        assert_ne!(second, first);
        assert!(second.ends_with("-01"), "sampled: {second}");

        // No producer trace: the service starts one.
        let span = message_span("ingest", "s", None, "");
        let root = async { outgoing("") }.instrument(span).await.unwrap();
        assert_ne!(trace_id(&root), trace_id(PRODUCER));
    }
}
