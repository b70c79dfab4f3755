//! The operator's master key: taken from `MARGA_MASTER_KEY`, or generated on first start and
//! shown once. Only its SHA-256 is stored.

use marga_store::SettingsRepo;

use crate::keys::{self, KeyHash};

pub const MASTER_KEY_PREFIX: &str = "marga_mk";
const MASTER_KEY_SETTING: &str = "master_key_sha256";

/// What start-up decided about the master key.
pub enum MasterKey {
    /// From `MARGA_MASTER_KEY`.
    FromEnvironment,
    /// Generated now; shown once, only its hash is kept.
    Generated(String),
    /// Generated on an earlier start; its hash was found in the store.
    Stored,
}

/// Uses `from_env` if given (and stores its hash), else the stored hash, else generates one.
pub async fn establish(
    settings: &dyn SettingsRepo,
    from_env: Option<&str>,
) -> Result<(KeyHash, MasterKey), marga_store::StoreError> {
    if let Some(key) = from_env.filter(|k| !k.is_empty()) {
        let hash = KeyHash::of(key);
        settings.put_setting(MASTER_KEY_SETTING, &hash.to_hex()).await?;
        return Ok((hash, MasterKey::FromEnvironment));
    }
    if let Some(hash) = settings.get_setting(MASTER_KEY_SETTING).await?.and_then(|h| KeyHash::from_hex(&h)) {
        return Ok((hash, MasterKey::Stored));
    }
    let key = keys::generate(MASTER_KEY_PREFIX);
    let hash = KeyHash::of(&key);
    settings.put_setting(MASTER_KEY_SETTING, &hash.to_hex()).await?;
    Ok((hash, MasterKey::Generated(key)))
}
