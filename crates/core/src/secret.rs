//! Webhook secrets: generated, and encrypted at rest with XChaCha20-Poly1305
//! under `HERALD_SECRET_KEY`. Each ciphertext names the key that made it, so
//! the operator can rotate the key: the new key encrypts, old keys listed in
//! `HERALD_SECRET_KEY_PREVIOUS` still decrypt.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::proto;

/// The associated data a webhook's custom header value is encrypted with:
/// it binds the value to its webhook and its header name.
pub fn header_aad(org: &str, webhook_id: &str, header: &str) -> String {
    format!("{org}.{webhook_id}/header/{}", header.to_ascii_lowercase())
}

/// A new `whsec_` secret: 32 random bytes, base64.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", B64.encode(bytes))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must be <key id>:<base64 of 32 bytes> or <base64 of 32 bytes>")]
    Format,
    #[error("key id {0:?} is not 1-32 of [A-Za-z0-9_-]")]
    KeyId(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("secret was encrypted with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("secret does not decrypt with key {0:?}: wrong key or corrupted")]
    Corrupt(String),
}

#[derive(Clone)]
struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The keys that encrypt (the first) and decrypt (all) webhook secrets.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| &k.id))
            .finish()
    }
}

impl Keyring {
    /// `current` is `HERALD_SECRET_KEY`; `previous` a comma-separated list of
    /// keys that still decrypt.
    pub fn parse(current: &str, previous: &str) -> Result<Self, KeyError> {
        let mut keys = vec![parse_key(current)?];
        for text in previous.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            keys.push(parse_key(text)?);
        }
        Ok(Self { keys })
    }

    /// A random key, for tests and the dev stack.
    pub fn generate_key_text() -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        format!("k1:{}", B64.encode(bytes))
    }

    pub fn encrypt(&self, secret: &str, aad: &str, created_at_ms: i64) -> proto::EncryptedSecret {
        let key = &self.keys[0];
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("encryption into memory cannot fail");
        proto::EncryptedSecret {
            key_id: key.id.clone(),
            nonce: nonce.to_vec().into(),
            ciphertext: ciphertext.into(),
            created_at_ms,
            expires_at_ms: 0,
        }
    }

    /// `aad` binds the ciphertext to its webhook, so a secret copied onto
    /// another webhook's record does not decrypt.
    pub fn decrypt(
        &self,
        secret: &proto::EncryptedSecret,
        aad: &str,
    ) -> Result<String, DecryptError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == secret.key_id)
            .ok_or_else(|| DecryptError::UnknownKey(secret.key_id.clone()))?;
        let corrupt = || DecryptError::Corrupt(secret.key_id.clone());
        if secret.nonce.len() != 24 {
            return Err(corrupt());
        }
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(&secret.nonce),
                Payload {
                    msg: &secret.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plain).map_err(|_| corrupt())
    }
}

fn parse_key(text: &str) -> Result<Key, KeyError> {
    let text = text.trim();
    let (id, b64) = text.split_once(':').unwrap_or(("k1", text));
    if id.is_empty()
        || id.len() > 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(KeyError::KeyId(id.to_owned()));
    }
    let bytes = B64.decode(b64).map_err(|_| KeyError::Format)?;
    if bytes.len() != 32 {
        return Err(KeyError::Format);
    }
    Ok(Key {
        id: id.to_owned(),
        cipher: XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| KeyError::Format)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rotation() {
        let old = Keyring::generate_key_text().replace("k1:", "old:");
        let new = Keyring::generate_key_text().replace("k1:", "new:");
        let before = Keyring::parse(&old, "").unwrap();
        let sealed = before.encrypt("whsec_abc", "acme.wh_1", 1);
        assert_eq!(sealed.key_id, "old");
        assert_ne!(&sealed.ciphertext[..], b"whsec_abc");
        assert_eq!(before.decrypt(&sealed, "acme.wh_1").unwrap(), "whsec_abc");
        assert!(matches!(
            before.decrypt(&sealed, "acme.wh_2"),
            Err(DecryptError::Corrupt(_))
        ));

        let after = Keyring::parse(&new, &old).unwrap();
        assert_eq!(after.decrypt(&sealed, "acme.wh_1").unwrap(), "whsec_abc");
        assert_eq!(after.encrypt("x", "a", 1).key_id, "new");
        assert!(matches!(
            Keyring::parse(&new, "")
                .unwrap()
                .decrypt(&sealed, "acme.wh_1"),
            Err(DecryptError::UnknownKey(_))
        ));
    }

    #[test]
    fn bad_keys() {
        assert_eq!(Keyring::parse("", "").unwrap_err(), KeyError::Format);
        assert_eq!(
            Keyring::parse("k1:c2hvcnQ=", "").unwrap_err(),
            KeyError::Format
        );
        assert!(matches!(
            Keyring::parse("bad id:AAAA", ""),
            Err(KeyError::KeyId(_))
        ));
        assert!(generate().starts_with("whsec_"));
        assert_eq!(B64.decode(&generate()[6..]).unwrap().len(), 32);
    }
}
