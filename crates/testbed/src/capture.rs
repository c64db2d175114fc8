//! A bounded packet capture for tests: an `AF_PACKET` raw socket (`ETH_P_ALL`) opened inside a
//! namespace, keeping the frames one interface sends and receives until it is stopped or a
//! limit is reached.
//!
//! The socket is created on a thread inside the namespace ([`Netns::run`]); a packet socket
//! belongs to the namespace it was created in for its whole life, so the collecting thread
//! runs on the host side. The socket is not bound to the interface (binding needs a raw
//! `sockaddr_ll`, which nix only builds with `unsafe`): it sees every interface of the
//! namespace, and frames are kept by the interface index that `recvfrom` reports. Frames
//! are seen in both directions (received and sent), each once. The socket is non-blocking
//! and polled every 50 ms, so the thread notices a stop promptly; on stop it still reads
//! what is queued, so a frame that reached the socket before the stop is not lost.

use crate::error::TestbedError;
use crate::netns::Netns;
use nix::net::if_::if_nametoindex;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvfrom, socket, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage,
};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the collecting thread waits for a frame before it checks whether it was stopped.
const POLL_INTERVAL_MS: u16 = 50;
/// Hard bound on a capture's life, whatever its owner does: a forgotten capture ends.
pub const MAX_CAPTURE_DURATION: Duration = Duration::from_secs(120);
/// Receive buffer: a veth frame with GSO/GRO is at most 64 KiB plus its link header.
const FRAME_BUFFER: usize = 65_536 + 256;

/// When a capture stops on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureLimit {
    /// Keep at most this many frames.
    pub max_packets: usize,
    /// Keep at most this many bytes (sum of frame lengths); a frame that would exceed it is
    /// not kept and ends the capture.
    pub max_bytes: usize,
}

impl Default for CaptureLimit {
    /// 10 000 frames, 16 MiB.
    fn default() -> Self {
        CaptureLimit {
            max_packets: 10_000,
            max_bytes: 16 << 20,
        }
    }
}

/// A running capture; [`Capture::stop`] ends it and returns the frames. Dropping it also
/// stops the collecting thread (and discards the frames).
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Captured>>,
}

/// The frames a capture kept, in arrival order, with their link-layer (Ethernet) header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub frames: Vec<Vec<u8>>,
    /// The capture ended because of its [`CaptureLimit`] or [`MAX_CAPTURE_DURATION`], so
    /// later frames are missing.
    pub limit_reached: bool,
    /// A receive error that ended the capture early.
    pub error: Option<String>,
}

