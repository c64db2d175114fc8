//! The simulated fleet against a real controller, in-process: enrollment, sessions, grants,
//! usage that grows at the set rate and stops at 0, renewals, revocation. Every wait is on
//! an event (an API answer, the fleet's counters) with a bounded deadline.

mod mesh;

use nicwarden_controller::ControllerConfig;
use nicwarden_simfleet::{numbered_nodes, Fleet, FleetConfig, GrantTemplate, SimError};
use serde_json::Value;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Longest any single wait may take.
const DEADLINE: Duration = Duration::from_secs(30);

struct Controller {
    api: String,
    agent: String,
    dir: PathBuf,
    http: reqwest::Client,
    ctl: nicwarden_controller::InProcess,
}

impl Controller {
    async fn start(dir: &std::path::Path) -> Controller {
        let ctl = nicwarden_controller::InProcess::start(ControllerConfig {
            data_dir: dir.to_path_buf(),
            ..ControllerConfig::default()
        })
        .await
        .expect("start the controller");
        Controller {
            api: ctl.api.clone(),
            agent: ctl.agent.to_string(),
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
            ctl,
        }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("operator.token"))
            .expect("operator token")
            .trim()
            .to_string()
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(self.token())
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("request");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.expect("JSON")
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path).await
    }

    /// `usage.bytes` of a lease, as the controller recorded it.
    async fn bytes(&self, id: u64) -> u64 {
        self.get(&format!("/v1/leases/{id}")).await["usage"]["bytes"]
            .as_u64()
            .expect("usage.bytes")
    }

    async fn stop(self) {
        self.ctl
            .stop()
            .await
            .expect("the controller stops cleanly within 10 s");
    }

    fn fleet_config(&self, nodes: usize, scopes: usize) -> FleetConfig {
        let mut cfg = FleetConfig::new(
            self.agent.clone(),
            self.api.clone(),
            self.token(),
            numbered_nodes("sim", nodes, scopes, 8_000_000),
        );
        cfg.report_interval = Duration::from_millis(200);
        cfg
    }
}

