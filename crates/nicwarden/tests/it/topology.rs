//! Privileged end-to-end tests of interconnect verification: agents probing their fabric
//! port (signed link probes), the testbed switch announcing its ports (LLDP), the controller
//! judging what was heard against the declared topology; faults injected in the testbed.

use crate::enforce::node;
use nicwarden_lab::Lab;
use nicwarden_testbed::capture::{Capture, CaptureLimit};
use serde_json::{json, Value};
use std::future::Future;
use std::time::{Duration, Instant};

/// Probe and LLDP interval of these tests.
const PROBE_MS: u64 = 250;

/// A lab whose agents probe every 250 ms and whose switch announces its ports; `revoke` is
/// the controller's automatic-revocation policy.
fn with_topology_lab<F, Fut>(nodes: usize, revoke: &[&str], body: F)
where
    F: FnOnce(Lab) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let revoke: Vec<String> = revoke.iter().map(|s| s.to_string()).collect();
    crate::harness::with_privileged_lab(
        nodes,
        move |mut spec| {
            spec.backend = "ebpf".into();
            spec.lldp_interval = Some(Duration::from_millis(PROBE_MS));
            spec.agent_args = vec![
                "--probe-interval".into(),
                PROBE_MS.to_string(),
                "--byte-window".into(),
                "1000".into(),
            ];
            spec.controller_args = vec!["--topology-probe-interval".into(), PROBE_MS.to_string()];
            if !revoke.is_empty() {
                spec.controller_args.push("--topology-revoke".into());
                spec.controller_args.push(revoke.join(","));
            }
            spec
        },
        body,
    )
}

/// The testbed as it is cabled: the `declared` nodes on the switch, port `p<k>` each.
fn topology_file(lab: &Lab, declared: &[&str]) -> String {
    let tb = lab.testbed();
    let mut s = String::from("version_note = \"testbed\"\n");
    let mut ports = Vec::new();
    let mut links = String::new();
    for n in tb
        .nodes()
        .iter()
        .filter(|n| declared.contains(&n.name.as_str()))
    {
        s.push_str(&format!(
            "[nodes.{}]\nports = [\"{}\"]\n",
            n.name, n.fabric_iface
        ));
        ports.push(format!("\"{}\"", n.switch_port_name));
        links.push_str(&format!(
            "[[links]]\na = \"{}:{}\"\nb = \"{}:{}\"\n",
            n.name,
            n.fabric_iface,
            tb.switch_name(),
            n.switch_port_name
        ));
    }
    s.push_str(&format!(
        "[switches.{}]\nports = [{}]\n{links}",
        tb.switch_name(),
        ports.join(", ")
    ));
    s
}

async fn apply(lab: &Lab, toml: &str) {
    lab.call_ok("PUT", "/v1/topology", Some(json!({"toml": toml})), 200)
        .await
        .expect("apply the topology");
}

fn kinds(v: &Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["kind"].as_str().map(str::to_string))
        .collect()
}

