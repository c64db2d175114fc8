//! nicwarden-mesh: the pure core of the encrypted node-to-node mesh (no I/O, time passed in).
//!
//! Nodes of one quota group talk over WireGuard tunnels. The controller decides who may
//! tunnel with whom; the agents configure WireGuard. This crate is the logic of both sides,
//! shaped like the lease core (`nicwarden-lease`): deterministic state machines that read no
//! clock, draw no randomness and open no socket.
//!
//! - [`types`]: [`WgKey`], [`PeerEntry`], [`PeerRemoval`] and the [`MeshUpdate`] the controller
//!   sends (signed by `nicwarden-proto`, which owns the wire encoding).
//! - [`planner`]: the controller's [`Planner`]: from the membership (groups, reported keys and
//!   endpoints, tamper flags, lease deadlines) to the updates each node must receive.
//! - [`agent`]: the agent's [`MeshCore`]: applies updates (replay guard, conflict checks),
//!   expires peers on its own clock, and reports what to change in WireGuard as a [`MeshDiff`].
//!
//! Architecture Invariants:
//! - A peer entry lives no longer than the leases of the node it describes: its TTL is the
//!   lease time left, and the agent expires it on its own monotonic clock.
//! - Mesh sequence numbers only grow (one controller-wide counter); an agent accepts only
//!   `seq > last_seq`.
//! - A withdrawal names the key it withdraws, so it can never remove a rotated key.
//! - Tampering is final on the agent: all peers go, every later update is refused.

#![forbid(unsafe_code)]

pub mod agent;
pub mod planner;
pub mod types;

pub use agent::{Held, MeshCore, MeshDiff, MeshError, Rejected, RemoveCause, Removed};
pub use planner::{lease_deadline, Member, Outgoing, Planner};
pub use types::*;
