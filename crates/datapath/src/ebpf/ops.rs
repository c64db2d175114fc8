//! The bpf interface of the eBPF backend: the narrow [`BpfOps`] trait, the real implementation
//! over aya ([`RealBpf`]) and the bpf filesystem plumbing. The in-memory fake is
//! [`super::FakeBpf`].
//!
//! Namespaces: aya speaks netlink, and `RealBpf` runs `tc` to list filters, in the network
//! namespace of the *calling thread*; call it from a thread inside the namespace that holds
//! the fabric interface. bpf objects (maps, programs, pins) are not namespaced by network;
//! pins live on the bpf filesystem of the caller's mount namespace.

use super::maps::{
    peer_name_from_bytes, peer_name_to_bytes, PeerStats, Police, ScopeConfig, ScopeStats, DST_MAX,
    MAP_CONFIG, MAP_DST, MAP_ISTATS, MAP_PEER, MAP_PEER_NODE, MAP_PEER_STATS, MAP_POLICE,
    MAP_STATS, MAP_USED, PEERS, PEER_ADDRS_MAX, PEER_NAME_SIZE, PROGRAM, PROGRAM_INGRESS, SLOTS,
};
use crate::ops::run;
use crate::{DatapathError, IngressStats};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};
use aya::programs::links::Link as _;
use aya::programs::tc::{
    self, NlOptions, SchedClassifier, SchedClassifierLink, TcAttachOptions, TcAttachType, TcError,
};
use aya::programs::ProgramError;
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The compiled program (`bpf/nicwarden.bpf.c`, built by `build.rs`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nicwarden.bpf.o"));

/// Preference of our filter on each clsact hook (first, before anything else).
pub const FILTER_PREF: u16 = 1;
/// Handle of our filter at [`FILTER_PREF`].
pub const FILTER_HANDLE: u32 = 1;
/// Where the bpf filesystem is mounted when it is missing.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `BPF_F_LOCK`: a map read or write of a value with a `bpf_spin_lock` takes the lock.
const BPF_F_LOCK: u64 = 4;

/// A clsact hook and the program nicwarden attaches there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// `nw_egress`: volume, blocked scopes, HTB steering.
    Egress,
    /// `nw_ingress`: policing what arrives.
    Ingress,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::Egress, Hook::Ingress];

    /// "egress" or "ingress", as tc names the hook.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Egress => "egress",
            Hook::Ingress => "ingress",
        }
    }

    /// The program attached at this hook.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Egress => PROGRAM,
            Hook::Ingress => PROGRAM_INGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Egress => TcAttachType::Egress,
            Hook::Ingress => TcAttachType::Ingress,
        }
    }
}

/// What sits at our filter slot of a hook (clsact egress or ingress, pref [`FILTER_PREF`],
/// handle [`FILTER_HANDLE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Nothing (or no clsact qdisc at all).
    None,
    /// Our program, the one pinned under the pin directory.
    Ours,
    /// Something else, described (e.g. an older nicwarden's program).
    Other(String),
}

