//! Interconnect verification in the controller: applying topology files (validation,
//! versions) and judging probe reports (signatures, nonces) into findings.

use crate::{enroll_as, open_session, tmp, Running, Session};
use nicwarden_proto::pb;
use prost::Message;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

const TWO_NODES: &str = r#"
version_note = "two nodes, one cable"
[nodes.node1]
ports = ["fab0"]
[nodes.node2]
ports = ["fab0"]
[[links]]
a = "node1:fab0"
b = "node2:fab0"
rtt_max_us = 1000
"#;

async fn apply(c: &Running, toml: &str, dry_run: bool) -> (u16, Value) {
    c.call(
        "PUT",
        "/v1/topology",
        Some(json!({"toml": toml, "dry_run": dry_run})),
    )
    .await
}

struct Prober {
    key: nicwarden_pki::NodeKey,
    s: Session,
}

async fn prober(c: &Running, node: &str) -> Prober {
    let (ident, tls) = enroll_as(c, node, node, true).await;
    let hello = pb::Hello {
        node: node.into(),
        agent_version: "topology-test".into(),
        ..Default::default()
    };
    let s = open_session(c, tls, hello).await.expect("session");
    Prober { key: ident.key, s }
}

/// `from`'s signed answer to `to`'s probe with `nonce`.
fn answer(from: &Prober, from_node: &str, to_node: &str, nonce: &[u8]) -> pb::HeardFrame {
    let a = pb::LinkAnswer {
        node: from_node.into(),
        port: "fab0".into(),
        to_node: to_node.into(),
        to_port: "fab0".into(),
        nonce: nonce.to_vec(),
    };
    let body = a.encode_to_vec();
    let sig = from
        .key
        .sign_fixed(&nicwarden_proto::link::link_signed_bytes(&body))
        .expect("sign");
    pb::HeardFrame {
        answer: body,
        signature: sig.to_vec(),
        rtt_us: 300,
        ..Default::default()
    }
}

async fn report(p: &Prober, nonce: [u8; 16], heard: Vec<pb::HeardFrame>) {
    p.s.tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::ProbeReport(pb::ProbeReport {
                rounds: vec![pb::ProbeRound {
                    port: "fab0".into(),
                    nonce: nonce.to_vec(),
                    heard,
                }],
            })),
        })
        .await
        .expect("send report");
}

