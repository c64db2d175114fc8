//! An in-memory kernel for tests: [`FakeKernel`] interprets the tc commands and nft scripts
//! this crate writes, enforces the kernel rules that matter for ordering (a class with a filter
//! pointing at it cannot be deleted, `filter replace` needs the full u32 handle, a quota cannot
//! start above its limit, an nft script is all-or-nothing, `tc -batch` stops at the first
//! failure), and prints its state in the formats the real tools use.
//!
//! Public so that crates driving a [`Datapath`](crate::Datapath) (the agent) can test against a
//! [`LinuxDatapath`] without a kernel: `FakeKernel::new("fab0").datapath()`.

use crate::ops::{NftOps, TcOps};
use crate::{DatapathError, LinuxDatapath};
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

/// A fake kernel with one network device. Clones share the same state.
#[derive(Clone)]
pub struct FakeKernel {
    state: Arc<Mutex<State>>,
}

struct State {
    dev_name: String,
    dev: Dev,
    table: Option<Table>,
    log: Vec<String>,
    fail_tc_at: Option<usize>,
    fail_nft: bool,
}

#[derive(Clone, Default)]
struct Dev {
    /// `None` = noqueue.
    root: Option<Root>,
    classes: BTreeMap<u16, Class>,
    leaves: BTreeMap<u16, Leaf>,
    prefs: BTreeMap<u16, Pref>,
    next_htid: u32,
    next_auto_handle: u32,
}

#[derive(Clone)]
struct Root {
    default: u32,
    direct_qlen: u64,
}

#[derive(Clone)]
struct Class {
    rate_bytes: u64,
    ceil_bytes: u64,
    burst: u64,
    cburst: u64,
    quantum: u64,
}

#[derive(Clone)]
struct Leaf {
    major: u32,
    limit: u64,
    bytes: u64,
    packets: u64,
    drops: u64,
}

#[derive(Clone)]
struct Pref {
    protocol: String,
    htid: u32,
    nodes: BTreeMap<u32, Filt>,
}

#[derive(Clone)]
struct Filt {
    class_minor: u16,
    value: u32,
    mask: u32,
    off: i64,
}

#[derive(Clone, Default)]
struct Table {
    quotas: BTreeMap<String, (u64, u64)>,
    counters: BTreeMap<String, (u64, u64)>,
    chain: bool,
    rules: Vec<FRule>,
}

#[derive(Clone)]
struct FRule {
    oifname: String,
    daddr: Option<Vec<Ipv4Net>>,
    quota: Option<String>,
    counter: Option<String>,
    verdict: String,
}