/// What the eBPF backend needs from the kernel's bpf subsystem. `open` comes first; the map
/// calls fail until it succeeded. Slots and layouts: see [`super::maps`].
pub trait BpfOps: Send {
    /// Loads the programs and their maps, reusing what is pinned under `pin_dir` (maps by
    /// name, each program by a hash of the object) and creating and pinning what is missing
    /// (mounting the bpf filesystem first if needed). When already open, re-pins what was
    /// unpinned behind its back. Returns what it created or re-pinned (empty: everything
    /// reused).
    fn open(&mut self, pin_dir: &Path) -> Result<Vec<String>, DatapathError>;
    /// What is attached at our filter slot on `dev`'s `hook`.
    fn attachment(&mut self, dev: &str, hook: Hook) -> Result<Attachment, DatapathError>;
    /// Attaches the hook's program at our filter slot on `dev`'s `hook` (adding the clsact
    /// qdisc if missing), replacing atomically whatever sits there. The attachment outlives
    /// the process.
    fn attach(&mut self, dev: &str, hook: Hook) -> Result<(), DatapathError>;
    /// Removes the filter at our slot of `hook` (and the clsact qdisc if nothing else uses
    /// it); false if there was nothing to remove.
    fn detach(&mut self, dev: &str, hook: Hook) -> Result<bool, DatapathError>;
    /// `nw_config`, every slot.
    fn configs(&mut self) -> Result<Vec<ScopeConfig>, DatapathError>;
    /// `nw_config` of one slot.
    fn config(&mut self, slot: u32) -> Result<ScopeConfig, DatapathError>;
    fn set_config(&mut self, slot: u32, config: &ScopeConfig) -> Result<(), DatapathError>;
    /// `nw_dst`: prefix → slot.
    fn destinations(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError>;
    fn set_destination(&mut self, net: Ipv4Net, slot: u32) -> Result<(), DatapathError>;
    fn remove_destination(&mut self, net: Ipv4Net) -> Result<(), DatapathError>;
    /// `nw_used` of a slot.
    fn used(&mut self, slot: u32) -> Result<u64, DatapathError>;
    fn set_used(&mut self, slot: u32, used: u64) -> Result<(), DatapathError>;
    /// `nw_stats` of a slot, summed over CPUs.
    fn stats(&mut self, slot: u32) -> Result<ScopeStats, DatapathError>;
    /// Sets a slot's stats: `stats` on one CPU, zero on the others.
    fn set_stats(&mut self, slot: u32, stats: &ScopeStats) -> Result<(), DatapathError>;
    /// `nw_police` of a slot (read under its lock).
    fn police(&mut self, slot: u32) -> Result<Police, DatapathError>;
    /// Writes a slot's policer as given (under its lock).
    fn set_police(&mut self, slot: u32, police: &Police) -> Result<(), DatapathError>;
    /// `nw_istats` of a slot, summed over CPUs.
    fn ingress_stats(&mut self, slot: u32) -> Result<IngressStats, DatapathError>;
    /// Sets a slot's ingress stats: `stats` on one CPU, zero on the others.
    fn set_ingress_stats(&mut self, slot: u32, stats: &IngressStats) -> Result<(), DatapathError>;
    /// `nw_peer`: peer address → peer index.
    fn peer_addrs(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError>;
    fn set_peer_addr(&mut self, net: Ipv4Net, index: u32) -> Result<(), DatapathError>;
    fn remove_peer_addr(&mut self, net: Ipv4Net) -> Result<(), DatapathError>;
    /// `nw_peer_node`, every index ("" = free).
    fn peer_nodes(&mut self) -> Result<Vec<String>, DatapathError>;
    /// Writes an index's node name ("" frees it).
    fn set_peer_node(&mut self, index: u32, node: &str) -> Result<(), DatapathError>;
    /// `nw_peer_stats` of a peer index, summed over CPUs.
    fn peer_stats(&mut self, index: u32) -> Result<PeerStats, DatapathError>;
    /// Sets a peer index's counters: `stats` on one CPU, zero on the others.
    fn set_peer_stats(&mut self, index: u32, stats: &PeerStats) -> Result<(), DatapathError>;
    /// Closes the maps and programs and removes everything pinned under `pin_dir`, and the
    /// directory; false if there was nothing.
    fn unpin(&mut self, pin_dir: &Path) -> Result<bool, DatapathError>;
}

/// The pin file name of a program built into this binary (`program`: [`Hook::program`]): its
/// name and a hash of the object, so that a new agent version loads (and atomically swaps in)
/// its own programs while reusing the pinned maps.
pub fn program_pin_name(program: &str) -> String {
    // FNV-1a, 64 bit: stable across builds and platforms, no dependency.
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{program}_{hash:016x}")
}

fn nl_err(op: String) -> impl FnOnce(io::Error) -> DatapathError {
    move |e| DatapathError::bpf(op, &e)
}

/// One program, open, and where it is pinned.
struct Prog {
    prog: SchedClassifier,
    pin: PathBuf,
}

/// The bpf maps and programs, open.
struct Opened {
    pin_dir: PathBuf,
    dst: Map,
    config: Map,
    stats: Map,
    used: Map,
    police: Map,
    istats: Map,
    peer: Map,
    peer_stats: Map,
    peer_node: Map,
    egress: Prog,
    ingress: Prog,
}

/// [`BpfOps`] over aya and the running kernel.
#[derive(Default)]
pub struct RealBpf {
    opened: Option<Opened>,
}

impl RealBpf {
    pub fn new() -> Self {
        RealBpf { opened: None }
    }

    fn opened(&mut self, op: &str) -> Result<&mut Opened, DatapathError> {
        self.opened.as_mut().ok_or_else(|| DatapathError::Bpf {
            op: op.to_string(),
            detail: "the eBPF maps are not open (open must succeed first)".to_string(),
        })
    }
}

/// The expected shape of each pinned map: (name, type, key size, value size, entries).
const MAP_SHAPES: [(&str, MapType, u32, u32, u32); 9] = [
    (MAP_DST, MapType::LpmTrie, 8, 4, DST_MAX as u32),
    (
        MAP_CONFIG,
        MapType::Array,
        4,
        ScopeConfig::SIZE as u32,
        SLOTS,
    ),
    (MAP_STATS, MapType::PerCpuArray, 4, 32, SLOTS),
    (MAP_USED, MapType::Array, 4, 8, SLOTS),
    (MAP_POLICE, MapType::Array, 4, Police::SIZE as u32, SLOTS),
    (MAP_ISTATS, MapType::PerCpuArray, 4, 32, SLOTS),
    (MAP_PEER, MapType::LpmTrie, 8, 4, PEER_ADDRS_MAX as u32),
    (MAP_PEER_STATS, MapType::PerCpuArray, 4, 48, PEERS),
    (
        MAP_PEER_NODE,
        MapType::Array,
        4,
        PEER_NAME_SIZE as u32,
        PEERS,
    ),
];

fn check_shape(path: &Path, shape: &(&str, MapType, u32, u32, u32)) -> Result<u32, DatapathError> {
    let (name, ty, key, value, entries) = *shape;
    let op = || format!("check pinned map {name} at {}", path.display());
    let info = MapInfo::from_pin(path).map_err(|e| DatapathError::bpf(op(), &e))?;
    let got_ty = info.map_type().map_err(|e| DatapathError::bpf(op(), &e))?;
    let got = (
        got_ty,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    );
    if got != (ty, key, value, entries) {
        return Err(DatapathError::Bpf {
            op: op(),
            detail: format!(
                "it is a {:?} map with {} B keys, {} B values and {} entries; this agent needs {ty:?} with {key} B keys, {value} B values and {entries} entries (made by another nicwarden version? `nicwarden agent --cleanup` removes it, counters restart)",
                got.0, got.1, got.2, got.3
            ),
        });
    }
    Ok(info.id())
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map, DatapathError> {
    ebpf.take_map(name).ok_or_else(|| DatapathError::Bpf {
        op: format!("open map {name}"),
        detail: "not in the compiled eBPF object".to_string(),
    })
}

fn map_op<T>(
    op: impl FnOnce() -> String,
    r: Result<T, aya::maps::MapError>,
) -> Result<T, DatapathError> {
    r.map_err(|e| DatapathError::bpf(op(), &e))
}

fn is_exists(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(TcError::NetlinkError { io_error })
        if io_error.kind() == io::ErrorKind::AlreadyExists)
}

fn lpm_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

impl Opened {
    fn load(pin_dir: &Path, created: &mut Vec<String>) -> Result<Opened, DatapathError> {
        let dir = pin_dir.display();
        let existed: Vec<bool> = MAP_SHAPES
            .iter()
            .map(|(name, ..)| pin_dir.join(name).exists())
            .collect();
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(pin_dir)
            .load(OBJECT)
            .map_err(|e| {
                DatapathError::bpf(
                    format!("load the eBPF object with maps pinned under {dir}"),
                    &e,
                )
            })?;
        let mut map_ids = Vec::new();
        for (shape, existed) in MAP_SHAPES.iter().zip(existed) {
            let path = pin_dir.join(shape.0);
            map_ids.push(check_shape(&path, shape)?);
            if !existed {
                created.push(format!(
                    "map {} created, pinned at {}",
                    shape.0,
                    path.display()
                ));
            }
        }
        map_ids.sort_unstable();
        let dst = take_map(&mut ebpf, MAP_DST)?;
        let config = take_map(&mut ebpf, MAP_CONFIG)?;
        let stats = take_map(&mut ebpf, MAP_STATS)?;
        let used = take_map(&mut ebpf, MAP_USED)?;
        let police = take_map(&mut ebpf, MAP_POLICE)?;
        let istats = take_map(&mut ebpf, MAP_ISTATS)?;
        let peer = take_map(&mut ebpf, MAP_PEER)?;
        let peer_stats = take_map(&mut ebpf, MAP_PEER_STATS)?;
        let peer_node = take_map(&mut ebpf, MAP_PEER_NODE)?;
        let egress = Prog::load(&mut ebpf, pin_dir, Hook::Egress, &map_ids, created)?;
        let ingress = Prog::load(&mut ebpf, pin_dir, Hook::Ingress, &map_ids, created)?;
        // `ebpf` (and its unpinned copies of the programs) is dropped here; the pins keep the
        // kernel objects.

        // Programs of other builds: the filters keep the attached ones alive until ours
        // replace them; their pins only hold memory.
        let entries = std::fs::read_dir(pin_dir).map_err(|e| {
            DatapathError::bpf(format!("list pin directory {}", pin_dir.display()), &e)
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let old = Hook::ALL.iter().any(|h| {
                name.starts_with(&format!("{}_", h.program()))
                    && name != program_pin_name(h.program())
            });
            if old {
                std::fs::remove_file(entry.path()).map_err(|e| {
                    DatapathError::bpf(format!("unpin old program {}", entry.path().display()), &e)
                })?;
                created.push(format!("old program {name} unpinned"));
            }
        }

        Ok(Opened {
            pin_dir: pin_dir.to_path_buf(),
            dst,
            config,
            stats,
            used,
            police,
            istats,
            peer,
            peer_stats,
            peer_node,
            egress,
            ingress,
        })
    }

    /// Pins again what was unpinned while open.
    fn repin(&mut self, created: &mut Vec<String>) -> Result<(), DatapathError> {
        if !self.pin_dir.exists() {
            std::fs::create_dir_all(&self.pin_dir).map_err(|e| {
                DatapathError::bpf(
                    format!("create pin directory {}", self.pin_dir.display()),
                    &e,
                )
            })?;
        }
        for (name, map) in [
            (MAP_DST, &self.dst),
            (MAP_CONFIG, &self.config),
            (MAP_STATS, &self.stats),
            (MAP_USED, &self.used),
            (MAP_POLICE, &self.police),
            (MAP_ISTATS, &self.istats),
            (MAP_PEER, &self.peer),
            (MAP_PEER_STATS, &self.peer_stats),
            (MAP_PEER_NODE, &self.peer_node),
        ] {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                map.pin(&path).map_err(|e| {
                    DatapathError::bpf(format!("re-pin map {name} at {}", path.display()), &e)
                })?;
                created.push(format!("map {name} re-pinned at {}", path.display()));
            }
        }
        for p in [&mut self.egress, &mut self.ingress] {
            if !p.pin.exists() {
                p.prog.pin(&p.pin).map_err(|e| {
                    DatapathError::bpf(format!("re-pin program at {}", p.pin.display()), &e)
                })?;
                created.push(format!("program re-pinned at {}", p.pin.display()));
            }
        }
        Ok(())
    }

    fn prog(&mut self, hook: Hook) -> &mut Prog {
        match hook {
            Hook::Egress => &mut self.egress,
            Hook::Ingress => &mut self.ingress,
        }
    }
}

impl Prog {
    /// The hook's program: the pinned one if it is this build's and uses only these maps
    /// (`map_ids`, sorted), else loaded from the object and pinned.
    fn load(
        ebpf: &mut Ebpf,
        pin_dir: &Path,
        hook: Hook,
        map_ids: &[u32],
        created: &mut Vec<String>,
    ) -> Result<Prog, DatapathError> {
        let name = hook.program();
        let pin = pin_dir.join(program_pin_name(name));
        let pinned = if pin.exists() {
            let op = || format!("open pinned program {}", pin.display());
            let prog = SchedClassifier::from_pin(&pin).map_err(|e| DatapathError::bpf(op(), &e))?;
            let info = prog.info().map_err(|e| DatapathError::bpf(op(), &e))?;
            let ids = info
                .map_ids()
                .map_err(|e| DatapathError::bpf(op(), &e))?
                .unwrap_or_default();
            if ids.iter().all(|id| map_ids.binary_search(id).is_ok()) {
                Some(prog)
            } else {
                // Pinned maps re-created behind its back: this program counts into maps
                // nobody can read. Replace it.
                std::fs::remove_file(&pin).map_err(|e| {
                    DatapathError::bpf(format!("unpin stale program {}", pin.display()), &e)
                })?;
                created.push(format!(
                    "program at {} used other maps ({ids:?}, not among {map_ids:?}): replaced",
                    pin.display()
                ));
                None
            }
        } else {
            None
        };
        let prog = match pinned {
            Some(p) => p,
            None => {
                let op = || format!("load tc program {name}");
                let p: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or_else(|| DatapathError::Bpf {
                        op: op(),
                        detail: "not in the compiled eBPF object".to_string(),
                    })?
                    .try_into()
                    .map_err(|e: ProgramError| DatapathError::bpf(op(), &e))?;
                p.load().map_err(|e| DatapathError::bpf(op(), &e))?;
                p.pin(&pin).map_err(|e| {
                    DatapathError::bpf(format!("pin program {name} at {}", pin.display()), &e)
                })?;
                created.push(format!(
                    "program {name} loaded, pinned at {}",
                    pin.display()
                ));
                SchedClassifier::from_pin(&pin).map_err(|e| {
                    DatapathError::bpf(format!("open pinned program {}", pin.display()), &e)
                })?
            }
        };
        Ok(Prog { prog, pin })
    }

    fn id(&self, hook: Hook) -> Result<u32, DatapathError> {
        self.prog.info().map(|i| i.id()).map_err(|e| {
            DatapathError::bpf(format!("read the id of program {}", hook.program()), &e)
        })
    }
}

impl BpfOps for RealBpf {
    fn open(&mut self, pin_dir: &Path) -> Result<Vec<String>, DatapathError> {
        let mut created = Vec::new();
        if let Some(o) = self.opened.as_mut().filter(|o| o.pin_dir == pin_dir) {
            o.repin(&mut created)?;
            return Ok(created);
        }
        self.opened = None;
        if let Some(note) = ensure_bpffs(pin_dir)? {
            created.push(note);
        }
        self.opened = Some(Opened::load(pin_dir, &mut created)?);
        Ok(created)
    }

    fn attachment(&mut self, dev: &str, hook: Hook) -> Result<Attachment, DatapathError> {
        let ours = self
            .opened(&format!("query the tc {} program", hook.name()))?
            .prog(hook)
            .id(hook)?;
        let filters = list_filters(dev, hook.name())?;
        Ok(
            match filters
                .iter()
                .find(|f| f.pref == FILTER_PREF && f.handle == Some(FILTER_HANDLE))
            {
                None => Attachment::None,
                Some(f) if f.kind == "bpf" && f.prog_id == Some(ours) => Attachment::Ours,
                Some(f) => Attachment::Other(f.describe()),
            },
        )
    }

    fn attach(&mut self, dev: &str, hook: Hook) -> Result<(), DatapathError> {
        let op = format!(
            "attach tc {} program {} on {dev}",
            hook.name(),
            hook.program()
        );
        let prog = &mut self.opened(&op)?.prog(hook).prog;
        match tc::qdisc_add_clsact(dev) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(DatapathError::bpf(format!("add clsact qdisc on {dev}"), &e)),
        }
        let options = TcAttachOptions::Netlink(NlOptions {
            priority: FILTER_PREF,
            handle: FILTER_HANDLE,
        });
        let id = match prog.attach_with_options(dev, hook.attach_type(), options) {
            Ok(id) => id,
            Err(e) if is_exists(&e) => {
                // Something sits at our slot: replace it in place (one atomic filter change).
                let link = SchedClassifierLink::attached(
                    dev,
                    hook.attach_type(),
                    FILTER_PREF,
                    FILTER_HANDLE,
                )
                .map_err(nl_err(op.clone()))?;
                prog.attach_to_link(link)
                    .map_err(|e| DatapathError::bpf(op.clone(), &e))?
            }
            Err(e) => return Err(DatapathError::bpf(op, &e)),
        };
        let link = prog
            .take_link(id)
            .map_err(|e| DatapathError::bpf(op.clone(), &e))?;
        // The filter must outlive this process (the kernel keeps enforcing when the agent is
        // gone), and the link's Drop would detach it. A netlink tc link owns no file
        // descriptor (the filter is named by interface, hook, preference and handle), so
        // forgetting it leaks nothing.
        std::mem::forget(link);
        Ok(())
    }

    fn detach(&mut self, dev: &str, hook: Hook) -> Result<bool, DatapathError> {
        let op = format!("detach tc {} program on {dev}", hook.name());
        let mut removed = false;
        let filters = list_filters(dev, hook.name())?;
        if filters
            .iter()
            .any(|f| f.pref == FILTER_PREF && f.handle == Some(FILTER_HANDLE))
        {
            SchedClassifierLink::attached(dev, hook.attach_type(), FILTER_PREF, FILTER_HANDLE)
                .map_err(nl_err(op.clone()))?
                .detach()
                .map_err(|e| DatapathError::bpf(op.clone(), &e))?;
            removed = true;
        }
        // The clsact qdisc goes when nothing else hangs on it.
        if has_clsact(dev)?
            && list_filters(dev, "egress")?.is_empty()
            && list_filters(dev, "ingress")?.is_empty()
        {
            let mut c = Command::new("tc");
            c.args(["qdisc", "del", "dev", dev, "clsact"]);
            run(&format!("delete clsact qdisc of {dev}"), c, None)?;
            removed = true;
        }
        Ok(removed)
    }

    fn configs(&mut self) -> Result<Vec<ScopeConfig>, DatapathError> {
        let o = self.opened("read map nw_config")?;
        let op = || format!("read map {MAP_CONFIG}");
        let array: Array<&MapData, [u8; ScopeConfig::SIZE]> =
            map_op(op, Array::try_from(&o.config))?;
        array
            .iter()
            .map(|v| map_op(op, v).map(|b| ScopeConfig::from_bytes(&b)))
            .collect()
    }

    fn config(&mut self, slot: u32) -> Result<ScopeConfig, DatapathError> {
        let o = self.opened("read map nw_config")?;
        let op = || format!("read slot {slot} of map {MAP_CONFIG}");
        let array: Array<&MapData, [u8; ScopeConfig::SIZE]> =
            map_op(op, Array::try_from(&o.config))?;
        map_op(op, array.get(&slot, 0)).map(|b| ScopeConfig::from_bytes(&b))
    }

    fn set_config(&mut self, slot: u32, config: &ScopeConfig) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_config")?;
        let op = || format!("write slot {slot} of map {MAP_CONFIG}");
        let mut array: Array<&mut MapData, [u8; ScopeConfig::SIZE]> =
            map_op(op, Array::try_from(&mut o.config))?;
        map_op(op, array.set(slot, config.to_bytes(), 0))
    }

