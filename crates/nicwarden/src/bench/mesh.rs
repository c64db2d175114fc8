//! `bench mesh`: how fast a tampered node leaves the encrypted mesh, on loopback (no
//! testbed, no root).
//!
//! A controller runs in this process ([`nicwarden_controller::InProcess`], a temporary data
//! directory, ephemeral ports) with a [`nicwarden_simfleet::Fleet`] of `--agents` mesh nodes
//! in one quota group, each with a 1 h egress lease: a full mesh. Each run picks another
//! node, takes `t0`, raises a tamper event (the node's own report on its session, or the
//! operator's `POST /v1/nodes/NAME/tamper`), and waits until every peer's mesh state
//! machine has removed the node's key; the fleet records the instant of each removal. Every
//! wait is bounded (start, full mesh, each run); the controller stops and the directory is
//! removed on every exit path, including Ctrl-C.

use anyhow::Context as _;
use nicwarden_controller::{ControllerConfig, InProcess};
use nicwarden_simfleet::{numbered_nodes, Fleet, FleetConfig, GrantTemplate, StartProgress, WgKey};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::cli::BenchMeshArgs;
use crate::table::Table;

/// Traffic each simulated node offers on its egress scope, and the lease it is granted.
const SCOPE_RATE_BPS: u64 = 100_000_000;
/// TTL of the granted leases: no lease lapses during the bench.
const LEASE_TTL_S: f64 = 3600.0;
/// Fabric capacity of the bench controller: room for every lease.
const FABRIC_CAPACITY_BPS: u64 = 1_000_000_000_000_000;
/// Longest wait for the full mesh after the fleet is up.
const FULL_MESH_WAIT: Duration = Duration::from_secs(600);
/// Longest wait for every peer to remove a tampered node's key, and for steady state.
const RUN_WAIT: Duration = Duration::from_secs(60);
/// How often the progress line is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Runs on the runtime of `main` (this is called on a blocking thread).
pub fn run(args: BenchMeshArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Handle::current();
    rt.block_on(async move {
        tokio::select! {
            r = bench(args) => r,
            _ = crate::sim::interrupted() => anyhow::bail!("interrupted (controller stopped, temporary directory removed)"),
        }
    })
}

/// How the tamper event was raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// The node's own `tamper` message on its session.
    NodeReported,
    /// `POST /v1/nodes/NAME/tamper`.
    OperatorDeclared,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::NodeReported => "node-reported",
            Kind::OperatorDeclared => "operator-declared",
        }
    }
}

/// One run: a node tampered, its peers' removal latencies (ms after t0).
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    kind: Kind,
    node: String,
    peers: usize,
    /// Time for the event itself: the report queued on the session, or the API's answer.
    raise_ms: f64,
    first_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The last peer: the node is out of the whole mesh.
    last_ms: f64,
}

/// min / median / max of the runs' last-peer latency, per kind.
#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    kind: Kind,
    runs: usize,
    min_ms: f64,
    median_ms: f64,
    max_ms: f64,
}

async fn bench(args: BenchMeshArgs) -> anyhow::Result<()> {
    let agents = usize::try_from(args.agents).context("--agents")?;
    let reps = usize::try_from(args.reps).context("--reps")?;
    // Every run removes one node for good; keep at least two peers for the last run.
    anyhow::ensure!(
        agents >= 2 * reps + 3,
        "--agents {agents} is too few for 2 x --reps {reps} tampered nodes: at least {} needed",
        2 * reps + 3
    );
    let dir = tempfile::Builder::new()
        .prefix("nicwarden-bench-mesh-")
        .tempdir()
        .context("create a temporary directory")?;
    let ctl = InProcess::start(ControllerConfig {
        data_dir: dir.path().join("controller"),
        fabric_capacity_bps: FABRIC_CAPACITY_BPS,
        // No periodic key rotation during the bench.
        mesh_key_rotation_secs: 0,
        ..ControllerConfig::default()
    })
    .await
    .context("start the in-process controller")?;
    let r = measure(&args, agents, reps, &ctl).await;
    if let Err(e) = ctl.stop().await {
        eprintln!("bench mesh: the controller did not stop cleanly: {e:#}");
    }
    let (runs, summary) = r?;
    print(args.json, &runs, &summary);
    Ok(())
}

