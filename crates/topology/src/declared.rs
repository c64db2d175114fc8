//! The declared topology: which nodes and switches exist, their fabric ports, and which
//! links the operator says should exist.
//!
//! The operator writes a TOML file (see [`parse`]); `nicwarden topology apply FILE` parses
//! and validates it here before the controller stores it (versioned, keyed by
//! [`Topology::fingerprint`]). A [`Topology`] is the validated, canonical form:
//!
//! ```toml
//! version_note = "rack 12 after re-cabling"   # optional free text
//! [defaults]
//! rtt_max_us = 2000          # default bound per link (optional, default 2000)
//! [nodes.node1]
//! ports = ["fab0"]
//! [switches.leaf1]
//! ports = ["p1", "p2"]
//! [[links]]
//! a = "node1:fab0"
//! b = "leaf1:p1"
//! rtt_max_us = 500           # optional per link
//! ```
//!
//! Design:
//! - Validation reports *every* problem it finds (a [`Problem`] each, naming the object and,
//!   for links, the link's 1-based position in the file and its text), so the operator fixes
//!   the file in one go. Unknown keys are refused (`deny_unknown_fields`): a typo in
//!   `rtt_max_us` must not silently fall back to the default.
//! - A link joins two ports and needs at least one node end: node–node or node–switch.
//!   Switch–switch links are refused, because switches do not probe, so nothing could ever
//!   verify such a link. A port carries at most one link.
//! - Links are stored in canonical orientation: the node end first, and for node–node links
//!   the smaller `device:port` first. Finding subjects and the fingerprint use that
//!   orientation, so swapping `a` and `b` in the file changes nothing.
//! - A switch is an L2 segment: a probe sent into it reaches every node port attached to
//!   it, and the switch announces which of its ports the prober is on (LLDP-like); see
//!   [`Topology::expected_neighbors`].
//! - A [`Topology`] read back from the controller's store (serde) is trusted as validated;
//!   [`Topology::validate`] re-checks one from elsewhere.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The RTT bound of a link when neither the link nor `[defaults]` sets one.
pub const DEFAULT_RTT_MAX_US: u64 = 2000;

/// The longest device or port name.
pub const MAX_NAME_LEN: usize = 63;

/// One port of one device: `device:port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub device: String,
    pub port: String,
}

impl Endpoint {
    pub fn new(device: impl Into<String>, port: impl Into<String>) -> Self {
        Endpoint {
            device: device.into(),
            port: port.into(),
        }
    }

    /// Parses `DEVICE:PORT` (exactly one colon, both parts non-empty).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some((device, port))
                if !device.is_empty() && !port.is_empty() && !port.contains(':') =>
            {
                Ok(Endpoint::new(device, port))
            }
            _ => Err(format!("endpoint {text:?} must be DEVICE:PORT")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.device, self.port)
    }
}

/// A node or a switch: its fabric ports, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub ports: Vec<String>,
}

/// An expected link between two ports, in canonical orientation (node end in `a`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub a: Endpoint,
    pub b: Endpoint,
    /// The largest acceptable probe round-trip time over this link, in microseconds.
    pub rtt_max_us: u64,
}

impl Link {
    /// The end of this link opposite `end`, if `end` is one of its ends.
    pub fn other_end(&self, end: &Endpoint) -> Option<&Endpoint> {
        if &self.a == end {
            Some(&self.b)
        } else if &self.b == end {
            Some(&self.a)
        } else {
            None
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} <-> {}", self.a, self.b)
    }
}

/// A validated topology (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The operator's free-text note; not part of the [`fingerprint`](Self::fingerprint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_note: Option<String>,
    pub nodes: BTreeMap<String, Device>,
    pub switches: BTreeMap<String, Device>,
    /// In file order, each in canonical orientation.
    pub links: Vec<Link>,
}

