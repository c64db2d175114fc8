//! In-memory backend with the same semantics as the SQLite one, for unit tests.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::audit::{AuditEntry, AuditLog, AuditVerification, ChainVerifier, GENESIS_HASH};
use crate::engine::{self, Backend};
use crate::{KeyValue, Revision, Store, StoreError, Txn, TxnResponse};

/// In-memory [`Store`] and [`AuditLog`]; nothing survives a drop.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    kv: BTreeMap<String, KeyValue>,
    revision: Revision,
    audit: Vec<AuditEntry>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // Every mutation is validated before it starts and cannot fail halfway, so the state
        // behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn with_prefix<'a>(
    kv: &'a BTreeMap<String, KeyValue>,
    prefix: &'a str,
) -> impl Iterator<Item = &'a KeyValue> + 'a {
    kv.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
}

impl Backend for MemState {
    fn load(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.kv.get(key).cloned())
    }

    fn save(&mut self, kv: &KeyValue) -> Result<(), StoreError> {
        self.kv.insert(kv.key.clone(), kv.clone());
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        Ok(self.kv.remove(key).is_some())
    }

    fn keys_with_prefix(&mut self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(with_prefix(&self.kv, prefix)
            .map(|kv| kv.key.clone())
            .collect())
    }
}

impl Store for MemStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kv.get(key).cloned())
    }

    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        Ok(with_prefix(&self.lock().kv, prefix).cloned().collect())
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        engine::validate(&txn)?;
        let mut state = self.lock();
        let current = state.revision;
        // Backend methods of MemState never fail, so no partial application is possible.
        let applied = engine::apply(&mut *state, current, &txn)?;
        if let Some(rev) = applied.new_revision {
            state.revision = rev;
        }
        Ok(TxnResponse {
            succeeded: applied.succeeded,
            revision: state.revision,
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.lock().revision)
    }
}

impl AuditLog for MemStore {
    fn append(
        &self,
        at_unix_ms: u64,
        actor: &str,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError> {
        let mut state = self.lock();
        let (index, prev) = match state.audit.last() {
            Some(last) => (last.index + 1, last.hash.clone()),
            None => (0, GENESIS_HASH.to_string()),
        };
        let entry = AuditEntry::new(index, &prev, at_unix_ms, actor, action, detail);
        state.audit.push(entry.clone());
        Ok(entry)
    }

    fn entries(&self, from_index: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let state = self.lock();
        Ok(state
            .audit
            .iter()
            .filter(|e| e.index >= from_index)
            .take(limit)
            .cloned()
            .collect())
    }

    fn verify(&self) -> Result<AuditVerification, StoreError> {
        let state = self.lock();
        let mut v = ChainVerifier::new();
        for e in &state.audit {
            if let Some(broken) = v.check(e.index, Ok(e)) {
                return Ok(broken);
            }
        }
        Ok(v.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tampered_entry_is_detected() {
        let s = MemStore::new();
        for i in 0..4 {
            s.append(i, "a", "b", json!({ "i": i })).expect("append");
        }
        assert!(s.verify().expect("verify").is_intact());
        s.lock().audit[2].detail = json!({"i": 99});
        assert_eq!(s.verify().expect("verify").first_broken(), Some(2));
    }
}
