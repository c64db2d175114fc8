//! Sending raw Ethernet frames on one interface of a namespace, without `unsafe`.
//!
//! Sending on an `AF_PACKET` socket to a given interface needs a `sockaddr_ll` naming its
//! index. nix builds a [`LinkAddr`] (its `sockaddr_ll`) only from raw pointers, with one
//! exception: `getifaddrs(3)` lists one `AF_PACKET` address per interface, filled in by libc
//! with the interface's index and MAC, and nix hands those out as safe values. So the address
//! comes from [`nix::ifaddrs::getifaddrs`] (run inside the namespace, since it asks the kernel
//! over netlink) and the frame goes out with [`nix::sys::socket::sendto`]. The socket is
//! opened with protocol 0, so it receives nothing: it only sends, and nothing queues up on it.
//!
//! A frame is sent as given (destination MAC first, no FCS); the kernel neither pads nor
//! checks it beyond the device MTU.

use crate::error::TestbedError;
use crate::netns::Netns;
use nix::sys::socket::{sendto, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

/// How often a send interrupted by a signal is retried.
const EINTR_RETRIES: usize = 8;

/// A send-only packet socket with the link addresses of the interfaces it sends on. The
/// socket belongs to the namespace it was opened in for its whole life, so it may be used
/// from any thread.
#[derive(Debug)]
pub(crate) struct RawSender {
    fd: OwnedFd,
}

/// One interface to send on: its name, index and MAC, as `getifaddrs` reported them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawTarget {
    addr: LinkAddr,
}

impl RawTarget {
    /// The interface's MAC address.
    pub(crate) fn mac(&self) -> [u8; 6] {
        self.addr.addr().unwrap_or_default()
    }
}

impl RawSender {
    /// Opens the socket and resolves `ifaces`. Must run on a thread inside the namespace
    /// ([`Netns::run`]). The error names the call and the interface.
    pub(crate) fn open(
        ifaces: &[&str],
    ) -> Result<(RawSender, Vec<RawTarget>), (&'static str, String, nix::Error)> {
        let targets = resolve(ifaces)?;
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| ("open AF_PACKET socket to send on", ifaces.join(", "), e))?;
        Ok((RawSender { fd }, targets))
    }

    /// Sends one frame on `target`; `Ok` once the kernel took all of it.
    pub(crate) fn send(&self, target: &RawTarget, frame: &[u8]) -> Result<(), nix::Error> {
        for _ in 0..EINTR_RETRIES {
            match sendto(self.fd.as_raw_fd(), frame, &target.addr, MsgFlags::empty()) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(_) => return Err(nix::Error::EMSGSIZE),
                // Interrupted before anything was sent: try again.
                Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Err(nix::Error::EINTR)
    }
}

/// The link address of each of `ifaces`, in order.
fn resolve(ifaces: &[&str]) -> Result<Vec<RawTarget>, (&'static str, String, nix::Error)> {
    let all: Vec<(String, LinkAddr)> = nix::ifaddrs::getifaddrs()
        .map_err(|e| ("list interfaces (getifaddrs) to find", ifaces.join(", "), e))?
        .filter_map(|ifa| {
            let link = *ifa.address.as_ref()?.as_link_addr()?;
            Some((ifa.interface_name, link))
        })
        .collect();
    ifaces
        .iter()
        .map(|iface| {
            all.iter()
                .find(|(name, _)| name == iface)
                .map(|&(_, addr)| RawTarget { addr })
                .ok_or_else(|| {
                    (
                        "find link address of",
                        (*iface).to_string(),
                        nix::Error::ENODEV,
                    )
                })
        })
        .collect()
}

/// Sends `frames` (complete Ethernet frames, destination MAC first, no FCS), in order, on
/// interface `iface` of namespace `netns` and returns how many were sent. A forged probe, an
/// intruder's frame, a replayed announcement. Stops at the first frame the kernel refuses
/// (interface down, frame longer than the MTU) and returns that error.
///
/// No `unsafe` is needed: the interface's `sockaddr_ll` is the `AF_PACKET` address
/// `getifaddrs(3)` reports for it (via nix, inside the namespace), and the frame goes out
/// with `sendto(2)` on a send-only `AF_PACKET` socket (protocol 0, so it receives nothing).
pub fn send_raw_frames(
    netns: &Netns,
    iface: &str,
    frames: Vec<Vec<u8>>,
) -> Result<usize, TestbedError> {
    let where_ = || PathBuf::from(format!("{iface} in {}", netns.name()));
    let (sender, targets) =
        netns
            .run(|| RawSender::open(&[iface]))?
            .map_err(|(op, _, errno)| TestbedError::Io {
                op,
                path: where_(),
                source: errno.into(),
            })?;
    let Some(target) = targets.first() else {
        return Ok(0);
    };
    for (i, frame) in frames.iter().enumerate() {
        sender
            .send(target, frame)
            .map_err(|errno| TestbedError::Io {
                op: "send raw frame on",
                path: PathBuf::from(format!(
                    "{iface} in {} (frame {i} of {}, {} bytes)",
                    netns.name(),
                    frames.len(),
                    frame.len()
                )),
                source: errno.into(),
            })?;
    }
    Ok(frames.len())
}
