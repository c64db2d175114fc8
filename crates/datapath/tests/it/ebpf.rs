//! Privileged tests of the eBPF backend on the real kernel, in the same two-namespace testbed
//! as the tc backend's tests. aya attaches the program with netlink in the calling thread's
//! network namespace, so every datapath call runs on a thread that entered the node
//! namespace ([`in_node`]). Each test pins under its own directory,
//! `/sys/fs/bpf/nicwarden-test/<node namespace>`, removed when the test ends (also on panic).

use crate::testbed::{self, testbed, Testbed, DEV, OTHER, PEER_B, PEER_C};
use nicwarden_datapath::ebpf::{BpfOps, RealBpf, ScopeConfig};
use nicwarden_datapath::fake::fixtures::{egress, floor, lease, peer};
use nicwarden_datapath::{
    Change, Datapath, DesiredState, EbpfDatapath, LeaseCounters, ScopeCounters, ScopeEnforce,
};
use nicwarden_lease::{LeaseId, Scope};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A testbed plus a pin directory of its own.
struct Node {
    tb: Testbed,
    pin_dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Unpinning frees the maps; deleting the namespaces (Testbed's drop) frees the
        // device, its filters and so the program.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// `None` (after saying so) when this process cannot run privileged eBPF tests.
fn node() -> Option<Node> {
    let tb = testbed()?;
    if let Err(e) = EbpfDatapath::check_available() {
        eprintln!("skipped: needs root (bpf, netns, tc): {e}");
        return None;
    }
    let pin_dir = Path::new("/sys/fs/bpf/nicwarden-test").join(&tb.node);
    Some(Node { tb, pin_dir })
}

/// Runs `f` on a fresh thread inside network namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

impl Node {
    /// A datapath as a (new) agent process on the node would create it.
    fn datapath(&self) -> EbpfDatapath {
        EbpfDatapath::new(DEV, &self.pin_dir)
    }

    fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_ns(&self.tb.node, f)
    }

    #[track_caller]
    fn reconcile(&self, dp: &mut EbpfDatapath, desired: &DesiredState) -> Vec<String> {
        let result = self.in_node(|| dp.reconcile(desired));
        match result {
            Ok(changes) => changes.iter().map(Change::to_string).collect(),
            Err(e) => panic!("reconcile: {e}"),
        }
    }

    #[track_caller]
    fn counters(&self, dp: &mut EbpfDatapath) -> Vec<ScopeCounters> {
        match self.in_node(|| dp.counters()) {
            Ok(c) => c,
            Err(e) => panic!("counters: {e}"),
        }
    }

    /// Files pinned under the pin directory (`None`: the directory is gone).
    fn pinned(&self) -> Option<Vec<String>> {
        let entries = std::fs::read_dir(&self.pin_dir).ok()?;
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Some(names)
    }
}

fn scope<'a>(counters: &'a [ScopeCounters], s: &Scope) -> &'a ScopeCounters {
    counters.iter().find(|c| &c.scope == s).unwrap()
}

fn lease_of(counters: &[ScopeCounters], s: &Scope) -> LeaseCounters {
    scope(counters, s).lease.unwrap()
}

/// Egress on lease 7 and peer b (198.18.0.2) on lease 9, no volumes; peer c (198.18.0.3)
/// blocked.
fn three_scopes() -> DesiredState {
    DesiredState {
        scopes: vec![
            egress(lease(7, 100_000_000, None, 0)),
            peer("b", &["198.18.0.2/32"], lease(9, 50_000_000, None, 0)),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ],
    }
}

/// IP length of a UDP datagram with `payload` bytes.
fn ip_len(payload: usize) -> u64 {
    payload as u64 + 8 + 20
}

