//! Privileged tests of the eBPF backend on the real kernel, in the same two-namespace testbed
//! as the tc backend's tests. aya attaches the program with netlink in the calling thread's
//! network namespace, so every datapath call runs on a thread that entered the node
//! namespace ([`in_node`]). Each test pins under its own directory,
//! `/sys/fs/bpf/nicwarden-test/<node namespace>`, removed when the test ends (also on panic).

use crate::testbed::{self, testbed, Testbed, DEV, NODE_ADDR, OTHER, PEER_B, PEER_C, PORT};
use crate::{scope, timed};
use nicwarden_datapath::ebpf::{BpfOps, RealBpf, ScopeConfig};
use nicwarden_datapath::fake::fixtures::{egress, floor, lease, peer};
use nicwarden_datapath::plan::effective_burst;
use nicwarden_datapath::{
    Change, Datapath, DesiredState, EbpfDatapath, IngressStats, LeaseCounters, ScopeCounters,
    ScopeEnforce,
};
use nicwarden_lease::{LeaseId, Scope};
use std::net::UdpSocket;
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

fn lease_of(counters: &[ScopeCounters], s: &Scope) -> LeaseCounters {
    scope(counters, s).lease.unwrap()
}

/// Egress on lease 7 and peer b (198.18.0.2) on lease 9, no volumes; peer c (198.18.0.3)
/// blocked.
fn three_scopes() -> DesiredState {
    DesiredState {
        peers: Vec::new(),
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
    let ingress_filters = n.tb.tc(&["filter", "show", "dev", DEV, "ingress"]);
    assert!(
        ingress_filters.contains("pref 1 bpf") && ingress_filters.contains("name nw_ingress"),
        "{ingress_filters}"
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
            peers: Vec::new(),
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
            peers: Vec::new(),
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
    // The probes themselves are IP from a blocked scope: dropped on arrival, counted.
    let e = scope(&n.counters(&mut dp), &Scope::Egress).clone();
    assert!(e.ingress.blocked_drops >= 1, "{e:?}");
    assert_eq!(
        (e.ingress.packets, e.ingress.policed_drops),
        (0, 0),
        "{e:?}"
    );
    let base = e.class.drops;

    // The other way round: the node resolves the peer (its ARP request leaves through the
    // control class, the peer's reply arrives through the ingress program), although the
    // IP packet that asked is dropped.
    testbed::sh(&["ip", "-n", &n.tb.node, "neigh", "flush", "dev", DEV]);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut asked = 0;
    loop {
        asked += n.tb.send_and_count(OTHER, 1, 10).accepted_by_send;
        let neigh = testbed::sh(&["ip", "-n", &n.tb.node, "neigh", "show", &OTHER.to_string()]);
        if neigh.contains("lladdr") {
            break;
        }
        assert!(Instant::now() < deadline, "ARP did not resolve: {neigh}");
    }
    let base = base + asked as u64;

    n.tb.static_neighbours();
    let got = n.tb.send_and_count(OTHER, 12, 100);
    assert_eq!(got.packets, 0, "{got:?}");
    let e = scope(&n.counters(&mut dp), &Scope::Egress).clone();
    assert_eq!(e.class.drops, base + 12, "{e:?}");
    assert_eq!(e.lease, None);
    // Nothing arrives either: a node without a lease has no fabric traffic.
    let before = e.ingress.blocked_drops;
    let got = n.tb.send_to_node(OTHER, 9, 100);
    assert_eq!(got.packets, 0, "{got:?}");
    let e = scope(&n.counters(&mut dp), &Scope::Egress).clone();
    assert_eq!(e.ingress.blocked_drops, before + 9, "{e:?}");
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
    assert_eq!(pins.len(), 11, "9 maps and 2 programs: {pins:?}");
    n.tb.send_and_count(PEER_B, 10, 100);
    assert_eq!(n.tb.send_to_node(PEER_B, 4, 100).packets, 4);
    let before = n.counters(&mut first);
    assert_eq!(n.reconcile(&mut first, &desired), Vec::<String>::new());
    drop(first); // the agent exits

    // Nobody holds the maps or the programs but the pins and the filters: still enforced,
    // both ways.
    let to_c = n.tb.send_and_count(PEER_C, 5, 100);
    assert_eq!(to_c.packets, 0, "{to_c:?}");
    let to_b = n.tb.send_and_count(PEER_B, 7, 100);
    assert_eq!(to_b.packets, 7, "{to_b:?}");
    let from_c = n.tb.send_to_node(PEER_C, 6, 100);
    assert_eq!(from_c.packets, 0, "{from_c:?}");
    let from_b = n.tb.send_to_node(PEER_B, 3, 100);
    assert_eq!(from_b.packets, 3, "{from_b:?}");

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
    assert_eq!(c.ingress.blocked_drops, 6, "{c:?}");
    let (i0, i1) = (
        scope(&before, &Scope::Peer("b".into())).ingress,
        scope(&after, &Scope::Peer("b".into())).ingress,
    );
    assert_eq!(i0.packets, 4, "{i0:?}");
    assert_eq!(i1.packets, i0.packets + 3, "{i0:?} {i1:?}");
    assert_eq!(i1.bytes, i0.bytes + 3 * ip_len(100));
    // One program per hook, attached once: a packet is counted once.
    n.tb.send_and_count(PEER_B, 3, 100);
    n.tb.send_to_node(PEER_B, 2, 100);
    let c2 = n.counters(&mut second);
    let b2 = lease_of(&c2, &Scope::Peer("b".into()));
    assert_eq!(b2.passed_packets, b1.passed_packets + 3);
    let i2 = scope(&c2, &Scope::Peer("b".into())).ingress;
    assert_eq!(i2.packets, i1.packets + 2);
    let filters = n.tb.tc(&["filter", "show", "dev", DEV, "egress"]);
    assert_eq!(filters.matches("name nw_egress").count(), 1, "{filters}");
    let filters = n.tb.tc(&["filter", "show", "dev", DEV, "ingress"]);
    assert_eq!(filters.matches("name nw_ingress").count(), 1, "{filters}");
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
    assert_eq!(n.tb.tc(&["filter", "show", "dev", DEV, "ingress"]), "");
    let qdiscs = n.tb.tc(&["qdisc", "show", "dev", DEV]);
    assert!(
        qdiscs.starts_with("qdisc noqueue 0: root") && !qdiscs.contains("clsact"),
        "{qdiscs}"
    );
    assert!(!qdiscs.contains("htb"), "{qdiscs}");
    // Nothing is enforced any more, either way.
    n.tb.static_neighbours();
    assert_eq!(n.tb.send_to_node(PEER_C, 5, 100).packets, 5);
    // Idempotent.
    n.in_node(|| dp.remove()).unwrap();
}

/// How long a lease change takes to apply: the whole reconcile (reads the maps and tc, writes
/// one config) and the map update alone. Printed, not asserted.
#[test]
fn ebpf_lease_change_timing() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let mut dp = n.datapath();
    let with = |b: ScopeEnforce| DesiredState {
        peers: Vec::new(),
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
    // A classic BPF filter in our slot of each hook ("ret #0": matches nothing, so
    // everything passes).
    n.tb.tc(&["qdisc", "add", "dev", DEV, "clsact"]);
    for hook in ["egress", "ingress"] {
        n.tb.tc(&[
            "filter",
            "add",
            "dev",
            DEV,
            hook,
            "pref",
            "1",
            "handle",
            "1",
            "bpf",
            "bytecode",
            "1,6 0 0 0,",
        ]);
    }
    assert_eq!(
        n.tb.send_and_count(PEER_C, 3, 100).packets,
        3,
        "not enforced yet"
    );
    assert_eq!(n.tb.send_to_node(PEER_C, 3, 100).packets, 3);

    let mut dp = n.datapath();
    let desired = three_scopes();
    let changes = n.reconcile(&mut dp, &desired);
    for hook in ["egress", "ingress"] {
        let program = format!("nw_{hook}");
        assert!(
            changes.iter().any(|c| c.starts_with(&format!(
                "ebpf: program {program} attached to fab0 {hook}, replacing bpf filter pref 1 handle 0x1"
            ))),
            "{changes:#?}"
        );
    }
    assert_eq!(n.tb.send_and_count(OTHER, 4, 100).packets, 4);
    assert_eq!(n.tb.send_and_count(PEER_C, 3, 100).packets, 0, "enforced");
    assert_eq!(n.tb.send_to_node(PEER_C, 3, 100).packets, 0, "enforced");
    assert_eq!(n.reconcile(&mut dp, &desired), Vec::<String>::new());

    // Deleted by hand: enforcement (and counting) stops until the next reconcile; HTB's
    // default class drops meanwhile (fail closed).
    n.tb.tc(&["filter", "del", "dev", DEV, "egress", "pref", "1"]);
    n.tb.tc(&["filter", "del", "dev", DEV, "ingress", "pref", "1"]);
    assert_eq!(n.tb.send_and_count(OTHER, 2, 100).packets, 0, "fail closed");
    let changes = n.reconcile(&mut dp, &desired);
    assert_eq!(
        changes,
        [
            "ebpf: program nw_egress attached to fab0 egress (clsact, pref 1, handle 0x1)",
            "ebpf: program nw_ingress attached to fab0 ingress (clsact, pref 1, handle 0x1)",
        ]
    );
    assert_eq!(n.tb.send_and_count(OTHER, 5, 100).packets, 5);
    assert_eq!(n.tb.send_to_node(PEER_C, 3, 100).packets, 0, "enforced");

    // Pins removed by hand: pinned again from the objects this process holds, counts kept.
    let pins = n.pinned().unwrap();
    std::fs::remove_dir_all(&n.pin_dir).unwrap();
    let changes = n.reconcile(&mut dp, &desired);
    assert_eq!(
        changes.len(),
        11,
        "9 maps and 2 programs re-pinned: {changes:#?}"
    );
    assert_eq!(n.pinned().unwrap(), pins);
    let e = lease_of(&n.counters(&mut dp), &Scope::Egress);
    assert_eq!(e.passed_packets, 9, "{e:?}");
    // And a restarted agent finds them.
    let mut restarted = n.datapath();
    assert_eq!(n.reconcile(&mut restarted, &desired), Vec::<String>::new());
}

/// What a receiver socket saw: datagrams, their IP bytes, when the first and the last arrived.
#[derive(Debug, Default)]
struct Arrivals {
    packets: u64,
    ip_bytes: u64,
    first_ip_bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Arrivals {
    /// Reads until nothing arrived for `idle` after the first datagram, or `limit` passed.
    fn collect(rx: &UdpSocket, idle: Duration, limit: Duration) -> Arrivals {
        rx.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let start = Instant::now();
        let mut a = Arrivals::default();
        let mut buf = [0u8; 65536];
        while start.elapsed() < limit && a.last.is_none_or(|l| l.elapsed() < idle) {
            if let Ok(n) = rx.recv(&mut buf) {
                let now = Instant::now();
                let ip = ip_len(n);
                if a.first.is_none() {
                    a.first = Some(now);
                    a.first_ip_bytes = ip;
                }
                a.last = Some(now);
                a.packets += 1;
                a.ip_bytes += ip;
            }
        }
        a
    }

    /// The active period: first to last arrival.
    fn period(&self) -> Duration {
        match (self.first, self.last) {
            (Some(f), Some(l)) => l - f,
            _ => Duration::ZERO,
        }
    }
}

/// A peer without any enforcement (nothing installed in its namespace) blasts UDP at the
/// node from peer b's address at several times the rate of the node's lease for peer b: the
/// node receives that rate, within 5 %, measured by a receiver socket on the node over the
/// active period. Figures printed.
#[test]
fn ebpf_ingress_polices_an_unenforced_peer_to_the_scope_rate() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let rate_bps = 40_000_000u64; // 5 MB/s
    let rate = rate_bps as f64 / 8.0;
    let burst = effective_burst(rate_bps, 0);
    let mut dp = n.datapath();
    n.reconcile(
        &mut dp,
        &DesiredState {
            peers: Vec::new(),
            scopes: vec![
                egress(lease(7, 1_000_000_000, None, 0)),
                peer("b", &["198.18.0.2/32"], lease(9, rate_bps, None, 0)),
                peer("c", &["198.18.0.3/32"], floor(0)),
            ],
        },
    );

    let rx = Testbed::socket(&n.tb.node, NODE_ADDR, PORT);
    // Room for a second of traffic at several times the rate: the socket must not be what
    // drops (root may exceed rmem_max).
    nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::RcvBufForce, &(32 << 20)).unwrap();
    let tx = Testbed::socket(&n.tb.peer, PEER_B, 0);
    let window = Duration::from_secs(2);
    let payload = 1400;
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let sent = testbed::send(&tx, NODE_ADDR, usize::MAX, payload, window);
        (sent, start.elapsed())
    });
    let got = Arrivals::collect(
        &rx,
        Duration::from_millis(500),
        window + Duration::from_secs(4),
    );
    let (sent, sent_for) = sender.join().unwrap();
    let counters = n.counters(&mut dp);
    let b = scope(&counters, &Scope::Peer("b".into())).ingress;

    let offered = sent as f64 * ip_len(payload) as f64 / sent_for.as_secs_f64();
    let period = got.period().as_secs_f64();
    // Bytes after the first datagram over the time after it; the burst included, as a
    // receiver sees it.
    let measured = (got.ip_bytes - got.first_ip_bytes) as f64 / period;
    let without_burst = (got.ip_bytes as f64 - burst as f64).max(0.0) / period;
    let err = (measured / rate - 1.0) * 100.0;
    eprintln!(
        "ingress policing: slot rate {rate:.0} B/s ({rate_bps} bit/s), burst {burst} B\n\
         offered {offered:.0} B/s ({:.1}x the rate: {sent} datagrams of {} IP bytes in {sent_for:?})\n\
         received {} datagrams, {} IP bytes over {period:.3} s: {measured:.0} B/s ({err:+.2} % off the rate; {without_burst:.0} B/s without the burst)\n\
         program: admitted {} packets / {} B, policed {} packets",
        offered / rate,
        ip_len(payload),
        got.packets,
        got.ip_bytes,
        b.packets,
        b.bytes,
        b.policed_drops,
    );
    assert!(
        offered > 2.5 * rate,
        "the sender offered only {offered:.0} B/s; the test needs several times {rate:.0}"
    );
    assert!(b.policed_drops > 0, "{b:?}");
    assert!(
        got.ip_bytes <= b.bytes,
        "received more than the policer admitted: {got:?} {b:?}"
    );
    assert!(
        period > 1.5,
        "traffic arrived for {period:.3} s only: {got:?}"
    );
    assert!(
        err.abs() < 5.0,
        "received {measured:.0} B/s, {err:+.2} % off the slot's rate {rate:.0} B/s"
    );
}