impl FakeKernel {
    /// A kernel with one device `dev` (root qdisc noqueue) and no nft table.
    pub fn new(dev: &str) -> Self {
        FakeKernel {
            state: Arc::new(Mutex::new(State {
                dev_name: dev.to_string(),
                dev: Dev {
                    next_htid: 0x800,
                    next_auto_handle: 0x8001,
                    ..Dev::default()
                },
                table: None,
                log: Vec::new(),
                fail_tc_at: None,
                fail_nft: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (a failed assertion in a test) must not hide the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tc_ops(&self) -> Box<dyn TcOps> {
        Box::new(FakeTc(self.clone()))
    }
    pub fn nft_ops(&self) -> Box<dyn NftOps> {
        Box::new(FakeNft(self.clone()))
    }
    /// A [`LinuxDatapath`] on this kernel's device.
    pub fn datapath(&self) -> LinuxDatapath {
        let dev = self.lock().dev_name.clone();
        LinuxDatapath::with_ops(&dev, self.tc_ops(), self.nft_ops())
    }

    /// Every tc command and nft script applied so far (scripts as one entry each), and clears it.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }
    /// The next tc batch fails at its `n`-th command (from 1); the ones before it are applied,
    /// as with a crash or an error in the middle of `tc -batch`.
    pub fn fail_next_tc_batch_at(&self, n: usize) {
        self.lock().fail_tc_at = Some(n);
    }
    /// The next nft script fails (and, being a transaction, changes nothing).
    pub fn fail_next_nft_apply(&self) {
        self.lock().fail_nft = true;
    }

    /// Root qdisc kind ("htb" or "noqueue").
    pub fn root_kind(&self) -> &'static str {
        if self.lock().dev.root.is_some() {
            "htb"
        } else {
            "noqueue"
        }
    }
    /// Rate (bit/s) of class `1:minor`.
    pub fn class_rate(&self, minor: u16) -> Option<u64> {
        self.lock()
            .dev
            .classes
            .get(&minor)
            .map(|c| c.rate_bytes * 8)
    }
    /// Minors of all classes.
    pub fn class_minors(&self) -> Vec<u16> {
        self.lock().dev.classes.keys().copied().collect()
    }
    /// `pfifo limit` of the leaf of class `1:minor`.
    pub fn leaf_limit(&self, minor: u16) -> Option<u64> {
        self.lock().dev.leaves.get(&minor).map(|l| l.limit)
    }
    /// Simulates traffic through the leaf of class `1:minor`.
    pub fn add_leaf_stats(&self, minor: u16, bytes: u64, packets: u64, drops: u64) {
        if let Some(l) = self.lock().dev.leaves.get_mut(&minor) {
            l.bytes += bytes;
            l.packets += packets;
            l.drops += drops;
        }
    }
    /// Statistics (bytes, packets, drops) of the leaf of class `1:minor`.
    pub fn leaf_stats(&self, minor: u16) -> Option<(u64, u64, u64)> {
        self.lock()
            .dev
            .leaves
            .get(&minor)
            .map(|l| (l.bytes, l.packets, l.drops))
    }
    /// Deletes class `1:minor` and its leaf behind the datapath's back (filters stay).
    pub fn delete_class(&self, minor: u16) {
        let mut s = self.lock();
        s.dev.classes.remove(&minor);
        s.dev.leaves.remove(&minor);
    }
    /// Deletes filter node `node` of preference `pref` behind the datapath's back.
    pub fn delete_filter(&self, pref: u16, node: u32) {
        let mut s = self.lock();
        if let Some(p) = s.dev.prefs.get_mut(&pref) {
            p.nodes.remove(&node);
            if p.nodes.is_empty() {
                s.dev.prefs.remove(&pref);
            }
        }
    }
    /// Number of filter nodes per preference.
    pub fn filter_counts(&self) -> Vec<(u16, usize)> {
        self.lock()
            .dev
            .prefs
            .iter()
            .map(|(p, f)| (*p, f.nodes.len()))
            .collect()
    }
    pub fn has_table(&self) -> bool {
        self.lock().table.is_some()
    }
    /// Deletes the nft table behind the datapath's back.
    pub fn delete_table(&self) {
        self.lock().table = None;
    }
    /// (over, used) of quota `name`.
    pub fn quota(&self, name: &str) -> Option<(u64, u64)> {
        self.lock()
            .table
            .as_ref()
            .and_then(|t| t.quotas.get(name).copied())
    }
    /// Simulates `bytes` of traffic hitting quota `name` (the kernel counts dropped packets too).
    pub fn add_quota_used(&self, name: &str, bytes: u64) {
        if let Some(q) = self
            .lock()
            .table
            .as_mut()
            .and_then(|t| t.quotas.get_mut(name))
        {
            q.1 += bytes;
        }
    }
    /// Simulates packets hitting counter `name`.
    pub fn add_counter(&self, name: &str, packets: u64, bytes: u64) {
        if let Some(c) = self
            .lock()
            .table
            .as_mut()
            .and_then(|t| t.counters.get_mut(name))
        {
            c.0 += packets;
            c.1 += bytes;
        }
    }
    /// (packets, bytes) of counter `name`.
    pub fn counter(&self, name: &str) -> Option<(u64, u64)> {
        self.lock()
            .table
            .as_ref()
            .and_then(|t| t.counters.get(name).copied())
    }
    /// Number of rules in chain postrouting.
    pub fn rule_count(&self) -> usize {
        self.lock().table.as_ref().map_or(0, |t| t.rules.len())
    }
}

fn tc_err(op: String, stderr: &str) -> DatapathError {
    DatapathError::Command {
        op,
        command: "tc -batch -".to_string(),
        stderr: stderr.to_string(),
        status: Some(1),
    }
}

struct FakeTc(FakeKernel);

impl FakeTc {
    fn check_dev(s: &State, dev: &str) -> Result<(), DatapathError> {
        if dev == s.dev_name {
            Ok(())
        } else {
            Err(DatapathError::Command {
                op: format!("list tc objects of {dev}"),
                command: format!("tc show dev {dev}"),
                stderr: format!("Cannot find device \"{dev}\""),
                status: Some(1),
            })
        }
    }
}

impl TcOps for FakeTc {
    fn qdiscs_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        let s = self.0.lock();
        Self::check_dev(&s, dev)?;
        let stats = |bytes: u64, packets: u64, drops: u64| json!({"bytes": bytes, "packets": packets, "drops": drops, "overlimits": 0, "requeues": 0, "backlog": 0, "qlen": 0});
        let mut out = Vec::new();
        match &s.dev.root {
            None => out.push(json!({"kind": "noqueue", "handle": "0:", "root": true, "refcnt": 2, "options": {}, "bytes": 0, "packets": 0, "drops": 0})),
            Some(r) => {
                let mut v = json!({"kind": "htb", "handle": "1:", "root": true, "refcnt": 3,
                    "options": {"r2q": 10, "default": format!("{:#x}", r.default), "direct_packets_stat": 0, "direct_qlen": r.direct_qlen}});
                merge_obj(&mut v, stats(0, 0, 0));
                out.push(v);
            }
        }
        for (minor, l) in &s.dev.leaves {
            let mut v = json!({"kind": "pfifo", "handle": format!("{:x}:", l.major), "parent": format!("1:{minor:x}"), "options": {"limit": l.limit}});
            merge_obj(&mut v, stats(l.bytes, l.packets, l.drops));
            out.push(v);
        }
        Ok(Value::Array(out).to_string())
    }

    fn filters_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        let s = self.0.lock();
        Self::check_dev(&s, dev)?;
        let mut out = Vec::new();
        for (pref, p) in &s.dev.prefs {
            let head = json!({"parent": "1:", "protocol": p.protocol, "pref": pref, "kind": "u32", "chain": 0});
            out.push(head.clone());
            let mut ht = head.clone();
            ht["options"] = json!({"fh": format!("{:x}:", p.htid), "ht_divisor": 1});
            out.push(ht);
            for (node, f) in &p.nodes {
                let mut n = head.clone();
                n["options"] = json!({
                    "fh": format!("{:x}::{node:x}", p.htid), "order": node, "key_ht": format!("{:x}", p.htid),
                    "bkt": "0", "flowid": format!("1:{:x}", f.class_minor), "not_in_hw": true,
                    "match": {"value": format!("{:x}", f.value), "mask": format!("{:x}", f.mask), "offmask": "", "off": f.off}
                });
                out.push(n);
            }
        }
        Ok(Value::Array(out).to_string())
    }

    fn classes_text(&mut self, dev: &str) -> Result<String, DatapathError> {
        let s = self.0.lock();
        Self::check_dev(&s, dev)?;
        let mut out = String::new();
        for (minor, c) in &s.dev.classes {
            let leaf = s
                .dev
                .leaves
                .get(minor)
                .map(|l| format!("leaf {:x}: ", l.major))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "class htb 1:{minor:x} root {leaf}prio 0 quantum {} rate {} ceil {} linklayer ethernet burst {}/1 mpu 0b cburst {}/1 mpu 0b level 0 ",
                c.quantum,
                print_rate(c.rate_bytes),
                print_rate(c.ceil_bytes),
                print_size(c.burst),
                print_size(c.cburst)
            );
        }
        Ok(out)
    }

    fn batch(&mut self, cmds: &[String]) -> Result<(), DatapathError> {
        let mut s = self.0.lock();
        let fail_at = s.fail_tc_at.take();
        for (i, cmd) in cmds.iter().enumerate() {
            let n = i + 1;
            let op = format!(
                "apply tc batch (command {n} of {}: `{cmd}`; the ones before it applied)",
                cmds.len()
            );
            if fail_at == Some(n) {
                return Err(tc_err(op, "injected failure"));
            }
            let toks: Vec<&str> = cmd.split_whitespace().collect();
            let dev_name = s.dev_name.clone();
            let mut dev = s.dev.clone();
            exec_tc(&mut dev, &dev_name, &toks).map_err(|e| tc_err(op, &e))?;
            s.dev = dev;
            s.log.push(cmd.clone());
        }
        Ok(())
    }
}

fn merge_obj(v: &mut Value, extra: Value) {
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
}

/// iproute2's `print_rate` (bytes/s in, text in bit/s out).
fn print_rate(rate_bytes: u64) -> String {
    let units = ["", "K", "M", "G", "T"];
    let mut rate = rate_bytes * 8;
    let mut i = 0;
    while i < units.len() - 1 {
        let remainder = rate % 1000;
        if rate < 1000 || (remainder > 0 && rate < 1000 * 1000) {
            break;
        }
        rate /= 1000;
        i += 1;
    }
    format!("{rate}{}bit", units[i])
}

/// iproute2's `sprint_size`.
fn print_size(sz: u64) -> String {
    let f = sz as f64;
    let mib = 1024.0 * 1024.0;
    if sz >= 1 << 20 && (mib * (f / mib).round() - f).abs() < 1024.0 {
        format!("{}Mb", (f / mib).round())
    } else if sz >= 1024 && (1024.0 * (f / 1024.0).round() - f).abs() < 16.0 {
        format!("{}Kb", (f / 1024.0).round())
    } else {
        format!("{sz}b")
    }
}

fn value_after<'a>(toks: &[&'a str], key: &str) -> Option<&'a str> {
    toks.iter()
        .position(|t| *t == key)
        .and_then(|i| toks.get(i + 1).copied())
}

