//! The cluster: namespaces, bridges, veths and addresses, and their teardown.

use crate::error::TestbedError;
use crate::lldp::SwitchPorts;
use crate::names::TestbedId;
use crate::netns::Netns;
use crate::process::Process;
use crate::{registry, sys};
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The controller's address on the management network (on `mbr0` in the mgmt namespace).
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Prefix length of the fabric (198.18.0.0/24) and management (198.19.0.0/24) subnets.
pub const PREFIX_LEN: u8 = 24;
/// Most nodes a testbed can have (node k uses 198.18.0.k and 198.19.0.(k+1)).
pub const MAX_NODES: usize = 253;
/// Interface names inside the namespaces (each lives in its own namespace, so they are fixed).
pub const FABRIC_IFACE: &str = "fab0";
pub const MGMT_IFACE: &str = "mgmt0";
pub const SWITCH_BRIDGE: &str = "br0";
pub const MGMT_BRIDGE: &str = "mbr0";
/// MTU of the management links.
pub const MGMT_MTU: u32 = 1500;
/// The name the switch announces (LLDP chassis id) and that topology files use for it.
pub const SWITCH_NAME: &str = "leaf1";

/// Interface indexes: `fab0` and `mgmt0` in the nodes, `p<k>` and `m<k>` are
/// `PORT_INDEX_BASE + k`. A veth end never shares its peer's index (see `build`).
const FABRIC_INDEX: &str = "10";
const MGMT_INDEX: &str = "11";
const PORT_INDEX_BASE: usize = 100;

/// How long teardown lets processes handle SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long teardown waits for processes to die after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long links may take to come up (carrier, qdisc activation).
const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// The shape of a testbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestbedSpec {
    /// Number of nodes, 1..=[`MAX_NODES`].
    pub nodes: usize,
    /// MTU of the fabric links (`fab0` and its switch port). AI fabrics run jumbo frames.
    pub fabric_mtu: u32,
}

impl Default for TestbedSpec {
    /// Three nodes, MTU 9000.
    fn default() -> Self {
        TestbedSpec {
            nodes: 3,
            fabric_mtu: 9000,
        }
    }
}

impl TestbedSpec {
    fn validate(&self) -> Result<(), TestbedError> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(TestbedError::InvalidSpec(format!(
                "nodes = {}: must be 1..={MAX_NODES}",
                self.nodes
            )));
        }
        if !(68..=65535).contains(&self.fabric_mtu) {
            return Err(TestbedError::InvalidSpec(format!(
                "fabric_mtu = {}: must be 68..=65535",
                self.fabric_mtu
            )));
        }
        Ok(())
    }
}

/// One node: its namespace and its two links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `node1`, `node2`, ...
    pub name: String,
    /// 1-based index k.
    pub index: usize,
    pub netns: Netns,
    /// 198.18.0.k on `fab0`.
    pub fabric_ip: Ipv4Addr,
    /// 198.19.0.(k+1) on `mgmt0`.
    pub mgmt_ip: Ipv4Addr,
    /// `fab0`.
    pub fabric_iface: String,
    /// `mgmt0`.
    pub mgmt_iface: String,
    /// `p<k>`: the peer of `fab0`, a port of `br0` in the switch namespace (the interface
    /// name there).
    pub switch_port: String,
    /// `p<k>`: the port's declared name on switch [`SWITCH_NAME`], as topology files name it
    /// (`node1:fab0 <-> leaf1:p1`). It does not change; what the switch *announces* on this
    /// port does after [`Testbed::swap_switch_ports`] (see [`Testbed::switch_port_of`]).
    pub switch_port_name: String,
    /// `m<k>`: the peer of `mgmt0`, a port of `mbr0` in the mgmt namespace.
    pub mgmt_port: String,
}

/// What teardown needs, shared with the process-wide registry so a signal can tear the
/// testbed down from another thread.
#[derive(Debug)]
pub(crate) struct Shared {
    id: TestbedId,
    name: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Namespaces created so far, in creation order.
    namespaces: Vec<String>,
    /// Processes started by `spawn`.
    procs: Vec<Process>,
    torn_down: bool,
}

