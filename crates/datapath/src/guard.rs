//! The fabric guard: with the mesh on and `encrypted_only`, the fabric interface carries
//! WireGuard and nothing else. Every IP packet leaving or reaching this node on the fabric
//! interface that is not UDP from or to the mesh port is dropped and counted; ARP (not IP)
//! is untouched, and so is every other interface (the management network in particular).
//!
//! It is its own nftables table, `inet nicwarden_guard`, apart from the `tc` backend's
//! `inet nicwarden`, so it works the same with either datapath backend and its life does not
//! depend on theirs. Like the rest of the datapath it outlives the agent (a stopped agent
//! must not open the fabric to plaintext); `agent --cleanup` removes it.
//!
//! The whole table is replaced in one transaction (`add table; delete table; table {...}`),
//! so there is never a moment without it once it exists. A rule comment carries the
//! interface and port, so [`FabricGuard::ensure`] can tell whether what the kernel holds is
//! what was asked, without parsing the rules.

use crate::ops::GuardOps;
use crate::DatapathError;

pub const GUARD_TABLE: &str = "nicwarden_guard";
pub const GUARD_FAMILY: &str = "inet";

/// What the guard lets through on `iface`: UDP with source or destination port `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    pub iface: String,
    pub port: u16,
}

impl GuardSpec {
    fn tag(&self) -> String {
        format!("nicwarden-guard {} udp {}", self.iface, self.port)
    }
}

/// The nft script that installs (or replaces) the guard table.
pub fn guard_script(spec: &GuardSpec) -> String {
    let (i, p, tag) = (&spec.iface, spec.port, spec.tag());
    format!(
        "add table {GUARD_FAMILY} {GUARD_TABLE}\n\
         delete table {GUARD_FAMILY} {GUARD_TABLE}\n\
         table {GUARD_FAMILY} {GUARD_TABLE} {{\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\toifname \"{i}\" udp sport {p} accept comment \"{tag}\"\n\
         \t\toifname \"{i}\" udp dport {p} accept\n\
         \t\toifname \"{i}\" counter drop comment \"plaintext out\"\n\
         \t}}\n\
         \tchain in {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tiifname \"{i}\" udp dport {p} accept\n\
         \t\tiifname \"{i}\" udp sport {p} accept\n\
         \t\tiifname \"{i}\" counter drop comment \"plaintext in\"\n\
         \t}}\n\
         }}\n"
    )
}

/// Packets the guard dropped since it was (last) installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuardCounters {
    pub dropped_out_packets: u64,
    pub dropped_in_packets: u64,
}

/// Reads the drop counters out of `nft -j list table` output: the counter of the rule whose
/// comment is `plaintext out` / `plaintext in`.
fn counters_from_json(json: &str) -> Result<GuardCounters, DatapathError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| DatapathError::Parse {
        what: "nft -j list table inet nicwarden_guard".into(),
        detail: e.to_string(),
    })?;
    let mut c = GuardCounters::default();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(comment) = rule["comment"].as_str() else {
            continue;
        };
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .unwrap_or(0);
        match comment {
            "plaintext out" => c.dropped_out_packets = packets,
            "plaintext in" => c.dropped_in_packets = packets,
            _ => {}
        }
    }
    Ok(c)
}

/// Installs, checks and removes the guard.
pub struct FabricGuard<O: GuardOps> {
    ops: O,
}

impl FabricGuard<crate::RealNft> {
    pub fn new() -> Self {
        FabricGuard {
            ops: crate::RealNft::new(),
        }
    }
}

impl Default for FabricGuard<crate::RealNft> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O: GuardOps> FabricGuard<O> {
    pub fn with_ops(ops: O) -> Self {
        FabricGuard { ops }
    }

    /// Installs the guard unless the kernel holds it already for this interface and port;
    /// returns whether it changed anything. (Counters survive when nothing changes.)
    pub fn ensure(&mut self, spec: &GuardSpec) -> Result<bool, DatapathError> {
        if let Some(json) = self.ops.list_guard_json()? {
            if json.contains(&format!("\"{}\"", spec.tag())) {
                return Ok(false);
            }
        }
        self.ops.apply_guard(&guard_script(spec))?;
        Ok(true)
    }

    /// What it dropped; `None` if it is not installed.
    pub fn counters(&mut self) -> Result<Option<GuardCounters>, DatapathError> {
        match self.ops.list_guard_json()? {
            None => Ok(None),
            Some(json) => counters_from_json(&json).map(Some),
        }
    }

    /// Removes the guard (operator cleanup); fine if it is not there.
    pub fn remove(&mut self) -> Result<(), DatapathError> {
        self.ops.apply_guard(&format!(
            "add table {GUARD_FAMILY} {GUARD_TABLE}\ndelete table {GUARD_FAMILY} {GUARD_TABLE}\n"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        table: Option<String>,
        applied: Vec<String>,
    }

    impl GuardOps for Fake {
        fn list_guard_json(&mut self) -> Result<Option<String>, DatapathError> {
            Ok(self.table.clone())
        }
        fn apply_guard(&mut self, script: &str) -> Result<(), DatapathError> {
            self.applied.push(script.to_string());
            self.table = script.contains("chain out").then(|| {
                // What nft -j would show: the tagged rule and the counters.
                let tag = script
                    .split("comment \"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_default()
                    .to_string();
                serde_json::json!({"nftables": [
                    {"rule": {"comment": tag, "expr": []}},
                    {"rule": {"comment": "plaintext out", "expr": [{"counter": {"packets": 7, "bytes": 700}}]}},
                    {"rule": {"comment": "plaintext in", "expr": [{"counter": {"packets": 3, "bytes": 300}}]}}
                ]})
                .to_string()
            });
            Ok(())
        }
    }

    fn spec() -> GuardSpec {
        GuardSpec {
            iface: "fab0".into(),
            port: 51820,
        }
    }

    #[test]
    fn script_allows_only_the_mesh_port_on_the_fabric() {
        let s = guard_script(&spec());
        assert!(
            s.starts_with("add table inet nicwarden_guard\ndelete table inet nicwarden_guard\n")
        );
        for want in [
            "oifname \"fab0\" udp sport 51820 accept",
            "oifname \"fab0\" udp dport 51820 accept",
            "oifname \"fab0\" counter drop",
            "iifname \"fab0\" udp dport 51820 accept",
            "iifname \"fab0\" counter drop",
            "hook output priority 0; policy accept;",
            "hook input priority 0; policy accept;",
        ] {
            assert!(s.contains(want), "{want} missing:\n{s}");
        }
        // Nothing matches another interface.
        assert_eq!(s.matches("ifname").count(), 6);
    }

    #[test]
    fn ensure_installs_once_and_reads_counters() {
        let mut g = FabricGuard::with_ops(Fake::default());
        assert_eq!(g.counters().expect("counters"), None);
        assert!(g.ensure(&spec()).expect("ensure"));
        assert!(
            !g.ensure(&spec()).expect("ensure again"),
            "reinstalled needlessly"
        );
        assert_eq!(
            g.counters().expect("counters"),
            Some(GuardCounters {
                dropped_out_packets: 7,
                dropped_in_packets: 3
            })
        );
        // Another port is another guard.
        assert!(g
            .ensure(&GuardSpec {
                iface: "fab0".into(),
                port: 4000
            })
            .expect("ensure"));
        g.remove().expect("remove");
        assert_eq!(g.counters().expect("counters"), None);
        assert_eq!(g.ops.applied.len(), 3);
    }
}
