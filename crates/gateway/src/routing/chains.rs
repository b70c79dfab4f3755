//! Saved fallback chains (`/me/routing/{model}`): per organisation and model, 1–10 steps of
//! `{model, provider?}` that plain requests for that model follow. Kept in memory (read on the
//! hot path without touching the database) and written through to the store.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use marga_protocol::routing::FallbackStep;
use marga_store::{ChainRecord, ChainRepo, StoreError};

pub const MAX_STEPS: usize = 10;

type ByModel = HashMap<String, Arc<Vec<FallbackStep>>>;

pub struct SavedChains {
    repo: Arc<dyn ChainRepo>,
    by_org: RwLock<HashMap<String, ByModel>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored chain is not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl SavedChains {
    /// Loads every saved chain.
    pub async fn load(repo: Arc<dyn ChainRepo>) -> Result<SavedChains, ChainError> {
        let mut by_org: HashMap<String, ByModel> = HashMap::new();
        for record in repo.list_chains().await? {
            let steps: Vec<FallbackStep> = serde_json::from_str(&record.steps)?;
            by_org.entry(record.org_id).or_default().insert(record.model, Arc::new(steps));
        }
        Ok(SavedChains { repo, by_org: RwLock::new(by_org) })
    }

    pub fn get(&self, org_id: &str, model: &str) -> Option<Arc<Vec<FallbackStep>>> {
        let by_org = self.by_org.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        by_org.get(org_id)?.get(model).cloned()
    }

    pub async fn put(&self, org_id: &str, model: &str, steps: Vec<FallbackStep>) -> Result<(), ChainError> {
        let record = ChainRecord {
            org_id: org_id.to_owned(),
            model: model.to_owned(),
            steps: serde_json::to_string(&steps)?,
            updated_at_ms: crate::pipeline::unix_now_ms(),
        };
        self.repo.put_chain(&record).await?;
        let mut by_org = self.by_org.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        by_org.entry(org_id.to_owned()).or_default().insert(model.to_owned(), Arc::new(steps));
        Ok(())
    }

    pub async fn delete(&self, org_id: &str, model: &str) -> Result<bool, ChainError> {
        let deleted = self.repo.delete_chain(org_id, model).await?;
        let mut by_org = self.by_org.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(models) = by_org.get_mut(org_id) {
            models.remove(model);
        }
        Ok(deleted)
    }
}
