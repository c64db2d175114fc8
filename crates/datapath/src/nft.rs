//! The nftables half: per-lease volume quotas and counters in table `inet nicwarden`.
//!
//! Pure: the I/O is in [`crate::ops`]. Layout, for a lease `L` in a scope:
//!
//! ```text
//! table inet nicwarden {
//!     quota qL { over VOLUME bytes used USED bytes }   # over 2^62 when the lease has no volume
//!     counter dL { packets P bytes B }                  # dropped because the volume is spent
//!     counter pL { packets P bytes B }                  # passed
//!     chain postrouting {
//!         type filter hook postrouting priority 0; policy accept;
//!         # peer scopes, in scope order: a lease ...
//!         oifname "fab0" ip daddr { PREFIXES } quota name "qL" counter name "dL" drop
//!         oifname "fab0" ip daddr { PREFIXES } counter name "pL" accept
//!         # ... or a floor above 0 (keeps its traffic out of the egress quota; tc limits it)
//!         oifname "fab0" ip daddr { PREFIXES } accept
//!         # ... or blocked (floor 0): dropped here as well as by tc; counter bM (M = the
//!         # scope's class minor, hex) counts those drops
//!         oifname "fab0" ip daddr { PREFIXES } counter name "bM" drop
//!         # egress with a lease (nothing at a floor above 0; `counter name "b10" drop` when blocked)
//!         oifname "fab0" quota name "qE" counter name "dE" drop
//!         oifname "fab0" counter name "pE" accept
//!     }
//! }
//! ```
//!
//! Why blocked scopes are dropped here too: a reconcile applies nftables first, then tc. When
//! a lease ends (revoked, expired, volume spent) its quota rule goes away with the nft
//! transaction while tc still shapes at the lease's rate until its batch lands; the `drop`
//! rule closes that window atomically. (A floor above 0 has that window at the old rate.)
//!
//! The kernel's quota counts every packet that reaches its rule, so `used` can exceed the
//! volume once packets are being dropped; the kernel also refuses `used > over` when a quota is
//! created. Counted are IP packet lengths (no link-layer header), at postrouting.
//!
//! Reconcile compares the kernel's table (its objects and rules, from `nft -j list table`)
//! with the desired one, ignoring the counters' values. When they differ the whole table is
//! replaced in **one** `nft -f` transaction (`add table` + `delete table` + definition: either
//! all of it applies or none), carrying over the `used` of every quota that continues and the
//! values of every counter that continues; a quota seen for the first time starts at the lease's
//! `start_used_bytes`. A continuing quota is never set below `start_used_bytes` (what the
//! controller already recorded). Packets counted between the read and the replacement (the
//! time of one `nft` invocation) are not carried over.

use crate::plan::{interval, Plan, ScopePlan};
use crate::{Change, DatapathError};
use ipnet::Ipv4Net;
use nicwarden_lease::{LeaseId, Scope};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The table we own.
pub const TABLE: &str = "nicwarden";
/// Its family.
pub const FAMILY: &str = "inet";

pub fn quota_name(id: LeaseId) -> String {
    format!("q{id}")
}
pub fn drops_name(id: LeaseId) -> String {
    format!("d{id}")
}
pub fn passed_name(id: LeaseId) -> String {
    format!("p{id}")
}
/// Packets of a blocked scope dropped here, named by the scope's class minor (hex).
pub fn blocked_name(class_minor: u16) -> String {
    format!("b{class_minor:x}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

/// One rule of chain postrouting, in the shape we write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub oifname: String,
    /// Destination address ranges, merged and sorted (`None` = no daddr match).
    pub daddr: Option<Vec<(u32, u32)>>,
    pub quota: Option<String>,
    pub counter: Option<String>,
    pub verdict: Verdict,
}

/// A named quota as the kernel shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KQuota {
    pub bytes: u64,
    pub used: u64,
    pub inv: bool,
}

/// A named counter as the kernel shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Table `inet nicwarden` as the kernel shows it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NftKernel {
    pub quotas: BTreeMap<String, KQuota>,
    pub counters: BTreeMap<String, KCounter>,
    /// Chain postrouting exists with our hook, priority and policy.
    pub chain_ok: bool,
    pub rules: Vec<Rule>,
    /// Things in the table we did not put there (other chains, sets, unknown expressions).
    pub foreign: Vec<String>,
}

