//! nicwarden-wg: a node's WireGuard device behind one trait.
//!
//! This crate owns the node's overlay device: its private key on disk ([`StaticKey`]), the
//! device itself (a TUN interface with the overlay address, a UDP socket on the node's
//! fabric address, the peers and their sessions) and the [`WgBackend`] trait the agent
//! drives it through (key rotation, peer upserts and removals, stats, shutdown on tamper).
//!
//! # Why userspace
//! The kernels nicwarden runs on do not all ship the `wireguard` module (this one does not),
//! so the working backend is [`GotatunBackend`]: gotatun, a userspace WireGuard
//! implementation, over a TUN device. A kernel backend over netlink is future work;
//! [`kernel_backend_status`] says whether the kernel could carry it and why nicwarden does not
//! use it yet. [`Backend`] is the configuration knob (`"gotatun"` | `"kernel"`).
//!
//! # Threads and namespaces
//! Network namespaces are per thread on Linux. [`GotatunBackend::start`] creates the TUN
//! device and binds the UDP socket in the namespace of the thread that polls it, so it must
//! run on a thread inside the node's network namespace, on a tokio runtime (the device's
//! tasks are spawned on the current runtime; build that runtime on a thread inside the
//! namespace too, so its workers are there as well). The device keeps the TUN and the socket
//! it opened at start for its whole life (gotatun's reconnects on key rotation reuse the
//! socket), so the other methods may be called from any thread of that runtime; only
//! [`WgBackend::shutdown`]'s check that the TUN is gone needs the caller in the namespace
//! (elsewhere it is skipped and logged).
//!
//! # Secrets
//! Private keys live in zeroizing buffers ([`StaticKey`]), are never printed ([`StaticKey`]'s
//! `Debug` shows the public key) and never logged. gotatun holds its copies as x25519
//! `StaticSecret`s, which zeroize on drop.

#![forbid(unsafe_code)]

mod error;
mod kernel;
mod key;
mod sys;
mod userspace;

pub use error::WgError;
pub use kernel::kernel_backend_status;
pub use key::StaticKey;
pub use userspace::GotatunBackend;

use futures::future::BoxFuture;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A peer as the device should know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's WireGuard public key.
    pub public_key: [u8; 32],
    /// Where the peer's device listens (its fabric ip:port).
    pub endpoint: SocketAddr,
    /// Overlay networks routed to (and accepted from) this peer.
    pub allowed_ips: Vec<ipnet::IpNet>,
    /// Persistent keepalive interval; `None` or `Some(0)` is off.
    pub keepalive_secs: Option<u16>,
}

/// What the device knows about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    /// The configured endpoint, or the address the peer last sent an authenticated handshake from.
    pub endpoint: Option<SocketAddr>,
    /// How long ago the last handshake completed; `None` if never.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The node's device: the TUN interface, its overlay address and the UDP listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// TUN interface name, e.g. `nwmesh0` (1..=15 bytes).
    pub iface: String,
    /// Overlay address with its prefix, e.g. `198.18.128.2/24`.
    pub address: ipnet::IpNet,
    /// The node's fabric ip:port the device listens on, e.g. `198.18.0.2:51820` (port not 0).
    pub listen: SocketAddr,
    /// MTU of the TUN interface (576..=65535 for IPv4, 1280.. for IPv6 addresses).
    pub mtu: u16,
}

impl DeviceConfig {
    /// Checks the config before anything is created.
    pub fn validate(&self) -> Result<(), WgError> {
        let invalid = |what: String| Err(WgError::InvalidConfig(what));
        if self.iface.is_empty() || self.iface.len() > 15 {
            return invalid(format!("iface {:?}: must be 1..=15 bytes", self.iface));
        }
        if self
            .iface
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
            return invalid(format!(
                "iface {:?}: must not contain '/', ':' or whitespace",
                self.iface
            ));
        }
        if self.listen.port() == 0 {
            return invalid(format!("listen {}: port must not be 0", self.listen));
        }
        let min_mtu = if self.address.addr().is_ipv4() {
            576
        } else {
            1280
        };
        if self.mtu < min_mtu {
            return invalid(format!("mtu {}: must be at least {min_mtu}", self.mtu));
        }
        Ok(())
    }
}

/// A node's WireGuard device.
pub trait WgBackend: Send + Sync {
    /// `"gotatun"` or `"kernel"`.
    fn name(&self) -> &'static str;
    /// Rotation: installs a new private key; peers are kept, their sessions dropped (the next
    /// packet to a peer starts a handshake with the new key).
    fn set_key(&self, key: &StaticKey) -> BoxFuture<'_, Result<(), WgError>>;
    /// Adds the peer, or updates it (endpoint, keepalive; allowed IPs replaced).
    fn upsert_peer(&self, peer: &PeerConfig) -> BoxFuture<'_, Result<(), WgError>>;
    /// Removes the peer and its sessions; `false` if there was none.
    fn remove_peer(&self, public_key: &[u8; 32]) -> BoxFuture<'_, Result<bool, WgError>>;
    /// Sends a handshake initiation to the peer now (unless one is in flight or a fresh
    /// session exists) without waiting for the answer: a peer whose key just changed, or a
    /// device that just restarted, does not wait for the retry timers (5 to 15 s).
    fn initiate_handshake(&self, public_key: &[u8; 32]) -> BoxFuture<'_, Result<(), WgError>>;
    /// Every peer with its stats.
    fn peers(&self) -> BoxFuture<'_, Result<Vec<PeerStats>, WgError>>;
    /// Drops every peer and every session key and the private key (tamper / shutdown); the
    /// interface stays down/removed. Later calls fail with [`WgError::ShutDown`].
    fn shutdown(&self) -> BoxFuture<'_, Result<(), WgError>>;
}

/// Which [`WgBackend`] a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// [`GotatunBackend`]: userspace WireGuard over TUN.
    #[default]
    Gotatun,
    /// Kernel WireGuard over netlink: not built yet, see [`kernel_backend_status`].
    Kernel,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Gotatun => "gotatun",
            Backend::Kernel => "kernel",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = WgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gotatun" => Ok(Backend::Gotatun),
            "kernel" => Ok(Backend::Kernel),
            other => Err(WgError::UnknownBackend(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_parses_and_prints() {
        for b in [Backend::Gotatun, Backend::Kernel] {
            assert_eq!(b.to_string().parse::<Backend>().ok(), Some(b));
        }
        let err = "wireguard-go"
            .parse::<Backend>()
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(r#"unknown WireGuard backend "wireguard-go": expected "gotatun" or "kernel""#)
        );
    }

    fn config() -> DeviceConfig {
        DeviceConfig {
            iface: "nwmesh0".to_string(),
            address: "198.18.128.2/24".parse().expect("net"),
            listen: "198.18.0.2:51820".parse().expect("addr"),
            mtu: 1420,
        }
    }

    #[test]
    fn device_config_validation() {
        let check = |f: fn(&mut DeviceConfig), ok: bool| {
            let mut c = config();
            f(&mut c);
            assert_eq!(c.validate().is_ok(), ok, "{c:?}");
        };
        check(|_| {}, true);
        check(|c| c.iface = String::new(), false);
        check(|c| c.iface = "a-very-long-iface-name".to_string(), false);
        check(|c| c.iface = "nw/0".to_string(), false);
        check(|c| c.listen.set_port(0), false);
        check(|c| c.mtu = 500, false);
        check(|c| c.address = "fd00::1/64".parse().expect("net"), true);
        check(
            |c| {
                c.address = "fd00::1/64".parse().expect("net");
                c.mtu = 1000;
            },
            false,
        );
    }
}