async fn measure(
    args: &BenchMeshArgs,
    agents: usize,
    reps: usize,
    ctl: &InProcess,
) -> anyhow::Result<(Vec<Run>, Vec<Summary>)> {
    let token_file = ctl.data_dir.join("operator.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("read {}", token_file.display()))?
        .trim()
        .to_string();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .context("build the HTTP client")?;
    header(agents, reps);

    let mut cfg = FleetConfig::new(
        ctl.agent.to_string(),
        ctl.api.clone(),
        token.clone(),
        numbered_nodes("mesh", agents, 1, SCOPE_RATE_BPS),
    );
    cfg.mesh = true;
    cfg.grant = Some(GrantTemplate {
        rate_bps: None,
        ttl_s: LEASE_TTL_S,
        volume_bytes: None,
    });
    let progress = Arc::new(StartProgress::default());
    let t = Instant::now();
    let fleet = {
        let start = Fleet::start_with_progress(cfg, progress.clone());
        tokio::pin!(start);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut start => break r.with_context(|| format!("start {agents} simulated agents"))?,
                _ = tick.tick() => {
                    let p = progress.snapshot();
                    eprintln!(
                        "bench mesh: {}/{} enrolled, {}/{} connected, {}/{} leases granted",
                        p.enrolled, p.nodes, p.connected, p.nodes, p.granted, p.grants
                    );
                }
            }
        }
    };
    eprintln!(
        "bench mesh: {agents} agents up and leased in {:.1} s; waiting for the full mesh ({} peer entries)",
        t.elapsed().as_secs_f64(),
        agents * (agents - 1)
    );
    let r = runs(args, reps, &fleet, &http, &ctl.api, &token).await;
    let stats = fleet.stats();
    fleet.stop().await;
    let runs = r?;
    if stats.errors > 0 {
        eprintln!(
            "bench mesh: {} errors in the fleet (the operator-declared runs each cut one session); last: {}",
            stats.errors,
            stats.last_error.unwrap_or_default()
        );
    }
    let summary = [Kind::NodeReported, Kind::OperatorDeclared]
        .into_iter()
        .filter_map(|k| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.kind == k)
                .map(|r| r.last_ms)
                .collect();
            (!v.is_empty()).then(|| Summary {
                kind: k,
                runs: v.len(),
                min_ms: super::min(&v),
                median_ms: super::median(&v),
                max_ms: super::max(&v),
            })
        })
        .collect();
    Ok((runs, summary))
}

