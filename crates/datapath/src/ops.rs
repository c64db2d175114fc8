//! The kernel interfaces: one narrow trait per subsystem ([`TcOps`], [`NftOps`]), a real
//! implementation that runs the tools, and (in [`crate::fake`]) an in-memory fake.
//!
//! Why we shell out instead of speaking netlink ourselves: `netlink-packet-route` has no
//! encoders for HTB classes or u32 selectors, and iproute2's `tc` *is* the reference encoder of
//! those structures (rate tables, tick conversions, u32 key layout), so re-implementing it would
//! be a second, less tested copy. `nft -f` hands a whole script to libnftables, which commits
//! it as **one** atomic netlink transaction: exactly the table swap we need. Both tools stay
//! behind these traits, so the reconcile logic is unit-tested against fakes and the real
//! kernel is exercised by the privileged integration tests.

use crate::nft::{FAMILY, TABLE};
use crate::DatapathError;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// What the datapath needs from tc. `dev` is the fabric interface.
pub trait TcOps: Send {
    /// `tc -j -s qdisc show dev DEV`.
    fn qdiscs_json(&mut self, dev: &str) -> Result<String, DatapathError>;
    /// `tc -j filter show dev DEV` (filters on the root qdisc).
    fn filters_json(&mut self, dev: &str) -> Result<String, DatapathError>;
    /// `tc -d class show dev DEV` (text: this iproute2 prints no JSON for HTB classes).
    fn classes_text(&mut self, dev: &str) -> Result<String, DatapathError>;
    /// Runs the commands in order (`tc -batch -`), stopping at the first that fails; the ones
    /// before it stay applied.
    fn batch(&mut self, cmds: &[String]) -> Result<(), DatapathError>;
}

/// What the datapath needs from nftables (table `inet nicwarden` only).
pub trait NftOps: Send {
    /// `nft -j list table inet nicwarden`; `None` if the table does not exist.
    fn list_table_json(&mut self) -> Result<Option<String>, DatapathError>;
    /// `nft -f -`: applies the script as one atomic transaction (all or nothing).
    fn apply(&mut self, script: &str) -> Result<(), DatapathError>;
}

/// The nftables operations of the fabric guard (table `inet nicwarden_guard`).
pub trait GuardOps: Send {
    /// `nft -j list table inet nicwarden_guard`; `None` if the table does not exist.
    fn list_guard_json(&mut self) -> Result<Option<String>, DatapathError>;
    /// `nft -f -`: one atomic transaction.
    fn apply_guard(&mut self, script: &str) -> Result<(), DatapathError>;
}

