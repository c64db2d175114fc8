//! Privileged end-to-end tests of the encrypted mesh and the tamper response: real agents
//! (datapath `ebpf`, userspace WireGuard over TUN) in a namespaced testbed, real packets,
//! a capture on the fabric veth.

use crate::enforce::{node, Flow};
use nicwarden_lab::{Lab, MESH_PORT};
use nicwarden_testbed::capture::{Capture, CaptureLimit};
use nicwarden_testbed::traffic::{Proto, SendSpec, Stop};
use nicwarden_testbed::Node;
use serde_json::json;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"NICWARDEN-PLAINTEXT-MARKER-7f3a";

/// A testbed of `nodes` with the controller and mesh-enabled agents (`ebpf`), `body` run in
/// the management namespace; everything removed afterwards, also on panic.
fn with_mesh_lab<F, Fut>(nodes: usize, body: F)
where
    F: FnOnce(Lab) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    with_mesh_lab_opts(nodes, false, body)
}

/// [`with_mesh_lab`], the agents with `--mesh-encrypted-only` if `encrypted_only`.
fn with_mesh_lab_opts<F, Fut>(nodes: usize, encrypted_only: bool, body: F)
where
    F: FnOnce(Lab) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    crate::harness::with_privileged_lab(
        nodes,
        move |mut spec| {
            spec.backend = "ebpf".into();
            spec.mesh = true;
            spec.mesh_encrypted_only = encrypted_only;
            spec
        },
        body,
    )
}

async fn grant(lab: &Lab, node: &str, rate_bps: u64) -> u64 {
    let v = lab
        .grant(json!({"node": node, "rate_bps": rate_bps}))
        .await
        .expect("grant");
    let id = v["id"].as_u64().expect("lease id");
    wait_active(lab, node, id).await;
    id
}

fn peer_names(s: &nicwarden_agent::status::AgentStatus) -> Vec<String> {
    s.mesh
        .as_ref()
        .map(|m| m.peers.iter().map(|p| p.node.clone()).collect())
        .unwrap_or_default()
}

/// Waits until `node`'s installed peers are exactly `want`.
async fn wait_peers(lab: &Lab, node: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    if let Err(e) = lab
        .wait_status(
            node,
            &format!("mesh peers {want:?}"),
            Duration::from_secs(20),
            |s| peer_names(s) == want,
        )
        .await
    {
        let now = lab.status(node).await.map(|s| peer_names(&s));
        panic!("{e}; peers now {now:?}\n{}", lab.log_tail(node, 30));
    }
}

/// Grants each of `nodes` a 1 Gbit/s lease and waits until each holds all the others as
/// peers (a full mesh).
async fn full_mesh(lab: &Lab, nodes: &[&str]) {
    for n in nodes {
        grant(lab, n, 1_000_000_000).await;
    }
    for n in nodes {
        let others: Vec<&str> = nodes.iter().copied().filter(|o| o != n).collect();
        wait_peers(lab, n, &others).await;
    }
}