    fn destinations(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
        let o = self.opened("read map nw_dst")?;
        read_trie(&o.dst, MAP_DST)
    }

    fn set_destination(&mut self, net: Ipv4Net, slot: u32) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_dst")?;
        let op = || format!("write {net} -> slot {slot} into map {MAP_DST}");
        let mut trie: LpmTrie<&mut MapData, u32, u32> = map_op(op, LpmTrie::try_from(&mut o.dst))?;
        map_op(op, trie.insert(&lpm_key(&net), slot, 0))
    }

    fn remove_destination(&mut self, net: Ipv4Net) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_dst")?;
        let op = || format!("remove {net} from map {MAP_DST}");
        let mut trie: LpmTrie<&mut MapData, u32, u32> = map_op(op, LpmTrie::try_from(&mut o.dst))?;
        map_op(op, trie.remove(&lpm_key(&net)))
    }

    fn used(&mut self, slot: u32) -> Result<u64, DatapathError> {
        let o = self.opened("read map nw_used")?;
        let op = || format!("read slot {slot} of map {MAP_USED}");
        let array: Array<&MapData, u64> = map_op(op, Array::try_from(&o.used))?;
        map_op(op, array.get(&slot, 0))
    }

    fn set_used(&mut self, slot: u32, used: u64) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_used")?;
        let op = || format!("write slot {slot} of map {MAP_USED}");
        let mut array: Array<&mut MapData, u64> = map_op(op, Array::try_from(&mut o.used))?;
        map_op(op, array.set(slot, used, 0))
    }

    fn stats(&mut self, slot: u32) -> Result<ScopeStats, DatapathError> {
        let o = self.opened("read map nw_stats")?;
        let op = || format!("read slot {slot} of map {MAP_STATS}");
        let array: PerCpuArray<&MapData, [u64; 4]> = map_op(op, PerCpuArray::try_from(&o.stats))?;
        let per_cpu = map_op(op, array.get(&slot, 0))?;
        let mut sum = ScopeStats::default();
        for v in per_cpu.iter() {
            sum.add(&ScopeStats::from_array(*v));
        }
        Ok(sum)
    }

    fn set_stats(&mut self, slot: u32, stats: &ScopeStats) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_stats")?;
        let op = || format!("write slot {slot} of map {MAP_STATS}");
        let mut array: PerCpuArray<&mut MapData, [u64; 4]> =
            map_op(op, PerCpuArray::try_from(&mut o.stats))?;
        let values = one_cpu(op, stats.to_array())?;
        map_op(op, array.set(slot, values, 0))
    }

    fn police(&mut self, slot: u32) -> Result<Police, DatapathError> {
        let o = self.opened("read map nw_police")?;
        let op = || format!("read slot {slot} of map {MAP_POLICE}");
        let array: Array<&MapData, [u8; Police::SIZE]> = map_op(op, Array::try_from(&o.police))?;
        map_op(op, array.get(&slot, BPF_F_LOCK)).map(|b| Police::from_bytes(&b))
    }

    fn set_police(&mut self, slot: u32, police: &Police) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_police")?;
        let op = || format!("write slot {slot} of map {MAP_POLICE}");
        let mut array: Array<&mut MapData, [u8; Police::SIZE]> =
            map_op(op, Array::try_from(&mut o.police))?;
        map_op(op, array.set(slot, police.to_bytes(), BPF_F_LOCK))
    }

    fn ingress_stats(&mut self, slot: u32) -> Result<IngressStats, DatapathError> {
        let o = self.opened("read map nw_istats")?;
        let op = || format!("read slot {slot} of map {MAP_ISTATS}");
        let array: PerCpuArray<&MapData, [u64; 4]> = map_op(op, PerCpuArray::try_from(&o.istats))?;
        let per_cpu = map_op(op, array.get(&slot, 0))?;
        let mut sum = IngressStats::default();
        for v in per_cpu.iter() {
            sum.add(&IngressStats::from_array(*v));
        }
        Ok(sum)
    }

    fn set_ingress_stats(&mut self, slot: u32, stats: &IngressStats) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_istats")?;
        let op = || format!("write slot {slot} of map {MAP_ISTATS}");
        let mut array: PerCpuArray<&mut MapData, [u64; 4]> =
            map_op(op, PerCpuArray::try_from(&mut o.istats))?;
        let values = one_cpu(op, stats.to_array())?;
        map_op(op, array.set(slot, values, 0))
    }

    fn peer_addrs(&mut self) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
        let o = self.opened("read map nw_peer")?;
        read_trie(&o.peer, MAP_PEER)
    }

    fn set_peer_addr(&mut self, net: Ipv4Net, index: u32) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_peer")?;
        let op = || format!("write {net} -> peer index {index} into map {MAP_PEER}");
        let mut trie: LpmTrie<&mut MapData, u32, u32> = map_op(op, LpmTrie::try_from(&mut o.peer))?;
        map_op(op, trie.insert(&lpm_key(&net), index, 0))
    }

    fn remove_peer_addr(&mut self, net: Ipv4Net) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_peer")?;
        let op = || format!("remove {net} from map {MAP_PEER}");
        let mut trie: LpmTrie<&mut MapData, u32, u32> = map_op(op, LpmTrie::try_from(&mut o.peer))?;
        map_op(op, trie.remove(&lpm_key(&net)))
    }

    fn peer_nodes(&mut self) -> Result<Vec<String>, DatapathError> {
        let o = self.opened("read map nw_peer_node")?;
        let op = || format!("read map {MAP_PEER_NODE}");
        let array: Array<&MapData, [u8; PEER_NAME_SIZE]> =
            map_op(op, Array::try_from(&o.peer_node))?;
        array
            .iter()
            .map(|v| map_op(op, v).map(|b| peer_name_from_bytes(&b)))
            .collect()
    }

    fn set_peer_node(&mut self, index: u32, node: &str) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_peer_node")?;
        let op = || format!("write index {index} of map {MAP_PEER_NODE}");
        let mut array: Array<&mut MapData, [u8; PEER_NAME_SIZE]> =
            map_op(op, Array::try_from(&mut o.peer_node))?;
        map_op(op, array.set(index, peer_name_to_bytes(node), 0))
    }

    fn peer_stats(&mut self, index: u32) -> Result<PeerStats, DatapathError> {
        let o = self.opened("read map nw_peer_stats")?;
        let op = || format!("read index {index} of map {MAP_PEER_STATS}");
        let array: PerCpuArray<&MapData, [u64; 6]> =
            map_op(op, PerCpuArray::try_from(&o.peer_stats))?;
        let per_cpu = map_op(op, array.get(&index, 0))?;
        let mut sum = PeerStats::default();
        for v in per_cpu.iter() {
            sum.add(&PeerStats::from_array(*v));
        }
        Ok(sum)
    }

    fn set_peer_stats(&mut self, index: u32, stats: &PeerStats) -> Result<(), DatapathError> {
        let o = self.opened("write map nw_peer_stats")?;
        let op = || format!("write index {index} of map {MAP_PEER_STATS}");
        let mut array: PerCpuArray<&mut MapData, [u64; 6]> =
            map_op(op, PerCpuArray::try_from(&mut o.peer_stats))?;
        let values = one_cpu(op, stats.to_array())?;
        map_op(op, array.set(index, values, 0))
    }

    fn unpin(&mut self, pin_dir: &Path) -> Result<bool, DatapathError> {
        // Close our handles first; the kernel frees each object with its last reference.
        self.opened = None;
        if !pin_dir.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(pin_dir).map_err(|e| {
            DatapathError::bpf(format!("remove pin directory {}", pin_dir.display()), &e)
        })?;
        Ok(true)
    }
}