impl Shared {
    fn new(id: TestbedId) -> Shared {
        Shared {
            id,
            name: id.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn id(&self) -> TestbedId {
        self.id
    }

    pub(crate) fn is_torn_down(&self) -> bool {
        self.state().torn_down
    }

    /// Stops the processes in namespace `name` (one this testbed created), deletes it and
    /// forgets it. A no-op once the testbed is torn down or when `name` is not (or no
    /// longer) one of its namespaces.
    pub(crate) fn remove_namespace(&self, name: &str) -> Result<(), TestbedError> {
        let mut state = self.state();
        if state.torn_down || !state.namespaces.iter().any(|n| n == name) {
            return Ok(());
        }
        let namespaces = vec![name.to_string()];
        let (procs, others): (Vec<Process>, Vec<Process>) = std::mem::take(&mut state.procs)
            .into_iter()
            .partition(|p| p.netns() == name);
        state.procs = others;
        let mut failures = Vec::new();
        stop_processes(&namespaces, &procs, &mut failures);
        if let Err(e) = sys::netns_del(name) {
            if sys::netns_exists(name) {
                failures.push(e.to_string());
            }
        }
        if !sys::netns_exists(name) {
            state.namespaces.retain(|n| n != name);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Teardown {
                what: format!("namespace {name}"),
                failures,
            })
        }
    }

    /// Creates a namespace and records it, unless the testbed was torn down meanwhile.
    fn add_namespace(&self, name: &str) -> Result<Netns, TestbedError> {
        let mut state = self.state();
        if state.torn_down {
            return Err(TestbedError::TornDown(self.name.clone()));
        }
        sys::netns_add(name)?;
        state.namespaces.push(name.to_string());
        Ok(Netns::new(name.to_string()))
    }

    /// Stops the testbed's processes (SIGTERM, SIGKILL after a grace period), deletes its
    /// namespaces and its owner marker, and leaves the registry. Idempotent. Every step is
    /// attempted even if an earlier one failed; the failures are reported together.
    pub(crate) fn teardown(&self) -> Result<(), TestbedError> {
        let mut state = self.state();
        if state.torn_down {
            return Ok(());
        }
        state.torn_down = true;
        let namespaces = std::mem::take(&mut state.namespaces);
        let procs = std::mem::take(&mut state.procs);
        let mut failures = Vec::new();
        stop_processes(&namespaces, &procs, &mut failures);
        for name in namespaces.iter().rev() {
            if let Err(e) = sys::netns_del(name) {
                if sys::netns_exists(name) {
                    failures.push(e.to_string());
                }
            }
        }
        if let Err(e) = sys::remove_marker(self.id) {
            failures.push(e.to_string());
        }
        registry::unregister(&self.name);
        tracing::debug!(testbed = %self.name, "torn down");
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Teardown {
                what: format!("testbed {}", self.name),
                failures,
            })
        }
    }
}

/// SIGTERM to every process in `namespaces` (tracked or not), SIGKILL to what is left after
/// [`TERM_GRACE`]. Tracked processes are reaped.
fn stop_processes(namespaces: &[String], tracked: &[Process], failures: &mut Vec<String>) {
    let mut live: Vec<&Process> = Vec::new();
    for p in tracked {
        match p.signal(Signal::SIGTERM) {
            Ok(true) => live.push(p),
            Ok(false) => {}
            Err(e) => failures.push(e.to_string()),
        }
    }
    let tracked_pids: HashSet<i32> = tracked
        .iter()
        .filter_map(|p| i32::try_from(p.pid()).ok())
        .collect();
    signal_untracked(namespaces, &tracked_pids, Signal::SIGTERM, failures);
    if wait_gone(namespaces, &mut live, TERM_GRACE) {
        return;
    }
    for p in &live {
        if let Err(e) = p.signal(Signal::SIGKILL) {
            failures.push(e.to_string());
        }
    }
    signal_untracked(namespaces, &tracked_pids, Signal::SIGKILL, failures);
    if !wait_gone(namespaces, &mut live, KILL_GRACE) {
        let left: Vec<String> = sys::pids_in(namespaces)
            .into_iter()
            .map(|(pid, ns)| format!("{pid} in {ns}"))
            .collect();
        failures.push(format!(
            "processes still running {KILL_GRACE:?} after SIGKILL: {}",
            left.join(", ")
        ));
    }
}

fn signal_untracked(
    namespaces: &[String],
    tracked: &HashSet<i32>,
    signal: Signal,
    failures: &mut Vec<String>,
) {
    for (pid, ns) in sys::pids_in(namespaces) {
        if !tracked.contains(&pid) {
            if let Err(e) = sys::signal_pid(pid, signal, &format!("process in {ns}")) {
                failures.push(e.to_string());
            }
        }
    }
}

