//! The "ebpf" backend: an eBPF tc program decides per packet (volume, blocked scopes,
//! classification), HTB shapes the rate; a second one polices what arrives.
//!
//! * **Program** (`bpf/nicwarden.bpf.c`, compiled by `build.rs`, embedded): a direct-action
//!   classifier on the fabric interface's clsact egress hook, preference
//!   [`ops::FILTER_PREF`], handle [`ops::FILTER_HANDLE`]. IPv4 destinations are looked up in an
//!   LPM trie (peer prefixes → scope slot; a miss is the egress scope), ARP and link probes
//!   (EtherType 0x88B5) go to the control class, everything else (IPv6, other protocols) to
//!   the egress scope, as with the tc backend's filters: only ARP and link probes pass outside
//!   the scopes. Per slot a config (blocked / lease / floor,
//!   HTB class id, lease id, volume), exact volume accounting and per-CPU counters: see
//!   [`maps`].
//! * **Shaping** stays with tc: the same HTB layout as the tc backend ([`crate::plan`]) but
//!   without u32 filters ([`Steering::SkbPriority`]): the program names each packet's class in
//!   `skb->priority`. No nftables.
//! * **Pins**: maps and programs are pinned under the pin directory (the agent's convention:
//!   [`EbpfDatapath::default_pin_dir`], `/sys/fs/bpf/nicwarden/<node>`); the filters hold the
//!   programs. A new `EbpfDatapath` over the same pin directory (an agent restart) finds the
//!   maps, the programs and the attachments and changes nothing: counters continue, none
//!   counted twice, enforcement never stops. A new agent *build* loads its own programs and
//!   swaps them into the filters atomically, over the same maps (creating the maps it adds).
//!
//! Reconcile order: maps first (they are the decision: a revocation, a block or a new volume
//! is one config write, effective at once), then tc, then the attachment (only on first
//! install, or when something else took our filter slot). On a first install the HTB root
//! lands before the program is attached, so unsteered traffic falls to HTB's default class,
//! which drops: fail closed throughout.
//!
//! * **Ingress policing** (the same object's second program, `nw_ingress`, on the clsact
//!   *ingress* hook, same preference and handle): what arrives is looked up by its IPv4
//!   *source* in the same trie (a peer scope's prefixes are that peer's addresses; a miss is
//!   the egress scope), dropped if the scope is blocked (a node without a valid lease has no
//!   fabric traffic in either direction) and otherwise admitted by the slot's token bucket at
//!   the scope's rate with its HTB burst; so a peer without an agent (or with a lying one)
//!   cannot push more at this node than this node's lease for that scope accepts. ARP and
//!   everything that is not IPv4 passes. Counters: [`crate::IngressStats`] in
//!   [`ScopeCounters::ingress`]. Both programs are attached, pinned, reused, repaired and
//!   removed alike.
//!
//! Reconcile order, ingress: the policers are written with the other counters, before the
//! configs (a scope opens with its bucket set); the ingress program is attached after the
//! egress one.
//!
//! * **Per-peer counters** (both programs): the peer address of each IPv4 packet (its
//!   destination at egress, its source at ingress) is looked up in a second LPM trie,
//!   `nw_peer` (peer address → peer index), and the packet is counted at that index of the
//!   per-CPU array `nw_peer_stats`: `tx` when the egress program passes it (after the volume
//!   and blocked decisions), `rx` when the ingress program admits it, `rx_dropped` when it
//!   drops it. The agent keeps each index's node name in `nw_peer_node`, so a restarted agent
//!   finds every peer's counters again. [`Datapath::peer_counters`] reads them; the peer maps
//!   are reconciled last (they decide nothing), idempotently: see "Peers" in [`maps`]. Note
//!   that HTB (after the program) may still drop a packet counted as `tx` when a class's
//!   queue overflows; those drops are in the scope's [`crate::ClassStats::drops`].
//!
//! Namespaces and threads: the real [`BpfOps`] speaks netlink (and runs `tc`) in the network
//! namespace of the *calling thread*; call every method of an `EbpfDatapath` from a thread
//! inside the namespace of the fabric interface (for a process started in it, any thread).
//! Pins live on the bpf filesystem of the process's mount namespace: `ip netns exec` gives a
//! process a private one, so pins made there die with the process (see the crate's report).

pub mod fake;
pub mod maps;
pub mod ops;
#[cfg(test)]
mod tests;

