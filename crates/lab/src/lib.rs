//! A real nicwarden cluster on a [`nicwarden_testbed::Testbed`]: the controller process in
//! the management namespace, one agent process per node namespace (datapath `ebpf` or `tc`
//! on the node's fabric veth, management traffic on its own veth), and an operator API
//! client.
//! The demo, the benchmark and the privileged end-to-end tests share it.
//!
//! Every socket the lab opens (operator API, agent status endpoints) must live in the
//! management namespace, so lab code runs inside [`in_mgmt`]: a thread that has entered
//! that namespace, with its own tokio runtime. Processes are started with
//! `nsenter --net` (only the network namespace changes, so bpffs pins outlive an agent), logged to files in the lab's temporary directory, and killed when the
//! lab is dropped.

use nicwarden_agent::status::AgentStatus;
use nicwarden_testbed::Testbed;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Operator API port of the controller (in the management namespace).
pub const API_PORT: u16 = 8080;
/// gRPC port agents connect to.
pub const AGENT_PORT: u16 = 7443;
/// Status endpoint port of every agent (on its management address).
pub const STATUS_PORT: u16 = 7090;

#[derive(Debug, thiserror::Error)]
#[error("{op}: {detail}")]
pub struct LabError {
    pub op: String,
    pub detail: String,
}

fn err(op: impl Into<String>, detail: impl std::fmt::Display) -> LabError {
    LabError {
        op: op.into(),
        detail: detail.to_string(),
    }
}

/// Runs `body` on a thread inside the testbed's management namespace, on a fresh tokio
/// runtime (its worker threads inherit the namespace), and returns its result.
pub fn in_mgmt<F, Fut, R>(tb: &Testbed, body: F) -> Result<R, LabError>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = R>,
    R: Send,
{
    tb.mgmt()
        .run(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| err("start a runtime in the management namespace", e))?;
            Ok(rt.block_on(body()))
        })
        .map_err(|e| err("enter the management namespace", e))?
}

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// The `nicwarden` binary to run.
    pub bin: PathBuf,
    /// Agents' usage report (and kernel counter) interval.
    pub report_interval_ms: u64,
    /// `RUST_LOG` of the processes.
    pub log_level: String,
    /// Fabric capacity of the quota tree.
    pub fabric_capacity_bps: u64,
    /// The agents' datapath backend: `ebpf` or `tc`.
    pub backend: String,
    /// Run the encrypted mesh: each agent gets overlay address [`Lab::mesh_ip`] /24 and
    /// listens for WireGuard on its fabric address, port [`MESH_PORT`].
    pub mesh: bool,
    /// With `mesh`: agents let only WireGuard cross their fabric (`--mesh-encrypted-only`).
    pub mesh_encrypted_only: bool,
    /// Extra arguments for the controller and for every agent.
    pub controller_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// Run the testbed switch's LLDP announcer at this interval (interconnect verification).
    pub lldp_interval: Option<Duration>,
}

/// The WireGuard port of the lab's agents (on their fabric address).
pub const MESH_PORT: u16 = 51820;

impl LabSpec {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        LabSpec {
            bin: bin.into(),
            report_interval_ms: 1000,
            log_level: "info".into(),
            fabric_capacity_bps: 100_000_000_000,
            backend: "ebpf".into(),
            mesh: false,
            mesh_encrypted_only: false,
            controller_args: Vec::new(),
            agent_args: Vec::new(),
            lldp_interval: None,
        }
    }
}

struct Proc {
    process: nicwarden_testbed::Process,
    log: PathBuf,
}

impl Proc {
    /// SIGKILL, like a crash; waits until it is gone.
    fn kill(&mut self) {
        if let Ok(true) = self.process.signal(nix::sys::signal::Signal::SIGKILL) {
            let _ = self.process.wait_timeout(Duration::from_secs(5));
        }
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.process.try_wait().ok().flatten()
    }
}

