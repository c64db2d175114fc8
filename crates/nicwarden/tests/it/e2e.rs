//! End-to-end tests of the control plane: a real controller and real agents on loopback.

use crate::harness::*;
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(15);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

async fn connected(a: &Agent) {
    a.wait_status("connected", T, |s| s["connected"] == true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_grant_renew_revoke() {
    let root = tmp();
    let ctl = Ctl::start(&root.path().join("ctl")).await;
    let t1 = ctl.add_node("node1").await;
    let t2 = ctl.add_node("node2").await;
    let a1 = Agent::start(&ctl, root.path(), "node1", Some(&t1));
    let a2 = Agent::start(&ctl, root.path(), "node2", Some(&t2));
    connected(&a1).await;
    connected(&a2).await;

    // Before any lease: fail closed.
    let s = a1.status().await.expect("status");
    assert_eq!(state_of(&s, "egress"), "pending");
    let e = &Agent::scope(&s, "egress").expect("egress scope")["enforce"];
    assert_eq!(e["mode"], "floor");
    assert_eq!(e["rate_bps"], 0);

    // Grant: node1 active at 200 Mbit/s, renewed before the deadline.
    let l = ctl
        .grant(json!({"node": "node1", "rate_bps": 200_000_000u64, "ttl_s": 3, "renew_s": 1}))
        .await;
    let id = l["id"].as_u64().expect("lease id");
    let s = a1
        .wait_status("lease active", T, |s| state_of(s, "egress") == "active")
        .await;
    let d = Agent::scope(&s, "egress").expect("egress");
    assert_eq!(d["enforce"]["mode"], "allow");
    assert_eq!(d["enforce"]["rate_bps"], 200_000_000u64);
    let seq0 = s["last_seq"].as_u64().expect("seq");
    // Renewals keep it active past its 3 s TTL with growing sequence numbers.
    a1.wait_status("two renewals", T, |s| {
        s["last_seq"].as_u64().unwrap_or(0) >= seq0 + 2
    })
    .await;
    let s = a1
        .wait_status("still active after ttl", T, |s| {
            state_of(s, "egress") == "active" && s["last_seq"].as_u64().unwrap_or(0) >= seq0 + 3
        })
        .await;
    assert_eq!(state_of(&s, "egress"), "active");
    // node2 is untouched.
    assert_eq!(
        state_of(&a2.status().await.expect("status"), "egress"),
        "pending"
    );

    // Revoke: node1 at its floor within one second of the API call returning.
    let t0 = Instant::now();
    let (st, v) = ctl
        .call(
            "POST",
            &format!("/v1/leases/{id}/revoke"),
            Some(json!({"reason": "test"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "revoked");
    let s = a1
        .wait_status("revoked", Duration::from_secs(1), |s| {
            state_of(s, "egress") == "revoked"
        })
        .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_eq!(
        Agent::scope(&s, "egress").expect("egress")["enforce"]["mode"],
        "floor"
    );
    // Revoking again is a clear conflict.
    let (st, v) = ctl
        .call("POST", &format!("/v1/leases/{id}/revoke"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("not active"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_one_time_and_expire() {
    let root = tmp();
    let ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    let a1 = Agent::start(&ctl, root.path(), "node1", Some(&tok));
    connected(&a1).await;

    // The same token again, from another data dir: refused, and the agent exits with why.
    let mut again = Agent::start_in(
        &ctl,
        root.path().join("again"),
        "node1",
        Some(&tok),
        free_port(),
    );
    let st = again.proc.wait_exit(T).await;
    assert!(!st.success());
    assert!(
        again.proc.log_text().contains("already used"),
        "{}",
        again.proc.log_text()
    );

    // A token for node2 cannot enroll node3.
    let tok2 = ctl.add_node("node2").await;
    let _ = ctl.add_node("node3").await;
    let mut wrong = Agent::start(&ctl, root.path(), "node3", Some(&tok2));
    assert!(!wrong.proc.wait_exit(T).await.success());
    assert!(
        wrong.proc.log_text().contains("is for node node2"),
        "{}",
        wrong.proc.log_text()
    );

    // An expired token is refused.
    let (st, v) = ctl
        .call(
            "POST",
            "/v1/nodes",
            Some(json!({"name": "node4", "token_ttl_s": 1})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let tok4 = v["join_token"].as_str().expect("token").to_string();
    let expires = v["token_expires_at_unix_ms"].as_u64().expect("expiry");
    // Wait for the token's own expiry time to pass (the thing under test is wall time).
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    while now_ms() <= expires {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut late = Agent::start(&ctl, root.path(), "node4", Some(&tok4));
    assert!(!late.proc.wait_exit(T).await.success());
    assert!(
        late.proc.log_text().contains("expired"),
        "{}",
        late.proc.log_text()
    );

    // A garbage token is a clear local error.
    let mut bad = Agent::start(&ctl, root.path(), "node2", Some("not-a-token"));
    assert!(!bad.proc.wait_exit(T).await.success());
    assert!(
        bad.proc.log_text().contains("join token"),
        "{}",
        bad.proc.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_agent_reaches_floor_at_its_deadline() {
    let root = tmp();
    let mut ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    let a1 = Agent::start(&ctl, root.path(), "node1", Some(&tok));
    connected(&a1).await;
    ctl.grant(json!({"node": "node1", "rate_bps": 50_000_000u64, "ttl_s": 3, "renew_s": 1}))
        .await;
    a1.wait_status("active", T, |s| state_of(s, "egress") == "active")
        .await;

    ctl.kill9();
    // The agent notices, keeps its lease until its own deadline...
    let s = a1
        .wait_status("disconnected", T, |s| s["connected"] == false)
        .await;
    let seen = Instant::now();
    let d = Agent::scope(&s, "egress").expect("egress");
    assert_eq!(
        d["state"], "active",
        "lease must survive the controller: {s}"
    );
    let deadline_in = d["deadline_in_ms"].as_u64().expect("deadline_in_ms");
    assert!(
        deadline_in <= 3000,
        "deadline beyond the ttl: {deadline_in}"
    );
    let predicted = seen + Duration::from_millis(deadline_in);
    // Slack for the status round trips on a loaded 2-core machine; a lease lapsing a renewal
    // interval (1 s) early or late would still fail by far.
    let slack = Duration::from_millis(200);
    // ...then falls to the floor at it: never earlier, never (much) later.
    let mut last_active = seen;
    let flipped = loop {
        let s = a1.status().await.expect("status");
        let now = Instant::now();
        match state_of(&s, "egress").as_str() {
            "active" => last_active = now,
            "expired" => break now,
            other => panic!("unexpected state {other}: {s}"),
        }
        assert!(
            now < predicted + Duration::from_secs(2),
            "still active long after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        last_active <= predicted + slack,
        "reported active {:?} after its deadline",
        last_active.saturating_duration_since(predicted)
    );
    assert!(
        flipped + slack >= predicted,
        "fell to the floor {:?} before its deadline",
        predicted.saturating_duration_since(flipped)
    );
    let s = a1.status().await.expect("status");
    let d = Agent::scope(&s, "egress").expect("egress");
    assert_eq!(d["enforce"]["mode"], "floor");
    assert!(
        a1.proc.log_text().contains("lease expired"),
        "the log says so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_keeps_state_and_never_double_grants() {
    let root = tmp();
    let mut ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    ctl.add_node("node2").await;
    let a1 = Agent::start(&ctl, root.path(), "node1", Some(&tok));
    connected(&a1).await;
    let l1 = ctl
        .grant(json!({"node": "node1", "rate_bps": 10_000_000u64, "ttl_s": 30, "volume_bytes": 1_000_000u64}))
        .await;
    let l2 = ctl
        .grant(json!({"node": "node2", "rate_bps": 20_000_000u64}))
        .await;
    let (_, v) = ctl
        .call("POST", &format!("/v1/leases/{}/revoke", l2["id"]), None)
        .await;
    assert_eq!(v["state"], "revoked");
    a1.wait_status("active", T, |s| state_of(s, "egress") == "active")
        .await;
    let seq_before = a1.status().await.expect("status")["last_seq"]
        .as_u64()
        .expect("seq");

    ctl.kill9();
    ctl.restart().await;

    // Leases, the revocation and the nodes are all still there.
    let (_, v) = ctl
        .call("GET", &format!("/v1/leases/{}", l1["id"]), None)
        .await;
    assert_eq!(v["state"], "active", "{v}");
    assert_eq!(v["terms"]["volume_bytes"], 1_000_000u64);
    let (_, v) = ctl
        .call("GET", &format!("/v1/leases/{}", l2["id"]), None)
        .await;
    assert_eq!(v["state"], "revoked", "{v}");
    let (_, v) = ctl.call("GET", "/v1/nodes/node1", None).await;
    assert_eq!(v["enrolled"], true, "{v}");
    // The agent reconnects with its old certificate and is resynchronised (fresh seq).
    a1.wait_status("resynced", T, |s| {
        s["connected"] == true && s["last_seq"].as_u64().unwrap_or(0) > seq_before
    })
    .await;
    // One active lease per scope still holds after restart: no double grant.
    let (st, v) = ctl
        .call(
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 1000})),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    // Lease ids continue; they are never reused.
    let l3 = ctl
        .grant(json!({"node": "node2", "rate_bps": 1_000_000u64}))
        .await;
    assert!(l3["id"].as_u64() > l2["id"].as_u64(), "{l3}");
    // The audit chain survived the crash intact.
    let (_, v) = ctl.call("GET", "/v1/audit/verify", None).await;
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_leases_are_rejected() {
    // The controller's lease-signing key is swapped (as if an attacker held the TLS
    // identity but not the pinned lease key): the agent must refuse every lease it signs.
    let root = tmp();
    let mut ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    let a1 = Agent::start(&ctl, root.path(), "node1", Some(&tok));
    connected(&a1).await;
    ctl.kill9();
    let key = ctl.dir.join("lease-signing.key");
    std::fs::remove_file(&key).expect("remove lease key");
    ctl.restart().await; // creates a new, different lease key
    connected(&a1).await;
    ctl.grant(json!({"node": "node1", "rate_bps": 1_000_000u64}))
        .await;
    let s = a1
        .wait_status("rejection", T, |s| {
            s["rejected_directives"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    assert_eq!(state_of(&s, "egress"), "pending", "{s}");
    assert!(
        a1.proc.log_text().contains("bad signature"),
        "{}",
        a1.proc.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_leases_are_rejected_even_after_agent_restart() {
    // Roll the controller back to an old copy of its store: it re-sends leases with
    // sequence numbers the agent has already seen. The agent, which persisted its replay
    // guard, must refuse them, also after its own restart.
    let root = tmp();
    let mut ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    let mut a1 = Agent::start(&ctl, root.path(), "node1", Some(&tok));
    connected(&a1).await;
    // A long TTL, so the lease is still active in the old copy when it is restored;
    // renewals every second move the sequence numbers on.
    ctl.grant(json!({"node": "node1", "rate_bps": 1_000_000u64, "ttl_s": 60, "renew_s": 0.5}))
        .await;
    a1.wait_status("active", T, |s| state_of(s, "egress") == "active")
        .await;
    ctl.kill9();
    let snap = root.path().join("snap");
    std::fs::create_dir_all(&snap).expect("mkdir");
    for f in ["nicwarden.db", "nicwarden.db-wal", "nicwarden.db-shm"] {
        let p = ctl.dir.join(f);
        if p.exists() {
            std::fs::copy(&p, snap.join(f)).expect("snapshot");
        }
    }
    ctl.restart().await;
    let seq_then = a1
        .wait_status("reconnected", T, |s| s["connected"] == true)
        .await["last_seq"]
        .as_u64()
        .expect("seq");
    a1.wait_status("renewals", T, |s| {
        s["last_seq"].as_u64().unwrap_or(0) >= seq_then + 4
    })
    .await;
    ctl.kill9();
    for f in ["nicwarden.db", "nicwarden.db-wal", "nicwarden.db-shm"] {
        let _ = std::fs::remove_file(ctl.dir.join(f));
        if snap.join(f).exists() {
            std::fs::copy(snap.join(f), ctl.dir.join(f)).expect("restore");
        }
    }
    a1.restart(&ctl);
    ctl.restart().await;
    let s = a1
        .wait_status("replay rejected", T, |s| {
            s["rejected_directives"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    // What the agent enforces is the last issuance it accepted before the roll-back (it
    // holds it across its own restart), never one of the replayed ones.
    let last_seq = s["last_seq"].as_u64().expect("last_seq");
    assert!(last_seq >= seq_then + 4, "the replay guard went back: {s}");
    let egress = Agent::scope(&s, "egress").expect("egress");
    if egress["state"] == "active" {
        assert_eq!(egress["seq"].as_u64(), Some(last_seq), "{s}");
    }
    assert!(
        a1.proc
            .log_text()
            .contains("not greater than the last accepted"),
        "{}",
        a1.proc.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_volume_stays_spent_across_agent_restart() {
    let root = tmp();
    let ctl = Ctl::start(&root.path().join("ctl")).await;
    let tok = ctl.add_node("node1").await;
    // Simulated counters: 80 Mbit/s offered, so a 1 MB volume is spent in about 0.1 s.
    let dir = root.path().join("agent-node1");
    let port = free_port();
    let mut a1 = Agent::start_in(&ctl, dir.clone(), "node1", Some(&tok), port);
    connected(&a1).await;
    a1.proc.kill9();
    // Enrolled; now run it with simulated counters.
    let args: Vec<String> = [
        "agent",
        "--node",
        "node1",
        "--data-dir",
        &dir.display().to_string(),
        "--controller",
        &ctl.agent_url(),
        "--status-listen",
        &format!("127.0.0.1:{port}"),
        "--counters",
        "simulated:80000000",
        "--datapath",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a1.proc = Proc::spawn(&args, dir.with_extension("log-sim"));
    connected(&a1).await;
    let l = ctl
        .grant(json!({"node": "node1", "rate_bps": 100_000_000u64, "volume_bytes": 1_000_000u64}))
        .await;
    a1.wait_status("exhausted", T, |s| state_of(s, "egress") == "exhausted")
        .await;
    // The controller learns the usage from the agent's reports.
    let id = l["id"].as_u64().expect("id");
    let mut used = 0;
    for _ in 0..250 {
        let (_, v) = ctl.call("GET", &format!("/v1/leases/{id}"), None).await;
        used = v["usage"]["bytes"].as_u64().unwrap_or(0);
        if v["volume_exhausted"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(used >= 1_000_000, "controller saw {used} bytes");
    // Restart the agent (with the `none` counter source: it counts nothing itself).
    a1.restart(&ctl);
    let s = a1
        .wait_status("resynced", T, |s| {
            s["connected"] == true && state_of(s, "egress") != "pending"
        })
        .await;
    assert_eq!(state_of(&s, "egress"), "exhausted", "{s}");
    assert_eq!(
        Agent::scope(&s, "egress").expect("egress")["enforce"]["mode"],
        "floor"
    );
}
