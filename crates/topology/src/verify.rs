//! The verifier: diffs what agents observed against the declared topology, checks byte
//! conservation between node pairs, and keeps the resulting findings.
//!
//! [`Verifier`] is a sans-IO state machine in the controller. Inputs come in through
//! [`Verifier::round`] (one probing round of one port), [`Verifier::bytes`] (one counter
//! window of one node pair), [`Verifier::set_topology`] and [`Verifier::tick`]; each returns
//! the [`Change`]s to the finding set it caused. Time is passed in ([`Time`], controller
//! milliseconds) and never read; the verifier's clock is the largest time it was given.
//!
//! # Judging links
//!
//! With `K = missing_after_rounds` (at least 1), a port's *window* is its last `K` rounds.
//! - A port is judged only while it is **probing**: its last round is at most
//!   `K * probe_interval_ms` old. A port that resumes after a longer gap starts a fresh
//!   window. A node that never probes produces no findings of its own, but its neighbours
//!   judge its links.
//! - **MissingLink** (per declared link): a probing port with `K` rounds did not hear a
//!   neighbour it expects ([`Topology::expected_neighbors`]) in any of them. Not hearing the
//!   other end of its own link, or its switch's announcement, blames its own link; not
//!   hearing another node of its switch blames *that* node's link, but only if the prober
//!   heard its own switch port in the window (otherwise its own link explains the silence).
//! - **UnexpectedLink** (per unordered pair of ports): a probing port heard a trusted
//!   neighbour ([`Heard::Node`] or [`Heard::Switch`]) in its window that it does not expect,
//!   first heard at least one probe interval ago. The wait lets the other ports' rounds of
//!   the same interval arrive, so that a swap seen from one side first is reported as one
//!   Miswired finding, not as an unexpected link raised and cleared a moment later.
//! - **Miswired** (per pair of declared links): two declared links `u–u'` and `v–v'` are
//!   observed as the crossed pairs `u–v` and `u'–v'` (each heard from either end). This
//!   replaces the two unexpected and two missing findings. A node port whose crossed pair is
//!   a switch port is taken to be on that switch, so its hearing the nodes of that switch is
//!   explained too. A rotation of three or more cables is not a swap: it shows as
//!   unexpected and missing links.
//! - **Unauthenticated** (per probing port): an unsigned, badly signed or replayed answer in
//!   the window. **UnknownNeighbor** (per probing port): an answer signed by an identity the
//!   controller does not know. Both are judged with or without a declared topology.
//! - **RttExceeded** (per unordered pair of ports): the median of the last 3 RTT samples
//!   (the lower middle of 2; the only one of 1) of an expected neighbour heard in the window
//!   exceeds the bound: the link's `rtt_max_us` for the other end of the port's own link (a
//!   node or the switch), the sum of both links' bounds for another node across a switch.
//! - **Flapping** (per declared link): the link changed state `flap_changes` times within
//!   `flap_window_ms`, as seen by a port on it: each round of the port is up (it heard the
//!   other end of its link) or down. A single lost answer is two changes: with the defaults,
//!   two isolated lost answers in a minute are flapping. The count is the larger of the two
//!   ends' counts (a node–node link is seen from both ends; a node–switch link from its
//!   node).
//!
//! Without a declared topology only Unauthenticated and UnknownNeighbor are judged.
//!
//! # Byte conservation
//!
//! Per ordered pair `(from, to)`, the latest [`ByteSample`] is judged: with
//! `accounted = received + dropped_at_receiver` and
//! `tolerance = byte_tolerance_bytes + byte_tolerance_ratio * sent`, a **ByteMismatch** is
//! `accounted > sent + tolerance` (more arrived than was sent: injected or forged traffic,
//! or a sender under-reporting) or `sent > accounted + tolerance` (bytes vanished: a tap that
//! diverts, loss on the wire, or a receiver under-reporting). It clears with the next
//! window within tolerance; it does not expire with time, so a node cannot clear it by
//! going silent. A sample older than the pair's latest (by `window_end`) is ignored.
//!
//! # Findings
//!
//! A finding's `id` is `kind:subject`. After every input the verifier recomputes the
//! conditions that hold and diffs them against its findings: a new one is `Raised`
//! (`first_seen = last_seen = now`), one still holding gets `last_seen = now` and is
//! `Updated` only if its severity, culprits or detail changed (so a steady finding does not
//! produce a change per round), one no longer holding is `Cleared` and dropped. Changes come
//! sorted by id. Each input re-evaluates only what it can change: rounds, ticks and topology
//! the link findings, byte samples the byte findings; the cost is linear in the probing
//! ports and what they heard.
//!
//! Default severities ([`FindingKind::default_severity`]): Critical for Unauthenticated,
//! UnknownNeighbor and ByteMismatch (someone is lying or on the wire); Warning for
//! MissingLink, UnexpectedLink, Miswired, RttExceeded and Flapping (most often cabling or
//! hardware, possibly a relay). Info is not produced by the verifier.
//!
//! Culprits (the nodes a revoke [`Policy`] would cut off):
//! - MissingLink, Flapping: none (a cable, not a node, is at fault as far as we know).
//! - UnexpectedLink: the unexpected node(s) heard (a switch is no node). When both ends
//!   hear each other, an end that also heard its expected neighbours is in place and is not
//!   named, unless that would name nobody.
//! - Miswired: the node ends of both links.
//! - Unauthenticated, UnknownNeighbor: the claim in an untrusted answer is worth nothing
//!   (blaming the claimed node would let anyone on the wire get any node cut off), so the
//!   culprit is who can have sent it: on a declared point-to-point link, the node at its
//!   other end (only it, or a tap on the cable, can put frames there); on a switch port,
//!   nobody (any device on the segment could have).
//! - RttExceeded: both node ends.
//! - ByteMismatch: both ends: the verifier cannot tell which one lies.

use crate::{Endpoint, Heard, Link, PortRound, Topology};
use nicwarden_lease::{NodeId, Time};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// How many RTT samples per neighbour the median is taken over.
const RTT_SAMPLES: usize = 3;

/// Tunables of the [`Verifier`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierConfig {
    /// How often agents probe each port.
    pub probe_interval_ms: u64,
    /// A declared neighbour unheard for this many consecutive rounds of a probing port is
    /// missing; also the window for every other per-port judgement (0 counts as 1).
    pub missing_after_rounds: u32,
    pub flap_window_ms: u64,
    /// State changes of one link within the window that make it flapping (0 counts as 1).
    pub flap_changes: u32,
    /// Allowance for bytes in flight at a window's edge.
    pub byte_tolerance_bytes: u64,
    /// Further allowance, as a fraction of the bytes sent (negative or NaN counts as 0).
    pub byte_tolerance_ratio: f64,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig {
            probe_interval_ms: 1000,
            missing_after_rounds: 3,
            flap_window_ms: 60_000,
            flap_changes: 4,
            byte_tolerance_bytes: 64 * 1024,
            byte_tolerance_ratio: 0.001,
        }
    }
}

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    MissingLink,
    UnexpectedLink,
    Miswired,
    Unauthenticated,
    UnknownNeighbor,
    RttExceeded,
    Flapping,
    ByteMismatch,
}

impl FindingKind {
    pub const ALL: [FindingKind; 8] = [
        FindingKind::MissingLink,
        FindingKind::UnexpectedLink,
        FindingKind::Miswired,
        FindingKind::Unauthenticated,
        FindingKind::UnknownNeighbor,
        FindingKind::RttExceeded,
        FindingKind::Flapping,
        FindingKind::ByteMismatch,
    ];

    /// The name used in ids, serde and policies: `missing_link`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::MissingLink => "missing_link",
            FindingKind::UnexpectedLink => "unexpected_link",
            FindingKind::Miswired => "miswired",
            FindingKind::Unauthenticated => "unauthenticated",
            FindingKind::UnknownNeighbor => "unknown_neighbor",
            FindingKind::RttExceeded => "rtt_exceeded",
            FindingKind::Flapping => "flapping",
            FindingKind::ByteMismatch => "byte_mismatch",
        }
    }

    /// See the module docs.
    pub fn default_severity(self) -> Severity {
        match self {
            FindingKind::Unauthenticated
            | FindingKind::UnknownNeighbor
            | FindingKind::ByteMismatch => Severity::Critical,
            FindingKind::MissingLink
            | FindingKind::UnexpectedLink
            | FindingKind::Miswired
            | FindingKind::RttExceeded
            | FindingKind::Flapping => Severity::Warning,
        }
    }

    fn is_bytes(self) -> bool {
        self == FindingKind::ByteMismatch
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// A deviation of the observed interconnect from the declared one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// `kind:subject`: stable while the condition holds, so it can be updated and cleared.
    pub id: String,
    pub kind: FindingKind,
    pub severity: Severity,
    /// What it is about: a link `node1:fab0 <-> leaf1:p1`, a port `node1:fab0`, two links
    /// `… , …`, or a direction `node1 -> node2`.
    pub subject: String,
    /// The nodes a revoke policy would cut off, sorted (see the module docs).
    pub culprits: Vec<NodeId>,
    pub first_seen: Time,
    /// The last time the condition was found to hold.
    pub last_seen: Time,
    /// Human text with the numbers.
    pub detail: String,
}

