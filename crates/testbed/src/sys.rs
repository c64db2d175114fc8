//! Everything the testbed asks of the host goes through here: the `ip` program (iproute2),
//! `/run/netns`, `/proc`, the owner markers in `/run/nicwarden-testbed`, and signals.

use crate::error::TestbedError;
use crate::names::TestbedId;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where `ip netns` keeps its namespace files.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Where testbeds record their owner's start time (pid-reuse guard for stale cleanup).
pub(crate) const MARKER_DIR: &str = "/run/nicwarden-testbed";

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// `ip netns add` remounts `/run/netns` shared on first use; concurrent first uses can race, so
/// this process adds namespaces one at a time.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Runs `ip <args>` and returns its standard output; a non-zero exit is an error carrying the
/// command line and `ip`'s own message.
pub(crate) fn ip(args: &[&str]) -> Result<String, TestbedError> {
    let command = format!("ip {}", args.join(" "));
    tracing::trace!(%command, "run");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestbedError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip netns add <name>`.
pub(crate) fn netns_add(name: &str) -> Result<(), TestbedError> {
    let _serial = NETNS_ADD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ip(&["netns", "add", name]).map(drop)
}

/// `ip netns del <name>`.
pub(crate) fn netns_del(name: &str) -> Result<(), TestbedError> {
    ip(&["netns", "del", name]).map(drop)
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(crate) fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// The names in `/run/netns` (what `ip netns list` shows).
pub(crate) fn list_namespaces() -> Result<Vec<String>, TestbedError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TestbedError::Io {
                op: "list",
                path: NETNS_DIR.into(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Identity (device, inode) of a network namespace file.
fn ns_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes (other than this one) whose network namespace is one of `namespaces`, with the
/// namespace each is in. Processes that exit during the scan are skipped.
pub(crate) fn pids_in(namespaces: &[String]) -> Vec<(i32, String)> {
    let wanted: HashMap<(u64, u64), &String> = namespaces
        .iter()
        .filter_map(|name| ns_identity(&netns_path(name)).map(|id| (id, name)))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(pid_i32) = i32::try_from(pid) else {
            continue;
        };
        if let Some(ns) = ns_identity(&entry.path().join("ns/net")).and_then(|id| wanted.get(&id)) {
            found.push((pid_i32, (*ns).clone()));
        }
    }
    found
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal_pid(pid: i32, signal: Signal, what: &str) -> Result<(), TestbedError> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(TestbedError::Signal {
            signal,
            what: what.to_string(),
            pid,
            source,
        }),
    }
}

/// Whether this process holds CAP_NET_ADMIN and CAP_SYS_ADMIN (effective).
pub(crate) fn has_netns_capabilities() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_cap_eff(&status))
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// The `CapEff:` bit set of a `/proc/<pid>/status` text.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Start time of `pid` (clock ticks since boot), or `None` if no such process.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start_time(&stat)
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted after the
/// last `)`.
pub(crate) fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command come field 3 (state) onwards; starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// How long stale cleanup waits for another process's cleanup to finish.
const CLEANUP_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes the cross-process stale-cleanup lock (`flock` on a file in [`MARKER_DIR`]), waiting
/// at most [`CLEANUP_LOCK_WAIT`]. `None` if it cannot be had: cleanup then proceeds without it
/// (it is only a courtesy between concurrent cleanups; each step tolerates the others).
pub(crate) fn lock_cleanup() -> Option<Flock<std::fs::File>> {
    std::fs::create_dir_all(MARKER_DIR).ok()?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(MARKER_DIR).join(".cleanup.lock"))
        .ok()?;
    let deadline = Instant::now() + CLEANUP_LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Some(lock),
            Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, e)) => {
                tracing::warn!(error = %e, "stale cleanup proceeds without the cleanup lock");
                return None;
            }
        }
    }
}

fn marker_path(id: TestbedId) -> PathBuf {
    Path::new(MARKER_DIR).join(id.to_string())
}

/// Records that testbed `id` belongs to this process as started at its current start time.
pub(crate) fn write_marker(id: TestbedId) -> Result<(), TestbedError> {
    let start = process_start_time(id.pid).unwrap_or(0);
    std::fs::create_dir_all(MARKER_DIR).map_err(|source| TestbedError::Io {
        op: "create directory",
        path: MARKER_DIR.into(),
        source,
    })?;
    let path = marker_path(id);
    std::fs::write(&path, format!("{} {start}\n", id.pid)).map_err(|source| TestbedError::Io {
        op: "write owner marker",
        path,
        source,
    })
}

/// The owner start time recorded for testbed `id`, if a marker exists.
pub(crate) fn read_marker(id: TestbedId) -> Option<u64> {
    let text = std::fs::read_to_string(marker_path(id)).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    if pid.parse::<u32>().ok()? != id.pid {
        return None;
    }
    start.parse().ok()
}

pub(crate) fn remove_marker(id: TestbedId) -> Result<(), TestbedError> {
    let path = marker_path(id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TestbedError::Io {
            op: "remove owner marker",
            path,
            source,
        }),
    }
}

/// Ids of all testbeds that have a marker.
pub(crate) fn list_markers() -> Vec<TestbedId> {
    let Ok(entries) = std::fs::read_dir(MARKER_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(TestbedId::parse))
        .collect()
}

/// One interface as `ip -o link show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub name: String,
    /// Operational state (`UP`, `DOWN`, `LOWERLAYERDOWN`, `UNKNOWN`, ...).
    pub state: String,
    /// `LOWER_UP`: the device has carrier (set synchronously, unlike the operational state).
    pub carrier: bool,
}

/// Parses `ip -o link show` output
/// (`2: fab0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 qdisc noqueue state UP ...`).
pub(crate) fn parse_links(output: &str) -> Vec<LinkInfo> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            fields.next()?; // "2:"
            let name = fields.next()?.trim_end_matches(':');
            let name = name.split('@').next()?;
            let flags = fields.next()?;
            let carrier = flags
                .trim_start_matches('<')
                .trim_end_matches('>')
                .split(',')
                .any(|f| f == "LOWER_UP");
            let mut rest = fields.skip_while(|f| *f != "state");
            rest.next()?;
            Some(LinkInfo {
                name: name.to_string(),
                state: rest.next()?.to_string(),
                carrier,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_counts_fields_after_the_command() {
        let stat = "1234 (tricky) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_stat_start_time(stat), Some(987654));
        assert_eq!(parse_stat_start_time("1 (init) S 0"), None);
        assert_eq!(parse_stat_start_time("garbage"), None);
    }

    #[test]
    fn our_own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
    }

    #[test]
    fn cap_eff_parses() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn links_parse() {
        let out = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
                   10: fab0@if101: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 0e:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff link-netns nwtb1x0-sw\n\
                   11: mgmt0@if101: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state LOWERLAYERDOWN mode DEFAULT\n";
        let link = |name: &str, state: &str, carrier| LinkInfo {
            name: name.to_string(),
            state: state.to_string(),
            carrier,
        };
        assert_eq!(
            parse_links(out),
            [
                link("lo", "UNKNOWN", true),
                link("fab0", "UP", true),
                link("mgmt0", "LOWERLAYERDOWN", false),
            ]
        );
    }
}
