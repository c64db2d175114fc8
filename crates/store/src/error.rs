//! Errors of the store. Every message starts with "store:" and names the operation and the key
//! (or file) it concerns, e.g. "store: put /leases/7: database is locked".
//!
//! The underlying error is part of the message rather than exposed through
//! `std::error::Error::source`, so an `anyhow` chain does not print it twice; it stays reachable
//! through the public fields.

use std::path::Path;

/// An error from a [`crate::Store`] or [`crate::AuditLog`] operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed while running `op` ("put /leases/7", "range /nodes/", "audit append").
    #[error("store: {op}: {error}")]
    Sqlite { op: String, error: rusqlite::Error },

    /// The database file could not be opened or is not a nicwarden store.
    #[error("store: open {path}: {reason}")]
    Open { path: String, reason: String },

    /// The database was written by a newer nicwarden with a schema this build does not know.
    #[error(
        "store: open {path}: schema version {found} is newer than the newest this build \
         supports ({supported}); run a newer nicwarden or restore a backup"
    )]
    SchemaTooNew {
        path: String,
        found: i64,
        supported: i64,
    },

    /// A stored value is not valid JSON for the requested type.
    #[error("store: decode {key} as {type_name}: {error}")]
    Decode {
        key: String,
        type_name: String,
        error: serde_json::Error,
    },

    /// A value could not be encoded as JSON.
    #[error("store: encode {key} as {type_name}: {error}")]
    Encode {
        key: String,
        type_name: String,
        error: serde_json::Error,
    },

    /// The request itself is invalid (an empty key, an empty delete prefix).
    #[error("store: {op}: {reason}")]
    InvalidArgument { op: String, reason: String },

    /// Stored data violates an invariant of the schema (e.g. a negative revision).
    #[error("store: {op}: stored data is corrupt: {reason}")]
    Corrupt { op: String, reason: String },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed (the database was busy or locked
    /// by another process, e.g. an operator's `sqlite3` shell holding a write transaction).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sqlite {
                error: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }

    pub(crate) fn sqlite(op: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let op = op.to_string();
        move |error| StoreError::Sqlite { op, error }
    }

    pub(crate) fn open(path: &Path, reason: impl Into<String>) -> StoreError {
        StoreError::Open {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}