/// Output of a successful tool run.
pub(crate) struct Ran {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` (feeding `stdin` if given) and captures its output; a non-zero exit becomes
/// [`DatapathError::Command`] with `op` and the captured stderr.
pub(crate) fn run(op: &str, mut cmd: Command, stdin: Option<&str>) -> Result<Ran, DatapathError> {
    let line = command_line(&cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| DatapathError::spawn(&program, line.clone(), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status tells what happened.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| DatapathError::spawn(&program, line.clone(), e))?;
    let ran = Ran {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if out.status.success() {
        Ok(ran)
    } else {
        Err(DatapathError::Command {
            op: op.to_string(),
            command: line,
            stderr: ran.stderr,
            status: out.status.code(),
        })
    }
}

/// `tc` from iproute2, optionally inside a named network namespace (`tc -n NS`).
#[derive(Clone, Debug, Default)]
pub struct RealTc {
    netns: Option<String>,
}

impl RealTc {
    pub fn new() -> Self {
        RealTc { netns: None }
    }
    /// Runs every command in `/run/netns/NETNS` (as `ip netns add` creates it).
    pub fn in_netns(netns: &str) -> Self {
        RealTc {
            netns: Some(netns.to_string()),
        }
    }
    fn tc(&self) -> Command {
        let mut c = Command::new("tc");
        if let Some(ns) = &self.netns {
            c.args(["-n", ns]);
        }
        c
    }
    fn show(&self, op: &str, args: &[&str]) -> Result<String, DatapathError> {
        let mut c = self.tc();
        c.args(args);
        Ok(run(op, c, None)?.stdout)
    }
}

impl TcOps for RealTc {
    fn qdiscs_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.show(
            &format!("list tc qdiscs of {dev}"),
            &["-j", "-s", "qdisc", "show", "dev", dev],
        )
    }
    fn filters_json(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.show(
            &format!("list tc filters of {dev}"),
            &["-j", "filter", "show", "dev", dev],
        )
    }
    fn classes_text(&mut self, dev: &str) -> Result<String, DatapathError> {
        self.show(
            &format!("list tc classes of {dev}"),
            &["-d", "class", "show", "dev", dev],
        )
    }
    fn batch(&mut self, cmds: &[String]) -> Result<(), DatapathError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let mut c = self.tc();
        // No `-force`: stop at the first failure.
        c.args(["-batch", "-"]);
        let mut input = cmds.join("\n");
        input.push('\n');
        match run("apply tc batch", c, Some(&input)) {
            Ok(ran) => {
                if !ran.stderr.trim().is_empty() {
                    tracing::debug!(stderr = %ran.stderr.trim(), "tc batch warnings");
                }
                Ok(())
            }
            Err(DatapathError::Command {
                command,
                stderr,
                status,
                ..
            }) => {
                // tc names the failing line: "Command failed -:3".
                let failed = stderr
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Command failed -:"))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                let op = match failed.and_then(|n| Some((n, cmds.get(n.checked_sub(1)?)?))) {
                    Some((n, line)) => format!(
                        "apply tc batch (command {n} of {}: `{line}`; the ones before it applied)",
                        cmds.len()
                    ),
                    None => format!("apply tc batch of {} commands", cmds.len()),
                };
                Err(DatapathError::Command {
                    op,
                    command,
                    stderr,
                    status,
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// `nft` from nftables, optionally inside a named network namespace (`ip netns exec NS nft`).
#[derive(Clone, Debug, Default)]
pub struct RealNft {
    netns: Option<String>,
}

impl RealNft {
    pub fn new() -> Self {
        RealNft { netns: None }
    }
    pub fn in_netns(netns: &str) -> Self {
        RealNft {
            netns: Some(netns.to_string()),
        }
    }
    fn nft(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        }
    }
}

impl NftOps for RealNft {
    fn list_table_json(&mut self) -> Result<Option<String>, DatapathError> {
        let mut c = self.nft();
        c.args(["-j", "list", "table", FAMILY, TABLE]);
        match run(&format!("list nft table {FAMILY} {TABLE}"), c, None) {
            Ok(ran) => Ok(Some(ran.stdout)),
            Err(DatapathError::Command { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
    fn apply(&mut self, script: &str) -> Result<(), DatapathError> {
        let mut c = self.nft();
        c.args(["-f", "-"]);
        run(
            &format!("apply nft script to table {FAMILY} {TABLE}"),
            c,
            Some(script),
        )
        .map(|_| ())
    }
}

impl GuardOps for RealNft {
    fn list_guard_json(&mut self) -> Result<Option<String>, DatapathError> {
        use crate::guard::{GUARD_FAMILY, GUARD_TABLE};
        let mut c = self.nft();
        c.args(["-j", "list", "table", GUARD_FAMILY, GUARD_TABLE]);
        match run(
            &format!("list nft table {GUARD_FAMILY} {GUARD_TABLE}"),
            c,
            None,
        ) {
            Ok(ran) => Ok(Some(ran.stdout)),
            Err(DatapathError::Command { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
    fn apply_guard(&mut self, script: &str) -> Result<(), DatapathError> {
        use crate::guard::{GUARD_FAMILY, GUARD_TABLE};
        let mut c = self.nft();
        c.args(["-f", "-"]);
        run(
            &format!("apply nft script to table {GUARD_FAMILY} {GUARD_TABLE}"),
            c,
            Some(script),
        )
        .map(|_| ())
    }
}

/// Effective uid of this process, from `/proc/self/status`.
pub(crate) fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Checks that this host can run the tc backend: root, `tc` and `nft` present.
pub fn check_available() -> Result<(), DatapathError> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => {
            return Err(DatapathError::Unavailable(format!(
                "the tc datapath programs tc and nftables and needs root (CAP_NET_ADMIN); running as uid {uid}"
            )))
        }
        None => {
            return Err(DatapathError::Unavailable(
                "cannot read the effective uid from /proc/self/status".to_string(),
            ))
        }
    }
    for (program, arg, package) in [("tc", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        let mut c = Command::new(program);
        c.arg(arg);
        run(&format!("probe {program}"), c, None).map_err(|e| {
            DatapathError::Unavailable(format!(
                "`{program}` is not usable ({e}); install {package} (apt-get install {package})"
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_names_the_package() {
        let err = run("probe", Command::new("nft-definitely-missing"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("spawn `nft-definitely-missing`: "), "{err}");
        let e = DatapathError::spawn(
            "nft",
            "nft -f -".into(),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(
            e.to_string(),
            "spawn `nft -f -`: entity not found (is nftables installed? apt-get install nftables)"
        );
    }

    #[test]
    fn failed_command_carries_stderr_and_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo boom >&2; exit 3"]);
        let err = run("do thing on fab0", c, None)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("do thing on fab0: `sh -c echo boom >&2; exit 3` failed (exit status 3): boom")
        );
    }
}
