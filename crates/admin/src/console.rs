//! The web console (PRODUCT.md, "The console"): plain ES modules, HTML and
//! CSS from `crates/admin/console/`, built into the binary with
//! `include_str!` and served at `/console`. Serving them needs no key; the
//! console calls the public API with the key the user signs in with, like
//! any other client.
//!
//! Every console answer carries a strict Content-Security-Policy (scripts,
//! styles and connections from this origin only, nothing inline), so a
//! string that reaches the page from the API can never run as code. It may
//! be framed only by the origins the operator lists
//! (`HERALD_CONSOLE_FRAME_ANCESTORS`, CSP `frame-ancestors`; none by
//! default, then also `X-Frame-Options: DENY`), so a platform can embed it
//! in its own pages and nobody else can. API answers carry `Cache-Control: no-store` ([`api_headers`]):
//! a browser must not keep webhook definitions or logs on disk.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_platform::config::Invalid;
use sha2::{Digest, Sha256};

use crate::AppState;

/// One file of the console.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_str!(concat!("../console/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file under `console/` (a test checks none is missing).
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("session.js", JS),
    asset!("nav.js", JS),
    asset!("catalogue.js", JS),
    asset!("pretty.js", JS),
    asset!("samples.js", JS),
    asset!("views/signin.js", JS),
    asset!("views/webhooks.js", JS),
    asset!("views/form.js", JS),
    asset!("views/webhook.js", JS),
    asset!("views/secret.js", JS),
    asset!("views/logs.js", JS),
    asset!("views/attempt.js", JS),
    asset!("views/organizations.js", JS),
    asset!("views/keys.js", JS),
    asset!("views/audit.js", JS),
];

/// The policy of every console page: nothing but this origin, nothing
/// inline, no forms posted elsewhere; framed by nobody unless the operator
/// lists origins ([`content_security_policy`]).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The policy with `frame-ancestors` set to `ancestors` ('none' when empty).
pub fn content_security_policy(ancestors: &[String]) -> String {
    if ancestors.is_empty() {
        return CONTENT_SECURITY_POLICY.to_owned();
    }
    CONTENT_SECURITY_POLICY.replace(
        "frame-ancestors 'none'",
        &format!("frame-ancestors {}", ancestors.join(" ")),
    )
}

/// `HERALD_CONSOLE_FRAME_ANCESTORS`: space-separated origins like
/// `https://app.example.com` (a scheme and a host, an optional port and
/// `*.` wildcard; nothing else, so the value can never widen the policy
/// beyond origins).
pub fn parse_frame_ancestors(text: &str) -> Result<Vec<String>, Invalid> {
    let mut origins = Vec::new();
    for origin in text.split_whitespace() {
        let (scheme, rest) = origin.split_once("://").ok_or_else(|| {
            Invalid(format!(
                "{origin:?} is not an origin like https://app.example.com"
            ))
        })?;
        let host_ok = !rest.is_empty()
            && rest
                .trim_start_matches("*.")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !matches!(scheme, "https" | "http") || !host_ok {
            return Err(Invalid(format!(
                "{origin:?} is not an origin like https://app.example.com (scheme, host, optional port)"
            )));
        }
        origins.push(origin.trim_end_matches('/').to_owned());
    }
    Ok(origins)
}

/// `HERALD_CONSOLE_URL`: where console links point, e.g.
/// `https://herald.example.com` (the console is at `/console` under it).
pub fn parse_console_url(text: &str) -> Result<String, Invalid> {
    let url = url::Url::parse(text.trim()).map_err(|e| {
        Invalid(format!(
            "{text:?} is not a URL like https://herald.example.com: {e}"
        ))
    })?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(Invalid(format!(
            "{text:?} must be an http(s) URL with a host"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Invalid(format!("{text:?} must have no query or fragment")));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `/console`, `/console/` and `/console/<file>`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/{*path}", get(file))
}

async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    serve("index.html", &headers, &state.config.frame_ancestors)
}

async fn file(
    State(state): State<AppState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(&path, &headers, &state.config.frame_ancestors)
}

fn serve(path: &str, request: &HeaderMap, ancestors: &[String]) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return secure(
            (StatusCode::NOT_FOUND, "not found").into_response(),
            ancestors,
        );
    };
    // A changed binary serves changed files: the ETag is the content's hash.
    let etag = format!(
        "\"{}\"",
        &hex::encode(Sha256::digest(asset.body.as_bytes()))[..16]
    );
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    // Revalidated on every load, so an upgrade is seen at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(response, ancestors)
}

