//! Processes a testbed started in its namespaces; teardown stops them before it deletes the
//! namespaces, so no namespace is left busy.

use crate::error::TestbedError;
use nix::sys::signal::Signal;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often waits poll a child for its exit.
const POLL: Duration = Duration::from_millis(5);

/// A process started by [`Testbed::spawn`](crate::Testbed::spawn). Clones share the process;
/// the testbed keeps one, so dropping every handle does not leave the process behind.
#[derive(Debug, Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    label: String,
    netns: String,
    pid: u32,
    child: Mutex<Child>,
}

impl Process {
    pub(crate) fn new(label: String, netns: String, child: Child) -> Process {
        Process {
            inner: Arc::new(Inner {
                label,
                netns,
                pid: child.id(),
                child: Mutex::new(child),
            }),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The program that was started (as given to [`Netns::command`](crate::Netns::command)).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn what(&self) -> String {
        format!("{} in {}", self.inner.label, self.inner.netns)
    }

    fn wait_error(&self, source: std::io::Error) -> TestbedError {
        TestbedError::Wait {
            what: self.what(),
            pid: self.inner.pid,
            source,
        }
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, TestbedError> {
        self.child().try_wait().map_err(|e| self.wait_error(e))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` unless the process has already exited (then returns `false`). Reaping
    /// and signalling happen under one lock, so a reaped (and possibly reused) pid is never
    /// signalled.
    pub fn signal(&self, signal: Signal) -> Result<bool, TestbedError> {
        let mut child = self.child();
        if child.try_wait().map_err(|e| self.wait_error(e))?.is_some() {
            return Ok(false);
        }
        let pid = i32::try_from(self.inner.pid).map_err(|_| TestbedError::Signal {
            signal,
            what: self.what(),
            pid: -1,
            source: nix::errno::Errno::ESRCH,
        })?;
        crate::sys::signal_pid(pid, signal, &self.what())?;
        Ok(true)
    }

    /// Stops the process: SIGTERM, then SIGKILL if it has not exited after `grace`. Returns
    /// its exit status.
    pub fn terminate(&self, grace: Duration) -> Result<ExitStatus, TestbedError> {
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.signal(Signal::SIGKILL)?;
        let bound = Duration::from_secs(5);
        self.wait_timeout(bound)?
            .ok_or_else(|| TestbedError::Timeout {
                what: format!("{} to exit after SIGKILL", self.what()),
                timeout: bound,
            })
    }

    /// Takes the child's stdin pipe (if it was configured as `Stdio::piped()`).
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        self.child().stdin.take()
    }

    /// Takes the child's stdout pipe (if it was configured as `Stdio::piped()`).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.child().stdout.take()
    }

    /// Takes the child's stderr pipe (if it was configured as `Stdio::piped()`).
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.child().stderr.take()
    }
}