async fn status_until(c: &Running, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let (st, v) = c.call("GET", "/v1/topology/status", None).await;
        assert_eq!(st, 200, "{v}");
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {WAIT:?}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(v: &Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["kind"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_files_are_validated_versioned_and_kept() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let (st, v) = c.call("GET", "/v1/topology", None).await;
    assert_eq!(st, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("topology apply"),
        "{v}"
    );
    // Every problem at once, and nodes the controller does not know.
    let (st, v) = apply(
        &c,
        "[nodes.node1]\nports = [\"fab0\", \"fab0\"]\n[[links]]\na = \"node1:fab0\"\nb = \"node1:fab0\"\n[[links]]\na = \"node1:fab9\"\nb = \"ghost:p1\"\n",
        false,
    )
    .await;
    assert_eq!(st, 422, "{v}");
    let e = v["error"].as_str().unwrap_or("").to_string();
    for want in ["fab0", "fab9", "ghost"] {
        assert!(e.contains(want), "{want} not in {e}");
    }
    let (st, v) = apply(&c, TWO_NODES, false).await;
    assert_eq!(st, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("node1, node2"),
        "{v}"
    );
    for n in ["node1", "node2"] {
        let (st, _) = c.call("POST", "/v1/nodes", Some(json!({"name": n}))).await;
        assert_eq!(st, 201);
    }
    let (st, v) = apply(&c, TWO_NODES, true).await;
    assert_eq!(
        (st, v["version"].as_u64(), v["dry_run"].as_bool()),
        (200, Some(0), Some(true)),
        "{v}"
    );
    let (st, _) = c.call("GET", "/v1/topology", None).await;
    assert_eq!(st, 404, "a dry run stores nothing");
    let (st, v) = apply(&c, TWO_NODES, false).await;
    assert_eq!(
        (st, v["version"].as_u64(), v["changed"].as_bool()),
        (200, Some(1), Some(true)),
        "{v}"
    );
    let (st, v) = apply(&c, TWO_NODES, false).await;
    assert_eq!(
        (st, v["version"].as_u64(), v["changed"].as_bool()),
        (200, Some(1), Some(false)),
        "{v}"
    );
    let second = TWO_NODES.replace("rtt_max_us = 1000", "rtt_max_us = 500");
    let (st, v) = apply(&c, &second, false).await;
    assert_eq!((st, v["version"].as_u64()), (200, Some(2)), "{v}");
    let (st, v) = c.call("GET", "/v1/topology/versions", None).await;
    assert_eq!(st, 200);
    assert_eq!(v.as_array().map(|a| a.len()), Some(2), "{v}");
    let (st, v) = c.call("GET", "/v1/topology/versions/1", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["source"], TWO_NODES, "{v}");
    assert_eq!(v["links"][0]["rtt_max_us"], 1000, "{v}");
    // Kept across a restart.
    c.stop().await;
    let c = Running::start(d.path()).await;
    let (st, v) = c.call("GET", "/v1/topology", None).await;
    assert_eq!((st, v["version"].as_u64()), (200, Some(2)), "{v}");
    let (st, v) = c.call("GET", "/v1/audit?limit=50", None).await;
    assert_eq!(st, 200);
    assert!(v.to_string().contains("topology.apply"), "{v}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_are_judged_by_signature_and_nonce() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let p1 = prober(&c, "node1").await;
    let p2 = prober(&c, "node2").await;
    let (st, v) = apply(&c, TWO_NODES, false).await;
    assert_eq!(st, 200, "{v}");
    // Healthy: each side hears the other, properly signed, on fresh nonces.
    for i in 0..4u8 {
        let (n1, n2) = ([i; 16], [100 + i; 16]);
        report(&p1, n1, vec![answer(&p2, "node2", "node1", &n1)]).await;
        report(&p2, n2, vec![answer(&p1, "node1", "node2", &n2)]).await;
    }
    let v = status_until(&c, "both ports heard their neighbour", |v| {
        v["ports"].as_array().is_some_and(|p| {
            p.len() == 2
                && p.iter().all(|p| {
                    p["heard"].as_array().is_some_and(|h| {
                        h.len() == 1 && h[0].as_str().unwrap_or("").contains("(300 us)")
                    })
                })
        })
    })
    .await;
    assert_eq!(kinds(&v), Vec::<String>::new(), "{v}");

    // An answer signed by node1's key but claiming to be node2: badly signed.
    let n = [50u8; 16];
    let mut forged = answer(&p1, "node2", "node1", &n);
    forged.rtt_us = 10;
    report(&p1, n, vec![forged]).await;
    let v = status_until(&c, "a bad signature found", |v| {
        kinds(v).contains(&"unauthenticated".to_string())
    })
    .await;
    assert!(v.to_string().contains("claims node2:fab0"), "{v}");

    // Unsigned, and a replayed nonce: reported as such, never as the link.
    let n = [51u8; 16];
    let mut unsigned = answer(&p2, "node2", "node1", &n);
    unsigned.signature.clear();
    report(&p1, n, vec![unsigned]).await;
    status_until(&c, "unsigned reported", |v| {
        v.to_string().contains("unsigned (claims node2:fab0)")
    })
    .await;
    let old = [0u8; 16];
    report(&p1, old, vec![answer(&p2, "node2", "node1", &old)]).await;
    status_until(&c, "replayed reported", |v| {
        v.to_string().contains("replayed nonce (claims node2:fab0)")
    })
    .await;
    // An answer naming a node the controller does not know.
    let n = [52u8; 16];
    report(&p1, n, vec![answer(&p2, "node9", "node1", &n)]).await;
    status_until(&c, "unknown identity reported", |v| {
        v.to_string().contains("(claims node9:fab0)")
            && kinds(v).contains(&"unknown_neighbor".to_string())
    })
    .await;
    // node2's side keeps hearing node1 properly; node1's keeps failing: the link is missing
    // from node1's side after 3 rounds.
    for i in 60..64u8 {
        report(&p1, [i; 16], vec![]).await;
    }
    status_until(&c, "missing link", |v| {
        kinds(v).contains(&"missing_link".to_string())
    })
    .await;
    let (st, v) = c.call("GET", "/v1/events?kind=topology", None).await;
    assert_eq!(st, 200);
    assert!(v.to_string().contains("topology.finding"), "{v}");
    let text = reqwest::get(format!("{}/metrics", c.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains("nicwarden_topology_findings{kind=\"missing_link\",severity=\"warning\"} 1"),
        "{}",
        text.lines()
            .filter(|l| l.contains("topology"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop((p1, p2));
    c.stop().await;
}