/// A change to the finding set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change", content = "finding")]
pub enum Change {
    Raised(Finding),
    /// Still holding; severity, culprits or detail changed.
    Updated(Finding),
    /// No longer holds (the finding as it was last seen).
    Cleared(Finding),
}

impl Change {
    pub fn finding(&self) -> &Finding {
        match self {
            Change::Raised(f) | Change::Updated(f) | Change::Cleared(f) => f,
        }
    }
}

/// What two nodes' datapaths counted for the traffic from one to the other in one window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteSample {
    pub from: NodeId,
    pub to: NodeId,
    pub window_start: Time,
    pub window_end: Time,
    /// Bytes `from`'s datapath counted as sent to `to` in the window.
    pub sent: u64,
    /// Bytes `to`'s datapath counted as received from `from` in the window.
    pub received: u64,
    /// Bytes `to`'s datapath dropped from `from` (policer, blocked) in the window.
    pub dropped_at_receiver: u64,
}

/// Which finding kinds revoke the culprits' leases. Default: none (report only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub revoke: BTreeSet<FindingKind>,
}

/// Revoke `node`'s leases because of a finding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RevokeAction {
    pub node: NodeId,
    pub finding_id: String,
    pub reason: String,
}

/// A trusted neighbour heard: a node's signed answer or a switch's announcement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    switch: bool,
    end: Endpoint,
}

#[derive(Debug, Default)]
struct RoundSummary {
    trusted: BTreeSet<Seen>,
    untrusted: Vec<Heard>,
}

#[derive(Debug, Default)]
struct PortState {
    last_at: Time,
    /// The window: at most `K` rounds, newest last.
    rounds: VecDeque<RoundSummary>,
    /// The last RTT samples of each trusted neighbour heard in the window.
    rtt: BTreeMap<Seen, VecDeque<u64>>,
    /// When each trusted neighbour heard in the window was first heard (since it last
    /// entered the window).
    since: BTreeMap<Seen, Time>,
}

impl PortState {
    fn heard(&self) -> BTreeSet<&Seen> {
        self.rounds.iter().flat_map(|r| r.trusted.iter()).collect()
    }
}

/// A declared link, by its canonical ends.
type LinkKey = (Endpoint, Endpoint);

/// One direction of an unexpected pair: who heard whom, and whether it has settled (was
/// first heard at least a probe interval ago).
type Hearing = (Endpoint, Seen, bool);

#[derive(Debug, Default)]
struct FlapState {
    up: Option<bool>,
    changes: VecDeque<Time>,
}

/// The declared topology with lookups.
#[derive(Debug)]
struct Index {
    topo: Topology,
    link_at: BTreeMap<Endpoint, usize>,
    /// Per switch, the node ports linked to it.
    attached: BTreeMap<String, Vec<Endpoint>>,
}

impl Index {
    fn new(topo: Topology) -> Self {
        let mut link_at = BTreeMap::new();
        let mut attached: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        for (i, l) in topo.links.iter().enumerate() {
            link_at.insert(l.a.clone(), i);
            link_at.insert(l.b.clone(), i);
            if topo.is_switch(&l.b.device) && topo.is_node(&l.a.device) {
                attached
                    .entry(l.b.device.clone())
                    .or_default()
                    .push(l.a.clone());
            }
        }
        Index {
            topo,
            link_at,
            attached,
        }
    }

    fn link(&self, e: &Endpoint) -> Option<(usize, &Link)> {
        let i = *self.link_at.get(e)?;
        self.topo.links.get(i).map(|l| (i, l))
    }

    fn peer(&self, e: &Endpoint) -> Option<&Endpoint> {
        self.link(e).and_then(|(_, l)| l.other_end(e))
    }

    fn seen(&self, e: &Endpoint) -> Seen {
        Seen {
            switch: self.topo.is_switch(&e.device),
            end: e.clone(),
        }
    }

    /// The switch a node port is declared on.
    fn switch_of(&self, e: &Endpoint) -> Option<&str> {
        self.peer(e)
            .filter(|p| self.topo.is_switch(&p.device))
            .map(|p| p.device.as_str())
    }

    /// Whether the node port `p` expects to hear `s` (see `Topology::expected_neighbors`).
    fn expects(&self, p: &Endpoint, s: &Seen) -> bool {
        if !self.topo.is_node(&p.device) || self.seen(&s.end) != *s {
            return false;
        }
        if !s.switch && !self.topo.is_node(&s.end.device) {
            return false;
        }
        match self.peer(p) {
            Some(peer) if peer == &s.end => true,
            Some(peer) if self.topo.is_switch(&peer.device) => {
                !s.switch && &s.end != p && self.switch_of(&s.end) == Some(peer.device.as_str())
            }
            _ => false,
        }
    }

    /// Everything `p` expects to hear.
    fn expected(&self, p: &Endpoint) -> Vec<Seen> {
        if !self.topo.is_node(&p.device) {
            return Vec::new();
        }
        let Some(peer) = self.peer(p) else {
            return Vec::new();
        };
        let mut out = vec![self.seen(peer)];
        if self.topo.is_switch(&peer.device) {
            for e in self.attached.get(&peer.device).into_iter().flatten() {
                if e != p {
                    out.push(self.seen(e));
                }
            }
        }
        out
    }

    /// An unordered pair of ports, node end first, then by name.
    fn pair(&self, a: &Endpoint, b: &Endpoint) -> (Endpoint, Endpoint) {
        let ka = (self.topo.is_switch(&a.device), a);
        let kb = (self.topo.is_switch(&b.device), b);
        if ka <= kb {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        }
    }

    fn node_ends(&self, ends: &[&Endpoint]) -> BTreeSet<NodeId> {
        ends.iter()
            .filter(|e| self.topo.is_node(&e.device))
            .map(|e| e.device.clone())
            .collect()
    }
}

/// A condition that holds now, before it is matched with a finding.
#[derive(Debug)]
struct Draft {
    kind: FindingKind,
    subject: String,
    culprits: BTreeSet<NodeId>,
    detail: String,
}

fn add(out: &mut BTreeMap<String, Draft>, d: Draft) {
    out.insert(format!("{}:{}", d.kind, d.subject), d);
}

fn pair_text((a, b): &(Endpoint, Endpoint)) -> String {
    format!("{a} <-> {b}")
}

/// The sans-IO interconnect verifier (see the module docs).
#[derive(Debug)]
pub struct Verifier {
    cfg: VerifierConfig,
    now: Time,
    index: Option<Index>,
    ports: BTreeMap<Endpoint, PortState>,
    flaps: BTreeMap<(LinkKey, Endpoint), FlapState>,
    samples: BTreeMap<(NodeId, NodeId), ByteSample>,
    findings: BTreeMap<String, Finding>,
}

impl Verifier {
    pub fn new(cfg: VerifierConfig) -> Self {
        Verifier {
            cfg,
            now: Time(0),
            index: None,
            ports: BTreeMap::new(),
            flaps: BTreeMap::new(),
            samples: BTreeMap::new(),
            findings: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.cfg
    }

    pub fn topology(&self) -> Option<&Topology> {
        self.index.as_ref().map(|i| &i.topo)
    }

    /// The verifier's clock: the largest time it was given.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The findings that hold, sorted by id.
    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.values()
    }

    pub fn finding(&self, id: &str) -> Option<&Finding> {
        self.findings.get(id)
    }

