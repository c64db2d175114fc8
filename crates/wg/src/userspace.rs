//! [`GotatunBackend`]: userspace WireGuard (gotatun) over a TUN device.
//!
//! What gotatun does and does not do, and how this module fits around it:
//! - gotatun's own UDP factory binds `[::]:port` (dual stack) and cannot be told an address.
//!   Here the socket is bound once, at start, to the configured listen ip:port (so the device
//!   answers on the fabric address only), and a small [`UdpTransportFactory`] hands gotatun
//!   that socket whenever it (re)connects. Consequence: an IPv4 listen address reaches IPv4
//!   peers only, and reconnects (on key rotation) do not depend on the calling thread's
//!   namespace.
//! - `DeviceBuilder::create_tun` opens the TUN with the `tun` crate's defaults and leaves it
//!   unaddressed and down. Here the `tun` crate is configured directly (name, IPv4 address and
//!   netmask, MTU, up: ioctls, no shelling out) and the result handed to the builder with
//!   `with_ip`, which is what `create_tun` does inside. The `tun` crate sets IPv4 addresses
//!   only; an IPv6 overlay address is added with `ip -6 addr add`.
//! - gotatun brings its connection (socket tasks, timers) up at `build` only if peers were
//!   given, and afterwards only on a key or port change; adding peers to a peerless device
//!   does not. `start` therefore builds with port 0 and then sets the real port, which forces
//!   the connection up.
//! - Changing the private key resets every peer's sessions (gotatun `Tunn::set_static_private`)
//!   and reconnects; removing a peer drops it from the session index, so packets of its
//!   sessions are dropped at once.

use crate::error::WgError;
use crate::key::StaticKey;
use crate::sys;
use crate::{DeviceConfig, PeerConfig, PeerStats, WgBackend};
use futures::future::BoxFuture;
use futures::FutureExt as _;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::tun::tun;
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::udp::socket::{SockOpt, UdpSocket};
use gotatun::udp::{UdpRecv as _, UdpTransportFactory, UdpTransportFactoryParams};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

/// How long `shutdown` waits for the TUN interface to disappear once the device is dropped.
const TUN_GONE_TIMEOUT: Duration = Duration::from_secs(2);

type Transports = (PreboundUdp, TunDevice, TunDevice);

/// Userspace WireGuard: a gotatun device over a TUN interface. See the crate docs for the
/// thread/namespace rules.
pub struct GotatunBackend {
    iface: String,
    listen: SocketAddr,
    /// `/proc/thread-self/ns/net` of the starting thread (`net:[inode]`).
    netns: Option<std::path::PathBuf>,
    device: tokio::sync::Mutex<Option<Device<Transports>>>,
}

