//! Property: any sequence of txns gives the same responses and the same state on SqliteStore
//! and MemStore, and revisions only grow.

use nicwarden_store::{Compare, MemStore, Op, Store, Txn};
use proptest::prelude::*;

const KEYS: &[&str] = &["/a", "/a/1", "/a/2", "/a/2/x", "/ab", "/b", "/b/1"];
const PREFIXES: &[&str] = &["/", "/a", "/a/", "/a/2", "/b/", "/c"];

fn key() -> impl Strategy<Value = String> {
    proptest::sample::select(KEYS).prop_map(str::to_string)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(0u8..3, 0..3)
}

fn compare() -> impl Strategy<Value = Compare> {
    prop_oneof![
        key().prop_map(Compare::Absent),
        key().prop_map(Compare::Present),
        (key(), 0u64..12).prop_map(|(k, r)| Compare::ModRevision(k, r)),
        (key(), value()).prop_map(|(k, v)| Compare::Value(k, v)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => key().prop_map(Op::Delete),
        1 => proptest::sample::select(PREFIXES).prop_map(|p| Op::DeletePrefix(p.to_string())),
    ]
}

fn txn() -> impl Strategy<Value = Txn> {
    (
        proptest::collection::vec(compare(), 0..3),
        proptest::collection::vec(op(), 0..4),
        proptest::collection::vec(op(), 0..3),
    )
        .prop_map(|(compares, success, failure)| Txn {
            compares,
            success,
            failure,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_and_mem_agree(txns in proptest::collection::vec(txn(), 1..30)) {
        let mem = MemStore::new();
        let (_dir, sql) = crate::temp_sqlite();
        let mut last_rev = 0;
        for t in txns {
            let a = mem.txn(t.clone()).unwrap();
            let b = sql.txn(t.clone()).unwrap();
            prop_assert_eq!(a, b, "txn {:?}", t);
            prop_assert!(a.revision == last_rev || a.revision == last_rev + 1);
            last_rev = a.revision;
            prop_assert_eq!(mem.range("").unwrap(), sql.range("").unwrap());
            for k in KEYS {
                let kv = mem.get(k).unwrap();
                prop_assert_eq!(&kv, &sql.get(k).unwrap());
                if let Some(kv) = kv {
                    prop_assert!(kv.create_revision <= kv.mod_revision && kv.mod_revision <= a.revision);
                    prop_assert!(kv.version >= 1);
                }
            }
            for p in PREFIXES {
                prop_assert_eq!(mem.range(p).unwrap(), sql.range(p).unwrap());
            }
        }
        prop_assert_eq!(mem.revision().unwrap(), sql.revision().unwrap());
    }
}
