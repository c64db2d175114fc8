//! The tc half: what the kernel shows (parsed from `tc -j -s qdisc show`, `tc -j filter show`
//! and `tc -d class show`), and the commands that bring it to a [`Plan`].
//!
//! Pure: the I/O is in [`crate::ops`]. The reconcile keys are the class minors, filter
//! preferences and u32 node ids laid out in [`crate::plan`].
//!
//! What is compared how:
//! * the root qdisc, the leaf qdiscs and the filters come as JSON and are compared exactly;
//! * HTB classes come only as text (this iproute2 has no JSON for them) with rates and sizes
//!   rounded for display, so their rate/ceil/burst/cburst are compared with a tolerance
//!   (0.2 % for rates, 5 % for bursts), the quantum exactly; and a class whose parameters
//!   differ from the *last applied* plan (kept in memory) is changed even when the difference
//!   is below the display resolution.
//!
//! Updates are in place (`class change`, `qdisc replace` of a leaf with the same kind and
//! handle, `filter replace` by full handle), which keeps queues and counters. The root qdisc
//! is only (re)created when it is not ours, never during an ordinary reconcile.

use crate::plan::{same_protocol, ClassPlan, FilterPlan, Plan, DROP_MINOR};
use crate::{Change, ClassStats, DatapathError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The root qdisc as the kernel shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    pub handle: String,
    pub default: Option<u32>,
    pub direct_qlen: Option<u64>,
}

/// A qdisc attached to a class of our root (`parent 1:M`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub kind: String,
    pub handle: String,
    pub limit: Option<u64>,
    pub stats: ClassStats,
}

/// An HTB class, from the text listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KClass {
    /// Attached directly to the root qdisc (`root`), not to another class.
    pub at_root: bool,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub burst: u64,
    pub cburst: u64,
    pub quantum: Option<u64>,
}

/// One u32 filter node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KFilter {
    /// Full handle, e.g. "802::1".
    pub handle: String,
    pub class_minor: Option<u16>,
    /// (value, mask, offset) of its first key.
    pub key: Option<(u32, u32, i64)>,
}

/// All filters of one preference on `parent 1:`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KPref {
    pub protocol: String,
    pub kind: String,
    pub nodes: BTreeMap<u32, KFilter>,
}

/// What tc shows on the device.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TcKernel {
    pub root: Option<RootQdisc>,
    /// By parent class minor (classes of major 1 only).
    pub leaves: BTreeMap<u16, Leaf>,
    /// By minor (major 1 only).
    pub classes: BTreeMap<u16, KClass>,
    /// Filters on `parent 1:` by preference.
    pub prefs: BTreeMap<u16, KPref>,
}

impl TcKernel {
    pub fn parse(
        qdiscs_json: &str,
        filters_json: &str,
        classes_text: &str,
    ) -> Result<TcKernel, DatapathError> {
        let (root, leaves) = parse_qdiscs(qdiscs_json)?;
        let ours = root.as_ref().is_some_and(is_our_root_kind);
        Ok(TcKernel {
            root,
            // Classes and filters of a root that is not an HTB `1:` are not ours.
            leaves: if ours { leaves } else { BTreeMap::new() },
            classes: if ours {
                parse_classes(classes_text)?
            } else {
                BTreeMap::new()
            },
            prefs: if ours {
                parse_filters(filters_json)?
            } else {
                BTreeMap::new()
            },
        })
    }
}

fn is_our_root_kind(root: &RootQdisc) -> bool {
    root.kind == "htb" && root.handle == "1:"
}

fn is_our_root(root: &RootQdisc) -> bool {
    is_our_root_kind(root)
        && root.default == Some(u32::from(DROP_MINOR))
        && root.direct_qlen == Some(0)
}

/// `"10:"` → 0x10.
fn parse_major(handle: &str) -> Option<u32> {
    let major = handle.strip_suffix(':')?;
    u32::from_str_radix(major, 16).ok()
}

/// `"1:10"` → (1, 0x10).
fn parse_classid(id: &str) -> Option<(u32, u32)> {
    let (maj, min) = id.split_once(':')?;
    Some((
        u32::from_str_radix(maj, 16).ok()?,
        u32::from_str_radix(min, 16).ok()?,
    ))
}