/// Polls until the tracked processes have exited (reaping them) and no process is left in
/// `namespaces`; `false` if that takes longer than `bound`.
fn wait_gone(namespaces: &[String], live: &mut Vec<&Process>, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        live.retain(|p| matches!(p.try_wait(), Ok(None)));
        if live.is_empty() && sys::pids_in(namespaces).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cluster in network namespaces: a switch (bridge `br0`), a management network (bridge
/// `mbr0` holding [`CONTROLLER_IP`]) and N nodes, each with a fabric veth `fab0` to the switch
/// and a management veth `mgmt0` to the management network.
///
/// IPv6 is disabled on every interface the testbed creates
/// (`net.ipv6.conf.default.disable_ipv6 = 1` in each namespace before its links exist), so
/// the wire carries no router solicitations, DAD or MLD: only the traffic a test sends, plus
/// ARP. Loopback keeps IPv6.
///
/// Dropping the testbed (also while unwinding from a panic) or calling
/// [`Testbed::teardown`] stops the processes it spawned and deletes its namespaces, which
/// deletes their links.
#[derive(Debug)]
pub struct Testbed {
    shared: Arc<Shared>,
    spec: TestbedSpec,
    switch: Netns,
    mgmt: Netns,
    nodes: Vec<Node>,
    /// What the switch announces on each node's port (see [`crate::lldp`]).
    ports: Arc<SwitchPorts>,
}

impl Testbed {
    /// Builds the cluster described by `spec`. First removes stale namespaces of dead
    /// processes ([`cleanup_stale`](crate::cleanup_stale)); returns once every link is up.
    /// Needs CAP_NET_ADMIN and CAP_SYS_ADMIN ([`TestbedError::NotRoot`] otherwise). On
    /// failure, whatever was created is removed again.
    pub fn create(spec: TestbedSpec) -> Result<Testbed, TestbedError> {
        if !sys::has_netns_capabilities() {
            return Err(TestbedError::NotRoot);
        }
        spec.validate()?;
        match registry::cleanup_stale() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed stale testbed namespaces");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "stale testbed cleanup incomplete"),
        }
        let id = TestbedId::next();
        let shared = Arc::new(Shared::new(id));
        registry::register(&shared);
        match build(&shared, spec) {
            Ok(testbed) => Ok(testbed),
            Err(e) => {
                if let Err(t) = shared.teardown() {
                    tracing::error!(error = %t, "cleanup after failed testbed creation");
                }
                Err(e)
            }
        }
    }

    /// The testbed's id, `nwtb<pid>x<n>`; every namespace name starts with it.
    pub fn id(&self) -> &str {
        self.shared.name()
    }

    /// The spec it was built from.
    pub fn spec(&self) -> TestbedSpec {
        self.spec
    }

    /// The switch namespace (`br0` and the ports `p<k>`).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The management namespace (`mbr0` with [`CONTROLLER_IP`], ports `m<k>`); the
    /// controller runs here.
    pub fn mgmt(&self) -> &Netns {
        &self.mgmt
    }

    /// The nodes, `node1` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node named `name` (`"node2"`).
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The controller's address, 198.19.0.1.
    pub fn controller_ip(&self) -> Ipv4Addr {
        CONTROLLER_IP
    }

    /// The names of all namespaces of this testbed.
    pub fn namespaces(&self) -> Vec<String> {
        self.shared.state().namespaces.clone()
    }

    /// Starts `cmd`, which must come from [`Netns::command`] on one of this testbed's
    /// namespaces, and tracks it so teardown stops it (SIGTERM, then SIGKILL after 2 s).
    /// Takes `&mut` so a builder chain can be passed directly:
    /// `tb.spawn(node.netns.command("sleep").arg("10"))`.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process, TestbedError> {
        let command = format!("{cmd:?}");
        let foreign = || TestbedError::ForeignCommand {
            testbed: self.id().to_string(),
            command: command.clone(),
        };
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if cmd.get_program() != "nsenter" || args.len() < 3 || args[1] != "--" {
            return Err(foreign());
        }
        let label = args[2].clone();
        let mut state = self.shared.state();
        if state.torn_down {
            return Err(TestbedError::TornDown(self.id().to_string()));
        }
        let Some(netns) = state
            .namespaces
            .iter()
            .find(|ns| args[0] == Netns::new(ns.to_string()).nsenter_arg())
            .cloned()
        else {
            return Err(foreign());
        };
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
        let process = Process::new(label, netns, child);
        // Forget processes that have exited (their handles keep the exit status).
        state.procs.retain(|p| matches!(p.try_wait(), Ok(None)));
        state.procs.push(process.clone());
        Ok(process)
    }

    /// Cuts (`up = false`) or restores node `node`'s management link, at the management
    /// switch: port `m<k>` goes down, so the node sees NO-CARRIER on `mgmt0` and its packets to
    /// the controller are dropped silently, like a pulled cable (no RST, no ICMP). Returns
    /// once the node's `mgmt0` reflects the change.
    pub fn set_mgmt_link(&self, node: &str, up: bool) -> Result<(), TestbedError> {
        let n = self.node_or_err(node)?;
        self.mgmt.set_link(&n.mgmt_port, up)?;
        self.mgmt
            .wait_link_state(&[&n.mgmt_port], up, LINK_TIMEOUT)?;
        n.netns
            .wait_link_state(&[&n.mgmt_iface], up, LINK_TIMEOUT)?;
        if up {
            // With a single node the bridge lost its carrier too.
            self.mgmt.wait_carrier(&[MGMT_BRIDGE], LINK_TIMEOUT)?;
        }
        Ok(())
    }

    /// Cuts or restores node `node`'s fabric link at the switch (port `p<k>`), with the same
    /// pulled-cable behaviour as [`Testbed::set_mgmt_link`]. (To take the node's own `fab0`
    /// down instead, which makes sends fail at once with "network unreachable", use
    /// `node.netns.set_link("fab0", false)`.)
    pub fn set_fabric_link(&self, node: &str, up: bool) -> Result<(), TestbedError> {
        let n = self.node_or_err(node)?;
        self.switch.set_link(&n.switch_port, up)?;
        self.switch
            .wait_link_state(&[&n.switch_port], up, LINK_TIMEOUT)?;
        n.netns
            .wait_link_state(&[&n.fabric_iface], up, LINK_TIMEOUT)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn switch_ports(&self) -> &Arc<SwitchPorts> {
        &self.ports
    }

    pub(crate) fn node_or_err(&self, name: &str) -> Result<&Node, TestbedError> {
        self.node(name).ok_or_else(|| TestbedError::UnknownNode {
            testbed: self.id().to_string(),
            node: name.to_string(),
        })
    }

    /// Stops the spawned processes and deletes every namespace, reporting failures (the
    /// remaining steps are still carried out). Dropping the testbed does the same and only
    /// logs failures.
    pub fn teardown(self) -> Result<(), TestbedError> {
        self.shared.teardown()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.shared.teardown() {
            tracing::error!(error = %e, "testbed teardown on drop");
        }
    }
}

/// Creates the namespaces and links of a testbed whose shared state is already registered.
fn build(shared: &Arc<Shared>, spec: TestbedSpec) -> Result<Testbed, TestbedError> {
    let id = shared.id;
    sys::write_marker(id)?;
    let mtu = spec.fabric_mtu.to_string();
    let mgmt_mtu = MGMT_MTU.to_string();

    // The bridges stay down until their ports are up (see below).
    let switch = new_namespace(shared, &id.namespace("sw"))?;
    switch.ip(&["link", "add", SWITCH_BRIDGE, "type", "bridge"])?;

    let mgmt = new_namespace(shared, &id.namespace("mgmt"))?;
    mgmt.ip(&["link", "add", MGMT_BRIDGE, "type", "bridge"])?;
    let controller = format!("{CONTROLLER_IP}/{PREFIX_LEN}");
    mgmt.ip(&["addr", "add", &controller, "dev", MGMT_BRIDGE])?;

    let mut nodes = Vec::with_capacity(spec.nodes);
    for k in 1..=spec.nodes {
        let index = u8::try_from(k)
            .map_err(|_| TestbedError::InvalidSpec(format!("node index {k} out of range")))?;
        let node = Node {
            name: format!("node{k}"),
            index: k,
            netns: new_namespace(shared, &id.namespace(&format!("node{k}")))?,
            fabric_ip: Ipv4Addr::new(198, 18, 0, index),
            mgmt_ip: Ipv4Addr::new(198, 19, 0, index + 1),
            fabric_iface: FABRIC_IFACE.to_string(),
            mgmt_iface: MGMT_IFACE.to_string(),
            switch_port: format!("p{k}"),
            switch_port_name: format!("p{k}"),
            mgmt_port: format!("m{k}"),
        };
        let ns = &node.netns;
        // Create each veth in the node with its peer directly in the switch/mgmt namespace,
        // so nothing ever appears in the root namespace. Interface indexes are chosen so that
        // no veth end has its peer's index: the kernel handles a veth's link events at once
        // only when its index differs from its peer's (linkwatch's "urgent" test), otherwise
        // they wait up to a second.
        let port_index = (PORT_INDEX_BASE + k).to_string();
        add_veth(
            ns,
            (FABRIC_IFACE, FABRIC_INDEX),
            (&node.switch_port, &port_index),
            &switch,
            &mtu,
        )?;
        add_veth(
            ns,
            (MGMT_IFACE, MGMT_INDEX),
            (&node.mgmt_port, &port_index),
            &mgmt,
            &mgmt_mtu,
        )?;
        switch.ip(&[
            "link",
            "set",
            &node.switch_port,
            "master",
            SWITCH_BRIDGE,
            "up",
        ])?;
        mgmt.ip(&["link", "set", &node.mgmt_port, "master", MGMT_BRIDGE, "up"])?;
        let fabric_addr = format!("{}/{PREFIX_LEN}", node.fabric_ip);
        let mgmt_addr = format!("{}/{PREFIX_LEN}", node.mgmt_ip);
        ns.ip(&["addr", "add", &fabric_addr, "dev", FABRIC_IFACE])?;
        ns.ip(&["addr", "add", &mgmt_addr, "dev", MGMT_IFACE])?;
        ns.set_link(FABRIC_IFACE, true)?;
        ns.set_link(MGMT_IFACE, true)?;
        nodes.push(node);
    }

    // Carrier, operational state and qdisc activation follow asynchronously (linkwatch);
    // until then a device drops what it sends. Veth events are handled at once, but a
    // bridge's carrier-on waits for the next linkwatch round (up to a second). So: wait until
    // every veth end is operationally up, then open the bridges, whose ports then forward
    // from the start, so each bridge has carrier and an active qdisc as it opens.
    let switch_ports: Vec<&str> = nodes.iter().map(|n| n.switch_port.as_str()).collect();
    let mgmt_ports: Vec<&str> = nodes.iter().map(|n| n.mgmt_port.as_str()).collect();
    switch.wait_link_state(&switch_ports, true, LINK_TIMEOUT)?;
    mgmt.wait_link_state(&mgmt_ports, true, LINK_TIMEOUT)?;
    for node in &nodes {
        node.netns
            .wait_link_state(&[FABRIC_IFACE, MGMT_IFACE], true, LINK_TIMEOUT)?;
    }
    // (A bridge's operational state may still read UNKNOWN for up to a second: that event
    // is not urgent. Its carrier is what matters.)
    switch.set_link(SWITCH_BRIDGE, true)?;
    mgmt.set_link(MGMT_BRIDGE, true)?;
    switch.wait_carrier(&[SWITCH_BRIDGE], LINK_TIMEOUT)?;
    mgmt.wait_carrier(&[MGMT_BRIDGE], LINK_TIMEOUT)?;
    tracing::debug!(testbed = %shared.name, nodes = nodes.len(), "testbed up");
    let ports = Arc::new(SwitchPorts::new(SWITCH_NAME, &nodes));
    Ok(Testbed {
        shared: Arc::clone(shared),
        spec,
        switch,
        mgmt,
        nodes,
        ports,
    })
}

/// Adds a namespace with loopback up and IPv6 off for every interface created later in it.
pub(crate) fn new_namespace(shared: &Shared, name: &str) -> Result<Netns, TestbedError> {
    let ns = shared.add_namespace(name)?;
    match ns.write_net_sysctl("ipv6/conf/default/disable_ipv6", "1") {
        Ok(()) => {}
        // A kernel without IPv6 has nothing to disable.
        Err(TestbedError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    ns.set_link("lo", true)?;
    Ok(ns)
}

/// Creates a veth pair: `end` (name, ifindex) in `ns`, its peer `peer` (name, ifindex)
/// directly in `peer_ns`, both with `mtu`, so nothing ever appears in the root namespace.
pub(crate) fn add_veth(
    ns: &Netns,
    end: (&str, &str),
    peer: (&str, &str),
    peer_ns: &Netns,
    mtu: &str,
) -> Result<(), TestbedError> {
    ns.ip(&[
        "link",
        "add",
        end.0,
        "index",
        end.1,
        "mtu",
        mtu,
        "type",
        "veth",
        "peer",
        "name",
        peer.0,
        "index",
        peer.1,
        "mtu",
        mtu,
        "netns",
        peer_ns.name(),
    ])?;
    Ok(())
}