/// A blocked scope receives nothing; the other scopes receive what they are sent; the
/// counters say which drop was which.
#[test]
fn ebpf_ingress_blocked_scope_receives_nothing() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let mut dp = n.datapath();
    n.reconcile(&mut dp, &three_scopes());
    let from_c = n.tb.send_to_node(PEER_C, 20, 300);
    assert_eq!(from_c.packets, 0, "{from_c:?}");
    let from_b = n.tb.send_to_node(PEER_B, 20, 300);
    assert_eq!(from_b.packets, 20, "{from_b:?}");
    let from_other = n.tb.send_to_node(OTHER, 15, 300);
    assert_eq!(from_other.packets, 15, "{from_other:?}");
    let c = n.counters(&mut dp);
    assert_eq!(
        scope(&c, &Scope::Peer("c".into())).ingress,
        IngressStats {
            blocked_drops: 20,
            ..Default::default()
        }
    );
    assert_eq!(
        scope(&c, &Scope::Peer("b".into())).ingress,
        IngressStats {
            bytes: 20 * ip_len(300),
            packets: 20,
            ..Default::default()
        }
    );
    let e = scope(&c, &Scope::Egress).ingress;
    assert_eq!((e.packets, e.bytes), (15, 15 * ip_len(300)), "{e:?}");
    // Receiving charges no volume: nothing was sent.
    assert_eq!(lease_of(&c, &Scope::Peer("b".into())).passed_packets, 0);

    // The scope opens: it receives; it closes again: nothing.
    let open = DesiredState {
        peers: Vec::new(),
        scopes: vec![
            egress(lease(7, 100_000_000, None, 0)),
            peer("b", &["198.18.0.2/32"], lease(9, 50_000_000, None, 0)),
            peer("c", &["198.18.0.3/32"], floor(8_000_000)),
        ],
    };
    let changes = n.reconcile(&mut dp, &open);
    assert!(
        changes.contains(&"ebpf: scope peer:c (slot 2): ingress policed at 1000000 B/s, burst 65536 B (was unset)".to_string()),
        "{changes:#?}"
    );
    assert_eq!(n.tb.send_to_node(PEER_C, 10, 300).packets, 10);
    n.reconcile(&mut dp, &three_scopes());
    assert_eq!(n.tb.send_to_node(PEER_C, 10, 300).packets, 0);
}

