//! Herald's NATS connection as a production cluster needs it. On a
//! three-node cluster with R3 streams, the services given the whole server
//! list, a node killed mid-load (the leader of the deliveries stream, the
//! worst one to lose) loses no event; a service whose first server is down
//! at start still starts and works; a token, a password in the URL and TLS
//! with a private CA all connect. The full fault suite, with figures, is
//! `make chaos` (docs/benchmarks.md).

use std::time::Duration;

use herald_core::names;
use herald_e2e::{Options, Receiver, Stack};
use herald_platform::config::Nats;
use herald_test_support::{NatsCluster, NatsServer, free_port};
use serde_json::json;

const EVENTS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_lost_mid_load_loses_no_event() {
    let mut cluster = NatsCluster::start();
    let started = std::time::Instant::now();
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_NATS_URL", &cluster.url())
            .env("HERALD_STREAM_REPLICAS", "3"),
    )
    .await;
    eprintln!("stack ready after {:?}", started.elapsed());
    let receiver = Receiver::start().await;
    stack
        .create_webhook(json!({
            "name": "cluster",
            "url": receiver.url("/hook"),
            "event_types": ["workflow.completed"],
        }))
        .await;

    let mut killed = None;
    for i in 0..EVENTS {
        if i == EVENTS / 3 {
            let leader = stack
                .eventually(Duration::from_secs(5), "a deliveries leader", || {
                    cluster.stream_leader(names::DELIVERIES_STREAM)
                })
                .await;
            cluster.kill(leader);
            killed = Some(leader);
        }
        publish(&stack, i).await;
    }

    eprintln!("published after {:?}", started.elapsed());
    // Every event arrives once the cluster has re-elected. Count distinct
    // deliveries, and wait for them, not for requests: a redelivery may
    // repeat one (at-least-once), and counting it would stop the wait
    // before the last one arrived.
    let distinct = receiver
        .wait_for_deliveries("/hook", EVENTS, Duration::from_secs(60))
        .await;
    eprintln!("received after {:?}", started.elapsed());
    assert_eq!(
        distinct.len(),
        EVENTS,
        "events lost after killing node {killed:?} ({} requests)",
        receiver.received("/hook").len()
    );
    stack.stop().await;
}

/// Publishes event `i` until JetStream acknowledges it, as a producer
/// should: while the cluster elects a new leader a publish may time out,
/// and the same `Nats-Msg-Id` makes a retry that did land a duplicate
/// JetStream drops.
async fn publish(stack: &Stack, i: usize) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::MSG_ID_HEADER, format!("cluster-{i}").as_str());
    let body = json!({"id": format!("evt-{i}"), "attributes": {"workflow": "w"}}).to_string();
    // A leader election takes a few seconds on a loaded machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let acked = match stack
            .js
            .publish_with_headers(
                "herald.events.acme.workflow.completed",
                headers.clone(),
                body.clone().into(),
            )
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("event {i} not acknowledged within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_starts_when_the_first_server_is_down() {
    let nats = NatsServer::start();
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let stack = Stack::start_with(
        Options::default().env("HERALD_NATS_URL", &format!("{dead},{}", nats.url())),
    )
    .await;
    let receiver = Receiver::start().await;
    stack
        .create_webhook(json!({
            "name": "list",
            "url": receiver.url("/hook"),
            "event_types": ["workflow.completed"],
        }))
        .await;
    let event = json!({"attributes": {"workflow": "w"}});
    stack.publish("acme", "workflow.completed", event).await;
    let got = receiver.wait_for("/hook", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    stack.stop().await;
}

/// Connects once as a service configured by `vars` would.
async fn connect(vars: &[(&str, &str)]) -> Result<async_nats::Client, String> {
    let src: std::collections::HashMap<&str, String> =
        vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let config = Nats::from_source(&src).map_err(|e| e.to_string())?;
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        herald_platform::nats::connect_once(&config, "herald-test"),
    )
    .await
    .map_err(|_| "timed out".to_owned())?;
    connected.map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_token_or_a_password_in_the_url_is_sent() {
    let server = NatsServer::start_with(&["--auth", "s3cret"]);
    let url = server.url();
    connect(&[("HERALD_NATS_URL", &url), ("HERALD_NATS_TOKEN", "s3cret")])
        .await
        .expect("token accepted");
    let with_token = format!("nats://s3cret@127.0.0.1:{}", server.port());
    connect(&[("HERALD_NATS_URL", &with_token)])
        .await
        .expect("token in the URL accepted");
    connect(&[("HERALD_NATS_URL", &url)])
        .await
        .expect_err("no token, no connection");

    let server = NatsServer::start_with(&["--user", "herald", "--pass", "p@ss:w/rd"]);
    let with_password = format!("nats://herald:p%40ss%3Aw%2Frd@127.0.0.1:{}", server.port());
    let client = connect(&[("HERALD_NATS_URL", &with_password)])
        .await
        .expect("user and password from the URL accepted");
    client.flush().await.expect("flush");
    let wrong = format!("nats://herald:nope@127.0.0.1:{}", server.port());
    connect(&[("HERALD_NATS_URL", &wrong)])
        .await
        .expect_err("a wrong password is refused");
}

#[tokio::test]
async fn an_nkey_seed_signs_the_servers_challenge() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let dir = scratch_dir("nkey");
    let server = configured_server(
        &dir,
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    );
    let url = server.url();
    let client = connect(&[("HERALD_NATS_URL", &url), ("HERALD_NATS_NKEY", &seed)])
        .await
        .expect("the seed's signature accepted");
    client.flush().await.expect("flush");
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    connect(&[("HERALD_NATS_URL", &url), ("HERALD_NATS_NKEY", &stranger)])
        .await
        .expect_err("another key's seed is refused");
    connect(&[("HERALD_NATS_URL", &url)])
        .await
        .expect_err("no key, no connection");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory of its own for one test's files.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-nats-{name}-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A nats-server started with `config` (written into `dir`).
fn configured_server(dir: &std::path::Path, config: &str) -> NatsServer {
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, config).unwrap();
    NatsServer::start_with(&["-c", &conf.display().to_string()])
}

