//! The quota tree (fabric -> groups -> nodes -> leases) and its allocators.
//!
//! Architecture Invariant: allocation is a pure function of the tree and the wants. For every
//! tree node the sum of its children's allocations never exceeds its capacity, and no lease is
//! ever allocated more than it wants.

use crate::{LeaseId, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How a tree node divides its capacity among its children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// First come, first served: children in order (earliest grant first) each take what they
    /// want while capacity remains. Earlier grants are never cut by later ones.
    #[default]
    Static,
    /// Max-min fair water-filling: small wants are met in full, the rest is shared equally.
    FairShare,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Static => "static",
            Algorithm::FairShare => "fair_share",
        })
    }
}

impl std::str::FromStr for Algorithm {
    type Err = QuotaError;
    fn from_str(s: &str) -> Result<Self, QuotaError> {
        match s {
            "static" => Ok(Algorithm::Static),
            "fair_share" | "fair-share" => Ok(Algorithm::FairShare),
            _ => Err(QuotaError::Invalid {
                op: "parse allocation algorithm".into(),
                reason: format!("`{s}` is not one of `static`, `fair_share`"),
            }),
        }
    }
}

/// Errors of quota-tree edits and allocation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// A value or name is not acceptable.
    #[error("{op}: {reason}")]
    Invalid { op: String, reason: String },
    /// The named group or node is not in the tree.
    #[error("{op}: {what} does not exist")]
    NotFound { op: String, what: String },
    /// A group cannot be removed while nodes belong to it.
    #[error("{op}: group {group} still has nodes ({})", nodes.join(", "))]
    GroupNotEmpty {
        op: String,
        group: String,
        nodes: Vec<NodeId>,
    },
    /// `allocate` was given a want for a node the tree does not know.
    #[error("allocate quota: lease {lease} names node {node}, which is not in the quota tree")]
    UnknownNode { lease: LeaseId, node: NodeId },
    /// `allocate` was given two wants for one lease.
    #[error("allocate quota: lease {0} appears more than once")]
    DuplicateLease(LeaseId),
}

/// Capacity and algorithm of the fabric root or of one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaEntry {
    pub capacity_bps: u64,
    pub algorithm: Algorithm,
}

/// Quota of one node: its group, its capacity, and how it divides it among its leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeQuota {
    pub group: String,
    pub capacity_bps: u64,
    pub algorithm: Algorithm,
}

/// The whole quota configuration: fabric root, groups, nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaTree {
    pub fabric: QuotaEntry,
    pub groups: BTreeMap<String, QuotaEntry>,
    pub nodes: BTreeMap<NodeId, NodeQuota>,
}

/// The group every tree starts with.
pub const DEFAULT_GROUP: &str = "default";

/// Checks a group or node name: `[A-Za-z0-9._-]{1,63}`.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name `{name}` is invalid: it must be 1 to 63 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

fn invalid(op: String, reason: String) -> QuotaError {
    QuotaError::Invalid { op, reason }
}

impl QuotaTree {
    /// A tree with the fabric root and one group, `default`, with the same capacity and algorithm.
    pub fn new(fabric_capacity_bps: u64, algorithm: Algorithm) -> Self {
        let entry = QuotaEntry {
            capacity_bps: fabric_capacity_bps,
            algorithm,
        };
        QuotaTree {
            fabric: entry.clone(),
            groups: BTreeMap::from([(DEFAULT_GROUP.to_string(), entry)]),
            nodes: BTreeMap::new(),
        }
    }

    pub fn set_fabric(
        &mut self,
        capacity_bps: u64,
        algorithm: Algorithm,
    ) -> Result<(), QuotaError> {
        if capacity_bps == 0 {
            return Err(invalid(
                "set fabric quota".into(),
                "capacity must be > 0".into(),
            ));
        }
        self.fabric = QuotaEntry {
            capacity_bps,
            algorithm,
        };
        Ok(())
    }

    /// Creates or updates a group.
    pub fn set_group(
        &mut self,
        name: &str,
        capacity_bps: u64,
        algorithm: Algorithm,
    ) -> Result<(), QuotaError> {
        let op = || format!("set quota of group {name}");
        validate_name("group", name).map_err(|r| invalid(op(), r))?;
        if name == "fabric" {
            return Err(invalid(
                op(),
                "the name `fabric` is reserved for the root".into(),
            ));
        }
        if capacity_bps == 0 {
            return Err(invalid(op(), "capacity must be > 0".into()));
        }
        self.groups.insert(
            name.to_string(),
            QuotaEntry {
                capacity_bps,
                algorithm,
            },
        );
        Ok(())
    }