    /// Replaces the declared topology (`None`: verify no links) and re-evaluates the link
    /// findings. Flap history of links that are no longer declared is dropped.
    pub fn set_topology(&mut self, t: Option<Topology>, now: Time) -> Vec<Change> {
        self.advance(now);
        self.index = t.map(Index::new);
        let keep: BTreeSet<LinkKey> = self
            .topology()
            .map(|t| t.links.iter().map(|l| (l.a.clone(), l.b.clone())).collect())
            .unwrap_or_default();
        self.flaps.retain(|(link, _), _| keep.contains(link));
        let drafts = self.evaluate_links();
        self.reconcile(drafts, false)
    }

    /// One probing round of one port (its `at` is the time). A round older than the port's
    /// latest is ignored.
    pub fn round(&mut self, r: PortRound) -> Vec<Change> {
        let port = r.endpoint();
        if self.ports.get(&port).is_some_and(|s| r.at < s.last_at) {
            return Vec::new();
        }
        self.advance(r.at);
        let k = self.k();
        let span = self.probing_span();
        let st = self.ports.entry(port.clone()).or_default();
        if !st.rounds.is_empty() && st.last_at.millis_until(r.at) > span {
            // It stopped probing for a while: start over.
            st.rounds.clear();
            st.rtt.clear();
            st.since.clear();
        }
        let mut summary = RoundSummary::default();
        for a in r.heard {
            let seen = match &a.heard {
                Heard::Node(e) => Seen {
                    switch: false,
                    end: e.clone(),
                },
                Heard::Switch(e) => Seen {
                    switch: true,
                    end: e.clone(),
                },
                _ => {
                    summary.untrusted.push(a.heard);
                    continue;
                }
            };
            if let Some(rtt) = a.rtt_us {
                let samples = st.rtt.entry(seen.clone()).or_default();
                samples.push_back(rtt);
                while samples.len() > RTT_SAMPLES {
                    samples.pop_front();
                }
            }
            st.since.entry(seen.clone()).or_insert(r.at);
            summary.trusted.insert(seen);
        }
        let heard_peer_now = self
            .index
            .as_ref()
            .and_then(|ix| Some((ix, ix.link(&port)?, ix.peer(&port)?)))
            .map(|(ix, (_, l), peer)| {
                let key = (l.a.clone(), l.b.clone());
                (key, summary.trusted.contains(&ix.seen(peer)))
            });
        st.rounds.push_back(summary);
        while st.rounds.len() > k {
            st.rounds.pop_front();
        }
        st.last_at = r.at;
        let heard: BTreeSet<Seen> = st.heard().into_iter().cloned().collect();
        st.rtt.retain(|s, _| heard.contains(s));
        st.since.retain(|s, _| heard.contains(s));

        if let Some((key, up)) = heard_peer_now {
            let fs = self.flaps.entry((key, port)).or_default();
            if fs.up.is_some_and(|was| was != up) {
                fs.changes.push_back(r.at);
            }
            fs.up = Some(up);
        }
        self.prune_flaps();
        let drafts = self.evaluate_links();
        self.reconcile(drafts, false)
    }

    /// One byte-counter window of one node pair; `now` is the controller's time of receipt.
    pub fn bytes(&mut self, s: ByteSample, now: Time) -> Vec<Change> {
        let key = (s.from.clone(), s.to.clone());
        if self
            .samples
            .get(&key)
            .is_some_and(|prev| s.window_end < prev.window_end)
        {
            return Vec::new();
        }
        self.advance(now);
        self.samples.insert(key, s);
        let drafts = self.evaluate_bytes();
        self.reconcile(drafts, true)
    }

    /// Time passed: ports that stopped probing are no longer judged, flap windows slide.
    pub fn tick(&mut self, now: Time) -> Vec<Change> {
        self.advance(now);
        self.prune_flaps();
        let drafts = self.evaluate_links();
        self.reconcile(drafts, false)
    }

    /// The revocations `policy` asks for, given changes this verifier returned: every
    /// culprit of each raised or updated finding whose kind the policy revokes on and that
    /// still holds. Sorted, without duplicates.
    pub fn policy_actions(&self, changes: &[Change], policy: &Policy) -> Vec<RevokeAction> {
        let mut out = BTreeSet::new();
        for c in changes {
            let f = match c {
                Change::Raised(f) | Change::Updated(f) => f,
                Change::Cleared(_) => continue,
            };
            if !policy.revoke.contains(&f.kind) || !self.findings.contains_key(&f.id) {
                continue;
            }
            for node in &f.culprits {
                out.insert(RevokeAction {
                    node: node.clone(),
                    finding_id: f.id.clone(),
                    reason: format!("{} {}: {}", f.kind, f.subject, f.detail),
                });
            }
        }
        out.into_iter().collect()
    }

    fn advance(&mut self, now: Time) {
        self.now = self.now.max(now);
    }

    fn k(&self) -> usize {
        self.cfg.missing_after_rounds.max(1) as usize
    }

    /// How old a port's last round may be for the port to count as probing.
    fn probing_span(&self) -> u64 {
        u64::from(self.cfg.missing_after_rounds.max(1)).saturating_mul(self.cfg.probe_interval_ms)
    }

    fn prune_flaps(&mut self) {
        let now = self.now;
        let window = self.cfg.flap_window_ms;
        for fs in self.flaps.values_mut() {
            while fs
                .changes
                .front()
                .is_some_and(|t| t.plus_millis(window) <= now)
            {
                fs.changes.pop_front();
            }
        }
    }

    fn probing(&self) -> impl Iterator<Item = (&Endpoint, &PortState)> {
        let span = self.probing_span();
        let now = self.now;
        self.ports
            .iter()
            .filter(move |(_, s)| !s.rounds.is_empty() && s.last_at.millis_until(now) <= span)
    }

    fn evaluate_links(&self) -> BTreeMap<String, Draft> {
        let mut out = BTreeMap::new();
        self.evaluate_untrusted(&mut out);
        if let Some(ix) = &self.index {
            self.evaluate_declared(ix, &mut out);
        }
        out
    }

    /// Unauthenticated and UnknownNeighbor, per probing port.
    fn evaluate_untrusted(&self, out: &mut BTreeMap<String, Draft>) {
        let k = self.k();
        for (port, st) in self.probing() {
            for kind in [FindingKind::Unauthenticated, FindingKind::UnknownNeighbor] {
                // (label, claimed) -> count
                let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
                let mut culprits = BTreeSet::new();
                if let Some(ix) = &self.index {
                    if let Some(other) = ix.topo.peer_of(port) {
                        if ix.topo.is_node(&other.device) {
                            culprits.insert(other.device.clone());
                        }
                    }
                }
                for h in st.rounds.iter().flat_map(|r| r.untrusted.iter()) {
                    let unknown = matches!(h, Heard::UnknownIdentity { .. });
                    if unknown != (kind == FindingKind::UnknownNeighbor) {
                        continue;
                    }
                    let claimed = h.claimed();
                    let text = claimed.map_or("nothing".into(), |c| c.to_string());
                    *seen.entry((h.label(), text)).or_default() += 1;
                }
                if seen.is_empty() {
                    continue;
                }
                let answers: Vec<String> = seen
                    .iter()
                    .map(|((label, claimed), n)| format!("{n} {label} claiming {claimed}"))
                    .collect();
                add(
                    out,
                    Draft {
                        kind,
                        subject: port.to_string(),
                        culprits,
                        detail: format!(
                            "{port} got untrusted answers in its last {k} rounds: {}",
                            answers.join(", ")
                        ),
                    },
                );
            }
        }
    }

