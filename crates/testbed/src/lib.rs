//! A namespaced test cluster and a bounded traffic generator, shared by the demo, the
//! integration tests and the benchmarks. This crate owns the testbed's network namespaces,
//! links and addresses, the processes started in them, and their cleanup.
//!
//! [`Testbed::create`] builds, on one Linux host:
//!
//! ```text
//!   switch ns (br0)                     mgmt ns (mbr0 198.19.0.1/24, the controller)
//!    p1   p2  ...  pN                    m1   m2  ...  mN
//!    |    |        |                     |    |        |
//!   fab0 fab0     fab0                 mgmt0 mgmt0   mgmt0
//!  node1 node2 ... nodeN   fab0 = 198.18.0.k/24 (MTU 9000), mgmt0 = 198.19.0.(k+1)/24 (1500)
//! ```
//!
//! Every namespace is named `nwtb<pid>x<n>-<role>` (`sw`, `mgmt`, `node<k>`), where `<pid>` is
//! the creating process and `<n>` a per-process counter, so tests in parallel do not collide
//! and namespaces left behind by a dead process are recognised ([`cleanup_stale`]). The
//! testbed deletes its namespaces on drop (also on unwinding), on [`Testbed::teardown`], and,
//! once [`install_signal_cleanup`] is called, on SIGINT/SIGTERM. Only addresses from
//! 198.18.0.0/15 (benchmarking range, RFC 2544) are used.
//!
//! For interconnect verification the switch can announce itself like a real leaf switch
//! ([`lldp`]: LLDP per port, chassis [`SWITCH_NAME`] `leaf1`, port `p<k>` for node k, each
//! node hearing only its own port), and the fabric can be broken in reversible ways:
//! [`Testbed::swap_switch_ports`], [`Testbed::cut_link`] / [`Testbed::restore_link`],
//! [`Testbed::plug_extra_host`] (an intruder on the switch). [`send_raw_frames`] sends
//! hand-made Ethernet frames from any namespace (forged probes).
//!
//! [`traffic`] is a TCP/UDP sender and sink on blocking std sockets, bounded in time and
//! bytes, meant to run on threads inside the namespaces ([`Netns::run`],
//! [`Netns::spawn_thread`]) or from a CLI.
//!
//! Creating a testbed needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root); it uses iproute2's `ip`.

pub mod capture;
mod error;
mod faults;
pub mod lldp;
mod names;
mod netns;
mod process;
mod raw;
mod registry;
mod sys;
mod testbed;
pub mod traffic;

pub use error::TestbedError;
pub use faults::ExtraHost;
pub use lldp::{lldp_frame, parse_lldp, LldpAnnouncer};
pub use names::NAMESPACE_PREFIX;
pub use netns::Netns;
pub use nix::sys::signal::Signal;
pub use process::Process;
pub use raw::send_raw_frames;
pub use registry::{cleanup_stale, install_signal_cleanup, live_testbeds, teardown_all};
pub use testbed::{
    Node, Testbed, TestbedSpec, CONTROLLER_IP, FABRIC_IFACE, MAX_NODES, MGMT_BRIDGE, MGMT_IFACE,
    MGMT_MTU, PREFIX_LEN, SWITCH_BRIDGE, SWITCH_NAME,
};

/// Whether this process may create network namespaces (CAP_NET_ADMIN and CAP_SYS_ADMIN);
/// privileged tests skip themselves when it is `false`.
pub fn has_privileges() -> bool {
    sys::has_netns_capabilities()
}