    /// Creates or updates a node (possibly moving it to another group).
    pub fn set_node(
        &mut self,
        name: &str,
        group: &str,
        capacity_bps: u64,
        algorithm: Algorithm,
    ) -> Result<(), QuotaError> {
        let op = || format!("set quota of node {name}");
        validate_name("node", name).map_err(|r| invalid(op(), r))?;
        if !self.groups.contains_key(group) {
            return Err(QuotaError::NotFound {
                op: op(),
                what: format!("group {group}"),
            });
        }
        if capacity_bps == 0 {
            return Err(invalid(op(), "capacity must be > 0".into()));
        }
        self.nodes.insert(
            name.to_string(),
            NodeQuota {
                group: group.to_string(),
                capacity_bps,
                algorithm,
            },
        );
        Ok(())
    }

    pub fn remove_node(&mut self, name: &str) -> Result<NodeQuota, QuotaError> {
        self.nodes.remove(name).ok_or_else(|| QuotaError::NotFound {
            op: format!("remove node {name} from the quota tree"),
            what: format!("node {name}"),
        })
    }

    /// Removes an empty group.
    pub fn remove_group(&mut self, name: &str) -> Result<(), QuotaError> {
        let op = || format!("remove group {name}");
        if !self.groups.contains_key(name) {
            return Err(QuotaError::NotFound {
                op: op(),
                what: format!("group {name}"),
            });
        }
        let members: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, q)| q.group == name)
            .map(|(n, _)| n.clone())
            .collect();
        if !members.is_empty() {
            return Err(QuotaError::GroupNotEmpty {
                op: op(),
                group: name.to_string(),
                nodes: members,
            });
        }
        self.groups.remove(name);
        Ok(())
    }

    /// Every node's group exists, every capacity is > 0, every name is valid.
    pub fn validate(&self) -> Result<(), QuotaError> {
        let op = || "validate quota tree".to_string();
        if self.fabric.capacity_bps == 0 {
            return Err(invalid(op(), "fabric capacity must be > 0".into()));
        }
        for (name, g) in &self.groups {
            validate_name("group", name).map_err(|r| invalid(op(), r))?;
            if name == "fabric" {
                return Err(invalid(op(), "the group name `fabric` is reserved".into()));
            }
            if g.capacity_bps == 0 {
                return Err(invalid(
                    op(),
                    format!("capacity of group {name} must be > 0"),
                ));
            }
        }
        for (name, n) in &self.nodes {
            validate_name("node", name).map_err(|r| invalid(op(), r))?;
            if !self.groups.contains_key(&n.group) {
                return Err(QuotaError::NotFound {
                    op: op(),
                    what: format!("group {} of node {name}", n.group),
                });
            }
            if n.capacity_bps == 0 {
                return Err(invalid(
                    op(),
                    format!("capacity of node {name} must be > 0"),
                ));
            }
        }
        Ok(())
    }

    /// True if the fabric, the node's group and the node all use [`Algorithm::Static`]
    /// (false for unknown nodes or groups).
    pub fn path_is_static(&self, node: &str) -> bool {
        let Some(nq) = self.nodes.get(node) else {
            return false;
        };
        let Some(g) = self.groups.get(&nq.group) else {
            return false;
        };
        self.fabric.algorithm == Algorithm::Static
            && g.algorithm == Algorithm::Static
            && nq.algorithm == Algorithm::Static
    }
}