fn need<'a>(toks: &[&'a str], key: &str) -> Result<&'a str, String> {
    value_after(toks, key).ok_or_else(|| format!("\"{key}\" is required."))
}

fn hex(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 16).map_err(|_| format!("bad hex `{s}`"))
}

/// A filter protocol as iproute2 prints it back: the names it knows (`arp`, `ip`, `all`) as
/// they are, a number it has no name for (`0x88b5`) as `[34997]`.
fn shown_protocol(p: &str) -> Result<String, String> {
    match p.strip_prefix("0x") {
        Some(h) => match u16::from_str_radix(h, 16).map_err(|_| format!("bad protocol `{p}`"))? {
            0x0806 => Ok("arp".into()),
            0x0800 => Ok("ip".into()),
            0x0003 => Ok("all".into()),
            n => Ok(format!("[{n}]")),
        },
        None => Ok(p.to_string()),
    }
}

fn minor_of(classid: &str) -> Result<u16, String> {
    match classid.split_once(':') {
        Some(("1", m)) => u16::try_from(hex(m)?).map_err(|_| format!("bad classid {classid}")),
        _ => Err(format!("Invalid class ID {classid}")),
    }
}

fn bits(s: &str) -> Result<u64, String> {
    s.strip_suffix("bit")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format!("bad rate `{s}`"))
}

