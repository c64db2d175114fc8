//! The command line: clap derive, env fallbacks, and an example in every `--help`.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::units;

fn rate(s: &str) -> Result<u64, String> {
    units::parse_rate(s)
}

fn bytes(s: &str) -> Result<u64, String> {
    units::parse_bytes(s)
}

fn duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s)
}

/// `egress` or `peer:NODE`, checked here so that a typo fails before any request.
fn scope(s: &str) -> Result<String, String> {
    s.parse::<nicwarden_lease::Scope>().map(|sc| sc.to_string())
}

const TOP_HELP: &str = "\
Examples:
  # on the controller host
  nicwarden controller --data-dir /var/lib/nicwarden/controller --server-name ctl.example
  # enroll a node and lease it 200 Mbit/s of fabric egress
  nicwarden node add node-1 --group rack-a
  nicwarden agent --node node-1 --controller https://ctl.example:7443 --token <JOIN_TOKEN>
  nicwarden lease grant node-1 --rate 200Mbit --ttl 30s
  nicwarden agent status --watch
  # watch the fleet and its events
  nicwarden top
  nicwarden events --follow";

const CONTROLLER_HELP: &str = "\
Settings come from --config (TOML), then the flags below; everything is validated before
any port is bound. The operator token is written to <data-dir>/operator.token.

Examples:
  nicwarden controller --config /etc/nicwarden/controller.toml
  nicwarden controller --data-dir ./ctl --api-listen 127.0.0.1:7080 \\
      --agent-listen 0.0.0.0:7443 --server-name ctl.example --server-name 10.0.0.1 \\
      --fabric-capacity 100G --fabric-algorithm fair_share";

const AGENT_HELP: &str = "\
With no subcommand, runs the agent. The join token is needed only for the first start
(enrollment); afterwards the node's certificate in --data-dir is used.

The agent (root) enforces its leases on the fabric interface and nowhere else (keep the
management link on another interface): per lease scope a rate (HTB), a transfer volume,
and the floor without a lease (0 = dropped); usage comes from the kernel counters. The
default backend `ebpf` classifies and counts every packet in an eBPF program (exact
volumes, maps pinned under /sys/fs/bpf so a restart resumes the counters); `tc` uses u32
filters and nftables quotas instead; `none` programs nothing. When the agent stops, the
kernel keeps enforcing its last state; held leases are restored when it starts again.
--cleanup removes the kernel state.

Examples:
  nicwarden agent --node node-1 --controller https://ctl.example:7443 --token <JOIN_TOKEN>
  nicwarden agent --config /etc/nicwarden/agent.toml
  nicwarden agent --node node-1 --fabric-iface fab0 --peer node-2=198.18.0.2
  nicwarden agent --node node-1 --datapath tc --fabric-iface fab0 --cleanup
  nicwarden agent --node node-1 --datapath none --status-listen 127.0.0.1:7091
  nicwarden agent status";

const AGENT_STATUS_HELP: &str = "\
Examples:
  nicwarden agent status
  nicwarden agent status --status-addr 127.0.0.1:7090 --watch
  nicwarden agent status --json";

const NODE_HELP: &str = "\
Examples:
  nicwarden node add node-1 --group rack-a --capacity 10G
  nicwarden node list";

const NODE_ADD_HELP: &str = "\
Prints a one-time join token and the agent command line that uses it.

Examples:
  nicwarden node add node-1
  nicwarden node add node-2 --group rack-a --capacity 10Gbit --token-ttl 2h";

const NODE_LIST_HELP: &str = "\
Examples:
  nicwarden node list
  nicwarden node list --json";

const NODE_SHOW_HELP: &str = "\
Example:
  nicwarden node show node-1";

const NODE_REMOVE_HELP: &str = "\
Revokes the node's leases and invalidates its certificate; re-adding it needs a new token.

Example:
  nicwarden node remove node-1";

const NODE_TOKEN_HELP: &str = "\
Issues a fresh one-time join token, e.g. to re-enroll a node that lost its data directory.

Example:
  nicwarden node token node-1 --token-ttl 30m";

const LEASE_HELP: &str = "\
Examples:
  nicwarden lease grant node-1 --rate 200Mbit --ttl 30s
  nicwarden lease list --node node-1 --state active
  nicwarden lease renew 7
  nicwarden lease revoke 7 --reason maintenance";

const LEASE_GRANT_HELP: &str = "\
Examples:
  nicwarden lease grant node-1 --rate 200Mbit
  nicwarden lease grant node-1 --scope peer:node-2 --rate 1.5G --burst 256KiB \\
      --volume 10GB --ttl 60s --renew 20s --floor 10M";

const LEASE_LIST_HELP: &str = "\
Examples:
  nicwarden lease list
  nicwarden lease list --node node-1 --state active";

const LEASE_SHOW_HELP: &str = "\
Example:
  nicwarden lease show 7";

const LEASE_CHANGE_HELP: &str = "\
Terms not given keep their current value (the renewal interval is recomputed from the TTL
when only --ttl changes).

Examples:
  nicwarden lease change 7 --rate 500Mbit
  nicwarden lease change 7 --ttl 2m --volume 50GiB";

const LEASE_RENEW_HELP: &str = "\
Re-issues an active lease now, as if its agent had asked for it: a new sequence number and
a fresh deadline (now + TTL), signed and pushed to the node if its agent is connected, and
a `lease.renewed` event. Agents renew their leases by themselves; this is for when waiting
is not an option. Prints the renewed lease (`renewals` counts up by one). A revoked or
expired lease cannot be renewed: grant a new one.

Examples:
  nicwarden lease renew 7
  nicwarden lease renew 7 --json";

const LEASE_REVOKE_HELP: &str = "\
Revocation is final: the node falls back to the lease's floor.

Example:
  nicwarden lease revoke 7 --reason \"maintenance window\"";

const QUOTA_HELP: &str = "\
Examples:
  nicwarden quota show
  nicwarden quota set fabric --capacity 100G --algorithm fair_share";

const QUOTA_SHOW_HELP: &str = "\
Example:
  nicwarden quota show";

const QUOTA_SET_HELP: &str = "\
NAME is `fabric` (the root), a group name, or a node name.

Examples:
  nicwarden quota set fabric --capacity 100G
  nicwarden quota set rack-a --capacity 40G --algorithm fair_share
  nicwarden quota set node-1 --capacity 10G --group rack-a";

const AUDIT_HELP: &str = "\
With no subcommand, lists audit entries.

Examples:
  nicwarden audit --from 100 --limit 20
  nicwarden audit verify";

const AUDIT_VERIFY_HELP: &str = "\
Exits with status 1 if the hash chain is broken.

Example:
  nicwarden audit verify";

/// nicwarden: lease bandwidth quotas to the nodes of a fabric.
#[derive(Debug, Parser)]
#[command(name = "nicwarden", version, after_help = TOP_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process; boxing the larger argument sets would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the controller: lease authority, enrollment, agent service and operator API
    #[command(after_help = CONTROLLER_HELP)]
    Controller(ControllerArgs),
    /// Run the node agent (no subcommand), or show a running agent's status
    #[command(
        after_help = AGENT_HELP,
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Agent(AgentCmd),
    /// Manage nodes: add (with a join token), list, show, remove
    #[command(after_help = NODE_HELP)]
    Node(NodeCmd),
    /// Grant, list, change and revoke leases
    #[command(after_help = LEASE_HELP)]
    Lease(LeaseCmd),
    /// Show and set the quota tree (fabric, groups, nodes)
    #[command(after_help = QUOTA_HELP)]
    Quota(QuotaCmd),
    /// Declare the fabric's links and see what the probes found (interconnect verification)
    #[command(after_help = TOPOLOGY_HELP)]
    Topology(TopologyCmd),
    /// List the audit log (no subcommand) or verify its hash chain
    #[command(after_help = AUDIT_HELP)]
    Audit(AuditCmd),
    /// List the controller's events (leases, agents, nodes, quotas), or follow them live
    #[command(after_help = EVENTS_HELP)]
    Events(EventsArgs),
    /// A live table of the fleet: state, leased and measured rate, volume, expiry per node
    #[command(after_help = TOP_CMD_HELP)]
    Top(TopArgs),
    /// Run the whole system on this machine: namespaced nodes, real packets, a live view
    #[command(after_help = DEMO_HELP)]
    Demo(DemoArgs),
    /// Measure enforcement (shaping, backends, scale, volume, latency) and controller load
    #[command(after_help = BENCH_HELP)]
    Bench(BenchCmd),
    /// Generate or sink test traffic (TCP/UDP, bounded), reporting what was delivered
    #[command(after_help = TRAFFIC_HELP)]
    Traffic(TrafficCmd),
    /// Simulate N agents speaking the real protocol against a controller (load, dashboards)
    #[command(after_help = SIM_HELP)]
    Sim(SimArgs),
}

