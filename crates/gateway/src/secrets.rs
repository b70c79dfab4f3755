//! Secrets at rest: values Marga must read back (webhook signing secrets) are sealed with
//! ChaCha20-Poly1305 before they are stored, and opened only where they are used.
//!
//! - **Format.** A sealed value is `v1:<base64 of nonce ‖ ciphertext ‖ tag>` with a random
//!   96-bit nonce per value. A stored value without the `v1:` prefix was written before
//!   secrets were sealed and is read as plaintext; a `v1:` value that does not open (altered,
//!   or sealed with another key) is refused.
//! - **The data key.** 32 bytes, written as 64 hex digits or in standard base64: from
//!   `MARGA_SECRETS_KEY` or `[security] secrets_key` (resolved by `config`), or else
//!   generated at first start into `<data_dir>/secrets.key` (mode 0600) and reused after.
//!   With Postgres the key must be given (config refuses to start without it): every instance
//!   must open what another sealed.
//! - **Fingerprints.** A value stored only to be compared with a later one (a native batch's
//!   request hash, whose body holds its webhook secret) is [`Secrets::fingerprint`]: hex
//!   HMAC-SHA256 under a key derived from the data key for this purpose alone (the HMAC of a
//!   fixed label), never a plain hash, which would let whoever reads the database guess a weak
//!   secret offline. Under another data key the fingerprints differ (as sealed values do not
//!   open).
//!
//! Neither the key nor a plaintext ever appears in an error or a log line.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The environment variable that holds the data key.
pub const KEY_ENV: &str = "MARGA_SECRETS_KEY";
/// The key file generated under the data directory when no key is configured.
pub const KEY_FILE: &str = "secrets.key";
/// The prefix of a value sealed by this version.
const V1: &str = "v1:";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// The label the fingerprint key is derived under: that key is HMAC-SHA256(data key, label).
const FINGERPRINT_LABEL: &[u8] = b"marga/fingerprint-key/v1";

/// The 32-byte data key. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretsKey([u8; 32]);

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretsKey(…)")
    }
}

/// A key that is not 32 bytes in hex or base64 (the message never quotes the value).
#[derive(Debug, thiserror::Error)]
#[error("must be 32 bytes written as 64 hex digits or in base64 (e.g. `openssl rand -base64 32`)")]
pub struct BadKey;

impl SecretsKey {
    /// Reads 64 hex digits or the standard base64 of 32 bytes (surrounding blanks ignored).
    pub fn parse(text: &str) -> Result<SecretsKey, BadKey> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| BadKey)?
        } else {
            STANDARD.decode(text).map_err(|_| BadKey)?
        };
        <[u8; 32]>::try_from(bytes.as_slice()).map(SecretsKey).map_err(|_| BadKey)
    }

    /// A fresh random key.
    pub fn generate() -> SecretsKey {
        SecretsKey(rand::random())
    }

    fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

/// Why the key file could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the secrets key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the secrets key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secrets key file {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: BadKey,
    },
}

/// The configured key, or the one in `<data_dir>/secrets.key`, made there (mode 0600) when
/// there is none yet.
pub fn load_or_create(configured: Option<SecretsKey>, data_dir: &Path) -> Result<SecretsKey, KeyFileError> {
    if let Some(key) = configured {
        return Ok(key);
    }
    let path = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => return SecretsKey::parse(&text).map_err(|source| KeyFileError::Invalid { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(KeyFileError::Read { path, source }),
    }
    let key = SecretsKey::generate();
    match write_new(&path, &key) {
        Ok(()) => Ok(key),
        // Another process made it first: use that one.
        Err(KeyFileError::Write { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path).map_err(|source| KeyFileError::Read { path: path.clone(), source })?;
            SecretsKey::parse(&text).map_err(|source| KeyFileError::Invalid { path, source })
        }
        Err(e) => Err(e),
    }
}

/// Writes the key to a private temporary file, syncs it, then links it into place (never
/// replacing a file that is there: `AlreadyExists`), so a reader never sees a partial key.
fn write_new(path: &Path, key: &SecretsKey) -> Result<(), KeyFileError> {
    let write_error = |source| KeyFileError::Write { path: path.to_owned(), source };
    let temp = path.with_extension(format!("key.{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temp).and_then(|mut file| {
        file.write_all(format!("{}\n", key.to_base64()).as_bytes())?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    linked.map_err(write_error)
}

/// A value that could not be sealed (only a plaintext too large for the cipher).
#[derive(Debug, thiserror::Error)]
#[error("cannot seal a secret")]
pub struct SealError;

/// Why a sealed value did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the sealed secret is not valid base64")]
    Encoding(#[source] base64::DecodeError),
    #[error("the sealed secret is too short")]
    Truncated,
    #[error("the sealed secret does not open with this key (sealed with another key, or altered)")]
    Refused,
    #[error("the opened secret is not UTF-8")]
    NotText(#[source] std::string::FromUtf8Error),
}

/// Seals and opens secrets with the data key, and fingerprints values with a key derived
/// from it.
pub struct Secrets {
    cipher: ChaCha20Poly1305,
    /// HMAC-SHA256 keyed with the fingerprint key, cloned for each fingerprint.
    fingerprinter: Hmac<Sha256>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets(…)")
    }
}

impl Secrets {
    pub fn new(key: &SecretsKey) -> Secrets {
        let derived: [u8; 32] = hmac_sha256(&key.0).chain_update(FINGERPRINT_LABEL).finalize().into_bytes().into();
        Secrets { cipher: ChaCha20Poly1305::new(Key::from_slice(&key.0)), fingerprinter: hmac_sha256(&derived) }
    }

    /// The hex HMAC-SHA256 of `bytes` under the fingerprint key: the same for the same bytes
    /// under one data key, and no help in guessing `bytes` to whoever holds it without the key.
    pub fn fingerprint(&self, bytes: &[u8]) -> String {
        hex::encode(self.fingerprinter.clone().chain_update(bytes).finalize().into_bytes())
    }

    /// `v1:<base64 of nonce ‖ ciphertext ‖ tag>`, with a fresh random nonce.
    pub fn seal(&self, plaintext: &str) -> Result<String, SealError> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = self.cipher.encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes()).map_err(|_| SealError)?;
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        Ok(format!("{V1}{}", STANDARD.encode(bytes)))
    }

    /// The plaintext of a stored value: a `v1:` value opened with the key, any other value
    /// as it is (written before secrets were sealed).
    pub fn open(&self, stored: &str) -> Result<String, OpenError> {
        let Some(encoded) = stored.strip_prefix(V1) else {
            return Ok(stored.to_owned());
        };
        let bytes = STANDARD.decode(encoded).map_err(OpenError::Encoding)?;
        if bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Truncated);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), sealed).map_err(|_| OpenError::Refused)?;
        String::from_utf8(plain).map_err(OpenError::NotText)
    }
}

