//! Signatures on outgoing requests.
//!
//! - Standard Webhooks: `webhook-signature: v1,<base64 HMAC-SHA256 of
//!   "id.timestamp.body">`, keyed by the base64-decoded part after `whsec_`
//!   (a tenant's own secret not of that form is used as its UTF-8 bytes).
//! - `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body>`, keyed by
//!   the secret string exactly as the tenant was shown it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A secret ready to sign with: both key forms computed once.
#[derive(Clone)]
pub struct SigningKey {
    standard: Vec<u8>,
    raw: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    pub fn new(secret: &str) -> Self {
        let standard = secret
            .strip_prefix("whsec_")
            .and_then(|b64| B64.decode(b64).ok())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| secret.as_bytes().to_vec());
        Self {
            standard,
            raw: secret.as_bytes().to_vec(),
        }
    }

    /// `v1,<base64>` over `id.timestamp.body`.
    pub fn standard_signature(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            HmacSha256::new_from_slice(&self.standard).expect("hmac takes any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }

    /// `sha256=<hex>` over the body alone.
    pub fn body_signature(&self, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.raw).expect("hmac takes any key length");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header value: one signature per live secret,
/// space-separated (several during a rotation).
pub fn standard_signatures(
    keys: &[SigningKey],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    keys.iter()
        .map(|k| k.standard_signature(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a `webhook-signature` header the way a receiver does: true when
/// any of its signatures matches. Used by tests and the benchmark receiver.
pub fn verify_standard(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let expected = SigningKey::new(secret).standard_signature(msg_id, timestamp, body);
    header
        .split(' ')
        .any(|sig| constant_time_eq(sig.as_bytes(), expected.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks specification.
    #[test]
    fn standard_webhooks_vector() {
        let key = SigningKey::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = key.standard_signature(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify_standard(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &format!("v1,bm90IGl0 {sig}"),
        ));
    }

    #[test]
    fn body_signature_uses_the_secret_as_shown() {
        // RFC 4231 test case 2: key "Jefe".
        let key = SigningKey::new("Jefe");
        assert_eq!(
            key.body_signature(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn own_secret_not_whsec_is_used_as_bytes() {
        let a = SigningKey::new("my-own-secret").standard_signature("m", 1, b"x");
        let mut mac = HmacSha256::new_from_slice(b"my-own-secret").unwrap();
        mac.update(b"m.1.x");
        assert_eq!(a, format!("v1,{}", B64.encode(mac.finalize().into_bytes())));
    }
}
