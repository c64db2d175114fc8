//! `nicwarden bench`: measurements of enforcement on real packets, in a namespaced 3-node
//! testbed (node1 sends to node2; node3 is idle, or the unenforced reference of `shaping`).
//!
//! One module per subcommand: [`shaping`] (leased vs achieved rate of the `tc` backend),
//! [`backends`] (enforcement variants side by side: throughput, CPU, packet rate), [`scale`]
//! (linear rule chains of 1 to 10,000 scopes), [`volume`] (bytes past a volume limit) and
//! [`latency`] (lease change to the first packets that obey it); [`telemetry`] (the
//! controller under simulated agents) runs on loopback instead. The variants under test,
//! each an install/remove pair on node1's fabric, are in [`variant`]; the eBPF backend plugs
//! in there. Shared here: the testbed ([`Bench`]), flows with the machine's busy CPU time
//! ([`Flow`]), statistics and output.
//!
//! Every loop is bounded: by the repetition count, the list being measured, or a deadline
//! (the testbed's traffic generator and sink stop at theirs).

mod backends;
mod latency;
mod mesh;
mod scale;
mod shaping;
mod telemetry;
mod tunnel;
mod variant;
mod volume;

use anyhow::Context as _;
use nicwarden_datapath::{DesiredState, ScopeEnforce, ScopeSpec};
use nicwarden_lease::{LeaseId, Scope};
use nicwarden_testbed::traffic::{self, Proto, Report, SendSpec, SinkSpec};
use nicwarden_testbed::{Node, Testbed, TestbedSpec};
use std::cell::Cell;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::cli::{BenchCmd, BenchSub};
use crate::table::Table;

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    // `telemetry` runs on loopback only: no testbed, no root.
    if !matches!(cmd.command, BenchSub::Telemetry(_) | BenchSub::Mesh(_)) {
        crate::demo::require_root(&format!("bench {}", cmd.command.name()))?;
    }
    match cmd.command {
        BenchSub::Telemetry(args) => telemetry::run(args),
        BenchSub::Mesh(args) => mesh::run(args),
        BenchSub::Shaping(args) => shaping::run(args),
        BenchSub::Backends(args) => backends::run(args),
        BenchSub::Scale(args) => scale::run(args),
        BenchSub::Volume(args) => volume::run(args),
        BenchSub::Latency(args) => latency::run(args),
        BenchSub::Tunnel(args) => tunnel::run(args),
    }
}

/// First port the benchmarks' sinks listen on; each flow takes the next one, so a late
/// packet of one flow never reaches the next flow's sink.
const FIRST_PORT: u16 = 5300;

/// Rate of the paced UDP flows of `volume` and `latency`: below their leases' 1 Gbit/s, so
/// shaping loses nothing, far above the 10 Mbit/s `latency` cuts the rate to.
pub const PACED_BPS: u64 = 200_000_000;
/// Payload of the paced UDP datagrams: one every 320 us at [`PACED_BPS`].
pub const DATAGRAM: usize = 8000;
/// Rate of the leases `volume` and `latency` start from.
pub const LEASE_BPS: u64 = 1_000_000_000;

/// The testbed of a benchmark: three nodes, node1 the sender, node2 the receiver.
pub struct Bench {
    tb: Testbed,
    port: Cell<u16>,
}

impl Bench {
    /// Builds the testbed and says so on stderr, with `what` the run will do.
    pub fn create(name: &str, what: &str) -> anyhow::Result<Bench> {
        let tb = Testbed::create(TestbedSpec {
            nodes: 3,
            ..TestbedSpec::default()
        })
        .context("create the testbed")?;
        eprintln!(
            "bench {name}: testbed {} (fabric MTU {}), {what}",
            tb.id(),
            tb.spec().fabric_mtu,
        );
        Ok(Bench {
            tb,
            port: Cell::new(FIRST_PORT),
        })
    }

    /// node1: where enforcement is installed, and the sender.
    pub fn sender(&self) -> &Node {
        &self.tb.nodes()[0]
    }

    /// node2: the receiver.
    pub fn receiver(&self) -> &Node {
        &self.tb.nodes()[1]
    }

    /// node3: no enforcement on its fabric.
    pub fn bystander(&self) -> &Node {
        &self.tb.nodes()[2]
    }

