//! `nicwarden bench tunnel`: what the encrypted mesh costs in throughput, and how fast a
//! tamper event cuts a node off, on a real cluster.
//!
//! Method: a 3-node testbed with the controller and three agents ([`nicwarden_lab`]: datapath
//! `ebpf`, mesh on, tunnel MTU = fabric MTU - 80, at most 4000), every node holding an egress
//! lease of 100 Gbit/s that never binds (the fabric quota is raised to 300 Gbit/s so the
//! three fit).
//! 1. Throughput: TCP node1 -> node2 for `--secs`, on node2's fabric address (plaintext
//!    through the same eBPF datapath and lease) and through the tunnel (node2's overlay
//!    address: gotatun in node1's agent encrypts, the fabric carries WireGuard/UDP, node2's
//!    agent decrypts). The two alternate within a repetition, the order swapping from one
//!    repetition to the next. Goodput is the sink's payload over its active period; CPU is
//!    the machine's busy CPU time during the flow ([`super::busy_cpu`]) per Gbit delivered.
//!    The ratio is the median of the per-repetition ratios tunnel / fabric.
//! 2. Tamper -> fabric blocked: UDP node1 -> node2 (fabric address) paced at
//!    [`super::PACED_BPS`] in [`super::DATAGRAM`]-byte datagrams; after [`LEAD`],
//!    `tamper node1` on its agent's socket. The agent's own figures (`blocked_after_us`,
//!    `keys_destroyed_after_us`: event to kernel state applied, to keys destroyed), and the
//!    external one: from just before the tamper call to the arrival of the last datagram at
//!    a bench-local receiver on node2 (arrival instants in user space, CLOCK_MONOTONIC, the
//!    clock of the call's start).
//! 3. Tamper -> peers drop the key: from the same instant, node2's and node3's `/status` are
//!    polled concurrently (one request, then [`POLL_EVERY`] of sleep, for at most
//!    [`POLL_LIMIT`]) until they no longer list node1 as a peer. The figure per peer is the
//!    arrival of the first answer without node1 (an upper bound); the removal happened after
//!    the request of the last answer that still listed it was sent (the lower bound): the
//!    difference is the resolution of that sample. The last peer is the maximum of the two.
//!
//! After each tamper (but the last) node1 is re-enrolled as an operator would (a new join
//! token, its agent restarted with it, a new lease) and the bench waits until every node
//! lists every other as a peer again.
//!
//! Every loop is bounded by the repetition count, a poll count or a deadline.

use anyhow::{bail, Context as _};
use nicwarden_agent::status::AgentStatus;
use nicwarden_lab::{in_mgmt, Lab, LabSpec};
use nicwarden_testbed::traffic::{self, Proto, SendSpec, SinkSpec};
use nicwarden_testbed::{Node, Testbed, TestbedSpec};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::variant::NON_BINDING_BPS;
use super::{busy_cpu, max, median, min, ratio, receive, Arrival, Flow, DATAGRAM, PACED_BPS};
use crate::cli::BenchTunnelArgs;
use crate::table::Table;
use crate::units::fmt_rate;

/// First port of the bench's flows; each flow takes the next one.
const FIRST_PORT: u16 = 5400;
/// A TCP sink stops after this long without data (normally at EOF).
const IDLE: Duration = Duration::from_secs(1);
/// The warm-up flows on each path (not kept): the tunnel's handshake, caches, neighbours.
const WARM_UP: Duration = Duration::from_secs(3);
/// Paced flow time before the tamper call.
const LEAD: Duration = Duration::from_millis(300);
/// Paced flow time after the tamper call: the longest external figure measurable is about
/// this minus [`QUIET`].
const TAIL: Duration = Duration::from_millis(1200);
/// The receiver stops this long after the sender's period.
const RECEIVER_MARGIN: Duration = Duration::from_millis(300);
/// The flow counts as stopped only if nothing arrived in this last part of the sender's
/// period.
const QUIET: Duration = Duration::from_millis(100);
/// Sleep between two status polls of a peer.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Longest time a peer is polled after the tamper call.
const POLL_LIMIT: Duration = Duration::from_secs(10);
/// At most this many polls per peer and tamper (the limit would allow fewer).
const MAX_POLLS: u32 = 5_000;
/// Longest wait for a cluster state (agent connected, lease active, peers complete).
const SETTLE: Duration = Duration::from_secs(30);