fn secure(mut response: Response, ancestors: &[String]) -> Response {
    let headers = response.headers_mut();
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(ancestors)) {
        headers.insert("content-security-policy", policy);
    }
    // X-Frame-Options cannot name origins (ALLOW-FROM is dead): it is sent
    // only when nobody may frame the console, for browsers without CSP.
    if ancestors.is_empty() {
        headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    }
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Middleware for API answers: never stored by a browser or a proxy (they
/// carry webhook definitions, logs and, once, secrets), never sniffed.
pub async fn api_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files on disk under `console/`, relative, with `/` separators.
    fn files_on_disk() -> Vec<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("console dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let rel = path.strip_prefix(&root).expect("under root");
                    found.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn every_console_file_is_served() {
        let mut served: Vec<String> = ASSETS.iter().map(|a| a.path.to_owned()).collect();
        served.sort();
        assert_eq!(served, files_on_disk(), "ASSETS and console/ differ");
    }

    /// Whether `html` has an inline event handler attribute (` onclick=`).
    fn has_inline_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }

    #[test]
    fn nothing_inline_and_nothing_from_elsewhere() {
        for asset in ASSETS {
            let (path, body) = (asset.path, asset.body);
            if path.ends_with(".html") {
                // Scripts only by src, styles only by link: the CSP blocks
                // inline ones anyway, this keeps them out of the code.
                assert!(!body.contains("<script>"), "{path}: inline script");
                assert!(!body.contains("<style"), "{path}: inline style");
                assert!(!body.contains(" style="), "{path}: style attribute");
                assert!(!has_inline_handler(body), "{path}: inline handler");
            }
            // Nothing is loaded from another origin (no CDN).
            for far in [
                "src=\"http",
                "href=\"http",
                "from \"http",
                "url(http",
                "import(\"http",
            ] {
                assert!(!body.contains(far), "{path} loads from elsewhere: {far}");
            }
            assert!(!body.contains("innerHTML"), "{path}: innerHTML");
            assert!(!body.contains("eval("), "{path}: eval");
        }
    }

    #[test]
    fn unknown_files_are_404_with_the_same_headers() {
        let response = serve("../lib.rs", &HeaderMap::new(), &[]);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.headers().contains_key("content-security-policy"));
        let response = serve("index.html", &HeaderMap::new(), &[]);
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            serve("index.html", &again, &[]).status(),
            StatusCode::NOT_MODIFIED
        );
    }

    #[test]
    fn frame_ancestors_are_the_operators_origins_only() {
        let none = serve("index.html", &HeaderMap::new(), &[]);
        assert_eq!(none.headers()["x-frame-options"], "DENY");
        assert!(
            none.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .ends_with("frame-ancestors 'none'")
        );
        let origins =
            parse_frame_ancestors(" https://app.example.com  http://localhost:3000 ").unwrap();
        let framed = serve("index.html", &HeaderMap::new(), &origins);
        assert!(framed.headers().get("x-frame-options").is_none());
        let csp = framed.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.ends_with("frame-ancestors https://app.example.com http://localhost:3000"),
            "{csp}"
        );
        assert!(csp.contains("default-src 'self'"));
        for bad in [
            "app.example.com",
            "https://a.com; script-src *",
            "javascript://x",
            "'self'",
        ] {
            assert!(parse_frame_ancestors(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_frame_ancestors("").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_console_url("https://h.example.com/").unwrap(),
            "https://h.example.com"
        );
        assert!(parse_console_url("ftp://x").is_err());
    }
}