fn num(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("bad number `{s}`"))
}

fn exec_tc(dev: &mut Dev, dev_name: &str, toks: &[&str]) -> Result<(), String> {
    if value_after(toks, "dev") != Some(dev_name) {
        return Err(format!(
            "Cannot find device \"{}\"",
            value_after(toks, "dev").unwrap_or("")
        ));
    }
    match (toks.first().copied(), toks.get(1).copied()) {
        (Some("qdisc"), Some(verb)) => {
            if toks.contains(&"root") {
                match verb {
                    "del" => {
                        if dev.root.is_none() {
                            return Err("Error: Cannot delete qdisc with handle of zero.".into());
                        }
                        *dev = Dev {
                            next_htid: 0x800,
                            next_auto_handle: 0x8001,
                            ..Dev::default()
                        };
                        Ok(())
                    }
                    "add" | "replace" => {
                        if verb == "add" && dev.root.is_some() {
                            return Err("Error: Exclusivity flag on, cannot modify.".into());
                        }
                        if dev.root.is_some() {
                            return Err(
                                "Error: Change operation not supported by specified qdisc.".into(),
                            );
                        }
                        if need(toks, "handle")? != "1:" || !toks.contains(&"htb") {
                            return Err("fake: only `handle 1: htb` roots are modelled".into());
                        }
                        dev.root = Some(Root {
                            default: hex(need(toks, "default")?)?,
                            direct_qlen: value_after(toks, "direct_qlen").map_or(Ok(1000), num)?,
                        });
                        Ok(())
                    }
                    other => Err(format!("fake: qdisc {other} root not modelled")),
                }
            } else {
                let minor = minor_of(need(toks, "parent")?)?;
                if !dev.classes.contains_key(&minor) {
                    return Err("Error: Failed to find specified qdisc / class.".into());
                }
                let major = hex(need(toks, "handle")?.trim_end_matches(':'))?;
                if !toks.contains(&"pfifo") {
                    return Err("fake: only pfifo leaves are modelled".into());
                }
                let limit = num(need(toks, "limit")?)?;
                match dev.leaves.get_mut(&minor) {
                    Some(l) if l.major == major => {
                        if verb == "add" {
                            return Err("Error: Exclusivity flag on, cannot modify.".into());
                        }
                        l.limit = limit; // change in place: stats kept
                    }
                    _ => {
                        dev.leaves.insert(
                            minor,
                            Leaf {
                                major,
                                limit,
                                bytes: 0,
                                packets: 0,
                                drops: 0,
                            },
                        );
                    }
                }
                Ok(())
            }
        }
        (Some("class"), Some(verb)) => {
            if dev.root.is_none() {
                return Err("Error: Specified qdisc kind is unknown.".into());
            }
            let minor = minor_of(need(toks, "classid")?)?;
            if verb == "del" {
                if !dev.classes.contains_key(&minor) {
                    return Err("Error: Specified class not found.".into());
                }
                if dev
                    .prefs
                    .values()
                    .any(|p| p.nodes.values().any(|f| f.class_minor == minor))
                {
                    return Err("RTNETLINK answers: Device or resource busy".into());
                }
                dev.classes.remove(&minor);
                dev.leaves.remove(&minor);
                return Ok(());
            }
            if need(toks, "parent")? != "1:" {
                return Err("fake: only classes at the root are modelled".into());
            }
            let class = Class {
                rate_bytes: bits(need(toks, "rate")?)? / 8,
                ceil_bytes: bits(need(toks, "ceil")?)? / 8,
                burst: num(need(toks, "burst")?)?,
                cburst: num(need(toks, "cburst")?)?,
                quantum: num(need(toks, "quantum")?)?,
            };
            if class.rate_bytes == 0 {
                return Err("\"rate\" is required.".into());
            }
            match verb {
                "add" => {
                    if dev.classes.contains_key(&minor) {
                        return Err("RTNETLINK answers: File exists".into());
                    }
                    dev.classes.insert(minor, class);
                    // The kernel gives a new class a default pfifo leaf.
                    let major = dev.next_auto_handle;
                    dev.next_auto_handle += 1;
                    dev.leaves.insert(
                        minor,
                        Leaf {
                            major,
                            limit: 1000,
                            bytes: 0,
                            packets: 0,
                            drops: 0,
                        },
                    );
                }
                "change" => match dev.classes.get_mut(&minor) {
                    Some(c) => *c = class,
                    None => return Err("RTNETLINK answers: No such file or directory".into()),
                },
                other => return Err(format!("fake: class {other} not modelled")),
            }
            Ok(())
        }
        (Some("filter"), Some(verb)) => {
            if dev.root.is_none() {
                return Err("Error: Parent Qdisc doesn't exists.".into());
            }
            let pref = u16::try_from(num(need(toks, "pref")?)?).map_err(|e| e.to_string())?;
            if verb == "del" {
                let Some(p) = dev.prefs.get_mut(&pref) else {
                    return Err("Error: Filter with specified priority/protocol not found.".into());
                };
                if let Some(h) = value_after(toks, "handle") {
                    let (ht, node) = h.split_once("::").ok_or("bad handle")?;
                    if hex(ht)? != p.htid || p.nodes.remove(&hex(node)?).is_none() {
                        return Err("Error: Specified filter handle not found.".into());
                    }
                    if p.nodes.is_empty() {
                        dev.prefs.remove(&pref);
                    }
                } else {
                    dev.prefs.remove(&pref);
                }
                return Ok(());
            }
            let protocol = shown_protocol(need(toks, "protocol")?)?;
            let (ht, node) = need(toks, "handle")?.split_once("::").ok_or("bad handle")?;
            let node = hex(node)?;
            let class_minor = minor_of(need(toks, "classid")?)?;
            let (value, mask, off) = match (value_after(toks, "u32"), value_after(toks, "dst")) {
                (_, Some(net)) => {
                    let net: Ipv4Net = net.parse().map_err(|_| format!("bad prefix {net}"))?;
                    (u32::from(net.network()), u32::from(net.netmask()), 16)
                }
                _ => (0, 0, 0),
            };
            if !dev.prefs.contains_key(&pref) {
                dev.prefs.insert(
                    pref,
                    Pref {
                        protocol: protocol.clone(),
                        htid: dev.next_htid,
                        nodes: BTreeMap::new(),
                    },
                );
                dev.next_htid += 1;
            }
            let p = dev.prefs.get_mut(&pref).ok_or("pref vanished")?;
            if p.protocol != protocol {
                return Err("Error: Filter with specified priority/protocol not found.".into());
            }
            let ht = if ht.is_empty() { None } else { Some(hex(ht)?) };
            if ht.is_some_and(|h| h != p.htid) {
                return Err("Error: cls_u32: Handle specified hash table address mismatch.".into());
            }
            let exists = p.nodes.contains_key(&node);
            match verb {
                "add" if exists => return Err("RTNETLINK answers: File exists".into()),
                // Without the hash table id, the kernel looks for a new node id and finds it taken.
                "replace" if exists && ht.is_none() => {
                    return Err("RTNETLINK answers: No space left on device".into())
                }
                "add" | "replace" => {}
                other => return Err(format!("fake: filter {other} not modelled")),
            }
            p.nodes.insert(
                node,
                Filt {
                    class_minor,
                    value,
                    mask,
                    off,
                },
            );
            Ok(())
        }
        _ => Err(format!("fake: `{}` not modelled", toks.join(" "))),
    }
}