impl std::fmt::Debug for GotatunBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GotatunBackend")
            .field("iface", &self.iface)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl GotatunBackend {
    /// Creates the TUN `cfg.iface` with `cfg.address` and `cfg.mtu` and brings it up, binds
    /// UDP `cfg.listen`, and starts a device with private key `key` and no peers.
    ///
    /// Must be called on a tokio runtime, from a thread inside the node's network namespace
    /// (the TUN and the socket are created in the namespace of the calling thread).
    pub async fn start(cfg: &DeviceConfig, key: &StaticKey) -> Result<GotatunBackend, WgError> {
        cfg.validate()?;
        let iface = cfg.iface.clone();
        // Bind first: a port in use fails before any interface exists.
        let udp =
            UdpSocket::bind(cfg.listen, SockOpt::default()).map_err(|source| WgError::Io {
                op: format!("bind UDP {}", cfg.listen),
                source,
            })?;
        if let Err(e) = udp.enable_udp_gro() {
            tracing::warn!(error = %e, listen = %cfg.listen, "enable UDP GRO on WireGuard socket");
        }
        let tun = create_tun(cfg)?;
        let device = DeviceBuilder::new()
            .with_udp(PreboundUdp { socket: udp })
            .with_ip(tun)
            .with_private_key(key.secret())
            .build()
            .await
            .map_err(|source| WgError::Device {
                op: format!("start WireGuard device {iface}"),
                source,
            })?;
        device
            .set_listen_port(cfg.listen.port())
            .await
            .map_err(|source| WgError::Device {
                op: format!("bring up WireGuard device {iface} on {}", cfg.listen),
                source,
            })?;
        tracing::info!(iface = %iface, address = %cfg.address, listen = %cfg.listen, mtu = cfg.mtu, "WireGuard device up (gotatun)");
        Ok(GotatunBackend {
            iface,
            listen: cfg.listen,
            netns: current_netns(),
            device: tokio::sync::Mutex::new(Some(device)),
        })
    }

    /// The TUN interface's name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The UDP address the device is bound to.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Waits until a handshake with `public_key` has completed, sending an initiation if there
    /// is no session (at most `timeout`). For tests and for the agent's "peer reachable" probe.
    /// Holds the device while it waits, so other calls on this backend wait too: keep
    /// `timeout` short.
    pub async fn wait_handshake(
        &self,
        public_key: &[u8; 32],
        timeout: Duration,
    ) -> Result<(), WgError> {
        let op = || {
            format!(
                "handshake with peer {} on {}",
                short(public_key),
                self.iface
            )
        };
        let guard = self.device.lock().await;
        let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
        match tokio::time::timeout(
            timeout,
            device.force_handshake(&PublicKey::from(*public_key)),
        )
        .await
        {
            Ok(result) => result.map_err(|source| WgError::Device { op: op(), source }),
            Err(_) => Err(WgError::Io {
                op: op(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no handshake within {timeout:?}"),
                ),
            }),
        }
    }

    fn shut_down(&self) -> WgError {
        WgError::ShutDown {
            iface: self.iface.clone(),
        }
    }

    async fn set_key_inner(&self, secret: StaticSecret) -> Result<(), WgError> {
        let guard = self.device.lock().await;
        let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
        device
            .set_private_key(secret)
            .await
            .map_err(|source| WgError::Device {
                op: format!("set private key on {}", self.iface),
                source,
            })?;
        tracing::info!(iface = %self.iface, "WireGuard private key rotated");
        Ok(())
    }

    async fn upsert_peer_inner(&self, cfg: &PeerConfig) -> Result<(), WgError> {
        let op = || format!("upsert peer {} on {}", short(&cfg.public_key), self.iface);
        // gotatun takes `ipnetwork` networks; it does not re-export the type, so go through its
        // text form rather than add a second IP-network crate to the workspace.
        let allowed_ips =
            cfg.allowed_ips
                .iter()
                .map(|net| {
                    net.trunc().to_string().parse().map_err(|e| {
                        WgError::InvalidConfig(format!("{}: allowed IP {net}: {e}", op()))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
        let mut peer = Peer::new(PublicKey::from(cfg.public_key))
            .with_endpoint(cfg.endpoint)
            .with_allowed_ips(allowed_ips);
        peer.keepalive = cfg.keepalive_secs.filter(|&s| s != 0);
        let guard = self.device.lock().await;
        let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
        device
            .add_or_update_peer(peer)
            .await
            .map_err(|source| WgError::Device { op: op(), source })?;
        tracing::debug!(iface = %self.iface, peer = %short(&cfg.public_key), endpoint = %cfg.endpoint, "WireGuard peer upserted");
        Ok(())
    }

    async fn remove_peer_inner(&self, public_key: &[u8; 32]) -> Result<bool, WgError> {
        let guard = self.device.lock().await;
        let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
        let removed = device
            .remove_peer(&PublicKey::from(*public_key))
            .await
            .map_err(|source| WgError::Device {
                op: format!("remove peer {} on {}", short(public_key), self.iface),
                source,
            })?;
        tracing::debug!(iface = %self.iface, peer = %short(public_key), removed, "WireGuard peer removed");
        Ok(removed)
    }

    async fn peers_inner(&self) -> Result<Vec<PeerStats>, WgError> {
        let guard = self.device.lock().await;
        let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
        Ok(device
            .peers()
            .await
            .into_iter()
            .map(|p| PeerStats {
                public_key: p.peer.public_key.to_bytes(),
                endpoint: p.peer.endpoint,
                last_handshake: p.stats.last_handshake,
                rx_bytes: p.stats.rx_bytes as u64,
                tx_bytes: p.stats.tx_bytes as u64,
            })
            .collect())
    }

    async fn shutdown_inner(&self) -> Result<(), WgError> {
        let Some(device) = self.device.lock().await.take() else {
            return Ok(());
        };
        // Drop the peers (and with them every session key) while the device still runs, then
        // stop its tasks. Dropping the last handle drops the device state: the private key
        // (zeroized on drop) and the TUN, whose interface the kernel removes with its last fd.
        let cleared = device.clear_peers().await;
        device.stop().await;
        if let Err(source) = cleared {
            return Err(WgError::Device {
                op: format!("clear peers on {}", self.iface),
                source,
            });
        }
        tracing::info!(iface = %self.iface, "WireGuard device shut down");
        self.wait_tun_gone().await
    }

    /// Polls until the TUN interface is gone, when the calling thread is in the device's
    /// namespace (interface names resolve per namespace); elsewhere it cannot look.
    async fn wait_tun_gone(&self) -> Result<(), WgError> {
        if self.netns.is_none() || current_netns() != self.netns {
            tracing::debug!(iface = %self.iface, "shutdown: not in the device's namespace, TUN removal not verified");
            return Ok(());
        }
        let deadline = Instant::now() + TUN_GONE_TIMEOUT;
        while nix::net::if_::if_nametoindex(self.iface.as_str()).is_ok() {
            if Instant::now() >= deadline {
                return Err(WgError::Teardown {
                    iface: self.iface.clone(),
                    reason: format!("TUN interface still present {TUN_GONE_TIMEOUT:?} after the device was dropped"),
                });
            }
            // The runtime drops the device's aborted tasks (and their TUN handles) shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl WgBackend for GotatunBackend {
    fn name(&self) -> &'static str {
        "gotatun"
    }

    fn set_key(&self, key: &StaticKey) -> BoxFuture<'_, Result<(), WgError>> {
        // The future may only borrow `self`: take the key as gotatun's (zeroizing) secret now.
        let secret = key.secret();
        async move { self.set_key_inner(secret).await }.boxed()
    }

    fn upsert_peer(&self, peer: &PeerConfig) -> BoxFuture<'_, Result<(), WgError>> {
        let peer = peer.clone();
        async move { self.upsert_peer_inner(&peer).await }.boxed()
    }

    fn remove_peer(&self, public_key: &[u8; 32]) -> BoxFuture<'_, Result<bool, WgError>> {
        let public_key = *public_key;
        async move { self.remove_peer_inner(&public_key).await }.boxed()
    }

    fn initiate_handshake(&self, public_key: &[u8; 32]) -> BoxFuture<'_, Result<(), WgError>> {
        let public_key = *public_key;
        async move {
            let guard = self.device.lock().await;
            let device = guard.as_ref().ok_or_else(|| self.shut_down())?;
            // gotatun's force_handshake sends the initiation on its first poll, then waits for
            // the answer; a zero timeout keeps the send and drops the wait.
            match tokio::time::timeout(
                Duration::ZERO,
                device.force_handshake(&PublicKey::from(public_key)),
            )
            .await
            {
                Ok(Err(source)) => Err(WgError::Device {
                    op: format!(
                        "initiate a handshake with {} on {}",
                        short(&public_key),
                        self.iface
                    ),
                    source,
                }),
                Ok(Ok(())) | Err(_) => Ok(()),
            }
        }
        .boxed()
    }

    fn peers(&self) -> BoxFuture<'_, Result<Vec<PeerStats>, WgError>> {
        self.peers_inner().boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<(), WgError>> {
        self.shutdown_inner().boxed()
    }
}

/// Opens the TUN with the `tun` crate: name, IPv4 address and netmask, MTU, up.
fn create_tun(cfg: &DeviceConfig) -> Result<TunDevice, WgError> {
    let iface = &cfg.iface;
    let mut config = tun::Configuration::default();
    config.tun_name(iface).mtu(cfg.mtu).up();
    if let ipnet::IpNet::V4(net) = cfg.address {
        config.address(net.addr()).netmask(net.netmask());
    }
    let tun = tun::create_as_async(&config).map_err(|source| WgError::Tun {
        op: format!("create TUN {iface} ({}, mtu {})", cfg.address, cfg.mtu),
        source,
    })?;
    let tun = TunDevice::from_tun_device(tun).map_err(|source| WgError::TunDevice {
        op: format!("open TUN {iface}"),
        source,
    })?;
    if let ipnet::IpNet::V6(_) = cfg.address {
        let address = cfg.address.to_string();
        sys::ip(&["-6", "addr", "add", &address, "dev", iface])?;
    }
    Ok(tun)
}

/// A [`UdpTransportFactory`] that hands out the socket bound in `start` (gotatun's factory
/// cannot bind a specific address).
struct PreboundUdp {
    socket: UdpSocket,
}

impl UdpTransportFactory for PreboundUdp {
    type Send = UdpSocket;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> std::io::Result<(UdpSocket, UdpSocket)> {
        let bound = self.socket.local_addr()?;
        // Port 0 is gotatun's "unset" before `start` sets the real port.
        if params.port != 0 && params.port != bound.port() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "listen port change to {} not supported: bound to {bound}",
                    params.port
                ),
            ));
        }
        Ok((self.socket.clone(), self.socket.clone()))
    }
}

/// The calling thread's network namespace (`net:[inode]`).
fn current_netns() -> Option<std::path::PathBuf> {
    std::fs::read_link("/proc/thread-self/ns/net").ok()
}

/// A public key for logs and errors: the first 8 base64 characters.
fn short(public_key: &[u8; 32]) -> String {
    use base64::Engine as _;
    let mut s = base64::engine::general_purpose::STANDARD.encode(public_key);
    s.truncate(8);
    s
}
