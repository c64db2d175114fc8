//! SQLite-specific behaviour: files, modes, schema versioning, bad input, locking.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nicwarden_store::{SqliteStore, Store, StoreError};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn data_files_are_created_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let st = SqliteStore::open(&path).unwrap();
    st.put("/a", b"secret token".to_vec()).unwrap();
    assert_eq!(mode(&path), 0o600);
    // SQLite gives the WAL and shared-memory files the database file's mode.
    for suffix in ["-wal", "-shm"] {
        let side = dir.path().join(format!("state.db{suffix}"));
        assert!(side.exists(), "{} missing", side.display());
        assert_eq!(mode(&side), 0o600, "{}", side.display());
    }
}

#[test]
fn existing_world_readable_file_is_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(SqliteStore::open(&path).unwrap());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    SqliteStore::open(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn state_and_revision_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let st = SqliteStore::open(&path).unwrap();
        st.put("/a", b"1".to_vec()).unwrap();
        st.put("/b", b"2".to_vec()).unwrap();
        st.delete("/b").unwrap();
    }
    let st = SqliteStore::open(&path).unwrap();
    assert_eq!(st.revision().unwrap(), 3);
    assert_eq!(st.get("/a").unwrap().unwrap().value, b"1");
    assert_eq!(st.get("/b").unwrap(), None);
    assert_eq!(st.put("/c", vec![]).unwrap(), 4);
    assert_eq!(st.path(), path);
}

#[test]
fn file_that_is_not_a_database_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &junk).unwrap();
    let e = SqliteStore::open(&path).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Open { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("store: open {}: ", path.display())),
        "{msg}"
    );
    assert!(msg.contains("not a database"), "{msg}");
    // The file was not modified.
    assert_eq!(std::fs::read(&path).unwrap(), junk);

    // A short text file too.
    std::fs::write(&path, "hello\n").unwrap();
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(e.to_string().contains("not a database"), "{e}");
}

#[test]
fn directory_and_missing_parent_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = SqliteStore::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = SqliteStore::open(&dir.path().join("missing/state.db")).unwrap_err();
    assert!(e.to_string().contains("create"), "{e}");
}

#[test]
fn database_of_another_application_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(conn);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(e.to_string().contains("another application"), "{e}");

    // Right user_version but wrong application_id.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 1").unwrap();
    drop(conn);
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(e.to_string().contains("not a nicwarden store"), "{e}");
}

#[test]
fn newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    SqliteStore::open(&path).unwrap().put("/a", vec![]).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 7").unwrap();
    drop(conn);
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SchemaTooNew {
                found: 7,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "store: open {}: schema version 7 is newer than the newest this build supports (1); \
             run a newer nicwarden or restore a backup",
            path.display()
        )
    );
}

#[test]
fn locked_database_error_names_operation_and_key_and_is_retryable() {
    let (dir, st) = crate::temp_sqlite();
    st.set_busy_timeout(Duration::from_millis(50)).unwrap();
    let other = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let e = st.put("/leases/7", b"x".to_vec()).unwrap_err();
    assert_eq!(e.to_string(), "store: put /leases/7: database is locked");
    assert!(e.is_retryable());
    // Reads still work in WAL mode while another connection writes.
    assert_eq!(st.get("/leases/7").unwrap(), None);
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(st.put("/leases/7", b"x".to_vec()).unwrap(), 1);
}

#[test]
fn two_handles_on_one_file_share_revisions() {
    // Not the intended deployment, but txns are BEGIN IMMEDIATE so it stays consistent.
    let (dir, a) = crate::temp_sqlite();
    let b = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    assert_eq!(a.put("/x", vec![]).unwrap(), 1);
    assert_eq!(b.put("/x", vec![]).unwrap(), 2);
    assert_eq!(a.get("/x").unwrap().unwrap().version, 2);
}
