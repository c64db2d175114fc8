//! `bench telemetry`: the controller's CPU and memory under simulated agents reporting
//! usage, on loopback (no testbed, no root).
//!
//! The controller is this binary's `controller` subcommand in its own process (so its
//! `/proc/PID` figures are its own), on a temporary data directory and free loopback ports;
//! the agents are a [`nicwarden_simfleet::Fleet`] in this process. Per agent count: start
//! the fleet (leases granted with a 1 h TTL, so renewals are rare), wait the warm-up,
//! measure over `--secs`, sample `GET /v1/telemetry/fleet`, stop the fleet and remove its
//! nodes. Every wait is bounded; the controller is killed and the directory removed on
//! every exit path (the guard's `Drop`), including Ctrl-C.

use anyhow::Context as _;
use nicwarden_simfleet::{numbered_nodes, Fleet, FleetConfig, GrantTemplate};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::BenchTelemetryArgs;
use crate::table::Table;

/// Traffic each simulated scope offers, and the lease it is granted.
const SCOPE_RATE_BPS: u64 = 100_000_000;
/// TTL of the granted leases: renewals (every TTL/3) stay out of the measurement.
const LEASE_TTL_S: f64 = 3600.0;
/// Fabric capacity of the bench controller: room for every lease of every count.
const FABRIC_CAPACITY_BPS: u64 = 1_000_000_000_000_000;
/// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: u64 = 100;
/// Samples of the fleet API's latency per count (the median is printed).
const API_SAMPLES: usize = 5;
/// Longest measurement of the idle baseline.
const IDLE_SECS: u64 = 10;

/// Runs on the runtime of `main` (this is called on a blocking thread).
pub fn run(args: BenchTelemetryArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Handle::current();
    rt.block_on(async move {
        tokio::select! {
            r = bench(args) => r,
            _ = crate::sim::interrupted() => anyhow::bail!("interrupted (controller stopped, temporary directory removed)"),
        }
    })
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    agents: u64,
    scopes: u64,
    reports_per_s: f64,
    cpu_percent: f64,
    /// CPU % per 1,000 reports/s.
    cpu_per_1k_reports: Option<f64>,
    rss_mib: f64,
    peak_rss_mib: f64,
    /// RSS above the idle baseline, per agent.
    rss_per_agent_kib: Option<f64>,
    /// Median latency of GET /v1/telemetry/fleet; None if not served.
    fleet_api_ms: Option<f64>,
    /// Bytes per second of the live event stream to one subscriber (a dashboard).
    stream_kib_per_s: f64,
    /// The controller's own count of its 1-second history (`nicwarden_telemetry_history_bytes`).
    history_mib: Option<f64>,
    errors: u64,
}

async fn bench(args: BenchTelemetryArgs) -> anyhow::Result<()> {
    let mut ctl = BenchController::start().await?;
    eprintln!(
        "bench telemetry: controller pid {} on {} (data in {})",
        ctl.pid(),
        ctl.api,
        ctl.dir.path().display()
    );
    let mut rows = Vec::new();

    // The idle baseline.
    let secs = args.secs.min(IDLE_SECS);
    eprintln!("bench telemetry: idle baseline, {secs} s");
    let m = ctl.measure(Duration::from_secs(secs), None).await?;
    let idle_rss = m.rss_kib;
    rows.push(m.row(0, 0, &ctl, idle_rss).await?);

    for &agents in &args.agents {
        let n = usize::try_from(agents).context("--agents")?;
        let scopes = usize::try_from(args.scopes).context("--scopes")?;
        let prefix = format!("bench{agents}");
        let mut cfg = FleetConfig::new(
            ctl.agent_addr.clone(),
            ctl.api.clone(),
            ctl.token.clone(),
            numbered_nodes(&prefix, n, scopes, SCOPE_RATE_BPS),
        );
        cfg.grant = Some(GrantTemplate {
            rate_bps: None,
            ttl_s: LEASE_TTL_S,
            volume_bytes: None,
        });
        let leases: usize = cfg.nodes.iter().map(|n| n.scopes.len()).sum();
        let names: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
        eprintln!("bench telemetry: {agents} agents, {leases} leases: starting");
        let t = Instant::now();
        let fleet = Fleet::start(cfg)
            .await
            .with_context(|| format!("start {agents} simulated agents"))?;
        eprintln!(
            "bench telemetry: {agents} agents up in {:.1} s; warm-up {} s, then {} s measured",
            t.elapsed().as_secs_f64(),
            args.warmup,
            args.secs
        );
        ctl.check_alive()?;
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let m = ctl
            .measure(Duration::from_secs(args.secs), Some(&fleet))
            .await;
        fleet.stop().await;
        let row = match m {
            Ok(m) => m.row(agents, args.scopes, &ctl, idle_rss).await?,
            Err(e) => return Err(e),
        };
        eprintln!(
            "bench telemetry: {agents} agents: {:.0} reports/s, CPU {:.1} %, RSS {:.1} MiB",
            row.reports_per_s, row.cpu_percent, row.rss_mib
        );
        rows.push(row);
        ctl.remove_nodes(&names).await?;
    }
    print(args.json, &rows);
    Ok(())
}