/// A node enforced by an egress-only build (no `nw_police`, `nw_istats` or ingress program
/// pinned, nothing on clsact ingress) is upgraded in place by the next agent: the new maps
/// are created, the ingress program loaded and attached, the policers written; the egress
/// counts continue.
#[test]
fn ebpf_upgrade_from_egress_only_pins() {
    let Some(n) = node() else { return };
    n.tb.static_neighbours();
    let desired = three_scopes();
    let mut old = n.datapath();
    n.reconcile(&mut old, &desired);
    n.tb.send_and_count(PEER_B, 6, 100);
    drop(old);
    // What the previous build left.
    n.tb.tc(&["filter", "del", "dev", DEV, "ingress", "pref", "1"]);
    for name in n.pinned().unwrap() {
        if name == "nw_police" || name == "nw_istats" || name.starts_with("nw_ingress_") {
            std::fs::remove_file(n.pin_dir.join(name)).unwrap();
        }
    }
    assert_eq!(n.tb.send_to_node(PEER_C, 3, 100).packets, 3, "not policed");

    let mut new = n.datapath();
    let changes = n.reconcile(&mut new, &desired);
    let short: Vec<&str> = changes
        .iter()
        .map(|c| c.split(", pinned at").next().unwrap_or(c))
        .collect();
    assert_eq!(
        short,
        [
            "ebpf: map nw_police created",
            "ebpf: map nw_istats created",
            "ebpf: program nw_ingress loaded",
            "ebpf: scope egress (slot 0): ingress policed at 12500000 B/s, burst 65536 B (was unset)",
            "ebpf: scope peer:b (slot 1): ingress policed at 6250000 B/s, burst 65536 B (was unset)",
            "ebpf: program nw_ingress attached to fab0 ingress (clsact, pref 1, handle 0x1)",
        ]
    );
    assert_eq!(n.pinned().unwrap().len(), 11);
    assert_eq!(n.tb.send_to_node(PEER_C, 3, 100).packets, 0, "blocked");
    assert_eq!(n.tb.send_to_node(PEER_B, 3, 100).packets, 3);
    let b = lease_of(&n.counters(&mut new), &Scope::Peer("b".into()));
    assert_eq!(b.passed_packets, 6, "{b:?}");
    assert_eq!(n.reconcile(&mut new, &desired), Vec::<String>::new());
}