    /// Missing, unexpected, miswired, RTT and flapping, against the declared topology.
    fn evaluate_declared(&self, ix: &Index, out: &mut BTreeMap<String, Draft>) {
        let k = self.k();
        // Unordered pair -> (hearer, heard, settled) directions.
        let mut unexpected: BTreeMap<(Endpoint, Endpoint), Vec<Hearing>> = BTreeMap::new();
        // Declared link -> why it is missing.
        let mut missing: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        // Unordered pair -> RTT complaints.
        let mut slow: BTreeMap<(Endpoint, Endpoint), Vec<String>> = BTreeMap::new();
        // Ports that heard at least one neighbour they expect.
        let mut in_place: BTreeSet<Endpoint> = BTreeSet::new();

        for (p, st) in self.probing() {
            let heard = st.heard();
            for s in &heard {
                if !ix.expects(p, s) {
                    let settled = st
                        .since
                        .get(*s)
                        .is_some_and(|t| t.plus_millis(self.cfg.probe_interval_ms) <= self.now);
                    unexpected.entry(ix.pair(p, &s.end)).or_default().push((
                        p.clone(),
                        (*s).clone(),
                        settled,
                    ));
                    continue;
                }
                in_place.insert(p.clone());
                let Some(samples) = st.rtt.get(*s) else {
                    continue;
                };
                let mut sorted: Vec<u64> = samples.iter().copied().collect();
                sorted.sort_unstable();
                let Some(&median) = sorted.get(sorted.len().saturating_sub(1) / 2) else {
                    continue;
                };
                let own = ix.link(p).map_or(0, |(_, l)| l.rtt_max_us);
                let (bound, how) = if ix.peer(p) == Some(&s.end) {
                    (own, "the link's bound".to_string())
                } else {
                    let theirs = ix.link(&s.end).map_or(0, |(_, l)| l.rtt_max_us);
                    (
                        own.saturating_add(theirs),
                        format!("the sum of both links' bounds, {own} + {theirs} us"),
                    )
                };
                if median > bound {
                    slow.entry(ix.pair(p, &s.end)).or_default().push(format!(
                        "{p} -> {}: median RTT {median} us of the last {} samples exceeds {bound} us ({how})",
                        s.end,
                        sorted.len()
                    ));
                }
            }
            if st.rounds.len() < k {
                continue;
            }
            let Some(own_peer) = ix.peer(p) else {
                continue;
            };
            let own_heard = heard.contains(&ix.seen(own_peer));
            for x in ix.expected(p) {
                if heard.contains(&x) {
                    continue;
                }
                let blamed = if &x.end == own_peer {
                    ix.link(p)
                } else if own_heard {
                    ix.link(&x.end)
                } else {
                    None
                };
                if let Some((i, _)) = blamed {
                    missing.entry(i).or_default().push(format!(
                        "{p} heard nothing from {} in its last {k} rounds",
                        x.end
                    ));
                }
            }
        }

        // Swaps: an unexpected pair u–v on two declared links whose other ends u'–v' are
        // also an unexpected pair.
        let mut swaps: BTreeMap<(usize, usize), Vec<(Endpoint, Endpoint)>> = BTreeMap::new();
        for (u, v) in unexpected.keys() {
            let (Some((lu, _)), Some((lv, _))) = (ix.link(u), ix.link(v)) else {
                continue;
            };
            let (Some(pu), Some(pv)) = (ix.peer(u), ix.peer(v)) else {
                continue;
            };
            if lu == lv {
                continue;
            }
            let partner = ix.pair(pu, pv);
            if unexpected.contains_key(&partner) {
                let pairs = swaps.entry((lu.min(lv), lu.max(lv))).or_default();
                for pr in [(u.clone(), v.clone()), partner] {
                    if !pairs.contains(&pr) {
                        pairs.push(pr);
                    }
                }
            }
        }
        let mut explained: BTreeSet<(Endpoint, Endpoint)> = BTreeSet::new();
        let mut swapped_links: BTreeSet<usize> = BTreeSet::new();
        // Node port -> the switch it is actually on, per a swap.
        let mut actually_on: BTreeMap<Endpoint, String> = BTreeMap::new();
        for ((l1, l2), pairs) in &swaps {
            swapped_links.insert(*l1);
            swapped_links.insert(*l2);
            for (a, b) in pairs {
                explained.insert((a.clone(), b.clone()));
                if ix.topo.is_switch(&b.device) && ix.topo.is_node(&a.device) {
                    actually_on.insert(a.clone(), b.device.clone());
                }
            }
        }
        let on_switch = |e: &Endpoint| -> Option<String> {
            actually_on
                .get(e)
                .cloned()
                .or_else(|| ix.switch_of(e).map(str::to_string))
        };
        for (u, v) in unexpected.keys() {
            if explained.contains(&(u.clone(), v.clone())) {
                continue;
            }
            if (actually_on.contains_key(u) || actually_on.contains_key(v))
                && ix.topo.is_node(&u.device)
                && ix.topo.is_node(&v.device)
            {
                let su = on_switch(u);
                if su.is_some() && su == on_switch(v) {
                    explained.insert((u.clone(), v.clone()));
                }
            }
        }

        for ((l1, l2), pairs) in &swaps {
            let (Some(a), Some(b)) = (ix.topo.links.get(*l1), ix.topo.links.get(*l2)) else {
                continue;
            };
            let observed: Vec<String> = pairs.iter().map(pair_text).collect();
            add(
                out,
                Draft {
                    kind: FindingKind::Miswired,
                    subject: format!("{a}, {b}"),
                    culprits: ix.node_ends(&[&a.a, &a.b, &b.a, &b.b]),
                    detail: format!(
                        "declared {a} and {b}, observed {}: the two links look swapped",
                        observed.join(" and ")
                    ),
                },
            );
        }

        for (pr, dirs) in &unexpected {
            if explained.contains(pr) || !dirs.iter().any(|(_, _, settled)| *settled) {
                continue;
            }
            let mut heard_nodes: BTreeMap<NodeId, bool> = BTreeMap::new();
            let mut parts = Vec::new();
            for (hearer, s, _) in dirs {
                let what = if s.switch { "switch port" } else { "node" };
                let declared = match ix.link(&s.end) {
                    Some((_, l)) => format!("declared on {l}"),
                    None => "on no declared link".to_string(),
                };
                parts.push(format!("{hearer} heard {what} {} ({declared})", s.end));
                if !s.switch {
                    heard_nodes.insert(s.end.device.clone(), in_place.contains(&s.end));
                }
            }
            let out_of_place: BTreeSet<NodeId> = heard_nodes
                .iter()
                .filter(|(_, placed)| !**placed)
                .map(|(n, _)| n.clone())
                .collect();
            let culprits = if out_of_place.is_empty() {
                heard_nodes.into_keys().collect()
            } else {
                out_of_place
            };
            add(
                out,
                Draft {
                    kind: FindingKind::UnexpectedLink,
                    subject: pair_text(pr),
                    culprits,
                    detail: format!(
                        "{} in the last {k} rounds, but no declared link explains it",
                        parts.join("; ")
                    ),
                },
            );
        }

        for (i, why) in &missing {
            if swapped_links.contains(i) {
                continue;
            }
            let Some(l) = ix.topo.links.get(*i) else {
                continue;
            };
            add(
                out,
                Draft {
                    kind: FindingKind::MissingLink,
                    subject: l.to_string(),
                    culprits: BTreeSet::new(),
                    detail: why.join("; "),
                },
            );
        }

        for (pr, why) in &slow {
            add(
                out,
                Draft {
                    kind: FindingKind::RttExceeded,
                    subject: pair_text(pr),
                    culprits: ix.node_ends(&[&pr.0, &pr.1]),
                    detail: why.join("; "),
                },
            );
        }

        let needed = self.cfg.flap_changes.max(1) as usize;
        let mut flapping: BTreeMap<&LinkKey, Vec<String>> = BTreeMap::new();
        let mut most: BTreeMap<&LinkKey, usize> = BTreeMap::new();
        for ((link, observer), fs) in &self.flaps {
            let n = fs.changes.len();
            let m = most.entry(link).or_default();
            *m = (*m).max(n);
            if n > 0 {
                flapping.entry(link).or_default().push(format!(
                    "{observer} saw {n} up/down changes in the last {} ms",
                    self.cfg.flap_window_ms
                ));
            }
        }
        for (link, n) in most {
            if n < needed {
                continue;
            }
            add(
                out,
                Draft {
                    kind: FindingKind::Flapping,
                    subject: pair_text(link),
                    culprits: BTreeSet::new(),
                    detail: format!(
                        "{} (flapping at {needed})",
                        flapping.get(link).map(|v| v.join("; ")).unwrap_or_default()
                    ),
                },
            );
        }
    }