/// An LPM trie of `{u32 prefixlen; u32 addr}` → `u32`, read whole.
fn read_trie(map: &Map, name: &str) -> Result<BTreeMap<Ipv4Net, u32>, DatapathError> {
    let op = || format!("read map {name}");
    let trie: LpmTrie<&MapData, u32, u32> = map_op(op, LpmTrie::try_from(map))?;
    let mut out = BTreeMap::new();
    for entry in trie.iter() {
        let (key, value) = map_op(op, entry)?;
        let addr = Ipv4Addr::from(key.data().to_ne_bytes());
        let len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
        let net = Ipv4Net::new(addr, len).map_err(|e| DatapathError::Bpf {
            op: op(),
            detail: format!("key {addr}/{}: {e}", key.prefix_len()),
        })?;
        out.insert(net, value);
    }
    Ok(out)
}

/// Per-CPU values: `first` on the first CPU, zero on the others.
fn one_cpu<const N: usize>(
    op: impl Fn() -> String,
    first: [u64; N],
) -> Result<PerCpuValues<[u64; N]>, DatapathError> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| DatapathError::Bpf {
        op: op(),
        detail: format!("count CPUs ({what}): {e}"),
    })?;
    let mut values = vec![[0u64; N]; cpus];
    if let Some(v) = values.first_mut() {
        *v = first;
    }
    PerCpuValues::try_from(values).map_err(|e| DatapathError::bpf(op(), &e))
}