fn print(json: bool, rows: &[Row]) {
    let opt = |v: Option<f64>, prec: usize| match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "n/a".to_string(),
    };
    let mut t = Table::new(&[
        "agents",
        "scopes",
        "reports/s",
        "CPU %",
        "CPU % per 1k reports/s",
        "RSS MiB",
        "peak MiB",
        "RSS per agent KiB",
        "fleet API ms",
        "stream KiB/s",
        "history MiB",
        "errors",
    ]);
    for r in rows {
        t.row(vec![
            r.agents.to_string(),
            r.scopes.to_string(),
            format!("{:.0}", r.reports_per_s),
            format!("{:.1}", r.cpu_percent),
            opt(r.cpu_per_1k_reports, 1),
            format!("{:.1}", r.rss_mib),
            format!("{:.1}", r.peak_rss_mib),
            opt(r.rss_per_agent_kib, 1),
            opt(r.fleet_api_ms, 1),
            format!("{:.1}", r.stream_kib_per_s),
            opt(r.history_mib, 1),
            r.errors.to_string(),
        ]);
    }
    super::print(json, json!(rows), &t);
}

/// What one window measured.
struct Measurement {
    reports_per_s: f64,
    stream_bytes_per_s: f64,
    cpu_percent: f64,
    rss_kib: u64,
    hwm_kib: u64,
    errors: u64,
}

impl Measurement {
    async fn row(
        &self,
        agents: u64,
        scopes: u64,
        ctl: &BenchController,
        idle_rss_kib: u64,
    ) -> anyhow::Result<Row> {
        let fleet_api_ms = ctl.fleet_api_ms().await?;
        Ok(Row {
            agents,
            scopes,
            reports_per_s: self.reports_per_s,
            cpu_percent: self.cpu_percent,
            cpu_per_1k_reports: (self.reports_per_s > 0.0)
                .then(|| self.cpu_percent / (self.reports_per_s / 1000.0)),
            rss_mib: self.rss_kib as f64 / 1024.0,
            peak_rss_mib: self.hwm_kib as f64 / 1024.0,
            rss_per_agent_kib: (agents > 0)
                .then(|| (self.rss_kib as f64 - idle_rss_kib as f64) / agents as f64),
            fleet_api_ms,
            stream_kib_per_s: self.stream_bytes_per_s / 1024.0,
            history_mib: ctl.history_bytes().await?.map(|b| b / 1024.0 / 1024.0),
            errors: self.errors,
        })
    }
}

/// The controller process, its temporary data directory and an API client. Dropping it
/// kills the process and removes the directory.
struct BenchController {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    api: String,
    agent_addr: String,
    token: String,
    http: reqwest::Client,
}

impl Drop for BenchController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind an ephemeral port")?;
    Ok(l.local_addr().context("ephemeral port address")?.port())
}