pub use fake::{FakeBpf, Verdict};
pub use maps::{PeerStats, Police, ScopeConfig, ScopeStats};
pub use ops::{Attachment, BpfOps, Hook, RealBpf};

use crate::ops::{RealTc, TcOps};
use crate::plan::{Plan, Steering};
use crate::shaper::Shaper;
use crate::{
    Change, Datapath, DatapathError, DesiredState, LeaseCounters, PeerCounters, ScopeCounters,
};
use maps::{MapWrite, MapsKernel, DST_MAX, MODE_LEASE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The eBPF backend on one fabric interface. See the [module documentation](self).
pub struct EbpfDatapath {
    /// Run every call on a thread inside `/run/netns/NETNS` (see [`EbpfDatapath::in_netns`]).
    netns: Option<String>,
    pin_dir: PathBuf,
    tc: Shaper,
    bpf: Box<dyn BpfOps>,
    /// The plan of the last reconcile that completed (for tc's comparison); `None` after a
    /// failure or in a fresh process.
    applied: Option<Plan>,
    /// The last valid desired state: what `counters` reports on.
    current: Option<Plan>,
    /// The peer index of each counted peer, as the last reconcile of the maps left them;
    /// `None` after a failure or in a fresh process (then `nw_peer_node` is read).
    peer_index: Option<BTreeMap<String, u32>>,
}

impl EbpfDatapath {
    /// The real backend on `fabric_iface`, pinning under `pin_dir`. Does nothing yet: the
    /// kernel work happens in [`Datapath::reconcile`], which must run on a thread inside the
    /// interface's network namespace.
    pub fn new(fabric_iface: &str, pin_dir: &Path) -> Self {
        Self::with_ops(
            fabric_iface,
            pin_dir,
            Box::new(RealBpf::new()),
            Box::new(RealTc::new()),
        )
    }

    /// The backend over the given kernel interfaces (fakes in tests).
    pub fn with_ops(
        fabric_iface: &str,
        pin_dir: &Path,
        bpf: Box<dyn BpfOps>,
        tc: Box<dyn TcOps>,
    ) -> Self {
        EbpfDatapath {
            netns: None,
            pin_dir: pin_dir.to_path_buf(),
            tc: Shaper::new(fabric_iface, tc),
            bpf,
            applied: None,
            current: None,
            peer_index: None,
        }
    }

    /// The real backend on `fabric_iface` inside the named network namespace `netns`
    /// (`/run/netns/NETNS`, as `ip netns add` creates it), for a caller outside it (tests,
    /// benchmarks): each call runs on a fresh thread that entered the namespace. Pins go to
    /// `pin_dir` on this process's bpf filesystem.
    pub fn in_netns(netns: &str, fabric_iface: &str, pin_dir: &Path) -> Self {
        EbpfDatapath {
            netns: Some(netns.to_string()),
            ..Self::new(fabric_iface, pin_dir)
        }
    }

    /// Runs `f` here, or on a thread inside the namespace given to [`Self::in_netns`].
    fn run<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DatapathError> + Send,
    ) -> Result<T, DatapathError> {
        let Some(netns) = self.netns.clone() else {
            return f(self);
        };
        let path = Path::new("/run/netns").join(&netns);
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                let enter = |e: &(dyn std::error::Error + 'static)| {
                    DatapathError::bpf(format!("enter network namespace {netns}"), e)
                };
                let file = std::fs::File::open(&path).map_err(|e| enter(&e))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| enter(&e))?;
                f(self)
            });
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The pin directory the agent uses for `node`: `/sys/fs/bpf/nicwarden/<node>`.
    pub fn default_pin_dir(node: &str) -> PathBuf {
        Path::new(ops::BPFFS_ROOT).join("nicwarden").join(node)
    }

    /// Checks that this host can run the backend: root, kernel BTF, a bpf filesystem on
    /// `/sys/fs/bpf` (or the means to mount one), `tc`. The error says what is missing.
    pub fn check_available() -> Result<(), DatapathError> {
        ops::check_available()
    }

    /// The fabric interface this backend programs.
    pub fn fabric_iface(&self) -> &str {
        self.tc.dev()
    }

    /// Where the maps and the program are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn open(&mut self) -> Result<Vec<Change>, DatapathError> {
        Ok(self
            .bpf
            .open(&self.pin_dir)?
            .into_iter()
            .map(|s| Change(format!("ebpf: {s}")))
            .collect())
    }

    fn read_maps(&mut self, plan: &Plan) -> Result<MapsKernel, DatapathError> {
        let configs = self.bpf.configs()?;
        let mut kernel = MapsKernel::default();
        for slot in maps::slots_to_read(plan, &configs) {
            kernel.used.insert(slot, self.bpf.used(slot)?);
            kernel.stats.insert(slot, self.bpf.stats(slot)?);
            kernel.police.insert(slot, self.bpf.police(slot)?);
            kernel.ingress.insert(slot, self.bpf.ingress_stats(slot)?);
        }
        kernel.configs = configs;
        kernel.destinations = self.bpf.destinations()?;
        kernel.peer_addrs = self.bpf.peer_addrs()?;
        kernel.peer_nodes = self.bpf.peer_nodes()?;
        Ok(kernel)
    }

    fn reconcile_maps(&mut self, plan: &Plan) -> Result<Vec<Change>, DatapathError> {
        self.peer_index = None;
        let mut changes = self.open()?;
        let kernel = self.read_maps(plan)?;
        let diff = maps::diff(plan, &kernel);
        for w in &diff.writes {
            match w {
                MapWrite::Used { slot, used } => self.bpf.set_used(*slot, *used)?,
                MapWrite::Stats { slot, stats } => self.bpf.set_stats(*slot, stats)?,
                MapWrite::Config { slot, config } => self.bpf.set_config(*slot, config)?,
                MapWrite::Police { slot, police } => self.bpf.set_police(*slot, police)?,
                MapWrite::IngressStats { slot, stats } => {
                    self.bpf.set_ingress_stats(*slot, stats)?
                }
                MapWrite::Destination { net, slot } => self.bpf.set_destination(*net, *slot)?,
                MapWrite::RemoveDestination { net } => self.bpf.remove_destination(*net)?,
                MapWrite::PeerStats { index, stats } => self.bpf.set_peer_stats(*index, stats)?,
                MapWrite::PeerNode { index, node } => self.bpf.set_peer_node(*index, node)?,
                MapWrite::PeerAddr { net, index } => self.bpf.set_peer_addr(*net, *index)?,
                MapWrite::RemovePeerAddr { net } => self.bpf.remove_peer_addr(*net)?,
            }
        }
        changes.extend(diff.changes);
        self.peer_index = Some(diff.peer_index);
        Ok(changes)
    }

    /// Attaches both programs where they are missing or something else took their slot.
    fn reconcile_attach(&mut self) -> Result<Vec<Change>, DatapathError> {
        let mut changes = Vec::new();
        for hook in Hook::ALL {
            changes.extend(self.reconcile_hook(hook)?);
        }
        Ok(changes)
    }

    fn reconcile_hook(&mut self, hook: Hook) -> Result<Option<Change>, DatapathError> {
        let dev = self.tc.dev().to_string();
        let was = match self.bpf.attachment(&dev, hook)? {
            Attachment::Ours => return Ok(None),
            Attachment::None => None,
            Attachment::Other(what) => Some(what),
        };
        self.bpf.attach(&dev, hook)?;
        let (program, name) = (hook.program(), hook.name());
        let text = match was {
            None => format!(
                "program {program} attached to {dev} {name} (clsact, pref {}, handle {:#x})",
                ops::FILTER_PREF,
                ops::FILTER_HANDLE
            ),
            Some(what) => format!("program {program} attached to {dev} {name}, replacing {what}"),
        };
        Ok(Some(Change(format!("ebpf: {text}"))))
    }
}