/// One filter on a clsact hook, from `tc -j filter show dev DEV egress|ingress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HookFilter {
    pub pref: u16,
    pub handle: Option<u32>,
    pub kind: String,
    pub prog_id: Option<u32>,
    pub prog_name: Option<String>,
}

impl HookFilter {
    fn describe(&self) -> String {
        let handle = self.handle.map_or("?".to_string(), |h| format!("{h:#x}"));
        match (&self.prog_id, &self.prog_name) {
            (Some(id), name) => format!(
                "{} filter pref {} handle {handle} running program {id} ({})",
                self.kind,
                self.pref,
                name.as_deref().unwrap_or("unnamed")
            ),
            (None, _) => format!("{} filter pref {} handle {handle}", self.kind, self.pref),
        }
    }
}

/// Parses `tc -j filter show dev DEV egress` (filter nodes only, not the per-pref headers).
pub(crate) fn parse_hook_filters(json: &str) -> Result<Vec<HookFilter>, DatapathError> {
    let what = "tc clsact filter JSON";
    let all: Vec<Value> =
        serde_json::from_str(json).map_err(|e| DatapathError::parse(what, e.to_string()))?;
    let mut out = Vec::new();
    for f in &all {
        let Some(options) = f.get("options") else {
            continue; // the header line of a preference
        };
        let pref = f
            .get("pref")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| DatapathError::parse(what, format!("filter without pref: {f}")))?;
        let handle = options
            .get("handle")
            .and_then(Value::as_str)
            .and_then(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).ok());
        let prog = options.get("prog");
        out.push(HookFilter {
            pref,
            handle,
            kind: f
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            prog_id: prog
                .and_then(|p| p.get("id"))
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok()),
            prog_name: prog
                .and_then(|p| p.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string),
        });
    }
    Ok(out)
}

