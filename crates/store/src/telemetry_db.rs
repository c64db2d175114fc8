//! The downsampled telemetry history: one row per (node, scope, minute), kept for a day.
//!
//! A separate SQLite file (`telemetry.db`) from the lease store, with `synchronous=NORMAL`:
//! telemetry is rewritten every minute and losing the last minute to a power cut is
//! acceptable, while the lease store's commits must each survive one. Keeping them apart
//! also keeps telemetry writes off the lease store's lock.
//!
//! Schema version 1: `minute(node, scope, t_ms, bytes, packets, drops, peak_rate_bps, state)`,
//! primary key `(node, scope, t_ms)`. Writing a minute that exists adds to its counters, so a
//! minute split across two writes (a late report) loses nothing.

use crate::StoreError;
use rusqlite::{params, Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of telemetry files ("nwtm").
const APPLICATION_ID: i64 = 0x6e77_746d;

const SCHEMA_V1: &str = "
CREATE TABLE minute (
    node TEXT NOT NULL,
    scope TEXT NOT NULL,
    t_ms INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    packets INTEGER NOT NULL,
    drops INTEGER NOT NULL,
    peak_rate_bps REAL NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (node, scope, t_ms)
) WITHOUT ROWID;
CREATE INDEX minute_t ON minute (t_ms);
";

/// A row is one minute of one series, as the telemetry core closes it.
pub use nicwarden_telemetry::MinutePoint as MinuteRow;
use nicwarden_telemetry::ScopeState;

#[derive(Debug)]
pub struct TelemetryDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn to_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl TelemetryDb {
    /// Opens (or creates, mode 0600) the telemetry file. Refuses a file that is some other
    /// SQLite database or a newer schema.
    pub fn open(path: &Path) -> Result<TelemetryDb, StoreError> {
        crate::sqlite::prepare_file(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::open(path, e.to_string()))?;
        let err = |e: rusqlite::Error| StoreError::open(path, format!("telemetry schema: {e}"));
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let _: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(err)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let app_id: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(err)?;
        if version == 0 {
            let tables: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(err)?;
            if tables > 0 || app_id != 0 {
                return Err(StoreError::open(
                    path,
                    "SQLite database of another application; refusing to use it as telemetry",
                ));
            }
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA_V1} PRAGMA user_version = {SCHEMA_VERSION}; PRAGMA application_id = {APPLICATION_ID}; COMMIT;"
            ))
            .map_err(err)?;
        } else if app_id != APPLICATION_ID {
            return Err(StoreError::open(
                path,
                format!("not a nicwarden telemetry file (application_id {app_id:#x})"),
            ));
        } else if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path: path.display().to_string(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(TelemetryDb {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes minutes in one transaction; an existing minute is added to.
    pub fn write(&self, rows: &[MinuteRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let op = "telemetry write minutes";
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(StoreError::sqlite(op))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO minute (node, scope, t_ms, bytes, packets, drops, peak_rate_bps, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (node, scope, t_ms) DO UPDATE SET
                       bytes = bytes + excluded.bytes,
                       packets = packets + excluded.packets,
                       drops = drops + excluded.drops,
                       peak_rate_bps = max(peak_rate_bps, excluded.peak_rate_bps),
                       state = excluded.state",
                )
                .map_err(StoreError::sqlite(op))?;
            for r in rows {
                st.execute(params![
                    r.node,
                    r.scope,
                    to_i64(r.t_ms),
                    to_i64(r.bytes),
                    to_i64(r.packets),
                    to_i64(r.dropped_packets),
                    r.peak_rate_bps,
                    r.state.as_str()
                ])
                .map_err(StoreError::sqlite(op))?;
            }
        }
        tx.commit().map_err(StoreError::sqlite(op))
    }

    /// Minutes of a node (one scope or all) with `from_ms <= t_ms <= to_ms`, by scope then time.
    pub fn query(
        &self,
        node: &str,
        scope: Option<&str>,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<MinuteRow>, StoreError> {
        let op = format!("telemetry query {node}");
        let conn = self.lock();
        let mut st = conn
            .prepare_cached(
                "SELECT node, scope, t_ms, bytes, packets, drops, peak_rate_bps, state FROM minute
                 WHERE node = ?1 AND (?2 IS NULL OR scope = ?2) AND t_ms >= ?3 AND t_ms <= ?4
                 ORDER BY scope, t_ms",
            )
            .map_err(StoreError::sqlite(&op))?;
        let rows = st
            .query_map(params![node, scope, to_i64(from_ms), to_i64(to_ms)], |r| {
                let g = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(MinuteRow {
                    node: r.get(0)?,
                    scope: r.get(1)?,
                    t_ms: g(2)?,
                    bytes: g(3)?,
                    packets: g(4)?,
                    dropped_packets: g(5)?,
                    peak_rate_bps: r.get(6)?,
                    state: ScopeState::parse(&r.get::<_, String>(7)?),
                })
            })
            .map_err(StoreError::sqlite(&op))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::sqlite(&op))
    }

    /// Deletes minutes older than `before_ms`; returns how many.
    pub fn prune(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM minute WHERE t_ms < ?1",
                params![to_i64(before_ms)],
            )
            .map_err(StoreError::sqlite("telemetry prune"))
    }

    /// Deletes a node's history (the node was removed).
    pub fn delete_node(&self, node: &str) -> Result<usize, StoreError> {
        self.lock()
            .execute("DELETE FROM minute WHERE node = ?1", params![node])
            .map_err(StoreError::sqlite(&format!("telemetry delete {node}")))
    }

    /// Rows held.
    pub fn count(&self) -> Result<u64, StoreError> {
        self.lock()
            .query_row("SELECT count(*) FROM minute", [], |r| r.get::<_, i64>(0))
            .map(|v| v.max(0) as u64)
            .map_err(StoreError::sqlite("telemetry count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str, scope: &str, t_ms: u64, bytes: u64) -> MinuteRow {
        MinuteRow {
            node: node.into(),
            scope: scope.into(),
            t_ms,
            bytes,
            packets: 1,
            dropped_packets: 0,
            peak_rate_bps: bytes as f64,
            state: ScopeState::Active,
        }
    }

    #[test]
    fn write_query_merge_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("telemetry.db");
        let db = TelemetryDb::open(&p).expect("open");
        db.write(&[
            row("a", "egress", 60_000, 10),
            row("a", "egress", 120_000, 20),
            row("a", "peer:b", 60_000, 5),
            row("b", "egress", 60_000, 7),
        ])
        .expect("write");
        // A second write of a minute adds to it.
        db.write(&[row("a", "egress", 120_000, 30)]).expect("write");
        let all = db.query("a", None, 0, u64::MAX).expect("query");
        assert_eq!(
            all.iter()
                .map(|r| (r.scope.as_str(), r.t_ms, r.bytes))
                .collect::<Vec<_>>(),
            vec![
                ("egress", 60_000, 10),
                ("egress", 120_000, 50),
                ("peer:b", 60_000, 5)
            ]
        );
        assert_eq!(all[1].peak_rate_bps, 30.0);
        let one = db.query("a", Some("egress"), 100_000, 200_000).expect("q");
        assert_eq!(one.len(), 1);
        assert_eq!(db.prune(100_000).expect("prune"), 3);
        assert_eq!(db.delete_node("a").expect("delete"), 1);
        assert_eq!(db.count().expect("count"), 0);
        drop(db);
        // Reopens its own file.
        TelemetryDb::open(&p).expect("reopen");
    }

    #[test]
    fn refuses_a_foreign_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("other.db");
        let c = Connection::open(&p).expect("open");
        c.execute_batch("CREATE TABLE x (y INTEGER)")
            .expect("create");
        drop(c);
        let e = TelemetryDb::open(&p).expect_err("foreign file");
        assert!(e.to_string().contains("another application"), "{e}");
    }
}