const SIM_HELP: &str = "\
Each simulated node does on the wire what `nicwarden agent` does, with its keys in memory
and no datapath: it is added to the controller (an existing node gets a fresh join token),
enrolls, holds a mutual-TLS session, verifies every signed lease against the key it pinned,
renews its leases, reconnects with backoff, and reports usage every --report-interval. The
traffic is simulated: each scope offers --rate; while it holds an active lease the scope
counts min(--rate, leased rate) (never past a volume), otherwise nothing (fail closed).

Nodes are named PREFIX-0001, PREFIX-0002, ...; each has --scopes scopes: `egress`, then
`peer:` the next simulated nodes. With --grant every scope gets a lease of --rate for --ttl
once the sessions are up. Prints progress while enrolling, then one line per second
(connected sessions, reports/s, errors) until --secs or Ctrl-C; then closes every session.
The nodes stay registered at the controller (disconnected); running again re-enrolls them.

Examples:
  # a controller on this host (its token in ./ctl/operator.token)
  nicwarden controller --data-dir ./ctl --fabric-capacity 10T
  nicwarden sim --token-file ./ctl/operator.token --nodes 100 --scopes 4 --grant
  nicwarden sim --api http://127.0.0.1:7080 --agent-addr 127.0.0.1:7443 \\
      --token-file ./ctl/operator.token --nodes 1000 --rate 1G --grant --ttl 5m --secs 0";

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Operator API base URL
    #[arg(
        long,
        env = "NICWARDEN_API",
        value_name = "URL",
        default_value = "http://127.0.0.1:7080"
    )]
    pub api: String,
    /// Operator bearer token (takes precedence over --token-file)
    #[arg(
        long,
        env = "NICWARDEN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the operator token, <data_dir>/operator.token on the controller
    /// [default: /var/lib/nicwarden/controller/operator.token]
    #[arg(long, env = "NICWARDEN_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The controller's agent endpoint, HOST:PORT (HOST must be one of its server names)
    #[arg(
        long,
        env = "NICWARDEN_CONTROLLER",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:7443"
    )]
    pub agent_addr: String,
    /// How many nodes to simulate
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub nodes: u64,
    /// Node name prefix: PREFIX-0001, PREFIX-0002, ...
    #[arg(long, default_value = "sim", value_name = "PREFIX")]
    pub prefix: String,
    /// Scopes per node: `egress`, then `peer:` other simulated nodes
    #[arg(long, default_value_t = 1, value_name = "K",
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub scopes: u64,
    /// Traffic each scope offers, e.g. 100Mbit, 1G (bits/s)
    #[arg(long, default_value = "100Mbit", value_name = "RATE", value_parser = rate)]
    pub rate: u64,
    /// Grant every scope a lease of --rate once the sessions are up
    #[arg(long)]
    pub grant: bool,
    /// Lifetime of each granted issuance (renewed every third of it), e.g. 60s, 5m
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = duration)]
    pub ttl: Duration,
    /// How long to run once started, in seconds; 0 = until Ctrl-C
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub secs: u64,
    /// How often each node reports usage
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = duration)]
    pub report_interval: Duration,
    /// Enrollments and connections in flight at once while starting
    #[arg(long, default_value_t = 32, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
}

const DEMO_HELP: &str = "\
Needs root: it creates network namespaces (a switch, a management network and N nodes with
a fabric veth each), starts a controller and one agent per node (datapath --datapath),
grants leases (node1 200 Mbit/s; node2 50 Mbit/s with 200 MB; the others none), runs TCP
traffic node to node and shows, every second, each node's leased and measured rate (from
its kernel counters), volume and time to expiry. It then revokes node1's lease and stops
the controller so node2's lease lapses, and checks that traffic stopped both times: the
exit status is 1 if enforcement did not do what the leases say. Ctrl-C removes everything.

Examples (as root):
  nicwarden demo
  nicwarden demo --nodes 4 --phase-secs 10 --no-live
  nicwarden demo --datapath tc";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes in the testbed (at least 2)
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Seconds each phase (leases, revocation, lapse) runs
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub phase_secs: u64,
    /// Host port the operator API is forwarded to (127.0.0.1); a free one if taken
    #[arg(long, default_value_t = 7080)]
    pub api_port: u16,
    /// Print the view as lines instead of redrawing the screen (the default without a TTY)
    #[arg(long)]
    pub no_live: bool,
    /// The agents' datapath backend
    #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "tc"])]
    pub datapath: String,
}

const BENCH_HELP: &str = "\
Needs root (except `telemetry`, on loopback). Each benchmark builds a 3-node testbed (network namespaces, veth links through a
bridge, fabric MTU 9000); node1 sends to node2, node3 is idle or the unenforced reference.
Enforcement is installed on node1's fabric interface only. Every loop is bounded; each
subcommand prints a table, or JSON with --json. See docs/PERFORMANCE.md for figures.

Examples (as root):
  nicwarden bench shaping --rates 10M,100M,1G --reps 3
  nicwarden bench backends --reps 5 --secs 3
  nicwarden bench scale --scopes 1,100,1000,10000
  nicwarden bench volume --reps 5
  nicwarden bench latency --reps 10 --json
  nicwarden bench telemetry --agents 100,1000 --secs 30";

#[derive(Debug, Args)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub command: BenchSub,
}

#[derive(Debug, Subcommand)]
pub enum BenchSub {
    /// Leased vs achieved rate of the `tc` backend, beside an unenforced path
    #[command(after_help = BENCH_SHAPING_HELP)]
    Shaping(BenchShapingArgs),
    /// Enforcement variants side by side: TCP throughput, CPU per Gbit/s, 64-byte UDP packets/s
    #[command(after_help = BENCH_BACKENDS_HELP)]
    Backends(BenchBackendsArgs),
    /// Throughput with 1 to 10,000 per-peer scopes in linear tc and nftables rule chains
    #[command(after_help = BENCH_SCALE_HELP)]
    Scale(BenchScaleArgs),
    /// Bytes delivered past a volume limit, per datapath backend
    #[command(after_help = BENCH_VOLUME_HELP)]
    Volume(BenchVolumeArgs),
    /// Time from a lease change (revocation, rate cut) to the first packets that obey it
    #[command(after_help = BENCH_LATENCY_HELP)]
    Latency(BenchLatencyArgs),
    /// Encrypted mesh vs plaintext fabric throughput, and tamper -> fabric blocked -> peers drop the key
    #[command(long_about = BENCH_TUNNEL_ABOUT, after_help = BENCH_TUNNEL_HELP)]
    Tunnel(BenchTunnelArgs),
    /// Controller CPU and memory under 100s to 1000s of simulated agents reporting usage
    #[command(after_help = BENCH_TELEMETRY_HELP)]
    Telemetry(BenchTelemetryArgs),
    /// Time from a tamper event to the last of N simulated peers dropping the node's WireGuard key
    #[command(after_help = BENCH_MESH_HELP)]
    Mesh(BenchMeshArgs),
}

