//! A handle on one network namespace: run programs, threads and closures inside it.

use crate::error::TestbedError;
use crate::sys;
use nix::sched::{setns, CloneFlags};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A named network namespace (a file in `/run/netns`, as `ip netns` manages them).
///
/// Cloning the handle does not clone the namespace; the [`Testbed`](crate::Testbed) that made
/// it owns it and deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn new(name: String) -> Netns {
        Netns { name }
    }

    /// A handle on an existing namespace named `name` (for tools that were handed a name).
    pub fn existing(name: &str) -> Result<Netns, TestbedError> {
        let path = sys::netns_path(name);
        if path.exists() {
            Ok(Netns::new(name.to_string()))
        } else {
            Err(TestbedError::Io {
                op: "open network namespace",
                path,
                source: std::io::ErrorKind::NotFound.into(),
            })
        }
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        sys::netns_path(&self.name)
    }

    /// `nsenter --net=/run/netns/<name> -- <program>`: a command that runs `program` inside the
    /// namespace. `nsenter` execs the program in place, so the child's pid is the program's.
    /// Only the network namespace changes: unlike `ip netns exec`, which also gives the child
    /// a private mount namespace with its own `/sys`, the program sees the host's mounts, so
    /// what it pins in bpffs (`/sys/fs/bpf`) outlives it (an agent restart finds its maps).
    /// Add arguments, environment and stdio as usual; pass it to
    /// [`Testbed::spawn`](crate::Testbed::spawn) to have teardown stop it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.nsenter_arg()).arg("--").arg(program);
        cmd
    }

    /// `--net=/run/netns/<name>`, the `nsenter` argument [`Netns::command`] uses.
    pub fn nsenter_arg(&self) -> String {
        format!("--net={}", self.path().display())
    }

    /// Runs `ip -n <name> <args>` and returns its output.
    pub fn ip(&self, args: &[&str]) -> Result<String, TestbedError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sys::ip(&all)
    }

    /// Sets interface `iface` administratively up or down (`ip link set`). Does not wait for
    /// carrier; see [`Netns::wait_link_state`].
    pub fn set_link(&self, iface: &str, up: bool) -> Result<(), TestbedError> {
        self.ip(&["link", "set", "dev", iface, if up { "up" } else { "down" }])
            .map(drop)
    }

    /// Operational state of `iface` (`UP`, `DOWN`, `LOWERLAYERDOWN`, `UNKNOWN`, ...).
    pub fn link_state(&self, iface: &str) -> Result<String, TestbedError> {
        let out = self.ip(&["-o", "link", "show", "dev", iface])?;
        sys::parse_links(&out)
            .into_iter()
            .find(|l| l.name == iface)
            .map(|l| l.state)
            .ok_or_else(|| TestbedError::Command {
                command: format!("ip -n {} -o link show dev {iface}", self.name),
                status: "unparsed output".to_string(),
                stderr: out.trim().to_string(),
            })
    }

    /// Polls until every interface in `ifaces` is operationally `UP` (carrier on, qdisc
    /// active) when `up`, or none of them is `UP` when `!up`; fails after `timeout`.
    pub fn wait_link_state(
        &self,
        ifaces: &[&str],
        up: bool,
        timeout: Duration,
    ) -> Result<(), TestbedError> {
        let what = format!(
            "{} {} in {}",
            ifaces.join(", "),
            if up { "up" } else { "down" },
            self.name
        );
        self.wait_links(what, timeout, |links| {
            let is_up = |want: &&str| links.iter().any(|l| l.name == *want && l.state == "UP");
            if up {
                ifaces.iter().all(is_up)
            } else {
                !ifaces.iter().any(is_up)
            }
        })
    }

    /// Polls until every interface in `ifaces` has carrier (`LOWER_UP`).
    pub(crate) fn wait_carrier(
        &self,
        ifaces: &[&str],
        timeout: Duration,
    ) -> Result<(), TestbedError> {
        let what = format!("carrier on {} in {}", ifaces.join(", "), self.name);
        self.wait_links(what, timeout, |links| {
            ifaces
                .iter()
                .all(|want| links.iter().any(|l| l.name == *want && l.carrier))
        })
    }

    fn wait_links(
        &self,
        what: String,
        timeout: Duration,
        reached: impl Fn(&[sys::LinkInfo]) -> bool,
    ) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ip(&["-o", "link", "show"])?;
            if reached(&sys::parse_links(&out)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout { what, timeout });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `f` on a fresh OS thread that has entered this namespace (`setns(2)` with
    /// `CLONE_NEWNET` on `/run/netns/<name>`) and returns its result. Sockets created in `f`
    /// belong to the namespace for their whole life, even after they are handed to other
    /// threads. A panic in `f` is propagated to the caller.
    pub fn run<F, R>(&self, f: F) -> Result<R, TestbedError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        let name = self.name.as_str();
        let joined = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("nwtb-netns".to_string())
                .spawn_scoped(scope, move || enter(&file, name).map(|()| f()))
                .map_err(|source| TestbedError::Thread {
                    netns: name.to_string(),
                    source,
                })
                .map(|handle| handle.join())
        })?;
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Starts a thread that enters this namespace and then runs `f` (a concurrent sender or
    /// sink, say). The thread's result is `Err` if it could not enter the namespace.
    pub fn spawn_thread<F, R>(
        &self,
        f: F,
    ) -> Result<JoinHandle<Result<R, TestbedError>>, TestbedError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name("nwtb-netns".to_string())
            .spawn(move || enter(&file, &name).map(|()| f()))
            .map_err(|source| TestbedError::Thread {
                netns: self.name.clone(),
                source,
            })
    }

    /// Writes a sysctl under `/proc/sys/net` of this namespace (`key` like
    /// `ipv6/conf/default/disable_ipv6`). `/proc/sys/net` resolves against the network
    /// namespace of the thread that opens it, so this runs on a thread inside the namespace.
    pub fn write_net_sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        let path = PathBuf::from("/proc/sys/net").join(key);
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| TestbedError::Io {
                op: "write sysctl",
                path: PathBuf::from(format!("{} in {}", path.display(), self.name)),
                source,
            })
    }

    /// Reads a sysctl under `/proc/sys/net` of this namespace.
    pub fn read_net_sysctl(&self, key: &str) -> Result<String, TestbedError> {
        let path = PathBuf::from("/proc/sys/net").join(key);
        self.run(|| std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_string())
            .map_err(|source| TestbedError::Io {
                op: "read sysctl",
                path: PathBuf::from(format!("{} in {}", path.display(), self.name)),
                source,
            })
    }

    fn open(&self) -> Result<std::fs::File, TestbedError> {
        let path = self.path();
        std::fs::File::open(&path).map_err(|source| TestbedError::Io {
            op: "open network namespace",
            path,
            source,
        })
    }
}

/// Moves the calling thread into the network namespace `file`.
fn enter(file: &std::fs::File, name: &str) -> Result<(), TestbedError> {
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| TestbedError::Setns {
        netns: name.to_string(),
        source,
    })
}
