//! `nicwarden demo`: the whole system on real packets, on this machine.
//!
//! It builds a testbed of network namespaces (a switch, a management network, N nodes),
//! starts the controller and one agent per node (datapath `ebpf` or `tc`), grants leases, runs UDP
//! traffic between the nodes, and shows a live view of what each node may send and what
//! its kernel counters measure. Then it revokes one lease, cuts another node off from the
//! controller so its lease lapses, and checks that traffic stopped both times. It exits
//! non-zero if enforcement did not do what the leases say. Ctrl-C (or the end) removes
//! every namespace and process it made.

use anyhow::{bail, Context as _};
use nicwarden_agent::status::AgentStatus;
use nicwarden_lab::{in_mgmt, Lab, LabSpec, API_PORT};
use nicwarden_lease::agent::{Enforce, SlotState};
use nicwarden_testbed::traffic::{self, Proto, SendSpec, SinkSpec};
use nicwarden_testbed::{Testbed, TestbedSpec};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::DemoArgs;
use crate::table::Table;
use crate::units::{fmt_bytes, fmt_millis, fmt_rate};

/// Port the demo's traffic sinks listen on (on each node's fabric address).
const SINK_PORT: u16 = 5201;
/// What every node tries to send: more than any lease of the demo.
const OFFERED_BPS: u64 = 400_000_000;

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nicwarden_testbed::has_privileges() {
        bail!(
            "{what} needs root: it creates network namespaces and veth links (CAP_SYS_ADMIN, CAP_NET_ADMIN) and programs tc and nftables on them. Run it as root, e.g. `sudo nicwarden {what}`"
        );
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    require_root("demo")?;
    if args.nodes < 2 {
        bail!("--nodes must be at least 2 (traffic flows between nodes)");
    }
    // The operator-facing API address is bound here, in the host's namespace, and
    // forwarded into the management namespace where the controller runs.
    let listener = TcpListener::bind(("127.0.0.1", args.api_port))
        .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))
        .context("bind the operator API forwarder on 127.0.0.1")?;
    let removed = nicwarden_testbed::cleanup_stale().context("remove stale testbeds")?;
    for r in removed {
        println!("removed a stale testbed namespace from a crashed run: {r}");
    }
    let tb = Arc::new(
        Testbed::create(TestbedSpec {
            nodes: args.nodes,
            ..TestbedSpec::default()
        })
        .context("create the testbed")?,
    );
    println!(
        "testbed {}: {} nodes, fabric 198.18.0.0/24 (switch namespace {}), management 198.19.0.0/24",
        tb.id(),
        tb.nodes().len(),
        tb.switch().name()
    );
    let exe = std::env::current_exe().context("find the nicwarden binary")?;
    let tb2 = tb.clone();
    let result = in_mgmt(&tb, move || async move {
        tokio::select! {
            r = demo(tb2, exe, listener, args) => r,
            _ = tokio::signal::ctrl_c() => {
                println!("\ninterrupted: cleaning up");
                Ok(())
            }
        }
    })
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    match Arc::try_unwrap(tb) {
        Ok(tb) => tb.teardown().context("tear the testbed down")?,
        Err(_) => tracing::warn!("testbed still referenced; it is removed when the process exits"),
    }
    println!("testbed removed");
    result
}

