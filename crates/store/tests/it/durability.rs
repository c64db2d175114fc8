//! Crash durability of SqliteStore: a child process (the `nicwarden-store-crash-writer` binary of
//! this crate) commits txns and reports each one on stdout after `txn` returns; the parent
//! SIGKILLs it mid-stream, reopens the database and checks that every reported txn is there,
//! whole.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nicwarden_store::{SqliteStore, Store};

/// The child: writes txns until killed, each creating `key(i, "a")` and `key(i, "b")`
/// atomically, and prints `committed <index> <revision>` after each one.
const CHILD_EXE: &str = env!("CARGO_BIN_EXE_nicwarden-store-crash-writer");

/// Must match `key` in `src/bin/nicwarden-store-crash-writer.rs`.
fn key(i: u64, part: &str) -> String {
    format!("/d/{i:08}/{part}")
}

/// Run the child until it has reported `kill_after` commits, SIGKILL it, and return the
/// reported (index, revision) pairs.
fn run_child_and_kill(path: &Path, kill_after: usize) -> Vec<(u64, u64)> {
    let mut child = Command::new(CHILD_EXE)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reported = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let rest = line
            .strip_prefix("committed ")
            .unwrap_or_else(|| panic!("unexpected child output: {line:?}"));
        let (i, rev) = rest.split_once(' ').unwrap();
        reported.push((i.parse().unwrap(), rev.parse().unwrap()));
        if reported.len() == kill_after {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "child should die by SIGKILL, got {status} after {} commits",
        reported.len()
    );
    assert_eq!(reported.len(), kill_after, "child stopped reporting early");
    reported
}

/// Every reported txn is present with its reported revision; every txn present is whole; the
/// committed txns are a contiguous run and the store revision counts them exactly.
fn check_recovered(path: &Path, reported: &[(u64, u64)]) -> u64 {
    let st = SqliteStore::open(path).unwrap();
    for &(i, rev) in reported {
        let a = st
            .get(&key(i, "a"))
            .unwrap()
            .unwrap_or_else(|| panic!("committed txn {i} lost"));
        assert_eq!(a.value, i.to_be_bytes());
        assert_eq!(a.mod_revision, rev);
        let b = st.get(&key(i, "b")).unwrap().unwrap();
        assert_eq!(b.value.len(), (i % 512) as usize);
        assert_eq!(b.mod_revision, rev);
    }
    let all = st.range("/d/").unwrap();
    assert_eq!(all.len() % 2, 0, "a txn was applied partially");
    let txns = all.len() as u64 / 2;
    for (n, pair) in all.chunks(2).enumerate() {
        let n = n as u64;
        assert_eq!(
            (pair[0].key.as_str(), pair[1].key.as_str()),
            (key(n, "a").as_str(), key(n, "b").as_str())
        );
        assert_eq!(pair[0].mod_revision, n + 1);
    }
    assert_eq!(st.revision().unwrap(), txns);
    assert!(st.get(&key(txns, "a")).unwrap().is_none());
    txns
}

#[test]
fn committed_txns_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // Two rounds: the second starts from a database recovered after a kill.
    let mut total = 0;
    for kill_after in [150, 40] {
        let reported = run_child_and_kill(&path, kill_after);
        assert_eq!(reported[0].0, total, "child resumed at the wrong txn");
        total = check_recovered(&path, &reported);
        assert!(total > reported.last().unwrap().0);
    }
}
