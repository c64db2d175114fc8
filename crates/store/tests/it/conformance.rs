//! Behaviour every `Store` backend must share. Each check takes `&dyn Store` (a fresh, empty
//! store) and is instantiated for every backend by the `conformance!` macro below; an etcd
//! backend would add one more module.

use std::sync::Arc;

use nicwarden_store::{Compare, KeyValue, MemStore, Op, Store, StoreError, StoreExt, Txn};
use serde::{Deserialize, Serialize};

fn s(k: &str) -> String {
    k.to_string()
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

fn fresh_store_is_empty(st: &dyn Store) {
    assert_eq!(st.revision().unwrap(), 0);
    assert_eq!(st.get("/a").unwrap(), None);
    assert!(st.range("").unwrap().is_empty());
}

fn create_mod_revision_and_version(st: &dyn Store) {
    assert_eq!(st.put("/a", b"1".to_vec()).unwrap(), 1);
    let kv = st.get("/a").unwrap().unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: s("/a"),
            value: b"1".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1
        }
    );
    assert_eq!(st.put("/a", b"2".to_vec()).unwrap(), 2);
    let kv = st.get("/a").unwrap().unwrap();
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"2"[..], 1, 2, 2)
    );
    // Writing the same value again is still a write.
    assert_eq!(st.put("/a", b"2".to_vec()).unwrap(), 3);
    assert_eq!(st.get("/a").unwrap().unwrap().version, 3);
    // Other keys do not affect /a's metadata.
    assert_eq!(st.put("/b", vec![]).unwrap(), 4);
    assert_eq!(st.get("/a").unwrap().unwrap().mod_revision, 3);
    assert_eq!(st.get("/b").unwrap().unwrap().value, Vec::<u8>::new());
    // Delete forgets the key; re-creating starts over.
    assert_eq!(st.delete("/a").unwrap(), 5);
    assert_eq!(st.get("/a").unwrap(), None);
    assert_eq!(st.put("/a", b"3".to_vec()).unwrap(), 6);
    let kv = st.get("/a").unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (6, 6, 1));
    assert_eq!(st.revision().unwrap(), 6);
}

fn revisions_strictly_increase_and_noops_do_not_consume_one(st: &dyn Store) {
    let mut last = st.revision().unwrap();
    for i in 0..20u8 {
        let r = st.put(&format!("/k/{}", i % 3), vec![i]).unwrap();
        assert!(r > last, "revision {r} after {last}");
        assert_eq!(r, last + 1);
        assert_eq!(st.revision().unwrap(), r);
        last = r;
    }
    // Deleting an absent key changes nothing.
    assert_eq!(st.delete("/nope").unwrap(), last);
    // Failed compare with an empty failure branch changes nothing.
    let resp = st
        .txn(
            Txn::new()
                .when(Compare::Absent(s("/k/0")))
                .then(Op::Put(s("/x"), vec![])),
        )
        .unwrap();
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, last);
    // An empty txn succeeds and changes nothing.
    let resp = st.txn(Txn::new()).unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, last);
    assert_eq!(st.revision().unwrap(), last);
    assert_eq!(st.get("/x").unwrap(), None);
}

fn cas_on_mod_revision(st: &dyn Store) {
    // ModRevision 0 = create only if absent.
    let create = |v: &[u8]| {
        Txn::new()
            .when(Compare::ModRevision(s("/lease/1"), 0))
            .then(Op::Put(s("/lease/1"), v.to_vec()))
    };
    let r = st.txn(create(b"a")).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 1);
    let r = st.txn(create(b"b")).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 1);
    assert_eq!(st.get("/lease/1").unwrap().unwrap().value, b"a");

    // Swap with the current mod_revision succeeds; the stale one then fails.
    let seen = st.get("/lease/1").unwrap().unwrap().mod_revision;
    let swap = |v: &[u8]| {
        Txn::new()
            .when(Compare::ModRevision(s("/lease/1"), seen))
            .then(Op::Put(s("/lease/1"), v.to_vec()))
    };
    let r = st.txn(swap(b"c")).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 2);
    let r = st.txn(swap(b"d")).unwrap();
    assert!(!r.succeeded);
    assert_eq!(st.get("/lease/1").unwrap().unwrap().value, b"c");
    assert_eq!(st.revision().unwrap(), 2);
}

fn absent_present_and_value_compares(st: &dyn Store) {
    let ok = |c: Compare| st.txn(Txn::new().when(c)).unwrap().succeeded;
    assert!(ok(Compare::Absent(s("/a"))));
    assert!(!ok(Compare::Present(s("/a"))));
    assert!(!ok(Compare::Value(s("/a"), vec![])));
    st.put("/a", b"v".to_vec()).unwrap();
    assert!(!ok(Compare::Absent(s("/a"))));
    assert!(ok(Compare::Present(s("/a"))));
    assert!(ok(Compare::Value(s("/a"), b"v".to_vec())));
    assert!(!ok(Compare::Value(s("/a"), b"w".to_vec())));
    assert!(!ok(Compare::Value(s("/a"), vec![])));
    // Present with an empty value is still present, and Value(empty) matches it.
    st.put("/e", vec![]).unwrap();
    assert!(ok(Compare::Present(s("/e"))));
    assert!(ok(Compare::Value(s("/e"), vec![])));
}