impl BenchSub {
    /// The subcommand's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            BenchSub::Shaping(_) => "shaping",
            BenchSub::Backends(_) => "backends",
            BenchSub::Scale(_) => "scale",
            BenchSub::Volume(_) => "volume",
            BenchSub::Latency(_) => "latency",
            BenchSub::Tunnel(_) => "tunnel",
            BenchSub::Telemetry(_) => "telemetry",
            BenchSub::Mesh(_) => "mesh",
        }
    }
}

const BENCH_SHAPING_HELP: &str = "\
Needs root. For each rate, programs an egress lease at that rate into node1's datapath
(HTB + nftables, the agent's `tc` backend, burst = the controller's default of 10 ms at the
rate, at least 16 KiB), sends TCP from node1 to node2 for --secs and measures the goodput
at the receiver (payload over its active period) and the rate the kernel class counted
(link-layer bytes); then sends the same from node3, whose fabric has no enforcement, as the
unenforced reference of the same run. Prints leased vs achieved and the error in %, medians
over --reps.

Examples (as root):
  nicwarden bench shaping
  nicwarden bench shaping --rates 10M,100M,1G --secs 10 --reps 3 --json";

#[derive(Debug, Args)]
pub struct BenchShapingArgs {
    /// Lease rates to measure, comma-separated
    #[arg(long, value_delimiter = ',', value_parser = rate,
          default_value = "10M,50M,100M,200M,500M,1G,2G")]
    pub rates: Vec<u64>,
    /// Seconds of traffic per measurement
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    pub secs: u64,
    /// Repetitions per rate (medians are printed)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub reps: u64,
    /// The datapath backend that shapes
    #[arg(long, default_value = "tc", value_parser = ["tc", "ebpf"])]
    pub datapath: String,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_BACKENDS_HELP: &str = "\
Needs root. Compares the enforcement variants on node1's fabric in one run, under an egress
lease of 100 Gbit/s that never binds: `unenforced` (nothing installed), `tc` (the agent's
datapath: HTB + u32 filters + nftables accounting, via LinuxDatapath) and `nftables` (only
the nftables accounting table: quota and counters on oifname, no HTB). Each repetition
installs each variant in turn (the order rotates from one repetition to the next), measures,
and removes it:
- TCP node1 -> node2 for --secs: goodput at the sink over its active period;
- CPU per Gbit/s: machine-wide busy CPU seconds (/proc/stat: user, nice, system, irq,
  softirq, steal) during the TCP flow, divided by the Gbit the sink received;
- UDP, 64-byte payloads, unpaced, for --secs: datagrams/s delivered at the sink.
Prints medians over --reps and, per variant, the median of its per-repetition ratios to
`unenforced`. Everything else on the machine counts in the CPU figure: run it idle.

Examples (as root):
  nicwarden bench backends
  nicwarden bench backends --reps 5 --secs 3 --json";

#[derive(Debug, Args)]
pub struct BenchBackendsArgs {
    /// Seconds of traffic per measurement (TCP, then UDP)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub secs: u64,
    /// Repetitions, each measuring every variant (medians are printed)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub reps: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_SCALE_HELP: &str = "\
Needs root. For each scope count N, installs N per-peer scopes on node1's fabric whose last
one matches node2, so every packet of one TCP flow node1 -> node2 walks the whole chain:
- `tc`: with `tc -batch`, an HTB root (unclassified traffic to a drop class, ARP to its own
  class, as the agent lays it out) and N u32 filters on distinct /32s from 198.18.128.0/17,
  one filter priority per scope as the agent lays out peer scopes, the last one matching
  node2, all to one HTB class whose rate (100 Gbit/s) never binds;
- `nftables`: with `nft -f`, N rules `oifname fab0 ip daddr X counter accept`, the last one
  matching node2;
- `unenforced`: nothing installed.
Each repetition measures every variant for every N (installing and removing it each time)
and prints TCP goodput (medians) and the median ratio to unenforced.

Examples (as root):
  nicwarden bench scale
  nicwarden bench scale --scopes 1,100,1000,10000 --secs 3 --reps 3 --json";

#[derive(Debug, Args)]
pub struct BenchScaleArgs {
    /// Scope counts to measure, comma-separated (1..=30000 each)
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,10000",
          value_parser = clap::value_parser!(u32).range(1..=30000))]
    pub scopes: Vec<u32>,
    /// Seconds of traffic per measurement
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub secs: u64,
    /// Repetitions (medians are printed)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub reps: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_VOLUME_HELP: &str = "\
Needs root. For each datapath backend (today `tc`), programs node1 with a fresh 1 Gbit/s
egress lease carrying --volume, then sends UDP from node1 to node2 paced at 200 Mbit/s (below
the rate, so shaping loses nothing) in 8000-byte datagrams, offering 1.5 x the volume, and
counts what the sink received. What the volume counts are IP bytes (payload + 28 bytes of
UDP and IP headers per datagram): the figure is delivered IP bytes minus the volume
(negative = stopped short of it), per repetition, with the median and the extremes.

Examples (as root):
  nicwarden bench volume
  nicwarden bench volume --volume 10MB --reps 5 --json";

