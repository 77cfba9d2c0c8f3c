//! Tenants as data, against a whole running Herald and, where it matters,
//! a second admin replica beside the first: organizations and API keys
//! made over the API, read-only keys, revocation reaching every replica,
//! one request rate shared by replicas, console links exchanged once, the
//! audit trail, and custom header values encrypted at rest and masked.

use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::proto;
use herald_e2e::{Receiver, Stack, TENANT_KEY};
use herald_platform::webhooks::WebhookStore;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One admin API replica, by its base URL.
#[derive(Clone)]
struct Admin {
    url: String,
}

impl Admin {
    fn of(stack: &Stack) -> Self {
        Self {
            url: stack.admin_url.clone(),
        }
    }

    /// Starts another admin replica with the stack's environment (its own
    /// health port) and waits until it is ready.
    async fn second(stack: &Stack) -> (Self, CancellationToken) {
        let mut env = stack.env.clone();
        env.insert("HERALD_ADMIN_HEALTH_ADDR".into(), "127.0.0.1:0".into());
        let config = herald_admin::Config::from_source(&env).expect("admin config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = Self {
            url: format!("http://{}", listener.local_addr().unwrap()),
        };
        let token = stack.shutdown.child_token();
        tokio::spawn(herald_admin::serve(config, listener, token.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = stack.get(&format!("{}/ready", admin.url)).await {
                break;
            }
            assert!(Instant::now() < deadline, "second admin not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (admin, token)
    }

    async fn call(
        &self,
        key: &str,
        org: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {key}"));
        if let Some(org) = org {
            builder = builder.header("x-organization-id", org);
        }
        let bytes = match body {
            Some(body) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(builder.body(Full::new(bytes)).unwrap()),
        )
        .await
        .expect("admin answers in time")
        .expect("admin call");
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, json)
    }

    /// Exchanges a console link's token for a session (no key needed).
    async fn exchange(&self, token: &str) -> (u16, Value) {
        let body = json!({"token": token});
        self.call("", None, "POST", "/console-sessions", Some(body))
            .await
    }

    /// With the stack's operator key (from the keys file).
    async fn op(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(herald_e2e::API_KEY, None, method, path, body)
            .await
    }
}

#[track_caller]
fn code(status: u16, expected: u16, body: &Value) -> String {
    assert_eq!(status, expected, "{body}");
    body["error"]["code"]
        .as_str()
        .expect("error code")
        .to_owned()
}

/// Makes an API key over the API; answers (id, key).
async fn make_key(admin: &Admin, body: Value) -> (String, String) {
    let (status, made) = admin.op("POST", "/api-keys", Some(body)).await;
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().expect("the key, once").to_owned();
    assert!(key.starts_with("hk_"), "{key}");
    assert!(key.starts_with(made["prefix"].as_str().unwrap()));
    (made["id"].as_str().unwrap().to_owned(), key)
}

fn hook(name: &str, url: &str) -> Value {
    json!({"name": name, "url": url, "event_types": ["workflow.completed"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn organizations_and_a_read_only_key_over_the_api() {
    let stack = Stack::start().await;
    let admin = Admin::of(&stack);

    // Operators only.
    let (status, body) = admin
        .call(
            TENANT_KEY,
            None,
            "POST",
            "/organizations",
            Some(json!({"id": "x"})),
        )
        .await;
    assert_eq!(code(status, 403, &body), "operator_only");

    let (status, org) = admin
        .op(
            "POST",
            "/organizations",
            Some(
                json!({"id": "initech", "name": "Initech", "metadata": {"plan": "gold"},
                        "limits": {"max_webhooks": 2}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{org}");
    assert_eq!(org["limits"]["max_webhooks"], 2);
    assert_eq!(org["limits"]["requests_per_minute"], Value::Null);
    let (status, again) = admin
        .op("POST", "/organizations", Some(json!({"id": "initech"})))
        .await;
    assert_eq!(code(status, 409, &again), "already_exists");
    for bad in [
        json!({"id": "Bad Id"}),
        json!({"id": "a", "limits": {"nope": 1}}),
        json!({"id": "a", "metadata": {"big": "x".repeat(20_000)}}),
    ] {
        let (status, _) = admin.op("POST", "/organizations", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}");
    }
    let (status, patched) = admin
        .op(
            "PATCH",
            "/organizations/initech",
            Some(json!({"name": "Initech Corp", "limits": {"manual_sends_per_minute": 5}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["name"], "Initech Corp");
    assert_eq!(patched["limits"]["max_webhooks"], 2, "limits merge");
    assert_eq!(patched["metadata"], json!({"plan": "gold"}));
    let (_, list) = admin.op("GET", "/organizations", None).await;
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == "initech"),
        "{list}"
    );

    // The organization's own webhook limit applies.
    let as_initech = |method: &'static str, path: &'static str, body: Option<Value>| {
        let admin = admin.clone();
        async move {
            admin
                .call(herald_e2e::API_KEY, Some("initech"), method, path, body)
                .await
        }
    };
    let (status, webhook) =
        as_initech("POST", "/webhooks", Some(hook("a", "http://127.0.0.1:9/a"))).await;
    assert_eq!(status, 201, "{webhook}");
    let webhook_id = webhook["id"].as_str().unwrap().to_owned();
    as_initech("POST", "/webhooks", Some(hook("b", "http://127.0.0.1:9/b"))).await;
    let (status, third) =
        as_initech("POST", "/webhooks", Some(hook("c", "http://127.0.0.1:9/c"))).await;
    assert_eq!(code(status, 409, &third), "limit_reached");

    // A read-only key of that organization: every GET, no change.
    let (read_id, read_key) = make_key(
        &admin,
        json!({"name": "dashboard", "scope": "read", "organizations": ["initech"]}),
    )
    .await;
    let (status, seen) = admin.call(&read_key, None, "GET", "/webhooks", None).await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["total"], 2);
    let (status, _) = admin
        .call(
            &read_key,
            None,
            "GET",
            &format!("/webhooks/{webhook_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, me) = admin.call(&read_key, None, "GET", "/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(me["scope"], "read");
    assert_eq!(me["key_id"], read_id.as_str());
    for (method, path, body) in [
        (
            "POST",
            "/webhooks".to_owned(),
            Some(hook("d", "http://127.0.0.1:9/d")),
        ),
        (
            "PATCH",
            format!("/webhooks/{webhook_id}"),
            Some(json!({"name": "x"})),
        ),
        ("DELETE", format!("/webhooks/{webhook_id}"), None),
        ("POST", format!("/webhooks/{webhook_id}/test"), None),
        (
            "POST",
            format!("/webhooks/{webhook_id}/rotate-secret"),
            None,
        ),
    ] {
        let (status, refused) = admin.call(&read_key, None, method, &path, body).await;
        assert_eq!(code(status, 403, &refused), "read_only", "{method} {path}");
    }
    // Another organization is invisible to it.
    let (status, _) = admin
        .call(&read_key, Some("acme"), "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 404);
    let (status, body) = admin.call(&read_key, None, "GET", "/api-keys", None).await;
    assert_eq!(code(status, 403, &body), "operator_only");

    // Listed without the key or its hash.
    let (_, keys) = admin.op("GET", "/api-keys", None).await;
    let listed = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == read_id.as_str())
        .expect("listed")
        .clone();
    assert_eq!(listed["scope"], "read");
    assert_eq!(listed["organizations"], json!(["initech"]));
    assert!(listed.get("key").is_none() && listed.get("hash").is_none());
    assert!(!keys.to_string().contains(&read_key));
    // last_used_at is written after use (lazily).
    stack
        .eventually(Duration::from_secs(10), "last_used_at", || async {
            let (_, keys) = admin.op("GET", "/api-keys", None).await;
            keys["data"]
                .as_array()?
                .iter()
                .find(|k| k["id"] == read_id.as_str())?["last_used_at"]
                .as_str()
                .map(|_| ())
        })
        .await;

    // An expired key signs nobody in.
    let (_, expiring) = make_key(
        &admin,
        json!({"name": "short", "scope": "admin", "organizations": ["initech"], "ttl": "1s"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _) = admin.call(&expiring, None, "GET", "/webhooks", None).await;
    assert_eq!(status, 401);

    // Deleting the organization deletes its webhooks and keys.
    let (status, _) = admin.op("DELETE", "/organizations/initech", None).await;
    assert_eq!(status, 204);
    let (status, _) = admin
        .call(
            herald_e2e::API_KEY,
            Some("initech"),
            "GET",
            &format!("/webhooks/{webhook_id}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = admin.call(&read_key, None, "GET", "/webhooks", None).await;
    assert_eq!(status, 401);
    let (status, _) = admin.op("GET", "/organizations/initech", None).await;
    assert_eq!(status, 404);
    // Ids no organization or key can have name nothing (the bucket is not
    // asked: a key with an empty token has no responder).
    for (method, path) in [
        ("GET", "/organizations/0..0"),
        ("PATCH", "/organizations/0..0"),
        ("DELETE", "/organizations/0..0"),
        ("DELETE", "/api-keys/a..b"),
    ] {
        let body = (method == "PATCH").then(|| json!({"name": "x"}));
        let (status, _) = admin.op(method, path, body).await;
        assert_eq!(status, 404, "{method} {path}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_keys_file_is_read_again_when_it_changes() {
    let stack = Stack::start().await;
    let admin = Admin::of(&stack);
    let path = std::path::PathBuf::from(&stack.env["HERALD_API_KEYS_FILE"]);
    let (status, _) = admin
        .call("rotated-key", None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 401);
    // (The dev stack's key starts like a key made over the API: the file
    // still answers for it.)
    let dev_like = "hk_0123456789abcdef0123456789abcdef0123456789abcdef";
    let keys = json!({"keys": [
        {"key_sha256": herald_admin::auth::hash_key("rotated-key"), "organizations": ["*"], "default_organization": "acme"},
        {"key_sha256": herald_admin::auth::hash_key(dev_like), "organizations": ["*"], "default_organization": "acme"},
    ]});
    std::fs::write(&path, keys.to_string()).unwrap();
    stack
        .eventually(Duration::from_secs(5), "the new key", || async {
            let (status, _) = admin
                .call("rotated-key", None, "GET", "/webhooks", None)
                .await;
            (status == 200).then_some(())
        })
        .await;
    let (status, _) = admin.call(dev_like, None, "GET", "/webhooks", None).await;
    assert_eq!(status, 200, "a file key that looks like an API-made one");
    // The old bootstrap key is gone with the file's old contents.
    let (status, _) = admin.op("GET", "/webhooks", None).await;
    assert_eq!(status, 401);
    stack.stop().await;
}

/// Polls `path` with `key` on `admin` until it answers 401; how long it took.
async fn until_refused(admin: &Admin, key: &str, path: &str, started: Instant) -> Duration {
    loop {
        let (status, _) = admin.call(key, None, "GET", path, None).await;
        if status == 401 {
            return started.elapsed();
        }
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_is_refused_by_every_replica_within_two_seconds() {
    let stack = Stack::start().await;
    let one = Admin::of(&stack);
    let (two, _token) = Admin::second(&stack).await;
    let (id, key) = make_key(
        &one,
        json!({"name": "ci", "scope": "admin", "organizations": ["acme"]}),
    )
    .await;
    // Known at once on both: the second reads a key it has not heard of.
    for admin in [&one, &two] {
        let (status, body) = admin.call(&key, None, "GET", "/webhooks", None).await;
        assert_eq!(status, 200, "{body}");
    }
    let started = Instant::now();
    let (status, _) = two.op("DELETE", &format!("/api-keys/{id}"), None).await;
    assert_eq!(status, 204);
    let on_two = until_refused(&two, &key, "/webhooks", started).await;
    let on_one = until_refused(&one, &key, "/webhooks", started).await;
    println!(
        "revoked key refused after {on_two:?} (replica that revoked), {on_one:?} (other replica)"
    );
    assert!(on_one < Duration::from_secs(2), "{on_one:?}");
    assert!(on_two < Duration::from_secs(2), "{on_two:?}");
    let (status, _) = one.op("DELETE", &format!("/api-keys/{id}"), None).await;
    assert_eq!(status, 404);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_allow_one_rate_not_two() {
    let stack = Stack::start().await;
    let one = Admin::of(&stack);
    let (two, _token) = Admin::second(&stack).await;
    let (status, _) = one
        .op(
            "POST",
            "/organizations",
            Some(json!({"id": "umbrella", "limits": {"requests_per_minute": 10}})),
        )
        .await;
    assert_eq!(status, 201);
    let (_, key) = make_key(
        &one,
        json!({"name": "busy", "scope": "admin", "organizations": ["umbrella"]}),
    )
    .await;
    // 40 requests, alternating replicas, as fast as they answer: the shared
    // bucket holds 10 (the minute's rate), and refills one every 6 s.
    let started = Instant::now();
    let mut allowed = 0;
    let mut refused = 0;
    for i in 0..40 {
        let admin = if i % 2 == 0 { &one } else { &two };
        let (status, body) = admin.call(&key, None, "GET", "/webhooks", None).await;
        match status {
            200 => allowed += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let took = started.elapsed();
    println!("{allowed} of 40 allowed by two replicas in {took:?} at 10 a minute");
    let refills = (took.as_secs_f64() / 6.0).ceil() as usize;
    assert!(allowed >= 10, "{allowed}");
    assert!(
        allowed <= 10 + refills,
        "{allowed} allowed: each replica counted alone"
    );
    assert_eq!(allowed + refused, 40);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_link_is_exchanged_once_and_ends_with_revocation_or_expiry() {
    let stack = Stack::start().await;
    let one = Admin::of(&stack);
    let (two, _token) = Admin::second(&stack).await;
    let (status, _) = one
        .op("POST", "/organizations", Some(json!({"id": "hooli"})))
        .await;
    assert_eq!(status, 201);
    let mut ids = Vec::new();
    for name in ["shown", "hidden"] {
        let (status, w) = one
            .call(
                herald_e2e::API_KEY,
                Some("hooli"),
                "POST",
                "/webhooks",
                Some(hook(name, "http://127.0.0.1:9/x")),
            )
            .await;
        assert_eq!(status, 201);
        ids.push(w["id"].as_str().unwrap().to_owned());
    }
    let (status, link) = one
        .op(
            "POST",
            "/organizations/hooli/console-links",
            Some(json!({"scope": "read", "ttl": "1h", "webhook_ids": [ids[0]]})),
        )
        .await;
    assert_eq!(status, 201, "{link}");
    let url = link["url"].as_str().unwrap();
    let (base, token) = url
        .split_once("/console#link=")
        .expect("a console URL with the token in its fragment");
    assert_eq!(base, one.url);
    assert!(link["expires_at"].is_string());
    let link_id = link["id"].as_str().unwrap().to_owned();

    // Exchanged once, on any replica.
    let (status, session) = two.exchange(token).await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["organization"], "hooli");
    assert_eq!(session["scope"], "read");
    let session = session["session"].as_str().unwrap().to_owned();
    let (status, again) = one.exchange(token).await;
    assert_eq!(code(status, 401, &again), "invalid_link");

    // The session sees that organization's one webhook, read-only.
    for admin in [&one, &two] {
        let (status, list) = admin.call(&session, None, "GET", "/webhooks", None).await;
        assert_eq!(status, 200, "{list}");
        let shown: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap())
            .collect();
        assert_eq!(shown, vec![ids[0].as_str()]);
    }
    let (status, _) = one
        .call(
            &session,
            None,
            "GET",
            &format!("/webhooks/{}", ids[1]),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = one
        .call(&session, Some("acme"), "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 404);
    let (status, body) = one
        .call(
            &session,
            None,
            "PATCH",
            &format!("/webhooks/{}", ids[0]),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(code(status, 403, &body), "read_only");
    let (status, me) = one.call(&session, None, "GET", "/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(me["session"], true);
    assert_eq!(me["webhook_ids"], json!([ids[0]]));
    // A session cannot hand out links of its own.
    let (status, _) = one
        .call(
            &session,
            None,
            "POST",
            "/organizations/hooli/console-links",
            Some(json!({"scope": "read"})),
        )
        .await;
    assert_eq!(status, 403);

    // Revoked: its session ends on both replicas.
    let started = Instant::now();
    let (status, _) = one
        .op(
            "DELETE",
            &format!("/organizations/hooli/console-links/{link_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let on_one = until_refused(&one, &session, "/webhooks", started).await;
    let on_two = until_refused(&two, &session, "/webhooks", started).await;
    println!("revoked console link's session refused after {on_one:?} and {on_two:?}");
    assert!(on_two < Duration::from_secs(2), "{on_two:?}");

    // Expired: neither the link nor its session signs anybody in.
    let (_, short) = one
        .op(
            "POST",
            "/organizations/hooli/console-links",
            Some(json!({"scope": "admin", "ttl": "2s"})),
        )
        .await;
    let (_, unused) = one
        .op(
            "POST",
            "/organizations/hooli/console-links",
            Some(json!({"scope": "admin", "ttl": "1s"})),
        )
        .await;
    let token_of = |link: &Value| {
        link["url"]
            .as_str()
            .unwrap()
            .split_once("#link=")
            .unwrap()
            .1
            .to_owned()
    };
    let (status, exchanged) = one.exchange(&token_of(&short)).await;
    assert_eq!(status, 201);
    let admin_session = exchanged["session"].as_str().unwrap().to_owned();
    let (status, list) = one
        .call(&admin_session, None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 2, "a link without webhook_ids sees them all");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = one
        .call(&admin_session, None, "GET", "/webhooks", None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = one.exchange(&token_of(&unused)).await;
    assert_eq!(status, 401);
    // A forged session token is nobody.
    let forged = format!("hs_{link_id}.AAAA.{}", "0".repeat(64));
    let (status, _) = one.call(&forged, None, "GET", "/webhooks", None).await;
    assert_eq!(status, 401);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_trail_names_the_key_and_the_fields_never_a_secret() {
    let stack = Stack::start().await;
    let admin = Admin::of(&stack);
    let (key_id, key) = make_key(
        &admin,
        json!({"name": "deployer", "scope": "admin", "organizations": ["acme"]}),
    )
    .await;
    let secret = "whsec_dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIDMyIGJ5dGVzISE=";
    let header_value = "Bearer receiver-credential-9876";
    let (status, webhook) = admin
        .call(
            &key,
            None,
            "POST",
            "/webhooks",
            Some(json!({"name": "audited", "url": "http://127.0.0.1:9/a", "event_types": ["workflow.completed"],
                        "secret": secret, "headers": {"Authorization": header_value}})),
        )
        .await;
    assert_eq!(status, 201, "{webhook}");
    let id = webhook["id"].as_str().unwrap().to_owned();
    let (status, _) = admin
        .call(
            &key,
            None,
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(status, 200);

    let (status, trail) = admin.call(&key, None, "GET", "/audit?limit=2", None).await;
    assert_eq!(status, 200, "{trail}");
    let entries = trail["data"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{trail}");
    assert_eq!(entries[0]["action"], "webhook.updated", "newest first");
    assert_eq!(entries[0]["fields"], json!(["name"]));
    assert_eq!(entries[1]["action"], "webhook.created");
    assert_eq!(entries[1]["key_id"], key_id.as_str());
    assert_eq!(entries[1]["target"], json!({"type": "webhook", "id": id}));
    let fields: Vec<&str> = entries[1]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"headers") && fields.contains(&"secret"),
        "{fields:?}"
    );
    // The next page goes on, older.
    let cursor = trail["next_cursor"].as_str().expect("older entries remain");
    let (_, older) = admin
        .call(
            &key,
            None,
            "GET",
            &format!("/audit?limit=50&cursor={cursor}"),
            None,
        )
        .await;
    assert!(
        older["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["action"] != "webhook.updated")
    );

    // Nothing secret anywhere in the stream itself.
    let mut stream = stack.js.get_stream("HERALD_AUDIT").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        let text = String::from_utf8_lossy(&message.payload);
        for hidden in [secret, header_value, "receiver-credential", key.as_str()] {
            assert!(!text.contains(hidden), "{text}");
        }
    }
    // Another organization's trail does not show acme's changes.
    let (_, globex) = admin.call(TENANT_KEY, None, "GET", "/audit", None).await;
    assert_eq!(globex["data"], json!([]), "{globex}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_values_are_encrypted_at_rest_masked_in_answers_and_sent_in_full() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let credential = "Bearer receiver-token-abcd";
    let created = stack
        .create_webhook(json!({
            "name": "creds", "url": receiver.url("/creds"), "event_types": ["workflow.completed"],
            "headers": {"Authorization": credential, "X-Short": "t1"},
        }))
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let masked = json!({"Authorization": "••••abcd", "X-Short": "••••"});
    assert_eq!(created["headers"], masked);
    let (_, got) = stack.api("GET", &format!("/webhooks/{id}"), None).await;
    assert_eq!(got["headers"], masked);
    let (_, list) = stack.api("GET", "/webhooks", None).await;
    assert_eq!(list["data"][0]["headers"], masked);

    // In the bucket: no plain value, ciphertexts only.
    let store = WebhookStore::open(&stack.js, 1).await.unwrap();
    let stored: proto::Webhook = store.get("acme", &id).await.unwrap().unwrap().webhook;
    assert!(stored.headers.is_empty(), "{:?}", stored.headers);
    assert_eq!(stored.encrypted_headers.len(), 2);
    let raw = stack
        .js
        .get_key_value(herald_core::names::WEBHOOKS_BUCKET)
        .await
        .unwrap()
        .get(format!("acme.{id}"))
        .await
        .unwrap()
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("receiver-token"));

    // Sending the masks back keeps the values; a wrong mask is refused.
    let (status, patched) = stack
        .api("PATCH", &format!("/webhooks/{id}"), Some(json!({"headers": {"Authorization": "••••abcd", "X-Short": "••••", "X-New": "fresh-value-1234"}})))
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["headers"]["X-New"], "••••1234");
    let (status, refused) = stack
        .api(
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(json!({"headers": {"Authorization": "••••zzzz"}})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");

    // The receiver gets the values themselves.
    stack.wait_deliverer_current().await;
    stack
        .publish("acme", "workflow.completed", json!({"id": "evt_creds"}))
        .await;
    let got = receiver
        .wait_for("/creds", 1, Duration::from_secs(20))
        .await;
    assert_eq!(got[0].header("authorization"), Some(credential));
    assert_eq!(got[0].header("x-short"), Some("t1"));
    assert_eq!(got[0].header("x-new"), Some("fresh-value-1234"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_nats_config_keeps_a_producer_to_its_events_and_its_own_inbox() {
    use futures::StreamExt;
    // The `accounts` block of deploy/nats-server.conf as it is, its
    // passwords filled in.
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/nats-server.conf"
    ))
    .unwrap();
    let start = sample.find("\naccounts {").expect("an accounts block");
    let end = sample.find("system_account: SYS").expect("system account") + 19;
    let config = sample[start..end]
        .replace("$NATS_HERALD_PASSWORD", "heraldpw")
        .replace("$NATS_PRODUCER_ACME_PASSWORD", "producerpw")
        .replace("$NATS_SYS_PASSWORD", "syspw");
    let dir = std::env::temp_dir().join(format!(
        "herald-nats-conf-{}",
        herald_test_support::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, config).unwrap();
    let server = herald_test_support::NatsServer::start_with(&["-c", &conf.display().to_string()]);

    let herald =
        async_nats::ConnectOptions::with_user_and_password("herald".into(), "heraldpw".into())
            .connect(server.url())
            .await
            .expect("herald's user connects");
    let js = async_nats::jetstream::new(herald.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "HERALD_EVENTS".into(),
        subjects: vec!["herald.events.>".into()],
        ..Default::default()
    })
    .await
    .expect("herald's user manages streams");
    let producer = async_nats::ConnectOptions::with_user_and_password(
        "producer-acme".into(),
        "producerpw".into(),
    )
    .custom_inbox_prefix("_INBOX_acme")
    .connect(server.url())
    .await
    .expect("the producer connects");
    let pjs = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(producer.clone());

    // Its own organization's events: published and acknowledged.
    pjs.publish("herald.events.acme.workflow.completed", "{}".into())
        .await
        .unwrap()
        .await
        .expect("acked on the producer's own inbox");
    // Another organization's, or the JetStream API: refused.
    let other = match pjs
        .publish("herald.events.globex.workflow.completed", "{}".into())
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!other, "a producer published for another organization");
    assert!(
        pjs.get_stream("HERALD_EVENTS").await.is_err(),
        "a producer used the JetStream API"
    );
    let mut stream = js.get_stream("HERALD_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    // Herald's inboxes stay Herald's: a producer's `_INBOX.>` hears nothing,
    // its own prefix does.
    let mut spy = producer.subscribe("_INBOX.>").await.unwrap();
    let mut own = producer.subscribe("_INBOX_acme.probe").await.unwrap();
    producer.flush().await.unwrap();
    herald
        .publish("_INBOX.reply.1", "meant for herald".into())
        .await
        .unwrap();
    // Sent again until heard: the producer's interest reaches Herald's
    // account through the import, which a loaded machine may take a
    // moment over (a message published before that reaches nobody).
    let heard = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            herald
                .publish("_INBOX_acme.probe", "for the producer".into())
                .await
                .unwrap();
            herald.flush().await.unwrap();
            if let Ok(heard) = tokio::time::timeout(Duration::from_millis(500), own.next()).await {
                return heard;
            }
        }
    })
    .await;
    assert!(matches!(heard, Ok(Some(_))), "the producer's own inbox");
    let spied = tokio::time::timeout(Duration::from_millis(500), spy.next()).await;
    assert!(
        !matches!(spied, Ok(Some(_))),
        "a producer read a reply meant for Herald"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
