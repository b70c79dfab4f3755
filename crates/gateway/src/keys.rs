//! API key format and hashing.
//!
//! A key is `<prefix>_<40 base62 chars>_<6 base62 chars checksum>`: a recognisable prefix for
//! secret scanners, ≥ 238 bits of randomness from the OS-seeded CSPRNG, and a checksum that
//! rejects typos without touching any store. Only the SHA-256 of a key is ever kept.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const BODY_LEN: usize = 40;
const CHECK_LEN: usize = 6;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The SHA-256 of a key: what is stored and compared.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// The same lowercase hex as [`KeyHash::to_hex`], on the stack (a cache lookup per request
    /// needs no allocation).
    pub fn hex(&self) -> KeyHashHex {
        let mut out = [0u8; 64];
        // Cannot fail: 32 bytes always fill 64 hex digits.
        let _ = hex::encode_to_slice(self.0, &mut out);
        KeyHashHex(out)
    }

    pub fn from_hex(s: &str) -> Option<KeyHash> {
        let bytes = hex::decode(s).ok()?;
        Some(KeyHash(bytes.try_into().ok()?))
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A key hash's hex digits (see [`KeyHash::hex`]).
pub struct KeyHashHex([u8; 64]);

impl KeyHashHex {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(…)")
    }
}

/// A new random key with `prefix` (e.g. `marga_mk`).
pub fn generate(prefix: &str) -> String {
    let body = Alphanumeric.sample_string(&mut rand::rng(), BODY_LEN);
    let check = checksum(prefix, &body);
    format!("{prefix}_{body}_{check}")
}

/// True when `key` has the shape of a Marga key with `prefix` and its checksum is right.
pub fn is_well_formed(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else { return false };
    let Some((body, check)) = rest.rsplit_once('_') else { return false };
    body.len() == BODY_LEN && body.bytes().all(|b| b.is_ascii_alphanumeric()) && checksum(prefix, body) == check
}

/// A display form (`marga_sk_Ab3d…9xZq`) that identifies a key to its owner but is useless to
/// anyone else.
pub fn label(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let head: String = chars.iter().take(13).collect();
    let tail: String = chars.iter().skip(chars.len().saturating_sub(4)).collect();
    format!("{head}…{tail}")
}

fn checksum(prefix: &str, body: &str) -> String {
    let digest = Sha256::digest(format!("{prefix}_{body}").as_bytes());
    let mut n = u64::from(u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]));
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_typos_are_caught() {
        let key = generate("marga_mk");
        assert!(key.starts_with("marga_mk_"));
        assert!(is_well_formed(&key, "marga_mk"));
        let mut typo = key.clone().into_bytes();
        typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed(&String::from_utf8_lossy(&typo), "marga_mk"));
        assert!(!is_well_formed(&key, "marga_sk"));
        assert_ne!(generate("marga_mk"), key);
    }

    #[test]
    fn hashes_compare_and_round_trip_through_hex() {
        let h = KeyHash::of("secret");
        assert!(h.matches(&KeyHash::of("secret")));
        assert!(!h.matches(&KeyHash::of("secret2")));
        assert!(KeyHash::from_hex(&h.to_hex()).is_some_and(|back| back.matches(&h)));
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }
}
