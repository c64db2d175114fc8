//! Per-peer byte counters on real packets, in a cluster of the shared testbed
//! (`nicwarden-testbed`: two nodes on a switch, fabric `fab0` each): the eBPF datapath on both
//! nodes, each counting the other as a peer, and the testbed's UDP traffic generator between
//! them. What one node counts as sent to the other must be what the other counts as received
//! from it plus what it dropped from it, to the byte.

use nicwarden_datapath::fake::fixtures::{counted, egress, floor, lease};
use nicwarden_datapath::{Datapath, DesiredState, EbpfDatapath, PeerCounters, ScopeEnforce};
use nicwarden_testbed::traffic::{self, Proto, Report, SendSpec, Sink, SinkSpec};
use nicwarden_testbed::{Node, Testbed, TestbedSpec, FABRIC_IFACE};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The testbed and a pin directory per node, removed at the end (also on panic).
struct Cluster {
    tb: Testbed,
    pins: Vec<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `None` (after saying so) when this process cannot run privileged eBPF tests.
fn cluster() -> Option<Cluster> {
    if !nicwarden_testbed::has_privileges() {
        eprintln!("skipped: needs root (network namespaces)");
        return None;
    }
    if let Err(e) = EbpfDatapath::check_available() {
        eprintln!("skipped: needs root (bpf, netns, tc): {e}");
        return None;
    }
    let tb = Testbed::create(TestbedSpec {
        nodes: 2,
        ..TestbedSpec::default()
    })
    .expect("create testbed");
    let pins = tb
        .nodes()
        .iter()
        .map(|n| Path::new("/sys/fs/bpf/nicwarden-test").join(n.netns.name()))
        .collect();
    Some(Cluster { tb, pins })
}

impl Cluster {
    fn node(&self, i: usize) -> &Node {
        &self.tb.nodes()[i]
    }

    fn datapath(&self, i: usize) -> EbpfDatapath {
        EbpfDatapath::in_netns(self.node(i).netns.name(), FABRIC_IFACE, &self.pins[i])
    }

    /// Node `i`'s desired state: one egress scope enforced as `enforce`, the other node
    /// counted as a peer.
    fn desired(&self, i: usize, enforce: ScopeEnforce) -> DesiredState {
        let other = self.node(1 - i);
        let addr = format!("{}/32", other.fabric_ip);
        DesiredState {
            scopes: vec![egress(enforce)],
            peers: vec![counted(&other.name, &[addr.as_str()])],
        }
    }

    /// Sends `bytes` of UDP payload from node 0 to node 1 with the testbed's generator, at
    /// 100 Mbit/s (well below the leases: nothing queues or is policed on the way); with a
    /// sink on node 1 when `sink` is set. Returns the sender's report.
    fn send(&self, bytes: u64, sink: bool) -> Report {
        let dst = SocketAddr::V4(SocketAddrV4::new(self.node(1).fabric_ip, 9100));
        let sink = sink.then(|| {
            let spec = SinkSpec {
                duration: Duration::from_secs(10),
                idle_timeout: Duration::from_millis(500),
                ..SinkSpec::new(Proto::Udp, dst)
            };
            let sink = self
                .node(1)
                .netns
                .run(|| Sink::bind(spec))
                .expect("enter node 2")
                .expect("bind sink");
            std::thread::spawn(move || sink.run())
        });
        let spec = SendSpec {
            duration: Duration::from_secs(10),
            max_bytes: Some(bytes),
            rate_bps: Some(100_000_000),
            ..SendSpec::new(Proto::Udp, dst)
        };
        let report = self
            .node(0)
            .netns
            .run(|| traffic::send(&spec))
            .expect("enter node 1")
            .expect("send");
        if let Some(sink) = sink {
            let got = sink.join().expect("sink thread").expect("sink");
            eprintln!("sink: {} B in {} datagrams", got.bytes, got.packets);
        } else {
            // Let the last datagrams reach the other node's ingress hook.
            std::thread::sleep(Duration::from_millis(200));
        }
        report
    }
}

/// The counters `dp` keeps for peer `peer`.
#[track_caller]
fn peer_of(dp: &mut EbpfDatapath, peer: &str) -> PeerCounters {
    let all = dp.peer_counters().expect("peer counters");
    match all.into_iter().find(|p| p.node == peer) {
        Some(p) => p,
        None => panic!("no counters for peer {peer}"),
    }
}

#[test]
fn peer_counters_conserve_bytes_between_two_nodes() {
    let Some(c) = cluster() else { return };
    let (name0, name1) = (c.node(0).name.clone(), c.node(1).name.clone());
    let mut dp = [c.datapath(0), c.datapath(1)];
    for (i, d) in dp.iter_mut().enumerate() {
        // An egress lease only: one scope slot for every peer, counted per peer all the same.
        let desired = c.desired(i, lease(10 + i as u64, 1_000_000_000, None, 0));
        d.reconcile(&desired).expect("reconcile");
    }

    const N: u64 = 3_000_000;
    let sent = c.send(N, true);
    assert_eq!(sent.bytes, N, "{sent:?}");
    let tx = peer_of(&mut dp[0], &name1);
    let rx = peer_of(&mut dp[1], &name0);
    eprintln!("node 1 -> node 2: {tx:?}\nnode 2 <- node 1: {rx:?}");
    // Same IP packets on both ends of the fabric: exactly the same bytes.
    assert_eq!(
        tx.tx_bytes,
        rx.rx_bytes + rx.rx_dropped_bytes,
        "{tx:?} {rx:?}"
    );
    assert_eq!(tx.tx_packets, rx.rx_packets + rx.rx_dropped_packets);
    assert_eq!(rx.rx_dropped_bytes, 0, "nothing policed: {rx:?}");
    // IP bytes: the payload plus a UDP and an IPv4 header per datagram.
    assert!(tx.tx_bytes >= N + 28 * sent.packets, "{tx:?} {sent:?}");
    assert!(rx.rx_bytes >= N, "{rx:?}");

    // The receiver blocked (its lease gone): all of it is dropped there and counted so.
    dp[1]
        .reconcile(&c.desired(1, floor(0)))
        .expect("reconcile blocked");
    const M: u64 = 500_000;
    let sent = c.send(M, false);
    assert_eq!(sent.bytes, M, "{sent:?}");
    let tx2 = peer_of(&mut dp[0], &name1);
    let rx2 = peer_of(&mut dp[1], &name0);
    eprintln!("blocked: node 1 -> node 2: {tx2:?}\nnode 2 <- node 1: {rx2:?}");
    let sent_bytes = tx2.tx_bytes - tx.tx_bytes;
    assert!(sent_bytes >= M, "{tx:?} {tx2:?}");
    assert_eq!(rx2.rx_bytes, rx.rx_bytes, "nothing admitted while blocked");
    assert_eq!(rx2.rx_dropped_bytes - rx.rx_dropped_bytes, sent_bytes);
    assert_eq!(
        rx2.rx_dropped_packets - rx.rx_dropped_packets,
        tx2.tx_packets - tx.tx_packets
    );
    // And the books still balance in total.
    assert_eq!(tx2.tx_bytes, rx2.rx_bytes + rx2.rx_dropped_bytes);

    // A restarted agent on node 2 continues the counters.
    let mut restarted = c.datapath(1);
    let changes = restarted
        .reconcile(&c.desired(1, floor(0)))
        .expect("reconcile restarted");
    assert_eq!(changes, []);
    assert_eq!(peer_of(&mut restarted, &name0), rx2);
}