impl Topology {
    pub fn is_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    pub fn is_switch(&self, name: &str) -> bool {
        self.switches.contains_key(name)
    }

    /// The declared link `end` is on, if any. (A linear scan; the verifier builds an index.)
    pub fn link_of(&self, end: &Endpoint) -> Option<&Link> {
        self.links.iter().find(|l| &l.a == end || &l.b == end)
    }

    /// The other end of the link `end` is on.
    pub fn peer_of(&self, end: &Endpoint) -> Option<&Endpoint> {
        self.link_of(end).and_then(|l| l.other_end(end))
    }

    /// Whom a probe sent on the node port `node_port` should hear back from, sorted:
    /// - the other end, if its link goes to another node's port;
    /// - if its link goes to a switch port: that switch port (switches announce the port a
    ///   prober is on, like LLDP) and every *other* node port linked to the same switch
    ///   (the switch floods probes: an L2 segment).
    ///
    /// Empty for a port without a link or a port that is not a node's.
    pub fn expected_neighbors(&self, node_port: &Endpoint) -> Vec<Endpoint> {
        if !self.is_node(&node_port.device) {
            return Vec::new();
        }
        let Some(peer) = self.peer_of(node_port) else {
            return Vec::new();
        };
        if !self.is_switch(&peer.device) {
            return vec![peer.clone()];
        }
        let mut out = BTreeSet::from([peer.clone()]);
        for l in &self.links {
            // Canonical orientation: a switch end is always `b`.
            if l.b.device == peer.device && &l.a != node_port && self.is_node(&l.a.device) {
                out.insert(l.a.clone());
            }
        }
        out.into_iter().collect()
    }

    /// A stable 64-bit FNV-1a hash (16 hex digits) of the canonical form: devices with
    /// their sorted ports, links sorted, with their RTT bounds. Two files declaring the same
    /// topology (in any order, with any link orientation, any note) have the same
    /// fingerprint. It is for change detection only, **not** security: FNV is not
    /// collision-resistant.
    pub fn fingerprint(&self) -> String {
        let mut canon = String::new();
        for (kind, devices) in [("node", &self.nodes), ("switch", &self.switches)] {
            for (name, d) in devices {
                let ports: BTreeSet<&String> = d.ports.iter().collect();
                canon.push_str(kind);
                canon.push(' ');
                canon.push_str(name);
                for p in ports {
                    canon.push(' ');
                    canon.push_str(p);
                }
                canon.push('\n');
            }
        }
        let mut links: Vec<String> = self
            .links
            .iter()
            .map(|l| {
                let (a, b) = canonical_ends(self, l.a.clone(), l.b.clone());
                format!("link {a} {b} {}\n", l.rtt_max_us)
            })
            .collect();
        links.sort();
        for l in links {
            canon.push_str(&l);
        }
        format!("{:016x}", fnv1a64(canon.as_bytes()))
    }

    /// Re-checks a topology that did not come from [`parse`] (e.g. built in code). The
    /// link numbers in problems are 1-based positions in `links`.
    pub fn validate(&self) -> Result<(), TopologyError> {
        let raw = RawFile {
            version_note: self.version_note.clone(),
            defaults: RawDefaults::default(),
            nodes: raw_devices(&self.nodes),
            switches: raw_devices(&self.switches),
            links: self
                .links
                .iter()
                .map(|l| RawLink {
                    a: l.a.to_string(),
                    b: l.b.to_string(),
                    rtt_max_us: Some(l.rtt_max_us),
                })
                .collect(),
        };
        build(raw).map(|_| ())
    }
}

fn raw_devices(d: &BTreeMap<String, Device>) -> BTreeMap<String, RawDevice> {
    d.iter()
        .map(|(n, d)| {
            (
                n.clone(),
                RawDevice {
                    ports: d.ports.clone(),
                },
            )
        })
        .collect()
}