struct FakeNft(FakeKernel);

impl NftOps for FakeNft {
    fn list_table_json(&mut self) -> Result<Option<String>, DatapathError> {
        let s = self.0.lock();
        Ok(s.table.as_ref().map(render_table))
    }

    fn apply(&mut self, script: &str) -> Result<(), DatapathError> {
        let mut s = self.0.lock();
        let err = |stderr: String| DatapathError::Command {
            op: "apply nft script to table inet nicwarden".to_string(),
            command: "nft -f -".to_string(),
            stderr,
            status: Some(1),
        };
        if std::mem::take(&mut s.fail_nft) {
            return Err(err("injected failure".to_string()));
        }
        // A transaction: work on a copy, commit at the end.
        let table = run_script(s.table.clone(), script).map_err(err)?;
        s.table = table;
        s.log.push(script.to_string());
        Ok(())
    }
}

fn run_script(mut table: Option<Table>, script: &str) -> Result<Option<Table>, String> {
    let mut in_chain = false;
    for raw in script.lines() {
        let line = raw.trim();
        match line {
            "" | "}" => {
                if line == "}" {
                    in_chain = false;
                }
                continue;
            }
            "add table inet nicwarden" => {
                table.get_or_insert_with(Table::default);
                continue;
            }
            "delete table inet nicwarden" => {
                if table.take().is_none() {
                    return Err("Error: No such file or directory".into());
                }
                continue;
            }
            "table inet nicwarden {" => {
                table.get_or_insert_with(Table::default);
                continue;
            }
            "chain postrouting {" => {
                in_chain = true;
                continue;
            }
            _ => {}
        }
        let t = table
            .as_mut()
            .ok_or_else(|| format!("Error: No such file or directory: {line}"))?;
        let toks: Vec<&str> = line.split_whitespace().collect();
        match toks.first().copied() {
            Some("quota") => {
                let name = toks.get(1).ok_or("quota name")?.to_string();
                let over = num(need(&toks, "over")?)?;
                let used = value_after(&toks, "used").map_or(Ok(0), num)?;
                if used > over {
                    return Err(format!(
                        "Error: Could not process rule: Invalid argument: {line}"
                    ));
                }
                t.quotas.insert(name, (over, used));
            }
            Some("counter") => {
                let name = toks.get(1).ok_or("counter name")?.to_string();
                let packets = value_after(&toks, "packets").map_or(Ok(0), num)?;
                let bytes = value_after(&toks, "bytes").map_or(Ok(0), num)?;
                t.counters.insert(name, (packets, bytes));
            }
            Some("type") if in_chain => {
                if line != "type filter hook postrouting priority 0; policy accept;" {
                    return Err(format!("fake: chain spec `{line}` not modelled"));
                }
                t.chain = true;
            }
            Some("oifname") if in_chain => {
                let rule = parse_rule(line)?;
                if let Some(q) = &rule.quota {
                    if !t.quotas.contains_key(q) {
                        return Err(format!(
                            "Error: Could not process rule: No such file or directory: {line}"
                        ));
                    }
                }
                if let Some(c) = &rule.counter {
                    if !t.counters.contains_key(c) {
                        return Err(format!(
                            "Error: Could not process rule: No such file or directory: {line}"
                        ));
                    }
                }
                t.rules.push(rule);
            }
            _ => return Err(format!("fake: nft line `{line}` not modelled")),
        }
    }
    Ok(table)
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').to_string()
}