#[derive(Debug, Args)]
pub struct BenchVolumeArgs {
    /// Volume of the lease
    #[arg(long, default_value = "10MB", value_parser = bytes)]
    pub volume: u64,
    /// Repetitions per backend
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub reps: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_LATENCY_HELP: &str = "\
Needs root. For each datapath backend (today `tc`), with UDP flowing from node1 to node2
paced at 200 Mbit/s in 8000-byte datagrams (one every 320 us, the resolution) under a
1 Gbit/s lease, calls the backend's reconcile with a changed lease and records every
datagram's arrival at node2 (a bench-local receiver):
- revocation (the scope at floor 0): from the start of the reconcile call to the arrival
  of the last datagram;
- rate change 1 Gbit/s -> 10 Mbit/s: from the start of the reconcile call to the start of
  the first 20 ms window carrying no more than the new rate's bytes in 20 ms plus one burst
  (16 KiB) of frame bytes (payload + 42 bytes of UDP, IP and Ethernet headers, as HTB
  counts them). Windows start at the call or just after an arrival, and lie wholly inside
  the sender's period.
Both cases alternate within each repetition; prints medians and maxima, and the duration of
the reconcile call itself.

Examples (as root):
  nicwarden bench latency
  nicwarden bench latency --reps 20 --json";

#[derive(Debug, Args)]
pub struct BenchLatencyArgs {
    /// Repetitions of each case per backend
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub reps: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_TUNNEL_ABOUT: &str = "\
Encrypted mesh vs plaintext fabric throughput, and the tamper response, on a real cluster.

Needs root. Builds a 3-node testbed and runs the controller and three agents on it (datapath
ebpf, mesh on: userspace WireGuard, gotatun over TUN, tunnel MTU = fabric MTU - 80, at most
4000), every node with a 100 Gbit/s egress lease that never binds. Then, --reps times each:
1. TCP node1 -> node2 for --secs on node2's fabric address (plaintext, through the same eBPF
   datapath and lease) and through the tunnel (node2's overlay address), alternating, the
   order swapped each repetition. Prints goodput (payload at the sink over its active
   period: median, min, max), machine-wide busy CPU seconds per Gbit delivered, and the
   ratio encrypted / unencrypted (median of per-repetition ratios), beside the anchor:
   BlueField-3 IPsec offload 193 Gbit/s vs 390 Gbit/s raw, ratio 0.49. Ours runs in user
   space on this machine's cores: compare the ratio only.
2. Tamper node1 (its agent's tamper socket) while UDP flows node1 -> node2 on the fabric,
   paced at 200 Mbit/s in 8000-byte datagrams: the agent's own event -> fabric blocked and
   event -> keys destroyed, and, measured outside, the time from just before the tamper call
   to the last datagram's arrival at a receiver on node2.
3. During the same tamper, node2's and node3's /status are polled concurrently (a request,
   then 2 ms of sleep, at most 10 s) until node1 is no longer their peer: the time to the
   first answer without it, per peer, and the last peer (the maximum), with the polling
   resolution.
After each tamper node1 is re-enrolled (a new join token, its agent restarted with it, a new
lease) and the bench waits until every node has every other as a peer again. Everything is
removed at the end, also on error. Busy CPU counts everything else on the machine: run it
otherwise idle.

Examples:
  nicwarden bench tunnel
  nicwarden bench tunnel --reps 3 --secs 5
  nicwarden bench tunnel --reps 5 --secs 10 --json";

const BENCH_TUNNEL_HELP: &str = "\
The agent's `blocked` figure ends when its whole reconcile returned (eBPF map write first,
then the HTB classes); packets stop at the map write, so the external figure can be the
smaller one. With the defaults a run takes about a minute.";

#[derive(Clone, Debug, Args)]
pub struct BenchTunnelArgs {
    /// Repetitions of each part (throughput pair, tamper + re-enrollment)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub reps: u64,
    /// Seconds of TCP per path and repetition
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub secs: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_TELEMETRY_HELP: &str = "\
No root, no testbed: runs on loopback. Starts a controller (this binary's `controller`, a
temporary data directory, free loopback ports) and, first with no agents (the idle
baseline), then for each count in --agents: starts that many simulated agents (`nicwarden
sim`: real enrollment, mutual-TLS sessions, one usage report per second each, --scopes
scopes each, every scope granted a 100 Mbit/s lease with a 1 h TTL so that renewals do not
dominate), waits --warmup seconds, then measures over --secs:
- reports/s the agents sent;
- the controller's CPU (utime + stime of its process) as % of one core, and per 1,000
  reports/s;
- its resident memory (VmRSS) at the end and its peak (VmHWM), and the RSS above the idle
  baseline per agent;
- the latency of GET /v1/telemetry/fleet (median of 5, after the window; `n/a` if the
  controller does not serve it).
The agents of one count are stopped and their nodes removed before the next count.
Everything (controller process, temporary directory) is removed at the end or on Ctrl-C.
The simulated agents run in this process and share the machine: run it otherwise idle.

Examples:
  nicwarden bench telemetry
  nicwarden bench telemetry --agents 10,100 --secs 10 --warmup 3
  nicwarden bench telemetry --agents 1000 --scopes 8 --secs 60 --json";

#[derive(Debug, Args)]
pub struct BenchTelemetryArgs {
    /// Agent counts to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "100,1000",
          value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub agents: Vec<u64>,
    /// Scopes per agent (egress, then peers), each with a lease
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub scopes: u64,
    /// Seconds of measurement per agent count
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub secs: u64,
    /// Seconds between the agents being up and the measurement
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub warmup: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const BENCH_MESH_HELP: &str = "\
No root, no testbed: runs on loopback. Starts a controller in this process (a temporary
data directory, ephemeral loopback ports) and --agents simulated agents (`nicwarden sim`:
real enrollment, mutual-TLS sessions) in one quota group, each with a random WireGuard key,
its own overlay address and a 1 h egress lease, so that every node holds every other as a
mesh peer (each node verifies every signed peer-set update and applies it to the agent's
mesh state machine, as the agent does). Once that full mesh is up and --secs have passed,
each of --reps runs picks another node and:
- node-reported: t0 is taken just before the node sends its `tamper` message on its
  session (as an agent does after blocking its fabric); the controller revokes its leases
  and withdraws its key from every peer in one signed update;
- operator-declared: t0 is taken just before `POST /v1/nodes/NAME/tamper`;
and then waits until every one of its peers has removed its key (at most 60 s). Each peer's
latency is the instant its mesh state machine removed the key, minus t0. A run's figure is
the last peer's (the moment the node is out of the whole mesh); p50 and p99 are over the
peers of that run. Before each run the previous node must be gone from every peer set.
Prints every run, then min / median / max of the last-peer latency per kind. The controller
and the agents share this process and the machine: run it otherwise idle, and in a release
build (a debug build cannot keep 1,000 agents' sessions up). All N-1 peers check the
update's signature and apply it on this machine's few cores, one after another, so the
spread from the first peer to the last is mostly that simulated work; on real nodes each
peer does its own share in parallel, and the first peer's latency is closest to the
controller's part. Setting up the full mesh takes N x (N-1) update applications (about
1.5 minutes for 1,000 agents on 2 cores, release build).

Examples:
  nicwarden bench mesh
  nicwarden bench mesh --agents 100 --reps 10
  nicwarden bench mesh --agents 1000 --secs 10 --json";

#[derive(Debug, Args)]
pub struct BenchMeshArgs {
    /// Simulated agents, all in one quota group (a full mesh of N x (N-1) peer entries)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(4..=5_000))]
    pub agents: u64,
    /// Runs per kind of tamper event (node-reported, operator-declared), each on another node
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub reps: u64,
    /// Seconds to let the fleet settle (reports, renewals) after the full mesh is up
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub secs: u64,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

const TRAFFIC_HELP: &str = "\
Bounded test traffic between hosts you own (e.g. namespaced test nodes). The sink's count
is the authority on what was delivered. Run each side inside its namespace:

Examples:
  nicwarden traffic sink --listen 198.18.0.2:5201 --duration 20s
  nicwarden traffic send --dst 198.18.0.2:5201 --duration 10s
  # inside test namespaces
  ip netns exec node1 nicwarden traffic send --udp --dst 198.18.0.2:5201 --rate 50M --bytes 10MB";

const SINK_HELP: &str = "\
Prints what arrived: bytes, datagrams or reads, the rate while data flowed, and for UDP the
datagrams lost and reordered (each datagram carries a sequence number).

Examples:
  nicwarden traffic sink --listen 198.18.0.2:5201
  nicwarden traffic sink --udp --listen 0.0.0.0:5201 --duration 60s --json";

const SEND_HELP: &str = "\
Prints what the kernel accepted (the sink's report is the authority on delivery). Sends that
fail (a firewall drop answers EPERM) are retried until --duration.

Examples:
  nicwarden traffic send --dst 198.18.0.2:5201 --duration 10s
  nicwarden traffic send --udp --dst 198.18.0.2:5201 --rate 50M --bytes 10MB --payload 8000";

#[derive(Debug, Args)]
pub struct TrafficCmd {
    #[command(subcommand)]
    pub command: TrafficSub,
}

#[derive(Debug, Subcommand)]
pub enum TrafficSub {
    /// Receive and count traffic until the sender finishes, the idle timeout or --duration
    #[command(after_help = SINK_HELP)]
    Sink(SinkArgs),
    /// Send traffic for --duration or until --bytes, optionally paced at --rate
    #[command(after_help = SEND_HELP)]
    Send(SendArgs),
}

#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Address to listen on
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// UDP instead of TCP
    #[arg(long)]
    pub udp: bool,
    /// Longest time to run
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub duration: std::time::Duration,
    /// Stop after this long without data, once data has started
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub idle: std::time::Duration,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Destination address
    #[arg(long, value_name = "ADDR")]
    pub dst: SocketAddr,
    /// UDP instead of TCP
    #[arg(long)]
    pub udp: bool,
    /// How long to send
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: std::time::Duration,
    /// Stop after this much payload, e.g. 10MB
    #[arg(long, value_parser = bytes)]
    pub bytes: Option<u64>,
    /// Pace the payload at this rate, e.g. 50M
    #[arg(long, value_parser = rate)]
    pub rate: Option<u64>,
    /// Bytes per datagram (UDP) or per write (TCP)
    #[arg(long, default_value_t = 8192)]
    pub payload: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// TOML config file (flags override its values)
    #[arg(long, env = "NICWARDEN_CONTROLLER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory: store, CA, lease-signing key, operator token
    #[arg(long, env = "NICWARDEN_CONTROLLER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address agents connect to (gRPC, mutual TLS) [config default: 127.0.0.1:7443]
    #[arg(long, env = "NICWARDEN_AGENT_LISTEN", value_name = "ADDR")]
    pub agent_listen: Option<SocketAddr>,
    /// Operator API address [config default: 127.0.0.1:7080]
    #[arg(long, env = "NICWARDEN_API_LISTEN", value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// DNS name or IP the controller's certificate is valid for; repeat for several
    /// (replaces the configured list)
    #[arg(
        long = "server-name",
        env = "NICWARDEN_SERVER_NAMES",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,
    /// Fabric capacity when the quota tree is first created, e.g. 100G
    #[arg(long, env = "NICWARDEN_FABRIC_CAPACITY", value_name = "RATE", value_parser = rate)]
    pub fabric_capacity: Option<u64>,
    /// Fabric allocation algorithm when the quota tree is first created
    #[arg(
        long,
        env = "NICWARDEN_FABRIC_ALGORITHM",
        value_name = "ALGORITHM",
        value_parser = ["static", "fair_share"]
    )]
    pub fabric_algorithm: Option<String>,
    /// The agents' link-probe interval the topology verifier expects, ms [config default: 1000]
    #[arg(long, env = "NICWARDEN_TOPOLOGY_PROBE_INTERVAL", value_name = "MS")]
    pub topology_probe_interval: Option<u64>,
    /// Finding kinds whose blamed nodes lose their leases automatically, comma-separated
    /// (e.g. miswired,unexpected_link) [config default: none, report only]
    #[arg(
        long,
        env = "NICWARDEN_TOPOLOGY_REVOKE",
        value_name = "KINDS",
        value_delimiter = ','
    )]
    pub topology_revoke: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AgentCmd {
    #[command(subcommand)]
    pub command: Option<AgentSub>,
    #[command(flatten)]
    pub run: AgentRunArgs,
}

