//! `nicwarden`: one binary for the controller, the node agent, and the operator commands.
//!
//! - `nicwarden controller` / `nicwarden agent` load a TOML config, apply command-line
//!   overrides, validate everything before binding a port, then run the library's event loop.
//! - `nicwarden agent status` reads the local agent's status endpoint.
//! - `nicwarden node|lease|quota|audit` drive the controller's operator API (HTTP/JSON with
//!   a bearer token) and print tables, or the raw JSON with `--json`; `nicwarden events`
//!   (optionally following the live event stream) and `nicwarden top` (a live fleet table)
//!   are the live views of the same API.
//! - `nicwarden demo` / `nicwarden bench` build a namespaced testbed (root) and run the
//!   whole system / the benchmarks (shaping, backends, scale, volume, latency) on it;
//!   `nicwarden traffic` is the bounded traffic generator and sink.
//! - `nicwarden sim` runs simulated agents (real protocol) against a controller;
//!   `nicwarden bench telemetry` measures a controller under them, on loopback.
//!
//! Errors print as `error: ...` on stderr with exit status 1; usage errors exit with 2.

#![forbid(unsafe_code)]

mod agent_status;
mod bench;
mod cli;
mod client;
mod demo;
mod live_cli;
mod ops;
mod sim;
mod table;
mod topology_cli;
mod traffic;
mod units;

use anyhow::Context as _;
use clap::Parser as _;
use nicwarden_agent::config::AgentConfig;
use nicwarden_controller::config::ControllerConfig;
use std::process::ExitCode;

