//! The live operator commands against a real controller process fed by a small simulated
//! fleet (real agent protocol, `nicwarden-simfleet`): `top --once`, `events`, `lease
//! renew`, and `events --follow --json` over the event stream, through a revocation and a
//! controller restart. Every wait is for a condition, with a deadline.

use crate::harness::{free_port, Ctl, BIN};
use nicwarden_simfleet::{numbered_nodes, Fleet, FleetConfig, GrantTemplate};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;

const NODES: usize = 3;
/// What each simulated node sends, under a lease of twice that.
const RATE_BPS: u64 = 50_000_000;
const LEASED_BPS: u64 = 2 * RATE_BPS;

fn node(i: usize) -> String {
    format!("cli-{i:04}")
}

/// The binary with a clean `NICWARDEN_*` environment and quiet logs.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("NICWARDEN_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "off").args(args).kill_on_drop(true);
    cmd
}

/// The operator options for `ctl`.
fn api_args(ctl: &Ctl) -> Vec<String> {
    vec![
        "--api".into(),
        ctl.api(),
        "--token-file".into(),
        ctl.dir.join("operator.token").display().to_string(),
    ]
}

/// Runs a command to its end (within 30 s); returns (success, stdout, stderr).
async fn run(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), command(args).output())
        .await
        .unwrap_or_else(|_| panic!("nicwarden {args:?} did not finish within 30 s"))
        .expect("run nicwarden");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs an operator command against `ctl`, which must succeed; returns its stdout.
async fn op(ctl: &Ctl, args: &[&str]) -> String {
    let api = api_args(ctl);
    let all: Vec<&str> = args
        .iter()
        .copied()
        .chain(api.iter().map(String::as_str))
        .collect();
    let (ok, out, err) = run(&all).await;
    assert!(ok, "nicwarden {args:?} failed:\n{err}\n{out}");
    out
}