/// HMAC-SHA256 keyed with 32 bytes. HMAC pads a key shorter than SHA-256's 64-byte block with
/// zeros (RFC 2104), so the padded block is the same key, given to the infallible constructor.
fn hmac_sha256(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = hmac::digest::Key::<Hmac<Sha256>>::default();
    block[..key.len()].copy_from_slice(key);
    <Hmac<Sha256> as KeyInit>::new(&block)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn secrets() -> Secrets {
        Secrets::new(&SecretsKey::generate())
    }

    #[test]
    fn a_sealed_secret_opens_to_its_plaintext() {
        let s = secrets();
        let sealed = s.seal("whsec-0123456789").unwrap();
        assert!(sealed.starts_with("v1:"), "{sealed}");
        assert!(!sealed.contains("whsec"), "{sealed}");
        assert_eq!(s.open(&sealed).unwrap(), "whsec-0123456789");
        assert_ne!(s.seal("whsec-0123456789").unwrap(), sealed, "a fresh nonce for every value");
        assert_eq!(s.open(&s.seal("").unwrap()).unwrap(), "");
    }

    #[test]
    fn an_altered_value_is_refused() {
        let s = secrets();
        let sealed = s.seal("whsec-0123456789").unwrap();
        let mut bytes = STANDARD.decode(&sealed[3..]).unwrap();
        for i in [0, NONCE_LEN, bytes.len() - 1] {
            bytes[i] ^= 1;
            let altered = format!("v1:{}", STANDARD.encode(&bytes));
            assert!(matches!(s.open(&altered), Err(OpenError::Refused)), "byte {i}");
            bytes[i] ^= 1;
        }
        assert!(matches!(s.open("v1:AAAA"), Err(OpenError::Truncated)));
        assert!(matches!(s.open("v1:not base64!"), Err(OpenError::Encoding(_))));
    }

    #[test]
    fn another_key_is_refused_and_the_error_tells_nothing() {
        let sealed = secrets().seal("whsec-0123456789").unwrap();
        let error = secrets().open(&sealed).unwrap_err();
        assert!(matches!(error, OpenError::Refused));
        assert!(!format!("{error} {error:?}").contains("whsec"));
    }

    #[test]
    fn a_value_without_the_prefix_is_legacy_plaintext() {
        assert_eq!(secrets().open("whsec-written-before").unwrap(), "whsec-written-before");
    }

    #[test]
    fn fingerprints_are_deterministic_keyed_and_not_a_plain_hash() {
        use sha2::Digest;
        let key = SecretsKey::generate();
        let s = Secrets::new(&key);
        let body = br#"{"items":[],"webhook":{"secret":"weak","url":"https://hooks.example/x"}}"#;
        let print = s.fingerprint(body);
        assert_eq!((print.len(), print.bytes().all(|b| b.is_ascii_hexdigit())), (64, true), "{print}");
        assert_eq!(Secrets::new(&key).fingerprint(body), print, "the same under one data key");
        assert_ne!(s.fingerprint(b"{}"), print);
        assert_ne!(secrets().fingerprint(body), print, "another data key, another fingerprint");
        assert_ne!(print, hex::encode(sha2::Sha256::digest(body)), "not the plain SHA-256");
        let mac = |key: &[u8], bytes: &[u8]| {
            let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
            hex::encode(mac.chain_update(bytes).finalize().into_bytes())
        };
        assert_ne!(print, mac(&key.0, body), "the data key itself is not the fingerprint key");
        let derived = hex::decode(mac(&key.0, FINGERPRINT_LABEL)).unwrap();
        assert_eq!(print, mac(&derived, body), "HMAC under HMAC(data key, label)");
    }

    #[test]
    fn keys_are_read_in_hex_or_base64() {
        let key = SecretsKey::generate();
        assert_eq!(SecretsKey::parse(&key.to_base64()).unwrap(), key);
        assert_eq!(SecretsKey::parse(&format!(" {}\n", hex::encode(key.0))).unwrap(), key);
        for bad in ["", "short", &hex::encode([7u8; 31]), &STANDARD.encode([7u8; 33]), &"z".repeat(64)] {
            assert!(SecretsKey::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format!("{key:?}"), "SecretsKey(…)");
    }

    #[test]
    fn the_key_file_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(None, dir.path()).unwrap();
        assert_eq!(load_or_create(None, dir.path()).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let given = SecretsKey::generate();
        assert_eq!(load_or_create(Some(given.clone()), dir.path()).unwrap(), given);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        std::fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        assert!(matches!(load_or_create(None, dir.path()), Err(KeyFileError::Invalid { .. })));
    }
}