/// FNV-1a, 64 bits.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Orders a link's ends: a node end before a switch end; otherwise the smaller first.
fn canonical_ends(t: &Topology, a: Endpoint, b: Endpoint) -> (Endpoint, Endpoint) {
    let a_switch = t.is_switch(&a.device);
    let b_switch = t.is_switch(&b.device);
    if (a_switch, &a) <= (b_switch, &b) {
        (a, b)
    } else {
        (b, a)
    }
}

/// Whether `name` matches `[A-Za-z0-9._-]{1,63}`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where a link problem is: its 1-based position in the file and its text as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkRef {
    pub index: usize,
    pub text: String,
}

impl fmt::Display for LinkRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link {} ({})", self.index, self.text)
    }
}

/// One thing wrong with a topology file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{what} name {name:?} is invalid: names are 1-63 characters of A-Z a-z 0-9 . _ -")]
    BadName { what: String, name: String },
    #[error("{device}: port {port} is listed more than once")]
    DuplicatePort { device: String, port: String },
    #[error("{name} is declared both as a node and as a switch")]
    NodeAndSwitch { name: String },
    #[error("defaults: rtt_max_us must be greater than 0")]
    ZeroDefaultRtt,
    #[error("{link}: {reason}")]
    BadEndpoint { link: LinkRef, reason: String },
    #[error("{link}: no node or switch is named {device}")]
    UnknownDevice { link: LinkRef, device: String },
    #[error("{link}: {device} has no port {port}; {}", ports_text(.ports))]
    UnknownPort {
        link: LinkRef,
        device: String,
        port: String,
        ports: Vec<String>,
    },
    #[error("{link}: both ends are on {device} (a self-link)")]
    SelfLink { link: LinkRef, device: String },
    #[error(
        "{link}: both ends are switches; a link needs a node end, since switches do not probe"
    )]
    SwitchToSwitch { link: LinkRef },
    #[error("{link}: {endpoint} is already used by link {other}")]
    PortInUse {
        link: LinkRef,
        endpoint: Endpoint,
        other: usize,
    },
    #[error("{link}: rtt_max_us must be greater than 0")]
    ZeroRtt { link: LinkRef },
}

fn ports_text(ports: &[String]) -> String {
    if ports.is_empty() {
        "it has no ports".into()
    } else {
        format!("its ports are {}", ports.join(", "))
    }
}

/// Reading a topology file failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Not TOML, or not of the topology file's shape (unknown key, wrong type).
    #[error("parse topology file: {0}")]
    Syntax(String),
    /// Well-formed, but wrong: every problem found.
    #[error("validate topology: {}", problems_text(.0))]
    Invalid(Vec<Problem>),
}

fn problems_text(problems: &[Problem]) -> String {
    let mut s = format!(
        "{} problem{}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    s
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    version_note: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    nodes: BTreeMap<String, RawDevice>,
    #[serde(default)]
    switches: BTreeMap<String, RawDevice>,
    #[serde(default)]
    links: Vec<RawLink>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    rtt_max_us: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    #[serde(default)]
    ports: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    a: String,
    b: String,
    rtt_max_us: Option<u64>,
}

/// Parses and validates a topology file (see the module docs for the format).
pub fn parse(text: &str) -> Result<Topology, TopologyError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| TopologyError::Syntax(e.to_string()))?;
    build(raw)
}