/// Divide `capacity` among children with these wants. Never returns a total > capacity; each
/// share <= its want.
///
/// Static: in order, each gets `min(want, remaining)`. FairShare: max-min fair water-filling
/// (Doorman: capacity 120, wants [1000, 50, 10] -> [60, 50, 10]); rounding leftovers go to the
/// largest wants, so no capacity is lost while some want is unmet.
pub fn divide(capacity: u64, algorithm: Algorithm, wants: &[u64]) -> Vec<u64> {
    let mut shares = vec![0u64; wants.len()];
    let mut remaining = capacity;
    match algorithm {
        Algorithm::Static => {
            for (share, &want) in shares.iter_mut().zip(wants) {
                *share = want.min(remaining);
                remaining -= *share;
            }
        }
        Algorithm::FairShare => {
            // Smallest wants first: each takes at most an equal part of what is left; whatever
            // it does not take is left for the larger ones. Among equal wants the later
            // children go first, so rounding leftovers favour the earlier (older) ones.
            let mut order: Vec<usize> = (0..wants.len()).collect();
            order.sort_by_key(|&i| (wants[i], std::cmp::Reverse(i)));
            let n = order.len() as u64;
            for (k, &i) in order.iter().enumerate() {
                let fair = remaining / (n - k as u64);
                shares[i] = wants[i].min(fair);
                remaining -= shares[i];
            }
        }
    }
    shares
}

/// One lease's want, as input to [`allocate`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub lease: LeaseId,
    pub node: NodeId,
    pub want_bps: u64,
}

/// Hierarchical allocation fabric -> groups -> nodes -> leases.
///
/// `demand(subtree) = min(capacity, sum of children demands)`; then top down each level's
/// capacity (the fabric's capacity, then each child's allocation) is divided among its
/// children's demands with that level's algorithm. Children are ordered by their smallest
/// [`LeaseId`], so under Static earlier grants keep priority. Every want appears in the result.
pub fn allocate(tree: &QuotaTree, wants: &[Want]) -> Result<BTreeMap<LeaseId, u64>, QuotaError> {
    /// node -> [(lease, want)]
    type NodeWants<'a> = BTreeMap<&'a str, Vec<(LeaseId, u64)>>;
    let mut by_group: BTreeMap<&str, NodeWants> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for w in wants {
        let nq = tree
            .nodes
            .get(&w.node)
            .ok_or_else(|| QuotaError::UnknownNode {
                lease: w.lease,
                node: w.node.clone(),
            })?;
        if !tree.groups.contains_key(&nq.group) {
            return Err(QuotaError::NotFound {
                op: "allocate quota".into(),
                what: format!("group {} of node {}", nq.group, w.node),
            });
        }
        if out.insert(w.lease, 0).is_some() {
            return Err(QuotaError::DuplicateLease(w.lease));
        }
        by_group
            .entry(nq.group.as_str())
            .or_default()
            .entry(w.node.as_str())
            .or_default()
            .push((w.lease, w.want_bps));
    }

    struct NodeAlloc<'a> {
        name: &'a str,
        first: LeaseId,
        demand: u64,
        leases: Vec<(LeaseId, u64)>,
    }
    struct GroupAlloc<'a> {
        name: &'a str,
        first: LeaseId,
        demand: u64,
        nodes: Vec<NodeAlloc<'a>>,
    }

    let mut groups: Vec<GroupAlloc> = Vec::new();
    for (gname, nodes) in by_group {
        let mut ns = Vec::new();
        for (nname, mut leases) in nodes {
            leases.sort();
            let cap = tree.nodes.get(nname).map_or(0, |q| q.capacity_bps);
            let sum: u128 = leases.iter().map(|&(_, w)| u128::from(w)).sum();
            ns.push(NodeAlloc {
                name: nname,
                first: leases[0].0,
                demand: min_cap(cap, sum),
                leases,
            });
        }
        ns.sort_by_key(|n| n.first);
        let cap = tree.groups.get(gname).map_or(0, |g| g.capacity_bps);
        let sum: u128 = ns.iter().map(|n| u128::from(n.demand)).sum();
        groups.push(GroupAlloc {
            name: gname,
            first: ns[0].first,
            demand: min_cap(cap, sum),
            nodes: ns,
        });
    }
    groups.sort_by_key(|g| g.first);

    let gdemands: Vec<u64> = groups.iter().map(|g| g.demand).collect();
    let gshares = divide(tree.fabric.capacity_bps, tree.fabric.algorithm, &gdemands);
    for (g, gshare) in groups.iter().zip(gshares) {
        let galgo = tree
            .groups
            .get(g.name)
            .map_or(Algorithm::Static, |e| e.algorithm);
        let ndemands: Vec<u64> = g.nodes.iter().map(|n| n.demand).collect();
        let nshares = divide(gshare, galgo, &ndemands);
        for (n, nshare) in g.nodes.iter().zip(nshares) {
            let nalgo = tree
                .nodes
                .get(n.name)
                .map_or(Algorithm::Static, |q| q.algorithm);
            let lwants: Vec<u64> = n.leases.iter().map(|&(_, w)| w).collect();
            let lshares = divide(nshare, nalgo, &lwants);
            for (&(id, _), share) in n.leases.iter().zip(lshares) {
                out.insert(id, share);
            }
        }
    }
    Ok(out)
}

