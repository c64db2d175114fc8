//! Privileged end-to-end tests of enforcement on real packets: a testbed of network
//! namespaces, the controller and agents as real processes (datapath `tc`), and the
//! testbed's traffic generator and sink. They run as root (as in CI) and say they are
//! skipped otherwise.

use nicwarden_lab::{in_mgmt, Lab, LabSpec};
use nicwarden_lease::agent::SlotState;
use nicwarden_testbed::traffic::{self, Proto, Report, SendSpec, SinkSpec};
use nicwarden_testbed::{Node, Testbed, TestbedSpec};
use serde_json::json;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::BIN;

/// The agents' datapath backends every test runs against.
const BACKENDS: [&str; 2] = ["ebpf", "tc"];

/// For each backend: builds a testbed of `nodes`, starts the controller and enrolls an agent
/// per node with that backend, then runs `body` inside the management namespace.
/// Everything is removed afterwards, also when `body` panics.
fn with_lab<F, Fut>(nodes: usize, body: F)
where
    F: Fn(Lab) -> Fut + Send + Sync,
    Fut: Future<Output = ()>,
{
    with_lab_on(&BACKENDS, nodes, body)
}

/// [`with_lab`] for the given backends only.
fn with_lab_on<F, Fut>(backends: &[&str], nodes: usize, body: F)
where
    F: Fn(Lab) -> Fut + Send + Sync,
    Fut: Future<Output = ()>,
{
    if !nicwarden_testbed::has_privileges() {
        eprintln!("skipped: needs root (network namespaces, tc, nftables, bpf)");
        return;
    }
    // These tests measure rates and delays on real packets: never beside a test that
    // loads the whole machine.
    let _quiet = crate::harness::MACHINE.blocking_read();
    for &backend in backends {
        eprintln!("== datapath backend {backend}");
        let tb = Arc::new(
            Testbed::create(TestbedSpec {
                nodes,
                ..TestbedSpec::default()
            })
            .expect("create the testbed"),
        );
        let tb2 = tb.clone();
        let body = &body;
        in_mgmt(&tb, move || async move {
            let mut spec = LabSpec::new(BIN);
            spec.backend = backend.to_string();
            let mut lab = Lab::new(tb2, spec).expect("lab");
            lab.start_controller().await.expect("start the controller");
            lab.enroll_all().await.expect("enroll the agents");
            body(lab).await
        })
        .expect("run in the management namespace");
    }
}

pub(crate) fn node(lab: &Lab, name: &str) -> Node {
    lab.testbed().node(name).expect("testbed node").clone()
}

type Joined<T> =
    JoinHandle<Result<Result<T, traffic::TrafficError>, nicwarden_testbed::TestbedError>>;