/// Merges ranges into sorted, disjoint, non-adjacent ones.
pub fn merge(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u64::from(lo) <= u64::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn ranges_of(prefixes: &[Ipv4Net]) -> Vec<(u32, u32)> {
    merge(prefixes.iter().map(interval).collect())
}

impl NftKernel {
    /// Parses `nft -j list table inet nicwarden`.
    pub fn parse(json: &str) -> Result<NftKernel, DatapathError> {
        let what = "nft table JSON";
        let doc: Value =
            serde_json::from_str(json).map_err(|e| DatapathError::parse(what, e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| DatapathError::parse(what, "no `nftables` array"))?;
        let mut k = NftKernel::default();
        for item in items {
            let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
            let num = |key: &str| body.get(key).and_then(Value::as_u64).unwrap_or(0);
            match kind.as_str() {
                "metainfo" | "table" => {}
                "quota" => {
                    k.quotas.insert(
                        name.to_string(),
                        KQuota {
                            bytes: num("bytes"),
                            used: num("used"),
                            inv: body.get("inv").and_then(Value::as_bool).unwrap_or(false),
                        },
                    );
                }
                "counter" => {
                    k.counters.insert(
                        name.to_string(),
                        KCounter {
                            packets: num("packets"),
                            bytes: num("bytes"),
                        },
                    );
                }
                "chain" => {
                    let s = |key: &str| body.get(key).and_then(Value::as_str);
                    if name == "postrouting"
                        && s("type") == Some("filter")
                        && s("hook") == Some("postrouting")
                        && body.get("prio").and_then(Value::as_i64) == Some(0)
                        && s("policy") == Some("accept")
                    {
                        k.chain_ok = true;
                    } else {
                        k.foreign.push(format!("chain {name}"));
                    }
                }
                "rule" => {
                    let chain = body
                        .get("chain")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    match (chain, parse_rule(body)) {
                        ("postrouting", Some(rule)) => k.rules.push(rule),
                        _ => k.foreign.push(format!(
                            "rule {} in chain {chain}",
                            body.get("handle").and_then(Value::as_u64).unwrap_or(0)
                        )),
                    }
                }
                other => k.foreign.push(format!("{other} {name}")),
            }
        }
        Ok(k)
    }
}

fn parse_rule(body: &Value) -> Option<Rule> {
    let mut oifname = None;
    let mut daddr = None;
    let mut quota = None;
    let mut counter = None;
    let mut verdict = None;
    for e in body.get("expr")?.as_array()? {
        let (kind, v) = e.as_object()?.iter().next()?;
        if verdict.is_some() {
            return None; // something after the verdict
        }
        match kind.as_str() {
            "match" => {
                if v.get("op")?.as_str()? != "==" {
                    return None;
                }
                let left = v.get("left")?;
                let right = v.get("right")?;
                if left
                    .get("meta")
                    .and_then(|m| m.get("key"))
                    .and_then(Value::as_str)
                    == Some("oifname")
                {
                    oifname = Some(right.as_str()?.to_string());
                } else if left.get("payload").is_some_and(|p| {
                    p.get("protocol").and_then(Value::as_str) == Some("ip")
                        && p.get("field").and_then(Value::as_str) == Some("daddr")
                }) {
                    let mut ranges = Vec::new();
                    match right.get("set") {
                        Some(set) => {
                            for elem in set.as_array()? {
                                ranges.push(parse_range(elem)?);
                            }
                        }
                        None => ranges.push(parse_range(right)?),
                    }
                    daddr = Some(merge(ranges));
                } else {
                    return None;
                }
            }
            "quota" => quota = Some(v.as_str()?.to_string()),
            "counter" => counter = Some(v.as_str()?.to_string()),
            "accept" => verdict = Some(Verdict::Accept),
            "drop" => verdict = Some(Verdict::Drop),
            _ => return None,
        }
    }
    Some(Rule {
        oifname: oifname?,
        daddr,
        quota,
        counter,
        verdict: verdict?,
    })
}

/// An address, `{"prefix": {"addr", "len"}}` or `{"range": [a, b]}`.
fn parse_range(v: &Value) -> Option<(u32, u32)> {
    if let Some(s) = v.as_str() {
        let a = u32::from(s.parse::<Ipv4Addr>().ok()?);
        return Some((a, a));
    }
    if let Some(p) = v.get("prefix") {
        let addr: Ipv4Addr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return Some(interval(&Ipv4Net::new(addr, len).ok()?.trunc()));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array) {
        let a: Ipv4Addr = r.first()?.as_str()?.parse().ok()?;
        let b: Ipv4Addr = r.get(1)?.as_str()?.parse().ok()?;
        return Some((u32::from(a), u32::from(b)));
    }
    None
}

/// One quota of the desired table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantQuota {
    pub name: String,
    pub scope: Scope,
    pub over: u64,
    pub start_used: u64,
}

/// The desired table: objects and rules (with the prefixes to print them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftDesired {
    pub quotas: Vec<WantQuota>,
    pub counters: Vec<String>,
    pub rules: Vec<(Rule, Vec<Ipv4Net>)>,
}

