//! Privileged tests of the tc + nftables backend on the real kernel. Each test builds its own
//! pair of network namespaces (see `testbed`), runs the datapath in one of them and sends real
//! UDP packets across a veth pair. Without root they print "skipped" and pass.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod ebpf;
mod peers;
mod testbed;

use nicwarden_datapath::fake::fixtures::{egress, floor, lease, peer};
use nicwarden_datapath::{
    Datapath, DesiredState, LinuxDatapath, RealNft, RealTc, ScopeCounters, ScopeEnforce,
};
use nicwarden_lease::{LeaseId, Scope};
use std::time::{Duration, Instant};
use testbed::{testbed, CrashAfter, Testbed, DEV, OTHER, PEER_B, PEER_C};

/// Egress on lease 7, peer b (198.18.0.2) on lease 9 with a volume, peer c (198.18.0.3) blocked.
fn three_scopes(egress_rate: u64) -> DesiredState {
    DesiredState {
        peers: Vec::new(),
        scopes: vec![
            egress(lease(7, egress_rate, None, 0)),
            peer(
                "b",
                &["198.18.0.2/32"],
                lease(9, 50_000_000, Some(10_000_000), 0),
            ),
            peer("c", &["198.18.0.3/32"], floor(0)),
        ],
    }
}

fn scope<'a>(counters: &'a [ScopeCounters], s: &Scope) -> &'a ScopeCounters {
    counters.iter().find(|c| &c.scope == s).unwrap()
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    eprintln!("timing: {what}: {:?}", start.elapsed());
    out
}

#[test]
fn installs_the_layout_and_reapplying_changes_nothing() {
    let Some(tb) = testbed() else { return };
    let mut dp = tb.datapath();
    let desired = three_scopes(100_000_000);
    let changes = timed("first reconcile", || dp.reconcile(&desired).unwrap());
    assert_eq!(changes.len(), 14, "{changes:#?}");

    let qdiscs = tb.tc(&["-j", "qdisc", "show", "dev", DEV]);
    let q: serde_json::Value = serde_json::from_str(&qdiscs).unwrap();
    let mut shown: Vec<String> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            format!(
                "{} {} {}",
                q["kind"].as_str().unwrap(),
                q["handle"].as_str().unwrap(),
                q["options"]["limit"]
                    .as_u64()
                    .map(|l| format!("limit {l}"))
                    .or_else(|| q["options"]["default"]
                        .as_str()
                        .map(|d| format!("default {d}")))
                    .unwrap_or_default()
            )
        })
        .collect();
    shown.sort();
    assert_eq!(
        shown,
        [
            "htb 1: default 0x3",
            "pfifo 100: limit 1000",
            "pfifo 101: limit 0",
            "pfifo 10: limit 1000",
            "pfifo 2: limit 100",
            "pfifo 3: limit 0",
        ]
    );
    let classes = tb.tc(&["class", "show", "dev", DEV]);
    assert!(
        classes.contains("class htb 1:10 root leaf 10: prio 0 rate 100Mbit ceil 100Mbit"),
        "{classes}"
    );
    assert!(
        classes.contains("class htb 1:100 root leaf 100: prio 0 rate 50Mbit ceil 50Mbit"),
        "{classes}"
    );
    let filters = tb.tc(&["filter", "show", "dev", DEV]);
    assert!(
        filters.contains("match c6120002/ffffffff at 16"),
        "{filters}"
    );
    // Link probes (EtherType 0x88B5) go to the control class; tc shows the number.
    assert!(
        filters.contains("protocol [34997] pref 2 u32") && filters.contains("*flowid 1:2"),
        "{filters}"
    );
    let table = tb.nft(&["list", "table", "inet", "nicwarden"]).unwrap();
    assert!(table.contains("quota q9"), "{table}");
    assert!(
        table.contains("oifname \"fab0\" ip daddr 198.18.0.3 counter name \"b101\" drop"),
        "{table}"
    );

    assert_eq!(
        timed("no-op reconcile", || dp.reconcile(&desired).unwrap()),
        vec![]
    );
    // A restarted agent (no memory) finds nothing to do either.
    let mut restarted = tb.datapath();
    assert_eq!(
        timed("no-op reconcile, fresh process", || restarted
            .reconcile(&desired)
            .unwrap()),
        vec![]
    );
    let counters = timed("counters", || restarted.counters().unwrap());
    assert_eq!(counters.len(), 3);
}

