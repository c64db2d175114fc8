//! The audit hash chain on both backends, and tamper detection on SQLite.

use nicwarden_store::{AuditEntry, AuditLog, AuditVerification, MemStore, GENESIS_HASH};
use serde_json::json;

fn append_and_verify(log: &dyn AuditLog) {
    assert_eq!(
        log.verify().unwrap(),
        AuditVerification::Intact {
            entries: 0,
            head_hash: GENESIS_HASH.to_string()
        }
    );
    assert!(log.entries(0, 10).unwrap().is_empty());
    let mut appended = Vec::new();
    for i in 0..10u64 {
        let e = log
            .append(
                1_000 + i,
                "admin@cli",
                "lease.grant",
                json!({"lease": i, "node": "n1", "z": {"b": 1, "a": [i]}}),
            )
            .unwrap();
        assert_eq!(e.index, i);
        appended.push(e);
    }
    assert_eq!(appended[0].prev_hash, GENESIS_HASH);
    for w in appended.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    for e in &appended {
        assert_eq!(e.hash.len(), 64);
        assert_eq!(e.hash, e.compute_hash());
    }
    assert_eq!(log.entries(0, 100).unwrap(), appended);
    assert_eq!(log.entries(3, 2).unwrap(), appended[3..5].to_vec());
    assert_eq!(log.entries(8, 100).unwrap(), appended[8..].to_vec());
    assert!(log.entries(10, 100).unwrap().is_empty());
    assert!(log.entries(0, 0).unwrap().is_empty());
    assert_eq!(
        log.verify().unwrap(),
        AuditVerification::Intact {
            entries: 10,
            head_hash: appended[9].hash.clone()
        }
    );
}

#[test]
fn mem_append_and_verify() {
    append_and_verify(&MemStore::new());
}

#[test]
fn sqlite_append_and_verify() {
    let (_dir, st) = crate::temp_sqlite();
    append_and_verify(&st);
}

#[test]
fn backends_produce_identical_chains() {
    let mem = MemStore::new();
    let (_dir, sql) = crate::temp_sqlite();
    for i in 0..5u64 {
        let detail = json!({"b": i, "a": "x\ny", "f": 1.5});
        let a = mem.append(i, "ctl", "act", detail.clone()).unwrap();
        let b = sql.append(i, "ctl", "act", detail).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn sqlite_chain_continues_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = nicwarden_store::SqliteStore::open(&path)
        .unwrap()
        .append(1, "a", "b", json!(null))
        .unwrap();
    let st = nicwarden_store::SqliteStore::open(&path).unwrap();
    let second = st.append(2, "a", "b", json!([])).unwrap();
    assert_eq!(
        (second.index, second.prev_hash.as_str()),
        (1, first.hash.as_str())
    );
    assert!(st.verify().unwrap().is_intact());
}

/// Build a 6-entry log, let `tamper` edit the database through a separate connection, and
/// return what verify reports.
fn tampered(tamper: &str) -> (AuditVerification, Vec<AuditEntry>) {
    let (dir, st) = crate::temp_sqlite();
    let entries: Vec<AuditEntry> = (0..6u64)
        .map(|i| {
            st.append(i, "admin", "quota.set", json!({"mbps": 100 * i}))
                .unwrap()
        })
        .collect();
    let conn = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    conn.execute_batch(tamper).unwrap();
    drop(conn);
    (st.verify().unwrap(), entries)
}

fn broken_at(v: &AuditVerification) -> u64 {
    match v {
        AuditVerification::Broken { index, reason } => {
            assert!(!reason.is_empty());
            *index
        }
        other => panic!("tampering not detected: {other:?}"),
    }
}

#[test]
fn edited_detail_is_detected_at_its_index() {
    let (v, _) = tampered("UPDATE audit SET detail = '{\"mbps\":999999}' WHERE idx = 3");
    assert_eq!(broken_at(&v), 3);
}

#[test]
fn edited_actor_timestamp_or_action_is_detected() {
    for sql in [
        "UPDATE audit SET actor = 'mallory' WHERE idx = 2",
        "UPDATE audit SET at_unix_ms = at_unix_ms + 1 WHERE idx = 2",
        "UPDATE audit SET action = 'noop' WHERE idx = 2",
    ] {
        let (v, _) = tampered(sql);
        assert_eq!(broken_at(&v), 2, "{sql}");
    }
}

#[test]
fn edited_and_rehashed_entry_breaks_the_next_link() {
    // The attacker recomputes entry 1's hash after editing it; entry 1 then verifies on its own
    // but entry 2's prev_hash no longer matches.
    let (dir, st) = crate::temp_sqlite();
    for i in 0..4u64 {
        st.append(i, "admin", "x", json!(i)).unwrap();
    }
    let mut forged = st.entries(1, 1).unwrap().remove(0);
    forged.actor = "mallory".into();
    forged.hash = forged.compute_hash();
    let conn = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    conn.execute(
        "UPDATE audit SET actor = ?1, hash = ?2 WHERE idx = 1",
        rusqlite::params![forged.actor, forged.hash],
    )
    .unwrap();
    assert_eq!(broken_at(&st.verify().unwrap()), 2);
}

#[test]
fn deleted_entry_is_detected() {
    let (v, _) = tampered("DELETE FROM audit WHERE idx = 4");
    assert_eq!(broken_at(&v), 4);
    let (v, _) = tampered("DELETE FROM audit WHERE idx = 0");
    assert_eq!(broken_at(&v), 0);
}

#[test]
fn damaged_rows_are_reported_not_panicked_on() {
    for (sql, at) in [
        ("UPDATE audit SET detail = 'not json' WHERE idx = 1", 1),
        ("UPDATE audit SET actor = X'FFFE' WHERE idx = 2", 2),
        ("UPDATE audit SET at_unix_ms = 'yesterday' WHERE idx = 3", 3),
        ("UPDATE audit SET at_unix_ms = -5 WHERE idx = 3", 3),
        ("UPDATE audit SET hash = 42 WHERE idx = 5", 5),
        (
            "UPDATE audit SET prev_hash = upper(prev_hash) WHERE idx = 4",
            4,
        ),
        (
            "INSERT INTO audit VALUES (-1, 0, 'a', 'b', 'null', '', '')",
            0,
        ),
    ] {
        let (v, _) = tampered(sql);
        assert_eq!(broken_at(&v), at, "{sql}");
    }
}

#[test]
fn entries_reports_a_corrupt_row_as_an_error() {
    let (dir, st) = crate::temp_sqlite();
    st.append(0, "a", "b", json!(1)).unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    conn.execute_batch("UPDATE audit SET detail = '{' WHERE idx = 0")
        .unwrap();
    let e = st.entries(0, 10).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("store: audit entries from 0: stored data is corrupt: column detail"),
        "{e}"
    );
}