impl NftDesired {
    pub fn from_plan(plan: &Plan) -> NftDesired {
        let mut d = NftDesired {
            quotas: Vec::new(),
            counters: Vec::new(),
            rules: Vec::new(),
        };
        // Peer scopes first (they carve their destinations out), egress last.
        let peers = plan.scopes.iter().filter(|s| s.scope != Scope::Egress);
        let egress = plan.scopes.iter().filter(|s| s.scope == Scope::Egress);
        for s in peers.chain(egress) {
            d.add_scope(&plan.dev, s);
        }
        d
    }

    fn add_scope(&mut self, dev: &str, s: &ScopePlan) {
        let is_peer = s.scope != Scope::Egress;
        if is_peer && s.prefixes.is_empty() {
            return; // matches nothing
        }
        let daddr = is_peer.then(|| ranges_of(&s.prefixes));
        let rule = |quota: Option<String>, counter: Option<String>, verdict| Rule {
            oifname: dev.to_string(),
            daddr: daddr.clone(),
            quota,
            counter,
            verdict,
        };
        match &s.lease {
            Some(l) => {
                let (q, dn, pn) = (quota_name(l.id), drops_name(l.id), passed_name(l.id));
                self.quotas.push(WantQuota {
                    name: q.clone(),
                    scope: s.scope.clone(),
                    over: l.over,
                    start_used: l.start_used,
                });
                self.counters.push(dn.clone());
                self.counters.push(pn.clone());
                self.rules
                    .push((rule(Some(q), Some(dn), Verdict::Drop), s.prefixes.clone()));
                self.rules
                    .push((rule(None, Some(pn), Verdict::Accept), s.prefixes.clone()));
            }
            // Blocked: dropped here too, so the moment this table replaces one that let
            // the scope through (a revocation, a spent volume), nothing passes, even before
            // tc's half of the same reconcile lands.
            None if s.blocked => {
                let bn = blocked_name(s.class_minor);
                self.counters.push(bn.clone());
                self.rules
                    .push((rule(None, Some(bn), Verdict::Drop), s.prefixes.clone()));
            }
            None if is_peer => self
                .rules
                .push((rule(None, None, Verdict::Accept), s.prefixes.clone())),
            None => {}
        }
    }

    /// Does the kernel's table already enforce this (values of counters aside)?
    pub fn matches(&self, k: &NftKernel) -> bool {
        k.foreign.is_empty()
            && k.chain_ok
            && k.quotas.len() == self.quotas.len()
            && self.quotas.iter().all(|w| {
                k.quotas
                    .get(&w.name)
                    .is_some_and(|q| q.inv && q.bytes == w.over && q.used >= w.start_used)
            })
            && k.counters.len() == self.counters.len()
            && self.counters.iter().all(|c| k.counters.contains_key(c))
            && k.rules.len() == self.rules.len()
            && self.rules.iter().zip(&k.rules).all(|((w, _), r)| w == r)
    }