#[test]
fn rate_change_touches_one_class_and_keeps_counters() {
    let Some(tb) = testbed() else { return };
    tb.static_neighbours();
    let mut dp = tb.datapath();
    dp.reconcile(&three_scopes(100_000_000)).unwrap();
    let got = tb.send_and_count(OTHER, 20, 500);
    assert_eq!(got.packets, 20, "{got:?}");
    let before = scope(&dp.counters().unwrap(), &Scope::Egress).clone();
    assert!(before.class.packets >= 20, "{before:?}");

    let changes = timed("rate change", || {
        dp.reconcile(&three_scopes(40_000_000)).unwrap()
    });
    let changes: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        changes,
        ["tc: class 1:10 (egress) rate 100000000 -> 40000000 bit/s"]
    );
    let classes = tb.tc(&["class", "show", "dev", DEV]);
    assert!(
        classes.contains("class htb 1:10 root leaf 10: prio 0 rate 40Mbit ceil 40Mbit"),
        "{classes}"
    );
    let after = scope(&dp.counters().unwrap(), &Scope::Egress).clone();
    assert!(
        after.class.packets >= before.class.packets,
        "{before:?} {after:?}"
    );
    assert!(after.lease.unwrap().used_bytes >= before.lease.unwrap().used_bytes);
}

#[test]
fn blocked_scope_drops_real_packets() {
    let Some(tb) = testbed() else { return };
    tb.static_neighbours();
    let mut dp = tb.datapath();
    dp.reconcile(&three_scopes(100_000_000)).unwrap();

    let blocked = tb.send_and_count(PEER_C, 50, 200);
    assert_eq!(blocked.packets, 0, "{blocked:?}");
    let open = tb.send_and_count(OTHER, 50, 200);
    assert_eq!(open.packets, 50, "{open:?}");
    let to_b = tb.send_and_count(PEER_B, 30, 200);
    assert_eq!(to_b.packets, 30, "{to_b:?}");

    let counters = dp.counters().unwrap();
    let c = scope(&counters, &Scope::Peer("c".into()));
    assert!(c.class.drops >= 50, "{c:?}");
    assert_eq!(c.lease, None);
    let b = scope(&counters, &Scope::Peer("b".into()));
    assert_eq!(b.lease.unwrap().passed_packets, 30, "{b:?}");
    assert_eq!(b.lease.unwrap().used_bytes, 30 * 228, "{b:?}"); // IP length: 200 + 8 + 20
    let e = scope(&counters, &Scope::Egress);
    assert_eq!(e.lease.unwrap().passed_packets, 50, "{e:?}");
    assert!(e.class.packets >= 50, "{e:?}");
}

#[test]
fn arp_passes_when_everything_is_blocked() {
    let Some(tb) = testbed() else { return };
    let mut dp = tb.datapath();
    dp.reconcile(&DesiredState {
        peers: Vec::new(),
        scopes: vec![egress(floor(0))],
    })
    .unwrap();
    let got = tb.send_and_count(OTHER, 3, 100);
    assert_eq!(got.packets, 0, "{got:?}");
    // IP is dropped before it could ask for a neighbour, so let the peer ask: the node's ARP
    // reply leaves through the control class and the peer resolves the node.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        testbed::sh(&[
            "ip",
            "netns",
            "exec",
            &tb.peer,
            "bash",
            "-c",
            "echo probe > /dev/udp/198.18.0.1/9",
        ]);
        let neigh = testbed::sh(&["ip", "-n", &tb.peer, "neigh", "show", "198.18.0.1"]);
        if neigh.contains("lladdr") {
            break;
        }
        assert!(Instant::now() < deadline, "ARP did not resolve: {neigh}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn volume_quota_passes_the_volume_then_drops() {
    let Some(tb) = testbed() else { return };
    tb.static_neighbours();
    let mut dp = tb.datapath();
    let volume = 20_000;
    let desired = |c: ScopeEnforce| DesiredState {
        peers: Vec::new(),
        scopes: vec![
            egress(lease(21, 100_000_000, Some(volume), 0)),
            peer("c", &["198.18.0.3/32"], c),
        ],
    };
    dp.reconcile(&desired(floor(0))).unwrap();
    // 1000-byte payloads: 1028 bytes of IP each, 19 fit in 20 000 bytes.
    let got = tb.send_and_count(OTHER, 100, 1000);
    assert_eq!(got.packets, 19, "{got:?}");
    assert_eq!(
        got.accepted_by_send, 19,
        "nft drops fail send_to with EPERM: {got:?}"
    );
    let e = scope(&dp.counters().unwrap(), &Scope::Egress)
        .lease
        .unwrap();
    assert_eq!(e.used_bytes, volume);
    assert!(e.exhausted);
    assert_eq!(e.passed_packets, 19);
    assert_eq!(e.volume_drops, 81);

    // Rewriting the table (peer c opens) keeps the lease exhausted.
    let changes = dp
        .reconcile(&desired(lease(22, 1_000_000, None, 0)))
        .unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c.0.starts_with("nft: quota q22 (peer:c) added")),
        "{changes:#?}"
    );
    let again = tb.send_and_count(OTHER, 10, 1000);
    assert_eq!(again.packets, 0, "{again:?}");
    let to_c = tb.send_and_count(PEER_C, 10, 1000);
    assert_eq!(to_c.packets, 10, "{to_c:?}");
    let counters = dp.counters().unwrap();
    let e = scope(&counters, &Scope::Egress).lease.unwrap();
    assert!(e.exhausted && e.used_bytes == volume, "{e:?}");
    assert_eq!(e.volume_drops, 91);

    // A fresh kernel (table gone) resumes from the controller's record.
    tb.nft(&["delete", "table", "inet", "nicwarden"]).unwrap();
    let resumed = DesiredState {
        peers: Vec::new(),
        scopes: vec![
            egress(lease(21, 100_000_000, Some(volume), 19_000)),
            peer("c", &["198.18.0.3/32"], lease(22, 1_000_000, None, 0)),
        ],
    };
    dp.reconcile(&resumed).unwrap();
    let last = tb.send_and_count(OTHER, 10, 1000);
    assert_eq!(last.packets, 0, "1000 bytes left, 1028 needed: {last:?}");
}

