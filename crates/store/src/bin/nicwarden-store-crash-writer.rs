//! Helper process of the store's crash-durability integration test
//! (`tests/it/durability.rs`); it exists only for that test and is not part of nicwarden.
//!
//! Usage: `nicwarden-store-crash-writer <db-path>`. Opens the [`SqliteStore`] at `<db-path>`
//! and commits txns until killed (or until [`MAX_TXNS`]), each creating two keys atomically:
//! `/d/<i>/a` (value `i` big-endian) and `/d/<i>/b` (`i % 512` bytes). Numbering resumes after
//! the txns already in the database. After each `txn` call returns, it prints
//! `committed <i> <revision>` on stdout and flushes, so every reported txn must survive a
//! SIGKILL.

use std::io::Write;
use std::path::PathBuf;

use nicwarden_store::{Compare, Op, SqliteStore, Store, Txn};

/// Upper bound on the work in case the parent test disappears.
const MAX_TXNS: u64 = 100_000;

/// Must match `key` in `tests/it/durability.rs`.
fn key(i: u64, part: &str) -> String {
    format!("/d/{i:08}/{part}")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: nicwarden-store-crash-writer <db-path>")?
        .into();
    let st = SqliteStore::open(&path)?;
    let start = st.range("/d/")?.len() as u64 / 2;
    let mut out = std::io::stdout().lock();
    for i in start..start + MAX_TXNS {
        let r = st.txn(
            Txn::new()
                .when(Compare::Absent(key(i, "a")))
                .then(Op::Put(key(i, "a"), i.to_be_bytes().to_vec()))
                .then(Op::Put(key(i, "b"), vec![0xb; (i % 512) as usize])),
        )?;
        if !r.succeeded {
            return Err(format!("txn {i} failed its compare: key already present").into());
        }
        writeln!(out, "committed {i} {}", r.revision)?;
        out.flush()?;
    }
    Ok(())
}