fn min_cap(cap: u64, sum: u128) -> u64 {
    // `sum.min(cap)` fits in u64 because `cap` does.
    u64::try_from(sum.min(u128::from(cap))).unwrap_or(cap)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use Algorithm::*;

    fn check_divide(capacity: u64, algo: Algorithm, wants: &[u64], expected: &[u64]) {
        let got = divide(capacity, algo, wants);
        assert_eq!(got, expected, "divide({capacity}, {algo}, {wants:?})");
    }

    #[test]
    fn divide_cases() {
        check_divide(120, FairShare, &[1000, 50, 10], &[60, 50, 10]); // Doorman's example
        check_divide(120, Static, &[1000, 50, 10], &[120, 0, 0]);
        check_divide(120, Static, &[10, 50, 1000], &[10, 50, 60]);
        check_divide(100, Static, &[30, 30, 30], &[30, 30, 30]);
        check_divide(100, FairShare, &[30, 30, 30], &[30, 30, 30]);
        check_divide(10, FairShare, &[10, 10, 10], &[4, 3, 3]);
        check_divide(10, FairShare, &[0, 10, 10], &[0, 5, 5]);
        check_divide(0, FairShare, &[5, 5], &[0, 0]);
        check_divide(0, Static, &[5, 5], &[0, 0]);
        check_divide(100, FairShare, &[], &[]);
        check_divide(
            u64::MAX,
            FairShare,
            &[u64::MAX, u64::MAX],
            &[u64::MAX / 2 + 1, u64::MAX / 2],
        );
        check_divide(90, FairShare, &[100, 20, 100], &[35, 20, 35]);
    }

    #[test]
    fn algorithm_parse_and_display() {
        for (s, a) in [
            ("static", Static),
            ("fair_share", FairShare),
            ("fair-share", FairShare),
        ] {
            assert_eq!(s.parse::<Algorithm>(), Ok(a));
        }
        assert_eq!(FairShare.to_string(), "fair_share");
        assert_eq!(Static.to_string(), "static");
        let err = "fair".parse::<Algorithm>().unwrap_err().to_string();
        assert_eq!(
            err,
            "parse allocation algorithm: `fair` is not one of `static`, `fair_share`"
        );
        assert_eq!(serde_json::to_string(&FairShare).unwrap(), "\"fair_share\"");
    }

    fn tree() -> QuotaTree {
        let mut t = QuotaTree::new(100, Static);
        t.set_group("a", 60, FairShare).unwrap();
        t.set_group("b", 80, Static).unwrap();
        t.set_node("n1", "a", 50, Static).unwrap();
        t.set_node("n2", "a", 50, Static).unwrap();
        t.set_node("n3", "b", 80, FairShare).unwrap();
        t
    }

    /// `wants` as (lease, node, want); `expected` as (lease, share).
    fn check_alloc(t: &QuotaTree, wants: &[(u64, &str, u64)], expected: &[(u64, u64)]) {
        let ws: Vec<Want> = wants
            .iter()
            .map(|&(l, n, w)| Want {
                lease: LeaseId(l),
                node: n.to_string(),
                want_bps: w,
            })
            .collect();
        let got = allocate(t, &ws).unwrap();
        let want: BTreeMap<LeaseId, u64> = expected.iter().map(|&(l, s)| (LeaseId(l), s)).collect();
        assert_eq!(got, want, "allocate({wants:?})");
    }

    #[test]
    fn allocate_cases() {
        let t = tree();
        check_alloc(&t, &[], &[]);
        check_alloc(&t, &[(1, "n1", 10)], &[(1, 10)]);
        // node cap 50 caps a single lease
        check_alloc(&t, &[(1, "n1", 70)], &[(1, 50)]);
        // node static: first lease first
        check_alloc(&t, &[(1, "n1", 40), (2, "n1", 40)], &[(1, 40), (2, 10)]);
        // group a fair share (60) between n1 and n2
        check_alloc(&t, &[(1, "n1", 50), (2, "n2", 50)], &[(1, 30), (2, 30)]);
        check_alloc(&t, &[(1, "n1", 10), (2, "n2", 50)], &[(1, 10), (2, 50)]);
        // fabric static (100): group a (first lease 1) takes 60, b gets 40
        check_alloc(
            &t,
            &[(1, "n1", 50), (2, "n2", 50), (3, "n3", 80)],
            &[(1, 30), (2, 30), (3, 40)],
        );
        // group b first by lease id: it takes 80, a gets 20 shared fairly
        check_alloc(
            &t,
            &[(3, "n1", 50), (2, "n2", 50), (1, "n3", 80)],
            &[(3, 10), (2, 10), (1, 80)],
        );
        // node n3 fair share among its leases
        check_alloc(&t, &[(1, "n3", 100), (2, "n3", 20)], &[(1, 60), (2, 20)]);
        check_alloc(&t, &[(1, "n3", 0)], &[(1, 0)]);
    }

    #[test]
    fn allocate_errors() {
        let t = tree();
        let w = |l, n: &str| Want {
            lease: LeaseId(l),
            node: n.into(),
            want_bps: 1,
        };
        assert_eq!(
            allocate(&t, &[w(1, "zz")]).unwrap_err().to_string(),
            "allocate quota: lease 1 names node zz, which is not in the quota tree"
        );
        assert_eq!(
            allocate(&t, &[w(1, "n1"), w(1, "n2")]).unwrap_err(),
            QuotaError::DuplicateLease(LeaseId(1))
        );
    }

    fn check_edit(result: Result<(), QuotaError>, expected: &str) {
        match result {
            Ok(()) => assert_eq!("ok", expected),
            Err(e) => assert_eq!(e.to_string(), expected),
        }
    }

    #[test]
    fn tree_edits() {
        let mut t = tree();
        check_edit(t.set_group("c", 10, Static), "ok");
        check_edit(
            t.set_group("fabric", 10, Static),
            "set quota of group fabric: the name `fabric` is reserved for the root",
        );
        check_edit(
            t.set_group("bad name", 10, Static),
            "set quota of group bad name: group name `bad name` is invalid: it must be 1 to 63 characters of A-Z a-z 0-9 . _ -",
        );
        check_edit(t.set_group(&"x".repeat(64), 10, Static), &format!("set quota of group {0}: group name `{0}` is invalid: it must be 1 to 63 characters of A-Z a-z 0-9 . _ -", "x".repeat(64)));
        check_edit(t.set_group(&"x".repeat(63), 10, Static), "ok");
        check_edit(
            t.set_group("c", 0, Static),
            "set quota of group c: capacity must be > 0",
        );
        check_edit(
            t.set_node("n9", "nope", 10, Static),
            "set quota of node n9: group nope does not exist",
        );
        check_edit(
            t.set_node("n9", "c", 0, Static),
            "set quota of node n9: capacity must be > 0",
        );
        check_edit(t.set_node("n9", "c", 10, Static), "ok");
        check_edit(
            t.remove_group("c"),
            "remove group c: group c still has nodes (n9)",
        );
        check_edit(t.remove_node("n9").map(|_| ()), "ok");
        check_edit(
            t.remove_node("n9").map(|_| ()),
            "remove node n9 from the quota tree: node n9 does not exist",
        );
        check_edit(t.remove_group("c"), "ok");
        check_edit(
            t.remove_group("c"),
            "remove group c: group c does not exist",
        );
        check_edit(
            t.set_fabric(0, Static),
            "set fabric quota: capacity must be > 0",
        );
        check_edit(t.validate(), "ok");
        t.nodes.get_mut("n1").unwrap().group = "gone".into();
        check_edit(
            t.validate(),
            "validate quota tree: group gone of node n1 does not exist",
        );
    }

    #[test]
    fn new_tree_has_default_group() {
        let t = QuotaTree::new(1000, FairShare);
        assert_eq!(
            t.groups[DEFAULT_GROUP],
            QuotaEntry {
                capacity_bps: 1000,
                algorithm: FairShare
            }
        );
        assert!(t.validate().is_ok());
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<QuotaTree>(&json).unwrap(), t);
    }
}
