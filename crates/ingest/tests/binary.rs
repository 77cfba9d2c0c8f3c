//! The `herald-ingest` binary as an operator runs it: a bad variable stops
//! it with exit 64 naming the variable; SIGTERM drains and exits 0; a drain
//! that outlasts `HERALD_SHUTDOWN_GRACE` exits non-zero; a second signal
//! exits at once.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use herald_test_support::{NatsServer, free_port};

fn ingest(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald-ingest"));
    command
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Waits for the child to exit, at most `within`.
fn exit_within(mut child: Child, within: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("output"), started.elapsed())
}

/// Waits until `addr` answers `path` with 200.
fn wait_for(addr: &str, path: &str) {
    let started = Instant::now();
    while !answers(addr, path) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{path} not 200"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn answers(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

#[test]
fn a_bad_variable_stops_it_with_64_naming_the_variable() {
    for (var, value) in [
        ("HERALD_INGEST_HEALTH_ADDR", "nope"),
        ("HERALD_MAX_EVENT_BYTES", "-1"),
        ("HERALD_NATS_URL", "not a url"),
        ("HERALD_SHUTDOWN_GRACE", "forever"),
        ("HERALD_LOG_FORMAT", "xml"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ] {
        let child = ingest(&[(var, value)])
            .spawn()
            .expect("start herald-ingest");
        let (output, _) = exit_within(child, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{var}={value}: {stderr}");
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let nats = NatsServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = ingest(&[
        ("HERALD_NATS_URL", &nats.url()),
        ("HERALD_INGEST_HEALTH_ADDR", &addr),
    ])
    .spawn()
    .expect("start herald-ingest");
    wait_for(&addr, "/ready");
    // A rejected event is logged while its message is handled.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", TRACEPARENT);
        js.publish_with_headers("herald.events.acme.no.such.type", headers, "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let mut rejected = js.get_stream("HERALD_REJECTED").await.unwrap();
        let started = Instant::now();
        while rejected.info().await.unwrap().state.messages == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "not rejected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    signal(&child, "TERM");
    let (output, took) = exit_within(child, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(took < Duration::from_secs(5), "drained in {took:?}");
    // JSON logs with structured fields.
    let stopped = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|log| log["message"] == "stopped")
        .unwrap_or_else(|| panic!("a JSON 'stopped' line in {stderr}"));
    assert_eq!(stopped["service"], "ingest");
    assert_eq!(stopped["level"], "INFO");
    let rejected = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|log| log["message"] == "event rejected")
        .unwrap_or_else(|| panic!("a JSON 'event rejected' line in {stderr}"));
    assert_eq!(rejected["reason"], "unknown_type");
    assert_eq!(
        rejected["span"]["trace_id"],
        &TRACEPARENT[3..35],
        "{rejected}"
    );
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_drain_past_the_grace_exits_non_zero_and_a_second_signal_at_once() {
    // Nothing listens here, so the service is still connecting when told to
    // stop and cannot finish on its own.
    // (The health server answers before NATS is reached, and after the
    // signal handlers are installed.)
    let nats_url = format!("nats://127.0.0.1:{}", free_port());
    let addr = format!("127.0.0.1:{}", free_port());
    let child = ingest(&[
        ("HERALD_NATS_URL", &nats_url),
        ("HERALD_INGEST_HEALTH_ADDR", &addr),
        ("HERALD_SHUTDOWN_GRACE", "300ms"),
    ])
    .spawn()
    .expect("start herald-ingest");
    wait_for(&addr, "/live");
    signal(&child, "TERM");
    let (output, took) = exit_within(child, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        took >= Duration::from_millis(300),
        "waited the grace: {took:?}"
    );
    assert!(stderr.contains("shutdown grace"), "{stderr}");

    let child = ingest(&[
        ("HERALD_NATS_URL", &nats_url),
        ("HERALD_INGEST_HEALTH_ADDR", &addr),
        ("HERALD_SHUTDOWN_GRACE", "1h"),
    ])
    .spawn()
    .expect("start herald-ingest");
    wait_for(&addr, "/live");
    signal(&child, "TERM");
    signal(&child, "INT");
    let (output, _) = exit_within(child, Duration::from_secs(5));
    assert_eq!(output.status.code(), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_the_producers_trace_and_flushed_on_exit() {
    let nats = NatsServer::start();
    let collector = herald_test_support::Receiver::start().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let child = ingest(&[
        ("HERALD_NATS_URL", &nats.url()),
        ("HERALD_INGEST_HEALTH_ADDR", &addr),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url("")),
    ])
    .spawn()
    .expect("start herald-ingest");
    let ready_addr = addr.clone();
    tokio::task::spawn_blocking(move || wait_for(&ready_addr, "/ready"))
        .await
        .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").as_str(),
    );
    js.publish_with_headers(
        "herald.events.acme.workflow.completed",
        headers,
        r#"{"id":"traced"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Accepted: the event is in HERALD_ACCEPTED.
    let mut accepted = js.get_stream("HERALD_ACCEPTED").await.unwrap();
    let started = Instant::now();
    while accepted.info().await.unwrap().state.messages == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "not accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The batch exporter has not sent yet; exiting flushes it.
    signal(&child, "TERM");
    let (output, _) =
        tokio::task::spawn_blocking(move || exit_within(child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let exports = collector.received("/v1/traces");
    assert!(!exports.is_empty(), "spans exported on exit");
    assert_eq!(
        exports[0].header("content-type"),
        Some("application/x-protobuf")
    );
    let raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let body: Vec<u8> = exports.iter().flat_map(|r| r.body.to_vec()).collect();
    assert!(
        body.windows(16).any(|w| w == raw.as_slice()),
        "a span in the producer's trace"
    );
    assert!(
        body.windows(b"herald-ingest".len())
            .any(|w| w == b"herald-ingest"),
        "the service name"
    );
}