/// The filters on one clsact hook of `dev`, in the calling thread's network namespace.
fn list_filters(dev: &str, hook: &str) -> Result<Vec<HookFilter>, DatapathError> {
    let mut c = Command::new("tc");
    c.args(["-j", "filter", "show", "dev", dev, hook]);
    let ran = run(&format!("list tc {hook} filters of {dev}"), c, None)?;
    if ran.stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_hook_filters(&ran.stdout)
}

fn has_clsact(dev: &str) -> Result<bool, DatapathError> {
    let mut c = Command::new("tc");
    c.args(["-j", "qdisc", "show", "dev", dev]);
    let ran = run(&format!("list tc qdiscs of {dev}"), c, None)?;
    let all: Vec<Value> = serde_json::from_str(&ran.stdout)
        .map_err(|e| DatapathError::parse("tc qdisc JSON", e.to_string()))?;
    Ok(all
        .iter()
        .any(|q| q.get("kind").and_then(Value::as_str) == Some("clsact")))
}

fn is_bpffs(path: &Path) -> Result<bool, DatapathError> {
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| DatapathError::bpf(format!("statfs {}", path.display()), &e))?;
    Ok(fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting one on [`BPFFS_ROOT`] when the
/// directory is under it and nothing is mounted there. Returns a note when it mounted.
pub(crate) fn ensure_bpffs(pin_dir: &Path) -> Result<Option<String>, DatapathError> {
    // Threads of one process (tests, several datapaths) must not stack two mounts.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(BPFFS_ROOT);
    let mut note = None;
    if pin_dir.starts_with(root) && !is_bpffs(root)? {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Bpf {
            op: format!("mount the bpf filesystem on {BPFFS_ROOT} (mount -t bpf bpf {BPFFS_ROOT})"),
            detail: format!(
                "{e}; the eBPF datapath pins its maps there and needs it mounted (as root, with CAP_SYS_ADMIN)"
            ),
        })?;
        tracing::info!(
            path = BPFFS_ROOT,
            "mounted the bpf filesystem (in this process's mount namespace: pins survive the agent only if that namespace does)"
        );
        note = Some(format!("bpf filesystem mounted on {BPFFS_ROOT}"));
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| {
        DatapathError::bpf(format!("create pin directory {}", pin_dir.display()), &e)
    })?;
    if !is_bpffs(pin_dir)? {
        return Err(DatapathError::Bpf {
            op: format!("use pin directory {}", pin_dir.display()),
            detail: "it is not on a bpf filesystem (mount one: mount -t bpf bpf MOUNTPOINT)"
                .to_string(),
        });
    }
    Ok(note)
}

