//! The testbeds alive in this process, their teardown on SIGINT/SIGTERM, and the removal of
//! testbeds left behind by processes that died without tearing down.

use crate::error::TestbedError;
use crate::names::{self, TestbedId};
use crate::sys;
use crate::testbed::Shared;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Live testbeds of this process by id. A testbed is registered before its first namespace
/// exists and leaves when its teardown ends.
static LIVE: Mutex<BTreeMap<String, Arc<Shared>>> = Mutex::new(BTreeMap::new());
/// Whether the signal thread is installed.
static SIGNALS_INSTALLED: Mutex<bool> = Mutex::new(false);
/// One stale cleanup at a time in this process.
static CLEANUP: Mutex<()> = Mutex::new(());

fn live() -> MutexGuard<'static, BTreeMap<String, Arc<Shared>>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn register(shared: &Arc<Shared>) {
    live().insert(shared.name().to_string(), Arc::clone(shared));
}

pub(crate) fn unregister(id: &str) {
    live().remove(id);
}

fn is_live(id: &str) -> bool {
    live().contains_key(id)
}

/// Ids of the testbeds of this process that are not torn down yet.
pub fn live_testbeds() -> Vec<String> {
    live().keys().cloned().collect()
}

/// Tears down every live testbed of this process and returns their ids. Each teardown is
/// attempted; failures are reported together. For callers that handle shutdown signals
/// themselves (a tokio program selecting on `tokio::signal::ctrl_c()`, say).
pub fn teardown_all() -> Result<Vec<String>, TestbedError> {
    let all: Vec<Arc<Shared>> = live().values().cloned().collect();
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for shared in all {
        match shared.teardown() {
            Ok(()) => done.push(shared.name().to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    if failures.is_empty() {
        Ok(done)
    } else {
        Err(TestbedError::Teardown {
            what: "all testbeds".to_string(),
            failures,
        })
    }
}

/// Makes SIGINT and SIGTERM tear down every live testbed of this process, then exit with
/// status 128 + signal number (130, 143).
///
/// A dedicated thread waits for the signals (`signal-hook`'s self-pipe iterator, so nothing
/// runs in signal-handler context) and calls [`teardown_all`]. Installing replaces the
/// default action of the two signals for the whole process: after this, the process ends
/// on Ctrl-C only through this thread. Other handlers (such as `tokio::signal::ctrl_c`)
/// still fire, but the process exits as soon as the teardown is done; a program that wants
/// its own graceful shutdown should not install this and should call [`teardown_all`] on its
/// shutdown path instead. Calling it again is a no-op.
pub fn install_signal_cleanup() -> Result<(), TestbedError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut installed = SIGNALS_INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *installed {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(TestbedError::SignalHandlers)?;
    std::thread::Builder::new()
        .name("nwtb-signals".to_string())
        .spawn(move || {
            if let Some(signo) = signals.forever().next() {
                let name = Signal::try_from(signo).map_or("signal", Signal::as_str);
                eprintln!("nicwarden-testbed: {name}: tearing down testbeds");
                match teardown_all() {
                    Ok(ids) => tracing::info!(?ids, "testbeds torn down on {name}"),
                    Err(e) => eprintln!("nicwarden-testbed: {e}"),
                }
                std::process::exit(128 + signo);
            }
        })
        .map_err(TestbedError::SignalHandlers)?;
    *installed = true;
    Ok(())
}

/// Whether the process that created testbed `id` is still the one running: its pid exists
/// and, when the testbed left an owner marker, the pid's start time is the recorded one (a
/// reused pid is not the owner). Testbeds carrying this process's pid are alive only while
/// registered here, so a dead predecessor with the same pid does not block us.
fn owner_alive(id: TestbedId) -> bool {
    if id.pid == std::process::id() {
        return is_live(&id.to_string());
    }
    is_owner(sys::process_start_time(id.pid), sys::read_marker(id))
}

/// Whether a process with start time `current` (`None`: no such process) is the owner that
/// recorded `recorded` in its marker (`None`: no marker, so only the pid can be checked).
fn is_owner(current: Option<u64>, recorded: Option<u64>) -> bool {
    match (current, recorded) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(now), Some(then)) => now == then,
    }
}

/// Removes the namespaces `nwtb*` whose creating process is gone (see the naming scheme in
/// the crate docs): processes still running inside them are killed (SIGKILL: nobody is left
/// to shut them down gracefully), then the namespaces are deleted. Owner markers of dead
/// testbeds are removed too. Returns the names of the namespaces this call removed; a
/// namespace that disappears meanwhile (another cleanup got there first) is not an error.
/// [`Testbed::create`](crate::Testbed::create) calls this first.
pub fn cleanup_stale() -> Result<Vec<String>, TestbedError> {
    let _one_at_a_time = CLEANUP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // And one at a time across processes, so that one cleanup's scan for processes and its
    // deletions are not interleaved with another's.
    let _across_processes = sys::lock_cleanup();
    let names = sys::list_namespaces()?;
    let stale = names::stale_namespaces(names.iter().map(String::as_str), owner_alive);
    let mut failures = Vec::new();
    for (pid, ns) in sys::pids_in(&stale) {
        if let Err(e) = sys::signal_pid(pid, Signal::SIGKILL, &format!("process in stale {ns}")) {
            failures.push(e.to_string());
        }
    }
    let mut removed = Vec::new();
    for name in stale {
        match sys::netns_del(&name) {
            Ok(()) => removed.push(name),
            Err(e) if sys::netns_exists(&name) => failures.push(e.to_string()),
            Err(_) => {}
        }
    }
    // A dead owner's marker goes once none of its namespaces is left (one that appeared after
    // the listing above keeps its marker, so the next cleanup still recognises it).
    let remaining: Vec<TestbedId> = sys::list_namespaces()?
        .iter()
        .filter_map(|name| names::parse_namespace(name).map(|(id, _)| id))
        .collect();
    for id in sys::list_markers() {
        if !remaining.contains(&id) && !owner_alive(id) {
            if let Err(e) = sys::remove_marker(id) {
                failures.push(e.to_string());
            }
        }
    }
    if failures.is_empty() {
        Ok(removed)
    } else {
        Err(TestbedError::Teardown {
            what: "stale testbed namespaces".to_string(),
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_the_live_pid_with_the_recorded_start_time() {
        // No such process: dead, whatever the marker says.
        assert!(!is_owner(None, None));
        assert!(!is_owner(None, Some(5)));
        // Alive and no marker: only the pid can be checked; assume it is the owner.
        assert!(is_owner(Some(5), None));
        // Alive with a marker: the owner only if it started when the marker says.
        assert!(is_owner(Some(5), Some(5)));
        assert!(!is_owner(Some(9), Some(5)), "a reused pid is not the owner");
    }
}