#[derive(Debug, Args)]
pub struct AgentRunArgs {
    /// TOML config file (flags override its values)
    #[arg(long, env = "NICWARDEN_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name, as given to `nicwarden node add`
    #[arg(long, env = "NICWARDEN_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Data directory: node key, certificate, pinned controller identity, lease state
    #[arg(long, env = "NICWARDEN_AGENT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Controller agent endpoint, https://HOST:PORT (HOST must be one of its server names)
    #[arg(long, env = "NICWARDEN_CONTROLLER", value_name = "URL")]
    pub controller: Option<String>,
    /// One-time join token from `nicwarden node add` (first start only)
    #[arg(
        long,
        env = "NICWARDEN_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Local status endpoint for `nicwarden agent status` [config default: 127.0.0.1:7090]
    #[arg(long, env = "NICWARDEN_STATUS_LISTEN", value_name = "ADDR")]
    pub status_listen: Option<SocketAddr>,
    /// Counter source: `none`, or `simulated:RATE` to pretend traffic is offered at RATE
    /// (e.g. simulated:1G)
    #[arg(long, env = "NICWARDEN_COUNTERS", value_name = "SPEC", value_parser = counters)]
    pub counters: Option<String>,
    /// Kernel enforcement backend, needs root: `ebpf` (an eBPF program per packet, exact
    /// volumes, HTB shaping), `tc` (HTB + u32 filters + nftables quotas), or `none`
    /// (nothing programmed: for agents off a real node) [config default: ebpf]
    #[arg(long, env = "NICWARDEN_DATAPATH", value_name = "BACKEND")]
    pub datapath: Option<String>,
    /// Where the `ebpf` backend pins its maps [config default: /sys/fs/bpf/nicwarden/<node>]
    #[arg(long, env = "NICWARDEN_BPF_PIN_DIR", value_name = "DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// The fabric interface to enforce on (never the management interface) [config default: fab0]
    #[arg(long, env = "NICWARDEN_FABRIC_IFACE", value_name = "IFACE")]
    pub fabric_iface: Option<String>,
    /// A peer's fabric addresses for `peer:NODE` scopes, NODE=PREFIX[,PREFIX...]; repeat per
    /// peer (adds to the config file's [datapath.peers])
    #[arg(long = "peer", value_name = "NODE=PREFIXES", value_parser = peer_arg)]
    pub peers: Vec<(String, Vec<ipnet::Ipv4Net>)>,
    /// Run the encrypted mesh with this overlay address and prefix, e.g. 198.18.128.2/24
    /// (needs --mesh-endpoint; enables [mesh])
    #[arg(long, env = "NICWARDEN_MESH_ADDRESS", value_name = "ADDR/LEN")]
    pub mesh_address: Option<ipnet::IpNet>,
    /// Fabric ip:port where this node's WireGuard device listens, e.g. 198.18.0.2:51820
    #[arg(long, env = "NICWARDEN_MESH_ENDPOINT", value_name = "IP:PORT")]
    pub mesh_endpoint: Option<SocketAddr>,
    /// Let only WireGuard cross the fabric interface (drop every other IP packet in or out of
    /// it; kept when the agent stops, removed by --cleanup)
    #[arg(long, env = "NICWARDEN_MESH_ENCRYPTED_ONLY")]
    pub mesh_encrypted_only: bool,
    /// MTU of the tunnel interface [config default: 1420]
    #[arg(long, env = "NICWARDEN_MESH_MTU", value_name = "BYTES")]
    pub mesh_mtu: Option<u16>,
    /// A file to watch for tamper (an enclosure sensor or GPIO value): anything but `0` or
    /// empty is a tamper event
    #[arg(long, env = "NICWARDEN_TAMPER_WATCH", value_name = "FILE")]
    pub tamper_watch: Option<PathBuf>,
    /// Unix socket taking tamper events (`nicwarden agent tamper`) [default:
    /// <data_dir>/tamper.sock]
    #[arg(long, env = "NICWARDEN_TAMPER_SOCKET", value_name = "PATH")]
    pub tamper_socket: Option<PathBuf>,
    /// Link probe interval in ms (at least 100) [config default: 1000]
    #[arg(long, env = "NICWARDEN_PROBE_INTERVAL", value_name = "MS")]
    pub probe_interval: Option<u64>,
    /// Do not send or answer link probes on the fabric interface ([probe] enabled = false)
    #[arg(long, env = "NICWARDEN_NO_PROBE")]
    pub no_probe: bool,
    /// Byte conservation: read the per-peer counters at every multiple of this many ms of the
    /// wall clock and report them (0: never) [config default: 5000]
    #[arg(long, env = "NICWARDEN_BYTE_WINDOW", value_name = "MS")]
    pub byte_window: Option<u64>,
    /// Remove everything the datapath backend installed on the fabric interface, then exit.
    /// The agent never does this by itself: when it stops, the kernel keeps enforcing.
    #[arg(long)]
    pub cleanup: bool,
}

