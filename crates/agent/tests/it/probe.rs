//! Link probes between two nodes of a testbed (their fabric veths on the switch's bridge),
//! each with its own node key and a certificate from a test CA, with the datapath installed
//! and **no lease** on either node (everything blocked): probes and answers still cross, the
//! answers verify against the answerer's certificate, carry the round's nonce and an RTT,
//! and each node hears the switch's LLDP announcement for its port. A forged answer is
//! recorded as heard (the controller judges it) and does not verify.

use nicwarden_agent::probe::{ProbeStatus, Prober, ProberConfig};
use nicwarden_datapath::fake::fixtures::{egress, floor};
use nicwarden_datapath::{Datapath, DesiredState, EbpfDatapath, LinuxDatapath};
use nicwarden_pki::{verify_node_signature, ControllerIdentity, NodeKey};
use nicwarden_proto::{link, pb};
use nicwarden_testbed::{LldpAnnouncer, Node, Testbed, TestbedSpec};
use prost::Message;
use rustls_pki_types::pem::PemObject;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const IFACE: &str = "fab0";
const INTERVAL: Duration = Duration::from_millis(200);
/// Bound on the wait for both sides to have heard each other in a finished round.
const HEARD_WITHIN: Duration = Duration::from_secs(15);
const INTRUDER: &str = "intruder";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Ebpf,
    Tc,
}

#[test]
fn probes_cross_a_blocked_ebpf_datapath_and_verify() {
    probes_cross(Backend::Ebpf);
}

#[test]
fn probes_cross_a_blocked_tc_datapath_and_verify() {
    probes_cross(Backend::Tc);
}

/// One node's prober and what it reported.
struct Side {
    name: String,
    cert_der: Vec<u8>,
    prober: Prober,
    reports: mpsc::Receiver<pb::ProbeReport>,
}

