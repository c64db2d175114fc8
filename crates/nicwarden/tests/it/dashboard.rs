//! The dashboard in headless Chromium: `tests/browser/dashboard.test.mjs` (Playwright, run by
//! Node's test runner) against a real controller process fed by 1,000 simulated agents that
//! speak the real agent protocol (`nicwarden-simfleet`). Screenshots of every step are kept
//! in `target/test-artifacts/dashboard/`.
//!
//! Chromium and the npm packages are installed by `make test` (scripts/deps.sh); without
//! them this test fails and says how to get them.

use crate::harness::Ctl;
use nicwarden_simfleet::{Fleet, FleetConfig, GrantTemplate, SimNode, SimScope};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Nodes in the fleet: the page must stay usable with this many.
const NODES: usize = 1000;
/// What the simulated node that the chart test looks at sends.
const RATE_BPS: u64 = 100_000_000;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chromium() -> String {
    std::env::var("NW_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn prerequisites() {
    let browser = root().join("tests/browser");
    let how = "run `make test`, or `NICWARDEN_DEPS=test scripts/deps.sh` (as root), which installs chromium, node and tests/browser's npm packages";
    assert!(
        Path::new(&chromium()).exists(),
        "the dashboard's browser tests need Chromium at {}: {how}",
        chromium()
    );
    assert!(
        browser.join("node_modules/playwright-core").exists(),
        "the dashboard's browser tests need playwright-core in {}: {how}",
        browser.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the dashboard's browser tests need Node.js (`node`): {how}"
    );
}

fn name(i: usize) -> String {
    format!("sim-{i:04}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_with_1000_live_nodes() {
    prerequisites();
    // 1,000 agents and a browser load both cores: not beside a rate measurement.
    let _alone = crate::harness::MACHINE.write().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = Ctl::start(dir.path()).await;
    // Room for 1,000 nodes' leases (the default fabric is 100 Gbit/s).
    for q in ["fabric", "default"] {
        let (st, v) = ctl
            .call(
                "PUT",
                &format!("/v1/quota/{q}"),
                Some(json!({"capacity_bps": 10_000_000_000_000u64})),
            )
            .await;
        assert_eq!(st, 200, "raise the {q} quota: {v}");
    }

    // 1,000 nodes, each with an egress lease of 200 Mbit/s and offering 100 Mbit/s; every
    // fourth also a peer scope, so the topology has node-to-node edges.
    let nodes: Vec<SimNode> = (1..=NODES)
        .map(|i| {
            let mut scopes = vec![SimScope {
                scope: "egress".into(),
                rate_bps: RATE_BPS,
            }];
            if i % 4 == 0 {
                scopes.push(SimScope {
                    scope: format!("peer:{}", name(i % NODES + 1)),
                    rate_bps: RATE_BPS / 10,
                });
            }
            SimNode {
                name: name(i),
                scopes,
            }
        })
        .collect();
    let mut cfg = FleetConfig::new(
        format!("127.0.0.1:{}", ctl.agent_port),
        ctl.api(),
        ctl.token(),
        nodes,
    );
    cfg.grant = Some(GrantTemplate {
        rate_bps: Some(2 * RATE_BPS),
        ttl_s: 60.0,
        volume_bytes: None,
    });
    let started = Instant::now();
    let fleet = Fleet::start(cfg).await.expect("start the simulated fleet");
    eprintln!(
        "dashboard test: {NODES} simulated nodes up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A node whose agent never connects: its row must stand out as stale.
    let stale = "zz-stale";
    ctl.add_node(stale).await;
    ctl.grant(json!({"node": stale, "rate_bps": 10_000_000u64, "ttl_s": 60}))
        .await;

    // Wait until the controller measures the fed rate for the node the chart test reads.
    let watched = name(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = ctl.call("GET", "/v1/telemetry/fleet", None).await;
        assert_eq!(st, 200, "{v}");
        let rate = v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node"] == watched.as_str()))
            .and_then(|n| n["rate_bps"].as_f64())
            .unwrap_or(0.0);
        if (rate - RATE_BPS as f64).abs() < RATE_BPS as f64 * 0.01 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not measure {RATE_BPS} bit/s for {watched} within 30 s (last {rate})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let artifacts = root().join("target/test-artifacts/dashboard");
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).expect("create the artifacts directory");
    let expect = json!({
        "node": watched,
        "scope": "egress",
        "rate_bps": RATE_BPS,
        "revoke_node": name(3),
        "stale_node": stale,
        "large": true,
    });
    let mut child = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .arg(root().join("tests/browser/dashboard.test.mjs"))
        .env("NW_URL", ctl.api())
        .env("NW_TOKEN", ctl.token())
        .env("NW_ARTIFACTS", &artifacts)
        .env("NW_EXPECT", expect.to_string())
        .env("NW_CHROMIUM", chromium())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run node --test tests/browser/dashboard.test.mjs");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s).await;
        s
    };
    let (out, err, status) = tokio::join!(
        read(Box::new(stdout)),
        read(Box::new(stderr)),
        tokio::time::timeout(Duration::from_secs(300), child.wait())
    );
    let stats = fleet.stats();
    fleet.stop().await;
    let status = status
        .unwrap_or_else(|_| panic!("browser tests did not finish within 300 s:\n{out}\n{err}"))
        .expect("wait for node");
    std::fs::write(artifacts.join("node-test-output.txt"), &out).expect("save the test output");
    assert!(
        status.success(),
        "browser tests failed ({status}); screenshots in {}:\n{out}\n{err}",
        artifacts.display()
    );
    // Every test ran (none skipped) and passed.
    assert!(
        out.contains("# pass 8"),
        "expected 8 passing browser tests:\n{out}"
    );
    assert!(out.contains("# skipped 0"), "{out}");
    let shots = std::fs::read_dir(&artifacts)
        .expect("artifacts")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert!(
        shots >= 7,
        "one screenshot per test at least, found {shots}"
    );
    assert_eq!(
        stats.errors, 0,
        "simulated fleet errors: {:?}",
        stats.last_error
    );
}