/// Runs `args` until `check` accepts the output, or panics after `limit` with the last one.
async fn op_until(ctl: &Ctl, args: &[&str], limit: Duration, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let out = op(ctl, args).await;
        if check(&out) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nicwarden {args:?}: not as expected within {limit:?}; last output:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running `events --follow --json`: its stdout read line by line, its stderr kept.
struct Follower {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    printed: Vec<String>,
}

impl Follower {
    fn spawn(args: &[String]) -> Follower {
        let mut child = command(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nicwarden events --follow");
        let stdout = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Follower {
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
            printed: Vec::new(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Reads lines until one (a JSON event) satisfies `pred`; returns it.
    async fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(Ok(None)) => panic!(
                    "events --follow exited ({:?}) before printing {what}; it printed:\n{}\nstderr:\n{}",
                    self.child.try_wait(),
                    self.printed.join("\n"),
                    self.stderr()
                ),
                Ok(Err(e)) => panic!("read the output of events --follow: {e}"),
                Err(_) => panic!(
                    "events --follow did not print {what} within {limit:?}; it printed:\n{}\nstderr:\n{}",
                    self.printed.join("\n"),
                    self.stderr()
                ),
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("events --follow --json printed a non-JSON line {line:?}: {e}")
            });
            self.printed.push(line);
            if pred(&v) {
                return v;
            }
        }
    }
}

fn is_event(v: &Value, kind: &str, lease_id: u64) -> bool {
    v["kind"] == kind && v["lease_id"] == lease_id
}

/// The active egress lease of `node` (id, renewals).
async fn egress_lease(ctl: &Ctl, node: &str) -> (u64, u64) {
    let (st, v) = ctl
        .call("GET", &format!("/v1/leases?node={node}&state=active"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    let lease = v
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["terms"]["scope"]["kind"] == "egress"))
        .unwrap_or_else(|| panic!("no active egress lease for {node}: {v}"));
    (
        lease["id"].as_u64().expect("lease id"),
        lease["renewals"].as_u64().expect("renewals"),
    )
}

/// The value of `key` in `lease show`-style output (`renewals     1`).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .filter(|rest| rest.starts_with(' '))
            .map(str::trim)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_events_renew_and_follow_against_a_simulated_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ctl = Ctl::start(&dir.path().join("ctl")).await;
    let mut cfg = FleetConfig::new(
        format!("127.0.0.1:{}", ctl.agent_port),
        ctl.api(),
        ctl.token(),
        numbered_nodes("cli", NODES, 1, RATE_BPS),
    );
    cfg.grant = Some(GrantTemplate {
        rate_bps: Some(LEASED_BPS),
        ttl_s: 60.0,
        volume_bytes: None,
    });
    let fleet = Fleet::start(cfg).await.expect("start the simulated fleet");

    // top --once: every node active, measured at the rate it sends (once the controller
    // has two reports of each), the header with the counts and the controller's URL.
    op_until(&ctl, &["top", "--once"], Duration::from_secs(30), |out| {
        let header = format!("nicwarden top  {}", ctl.api());
        out.starts_with(&header)
            && out.contains(&format!("nodes {NODES}  active {NODES}  stale 0"))
            && (1..=NODES).all(|i| {
                out.lines().any(|l| {
                    l.starts_with(&format!("{} ", node(i)))
                        && l.contains(" active ")
                        && l.contains("100 Mbit/s  50 Mbit/s (50%)")
                        && !l.contains("STALE")
                })
            })
    })
    .await;
    // Sorting and filtering reach the table.
    let out = op(
        &ctl,
        &["top", "--once", "--filter", &node(2), "--sort", "rate"],
    )
    .await;
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("cli-")).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(rows[0].starts_with(&node(2)), "{out}");
    assert!(
        out.contains("sort: rate  filter: \"cli-0002\"  matching: 1"),
        "{out}"
    );

    // events --kind lease: the grants, and nothing but lease events.
    let out = op(&ctl, &["events", "--kind", "lease"]).await;
    let mut lines = out.lines();
    let header = lines.next().expect("a header");
    assert!(
        header.starts_with("TIME      SEVERITY  KIND") && header.ends_with("MESSAGE"),
        "{out}"
    );
    let rows: Vec<&str> = lines.collect();
    for i in 1..=NODES {
        assert!(
            rows.iter()
                .any(|l| l.contains(" lease.granted ") && l.contains(&node(i))),
            "no grant for {}:\n{out}",
            node(i)
        );
    }
    assert!(rows.iter().all(|l| l.contains(" lease.")), "{out}");
    // Times are HH:MM:SS.
    assert!(
        rows.iter().all(|l| {
            let t = l.as_bytes();
            t.len() > 8 && t[2] == b':' && t[5] == b':' && t[8] == b' '
        }),
        "{out}"
    );

    // lease renew: prints the lease, renewals counted up.
    let (id, before) = egress_lease(&ctl, &node(1)).await;
    let out = op(&ctl, &["lease", "renew", &id.to_string()]).await;
    assert!(
        out.starts_with(&format!("renewed lease {id} (egress on {})\n", node(1))),
        "{out}"
    );
    let renewals: u64 = field(&out, "renewals")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no renewals line:\n{out}"));
    assert!(renewals > before, "renewals {before} -> {renewals}:\n{out}");
    assert!(egress_lease(&ctl, &node(1)).await.1 >= renewals);

    // events --follow --json: the listing first, then live events as they happen.
    let mut args: Vec<String> = ["events", "--follow", "--json", "--kind", "lease"]
        .map(String::from)
        .to_vec();
    args.extend(api_args(&ctl));
    let mut follow = Follower::spawn(&args);
    follow
        .wait_for("the operator's renewal", Duration::from_secs(20), |v| {
            is_event(v, "lease.renewed", id)
        })
        .await;
    let (st, v) = ctl
        .call(
            "POST",
            &format!("/v1/leases/{id}/revoke"),
            Some(json!({"reason": "live_cli test"})),
        )
        .await;
    assert_eq!(st, 200, "revoke: {v}");
    let revoked = follow
        .wait_for("lease.revoked", Duration::from_secs(20), |v| {
            is_event(v, "lease.revoked", id)
        })
        .await;
    assert_eq!(revoked["node"], node(1).as_str());
    assert_eq!(revoked["severity"], "warning");

    // A revoked lease cannot be renewed: the controller's 409 message, verbatim.
    let api = api_args(&ctl);
    let mut renew: Vec<&str> = vec!["lease", "renew"];
    let id_s = id.to_string();
    renew.push(&id_s);
    renew.extend(api.iter().map(String::as_str));
    let (ok, _, err) = run(&renew).await;
    assert!(!ok);
    assert!(
        err.contains("409: ") && err.contains("not active") && err.contains("live_cli test"),
        "{err}"
    );

    // The controller restarts (its memory of events starts afresh): the follower reconnects,
    // says so on stderr, and prints the new controller's events.
    ctl.kill9();
    ctl.restart().await;
    let v = ctl
        .grant(json!({"node": node(1), "scope": "egress", "rate_bps": 10_000_000u64, "ttl_s": 60}))
        .await;
    let new_id = v["id"].as_u64().expect("lease id");
    follow
        .wait_for(
            "the grant after the restart",
            Duration::from_secs(30),
            |v| is_event(v, "lease.granted", new_id),
        )
        .await;
    let err = follow.stderr();
    assert!(err.contains("reconnect"), "{err}");
    assert!(err.contains("restarted"), "{err}");
    follow.child.kill().await.expect("kill events --follow");

    // A wrong token file is named in the 401 message.
    let bad = dir.path().join("wrong.token");
    std::fs::write(&bad, "not-the-token\n").expect("write token file");
    let bad_s = bad.display().to_string();
    let (ok, _, err) = run(&["events", "--api", &ctl.api(), "--token-file", &bad_s]).await;
    assert!(!ok);
    assert!(err.contains("401") && err.contains(&bad_s), "{err}");

    let stats = fleet.stats();
    fleet.stop().await;
    assert_eq!(stats.nodes, NODES);
}

#[tokio::test]
async fn live_commands_name_an_unreachable_controller() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["top", "--once"][..],
        &["events"][..],
        &["events", "--follow"][..],
        &["lease", "renew", "1"][..],
    ] {
        let mut all = args.to_vec();
        all.extend(["--api", &url, "--token", "t"]);
        let (ok, out, err) = run(&all).await;
        assert!(!ok, "{all:?} succeeded:\n{out}");
        assert!(
            err.contains(&format!("cannot reach the operator API at {url}")),
            "{all:?}:\n{err}"
        );
    }
}