    /// The one-transaction script that replaces the table, carrying values over from `k`.
    pub fn script(&self, k: Option<&NftKernel>) -> String {
        let mut s = String::new();
        // `add` first so that `delete` cannot fail on a missing table.
        let _ = writeln!(s, "add table {FAMILY} {TABLE}");
        let _ = writeln!(s, "delete table {FAMILY} {TABLE}");
        let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
        for q in &self.quotas {
            let used = self.carried_used(q, k);
            let _ = writeln!(
                s,
                "\tquota {} {{ over {} bytes used {used} bytes }}",
                q.name, q.over
            );
        }
        for c in &self.counters {
            let v = k
                .and_then(|k| k.counters.get(c))
                .copied()
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "\tcounter {c} {{ packets {} bytes {} }}",
                v.packets, v.bytes
            );
        }
        let _ = writeln!(s, "\tchain postrouting {{");
        let _ = writeln!(
            s,
            "\t\ttype filter hook postrouting priority 0; policy accept;"
        );
        for (r, prefixes) in &self.rules {
            let _ = writeln!(s, "\t\t{}", render_rule(r, prefixes));
        }
        let _ = writeln!(s, "\t}}");
        let _ = writeln!(s, "}}");
        s
    }

    /// `used` for a quota in a rewritten table: the kernel's (never below what the controller
    /// recorded), at most `over` (the kernel refuses more).
    fn carried_used(&self, q: &WantQuota, k: Option<&NftKernel>) -> u64 {
        let kernel = k
            .and_then(|k| k.quotas.get(&q.name))
            .map_or(0, |kq| kq.used);
        kernel.max(q.start_used).min(q.over)
    }

    /// Human-readable description of replacing `k` by `self`.
    pub fn describe(&self, k: Option<&NftKernel>) -> Vec<Change> {
        let c = |s: String| Change(format!("nft: {s}"));
        let Some(k) = k else {
            let mut out = vec![c(format!(
                "table {FAMILY} {TABLE} created ({} quotas, {} rules)",
                self.quotas.len(),
                self.rules.len()
            ))];
            for q in &self.quotas {
                out.push(c(format!(
                    "quota {} ({}) added: over {} bytes, used from {}",
                    q.name, q.scope, q.over, q.start_used
                )));
            }
            return out;
        };
        let mut out = Vec::new();
        for q in &self.quotas {
            let used = self.carried_used(q, Some(k));
            match k.quotas.get(&q.name) {
                None => out.push(c(format!(
                    "quota {} ({}) added: over {} bytes, used from {used}",
                    q.name, q.scope, q.over
                ))),
                Some(kq) if kq.bytes != q.over || !kq.inv => out.push(c(format!(
                    "quota {} ({}) over {} -> {} bytes (used {used} carried over)",
                    q.name, q.scope, kq.bytes, q.over
                ))),
                Some(kq) if kq.used < q.start_used => out.push(c(format!(
                    "quota {} ({}) used {} -> {used} bytes (controller's record)",
                    q.name, q.scope, kq.used
                ))),
                Some(_) => {}
            }
        }
        for (name, kq) in &k.quotas {
            if !self.quotas.iter().any(|q| &q.name == name) {
                out.push(c(format!(
                    "quota {name} removed (used {} of {} bytes)",
                    kq.used, kq.bytes
                )));
            }
        }
        for f in &k.foreign {
            out.push(c(format!("foreign {f} removed")));
        }
        let rules_same = k.chain_ok
            && k.rules.len() == self.rules.len()
            && self.rules.iter().zip(&k.rules).all(|((w, _), r)| w == r);
        if !rules_same {
            out.push(c(format!(
                "chain postrouting rewritten ({} -> {} rules)",
                k.rules.len(),
                self.rules.len()
            )));
        }
        if out.is_empty() {
            out.push(c(format!("table {FAMILY} {TABLE} objects re-created")));
        }
        out
    }
}

fn render_rule(r: &Rule, prefixes: &[Ipv4Net]) -> String {
    let mut s = format!("oifname \"{}\"", r.oifname);
    if r.daddr.is_some() {
        let nets: Vec<String> = prefixes.iter().map(|n| n.to_string()).collect();
        let _ = write!(s, " ip daddr {{ {} }}", nets.join(", "));
    }
    if let Some(q) = &r.quota {
        let _ = write!(s, " quota name \"{q}\"");
    }
    if let Some(c) = &r.counter {
        let _ = write!(s, " counter name \"{c}\"");
    }
    s.push_str(match r.verdict {
        Verdict::Accept => " accept",
        Verdict::Drop => " drop",
    });
    s
}