/// Checks that this host can run the eBPF backend: root, kernel BTF, a bpf filesystem on
/// [`BPFFS_ROOT`] or the means to mount one, and `tc` (HTB shaping stays with tc).
pub fn check_available() -> Result<(), DatapathError> {
    let unavailable = |s: String| Err(DatapathError::Unavailable(s));
    match crate::ops::effective_uid() {
        Some(0) => {}
        Some(uid) => {
            return unavailable(format!(
                "the eBPF datapath loads bpf programs, attaches them with netlink and mounts the bpf filesystem, and needs root; running as uid {uid}"
            ))
        }
        None => {
            return unavailable(
                "cannot read the effective uid from /proc/self/status".to_string(),
            )
        }
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return unavailable(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux missing); the eBPF datapath needs a kernel built with CONFIG_DEBUG_INFO_BTF=y".to_string(),
        );
    }
    let root = Path::new(BPFFS_ROOT);
    if !root.is_dir() {
        return unavailable(format!(
            "{BPFFS_ROOT} does not exist (is sysfs mounted on /sys?); the eBPF datapath pins its maps on a bpf filesystem there"
        ));
    }
    if !is_bpffs(root)? {
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some("bpf"))
        {
            return unavailable(format!(
                "no bpf filesystem on {BPFFS_ROOT} and the kernel does not offer one (`bpf` missing from /proc/filesystems)"
            ));
        }
    }
    let mut c = Command::new("tc");
    c.arg("-V");
    run("probe tc", c, None).map_err(|e| {
        DatapathError::Unavailable(format!(
            "`tc` is not usable ({e}); install iproute2 (apt-get install iproute2)"
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clsact_filters() {
        // Captured on this project's test machine (iproute2 6.1, kernel 6.18).
        let json = r#"[{"protocol":"all","pref":1,"kind":"bpf","chain":0},{"protocol":"all","pref":1,"kind":"bpf","chain":0,"options":{"handle":"0x1","bpf_name":"nw_egress","direct-action":true,"not_in_hw":true,"prog":{"id":100,"name":"nw_egress","tag":"647eab3f01f401d1","jited":1}}}]"#;
        let got = parse_hook_filters(json).expect("parse");
        assert_eq!(
            got,
            [HookFilter {
                pref: 1,
                handle: Some(1),
                kind: "bpf".into(),
                prog_id: Some(100),
                prog_name: Some("nw_egress".into()),
            }]
        );
        assert_eq!(
            got[0].describe(),
            "bpf filter pref 1 handle 0x1 running program 100 (nw_egress)"
        );
        assert_eq!(parse_hook_filters("[]").expect("parse"), []);
        assert!(parse_hook_filters("nope").is_err());
    }

    #[test]
    fn program_pin_name_is_stable() {
        for hook in Hook::ALL {
            let name = program_pin_name(hook.program());
            assert_eq!(name, program_pin_name(hook.program()));
            let prefix = format!("{}_", hook.program());
            assert!(name.starts_with(&prefix) && name.len() == prefix.len() + 16);
        }
        assert_ne!(program_pin_name(PROGRAM), program_pin_name(PROGRAM_INGRESS));
    }

    #[test]
    fn lpm_keys_are_in_network_order() {
        let key = lpm_key(&"198.18.0.0/15".parse().expect("net"));
        assert_eq!(key.prefix_len(), 15);
        assert_eq!(key.data().to_ne_bytes(), [198, 18, 0, 0]);
    }
}