use cli::{AgentRunArgs, AgentSub, Cli, Command, ControllerArgs};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (never in this binary) would fail; nothing to do about it then.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The config file (or defaults) with the command-line overrides applied, validated.
pub fn controller_config(args: &ControllerArgs) -> anyhow::Result<ControllerConfig> {
    let mut cfg = match &args.config {
        Some(path) => ControllerConfig::from_file(path)?,
        None => ControllerConfig::default(),
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(a) = args.agent_listen {
        cfg.agent_listen = a;
    }
    if let Some(a) = args.api_listen {
        cfg.api_listen = a;
    }
    if !args.server_names.is_empty() {
        cfg.server_names = args.server_names.clone();
    }
    if let Some(c) = args.fabric_capacity {
        cfg.fabric_capacity_bps = c;
    }
    if let Some(a) = &args.fabric_algorithm {
        cfg.fabric_algorithm = a.clone();
    }
    if let Some(ms) = args.topology_probe_interval {
        cfg.topology_probe_interval_ms = ms;
    }
    if !args.topology_revoke.is_empty() {
        cfg.topology_revoke = args.topology_revoke.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The agent's config file (or defaults) with the command-line overrides applied, validated.
pub fn agent_config(args: &AgentRunArgs) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &args.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    if let Some(n) = &args.node {
        cfg.node = n.clone();
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(c) = &args.controller {
        cfg.controller = c.clone();
    }
    if let Some(t) = &args.token {
        cfg.join_token = Some(t.trim().to_string());
    }
    if let Some(s) = args.status_listen {
        cfg.status_listen = s;
    }
    if let Some(c) = &args.counters {
        cfg.counters = c.clone();
    }
    if let Some(d) = &args.datapath {
        cfg.datapath.backend = d.clone();
    }
    if let Some(p) = &args.bpf_pin_dir {
        cfg.datapath.bpf_pin_dir = Some(p.clone());
    }
    if let Some(i) = &args.fabric_iface {
        cfg.datapath.fabric_iface = i.clone();
    }
    for (node, nets) in &args.peers {
        cfg.datapath.peers.insert(node.clone(), nets.clone());
    }
    if let Some(a) = args.mesh_address {
        cfg.mesh.address = Some(a);
        cfg.mesh.enabled = true;
    }
    if let Some(e) = args.mesh_endpoint {
        cfg.mesh.endpoint = Some(e);
        cfg.mesh.enabled = true;
    }
    if args.mesh_encrypted_only {
        cfg.mesh.encrypted_only = true;
    }
    if let Some(m) = args.mesh_mtu {
        cfg.mesh.mtu = m;
    }
    if let Some(w) = &args.tamper_watch {
        cfg.tamper.watch = Some(w.clone());
    }
    if let Some(s) = &args.tamper_socket {
        cfg.tamper.socket = Some(s.clone());
    }
    if let Some(ms) = args.probe_interval {
        cfg.probe.interval_ms = ms;
    }
    if args.no_probe {
        cfg.probe.enabled = false;
    }
    if let Some(w) = args.byte_window {
        cfg.probe.byte_window_ms = w;
    }
    cfg.validate()?;
    Ok(cfg)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Controller(args) => {
            let cfg = controller_config(&args)?;
            init_tracing();
            tracing::info!(
                api = %cfg.api_listen,
                agents = %cfg.agent_listen,
                data_dir = %cfg.data_dir.display(),
                "starting controller"
            );
            nicwarden_controller::run(cfg).await.context("controller")
        }
        Command::Agent(agent) => match agent.command {
            Some(AgentSub::Status(args)) => agent_status::run(args).await,
            Some(AgentSub::Tamper(args)) => {
                let out = nicwarden_agent::tamper::report(&args.socket, &args.reason).await?;
                println!("agent: {out}");
                Ok(())
            }
            None if agent.run.cleanup => {
                let cfg = agent_config(&agent.run)?;
                init_tracing();
                nicwarden_agent::cleanup(&cfg).context("agent --cleanup")
            }
            None => {
                let cfg = agent_config(&agent.run)?;
                init_tracing();
                tracing::info!(
                    node = %cfg.node,
                    controller = %cfg.controller,
                    status = %cfg.status_listen,
                    "starting agent"
                );
                nicwarden_agent::run(cfg).await.context("agent")
            }
        },
        Command::Node(cmd) => ops::node(cmd).await,
        Command::Lease(cmd) => ops::lease(cmd).await,
        Command::Quota(cmd) => ops::quota(cmd).await,
        Command::Topology(cmd) => topology_cli::topology(cmd).await,
        Command::Audit(cmd) => ops::audit(cmd).await,
        Command::Events(args) => live_cli::events(args).await,
        Command::Top(args) => live_cli::top(args).await,
        // These run their own threads in network namespaces (and their own runtimes there).
        Command::Demo(args) => blocking(move || demo::run(args)).await,
        Command::Bench(cmd) => blocking(move || bench::run(cmd)).await,
        Command::Traffic(cmd) => blocking(move || traffic::run(cmd)).await,
        Command::Sim(args) => {
            // Quiet by default: the progress and live lines are the output.
            if std::env::var_os("RUST_LOG").is_some() {
                init_tracing();
            }
            sim::run(args).await
        }
    }
}

async fn blocking(f: impl FnOnce() -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .context("the command's thread panicked")?
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller_args(args: &[&str]) -> ControllerArgs {
        let cli = Cli::try_parse_from(
            ["nicwarden", "controller"]
                .into_iter()
                .chain(args.iter().copied()),
        )
        .expect("parses");
        match cli.command {
            Command::Controller(a) => a,
            _ => panic!("not controller"),
        }
    }

    fn agent_args(args: &[&str]) -> AgentRunArgs {
        let cli = Cli::try_parse_from(
            ["nicwarden", "agent"]
                .into_iter()
                .chain(args.iter().copied()),
        )
        .expect("parses");
        match cli.command {
            Command::Agent(a) => a.run,
            _ => panic!("not agent"),
        }
    }

    #[test]
    fn controller_flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("controller.toml");
        std::fs::write(
            &path,
            "data_dir = \"/srv/ctl\"\napi_listen = \"127.0.0.1:9080\"\nfabric_capacity_bps = 1000\n",
        )
        .expect("write config");
        let path_s = path.to_str().expect("utf-8 path");
        let cfg = controller_config(&controller_args(&[
            "--config",
            path_s,
            "--fabric-capacity",
            "40G",
            "--server-name",
            "ctl.example",
            "--server-name",
            "10.0.0.1",
        ]))
        .expect("valid");
        assert_eq!(cfg.data_dir, std::path::PathBuf::from("/srv/ctl"));
        assert_eq!(cfg.api_listen.to_string(), "127.0.0.1:9080");
        assert_eq!(cfg.fabric_capacity_bps, 40_000_000_000);
        assert_eq!(cfg.server_names, vec!["ctl.example", "10.0.0.1"]);
    }

    #[test]
    fn controller_invalid_combination_is_refused() {
        let err = controller_config(&controller_args(&[
            "--api-listen",
            "127.0.0.1:7443",
            "--agent-listen",
            "127.0.0.1:7443",
        ]))
        .expect_err("same address twice");
        assert!(
            format!("{err:#}").contains("agent_listen and api_listen"),
            "{err:#}"
        );
    }

    #[test]
    fn agent_probe_flags() {
        let cfg = agent_config(&agent_args(&["--node", "n1"])).expect("valid");
        assert!(cfg.probe.enabled);
        assert_eq!(cfg.probe.interval_ms, 1000);
        let cfg = agent_config(&agent_args(&[
            "--node",
            "n1",
            "--probe-interval",
            "250",
            "--no-probe",
        ]))
        .expect("valid");
        assert!(!cfg.probe.enabled);
        assert_eq!(cfg.probe.interval_ms, 250);
        let err = agent_config(&agent_args(&["--node", "n1", "--probe-interval", "50"]))
            .expect_err("too short");
        assert!(format!("{err:#}").contains("probe.interval_ms"), "{err:#}");
    }

    #[test]
    fn agent_needs_a_node_name() {
        let err = agent_config(&agent_args(&[])).expect_err("no node");
        assert!(format!("{err:#}").contains("--node"), "{err:#}");
        let cfg = agent_config(&agent_args(&[
            "--node",
            "n1",
            "--token",
            " tok ",
            "--controller",
            "https://ctl.example:7443",
        ]))
        .expect("valid");
        assert_eq!(cfg.join_token.as_deref(), Some("tok"));
        assert_eq!(cfg.controller, "https://ctl.example:7443");
    }
}