impl BenchController {
    async fn start() -> anyhow::Result<BenchController> {
        let exe = std::env::current_exe().context("find this executable")?;
        let dir = tempfile::Builder::new()
            .prefix("nicwarden-bench-telemetry-")
            .tempdir()
            .context("create a temporary directory")?;
        let data = dir.path().join("controller");
        let log = dir.path().join("controller.log");
        let (agent_port, api_port) = (free_port()?, free_port()?);
        let agent_addr = format!("127.0.0.1:{agent_port}");
        let api = format!("http://127.0.0.1:{api_port}");
        let f = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(&exe)
            .arg("controller")
            .arg("--data-dir")
            .arg(&data)
            .args(["--agent-listen", &agent_addr])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .args(["--server-name", "127.0.0.1"])
            .args(["--fabric-capacity", &FABRIC_CAPACITY_BPS.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .with_context(|| format!("start the controller ({} controller)", exe.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .context("build the HTTP client")?;
        let mut ctl = BenchController {
            child,
            dir,
            log,
            api,
            agent_addr,
            token: String::new(),
            http,
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = ctl.http.get(format!("{}/healthz", ctl.api)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            ctl.check_alive()?;
            if start.elapsed() > Duration::from_secs(20) {
                anyhow::bail!(
                    "the controller's API did not answer within 20 s; its log:\n{}",
                    ctl.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token_file = data.join("operator.token");
        ctl.token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("read {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(ctl)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait().context("wait for the controller")? {
            anyhow::bail!(
                "the controller exited ({st}); its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// CPU time (user + system) of the controller process so far.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let p = format!("/proc/{}/stat", self.pid());
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {p}"))?;
        let ticks = parse_cpu_ticks(&text).with_context(|| format!("{p}: no utime/stime"))?;
        Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let p = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&p).with_context(|| format!("read {p}"))?;
        let rss = status_kib(&text, "VmRSS").with_context(|| format!("{p}: no VmRSS"))?;
        let hwm = status_kib(&text, "VmHWM").with_context(|| format!("{p}: no VmHWM"))?;
        Ok((rss, hwm))
    }

    /// CPU over `window`, memory at its end, reports the fleet sent during it.
    async fn measure(
        &self,
        window: Duration,
        fleet: Option<&Fleet>,
    ) -> anyhow::Result<Measurement> {
        let stats = || fleet.map(|f| f.stats()).unwrap_or_default();
        // One dashboard's worth of live stream is part of the load: subscribe first (from
        // the newest event, so no replay), count what arrives during the window.
        let mut stream = self
            .http
            .get(format!(
                "{}/v1/events/stream?since_id={}",
                self.api,
                self.last_event_id().await?
            ))
            .bearer_auth(&self.token)
            .timeout(window + Duration::from_secs(30))
            .send()
            .await
            .context("subscribe to the live event stream")?;
        anyhow::ensure!(
            stream.status().is_success(),
            "GET /v1/events/stream: {}",
            stream.status()
        );
        let (t0, cpu0, s0) = (Instant::now(), self.cpu()?, stats());
        let mut streamed = 0u64;
        let end = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(end, stream.chunk()).await {
                Err(_) => break,
                Ok(Ok(Some(c))) => streamed += c.len() as u64,
                Ok(Ok(None)) => anyhow::bail!("the live event stream ended during the measurement"),
                Ok(Err(e)) => return Err(e).context("read the live event stream"),
            }
        }
        drop(stream);
        let (t1, cpu1, s1) = (Instant::now(), self.cpu()?, stats());
        let (rss_kib, hwm_kib) = self.memory()?;
        let dt = (t1 - t0).as_secs_f64();
        Ok(Measurement {
            reports_per_s: (s1.reports_sent - s0.reports_sent) as f64 / dt,
            stream_bytes_per_s: streamed as f64 / dt,
            cpu_percent: (cpu1.saturating_sub(cpu0)).as_secs_f64() / dt * 100.0,
            rss_kib,
            hwm_kib,
            errors: s1.errors - s0.errors,
        })
    }

    /// The newest event id (the stream then starts with live frames only).
    async fn last_event_id(&self) -> anyhow::Result<u64> {
        let url = format!("{}/v1/events?limit=1", self.api);
        let v: serde_json::Value = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .error_for_status()
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: JSON"))?;
        Ok(v["last_id"].as_u64().unwrap_or(0))
    }

    /// `nicwarden_telemetry_history_bytes` from the controller's `/metrics`.
    async fn history_bytes(&self) -> anyhow::Result<Option<f64>> {
        let url = format!("{}/metrics", self.api);
        let text = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}: body"))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("nicwarden_telemetry_history_bytes "))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Median latency of `GET /v1/telemetry/fleet`, or None if the route is not served.
    async fn fleet_api_ms(&self) -> anyhow::Result<Option<f64>> {
        let url = format!("{}/v1/telemetry/fleet", self.api);
        let mut samples = Vec::with_capacity(API_SAMPLES);
        for _ in 0..API_SAMPLES {
            let t = Instant::now();
            let r = self
                .http
                .get(&url)
                .bearer_auth(&self.token)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            let status = r.status();
            let _ = r.bytes().await.with_context(|| format!("read GET {url}"))?;
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            anyhow::ensure!(status.is_success(), "GET {url}: {status}");
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(Some(super::median(&samples)))
    }

    /// Removes the nodes of a finished count (their leases are revoked with them), so the
    /// next count's controller holds only its own nodes.
    async fn remove_nodes(&self, names: &[String]) -> anyhow::Result<()> {
        use futures::StreamExt as _;
        eprintln!("bench telemetry: removing {} nodes", names.len());
        let results: Vec<anyhow::Result<()>> =
            futures::stream::iter(names.iter().map(|n| async move {
                let url = format!("{}/v1/nodes/{n}", self.api);
                let r = self
                    .http
                    .delete(&url)
                    .bearer_auth(&self.token)
                    .send()
                    .await
                    .with_context(|| format!("DELETE {url}"))?;
                anyhow::ensure!(r.status().is_success(), "DELETE {url}: {}", r.status());
                Ok(())
            }))
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// utime + stime (fields 14 and 15) of `/proc/PID/stat`, in clock ticks. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the last
/// `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:     1234 kB` -> 1234.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        let stat = "4242 (nicwarden (x) y) S 1 2 3 4 5 6 7 8 9 10 1234 567 1 2 20 0 8 0 99\n";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
        let status = "Name:\tnicwarden\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }
}
