//! An in-memory bpf subsystem for tests: [`FakeBpf`] keeps pinned maps per pin directory
//! (they outlive the [`BpfOps`] handles, as pins outlive processes), the programs attached to
//! the device's egress and ingress, and a log of every write; [`FakeBpf::packet`] runs the
//! egress program's logic on the fake maps, [`FakeBpf::arrive`] the ingress program's (on a
//! clock the test passes in), per-peer counting included.
//!
//! Public so that crates driving an [`EbpfDatapath`] (the agent) can test
//! against it without a kernel: `FakeBpf::new("fab0").datapath(&FakeKernel::new("fab0"), dir)`.

use super::maps::{
    PeerStats, Police, ScopeConfig, ScopeStats, MODE_FLOOR, MODE_LEASE, PEERS, SLOTS,
};
use super::ops::{Attachment, BpfOps, Hook};
use super::EbpfDatapath;
use crate::fake::FakeKernel;
use crate::{DatapathError, IngressStats};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A fake bpf subsystem with one network device. Clones share the same state.
#[derive(Clone)]
pub struct FakeBpf {
    state: Arc<Mutex<State>>,
}

struct State {
    dev: String,
    bpffs_mounted: bool,
    pins: BTreeMap<PathBuf, Pinned>,
    /// Program id at our filter slot of each of the device's clsact hooks, and whether clsact
    /// exists.
    attached: BTreeMap<Hook, u32>,
    clsact: bool,
    next_prog_id: u32,
    log: Vec<String>,
    fail_next: Option<String>,
}

#[derive(Clone)]
struct Pinned {
    configs: Vec<ScopeConfig>,
    used: Vec<u64>,
    stats: Vec<ScopeStats>,
    police: Vec<Police>,
    istats: Vec<IngressStats>,
    destinations: BTreeMap<Ipv4Net, u32>,
    peer_addrs: BTreeMap<Ipv4Net, u32>,
    peer_stats: Vec<PeerStats>,
    peer_nodes: Vec<String>,
    /// Program ids, per hook.
    programs: BTreeMap<Hook, u32>,
}

impl Pinned {
    fn new() -> Self {
        Pinned {
            configs: vec![ScopeConfig::default(); SLOTS as usize],
            used: vec![0; SLOTS as usize],
            stats: vec![ScopeStats::default(); SLOTS as usize],
            police: vec![Police::default(); SLOTS as usize],
            istats: vec![IngressStats::default(); SLOTS as usize],
            destinations: BTreeMap::new(),
            peer_addrs: BTreeMap::new(),
            peer_stats: vec![PeerStats::default(); PEERS as usize],
            peer_nodes: vec![String::new(); PEERS as usize],
            programs: BTreeMap::new(),
        }
    }

    /// The per-peer counters of `addr` (longest prefix match in `nw_peer`), if it is a
    /// peer's.
    fn peer_of(&mut self, addr: Ipv4Addr) -> Option<&mut PeerStats> {
        let index = self
            .peer_addrs
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, index)| *index as usize)?;
        self.peer_stats.get_mut(index)
    }

    /// Longest prefix match in `nw_dst`; a miss is slot 0.
    fn slot_of(&self, addr: Ipv4Addr) -> usize {
        self.destinations
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map_or(0, |(_, slot)| *slot) as usize
    }
}

/// What the program decided for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed with this `skb->priority`.
    Pass(u32),
    Drop,
}

