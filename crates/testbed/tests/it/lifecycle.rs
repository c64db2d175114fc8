//! Creation, teardown (explicit, on drop, on panic), spawned processes, stale cleanup.

use crate::{eventually, netns_list, netns_pids, require_root};
use nicwarden_testbed::{cleanup_stale, live_testbeds, Testbed, TestbedError, TestbedSpec};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn one_node() -> TestbedSpec {
    TestbedSpec {
        nodes: 1,
        ..TestbedSpec::default()
    }
}

#[test]
fn not_root_error_says_what_to_do() {
    assert_eq!(
        TestbedError::NotRoot.to_string(),
        "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run as root or with sudo"
    );
}

#[test]
fn invalid_specs_are_refused() {
    require_root!();
    for spec in [
        TestbedSpec {
            nodes: 0,
            ..TestbedSpec::default()
        },
        TestbedSpec {
            nodes: 254,
            ..TestbedSpec::default()
        },
        TestbedSpec {
            nodes: 1,
            fabric_mtu: 20,
        },
    ] {
        assert!(
            matches!(Testbed::create(spec), Err(TestbedError::InvalidSpec(_))),
            "{spec:?}"
        );
    }
}

#[test]
fn drop_and_teardown_remove_every_namespace() {
    require_root!();
    let tb = Testbed::create(TestbedSpec::default()).unwrap();
    let names = tb.namespaces();
    assert_eq!(names.len(), 5);
    assert!(live_testbeds().contains(&tb.id().to_string()));
    let listed = netns_list();
    assert!(names.iter().all(|n| listed.contains(n)));
    let id = tb.id().to_string();
    drop(tb);
    let listed = netns_list();
    assert!(names.iter().all(|n| !listed.contains(n)), "{listed:?}");
    assert!(!live_testbeds().contains(&id));

    let tb = Testbed::create(one_node()).unwrap();
    let names = tb.namespaces();
    tb.teardown().unwrap();
    let listed = netns_list();
    assert!(names.iter().all(|n| !listed.contains(n)), "{listed:?}");
}

#[test]
fn a_panicking_test_body_still_removes_its_namespaces() {
    require_root!();
    let created = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let tb = Testbed::create(one_node()).unwrap();
        created.lock().unwrap().extend(tb.namespaces());
        panic!("test body fails while the testbed is up");
    });
    assert!(result.is_err());
    let names = created.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    let listed = netns_list();
    assert!(names.iter().all(|n| !listed.contains(n)), "{listed:?}");
}

#[test]
fn teardown_stops_spawned_processes_gracefully_then_by_force() {
    require_root!();
    let tb = Testbed::create(one_node()).unwrap();
    let node = &tb.nodes()[0];
    // A well-behaved process, started with a builder chain.
    let polite = tb
        .spawn(node.netns.command("sleep").arg("60").stdout(Stdio::null()))
        .unwrap();
    // One that ignores SIGTERM, with a child (untracked) that inherits that.
    let stubborn = tb
        .spawn(
            tb.switch()
                .command("sh")
                .args(["-c", "trap '' TERM; sleep 60 & wait"]),
        )
        .unwrap();
    assert_eq!(polite.label(), "sleep");
    assert_eq!(polite.netns(), node.netns.name());
    assert!(polite.try_wait().unwrap().is_none());
    // The process really is in the namespace: `ip netns pids` lists it (once `nsenter`
    // has entered the namespace and exec'd the program).
    let pids_in = netns_pids;
    let polite_in_node = || pids_in(node.netns.name()).contains(&polite.pid().to_string());
    assert!(eventually(Duration::from_secs(5), polite_in_node));
    // Make sure the shell has installed its trap (and started its child) before teardown
    // signals it.
    let shell_and_child = || pids_in(tb.switch().name()).len() >= 2;
    assert!(eventually(Duration::from_secs(5), shell_and_child));

    let started = Instant::now();
    tb.teardown().unwrap();
    let took = started.elapsed();
    // SIGTERM grace (2 s) for the stubborn one, then SIGKILL.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(polite.try_wait().unwrap().unwrap().signal(), Some(15));
    assert_eq!(stubborn.try_wait().unwrap().unwrap().signal(), Some(9));
}

#[test]
fn spawn_refuses_commands_outside_the_testbed() {
    require_root!();
    let tb = Testbed::create(one_node()).unwrap();
    let other = Testbed::create(one_node()).unwrap();
    assert!(matches!(
        tb.spawn(&mut Command::new("sleep")),
        Err(TestbedError::ForeignCommand { .. })
    ));
    assert!(matches!(
        tb.spawn(&mut other.nodes()[0].netns.command("true")),
        Err(TestbedError::ForeignCommand { .. })
    ));
    // A process can be stopped before teardown and reports its status.
    let p = tb.spawn(tb.mgmt().command("sleep").arg("60")).unwrap();
    let status = p.terminate(Duration::from_secs(2)).unwrap();
    assert!(!status.success());
    assert!(p.try_wait().unwrap().is_some());
}