#[test]
fn ebpf_counts_each_scope_exactly() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let mut dp = n.datapath();
    let changes = n.reconcile(&mut dp, &three_scopes());
    assert!(
        changes
            .iter()
            .any(|c| c.starts_with("ebpf: program nw_egress attached to fab0 egress")),
        "{changes:#?}"
    );
    // No u32 filter on HTB, our bpf filter on clsact egress.
    assert_eq!(n.tb.tc(&["filter", "show", "dev", DEV]), "");
    let egress_filters = n.tb.tc(&["filter", "show", "dev", DEV, "egress"]);
    assert!(
        egress_filters.contains("pref 1 bpf") && egress_filters.contains("name nw_egress"),
        "{egress_filters}"
    );

    let to_b = n.tb.send_and_count(PEER_B, 40, 200);
    let to_other = n.tb.send_and_count(OTHER, 25, 300);
    let to_c = n.tb.send_and_count(PEER_C, 10, 100);
    assert_eq!((to_b.packets, to_other.packets, to_c.packets), (40, 25, 0));

    let c = n.counters(&mut dp);
    let b = lease_of(&c, &Scope::Peer("b".into()));
    assert_eq!(
        (b.passed_packets, b.used_bytes),
        (40, 40 * ip_len(200)),
        "{b:?}"
    );
    let e = lease_of(&c, &Scope::Egress);
    assert_eq!(
        (e.passed_packets, e.used_bytes),
        (25, 25 * ip_len(300)),
        "{e:?}"
    );
    assert!(!e.exhausted && !b.exhausted && b.volume_drops == 0);
    let blocked = scope(&c, &Scope::Peer("c".into()));
    assert_eq!(blocked.class.drops, 10, "{blocked:?}");
    assert_eq!(blocked.class.packets, 0, "{blocked:?}");
    assert_eq!(blocked.lease, None);
    // HTB saw (and shaped) the steered packets in the scopes' classes.
    assert_eq!(scope(&c, &Scope::Peer("b".into())).class.packets, 40);
    assert_eq!(scope(&c, &Scope::Egress).class.packets, 25);
}

#[test]
fn ebpf_volume_passes_exactly_the_volume() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let mut dp = n.datapath();
    let volume = 20_000;
    n.reconcile(
        &mut dp,
        &DesiredState {
            scopes: vec![egress(lease(21, 100_000_000, Some(volume), 0))],
        },
    );
    // 1028 B of IP each: floor(20 000 / 1028) = 19 fit.
    let got = n.tb.send_and_count(OTHER, 100, 1000);
    assert_eq!(got.packets, 19, "{got:?}");
    let e = lease_of(&n.counters(&mut dp), &Scope::Egress);
    assert_eq!(
        e,
        LeaseCounters {
            lease: LeaseId(21),
            used_bytes: 19 * 1028,
            passed_packets: 19,
            volume_drops: 81,
            exhausted: true,
        }
    );
    // What is left (468 B) still passes one packet of exactly that size, then nothing.
    let left = volume - 19 * 1028;
    let fits = n.tb.send_and_count(OTHER, 1, left as usize - 28);
    assert_eq!(fits.packets, 1, "{fits:?}");
    let over = n.tb.send_and_count(OTHER, 5, 1);
    assert_eq!(over.packets, 0, "{over:?}");
    let e = lease_of(&n.counters(&mut dp), &Scope::Egress);
    assert_eq!(
        (e.used_bytes, e.passed_packets, e.volume_drops),
        (volume, 20, 86)
    );
}

#[test]
fn ebpf_blocked_scope_drops_and_arp_passes() {
    let Some(n) = node() else { return };
    let mut dp = n.datapath();
    n.reconcile(
        &mut dp,
        &DesiredState {
            scopes: vec![egress(floor(0))],
        },
    );
    // The peer resolves the node: the node's ARP reply leaves through the control class.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        testbed::sh(&[
            "ip",
            "netns",
            "exec",
            &n.tb.peer,
            "bash",
            "-c",
            "echo probe > /dev/udp/198.18.0.1/9",
        ]);
        let neigh = testbed::sh(&["ip", "-n", &n.tb.peer, "neigh", "show", "198.18.0.1"]);
        if neigh.contains("lladdr") {
            break;
        }
        assert!(Instant::now() < deadline, "ARP did not resolve: {neigh}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // (The node's ICMP "port unreachable" answers to the probes are IP: dropped, counted.)
    let base = scope(&n.counters(&mut dp), &Scope::Egress).class.drops;

    n.tb.static_neighbours();
    let got = n.tb.send_and_count(OTHER, 12, 100);
    assert_eq!(got.packets, 0, "{got:?}");
    let e = scope(&n.counters(&mut dp), &Scope::Egress).clone();
    assert_eq!(e.class.drops, base + 12, "{e:?}");
    assert_eq!(e.lease, None);
}