/// Minor of a class of our root `1:`.
fn our_minor(id: &str) -> Option<u16> {
    match parse_classid(id)? {
        (1, min) => u16::try_from(min).ok(),
        _ => None,
    }
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Parses `tc -j -s qdisc show dev X`: the root qdisc and the leaves under classes of `1:`.
pub fn parse_qdiscs(json: &str) -> Result<(Option<RootQdisc>, BTreeMap<u16, Leaf>), DatapathError> {
    let what = "tc qdisc JSON";
    let all: Vec<Value> =
        serde_json::from_str(json).map_err(|e| DatapathError::parse(what, e.to_string()))?;
    let mut root = None;
    let mut leaves = BTreeMap::new();
    for q in &all {
        let kind = q.get("kind").and_then(Value::as_str).unwrap_or_default();
        let handle = q.get("handle").and_then(Value::as_str).unwrap_or_default();
        let options = q.get("options");
        if q.get("root").and_then(Value::as_bool) == Some(true) {
            let default = options
                .and_then(|o| o.get("default"))
                .and_then(Value::as_str)
                .and_then(|d| u32::from_str_radix(d.trim_start_matches("0x"), 16).ok());
            root = Some(RootQdisc {
                kind: kind.to_string(),
                handle: handle.to_string(),
                default,
                direct_qlen: options
                    .and_then(|o| o.get("direct_qlen"))
                    .and_then(Value::as_u64),
            });
            continue;
        }
        let Some(minor) = q.get("parent").and_then(Value::as_str).and_then(our_minor) else {
            continue;
        };
        leaves.insert(
            minor,
            Leaf {
                kind: kind.to_string(),
                handle: handle.to_string(),
                limit: options.and_then(|o| o.get("limit")).and_then(Value::as_u64),
                stats: ClassStats {
                    bytes: u64_field(q, "bytes"),
                    packets: u64_field(q, "packets"),
                    drops: u64_field(q, "drops"),
                },
            },
        );
    }
    Ok((root, leaves))
}

/// Parses `tc -j filter show dev X` (filters on the root qdisc `1:`).
pub fn parse_filters(json: &str) -> Result<BTreeMap<u16, KPref>, DatapathError> {
    let what = "tc filter JSON";
    let all: Vec<Value> =
        serde_json::from_str(json).map_err(|e| DatapathError::parse(what, e.to_string()))?;
    let mut prefs: BTreeMap<u16, KPref> = BTreeMap::new();
    for f in &all {
        let Some(pref) = f
            .get("pref")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        let entry = prefs.entry(pref).or_default();
        entry.protocol = f
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        entry.kind = f
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(options) = f.get("options") else {
            continue;
        };
        let Some(fh) = options.get("fh").and_then(Value::as_str) else {
            continue;
        };
        // Hash tables ("800:") are structure; nodes are "800::1".
        let Some((_, node)) = fh.split_once("::") else {
            continue;
        };
        let node = u32::from_str_radix(node, 16)
            .map_err(|e| DatapathError::parse(what, format!("filter handle `{fh}`: {e}")))?;
        let key = options.get("match").and_then(|m| {
            let hex = |k: &str| {
                m.get(k)
                    .and_then(Value::as_str)
                    .and_then(|s| u32::from_str_radix(s, 16).ok())
            };
            Some((hex("value")?, hex("mask")?, m.get("off")?.as_i64()?))
        });
        entry.nodes.insert(
            node,
            KFilter {
                handle: fh.to_string(),
                class_minor: options
                    .get("flowid")
                    .or_else(|| options.get("classid"))
                    .and_then(Value::as_str)
                    .and_then(our_minor),
                key,
            },
        );
    }
    Ok(prefs)
}

/// Parses `tc -d class show dev X`, e.g.
/// `class htb 1:10 root leaf 10: prio 0 quantum 60000 rate 50Mbit ceil 50Mbit linklayer ethernet burst 64Kb/1 mpu 0b cburst 64Kb/1 mpu 0b level 0`.
pub fn parse_classes(text: &str) -> Result<BTreeMap<u16, KClass>, DatapathError> {
    let mut classes = BTreeMap::new();
    for line in text.lines() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks.len() < 3 || toks[0] != "class" || toks[1] != "htb" {
            continue;
        }
        let Some(minor) = our_minor(toks[2]) else {
            continue;
        };
        let bad =
            |detail: String| DatapathError::parse("tc class text", format!("{detail} in `{line}`"));
        let value = |key: &str| -> Option<&str> {
            toks.iter()
                .position(|t| *t == key)
                .and_then(|i| toks.get(i + 1).copied())
        };
        let rate = |key: &str| -> Result<u64, DatapathError> {
            let v = value(key).ok_or_else(|| bad(format!("no `{key}`")))?;
            parse_rate(v).ok_or_else(|| bad(format!("{key} `{v}`")))
        };
        let size = |key: &str| -> Result<u64, DatapathError> {
            let v = value(key).ok_or_else(|| bad(format!("no `{key}`")))?;
            parse_size(v).ok_or_else(|| bad(format!("{key} `{v}`")))
        };
        classes.insert(
            minor,
            KClass {
                at_root: toks.get(3) == Some(&"root"),
                rate_bps: rate("rate")?,
                ceil_bps: rate("ceil")?,
                burst: size("burst")?,
                cburst: size("cburst")?,
                quantum: value("quantum").and_then(|q| q.parse().ok()),
            },
        );
    }
    Ok(classes)
}

