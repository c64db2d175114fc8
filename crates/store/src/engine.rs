//! The transaction engine shared by every backend: validation, compare evaluation, revision and
//! version bookkeeping. Backends only provide row access inside their own atomic transaction.

use crate::{Compare, KeyValue, Op, Revision, StoreError, Txn};

/// Row access inside one backend transaction.
pub(crate) trait Backend {
    fn load(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    fn save(&mut self, kv: &KeyValue) -> Result<(), StoreError>;
    /// Remove `key`; returns whether it existed.
    fn remove(&mut self, key: &str) -> Result<bool, StoreError>;
    /// Keys starting with `prefix`, in any order.
    fn keys_with_prefix(&mut self, prefix: &str) -> Result<Vec<String>, StoreError>;
}

/// What [`apply`] did.
pub(crate) struct Applied {
    pub succeeded: bool,
    /// The new store revision if any key changed; `None` if the txn was a no-op.
    pub new_revision: Option<Revision>,
}

/// Reject txns that could never be valid, before any row is touched, so a backend without
/// rollback (MemStore) stays atomic.
pub(crate) fn validate(txn: &Txn) -> Result<(), StoreError> {
    let invalid = |op: String, reason: &str| StoreError::InvalidArgument {
        op,
        reason: reason.to_string(),
    };
    for c in &txn.compares {
        if c.key().is_empty() {
            return Err(invalid(txn.label(), "compare on an empty key"));
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put(k, _) | Op::Delete(k) if k.is_empty() => {
                return Err(invalid(op.describe(), "key is empty"));
            }
            Op::DeletePrefix(p) if p.is_empty() => {
                return Err(invalid(
                    op.describe(),
                    "empty prefix would delete every key; refusing",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Evaluate the compares and apply the chosen branch at revision `current + 1`.
/// The caller must have run [`validate`] and must commit or roll back as a whole.
pub(crate) fn apply<B: Backend>(
    backend: &mut B,
    current: Revision,
    txn: &Txn,
) -> Result<Applied, StoreError> {
    let mut succeeded = true;
    for c in &txn.compares {
        let kv = backend.load(c.key())?;
        if !Compare::holds(c, kv.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let rev = current + 1;
    let mut changed = false;
    for op in ops {
        match op {
            Op::Put(key, value) => {
                let kv = match backend.load(key)? {
                    Some(prev) => KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.create_revision,
                        mod_revision: rev,
                        version: prev.version + 1,
                    },
                    None => KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: rev,
                        mod_revision: rev,
                        version: 1,
                    },
                };
                backend.save(&kv)?;
                changed = true;
            }
            Op::Delete(key) => {
                changed |= backend.remove(key)?;
            }
            Op::DeletePrefix(prefix) => {
                for key in backend.keys_with_prefix(prefix)? {
                    changed |= backend.remove(&key)?;
                }
            }
        }
    }
    Ok(Applied {
        succeeded,
        new_revision: changed.then_some(rev),
    })
}
