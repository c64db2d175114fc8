//! Integration tests of nicwarden-store: a conformance suite run against every backend,
//! SQLite-specific behaviour (files, modes, schema, crash durability), the audit log, and a
//! property test comparing the backends.

#![allow(clippy::unwrap_used)]

mod audit;
mod conformance;
mod durability;
mod prop;
mod sqlite;

use nicwarden_store::SqliteStore;

/// A fresh SQLite store in a temporary directory (kept alive by the returned guard).
pub fn temp_sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    (dir, store)
}
