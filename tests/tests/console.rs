//! The console (PRODUCT.md, "The console"), served by admin and used in a
//! real browser: Debian's Chromium, driven by playwright-core from
//! `tests/console/console.mjs`, against the whole stack (real NATS, Redis
//! and all five services). The driver asks this test, over a line protocol
//! on its stdin and stdout, to publish events to NATS and to say what the
//! receiver got; it finds every element by its accessible name, runs
//! axe-core on each screen, writes a screenshot of each under
//! `target/console-screenshots/`, and runs the receiver samples the console
//! shows against a real delivery.
//!
//! Under `CI=true` a missing Chromium or `tests/console/node_modules` fails
//! the test; elsewhere a missing Chromium skips it, loudly (`make deps`
//! installs both).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use herald_e2e::{API_KEY, Options, Receiver, Stack, TENANT_KEY};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";
/// May use `acme` (its default) and `initech`: the picker's case.
const CONSOLE_KEY: &str = "console-test-key";
/// May use `globex` only.
const OTHER_KEY: &str = "console-other-key";
/// The whole browser scenario, at most.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(300);

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("console")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Whether the browser test can run here; what is missing when not.
fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    if !driver_dir().join("node_modules/playwright-core").exists() {
        missing.push("tests/console/node_modules (npm ci in tests/console)".to_owned());
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("node".to_owned());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether `test` cannot run here for want of its tools (and says so).
/// Only a machine without Chromium, outside CI, may skip: anywhere else a
/// missing tool fails the test.
fn skipped_without_browser(test: &str) -> bool {
    let Some(missing) = missing_tools() else {
        return false;
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(
        !ci && !Path::new(CHROMIUM).exists(),
        "the console test needs {missing}: run `make deps`"
    );
    eprintln!(
        "\n\n!!!!!!!! SKIPPED the {test}: {missing} missing. \
         `make deps` installs it. !!!!!!!!\n\n"
    );
    true
}

fn keys_file(dir: &Path) -> PathBuf {
    let hash = herald_admin::auth::hash_key;
    let keys = json!({"keys": [
        {"key_sha256": hash(CONSOLE_KEY), "organizations": ["acme", "initech"], "default_organization": "acme"},
        {"key_sha256": hash(OTHER_KEY), "organizations": ["globex"], "default_organization": "globex"},
        {"key_sha256": hash(API_KEY), "organizations": ["*"], "default_organization": "acme"},
    ]});
    let path = dir.join("console-keys.json");
    std::fs::write(&path, keys.to_string()).expect("write keys");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser() {
    if skipped_without_browser("console browser test") {
        return;
    }
    let dir = tempdir();
    let keys = keys_file(&dir.0);
    let stack = Stack::start_with(
        Options::default()
            .env("HERALD_API_KEYS_FILE", &keys.display().to_string())
            // The console shows the per-workflow limit's refusal.
            .env("HERALD_MAX_WEBHOOKS_PER_WORKFLOW", "1"),
    )
    .await;
    let receiver = Receiver::start().await;
    let shots = target_dir().join("console-screenshots");
    clear_screenshots(&shots);
    drive(
        "console.mjs",
        &[
            ("HERALD_CONSOLE_KEY", CONSOLE_KEY.to_owned()),
            ("HERALD_OTHER_KEY", OTHER_KEY.to_owned()),
        ],
        &stack,
        &receiver,
        &shots,
        DRIVER_TIMEOUT,
    )
    .await;
    stack.stop().await;
}

/// Screenshots of the last run of the main scenario (the files only: the
/// tenants scenario keeps its own in a folder beside them).
fn clear_screenshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "png") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Runs a driver script to its end, answering its requests; panics when it
/// fails or outlasts `timeout`.
async fn drive(
    script: &str,
    envs: &[(&str, String)],
    stack: &Stack,
    receiver: &Receiver,
    shots: &Path,
    timeout: Duration,
) {
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .current_dir(driver_dir())
        .env("HERALD_ADMIN_URL", &stack.admin_url)
        .env("HERALD_RECEIVER_URL", receiver.url(""))
        .env("HERALD_SCREENSHOTS", shots)
        .env("CHROMIUM", CHROMIUM)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let run = async {
        while let Some(line) = lines.next_line().await.expect("driver output") {
            let Some(request) = line.strip_prefix("@@herald ") else {
                eprintln!("{script}: {line}");
                continue;
            };
            let request: Value = serde_json::from_str(request).expect("driver request");
            let mut answer = match answer(stack, receiver, &request).await {
                Ok(answer) => answer,
                Err(error) => json!({"ok": false, "error": error}),
            };
            answer["id"] = request["id"].clone();
            let mut text = answer.to_string();
            text.push('\n');
            // The driver may have exited after a failure; its status tells.
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        child.wait().await.expect("driver exit")
    };
    let status = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("{script} finishes within {timeout:?}"));
    assert!(status.success(), "{script} failed: {status}");
    eprintln!(
        "{script}: screenshots in {} ({:.1} s)",
        shots.display(),
        started.elapsed().as_secs_f64()
    );
}

/// The tenants scenario, at most (it takes about 30 s on a quiet machine).
const TENANTS_TIMEOUT: Duration = Duration::from_secs(90);

/// A platform's page on another origin (`http://localhost:<port>`, another
/// site than the console's `127.0.0.1`) that frames the console: the
/// iframe's address is the page's fragment, as a platform's backend would
/// fill it in with the console link it asked for.
const PLATFORM_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Example Platform: webhooks</title></head>
<body>
<header><p><strong>Example Platform</strong>: Northwind Traders is signed in</p></header>
<main>
<h1>Your webhooks</h1>
<iframe title="Webhooks (Herald console)" style="width: 100%; height: 900px; border: 0"></iframe>
</main>
<script>document.querySelector('iframe').src = decodeURIComponent(location.hash.slice(1));</script>
</body>
</html>
"#;

/// Serves [`PLATFORM_PAGE`] at `/platform` (any query) until dropped.
async fn serve_platform_page(listener: tokio::net::TcpListener) {
    use tokio::io::AsyncReadExt;
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
                if request.len() > 64 * 1024 {
                    return;
                }
            }
            let (status, body) = if request.starts_with(b"GET /platform") {
                ("200 OK", PLATFORM_PAGE)
            } else {
                ("404 Not Found", "")
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Issue 26's "done when", in a real browser: an operator onboards an
/// organization and a read-only key over the API; a read-only console link
/// for it opens inside a page of another origin that frames it (allowed by
/// `HERALD_CONSOLE_FRAME_ANCESTORS`), shows that organization's webhooks and
/// logs and none of another's, and offers no control that changes
/// anything; once used, revoked or past its TTL, the same URL signs nobody
/// in, and a revoked or expired link's session ends. Then the operator's
/// own screens: organizations, API keys, console links and the audit
/// trail (`tests/console/tenants.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_link_framed_by_another_origin_follows_its_scope() {
    if skipped_without_browser("console link browser test") {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the platform's page");
    let platform = format!(
        "http://localhost:{}",
        listener.local_addr().expect("address").port()
    );
    let server = tokio::spawn(serve_platform_page(listener));
    let stack =
        Stack::start_with(Options::default().env("HERALD_CONSOLE_FRAME_ANCESTORS", &platform))
            .await;
    // Framed by the platform only: no X-Frame-Options, its origin in the CSP.
    let (_, headers, _) = stack.send("GET", "/console", &[], "").await;
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains(&format!("frame-ancestors {platform}")),
        "{csp}"
    );
    assert!(!headers.contains_key("x-frame-options"));

    let receiver = Receiver::start().await;
    let shots = target_dir().join("console-screenshots").join("tenants");
    let _ = std::fs::remove_dir_all(&shots);
    drive(
        "tenants.mjs",
        &[
            ("HERALD_OPERATOR_KEY", API_KEY.to_owned()),
            ("HERALD_PLATFORM_URL", platform),
        ],
        &stack,
        &receiver,
        &shots,
        TENANTS_TIMEOUT,
    )
    .await;
    server.abort();
    stack.stop().await;
}

/// One request of the driver: publish an event, what the receiver got, or
/// make the receiver answer a path slowly.
async fn answer(stack: &Stack, receiver: &Receiver, request: &Value) -> Result<Value, String> {
    let text = |name: &str| {
        request[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{name} missing in {request}"))
    };
    let bodies = |got: Vec<herald_e2e::Received>| -> Value {
        got.iter()
            .map(|r| Value::String(String::from_utf8_lossy(&r.body).into_owned()))
            .collect()
    };
    match request["op"].as_str() {
        Some("publish") => {
            stack
                .publish(&text("org")?, &text("type")?, request["event"].clone())
                .await;
            Ok(json!({"ok": true}))
        }
        Some("received") => {
            let got = receiver.received(&text("path")?);
            // With `header`: that header's value in each request.
            let values: Vec<Value> = match request["header"].as_str() {
                Some(name) => got
                    .iter()
                    .map(|r| {
                        r.headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map_or(Value::Null, |v| Value::String(v.to_owned()))
                    })
                    .collect(),
                None => Vec::new(),
            };
            Ok(json!({"ok": true, "bodies": bodies(got), "values": values}))
        }
        Some("wait_received") => {
            let n = request["n"].as_u64().unwrap_or(1) as usize;
            let timeout = Duration::from_millis(request["timeout_ms"].as_u64().unwrap_or(20_000));
            let got = receiver.wait_for(&text("path")?, n, timeout).await;
            Ok(
                json!({"ok": got.len() >= n, "bodies": bodies(got), "error": "not received in time"}),
            )
        }
        Some("slow") => {
            let n = request["n"].as_u64().unwrap_or(1) as usize;
            let delay = Duration::from_millis(request["delay_ms"].as_u64().unwrap_or(1_000));
            receiver.script(
                &text("path")?,
                vec![herald_e2e::Reply::status(200).delay(delay); n],
            );
            Ok(json!({"ok": true}))
        }
        _ => Err(format!("unknown request {request}")),
    }
}

#[tokio::test]
async fn the_console_is_served_with_strict_headers_and_api_answers_are_not_stored() {
    let stack = Stack::start().await;
    for path in [
        "/console",
        "/console/",
        "/console/app.js",
        "/console/views/form.js",
    ] {
        let (status, headers, body) = stack.send("GET", path, &[], "").await;
        assert_eq!(status, 200, "{path} needs no key");
        let header = |name: &str| headers[name].to_str().unwrap().to_owned();
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: nothing inline: {csp}");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        if path.ends_with(".js") {
            assert!(header("content-type").starts_with("text/javascript"));
        } else {
            assert!(header("content-type").starts_with("text/html"));
            let html = String::from_utf8_lossy(&body);
            assert!(html.contains(r#"<script type="module" src="/console/app.js">"#));
        }
    }
    let (status, headers, _) = stack.send("GET", "/console/nothing.js", &[], "").await;
    assert_eq!(status, 404);
    assert!(headers.contains_key("content-security-policy"));

    // API answers, errors included, are never stored.
    let auth = format!("Bearer {API_KEY}");
    for (path, key, want) in [
        ("/webhooks", Some(auth.as_str()), 200),
        ("/webhooks", None, 401),
        ("/me", Some(auth.as_str()), 200),
    ] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("authorization", k)).into_iter().collect();
        let (status, headers, _) = stack.send("GET", path, &headers, "").await;
        assert_eq!(status, want, "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
    }

    // GET /me: what the picker offers.
    let (status, me) = stack.api("GET", "/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        me,
        json!({"organizations": ["*"], "any_organization": true,
               "default_organization": "acme", "organization": "acme",
               "key_id": me["key_id"], "name": "", "scope": "operator",
               "session": false, "webhook_ids": null, "expires_at": null})
    );
    assert!(me["key_id"].as_str().unwrap().starts_with("file:"));
    let (_, me) = stack
        .api_as(API_KEY, Some("initech"), "GET", "/me", None)
        .await;
    assert_eq!(me["organization"], "initech");
    let (_, me) = stack.api_as(TENANT_KEY, None, "GET", "/me", None).await;
    assert_eq!(me["organizations"], json!(["globex"]));
    assert_eq!(me["any_organization"], false);
    let (status, _) = stack
        .api_as(TENANT_KEY, Some("acme"), "GET", "/me", None)
        .await;
    assert_eq!(status, 404, "another organization is not found");
    stack.stop().await;
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "herald-console-{}",
        herald_test_support::free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}