async fn demo(
    tb: Arc<Testbed>,
    exe: std::path::PathBuf,
    listener: TcpListener,
    args: DemoArgs,
) -> anyhow::Result<()> {
    let mut spec = LabSpec::new(exe);
    spec.backend = args.datapath.clone();
    spec.mesh = true;
    let mut lab = Lab::new(tb.clone(), spec)?;
    println!("agents enforce with the `{}` datapath", args.datapath);
    println!("starting the controller (data dir {})", lab.dir().display());
    lab.start_controller().await?;
    let api_local = forward_api(listener, SocketAddr::from((tb.controller_ip(), API_PORT)))?;
    let token_file = lab.dir().join("controller").join("operator.token");
    println!(
        "dashboard: http://{api_local}/  (sign in with the operator token in {})",
        token_file.display()
    );
    println!(
        "operator API: http://{api_local}  metrics: http://{api_local}/metrics  OpenAPI: http://{api_local}/openapi.json"
    );
    println!(
        "  try: nicwarden lease list --api http://{api_local} --token-file {}",
        token_file.display()
    );
    println!("enrolling {} agents", tb.nodes().len());
    lab.enroll_all().await?;

    let names: Vec<String> = tb.nodes().iter().map(|n| n.name.clone()).collect();
    let phase = Duration::from_secs(args.phase_secs);
    // node1: 200 Mbit/s; node2: 50 Mbit/s with 200 MB, a short TTL so it lapses quickly
    // once the controller is out of reach; the rest: no lease (blocked).
    let l1 = lab
        .grant(json!({"node": names[0], "rate_bps": 200_000_000u64, "ttl_s": 30, "renew_s": 2}))
        .await?;
    let l1 = l1["id"].as_u64().context("lease id of node1's grant")?;
    lab.grant(json!({"node": names[1], "rate_bps": 50_000_000u64, "volume_bytes": 200_000_000u64, "ttl_s": 6, "renew_s": 1}))
        .await?;
    for n in &names[..2] {
        lab.wait_status(n, "its lease active", Duration::from_secs(10), |s| {
            egress(s).is_some_and(|d| d.state == SlotState::Active)
        })
        .await?;
    }

    // Traffic: node k offers UDP to node k+1 for the whole demo (UDP needs no return path,
    // so a blocked receiver does not stall its sender).
    let total = phase * 4 + Duration::from_secs(15);
    let mut threads = Vec::new();
    for (i, n) in tb.nodes().iter().enumerate() {
        let dst = &tb.nodes()[(i + 1) % tb.nodes().len()];
        let addr = SocketAddr::from((dst.fabric_ip, SINK_PORT));
        let sink = dst.netns.spawn_thread(move || udp_sink(addr, total))?;
        let flow = n.netns.spawn_thread(move || udp_flow(addr, total))?;
        threads.push((sink, flow));
    }

    let mut view = View::new(
        &names,
        format!(
            "dashboard and API http://{api_local}/ (token: {})",
            token_file.display()
        ),
        !args.no_live && std::io::stdout().is_terminal(),
    );
    let mut checks = Vec::new();

    view.phase(&format!(
        "{} leased 200 Mbit/s, {} 50 Mbit/s with 200 MB, the others nothing (blocked); traffic flows node by node",
        names[0], names[1]
    ));
    let rates = view.run_for(&lab, phase).await;
    checks.push(check_rate(&names[0], &rates, 200_000_000));
    checks.push(check_rate(&names[1], &rates, 50_000_000));
    for n in &names[2..] {
        checks.push(check_stopped(n, &rates, "it has no lease"));
    }

    view.phase(&format!(
        "{} and {} exchange through the encrypted mesh; a capture on {}'s fabric veth looks for the plaintext",
        names[0], names[1], names[0]
    ));
    checks.push(mesh_check(&lab, &names[0], &names[1]).await);
    let _ = view.run_for(&lab, Duration::from_secs(1)).await;

    view.phase(&format!("revoking {}'s lease", names[0]));
    lab.revoke(l1, "demo: operator revocation").await?;
    let rates = view.run_for(&lab, phase).await;
    checks.push(check_stopped(&names[0], &rates, "its lease was revoked"));

    view.phase(&format!(
        "stopping the controller: {}'s lease can no longer be renewed and lapses at its deadline (TTL 6 s)",
        names[1]
    ));
    lab.kill_controller();
    let rates = view.run_for(&lab, phase.max(Duration::from_secs(12))).await;
    let st = lab.status(&names[1]).await?;
    checks.push(match egress(&st).map(|d| d.state) {
        Some(SlotState::Expired) => Ok(format!(
            "{}: lease expired at its deadline with the controller gone",
            names[1]
        )),
        other => Err(format!(
            "{}: expected its lease expired, it is {other:?}",
            names[1]
        )),
    });
    checks.push(check_stopped(&names[1], &rates, "its lease lapsed"));
    view.phase(&format!(
        "tamper on {} (lid opened; the controller is down, it is told when it returns)",
        names[2]
    ));
    checks.push(match lab.tamper(&names[2], "demo: lid opened").await {
        Ok(answer) => {
            let st = lab.status(&names[2]).await?;
            match (&st.tampered, st.mesh.as_ref().and_then(|m| m.public_key.as_ref())) {
                (Some(t), None) => Ok(format!(
                    "{}: tampered: fabric blocked {} us after the event, WireGuard keys destroyed after {} us ({answer})",
                    names[2],
                    t.blocked_after_us.unwrap_or(0),
                    t.keys_destroyed_after_us.unwrap_or(0)
                )),
                _ => Err(format!("{}: tamper not in force: {answer}", names[2])),
            }
        }
        Err(e) => Err(format!("{}: tamper failed: {e}", names[2])),
    });
    view.phase("done");
    view.run_for(&lab, Duration::from_secs(1)).await;

    // The flows end with the testbed (their namespaces go away); nothing to wait for.
    drop(threads);
    println!("\nwhat the demo checked:");
    let mut failed = 0;
    for c in &checks {
        match c {
            Ok(m) => println!("  ok    {m}"),
            Err(m) => {
                failed += 1;
                println!("  FAIL  {m}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} demo checks failed (logs in {})",
            lab.dir().display()
        );
    }
    Ok(())
}

/// `a` sends marked datagrams to `b`'s overlay address while a capture runs on `a`'s fabric
/// veth: they must arrive, and the fabric must carry WireGuard only.
async fn mesh_check(lab: &Lab, a: &str, b: &str) -> Result<String, String> {
    use nicwarden_testbed::capture::{Capture, CaptureLimit};
    const MARKER: &[u8] = b"nicwarden-demo-plaintext-marker";
    for (n, peer) in [(a, b), (b, a)] {
        lab.wait_status(n, "its mesh peer", Duration::from_secs(20), |s| {
            s.mesh
                .as_ref()
                .is_some_and(|m| m.peers.iter().any(|p| p.node == peer))
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    let tb = lab.testbed();
    let (na, nb) = match (tb.node(a), tb.node(b)) {
        (Some(x), Some(y)) => (x.clone(), y.clone()),
        _ => return Err("mesh check: unknown node".into()),
    };
    let ip = lab.mesh_ip(b).ok_or("mesh check: no overlay address")?;
    let rx = nb
        .netns
        .run(move || std::net::UdpSocket::bind((ip, 5999)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind on {b}'s overlay address: {e}"))?;
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let cap = Capture::start(&na.netns, &na.fabric_iface, CaptureLimit::default())
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(8);
    let receiver = std::thread::spawn(move || {
        let mut got = 0u32;
        let mut buf = [0u8; 256];
        while got < 20 && Instant::now() < end {
            if let Ok(n) = rx.recv(&mut buf) {
                if &buf[..n] == MARKER {
                    got += 1;
                }
            }
        }
        got
    });
    na.netns
        .run(move || -> std::io::Result<()> {
            let tx = std::net::UdpSocket::bind("0.0.0.0:0")?;
            let mut sent = 0;
            while sent < 400 && Instant::now() < end {
                tx.send_to(MARKER, (ip, 5999))?;
                sent += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("send through the tunnel: {e}"))?;
    let got = receiver.join().map_err(|_| "receiver thread panicked")?;
    let seen = cap.stop();
    let wg = seen.count_udp_port(nicwarden_lab::MESH_PORT);
    if got == 0 {
        Err(format!("{a} -> {b}: nothing crossed the tunnel"))
    } else if seen.contains(MARKER) {
        Err(format!(
            "{a} -> {b}: the marker crossed the fabric in plaintext"
        ))
    } else if wg == 0 {
        Err(format!("{a} -> {b}: no WireGuard packets on the fabric"))
    } else {
        Ok(format!(
            "{a} -> {b} through the mesh: {got} marked datagrams delivered; {a}'s fabric carried {wg} WireGuard packets and no plaintext marker"
        ))
    }
}

fn egress(s: &AgentStatus) -> Option<&nicwarden_lease::agent::ScopeDecision> {
    nicwarden_lab::scope(s, "egress")
}

type Rates = BTreeMap<String, Vec<u64>>;

/// The median measured rate of the phase is within 10% of the lease (the tests hold it to
/// 5% with a quiet machine; the demo also draws its live view).
fn check_rate(node: &str, rates: &Rates, lease: u64) -> Result<String, String> {
    let m = median_tail(rates.get(node));
    let err = (m as f64 - lease as f64) / lease as f64 * 100.0;
    let msg = format!(
        "{node}: measured {} under a {} lease ({err:+.1}%)",
        fmt_rate(m),
        fmt_rate(lease)
    );
    if err.abs() <= 10.0 {
        Ok(msg)
    } else {
        Err(msg)
    }
}

fn check_stopped(node: &str, rates: &Rates, why: &str) -> Result<String, String> {
    // The last three samples, never the first two of the phase: each sample is the rate
    // over the agent's previous second, so the first ones still cover the event itself
    // (and a lapse happens within the phase).
    let Some(v) = rates.get(node).filter(|v| !v.is_empty()) else {
        return Err(format!(
            "{node}: no measurement (its status was unreachable)"
        ));
    };
    let from = v
        .len()
        .saturating_sub(3)
        .max(2.min(v.len().saturating_sub(1)));
    let m = v[from..].iter().copied().max().unwrap_or(0);
    if m < 100_000 {
        Ok(format!(
            "{node}: no traffic (at most {}) as {why}",
            fmt_rate(m)
        ))
    } else {
        Err(format!("{node}: still {} although {why}", fmt_rate(m)))
    }
}

/// Median of the second half of the samples (after the phase settled).
fn median_tail(v: Option<&Vec<u64>>) -> u64 {
    let Some(v) = v else { return 0 };
    let mut tail: Vec<u64> = v[v.len() / 2..].to_vec();
    tail.sort_unstable();
    tail.get(tail.len() / 2).copied().unwrap_or(0)
}

/// The live view: a table per node and scope, redrawn every second.
struct View {
    names: Vec<String>,
    /// Where the operator API is, and its token file (shown on every frame).
    api: String,
    live: bool,
    start: Instant,
    phase: String,
}

impl View {
    fn new(names: &[String], api: String, live: bool) -> Self {
        View {
            names: names.to_vec(),
            api,
            live,
            start: Instant::now(),
            phase: String::new(),
        }
    }

    fn phase(&mut self, p: &str) {
        self.phase = p.to_string();
        if !self.live {
            println!("\n== {p}");
        }
    }

    /// Redraws every second for `d`; returns the measured egress rates per node.
    async fn run_for(&mut self, lab: &Lab, d: Duration) -> Rates {
        let end = Instant::now() + d;
        let mut rates = Rates::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        while Instant::now() < end {
            tick.tick().await;
            let mut statuses = Vec::new();
            for n in &self.names {
                let s = lab.status(n).await.ok();
                if let Some(st) = &s {
                    let r = kernel_rate(st, "egress");
                    rates.entry(n.clone()).or_default().push(r);
                }
                statuses.push((n.clone(), s));
            }
            let text = render(&statuses);
            let t = self.start.elapsed().as_secs();
            if self.live {
                print!(
                    "\x1b[H\x1b[2Jnicwarden demo  t={t}s  {}\n== {}\n\n{text}",
                    self.api, self.phase
                );
            } else {
                print!("t={t}s\n{text}");
            }
            let _ = std::io::stdout().flush();
        }
        rates
    }
}

fn kernel_rate(st: &AgentStatus, scope: &str) -> u64 {
    st.datapath
        .as_ref()
        .and_then(|d| d.scopes.iter().find(|k| k.scope == scope))
        .map(|k| k.rate_bps)
        .unwrap_or(0)
}

/// The view's table: one row per node and scope.
pub fn render(statuses: &[(String, Option<AgentStatus>)]) -> String {
    let mut t = Table::new(&[
        "NODE",
        "SCOPE",
        "STATE",
        "LEASED",
        "MEASURED",
        "DROPPED",
        "VOLUME USED / LEFT",
        "EXPIRES IN",
        "CONTROLLER",
    ]);
    for (node, st) in statuses {
        let Some(st) = st else {
            t.row(vec![
                node.clone(),
                "-".into(),
                "(status unreachable)".into(),
            ]);
            continue;
        };
        for d in &st.scopes {
            let scope = d.scope.to_string();
            let k = st
                .datapath
                .as_ref()
                .and_then(|dp| dp.scopes.iter().find(|k| k.scope == scope));
            let leased = match d.enforce {
                Enforce::Allow { rate_bps, .. } => fmt_rate(rate_bps),
                Enforce::Floor { rate_bps: 0 } => "blocked".into(),
                Enforce::Floor { rate_bps } => format!("floor {}", fmt_rate(rate_bps)),
            };
            let volume = match d.volume_bytes {
                Some(v) => format!(
                    "{} / {}",
                    fmt_bytes(d.usage.bytes),
                    fmt_bytes(v.saturating_sub(d.usage.bytes))
                ),
                None if d.lease.is_some() => format!("{} / unlimited", fmt_bytes(d.usage.bytes)),
                None => "-".into(),
            };
            t.row(vec![
                node.clone(),
                scope,
                d.state.to_string(),
                leased,
                k.map_or_else(|| "-".into(), |k| fmt_rate(k.rate_bps)),
                k.map_or_else(
                    || "-".into(),
                    |k| format!("{} pkts", k.drops + k.volume_drops),
                ),
                volume,
                d.deadline_in_ms.map_or_else(|| "-".into(), fmt_millis),
                if st.connected {
                    "connected".into()
                } else {
                    "unreachable".into()
                },
            ]);
        }
    }
    t.render()
}

/// Forwards `listener` (host namespace) to `target` (management namespace: this thread's).
fn forward_api(listener: TcpListener, target: SocketAddr) -> anyhow::Result<SocketAddr> {
    let local = listener.local_addr().context("forwarder address")?;
    listener
        .set_nonblocking(true)
        .context("forwarder: non-blocking listener")?;
    let listener = tokio::net::TcpListener::from_std(listener).context("forwarder listener")?;
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(target).await {
                    Ok(mut out) => {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "forwarder: controller unreachable"),
                }
            });
        }
    });
    Ok(local)
}

/// Receives UDP on `addr` (and discards it) until `limit`: the receiving end of a flow.
fn udp_sink(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let mut spec = SinkSpec::new(Proto::Udp, addr);
    spec.duration = limit;
    // A blocked sender may deliver nothing for a whole phase: never stop for idleness.
    spec.idle_timeout = limit;
    traffic::Sink::bind(spec)?.run()?;
    Ok(())
}

/// Offers UDP to `addr` at [`OFFERED_BPS`] for `limit`. A local UDP sender is held back by
/// its socket buffer while the shaper queues its packets, so what leaves is the leased
/// rate, and a blocked scope drops everything.
fn udp_flow(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let mut spec = SendSpec::new(Proto::Udp, addr);
    spec.duration = limit;
    spec.rate_bps = Some(OFFERED_BPS);
    spec.payload = 8000;
    traffic::send(&spec)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(v: &[u64]) -> Rates {
        Rates::from([("n".to_string(), v.to_vec())])
    }

    #[test]
    fn checks_read_the_settled_samples() {
        // The rate check takes the median of the second half.
        assert!(check_rate("n", &rates(&[0, 10, 100, 101, 99, 100]), 100).is_ok());
        assert!(check_rate("n", &rates(&[100, 100, 80, 80, 80, 80]), 100).is_err());
        assert!(
            check_rate("x", &rates(&[100]), 100).is_err(),
            "no samples: no rate"
        );
        // The stop check skips the first two samples of a phase, then takes the last three.
        assert!(check_stopped("n", &rates(&[200, 20, 0]), "revoked").is_ok());
        assert!(check_stopped("n", &rates(&[200, 20, 0, 5_000_000]), "revoked").is_err());
        assert!(check_stopped("n", &rates(&[9, 9, 9, 9, 0, 0, 0]), "lapsed").is_ok());
        assert!(check_stopped("n", &rates(&[0, 0, 0, 0, 0, 900_000, 0]), "lapsed").is_err());
        assert!(
            check_stopped("x", &rates(&[]), "no lease").is_err(),
            "no samples: no proof"
        );
    }

    #[test]
    fn the_view_shows_unreachable_agents() {
        let text = render(&[("node7".to_string(), None)]);
        assert!(
            text.contains("node7") && text.contains("(status unreachable)"),
            "{text}"
        );
    }
}