fn all_compares_must_hold_and_failure_branch_runs(st: &dyn Store) {
    st.put("/a", b"1".to_vec()).unwrap();
    let txn = Txn::new()
        .when(Compare::Present(s("/a")))
        .when(Compare::Present(s("/b")))
        .then(Op::Put(s("/ok"), vec![]))
        .otherwise(Op::Put(s("/failed"), b"f".to_vec()))
        .otherwise(Op::Delete(s("/a")));
    let r = st.txn(txn.clone()).unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, 2);
    assert_eq!(st.get("/ok").unwrap(), None);
    assert_eq!(st.get("/failed").unwrap().unwrap().mod_revision, 2);
    assert_eq!(st.get("/a").unwrap(), None);

    st.put("/a", vec![]).unwrap();
    st.put("/b", vec![]).unwrap();
    let r = st.txn(txn).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 5);
    assert_eq!(st.get("/ok").unwrap().unwrap().create_revision, 5);
    assert_eq!(st.get("/failed").unwrap().unwrap().version, 1);
}

fn multi_op_txn_shares_one_revision_and_applies_in_order(st: &dyn Store) {
    st.put("/x", b"old".to_vec()).unwrap();
    let r = st
        .txn(
            Txn::new()
                .then(Op::Put(s("/a"), b"1".to_vec()))
                .then(Op::Put(s("/b"), b"2".to_vec()))
                .then(Op::Put(s("/a"), b"3".to_vec()))
                .then(Op::Delete(s("/x")))
                .then(Op::Put(s("/x"), b"new".to_vec())),
        )
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 2);
    let a = st.get("/a").unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"3"[..], 2, 2, 2)
    );
    assert_eq!(st.get("/b").unwrap().unwrap().mod_revision, 2);
    // Deleted then re-created within the txn: a fresh key.
    let x = st.get("/x").unwrap().unwrap();
    assert_eq!(
        (x.value.as_slice(), x.create_revision, x.version),
        (&b"new"[..], 2, 1)
    );
    assert_eq!(st.revision().unwrap(), 2);
}

fn range_is_sorted_and_prefix_isolated(st: &dyn Store) {
    for k in [
        "/a/2", "/ab", "/a/10", "/a", "/a/1/x", "/b/1", "/a/", "/a0", "/a/é", "/a/Z",
    ] {
        st.put(k, k.as_bytes().to_vec()).unwrap();
    }
    let r = st.range("/a/").unwrap();
    assert_eq!(keys(&r), ["/a/", "/a/1/x", "/a/10", "/a/2", "/a/Z", "/a/é"]);
    for kv in &r {
        assert_eq!(kv.value, kv.key.as_bytes());
    }
    assert_eq!(
        keys(&st.range("/a").unwrap()),
        ["/a", "/a/", "/a/1/x", "/a/10", "/a/2", "/a/Z", "/a/é", "/a0", "/ab"]
    );
    assert_eq!(keys(&st.range("/b/").unwrap()), ["/b/1"]);
    assert!(st.range("/c").unwrap().is_empty());
    assert!(st.range("/a/3").unwrap().is_empty());
    let all = st.range("").unwrap();
    assert_eq!(all.len(), 10);
    let mut sorted = keys(&all);
    sorted.sort();
    assert_eq!(keys(&all), sorted);
}

fn delete_prefix(st: &dyn Store) {
    for k in ["/a", "/a/1", "/a/2/x", "/ab", "/b"] {
        st.put(k, vec![]).unwrap();
    }
    let r = st.txn(Txn::new().then(Op::DeletePrefix(s("/a/")))).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, 6, "one revision for the whole prefix delete");
    assert_eq!(keys(&st.range("").unwrap()), ["/a", "/ab", "/b"]);
    // Nothing matches: no revision consumed.
    let r = st.txn(Txn::new().then(Op::DeletePrefix(s("/a/")))).unwrap();
    assert_eq!(r.revision, 6);
    // In a failure branch, combined with a put under the same prefix afterwards.
    let r = st
        .txn(
            Txn::new()
                .when(Compare::Absent(s("/b")))
                .otherwise(Op::DeletePrefix(s("/a")))
                .otherwise(Op::Put(s("/a/new"), vec![])),
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(keys(&st.range("").unwrap()), ["/a/new", "/b"]);
    assert_eq!(st.revision().unwrap(), 7);
}

