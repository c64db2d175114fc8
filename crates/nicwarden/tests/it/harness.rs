//! End-to-end harness: real `nicwarden` processes (controller, agents) on loopback, each
//! with its own temporary data directory and free ports. Processes are killed on drop, so a
//! failing test leaves nothing running.

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nicwarden");

/// The machine as a shared resource: tests that measure rates or delays on real packets
/// hold it shared (they may run beside each other, as before); a test that loads the whole
/// machine (the 1,000-node dashboard test) holds it alone, so the two never overlap.
pub static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A child process killed (SIGKILL) on drop; its stderr goes to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[String], log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn nicwarden");
        Proc { child, log }
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; returns its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > limit {
                panic!(
                    "process did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A controller process and an operator API client.
pub struct Ctl {
    pub dir: PathBuf,
    pub agent_port: u16,
    pub api_port: u16,
    pub proc: Option<Proc>,
    pub http: reqwest::Client,
}

impl Ctl {
    pub async fn start(dir: &Path) -> Ctl {
        let mut c = Ctl {
            dir: dir.to_path_buf(),
            agent_port: free_port(),
            api_port: free_port(),
            proc: None,
            http: reqwest::Client::new(),
        };
        c.restart().await;
        c
    }

    /// (Re)starts the controller on the same data directory and ports.
    pub async fn restart(&mut self) {
        let args: Vec<String> = vec![
            "controller".into(),
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--agent-listen".into(),
            format!("127.0.0.1:{}", self.agent_port),
            "--api-listen".into(),
            format!("127.0.0.1:{}", self.api_port),
        ];
        let log = self.dir.with_extension(format!("log{}", rand_suffix()));
        self.proc = Some(Proc::spawn(&args, log));
        let url = format!("{}/healthz", self.api());
        let http = self.http.clone();
        let proc = self.proc.as_mut().expect("just set");
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(st) = proc.child.try_wait().expect("try_wait") {
                panic!("controller exited with {st}; log:\n{}", proc.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "controller not ready; log:\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("operator.token"))
            .expect("operator token")
            .trim()
            .to_string()
    }

    /// Calls the operator API; returns (status, JSON body).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{}", self.api(), path))
            .bearer_auth(self.token());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("operator API request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// `POST /v1/nodes`; returns the join token.
    pub async fn add_node(&self, name: &str) -> String {
        let (st, v) = self
            .call("POST", "/v1/nodes", Some(serde_json::json!({"name": name})))
            .await;
        assert_eq!(st, 201, "add node {name}: {v}");
        v["join_token"].as_str().expect("join_token").to_string()
    }

    pub async fn grant(&self, body: Value) -> Value {
        let (st, v) = self.call("POST", "/v1/leases", Some(body)).await;
        assert_eq!(st, 201, "grant: {v}");
        v
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::SeqCst))
}

/// An agent process with its status endpoint.
pub struct Agent {
    pub node: String,
    pub dir: PathBuf,
    pub status_port: u16,
    pub proc: Proc,
    http: reqwest::Client,
}

impl Agent {
    pub fn start(ctl: &Ctl, root: &Path, node: &str, token: Option<&str>) -> Agent {
        let dir = root.join(format!("agent-{node}"));
        let status_port = free_port();
        Self::start_in(ctl, dir, node, token, status_port)
    }

    pub fn start_in(
        ctl: &Ctl,
        dir: PathBuf,
        node: &str,
        token: Option<&str>,
        status_port: u16,
    ) -> Agent {
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--node".into(),
            node.into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--controller".into(),
            ctl.agent_url(),
            "--status-listen".into(),
            format!("127.0.0.1:{status_port}"),
            // On loopback, off any fabric: decisions only (the privileged tests in
            // `enforce.rs` run the kernel backends).
            "--datapath".into(),
            "none".into(),
        ];
        if let Some(t) = token {
            args.push("--token".into());
            args.push(t.into());
        }
        let log = dir.with_extension(format!("log{}", rand_suffix()));
        Agent {
            node: node.into(),
            dir,
            status_port,
            proc: Proc::spawn(&args, log),
            http: reqwest::Client::new(),
        }
    }

    /// Restarts the agent process on the same data directory (no token needed).
    pub fn restart(&mut self, ctl: &Ctl) {
        self.proc.kill9();
        *self = Agent::start_in(
            ctl,
            self.dir.clone(),
            &self.node.clone(),
            None,
            self.status_port,
        );
    }

    pub async fn status(&self) -> Option<Value> {
        let r = self
            .http
            .get(format!("http://127.0.0.1:{}/status", self.status_port))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The decision for `scope` ("egress" or "peer:NODE") from a status document.
    pub fn scope<'a>(status: &'a Value, scope: &str) -> Option<&'a Value> {
        status["scopes"].as_array()?.iter().find(|s| {
            let sc = &s["scope"];
            match scope.strip_prefix("peer:") {
                None => sc["kind"] == "egress",
                Some(p) => sc["kind"] == "peer" && sc["peer"] == p,
            }
        })
    }

    /// Waits until the status satisfies `pred`; returns that status.
    pub async fn wait_status(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
            }
            if start.elapsed() > limit {
                panic!(
                    "agent {}: timed out after {limit:?} waiting for {what}; last status: {:?}\nlog:\n{}",
                    self.node,
                    self.status().await,
                    self.proc.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `state` of a scope in a status document.
pub fn state_of(status: &Value, scope: &str) -> String {
    Agent::scope(status, scope)
        .and_then(|s| s["state"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Builds a privileged testbed of `nodes`, starts a controller and one agent per node as
/// `spec` (from `LabSpec::new(BIN)`) says, and runs `body` in the management namespace;
/// everything is removed afterwards, also when `body` panics. Says it is skipped without
/// root. Holds [`MACHINE`] shared, like the other tests on real packets.
pub fn with_privileged_lab<F, Fut>(
    nodes: usize,
    spec: impl FnOnce(nicwarden_lab::LabSpec) -> nicwarden_lab::LabSpec + Send,
    body: F,
) where
    F: FnOnce(nicwarden_lab::Lab) -> Fut + Send,
    Fut: std::future::Future<Output = ()>,
{
    if !nicwarden_testbed::has_privileges() {
        eprintln!("skipped: needs root (network namespaces, TUN, raw sockets, bpf)");
        return;
    }
    let _quiet = MACHINE.blocking_read();
    let tb = std::sync::Arc::new(
        nicwarden_testbed::Testbed::create(nicwarden_testbed::TestbedSpec {
            nodes,
            ..nicwarden_testbed::TestbedSpec::default()
        })
        .expect("create the testbed"),
    );
    let tb2 = tb.clone();
    nicwarden_lab::in_mgmt(&tb, move || async move {
        let mut lab =
            nicwarden_lab::Lab::new(tb2, spec(nicwarden_lab::LabSpec::new(BIN))).expect("lab");
        lab.start_controller().await.expect("start the controller");
        lab.enroll_all().await.expect("enroll the agents");
        body(lab).await
    })
    .expect("run in the management namespace");
}
