//! One-time enrollment tokens. A token is 256 random bits, printed once; only its SHA-256 is
//! stored, so a copy of the database does not let anyone enroll.

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};

/// Every token starts with this, so a leaked one is easy to recognise in a scan.
const PREFIX: &str = "hlet_";

/// A freshly generated enrollment token. `Debug` never shows the secret.
pub struct EnrollmentToken(String);

impl EnrollmentToken {
    /// Generates a token from 32 bytes of the operating system's randomness.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// The secret, for printing to the operator exactly once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The hash that is stored.
    pub fn hash(&self) -> String {
        hash_token(&self.0)
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

/// SHA-256 of a presented token, lowercase hex. Surrounding whitespace (a trailing newline in
/// a token file) is ignored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_long_and_hash_ignores_newlines() {
        let a = EnrollmentToken::generate();
        let b = EnrollmentToken::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().len() >= PREFIX.len() + 43, "256 bits in base64");
        assert_eq!(hash_token(&format!("{}\n", a.expose())), a.hash());
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}