/// "50Mbit" → 50_000_000 (also "Kibit" etc. with `-iec`).
pub fn parse_rate(s: &str) -> Option<u64> {
    let num = s.strip_suffix("bit")?;
    let (num, mult) = split_unit(
        num,
        &[
            ("Ki", 1u64 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("K", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ],
    );
    let v: f64 = num.parse().ok()?;
    (v >= 0.0).then(|| (v * mult as f64).round() as u64)
}

/// "64Kb" → 65536, "65512b" → 65512, "1e+06Kb" → 1024000000.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.split('/').next()?; // "64Kb/1": cell log
    let num = s.strip_suffix('b')?;
    let (num, mult) = split_unit(num, &[("K", 1u64 << 10), ("M", 1 << 20), ("G", 1 << 30)]);
    let v: f64 = num.parse().ok()?;
    (v >= 0.0).then(|| (v * mult as f64).round() as u64)
}

fn split_unit<'a>(num: &'a str, units: &[(&str, u64)]) -> (&'a str, u64) {
    for (suffix, mult) in units {
        if let Some(n) = num.strip_suffix(suffix) {
            return (n, *mult);
        }
    }
    (num, 1)
}

fn rate_close(want: u64, got: u64) -> bool {
    want.abs_diff(got) <= want.max(got) / 500 + 8
}

fn size_close(want: u64, got: u64) -> bool {
    want.abs_diff(got) <= want.max(got) / 20 + 64
}

fn class_matches(want: &ClassPlan, got: &KClass) -> bool {
    got.at_root
        && rate_close(want.rate_bps, got.rate_bps)
        && rate_close(want.rate_bps, got.ceil_bps)
        && size_close(want.burst_bytes, got.burst)
        && size_close(want.burst_bytes, got.cburst)
        && got.quantum == Some(want.quantum)
}

fn leaf_matches(want: &ClassPlan, got: &Leaf) -> bool {
    got.kind == "pfifo"
        && parse_major(&got.handle) == Some(u32::from(want.minor))
        && got.limit == Some(u64::from(want.leaf_limit))
}

fn filter_matches(want: &FilterPlan, got: &KFilter) -> bool {
    got.class_minor == Some(want.class_minor) && got.key == Some(want.matcher.key())
}

/// Commands (for `tc -batch`) and their human-readable descriptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcDiff {
    pub cmds: Vec<String>,
    pub changes: Vec<Change>,
}

fn root_cmd(verb: &str, dev: &str) -> String {
    format!("qdisc {verb} dev {dev} root handle 1: htb default {DROP_MINOR:x} direct_qlen 0")
}

fn class_cmd(verb: &str, dev: &str, c: &ClassPlan) -> String {
    format!(
        "class {verb} dev {dev} parent 1: classid 1:{:x} htb rate {r}bit ceil {r}bit burst {b} cburst {b} quantum {q}",
        c.minor,
        r = c.rate_bps,
        b = c.burst_bytes,
        q = c.quantum
    )
}

fn leaf_cmd(dev: &str, c: &ClassPlan) -> String {
    format!(
        "qdisc replace dev {dev} parent 1:{m:x} handle {m:x}: pfifo limit {}",
        c.leaf_limit,
        m = c.minor
    )
}