/// `node2=198.18.0.2/32,198.18.1.0/24`
fn peer_arg(s: &str) -> Result<(String, Vec<ipnet::Ipv4Net>), String> {
    let (node, nets) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NODE=PREFIX[,PREFIX...], got `{s}`"))?;
    let nets = nets
        .split(',')
        .map(|n| {
            let n = n.trim();
            // A bare address is one host.
            let with_len = if n.contains('/') {
                n.to_string()
            } else {
                format!("{n}/32")
            };
            with_len
                .parse::<ipnet::Ipv4Net>()
                .map_err(|e| format!("peer {node}: `{n}` is not an IPv4 prefix: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((node.to_string(), nets))
}

/// `simulated:1G` -> `simulated:1000000000` (the agent's config wants bits/s); anything
/// else is passed through for the agent's own validation.
fn counters(s: &str) -> Result<String, String> {
    match s.strip_prefix("simulated:") {
        Some(r) => Ok(format!("simulated:{}", units::parse_rate(r)?)),
        None => Ok(s.to_string()),
    }
}

#[derive(Debug, Subcommand)]
pub enum AgentSub {
    /// Show what a running agent enforces per scope, and its connection to the controller
    #[command(after_help = AGENT_STATUS_HELP)]
    Status(AgentStatusArgs),
    /// Report a tamper event to the running agent (as an enclosure sensor would)
    #[command(long_about = AGENT_TAMPER_ABOUT, after_help = AGENT_TAMPER_HELP)]
    Tamper(AgentTamperArgs),
}

const AGENT_TAMPER_ABOUT: &str = "\
Report a tamper event to the running agent (as an enclosure sensor would).

The agent then, before anything else: blocks the fabric (every scope at a floor of 0,
whatever its leases), destroys its WireGuard private key and session keys and drops every
peer, writes the event to <data_dir>/tamper.json, and only then tells the controller, which
revokes the node's leases, withdraws its key from every peer and refuses its certificate.
This command returns once the fabric is blocked and prints how long each step took.

A tampered node stays blocked across agent restarts. It comes back only by re-enrollment:
`nicwarden node token NAME` on the operator side, then the agent started with that token
(it generates a new WireGuard key).";

const AGENT_TAMPER_HELP: &str = "\
Examples:
  nicwarden agent tamper --reason \"lid opened\"
  nicwarden agent tamper --socket /run/nicwarden/tamper.sock --reason \"test\"";

#[derive(Debug, Args)]
pub struct AgentTamperArgs {
    /// Why (one line), recorded on the node and at the controller
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// The agent's tamper socket
    #[arg(
        long,
        env = "NICWARDEN_TAMPER_SOCKET",
        value_name = "PATH",
        default_value = "/var/lib/nicwarden/agent/tamper.sock"
    )]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentStatusArgs {
    /// The agent's status endpoint (HOST:PORT or http://HOST:PORT)
    #[arg(
        long,
        env = "NICWARDEN_AGENT_STATUS",
        value_name = "ADDR",
        default_value = "127.0.0.1:7090"
    )]
    pub status_addr: String,
    /// Print the raw JSON
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until Ctrl-C
    #[arg(long)]
    pub watch: bool,
}

const API_HEADING: &str = "Operator API";

/// How to reach the operator API; accepted before or after the subcommand.
#[derive(Clone, Debug, Args)]
pub struct ClientOpts {
    /// Operator API base URL
    #[arg(
        long,
        global = true,
        env = "NICWARDEN_API",
        value_name = "URL",
        default_value = "http://127.0.0.1:7080",
        help_heading = API_HEADING
    )]
    pub api: String,
    /// Operator bearer token (takes precedence over --token-file)
    #[arg(
        long,
        global = true,
        env = "NICWARDEN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help_heading = API_HEADING
    )]
    pub token: Option<String>,
    /// File holding the operator token, <data_dir>/operator.token on the controller
    /// [default: /var/lib/nicwarden/controller/operator.token if readable]
    #[arg(
        long,
        global = true,
        env = "NICWARDEN_TOKEN_FILE",
        value_name = "FILE",
        help_heading = API_HEADING
    )]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table
    #[arg(long, global = true, help_heading = API_HEADING)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NodeCmd {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: NodeSub,
}

#[derive(Debug, Subcommand)]
pub enum NodeSub {
    /// Add a node and print its one-time join token
    #[command(after_help = NODE_ADD_HELP)]
    Add(NodeAddArgs),
    /// List nodes
    #[command(after_help = NODE_LIST_HELP)]
    List,
    /// Show one node
    #[command(after_help = NODE_SHOW_HELP)]
    Show { name: String },
    /// Remove a node: revokes its leases and invalidates its certificate
    #[command(after_help = NODE_REMOVE_HELP)]
    Remove { name: String },
    /// Issue a fresh join token for a node (re-enrollment)
    #[command(after_help = NODE_TOKEN_HELP)]
    Token(NodeTokenArgs),
    /// Ask a node's agent for a new WireGuard key; its peers get it at once
    #[command(long_about = NODE_ROTATE_ABOUT)]
    RotateKey(NodeRotateArgs),
    /// Declare a node tampered: revoke its leases, withdraw its key from every peer, refuse
    /// its certificate until it is re-enrolled
    #[command(long_about = NODE_TAMPER_ABOUT)]
    Tamper(NodeTamperArgs),
}

const NODE_ROTATE_ABOUT: &str = "\
Ask a node's agent for a new WireGuard key pair.

The agent generates the key, installs it in its device and reports the public key; the
controller retires the old key (it can never be used again) and pushes the new one to every
peer of the node's group at once. Tunnels re-handshake with the new key: flows between healthy
nodes continue (a TCP flow sees at most a few retransmissions). The controller also rotates
every key periodically (`mesh_key_rotation_secs` in its config, default one day).

Examples:
  nicwarden node rotate-key node-1
  nicwarden node rotate-key node-1 --wait 10s";

const NODE_TAMPER_ABOUT: &str = "\
Declare a node tampered, as if its agent had reported it (use it when another system saw the
enclosure alarm). The controller revokes every lease of the node, withdraws its WireGuard key
from every peer at once (they drop its tunnels), refuses its certificate, and marks it
tampered. It comes back only with `nicwarden node token NAME` and a re-enrollment, with a new
key.

Examples:
  nicwarden node tamper node-3 --reason \"rack 12 door alarm\"";

#[derive(Debug, Args)]
pub struct NodeRotateArgs {
    pub name: String,
    /// Wait until the node reported its new key (at most this long), e.g. 10s
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub wait: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct NodeTamperArgs {
    pub name: String,
    /// Why, recorded in the audit log and the node's record
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct NodeAddArgs {
    pub name: String,
    /// Quota group [default: default]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Node capacity, e.g. 10G [default: the group's capacity]
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub capacity: Option<u64>,
    /// How long the join token stays valid, e.g. 2h [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub token_ttl: Option<Duration>,
    #[command(flatten)]
    pub hint: AgentHint,
}

#[derive(Debug, Args)]
pub struct NodeTokenArgs {
    pub name: String,
    /// How long the join token stays valid, e.g. 30m [default: 1h]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub token_ttl: Option<Duration>,
    #[command(flatten)]
    pub hint: AgentHint,
}

/// Only used to print the agent command line after `node add` / `node token`.
#[derive(Debug, Args)]
pub struct AgentHint {
    /// Agent endpoint of the controller to show in the printed agent command
    /// [default: the --api host, port 7443]
    #[arg(
        long = "agent-endpoint",
        env = "NICWARDEN_CONTROLLER",
        value_name = "URL"
    )]
    pub agent_endpoint: Option<String>,
}

#[derive(Debug, Args)]
pub struct LeaseCmd {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: LeaseSub,
}

#[derive(Debug, Subcommand)]
pub enum LeaseSub {
    /// Grant a lease to a node
    #[command(after_help = LEASE_GRANT_HELP)]
    Grant(GrantArgs),
    /// List leases
    #[command(after_help = LEASE_LIST_HELP)]
    List(LeaseListArgs),
    /// Show one lease
    #[command(after_help = LEASE_SHOW_HELP)]
    Show { id: u64 },
    /// Change the terms of an active lease
    #[command(after_help = LEASE_CHANGE_HELP)]
    Change(ChangeArgs),
    /// Renew an active lease now (a fresh deadline, pushed to its agent)
    #[command(after_help = LEASE_RENEW_HELP)]
    Renew {
        /// Lease id
        id: u64,
    },
    /// Revoke a lease (final)
    #[command(after_help = LEASE_REVOKE_HELP)]
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The node to lease bandwidth to
    pub node: String,
    /// Rate, e.g. 200Mbit, 1.5G, 500k (bits/s)
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub rate: u64,
    #[command(flatten)]
    pub terms: TermsArgs,
}

#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// Lease id
    pub id: u64,
    /// New rate, e.g. 500Mbit (bits/s)
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub rate: Option<u64>,
    #[command(flatten)]
    pub terms: TermsArgs,
}