fn invalid_requests_are_rejected_without_effect(st: &dyn Store) {
    st.put("/a", vec![]).unwrap();
    let e = st.put("", vec![]).unwrap_err();
    assert!(matches!(e, StoreError::InvalidArgument { .. }), "{e}");
    assert_eq!(e.to_string(), "store: put : key is empty");
    // Validation happens before anything is applied, even ops before the bad one.
    let e = st
        .txn(
            Txn::new()
                .then(Op::Put(s("/b"), vec![]))
                .then(Op::DeletePrefix(s(""))),
        )
        .unwrap_err();
    assert!(e.to_string().contains("empty prefix"), "{e}");
    assert!(st
        .txn(
            Txn::new()
                .when(Compare::Present(s("")))
                .then(Op::Delete(s("/a")))
        )
        .is_err());
    assert_eq!(st.get("/b").unwrap(), None);
    assert!(st.get("/a").unwrap().is_some());
    assert_eq!(st.revision().unwrap(), 1);
}

fn binary_values_and_unicode_keys(st: &dyn Store) {
    let value: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    st.put("/bin/ключ/🔑", value.clone()).unwrap();
    assert_eq!(st.get("/bin/ключ/🔑").unwrap().unwrap().value, value);
    assert_eq!(keys(&st.range("/bin/ключ/").unwrap()), ["/bin/ключ/🔑"]);
    let big = vec![7u8; 1 << 20];
    st.put("/big", big.clone()).unwrap();
    assert_eq!(st.get("/big").unwrap().unwrap().value, big);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct LeaseRecord {
    node: String,
    seq: u64,
}

fn json_helpers(st: &dyn Store) {
    let rec = LeaseRecord {
        node: s("n1"),
        seq: 7,
    };
    let rev = st.put_json("/leases/7", &rec).unwrap();
    assert_eq!(st.get_json::<LeaseRecord>("/leases/7").unwrap(), Some(rec));
    assert_eq!(st.get_json::<LeaseRecord>("/leases/8").unwrap(), None);
    let v = st
        .get_json_versioned::<LeaseRecord>("/leases/7")
        .unwrap()
        .unwrap();
    assert_eq!((v.mod_revision, v.version), (rev, 1));

    st.txn(
        Txn::new().then(
            Op::put_json(
                "/leases/3",
                &LeaseRecord {
                    node: s("n2"),
                    seq: 3,
                },
            )
            .unwrap(),
        ),
    )
    .unwrap();
    let all: Vec<(String, LeaseRecord)> = st.range_json("/leases/").unwrap();
    assert_eq!(
        all.iter()
            .map(|(k, r)| (k.as_str(), r.seq))
            .collect::<Vec<_>>(),
        [("/leases/3", 3), ("/leases/7", 7)]
    );

    st.put("/leases/7", b"{not json".to_vec()).unwrap();
    let e = st.get_json::<LeaseRecord>("/leases/7").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("store: decode /leases/7 as LeaseRecord: "),
        "{e}"
    );
    // A corrupt value poisons a typed range too, naming the key.
    let e = st.range_json::<LeaseRecord>("/leases/").unwrap_err();
    assert!(e.to_string().contains("/leases/7"), "{e}");
}

/// Many threads increment one counter with CAS retry loops through `Arc<dyn Store>`; no
/// increment may be lost and every success consumes exactly one revision.
fn concurrent_cas_through_arc_dyn(st: Arc<dyn Store>) {
    const THREADS: u64 = 4;
    const INCREMENTS: u64 = 25;
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let st = Arc::clone(&st);
            std::thread::spawn(move || {
                for _ in 0..INCREMENTS {
                    loop {
                        let cur = st.get_json_versioned::<u64>("/counter").unwrap();
                        let (n, rev) = cur.map_or((0, 0), |v| (v.value, v.mod_revision));
                        let txn = Txn::new()
                            .when(Compare::ModRevision("/counter".into(), rev))
                            .then(Op::put_json("/counter", &(n + 1)).unwrap());
                        if st.txn(txn).unwrap().succeeded {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        st.get_json::<u64>("/counter").unwrap(),
        Some(THREADS * INCREMENTS)
    );
    assert_eq!(st.revision().unwrap(), THREADS * INCREMENTS);
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod mem {
            use super::*;
            $( #[test] fn $check() { super::$check(&MemStore::new()); } )*
            #[test]
            fn concurrent_cas() { concurrent_cas_through_arc_dyn(Arc::new(MemStore::new())); }
        }
        mod sqlite {
            use super::*;
            $( #[test] fn $check() { let (_dir, st) = crate::temp_sqlite(); super::$check(&st); } )*
            #[test]
            fn concurrent_cas() {
                let (_dir, st) = crate::temp_sqlite();
                concurrent_cas_through_arc_dyn(Arc::new(st));
            }
        }
    };
}

conformance!(
    fresh_store_is_empty,
    create_mod_revision_and_version,
    revisions_strictly_increase_and_noops_do_not_consume_one,
    cas_on_mod_revision,
    absent_present_and_value_compares,
    all_compares_must_hold_and_failure_branch_runs,
    multi_op_txn_shares_one_revision_and_applies_in_order,
    range_is_sorted_and_prefix_isolated,
    delete_prefix,
    invalid_requests_are_rejected_without_effect,
    binary_values_and_unicode_keys,
    json_helpers,
);
