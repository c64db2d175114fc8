//! SQLite backend: one file, WAL journal, `synchronous=FULL`, mode 0600.
//!
//! Schema version 1 (`PRAGMA user_version`; `PRAGMA application_id` marks the file as ours):
//! * `kv(key, value, create_revision, mod_revision, version)`: current value of each key.
//! * `meta(name, value)`: the row `revision` holds the store revision.
//! * `audit(idx, at_unix_ms, actor, action, detail, prev_hash, hash)`: the audit chain; `detail`
//!   is stored as canonical JSON text.
//!
//! Each [`Store::txn`] is one `BEGIN IMMEDIATE` SQLite transaction, so it is atomic against other
//! connections and processes too. With WAL and `synchronous=FULL` the WAL is fsynced on every
//! commit, so a txn that returned survives kill -9 and power loss.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

use crate::audit::{
    canonical_json, AuditEntry, AuditLog, AuditVerification, ChainVerifier, GENESIS_HASH,
};
use crate::engine::{self, Backend};
use crate::{KeyValue, Revision, Store, StoreError, Txn, TxnResponse};

/// Newest schema this build reads and writes.
const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of nicwarden store files ("nwst").
const APPLICATION_ID: i64 = 0x6e77_7374;
/// How long a statement waits for another connection's lock before failing as "locked".
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE kv (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE meta (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('revision', 0);
CREATE TABLE audit (
    idx INTEGER PRIMARY KEY NOT NULL,
    at_unix_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
";

/// The embedded default [`Store`] and [`AuditLog`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Open (or create, with mode 0600) the store at `path`. Refuses files that are not SQLite
    /// databases, SQLite databases that are not nicwarden stores, and stores written by a newer
    /// schema. An existing file readable by group or others is tightened to 0600.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        prepare_file(path)?;
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::open(path, e.to_string()))?;
        conn.busy_timeout(DEFAULT_BUSY_TIMEOUT)
            .map_err(|e| StoreError::open(path, e.to_string()))?;
        let not_ours = |e: rusqlite::Error| {
            StoreError::open(path, format!("not a usable nicwarden store: {e}"))
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(not_ours)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::open(
                path,
                format!("cannot enable WAL journal mode (got {mode:?})"),
            ));
        }
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(not_ours)?;
        init_schema(&mut conn, path)?;
        tracing::info!(path = %path.display(), schema_version = SCHEMA_VERSION, "opened store");
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long an operation waits for a lock held by another connection (default 5 s) before
    /// failing with a retryable "database is locked" error.
    pub fn set_busy_timeout(&self, timeout: Duration) -> Result<(), StoreError> {
        self.lock()
            .busy_timeout(timeout)
            .map_err(StoreError::sqlite("set busy timeout"))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock drops any open rusqlite Transaction, which rolls back,
        // so the connection behind a poisoned lock is still consistent.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Make sure `path` is a regular file with mode 0600, creating it if absent.
pub(crate) fn prepare_file(path: &Path) -> Result<(), StoreError> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(StoreError::open(path, "not a regular file")),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "store file is accessible by other users; setting mode 0600");
                fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                    .map_err(|e| StoreError::open(path, format!("set mode 0600: {e}")))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => Ok(()),
                // Created concurrently by someone else: fine, SQLite will judge its content.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(StoreError::open(path, format!("create: {e}"))),
            }
        }
        Err(e) => Err(StoreError::open(path, e.to_string())),
    }
}

fn init_schema(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |e: rusqlite::Error| StoreError::open(path, format!("schema: {e}"));
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    let app_id: i64 = tx
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.display().to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        let tables: i64 = tx
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(err)?;
        if tables > 0 || app_id != 0 {
            return Err(StoreError::open(
                path,
                "SQLite database of another application (it has tables but no nicwarden schema); refusing to use it",
            ));
        }
        tx.execute_batch(SCHEMA_V1).map_err(err)?;
        tx.execute_batch(&format!(
            "PRAGMA user_version = {SCHEMA_VERSION}; PRAGMA application_id = {APPLICATION_ID};"
        ))
        .map_err(err)?;
        tracing::info!(path = %path.display(), schema_version = SCHEMA_VERSION, "created store schema");
    } else if app_id != APPLICATION_ID || version < 0 {
        return Err(StoreError::open(
            path,
            format!("not a nicwarden store (application_id {app_id:#x}, user_version {version})"),
        ));
    }
    // Migrations from older schema versions go here once there is more than one.
    tx.commit().map_err(err)
}

