//! Integration tests of the lease core: property tests of its invariants and a simulated-time
//! harness running one controller ledger and N agents over a simulated network.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod props;
mod sim;
