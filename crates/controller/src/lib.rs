//! The nicwarden controller: the central lease authority.
//!
//! It owns the quota tree and the lease ledger (through `nicwarden-lease`), persists them in
//! the store (`nicwarden-store`, SQLite by default), enrolls agents and signs their leases
//! (`nicwarden-pki`), serves agents over gRPC with mutual TLS ([`grpc`]) and operators over
//! HTTP/JSON ([`api`]), and exports Prometheus metrics ([`metrics`]).

pub mod api;
pub mod api_types;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod grpc;
pub mod live;
pub mod mesh;
pub mod metrics;
pub mod topology;

pub use config::ControllerConfig;

use anyhow::Context;
use std::sync::Arc;

/// Loads or creates the operator token in the data directory; returns its SHA-256.
fn operator_token(dir: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use sha2::Digest;
    let path = dir.join("operator.token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => zeroize::Zeroizing::new(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            let mut b = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut b);
            let t = zeroize::Zeroizing::new(hex::encode(b));
            nicwarden_pki::write_private(&path, format!("{}\n", t.as_str()).as_bytes())
                .with_context(|| format!("write operator token {}", path.display()))?;
            t
        }
        Err(e) => return Err(e).with_context(|| format!("read operator token {}", path.display())),
    };
    if token.is_empty() {
        anyhow::bail!("operator token file {} is empty", path.display());
    }
    Ok(sha2::Sha256::digest(token.as_bytes()).into())
}

/// Each agent holds a connection open: raise the soft descriptor limit to the hard one so a
/// 1,000-node fleet does not hit the common default of 1,024.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard.min(1 << 20) => {
            // An unlimited hard limit cannot be the soft one: cap it.
            let want = hard.min(1 << 20);
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit; large fleets may be refused");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Runs the controller until Ctrl-C / SIGTERM.
pub async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
    let agent_listener = tokio::net::TcpListener::bind(cfg.agent_listen)
        .await
        .with_context(|| format!("bind agent port {}", cfg.agent_listen))?;
    let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("bind operator API {}", cfg.api_listen))?;
    serve(
        cfg,
        agent_listener,
        api_listener,
        nicwarden_process::shutdown_signal(),
    )
    .await
}

