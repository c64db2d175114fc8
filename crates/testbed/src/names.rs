//! Namespace names and stale detection, as pure functions.
//!
//! Every namespace of a testbed is named `nwtb<pid>x<seq>-<role>`: `<pid>` is the creating
//! process, `<seq>` a per-process counter and `<role>` one of `sw`, `mgmt`, `node<k>`. The owner
//! can therefore be recovered from the name alone, which is what stale cleanup needs after a
//! crash, a `kill -9` or an aborted test run.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every namespace a testbed creates.
pub const NAMESPACE_PREFIX: &str = "nwtb";

/// Identity of one testbed: the creating process and a per-process counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TestbedId {
    pub pid: u32,
    pub seq: u64,
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

impl TestbedId {
    /// A fresh id for this process.
    pub fn next() -> TestbedId {
        TestbedId {
            pid: std::process::id(),
            seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The name of this testbed's namespace with the given role (`sw`, `mgmt`, `node3`).
    pub fn namespace(&self, role: &str) -> String {
        format!("{self}-{role}")
    }

    /// Parses an id as printed by `Display` (`nwtb<pid>x<seq>`).
    pub fn parse(s: &str) -> Option<TestbedId> {
        let rest = s.strip_prefix(NAMESPACE_PREFIX)?;
        let (pid, seq) = rest.split_once('x')?;
        Some(TestbedId {
            pid: parse_digits(pid)?,
            seq: parse_digits(seq)?,
        })
    }
}

impl fmt::Display for TestbedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{NAMESPACE_PREFIX}{}x{}", self.pid, self.seq)
    }
}

/// Decimal digits only (no sign, no spaces), so that names we did not make are not ours.
fn parse_digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits a namespace name into its testbed id and role; `None` for names not of our form.
pub(crate) fn parse_namespace(name: &str) -> Option<(TestbedId, &str)> {
    let (id, role) = name.split_once('-')?;
    if role.is_empty() {
        return None;
    }
    Some((TestbedId::parse(id)?, role))
}

/// The namespaces in `names` that are ours (see [`parse_namespace`]) and whose owner `alive`
/// says is gone. `alive` is asked once per testbed id.
pub(crate) fn stale_namespaces<'a>(
    names: impl IntoIterator<Item = &'a str>,
    mut alive: impl FnMut(TestbedId) -> bool,
) -> Vec<String> {
    let mut verdicts: HashMap<TestbedId, bool> = HashMap::new();
    let mut stale = Vec::new();
    for name in names {
        let Some((id, _role)) = parse_namespace(name) else {
            continue;
        };
        let is_alive = *verdicts.entry(id).or_insert_with(|| alive(id));
        if !is_alive {
            stale.push(name.to_string());
        }
    }
    stale
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let id = TestbedId { pid: 4242, seq: 7 };
        assert_eq!(id.to_string(), "nwtb4242x7");
        assert_eq!(id.namespace("node3"), "nwtb4242x7-node3");
        assert_eq!(TestbedId::parse("nwtb4242x7"), Some(id));
    }

    #[test]
    fn next_ids_are_distinct_and_carry_our_pid() {
        let a = TestbedId::next();
        let b = TestbedId::next();
        assert_ne!(a, b);
        assert_eq!(a.pid, std::process::id());
    }

    #[test]
    fn namespace_names_parse() {
        let check = |name: &str, expect: Option<(u32, u64, &str)>| {
            let got = parse_namespace(name).map(|(id, role)| (id.pid, id.seq, role));
            assert_eq!(got, expect, "{name}");
        };
        check("nwtb12x0-sw", Some((12, 0, "sw")));
        check("nwtb12x3-mgmt", Some((12, 3, "mgmt")));
        check("nwtb4194304x18-node12", Some((4194304, 18, "node12")));
        check("nwtb12x0-", None);
        check("nwtb12x0", None);
        check("nwtbx0-sw", None);
        check("nwtb12x-sw", None);
        check("nwtb+12x0-sw", None);
        check("nwtb12y0-sw", None);
        check("nwtbfoo-sw", None);
        check("other12x0-sw", None);
        check("nwtb99999999999x0-sw", None); // pid does not fit u32
        check("", None);
    }

    #[test]
    fn stale_are_ours_with_dead_owners_only() {
        let names = [
            "nwtb100x0-sw",
            "nwtb100x0-node1",
            "nwtb200x0-sw",
            "nwtb100x1-sw",
            "unrelated",
            "nwtbjunk",
        ];
        let mut asked = Vec::new();
        let stale = stale_namespaces(names, |id| {
            asked.push(id);
            // pid 100's testbed 0 is gone (a dead process, or a reused pid); the rest live.
            !(id.pid == 100 && id.seq == 0)
        });
        assert_eq!(stale, ["nwtb100x0-sw", "nwtb100x0-node1"]);
        // One question per testbed, not per namespace.
        assert_eq!(asked.len(), 3);
    }

    #[test]
    fn nothing_is_stale_when_all_owners_live() {
        assert!(stale_namespaces(["nwtb1x0-sw", "nwtb1x0-mgmt"], |_| true).is_empty());
        assert!(stale_namespaces([], |_| false).is_empty());
    }
}