/// An agent restart is a new `EbpfDatapath` over the same pin directory: it finds the maps,
/// the program and the attachment, changes nothing, and its counters continue; the kernel
/// enforces in between.
#[test]
fn ebpf_agent_restart_reuses_pins() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let desired = three_scopes();
    let mut first = n.datapath();
    n.reconcile(&mut first, &desired);
    let pins = n.pinned().unwrap();
    assert_eq!(pins.len(), 5, "4 maps and the program: {pins:?}");
    n.tb.send_and_count(PEER_B, 10, 100);
    let before = n.counters(&mut first);
    assert_eq!(n.reconcile(&mut first, &desired), Vec::<String>::new());
    drop(first); // the agent exits

    // Nobody holds the maps or the program but the pins and the filter: still enforced.
    let to_c = n.tb.send_and_count(PEER_C, 5, 100);
    assert_eq!(to_c.packets, 0, "{to_c:?}");
    let to_b = n.tb.send_and_count(PEER_B, 7, 100);
    assert_eq!(to_b.packets, 7, "{to_b:?}");

    // This time from outside: `in_netns` enters the namespace on a thread of its own.
    let mut second = EbpfDatapath::in_netns(&n.tb.node, DEV, &n.pin_dir);
    let changes = timed("no-op reconcile, restarted agent", || {
        second.reconcile(&desired).unwrap()
    });
    let changes: Vec<String> = changes.iter().map(Change::to_string).collect();
    assert_eq!(changes, Vec::<String>::new());
    assert_eq!(n.pinned().unwrap(), pins);
    let after = n.counters(&mut second);
    let (b0, b1) = (
        lease_of(&before, &Scope::Peer("b".into())),
        lease_of(&after, &Scope::Peer("b".into())),
    );
    assert_eq!(b1.passed_packets, b0.passed_packets + 7, "{b0:?} {b1:?}");
    assert_eq!(b1.used_bytes, b0.used_bytes + 7 * ip_len(100));
    let c = scope(&after, &Scope::Peer("c".into()));
    assert_eq!(c.class.drops, 5, "{c:?}");
    // One program, attached once: a packet is counted once.
    n.tb.send_and_count(PEER_B, 3, 100);
    let b2 = lease_of(&n.counters(&mut second), &Scope::Peer("b".into()));
    assert_eq!(b2.passed_packets, b1.passed_packets + 3);
    let filters = n.tb.tc(&["filter", "show", "dev", DEV, "egress"]);
    assert_eq!(filters.matches("name nw_egress").count(), 1, "{filters}");
}

#[test]
fn ebpf_remove_leaves_nothing() {
    let Some(n) = node() else { return };
    let mut dp = n.datapath();
    n.reconcile(&mut dp, &three_scopes());
    assert!(n.pinned().is_some());
    let removed = timed("remove", || n.in_node(|| dp.remove()));
    removed.unwrap();
    assert_eq!(n.pinned(), None, "pin directory removed");
    assert_eq!(n.tb.tc(&["filter", "show", "dev", DEV, "egress"]), "");
    let qdiscs = n.tb.tc(&["qdisc", "show", "dev", DEV]);
    assert!(
        qdiscs.starts_with("qdisc noqueue 0: root") && !qdiscs.contains("clsact"),
        "{qdiscs}"
    );
    assert!(!qdiscs.contains("htb"), "{qdiscs}");
    // Idempotent.
    n.in_node(|| dp.remove()).unwrap();
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    eprintln!("timing: {what}: {:?}", start.elapsed());
    out
}