/// The method and the machine, on stderr before anything runs.
fn header(agents: usize, reps: usize) {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = read("/proc/loadavg");
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    eprintln!(
        "bench mesh: {agents} simulated agents in one group (full mesh), {reps} runs per kind of tamper event;\n\
         \x20 t0 just before the event, latency = each peer's removal of the key - t0 (in-process controller and agents)\n\
         \x20 machine: {cpus} CPUs ({model}), kernel {}, load average {}; {} build",
        read("/proc/sys/kernel/osrelease").trim(),
        load.join(" "),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
}

/// Waits until every node of `live` holds exactly the other `live` nodes as peers.
async fn steady(fleet: &Fleet, live: &[String], wait: Duration) -> anyhow::Result<()> {
    let want = live.len() - 1;
    let t = Instant::now();
    let mut last_print = Instant::now();
    let ok = fleet
        .wait_for(wait, |f| {
            let done = live
                .iter()
                .filter(|n| f.mesh_peer_count(n) == Some(want))
                .count();
            if last_print.elapsed() >= PROGRESS_EVERY {
                last_print = Instant::now();
                eprintln!(
                    "bench mesh: {done}/{} nodes hold all {want} peers ({:.0} s)",
                    live.len(),
                    t.elapsed().as_secs_f64()
                );
            }
            (done == live.len()).then_some(())
        })
        .await;
    if ok.is_none() {
        let short: Vec<String> = live
            .iter()
            .filter(|n| fleet.mesh_peer_count(n) != Some(want))
            .take(5)
            .map(|n| format!("{n}: {:?}", fleet.mesh_peer_count(n)))
            .collect();
        anyhow::bail!(
            "the mesh did not settle within {} s: nodes short of {want} peers (first 5): {}; fleet: {:?}",
            wait.as_secs(),
            short.join(", "),
            fleet.stats()
        );
    }
    Ok(())
}

async fn runs(
    args: &BenchMeshArgs,
    reps: usize,
    fleet: &Fleet,
    http: &reqwest::Client,
    api: &str,
    token: &str,
) -> anyhow::Result<Vec<Run>> {
    let mut live = fleet.nodes();
    let t = Instant::now();
    steady(fleet, &live, FULL_MESH_WAIT).await?;
    eprintln!(
        "bench mesh: full mesh in {:.1} s ({} mesh updates applied); settling {} s",
        t.elapsed().as_secs_f64(),
        fleet.stats().mesh_updates,
        args.secs
    );
    tokio::time::sleep(Duration::from_secs(args.secs)).await;

    // Targets spread over the fleet, alternating kinds.
    let n = live.len();
    let targets: Vec<(Kind, String)> = (0..2 * reps)
        .map(|k| {
            let kind = if k % 2 == 0 {
                Kind::NodeReported
            } else {
                Kind::OperatorDeclared
            };
            (
                kind,
                live[(k * n / (2 * reps) + n / (4 * reps)) % n].clone(),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(targets.len());
    for (i, (kind, node)) in targets.into_iter().enumerate() {
        let key = fleet
            .mesh_key(&node)
            .with_context(|| format!("{node} has no mesh key"))?;
        live.retain(|n| *n != node);
        let run = one_run(fleet, http, api, token, kind, &node, key, &live).await?;
        eprintln!(
            "bench mesh: run {}/{}: {} tamper of {node}: last of {} peers after {:.1} ms (p50 {:.1} ms, p99 {:.1} ms)",
            i + 1,
            2 * reps,
            kind.name(),
            run.peers,
            run.last_ms,
            run.p50_ms,
            run.p99_ms
        );
        out.push(run);
        // Steady state before the next run: the rest still a full mesh.
        steady(fleet, &live, RUN_WAIT).await?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn one_run(
    fleet: &Fleet,
    http: &reqwest::Client,
    api: &str,
    token: &str,
    kind: Kind,
    node: &str,
    key: WgKey,
    peers: &[String],
) -> anyhow::Result<Run> {
    // Removals of this key before the event (none expected) are not the event's.
    let before = fleet.key_removal_count(key);
    let t0 = Instant::now();
    match kind {
        Kind::NodeReported => fleet
            .tamper(node, "bench mesh")
            .await
            .with_context(|| format!("tamper {node}"))?,
        Kind::OperatorDeclared => {
            let r = http
                .post(format!("{api}/v1/nodes/{node}/tamper"))
                .bearer_auth(token)
                .json(&json!({"reason": "bench mesh"}))
                .send()
                .await
                .with_context(|| format!("POST /v1/nodes/{node}/tamper"))?;
            let status = r.status();
            anyhow::ensure!(
                status.is_success(),
                "POST /v1/nodes/{node}/tamper: {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
    }
    let raised = t0.elapsed();
    let want = peers.len();
    let counted = |f: &Fleet| {
        f.key_removed_by(key)
            .into_iter()
            .filter(|r| r.node != node && r.at >= t0)
            .collect::<Vec<_>>()
    };
    // The count is cheap; the full list is read once, at the end.
    let done = fleet
        .wait_for(RUN_WAIT, |f| {
            (f.key_removal_count(key) >= before + want).then_some(())
        })
        .await;
    let removed = counted(fleet);
    if done.is_none() || removed.len() < want {
        let holding: Vec<&String> = peers
            .iter()
            .filter(|p| !removed.iter().any(|r| r.node == **p))
            .take(5)
            .collect();
        anyhow::bail!(
            "{} tamper of {node}: only {}/{want} peers removed its key within {} s (still holding, first 5: {holding:?})",
            kind.name(),
            removed.len(),
            RUN_WAIT.as_secs()
        );
    }
    let mut ms: Vec<f64> = removed
        .iter()
        .map(|r| (r.at - t0).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(Run {
        kind,
        node: node.to_string(),
        peers: ms.len(),
        raise_ms: raised.as_secs_f64() * 1000.0,
        first_ms: ms[0],
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        last_ms: ms[ms.len() - 1],
    })
}

/// The nearest-rank percentile of sorted values; 0 for none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print(json: bool, runs: &[Run], summary: &[Summary]) {
    if json {
        println!("{}", json!({"runs": runs, "summary": summary}));
        return;
    }
    let mut t = Table::new(&[
        "run", "event", "node", "peers", "event ms", "first ms", "p50 ms", "p99 ms", "last ms",
    ]);
    for (i, r) in runs.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            r.kind.name().to_string(),
            r.node.clone(),
            r.peers.to_string(),
            format!("{:.1}", r.raise_ms),
            format!("{:.1}", r.first_ms),
            format!("{:.1}", r.p50_ms),
            format!("{:.1}", r.p99_ms),
            format!("{:.1}", r.last_ms),
        ]);
    }
    print!("{}", t.render());
    println!();
    let mut s = Table::new(&["event", "runs", "last peer: min ms", "median ms", "max ms"]);
    for r in summary {
        s.row(vec![
            r.kind.name().to_string(),
            r.runs.to_string(),
            format!("{:.1}", r.min_ms),
            format!("{:.1}", r.median_ms),
            format!("{:.1}", r.max_ms),
        ]);
    }
    print!("{}", s.render());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.0), 1.0);
    }
}