impl Datapath for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn reconcile(&mut self, desired: &DesiredState) -> Result<Vec<Change>, DatapathError> {
        self.run(|dp| dp.do_reconcile(desired))
    }

    fn counters(&mut self) -> Result<Vec<ScopeCounters>, DatapathError> {
        self.run(Self::do_counters)
    }

    fn peer_counters(&mut self) -> Result<Vec<PeerCounters>, DatapathError> {
        self.run(Self::do_peer_counters)
    }

    fn remove(&mut self) -> Result<(), DatapathError> {
        self.run(Self::do_remove)
    }
}

impl EbpfDatapath {
    fn do_reconcile(&mut self, desired: &DesiredState) -> Result<Vec<Change>, DatapathError> {
        let plan = Plan::build_with(self.tc.dev(), desired, Steering::SkbPriority)?;
        let prefixes: usize = plan.scopes.iter().map(|s| s.prefixes.len()).sum();
        if prefixes > DST_MAX {
            return Err(DatapathError::Invalid(format!(
                "{prefixes} destination prefixes in all scopes; the eBPF datapath holds at most {DST_MAX}"
            )));
        }
        self.current = Some(plan.clone());
        let last = self.applied.take();
        // Maps first: they are the decision. A failure of one part does not stop the next
        // (the kernel gets as close as it can; the next reconcile retries), except that the
        // program is attached only over maps that hold the plan.
        let maps = self.reconcile_maps(&plan);
        let tc = self.tc.reconcile(&plan, last.as_ref());
        let attach = match &maps {
            Ok(_) => self.reconcile_attach(),
            Err(_) => Ok(Vec::new()),
        };
        let changes = crate::merge_reconcile(self.tc.dev(), [maps, tc, attach], "another")?;
        self.applied = Some(plan);
        Ok(changes)
    }