fn read_kv(row: &Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        value: row.get(1)?,
        create_revision: row.get(2)?,
        mod_revision: row.get(3)?,
        version: row.get(4)?,
    })
}

const KV_COLUMNS: &str = "key, value, create_revision, mod_revision, version";

fn get_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached(&format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"))?
        .query_row([key], read_kv)
        .optional()
}

fn read_revision(conn: &Connection) -> rusqlite::Result<Revision> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = 'revision'")?
        .query_row([], |r| r.get(0))
}

/// Row access inside one SQLite transaction; errors are labelled with the txn.
struct SqlBackend<'a> {
    conn: &'a Connection,
    label: &'a str,
}

impl SqlBackend<'_> {
    fn err(&self) -> impl FnOnce(rusqlite::Error) -> StoreError {
        StoreError::sqlite(self.label)
    }
}

impl Backend for SqlBackend<'_> {
    fn load(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        get_kv(self.conn, key).map_err(self.err())
    }

    fn save(&mut self, kv: &KeyValue) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO kv ({KV_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
            ))
            .and_then(|mut st| {
                st.execute(params![
                    kv.key,
                    kv.value,
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version
                ])
            })
            .map(|_| ())
            .map_err(self.err())
    }

    fn remove(&mut self, key: &str) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("DELETE FROM kv WHERE key = ?1")
            .and_then(|mut st| st.execute([key]))
            .map(|n| n > 0)
            .map_err(self.err())
    }

    fn keys_with_prefix(&mut self, prefix: &str) -> Result<Vec<String>, StoreError> {
        range_keys(self.conn, prefix).map_err(self.err())
    }
}

fn range_keys(conn: &Connection, prefix: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare_cached("SELECT key FROM kv WHERE key >= ?1 ORDER BY key")?;
    let mut rows = st.query([prefix])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push(key);
    }
    Ok(out)
}

fn range_kv(conn: &Connection, prefix: &str) -> rusqlite::Result<Vec<KeyValue>> {
    // TEXT keys compare with SQLite's BINARY collation (memcmp of UTF-8), which is the same
    // order as Rust's `str`, so the prefix's matches are one contiguous run from `prefix`.
    let mut st = conn.prepare_cached(&format!(
        "SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 ORDER BY key"
    ))?;
    let mut rows = st.query([prefix])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let kv = read_kv(row)?;
        if !kv.key.starts_with(prefix) {
            break;
        }
        out.push(kv);
    }
    Ok(out)
}

impl Store for SqliteStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        get_kv(&self.lock(), key).map_err(StoreError::sqlite(&format!("get {key}")))
    }

    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        range_kv(&self.lock(), prefix).map_err(StoreError::sqlite(&format!("range {prefix}")))
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        engine::validate(&txn)?;
        let label = txn.label();
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::sqlite(&label))?;
        let current = read_revision(&tx).map_err(StoreError::sqlite(&label))?;
        // Any error below drops `tx`, which rolls the whole txn back.
        let applied = engine::apply(
            &mut SqlBackend {
                conn: &tx,
                label: &label,
            },
            current,
            &txn,
        )?;
        let revision = match applied.new_revision {
            Some(rev) => {
                tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")
                    .and_then(|mut st| st.execute([rev]))
                    .map_err(StoreError::sqlite(&label))?;
                tx.commit().map_err(StoreError::sqlite(&label))?;
                tracing::trace!(revision = rev, txn = %label, "committed txn");
                rev
            }
            None => {
                tx.rollback().map_err(StoreError::sqlite(&label))?;
                current
            }
        };
        Ok(TxnResponse {
            succeeded: applied.succeeded,
            revision,
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        read_revision(&self.lock()).map_err(StoreError::sqlite("read revision"))
    }
}