/// A NATS JWT (`nats-io/jwt` v2 form) of `claims` about `subject`, issued and
/// signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{:032X}", free_port()),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64.encode(claims.to_string()));
    let signature = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64.encode(signature))
}

#[tokio::test]
async fn a_credentials_file_authenticates_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "herald-op",
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "herald",
        json!({"type": "account", "version": 2,
               "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                          "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "herald-user",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {},
               "subs": -1, "data": -1, "payload": -1}),
    );
    let dir = scratch_dir("creds");
    let creds = |seed: &str| {
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    };
    let good = dir.join("herald.creds");
    std::fs::write(&good, creds(&user.seed().unwrap())).unwrap();
    // The right JWT with another key's seed cannot answer the challenge.
    let forged = dir.join("forged.creds");
    std::fs::write(&forged, creds(&nkeys::KeyPair::new_user().seed().unwrap())).unwrap();
    let server = configured_server(
        &dir,
        &format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
            account.public_key(),
            sys = system.public_key(),
        ),
    );
    let url = server.url();
    let client = connect(&[
        ("HERALD_NATS_URL", &url),
        ("HERALD_NATS_CREDS", &good.display().to_string()),
    ])
    .await
    .expect("the credentials file accepted");
    client.flush().await.expect("flush");
    connect(&[
        ("HERALD_NATS_URL", &url),
        ("HERALD_NATS_CREDS", &forged.display().to_string()),
    ])
    .await
    .expect_err("a seed that does not match the JWT is refused");
    connect(&[("HERALD_NATS_URL", &url)])
        .await
        .expect_err("no credentials, no connection");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn tls_with_a_private_ca_connects() {
    let dir = scratch_dir("tls");
    let path = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (the tests make their certificates with it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=herald test CA"];
    ca.extend(ec);
    let (ca_key, ca_pem) = (path("ca.key"), path("ca.pem"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    openssl(&ca);
    let (key, csr, pem, ext) = (
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("san.ext"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    let mut req = vec!["req", "-subj", "/CN=127.0.0.1"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(&req);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &pem,
    ]);

    let server = NatsServer::start_with(&["--tls", "--tlscert", &pem, "--tlskey", &key]);
    let url = server.url();
    connect(&[
        ("HERALD_NATS_URL", &url),
        ("HERALD_NATS_TLS_CA", &ca_pem),
        ("HERALD_NATS_TLS_REQUIRED", "true"),
    ])
    .await
    .expect("TLS with the private CA");
    let error = connect(&[
        ("HERALD_NATS_URL", &url),
        ("HERALD_NATS_TLS_REQUIRED", "true"),
    ])
    .await
    .expect_err("a certificate from an unknown CA is refused");
    assert!(!error.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
