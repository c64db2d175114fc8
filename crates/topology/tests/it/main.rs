//! Integration tests of nicwarden-topology: a topology file, agents' probe rounds on a
//! simulated clock, and the verifier's findings; plus property tests of the verifier.

mod props;
mod scenario;
