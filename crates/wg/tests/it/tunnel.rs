//! Two nodes, one tunnel: encrypted on the fabric, cut by peer removal, restored after key
//! rotation, gone after shutdown.

use crate::{
    overlay_ip, require_root, send_until_received, testbed, udp_socket, WgNode, IFACE, SINK_PORT,
    WG_PORT,
};
use nicwarden_testbed::capture::{Capture, CaptureLimit};
use nicwarden_wg::{StaticKey, WgBackend, WgError};
use std::net::SocketAddr;
use std::time::Duration;

const MARKER: &[u8] = b"NICWARDEN-PLAINTEXT-MARKER";
const LIMIT: CaptureLimit = CaptureLimit {
    max_packets: 2_000,
    max_bytes: 4 << 20,
};
/// Bound on a delivery that should work (first handshake included).
const DELIVERY: Duration = Duration::from_secs(5);
/// How long a delivery that must not work is tried.
const BLOCKED: Duration = Duration::from_millis(1500);

fn marker(step: &str) -> Vec<u8> {
    [MARKER, b"-", step.as_bytes()].concat()
}

#[test]
fn tunnel_encrypts_is_cut_by_removal_and_restored_by_rotation() {
    require_root!();
    let tb = testbed(2);
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    let k1 = StaticKey::generate();
    let k2 = StaticKey::generate();
    let w1 = WgNode::start(n1, &k1);
    let w2 = WgNode::start(n2, &k2);
    assert_eq!(w1.wg.name(), "gotatun");

    // The TUN exists in the node's namespace only, addressed and up, with the MTU asked for.
    let link = n1.netns.ip(&["-o", "addr", "show", "dev", IFACE]).unwrap();
    assert!(link.contains("198.18.128.1/24"), "{link}");
    let link = n1.netns.ip(&["-o", "link", "show", "dev", IFACE]).unwrap();
    assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");
    // The UDP socket is bound to the fabric address, not to the wildcard.
    let socks = n1
        .netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/udp"))
        .unwrap()
        .unwrap();
    // 198.18.0.1:51820 in /proc/net/udp's little-endian hex.
    assert!(socks.contains("010012C6:CA6C"), "{socks}");

    w1.upsert(&w2.as_peer(k2.public()));
    w2.upsert(&w1.as_peer(k1.public()));

    let sink = udp_socket(&n2.netns, SocketAddr::from((overlay_ip(n2), SINK_PORT)));
    let tx = udp_socket(&n1.netns, SocketAddr::from(([0, 0, 0, 0], 0)));
    let dst = sink.local_addr().unwrap();

    // 1. Delivered, and on the fabric only as WireGuard: the marker is on the TUN, not on fab0.
    let fabric = Capture::start(&n1.netns, &n1.fabric_iface, LIMIT).unwrap();
    let tun = Capture::start(&n1.netns, IFACE, LIMIT).unwrap();
    let m1 = marker("1");
    let took = send_until_received(&tx, dst, &sink, &m1, DELIVERY);
    let (fabric, tun) = (fabric.stop(), tun.stop());
    eprintln!("first delivery (with handshake) after {took:?}");
    assert!(
        took.is_some(),
        "node2 did not receive the marker over the tunnel"
    );
    assert!(
        !fabric.limit_reached && fabric.error.is_none(),
        "{fabric:?}"
    );
    assert!(
        fabric.count_udp_port(WG_PORT) >= 3,
        "handshake + data on fab0: {} frames",
        fabric.len()
    );
    assert!(
        !fabric.contains(MARKER),
        "plaintext marker seen on the fabric"
    );
    assert!(
        tun.contains(&m1),
        "capture sanity: the marker is on the TUN in clear"
    );
    let p1 = w1.call(w1.wg.peers()).unwrap();
    assert_eq!(p1.len(), 1);
    assert_eq!(p1[0].public_key, k2.public());
    assert_eq!(
        p1[0].endpoint,
        Some(SocketAddr::from((n2.fabric_ip, WG_PORT)))
    );
    assert!(
        p1[0].last_handshake.is_some() && p1[0].tx_bytes > 0,
        "{p1:?}"
    );

    // 2. Node 2 removes node 1: node 1 still holds its session and keeps sending (the packets
    //    reach node 2's fabric), but node 2 no longer knows the session and drops them.
    assert!(w2.call(w2.wg.remove_peer(&k1.public())).unwrap());
    assert!(!w2.call(w2.wg.remove_peer(&k1.public())).unwrap());
    assert!(w2.call(w2.wg.peers()).unwrap().is_empty());
    let fabric2 = Capture::start(&n2.netns, &n2.fabric_iface, LIMIT).unwrap();
    let m2 = marker("2-after-remove");
    let took = send_until_received(&tx, dst, &sink, &m2, BLOCKED);
    let fabric2 = fabric2.stop();
    assert_eq!(took, None, "traffic arrived from a removed peer");
    assert!(
        fabric2.count_udp_port(WG_PORT) > 0,
        "node 1 stopped sending: {fabric2:?}"
    );
    assert!(!fabric2.contains(MARKER));
    let p1 = w1.call(w1.wg.peers()).unwrap();
    assert!(
        p1[0].last_handshake.is_some(),
        "node 1 still has its session: {p1:?}"
    );

    // 3. Node 1 rotates its key; node 2 learns the new public key: traffic flows again (node 1
    //    kept its peer; the rotation dropped its sessions, so the next packet starts a
    //    handshake with the new key).
    let k1b = StaticKey::generate();
    w1.call(w1.wg.set_key(&k1b)).unwrap();
    let p1 = w1.call(w1.wg.peers()).unwrap();
    assert_eq!(p1.len(), 1, "peers kept across rotation");
    w2.upsert(&w1.as_peer(k1b.public()));
    let fabric = Capture::start(&n1.netns, &n1.fabric_iface, LIMIT).unwrap();
    let m3 = marker("3-after-rotation");
    let took = send_until_received(&tx, dst, &sink, &m3, DELIVERY);
    let fabric = fabric.stop();
    eprintln!("delivery after rotation after {took:?}");
    assert!(took.is_some(), "no traffic after key rotation");
    assert!(
        took.unwrap() < Duration::from_secs(1),
        "handshake after rotation was not immediate: {took:?}"
    );
    assert!(!fabric.contains(MARKER));
    let p2 = w2.call(w2.wg.peers()).unwrap();
    assert_eq!(p2.len(), 1);
    assert_eq!(p2[0].public_key, k1b.public());
    assert!(
        p2[0].last_handshake.is_some() && p2[0].rx_bytes > 0,
        "{p2:?}"
    );

    // The old key is not accepted any more: a device still using it gets nowhere. (Node 2 no
    // longer has the old public key as a peer.)
    assert!(!w2.call(w2.wg.remove_peer(&k1.public())).unwrap());

    // 4. Shutdown: peers, sessions and key dropped, the TUN removed; later calls fail.
    w1.call(w1.wg.shutdown()).unwrap();
    let gone = n1.netns.ip(&["-o", "link", "show", "dev", IFACE]);
    assert!(gone.is_err(), "TUN still present: {gone:?}");
    assert!(matches!(
        w1.call(w1.wg.peers()),
        Err(WgError::ShutDown { .. })
    ));
    let err = w1
        .call(w1.wg.upsert_peer(&w2.as_peer(k2.public())))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("WireGuard device {IFACE} is shut down")
    );
    w1.call(w1.wg.shutdown()).unwrap(); // idempotent
    let m4 = marker("4-after-shutdown");
    let back = udp_socket(&n1.netns, SocketAddr::from(([0, 0, 0, 0], SINK_PORT)));
    let tx2 = udp_socket(&n2.netns, SocketAddr::from(([0, 0, 0, 0], 0)));
    let to_n1 = SocketAddr::from((overlay_ip(n1), SINK_PORT));
    assert_eq!(send_until_received(&tx2, to_n1, &back, &m4, BLOCKED), None);

    // The device is reusable after shutdown: the same name and port start again. Node 2
    // still holds a session with the old instance and would keep using it (until its own
    // rekey timers run out, ~15 s), so the restarted side initiates a handshake.
    let w1b = WgNode::start(n1, &k1b);
    w1b.upsert(&w2.as_peer(k2.public()));
    w1b.call(w1b.wg.wait_handshake(&k2.public(), Duration::from_secs(5)))
        .unwrap();
    drop(back);
    let back = udp_socket(&n1.netns, SocketAddr::from((overlay_ip(n1), SINK_PORT)));
    let m5 = marker("5-restarted");
    assert!(send_until_received(&tx2, to_n1, &back, &m5, DELIVERY).is_some());
    w1b.call(w1b.wg.shutdown()).unwrap();
    w2.call(w2.wg.shutdown()).unwrap();
    assert!(n2.netns.ip(&["-o", "link", "show", "dev", IFACE]).is_err());
    tb.teardown().unwrap();
}