#[test]
fn shapes_to_the_lease_rate() {
    let Some(tb) = testbed() else { return };
    tb.static_neighbours();
    let mut dp = tb.datapath();
    let rate = 8_000_000; // 1 MB/s
    dp.reconcile(&DesiredState {
        peers: Vec::new(),
        scopes: vec![egress(lease(30, rate, None, 0))],
    })
    .unwrap();
    let rx = Testbed::socket(&tb.peer, OTHER, testbed::PORT);
    let tx = Testbed::socket(&tb.node, testbed::NODE_ADDR, 0);
    tx.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let window = Duration::from_millis(1500);
    let sender = std::thread::spawn(move || testbed::send(&tx, OTHER, 1_000_000, 1000, window));
    let got =
        testbed::Received::collect(&rx, Duration::from_millis(300), Duration::from_secs(4), 0);
    let sent = sender.join().unwrap();
    // On the wire each datagram is 1042 bytes (payload + UDP + IP + Ethernet).
    let expected = rate as f64 / 8.0 * window.as_secs_f64() * 1000.0 / 1042.0;
    let ratio = got.bytes as f64 / expected;
    eprintln!(
        "shaping: sent {sent} datagrams, received {} bytes, {ratio:.2} of the rate",
        got.bytes
    );
    // Unshaped, a veth carries hundreds of MB/s: being close to the rate proves the shaping.
    assert!(
        (0.7..1.3).contains(&ratio),
        "received {} bytes, expected about {expected:.0}",
        got.bytes
    );
}

#[test]
fn repairs_tampering_and_partial_updates() {
    let Some(tb) = testbed() else { return };
    let desired = three_scopes(100_000_000);

    // A crash after 6 of 16 commands of the first install.
    let mut crashing = LinuxDatapath::with_ops(
        DEV,
        Box::new(CrashAfter {
            inner: RealTc::in_netns(&tb.node),
            n: 6,
        }),
        Box::new(RealNft::in_netns(&tb.node)),
    );
    let err = crashing.reconcile(&desired).unwrap_err().to_string();
    assert!(err.contains("simulated crash after 6 of 16"), "{err}");

    let mut dp = tb.datapath();
    let changes = dp.reconcile(&desired).unwrap();
    assert!(!changes.is_empty());
    let reference = listing(&tb);
    assert_eq!(dp.reconcile(&desired).unwrap(), vec![]);

    // Behind our back: a filter and its class deleted, a leaf replaced, the nft table dropped.
    tb.tc(&["filter", "del", "dev", DEV, "parent", "1:", "pref", "100"]);
    tb.tc(&["class", "del", "dev", DEV, "classid", "1:100"]);
    tb.tc(&[
        "qdisc", "replace", "dev", DEV, "parent", "1:101", "handle", "77:", "pfifo", "limit",
        "5000",
    ]);
    tb.nft(&["delete", "table", "inet", "nicwarden"]).unwrap();
    let changes: Vec<String> = dp
        .reconcile(&desired)
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        changes,
        [
            "nft: table inet nicwarden created (2 quotas, 5 rules)",
            "nft: quota q9 (peer:b) added: over 10000000 bytes, used from 0",
            "nft: quota q7 (egress) added: over 4611686018427387904 bytes, used from 0",
            "tc: class 1:100 (peer:b) added: rate 50000000 bit/s, burst 65536 B, quantum 200000, leaf pfifo limit 1000",
            "tc: class 1:101 (peer:c) leaf pfifo 77: limit 5000 -> pfifo 101: limit 0",
            "tc: filter pref 100 ::1 (peer:b) ip match ip dst 198.18.0.2/32 -> 1:100 added",
        ]
    );
    assert_eq!(listing(&tb), reference);
    assert_eq!(dp.reconcile(&desired).unwrap(), vec![]);
}