const AUDIT_COLUMNS: &str = "idx, at_unix_ms, actor, action, detail, prev_hash, hash";

/// Decode an audit row; damage (wrong types, bad JSON) is described, not raised.
fn read_audit(row: &Row<'_>) -> Result<AuditEntry, String> {
    fn col<T: rusqlite::types::FromSql>(row: &Row<'_>, i: usize, name: &str) -> Result<T, String> {
        row.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    let detail: String = col(row, 4, "detail")?;
    Ok(AuditEntry {
        index: col(row, 0, "idx")?,
        at_unix_ms: col(row, 1, "at_unix_ms")?,
        actor: col(row, 2, "actor")?,
        action: col(row, 3, "action")?,
        detail: serde_json::from_str(&detail).map_err(|e| format!("column detail: {e}"))?,
        prev_hash: col(row, 5, "prev_hash")?,
        hash: col(row, 6, "hash")?,
    })
}

impl AuditLog for SqliteStore {
    fn append(
        &self,
        at_unix_ms: u64,
        actor: &str,
        action: &str,
        detail: serde_json::Value,
    ) -> Result<AuditEntry, StoreError> {
        let op = format!("audit append {action}");
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::sqlite(&op))?;
        let last: Option<(i64, String)> = tx
            .prepare_cached("SELECT idx, hash FROM audit ORDER BY idx DESC LIMIT 1")
            .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(StoreError::sqlite(&op))?;
        let (index, prev_hash) = match last {
            None => (0, GENESIS_HASH.to_string()),
            Some((idx, hash)) => {
                let idx = u64::try_from(idx).map_err(|_| StoreError::Corrupt {
                    op: op.clone(),
                    reason: format!("negative audit index {idx}"),
                })?;
                (idx + 1, hash)
            }
        };
        let entry = AuditEntry::new(index, &prev_hash, at_unix_ms, actor, action, detail);
        tx.prepare_cached(&format!(
            "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))
        .and_then(|mut st| {
            st.execute(params![
                entry.index,
                entry.at_unix_ms,
                entry.actor,
                entry.action,
                canonical_json(&entry.detail),
                entry.prev_hash,
                entry.hash
            ])
        })
        .map_err(StoreError::sqlite(&op))?;
        tx.commit().map_err(StoreError::sqlite(&op))?;
        Ok(entry)
    }

    fn entries(&self, from_index: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let op = format!("audit entries from {from_index}");
        let conn = self.lock();
        let from = i64::try_from(from_index).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE idx >= ?1 ORDER BY idx LIMIT ?2"
            ))
            .map_err(StoreError::sqlite(&op))?;
        let mut rows = st.query([from, limit]).map_err(StoreError::sqlite(&op))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(StoreError::sqlite(&op))? {
            let entry = read_audit(row).map_err(|reason| StoreError::Corrupt {
                op: op.clone(),
                reason,
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    fn verify(&self) -> Result<AuditVerification, StoreError> {
        let op = "audit verify";
        let conn = self.lock();
        let mut st = conn
            .prepare_cached(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY idx"))
            .map_err(StoreError::sqlite(op))?;
        let mut rows = st.query([]).map_err(StoreError::sqlite(op))?;
        let mut verifier = ChainVerifier::new();
        while let Some(row) = rows.next().map_err(StoreError::sqlite(op))? {
            // idx is an INTEGER PRIMARY KEY (the rowid), so it is always an integer; a negative
            // one (inserted by hand) is reported as a gap.
            let stored_index = row
                .get::<_, i64>(0)
                .ok()
                .and_then(|i| u64::try_from(i).ok())
                .unwrap_or(u64::MAX);
            let entry = read_audit(row);
            if let Some(broken) = verifier.check(stored_index, entry.as_ref().map_err(Clone::clone))
            {
                return Ok(broken);
            }
        }
        Ok(verifier.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_is_wal_and_synchronous_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.db")).expect("open");
        let conn = store.lock();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous");
        assert_eq!(sync, 2, "synchronous=FULL");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("user_version");
        assert_eq!(version, SCHEMA_VERSION);
    }
}
