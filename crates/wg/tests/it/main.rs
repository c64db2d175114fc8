//! Integration tests of nicwarden-wg on a real kernel: two testbed nodes run a gotatun
//! device each, in their own namespaces; traffic between their overlay addresses is
//! checked on the wire (fabric captures), across peer removal and key rotation.
//! Privileged tests need root; without it they print "skipped: needs root" and pass.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod errors;
mod tunnel;

use nicwarden_testbed::{Netns, Node, Testbed, TestbedSpec};
use nicwarden_wg::{DeviceConfig, GotatunBackend, PeerConfig, StaticKey, WgBackend};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Returns from the test (passing) when not privileged.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nicwarden_testbed::has_privileges() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
            return;
        }
    };
}

pub const WG_PORT: u16 = 51820;
pub const IFACE: &str = "nwmesh0";
/// The UDP port the overlay sink listens on.
pub const SINK_PORT: u16 = 7000;

pub fn testbed(nodes: usize) -> Testbed {
    Testbed::create(TestbedSpec {
        nodes,
        fabric_mtu: 1500,
    })
    .unwrap()
}

pub fn overlay_ip(node: &Node) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 128, u8::try_from(node.index).unwrap())
}

pub fn device_config(node: &Node) -> DeviceConfig {
    DeviceConfig {
        iface: IFACE.to_string(),
        address: format!("{}/24", overlay_ip(node)).parse().unwrap(),
        listen: SocketAddr::from((node.fabric_ip, WG_PORT)),
        mtu: 1420,
    }
}

/// A tokio runtime whose worker threads live in `ns` (threads inherit the namespace of the
/// thread that spawns them).
pub fn runtime_in(ns: &Netns) -> tokio::runtime::Runtime {
    ns.run(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    })
    .unwrap()
    .unwrap()
}

/// One node's WireGuard device and the runtime that drives it.
pub struct WgNode {
    pub node: Node,
    pub rt: tokio::runtime::Runtime,
    pub wg: GotatunBackend,
}

impl WgNode {
    pub fn start(node: &Node, key: &StaticKey) -> WgNode {
        let rt = runtime_in(&node.netns);
        let cfg = device_config(node);
        let wg = node
            .netns
            .run(|| rt.block_on(GotatunBackend::start(&cfg, key)))
            .unwrap()
            .unwrap();
        WgNode {
            node: node.clone(),
            rt,
            wg,
        }
    }

    /// Runs `f` to completion on this node's runtime, on a thread inside its namespace.
    pub fn call<R: Send>(&self, f: impl Future<Output = R> + Send) -> R {
        self.node.netns.run(|| self.rt.block_on(f)).unwrap()
    }

    /// A peer entry for this node, as other nodes configure it.
    pub fn as_peer(&self, public_key: [u8; 32]) -> PeerConfig {
        PeerConfig {
            public_key,
            endpoint: SocketAddr::from((self.node.fabric_ip, WG_PORT)),
            allowed_ips: vec![format!("{}/32", overlay_ip(&self.node)).parse().unwrap()],
            keepalive_secs: None,
        }
    }

    pub fn upsert(&self, peer: &PeerConfig) {
        self.call(self.wg.upsert_peer(peer)).unwrap();
    }
}

/// A UDP socket of `ns` bound to `addr` (created inside the namespace).
pub fn udp_socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let sock = ns.run(|| UdpSocket::bind(addr)).unwrap().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    sock
}

/// Sends `marker` from `tx` to `dst` every 100 ms (at most `timeout` / 100 ms datagrams)
/// until `rx` receives a datagram carrying it; returns how long that took, or `None` if
/// nothing arrived within `timeout`.
pub fn send_until_received(
    tx: &UdpSocket,
    dst: SocketAddr,
    rx: &UdpSocket,
    marker: &[u8],
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let max_sends = timeout.as_millis() / 100 + 1;
    let mut buf = [0u8; 2048];
    for _ in 0..max_sends {
        if start.elapsed() >= timeout {
            break;
        }
        tx.send_to(marker, dst).unwrap();
        let round = Instant::now();
        while round.elapsed() < Duration::from_millis(100) {
            match rx.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == marker => return Some(start.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("receive on overlay sink: {e}"),
            }
        }
    }
    None
}
