//! The crate's error type. Every variant names the operation and, where there is one, the file or
//! object it failed on, e.g. `load CA key /var/lib/nicwarden/ca.key: mode 0644 is readable by
//! others; chmod 600`.

use std::io;
use std::path::PathBuf;

/// Errors from identity and PKI operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A filesystem call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A private key file grants access to group or others.
    #[error("{op} {}: mode {mode:04o} is {who}; chmod 600", path.display())]
    InsecureMode {
        op: &'static str,
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    /// A file exists but its content is unusable (bad PEM, wrong key type, mismatched pair, ...).
    #[error("{op} {}: {reason}", path.display())]
    CorruptFile {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// An in-memory object (CSR, certificate, PEM string, argument) is invalid.
    #[error("{op}: {reason}")]
    Invalid { op: &'static str, reason: String },
    /// A certificate or key operation in rcgen failed.
    #[error("{op}: {source}")]
    Cert {
        op: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// Building a rustls configuration failed.
    #[error("{op}: {source}")]
    Tls {
        op: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// A node name does not match `[a-z0-9][a-z0-9.-]{0,62}`.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: &'static str },
    /// A join token could not be parsed.
    #[error("parse join token: {reason}")]
    InvalidToken { reason: String },
    /// A lease signature did not verify (strict Ed25519).
    #[error("verify lease signature: {reason}")]
    BadSignature { reason: &'static str },
}

impl PkiError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        PkiError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        op: &'static str,
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
    ) -> Self {
        PkiError::CorruptFile {
            op,
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        PkiError::Invalid {
            op,
            reason: reason.into(),
        }
    }

    pub(crate) fn cert(op: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| PkiError::Cert { op, source }
    }

    pub(crate) fn tls(op: &'static str) -> impl FnOnce(rustls::Error) -> Self {
        move |source| PkiError::Tls { op, source }
    }
}
