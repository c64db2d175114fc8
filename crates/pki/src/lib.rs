//! Identity and PKI for nicwarden.
//!
//! - **Controller** ([`ControllerIdentity`]): on first start creates, in its data directory, an
//!   ECDSA P-256 CA (`ca.key`, `ca.pem`), a server certificate for the agent port (`server.key`,
//!   `server.pem`) and an Ed25519 lease-signing key (`lease-signing.key`). Private files are
//!   written atomically with mode 0600 ([`write_private`]) and refused on load if group/world
//!   accessible. It signs node certificates from CSRs ([`ControllerIdentity::issue_node_cert`]).
//! - **Join tokens** ([`JoinToken`]): `nwjt1.<id>.<secret>.<ca-sha256-hex>`, printed once by
//!   `nicwarden node add NAME`; the controller stores only the secret's hash and checks it in
//!   constant time ([`token_secret_matches`]). The CA fingerprint in the token lets a fresh agent
//!   authenticate the controller before it has any certificate.
//! - **Agent** ([`NodeKey`]): generates its own ECDSA P-256 key, sends a CSR, receives a
//!   certificate whose CN and URI SAN (`nicwarden://node/<name>`) carry its node name.
//! - **TLS** ([`controller_server_config`], [`enrollment_client_config`],
//!   [`agent_client_config`]): rustls configs on the ring provider. The server accepts clients
//!   without a certificate (for enrollment) but rejects a certificate not issued by its CA; the
//!   session RPC reads the identity with [`node_identity_from_cert`].
//! - **Leases** ([`LeaseSigningKey`], [`verify_lease_signature`]): Ed25519 with strict
//!   verification.
//! - **Link probes** ([`NodeKey::sign_fixed`], [`verify_node_signature`]): ECDSA P-256 with
//!   SHA-256 by the node key, fixed 64-byte `r || s`, checked against the node certificate.
//!
//! Architecture invariant: secrets (private keys, token secrets) live in zeroizing buffers and
//! never appear in `Debug` output or logs.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod controller;
mod error;
mod files;
mod lease_key;
mod node;
mod pem;
mod tls;
mod token;

pub use controller::{
    ControllerIdentity, CA_CERT_FILE, CA_KEY_FILE, LEASE_KEY_FILE, MAX_NODE_CERT_DAYS,
    SERVER_CERT_FILE, SERVER_KEY_FILE,
};
pub use error::PkiError;
pub use files::{write_private, write_public};
pub use lease_key::{verify_lease_signature, LeaseSigningKey};
pub use node::{
    node_identity_from_cert, validate_node_name, verify_node_signature, NodeKey, NODE_URI_PREFIX,
};
pub use tls::{
    agent_client_config, controller_server_config, crypto_provider, enrollment_client_config,
    ALPN_H2,
};
pub use token::{token_secret_matches, JoinToken};
pub use zeroize::Zeroizing;