/// Polls the topology status until `pred` holds (at most `limit`).
async fn status_until(
    lab: &Lab,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let end = Instant::now() + limit;
    loop {
        let v = lab
            .call_ok("GET", "/v1/topology/status", None, 200)
            .await
            .expect("topology status");
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {limit:?}; status: {v:#}\n{}",
            lab.log_tail("node1", 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every declared port heard the other declared nodes and its switch port; no findings.
async fn healthy(lab: &Lab, nodes: usize) -> Value {
    status_until(lab, "a healthy fabric", Duration::from_secs(20), |v| {
        kinds(v).is_empty()
            && v["ports"].as_array().is_some_and(|ps| {
                ps.len() >= nodes
                    && ps.iter().all(|p| {
                        let heard = p["heard"].as_array().map(|h| h.len()).unwrap_or(0);
                        heard >= nodes
                    })
            })
    })
    .await
}

#[test]
fn a_correct_fabric_is_clean_and_each_fault_is_found() {
    with_topology_lab(3, &[], |lab| async move {
        apply(&lab, &topology_file(&lab, &["node1", "node2", "node3"])).await;
        let v = healthy(&lab, 3).await;
        let text = v.to_string();
        assert!(text.contains("switch leaf1:p1"), "{v:#}");
        assert!(text.contains(" us)"), "no RTT measured: {v:#}");

        // A missing link: node3's cable cut.
        lab.testbed().cut_link("node3").expect("cut node3's link");
        let v = status_until(&lab, "missing link", Duration::from_secs(10), |v| {
            kinds(v).contains(&"missing_link".to_string())
        })
        .await;
        assert!(v.to_string().contains("node3"), "{v:#}");
        lab.testbed().restore_link("node3").expect("restore");
        healthy(&lab, 3).await;

        // Two cables swapped on the switch.
        lab.testbed()
            .swap_switch_ports("node1", "node2")
            .expect("swap ports");
        let v = status_until(&lab, "miswired", Duration::from_secs(10), |v| {
            kinds(v).contains(&"miswired".to_string())
        })
        .await;
        let f = v["findings"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["kind"] == "miswired"))
            .cloned()
            .expect("finding");
        assert_eq!(f["culprits"], json!(["node1", "node2"]), "{f:#}");
        assert!(
            !kinds(&v).contains(&"missing_link".to_string()),
            "a swap is one miswired finding, not missing links: {v:#}"
        );
        lab.testbed().reset_switch_ports();
        healthy(&lab, 3).await;
        let ev = lab
            .call_ok("GET", "/v1/events?kind=topology.finding_cleared", None, 200)
            .await
            .expect("events");
        assert!(
            ev["events"].as_array().is_some_and(|e| e.len() >= 2),
            "{ev:#}"
        );
    });
}

#[test]
fn an_extra_node_on_the_switch_is_found_and_cut_off_by_policy() {
    with_topology_lab(4, &["unexpected_link"], |lab| async move {
        let v = lab
            .grant(json!({"node": "node4", "rate_bps": 100_000_000u64}))
            .await
            .expect("grant node4");
        let lease = v["id"].as_u64().expect("lease id");
        // node4 is plugged in, enrolled, leased, but not declared.
        apply(&lab, &topology_file(&lab, &["node1", "node2", "node3"])).await;
        let v = status_until(&lab, "unexpected link", Duration::from_secs(15), |v| {
            v["findings"].as_array().is_some_and(|fs| {
                fs.iter()
                    .any(|f| f["kind"] == "unexpected_link" && f["culprits"] == json!(["node4"]))
            })
        })
        .await;
        assert!(
            !v["findings"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["culprits"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|n| n != "node4"))),
            "a declared node was blamed: {v:#}"
        );
        lab.wait_status(
            "node4",
            "its lease revoked by the policy",
            Duration::from_secs(10),
            |s| {
                nicwarden_lab::scope(s, "egress").is_some_and(|d| {
                    d.lease.map(|l| l.0) == Some(lease)
                        && d.state == nicwarden_lease::agent::SlotState::Revoked
                })
            },
        )
        .await
        .expect("node4 revoked");
        let audit = lab
            .call_ok("GET", "/v1/audit?limit=100", None, 200)
            .await
            .expect("audit");
        assert!(audit.to_string().contains("topology.revoke"), "{audit:#}");
    });
}

#[test]
fn forged_probe_answers_are_reported_not_trusted() {
    with_topology_lab(2, &[], |lab| async move {
        apply(&lab, &topology_file(&lab, &["node1", "node2"])).await;
        healthy(&lab, 2).await;
        // An intruder on the switch answers every probe it sees as node2, signing with a key
        // of its own.
        let host = lab
            .testbed()
            .plug_extra_host("forger", "198.18.0.200".parse().expect("ip"))
            .expect("plug the forger in");
        let key = nicwarden_pki::NodeKey::generate().expect("key");
        let mut answered = 0;
        let end = Instant::now() + Duration::from_secs(6);
        let mut found = None;
        while Instant::now() < end && found.is_none() {
            let cap = Capture::start(host.netns(), host.iface(), CaptureLimit::default())
                .expect("capture on the forger");
            tokio::time::sleep(Duration::from_millis(PROBE_MS + 50)).await;
            let seen = cap.stop();
            let mut frames = Vec::new();
            for f in &seen.frames {
                if f.len() < 14 || f[12..14] != nicwarden_proto::link::LINK_ETHERTYPE.to_be_bytes()
                {
                    continue;
                }
                if let Ok(nicwarden_proto::link::LinkFrame::Probe { probe, .. }) =
                    nicwarden_proto::link::decode_frame(&f[14..])
                {
                    let answer = nicwarden_proto::pb::LinkAnswer {
                        node: "node2".into(),
                        port: node(&lab, "node2").fabric_iface,
                        to_node: probe.node.clone(),
                        to_port: probe.port.clone(),
                        nonce: probe.nonce.clone(),
                    };
                    let body = nicwarden_proto::link::encode_answer(&answer, |m| {
                        key.sign_fixed(m).expect("sign")
                    });
                    let mut frame = vec![0xff; 6];
                    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xc8]);
                    frame.extend_from_slice(&nicwarden_proto::link::LINK_ETHERTYPE.to_be_bytes());
                    frame.extend_from_slice(&body);
                    frames.push(frame);
                }
            }
            answered += frames.len();
            if !frames.is_empty() {
                nicwarden_testbed::send_raw_frames(host.netns(), host.iface(), frames)
                    .expect("send forged answers");
            }
            let v = lab
                .call_ok("GET", "/v1/topology/status", None, 200)
                .await
                .expect("status");
            if kinds(&v).contains(&"unauthenticated".to_string()) {
                found = Some(v);
            }
        }
        let v = found.unwrap_or_else(|| {
            panic!("no unauthenticated finding after {answered} forged answers")
        });
        assert!(v.to_string().contains("claiming node2"), "{v:#}");
        // The forgery never counts as the link: node1 still hears the real node2, and no
        // finding names node2 as unexpected or missing.
        assert!(!kinds(&v).contains(&"missing_link".to_string()), "{v:#}");
        drop(host);
    });
}

