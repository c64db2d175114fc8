//! A throwaway two-namespace network per test: namespace `node` holds `fab0`, the fabric
//! interface under test; namespace `peer` holds the other end `peer0` with three addresses, so
//! traffic really leaves `fab0`. Addresses from 198.18.0.0/15 (benchmarking range) only.
//! The namespaces are deleted when the [`Testbed`] is dropped, also on panic.

use nicwarden_datapath::{DatapathError, LinuxDatapath};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const DEV: &str = "fab0";
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Peer addresses: .2 and .3 are used as peer-scope destinations, .4 is plain egress.
pub const PEER_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const PEER_C: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
pub const PORT: u16 = 9000;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Returns `None` (after saying so) when this process cannot run privileged tests.
pub fn testbed() -> Option<Testbed> {
    if let Err(e) = LinuxDatapath::check_available() {
        eprintln!("skipped: needs root (netns, tc, nft): {e}");
        return None;
    }
    Some(Testbed::new())
}

pub struct Testbed {
    pub node: String,
    pub peer: String,
}

#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Testbed {
    fn new() -> Testbed {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("nwdp-{}-{n}", std::process::id());
        let tb = Testbed {
            node: format!("{base}-n"),
            peer: format!("{base}-p"),
        };
        for ns in [&tb.node, &tb.peer] {
            sh(&["ip", "netns", "add", ns]);
            // No IPv6: its link-local chatter would count against the egress quota.
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", DEV, "netns", &tb.node, "type", "veth", "peer", "name", "peer0",
            "netns", &tb.peer,
        ]);
        sh(&[
            "ip",
            "-n",
            &tb.node,
            "addr",
            "add",
            "198.18.0.1/24",
            "dev",
            DEV,
        ]);
        for a in [PEER_B, PEER_C, OTHER] {
            sh(&[
                "ip",
                "-n",
                &tb.peer,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "peer0",
            ]);
        }
        sh(&["ip", "-n", &tb.node, "link", "set", DEV, "up"]);
        sh(&["ip", "-n", &tb.peer, "link", "set", "peer0", "up"]);
        tb
    }

    pub fn datapath(&self) -> LinuxDatapath {
        LinuxDatapath::in_netns(&self.node, DEV)
    }

    /// Static neighbour entries on both sides, so data-path tests do not depend on ARP
    /// timing.
    pub fn static_neighbours(&self) {
        let mac_of = |ns: &str, dev: &str| {
            let link = sh(&["ip", "-n", ns, "-j", "link", "show", "dev", dev]);
            let v: serde_json::Value = serde_json::from_str(&link).expect("ip link JSON");
            v[0]["address"].as_str().expect("mac").to_string()
        };
        let node_mac = mac_of(&self.node, DEV);
        sh(&[
            "ip",
            "-n",
            &self.peer,
            "neigh",
            "replace",
            &NODE_ADDR.to_string(),
            "lladdr",
            &node_mac,
            "dev",
            "peer0",
            "nud",
            "permanent",
        ]);
        let mac = mac_of(&self.peer, "peer0");
        for a in [PEER_B, PEER_C, OTHER] {
            sh(&[
                "ip",
                "-n",
                &self.node,
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                &mac,
                "dev",
                DEV,
                "nud",
                "permanent",
            ]);
        }
    }

    /// `tc` inside the node namespace.
    pub fn tc(&self, args: &[&str]) -> String {
        let mut full = vec!["tc", "-n", &self.node];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `nft` inside the node namespace; `None` if it fails (e.g. no such table).
    pub fn nft(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, "nft"])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A UDP socket bound to `addr:port` inside namespace `ns` (a socket stays in the
    /// namespace it was created in, whichever thread uses it later).
    pub fn socket(ns: &str, addr: Ipv4Addr, port: u16) -> UdpSocket {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            UdpSocket::bind(SocketAddrV4::new(addr, port)).expect("bind")
        })
        .join()
        .expect("socket thread")
    }

    /// Sends `count` datagrams of `size` bytes from the node to `dst`, at most for `limit`;
    /// then counts what arrived (waiting up to `settle` for stragglers).
    pub fn send_and_count(&self, dst: Ipv4Addr, count: usize, size: usize) -> Received {
        let rx = Self::socket(&self.peer, dst, PORT);
        let tx = Self::socket(&self.node, NODE_ADDR, 0);
        let sent = send(&tx, dst, count, size, Duration::from_secs(5));
        Received::collect(
            &rx,
            Duration::from_millis(300),
            Duration::from_secs(3),
            sent,
        )
    }

    /// Sends `count` datagrams of `size` bytes from the peer's address `from` to the node
    /// (a socket on the node receives them, so the node answers nothing); then counts what
    /// arrived (waiting up to 300 ms for stragglers).
    pub fn send_to_node(&self, from: Ipv4Addr, count: usize, size: usize) -> Received {
        let rx = Self::socket(&self.node, NODE_ADDR, PORT);
        let tx = Self::socket(&self.peer, from, 0);
        let sent = send(&tx, NODE_ADDR, count, size, Duration::from_secs(5));
        Received::collect(
            &rx,
            Duration::from_millis(300),
            Duration::from_secs(3),
            sent,
        )
    }
}

/// Sends up to `count` datagrams, stopping after `limit`; returns how many `send_to` accepted
/// (a netfilter drop makes `send_to` fail with EPERM; a qdisc drop is silent).
pub fn send(tx: &UdpSocket, dst: Ipv4Addr, count: usize, size: usize, limit: Duration) -> usize {
    let buf = vec![0x5au8; size];
    let start = Instant::now();
    let mut ok = 0;
    for _ in 0..count {
        if start.elapsed() > limit {
            break;
        }
        if tx.send_to(&buf, SocketAddrV4::new(dst, PORT)).is_ok() {
            ok += 1;
        }
    }
    ok
}

#[derive(Debug)]
pub struct Received {
    pub accepted_by_send: usize,
    pub packets: usize,
    pub bytes: usize,
}

impl Received {
    /// Reads until nothing arrived for `idle`, or `limit` passed.
    pub fn collect(rx: &UdpSocket, idle: Duration, limit: Duration, sent: usize) -> Received {
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let start = Instant::now();
        let mut last = Instant::now();
        let mut buf = [0u8; 65536];
        let (mut packets, mut bytes) = (0, 0);
        while start.elapsed() < limit && last.elapsed() < idle {
            if let Ok(n) = rx.recv(&mut buf) {
                packets += 1;
                bytes += n;
                last = Instant::now();
            }
        }
        Received {
            accepted_by_send: sent,
            packets,
            bytes,
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in [&self.node, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A TcOps that applies only the first `n` commands of the next batch and then fails, like a
/// crash in the middle of an update.
pub struct CrashAfter {
    pub inner: nicwarden_datapath::RealTc,
    pub n: usize,
}

impl nicwarden_datapath::TcOps for CrashAfter {
    fn qdiscs_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.inner.qdiscs_json(dev)
    }
    fn filters_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.inner.filters_json(dev)
    }
    fn classes_text(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.inner.classes_text(dev)
    }
    fn batch(&mut self, cmds: &[String]) -> Result<(), DatapathError> {
        self.inner.batch(&cmds[..self.n.min(cmds.len())])?;
        Err(DatapathError::Unavailable(format!(
            "simulated crash after {} of {} commands",
            self.n,
            cmds.len()
        )))
    }
}
