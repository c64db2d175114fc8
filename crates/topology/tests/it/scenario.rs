//! An operator's day on a simulated clock: apply a topology, run healthy, re-cable two
//! ports by mistake, see one finding, declare the new cabling, see it clear.

use nicwarden_lease::Time;
use nicwarden_topology::{
    parse, Answer, Change, Endpoint, FindingKind, Heard, Policy, PortRound, Topology, Verifier,
    VerifierConfig,
};

const FILE: &str = r#"
version_note = "rack 12"
[defaults]
rtt_max_us = 800
[nodes.gpu1]
ports = ["fab0", "fab1"]
[nodes.gpu2]
ports = ["fab0", "fab1"]
[nodes.gpu3]
ports = ["fab0"]
[switches.leaf1]
ports = ["p1", "p2", "p3"]
[[links]]
a = "gpu1:fab0"
b = "leaf1:p1"
[[links]]
a = "leaf1:p2"
b = "gpu2:fab0"
[[links]]
a = "gpu3:fab0"
b = "leaf1:p3"
[[links]]
a = "gpu1:fab1"
b = "gpu2:fab1"
rtt_max_us = 100
"#;

/// Simulated agents: each node port hears whatever `wiring` says is at the other end.
/// `wiring` maps each node port to what it is physically plugged into.
fn rounds(t: &Topology, wiring: &[(&str, &str)], at: u64) -> Vec<PortRound> {
    let plugged = |p: &str| wiring.iter().find(|(a, _)| *a == p).map(|(_, b)| *b);
    let mut out = Vec::new();
    for (node, d) in &t.nodes {
        for port in &d.ports {
            let me = format!("{node}:{port}");
            let mut heard = Vec::new();
            if let Some(other) = plugged(&me) {
                let e = Endpoint::parse(other).expect("endpoint");
                if t.is_switch(&e.device) {
                    heard.push(Answer {
                        heard: Heard::Switch(e.clone()),
                        rtt_us: None,
                    });
                    // Everyone else plugged into the same switch answers through it.
                    for (a, b) in wiring {
                        let b = Endpoint::parse(b).expect("endpoint");
                        if *a != me && b.device == e.device {
                            heard.push(Answer {
                                heard: Heard::Node(Endpoint::parse(a).expect("endpoint")),
                                rtt_us: Some(300),
                            });
                        }
                    }
                } else {
                    heard.push(Answer {
                        heard: Heard::Node(e),
                        rtt_us: Some(40),
                    });
                }
            }
            out.push(PortRound {
                node: node.clone(),
                port: port.clone(),
                at: Time(at),
                heard,
            });
        }
    }
    out
}

const AS_DECLARED: &[(&str, &str)] = &[
    ("gpu1:fab0", "leaf1:p1"),
    ("gpu2:fab0", "leaf1:p2"),
    ("gpu3:fab0", "leaf1:p3"),
    ("gpu1:fab1", "gpu2:fab1"),
    ("gpu2:fab1", "gpu1:fab1"),
];

const SWAPPED: &[(&str, &str)] = &[
    ("gpu1:fab0", "leaf1:p3"),
    ("gpu2:fab0", "leaf1:p2"),
    ("gpu3:fab0", "leaf1:p1"),
    ("gpu1:fab1", "gpu2:fab1"),
    ("gpu2:fab1", "gpu1:fab1"),
];

fn run(
    v: &mut Verifier,
    t: &Topology,
    wiring: &[(&str, &str)],
    from_s: u64,
    to_s: u64,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for s in from_s..to_s {
        // A node whose port is plugged into nothing is a dead agent: it sends no rounds.
        let alive = |r: &PortRound| {
            wiring
                .iter()
                .any(|(a, _)| a.starts_with(&format!("{}:", r.node)))
        };
        for r in rounds(t, wiring, s * 1000).into_iter().filter(alive) {
            changes.extend(v.round(r));
        }
        changes.extend(v.tick(Time(s * 1000 + 500)));
    }
    changes
}

#[test]
fn recabling_mistake_is_one_finding_and_clears_when_declared() {
    let t = parse(FILE).expect("topology");
    let mut v = Verifier::new(VerifierConfig::default());
    assert_eq!(v.set_topology(Some(t.clone()), Time(0)), vec![]);
    assert_eq!(run(&mut v, &t, AS_DECLARED, 1, 30), vec![]);

    // Someone swaps the cables of gpu1:fab0 and gpu3:fab0 on leaf1.
    let changes = run(&mut v, &t, SWAPPED, 30, 60);
    let raised: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Raised(f) => Some(f.id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        raised,
        ["miswired:gpu1:fab0 <-> leaf1:p1, gpu3:fab0 <-> leaf1:p3"],
        "{changes:#?}"
    );
    let f = v.findings().next().expect("finding");
    assert_eq!(f.first_seen, Time(30_000));
    assert_eq!(f.last_seen, Time(59_500));
    assert_eq!(f.culprits, ["gpu1", "gpu3"]);
    // Report only, by default.
    assert_eq!(v.policy_actions(&changes, &Policy::default()), vec![]);

    // The operator declares the new cabling: cleared at once, nothing else raised.
    let fixed = FILE
        .replace(
            "a = \"gpu1:fab0\"\nb = \"leaf1:p1\"",
            "a = \"gpu1:fab0\"\nb = \"leaf1:p3\"",
        )
        .replace(
            "a = \"gpu3:fab0\"\nb = \"leaf1:p3\"",
            "a = \"gpu3:fab0\"\nb = \"leaf1:p1\"",
        );
    let t2 = parse(&fixed).expect("fixed");
    assert_ne!(t2.fingerprint(), t.fingerprint());
    let changes = v.set_topology(Some(t2.clone()), Time(60_000));
    assert!(
        matches!(changes.as_slice(), [Change::Cleared(f)] if f.kind == FindingKind::Miswired),
        "{changes:?}"
    );
    assert_eq!(run(&mut v, &t2, SWAPPED, 60, 90), vec![]);

    // gpu3's agent dies: its neighbours on leaf1 stop hearing it.
    let alive: Vec<(&str, &str)> = SWAPPED
        .iter()
        .copied()
        .filter(|(a, _)| !a.starts_with("gpu3:"))
        .collect();
    let changes = run(&mut v, &t2, &alive, 90, 100);
    let raised: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Raised(f) => Some(f.id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        raised,
        ["missing_link:gpu3:fab0 <-> leaf1:p1"],
        "{changes:#?}"
    );
}