fn build(raw: RawFile) -> Result<Topology, TopologyError> {
    let mut problems = Vec::new();

    let default_rtt = match raw.defaults.rtt_max_us {
        Some(0) => {
            problems.push(Problem::ZeroDefaultRtt);
            DEFAULT_RTT_MAX_US
        }
        Some(v) => v,
        None => DEFAULT_RTT_MAX_US,
    };

    for (kind, devices) in [("node", &raw.nodes), ("switch", &raw.switches)] {
        for (name, d) in devices {
            if !valid_name(name) {
                problems.push(Problem::BadName {
                    what: kind.into(),
                    name: name.clone(),
                });
            }
            let mut seen = BTreeSet::new();
            let mut reported = BTreeSet::new();
            for p in &d.ports {
                if !valid_name(p) && reported.insert(p) {
                    problems.push(Problem::BadName {
                        what: format!("{kind} {name}: port"),
                        name: p.clone(),
                    });
                }
                if !seen.insert(p) && reported.insert(p) {
                    problems.push(Problem::DuplicatePort {
                        device: name.clone(),
                        port: p.clone(),
                    });
                }
            }
        }
    }
    for name in raw.nodes.keys() {
        if raw.switches.contains_key(name) {
            problems.push(Problem::NodeAndSwitch { name: name.clone() });
        }
    }

    let mut topo = Topology {
        version_note: raw.version_note,
        nodes: raw
            .nodes
            .into_iter()
            .map(|(n, d)| (n, Device { ports: d.ports }))
            .collect(),
        switches: raw
            .switches
            .into_iter()
            .map(|(n, d)| (n, Device { ports: d.ports }))
            .collect(),
        links: Vec::new(),
    };

    // Which link (1-based) first used each port.
    let mut used: BTreeMap<Endpoint, usize> = BTreeMap::new();
    for (i, l) in raw.links.into_iter().enumerate() {
        let link = LinkRef {
            index: i + 1,
            text: format!("{} <-> {}", l.a, l.b),
        };
        let before = problems.len();
        let mut ends = Vec::new();
        for text in [&l.a, &l.b] {
            match Endpoint::parse(text) {
                Err(reason) => problems.push(Problem::BadEndpoint {
                    link: link.clone(),
                    reason,
                }),
                Ok(e) => {
                    let device = topo.nodes.get(&e.device).or(topo.switches.get(&e.device));
                    match device {
                        None => problems.push(Problem::UnknownDevice {
                            link: link.clone(),
                            device: e.device.clone(),
                        }),
                        Some(d) if !d.ports.contains(&e.port) => {
                            problems.push(Problem::UnknownPort {
                                link: link.clone(),
                                device: e.device.clone(),
                                port: e.port.clone(),
                                ports: d.ports.clone(),
                            })
                        }
                        Some(_) => ends.push(e),
                    }
                }
            }
        }
        if l.rtt_max_us == Some(0) {
            problems.push(Problem::ZeroRtt { link: link.clone() });
        }
        if let [a, b] = ends.as_slice() {
            if a.device == b.device {
                problems.push(Problem::SelfLink {
                    link: link.clone(),
                    device: a.device.clone(),
                });
            } else {
                if topo.is_switch(&a.device) && topo.is_switch(&b.device) {
                    problems.push(Problem::SwitchToSwitch { link: link.clone() });
                }
                for e in [a, b] {
                    if let Some(&other) = used.get(e) {
                        problems.push(Problem::PortInUse {
                            link: link.clone(),
                            endpoint: e.clone(),
                            other,
                        });
                    }
                }
            }
        }
        // Ports of a link are taken even if the link has other problems, so a later link
        // reusing them is reported too.
        for e in &ends {
            used.entry(e.clone()).or_insert(i + 1);
        }
        if problems.len() == before {
            // No problem means both ends resolved.
            if let [a, b] = ends.as_slice() {
                let (a, b) = canonical_ends(&topo, a.clone(), b.clone());
                topo.links.push(Link {
                    a,
                    b,
                    rtt_max_us: l.rtt_max_us.unwrap_or(default_rtt),
                });
            }
        }
    }

    if problems.is_empty() {
        Ok(topo)
    } else {
        Err(TopologyError::Invalid(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICES: &str = r#"
[nodes.node1]
ports = ["fab0"]
[nodes.node2]
ports = ["fab0", "fab1"]
[nodes.node3]
ports = ["fab0"]
[switches.leaf1]
ports = ["p1", "p2", "p3"]
"#;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).expect("endpoint")
    }

    /// Parses `DEVICES` + `extra`; expects `Ok` with links as `a <-> b rtt`, or exactly
    /// these problem messages.
    fn check(extra: &str, expect: Result<&[&str], &[&str]>) {
        let text = format!("{DEVICES}{extra}");
        match (parse(&text), expect) {
            (Ok(t), Ok(links)) => {
                let got: Vec<String> = t
                    .links
                    .iter()
                    .map(|l| format!("{l} {}", l.rtt_max_us))
                    .collect();
                assert_eq!(got, links, "{extra}");
                assert_eq!(t.validate(), Ok(()), "{extra}");
            }
            (Err(TopologyError::Invalid(problems)), Err(msgs)) => {
                let got: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                assert_eq!(got, msgs, "{extra}");
            }
            (got, expect) => panic!("{extra}: got {got:?}, expected {expect:?}"),
        }
    }

    fn link(a: &str, b: &str) -> String {
        format!("[[links]]\na = \"{a}\"\nb = \"{b}\"\n")
    }

    #[test]
    fn parse_cases() {
        check("", Ok(&[]));
        check(
            &link("node1:fab0", "leaf1:p1"),
            Ok(&["node1:fab0 <-> leaf1:p1 2000"]),
        );
        // Canonical orientation: node end first, then the smaller end.
        check(
            &link("leaf1:p1", "node1:fab0"),
            Ok(&["node1:fab0 <-> leaf1:p1 2000"]),
        );
        check(
            &link("node2:fab1", "node1:fab0"),
            Ok(&["node1:fab0 <-> node2:fab1 2000"]),
        );
        check(
            &format!(
                "[defaults]\nrtt_max_us = 700\n{}{}rtt_max_us = 500\n",
                link("node1:fab0", "leaf1:p1"),
                link("node2:fab1", "node3:fab0")
            ),
            Ok(&[
                "node1:fab0 <-> leaf1:p1 700",
                "node2:fab1 <-> node3:fab0 500",
            ]),
        );
        check(
            &link("node1:fab9", "leaf1:p1"),
            Err(&["link 1 (node1:fab9 <-> leaf1:p1): node1 has no port fab9; its ports are fab0"]),
        );
        check(
            &link("node9:fab0", "leaf1:p1"),
            Err(&["link 1 (node9:fab0 <-> leaf1:p1): no node or switch is named node9"]),
        );
        check(
            &link("node1fab0", "leaf1:p1"),
            Err(&[r#"link 1 (node1fab0 <-> leaf1:p1): endpoint "node1fab0" must be DEVICE:PORT"#]),
        );
        check(
            &link("node1:fab0:x", ":p1"),
            Err(&[
                r#"link 1 (node1:fab0:x <-> :p1): endpoint "node1:fab0:x" must be DEVICE:PORT"#,
                r#"link 1 (node1:fab0:x <-> :p1): endpoint ":p1" must be DEVICE:PORT"#,
            ]),
        );
        check(
            &link("node2:fab0", "node2:fab1"),
            Err(&["link 1 (node2:fab0 <-> node2:fab1): both ends are on node2 (a self-link)"]),
        );
        check(
            &link("leaf1:p1", "leaf1:p2"),
            Err(&["link 1 (leaf1:p1 <-> leaf1:p2): both ends are on leaf1 (a self-link)"]),
        );
        check(
            &format!(
                "{}{}",
                link("node1:fab0", "leaf1:p1"),
                link("node2:fab0", "leaf1:p1")
            ),
            Err(&["link 2 (node2:fab0 <-> leaf1:p1): leaf1:p1 is already used by link 1"]),
        );
        check(
            &format!("{}rtt_max_us = 0\n", link("node1:fab0", "leaf1:p1")),
            Err(&["link 1 (node1:fab0 <-> leaf1:p1): rtt_max_us must be greater than 0"]),
        );
        check(
            &format!(
                "[defaults]\nrtt_max_us = 0\n{}",
                link("node1:fab0", "leaf1:p1")
            ),
            Err(&["defaults: rtt_max_us must be greater than 0"]),
        );
        check(
            "[nodes.node4]\nports = [\"fab0\", \"fab0\", \"bad port\"]\n",
            Err(&[
                "node4: port fab0 is listed more than once",
                r#"node node4: port name "bad port" is invalid: names are 1-63 characters of A-Z a-z 0-9 . _ -"#,
            ]),
        );
        check(
            "[switches.node1]\nports = []\n[switches.spine1]\nports = [\"p1\"]\n[nodes.x]\nports = []\n",
            Err(&["node1 is declared both as a node and as a switch"]),
        );
        check(
            &format!("[nodes.{}]\nports = []\n", "n".repeat(64)),
            Err(&[&format!(
                "node name {:?} is invalid: names are 1-63 characters of A-Z a-z 0-9 . _ -",
                "n".repeat(64)
            )]),
        );
        check(
            "[nodes.\"a/b\"]\nports = []\n",
            Err(&[r#"node name "a/b" is invalid: names are 1-63 characters of A-Z a-z 0-9 . _ -"#]),
        );
    }

    #[test]
    fn switch_to_switch_is_refused() {
        let text = "[switches.leaf1]\nports = [\"p1\"]\n[switches.spine1]\nports = [\"p1\"]\n\
                    [[links]]\na = \"leaf1:p1\"\nb = \"spine1:p1\"\n";
        let err = parse(text).expect_err("switch-switch");
        assert!(err.to_string().contains("both ends are switches"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let extra = format!(
            "{}{}{}{}",
            link("node1:fab0", "leaf1:p1"),
            link("node1:fab9", "leaf1:p2"),
            link("node3:fab0", "leaf1:p1"),
            link("node2:fab0", "ghost:p1"),
        );
        let err = parse(&format!("{DEVICES}{extra}")).expect_err("invalid");
        let TopologyError::Invalid(problems) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(problems.len(), 3, "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("validate topology: 3 problems\n  - link 2 "),
            "{text}"
        );
        assert!(
            text.contains("link 3 (node3:fab0 <-> leaf1:p1): leaf1:p1 is already used by link 1")
        );
        assert!(text.contains("link 4 (node2:fab0 <-> ghost:p1): no node or switch is named ghost"));
    }

    #[test]
    fn syntax_errors_and_unknown_fields() {
        for (text, fragment) in [
            ("nodes = 3", "parse topology file"),
            ("[nodes.n1]\nport = [\"fab0\"]\n", "unknown field `port`"),
            ("[defaults]\nrtt_max = 5\n", "unknown field `rtt_max`"),
            (
                "[[links]]\na = \"n:p\"\nb = \"m:q\"\nrtt = 3\n",
                "unknown field `rtt`",
            ),
            ("colour = \"red\"\n", "unknown field `colour`"),
            ("[[links]]\na = \"n:p\"\n", "missing field `b`"),
            (
                "[nodes.n1]\nports = [\"a\"]\n[nodes.n1]\nports = [\"b\"]\n",
                "parse topology file",
            ),
        ] {
            match parse(text) {
                Err(e @ TopologyError::Syntax(_)) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("parse topology file: "), "{msg}");
                    assert!(msg.contains(fragment), "{text}: {msg}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    fn sample() -> Topology {
        let text = format!(
            "version_note = \"rack 12\"\n[switches.leaf2]\nports = [\"p1\"]\n[nodes.node4]\nports = [\"fab0\"]\n{DEVICES}{}{}{}{}",
            link("node1:fab0", "leaf1:p1"),
            link("leaf1:p2", "node2:fab0"),
            link("node3:fab0", "leaf1:p3"),
            link("node2:fab1", "node4:fab0"),
        );
        parse(&text).expect("sample parses")
    }

    #[test]
    fn lookups_and_expected_neighbors() {
        let t = sample();
        assert!(t.is_node("node1") && !t.is_switch("node1"));
        assert!(t.is_switch("leaf1") && !t.is_node("leaf1"));
        assert_eq!(t.version_note.as_deref(), Some("rack 12"));
        assert_eq!(t.peer_of(&ep("leaf1:p2")), Some(&ep("node2:fab0")));
        assert_eq!(t.peer_of(&ep("node4:fab0")), Some(&ep("node2:fab1")));
        assert_eq!(t.peer_of(&ep("leaf2:p1")), None);
        assert_eq!(
            t.link_of(&ep("node2:fab1")).map(|l| l.to_string()),
            Some("node2:fab1 <-> node4:fab0".into())
        );
        for (port, expect) in [
            ("node1:fab0", "leaf1:p1 node2:fab0 node3:fab0"),
            ("node2:fab0", "leaf1:p2 node1:fab0 node3:fab0"),
            ("node2:fab1", "node4:fab0"),
            ("node4:fab0", "node2:fab1"),
            ("node4:fab9", ""),
            ("leaf1:p1", ""),
            ("ghost:p1", ""),
        ] {
            let got: Vec<String> = t
                .expected_neighbors(&ep(port))
                .iter()
                .map(|e| e.to_string())
                .collect();
            assert_eq!(got.join(" "), expect, "{port}");
        }
    }

    #[test]
    fn fingerprint_ignores_order_orientation_and_note() {
        let t = sample();
        let fp = t.fingerprint();
        assert_eq!(fp.len(), 16);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));

        let mut same = t.clone();
        same.links.reverse();
        same.version_note = None;
        if let Some(l) = same.links.first_mut() {
            std::mem::swap(&mut l.a, &mut l.b);
        }
        if let Some(d) = same.nodes.get_mut("node2") {
            d.ports.reverse();
        }
        assert_eq!(same.fingerprint(), fp);

        let mut slower = t.clone();
        if let Some(l) = slower.links.first_mut() {
            l.rtt_max_us += 1;
        }
        assert_ne!(slower.fingerprint(), fp);
        let mut fewer = t.clone();
        fewer.links.pop();
        assert_ne!(fewer.fingerprint(), fp);
        let mut more_ports = t;
        if let Some(d) = more_ports.switches.get_mut("leaf2") {
            d.ports.push("p2".into());
        }
        assert_ne!(more_ports.fingerprint(), fp);
    }

    #[test]
    fn serde_round_trip_and_validate() {
        let t = sample();
        let json = serde_json::to_string(&t).expect("serialize");
        assert!(
            json.contains(r#""a":{"device":"node2","port":"fab0"}"#),
            "{json}"
        );
        let back: Topology = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, t);
        assert_eq!(back.validate(), Ok(()));

        let mut bad = t;
        bad.links.push(Link {
            a: ep("node1:fab0"),
            b: ep("node3:fab0"),
            rtt_max_us: 0,
        });
        let err = bad.validate().expect_err("invalid");
        let msg = err.to_string();
        assert!(
            msg.contains("link 5 (node1:fab0 <-> node3:fab0): rtt_max_us must be greater than 0"),
            "{msg}"
        );
        assert!(
            msg.contains("node1:fab0 is already used by link 1"),
            "{msg}"
        );
        assert!(
            msg.contains("node3:fab0 is already used by link 3"),
            "{msg}"
        );
    }

    #[test]
    fn names() {
        for (name, ok) in [
            ("node-1.a_b", true),
            ("N", true),
            ("", false),
            ("a b", false),
            ("a:b", false),
            ("é", false),
        ] {
            assert_eq!(valid_name(name), ok, "{name:?}");
        }
        assert!(valid_name(&"x".repeat(63)));
        assert!(!valid_name(&"x".repeat(64)));
    }
}