/// Classes and qdiscs as tc prints them, sorted (the kernel lists classes in hash order).
fn listing(tb: &Testbed) -> Vec<String> {
    let classes = tb.tc(&["class", "show", "dev", DEV]);
    let qdiscs = tb.tc(&["qdisc", "show", "dev", DEV]);
    let mut lines: Vec<String> = classes
        .lines()
        .chain(qdiscs.lines())
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn remove_leaves_nothing() {
    let Some(tb) = testbed() else { return };
    let mut dp = tb.datapath();
    dp.reconcile(&three_scopes(100_000_000)).unwrap();
    timed("remove", || dp.remove().unwrap());
    let qdiscs = tb.tc(&["qdisc", "show", "dev", DEV]);
    assert!(qdiscs.starts_with("qdisc noqueue 0: root"), "{qdiscs}");
    assert_eq!(tb.tc(&["filter", "show", "dev", DEV]), "");
    assert_eq!(tb.nft(&["list", "table", "inet", "nicwarden"]), None);
    // Idempotent.
    dp.remove().unwrap();
}

#[test]
fn errors_name_the_failing_command() {
    use nicwarden_datapath::TcOps;
    let Some(tb) = testbed() else { return };
    let mut tc = RealTc::in_netns(&tb.node);
    let err = tc
        .batch(&[
            "qdisc replace dev fab0 root handle 1: htb default 3 direct_qlen 0".to_string(),
            "class del dev fab0 classid 1:99".to_string(),
            "qdisc del dev fab0 root".to_string(),
        ])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "apply tc batch (command 2 of 3: `class del dev fab0 classid 1:99`; the ones before it applied): "
        ),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
    // The command after the failing one did not run: the root is still there.
    assert!(tb
        .tc(&["qdisc", "show", "dev", DEV])
        .starts_with("qdisc htb 1: root"));

    let mut missing = LinuxDatapath::in_netns(&tb.node, "fab9");
    let err = missing
        .reconcile(&three_scopes(1_000_000))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Cannot find device \"fab9\""), "{err}");
    assert!(err.starts_with("list tc qdiscs of fab9: "), "{err}");
}

/// Rates the kernel rounds (bytes/s, display units) and bursts at both ends of the range are
/// accepted, and a fresh process comparing the kernel's text finds nothing to change.
#[test]
fn extreme_parameters_are_accepted_and_stable() {
    let Some(tb) = testbed() else { return };
    #[track_caller]
    fn check(tb: &Testbed, desired: DesiredState) {
        let mut dp = tb.datapath();
        dp.reconcile(&desired).unwrap();
        let mut fresh = tb.datapath();
        assert_eq!(fresh.reconcile(&desired).unwrap(), vec![], "{desired:?}");
    }
    let with_burst = |id: u64, rate: u64, burst: u64, volume: Option<u64>| ScopeEnforce::Lease {
        lease: LeaseId(id),
        rate_bps: rate,
        burst_bytes: burst,
        volume,
        start_used_bytes: 0,
    };
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(with_burst(1, 8, 0, Some(0)))],
        },
    );
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(with_burst(2, 999_999, 1, None))],
        },
    );
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(with_burst(3, 123_456_789, 10_000_000, None))],
        },
    );
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(with_burst(4, 4_000_000_000_000, 0, None))],
        },
    );
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(floor(1_000))],
        },
    );
    check(
        &tb,
        DesiredState {
            peers: Vec::new(),
            scopes: vec![egress(floor(8))],
        },
    );
}
