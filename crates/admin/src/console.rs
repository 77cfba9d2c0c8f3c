//! The web console (PRODUCT.md, "The console"): plain ES modules, HTML and
//! CSS from `crates/admin/console/`, built into the binary with
//! `include_str!` and served at `/console`. Serving them needs no key; the
//! console calls the public API with the key the user signs in with, like
//! any other client.
//!
//! Every console answer carries a strict Content-Security-Policy (scripts,
//! styles and connections from this origin only, nothing inline, no
//! framing), so a string that reaches the page from the API can never run
//! as code. API answers carry `Cache-Control: no-store` ([`api_headers`]):
//! a browser must not keep webhook definitions or logs on disk.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
];

/// The policy of every console page: nothing but this origin, nothing
/// inline, never framed, no forms posted elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; \
    object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `/console`, `/console/` and `/console/<file>`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/{*path}", get(file))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return secure((StatusCode::NOT_FOUND, "not found").into_response());
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
    secure(response)
}

fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-frame-options", "DENY"),
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
        let response = serve("../lib.rs", &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(response.headers().contains_key("content-security-policy"));
        let response = serve("index.html", &HeaderMap::new());
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(
            serve("index.html", &again).status(),
            StatusCode::NOT_MODIFIED
        );
    }
}
