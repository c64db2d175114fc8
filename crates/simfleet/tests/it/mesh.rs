//! Simulated nodes in the encrypted mesh against a real controller: peer sets per quota
//! group, tamper (reported by the node), key rotation, revocation. Every wait is on the
//! fleet's change notifications or the API, with a bounded deadline.

use super::*;
use nicwarden_simfleet::{SimNode, SimScope};

/// Longest wait for the mesh to settle after one change.
const MESH_WAIT: Duration = Duration::from_secs(10);

impl Controller {
    /// `method path` with a JSON body; the answer's status and body.
    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(self.token())
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `n` mesh nodes `sim-000i` with one egress scope each, granted a 30 s lease.
    fn mesh_config(&self, n: usize) -> FleetConfig {
        let mut cfg = self.fleet_config(n, 1);
        cfg.mesh = true;
        cfg.grant = Some(GrantTemplate {
            rate_bps: None,
            ttl_s: 30.0,
            volume_bytes: None,
        });
        cfg
    }
}

/// Every node but `except`, in fleet order.
fn others(fleet: &Fleet, except: &[&str]) -> Vec<String> {
    fleet
        .nodes()
        .into_iter()
        .filter(|n| !except.contains(&n.as_str()))
        .collect()
}

/// Waits until every node of `members` holds exactly the other members as peers.
async fn full_mesh(fleet: &Fleet, members: &[String]) {
    let ok = fleet
        .wait_for(MESH_WAIT, |f| {
            members
                .iter()
                .all(|n| {
                    let want: Vec<String> = members.iter().filter(|m| *m != n).cloned().collect();
                    f.mesh_peers(n).as_ref() == Some(&want)
                })
                .then_some(())
        })
        .await;
    let got: Vec<(String, Option<Vec<String>>)> = members
        .iter()
        .map(|n| (n.clone(), fleet.mesh_peers(n)))
        .collect();
    assert!(
        ok.is_some(),
        "no full mesh of {members:?} within {MESH_WAIT:?}: {got:?} ({:?})",
        fleet.stats()
    );
}