/// Polls `probe` until it yields a value; panics naming `what` after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the fleet has sent `rounds` more reports per node than now.
async fn report_rounds(fleet: &Fleet, rounds: u64) {
    let s = fleet.stats();
    let want = s.reports_sent + rounds * s.nodes as u64;
    eventually("more usage reports", || async {
        (fleet.stats().reports_sent >= want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_enrolls_reports_renews_and_obeys_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Controller::start(dir.path()).await;
    let mut cfg = ctl.fleet_config(3, 2);
    // A short TTL, so the test also sees leases kept alive by renewals.
    cfg.grant = Some(GrantTemplate {
        rate_bps: None,
        ttl_s: 3.0,
        volume_bytes: None,
    });
    let fleet = Fleet::start(cfg).await.expect("fleet starts");
    let names = fleet.nodes();
    assert_eq!(names, ["sim-0001", "sim-0002", "sim-0003"]);

    // Every node is connected, as the controller sees it.
    eventually("every node connected in GET /v1/nodes", || async {
        let nodes = ctl.get("/v1/nodes").await;
        let all = nodes
            .as_array()?
            .iter()
            .filter(|n| n["connected"] == true)
            .count();
        (all == 3).then_some(())
    })
    .await;
    assert_eq!(fleet.stats().connected, 3);

    // Every scope holds the lease start() granted; the controller lists the same ones.
    let mut leases = Vec::new();
    for n in &names {
        for s in ["egress".to_string(), format!("peer:{}", next(n))] {
            let id = fleet.lease(n, &s).expect("granted lease held");
            assert_eq!(fleet.scope_state(n, &s).as_deref(), Some("active"));
            leases.push((n.clone(), s, id));
        }
    }
    let listed = ctl.get("/v1/leases?state=active").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(6), "{listed}");

    // Usage grows for every lease.
    let mut before = Vec::new();
    for (_, _, id) in &leases {
        let id = *id;
        before.push(
            eventually("usage recorded", || async {
                let b = ctl.bytes(id).await;
                (b > 0).then_some(b)
            })
            .await,
        );
    }
    for ((_, _, id), b) in leases.iter().zip(&before) {
        eventually("usage grows", || async {
            (ctl.bytes(*id).await > *b).then_some(())
        })
        .await;
    }

    // The rate the controller derives from the reports' sample times is the set rate.
    eventually(
        "the controller measures 8 Mbit/s in every scope",
        || async {
            let fleet = ctl.get("/v1/telemetry/fleet").await;
            let rates: Vec<f64> = fleet["nodes"]
                .as_array()?
                .iter()
                .flat_map(|n| n["scopes"].as_array().into_iter().flatten())
                .filter_map(|s| s["rate_bps"].as_f64())
                .collect();
            (rates.len() == 6 && rates.iter().all(|r| (r - 8e6).abs() <= 8e6 * 0.001)).then_some(())
        },
    )
    .await;

    // Rate 0: the scope's usage stops; another scope's keeps growing meanwhile.
    let (stopped_node, stopped_scope, stopped_id) = leases[0].clone();
    let witness = leases[2].2;
    fleet
        .set_rate(&stopped_node, &stopped_scope, 0)
        .expect("configured scope");
    report_rounds(&fleet, 3).await;
    let frozen = ctl.bytes(stopped_id).await;
    let witness_before = ctl.bytes(witness).await;
    report_rounds(&fleet, 3).await;
    assert_eq!(ctl.bytes(stopped_id).await, frozen, "rate 0: no growth");
    assert!(
        ctl.bytes(witness).await > witness_before,
        "others keep going"
    );
    assert!(matches!(
        fleet.set_rate(&stopped_node, "peer:nobody", 1),
        Err(SimError::UnknownScope { .. })
    ));
    assert!(matches!(
        fleet.set_rate("ghost", "egress", 1),
        Err(SimError::UnknownNode(_))
    ));

    // Leases outlive their 3 s TTL: every node renews them (each lease every second; by
    // the third round the first issuance has lapsed).
    eventually("three rounds of renewals", || async {
        (fleet.stats().renewals_sent >= 18).then_some(())
    })
    .await;
    for (n, s, id) in &leases {
        assert_eq!(fleet.lease(n, s), Some(*id), "{n} {s} still held");
    }

    // A revocation reaches the node: no lease held, reported as revoked, usage frozen.
    let (rev_node, rev_scope, rev_id) = leases[3].clone();
    let v = ctl
        .call(
            reqwest::Method::POST,
            &format!("/v1/leases/{rev_id}/revoke"),
        )
        .await;
    assert_eq!(v["state"], "revoked", "{v}");
    eventually("the node drops the revoked lease", || async {
        (fleet.lease(&rev_node, &rev_scope).is_none()).then_some(())
    })
    .await;
    assert_eq!(
        fleet.scope_state(&rev_node, &rev_scope).as_deref(),
        Some("revoked")
    );
    report_rounds(&fleet, 2).await;
    let at_revocation = ctl.bytes(rev_id).await;
    report_rounds(&fleet, 2).await;
    assert_eq!(ctl.bytes(rev_id).await, at_revocation);

    // 6 grants + 1 revocation + the renewals answered.
    eventually("renewed leases received", || async {
        (fleet.stats().directives >= 7 + 18).then_some(())
    })
    .await;
    let stats = fleet.stats();
    assert_eq!(stats.nodes, 3);
    assert_eq!(stats.errors, 0, "{stats:?}");
    fleet.stop().await;
    eventually("every node disconnected", || async {
        let nodes = ctl.get("/v1/nodes").await;
        let any = nodes.as_array()?.iter().any(|n| n["connected"] == true);
        (!any).then_some(())
    })
    .await;
    ctl.stop().await;
}

/// `sim-0001` -> `sim-0002` (wrapping over the three nodes).
fn next(n: &str) -> String {
    let i: usize = n.trim_start_matches("sim-").parse().expect("numbered");
    format!("sim-{:04}", i % 3 + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_clearly_naming_the_node_and_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Controller::start(dir.path()).await;
    // Not added, and not known to the controller: no join token.
    let mut cfg = ctl.fleet_config(2, 1);
    cfg.add_nodes = false;
    let err = Fleet::start(cfg).await.err().expect("refused").to_string();
    assert!(err.contains("node sim-000"), "{err}");
    assert!(
        err.contains("get a join token") && err.contains("404"),
        "{err}"
    );

    // A grant the quota does not allow: the error names node and scope.
    let mut cfg = ctl.fleet_config(1, 1);
    cfg.grant = Some(GrantTemplate {
        rate_bps: Some(u64::MAX / 2),
        ttl_s: 30.0,
        volume_bytes: None,
    });
    let err = Fleet::start(cfg).await.err().expect("refused").to_string();
    assert!(
        err.contains("node sim-0001: grant a lease on egress"),
        "{err}"
    );

    // Nodes that exist already get fresh tokens and enroll again.
    let fleet = Fleet::start(ctl.fleet_config(1, 1))
        .await
        .expect("re-enrolls");
    assert_eq!(fleet.stats().connected, 1);
    fleet.stop().await;
    ctl.stop().await;
}
