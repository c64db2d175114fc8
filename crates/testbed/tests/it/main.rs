//! Integration tests of the testbed on a real kernel: namespaces, links, teardown, stale
//! cleanup, and traffic through the switch. Privileged tests need CAP_NET_ADMIN and
//! CAP_SYS_ADMIN (root); without them they print "skipped: needs root" and pass.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod cluster;
mod lifecycle;
mod traffic;

use std::net::{IpAddr, SocketAddr};
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