/// Deletes a namespace on drop, so a failing test leaves nothing behind.
struct NsGuard(String);

impl NsGuard {
    /// Adds namespace `name`. A stale-looking name can be deleted by a concurrent cleanup
    /// (another test's `Testbed::create`) while `ip netns add` is still mounting it, so retry.
    fn add(name: String) -> NsGuard {
        for _ in 0..5 {
            let st = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap();
            if st.success() {
                return NsGuard(name);
            }
        }
        panic!("ip netns add {name} keeps failing");
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// A pid no process can have.
fn dead_pid() -> u64 {
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    max + 1000
}

#[test]
fn cleanup_stale_removes_dead_owners_namespaces_and_leaves_live_ones() {
    require_root!();
    let live = Testbed::create(one_node()).unwrap();
    // Distinct per test process, also between concurrent runs of this binary.
    let seq = u64::from(std::process::id()) * 2;
    let stale = NsGuard::add(format!("nwtb{}x{seq}-sw", dead_pid()));
    let stale_node = NsGuard::add(format!("nwtb{}x{seq}-node1", dead_pid()));
    // A leftover process inside the stale namespace is killed.
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &stale.0, "sleep", "60"])
        .spawn()
        .unwrap();
    let orphan_pid = orphan.id().to_string();
    // Wait until it is inside (or has failed to get in because a concurrent cleanup already
    // removed the namespace).
    let settled = eventually(Duration::from_secs(5), || {
        netns_pids(&stale.0).contains(&orphan_pid) || orphan.try_wait().unwrap().is_some()
    });
    assert!(settled || !crate::netns_list().contains(&stale.0));
    // pid 1 is alive and never ours: without an owner marker its namespace is left alone.
    // (A marker with another start time would make it stale, as for a reused pid; that rule
    // is unit-tested: here it would race with other test processes' cleanups.)
    let foreign_live = NsGuard::add(format!("nwtb1x{seq}-sw"));

    let removed = cleanup_stale().unwrap();
    let listed = netns_list();
    // Another test's Testbed::create may have run the cleanup first; either way they are gone.
    for gone in [&stale.0, &stale_node.0] {
        assert!(!listed.contains(gone), "{gone} still listed: {listed:?}");
    }
    assert!(removed.iter().all(|n| n.starts_with("nwtb")), "{removed:?}");
    assert!(listed.contains(&foreign_live.0), "{listed:?}");
    assert!(live.namespaces().iter().all(|n| listed.contains(n)));
    if removed.contains(&stale.0) {
        // This cleanup deleted the namespace while the orphan was inside: it killed it.
        assert!(eventually(Duration::from_secs(5), || orphan
            .try_wait()
            .unwrap()
            .is_some()));
    } else {
        // A concurrent cleanup (another test process) got there first, possibly between the
        // orphan's `nsenter` opening the namespace and entering it.
        let _ = orphan.kill();
        let _ = orphan.wait();
    }
    // A second run finds nothing of these.
    let again = cleanup_stale().unwrap();
    assert!(!again.contains(&stale.0));
    // The live testbed still works after all that.
    live.nodes()[0].netns.ip(&["link", "show", "fab0"]).unwrap();
}

/// Set in the environment of the helper process of the signal test.
const SIGNAL_HELPER: &str = "NWTB_SIGNAL_HELPER";

#[test]
fn sigterm_tears_down_every_live_testbed_and_exits() {
    require_root!();
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "lifecycle::signal_cleanup_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGNAL_HELPER, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The helper prints its namespaces once both testbeds are up (after libtest's "test ...",
    // on the same line). Read on a thread so the wait is bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("READY ").map(|(_, names)| names.to_string()));
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(Duration::from_secs(30));
    let Ok(Some(ready)) = ready else {
        let _ = child.kill();
        panic!("helper did not get ready: {ready:?}");
    };
    let names: Vec<String> = ready.split_whitespace().map(str::to_string).collect();
    assert_eq!(names.len(), 6);
    let listed = netns_list();
    assert!(names.iter().all(|n| listed.contains(n)));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || child
        .try_wait()
        .unwrap()
        .is_some()));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    assert_eq!(status.signal(), None);
    let listed = netns_list();
    assert!(names.iter().all(|n| !listed.contains(n)), "{listed:?}");
}

/// Runs only as the helper process of the test above: two testbeds (one with a spawned
/// process), the signal cleanup installed, then waits to be signalled (or for stdin to close).
#[test]
fn signal_cleanup_helper() {
    if std::env::var_os(SIGNAL_HELPER).is_none() {
        return;
    }
    nicwarden_testbed::install_signal_cleanup().unwrap();
    nicwarden_testbed::install_signal_cleanup().unwrap(); // idempotent
    let a = Testbed::create(one_node()).unwrap();
    let b = Testbed::create(one_node()).unwrap();
    a.spawn(a.nodes()[0].netns.command("sleep").arg("60"))
        .unwrap();
    let mut names = a.namespaces();
    names.extend(b.namespaces());
    println!("READY {}", names.join(" "));
    let mut sink = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
}