impl Capture {
    /// Starts capturing on `iface` inside `netns`.
    pub fn start(netns: &Netns, iface: &str, limit: CaptureLimit) -> Result<Capture, TestbedError> {
        let what = || PathBuf::from(format!("{iface} in {}", netns.name()));
        let (fd, ifindex) = netns
            .run(|| open_packet_socket(iface))?
            .map_err(|(op, errno)| TestbedError::Io {
                op,
                path: what(),
                source: errno.into(),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("nwtb-capture".to_string())
            .spawn(move || collect(&fd, ifindex, limit, &flag))
            .map_err(|source| TestbedError::Thread {
                netns: netns.name().to_string(),
                source,
            })?;
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the capture (within about 50 ms, after reading what is already queued) and
    /// returns what it kept.
    pub fn stop(mut self) -> Captured {
        self.finish().unwrap_or_default()
    }

    fn finish(&mut self) -> Option<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(captured) => Some(captured),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            self.finish();
        } else {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs inside the namespace: the (non-blocking) packet socket and `iface`'s index.
fn open_packet_socket(iface: &str) -> Result<(OwnedFd, usize), (&'static str, nix::Error)> {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::EthAll,
    )
    .map_err(|e| ("open AF_PACKET socket for", e))?;
    let ifindex = if_nametoindex(iface).map_err(|e| ("look up interface index of", e))?;
    Ok((fd, ifindex as usize))
}

/// Reads frames until stopped; once stopped, still reads what is already queued, so every
/// frame that reached the socket before [`Capture::stop`] is kept (within the limits).
fn collect(fd: &OwnedFd, ifindex: usize, limit: CaptureLimit, stop: &AtomicBool) -> Captured {
    let deadline = Instant::now() + MAX_CAPTURE_DURATION;
    let mut buf = vec![0u8; FRAME_BUFFER];
    let mut captured = Captured::default();
    let mut bytes = 0usize;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        match recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf) {
            Ok((n, addr)) => {
                let on_iface = addr
                    .as_ref()
                    .and_then(|a| a.as_link_addr())
                    .is_some_and(|l| l.ifindex() == ifindex);
                if !on_iface {
                    continue;
                }
                if captured.frames.len() >= limit.max_packets
                    || bytes.saturating_add(n) > limit.max_bytes
                {
                    captured.limit_reached = true;
                    break;
                }
                bytes += n;
                captured.frames.push(buf[..n].to_vec());
            }
            Err(nix::Error::EAGAIN) if stopping => break,
            Err(nix::Error::EAGAIN) => {
                if Instant::now() >= deadline {
                    captured.limit_reached = true;
                    break;
                }
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(POLL_INTERVAL_MS)) {
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => {
                        captured.error = Some(format!("poll capture socket: {e}"));
                        break;
                    }
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => {
                captured.error = Some(format!("recvfrom on capture socket: {e}"));
                break;
            }
        }
    }
    captured
}

impl Captured {
    /// Number of frames kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame was kept.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether any frame contains `needle` anywhere (headers or payload).
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty()
            && self
                .frames
                .iter()
                .any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// Number of Ethernet/IPv4/UDP frames whose source or destination port is `port`.
    pub fn count_udp_port(&self, port: u16) -> usize {
        self.frames
            .iter()
            .filter_map(|f| udp_ports(f))
            .filter(|&(src, dst)| src == port || dst == port)
            .count()
    }
}

/// The UDP ports of an Ethernet (optionally one 802.1Q tag) IPv4 UDP frame; `None` for
/// anything else and for non-first fragments.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    let mut l3 = 14;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == 0x8100 {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(l3..)?;
    let version_ihl = *ip.first()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let fragment_offset = be16(ip, 6)? & 0x1fff;
    if version_ihl >> 4 != 4 || ihl < 20 || *ip.get(9)? != 17 || fragment_offset != 0 {
        return None;
    }
    Some((be16(ip, ihl)?, be16(ip, ihl + 2)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]); // IPv4
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
        f.extend_from_slice(&src.to_be_bytes());
        f.extend_from_slice(&dst.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_udp_ports_and_finds_needles() {
        let mut tcp = udp_frame(51820, 51820, b"x");
        tcp[14 + 9] = 6;
        let captured = Captured {
            frames: vec![
                udp_frame(51820, 40000, b"hello"),
                udp_frame(40000, 51820, b"world"),
                udp_frame(1, 2, b"other"),
                tcp,
                vec![0u8; 10],
            ],
            ..Captured::default()
        };
        assert_eq!(captured.len(), 5);
        assert_eq!(captured.count_udp_port(51820), 2);
        assert_eq!(captured.count_udp_port(2), 1);
        assert_eq!(captured.count_udp_port(9), 0);
        assert!(captured.contains(b"world"));
        assert!(!captured.contains(b"absent"));
        assert!(!captured.contains(b""));
    }

    #[test]
    fn ignores_non_first_fragments() {
        let mut f = udp_frame(51820, 51820, b"x");
        f[14 + 6] = 0x00;
        f[14 + 7] = 0x10;
        assert_eq!(udp_ports(&f), None);
    }

    /// Privileged: frames of `fab0` are kept, those of `mgmt0` (same namespace) are not, and
    /// the packet limit ends the capture.
    #[test]
    fn captures_one_interface_within_limits() {
        #![allow(clippy::unwrap_used)]
        if !crate::has_privileges() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
            return;
        }
        let tb = crate::Testbed::create(crate::TestbedSpec {
            nodes: 2,
            fabric_mtu: 1500,
        })
        .unwrap();
        let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
        let socket = |ns: &Netns, ip: std::net::Ipv4Addr, port: u16| {
            let s = ns
                .run(|| std::net::UdpSocket::bind((ip, port)))
                .unwrap()
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        };
        let fab_sink = socket(&n2.netns, n2.fabric_ip, 9999);
        let mgmt_sink = socket(&n2.netns, n2.mgmt_ip, 9998);
        let tx = socket(&n1.netns, std::net::Ipv4Addr::UNSPECIFIED, 0);
        let mut buf = [0u8; 64];

        let cap = Capture::start(&n1.netns, "fab0", CaptureLimit::default()).unwrap();
        tx.send_to(b"FABRIC-MARKER", fab_sink.local_addr().unwrap())
            .unwrap();
        tx.send_to(b"MGMT-MARKER", mgmt_sink.local_addr().unwrap())
            .unwrap();
        // Both arrived, so both were sent (and seen by the socket) before the capture stops.
        fab_sink.recv_from(&mut buf).unwrap();
        mgmt_sink.recv_from(&mut buf).unwrap();
        let got = cap.stop();
        assert!(got.contains(b"FABRIC-MARKER"), "{got:?}");
        assert!(
            !got.contains(b"MGMT-MARKER"),
            "mgmt0 frame in a fab0 capture"
        );
        assert_eq!(got.count_udp_port(9999), 1);
        assert!(!got.limit_reached && got.error.is_none());

        let limit = CaptureLimit {
            max_packets: 2,
            max_bytes: 1 << 20,
        };
        let cap = Capture::start(&n1.netns, "fab0", limit).unwrap();
        for _ in 0..5 {
            tx.send_to(b"LIMITED", fab_sink.local_addr().unwrap())
                .unwrap();
            fab_sink.recv_from(&mut buf).unwrap();
        }
        let got = cap.stop();
        assert_eq!(got.len(), 2);
        assert!(got.limit_reached);

        let err = Capture::start(&n1.netns, "nosuch0", limit)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("look up interface index of nosuch0 in"),
            "{err}"
        );
        tb.teardown().unwrap();
    }
}