/// Runs the controller on listeners the caller bound, until `shutdown` completes.
pub async fn serve(
    cfg: ControllerConfig,
    agent_listener: tokio::net::TcpListener,
    api_listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
    let _lock = nicwarden_process::lock_data_dir(&cfg.data_dir, "controller")?;
    let identity = Arc::new(
        nicwarden_pki::ControllerIdentity::load_or_create(&cfg.data_dir, &cfg.server_names)
            .context("load controller identity")?,
    );
    let token_hash = operator_token(&cfg.data_dir)?;
    let store = Arc::new(
        nicwarden_store::SqliteStore::open(&cfg.data_dir.join("nicwarden.db"))
            .context("open store")?,
    );
    let algorithm = cfg
        .fabric_algorithm
        .parse()
        .map_err(|e| anyhow::anyhow!("fabric_algorithm: {e}"))?;
    let ctl = Arc::new(crate::core::Controller::open(
        store,
        identity.clone(),
        crate::core::Settings {
            fabric_capacity_bps: cfg.fabric_capacity_bps,
            fabric_algorithm: algorithm,
            ledger: nicwarden_lease::ledger::LedgerConfig {
                expiry_grace_ms: cfg.expiry_grace_ms,
            },
            node_cert_days: cfg.node_cert_days,
            mesh_rotation_ms: cfg.mesh_key_rotation_secs.saturating_mul(1000),
            topology: cfg.topology_config()?,
        },
        crate::live::Live::new(
            nicwarden_telemetry::TelemetryConfig {
                history_secs: cfg.telemetry_history_secs,
                stale_after_ms: cfg.telemetry_stale_after_ms,
                ..Default::default()
            },
            nicwarden_store::TelemetryDb::open(&cfg.data_dir.join("telemetry.db"))
                .context("open telemetry history")?,
            cfg.telemetry_minute_retention_hours * 3_600_000,
        ),
    )?);
    raise_fd_limit();
    let tls = Arc::new(nicwarden_pki::controller_server_config(&identity)?);

    // Expiry timer: sleeps until the ledger's next deadline, or until a change wakes it.
    let timer_ctl = ctl.clone();
    let timer = tokio::spawn(async move {
        loop {
            let next = timer_ctl.tick();
            let wait = next
                .map(|t| {
                    std::time::Duration::from_millis(
                        nicwarden_lease::Time(crate::core::now_ms()).millis_until(t),
                    )
                })
                .unwrap_or(std::time::Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = timer_ctl.timer.notified() => {}
            }
        }
    });

    // Mesh: grants and renewals only add or refresh entries, so their plan waits a moment
    // and one plan covers a burst (a thousand grants must not become a thousand updates per
    // member). Removals never wait: they are planned inside the change that causes them.
    let mesh_ctl = ctl.clone();
    let mesh = tokio::spawn(async move {
        loop {
            mesh_ctl.mesh_wake.notified().await;
            tokio::time::sleep(crate::core::MESH_COALESCE).await;
            let c = mesh_ctl.clone();
            let _ = tokio::task::spawn_blocking(move || c.mesh_sync_now()).await;
        }
    });

    // Live side: a tick a second for the event stream; closed minutes to the store and
    // recorded usage to the lease store every few seconds; retention every 5 minutes.
    let live_ctl = ctl.clone();
    let live = tokio::spawn(async move {
        let mut every_s = tokio::time::interval(std::time::Duration::from_secs(1));
        every_s.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n: u64 = 0;
        loop {
            every_s.tick().await;
            n += 1;
            let c = live_ctl.clone();
            // The tick reads the ledger and serialises up to the whole fleet: off the
            // async workers.
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(json) = c.live_tick() {
                    c.live.send_tick(json);
                }
                c.metrics.event_subscribers.set(c.live.subscribers() as i64);
                c.mesh_tick();
                crate::topology::tick(&c);
                if n.is_multiple_of(5) {
                    c.flush_usage();
                    if let Err(e) = c.live.flush_minutes(crate::core::now_ms()) {
                        tracing::error!(error = %e, "writing per-minute telemetry failed");
                    }
                }
                if n.is_multiple_of(300) {
                    if let Err(e) = c.live.prune(crate::core::now_ms()) {
                        tracing::error!(error = %e, "pruning telemetry failed");
                    }
                }
            })
            .await;
        }
    });

    let agent_addr = agent_listener
        .local_addr()
        .context("agent listener address")?;
    let api_addr = api_listener.local_addr().context("API listener address")?;
    let svc =
        nicwarden_proto::pb::agent_service_server::AgentServiceServer::new(crate::grpc::AgentSvc {
            ctl: ctl.clone(),
        });
    let incoming = crate::grpc::tls_incoming(agent_listener, tls);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_ctl = ctl.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("controller stopping: closing agent sessions");
        // Session streams never end by themselves; close them so the servers can drain.
        stop_ctl.close_all_sessions();
        // Likewise the operators' event streams (an open dashboard).
        stop_ctl.live.close_streams();
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let api = axum::serve(
        api_listener,
        crate::api::router(crate::api::ApiState {
            ctl: ctl.clone(),
            token_hash,
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx));
    tracing::info!(
        agent_listen = %agent_addr,
        api = %format!("http://{api_addr}"),
        metrics = %format!("http://{api_addr}/metrics"),
        data_dir = %cfg.data_dir.display(),
        "controller ready"
    );
    let (g, a) = tokio::join!(grpc, api);
    timer.abort();
    live.abort();
    mesh.abort();
    // What the last seconds recorded is not lost on a clean stop.
    ctl.flush_usage();
    if let Err(e) = ctl.live.flush_minutes(u64::MAX) {
        tracing::error!(error = %e, "writing per-minute telemetry at shutdown failed");
    }
    g.context("agent gRPC server")?;
    a.context("operator API server")?;
    Ok(())
}

/// A controller in this process on loopback ports the OS picked: for tests and tools that
/// need a real one without a process of its own.
pub struct InProcess {
    /// The operator API, `http://127.0.0.1:PORT`.
    pub api: String,
    /// The agent (gRPC, mutual TLS) port.
    pub agent: std::net::SocketAddr,
    pub data_dir: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts `cfg` (its listen addresses are replaced by ephemeral loopback ports) and
    /// returns once the operator token is written, i.e. the controller has opened its data
    /// directory; the API accepts requests from then on.
    pub async fn start(mut cfg: ControllerConfig) -> anyhow::Result<InProcess> {
        let agent_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind an agent port")?;
        let api_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind an API port")?;
        let agent = agent_l.local_addr().context("agent port address")?;
        let api = format!("http://{}", api_l.local_addr().context("API port address")?);
        cfg.agent_listen = agent;
        cfg.api_listen = api_l.local_addr().context("API port address")?;
        let data_dir = cfg.data_dir.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut task = tokio::spawn(serve(cfg, agent_l, api_l, async {
            let _ = rx.await;
        }));
        let token = data_dir.join("operator.token");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while !token.exists() {
            if task.is_finished() {
                return Err(match (&mut task).await {
                    Ok(Err(e)) => e.context("in-process controller failed to start"),
                    Ok(Ok(())) => anyhow::anyhow!("in-process controller stopped at once"),
                    Err(e) => anyhow::anyhow!("in-process controller panicked: {e}"),
                });
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "in-process controller: no operator token in {} after 20 s",
                data_dir.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(InProcess {
            api,
            agent,
            data_dir,
            stop: Some(tx),
            task,
        })
    }

    /// The operator token.
    pub fn token(&self) -> anyhow::Result<String> {
        let p = self.data_dir.join("operator.token");
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("read {}", p.display()))?
            .trim()
            .to_string())
    }

    /// Stops it like Ctrl-C would and waits (at most 10 s) for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.task)
            .await
            .context("the in-process controller did not stop within 10 s")?
            .context("the in-process controller panicked")?
    }
}