/// One flow from a node to another: a sink on the receiver's fabric address (bound before
/// the sender starts), a sender thread in the sender's namespace.
pub(crate) struct Flow {
    sink: Joined<Report>,
    sender: Joined<Report>,
    progress: Arc<std::sync::atomic::AtomicU64>,
    /// When the sink's clock started (its report's offsets count from there).
    started: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Flow {
    /// Starts `spec` (its destination port on `to`) from `from`; the sink stops after `idle`
    /// without data, and at the latest `idle` + 2 s after the sender's duration.
    pub(crate) fn start(from: &Node, to: &Node, spec: SendSpec, idle: Duration) -> Flow {
        let listen = spec.dst;
        let mut sink_spec = SinkSpec::new(spec.proto, listen);
        sink_spec.duration = spec.duration + idle + Duration::from_secs(2);
        sink_spec.idle_timeout = idle;
        let sink = to
            .netns
            .run(move || traffic::Sink::bind(sink_spec))
            .expect("enter the receiver's namespace")
            .expect("bind the sink");
        let progress = sink.progress();
        let started = Arc::new(std::sync::Mutex::new(None));
        let s2 = started.clone();
        let sink = to
            .netns
            .spawn_thread(move || {
                *s2.lock().expect("lock") = Some(Instant::now());
                sink.run()
            })
            .expect("start the sink thread");
        let sender = from
            .netns
            .spawn_thread(move || traffic::send(&spec))
            .expect("start the sender thread");
        Flow {
            sink,
            sender,
            progress,
            started,
        }
    }

    /// Waits (bounded) until at least `bytes` arrived.
    pub(crate) async fn wait_bytes(&self, bytes: u64, limit: Duration) {
        let end = Instant::now() + limit;
        while self.progress.load(Ordering::SeqCst) < bytes {
            assert!(
                Instant::now() < end,
                "only {} bytes arrived within {limit:?}",
                self.progress.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What was sent, what arrived, and the instant the last byte arrived.
    pub(crate) fn finish(self) -> (Report, Report, Option<Instant>) {
        let sent = self
            .sender
            .join()
            .expect("sender thread")
            .expect("enter the namespace")
            .expect("send");
        let got = self
            .sink
            .join()
            .expect("sink thread")
            .expect("enter the namespace")
            .expect("sink");
        let start = self.started.lock().expect("lock").expect("sink started");
        let last = got.last_byte_at.map(|d| start + d);
        (sent, got, last)
    }
}

fn udp(dst: &Node, port: u16, secs: u64, rate: Option<u64>) -> SendSpec {
    let mut s = SendSpec::new(Proto::Udp, SocketAddr::from((dst.fabric_ip, port)));
    s.duration = Duration::from_secs(secs);
    s.rate_bps = rate;
    s.payload = 8000;
    s
}

async fn wait_active(lab: &Lab, node: &str, scope: &str, lease: u64) {
    lab.wait_status(
        node,
        "the lease active in its datapath",
        Duration::from_secs(10),
        |s| {
            nicwarden_lab::scope(s, scope).is_some_and(|d| {
                d.state == SlotState::Active && d.lease.map(|l| l.0) == Some(lease)
            }) && s.datapath.as_ref().is_some_and(|d| d.last_error.is_none())
        },
    )
    .await
    .expect("lease active");
}

/// node2 receives in these tests: with no lease of its own its fabric is closed in both
/// directions (the eBPF ingress program drops what arrives), so it gets one that does not
/// bind.
async fn open_receiver(lab: &Lab) {
    grant(lab, json!({"node": "node2", "rate_bps": 1_000_000_000u64})).await;
}

/// A UDP flow node1 → node2 at 20 Mbit/s for `secs` on `port` (node2 opened to receive),
/// once 1 MB has arrived; the sink stops after `idle` s without data.
async fn flowing(lab: &Lab, port: u16, secs: u64, idle: u64) -> (Flow, Node, Node) {
    open_receiver(lab).await;
    let (n1, n2) = (node(lab, "node1"), node(lab, "node2"));
    let flow = Flow::start(
        &n1,
        &n2,
        udp(&n2, port, secs, Some(20_000_000)),
        Duration::from_secs(idle),
    );
    flow.wait_bytes(1_000_000, Duration::from_secs(5)).await;
    (flow, n1, n2)
}

async fn grant(lab: &Lab, req: serde_json::Value) -> u64 {
    let node = req["node"].as_str().expect("node").to_string();
    let scope = req["scope"].as_str().unwrap_or("egress").to_string();
    let v = lab.grant(req).await.expect("grant");
    let id = v["id"].as_u64().expect("lease id");
    wait_active(lab, &node, &scope, id).await;
    id
}

#[test]
fn tcp_goodput_under_a_50_mbit_lease_is_within_5_percent() {
    with_lab(2, |lab| async move {
        grant(&lab, json!({"node": "node1", "rate_bps": 50_000_000u64})).await;
        // The receiver must be open, also for its ACKs.
        open_receiver(&lab).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let mut spec = SendSpec::new(Proto::Tcp, SocketAddr::from((n2.fabric_ip, 5201)));
        spec.duration = Duration::from_secs(5);
        let (sent, got, _) = Flow::start(&n1, &n2, spec, Duration::from_secs(2)).finish();
        let err = (got.rate_bps() - 50e6) / 50e6 * 100.0;
        eprintln!("sent {sent}\nreceived {got}\ngoodput error {err:+.2}%");
        assert!(
            err.abs() < 5.0,
            "goodput {:.0} bit/s is {err:+.2}% off a 50 Mbit/s lease",
            got.rate_bps()
        );
    });
}

#[test]
fn a_10_mb_volume_lets_10_mb_through_then_nothing() {
    with_lab(2, |lab| async move {
        let volume = 10_000_000u64;
        let lease = grant(
            &lab,
            json!({"node": "node1", "rate_bps": 1_000_000_000u64, "volume_bytes": volume}),
        )
        .await;
        open_receiver(&lab).await;
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        // Paced below the lease's rate, so nothing is lost to shaping: every datagram the
        // volume admits arrives. 15 MB offered, 10 MB allowed.
        let mut spec = udp(&n2, 5202, 10, Some(200_000_000));
        spec.max_bytes = Some(15_000_000);
        let (sent, got, _) = Flow::start(&n1, &n2, spec, Duration::from_secs(1)).finish();
        // What the volume counts: IP packets (payload + 8 bytes UDP + 20 bytes IP).
        let packet = 8000 + 28;
        let delivered_ip = got.bytes + got.packets * 28;
        eprintln!("sent {sent}\nreceived {got}\nIP bytes delivered {delivered_ip} of a {volume}-byte volume");
        // The sender offered the whole 15 MB: the `tc` backend's nftables drop refuses the
        // excess with EPERM (retried until the deadline), the eBPF program drops it silently.
        assert!(
            sent.send_errors > 0 || sent.bytes == 15_000_000,
            "the sender did not offer more than the volume: {sent}"
        );
        assert!(
            delivered_ip <= volume + packet,
            "{delivered_ip} IP bytes delivered: more than the volume plus one packet\nagent log:\n{}",
            lab.log_tail("node1", 40)
        );
        assert!(
            delivered_ip + 2 * packet > volume,
            "{delivered_ip} IP bytes delivered: the volume ({volume}) was not used up"
        );
        let st = lab
            .wait_status(
                "node1",
                "the lease exhausted",
                Duration::from_secs(5),
                |s| {
                    nicwarden_lab::scope(s, "egress")
                        .is_some_and(|d| d.state == SlotState::Exhausted)
                },
            )
            .await
            .expect("exhausted");
        let dp = st.datapath.as_ref().expect("datapath status");
        let k = dp
            .scopes
            .iter()
            .find(|k| k.scope == "egress")
            .expect("egress counters");
        // The quota dropped the excess, then the spent lease put the scope at its floor.
        assert!(k.volume_drops + k.drops > 0, "nothing dropped: {k:?}");
        let d = nicwarden_lab::scope(&st, "egress").expect("egress");
        assert_eq!(
            d.usage.bytes, volume,
            "the lease's usage is its whole volume"
        );
        // The controller heard of it.
        let (code, audit) = lab
            .call("GET", "/v1/audit?limit=1000", None)
            .await
            .expect("audit");
        assert_eq!(code, 200, "{audit}");
        let text = audit.to_string();
        assert!(
            text.contains("lease.exhausted") && text.contains(&format!("\"lease\":{lease}")),
            "no lease.exhausted audit entry for lease {lease}: {text}"
        );
    });
}

#[test]
fn a_revoked_lease_stops_traffic_within_a_second() {
    with_lab(2, |lab| async move {
        let lease = grant(&lab, json!({"node": "node1", "rate_bps": 100_000_000u64})).await;
        let (flow, _, _) = flowing(&lab, 5203, 6, 8).await;
        let revoked_at = Instant::now();
        lab.revoke(lease, "test").await.expect("revoke");
        let (sent, got, last) = flow.finish();
        let last = last.expect("traffic arrived");
        let after = last.saturating_duration_since(revoked_at);
        eprintln!(
            "sent {sent}\nreceived {got}\nlast datagram {after:?} after the revocation was sent"
        );
        assert!(
            after < Duration::from_secs(1),
            "traffic went on {after:?} after the revocation"
        );
        assert!(
            sent.elapsed > Duration::from_secs(5),
            "the sender kept offering traffic"
        );
    });
}

#[test]
fn a_lapsed_lease_stops_traffic_at_its_deadline_when_the_controller_is_gone() {
    with_lab(2, |mut lab| async move {
        grant(
            &lab,
            json!({"node": "node1", "rate_bps": 100_000_000u64, "ttl_s": 3, "renew_s": 1}),
        )
        .await;
        let (flow, _, _) = flowing(&lab, 5204, 8, 8).await;
        lab.kill_controller();
        // The deadline the agent holds now that no renewal can come.
        let asked = Instant::now();
        let st = lab.status("node1").await.expect("status");
        let d = nicwarden_lab::scope(&st, "egress").expect("egress");
        assert_eq!(d.state, SlotState::Active);
        let deadline = asked + Duration::from_millis(d.deadline_in_ms.expect("deadline"));
        let (_, got, last) = flow.finish();
        let last = last.expect("traffic arrived");
        eprintln!("received {got}");
        let early = deadline.saturating_duration_since(last);
        let late = last.saturating_duration_since(deadline);
        eprintln!("last datagram: {early:?} before / {late:?} after the deadline");
        assert!(
            late < Duration::from_millis(250),
            "traffic went on {late:?} past the deadline"
        );
        assert!(
            early < Duration::from_millis(250),
            "traffic stopped {early:?} before the deadline"
        );
        let st = lab.status("node1").await.expect("status");
        assert_eq!(
            nicwarden_lab::scope(&st, "egress").map(|d| d.state),
            Some(SlotState::Expired)
        );
    });
}

#[test]
fn killing_the_agent_leaves_enforcement_in_place_until_cleanup() {
    with_lab(3, |mut lab| async move {
        grant(&lab, json!({"node": "node1", "rate_bps": 50_000_000u64})).await;
        lab.kill_agent("node1");
        lab.kill_agent("node3");
        open_receiver(&lab).await;
        let (n1, n2, n3) = (
            node(&lab, "node1"),
            node(&lab, "node2"),
            node(&lab, "node3"),
        );
        // node1 is still shaped to its lease: not blocked, not unlimited.
        let spec = udp(&n2, 5205, 3, Some(400_000_000));
        let (_, got, _) = Flow::start(&n1, &n2, spec, Duration::from_secs(2)).finish();
        let err = (got.rate_bps() - 50e6) / 50e6 * 100.0;
        eprintln!("node1 without its agent: {got} ({err:+.2}%)");
        assert!(
            err.abs() < 5.0,
            "node1 not held to its 50 Mbit/s lease: {err:+.2}%"
        );
        // node3 (no lease) is still blocked.
        let spec = udp(&n2, 5206, 2, Some(50_000_000));
        let (sent, got, _) = Flow::start(&n3, &n2, spec, Duration::from_secs(4)).finish();
        assert!(
            sent.send_errors > 0 || sent.bytes > 1_000_000,
            "node3 offered nothing: {sent}"
        );
        assert_eq!(got.bytes, 0, "node3 has no lease and no agent, yet {got}");
        // An explicit cleanup removes the enforcement (the agent never does it on exit).
        let out = n1
            .netns
            .command(BIN)
            .args([
                "agent",
                "--cleanup",
                "--node",
                "node1",
                "--datapath",
                lab.backend(),
                "--bpf-pin-dir",
                &lab.pin_dir("node1").display().to_string(),
                "--fabric-iface",
                "fab0",
            ])
            .env("RUST_LOG", "off")
            .output()
            .expect("run agent --cleanup");
        assert!(
            out.status.success(),
            "cleanup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nft = n1
            .netns
            .command("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft");
        assert!(
            !String::from_utf8_lossy(&nft.stdout).contains("nicwarden"),
            "nft table left"
        );
        let spec = udp(&n2, 5207, 2, Some(200_000_000));
        let (_, got, _) = Flow::start(&n1, &n2, spec, Duration::from_secs(2)).finish();
        assert!(
            got.rate_bps() > 100e6,
            "after cleanup node1 is unshaped: {got}"
        );
    });
}

#[test]
fn the_management_channel_works_while_the_fabric_is_blocked() {
    with_lab(2, |lab| async move {
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        // node1 has no lease: its fabric is blocked.
        let probe = n1
            .netns
            .run(move || {
                traffic::probe_tcp(
                    SocketAddr::from((n2.fabric_ip, 22)),
                    Duration::from_millis(500),
                )
            })
            .expect("ns");
        assert!(
            !probe.is_reachable(),
            "fabric open without a lease: {probe:?}"
        );
        // The controller's telemetry shows what the closed fabric dropped.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (st, v) = lab
                .call("GET", "/v1/telemetry/fleet", None)
                .await
                .expect("fleet");
            assert_eq!(st, 200, "{v}");
            let drops = v["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["node"] == "node1"))
                .and_then(|n| {
                    n["scopes"]
                        .as_array()?
                        .iter()
                        .find(|s| s["scope"] == "egress")
                        .cloned()
                })
                .and_then(|s| s["dropped_packets"].as_u64())
                .unwrap_or(0);
            if drops > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the controller shows no drops for node1's closed fabric: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Its agent is connected and answers over management.
        let st = lab.status("node1").await.expect("status over management");
        assert!(st.connected, "agent not connected: {st:?}");
        assert_eq!(
            nicwarden_lab::scope(&st, "egress").map(|d| d.state),
            Some(SlotState::Pending)
        );
        // Bulk traffic over management is not touched by the fabric's enforcement.
        let ctl = lab.testbed().controller_ip();
        let mut spec = SinkSpec::new(Proto::Tcp, SocketAddr::from((ctl, 0)));
        spec.duration = Duration::from_secs(20);
        let sink = traffic::Sink::bind(spec).expect("sink in the management namespace");
        let addr = sink.local_addr().expect("addr");
        let sink = std::thread::spawn(move || sink.run());
        let mut send = SendSpec::new(Proto::Tcp, addr);
        send.max_bytes = Some(5_000_000);
        let sent = n1
            .netns
            .run(move || traffic::send(&send))
            .expect("ns")
            .expect("send");
        let got = sink.join().expect("sink thread").expect("sink");
        assert_eq!(sent.bytes, 5_000_000);
        assert_eq!(got.bytes, 5_000_000, "management transfer: {got}");
    });
}

#[test]
fn a_restarted_agent_resumes_its_leases_without_touching_the_kernel() {
    with_lab(2, |mut lab| async move {
        let lease = grant(
            &lab,
            json!({"node": "node1", "rate_bps": 100_000_000u64, "volume_bytes": 1_000_000_000u64}),
        )
        .await;
        let (flow, _, _) = flowing(&lab, 5208, 5, 3).await;
        let before = lab
            .wait_status("node1", "usage counted", Duration::from_secs(5), |s| {
                nicwarden_lab::scope(s, "egress").is_some_and(|d| d.usage.bytes > 0)
            })
            .await
            .expect("usage");
        let used_before = nicwarden_lab::scope(&before, "egress")
            .expect("egress")
            .usage
            .bytes;
        lab.kill_agent("node1");
        lab.start_agent("node1", None).expect("restart the agent");
        // The restarted agent enforces its held lease from its first moment: the kernel
        // already holds exactly that, so its first reconcile changes nothing.
        let st = lab
            .wait_status(
                "node1",
                "restarted with its lease",
                Duration::from_secs(10),
                |s| {
                    s.datapath.is_some()
                        && nicwarden_lab::scope(s, "egress").is_some_and(|d| {
                            d.state == SlotState::Active && d.lease.map(|l| l.0) == Some(lease)
                        })
                },
            )
            .await
            .expect("restarted");
        let dp = st.datapath.as_ref().expect("datapath");
        assert_eq!(
            dp.changes_applied,
            0,
            "the restart changed the kernel: {dp:?}\n{}",
            lab.log_tail("node1", 30)
        );
        // Usage continues from the kernel's count (never back to the controller's older one).
        lab.wait_status(
            "node1",
            "usage beyond the pre-restart count",
            Duration::from_secs(5),
            |s| nicwarden_lab::scope(s, "egress").is_some_and(|d| d.usage.bytes > used_before),
        )
        .await
        .expect("usage continues");
        let (sent, got, _) = flow.finish();
        eprintln!("sent {sent}\nreceived {got}");
        assert_eq!(
            sent.send_errors, 0,
            "sends were refused during the restart: {sent}"
        );
        assert_eq!(
            got.lost,
            Some(0),
            "datagrams lost during the restart: {got}"
        );
    });
}

#[test]
fn ingress_policing_holds_a_sender_without_an_agent_to_the_receivers_lease() {
    // Only the eBPF backend polices what arrives.
    with_lab_on(&["ebpf"], 2, |mut lab| async move {
        // node1 could send a lot, but its agent is gone and its enforcement removed: it is a
        // node without an agent. node2 accepts 50 Mbit/s from it.
        grant(&lab, json!({"node": "node1", "rate_bps": 1_000_000_000u64})).await;
        grant(
            &lab,
            json!({"node": "node2", "rate_bps": 50_000_000u64, "scope": "peer:node1"}),
        )
        .await;
        // node2 must also be able to receive from the rest (its egress scope).
        open_receiver(&lab).await;
        lab.kill_agent("node1");
        let (n1, n2) = (node(&lab, "node1"), node(&lab, "node2"));
        let out = n1
            .netns
            .command(BIN)
            .args(["agent", "--cleanup", "--node", "node1", "--bpf-pin-dir"])
            .arg(lab.pin_dir("node1"))
            .env("RUST_LOG", "off")
            .output()
            .expect("run agent --cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spec = udp(&n2, 5209, 3, Some(400_000_000));
        let (sent, got, _) = Flow::start(&n1, &n2, spec, Duration::from_secs(2)).finish();
        // The policer counts IP bytes; the sink counts payload (8000 of every 8028).
        let ip_rate = got.rate_bps() * 8028.0 / 8000.0;
        let err = (ip_rate - 50e6) / 50e6 * 100.0;
        eprintln!("sent {sent}\nreceived {got}\nIP rate {ip_rate:.0} bit/s ({err:+.2}%)");
        assert!(
            sent.rate_bps() > 200e6,
            "node1 was not held back at its end: {sent}"
        );
        assert!(
            err.abs() < 5.0,
            "node2 let {ip_rate:.0} bit/s in under a 50 Mbit/s lease"
        );
        let st = lab.status("node2").await.expect("status");
        let k = st
            .datapath
            .as_ref()
            .and_then(|d| d.scopes.iter().find(|k| k.scope == "peer:node1"))
            .cloned()
            .expect("peer:node1 counters");
        assert!(k.ingress_drops > 0 && k.ingress_bytes > 0, "{k:?}");
    });
}
