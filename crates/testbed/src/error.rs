//! The error type of the testbed: every variant names the operation and its object.

use std::path::PathBuf;
use std::time::Duration;

/// A testbed operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The process lacks the capabilities to create network namespaces.
    #[error(
        "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run as root or with sudo"
    )]
    NotRoot,
    /// The [`TestbedSpec`](crate::TestbedSpec) cannot be built.
    #[error("invalid testbed spec: {0}")]
    InvalidSpec(String),
    /// A program (usually `ip`) could not be started.
    #[error("run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A thread could not enter a network namespace.
    #[error("enter network namespace {netns}: {source}")]
    Setns { netns: String, source: nix::Error },
    /// A thread could not be started.
    #[error("start thread for network namespace {netns}: {source}")]
    Thread {
        netns: String,
        source: std::io::Error,
    },
    /// A signal could not be delivered to a process.
    #[error("send {signal} to {what} (pid {pid}): {source}")]
    Signal {
        signal: nix::sys::signal::Signal,
        what: String,
        pid: i32,
        source: nix::Error,
    },
    /// Waiting on a child process failed.
    #[error("wait for {what} (pid {pid}): {source}")]
    Wait {
        what: String,
        pid: u32,
        source: std::io::Error,
    },
    /// The testbed has no node of that name.
    #[error("testbed {testbed} has no node named {node:?}")]
    UnknownNode { testbed: String, node: String },
    /// [`Testbed::spawn`](crate::Testbed::spawn) got a command that does not run in one of the
    /// testbed's namespaces.
    #[error("spawn {command}: not `nsenter --net=/run/netns/<ns> -- ...` for a namespace of testbed {testbed} (build it with Netns::command)")]
    ForeignCommand { testbed: String, command: String },
    /// The testbed was already torn down (for example by a signal) while it was used.
    #[error("testbed {0} is torn down")]
    TornDown(String),
    /// A condition did not become true within its bound.
    #[error("wait for {what}: not reached within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    /// Signal handlers could not be installed.
    #[error("install SIGINT/SIGTERM cleanup handler: {0}")]
    SignalHandlers(std::io::Error),
    /// Some teardown steps failed; the others were still carried out.
    #[error("tear down {what}: {}", failures.join("; "))]
    Teardown { what: String, failures: Vec<String> },
}