/// Removes the eBPF pins of a test, also on panic.
struct Pins(Vec<PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn skip(backend: Backend) -> bool {
    if !nicwarden_testbed::has_privileges() {
        eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
        return true;
    }
    let available = match backend {
        Backend::Ebpf => EbpfDatapath::check_available(),
        Backend::Tc => LinuxDatapath::check_available(),
    };
    if let Err(e) = available {
        eprintln!("skipped: datapath {backend:?} unavailable: {e}");
        return true;
    }
    false
}

/// Every scope at a floor of 0 on every node: no lease anywhere.
fn install_blocked(tb: &Testbed, backend: Backend) -> Pins {
    let desired = DesiredState {
        scopes: vec![egress(floor(0))],
        peers: Vec::new(),
    };
    let mut pins = Pins(Vec::new());
    for n in tb.nodes() {
        match backend {
            Backend::Ebpf => {
                let dir = PathBuf::from("/sys/fs/bpf/nicwarden-test").join(n.netns.name());
                pins.0.push(dir.clone());
                let d = desired.clone();
                // aya attaches in the calling thread's namespace.
                n.netns
                    .run(move || EbpfDatapath::new(IFACE, &dir).reconcile(&d).map(|_| ()))
                    .unwrap()
                    .unwrap();
            }
            Backend::Tc => {
                LinuxDatapath::in_netns(n.netns.name(), IFACE)
                    .reconcile(&desired)
                    .unwrap();
            }
        }
    }
    pins
}

/// IP does not cross: the datapath really blocks.
fn assert_ip_blocked(from: &Node, to: &Node) {
    let dst = (to.fabric_ip, 9100);
    let rx = to.netns.run(move || UdpSocket::bind(dst)).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    from.netns
        .run(move || {
            let tx = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..3 {
                let _ = tx.send_to(b"blocked?", dst);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(rx.recv(&mut buf).is_err(), "IP crossed a blocked datapath");
}

fn start(n: &Node, ca: &ControllerIdentity) -> Side {
    let key = NodeKey::generate().unwrap();
    let (cert_pem, _) = ca
        .issue_node_cert(&n.name, &key.csr_pem(&n.name).unwrap(), 1)
        .unwrap();
    let cert_der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .to_vec();
    let (tx, reports) = mpsc::channel();
    let cfg = ProberConfig {
        node: n.name.clone(),
        iface: IFACE.to_string(),
        interval: INTERVAL,
        max_answers_per_round: 64,
    };
    // The sockets belong to the namespace they are opened in.
    let prober = n
        .netns
        .run(move || {
            Prober::start(cfg, key, move |r| {
                let _ = tx.send(r);
            })
        })
        .unwrap()
        .unwrap();
    Side {
        name: n.name.clone(),
        cert_der,
        prober,
        reports,
    }
}

/// A forged answer to `to` from a node that does not exist, with no valid signature.
fn forged_answer(to: &str) -> Vec<u8> {
    let a = pb::LinkAnswer {
        node: INTRUDER.into(),
        port: "x".into(),
        to_node: to.into(),
        to_port: IFACE.into(),
        nonce: vec![0; 16],
    };
    let payload = link::encode_answer(&a, |_| [0x5a; 64]);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&link::LINK_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&payload);
    f
}

/// The last finished round heard `node` with an RTT (or, for the intruder, at all).
fn heard(st: &ProbeStatus, node: &str) -> bool {
    st.last_round.as_ref().is_some_and(|r| {
        r.neighbours
            .iter()
            .any(|n| n.node == node && (n.rtt_us.is_some() || node == INTRUDER))
    })
}

fn heard_switch(st: &ProbeStatus, chassis: &str, port: &str) -> bool {
    st.last_round.as_ref().is_some_and(|r| {
        r.switches
            .iter()
            .any(|s| s.chassis == chassis && s.port == port)
    })
}

fn probes_cross(backend: Backend) {
    if skip(backend) {
        return;
    }
    let tb = Testbed::create(TestbedSpec {
        nodes: 2,
        fabric_mtu: 1500,
    })
    .unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ControllerIdentity::load_or_create(ca_dir.path(), &["controller.test".to_string()])
        .unwrap();
    let _pins = install_blocked(&tb, backend);
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    assert_ip_blocked(n1, n2);

    let lldp = LldpAnnouncer::start(&tb, Duration::from_millis(100)).unwrap();
    let sides = [start(n1, &ca), start(n2, &ca)];
    let ports = [
        tb.switch_port_of(&n1.name).unwrap(),
        tb.switch_port_of(&n2.name).unwrap(),
    ];
    let forged = forged_answer(&n1.name);

    let t0 = Instant::now();
    loop {
        // The intruder talks from node2's fabric port, through node2's blocked datapath.
        nicwarden_testbed::send_raw_frames(&n2.netns, IFACE, vec![forged.clone()])
            .unwrap_or_else(|e| panic!("node2's blocked datapath refused a link frame: {e}"));
        let st: Vec<ProbeStatus> = sides.iter().map(|s| s.prober.status()).collect();
        let done = heard(&st[0], &sides[1].name)
            && heard(&st[1], &sides[0].name)
            && heard(&st[0], INTRUDER)
            && (0..2).all(|i| heard_switch(&st[i], tb.switch_name(), &ports[i]));
        if done {
            eprintln!("heard each other after {:?}", t0.elapsed());
            break;
        }
        assert!(
            t0.elapsed() < HEARD_WITHIN,
            "not heard within {HEARD_WITHIN:?}: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, s) in sides.iter().enumerate() {
        let st = s.prober.status();
        assert!(st.probes_sent >= 2 && st.answers_sent >= 1, "{st:#?}");
        assert_eq!(st.send_errors, 0, "{st:#?}");
        assert_eq!(st.dropped_undecodable, 0, "{st:#?}");
        let other = &sides[1 - i];
        let rounds: Vec<pb::ProbeRound> = s.reports.try_iter().flat_map(|r| r.rounds).collect();
        // A round that heard the other node answer its own nonce: the controller's checks.
        let (round, h, answer) = rounds
            .iter()
            .rev()
            .find_map(|r| {
                r.heard.iter().find_map(|h| {
                    let a = pb::LinkAnswer::decode(h.answer.as_slice()).ok()?;
                    (a.node == other.name && a.nonce == r.nonce).then_some((r, h, a))
                })
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} never reported {}'s answer: {rounds:#?}",
                    s.name, other.name
                )
            });
        assert_eq!(round.port, IFACE);
        assert_eq!(round.nonce.len(), 16);
        assert_eq!(
            (
                answer.to_node.as_str(),
                answer.to_port.as_str(),
                answer.port.as_str()
            ),
            (s.name.as_str(), IFACE, IFACE)
        );
        assert!(h.rtt_us > 0, "{h:?}");
        let signed = link::link_signed_bytes(&h.answer);
        verify_node_signature(&other.cert_der, &signed, &h.signature).unwrap();
        // Not by this node's key, and not over other bytes.
        assert!(verify_node_signature(&s.cert_der, &signed, &h.signature).is_err());
        let mut tampered = signed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(verify_node_signature(&other.cert_der, &tampered, &h.signature).is_err());
        // The switch, as its LLDP said.
        assert!(rounds.iter().any(|r| r
            .heard
            .iter()
            .any(|h| h.switch_chassis == tb.switch_name()
                && h.switch_port == ports[i]
                && h.answer.is_empty())));
        if i == 0 {
            // The forged answer: reported raw, untimed, and it verifies against nobody.
            let f = rounds
                .iter()
                .flat_map(|r| &r.heard)
                .find(|h| {
                    pb::LinkAnswer::decode(h.answer.as_slice()).is_ok_and(|a| a.node == INTRUDER)
                })
                .expect("the forged answer is reported");
            assert_eq!(f.rtt_us, 0);
            let signed = link::link_signed_bytes(&f.answer);
            for side in &sides {
                assert!(verify_node_signature(&side.cert_der, &signed, &f.signature).is_err());
            }
        }
    }
    drop(sides);
    lldp.stop();
}