    fn do_counters(&mut self) -> Result<Vec<ScopeCounters>, DatapathError> {
        let Some(plan) = self.current.clone() else {
            return Ok(Vec::new());
        };
        let leaves = self.tc.leaves()?;
        for c in self.open()? {
            tracing::warn!(dev = %self.tc.dev(), change = %c, "eBPF pins repaired while reading counters");
        }
        let mut out = Vec::with_capacity(plan.scopes.len());
        for s in &plan.scopes {
            let slot = maps::slot_of(s);
            let stats = self.bpf.stats(slot)?;
            let mut class = leaves
                .get(&s.class_minor)
                .map(|l| l.stats)
                .unwrap_or_default();
            // Blocked packets are dropped by the program before HTB sees them.
            class.drops += stats.blocked_drops;
            let lease = match &s.lease {
                None => None,
                Some(l) => {
                    let config = self.bpf.config(slot)?;
                    let (used, stats) = if config.mode == MODE_LEASE && config.lease_id == l.id.0 {
                        (self.bpf.used(slot)?.max(l.start_used), stats)
                    } else {
                        // Not (yet) in the maps: what the controller recorded.
                        (l.start_used, Default::default())
                    };
                    Some(LeaseCounters {
                        lease: l.id,
                        used_bytes: l.volume.map_or(used, |v| used.min(v)),
                        passed_packets: stats.packets,
                        volume_drops: stats.volume_drops,
                        exhausted: l
                            .volume
                            .is_some_and(|v| used >= v || stats.volume_drops > 0),
                    })
                }
            };
            let ingress = self.bpf.ingress_stats(slot)?;
            out.push(ScopeCounters {
                scope: s.scope.clone(),
                class,
                lease,
                ingress,
            });
        }
        Ok(out)
    }

    fn do_peer_counters(&mut self) -> Result<Vec<PeerCounters>, DatapathError> {
        let Some(plan) = self.current.clone() else {
            return Ok(Vec::new());
        };
        for c in self.open()? {
            tracing::warn!(dev = %self.tc.dev(), change = %c, "eBPF pins repaired while reading peer counters");
        }
        let index = match &self.peer_index {
            Some(index) => index.clone(),
            None => maps::installed_peer_index(&plan.peers, &self.bpf.peer_nodes()?),
        };
        let mut out = Vec::with_capacity(plan.peers.len());
        for p in &plan.peers {
            let stats = match index.get(&p.node) {
                Some(i) => self.bpf.peer_stats(*i)?,
                // Not installed (its reconcile failed): nothing counted.
                None => maps::PeerStats::default(),
            };
            out.push(stats.counters(&p.node));
        }
        Ok(out)
    }

    fn do_remove(&mut self) -> Result<(), DatapathError> {
        self.applied = None;
        self.current = None;
        self.peer_index = None;
        let dev = self.tc.dev().to_string();
        // The programs first: egress traffic then falls to HTB's drop class until the root
        // goes; ingress is no longer policed.
        let results = [
            self.bpf.detach(&dev, Hook::Egress).map(|_| ()),
            self.bpf.detach(&dev, Hook::Ingress).map(|_| ()),
            self.tc.remove(),
            self.bpf.unpin(&self.pin_dir).map(|_| ()),
        ];
        let mut failure = None;
        for r in results {
            if let Err(e) = r {
                if failure.is_none() {
                    failure = Some(e);
                } else {
                    tracing::warn!(dev = %dev, error = %e, "eBPF datapath remove: another failure");
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}
