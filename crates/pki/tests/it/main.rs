//! Integration tests for nicwarden-pki: the controller data directory, node certificate issuance,
//! and real TLS handshakes over loopback with the configs this crate builds.

#![allow(clippy::unwrap_used)]

mod identity;
mod tls;

use std::path::Path;

use nicwarden_pki::ControllerIdentity;

pub fn names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}

pub fn controller(dir: &Path) -> ControllerIdentity {
    ControllerIdentity::load_or_create(dir, &names()).unwrap()
}
