//! nicwarden-topology: the pure core of interconnect verification (no I/O, time passed in).
//!
//! The operator declares which links should exist; agents probe every fabric port with
//! signed probes and report what answered; the controller's verifier proves continuously
//! that exactly the declared links exist and that bytes are conserved across them, and
//! reports every deviation as a finding that clears when resolved.
//!
//! - [`declared`]: the topology file ([`parse`]) and the validated [`Topology`]: nodes,
//!   switches, their ports, the expected [`Link`]s, what each port should hear.
//! - [`observe`]: what agents report: a [`PortRound`] per port per probe interval, each
//!   answer a [`Heard`] (trusted node or switch, or unsigned / badly signed / replayed /
//!   unknown identity).
//! - [`verify`]: the sans-IO [`Verifier`]: rounds, byte samples, topology changes and ticks
//!   in; [`Change`]s to the [`Finding`] set out; a [`Policy`] maps them to lease revocations.
//!
//! Architecture Invariants:
//! - The verifier does no I/O, reads no clock and draws no randomness: the same inputs give
//!   the same outputs (all state in `BTreeMap`s, changes sorted by finding id).
//! - Only signed node answers and switch announcements count as evidence that a link exists;
//!   anything else is itself a finding.
//! - A finding is raised, updated and cleared under one stable id (`kind:subject`); its
//!   `first_seen` never moves.
//! - The default policy revokes nothing: findings are reported only.

#![forbid(unsafe_code)]

pub mod declared;
pub mod observe;
pub mod verify;

pub use declared::{
    parse, valid_name, Device, Endpoint, Link, LinkRef, Problem, Topology, TopologyError,
    DEFAULT_RTT_MAX_US,
};
pub use observe::{Answer, Heard, PortRound};
pub use verify::{
    ByteSample, Change, Finding, FindingKind, Policy, RevokeAction, Severity, Verifier,
    VerifierConfig,
};