/// The anchor the ratio is compared with: BlueField-3 with IPsec offload.
const ANCHOR_ENCRYPTED_GBPS: f64 = 193.0;
const ANCHOR_RAW_GBPS: f64 = 390.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt_ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn fmt_opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_ms)
}

fn gbit(bps: f64) -> String {
    fmt_rate(bps.max(0.0) as u64)
}

/// The names of `s`'s installed mesh peers; `None` when it reports no mesh.
fn peers(s: &AgentStatus) -> Option<Vec<String>> {
    s.mesh
        .as_ref()
        .map(|m| m.peers.iter().map(|p| p.node.clone()).collect())
}

/// One TCP flow `from` -> a sink on `to` at `dst`, with the machine's busy CPU time around it.
fn tcp_flow(from: &Node, to: &Node, dst: SocketAddr, secs: Duration) -> anyhow::Result<Flow> {
    let mut spec = SendSpec::new(Proto::Tcp, dst);
    spec.duration = secs;
    let mut sink_spec = SinkSpec::new(Proto::Tcp, dst);
    sink_spec.duration = secs + Duration::from_secs(10);
    sink_spec.idle_timeout = IDLE;
    let cpu_before = busy_cpu()?;
    let sink = to
        .netns
        .run(move || traffic::Sink::bind(sink_spec))
        .context("enter the receiver's namespace")?
        .with_context(|| format!("bind the sink on {dst}"))?;
    let sink_thread = to
        .netns
        .spawn_thread(move || sink.run())
        .context("start the sink thread")?;
    let sent = from
        .netns
        .run(move || traffic::send(&spec))
        .context("enter the sender's namespace")?
        .with_context(|| format!("send TCP to {dst}"));
    let got = sink_thread
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?
        .context("enter the receiver's namespace")?
        .with_context(|| format!("sink on {dst}"))?;
    let sent = sent?;
    let cpu = busy_cpu()?.saturating_sub(cpu_before);
    Ok(Flow { sent, got, cpu })
}

/// Hands out a fresh port per flow, so a late packet of one flow never reaches the next.
struct Ports(u16);

impl Ports {
    fn next(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1).max(FIRST_PORT);
        self.0
    }
}

/// The two paths of part 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Fabric,
    Tunnel,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Fabric => "fabric, plaintext",
            Path::Tunnel => "tunnel, WireGuard",
        }
    }
}

/// Part 1 in one repetition.
#[derive(Clone, Copy, Debug)]
struct Pair {
    fabric_bps: f64,
    fabric_cpu: f64,
    tunnel_bps: f64,
    tunnel_cpu: f64,
}

/// How one peer saw node1 go.
#[derive(Clone, Debug, Default)]
struct Watch {
    /// Arrival of the first answer without the node, since the call's start.
    gone_after: Option<Duration>,
    /// Sending of the last request whose answer still listed it (zero: none did).
    last_listed: Duration,
    polls: u32,
    errors: u32,
    last_error: Option<String>,
    /// Time between consecutive answers.
    periods_ms: Vec<f64>,
}

impl Watch {
    /// Width of the interval the removal lies in.
    fn resolution(&self) -> Option<Duration> {
        self.gone_after.map(|g| g.saturating_sub(self.last_listed))
    }
}

/// Parts 2 and 3 in one repetition.
#[derive(Clone, Debug)]
struct TamperRep {
    blocked_us: Option<u64>,
    keys_destroyed_us: Option<u64>,
    /// Duration of the tamper call (returns once the agent blocked the fabric).
    call: Duration,
    /// Call start -> last datagram; `None`: datagrams still arrived at the end.
    last_datagram: Option<Duration>,
    arrivals: usize,
    /// Per peer (node2, node3).
    watches: Vec<(String, Watch)>,
}

impl TamperRep {
    /// The last peer to drop the node; `None` if one never did within the limit.
    fn last_peer(&self) -> Option<Duration> {
        self.watches
            .iter()
            .map(|(_, w)| w.gone_after)
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
    }
}

struct Results {
    lease_bps: u64,
    fabric_mtu: u32,
    tunnel_mtu: u32,
    fabric_dst: Ipv4Addr,
    tunnel_dst: Ipv4Addr,
    pairs: Vec<Pair>,
    tampers: Vec<TamperRep>,
}

