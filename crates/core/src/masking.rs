//! What the delivery log hides: values of secret-looking header and query
//! parameter names. One list, used by the deliverer when it records an
//! attempt and by the admin API when it shows one.

/// What a hidden value is shown as.
pub const MASK: &str = "********";

/// Parts of a name whose value is secret whatever it holds.
const SECRET_PARTS: &[&str] = &[
    "signature",
    "authorization",
    "token",
    "secret",
    "key",
    "cookie",
    "password",
    "passwd",
    "credential",
    "auth",
    "session",
];

/// Whether a header or query parameter called `name` holds a secret.
pub fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARTS.iter().any(|s| name.contains(s))
}

/// `url` with the values of secret-looking query parameters and any
/// password in the user info masked; the rest is kept as written.
pub fn mask_url(url: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (base, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    let mut out = mask_userinfo(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_name(k) => format!("{k}={MASK}"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

fn mask_userinfo(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:{MASK}")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => base.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (name, secret) in [
            ("Authorization", true),
            ("x-api-key", true),
            ("X-Webhook-Signature", true),
            ("webhook-signature", true),
            ("Cookie", true),
            ("x-session-id", true),
            ("content-type", false),
            ("user-agent", false),
            ("webhook-id", false),
        ] {
            assert_eq!(secret_name(name), secret, "{name}");
        }
    }

    #[test]
    fn urls() {
        for (url, masked) in [
            ("https://h.example/p", "https://h.example/p"),
            (
                "https://h.example/p?token=abc&x=1",
                "https://h.example/p?token=********&x=1",
            ),
            (
                "https://h.example/p?API_KEY=abc&sig=2#frag",
                "https://h.example/p?API_KEY=********&sig=2#frag",
            ),
            (
                "https://user:pw@h.example/p?a=1",
                "https://user:********@h.example/p?a=1",
            ),
            ("https://user@h.example/", "https://user@h.example/"),
            ("not a url?password=x", "not a url?password=********"),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }
}
