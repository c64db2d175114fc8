//! Integration tests of the testbed on a real kernel: namespaces, links, teardown, stale
//! cleanup, and traffic through the switch. Privileged tests need CAP_NET_ADMIN and
//! CAP_SYS_ADMIN (root); without them they print "skipped: needs root" and pass.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod cluster;
mod lifecycle;
mod traffic;

use nicwarden_testbed::traffic::{Proto, Report, SendSpec, Sink, SinkSpec, TrafficError};
use nicwarden_testbed::{Netns, Testbed, TestbedSpec};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Returns from the test (passing) when not privileged.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nicwarden_testbed::has_privileges() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
            return;
        }
    };
}

/// Namespace names as `ip netns list` shows them.
pub fn netns_list() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Pids in namespace `name`, as `ip netns pids` lists them.
pub fn netns_pids(name: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

pub fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Polls `cond` until it holds or `bound` passes; returns whether it held.
pub fn eventually(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A testbed of two nodes.
pub fn two_nodes() -> Testbed {
    Testbed::create(TestbedSpec {
        nodes: 2,
        ..TestbedSpec::default()
    })
    .unwrap()
}

/// A sink running on its own thread, as [`start_sink`] returns it.
pub type SinkThread = JoinHandle<Result<Report, TrafficError>>;

/// Binds a sink inside `ns` and runs it on a plain thread (the socket stays in `ns`); returns
/// its address, its progress counter (bytes so far) and the thread.
#[track_caller]
pub fn start_sink(ns: &Netns, spec: SinkSpec) -> (SocketAddr, Arc<AtomicU64>, SinkThread) {
    let sink = ns.run(|| Sink::bind(spec)).unwrap().unwrap();
    let local = sink.local_addr().unwrap();
    let progress = sink.progress();
    (local, progress, std::thread::spawn(move || sink.run()))
}

/// Runs the sender `spec` inside `ns` and returns what it returned.
#[track_caller]
pub fn try_send_from(ns: &Netns, spec: &SendSpec) -> Result<Report, TrafficError> {
    ns.run(|| nicwarden_testbed::traffic::send(spec)).unwrap()
}

/// Asserts that the sender `spec`, run inside `ns`, fails to connect and returns within `bound`.
#[track_caller]
pub fn assert_connect_fails_within(ns: &Netns, spec: &SendSpec, bound: Duration) {
    let started = Instant::now();
    let r = try_send_from(ns, spec);
    assert!(matches!(r, Err(TrafficError::Connect { .. })), "{r:?}");
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
}

/// Runs the sender `spec` inside `ns`, which must succeed, and returns its report.
#[track_caller]
pub fn send_from(ns: &Netns, spec: &SendSpec) -> Report {
    try_send_from(ns, spec).unwrap()
}

/// Sends `bytes` over TCP from inside `ns` to `dst` (within the default 10 s).
#[track_caller]
pub fn send_tcp(ns: &Netns, dst: SocketAddr, bytes: u64) -> Report {
    send_from(
        ns,
        &SendSpec {
            max_bytes: Some(bytes),
            ..SendSpec::new(Proto::Tcp, dst)
        },
    )
}