/// Lease terms shared by `grant` and `change`.
#[derive(Debug, Args)]
pub struct TermsArgs {
    /// `egress` (all fabric egress) or `peer:NODE` [grant default: egress]
    #[arg(long, value_name = "SCOPE", value_parser = scope)]
    pub scope: Option<String>,
    /// Burst, e.g. 64KiB [grant default: 10 ms at the rate, at least 16 KiB]
    #[arg(long, value_name = "BYTES", value_parser = bytes)]
    pub burst: Option<u64>,
    /// Volume over the lease's life, e.g. 10GB [grant default: unlimited]
    #[arg(long, value_name = "BYTES", value_parser = bytes)]
    pub volume: Option<u64>,
    /// Lifetime of each issuance, e.g. 30s [grant default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub ttl: Option<Duration>,
    /// Renewal interval, e.g. 10s [default: TTL/3]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub renew: Option<Duration>,
    /// Rate allowed once the lease lapses, e.g. 10M [grant default: 0 = blocked]
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub floor: Option<u64>,
}

#[derive(Debug, Args)]
pub struct LeaseListArgs {
    /// Only this node's leases
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Only leases in this state
    #[arg(long, value_name = "STATE", value_parser = ["active", "revoked", "expired"])]
    pub state: Option<String>,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Lease id
    pub id: u64,
    /// Why (recorded in the audit log and sent to the agent)
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

const TOPOLOGY_HELP: &str = "\
Examples:
  nicwarden topology apply fabric.toml --dry-run
  nicwarden topology apply fabric.toml
  nicwarden topology status
  nicwarden topology show --version 3
  nicwarden topology history";

#[derive(Debug, Args)]
pub struct TopologyCmd {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: TopologySub,
}

#[derive(Debug, Subcommand)]
pub enum TopologySub {
    /// Validate a topology file and store it as the next version
    #[command(long_about = TOPOLOGY_APPLY_ABOUT)]
    Apply(TopologyApplyArgs),
    /// Show the applied topology (or an earlier version)
    #[command(
        after_help = "Examples:\n  nicwarden topology show\n  nicwarden topology show --version 2 --source"
    )]
    Show(TopologyShowArgs),
    /// List every version applied
    #[command(after_help = "Examples:\n  nicwarden topology history")]
    History,
    /// The verifier's findings and what each port's probes heard
    #[command(long_about = TOPOLOGY_STATUS_ABOUT)]
    Status,
}

const TOPOLOGY_APPLY_ABOUT: &str = "\
Validate a topology file (TOML) and store it in the controller as the next version.

The file declares the nodes with their fabric ports, the switches with their ports, and the
links that should exist (node:port <-> node:port, or node:port <-> switch:port), each with an
optional round-trip bound. Every error is reported at once (unknown devices and ports,
duplicate ports, self-links, a port in two links, nodes the controller does not know). A file
that declares what is already applied makes no new version.

  version_note = \"rack 12 after re-cabling\"
  [defaults]
  rtt_max_us = 2000
  [nodes.node1]
  ports = [\"fab0\"]
  [switches.leaf1]
  ports = [\"p1\", \"p2\"]
  [[links]]
  a = \"node1:fab0\"
  b = \"leaf1:p1\"

Examples:
  nicwarden topology apply fabric.toml --dry-run
  nicwarden topology apply fabric.toml";

const TOPOLOGY_STATUS_ABOUT: &str = "\
The verifier's open findings (missing, unexpected or miswired links, unauthenticated or
unknown neighbours, round trips above a link's bound, flapping links, bytes not conserved
between two nodes), each with its severity, first and last time seen and the nodes it
blames; then what each probing port heard in its last round.

Findings clear by themselves when the condition is gone. Which kinds revoke the blamed
nodes' leases automatically is the controller's `topology_revoke` setting (default: none).

Examples:
  nicwarden topology status
  nicwarden topology status --json";

#[derive(Debug, Args)]
pub struct TopologyApplyArgs {
    /// The topology file (TOML)
    pub file: PathBuf,
    /// Validate only; store nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct TopologyShowArgs {
    /// An earlier version [default: the applied one]
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// Print the file as it was applied
    #[arg(long)]
    pub source: bool,
}

#[derive(Debug, Args)]
pub struct QuotaCmd {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: QuotaSub,
}

#[derive(Debug, Subcommand)]
pub enum QuotaSub {
    /// Show the quota tree and what is allocated
    #[command(after_help = QUOTA_SHOW_HELP)]
    Show,
    /// Set the capacity of the fabric, a group or a node
    #[command(after_help = QUOTA_SET_HELP)]
    Set(QuotaSetArgs),
}

#[derive(Debug, Args)]
pub struct QuotaSetArgs {
    /// `fabric`, a group name or a node name
    pub name: String,
    /// Capacity, e.g. 40G (bits/s)
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub capacity: u64,
    /// How the capacity is divided among children [default: static]
    #[arg(long, value_name = "ALGORITHM", value_parser = ["static", "fair_share"])]
    pub algorithm: Option<String>,
    /// For a node: move it to this group
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

/// `--from`/`--limit` only apply without a subcommand. (Not `args_conflicts_with_subcommands`:
/// that would also refuse the global `--api`/`--token` before `verify`.)
#[derive(Debug, Args)]
pub struct AuditCmd {
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: Option<AuditSub>,
    /// First entry index to list
    #[arg(long, value_name = "N")]
    pub from: Option<u64>,
    /// Most entries to list
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

const EVENTS_HELP: &str = "\
Lists the controller's recent events, oldest first: local time, severity, kind, node and
message. The controller keeps the last 20,000 events in memory (a restart starts afresh,
with higher ids; `nicwarden audit` is the durable record). Filters: --kind takes a kind or a
dotted prefix (`lease` matches lease.granted, lease.renewed, lease.changed, lease.revoked,
lease.expired, lease.exhausted; also `agent`, `node`, `quota`), --severity shows events at
least that severe.

With --follow it then prints each new matching event as it happens (the live event stream,
GET /v1/events/stream) until Ctrl-C. If the controller asks the client to resync (it fell
behind), the missed events are read again; if the connection drops, it reconnects (after
1 s, doubling up to 10 s) and resumes after the last event it saw, saying so on stderr.
--json prints one JSON object per event and line (the API's Event), for scripts.

Examples:
  nicwarden events
  nicwarden events --kind lease --node node-1 --limit 50
  nicwarden events --severity warning --follow
  nicwarden events --follow --json --kind lease.revoked";

/// `events`: the operator API options (and `--json`) come from [`ClientOpts`].
#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Only events of this kind, or kind prefix (`lease`, `agent.disconnected`)
    #[arg(long, value_name = "PREFIX")]
    pub kind: Option<String>,
    /// Only events about this node
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Only events at least this severe
    #[arg(long, value_name = "SEVERITY", value_parser = ["info", "warning", "critical"])]
    pub severity: Option<String>,
    /// List at most the N most recent matching events [default: 200]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub limit: Option<u64>,
    /// Only events after this id (e.g. the last one a previous run printed)
    #[arg(long, value_name = "N")]
    pub since_id: Option<u64>,
    /// Keep printing new events as they happen, until Ctrl-C
    #[arg(long, short = 'f')]
    pub follow: bool,
}

const TOP_CMD_HELP: &str = "\
A table of every node, from GET /v1/telemetry/fleet: its group; its state (active, partial,
pending, revoked, expired, exhausted or none); the rate its leases grant and the rate its
agent measured (with the share of the lease used); volume used of volume granted; time
until its soonest lease expires; and how long ago its agent last reported. Nodes whose
agent is disconnected or has stopped reporting are marked STALE. The header counts nodes,
active nodes and stale nodes, and names the controller.

On a terminal the table is redrawn in place every --interval until Ctrl-C (as many rows as
fit: narrow with --filter or --stale); with --once, or when the output is not a terminal,
it prints one snapshot. --json prints the API's JSON once.

Examples:
  nicwarden top
  nicwarden top --sort rate --filter rack-a
  nicwarden top --stale --once
  nicwarden top --sort expiry --interval 5s";

/// `top`'s `--sort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TopSort {
    /// By name
    Node,
    /// By state (alphabetical), then name
    State,
    /// Highest measured rate first
    Rate,
    /// Highest leased rate first
    Leased,
    /// Soonest lease expiry first
    Expiry,
    /// Oldest agent report first
    Age,
}

impl std::fmt::Display for TopSort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// At least 100 ms between redraws.
fn interval(s: &str) -> Result<Duration, String> {
    let d = units::parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("`{s}` is too short; at least 100ms"));
    }
    Ok(d)
}

