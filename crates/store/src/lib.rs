//! Durable state of the nicwarden controller.
//!
//! This crate owns everything the controller must not lose across a crash: nodes, leases and
//! their sequence numbers, join tokens, the quota tree and usage. It exposes them through
//! [`Store`], a key-value interface whose semantics are etcd's (a store-wide [`Revision`],
//! per-key create/mod revisions and versions, compare-and-swap, atomic [`Txn`]s), so an etcd
//! backend can be added later for HA without touching the controller. Two backends ship today:
//!
//! * [`SqliteStore`]: the embedded default, one SQLite file (WAL, `synchronous=FULL`, mode 0600)
//!   in the controller's data directory.
//! * [`MemStore`]: in memory, identical semantics, for unit tests of the controller.
//!
//! The crate also owns the tamper-evident [`AuditLog`] (a SHA-256 hash chain), stored in the same
//! database in its own table.
//!
//! Architecture Invariant: both backends run the *same* transaction engine (`engine::apply`), so
//! they cannot disagree on compare/revision/version semantics; a property test checks it anyway.
//!
//! Architecture Invariant: when [`Store::txn`] or [`AuditLog::append`] returns `Ok`, the write is
//! durable (fsynced) on [`SqliteStore`]. A txn that returns `Err` did not apply.
//!
//! Semantics in brief (as in etcd):
//! * The revision starts at 0 and grows by exactly one with every txn that changes at least one
//!   key. A txn that changes nothing (failed compares with an empty failure branch, deleting an
//!   absent key) does not consume a revision.
//! * Every key written by a txn gets that txn's revision as `mod_revision`; a key created by it
//!   also gets it as `create_revision` and `version` 1; each later put increments `version`.
//!   Deleting a key forgets it: re-creating it starts over at `version` 1.
//! * Ops of a branch apply in order, so `Delete(k)` then `Put(k, v)` in one txn re-creates `k`.
//! * There is no history and no watch: only current values are kept.

#![forbid(unsafe_code)]

mod audit;
mod engine;
mod error;
mod mem;
mod sqlite;
mod telemetry_db;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use audit::{AuditEntry, AuditLog, AuditVerification, GENESIS_HASH};
pub use error::StoreError;
pub use mem::MemStore;
pub use sqlite::SqliteStore;
pub use telemetry_db::{MinuteRow, TelemetryDb};

/// Store-wide revision; strictly increasing with every write txn, like etcd's.
pub type Revision = u64;

/// One stored key with its revision metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the txn that created the key (since it was last absent).
    pub create_revision: Revision,
    /// Revision of the txn that last wrote the key.
    pub mod_revision: Revision,
    /// Number of puts since the key was created (1 after creation).
    pub version: u64,
}

/// A condition of a [`Txn`]; all must hold for the success branch to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
    /// The key's `mod_revision` equals the given revision (0 means "the key is absent").
    ModRevision(String, Revision),
    /// The key exists and its value is exactly this.
    Value(String, Vec<u8>),
}

impl Compare {
    /// The key this compare looks at.
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(k) | Compare::Present(k) | Compare::ModRevision(k, _) => k,
            Compare::Value(k, _) => k,
        }
    }

    /// Whether the compare holds against the key's current state.
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match self {
            Compare::Absent(_) => current.is_none(),
            Compare::Present(_) => current.is_some(),
            Compare::ModRevision(_, rev) => current.map_or(0, |kv| kv.mod_revision) == *rev,
            Compare::Value(_, v) => current.is_some_and(|kv| kv.value == *v),
        }
    }
}

/// A write of a [`Txn`] branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    /// Delete one key; deleting an absent key is a no-op.
    Delete(String),
    /// Delete every key starting with the prefix. An empty prefix is rejected (it would wipe the
    /// store); a prefix is a plain byte prefix, so "/a/" does not match "/ab".
    DeletePrefix(String),
}

impl Op {
    /// A put of `value` encoded as JSON.
    pub fn put_json<T: Serialize + ?Sized>(
        key: impl Into<String>,
        value: &T,
    ) -> Result<Op, StoreError> {
        let key = key.into();
        let bytes = encode_json(&key, value)?;
        Ok(Op::Put(key, bytes))
    }

    fn describe(&self) -> String {
        match self {
            Op::Put(k, _) => format!("put {k}"),
            Op::Delete(k) => format!("delete {k}"),
            Op::DeletePrefix(p) => format!("delete prefix {p}"),
        }
    }
}

/// An atomic transaction: if every compare holds, apply `success`, otherwise apply `failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a compare (all must hold).
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }

    /// Add an op to the success branch.
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }

    /// Add an op to the failure branch.
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }

    /// Short description used in error messages: the op itself for a single-op txn
    /// ("put /leases/7"), otherwise "txn (put /a, delete /b, ...)".
    pub(crate) fn label(&self) -> String {
        let ops: Vec<&Op> = self.success.iter().chain(&self.failure).collect();
        if self.compares.is_empty() && ops.len() == 1 {
            return ops[0].describe();
        }
        let mut parts: Vec<String> = ops.iter().take(3).map(|op| op.describe()).collect();
        if ops.len() > 3 {
            parts.push(format!("and {} more", ops.len() - 3));
        }
        if parts.is_empty() {
            "txn".to_string()
        } else {
            format!("txn ({})", parts.join(", "))
        }
    }
}