/// Waits until no node holds `gone` as a peer.
async fn dropped_everywhere(fleet: &Fleet, gone: &str) {
    let ok = fleet
        .wait_for(MESH_WAIT, |f| {
            f.nodes()
                .iter()
                .all(|n| {
                    !f.mesh_peers(n)
                        .unwrap_or_default()
                        .iter()
                        .any(|p| p == gone)
                })
                .then_some(())
        })
        .await;
    let holders: Vec<String> = fleet
        .nodes()
        .into_iter()
        .filter(|n| {
            fleet
                .mesh_peers(n)
                .unwrap_or_default()
                .iter()
                .any(|p| p == gone)
        })
        .collect();
    assert!(
        ok.is_some(),
        "{gone} still held by {holders:?} after {MESH_WAIT:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_nodes_peer_within_their_quota_group_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Controller::start(dir.path()).await;
    // A second group with one node of its own.
    let (st, v) = ctl
        .send(
            reqwest::Method::PUT,
            "/v1/quota/isolated",
            serde_json::json!({"capacity_bps": 1_000_000_000u64}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = ctl
        .send(
            reqwest::Method::POST,
            "/v1/nodes",
            serde_json::json!({"name": "lone-0001", "group": "isolated"}),
        )
        .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let mut cfg = ctl.mesh_config(4);
    cfg.nodes.push(SimNode {
        name: "lone-0001".into(),
        scopes: vec![SimScope {
            scope: "egress".into(),
            rate_bps: 8_000_000,
        }],
    });
    let fleet = Fleet::start(cfg).await.expect("fleet starts");
    let group = others(&fleet, &["lone-0001"]);
    assert_eq!(group, ["sim-0001", "sim-0002", "sim-0003", "sim-0004"]);

    // (a) Each node of the default group holds exactly the other three.
    full_mesh(&fleet, &group).await;
    // Every key is distinct, and the controller recorded each one as reported.
    let keys: std::collections::BTreeSet<_> = fleet
        .nodes()
        .iter()
        .filter_map(|n| fleet.mesh_key(n))
        .collect();
    assert_eq!(keys.len(), 5);
    let node = ctl.get("/v1/nodes/sim-0001").await;
    assert_eq!(
        node["mesh"]["public_key"].as_str(),
        Some(
            fleet
                .mesh_key("sim-0001")
                .expect("key")
                .to_string()
                .as_str()
        ),
        "{node}"
    );
    assert_eq!(
        node["mesh"]["allowed_ips"],
        serde_json::json!(["198.18.128.1/32"]),
        "{node}"
    );

    // (b) The node of the other group has no peers and is nobody's peer.
    assert_eq!(fleet.mesh_peers("lone-0001"), Some(vec![]));
    for n in &group {
        let peers = fleet.mesh_peers(n).expect("mesh node");
        assert!(!peers.iter().any(|p| p == "lone-0001"), "{n}: {peers:?}");
    }

    // A rotation the operator asks for: the node answers with a new key, every peer
    // replaces the old one, and the set stays whole.
    let old = fleet.mesh_key("sim-0002").expect("key");
    let (st, v) = ctl
        .send(
            reqwest::Method::POST,
            "/v1/nodes/sim-0002/rotate-key",
            serde_json::json!({"reason": "test"}),
        )
        .await;
    assert_eq!(st, 202, "{v}");
    let replaced = fleet
        .wait_for(MESH_WAIT, |f| {
            let r = f.key_removed_by(old);
            (r.len() == 3).then_some(r)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "old key not replaced at every peer: {:?}",
                fleet.key_removed_by(old)
            )
        });
    assert_ne!(fleet.mesh_key("sim-0002"), Some(old));
    assert!(
        replaced.iter().all(|r| r.cause == "replaced"),
        "{replaced:?}"
    );
    full_mesh(&fleet, &group).await;

    let stats = fleet.stats();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert!(stats.mesh_updates >= 5, "{stats:?}");
    fleet.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_and_revocation_remove_a_node_from_every_peer_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Controller::start(dir.path()).await;
    let fleet = Fleet::start(ctl.mesh_config(4))
        .await
        .expect("fleet starts");
    let all = fleet.nodes();
    full_mesh(&fleet, &all).await;

    // (c) sim-0004 reports tampering: every other node drops its key, once each.
    let key = fleet.mesh_key("sim-0004").expect("key");
    fleet
        .tamper("sim-0004", "enclosure opened")
        .await
        .expect("tamper report sent");
    assert_eq!(
        fleet.mesh_peers("sim-0004"),
        Some(vec![]),
        "its own mesh is shut down"
    );
    dropped_everywhere(&fleet, "sim-0004").await;
    let removed = fleet
        .wait_for(MESH_WAIT, |f| {
            let r = f.key_removed_by(key);
            (r.len() >= 3).then_some(r)
        })
        .await
        .unwrap_or_else(|| panic!("removals of {key}: {:?}", fleet.key_removed_by(key)));
    let mut by: Vec<&str> = removed.iter().map(|r| r.node.as_str()).collect();
    by.sort_unstable();
    assert_eq!(by, ["sim-0001", "sim-0002", "sim-0003"], "{removed:?}");
    assert!(
        removed.iter().all(|r| r.cause.starts_with("withdrawn")),
        "withdrawn by the controller, not lapsed: {removed:?}"
    );
    let rest = others(&fleet, &["sim-0004"]);
    full_mesh(&fleet, &rest).await;
    // The controller marks it tampered and does not let it back (it does not try).
    let node = eventually("sim-0004 disconnected and tampered", || async {
        let n = ctl.get("/v1/nodes/sim-0004").await;
        (n["connected"] == false && !n["mesh"]["tampered"].is_null()).then_some(n)
    })
    .await;
    assert_eq!(
        node["mesh"]["tampered"]["reason"], "enclosure opened",
        "{node}"
    );
    eventually(
        "sim-0004's session ended on the node's side too",
        || async { (fleet.stats().connected == 3).then_some(()) },
    )
    .await;

    // (d) sim-0003's lease is revoked: it leaves its peers' sets.
    let id = fleet.lease("sim-0003", "egress").expect("lease held");
    let v = ctl
        .call(reqwest::Method::POST, &format!("/v1/leases/{id}/revoke"))
        .await;
    assert_eq!(v["state"], "revoked", "{v}");
    dropped_everywhere(&fleet, "sim-0003").await;
    let pair = ["sim-0001".to_string(), "sim-0002".to_string()];
    full_mesh(&fleet, &pair).await;
    assert_eq!(fleet.stats().errors, 0, "{:?}", fleet.stats());

    // The operator declares sim-0002 tampered: sim-0001 drops it; sim-0002's session is
    // cut and its reconnection refused, after which it stops trying.
    let key = fleet.mesh_key("sim-0002").expect("key");
    let (st, v) = ctl
        .send(
            reqwest::Method::POST,
            "/v1/nodes/sim-0002/tamper",
            serde_json::json!({"reason": "operator says so"}),
        )
        .await;
    assert!((200..300).contains(&st), "{st} {v}");
    dropped_everywhere(&fleet, "sim-0002").await;
    let removed = fleet.key_removed_by(key);
    assert!(
        removed
            .iter()
            .any(|r| r.node == "sim-0001" && r.cause.starts_with("withdrawn")),
        "{removed:?}"
    );
    let s = fleet
        .wait_for(MESH_WAIT, |f| (f.stats().connected == 2).then_some(()))
        .await;
    assert!(
        s.is_some(),
        "sim-0002 disconnected for good (sim-0001 and sim-0003 stay): {:?}",
        fleet.stats()
    );

    // It tries once more, is refused as tampered, and takes that as final: the refusal is
    // not counted as a failed reconnection.
    eventually("sim-0002's reconnection refused", || async {
        let e = ctl.get("/v1/events?kind=agent.refused&node=sim-0002").await;
        (!e["events"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let stats = fleet.stats();
    // Only the session the controller cut.
    assert_eq!(stats.errors, 1, "{stats:?}");
    fleet.stop().await;
    ctl.stop().await;
}