/// The controller and agents of one testbed. Call its async methods from [`in_mgmt`].
pub struct Lab {
    tb: Arc<Testbed>,
    spec: LabSpec,
    dir: tempfile::TempDir,
    ctl: Option<Proc>,
    agents: BTreeMap<String, Proc>,
    http: reqwest::Client,
    /// How many processes were started (names log files uniquely).
    started: u64,
    /// The switch's LLDP announcer, if the spec asks for one.
    _lldp: Option<nicwarden_testbed::LldpAnnouncer>,
}

impl Lab {
    pub fn new(tb: Arc<Testbed>, spec: LabSpec) -> Result<Lab, LabError> {
        remove_stale_pins();
        let dir = tempfile::Builder::new()
            .prefix("nicwarden-lab-")
            .tempdir()
            .map_err(|e| err("create the lab's temporary directory", e))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| err("build the HTTP client", e))?;
        let lldp = match spec.lldp_interval {
            Some(every) => Some(
                nicwarden_testbed::LldpAnnouncer::start(&tb, every)
                    .map_err(|e| err("start the switch's LLDP announcer", e))?,
            ),
            None => None,
        };
        Ok(Lab {
            tb,
            spec,
            dir,
            ctl: None,
            agents: BTreeMap::new(),
            http,
            started: 0,
            _lldp: lldp,
        })
    }

    /// The agents' datapath backend.
    pub fn backend(&self) -> &str {
        &self.spec.backend
    }

    pub fn testbed(&self) -> &Testbed {
        &self.tb
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://198.19.0.1:8080` (reachable from the management namespace).
    pub fn api_url(&self) -> String {
        format!("http://{}:{API_PORT}", self.tb.controller_ip())
    }

    fn controller_dir(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    fn spawn(
        &mut self,
        ns: &nicwarden_testbed::Netns,
        name: &str,
        args: &[String],
    ) -> Result<Proc, LabError> {
        self.started += 1;
        let log = self.dir.path().join(format!("{name}.{}.log", self.started));
        let f = std::fs::File::create(&log)
            .map_err(|e| err(format!("create log file {}", log.display()), e))?;
        let bin = self.spec.bin.display().to_string();
        let mut cmd = ns.command(&bin);
        cmd.args(args)
            .env("RUST_LOG", &self.spec.log_level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f);
        // Tracked by the testbed: its teardown (also on Ctrl-C) stops the process.
        let process = self
            .tb
            .spawn(&mut cmd)
            .map_err(|e| err(format!("start {name} ({bin})"), e))?;
        Ok(Proc { process, log })
    }

    /// The last `lines` lines of a process' log (`controller` or a node name).
    pub fn log_tail(&self, who: &str, lines: usize) -> String {
        let p = if who == "controller" {
            self.ctl.as_ref()
        } else {
            self.agents.get(who)
        };
        let Some(p) = p else {
            return format!("({who} not running)");
        };
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts (or restarts) the controller on the lab's data directory and waits until its
    /// operator API answers.
    pub async fn start_controller(&mut self) -> Result<(), LabError> {
        if let Some(mut p) = self.ctl.take() {
            p.kill();
        }
        let ip = self.tb.controller_ip();
        let args: Vec<String> = vec![
            "controller".into(),
            "--data-dir".into(),
            self.controller_dir().display().to_string(),
            "--agent-listen".into(),
            format!("{ip}:{AGENT_PORT}"),
            "--api-listen".into(),
            format!("{ip}:{API_PORT}"),
            "--server-name".into(),
            ip.to_string(),
            "--fabric-capacity".into(),
            self.spec.fabric_capacity_bps.to_string(),
        ];
        let args: Vec<String> = args
            .into_iter()
            .chain(self.spec.controller_args.iter().cloned())
            .collect();
        let tb = self.tb.clone();
        let p = self.spawn(tb.mgmt(), "controller", &args)?;
        self.ctl = Some(p);
        let url = format!("{}/healthz", self.api_url());
        let start = Instant::now();
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(p) = self.ctl.as_ref() {
                if let Some(st) = p.exited() {
                    return Err(err(
                        "start the controller",
                        format!("exited with {st}:\n{}", self.log_tail("controller", 20)),
                    ));
                }
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(err(
                    "start the controller",
                    format!(
                        "API not answering after 20 s:\n{}",
                        self.log_tail("controller", 20)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL the controller (a crash: agents keep their leases until the deadlines).
    pub fn kill_controller(&mut self) {
        if let Some(p) = self.ctl.as_mut() {
            p.kill();
        }
    }

    pub fn operator_token(&self) -> Result<String, LabError> {
        let path = self.controller_dir().join("operator.token");
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|e| err(format!("read {}", path.display()), e))
    }

    /// Calls the operator API; returns (HTTP status, JSON body).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), LabError> {
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| err(format!("HTTP method {method}"), e))?;
        let mut rb = self
            .http
            .request(m, format!("{}{}", self.api_url(), path))
            .bearer_auth(self.operator_token()?);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let op = format!("{method} {path}");
        let r = rb.send().await.map_err(|e| err(&op, e))?;
        let status = r.status().as_u16();
        let text = r.text().await.map_err(|e| err(&op, e))?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    pub async fn call_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        want: u16,
    ) -> Result<Value, LabError> {
        let (st, v) = self.call(method, path, body).await?;
        if st != want {
            return Err(err(format!("{method} {path}"), format!("HTTP {st}: {v}")));
        }
        Ok(v)
    }

    /// Adds every testbed node to the controller and starts its agent; waits until each
    /// is connected.
    pub async fn enroll_all(&mut self) -> Result<(), LabError> {
        let names: Vec<String> = self.tb.nodes().iter().map(|n| n.name.clone()).collect();
        for n in &names {
            let v = self
                .call_ok("POST", "/v1/nodes", Some(json!({"name": n})), 201)
                .await?;
            let token = v["join_token"]
                .as_str()
                .ok_or_else(|| err(format!("add node {n}"), "no join_token in the answer"))?
                .to_string();
            self.start_agent(n, Some(&token))?;
        }
        for n in &names {
            self.wait_status(
                n,
                "connected to the controller",
                Duration::from_secs(20),
                |s| s.connected,
            )
            .await?;
        }
        Ok(())
    }

    /// Starts (or restarts) `node`'s agent: datapath `tc` on `fab0`, every other node as a
    /// peer (its fabric address /32), status on the node's management address.
    pub fn start_agent(&mut self, node: &str, token: Option<&str>) -> Result<(), LabError> {
        if let Some(mut p) = self.agents.remove(node) {
            p.kill();
        }
        let tb = self.tb.clone();
        let n = tb
            .node(node)
            .ok_or_else(|| err(format!("start agent {node}"), "no such testbed node"))?;
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--node".into(),
            node.into(),
            "--data-dir".into(),
            self.dir
                .path()
                .join(format!("agent-{node}"))
                .display()
                .to_string(),
            "--controller".into(),
            format!("https://{}:{AGENT_PORT}", tb.controller_ip()),
            "--status-listen".into(),
            format!("{}:{STATUS_PORT}", n.mgmt_ip),
            "--datapath".into(),
            self.spec.backend.clone(),
            "--bpf-pin-dir".into(),
            self.pin_dir(node).display().to_string(),
            "--fabric-iface".into(),
            n.fabric_iface.clone(),
        ];
        for peer in tb.nodes().iter().filter(|p| p.name != node) {
            args.push("--peer".into());
            args.push(format!("{}={}/32", peer.name, peer.fabric_ip));
        }
        if self.spec.mesh {
            let mesh_ip = Self::overlay_ip(n.fabric_ip);
            args.extend([
                "--mesh-address".into(),
                format!("{mesh_ip}/24"),
                "--mesh-endpoint".into(),
                format!("{}:{MESH_PORT}", n.fabric_ip),
                // WireGuard over IPv4 adds 60 bytes; keep 80 of room as wg-quick does, within
                // what gotatun's packet buffers take.
                "--mesh-mtu".into(),
                (tb.spec().fabric_mtu.saturating_sub(80))
                    .min(u32::from(nicwarden_agent::config::MESH_MAX_MTU))
                    .to_string(),
            ]);
            if self.spec.mesh_encrypted_only {
                args.push("--mesh-encrypted-only".into());
            }
        }
        args.extend(self.spec.agent_args.iter().cloned());
        if let Some(t) = token {
            args.push("--token".into());
            args.push(t.into());
        }
        let p = self.spawn(&n.netns, node, &args)?;
        self.agents.insert(node.to_string(), p);
        Ok(())
    }

    /// A fabric address's overlay twin: 198.18.0.k -> 198.18.128.k.
    fn overlay_ip(fabric: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
        let o = fabric.octets();
        std::net::Ipv4Addr::new(o[0], o[1], o[2].wrapping_add(128), o[3])
    }

    /// `node`'s overlay (mesh) address, when the lab runs the mesh.
    pub fn mesh_ip(&self, node: &str) -> Option<std::net::Ipv4Addr> {
        let n = self.tb.node(node)?;
        self.spec.mesh.then(|| Self::overlay_ip(n.fabric_ip))
    }

    /// `node`'s agent data directory (its tamper socket is `tamper.sock` in it).
    pub fn agent_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{node}"))
    }

    /// Sends a tamper event to `node`'s agent through its socket (as `nicwarden agent
    /// tamper` does); returns the agent's answer once the fabric is blocked.
    pub async fn tamper(&self, node: &str, reason: &str) -> Result<String, LabError> {
        let sock = self.agent_dir(node).join("tamper.sock");
        nicwarden_agent::tamper::report(&sock, reason)
            .await
            .map_err(|e| err(format!("tamper {node}"), format!("{e:#}")))
    }

    /// Where `node`'s agent pins its eBPF maps: unique per testbed, under [`PIN_ROOT`].
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(format!("{}-{node}", self.tb.id()))
    }

    /// SIGKILL `node`'s agent (a crash: the kernel keeps enforcing its last state).
    pub fn kill_agent(&mut self, node: &str) {
        if let Some(p) = self.agents.get_mut(node) {
            p.kill();
        }
    }

    /// Grants a lease; returns the lease view (`id` is the lease id).
    pub async fn grant(&self, req: Value) -> Result<Value, LabError> {
        self.call_ok("POST", "/v1/leases", Some(req), 201).await
    }

    pub async fn revoke(&self, lease: u64, reason: &str) -> Result<Value, LabError> {
        self.call_ok(
            "POST",
            &format!("/v1/leases/{lease}/revoke"),
            Some(json!({"reason": reason})),
            200,
        )
        .await
    }

    pub async fn status(&self, node: &str) -> Result<AgentStatus, LabError> {
        let n = self
            .tb
            .node(node)
            .ok_or_else(|| err(format!("status of {node}"), "no such testbed node"))?;
        let url = format!("http://{}:{STATUS_PORT}/status", n.mgmt_ip);
        let op = format!("GET {url}");
        let r = self.http.get(&url).send().await.map_err(|e| err(&op, e))?;
        r.json().await.map_err(|e| err(&op, e))
    }

    /// Waits (polling every 20 ms, at most `limit`) until `node`'s status satisfies `pred`.
    pub async fn wait_status(
        &self,
        node: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> Result<AgentStatus, LabError> {
        let start = Instant::now();
        loop {
            let last = match self.status(node).await {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > limit {
                return Err(err(
                    format!("wait for {node}: {what}"),
                    format!(
                        "not within {limit:?}; last: {last}\nagent log:\n{}",
                        self.log_tail(node, 30)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.agents.values_mut() {
            p.kill();
        }
        if let Some(p) = self.ctl.as_mut() {
            p.kill();
        }
        // Pinned maps and programs outlive their namespace: unpin them.
        for n in self.tb.nodes() {
            let _ = std::fs::remove_dir_all(self.pin_dir(&n.name));
        }
    }
}

/// Where lab agents pin their eBPF state (one directory per testbed node).
pub const PIN_ROOT: &str = "/sys/fs/bpf/nicwarden";

/// Unpins what labs of dead processes left under [`PIN_ROOT`] (directories named after
/// their testbed, `nwtb<pid>x<n>-<node>`).
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("nwtb")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The decision of `scope` ("egress" or "peer:NODE") in a status.
pub fn scope<'a>(
    s: &'a AgentStatus,
    scope: &str,
) -> Option<&'a nicwarden_lease::agent::ScopeDecision> {
    s.scopes.iter().find(|d| d.scope.to_string() == scope)
}
