//! Stored passwords: PBKDF2-HMAC-SHA256 with a random salt. A leaf: the
//! config parses `password_hash` into a [`PasswordHash`], the tenants
//! verify with it.
//!
//! The stored form is one string,
//! `pbkdf2-sha256$<iterations>$<salt, base64>$<hash, base64>` (standard
//! alphabet, padding optional), the same layout passlib and Django use, so
//! hashes can be made by other tools too. `guard tenant hash-password`
//! prints one.

use std::{fmt, str::FromStr};

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

/// The scheme name, the first field of a stored hash.
pub const SCHEME: &str = "pbkdf2-sha256";
/// Iterations `guard tenant hash-password` uses unless told otherwise.
///
/// memcache credentials are machine secrets, not human passwords; this
/// costs tens of milliseconds per verification, and verified passwords
/// are cached (see `TenantRegistry::authenticate`), so a cold cache after a
/// restart does not turn a reconnect storm into minutes of hashing.
pub const DEFAULT_ITERATIONS: u32 = 100_000;
/// Fewest iterations a stored hash may have.
pub const MIN_ITERATIONS: u32 = 1_000;
/// Most iterations a stored hash may have: a bound on what one
/// verification can cost.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Salt length of new hashes.
pub const SALT_LEN: usize = 16;
/// Hash length of new hashes (one SHA-256 block).
pub const HASH_LEN: usize = 32;

const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A parsed stored password.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    iterations: u32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// Why a stored hash string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashFormatError {
    #[error("expected `{SCHEME}$<iterations>$<salt>$<hash>`")]
    Shape,
    #[error("unknown scheme `{0}`: only `{SCHEME}` is supported")]
    Scheme(String),
    #[error("iterations must be a number from {MIN_ITERATIONS} to {MAX_ITERATIONS}")]
    Iterations,
    #[error("the {0} is not valid base64")]
    Base64(&'static str),
    #[error("the salt must be 8 to 64 bytes")]
    SaltLength,
    #[error("the hash must be 16 to 64 bytes")]
    HashLength,
}

impl PasswordHash {
    /// Hashes `password` with a fresh random salt.
    pub fn generate(password: &[u8], iterations: u32) -> Result<Self, getrandom::Error> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt)?;
        Ok(Self::with_salt(password, salt, iterations))
    }

    /// Hashes `password` with the given salt (tests, and other tools'
    /// vectors).
    pub fn with_salt(password: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let mut hash = vec![0u8; HASH_LEN];
        pbkdf2_sha256(password, &salt, iterations, &mut hash);
        Self {
            iterations,
            salt,
            hash,
        }
    }

    /// Iteration count.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Whether `password` is the one stored. Costs `iterations` HMACs; the
    /// comparison itself takes the same time wherever the bytes differ.
    pub fn verify(&self, password: &[u8]) -> bool {
        let mut out = vec![0u8; self.hash.len()];
        pbkdf2_sha256(password, &self.salt, self.iterations, &mut out);
        constant_time_eq(&out, &self.hash)
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordHash")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .field("hash_len", &self.hash.len())
            .finish()
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}${}${}${}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.hash)
        )
    }
}

impl serde::Serialize for PasswordHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PasswordHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for PasswordHash {
    type Err = HashFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('$');
        let (Some(scheme), Some(iterations), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(HashFormatError::Shape);
        };
        if scheme != SCHEME {
            return Err(HashFormatError::Scheme(scheme.chars().take(32).collect()));
        }
        // Digits only: no sign, no spaces.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HashFormatError::Iterations);
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| HashFormatError::Iterations)?;
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(HashFormatError::Iterations);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| HashFormatError::Base64("salt"))?;
        if !(8..=64).contains(&salt.len()) {
            return Err(HashFormatError::SaltLength);
        }
        let hash = B64
            .decode(hash)
            .map_err(|_| HashFormatError::Base64("hash"))?;
        if !(16..=64).contains(&hash.len()) {
            return Err(HashFormatError::HashLength);
        }
        Ok(Self {
            iterations,
            salt,
            hash,
        })
    }
}

/// PBKDF2 (RFC 8018) with HMAC-SHA256, filling `out`.
pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out);
}

/// Equality whose time depends on the lengths only, not on where the bytes
/// differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn pbkdf2_matches_published_vectors() {
        // RFC 7914 section 11 (PBKDF2-HMAC-SHA256 test vectors).
        let mut out = [0u8; 64];
        pbkdf2_sha256(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
        let mut out = [0u8; 32];
        pbkdf2_sha256(b"password", b"salt", 2, &mut out);
        assert_eq!(
            hex(&out),
            "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"
        );
        pbkdf2_sha256(b"password", b"salt", 4096, &mut out);
        assert_eq!(
            hex(&out),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn round_trip_and_verify() {
        let h = PasswordHash::generate(b"s3cret", MIN_ITERATIONS).unwrap();
        let s = h.to_string();
        assert!(s.starts_with("pbkdf2-sha256$1000$"), "{s}");
        let back: PasswordHash = s.parse().unwrap();
        assert_eq!(back, h);
        assert!(back.verify(b"s3cret"));
        assert!(!back.verify(b"s3cret "));
        assert!(!back.verify(b""));
        // Two hashes of one password differ by their salt.
        let h2 = PasswordHash::generate(b"s3cret", MIN_ITERATIONS).unwrap();
        assert_ne!(h2.to_string(), s);
        // Padded base64 (other tools) is accepted too.
        let padded = format!(
            "{SCHEME}$1000${}${}",
            base64::engine::general_purpose::STANDARD.encode(&h.salt),
            base64::engine::general_purpose::STANDARD.encode(&h.hash)
        );
        assert_eq!(padded.parse::<PasswordHash>().unwrap(), h);
        // The debug form never shows the hash.
        assert!(!format!("{h:?}").contains(&B64.encode(&h.hash)));
    }

    #[test]
    fn rejects_malformed_hashes() {
        let salt = B64.encode([1u8; 16]);
        let hash = B64.encode([2u8; 32]);
        let good = format!("{SCHEME}$1000${salt}${hash}");
        good.parse::<PasswordHash>().unwrap();
        let cases = [
            ("", HashFormatError::Shape),
            ("plaintext", HashFormatError::Shape),
            (&format!("{SCHEME}$1000${salt}"), HashFormatError::Shape),
            (
                &format!("{SCHEME}$1000${salt}${hash}$x"),
                HashFormatError::Shape,
            ),
            (
                &format!("bcrypt$1000${salt}${hash}"),
                HashFormatError::Scheme("bcrypt".into()),
            ),
            (
                &format!("{SCHEME}$999${salt}${hash}"),
                HashFormatError::Iterations,
            ),
            (
                &format!("{SCHEME}$+1000${salt}${hash}"),
                HashFormatError::Iterations,
            ),
            (
                &format!("{SCHEME}$99999999999${salt}${hash}"),
                HashFormatError::Iterations,
            ),
            (
                &format!("{SCHEME}$1000$!!!!${hash}"),
                HashFormatError::Base64("salt"),
            ),
            (
                &format!("{SCHEME}$1000${salt}$%%%%"),
                HashFormatError::Base64("hash"),
            ),
            (
                &format!("{SCHEME}$1000${}${hash}", B64.encode([1u8; 4])),
                HashFormatError::SaltLength,
            ),
            (
                &format!("{SCHEME}$1000${salt}${}", B64.encode([1u8; 8])),
                HashFormatError::HashLength,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<PasswordHash>(), Err(want), "{text}");
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
    }
}