fn parse_rule(line: &str) -> Result<FRule, String> {
    let toks: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .collect();
    let mut rule = FRule {
        oifname: String::new(),
        daddr: None,
        quota: None,
        counter: None,
        verdict: String::new(),
    };
    let mut i = 0;
    while i < toks.len() {
        match toks[i] {
            "oifname" => {
                rule.oifname = unquote(toks.get(i + 1).ok_or("oifname")?);
                i += 2;
            }
            "ip" if toks.get(i + 1) == Some(&"daddr") => {
                let mut nets = Vec::new();
                i += 2;
                if toks.get(i) == Some(&"{") {
                    i += 1;
                    while toks.get(i).is_some_and(|t| *t != "}") {
                        nets.push(toks[i].parse::<Ipv4Net>().map_err(|e| e.to_string())?);
                        i += 1;
                    }
                    i += 1;
                } else {
                    nets.push(
                        toks.get(i)
                            .ok_or("daddr")?
                            .parse::<Ipv4Net>()
                            .map_err(|e| e.to_string())?,
                    );
                    i += 1;
                }
                rule.daddr = Some(Ipv4Net::aggregate(&nets));
            }
            "quota" if toks.get(i + 1) == Some(&"name") => {
                rule.quota = Some(unquote(toks.get(i + 2).ok_or("quota name")?));
                i += 3;
            }
            "counter" if toks.get(i + 1) == Some(&"name") => {
                rule.counter = Some(unquote(toks.get(i + 2).ok_or("counter name")?));
                i += 3;
            }
            v @ ("accept" | "drop") => {
                rule.verdict = v.to_string();
                i += 1;
            }
            other => return Err(format!("fake: rule token `{other}` not modelled")),
        }
    }
    Ok(rule)
}