    fn evaluate_bytes(&self) -> BTreeMap<String, Draft> {
        let mut out = BTreeMap::new();
        let ratio = if self.cfg.byte_tolerance_ratio.is_finite() {
            self.cfg.byte_tolerance_ratio.max(0.0)
        } else {
            0.0
        };
        for s in self.samples.values() {
            // In u128, so that no sum saturates and hides a difference. Float-to-int `as`
            // saturates; the product is non-negative.
            let tolerance = u128::from(self.cfg.byte_tolerance_bytes)
                + u128::from((ratio * s.sent as f64) as u64);
            let sent = u128::from(s.sent);
            let accounted = u128::from(s.received) + u128::from(s.dropped_at_receiver);
            let (diff, why) = if accounted > sent + tolerance {
                (
                    accounted - sent,
                    "more arrived than was sent: injected or forged traffic, or a sender under-reporting",
                )
            } else if sent > accounted + tolerance {
                (
                    sent - accounted,
                    "bytes vanished between them: a tap that diverts, loss on the wire, or a receiver under-reporting",
                )
            } else {
                continue;
            };
            add(
                &mut out,
                Draft {
                    kind: FindingKind::ByteMismatch,
                    subject: format!("{} -> {}", s.from, s.to),
                    culprits: BTreeSet::from([s.from.clone(), s.to.clone()]),
                    detail: format!(
                        "window {}..{} ms: {} sent {} B to {}; {} received {} B and dropped {} B from {}; \
                         difference {diff} B exceeds the tolerance of {tolerance} B: {why}",
                        s.window_start.as_millis(),
                        s.window_end.as_millis(),
                        s.from,
                        s.sent,
                        s.to,
                        s.to,
                        s.received,
                        s.dropped_at_receiver,
                        s.from,
                    ),
                },
            );
        }
        out
    }

    /// Matches the conditions that hold (`drafts`, of the byte kind or of the link kinds)
    /// with the findings of the same kinds.
    fn reconcile(&mut self, drafts: BTreeMap<String, Draft>, bytes: bool) -> Vec<Change> {
        let now = self.now;
        let mut changes: BTreeMap<String, Change> = BTreeMap::new();
        let gone: Vec<String> = self
            .findings
            .iter()
            .filter(|(id, f)| f.kind.is_bytes() == bytes && !drafts.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(f) = self.findings.remove(&id) {
                changes.insert(id, Change::Cleared(f));
            }
        }
        for (id, d) in drafts {
            let severity = d.kind.default_severity();
            let culprits: Vec<NodeId> = d.culprits.into_iter().collect();
            match self.findings.get_mut(&id) {
                Some(f) => {
                    f.last_seen = now;
                    if f.severity != severity || f.culprits != culprits || f.detail != d.detail {
                        f.severity = severity;
                        f.culprits = culprits;
                        f.detail = d.detail;
                        changes.insert(id, Change::Updated(f.clone()));
                    }
                }
                None => {
                    let f = Finding {
                        id: id.clone(),
                        kind: d.kind,
                        severity,
                        subject: d.subject,
                        culprits,
                        first_seen: now,
                        last_seen: now,
                        detail: d.detail,
                    };
                    self.findings.insert(id.clone(), f.clone());
                    changes.insert(id, Change::Raised(f));
                }
            }
        }
        changes.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse, Answer};

    /// A segment (leaf1: node1..node3), a second one (leaf2: node8, node9) and two
    /// node-to-node links (node4–node5 with a 500 us bound, node6–node7).
    const TOPO: &str = r#"
[nodes.node1]
ports = ["fab0"]
[nodes.node2]
ports = ["fab0"]
[nodes.node3]
ports = ["fab0"]
[nodes.node4]
ports = ["fab0"]
[nodes.node5]
ports = ["fab0"]
[nodes.node6]
ports = ["fab0"]
[nodes.node7]
ports = ["fab0"]
[nodes.node8]
ports = ["fab0"]
[nodes.node9]
ports = ["fab0"]
[switches.leaf1]
ports = ["p1", "p2", "p3", "p4"]
[switches.leaf2]
ports = ["p1", "p2"]
[[links]]
a = "node1:fab0"
b = "leaf1:p1"
[[links]]
a = "node2:fab0"
b = "leaf1:p2"
[[links]]
a = "node3:fab0"
b = "leaf1:p3"
[[links]]
a = "node4:fab0"
b = "node5:fab0"
rtt_max_us = 500
[[links]]
a = "node6:fab0"
b = "node7:fab0"
[[links]]
a = "node8:fab0"
b = "leaf2:p1"
[[links]]
a = "node9:fab0"
b = "leaf2:p2"
"#;