#[test]
fn bytes_injected_in_a_nodes_name_break_conservation() {
    with_topology_lab(2, &[], |lab| async move {
        for n in ["node1", "node2"] {
            lab.grant(json!({"node": n, "rate_bps": 1_000_000_000u64}))
                .await
                .expect("grant");
        }
        apply(&lab, &topology_file(&lab, &["node1", "node2"])).await;
        healthy(&lab, 2).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let sent_by = |from: &nicwarden_testbed::Node, to: std::net::Ipv4Addr, port: u16| {
            let mut spec = nicwarden_testbed::traffic::SendSpec::new(
                nicwarden_testbed::traffic::Proto::Udp,
                std::net::SocketAddr::from((to, port)),
            );
            spec.duration = Duration::from_secs(3);
            spec.rate_bps = Some(20_000_000);
            spec.max_bytes = Some(5_000_000);
            from.netns
                .run(move || nicwarden_testbed::traffic::send(&spec))
                .expect("enter the sender's namespace")
                .expect("send")
        };
        // Honest traffic node1 -> node2: whole windows compared, conserved.
        sent_by(&n1, n2.fabric_ip, 7101);
        let v = status_until(&lab, "a window compared", Duration::from_secs(10), |v| {
            v["byte_pairs"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["from"] == "node1" && p["sent"].as_u64().unwrap_or(0) > 100_000)
            })
        })
        .await;
        assert!(!kinds(&v).contains(&"byte_mismatch".to_string()), "{v:#}");
        // An intruder sends node2 traffic in node1's name (node1's address as source):
        // node2 counts it from node1, node1 never sent it.
        let host = lab
            .testbed()
            .plug_extra_host("spoofer", "198.18.0.201".parse().expect("ip"))
            .expect("plug the spoofer in");
        let iface = host.iface().to_string();
        let spoofed = n1.fabric_ip;
        host.netns()
            .run(move || {
                std::process::Command::new("ip")
                    .args(["addr", "add", &format!("{spoofed}/32"), "dev", &iface])
                    .status()
            })
            .expect("enter the spoofer's namespace")
            .expect("ip addr add");
        let dst = std::net::SocketAddr::from((n2.fabric_ip, 7102));
        host.netns()
            .run(move || -> std::io::Result<()> {
                let s = std::net::UdpSocket::bind((spoofed, 0))?;
                let payload = [0u8; 1200];
                for _ in 0..2000 {
                    s.send_to(&payload, dst)?;
                }
                Ok(())
            })
            .expect("enter the spoofer's namespace")
            .expect("send in node1's name");
        let v = status_until(&lab, "byte mismatch", Duration::from_secs(10), |v| {
            v["findings"].as_array().is_some_and(|fs| {
                fs.iter()
                    .any(|f| f["kind"] == "byte_mismatch" && f["subject"] == "node1 -> node2")
            })
        })
        .await;
        let f = v["findings"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["kind"] == "byte_mismatch"))
            .cloned()
            .expect("finding");
        assert_eq!(f["severity"], "critical", "{f:#}");
        drop(host);
    });
}

#[test]
fn a_round_trip_above_the_links_bound_is_found() {
    with_topology_lab(2, &[], |lab| async move {
        // A bound no real link meets (1 us): as if a relay or an extra hop sat on the link.
        let toml = topology_file(&lab, &["node1", "node2"])
            .replace("[[links]]\n", "[[links]]\nrtt_max_us = 1\n");
        apply(&lab, &toml).await;
        let v = status_until(&lab, "rtt exceeded", Duration::from_secs(10), |v| {
            kinds(v).contains(&"rtt_exceeded".to_string())
        })
        .await;
        assert!(v.to_string().contains(" us"), "{v:#}");
        // Declaring a realistic bound clears it.
        apply(&lab, &topology_file(&lab, &["node1", "node2"])).await;
        healthy(&lab, 2).await;
    });
}