/// How long a lease change takes to apply: the whole reconcile (reads the maps and tc, writes
/// one config) and the map update alone. Printed, not asserted.
#[test]
fn ebpf_lease_change_timing() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let mut dp = n.datapath();
    let with = |b: ScopeEnforce| DesiredState {
        scopes: vec![
            egress(lease(7, 100_000_000, None, 0)),
            peer("b", &["198.18.0.2/32"], b),
        ],
    };
    let changes = timed("first reconcile (load, pin, attach, tc)", || {
        n.reconcile(&mut dp, &with(lease(9, 50_000_000, Some(1_000_000), 0)))
    });
    eprintln!("first install: {changes:#?}");
    timed("no-op reconcile", || {
        n.reconcile(&mut dp, &with(lease(9, 50_000_000, Some(1_000_000), 0)))
    });
    let changes = timed("reconcile: new lease in a scope", || {
        n.reconcile(&mut dp, &with(lease(10, 50_000_000, Some(1_000_000), 0)))
    });
    assert_eq!(changes.len(), 2, "{changes:#?}");
    let changes = timed("reconcile: revocation (lease -> blocked)", || {
        n.reconcile(&mut dp, &with(floor(0)))
    });
    assert!(
        changes[0].starts_with("ebpf: scope peer:b (slot 1): blocked"),
        "{changes:#?}"
    );
    let got = n.tb.send_and_count(PEER_B, 5, 100);
    assert_eq!(got.packets, 0, "revoked: {got:?}");
    timed("counters", || n.counters(&mut dp));

    // The map update alone, through a second handle on the same pins.
    let pin_dir = n.pin_dir.clone();
    let (one, mean, read_all) = n.in_node(move || {
        let mut bpf = RealBpf::new();
        bpf.open(&pin_dir).unwrap();
        let start = Instant::now();
        bpf.configs().unwrap();
        let read_all = start.elapsed();
        let blocked = bpf.config(1).unwrap();
        let open = ScopeConfig {
            mode: 1,
            lease_id: 11,
            volume_limit: 1_000_000,
            ..blocked
        };
        let start = Instant::now();
        bpf.set_config(1, &open).unwrap();
        let one = start.elapsed();
        let rounds = 1000u32;
        let start = Instant::now();
        for i in 0..rounds {
            let c = if i % 2 == 0 { blocked } else { open };
            bpf.set_config(1, &c).unwrap();
        }
        (one, start.elapsed() / rounds, read_all)
    });
    eprintln!("timing: one nw_config map update: {one:?} (mean of 1000: {mean:?})");
    eprintln!("timing: read all 1024 slots of nw_config: {read_all:?}");
}

/// Whatever sits in our filter slot (another program, say an older agent's) is replaced in
/// place; a filter deleted by hand is re-attached; pins removed by hand are pinned again.
#[test]
fn ebpf_repairs_attachment_and_pins() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    // A classic BPF filter in our slot ("ret #0": matches nothing, so everything passes).
    n.tb.tc(&["qdisc", "add", "dev", DEV, "clsact"]);
    n.tb.tc(&[
        "filter",
        "add",
        "dev",
        DEV,
        "egress",
        "pref",
        "1",
        "handle",
        "1",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    assert_eq!(
        n.tb.send_and_count(PEER_C, 3, 100).packets,
        3,
        "not enforced yet"
    );

    let mut dp = n.datapath();
    let desired = three_scopes();
    let changes = n.reconcile(&mut dp, &desired);
    assert!(
        changes.iter().any(|c| c.starts_with(
            "ebpf: program nw_egress attached to fab0 egress, replacing bpf filter pref 1 handle 0x1"
        )),
        "{changes:#?}"
    );
    assert_eq!(n.tb.send_and_count(OTHER, 4, 100).packets, 4);
    assert_eq!(n.tb.send_and_count(PEER_C, 3, 100).packets, 0, "enforced");
    assert_eq!(n.reconcile(&mut dp, &desired), Vec::<String>::new());

    // Deleted by hand: enforcement (and counting) stops until the next reconcile; HTB's
    // default class drops meanwhile (fail closed).
    n.tb.tc(&["filter", "del", "dev", DEV, "egress", "pref", "1"]);
    assert_eq!(n.tb.send_and_count(OTHER, 2, 100).packets, 0, "fail closed");
    let changes = n.reconcile(&mut dp, &desired);
    assert_eq!(
        changes,
        ["ebpf: program nw_egress attached to fab0 egress (clsact, pref 1, handle 0x1)"]
    );
    assert_eq!(n.tb.send_and_count(OTHER, 5, 100).packets, 5);

    // Pins removed by hand: pinned again from the objects this process holds, counts kept.
    let pins = n.pinned().unwrap();
    std::fs::remove_dir_all(&n.pin_dir).unwrap();
    let changes = n.reconcile(&mut dp, &desired);
    assert_eq!(
        changes.len(),
        5,
        "4 maps and the program re-pinned: {changes:#?}"
    );
    assert_eq!(n.pinned().unwrap(), pins);
    let e = lease_of(&n.counters(&mut dp), &Scope::Egress);
    assert_eq!(e.passed_packets, 9, "{e:?}");
    // And a restarted agent finds them.
    let mut restarted = n.datapath();
    assert_eq!(n.reconcile(&mut restarted, &desired), Vec::<String>::new());
}
