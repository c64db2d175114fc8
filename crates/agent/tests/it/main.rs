//! Privileged tests of the agent's shells on the real kernel, in testbeds of network
//! namespaces (`nicwarden-testbed`). Without root they print "skipped" and pass.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod probe;