/// Time from `t0` to the last of the flow's datagrams (zero if it came before `t0`); `None`
/// if they went on into the last [`QUIET`] before `end`, or none arrived.
fn last_arrival(arrivals: &[Arrival], t0: Instant, end: Instant) -> Option<Duration> {
    let last = arrivals
        .iter()
        .filter(|a| a.len == DATAGRAM)
        .map(|a| a.at)
        .max()?;
    if last + QUIET > end {
        return None;
    }
    Some(last.saturating_duration_since(t0))
}

/// Polls `observer`'s status until it no longer lists `gone` as a peer, from `t0` for at most
/// [`POLL_LIMIT`] and [`MAX_POLLS`] polls.
async fn watch_peer(lab: &Lab, observer: &str, gone: &str, t0: Instant) -> Watch {
    let mut w = Watch::default();
    let mut prev: Option<Instant> = None;
    while w.polls < MAX_POLLS && t0.elapsed() < POLL_LIMIT {
        let sent = Instant::now();
        let r = lab.status(observer).await;
        let recv = Instant::now();
        w.polls += 1;
        if let Some(p) = prev {
            w.periods_ms.push(ms(recv - p));
        }
        prev = Some(recv);
        match r.map(|s| peers(&s)) {
            Ok(Some(p)) if p.iter().any(|n| n == gone) => {
                w.last_listed = sent.saturating_duration_since(t0);
            }
            Ok(Some(_)) => {
                w.gone_after = Some(recv.saturating_duration_since(t0));
                return w;
            }
            // No mesh section: not an answer about peers.
            Ok(None) => {
                w.errors += 1;
                w.last_error = Some("no mesh section in the status".into());
            }
            Err(e) => {
                w.errors += 1;
                w.last_error = Some(e.to_string());
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    w
}

/// Waits until `node`'s egress lease `id` is active in its datapath.
async fn wait_active(lab: &Lab, node: &str, id: u64) -> anyhow::Result<()> {
    lab.wait_status(node, "its lease active in the datapath", SETTLE, |s| {
        nicwarden_lab::scope(s, "egress").is_some_and(|d| d.lease.map(|l| l.0) == Some(id))
            && s.datapath.as_ref().is_some_and(|d| d.last_error.is_none())
    })
    .await?;
    Ok(())
}

/// Grants `node` its non-binding egress lease and waits until its datapath enforces it;
/// returns the granted rate.
async fn grant(lab: &Lab, node: &str) -> anyhow::Result<u64> {
    let v = lab
        .grant(json!({"node": node, "rate_bps": NON_BINDING_BPS}))
        .await?;
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("grant for {node}: no lease id in {v}"))?;
    wait_active(lab, node, id).await?;
    Ok(v["rate_bps"].as_u64().unwrap_or(0))
}

/// Waits until every node lists every other node as a mesh peer.
async fn wait_full_mesh(lab: &Lab, names: &[String]) -> anyhow::Result<()> {
    for n in names {
        let mut want: Vec<String> = names.iter().filter(|o| *o != n).cloned().collect();
        want.sort();
        lab.wait_status(n, &format!("mesh peers {want:?}"), SETTLE, |s| {
            peers(s).is_some_and(|mut p| {
                p.sort();
                p == want
            })
        })
        .await?;
    }
    Ok(())
}

/// Re-enrolls a tampered node as an operator would and waits until the mesh is whole again.
async fn reenroll(lab: &mut Lab, node: &str, names: &[String]) -> anyhow::Result<()> {
    let v = lab
        .call_ok("POST", &format!("/v1/nodes/{node}/token"), None, 200)
        .await?;
    let token = v["join_token"]
        .as_str()
        .with_context(|| format!("new token for {node}: no join_token in {v}"))?
        .to_string();
    lab.start_agent(node, Some(&token))?;
    lab.wait_status(node, "connected again, not tampered", SETTLE, |s| {
        s.connected && s.tampered.is_none()
    })
    .await?;
    grant(lab, node).await?;
    wait_full_mesh(lab, names).await
}

/// Part 2 and 3, one repetition: the paced flow, the tamper call, the peers polled.
async fn tamper_once(
    lab: &Lab,
    n1: &Node,
    n2: &Node,
    observers: &[String],
    port: u16,
    rep: u64,
) -> anyhow::Result<TamperRep> {
    let dst = SocketAddr::from((n2.fabric_ip, port));
    let mut spec = SendSpec::new(Proto::Udp, dst);
    spec.duration = LEAD + TAIL;
    spec.rate_bps = Some(PACED_BPS);
    spec.payload = DATAGRAM;
    let socket = n2
        .netns
        .run(move || UdpSocket::bind(dst))
        .context("enter the receiver's namespace")?
        .with_context(|| format!("bind the receiver on {dst}"))?;
    let deadline = Instant::now() + LEAD + TAIL + RECEIVER_MARGIN;
    let receiver = n2
        .netns
        .spawn_thread(move || receive(&socket, deadline))
        .context("start the receiver")?;
    let sender = n1
        .netns
        .spawn_thread(move || {
            let start = Instant::now();
            traffic::send(&spec).map(|r| start + r.elapsed)
        })
        .context("start the sender")?;
    tokio::time::sleep(LEAD).await;

    let t0 = Instant::now();
    let tamper = async {
        let r = lab
            .tamper(&n1.name, &format!("bench tunnel, repetition {}", rep + 1))
            .await;
        (r, t0.elapsed())
    };
    let watches = futures::future::join_all(
        observers
            .iter()
            .map(|o| async move { (o.clone(), watch_peer(lab, o, &n1.name, t0).await) }),
    );
    let ((answer, call), watches) = tokio::join!(tamper, watches);

    // Both threads end by their deadlines (already passed, or within a second).
    let (sender_end, arrivals) = tokio::task::block_in_place(|| {
        let sender_end = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
            .context("enter the sender's namespace")?
            .context("send");
        let arrivals = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
            .context("enter the receiver's namespace")?
            .context("receive")?;
        anyhow::Ok((sender_end?, arrivals))
    })?;
    let answer = answer.context("tamper node1")?;
    tracing::debug!(%answer, "tamper answered");
    if !arrivals.iter().any(|a| a.len == DATAGRAM && a.at < t0) {
        bail!("no datagram node1 -> node2 arrived before the tamper call: the flow did not start");
    }
    let s1 = lab.status(&n1.name).await?;
    let t = s1
        .tampered
        .as_ref()
        .context("node1's status reports no tamper after the tamper call")?;
    Ok(TamperRep {
        blocked_us: t.blocked_after_us,
        keys_destroyed_us: t.keys_destroyed_after_us,
        call,
        last_datagram: last_arrival(&arrivals, t0, sender_end),
        arrivals: arrivals.len(),
        watches,
    })
}

/// The whole measurement, in the management namespace.
async fn measure(
    tb: Arc<Testbed>,
    exe: PathBuf,
    args: &BenchTunnelArgs,
) -> anyhow::Result<Results> {
    let names: Vec<String> = tb.nodes().iter().map(|n| n.name.clone()).collect();
    let [n1, n2, n3] = match tb.nodes() {
        [a, b, c] => [a.clone(), b.clone(), c.clone()],
        other => bail!("the testbed has {} nodes, not 3", other.len()),
    };
    let mut spec = LabSpec::new(exe);
    spec.backend = "ebpf".into();
    spec.mesh = true;
    // Three non-binding leases must fit under the fabric (and default group) quota.
    spec.fabric_capacity_bps = NON_BINDING_BPS * names.len() as u64;
    let fabric_mtu = tb.spec().fabric_mtu;
    let tunnel_mtu = fabric_mtu
        .saturating_sub(80)
        .min(u32::from(nicwarden_agent::config::MESH_MAX_MTU));
    let mut lab = Lab::new(tb.clone(), spec)?;
    lab.start_controller().await?;
    lab.enroll_all().await?;
    let mut lease_bps = u64::MAX;
    for n in &names {
        lease_bps = lease_bps.min(grant(&lab, n).await?);
    }
    wait_full_mesh(&lab, &names).await?;
    let m2 = lab
        .mesh_ip(&n2.name)
        .context("node2 has no overlay address")?;
    eprintln!(
        "  cluster up: {} agents (ebpf, mesh), leases {} each, node2 fabric {} / overlay {m2}",
        names.len(),
        fmt_rate(lease_bps),
        n2.fabric_ip
    );

    // Part 1.
    let mut ports = Ports(FIRST_PORT);
    let secs = Duration::from_secs(args.secs);
    let dst = |path: Path, port: u16| match path {
        Path::Fabric => SocketAddr::from((n2.fabric_ip, port)),
        Path::Tunnel => SocketAddr::from((m2, port)),
    };
    for path in [Path::Fabric, Path::Tunnel] {
        let f =
            tokio::task::block_in_place(|| tcp_flow(&n1, &n2, dst(path, ports.next()), WARM_UP))
                .with_context(|| format!("warm-up flow on the {}", path.label()))?;
        if f.got.bytes == 0 {
            bail!(
                "warm-up on the {}: nothing delivered\nnode1:\n{}\nnode2:\n{}",
                path.label(),
                lab.log_tail(&n1.name, 20),
                lab.log_tail(&n2.name, 20)
            );
        }
    }
    let mut pairs = Vec::new();
    for rep in 0..args.reps {
        let order = if rep % 2 == 0 {
            [Path::Fabric, Path::Tunnel]
        } else {
            [Path::Tunnel, Path::Fabric]
        };
        let mut pair = Pair {
            fabric_bps: 0.0,
            fabric_cpu: f64::NAN,
            tunnel_bps: 0.0,
            tunnel_cpu: f64::NAN,
        };
        for path in order {
            let port = ports.next();
            let f = tokio::task::block_in_place(|| tcp_flow(&n1, &n2, dst(path, port), secs))
                .with_context(|| format!("TCP on the {}", path.label()))?;
            eprintln!(
                "  rep {}: {:<18} {} ({:.3} CPU s/Gbit, stop: {:?})",
                rep + 1,
                path.label(),
                gbit(f.goodput_bps()),
                f.cpu_per_gbit(),
                f.got.stop
            );
            match path {
                Path::Fabric => {
                    (pair.fabric_bps, pair.fabric_cpu) = (f.goodput_bps(), f.cpu_per_gbit())
                }
                Path::Tunnel => {
                    (pair.tunnel_bps, pair.tunnel_cpu) = (f.goodput_bps(), f.cpu_per_gbit())
                }
            }
        }
        pairs.push(pair);
    }

    // Parts 2 and 3.
    let observers = vec![n2.name.clone(), n3.name.clone()];
    let mut tampers = Vec::new();
    for rep in 0..args.reps {
        let port = ports.next();
        let t = tamper_once(&lab, &n1, &n2, &observers, port, rep).await?;
        eprintln!(
            "  rep {}: tamper: agent blocked {} us, keys {} us; call {}; last datagram {}; peers gone: {}",
            rep + 1,
            t.blocked_us.map_or("-".into(), |v| v.to_string()),
            t.keys_destroyed_us.map_or("-".into(), |v| v.to_string()),
            fmt_ms(ms(t.call)),
            fmt_opt_ms(t.last_datagram.map(ms)),
            t.watches
                .iter()
                .map(|(n, w)| format!(
                    "{n} {} ({} polls, {} errors{})",
                    fmt_opt_ms(w.gone_after.map(ms)),
                    w.polls,
                    w.errors,
                    w.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        tampers.push(t);
        if rep + 1 < args.reps {
            reenroll(&mut lab, &n1.name, &names)
                .await
                .with_context(|| format!("re-enroll node1 after repetition {}", rep + 1))?;
        }
    }
    Ok(Results {
        lease_bps,
        fabric_mtu,
        tunnel_mtu,
        fabric_dst: n2.fabric_ip,
        tunnel_dst: m2,
        pairs,
        tampers,
    })
}

/// One line about the machine: cores, CPU model, kernel, build.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!("{cores} cores ({model}), Linux {kernel}, {build} build")
}

pub fn run(args: BenchTunnelArgs) -> anyhow::Result<()> {
    let tb = Arc::new(
        Testbed::create(TestbedSpec {
            nodes: 3,
            ..TestbedSpec::default()
        })
        .context("create the testbed")?,
    );
    eprintln!(
        "bench tunnel: testbed {} (fabric MTU {}), {} repetition(s): {} s of TCP per path, then tamper + re-enroll",
        tb.id(),
        tb.spec().fabric_mtu,
        args.reps,
        args.secs
    );
    let exe = std::env::current_exe().context("find the nicwarden binary")?;
    let tb2 = tb.clone();
    let a = args.clone();
    // The lab (and its processes) is dropped inside; the testbed below, also on error.
    let results = in_mgmt(&tb, move || async move { measure(tb2, exe, &a).await })
        .context("run in the management namespace")??;
    report(&args, &results);
    match Arc::try_unwrap(tb) {
        Ok(tb) => tb.teardown().context("tear the testbed down"),
        // Still shared (cannot happen once the lab is gone): removed on drop.
        Err(_) => Ok(()),
    }
}

fn report(args: &BenchTunnelArgs, r: &Results) {
    let fabric: Vec<f64> = r.pairs.iter().map(|p| p.fabric_bps).collect();
    let tunnel: Vec<f64> = r.pairs.iter().map(|p| p.tunnel_bps).collect();
    let fabric_cpu: Vec<f64> = r.pairs.iter().map(|p| p.fabric_cpu).collect();
    let tunnel_cpu: Vec<f64> = r.pairs.iter().map(|p| p.tunnel_cpu).collect();
    let ratios: Vec<f64> = r
        .pairs
        .iter()
        .map(|p| ratio(p.tunnel_bps, p.fabric_bps))
        .collect();
    let cpu_ratios: Vec<f64> = r
        .pairs
        .iter()
        .map(|p| ratio(p.tunnel_cpu, p.fabric_cpu))
        .collect();
    let anchor = ANCHOR_ENCRYPTED_GBPS / ANCHOR_RAW_GBPS;

    let blocked: Vec<f64> = r
        .tampers
        .iter()
        .filter_map(|t| t.blocked_us)
        .map(|u| u as f64 / 1000.0)
        .collect();
    let keys: Vec<f64> = r
        .tampers
        .iter()
        .filter_map(|t| t.keys_destroyed_us)
        .map(|u| u as f64 / 1000.0)
        .collect();
    let calls: Vec<f64> = r.tampers.iter().map(|t| ms(t.call)).collect();
    let last_dgram: Vec<f64> = r
        .tampers
        .iter()
        .filter_map(|t| t.last_datagram.map(ms))
        .collect();
    let last_peer: Vec<f64> = r
        .tampers
        .iter()
        .filter_map(|t| t.last_peer().map(ms))
        .collect();
    let periods: Vec<f64> = r
        .tampers
        .iter()
        .flat_map(|t| {
            t.watches
                .iter()
                .flat_map(|(_, w)| w.periods_ms.iter().copied())
        })
        .collect();
    let resolutions: Vec<f64> = r
        .tampers
        .iter()
        .flat_map(|t| t.watches.iter().filter_map(|(_, w)| w.resolution().map(ms)))
        .collect();

    if args.json {
        let watches = |t: &TamperRep| {
            t.watches
                .iter()
                .map(|(n, w)| {
                    json!({
                        "peer": n,
                        "gone_after_ms": w.gone_after.map(ms),
                        "last_listed_ms": ms(w.last_listed),
                        "polls": w.polls,
                        "errors": w.errors,
                        "last_error": w.last_error,
                        "median_poll_period_ms": median(&w.periods_ms),
                    })
                })
                .collect::<Vec<_>>()
        };
        let v = json!({
            "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "machine": machine(),
            "repetitions": args.reps,
            "secs": args.secs,
            "lease_bps": r.lease_bps,
            "fabric_mtu": r.fabric_mtu,
            "tunnel_mtu": r.tunnel_mtu,
            "throughput": {
                "fabric_goodput_bps": fabric,
                "tunnel_goodput_bps": tunnel,
                "fabric_cpu_seconds_per_gbit": fabric_cpu,
                "tunnel_cpu_seconds_per_gbit": tunnel_cpu,
                "ratio_tunnel_to_fabric_median": median(&ratios),
                "ratio_cpu_per_gbit_median": median(&cpu_ratios),
                "anchor": {"what": "BlueField-3 IPsec offload", "encrypted_gbps": ANCHOR_ENCRYPTED_GBPS, "raw_gbps": ANCHOR_RAW_GBPS, "ratio": anchor},
            },
            "tamper": r.tampers.iter().map(|t| json!({
                "agent_blocked_after_us": t.blocked_us,
                "agent_keys_destroyed_after_us": t.keys_destroyed_us,
                "tamper_call_ms": ms(t.call),
                "last_datagram_after_ms": t.last_datagram.map(ms),
                "arrivals": t.arrivals,
                "last_peer_dropped_after_ms": t.last_peer().map(ms),
                "peers": watches(t),
            })).collect::<Vec<_>>(),
            "poll_every_ms": ms(POLL_EVERY),
            "median_poll_period_ms": median(&periods),
        });
        println!("{v}");
        return;
    }

    println!("bench tunnel: {}", machine());
    println!(
        "3 nodes on a namespaced testbed (veth + bridge), controller + 3 agents (datapath ebpf, mesh on: \
         userspace WireGuard, gotatun over TUN), every node with a {} egress lease that never binds; \
         {} repetition(s). Busy CPU is machine-wide: anything else running on the machine counts, and \
         shares the cores.",
        fmt_rate(r.lease_bps),
        args.reps
    );
    println!();
    println!(
        "1. TCP node1 -> node2, {} s per path, paths alternating (order swapped each repetition). \
         Goodput = payload at the sink / its active period; CPU = busy CPU s per Gbit delivered.",
        args.secs
    );
    println!(
        "   fabric: {} (MTU {}), tunnel: {} (MTU {}, over the same fabric, datapath and lease)",
        r.fabric_dst, r.fabric_mtu, r.tunnel_dst, r.tunnel_mtu
    );
    let mut t = Table::new(&[
        "PATH",
        "REPS",
        "GOODPUT MEDIAN",
        "MIN",
        "MAX",
        "CPU S/GBIT MEDIAN",
        "PER REPETITION",
    ]);
    for (path, v, cpu) in [
        (Path::Fabric, &fabric, &fabric_cpu),
        (Path::Tunnel, &tunnel, &tunnel_cpu),
    ] {
        t.row(vec![
            path.label().into(),
            v.len().to_string(),
            gbit(median(v)),
            gbit(min(v)),
            gbit(max(v)),
            format!("{:.3}", median(cpu)),
            v.iter().map(|b| gbit(*b)).collect::<Vec<_>>().join(", "),
        ]);
    }
    t.row(vec![
        "tunnel / fabric".into(),
        ratios.len().to_string(),
        format!("{:.2}", median(&ratios)),
        format!("{:.2}", min(&ratios)),
        format!("{:.2}", max(&ratios)),
        format!("{:.2}", median(&cpu_ratios)),
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
    ]);
    print!("{}", t.render());
    println!(
        "   encrypted/unencrypted goodput: {:.2} (median of per-repetition ratios). Anchor: BlueField-3 \
         IPsec offload {ANCHOR_ENCRYPTED_GBPS:.0} Gbit/s vs {ANCHOR_RAW_GBPS:.0} Gbit/s raw, ratio {anchor:.2}. \
         Ours is a userspace implementation on {} cores: compare the ratio only, not the rates.",
        median(&ratios),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "2. tamper node1 -> its fabric blocked. Agent: event -> kernel state applied, event -> keys \
         destroyed (its own clock). External: UDP node1 -> node2 fabric at {} in {} B datagrams; from \
         just before the tamper call to the last datagram's arrival at node2 (1 datagram / {:.0} us). \
         node1 is re-enrolled between repetitions.",
        fmt_rate(PACED_BPS),
        DATAGRAM,
        DATAGRAM as f64 * 8.0 / PACED_BPS as f64 * 1e6
    );
    println!(
        "   The agent's figures end when its whole reconcile (eBPF map write first, then the HTB \
         classes), and then the key destruction, returned; packets stop at the map write, so the \
         external figure can be the smaller one. The tamper call returns after the agent's whole \
         response (block, keys, record, report)."
    );
    let mut t = Table::new(&[
        "REP",
        "AGENT: BLOCKED",
        "AGENT: KEYS DESTROYED",
        "TAMPER CALL",
        "LAST DATAGRAM AFTER",
        "ARRIVALS",
    ]);
    for (i, x) in r.tampers.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            fmt_opt_ms(x.blocked_us.map(|u| u as f64 / 1000.0)),
            fmt_opt_ms(x.keys_destroyed_us.map(|u| u as f64 / 1000.0)),
            fmt_ms(ms(x.call)),
            x.last_datagram
                .map_or("not stopped".into(), |d| fmt_ms(ms(d))),
            x.arrivals.to_string(),
        ]);
    }
    let stat = |v: &[f64], f: fn(&[f64]) -> f64| {
        if v.is_empty() {
            "-".to_string()
        } else {
            fmt_ms(f(v))
        }
    };
    for (label, f) in [("median", median as fn(&[f64]) -> f64), ("max", max)] {
        t.row(vec![
            label.into(),
            stat(&blocked, f),
            stat(&keys, f),
            stat(&calls, f),
            stat(&last_dgram, f),
            String::new(),
        ]);
    }
    print!("{}", t.render());
    println!();
    println!(
        "3. tamper node1 -> every peer dropped its key: node2's and node3's /status polled concurrently \
         from just before the tamper call (request, answer, {} ms sleep; at most {} s), until node1 is \
         no longer a peer. Figure = arrival of the first answer without node1; the removal lies after \
         the last request still answered with it. Polling resolution: median poll period {:.1} ms, \
         median bracket {:.1} ms, max bracket {:.1} ms.",
        ms(POLL_EVERY),
        POLL_LIMIT.as_secs(),
        median(&periods),
        median(&resolutions),
        max(&resolutions)
    );
    let names: Vec<String> = r
        .tampers
        .first()
        .map(|t| t.watches.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut headers: Vec<String> = vec!["REP".into()];
    for n in &names {
        headers.push(format!("{} DROPPED AFTER", n.to_uppercase()));
        headers.push("BRACKET".into());
    }
    headers.push("LAST PEER".into());
    let mut t = Table::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    for (i, x) in r.tampers.iter().enumerate() {
        let mut row = vec![(i + 1).to_string()];
        for (_, w) in &x.watches {
            row.push(
                w.gone_after
                    .map_or(format!("not within {} s", POLL_LIMIT.as_secs()), |d| {
                        fmt_ms(ms(d))
                    }),
            );
            row.push(fmt_opt_ms(w.resolution().map(ms)));
        }
        row.push(fmt_opt_ms(x.last_peer().map(ms)));
        t.row(row);
    }
    for (label, f) in [("median", median as fn(&[f64]) -> f64), ("max", max)] {
        let mut row = vec![label.to_string()];
        row.extend(std::iter::repeat_n(String::new(), names.len() * 2));
        row.push(stat(&last_peer, f));
        t.row(row);
    }
    print!("{}", t.render());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(base: Instant, offsets_ms: &[u64], len: usize) -> Vec<Arrival> {
        offsets_ms
            .iter()
            .map(|m| Arrival {
                at: base + Duration::from_millis(*m),
                len,
            })
            .collect()
    }

    #[test]
    fn last_datagram_after_the_call() {
        let base = Instant::now();
        let t0 = base + Duration::from_millis(300);
        let end = base + Duration::from_millis(1500);
        let mut a = arrivals(base, &[100, 299, 302], DATAGRAM);
        // The sender's short end-of-stream datagrams do not count.
        a.extend(arrivals(base, &[1400], 16));
        assert_eq!(last_arrival(&a, t0, end), Some(Duration::from_millis(2)));
        assert_eq!(
            last_arrival(&arrivals(base, &[100], DATAGRAM), t0, end),
            Some(Duration::ZERO)
        );
        // Still arriving near the end: not stopped.
        assert_eq!(
            last_arrival(&arrivals(base, &[1450], DATAGRAM), t0, end),
            None
        );
        assert_eq!(last_arrival(&[], t0, end), None);
    }

    #[test]
    fn the_last_peer_is_the_slowest_or_none() {
        let w = |g: Option<u64>| Watch {
            gone_after: g.map(Duration::from_millis),
            last_listed: Duration::from_millis(1),
            ..Watch::default()
        };
        let rep = |a, b| TamperRep {
            blocked_us: None,
            keys_destroyed_us: None,
            call: Duration::ZERO,
            last_datagram: None,
            arrivals: 0,
            watches: vec![("node2".into(), w(a)), ("node3".into(), w(b))],
        };
        assert_eq!(
            rep(Some(5), Some(9)).last_peer(),
            Some(Duration::from_millis(9))
        );
        assert_eq!(rep(Some(5), None).last_peer(), None);
        assert_eq!(w(Some(5)).resolution(), Some(Duration::from_millis(4)));
    }

    #[test]
    fn ports_are_fresh() {
        let mut p = Ports(FIRST_PORT);
        assert_eq!((p.next(), p.next()), (FIRST_PORT + 1, FIRST_PORT + 2));
    }
}