    /// A send spec to the receiver, on a port no earlier flow used.
    pub fn spec(&self, proto: Proto, duration: Duration) -> SendSpec {
        let port = self.port.get().wrapping_add(1).max(FIRST_PORT);
        self.port.set(port);
        let mut spec = SendSpec::new(proto, SocketAddr::from((self.receiver().fabric_ip, port)));
        spec.duration = duration;
        spec
    }

    /// A UDP spec to the receiver paced at [`PACED_BPS`] in [`DATAGRAM`]-byte datagrams.
    pub fn paced_udp(&self, duration: Duration) -> SendSpec {
        let mut spec = self.spec(Proto::Udp, duration);
        spec.rate_bps = Some(PACED_BPS);
        spec.payload = DATAGRAM;
        spec
    }

    /// Runs `spec` from `from` to a sink on the receiver (bound first; it stops at the end
    /// of the stream, after `idle` without data, or at the latest 10 s after the sender's
    /// duration), and reads the machine's busy CPU time around it.
    pub fn flow(&self, from: &Node, spec: SendSpec, idle: Duration) -> anyhow::Result<Flow> {
        let mut sink_spec = SinkSpec::new(spec.proto, spec.dst);
        sink_spec.duration = spec.duration + Duration::from_secs(10);
        sink_spec.idle_timeout = idle;
        let cpu_before = busy_cpu()?;
        let sink = self
            .receiver()
            .netns
            .run(move || traffic::Sink::bind(sink_spec))
            .context("enter the receiver's namespace")?
            .context("bind the sink")?;
        let sink_thread = self
            .receiver()
            .netns
            .spawn_thread(move || sink.run())
            .context("start the sink thread")?;
        let sent = from
            .netns
            .run(move || traffic::send(&spec))
            .context("enter the sender's namespace")?
            .context("send")?;
        let got = sink_thread
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))?
            .context("enter the receiver's namespace")?
            .context("sink")?;
        let cpu = busy_cpu()?.saturating_sub(cpu_before);
        Ok(Flow { sent, got, cpu })
    }

    /// A TCP flow from the sender whose figures are not kept: the first flows after the
    /// testbed is built run slower (caches, allocators, neighbour entries warming up).
    pub fn warm_up(&self) -> anyhow::Result<()> {
        self.flow(
            self.sender(),
            self.spec(Proto::Tcp, Duration::from_secs(2)),
            Duration::from_secs(1),
        )
        .map(drop)
        .context("warm-up flow")
    }

    pub fn teardown(self) -> anyhow::Result<()> {
        self.tb.teardown().context("tear the testbed down")
    }
}

/// What one flow did.
pub struct Flow {
    /// The sender's report (what the kernel accepted).
    pub sent: Report,
    /// The sink's report: the authority on delivery.
    pub got: Report,
    /// Busy CPU time of the whole machine while the flow ran (all cores added up).
    pub cpu: Duration,
}

impl Flow {
    /// Payload goodput at the sink over its active period (first to last byte).
    pub fn goodput_bps(&self) -> f64 {
        self.got.rate_bps()
    }

    /// Datagrams (UDP) delivered per second of the sink's active period.
    pub fn delivered_pps(&self) -> f64 {
        let active = self.got.active().as_secs_f64();
        if active <= 0.0 {
            return 0.0;
        }
        self.got.packets as f64 / active
    }

    /// Busy CPU seconds per Gbit of payload delivered (= busy cores per Gbit/s).
    pub fn cpu_per_gbit(&self) -> f64 {
        let gbit = self.got.bytes as f64 * 8.0 / 1e9;
        if gbit <= 0.0 {
            return f64::NAN;
        }
        self.cpu.as_secs_f64() / gbit
    }
}

/// Clock ticks per second of `/proc/stat` (`USER_HZ`: 100 on every Linux architecture's ABI).
const USER_HZ: u64 = 100;

/// Busy CPU time of the whole machine since boot: user + nice + system + irq + softirq +
/// steal of the `cpu` line of `/proc/stat` (idle and iowait are not busy; guest time is
/// already inside user). Machine-wide: the kernel's packet work runs in softirq on whatever
/// core, in whichever namespace.
pub fn busy_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    parse_busy_ticks(&stat)
        .map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
        .context("/proc/stat has no parsable `cpu` line")
}

fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal ...
    let field = |i: usize| v.get(i).copied();
    Some(field(0)? + field(1)? + field(2)? + field(5)? + field(6)? + field(7).unwrap_or(0))
}

/// The egress lease the agent would program for `rate_bps`: burst = the controller's
/// default (10 ms at the rate, at least 16 KiB), counting from zero.
pub fn lease_state(lease: u64, rate_bps: u64, volume: Option<u64>) -> DesiredState {
    DesiredState {
        scopes: vec![ScopeSpec {
            scope: Scope::Egress,
            destinations: vec![],
            enforce: ScopeEnforce::Lease {
                lease: LeaseId(lease),
                rate_bps,
                burst_bytes: default_burst(rate_bps),
                volume,
                start_used_bytes: 0,
            },
        }],
        peers: Vec::new(),
    }
}

/// The controller's default burst: 10 ms at the rate, at least 16 KiB.
pub fn default_burst(rate_bps: u64) -> u64 {
    (rate_bps / 8 / 100).max(16 * 1024)
}

/// The egress scope at its floor, 0: everything dropped.
pub fn blocked_state() -> DesiredState {
    DesiredState {
        scopes: vec![ScopeSpec {
            scope: Scope::Egress,
            destinations: vec![],
            enforce: ScopeEnforce::Floor { rate_bps: 0 },
        }],
        peers: Vec::new(),
    }
}

/// The upper median (the middle value; of two, the higher); 0 for no values.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The largest value; 0 for no values.
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::max).unwrap_or(0.0)
}

/// The smallest value; 0 for no values.
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::min).unwrap_or(0.0)
}

/// `x / reference`, NaN when the reference is 0.
pub fn ratio(x: f64, reference: f64) -> f64 {
    if reference == 0.0 {
        f64::NAN
    } else {
        x / reference
    }
}

/// A ratio as `0.87x`.
pub fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".to_string()
    }
}

/// Prints the table, or the JSON value with `--json`.
pub fn print(json: bool, value: serde_json::Value, table: &Table) {
    if json {
        println!("{value}");
    } else {
        print!("{}", table.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_from_proc_stat() {
        let stat = "cpu  500173 7 112164 735108 4966 3 8537 641 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(
            parse_busy_ticks(stat),
            Some(500173 + 7 + 112164 + 3 + 8537 + 641)
        );
        // Old kernels have no steal field.
        assert_eq!(
            parse_busy_ticks("cpu 1 2 3 4 5 6 7\n"),
            Some(1 + 2 + 3 + 6 + 7)
        );
        assert_eq!(parse_busy_ticks("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_busy_ticks("cpu 1 x 3\n"), None);
    }

    #[test]
    fn statistics() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        // The upper median, as `bench shaping` always printed it.
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(max(&[1.0, 5.0, 2.0]), 5.0);
        assert_eq!(min(&[4.0, -1.0]), -1.0);
        assert_eq!(max(&[]), 0.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(fmt_ratio(0.874), "0.87x");
        assert_eq!(fmt_ratio(f64::NAN), "-");
    }

    #[test]
    fn controller_default_burst() {
        assert_eq!(default_burst(10_000_000), 16 * 1024);
        assert_eq!(default_burst(1_000_000_000), 1_250_000);
    }
}

/// One datagram's arrival at a bench-local receiver.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arrival {
    pub(crate) at: Instant,
    pub(crate) len: usize,
}

/// At most this many arrivals are recorded by one [`receive`].
const MAX_ARRIVALS: usize = 100_000;
/// Receive buffer of the bench-local receiver, so a scheduling hiccup drops nothing.
const RCVBUF: usize = 16 << 20;

/// Receives on `socket` until `deadline` or [`MAX_ARRIVALS`], recording each arrival.
pub(crate) fn receive(socket: &UdpSocket, deadline: Instant) -> std::io::Result<Vec<Arrival>> {
    use nix::sys::socket::{setsockopt, sockopt};
    // Best effort: forcing past rmem_max needs CAP_NET_ADMIN, which the benchmark has.
    if setsockopt(socket, sockopt::RcvBufForce, &RCVBUF).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &RCVBUF);
    }
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut buf = vec![0u8; traffic::UDP_MAX_PAYLOAD + 1];
    let mut out = Vec::with_capacity(8192);
    while out.len() < MAX_ARRIVALS && Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(len) => out.push(Arrival {
                at: Instant::now(),
                len,
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