/// The script that removes the table.
pub fn delete_script() -> String {
    format!("delete table {FAMILY} {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured on this project's test machine (nftables 1.0.6) after applying a script with a
    /// volume lease on a peer scope, a floor peer scope and an unlimited egress lease.
    pub(crate) const TABLE_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "nicwarden", "handle": 2}}, {"quota": {"family": "inet", "name": "q7", "table": "nicwarden", "handle": 2, "bytes": 1000000, "used": 5000, "inv": true}}, {"counter": {"family": "inet", "name": "d7", "table": "nicwarden", "handle": 3, "packets": 0, "bytes": 0}}, {"counter": {"family": "inet", "name": "p7", "table": "nicwarden", "handle": 4, "packets": 0, "bytes": 0}}, {"quota": {"family": "inet", "name": "q9", "table": "nicwarden", "handle": 5, "bytes": 4611686018427387904, "used": 56, "inv": true}}, {"counter": {"family": "inet", "name": "d9", "table": "nicwarden", "handle": 6, "packets": 0, "bytes": 0}}, {"counter": {"family": "inet", "name": "p9", "table": "nicwarden", "handle": 7, "packets": 1, "bytes": 56}}, {"chain": {"family": "inet", "table": "nicwarden", "name": "postrouting", "handle": 1, "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 9, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "198.19.1.0", "len": 24}}, {"prefix": {"addr": "198.19.2.128", "len": 25}}]}}}, {"quota": "q7"}, {"counter": "d7"}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 11, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "198.19.1.0", "len": 24}}, {"prefix": {"addr": "198.19.2.128", "len": 25}}]}}}, {"counter": "p7"}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 12, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "198.19.3.0", "len": 24}}}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 13, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"quota": "q9"}, {"counter": "d9"}, {"drop": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 14, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"counter": "p9"}, {"accept": null}]}}]}"#;

    /// Adjacent prefixes merged by nft, a /32 printed as a bare address.
    pub(crate) const MERGED_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "nicwarden", "handle": 4}}, {"counter": {"family": "inet", "name": "p7", "table": "nicwarden", "handle": 2, "packets": 10, "bytes": 1000}}, {"quota": {"family": "inet", "name": "q7", "table": "nicwarden", "handle": 3, "bytes": 100, "used": 100, "inv": true}}, {"chain": {"family": "inet", "table": "nicwarden", "name": "postrouting", "handle": 1, "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 5, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": [{"prefix": {"addr": "198.19.0.0", "len": 23}}, "198.19.5.5"]}}}, {"counter": "p7"}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 6, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "198.19.7.7"}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "nicwarden", "chain": "postrouting", "handle": 7, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "fab0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "198.19.7.7"}}, {"quota": "q7"}, {"drop": null}]}}]}"#;

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().expect("addr"))
    }

    #[test]
    fn parses_real_table_json() {
        let k = NftKernel::parse(TABLE_JSON).expect("parse");
        assert!(k.chain_ok);
        assert!(k.foreign.is_empty(), "{:?}", k.foreign);
        assert_eq!(
            k.quotas.get("q7"),
            Some(&KQuota {
                bytes: 1_000_000,
                used: 5000,
                inv: true
            })
        );
        assert_eq!(
            k.counters.get("p9"),
            Some(&KCounter {
                packets: 1,
                bytes: 56
            })
        );
        assert_eq!(k.rules.len(), 5);
        assert_eq!(
            k.rules[0],
            Rule {
                oifname: "fab0".into(),
                daddr: Some(vec![
                    (ip("198.19.1.0"), ip("198.19.1.255")),
                    (ip("198.19.2.128"), ip("198.19.2.255"))
                ]),
                quota: Some("q7".into()),
                counter: Some("d7".into()),
                verdict: Verdict::Drop,
            }
        );
        assert_eq!(
            k.rules[2].daddr,
            Some(vec![(ip("198.19.3.0"), ip("198.19.3.255"))])
        );
        assert_eq!(k.rules[3].daddr, None);

        let m = NftKernel::parse(MERGED_JSON).expect("parse");
        assert_eq!(
            m.rules[0].daddr,
            Some(vec![
                (ip("198.19.0.0"), ip("198.19.1.255")),
                (ip("198.19.5.5"), ip("198.19.5.5"))
            ])
        );
        assert_eq!(
            m.rules[1].daddr,
            Some(vec![(ip("198.19.7.7"), ip("198.19.7.7"))])
        );
        // An anonymous counter is not ours.
        let anon = TABLE_JSON.replace(
            r#"{"counter": "p9"}"#,
            r#"{"counter": {"packets": 0, "bytes": 0}}"#,
        );
        let a = NftKernel::parse(&anon).expect("parse");
        assert_eq!(a.foreign, ["rule 14 in chain postrouting"]);
        assert!(NftKernel::parse("{}").is_err());
    }

    #[test]
    fn merges_ranges() {
        #[track_caller]
        fn check(input: &[(u32, u32)], expect: &[(u32, u32)]) {
            assert_eq!(merge(input.to_vec()), expect);
        }
        check(&[], &[]);
        check(&[(5, 9), (0, 4)], &[(0, 9)]);
        check(&[(0, 4), (6, 9)], &[(0, 4), (6, 9)]);
        check(&[(0, 10), (2, 3)], &[(0, 10)]);
        check(&[(0, u32::MAX), (7, 7)], &[(0, u32::MAX)]);
    }
}