    /// Every port hearing exactly what it expects.
    const HEALTHY: &[&str] = &[
        "node1:fab0 = leaf1:p1 node2:fab0 node3:fab0",
        "node2:fab0 = leaf1:p2 node1:fab0 node3:fab0",
        "node3:fab0 = leaf1:p3 node1:fab0 node2:fab0",
        "node4:fab0 = node5:fab0~100",
        "node5:fab0 = node4:fab0~100",
        "node6:fab0 = node7:fab0",
        "node7:fab0 = node6:fab0",
        "node8:fab0 = leaf2:p1 node9:fab0",
        "node9:fab0 = leaf2:p2 node8:fab0",
    ];

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).expect("endpoint")
    }

    fn claim(s: Option<&str>) -> Option<Endpoint> {
        s.map(ep)
    }

    /// `PORT = ANSWER...`: an answer is `DEVICE:PORT` (a switch if the device starts with
    /// `leaf`, else a node), optionally `~RTT_US`, or `?unsigned`, `?badsig`, `?replayed`,
    /// `?unknown`, each optionally `:DEVICE:PORT` (the claim).
    fn round(spec: &str, at: u64) -> PortRound {
        let (port, answers) = spec.split_once(" =").expect("PORT = ...");
        let port = ep(port.trim());
        let heard = answers
            .split_whitespace()
            .map(|a| {
                let (a, rtt_us) = match a.split_once('~') {
                    Some((a, r)) => (a, Some(r.parse().expect("rtt"))),
                    None => (a, None),
                };
                let heard = if let Some(bad) = a.strip_prefix('?') {
                    let (what, c) = match bad.split_once(':') {
                        Some((w, c)) => (w, Some(c)),
                        None => (bad, None),
                    };
                    let claimed = claim(c);
                    match what {
                        "unsigned" => Heard::Unsigned { claimed },
                        "badsig" => Heard::BadSignature { claimed },
                        "replayed" => Heard::Replayed { claimed },
                        "unknown" => Heard::UnknownIdentity { claimed },
                        other => panic!("bad answer kind {other}"),
                    }
                } else if a.starts_with("leaf") {
                    Heard::Switch(ep(a))
                } else {
                    Heard::Node(ep(a))
                };
                Answer { heard, rtt_us }
            })
            .collect();
        PortRound {
            node: port.device,
            port: port.port,
            at: Time(at),
            heard,
        }
    }

    fn verifier() -> Verifier {
        let mut v = Verifier::new(VerifierConfig::default());
        let t = parse(TOPO).expect("topology");
        assert_eq!(v.set_topology(Some(t), Time(0)), vec![]);
        v
    }

    /// Each spec probes once per second for `rounds` rounds (from t = 1000).
    fn steady(v: &mut Verifier, specs: &[&str], rounds: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for i in 1..=rounds {
            for s in specs {
                changes.extend(v.round(round(s, i * 1000)));
            }
        }
        changes
    }

    /// `kind subject [culprits]` per finding, plus the severity for critical ones.
    fn summary(v: &Verifier) -> Vec<String> {
        v.findings()
            .map(|f| {
                let sev = if f.severity == Severity::Critical {
                    " !"
                } else {
                    ""
                };
                format!("{} {} [{}]{sev}", f.kind, f.subject, f.culprits.join(","))
            })
            .collect()
    }

    fn check(specs: &[&str], expect: &[&str]) {
        let mut v = verifier();
        steady(&mut v, specs, 3);
        assert_eq!(summary(&v), expect, "{specs:#?}");
        // Deterministic: the same inputs give the same findings.
        let mut again = verifier();
        steady(&mut again, specs, 3);
        assert_eq!(
            v.findings().collect::<Vec<_>>(),
            again.findings().collect::<Vec<_>>()
        );
    }

    /// HEALTHY with the specs of the given ports replaced (an empty replacement: that port
    /// does not probe).
    fn healthy_but(replace: &[&str]) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for h in HEALTHY {
            let port = h.split_once(" =").map(|(p, _)| p).unwrap_or(h);
            if !replace
                .iter()
                .any(|r| r.starts_with(&format!("{port} =")) || *r == port)
            {
                out.push(h);
            }
        }
        out
    }

    fn with<'a>(base: Vec<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
        base.into_iter().chain(extra.iter().copied()).collect()
    }

    #[test]
    fn link_cases() {
        // All healthy; nobody probing; a subset probing.
        check(HEALTHY, &[]);
        check(&[], &[]);
        check(&["node1:fab0 = leaf1:p1 node2:fab0 node3:fab0"], &[]);
        // Fewer than K rounds of a port cannot make anything missing.
        let mut v = verifier();
        steady(&mut v, &["node1:fab0 ="], 2);
        assert_eq!(summary(&v), Vec::<String>::new());

        // Judged from the neighbours' side: node2 and node3 do not probe and are not heard.
        check(
            &["node1:fab0 = leaf1:p1"],
            &[
                "missing_link node2:fab0 <-> leaf1:p2 []",
                "missing_link node3:fab0 <-> leaf1:p3 []",
            ],
        );
        // node1 hears nothing at all: its own link is down; it blames nobody else's.
        check(
            &["node1:fab0 ="],
            &["missing_link node1:fab0 <-> leaf1:p1 []"],
        );
        check(
            &with(healthy_but(&["node1:fab0"]), &["node1:fab0 ="]),
            &["missing_link node1:fab0 <-> leaf1:p1 []"],
        );
        // node-to-node: from one side, and one-way.
        check(
            &["node4:fab0 ="],
            &["missing_link node4:fab0 <-> node5:fab0 []"],
        );
        check(
            &["node4:fab0 = node5:fab0", "node5:fab0 ="],
            &["missing_link node4:fab0 <-> node5:fab0 []"],
        );
        // An undeclared node on the segment: only it is named.
        check(
            &with(
                healthy_but(&["node1:fab0"]),
                &["node1:fab0 = leaf1:p1 node2:fab0 node3:fab0 rogue:eth0"],
            ),
            &["unexpected_link node1:fab0 <-> rogue:eth0 [rogue]"],
        );
        // Both hear each other; node1 is in place (it hears its switch), rogue is not.
        check(
            &with(
                healthy_but(&["node1:fab0"]),
                &[
                    "node1:fab0 = leaf1:p1 node2:fab0 node3:fab0 rogue:eth0",
                    "rogue:eth0 = node1:fab0",
                ],
            ),
            &["unexpected_link node1:fab0 <-> rogue:eth0 [rogue]"],
        );
        // A declared node heard where it is not declared.
        check(
            &with(
                healthy_but(&["node4:fab0"]),
                &["node4:fab0 = node5:fab0 node6:fab0"],
            ),
            &["unexpected_link node4:fab0 <-> node6:fab0 [node6]"],
        );
        // A port that is on no declared link hears something.
        check(
            &["node2:fab7 = node3:fab0"],
            &["unexpected_link node2:fab7 <-> node3:fab0 [node3]"],
        );
        // node1 moved to leaf1:p4 (no declared link there): unexpected + missing.
        check(
            &with(
                healthy_but(&["node1:fab0"]),
                &["node1:fab0 = leaf1:p4 node2:fab0 node3:fab0"],
            ),
            &[
                "missing_link node1:fab0 <-> leaf1:p1 []",
                "unexpected_link node1:fab0 <-> leaf1:p4 []",
            ],
        );
        // Switch ports swapped on one switch: one finding.
        check(
            &with(
                healthy_but(&["node1:fab0", "node2:fab0"]),
                &[
                    "node1:fab0 = leaf1:p2 node2:fab0 node3:fab0",
                    "node2:fab0 = leaf1:p1 node1:fab0 node3:fab0",
                ],
            ),
            &["miswired node1:fab0 <-> leaf1:p1, node2:fab0 <-> leaf1:p2 [node1,node2]"],
        );
        // Only one side of the swap reports: not provably a swap.
        check(
            &with(
                healthy_but(&["node1:fab0", "node2:fab0"]),
                &["node1:fab0 = leaf1:p2 node2:fab0 node3:fab0"],
            ),
            &[
                "missing_link node1:fab0 <-> leaf1:p1 []",
                "unexpected_link node1:fab0 <-> leaf1:p2 []",
            ],
        );
        // Node-to-node links swapped: node4–node5 and node6–node7 wired as node4–node7 and
        // node6–node5, reported from one end of each.
        check(
            &with(
                healthy_but(&["node4:fab0", "node5:fab0", "node6:fab0", "node7:fab0"]),
                &["node4:fab0 = node7:fab0", "node5:fab0 = node6:fab0"],
            ),
            &["miswired node4:fab0 <-> node5:fab0, node6:fab0 <-> node7:fab0 [node4,node5,node6,node7]"],
        );
        // ... from all ends.
        check(
            &with(
                healthy_but(&["node4:fab0", "node5:fab0", "node6:fab0", "node7:fab0"]),
                &[
                    "node4:fab0 = node7:fab0",
                    "node7:fab0 = node4:fab0",
                    "node5:fab0 = node6:fab0",
                    "node6:fab0 = node5:fab0",
                ],
            ),
            &["miswired node4:fab0 <-> node5:fab0, node6:fab0 <-> node7:fab0 [node4,node5,node6,node7]"],
        );
        // Cables of node1 (leaf1:p1) and node8 (leaf2:p1) swapped across switches: each now
        // hears the other segment, all explained by the one swap.
        check(
            &[
                "node1:fab0 = leaf2:p1 node9:fab0",
                "node2:fab0 = leaf1:p2 node8:fab0 node3:fab0",
                "node3:fab0 = leaf1:p3 node8:fab0 node2:fab0",
                "node8:fab0 = leaf1:p1 node2:fab0 node3:fab0",
                "node9:fab0 = leaf2:p2 node1:fab0",
            ],
            &["miswired node1:fab0 <-> leaf1:p1, node8:fab0 <-> leaf2:p1 [node1,node8]"],
        );
    }

    #[test]
    fn untrusted_answer_cases() {
        let base = || healthy_but(&["node4:fab0"]);
        // node4:fab0 is a point-to-point cable to node5:fab0: whatever an untrusted answer
        // claims, only node5 (or a tap on that cable) can have sent it.
        check(
            &with(base(), &["node4:fab0 = node5:fab0 ?unsigned:node5:fab0"]),
            &["unauthenticated node4:fab0 [node5] !"],
        );
        check(
            &with(base(), &["node4:fab0 = node5:fab0 ?badsig"]),
            &["unauthenticated node4:fab0 [node5] !"],
        );
        // A replayed answer proves nothing: the link is missing too.
        check(
            &with(base(), &["node4:fab0 = ?replayed:node5:fab0"]),
            &[
                "missing_link node4:fab0 <-> node5:fab0 []",
                "unauthenticated node4:fab0 [node5] !",
            ],
        );
        check(
            &with(base(), &["node4:fab0 = node5:fab0 ?unknown:ghost:eth0"]),
            &["unknown_neighbor node4:fab0 [node5] !"],
        );
        check(
            &with(
                base(),
                &["node4:fab0 = node5:fab0 ?unknown:node5:fab0 ?unsigned:leaf1:p1"],
            ),
            &[
                "unauthenticated node4:fab0 [node5] !",
                "unknown_neighbor node4:fab0 [node5] !",
            ],
        );
        // On a switch port anyone on the segment could have sent it: nobody is blamed, not
        // even the node the forgery claims to be.
        check(
            &with(
                healthy_but(&["node1:fab0"]),
                &["node1:fab0 = leaf1:p1 node2:fab0 node3:fab0 ?badsig:node2:fab0"],
            ),
            &["unauthenticated node1:fab0 [] !"],
        );
        // Judged without a declared topology too (with no culprits: no declared nodes).
        let mut v = Verifier::new(VerifierConfig::default());
        steady(&mut v, &["node4:fab0 = node5:fab0 ?unsigned:node5:fab0"], 1);
        assert_eq!(summary(&v), ["unauthenticated node4:fab0 [] !"]);
        let f = v.findings().next().expect("finding");
        assert_eq!(
            f.detail,
            "node4:fab0 got untrusted answers in its last 3 rounds: 1 unsigned claiming node5:fab0"
        );
    }

    #[test]
    fn rtt_cases() {
        let rtt = |spec: &'static str| with(healthy_but(&["node4:fab0"]), &[spec]);
        check(&rtt("node4:fab0 = node5:fab0~500"), &[]);
        check(
            &rtt("node4:fab0 = node5:fab0~501"),
            &["rtt_exceeded node4:fab0 <-> node5:fab0 [node4,node5]"],
        );
        // Across a switch the bound is the sum of both links' bounds (2000 + 2000).
        let sw = |spec: &'static str| with(healthy_but(&["node1:fab0"]), &[spec]);
        check(&sw("node1:fab0 = leaf1:p1 node2:fab0~4000 node3:fab0"), &[]);
        check(
            &sw("node1:fab0 = leaf1:p1 node2:fab0~4001 node3:fab0"),
            &["rtt_exceeded node1:fab0 <-> node2:fab0 [node1,node2]"],
        );
        check(
            &sw("node1:fab0 = leaf1:p1~2001 node2:fab0 node3:fab0"),
            &["rtt_exceeded node1:fab0 <-> leaf1:p1 [node1]"],
        );
        // The median of the last 3 samples: one spike is not enough, two are.
        for (samples, expect) in [
            (&[100, 9000, 100][..], false),
            (&[9000, 100, 9000][..], true),
            (&[9000, 9000, 100, 100][..], false),
            (&[100, 100, 9000, 9000][..], true),
        ] {
            let mut v = verifier();
            for (i, s) in samples.iter().enumerate() {
                let spec = format!("node4:fab0 = node5:fab0~{s}");
                v.round(round(&spec, 1000 * (i as u64 + 1)));
                v.round(round("node5:fab0 = node4:fab0", 1000 * (i as u64 + 1)));
            }
            let got = v.findings().any(|f| f.kind == FindingKind::RttExceeded);
            assert_eq!(got, expect, "{samples:?}: {:?}", summary(&v));
        }
    }

    #[test]
    fn missing_is_raised_after_k_rounds_and_clears() {
        let mut v = verifier();
        let t = |i: u64| i * 1000;
        assert_eq!(v.round(round("node4:fab0 = node5:fab0", t(1))), vec![]);
        assert_eq!(v.round(round("node4:fab0 =", t(2))), vec![]);
        assert_eq!(v.round(round("node4:fab0 =", t(3))), vec![]);
        assert_eq!(v.round(round("node4:fab0 =", t(4))).len(), 1);
        let f = v
            .finding("missing_link:node4:fab0 <-> node5:fab0")
            .expect("missing")
            .clone();
        assert_eq!((f.first_seen, f.last_seen), (Time(4000), Time(4000)));
        assert_eq!(
            f.detail,
            "node4:fab0 heard nothing from node5:fab0 in its last 3 rounds"
        );
        assert_eq!(f.severity, Severity::Warning);
        // Still missing: no change, last_seen moves, first_seen stays.
        assert_eq!(v.round(round("node4:fab0 =", t(5))), vec![]);
        let f = v.finding(&f.id).expect("still missing");
        assert_eq!((f.first_seen, f.last_seen), (Time(4000), Time(5000)));
        // The other side starts probing and, after K rounds, does not hear it either: the
        // detail is updated.
        assert_eq!(v.round(round("node5:fab0 =", t(5))), vec![]);
        assert_eq!(v.round(round("node5:fab0 =", t(6))), vec![]);
        let changes = v.round(round("node5:fab0 =", t(7)));
        assert!(
            matches!(changes.as_slice(), [Change::Updated(_)]),
            "{changes:?}"
        );
        // One way is not enough ...
        assert_eq!(v.round(round("node4:fab0 = node5:fab0", t(8))).len(), 1);
        assert!(v.findings().next().is_some_and(
            |f| f.detail == "node5:fab0 heard nothing from node4:fab0 in its last 3 rounds"
        ));
        // ... heard both ways again: cleared.
        let changes = v.round(round("node5:fab0 = node4:fab0", t(8)));
        match changes.as_slice() {
            [Change::Cleared(f)] => {
                assert_eq!(f.id, "missing_link:node4:fab0 <-> node5:fab0");
                assert_eq!(f.first_seen, Time(4000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(v.findings().count(), 0);
    }

    #[test]
    fn a_port_that_stops_probing_is_no_longer_judged() {
        let mut v = verifier();
        steady(&mut v, &["node4:fab0 = node5:fab0 node6:fab0"], 3);
        assert_eq!(
            summary(&v),
            ["unexpected_link node4:fab0 <-> node6:fab0 [node6]"]
        );
        // 3 rounds * 1000 ms after the last round it still counts as probing.
        assert_eq!(v.tick(Time(6000)), vec![]);
        let changes = v.tick(Time(6001));
        assert!(
            matches!(changes.as_slice(), [Change::Cleared(_)]),
            "{changes:?}"
        );
        // It resumes: a fresh window, so one round of the old picture is not enough to call
        // the link missing.
        assert_eq!(v.round(round("node4:fab0 =", 20_000)), vec![]);
        assert_eq!(v.round(round("node4:fab0 =", 21_000)), vec![]);
        assert_eq!(v.round(round("node4:fab0 =", 22_000)).len(), 1);
        // An out-of-order round is ignored.
        assert_eq!(v.round(round("node4:fab0 = node5:fab0", 21_500)), vec![]);
        assert_eq!(v.findings().count(), 1);
    }

    #[test]
    fn unexpected_clears_after_k_rounds_without_it() {
        let mut v = verifier();
        // Heard once: it waits a probe interval for the other rounds of that interval.
        assert_eq!(
            v.round(round("node4:fab0 = node5:fab0 node6:fab0", 1000)),
            vec![]
        );
        assert_eq!(v.tick(Time(1999)), vec![]);
        assert_eq!(v.tick(Time(2000)).len(), 1);
        assert_eq!(v.round(round("node4:fab0 = node5:fab0", 2000)), vec![]);
        assert_eq!(v.round(round("node4:fab0 = node5:fab0", 3000)), vec![]);
        let changes = v.round(round("node4:fab0 = node5:fab0", 4000));
        assert!(
            matches!(changes.as_slice(), [Change::Cleared(_)]),
            "{changes:?}"
        );
    }

    #[test]
    fn flapping_is_raised_and_expires() {
        let mut v = verifier();
        // up, down, up, down, up: 4 changes seen from node4.
        let mut raised = None;
        for (i, up) in [true, false, true, false, true].iter().enumerate() {
            let spec = if *up {
                "node4:fab0 = node5:fab0"
            } else {
                "node4:fab0 ="
            };
            for c in v.round(round(spec, 1000 * (i as u64 + 1))) {
                if let Change::Raised(f) = c {
                    raised = Some((i, f));
                }
            }
        }
        let (i, f) = raised.expect("flapping raised");
        assert_eq!(i, 4);
        assert_eq!(f.id, "flapping:node4:fab0 <-> node5:fab0");
        assert_eq!(
            f.detail,
            "node4:fab0 saw 4 up/down changes in the last 60000 ms (flapping at 4)"
        );
        // The other end saw the same changes: the count is not doubled.
        let mut both = verifier();
        for (i, up) in [true, false, true, false].iter().enumerate() {
            let (a, b) = if *up {
                ("node4:fab0 = node5:fab0", "node5:fab0 = node4:fab0")
            } else {
                ("node4:fab0 =", "node5:fab0 =")
            };
            both.round(round(a, 1000 * (i as u64 + 1)));
            both.round(round(b, 1000 * (i as u64 + 1)));
        }
        assert!(both.findings().all(|f| f.kind != FindingKind::Flapping));
        // The first change (at 2000) leaves the window at 62000.
        assert_eq!(v.tick(Time(61_999)).len(), 0);
        let changes = v.tick(Time(62_000));
        assert!(
            changes
                .iter()
                .any(|c| matches!(c, Change::Cleared(f) if f.kind == FindingKind::Flapping)),
            "{changes:?}"
        );
    }

    fn sample(sent: u64, received: u64, dropped: u64, end: u64) -> ByteSample {
        ByteSample {
            from: "node1".into(),
            to: "node2".into(),
            window_start: Time(end - 1000),
            window_end: Time(end),
            sent,
            received,
            dropped_at_receiver: dropped,
        }
    }

    #[test]
    fn byte_conservation_cases() {
        const KIB64: u64 = 64 * 1024;
        // (sent, received, dropped) -> "" (fine) or a fragment of the detail.
        for (sent, received, dropped, expect) in [
            (0, 0, 0, ""),
            (1_000_000, 1_000_000, 0, ""),
            (1_000_000, 900_000, 100_000, ""),
            // Tolerance: 64 KiB + 0.1% of the sent bytes.
            (0, KIB64, 0, ""),
            (0, KIB64 + 1, 0, "more arrived than was sent"),
            (KIB64, 0, 0, ""),
            (KIB64 + 65, 0, 0, ""),
            (KIB64 + 66, 0, 0, "bytes vanished"),
            (10_000_000, 10_000_000 - KIB64 - 10_000, 0, ""),
            (10_000_000, 10_000_000 - KIB64 - 10_001, 0, "bytes vanished"),
            (10_000_000, 10_000_000 + KIB64 + 10_001, 0, "more arrived"),
            // Drops beyond what was sent: the receiver accounts for more than was sent.
            (1_000_000, 1_000_000, 100_000, "more arrived"),
            (u64::MAX, u64::MAX, u64::MAX, "more arrived"),
        ] {
            let mut v = verifier();
            let changes = v.bytes(sample(sent, received, dropped, 1000), Time(1000));
            if expect.is_empty() {
                assert_eq!(changes, vec![], "{sent} {received} {dropped}");
                continue;
            }
            match changes.as_slice() {
                [Change::Raised(f)] => {
                    assert_eq!(f.id, "byte_mismatch:node1 -> node2");
                    assert_eq!(f.culprits, ["node1", "node2"]);
                    assert_eq!(f.severity, Severity::Critical);
                    assert!(
                        f.detail.contains(expect),
                        "{sent} {received} {dropped}: {}",
                        f.detail
                    );
                }
                other => panic!("{sent} {received} {dropped}: {other:?}"),
            }
        }
    }

    #[test]
    fn byte_mismatch_detail_update_and_clear() {
        let mut v = verifier();
        let changes = v.bytes(sample(1_000_000, 500_000, 100_000, 1000), Time(1100));
        let [Change::Raised(f)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!(
            f.detail,
            "window 0..1000 ms: node1 sent 1000000 B to node2; node2 received 500000 B and dropped \
             100000 B from node1; difference 400000 B exceeds the tolerance of 66536 B: bytes \
             vanished between them: a tap that diverts, loss on the wire, or a receiver under-reporting"
        );
        // Another bad window: updated (new numbers), first_seen kept.
        let changes = v.bytes(sample(1_000_000, 400_000, 0, 2000), Time(2100));
        let [Change::Updated(f)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!((f.first_seen, f.last_seen), (Time(1100), Time(2100)));
        // An older window is ignored; link rounds and ticks leave byte findings alone.
        assert_eq!(v.bytes(sample(5, 5, 0, 1500), Time(2200)), vec![]);
        assert_eq!(v.tick(Time(1_000_000)), vec![]);
        assert_eq!(v.set_topology(None, Time(1_000_000)), vec![]);
        assert_eq!(v.findings().count(), 1);
        // A window within tolerance clears it.
        let changes = v.bytes(sample(1_000_000, 999_000, 0, 3000), Time(1_000_001));
        assert!(
            matches!(changes.as_slice(), [Change::Cleared(_)]),
            "{changes:?}"
        );
    }

    #[test]
    fn set_topology_re_evaluates() {
        let mut v = verifier();
        let swapped = [
            "node4:fab0 = node7:fab0",
            "node7:fab0 = node4:fab0",
            "node5:fab0 = node6:fab0",
            "node6:fab0 = node5:fab0",
        ];
        steady(&mut v, &swapped, 3);
        assert_eq!(v.findings().count(), 1);
        // The operator declares the cabling as it is: the finding clears at once.
        let fixed = TOPO
            .replace("b = \"node5:fab0\"\nrtt_max_us = 500", "b = \"node7:fab0\"")
            .replace(
                "a = \"node6:fab0\"\nb = \"node7:fab0\"",
                "a = \"node6:fab0\"\nb = \"node5:fab0\"",
            );
        let t = parse(&fixed).expect("fixed topology");
        let changes = v.set_topology(Some(t), Time(3500));
        assert!(
            matches!(changes.as_slice(), [Change::Cleared(f)] if f.kind == FindingKind::Miswired),
            "{changes:?}"
        );
        steady(&mut v, &swapped, 4);
        assert_eq!(summary(&v), Vec::<String>::new());
        // No topology: no link findings at all.
        v.round(round("node4:fab0 = node7:fab0 rogue:x", 5000));
        v.tick(Time(6000));
        assert_eq!(v.findings().count(), 1);
        let changes = v.set_topology(None, Time(6000));
        assert_eq!(changes.len(), 1);
        assert_eq!(v.findings().count(), 0);
        assert!(v.topology().is_none());
    }

    #[test]
    fn policy_actions() {
        let mut v = verifier();
        let changes = v.bytes(sample(1_000_000, 0, 0, 1000), Time(1000));
        assert_eq!(v.policy_actions(&changes, &Policy::default()), vec![]);

        let policy: Policy =
            toml::from_str("revoke = [\"byte_mismatch\", \"unauthenticated\"]").expect("policy");
        let actions = v.policy_actions(&changes, &policy);
        let nodes: Vec<&str> = actions.iter().map(|a| a.node.as_str()).collect();
        assert_eq!(nodes, ["node1", "node2"]);
        assert!(actions
            .iter()
            .all(|a| a.finding_id == "byte_mismatch:node1 -> node2"));
        assert!(actions[0]
            .reason
            .starts_with("byte_mismatch node1 -> node2: window"));

        // Once cleared, the old changes no longer revoke, nor does the Cleared change.
        let cleared = v.bytes(sample(1, 1, 0, 2000), Time(2000));
        assert_eq!(v.policy_actions(&changes, &policy), vec![]);
        assert_eq!(v.policy_actions(&cleared, &policy), vec![]);

        // A kind the policy does not name.
        let changes = steady(&mut v, &["node4:fab0 = node5:fab0 node6:fab0"], 1);
        assert_eq!(changes.len(), 1);
        assert_eq!(v.policy_actions(&changes, &policy), vec![]);
        let all = Policy {
            revoke: FindingKind::ALL.into_iter().collect(),
        };
        let actions = v.policy_actions(&changes, &all);
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].node, "node6");

        assert!(toml::from_str::<Policy>("revoke = [\"tea\"]").is_err());
        assert!(toml::from_str::<Policy>("revok = []").is_err());
        assert_eq!(
            toml::from_str::<Policy>("").expect("empty"),
            Policy::default()
        );
    }

    #[test]
    fn config_and_serde() {
        let cfg: VerifierConfig = toml::from_str("missing_after_rounds = 5").expect("config");
        assert_eq!(cfg.missing_after_rounds, 5);
        assert_eq!(cfg.probe_interval_ms, 1000);
        assert!(toml::from_str::<VerifierConfig>("missing_rounds = 5").is_err());
        assert_eq!(
            FindingKind::ALL.map(|k| k.to_string()).join(" "),
            "missing_link unexpected_link miswired unauthenticated unknown_neighbor rtt_exceeded flapping byte_mismatch"
        );
        for k in FindingKind::ALL {
            let json = serde_json::to_string(&k).expect("kind");
            assert_eq!(json, format!("\"{k}\""));
        }
        let mut v = verifier();
        let changes = v.bytes(sample(1_000_000, 0, 0, 1000), Time(1000));
        let json = serde_json::to_string(&changes).expect("changes");
        assert!(json.starts_with(r#"[{"change":"raised","finding":{"id":"byte_mismatch:node1 -> node2","kind":"byte_mismatch","severity":"critical""#), "{json}");
        let back: Vec<Change> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, changes);
        let r = round("node4:fab0 = node5:fab0~12 ?unsigned", 5);
        let json = serde_json::to_string(&r).expect("round");
        assert_eq!(
            json,
            r#"{"node":"node4","port":"fab0","at":5,"heard":[{"heard":{"kind":"node","device":"node5","port":"fab0"},"rtt_us":12},{"heard":{"kind":"unsigned","claimed":null}}]}"#
        );
        assert_eq!(serde_json::from_str::<PortRound>(&json).expect("parse"), r);
    }

    #[test]
    fn zero_config_values_are_clamped() {
        let mut v = Verifier::new(VerifierConfig {
            missing_after_rounds: 0,
            flap_changes: 0,
            byte_tolerance_ratio: f64::NAN,
            ..VerifierConfig::default()
        });
        v.set_topology(Some(parse(TOPO).expect("topology")), Time(0));
        v.round(round("node4:fab0 =", 1000));
        assert_eq!(summary(&v), ["missing_link node4:fab0 <-> node5:fab0 []"]);
        v.round(round("node4:fab0 = node5:fab0", 2000));
        assert_eq!(summary(&v), ["flapping node4:fab0 <-> node5:fab0 []"]);
        let changes = v.bytes(
            sample(100_000_000, 100_000_000 - 70_000, 0, 1000),
            Time(2000),
        );
        assert_eq!(changes.len(), 1);
    }
}