impl FakeBpf {
    /// No bpf filesystem mounted, nothing pinned, nothing attached to `dev`.
    pub fn new(dev: &str) -> Self {
        FakeBpf {
            state: Arc::new(Mutex::new(State {
                dev: dev.to_string(),
                bpffs_mounted: false,
                pins: BTreeMap::new(),
                attached: BTreeMap::new(),
                clsact: false,
                next_prog_id: 100,
                log: Vec::new(),
                fail_next: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (a failed assertion in a test) must not hide the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh handle, as a new process opening the same kernel would have.
    pub fn ops(&self) -> Box<dyn BpfOps> {
        Box::new(FakeBpfOps {
            bpf: self.clone(),
            opened: None,
        })
    }

    /// An [`EbpfDatapath`] on this fake and `tc`'s tc (a fresh process each call).
    pub fn datapath(&self, tc: &FakeKernel, pin_dir: &Path) -> EbpfDatapath {
        let dev = self.lock().dev.clone();
        EbpfDatapath::with_ops(&dev, pin_dir, self.ops(), tc.tc_ops())
    }

    /// Every map write, attach and detach so far, and clears it.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    /// The next call of the named [`BpfOps`] method (e.g. "set_config") fails.
    pub fn fail_next(&self, method: &str) {
        self.lock().fail_next = Some(method.to_string());
    }

    pub fn bpffs_mounted(&self) -> bool {
        self.lock().bpffs_mounted
    }

    /// Pin directories holding something.
    pub fn pin_dirs(&self) -> Vec<PathBuf> {
        self.lock().pins.keys().cloned().collect()
    }

    /// The program attached at the device's `hook`, if any.
    pub fn attached(&self, hook: Hook) -> Option<u32> {
        self.lock().attached.get(&hook).copied()
    }

    /// Whether the device has a clsact qdisc.
    pub fn clsact(&self) -> bool {
        self.lock().clsact
    }

    /// The id of the `hook`'s program pinned under `pin_dir`.
    pub fn pinned_program(&self, pin_dir: &Path, hook: Hook) -> Option<u32> {
        self.lock()
            .pins
            .get(pin_dir)
            .and_then(|p| p.programs.get(&hook).copied())
    }

    /// Attaches another program (id `prog`) at our slot of `hook`, as a foreign tool would.
    pub fn attach_foreign(&self, hook: Hook, prog: u32) {
        let mut s = self.lock();
        s.attached.insert(hook, prog);
        s.clsact = true;
    }

    /// Removes our filter at `hook` behind the datapath's back (`tc filter del`).
    pub fn tamper_detach(&self, hook: Hook) {
        self.lock().attached.remove(&hook);
    }

    pub fn config(&self, pin_dir: &Path, slot: u32) -> Option<ScopeConfig> {
        self.with_pinned(pin_dir, |p| p.configs.get(slot as usize).copied())
    }

    /// Overwrites a slot's config behind the datapath's back.
    pub fn tamper_config(&self, pin_dir: &Path, slot: u32, config: ScopeConfig) {
        if let Some(p) = self.lock().pins.get_mut(pin_dir) {
            if let Some(c) = p.configs.get_mut(slot as usize) {
                *c = config;
            }
        }
    }

    /// Overwrites a slot's policer behind the datapath's back.
    pub fn tamper_police(&self, pin_dir: &Path, slot: u32, police: Police) {
        if let Some(p) = self.lock().pins.get_mut(pin_dir) {
            if let Some(c) = p.police.get_mut(slot as usize) {
                *c = police;
            }
        }
    }

    pub fn used(&self, pin_dir: &Path, slot: u32) -> Option<u64> {
        self.with_pinned(pin_dir, |p| p.used.get(slot as usize).copied())
    }

    pub fn stats(&self, pin_dir: &Path, slot: u32) -> Option<ScopeStats> {
        self.with_pinned(pin_dir, |p| p.stats.get(slot as usize).copied())
    }

    pub fn police(&self, pin_dir: &Path, slot: u32) -> Option<Police> {
        self.with_pinned(pin_dir, |p| p.police.get(slot as usize).copied())
    }

    pub fn ingress_stats(&self, pin_dir: &Path, slot: u32) -> Option<IngressStats> {
        self.with_pinned(pin_dir, |p| p.istats.get(slot as usize).copied())
    }

    pub fn destinations(&self, pin_dir: &Path) -> Option<BTreeMap<Ipv4Net, u32>> {
        self.with_pinned(pin_dir, |p| Some(p.destinations.clone()))
    }

    /// `nw_peer`.
    pub fn peer_addrs(&self, pin_dir: &Path) -> Option<BTreeMap<Ipv4Net, u32>> {
        self.with_pinned(pin_dir, |p| Some(p.peer_addrs.clone()))
    }

    /// `nw_peer_stats` of a peer index.
    pub fn peer_stats(&self, pin_dir: &Path, index: u32) -> Option<PeerStats> {
        self.with_pinned(pin_dir, |p| p.peer_stats.get(index as usize).copied())
    }

    /// `nw_peer_node` of a peer index ("" = free).
    pub fn peer_node(&self, pin_dir: &Path, index: u32) -> Option<String> {
        self.with_pinned(pin_dir, |p| p.peer_nodes.get(index as usize).cloned())
    }

    /// Overwrites a peer index's node name behind the datapath's back.
    pub fn tamper_peer_node(&self, pin_dir: &Path, index: u32, node: &str) {
        if let Some(p) = self.lock().pins.get_mut(pin_dir) {
            if let Some(n) = p.peer_nodes.get_mut(index as usize) {
                *n = node.to_string();
            }
        }
    }

    /// Removes one pinned destination behind the datapath's back.
    pub fn tamper_remove_destination(&self, pin_dir: &Path, net: Ipv4Net) {
        if let Some(p) = self.lock().pins.get_mut(pin_dir) {
            p.destinations.remove(&net);
        }
    }

    fn with_pinned<T>(&self, pin_dir: &Path, f: impl FnOnce(&Pinned) -> Option<T>) -> Option<T> {
        self.lock().pins.get(pin_dir).and_then(f)
    }

    /// Runs the attached program on one packet leaving the device: `dst` is the IPv4
    /// destination (`None`: ARP or a link probe, which go to the control class), `len` its
    /// IP length. Without a program attached the packet passes with priority 0.
    pub fn packet(&self, dst: Option<Ipv4Addr>, len: u64) -> Verdict {
        let mut s = self.lock();
        let Some(p) = s.attached_maps(Hook::Egress) else {
            return Verdict::Pass(0);
        };
        let Some(dst) = dst else {
            return Verdict::Pass(super::maps::classid(crate::plan::CONTROL_MINOR));
        };
        let slot = p.slot_of(dst);
        let (Some(cfg), Some(stats), Some(used)) = (
            p.configs.get(slot).copied(),
            p.stats.get_mut(slot),
            p.used.get_mut(slot),
        ) else {
            return Verdict::Drop;
        };
        match cfg.mode {
            MODE_LEASE => {
                if *used + len > cfg.volume_limit {
                    stats.volume_drops += 1;
                    return Verdict::Drop;
                }
                *used += len;
            }
            MODE_FLOOR => {}
            _ => {
                stats.blocked_drops += 1;
                return Verdict::Drop;
            }
        }
        stats.bytes += len;
        stats.packets += 1;
        // Per peer: only what passes.
        if let Some(peer) = p.peer_of(dst) {
            peer.tx_bytes += len;
            peer.tx_packets += 1;
        }
        Verdict::Pass(cfg.classid)
    }

    /// Runs the attached ingress program on one packet arriving on the device at `now_ns`
    /// (the program's `bpf_ktime_get_ns()`): `src` is the IPv4 source (`None`: ARP, IPv6 or
    /// anything else that is not IPv4, which passes uncounted), `len` its IP length. Without
    /// a program attached the packet passes. `Verdict::Pass` carries 0 (ingress steers
    /// nothing).
    pub fn arrive(&self, src: Option<Ipv4Addr>, len: u64, now_ns: u64) -> Verdict {
        let mut s = self.lock();
        let Some(p) = s.attached_maps(Hook::Ingress) else {
            return Verdict::Pass(0);
        };
        let Some(src) = src else {
            return Verdict::Pass(0);
        };
        let slot = p.slot_of(src);
        let verdict = match (
            p.configs.get(slot).copied(),
            p.istats.get_mut(slot),
            p.police.get_mut(slot),
        ) {
            (Some(cfg), Some(stats), Some(police)) => {
                if cfg.mode != MODE_LEASE && cfg.mode != MODE_FLOOR {
                    stats.blocked_drops += 1;
                    Verdict::Drop
                } else if !police.admit(len, now_ns) {
                    stats.policed_drops += 1;
                    Verdict::Drop
                } else {
                    stats.bytes += len;
                    stats.packets += 1;
                    Verdict::Pass(0)
                }
            }
            _ => Verdict::Drop,
        };
        // Per peer: what was admitted, and what was dropped.
        if let Some(peer) = p.peer_of(src) {
            if verdict == Verdict::Drop {
                peer.rx_dropped_bytes += len;
                peer.rx_dropped_packets += 1;
            } else {
                peer.rx_bytes += len;
                peer.rx_packets += 1;
            }
        }
        verdict
    }
}

impl State {
    /// The maps of the program attached at `hook`, if one of ours is.
    fn attached_maps(&mut self, hook: Hook) -> Option<&mut Pinned> {
        let prog = *self.attached.get(&hook)?;
        self.pins
            .values_mut()
            .find(|p| p.programs.get(&hook) == Some(&prog))
    }
}

struct FakeBpfOps {
    bpf: FakeBpf,
    opened: Option<PathBuf>,
}

fn fake_err(op: String, detail: &str) -> DatapathError {
    DatapathError::Bpf {
        op,
        detail: detail.to_string(),
    }
}

impl FakeBpfOps {
    fn check<'a>(bpf: &'a FakeBpf, method: &str) -> Result<MutexGuard<'a, State>, DatapathError> {
        let mut s = bpf.lock();
        if s.fail_next.as_deref() == Some(method) {
            s.fail_next = None;
            return Err(fake_err(format!("fake {method}"), "injected failure"));
        }
        Ok(s)
    }

    /// The state and this handle's pin directory; fails when not open or unpinned since.
    fn pinned(&self, method: &str) -> Result<(MutexGuard<'_, State>, PathBuf), DatapathError> {
        let s = Self::check(&self.bpf, method)?;
        let Some(dir) = self.opened.clone() else {
            return Err(fake_err(
                method.to_string(),
                "the eBPF maps are not open (open must succeed first)",
            ));
        };
        if !s.pins.contains_key(&dir) {
            return Err(fake_err(method.to_string(), "pinned maps are gone"));
        }
        Ok((s, dir))
    }

    fn peer_check(index: u32, method: &str) -> Result<usize, DatapathError> {
        if index < PEERS {
            Ok(index as usize)
        } else {
            Err(fake_err(
                format!("{method} peer index {index}"),
                "Argument list too long (os error 7)",
            ))
        }
    }

    fn slot_check(slot: u32, method: &str) -> Result<usize, DatapathError> {
        if slot < SLOTS {
            Ok(slot as usize)
        } else {
            Err(fake_err(
                format!("{method} slot {slot}"),
                "Argument list too long (os error 7)",
            ))
        }
    }
}

/// Runs `f` on the pinned maps of this handle.
macro_rules! with_maps {
    ($self:ident, $method:literal, |$p:ident, $log:ident| $body:expr) => {{
        let (mut s, dir) = $self.pinned($method)?;
        let state = &mut *s;
        let $log = &mut state.log;
        match state.pins.get_mut(&dir) {
            Some($p) => $body,
            None => Err(fake_err($method.to_string(), "pinned maps are gone")),
        }
    }};
}

impl BpfOps for FakeBpfOps {
    fn open(&mut self, pin_dir: &Path) -> Result<Vec<String>, DatapathError> {
        let mut s = Self::check(&self.bpf, "open")?;
        let mut created = Vec::new();
        if !s.bpffs_mounted {
            s.bpffs_mounted = true;
            created.push("bpf filesystem mounted on /sys/fs/bpf".to_string());
        }
        let mut next_id = s.next_prog_id;
        let pinned = s.pins.entry(pin_dir.to_path_buf()).or_insert_with(|| {
            created.push(format!("maps created, pinned under {}", pin_dir.display()));
            Pinned::new()
        });
        for hook in Hook::ALL {
            if let std::collections::btree_map::Entry::Vacant(e) = pinned.programs.entry(hook) {
                e.insert(next_id);
                next_id += 1;
                created.push(format!("program {} loaded, pinned", hook.program()));
            }
        }
        s.next_prog_id = next_id;
        self.opened = Some(pin_dir.to_path_buf());
        Ok(created)
    }

    fn attachment(&mut self, dev: &str, hook: Hook) -> Result<Attachment, DatapathError> {
        let (s, dir) = self.pinned("attachment")?;
        if dev != s.dev {
            return Err(fake_err(
                format!("list tc {} filters of {dev}", hook.name()),
                &format!("Cannot find device \"{dev}\""),
            ));
        }
        let ours = s
            .pins
            .get(&dir)
            .and_then(|p| p.programs.get(&hook).copied());
        Ok(match s.attached.get(&hook).copied() {
            None => Attachment::None,
            Some(id) if Some(id) == ours => Attachment::Ours,
            Some(id) => Attachment::Other(format!(
                "bpf filter pref 1 handle 0x1 running program {id} (other)"
            )),
        })
    }

    fn attach(&mut self, dev: &str, hook: Hook) -> Result<(), DatapathError> {
        let (mut s, dir) = self.pinned("attach")?;
        if dev != s.dev {
            return Err(fake_err(
                format!(
                    "attach tc {} program {} on {dev}",
                    hook.name(),
                    hook.program()
                ),
                "No such device (os error 19)",
            ));
        }
        let id = s
            .pins
            .get(&dir)
            .and_then(|p| p.programs.get(&hook).copied())
            .unwrap_or(0);
        s.attached.insert(hook, id);
        s.clsact = true;
        s.log
            .push(format!("attach program {id} to {dev} {}", hook.name()));
        Ok(())
    }

    fn detach(&mut self, dev: &str, hook: Hook) -> Result<bool, DatapathError> {
        let mut s = Self::check(&self.bpf, "detach")?;
        if dev != s.dev {
            return Err(fake_err(
                format!("list tc {} filters of {dev}", hook.name()),
                &format!("Cannot find device \"{dev}\""),
            ));
        }
        let mut removed = s.attached.remove(&hook).is_some();
        if s.clsact && s.attached.is_empty() {
            s.clsact = false;
            removed = true;
        }
        if removed {
            s.log.push(format!("detach {dev} {}", hook.name()));
        }
        Ok(removed)
    }

    fn configs(&mut self) -> Result<Vec<ScopeConfig>, DatapathError> {
        with_maps!(self, "configs", |p, _log| Ok(p.configs.clone()))
    }

    fn config(&mut self, slot: u32) -> Result<ScopeConfig, DatapathError> {
        let i = Self::slot_check(slot, "config")?;
        with_maps!(self, "config", |p, _log| Ok(p.configs[i]))
    }

    fn set_config(&mut self, slot: u32, config: &ScopeConfig) -> Result<(), DatapathError> {
        let i = Self::slot_check(slot, "set_config")?;
        with_maps!(self, "set_config", |p, log| {
            p.configs[i] = *config;
            log.push(format!("config {slot} = {}", config.describe()));
            Ok(())
        })
    }

    fn destinations(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
        with_maps!(self, "destinations", |p, _log| Ok(p.destinations.clone()))
    }

    fn set_destination(&mut self, net: Ipv4Net, slot: u32) -> Result<(), DatapathError> {
        with_maps!(self, "set_destination", |p, log| {
            p.destinations.insert(net, slot);
            log.push(format!("dst {net} = {slot}"));
            Ok(())
        })
    }

    fn remove_destination(&mut self, net: Ipv4Net) -> Result<(), DatapathError> {
        with_maps!(self, "remove_destination", |p, log| {
            if p.destinations.remove(&net).is_none() {
                return Err(fake_err(
                    format!("remove {net} from map nw_dst"),
                    "No such file or directory (os error 2)",
                ));
            }
            log.push(format!("dst {net} removed"));
            Ok(())
        })
    }

    fn used(&mut self, slot: u32) -> Result<u64, DatapathError> {
        let i = Self::slot_check(slot, "used")?;
        with_maps!(self, "used", |p, _log| Ok(p.used[i]))
    }

    fn set_used(&mut self, slot: u32, used: u64) -> Result<(), DatapathError> {
        let i = Self::slot_check(slot, "set_used")?;
        with_maps!(self, "set_used", |p, log| {
            p.used[i] = used;
            log.push(format!("used {slot} = {used}"));
            Ok(())
        })
    }

    fn stats(&mut self, slot: u32) -> Result<ScopeStats, DatapathError> {
        let i = Self::slot_check(slot, "stats")?;
        with_maps!(self, "stats", |p, _log| Ok(p.stats[i]))
    }

    fn set_stats(&mut self, slot: u32, stats: &ScopeStats) -> Result<(), DatapathError> {
        let i = Self::slot_check(slot, "set_stats")?;
        with_maps!(self, "set_stats", |p, log| {
            p.stats[i] = *stats;
            log.push(format!("stats {slot} = {:?}", stats.to_array()));
            Ok(())
        })
    }

    fn police(&mut self, slot: u32) -> Result<Police, DatapathError> {
        let i = Self::slot_check(slot, "police")?;
        with_maps!(self, "police", |p, _log| Ok(p.police[i]))
    }

    fn set_police(&mut self, slot: u32, police: &Police) -> Result<(), DatapathError> {
        let i = Self::slot_check(slot, "set_police")?;
        with_maps!(self, "set_police", |p, log| {
            p.police[i] = *police;
            log.push(format!("police {slot} = {}", police.describe()));
            Ok(())
        })
    }

    fn ingress_stats(&mut self, slot: u32) -> Result<IngressStats, DatapathError> {
        let i = Self::slot_check(slot, "ingress_stats")?;
        with_maps!(self, "ingress_stats", |p, _log| Ok(p.istats[i]))
    }

    fn set_ingress_stats(&mut self, slot: u32, stats: &IngressStats) -> Result<(), DatapathError> {
        let i = Self::slot_check(slot, "set_ingress_stats")?;
        with_maps!(self, "set_ingress_stats", |p, log| {
            p.istats[i] = *stats;
            log.push(format!("istats {slot} = {:?}", stats.to_array()));
            Ok(())
        })
    }

    fn peer_addrs(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
        with_maps!(self, "peer_addrs", |p, _log| Ok(p.peer_addrs.clone()))
    }

    fn set_peer_addr(&mut self, net: Ipv4Net, index: u32) -> Result<(), DatapathError> {
        with_maps!(self, "set_peer_addr", |p, log| {
            if p.peer_addrs.len() >= super::maps::PEER_ADDRS_MAX && !p.peer_addrs.contains_key(&net)
            {
                return Err(fake_err(
                    format!("write {net} -> peer index {index} into map nw_peer"),
                    "No space left on device (os error 28)",
                ));
            }
            p.peer_addrs.insert(net, index);
            log.push(format!("peer {net} = {index}"));
            Ok(())
        })
    }

    fn remove_peer_addr(&mut self, net: Ipv4Net) -> Result<(), DatapathError> {
        with_maps!(self, "remove_peer_addr", |p, log| {
            if p.peer_addrs.remove(&net).is_none() {
                return Err(fake_err(
                    format!("remove {net} from map nw_peer"),
                    "No such file or directory (os error 2)",
                ));
            }
            log.push(format!("peer {net} removed"));
            Ok(())
        })
    }

    fn peer_nodes(&mut self) -> Result<Vec<String>, DatapathError> {
        with_maps!(self, "peer_nodes", |p, _log| Ok(p.peer_nodes.clone()))
    }

    fn set_peer_node(&mut self, index: u32, node: &str) -> Result<(), DatapathError> {
        let i = Self::peer_check(index, "set_peer_node")?;
        with_maps!(self, "set_peer_node", |p, log| {
            p.peer_nodes[i] = node.to_string();
            log.push(format!("peer node {index} = {node:?}"));
            Ok(())
        })
    }

    fn peer_stats(&mut self, index: u32) -> Result<PeerStats, DatapathError> {
        let i = Self::peer_check(index, "peer_stats")?;
        with_maps!(self, "peer_stats", |p, _log| Ok(p.peer_stats[i]))
    }

    fn set_peer_stats(&mut self, index: u32, stats: &PeerStats) -> Result<(), DatapathError> {
        let i = Self::peer_check(index, "set_peer_stats")?;
        with_maps!(self, "set_peer_stats", |p, log| {
            p.peer_stats[i] = *stats;
            log.push(format!("peer stats {index} = {:?}", stats.to_array()));
            Ok(())
        })
    }

    fn unpin(&mut self, pin_dir: &Path) -> Result<bool, DatapathError> {
        let mut s = Self::check(&self.bpf, "unpin")?;
        self.opened = None;
        let removed = s.pins.remove(pin_dir).is_some();
        if removed {
            s.log.push(format!("unpin {}", pin_dir.display()));
        }
        Ok(removed)
    }
}
