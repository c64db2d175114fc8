//! The nicwarden lease model: a pure, deterministic, sans-IO core.
//!
//! This crate owns the quota tree and its allocators ([`quota`]), the controller's lease
//! ledger ([`ledger`]) and the agent's lease state machine ([`agent`]). It does no I/O,
//! reads no clock and draws no randomness: time comes in as [`Time`] values and
//! effects leave as return values, in the style of `quinn-proto`. Signatures and wire
//! encodings belong to `nicwarden-proto`; the shells (controller, agent) drive these
//! state machines.

pub mod agent;
pub mod ledger;
pub mod quota;
mod types;

pub use types::*;