/// Sends datagrams carrying [`MARKER`] from `from` to `ip:port` (a socket bound on `to`),
/// one every 10 ms, until `want` arrived or `wait` passed; returns how many arrived. (A
/// tunnel's first packets wait for its handshake, which a lost first attempt delays by the
/// 5-second retry; the wait covers that.)
fn udp_marker(
    from: &Node,
    to: &Node,
    ip: Ipv4Addr,
    port: u16,
    want: usize,
    wait: Duration,
) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let rx = to
        .netns
        .run(move || UdpSocket::bind((ip, port)))
        .expect("enter the receiver's namespace")
        .expect("bind the receiver");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let got = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + wait;
    let g = got.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while g.load(Ordering::SeqCst) < want && Instant::now() < end {
            if let Ok(n) = rx.recv(&mut buf) {
                if &buf[..n] == MARKER {
                    g.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    let g = got.clone();
    from.netns
        .run(move || -> std::io::Result<()> {
            let tx = UdpSocket::bind("0.0.0.0:0")?;
            while g.load(Ordering::SeqCst) < want && Instant::now() < end {
                let _ = tx.send_to(MARKER, (ip, port));
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
        .expect("enter the sender's namespace")
        .expect("send");
    receiver.join().expect("receiver thread");
    got.load(Ordering::SeqCst)
}

/// Waits until `node`'s egress lease `id` is active in its datapath.
async fn wait_active(lab: &Lab, node: &str, id: u64) {
    lab.wait_status(
        node,
        "the lease active in its datapath",
        Duration::from_secs(10),
        |s| {
            nicwarden_lab::scope(s, "egress").is_some_and(|d| d.lease.map(|l| l.0) == Some(id))
                && s.datapath.as_ref().is_some_and(|d| d.last_error.is_none())
        },
    )
    .await
    .expect("lease active");
}

#[test]
fn mesh_encrypts_enforces_and_follows_leases() {
    with_mesh_lab(3, |lab| async move {
        let (n1, n2, n3) = (
            node(&lab, "node1"),
            node(&lab, "node2"),
            node(&lab, "node3"),
        );
        let (m1, m2) = (
            lab.mesh_ip("node1").expect("mesh ip"),
            lab.mesh_ip("node2").expect("mesh ip"),
        );
        // node3 is in another pod: a valid certificate, a lease, but no tunnel to pod `default`.
        lab.call_ok(
            "PUT",
            "/v1/quota/pod-b",
            Some(json!({"capacity_bps": 10_000_000_000u64})),
            200,
        )
        .await
        .expect("create group pod-b");
        lab.call_ok(
            "PUT",
            "/v1/quota/node3",
            Some(json!({"capacity_bps": 10_000_000_000u64, "group": "pod-b"})),
            200,
        )
        .await
        .expect("move node3 to pod-b");
        let l1 = grant(&lab, "node1", 1_000_000_000).await;
        let l2 = grant(&lab, "node2", 1_000_000_000).await;
        grant(&lab, "node3", 1_000_000_000).await;
        wait_peers(&lab, "node1", &["node2"]).await;
        wait_peers(&lab, "node2", &["node1"]).await;

        // Encrypted on the wire: the marker crosses the tunnel but never the fabric in clear.
        let cap = Capture::start(&n1.netns, &n1.fabric_iface, CaptureLimit::default())
            .expect("capture on node1's fabric veth");
        let got = udp_marker(&n1, &n2, m2, 7001, 20, Duration::from_secs(8));
        let seen = cap.stop();
        assert!(
            got > 0,
            "nothing crossed the tunnel node1 -> node2\n{}\n{}\n{:?}",
            lab.log_tail("node1", 40),
            lab.log_tail("node2", 40),
            lab.status("node1").await.map(|s| s.mesh)
        );
        assert!(
            seen.count_udp_port(MESH_PORT) > 0,
            "no WireGuard packets on the fabric"
        );
        assert!(
            !seen.contains(MARKER),
            "the marker crossed the fabric in plaintext"
        );
        // The same capture does see plaintext sent outside the tunnel (the check can fail).
        let cap =
            Capture::start(&n1.netns, &n1.fabric_iface, CaptureLimit::default()).expect("capture");
        let got = udp_marker(&n1, &n2, n2.fabric_ip, 7002, 5, Duration::from_secs(5));
        let seen = cap.stop();
        assert!(
            got > 0 && seen.contains(MARKER),
            "control: plaintext not seen ({got} arrived)"
        );

        // The non-member gets no tunnel, and is in nobody's set.
        let s3 = lab.status("node3").await.expect("status");
        assert_eq!(peer_names(&s3), Vec::<String>::new(), "node3 holds peers");
        assert_eq!(
            udp_marker(&n3, &n1, m1, 7003, 10, Duration::from_millis(1500)),
            0
        );
        let s1 = lab.status("node1").await.expect("status");
        assert_eq!(peer_names(&s1), vec!["node2".to_string()]);

        // Quotas hold on what the fabric carries: 20 Mbit/s for node1, offered 100 Mbit/s
        // through the tunnel.
        lab.call_ok(
            "PUT",
            &format!("/v1/leases/{l1}"),
            Some(json!({"node": "node1", "rate_bps": 20_000_000u64})),
            200,
        )
        .await
        .expect("lower node1's lease");
        lab.wait_status(
            "node1",
            "the 20 Mbit/s lease",
            Duration::from_secs(10),
            |s| nicwarden_lab::scope(s, "egress").is_some_and(|d| d.rate_bps == Some(20_000_000)),
        )
        .await
        .expect("lease changed");
        let mut spec = SendSpec::new(Proto::Udp, SocketAddr::from((m2, 7004)));
        spec.duration = Duration::from_secs(3);
        spec.rate_bps = Some(100_000_000);
        spec.payload = 1200;
        let flow = Flow::start(&n1, &n2, spec, Duration::from_secs(1));
        let (sent, got, _) = flow.finish();
        let secs = got
            .last_byte_at
            .zip(got.first_byte_at)
            .map(|(l, f)| (l - f).as_secs_f64())
            .unwrap_or(0.0);
        assert!(secs > 1.0, "the flow did not run: {got:?}");
        let rate = got.bytes as f64 * 8.0 / secs;
        eprintln!(
            "offered {} B, delivered {} B through the tunnel: {:.1} Mbit/s of payload under a 20 Mbit/s lease",
            sent.bytes,
            got.bytes,
            rate / 1e6
        );
        assert!(
            rate < 20_000_000.0 * 1.10,
            "payload at {rate} bit/s beats a 20 Mbit/s lease"
        );
        assert!(
            rate > 20_000_000.0 * 0.5,
            "payload at only {rate} bit/s under a 20 Mbit/s lease"
        );
        // What the datapath counted is what the fabric carried: payload plus the tunnel's
        // headers, so more than the payload delivered.
        let delivered = got.bytes;
        lab.wait_status(
            "node1",
            "the fabric count above the payload delivered",
            Duration::from_secs(5),
            |s| nicwarden_lab::scope(s, "egress").is_some_and(|d| d.usage.bytes > delivered),
        )
        .await
        .expect("counted on the fabric");

        // Revoking node2's lease removes it from node1's set at once, and cuts the tunnel.
        lab.revoke(l2, "test").await.expect("revoke");
        wait_peers(&lab, "node1", &[]).await;
        assert_eq!(
            udp_marker(&n1, &n2, m2, 7005, 10, Duration::from_millis(1500)),
            0
        );
    });
}

#[test]
fn peers_expire_on_their_own_when_the_controller_is_gone() {
    with_mesh_lab(2, |mut lab| async move {
        for n in ["node1", "node2"] {
            lab.grant(json!({"node": n, "rate_bps": 100_000_000u64, "ttl_s": 4, "renew_s": 1}))
                .await
                .expect("grant");
        }
        wait_peers(&lab, "node1", &["node2"]).await;
        wait_peers(&lab, "node2", &["node1"]).await;
        lab.kill_controller();
        // Nobody renews now: each agent drops the other's entry at its own deadline.
        wait_peers(&lab, "node1", &[]).await;
        wait_peers(&lab, "node2", &[]).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let m2 = lab.mesh_ip("node2").expect("mesh ip");
        assert_eq!(
            udp_marker(&n1, &n2, m2, 7011, 10, Duration::from_millis(1500)),
            0
        );
    });
}

#[test]
fn tamper_cuts_the_node_off_until_reenrolled() {
    with_mesh_lab(3, |mut lab| async move {
        full_mesh(&lab, &["node1", "node2", "node3"]).await;
        let old_key = lab
            .status("node1")
            .await
            .expect("status")
            .mesh
            .and_then(|m| m.public_key);
        let (n1, n2, n3) = (
            node(&lab, "node1"),
            node(&lab, "node2"),
            node(&lab, "node3"),
        );
        // What an attacker who copied the key before the tamper would hold.
        let stolen = nicwarden_wg::StaticKey::load(&lab.agent_dir("node1").join("wg.key"))
            .expect("read node1's WireGuard key");

        let answer = lab.tamper("node1", "lid opened").await.expect("tamper");
        assert!(answer.contains("fabric blocked"), "{answer}");
        let s1 = lab.status("node1").await.expect("status");
        let t = s1.tampered.as_ref().expect("node1 reports tampered");
        assert_eq!(t.reason, "lid opened");
        assert!(t.blocked_after_us.is_some() && t.keys_destroyed_after_us.is_some());
        assert_eq!(
            s1.mesh.as_ref().and_then(|m| m.public_key.clone()),
            None,
            "key not destroyed"
        );
        assert!(
            !lab.agent_dir("node1").join("wg.key").exists(),
            "key file still there"
        );
        // Every peer drops it; the healthy ones keep their tunnel.
        wait_peers(&lab, "node2", &["node3"]).await;
        wait_peers(&lab, "node3", &["node2"]).await;
        let m3 = lab.mesh_ip("node3").expect("mesh ip");
        assert!(
            udp_marker(&n2, &n3, m3, 7021, 20, Duration::from_secs(8)) > 0,
            "node2 -> node3 broke"
        );
        // The tampered node reaches no one, not even in plaintext.
        assert_eq!(
            udp_marker(
                &n1,
                &n2,
                n2.fabric_ip,
                7022,
                10,
                Duration::from_millis(1500)
            ),
            0
        );
        assert_eq!(
            udp_marker(&n1, &n3, m3, 7023, 10, Duration::from_millis(1500)),
            0
        );
        // The controller revoked it and refuses it.
        let v = lab
            .call_ok("GET", "/v1/nodes/node1", None, 200)
            .await
            .expect("node");
        assert_eq!(v["active_leases"], 0, "{v}");
        assert_eq!(v["mesh"]["tampered"]["reason"], "lid opened", "{v}");
        assert_eq!(v["connected"], false, "{v}");
        let ev = lab
            .call_ok("GET", "/v1/events?kind=node.tampered", None, 200)
            .await
            .expect("events");
        assert_eq!(ev["events"].as_array().map(|a| a.len()), Some(1), "{ev}");

        // Its peers refuse handshakes made with its old key, even from a host whose
        // datapath lets them out: node2 never answers.
        lab.kill_agent("node1");
        impostor_is_refused(&lab, &stolen).await;

        // A restart keeps it tampered (the record), and the controller still refuses it.
        lab.start_agent("node1", None)
            .expect("restart node1's agent");
        lab.wait_status(
            "node1",
            "tampered after restart",
            Duration::from_secs(20),
            |s| {
                s.tampered.is_some()
                    && !s.connected
                    && s.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("tampered"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail("node1", 30)));

        // Only the operator's re-enrollment brings it back, with a new key.
        let tok = lab
            .call_ok("POST", "/v1/nodes/node1/token", None, 200)
            .await
            .expect("token");
        let token = tok["join_token"].as_str().expect("token").to_string();
        lab.start_agent("node1", Some(&token))
            .expect("start with the new token");
        lab.wait_status("node1", "connected again", Duration::from_secs(20), |s| {
            s.connected && s.tampered.is_none()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.log_tail("node1", 30)));
        grant(&lab, "node1", 1_000_000_000).await;
        wait_peers(&lab, "node2", &["node1", "node3"]).await;
        let new_key = lab
            .status("node1")
            .await
            .expect("status")
            .mesh
            .and_then(|m| m.public_key);
        assert!(
            new_key.is_some() && new_key != old_key,
            "{new_key:?} vs {old_key:?}"
        );
        let s2 = lab.status("node2").await.expect("status");
        let k = s2
            .mesh
            .as_ref()
            .and_then(|m| m.peers.iter().find(|p| p.node == "node1"))
            .map(|p| p.public_key.clone());
        assert_eq!(k, new_key);
        let m2 = lab.mesh_ip("node2").expect("mesh ip");
        assert!(
            udp_marker(&n1, &n2, m2, 7024, 20, Duration::from_secs(8)) > 0,
            "node1 -> node2 after re-enrollment"
        );
    });
}

#[test]
fn rotation_keeps_a_flow_alive() {
    with_mesh_lab(2, |lab| async move {
        full_mesh(&lab, &["node1", "node2"]).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let m2 = lab.mesh_ip("node2").expect("mesh ip");
        let mut spec = SendSpec::new(Proto::Tcp, SocketAddr::from((m2, 7031)));
        spec.duration = Duration::from_secs(30);
        spec.rate_bps = Some(20_000_000);
        spec.max_bytes = Some(15_000_000);
        let flow = Flow::start(&n1, &n2, spec, Duration::from_secs(10));
        flow.wait_bytes(2_000_000, Duration::from_secs(10)).await;
        let before = lab
            .status("node1")
            .await
            .expect("status")
            .mesh
            .and_then(|m| m.public_key);
        for n in ["node1", "node2"] {
            lab.call_ok("POST", &format!("/v1/nodes/{n}/rotate-key"), None, 202)
                .await
                .expect("rotate");
        }
        lab.wait_status(
            "node2",
            "node1's new key installed",
            Duration::from_secs(10),
            |s| {
                s.mesh.as_ref().is_some_and(|m| {
                    m.peers
                        .iter()
                        .any(|p| p.node == "node1" && Some(&p.public_key) != before.as_ref())
                })
            },
        )
        .await
        .expect("new key at node2");
        let (sent, got, _) = flow.finish();
        assert_eq!(sent.stop, Stop::Completed, "sender: {sent:?}");
        assert_eq!(got.stop, Stop::Completed, "sink: {got:?}");
        assert_eq!(got.bytes, sent.bytes, "bytes lost across the rotation");
        let after = lab
            .status("node1")
            .await
            .expect("status")
            .mesh
            .and_then(|m| m.public_key);
        assert!(after.is_some() && after != before);
        let v = lab
            .call_ok("GET", "/v1/nodes/node1", None, 200)
            .await
            .expect("node");
        assert_eq!(v["mesh"]["rotations"], 1, "{v}");
    });
}

#[test]
fn encrypted_only_lets_nothing_but_wireguard_cross_the_fabric() {
    with_mesh_lab_opts(2, true, |mut lab| async move {
        full_mesh(&lab, &["node1", "node2"]).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let m2 = lab.mesh_ip("node2").expect("mesh ip");
        // Through the tunnel: delivered. In clear to the same node: dropped, and counted.
        assert!(
            udp_marker(&n1, &n2, m2, 7041, 20, Duration::from_secs(8)) > 0,
            "tunnel broken"
        );
        assert_eq!(
            udp_marker(
                &n1,
                &n2,
                n2.fabric_ip,
                7042,
                10,
                Duration::from_millis(1500)
            ),
            0
        );
        lab.wait_status(
            "node1",
            "the guard's drops counted",
            Duration::from_secs(5),
            |s| {
                s.mesh
                    .as_ref()
                    .and_then(|m| m.guard.as_ref())
                    .is_some_and(|g| g.counters.dropped_out_packets > 0)
            },
        )
        .await
        .expect("guard counters");
        // The guard outlives the agent: a stopped agent does not open the fabric.
        lab.kill_agent("node1");
        assert_eq!(
            udp_marker(
                &n1,
                &n2,
                n2.fabric_ip,
                7043,
                10,
                Duration::from_millis(1500)
            ),
            0
        );
        // Removed behind its back, it comes back at the next check of a running agent.
        lab.start_agent("node1", None)
            .expect("restart node1's agent");
        lab.wait_status("node1", "connected again", Duration::from_secs(20), |s| {
            s.connected
        })
        .await
        .expect("connected");
        n1.netns
            .run(|| {
                std::process::Command::new("nft")
                    .args(["delete", "table", "inet", "nicwarden_guard"])
                    .status()
            })
            .expect("enter node1's namespace")
            .expect("run nft");
        lab.wait_status(
            "node1",
            "the guard re-installed",
            Duration::from_secs(10),
            |s| {
                s.mesh
                    .as_ref()
                    .and_then(|m| m.guard.as_ref())
                    .is_some_and(|g| g.repairs > 0)
            },
        )
        .await
        .expect("guard repaired");
        assert_eq!(
            udp_marker(
                &n1,
                &n2,
                n2.fabric_ip,
                7044,
                10,
                Duration::from_millis(1500)
            ),
            0
        );
    });
}

/// With node1's (tampered) agent stopped and its datapath removed, runs a WireGuard device
/// in node1's namespace with node1's old key, aimed at node2: its handshakes reach node2's
/// fabric, node2 answers none of them, and nothing crosses.
async fn impostor_is_refused(lab: &Lab, stolen: &nicwarden_wg::StaticKey) {
    use nicwarden_datapath::Datapath;
    use nicwarden_wg::WgBackend;
    let (n1, n2) = (node(lab, "node1"), node(lab, "node2"));
    let node2_key: nicwarden_mesh::WgKey = lab
        .status("node2")
        .await
        .expect("status")
        .mesh
        .and_then(|m| m.public_key)
        .expect("node2's key")
        .parse()
        .expect("key");
    let pin = lab.pin_dir("node1");
    let iface = n1.fabric_iface.clone();
    n1.netns
        .run(move || nicwarden_datapath::EbpfDatapath::new(&iface, &pin).remove())
        .expect("enter node1's namespace")
        .expect("remove node1's datapath");
    let cfg = nicwarden_wg::DeviceConfig {
        iface: "nwimp0".into(),
        address: "198.18.128.201/24".parse().expect("net"),
        listen: SocketAddr::from((n1.fabric_ip, 51999)),
        mtu: 1420,
    };
    let (rt, dev) = n1
        .netns
        .run(|| {
            // Its worker threads are created here, inside node1's namespace.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let dev = rt
                .block_on(nicwarden_wg::GotatunBackend::start(&cfg, stolen))
                .expect("start the impostor's device");
            (rt, dev)
        })
        .expect("enter node1's namespace");
    let peer = nicwarden_wg::PeerConfig {
        public_key: node2_key.0,
        endpoint: SocketAddr::from((n2.fabric_ip, MESH_PORT)),
        allowed_ips: vec!["198.18.128.2/32".parse().expect("net")],
        keepalive_secs: None,
    };
    // The device lives on its own runtime; this test runs inside another one.
    let dev = Arc::new(dev);
    let d = dev.clone();
    rt.spawn(async move { d.upsert_peer(&peer).await })
        .await
        .expect("join")
        .expect("impostor peer");
    let cap = Capture::start(&n2.netns, &n2.fabric_iface, CaptureLimit::default())
        .expect("capture on node2's fabric veth");
    let m2 = lab.mesh_ip("node2").expect("mesh ip");
    let got = udp_marker(&n1, &n2, m2, 7025, 5, Duration::from_secs(6));
    let seen = cap.stop();
    let d = dev.clone();
    let _ = rt.spawn(async move { d.shutdown().await }).await;
    drop(dev);
    rt.shutdown_background();
    // IPv4/UDP frames from `src` to or from the impostor's port.
    let from = |src: Ipv4Addr| {
        seen.frames
            .iter()
            .filter(|f| {
                f.len() > 38
                    && f[12..14] == [0x08, 0x00]
                    && f[23] == 17
                    && f[26..30] == src.octets()
                    && (u16::from_be_bytes([f[34], f[35]]) == 51999
                        || u16::from_be_bytes([f[36], f[37]]) == 51999)
            })
            .count()
    };
    assert_eq!(got, 0, "the impostor reached node2");
    assert!(
        from(n1.fabric_ip) > 0,
        "no handshake from the impostor reached node2"
    );
    assert_eq!(from(n2.fabric_ip), 0, "node2 answered the impostor");
}