/// Outcome of a [`Txn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether all compares held (the success branch ran).
    pub succeeded: bool,
    /// The store revision after the txn: the txn's own revision if it changed anything,
    /// otherwise the unchanged current revision.
    pub revision: Revision,
}

/// The storage interface of the controller. Object safe: use it as `Arc<dyn Store>`; the typed
/// JSON helpers are in [`StoreExt`].
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix` (byte prefix), sorted by key bytes.
    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    /// Apply a txn atomically; durable when it returns `Ok`.
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// The current store revision (0 for a fresh store).
    fn revision(&self) -> Result<Revision, StoreError>;

    /// Unconditional put; returns the txn's revision.
    fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().then(Op::Put(key.to_string(), value)))?
            .revision)
    }

    /// Unconditional delete; returns the store revision afterwards (unchanged if `key` was
    /// absent).
    fn delete(&self, key: &str) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().then(Op::Delete(key.to_string())))?
            .revision)
    }
}

/// Both interfaces of one backend, so the controller can hold a single
/// `Arc<dyn StoreWithAudit>`; implemented for every type that implements both.
pub trait StoreWithAudit: Store + AuditLog {}

impl<T: Store + AuditLog> StoreWithAudit for T {}

/// A decoded JSON value with its key metadata (for compare-and-swap on `mod_revision`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub key: String,
    pub value: T,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: u64,
}

/// Typed JSON helpers over any [`Store`], including `dyn Store`.
pub trait StoreExt: Store {
    /// Get and decode `key`; a value that does not decode is an error naming the key and type.
    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        Ok(self.get_json_versioned(key)?.map(|v| v.value))
    }

    /// Get and decode `key`, keeping its revisions.
    fn get_json_versioned<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        self.get(key)?.map(decode_kv).transpose()
    }

    /// Decode every key under `prefix`, sorted by key.
    fn range_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        Ok(self
            .range_json_versioned(prefix)?
            .into_iter()
            .map(|v| (v.key, v.value))
            .collect())
    }

    /// Decode every key under `prefix`, sorted by key, keeping revisions.
    fn range_json_versioned<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        self.range(prefix)?.into_iter().map(decode_kv).collect()
    }

    /// Unconditional put of `value` encoded as JSON; returns the txn's revision.
    fn put_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().then(Op::put_json(key, value)?))?
            .revision)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

fn decode_kv<T: DeserializeOwned>(kv: KeyValue) -> Result<Versioned<T>, StoreError> {
    let value = serde_json::from_slice(&kv.value).map_err(|e| StoreError::Decode {
        key: kv.key.clone(),
        type_name: short_type_name::<T>(),
        error: e,
    })?;
    Ok(Versioned {
        key: kv.key,
        value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    })
}

fn encode_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        key: key.to_string(),
        type_name: short_type_name::<T>(),
        error: e,
    })
}

/// `std::any::type_name` without module paths: `Vec<my_crate::LeaseRecord>` -> `Vec<LeaseRecord>`.
fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            segment.push(c);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    mod inner {
        pub struct LeaseRecord;
    }

    #[test]
    fn handles_and_errors_are_thread_safe() {
        fn assert_send_sync<T: Send + Sync + ?Sized>() {}
        assert_send_sync::<StoreError>();
        assert_send_sync::<dyn Store>();
        assert_send_sync::<dyn StoreWithAudit>();
        let both: std::sync::Arc<dyn StoreWithAudit> = std::sync::Arc::new(MemStore::new());
        both.put_json("/k", &1u8).expect("put");
        both.append(0, "a", "b", serde_json::Value::Null)
            .expect("append");
        assert_eq!(both.get_json::<u8>("/k").expect("get"), Some(1));
    }

    #[test]
    fn short_type_names() {
        assert_eq!(short_type_name::<inner::LeaseRecord>(), "LeaseRecord");
        assert_eq!(
            short_type_name::<Vec<inner::LeaseRecord>>(),
            "Vec<LeaseRecord>"
        );
        assert_eq!(short_type_name::<u64>(), "u64");
        assert_eq!(
            short_type_name::<(String, Option<inner::LeaseRecord>)>(),
            "(String, Option<LeaseRecord>)"
        );
    }

    #[test]
    fn txn_labels() {
        let t = Txn::new().then(Op::Put("/leases/7".into(), vec![]));
        assert_eq!(t.label(), "put /leases/7");
        let t = Txn::new()
            .when(Compare::Absent("/a".into()))
            .then(Op::Delete("/a".into()))
            .otherwise(Op::DeletePrefix("/b/".into()));
        assert_eq!(t.label(), "txn (delete /a, delete prefix /b/)");
        assert_eq!(Txn::new().label(), "txn");
    }

    #[test]
    fn compare_semantics() {
        let kv = KeyValue {
            key: "k".into(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 5,
            version: 3,
        };
        let k = || "k".to_string();
        assert!(Compare::Present(k()).holds(Some(&kv)));
        assert!(!Compare::Present(k()).holds(None));
        assert!(Compare::Absent(k()).holds(None));
        assert!(!Compare::Absent(k()).holds(Some(&kv)));
        assert!(Compare::ModRevision(k(), 5).holds(Some(&kv)));
        assert!(!Compare::ModRevision(k(), 0).holds(Some(&kv)));
        assert!(Compare::ModRevision(k(), 0).holds(None));
        assert!(Compare::Value(k(), b"v".to_vec()).holds(Some(&kv)));
        assert!(!Compare::Value(k(), vec![]).holds(None));
    }
}