fn filter_cmd(verb: &str, dev: &str, f: &FilterPlan, handle: &str) -> String {
    format!(
        "filter {verb} dev {dev} parent 1: protocol {} pref {} handle {handle} u32 {} classid 1:{:x}",
        f.protocol,
        f.pref,
        f.matcher.render(),
        f.class_minor
    )
}

fn describe_class(c: &ClassPlan) -> String {
    let leaf = if c.leaf_limit == 0 {
        "leaf pfifo limit 0 (drops everything)".to_string()
    } else {
        format!("leaf pfifo limit {}", c.leaf_limit)
    };
    format!(
        "rate {} bit/s, burst {} B, quantum {}, {leaf}",
        c.rate_bps, c.burst_bytes, c.quantum
    )
}

fn describe_filter(f: &FilterPlan) -> String {
    format!(
        "filter pref {} ::{:x} ({}) {} {} -> 1:{:x}",
        f.pref,
        f.node,
        f.label,
        f.protocol,
        f.matcher.render(),
        f.class_minor
    )
}

fn change(s: String) -> Change {
    Change(format!("tc: {s}"))
}

/// The commands that bring `kernel` to `plan`, in a safe order: root, classes and leaves,
/// filter deletions, filter additions, class deletions (a class cannot be deleted while a
/// filter still points to it). `last` is the plan applied last by this process, if any.
pub fn diff(plan: &Plan, kernel: &TcKernel, last: Option<&Plan>) -> TcDiff {
    let dev = &plan.dev;
    let mut out = TcDiff::default();
    let empty = TcKernel::default();

    // Root.
    let kernel = match &kernel.root {
        Some(root) if is_our_root(root) => kernel,
        Some(root) if is_our_root_kind(root) => {
            // HTB has no in-place change of its qdisc options: re-create.
            out.cmds.push(format!("qdisc del dev {dev} root"));
            out.cmds.push(root_cmd("add", dev));
            out.changes.push(change(format!(
                "root qdisc htb 1: on {dev} re-created (had default {:?}, direct_qlen {:?}; class counters reset)",
                root.default, root.direct_qlen
            )));
            &empty
        }
        other => {
            out.cmds.push(root_cmd("replace", dev));
            let was = other
                .as_ref()
                .map(|r| format!("{} {}", r.kind, r.handle))
                .unwrap_or_else(|| "none".to_string());
            out.changes.push(change(format!(
                "root qdisc htb 1: default {DROP_MINOR:x} installed on {dev} (was {was})"
            )));
            &empty
        }
    };

    // Classes and their leaves.
    for c in &plan.classes {
        let name = format!("class 1:{:x} ({})", c.minor, c.label);
        match kernel.classes.get(&c.minor) {
            None => {
                out.cmds.push(class_cmd("add", dev, c));
                out.changes
                    .push(change(format!("{name} added: {}", describe_class(c))));
            }
            Some(k) if !k.at_root => {
                out.cmds
                    .push(format!("class del dev {dev} classid 1:{:x}", c.minor));
                out.cmds.push(class_cmd("add", dev, c));
                out.changes.push(change(format!(
                    "{name} re-created at the root: {}",
                    describe_class(c)
                )));
            }
            Some(k) => {
                let remembered = last.and_then(|l| l.class(c.minor));
                let stale_memory = remembered.is_some_and(|r| r != c);
                if stale_memory || !class_matches(c, k) {
                    out.cmds.push(class_cmd("change", dev, c));
                    let (old_rate, old_burst, old_q) = match remembered {
                        Some(r) => (r.rate_bps, r.burst_bytes, Some(r.quantum)),
                        None => (k.rate_bps, k.burst, k.quantum),
                    };
                    let mut what = Vec::new();
                    if old_rate != c.rate_bps || k.ceil_bps != k.rate_bps {
                        what.push(format!("rate {old_rate} -> {} bit/s", c.rate_bps));
                    }
                    if old_burst != c.burst_bytes || k.cburst != k.burst {
                        what.push(format!("burst {old_burst} -> {} B", c.burst_bytes));
                    }
                    if old_q != Some(c.quantum) {
                        what.push(format!(
                            "quantum {} -> {}",
                            old_q.map_or("?".to_string(), |q| q.to_string()),
                            c.quantum
                        ));
                    }
                    if what.is_empty() {
                        what.push(format!("re-asserted {}", describe_class(c)));
                    }
                    out.changes
                        .push(change(format!("{name} {}", what.join(", "))));
                }
            }
        }
        let leaf = kernel
            .classes
            .get(&c.minor)
            .filter(|k| k.at_root)
            .and_then(|_| kernel.leaves.get(&c.minor));
        match leaf {
            Some(l) if leaf_matches(c, l) => {}
            found => {
                out.cmds.push(leaf_cmd(dev, c));
                // A new class's leaf is part of its "added" line.
                if let Some(l) = found {
                    let limit = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
                    out.changes.push(change(format!(
                        "{name} leaf {} {} limit {} -> pfifo {:x}: limit {}",
                        l.kind,
                        l.handle,
                        limit(l.limit),
                        c.minor,
                        c.leaf_limit
                    )));
                } else if kernel.classes.contains_key(&c.minor) {
                    out.changes.push(change(format!(
                        "{name} leaf pfifo {:x}: limit {} added",
                        c.minor, c.leaf_limit
                    )));
                }
            }
        }
    }

    // Filters: deletions first.
    let mut wanted: BTreeMap<u16, Vec<&FilterPlan>> = BTreeMap::new();
    for f in &plan.filters {
        wanted.entry(f.pref).or_default().push(f);
    }
    let mut adds = Vec::new();
    let mut add_changes = Vec::new();
    for (pref, kp) in &kernel.prefs {
        let keep = wanted.get(pref).is_some_and(|fs| {
            fs.first()
                .is_some_and(|f| same_protocol(f.protocol, &kp.protocol))
                && kp.kind == "u32"
        });
        if !keep {
            out.cmds
                .push(format!("filter del dev {dev} parent 1: pref {pref}"));
            out.changes.push(change(format!(
                "filter pref {pref} ({} {}, {} filters) removed",
                kp.protocol,
                kp.kind,
                kp.nodes.len()
            )));
        }
    }
    for (pref, fs) in &wanted {
        let kp = kernel.prefs.get(pref).filter(|kp| {
            fs.first()
                .is_some_and(|f| same_protocol(f.protocol, &kp.protocol))
                && kp.kind == "u32"
        });
        let nodes = kp.map(|kp| &kp.nodes);
        let wanted_nodes: BTreeSet<u32> = fs.iter().map(|f| f.node).collect();
        if let (Some(f0), Some(nodes)) = (fs.first(), nodes) {
            for (node, kf) in nodes {
                if !wanted_nodes.contains(node) {
                    // The plan's spelling: tc prints numeric protocols as `[N]`, which it
                    // does not take back.
                    out.cmds.push(format!(
                        "filter del dev {dev} parent 1: protocol {} pref {pref} handle {} u32",
                        f0.protocol, kf.handle
                    ));
                    out.changes
                        .push(change(format!("filter pref {pref} {} removed", kf.handle)));
                }
            }
        }
        for f in fs {
            match nodes.and_then(|n| n.get(&f.node)) {
                None => {
                    adds.push(filter_cmd("add", dev, f, &format!("::{:x}", f.node)));
                    add_changes.push(change(format!("{} added", describe_filter(f))));
                }
                Some(kf) if !filter_matches(f, kf) => {
                    adds.push(filter_cmd("replace", dev, f, &kf.handle));
                    add_changes.push(change(format!("{} replaced", describe_filter(f))));
                }
                Some(_) => {}
            }
        }
    }
    out.cmds.extend(adds);
    out.changes.extend(add_changes);

    // Classes no longer wanted (their filters are gone by now).
    for minor in kernel.classes.keys() {
        if plan.class(*minor).is_none() {
            out.cmds
                .push(format!("class del dev {dev} classid 1:{minor:x}"));
            out.changes
                .push(change(format!("class 1:{minor:x} removed")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured on this project's test machine (iproute2 6.1, kernel 6.18).
    pub(crate) const QDISC_JSON: &str = r#"[{"kind":"htb","handle":"1:","root":true,"refcnt":3,"options":{"r2q":10,"default":"0x3","direct_packets_stat":0,"direct_qlen":1000},"bytes":210,"packets":3,"drops":7,"overlimits":0,"requeues":0,"backlog":0,"qlen":0},{"kind":"pfifo","handle":"2:","parent":"1:2","options":{"limit":100},"bytes":0,"packets":0,"drops":0,"overlimits":0,"requeues":0,"backlog":0,"qlen":0},{"kind":"pfifo","handle":"100:","parent":"1:100","options":{"limit":0},"bytes":0,"packets":0,"drops":0,"overlimits":0,"requeues":0,"backlog":0,"qlen":0},{"kind":"pfifo","handle":"10:","parent":"1:10","options":{"limit":500},"bytes":210,"packets":3,"drops":0,"overlimits":0,"requeues":0,"backlog":0,"qlen":0},{"kind":"pfifo","handle":"3:","parent":"1:3","options":{"limit":0},"bytes":0,"packets":0,"drops":7,"overlimits":0,"requeues":0,"backlog":0,"qlen":0}]"#;

    pub(crate) const FILTER_JSON: &str = r#"[{"parent":"1:","protocol":"arp","pref":1,"kind":"u32","chain":0},{"parent":"1:","protocol":"arp","pref":1,"kind":"u32","chain":0,"options":{"fh":"800:","ht_divisor":1}},{"parent":"1:","protocol":"arp","pref":1,"kind":"u32","chain":0,"options":{"fh":"800::800","order":2048,"key_ht":"800","bkt":"0","flowid":"1:2","not_in_hw":true,"match":{"value":"0","mask":"0","offmask":"","off":0}}},{"parent":"1:","protocol":"ip","pref":100,"kind":"u32","chain":0},{"parent":"1:","protocol":"ip","pref":100,"kind":"u32","chain":0,"options":{"fh":"802:","ht_divisor":1}},{"parent":"1:","protocol":"ip","pref":100,"kind":"u32","chain":0,"options":{"fh":"802::1","order":1,"key_ht":"802","bkt":"0","flowid":"1:100","not_in_hw":true,"match":{"value":"c6130100","mask":"ffffff00","offmask":"","off":16}}},{"parent":"1:","protocol":"ip","pref":100,"kind":"u32","chain":0,"options":{"fh":"802::2","order":2,"key_ht":"802","bkt":"0","flowid":"1:100","not_in_hw":true,"match":{"value":"c6130280","mask":"ffffff80","offmask":"","off":16}}},{"parent":"1:","protocol":"all","pref":1000,"kind":"u32","chain":0},{"parent":"1:","protocol":"all","pref":1000,"kind":"u32","chain":0,"options":{"fh":"804:","ht_divisor":1}},{"parent":"1:","protocol":"all","pref":1000,"kind":"u32","chain":0,"options":{"fh":"804::800","order":2048,"key_ht":"804","bkt":"0","flowid":"1:10","not_in_hw":true,"match":{"value":"0","mask":"0","offmask":"","off":0}}}]"#;

    pub(crate) const CLASS_TEXT: &str = "class htb 1:10 root leaf 10: prio 0 quantum 60000 rate 50Mbit ceil 50Mbit linklayer ethernet burst 64Kb/1 mpu 0b cburst 64Kb/1 mpu 0b level 0 
class htb 1:100 root leaf 100: prio 0 quantum 125000 rate 100Mbit ceil 100Mbit linklayer ethernet burst 65512b/1 mpu 0b cburst 65512b/1 mpu 0b level 0 
class htb 1:2 root leaf 2: prio 0 quantum 12500 rate 1Mbit ceil 1Mbit linklayer ethernet burst 1600b/1 mpu 0b cburst 1600b/1 mpu 0b level 0 
class htb 1:3 root leaf 3: prio 0 quantum 1000 rate 8bit ceil 8bit linklayer ethernet burst 225b/1 mpu 0b cburst 225b/1 mpu 0b level 0 
class htb 1:200 root prio 0 quantum 1514 rate 123456Kbit ceil 123456Kbit linklayer ethernet burst 3009b/1 mpu 0b cburst 3009b/1 mpu 0b level 0 
";

    #[test]
    fn parses_real_qdisc_json() {
        let (root, leaves) = parse_qdiscs(QDISC_JSON).expect("parse");
        assert_eq!(
            root,
            Some(RootQdisc {
                kind: "htb".into(),
                handle: "1:".into(),
                default: Some(3),
                direct_qlen: Some(1000)
            })
        );
        let got: Vec<String> = leaves
            .iter()
            .map(|(m, l)| {
                format!(
                    "1:{m:x} {} {} limit {:?} bytes {} packets {} drops {}",
                    l.kind, l.handle, l.limit, l.stats.bytes, l.stats.packets, l.stats.drops
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "1:2 pfifo 2: limit Some(100) bytes 0 packets 0 drops 0",
                "1:3 pfifo 3: limit Some(0) bytes 0 packets 0 drops 7",
                "1:10 pfifo 10: limit Some(500) bytes 210 packets 3 drops 0",
                "1:100 pfifo 100: limit Some(0) bytes 0 packets 0 drops 0",
            ]
        );
        // A fresh veth: noqueue root, nothing else.
        let (root, leaves) = parse_qdiscs(
            r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}}]"#,
        )
        .expect("parse");
        assert_eq!(root.map(|r| r.kind), Some("noqueue".to_string()));
        assert!(leaves.is_empty());
        assert!(parse_qdiscs("not json").is_err());
    }

    #[test]
    fn parses_real_filter_json() {
        let prefs = parse_filters(FILTER_JSON).expect("parse");
        let got: Vec<String> = prefs
            .iter()
            .flat_map(|(p, kp)| {
                kp.nodes.iter().map(move |(n, f)| {
                    format!(
                        "{p} {} {} node {n:x} {} -> {:?} {:x?}",
                        kp.protocol, kp.kind, f.handle, f.class_minor, f.key
                    )
                })
            })
            .collect();
        assert_eq!(
            got,
            [
                "1 arp u32 node 800 800::800 -> Some(2) Some((0, 0, 0))",
                "100 ip u32 node 1 802::1 -> Some(256) Some((c6130100, ffffff00, 10))",
                "100 ip u32 node 2 802::2 -> Some(256) Some((c6130280, ffffff80, 10))",
                "1000 all u32 node 800 804::800 -> Some(16) Some((0, 0, 0))",
            ]
        );
        assert_eq!(parse_filters("[]").expect("parse"), BTreeMap::new());
    }

    #[test]
    fn parses_real_class_text() {
        let classes = parse_classes(CLASS_TEXT).expect("parse");
        let got: Vec<String> = classes
            .iter()
            .map(|(m, c)| {
                format!(
                    "1:{m:x} root={} rate {} ceil {} burst {} cburst {} quantum {:?}",
                    c.at_root, c.rate_bps, c.ceil_bps, c.burst, c.cburst, c.quantum
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "1:2 root=true rate 1000000 ceil 1000000 burst 1600 cburst 1600 quantum Some(12500)",
                "1:3 root=true rate 8 ceil 8 burst 225 cburst 225 quantum Some(1000)",
                "1:10 root=true rate 50000000 ceil 50000000 burst 65536 cburst 65536 quantum Some(60000)",
                "1:100 root=true rate 100000000 ceil 100000000 burst 65512 cburst 65512 quantum Some(125000)",
                "1:200 root=true rate 123456000 ceil 123456000 burst 3009 cburst 3009 quantum Some(1514)",
            ]
        );
        assert!(
            parse_classes("class htb 1:10 root rate fast ceil 1bit burst 1b cburst 1b").is_err()
        );
    }

    #[test]
    fn units() {
        #[track_caller]
        fn check(s: &str, rate: Option<u64>, size: Option<u64>) {
            assert_eq!((parse_rate(s), parse_size(s)), (rate, size), "{s}");
        }
        check("8bit", Some(8), None);
        check("999992bit", Some(999_992), None);
        check("123456Kbit", Some(123_456_000), None);
        check("4Tbit", Some(4_000_000_000_000), None);
        check("1Mibit", Some(1 << 20), None);
        check("225b", None, Some(225));
        check("64Kb/1", None, Some(65_536));
        check("1e+06Kb", None, Some(1_024_000_000));
        check("2Mb", None, Some(2 << 20));
        check("fast", None, None);
        // Tolerances: display rounding passes, real differences do not.
        assert!(rate_close(123_456_784, 123_456_000));
        assert!(!rate_close(100_000_000, 99_000_000));
        assert!(size_close(65_536, 65_512));
        assert!(!size_close(65_536, 32_768));
    }
}