/// `top`: the operator API options (and `--json`) come from [`ClientOpts`].
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Row order
    #[arg(long, value_enum, default_value_t = TopSort::Node)]
    pub sort: TopSort,
    /// Only nodes whose name, group or state contains TEXT (case-insensitive)
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    /// Only stale nodes (agent disconnected, or no recent report)
    #[arg(long)]
    pub stale: bool,
    /// Print one snapshot and exit (the default when the output is not a terminal)
    #[arg(long)]
    pub once: bool,
    /// Time between redraws, e.g. 1s, 500ms, 5s
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = interval)]
    pub interval: Duration,
}

#[derive(Debug, Subcommand)]
pub enum AuditSub {
    /// Verify the audit log's hash chain
    #[command(after_help = AUDIT_VERIFY_HELP)]
    Verify,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nicwarden").chain(args.iter().copied()))
    }

    #[test]
    fn agent_without_subcommand_runs() {
        let cli = parse(&["agent", "--node", "n1", "--counters", "simulated:1G"]).expect("parses");
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert!(a.command.is_none());
        assert_eq!(a.run.node.as_deref(), Some("n1"));
        assert_eq!(a.run.counters.as_deref(), Some("simulated:1000000000"));
    }

    #[test]
    fn agent_status_subcommand() {
        let cli = parse(&["agent", "status", "--json"]).expect("parses");
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        let Some(AgentSub::Status(s)) = a.command else {
            panic!("not status")
        };
        assert!(s.json);
        assert!(!s.watch);
        assert!(parse(&["agent", "--node", "n1", "status"]).is_err());
    }

    #[test]
    fn client_options_before_or_after_the_subcommand() {
        for args in [
            &["node", "--api", "http://h:1", "list", "--json"][..],
            &["node", "list", "--api", "http://h:1", "--json"][..],
        ] {
            let cli = parse(args).expect("parses");
            let Command::Node(n) = cli.command else {
                panic!("not node")
            };
            assert_eq!(n.client.api, "http://h:1");
            assert!(n.client.json);
        }
    }

    #[test]
    fn grant_units() {
        let cli = parse(&[
            "lease", "grant", "n1", "--rate", "1.5G", "--burst", "64KiB", "--volume", "10GB",
            "--ttl", "1m", "--renew", "20s", "--floor", "10M", "--scope", "peer:n2",
        ])
        .expect("parses");
        let Command::Lease(LeaseCmd {
            command: LeaseSub::Grant(g),
            ..
        }) = cli.command
        else {
            panic!("not grant")
        };
        assert_eq!(g.rate, 1_500_000_000);
        assert_eq!(g.terms.burst, Some(65_536));
        assert_eq!(g.terms.volume, Some(10_000_000_000));
        assert_eq!(g.terms.ttl, Some(Duration::from_secs(60)));
        assert_eq!(g.terms.renew, Some(Duration::from_secs(20)));
        assert_eq!(g.terms.floor, Some(10_000_000));
        assert_eq!(g.terms.scope.as_deref(), Some("peer:n2"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["lease", "grant", "n1", "--rate", "fast"],
                "`fast` is not a rate",
            ),
            (
                &["lease", "grant", "n1", "--rate", "1G", "--scope", "north"],
                "peer:NODE",
            ),
            (
                &["lease", "grant", "n1", "--rate", "1G", "--ttl", "soon"],
                "is not a duration",
            ),
            (
                &["lease", "grant", "n1", "--rate", "1G", "--volume", "10Mb"],
                "ambiguous",
            ),
            (&["lease", "list", "--state", "sleepy"], "sleepy"),
            (
                &["quota", "set", "fabric", "--capacity", "1GB"],
                "looks like bytes",
            ),
            (
                &["controller", "--fabric-capacity", "lots"],
                "--fabric-capacity",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).expect_err("must fail").to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn audit_list_and_verify() {
        let cli = parse(&["audit", "--from", "5", "--limit", "10"]).expect("parses");
        let Command::Audit(a) = cli.command else {
            panic!("not audit")
        };
        assert!(a.command.is_none());
        assert_eq!((a.from, a.limit), (Some(5), Some(10)));
        let cli = parse(&["audit", "verify"]).expect("parses");
        let Command::Audit(a) = cli.command else {
            panic!("not audit")
        };
        assert!(matches!(a.command, Some(AuditSub::Verify)));
        // Global options may come before the subcommand.
        assert!(parse(&["audit", "--api", "http://h:1", "verify"]).is_ok());
    }

    #[test]
    fn lease_renew() {
        let cli = parse(&["lease", "renew", "7", "--api", "http://h:1"]).expect("parses");
        let Command::Lease(l) = cli.command else {
            panic!("not lease")
        };
        assert!(matches!(l.command, LeaseSub::Renew { id: 7 }));
        assert_eq!(l.client.api, "http://h:1");
        assert!(parse(&["lease", "renew", "seven"]).is_err());
        assert!(parse(&["lease", "renew"]).is_err());
    }

    #[test]
    fn events_options() {
        let cli = parse(&[
            "events",
            "--kind",
            "lease",
            "--node",
            "n1",
            "--severity",
            "warning",
            "--limit",
            "50",
            "--since-id",
            "9",
            "-f",
            "--json",
            "--token",
            "t",
        ])
        .expect("parses");
        let Command::Events(e) = cli.command else {
            panic!("not events")
        };
        assert_eq!(e.kind.as_deref(), Some("lease"));
        assert_eq!(e.node.as_deref(), Some("n1"));
        assert_eq!(e.severity.as_deref(), Some("warning"));
        assert_eq!((e.limit, e.since_id), (Some(50), Some(9)));
        assert!(e.follow && e.client.json);
        assert_eq!(e.client.token.as_deref(), Some("t"));
        let Command::Events(e) = parse(&["events"]).expect("parses").command else {
            panic!("not events")
        };
        assert!(!e.follow && e.limit.is_none() && e.kind.is_none());
    }

    #[test]
    fn top_options() {
        let Command::Top(t) = parse(&["top"]).expect("parses").command else {
            panic!("not top")
        };
        assert_eq!(t.sort, TopSort::Node);
        assert_eq!(t.interval, Duration::from_secs(1));
        assert!(!t.once && !t.stale && t.filter.is_none());
        let Command::Top(t) = parse(&[
            "top",
            "--sort",
            "expiry",
            "--filter",
            "rack",
            "--stale",
            "--once",
            "--interval",
            "500ms",
        ])
        .expect("parses")
        .command
        else {
            panic!("not top")
        };
        assert_eq!(t.sort, TopSort::Expiry);
        assert_eq!(t.sort.to_string(), "expiry");
        assert_eq!(t.filter.as_deref(), Some("rack"));
        assert!(t.stale && t.once);
        assert_eq!(t.interval, Duration::from_millis(500));
    }

    #[test]
    fn live_command_errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["events", "--severity", "loud"], "loud"),
            (&["events", "--limit", "0"], "--limit"),
            (&["events", "--limit", "20001"], "--limit"),
            (&["events", "--since-id", "x"], "--since-id"),
            (&["top", "--sort", "speed"], "speed"),
            (&["top", "--interval", "10ms"], "at least 100ms"),
            (&["top", "--interval", "soon"], "is not a duration"),
        ];
        for (args, want) in cases {
            let err = parse(args).expect_err("must fail").to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
