//! The error type: every variant names the operation and its object.

use std::path::PathBuf;

/// A WireGuard operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The [`DeviceConfig`](crate::DeviceConfig) cannot be used.
    #[error("invalid WireGuard device config: {0}")]
    InvalidConfig(String),
    /// A system call or file operation failed (`op` names it and its object, e.g.
    /// `bind UDP 198.18.0.2:51820`, `load WireGuard key /etc/nicwarden/wg.key`).
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    /// A key file exists but is not acceptable (mode, length, encoding).
    #[error("{op} {}: {reason}", path.display())]
    Key {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The `tun` crate failed to create or configure the TUN device.
    #[error("{op}: {source}")]
    Tun {
        op: String,
        source: gotatun::tun::tun::Error,
    },
    /// gotatun failed to wrap the TUN device.
    #[error("{op}: {source}")]
    TunDevice {
        op: String,
        source: gotatun::tun::tun_async_device::Error,
    },
    /// A gotatun device operation failed.
    #[error("{op}: {source}")]
    Device {
        op: String,
        source: gotatun::device::Error,
    },
    /// An external command (iproute2's `ip`) could not run or failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// The backend cannot be used on this host.
    #[error("{0}")]
    Unavailable(String),
    /// The backend name is not known.
    #[error("unknown WireGuard backend {0:?}: expected \"gotatun\" or \"kernel\"")]
    UnknownBackend(String),
    /// The device was shut down; it must be started again.
    #[error("WireGuard device {iface} is shut down")]
    ShutDown { iface: String },
    /// Shutdown dropped the device but its TUN interface did not go away.
    #[error("shut down WireGuard device {iface}: {reason}")]
    Teardown { iface: String, reason: String },
}
