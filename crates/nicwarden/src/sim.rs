//! `nicwarden sim`: a simulated fleet ([`nicwarden_simfleet`]) against a running controller,
//! with a progress line while it starts and a live line per second while it runs.

use anyhow::Context as _;
use nicwarden_simfleet::{
    numbered_nodes, Fleet, FleetConfig, FleetStats, GrantTemplate, Progress, StartProgress,
};
use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::SimArgs;
use crate::client::DEFAULT_TOKEN_FILE;
use crate::units;

/// Without a TTY, a progress line this often while starting.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let token = operator_token(args.token.as_deref(), args.token_file.as_deref())?;
    let nodes = usize::try_from(args.nodes).context("--nodes")?;
    let scopes = usize::try_from(args.scopes).context("--scopes")?;
    let mut cfg = FleetConfig::new(
        &args.agent_addr,
        &args.api,
        token,
        numbered_nodes(&args.prefix, nodes, scopes, args.rate),
    );
    cfg.report_interval = args.report_interval;
    cfg.concurrency = usize::try_from(args.concurrency).context("--concurrency")?;
    if args.grant {
        cfg.grant = Some(GrantTemplate {
            rate_bps: None,
            ttl_s: args.ttl.as_secs_f64(),
            volume_bytes: None,
        });
    }
    let per_node = cfg.nodes.first().map_or(0, |n| n.scopes.len());
    eprintln!(
        "sim: {nodes} nodes ({}-0001..), {per_node} scopes each offering {}{}, controller {} / {}",
        args.prefix,
        units::fmt_rate(args.rate),
        if args.grant {
            format!(
                ", leases of {}",
                units::fmt_millis(args.ttl.as_millis() as u64)
            )
        } else {
            String::new()
        },
        args.agent_addr,
        args.api,
    );

    let progress = Arc::new(StartProgress::default());
    let tty = std::io::stderr().is_terminal();
    let printer = tokio::spawn(print_progress(progress.clone(), tty));
    let started = Instant::now();
    let fleet = tokio::select! {
        r = Fleet::start_with_progress(cfg, progress.clone()) => r,
        _ = interrupted() => {
            printer.abort();
            // Dropping the half-started fleet tells its nodes to stop.
            anyhow::bail!("interrupted while starting");
        }
    };
    printer.abort();
    if tty {
        eprint!("\r\x1b[2K");
    }
    let fleet = fleet.context("start the simulated fleet")?;
    eprintln!(
        "sim: {} started in {:.1}s",
        progress_line(&progress.snapshot()),
        started.elapsed().as_secs_f64()
    );

    let result = live(&fleet, args.secs).await;
    let stats = fleet.stats();
    fleet.stop().await;
    eprintln!(
        "sim: stopped; {} reports, {} directives, {} renewals sent, {} errors{}",
        stats.reports_sent,
        stats.directives,
        stats.renewals_sent,
        stats.errors,
        stats
            .last_error
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    );
    result
}

/// Prints a line per second until `secs` (0: forever) or Ctrl-C.
async fn live(fleet: &Fleet, secs: u64) -> anyhow::Result<()> {
    let start = tokio::time::Instant::now();
    let end = (secs > 0).then(|| start + Duration::from_secs(secs));
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev = (start, fleet.stats());
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        let deadline = async {
            match end {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => {
                eprintln!("sim: Ctrl-C, stopping");
                return Ok(());
            }
            _ = deadline => return Ok(()),
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let s = fleet.stats();
                println!("{}", live_line(now - start, now - prev.0, &prev.1, &s));
                let _ = std::io::stdout().flush();
                prev = (now, s);
            }
        }
    }
}

fn live_line(t: Duration, dt: Duration, prev: &FleetStats, s: &FleetStats) -> String {
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt.as_secs_f64().max(1e-3);
    let mut line = format!(
        "{:>5}s  connected {}/{}  reports/s {:.0}  directives/s {:.0}  renewals/s {:.0}  errors {}",
        t.as_secs(),
        s.connected,
        s.nodes,
        per_s(prev.reports_sent, s.reports_sent),
        per_s(prev.directives, s.directives),
        per_s(prev.renewals_sent, s.renewals_sent),
        s.errors
    );
    if s.errors > prev.errors {
        if let Some(e) = &s.last_error {
            line.push_str(&format!("  (last: {e})"));
        }
    }
    line
}

fn progress_line(p: &Progress) -> String {
    let mut line = format!(
        "{}/{} added, {}/{} enrolled, {}/{} connected",
        p.added, p.nodes, p.enrolled, p.nodes, p.connected, p.nodes
    );
    if p.grants > 0 {
        line.push_str(&format!(", {}/{} leases granted", p.granted, p.grants));
    }
    line
}

/// Redraws the progress line on a TTY (5 times a second); otherwise prints it every few
/// seconds. Runs until aborted.
async fn print_progress(progress: Arc<StartProgress>, tty: bool) {
    let every = if tty {
        Duration::from_millis(200)
    } else {
        PROGRESS_EVERY
    };
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let line = progress_line(&progress.snapshot());
        if tty {
            eprint!("\r\x1b[2Ksim: {line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("sim: {line}");
        }
    }
}

/// Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// `--token` wins over `--token-file`; with neither, the controller's default token file.
fn operator_token(token: Option<&str>, file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(t) = token {
        return Ok(t.trim().to_string());
    }
    let path = file.unwrap_or(Path::new(DEFAULT_TOKEN_FILE));
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "read the operator token from {} (pass --token-file <data_dir>/operator.token or --token)",
            path.display()
        )
    })?;
    let t = text.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        anyhow::bail!("operator token file {} is empty", path.display());
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let p = Progress {
            nodes: 10,
            added: 10,
            enrolled: 9,
            connected: 8,
            grants: 40,
            granted: 0,
        };
        assert_eq!(
            progress_line(&p),
            "10/10 added, 9/10 enrolled, 8/10 connected, 0/40 leases granted"
        );
        let a = FleetStats {
            nodes: 10,
            connected: 10,
            reports_sent: 100,
            ..FleetStats::default()
        };
        let b = FleetStats {
            reports_sent: 110,
            errors: 1,
            last_error: Some("node x: boom".into()),
            ..a.clone()
        };
        assert_eq!(
            live_line(Duration::from_secs(7), Duration::from_secs(1), &a, &b),
            "    7s  connected 10/10  reports/s 10  directives/s 0  renewals/s 0  errors 1  (last: node x: boom)"
        );
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("operator.token");
        std::fs::write(&f, "abc\n").expect("write");
        assert_eq!(operator_token(Some(" t "), Some(&f)).expect("flag"), "t");
        assert_eq!(operator_token(None, Some(&f)).expect("file"), "abc");
        let missing = dir.path().join("nope");
        let err = operator_token(None, Some(&missing)).expect_err("missing");
        assert!(format!("{err:#}").contains("--token-file"), "{err:#}");
    }
}