/// Renders like `nft -j list table inet nicwarden` (nft 1.0.6): merged prefixes, a lone element
/// without a set, a /32 as a bare address.
fn render_table(t: &Table) -> String {
    let mut items = vec![
        json!({"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}),
        json!({"table": {"family": "inet", "name": "nicwarden", "handle": 1}}),
    ];
    for (name, (over, used)) in &t.quotas {
        items.push(json!({"quota": {"family": "inet", "name": name, "table": "nicwarden", "handle": 2, "bytes": over, "used": used, "inv": true}}));
    }
    for (name, (packets, bytes)) in &t.counters {
        items.push(json!({"counter": {"family": "inet", "name": name, "table": "nicwarden", "handle": 3, "packets": packets, "bytes": bytes}}));
    }
    if t.chain {
        items.push(json!({"chain": {"family": "inet", "table": "nicwarden", "name": "postrouting", "handle": 1, "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}}));
    }
    for (h, r) in t.rules.iter().enumerate() {
        let mut expr = vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": r.oifname}}),
        ];
        if let Some(nets) = &r.daddr {
            let elem = |n: &Ipv4Net| {
                if n.prefix_len() == 32 {
                    json!(n.addr().to_string())
                } else {
                    json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}})
                }
            };
            let right = match nets.as_slice() {
                [one] => elem(one),
                many => json!({"set": many.iter().map(elem).collect::<Vec<_>>()}),
            };
            expr.push(json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": right}}));
        }
        if let Some(q) = &r.quota {
            expr.push(json!({"quota": q}));
        }
        if let Some(c) = &r.counter {
            expr.push(json!({"counter": c}));
        }
        expr.push(json!({ r.verdict.clone(): null }));
        items.push(json!({"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": h + 10, "expr": expr}}));
    }
    json!({ "nftables": items }).to_string()
}

/// Short constructors for the [`DesiredState`](crate::DesiredState) scopes tests write, shared
/// by this crate's unit tests and its kernel tests.
pub mod fixtures {
    use crate::{PeerCount, ScopeEnforce, ScopeSpec};
    use nicwarden_lease::{LeaseId, Scope};

    /// The egress scope (no destinations: everything the peer scopes do not match).
    pub fn egress(enforce: ScopeEnforce) -> ScopeSpec {
        ScopeSpec {
            scope: Scope::Egress,
            destinations: vec![],
            enforce,
        }
    }

    /// The scope of peer `name` over the prefixes `dst` (e.g. `"198.18.0.2/32"`).
    ///
    /// # Panics
    /// If a prefix in `dst` does not parse: fixtures are literals.
    pub fn peer(name: &str, dst: &[&str], enforce: ScopeEnforce) -> ScopeSpec {
        ScopeSpec {
            scope: Scope::Peer(name.to_string()),
            destinations: dst.iter().map(|d| d.parse().expect("prefix")).collect(),
            enforce,
        }
    }

    /// Lease `id` at `rate` bit/s with the default burst, `volume` bytes (if any) of which
    /// `start_used` are already used.
    pub fn lease(id: u64, rate: u64, volume: Option<u64>, start_used: u64) -> ScopeEnforce {
        ScopeEnforce::Lease {
            lease: LeaseId(id),
            rate_bps: rate,
            burst_bytes: 0,
            volume,
            start_used_bytes: start_used,
        }
    }

    /// A floor at `rate` bit/s; 0 blocks the scope.
    pub fn floor(rate: u64) -> ScopeEnforce {
        ScopeEnforce::Floor { rate_bps: rate }
    }

    /// Counted peer `node` with the addresses `addrs` (e.g. `"198.18.0.2/32"`).
    ///
    /// # Panics
    /// If an address does not parse: fixtures are literals.
    pub fn counted(node: &str, addrs: &[&str]) -> PeerCount {
        PeerCount {
            node: node.to_string(),
            addrs: addrs.iter().map(|a| a.parse().expect("prefix")).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_iproute2() {
        #[track_caller]
        fn check(rate_bytes: u64, expect: &str) {
            assert_eq!(print_rate(rate_bytes), expect);
        }
        check(1, "8bit");
        check(124_999, "999992bit");
        check(6_250_000, "50Mbit");
        check(15_432_098, "123456Kbit");
        check(500_000_000_000, "4Tbit");
        assert_eq!(print_size(65_536), "64Kb");
        assert_eq!(print_size(65_512), "65512b");
        assert_eq!(print_size(2 << 20), "2Mb");
        assert_eq!(print_size(225), "225b");
    }
}
