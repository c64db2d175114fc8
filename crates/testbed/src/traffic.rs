//! A traffic sender and sink on blocking std sockets, bounded in time and bytes.
//!
//! Meant to run on threads inside the testbed's namespaces (a socket belongs to the namespace
//! of the thread that created it, for its whole life) or from a command-line tool. The sink's
//! count is the authority on delivery; the sender reports what the kernel accepted from it.
//!
//! Every loop here ends by its deadline: sockets use 50 ms read/write timeouts, so a sender on
//! a fabric that drops everything returns within `duration` plus about 50 ms, and a sink
//! returns within its `duration` plus about 50 ms.
//!
//! UDP datagrams carry a 20-byte header (magic `NWTB`, kind, a per-sender session id, a
//! sequence number), so the sink can count lost and reordered datagrams and ignore foreign
//! ones. When a UDP sender stops it sends three small end-of-stream datagrams (not counted in
//! any byte figure) carrying its totals, so the sink stops at once instead of waiting for its
//! idle timeout. A sink follows one sender: the first session it sees.
//!
//! Rates and byte counts are of payload (TCP stream bytes, UDP datagram payload), not of
//! IP/UDP/TCP headers.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Length of the header at the start of every UDP datagram; the smallest UDP payload.
pub const UDP_HEADER_LEN: usize = 20;
/// Largest UDP payload (IPv4).
pub const UDP_MAX_PAYLOAD: usize = 65_507;
const MAGIC: u32 = 0x4E57_5442; // "NWTB"
const KIND_DATA: u8 = 0;
const KIND_END: u8 = 1;
/// An end-of-stream datagram: header (sequence field = datagrams sent) + bytes sent.
const END_LEN: usize = UDP_HEADER_LEN + 8;
const END_COPIES: usize = 3;
/// Socket timeout: the granularity at which loops check their deadlines.
const SLICE: Duration = Duration::from_millis(50);
/// How long a UDP sink keeps reading after the end-of-stream datagram when datagrams are
/// missing (they may still be queued on another CPU).
const END_LINGER: Duration = Duration::from_millis(100);
/// Receive buffer asked for by the UDP sink, so bursts are not dropped at the socket.
const UDP_RCVBUF: usize = 16 << 20;
const READ_BUF: usize = 256 << 10;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = TrafficError;
    /// `tcp` or `udp`, any case.
    fn from_str(s: &str) -> Result<Proto, TrafficError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(TrafficError::InvalidSpec(format!(
                "protocol {s:?}: expected tcp or udp"
            ))),
        }
    }
}

/// A traffic operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("invalid traffic spec: {0}")]
    InvalidSpec(String),
    #[error("bind {proto} sink on {addr}: {source}")]
    Bind {
        proto: Proto,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect {proto} to {dst}: {source}")]
    Connect {
        proto: Proto,
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("{op} {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a sink listens for and how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    pub proto: Proto,
    /// Address to bind; port 0 picks one (see [`Sink::local_addr`]).
    pub listen: SocketAddr,
    /// Longest lifetime of [`Sink::run`], waiting for a connection included.
    pub duration: Duration,
    /// Stop when no data came for this long, once data has started.
    pub idle_timeout: Duration,
}

impl SinkSpec {
    /// A sink on `listen` living at most 10 s, stopping after 1 s without data.
    pub fn new(proto: Proto, listen: SocketAddr) -> SinkSpec {
        SinkSpec {
            proto,
            listen,
            duration: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(1),
        }
    }
}

/// What a sender sends, where, and its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSpec {
    pub proto: Proto,
    pub dst: SocketAddr,
    /// Longest time the sender runs, TCP connect included.
    pub duration: Duration,
    /// Payload bytes to send at most. UDP never exceeds it: the last datagram is shortened
    /// to fit, and if less than [`UDP_HEADER_LEN`] would remain the sender stops short.
    pub max_bytes: Option<u64>,
    /// Pacing of payload in bits per second; `None` sends as fast as the socket takes it.
    pub rate_bps: Option<u64>,
    /// UDP datagram payload size ([`UDP_HEADER_LEN`]..=[`UDP_MAX_PAYLOAD`]) or TCP write size.
    pub payload: usize,
}

impl SendSpec {
    /// Sends to `dst` for at most 10 s, unpaced and unbounded in bytes, 1400-byte datagrams
    /// (UDP) or 64 KiB writes (TCP).
    pub fn new(proto: Proto, dst: SocketAddr) -> SendSpec {
        SendSpec {
            proto,
            dst,
            duration: Duration::from_secs(10),
            max_bytes: None,
            rate_bps: None,
            payload: match proto {
                Proto::Udp => 1400,
                Proto::Tcp => 64 << 10,
            },
        }
    }

    fn validate(&self) -> Result<(), TrafficError> {
        if self.duration.is_zero() {
            return Err(TrafficError::InvalidSpec("duration must be > 0".into()));
        }
        if self.rate_bps == Some(0) {
            return Err(TrafficError::InvalidSpec("rate_bps must be > 0".into()));
        }
        let ok = match self.proto {
            Proto::Udp => (UDP_HEADER_LEN..=UDP_MAX_PAYLOAD).contains(&self.payload),
            Proto::Tcp => self.payload > 0,
        };
        if !ok {
            return Err(TrafficError::InvalidSpec(format!(
                "{} payload {}: must be {}",
                self.proto,
                self.payload,
                match self.proto {
                    Proto::Udp => format!("{UDP_HEADER_LEN}..={UDP_MAX_PAYLOAD}"),
                    Proto::Tcp => "> 0".to_string(),
                }
            )));
        }
        Ok(())
    }
}

/// Why a sender or sink stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Sender: `max_bytes` sent. TCP sink: the sender closed. UDP sink: end of stream.
    Completed,
    /// The `duration` bound was reached.
    Duration,
    /// Sink only: no data for `idle_timeout` after data had started.
    Idle,
    /// The connection failed (reset, broken pipe); the figures are up to that point.
    Failed(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Completed => f.write_str("completed"),
            Stop::Duration => f.write_str("duration reached"),
            Stop::Idle => f.write_str("idle"),
            Stop::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// What a sender or sink did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub proto: Proto,
    /// Payload bytes sent (accepted by the kernel) or received.
    pub bytes: u64,
    /// Datagrams (UDP), or successful writes/reads (TCP).
    pub packets: u64,
    /// From the start of `send` / `Sink::run` to the end.
    pub elapsed: Duration,
    /// When the first payload byte was sent/received, from the start.
    pub first_byte_at: Option<Duration>,
    /// When the last payload byte was sent/received, from the start.
    pub last_byte_at: Option<Duration>,
    pub stop: Stop,
    /// The other end (sink: the sender's address).
    pub peer: Option<SocketAddr>,
    /// Sender: sends that failed (e.g. EPERM from a firewall drop, ECONNREFUSED); they are
    /// retried until the deadline.
    pub send_errors: u64,
    /// Sender: the last such error.
    pub last_error: Option<String>,
    /// UDP sink: datagrams the sender sent that did not arrive (from the sender's totals if
    /// its end-of-stream arrived, else from the highest sequence number seen).
    pub lost: Option<u64>,
    /// UDP sink: datagrams that arrived after one with a higher sequence number.
    pub reordered: u64,
    /// UDP sink: datagrams ignored (not ours, or from another sender).
    pub foreign: u64,
}

impl Report {
    fn new(proto: Proto) -> Report {
        Report {
            proto,
            bytes: 0,
            packets: 0,
            elapsed: Duration::ZERO,
            first_byte_at: None,
            last_byte_at: None,
            stop: Stop::Duration,
            peer: None,
            send_errors: 0,
            last_error: None,
            lost: None,
            reordered: 0,
            foreign: 0,
        }
    }

    /// The active period, first to last payload byte (zero with fewer than two).
    pub fn active(&self) -> Duration {
        match (self.first_byte_at, self.last_byte_at) {
            (Some(first), Some(last)) => last.saturating_sub(first),
            _ => Duration::ZERO,
        }
    }

    /// Payload rate over the active period in bits per second; this is the goodput while
    /// traffic flowed, unaffected by connection setup or idle tails. Falls back to
    /// [`Report::average_bps`] when the active period is zero (a single write). Counts the
    /// first chunk inside the period, so it overstates by one chunk in `packets`.
    pub fn rate_bps(&self) -> f64 {
        let active = self.active();
        if active.is_zero() {
            return self.average_bps();
        }
        self.bytes as f64 * 8.0 / active.as_secs_f64()
    }

    /// Payload rate over the whole `elapsed` time in bits per second.
    pub fn average_bps(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64()
    }

    fn record(&mut self, n: usize, at: Duration) {
        self.bytes += n as u64;
        self.packets += 1;
        self.first_byte_at.get_or_insert(at);
        self.last_byte_at = Some(at);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} bytes in {} packets, {:.3} s ({:.3} Mbit/s while active, {:.3} Mbit/s average), {}",
            self.proto,
            self.bytes,
            self.packets,
            self.elapsed.as_secs_f64(),
            self.rate_bps() / 1e6,
            self.average_bps() / 1e6,
            self.stop,
        )?;
        if let Some(lost) = self.lost {
            write!(f, ", lost {lost}")?;
        }
        if self.reordered > 0 {
            write!(f, ", reordered {}", self.reordered)?;
        }
        if self.foreign > 0 {
            write!(f, ", foreign {}", self.foreign)?;
        }
        if self.send_errors > 0 {
            write!(f, ", {} send errors", self.send_errors)?;
            if let Some(e) = &self.last_error {
                write!(f, " (last: {e})")?;
            }
        }
        Ok(())
    }
}

/// A bound sink: bind first, learn the address, start the sender, then [`Sink::run`].
#[derive(Debug)]
pub struct Sink {
    spec: SinkSpec,
    socket: SinkSocket,
    progress: Arc<AtomicU64>,
}

#[derive(Debug)]
enum SinkSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Sink {
    /// Binds the listening socket (in the namespace of the calling thread).
    pub fn bind(spec: SinkSpec) -> Result<Sink, TrafficError> {
        if spec.duration.is_zero() || spec.idle_timeout.is_zero() {
            return Err(TrafficError::InvalidSpec(
                "sink duration and idle_timeout must be > 0".into(),
            ));
        }
        let bind_err = |source| TrafficError::Bind {
            proto: spec.proto,
            addr: spec.listen,
            source,
        };
        let socket = match spec.proto {
            Proto::Tcp => SinkSocket::Tcp(TcpListener::bind(spec.listen).map_err(bind_err)?),
            Proto::Udp => {
                let socket = UdpSocket::bind(spec.listen).map_err(bind_err)?;
                grow_receive_buffer(&socket);
                SinkSocket::Udp(socket)
            }
        };
        Ok(Sink {
            spec,
            socket,
            progress: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The bound address (with the port the kernel picked for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TrafficError> {
        match &self.socket {
            SinkSocket::Tcp(s) => s.local_addr(),
            SinkSocket::Udp(s) => s.local_addr(),
        }
        .map_err(|source| TrafficError::Io {
            op: "local address of sink bound to",
            addr: self.spec.listen,
            source,
        })
    }

    /// Payload bytes received so far, updated live while [`Sink::run`] runs (to sample the
    /// received rate from another thread).
    pub fn progress(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.progress)
    }

    /// Receives until the sender is done, `duration` has passed, or no data came for
    /// `idle_timeout`. TCP: accepts one connection and reads it to EOF.
    pub fn run(self) -> Result<Report, TrafficError> {
        let addr = self.local_addr()?;
        match &self.socket {
            SinkSocket::Tcp(listener) => self.run_tcp(listener, addr),
            SinkSocket::Udp(socket) => self.run_udp(socket, addr),
        }
    }

    fn run_tcp(&self, listener: &TcpListener, addr: SocketAddr) -> Result<Report, TrafficError> {
        let start = Instant::now();
        let deadline = start + self.spec.duration;
        let mut report = Report::new(Proto::Tcp);
        let io = |op| move |source| TrafficError::Io { op, addr, source };
        if !wait_readable(listener, deadline).map_err(io("wait for a connection on"))? {
            report.elapsed = start.elapsed();
            return Ok(report);
        }
        let (mut stream, peer) = listener.accept().map_err(io("accept a connection on"))?;
        report.peer = Some(peer);
        stream
            .set_read_timeout(Some(SLICE))
            .map_err(io("set read timeout on"))?;
        let mut buf = vec![0u8; READ_BUF];
        let mut last_data: Option<Instant> = None;
        report.stop = loop {
            let now = Instant::now();
            if now >= deadline {
                break Stop::Duration;
            }
            if last_data.is_some_and(|t| now - t >= self.spec.idle_timeout) {
                break Stop::Idle;
            }
            match stream.read(&mut buf) {
                Ok(0) => break Stop::Completed,
                Ok(n) => {
                    let t = Instant::now();
                    last_data = Some(t);
                    report.record(n, t - start);
                    self.progress.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if is_retry(&e) => {}
                Err(e) => break Stop::Failed(e.to_string()),
            }
        };
        report.elapsed = start.elapsed();
        Ok(report)
    }

    fn run_udp(&self, socket: &UdpSocket, addr: SocketAddr) -> Result<Report, TrafficError> {
        let start = Instant::now();
        let deadline = start + self.spec.duration;
        let mut report = Report::new(Proto::Udp);
        socket
            .set_read_timeout(Some(SLICE))
            .map_err(|source| TrafficError::Io {
                op: "set read timeout on",
                addr,
                source,
            })?;
        let mut tally = UdpTally::default();
        let mut buf = vec![0u8; UDP_MAX_PAYLOAD + 1];
        let mut last_data: Option<Instant> = None;
        let mut end_seen: Option<Instant> = None;
        report.stop = loop {
            if tally.complete() {
                break Stop::Completed;
            }
            let now = Instant::now();
            if end_seen.is_some_and(|t| now - t >= END_LINGER) {
                break Stop::Completed;
            }
            if now >= deadline {
                break Stop::Duration;
            }
            if last_data.is_some_and(|t| now - t >= self.spec.idle_timeout) {
                break Stop::Idle;
            }
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => match tally.on_datagram(&buf[..n]) {
                    Received::Data => {
                        let t = Instant::now();
                        last_data = Some(t);
                        report.record(n, t - start);
                        report.peer.get_or_insert(from);
                        self.progress.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Received::End => {
                        end_seen.get_or_insert_with(Instant::now);
                        report.peer.get_or_insert(from);
                    }
                    Received::Ignored => {}
                },
                Err(e) if is_retry(&e) => {}
                Err(e) => break Stop::Failed(e.to_string()),
            }
        };
        report.elapsed = start.elapsed();
        report.lost = tally.lost();
        report.reordered = tally.reordered;
        report.foreign = tally.foreign;
        Ok(report)
    }
}

/// Asks for a large receive buffer (forcing past `rmem_max` when privileged); best effort.
fn grow_receive_buffer(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &UDP_RCVBUF).is_err() {
        if let Err(e) = setsockopt(socket, sockopt::RcvBuf, &UDP_RCVBUF) {
            tracing::debug!(error = %e, "UDP sink keeps the default receive buffer");
        }
    }
}

/// Waits until `fd` is readable or `deadline` passes (`false`).
fn wait_readable(fd: &impl AsFd, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let slice = (deadline - now).min(SLICE);
        let ms = u16::try_from(slice.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A socket timeout or an interrupted call: check the deadline and try again.
fn is_retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// What a UDP sink made of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    Data,
    End,
    Ignored,
}

/// The UDP sink's bookkeeping: which sender it follows and what arrived.
#[derive(Debug, Default)]
struct UdpTally {
    session: Option<u32>,
    packets: u64,
    max_seq: Option<u64>,
    reordered: u64,
    foreign: u64,
    /// The sender's totals from its end-of-stream datagram: (datagrams, bytes).
    end: Option<(u64, u64)>,
}

impl UdpTally {
    fn on_datagram(&mut self, d: &[u8]) -> Received {
        let Some(header) = Header::parse(d) else {
            self.foreign += 1;
            return Received::Ignored;
        };
        if *self.session.get_or_insert(header.session) != header.session {
            self.foreign += 1;
            return Received::Ignored;
        }
        match header.kind {
            KIND_DATA => {
                self.packets += 1;
                match self.max_seq {
                    Some(max) if header.seq < max => self.reordered += 1,
                    _ => self.max_seq = Some(header.seq),
                }
                Received::Data
            }
            KIND_END if d.len() >= END_LEN => {
                if self.end.is_none() {
                    let bytes = read_u64(&d[UDP_HEADER_LEN..END_LEN]);
                    self.end = Some((header.seq, bytes));
                }
                Received::End
            }
            _ => {
                self.foreign += 1;
                Received::Ignored
            }
        }
    }

    /// The end-of-stream arrived and so did every datagram it announced.
    fn complete(&self) -> bool {
        self.end.is_some_and(|(sent, _)| self.packets >= sent)
    }

    fn lost(&self) -> Option<u64> {
        match (self.end, self.max_seq) {
            (Some((sent, _)), _) => Some(sent.saturating_sub(self.packets)),
            (None, Some(max)) => Some((max + 1).saturating_sub(self.packets)),
            (None, None) => None,
        }
    }
}

/// The header of every UDP datagram: magic, kind, 3 reserved bytes, session, sequence (all
/// big-endian). In an end-of-stream datagram the sequence field is the number of datagrams
/// sent, followed by the number of payload bytes sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    session: u32,
    seq: u64,
}

impl Header {
    fn write(&self, buf: &mut [u8]) {
        buf[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        buf[4] = self.kind;
        buf[5..8].fill(0);
        buf[8..12].copy_from_slice(&self.session.to_be_bytes());
        buf[12..20].copy_from_slice(&self.seq.to_be_bytes());
    }

    fn parse(d: &[u8]) -> Option<Header> {
        if d.len() < UDP_HEADER_LEN || d[0..4] != MAGIC.to_be_bytes() {
            return None;
        }
        let mut session = [0u8; 4];
        session.copy_from_slice(&d[8..12]);
        Some(Header {
            kind: d[4],
            session: u32::from_be_bytes(session),
            seq: read_u64(&d[12..20]),
        })
    }
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A session id that differs between senders (std's randomly seeded hasher).
fn session_id() -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// Paces payload: the `n`-th byte is due at `start + n * 8 / rate` seconds.
fn due(start: Instant, bytes: u64, rate_bps: u64) -> Instant {
    start + Duration::from_secs_f64(bytes as f64 * 8.0 / rate_bps as f64)
}

/// Sleeps until `t` (pacing) but not past `deadline`. Returns whether `t` is reached.
fn pace_until(t: Instant, deadline: Instant) -> bool {
    let now = Instant::now();
    if t <= now {
        return true;
    }
    std::thread::sleep(t.min(deadline) - now);
    t <= deadline
}

/// Sends per `spec` and reports what the kernel accepted. TCP: connects with a timeout (an
/// error if that fails), writes until `max_bytes` or `duration`, then shuts down its write
/// side. UDP: paced datagrams; per-datagram send errors are counted, not fatal. Returns
/// within `duration` plus about 50 ms even when nothing gets through.
pub fn send(spec: &SendSpec) -> Result<Report, TrafficError> {
    send_with_progress(spec, &AtomicU64::new(0))
}

/// [`send`], adding each payload byte the kernel accepts to `progress` as it goes.
pub fn send_with_progress(spec: &SendSpec, progress: &AtomicU64) -> Result<Report, TrafficError> {
    spec.validate()?;
    match spec.proto {
        Proto::Tcp => send_tcp(spec, progress),
        Proto::Udp => send_udp(spec, progress),
    }
}

fn send_tcp(spec: &SendSpec, progress: &AtomicU64) -> Result<Report, TrafficError> {
    let start = Instant::now();
    let deadline = start + spec.duration;
    let dst = spec.dst;
    let mut report = Report::new(Proto::Tcp);
    let mut stream = TcpStream::connect_timeout(&dst, spec.duration).map_err(|source| {
        TrafficError::Connect {
            proto: Proto::Tcp,
            dst,
            source,
        }
    })?;
    report.peer = Some(dst);
    stream
        .set_write_timeout(Some(SLICE))
        .map_err(|source| TrafficError::Io {
            op: "set write timeout on connection to",
            addr: dst,
            source,
        })?;
    let buf = vec![0x5au8; spec.payload];
    let paced_from = Instant::now();
    report.stop = loop {
        let remaining = spec.max_bytes.map(|max| max.saturating_sub(report.bytes));
        if remaining == Some(0) {
            break Stop::Completed;
        }
        if Instant::now() >= deadline {
            break Stop::Duration;
        }
        if let Some(rate) = spec.rate_bps {
            if !pace_until(due(paced_from, report.bytes, rate), deadline) {
                continue;
            }
        }
        let n = remaining.map_or(spec.payload, |r| {
            usize::try_from(r).map_or(spec.payload, |r| r.min(spec.payload))
        });
        match stream.write(&buf[..n]) {
            Ok(0) => break Stop::Failed("connection accepts no more data".to_string()),
            Ok(k) => {
                report.record(k, start.elapsed());
                progress.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(e) if is_retry(&e) => {}
            Err(e) => break Stop::Failed(e.to_string()),
        }
    };
    // EOF for the sink; unsent data keeps draining in the kernel after we return.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    report.elapsed = start.elapsed();
    Ok(report)
}

fn send_udp(spec: &SendSpec, progress: &AtomicU64) -> Result<Report, TrafficError> {
    let start = Instant::now();
    let deadline = start + spec.duration;
    let dst = spec.dst;
    let mut report = Report::new(Proto::Udp);
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let io = |op| {
        move |source| TrafficError::Io {
            op,
            addr: dst,
            source,
        }
    };
    let socket = UdpSocket::bind(local).map_err(io("bind UDP sender for"))?;
    socket
        .connect(dst)
        .map_err(|source| TrafficError::Connect {
            proto: Proto::Udp,
            dst,
            source,
        })?;
    socket
        .set_write_timeout(Some(SLICE))
        .map_err(io("set write timeout on UDP socket to"))?;
    report.peer = Some(dst);
    let session = session_id();
    let mut buf = vec![0x5au8; spec.payload.max(END_LEN)];
    report.stop = loop {
        let remaining = spec.max_bytes.map(|max| max.saturating_sub(report.bytes));
        if remaining.is_some_and(|r| r < UDP_HEADER_LEN as u64) {
            break Stop::Completed;
        }
        if Instant::now() >= deadline {
            break Stop::Duration;
        }
        if let Some(rate) = spec.rate_bps {
            if !pace_until(due(start, report.bytes, rate), deadline) {
                continue;
            }
        }
        let n = remaining.map_or(spec.payload, |r| {
            usize::try_from(r).map_or(spec.payload, |r| r.min(spec.payload))
        });
        Header {
            kind: KIND_DATA,
            session,
            seq: report.packets,
        }
        .write(&mut buf);
        match socket.send(&buf[..n]) {
            Ok(k) => {
                report.record(k, start.elapsed());
                progress.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(e) if is_retry(&e) => {}
            Err(e) => {
                report.send_errors += 1;
                report.last_error = Some(e.to_string());
                // Not fatal (a firewall drop is EPERM, an ICMP port unreachable shows up as
                // ECONNREFUSED on the next send); back off briefly instead of spinning.
                pace_until(Instant::now() + Duration::from_millis(1), deadline);
            }
        }
    };
    Header {
        kind: KIND_END,
        session,
        seq: report.packets,
    }
    .write(&mut buf);
    buf[UDP_HEADER_LEN..END_LEN].copy_from_slice(&report.bytes.to_be_bytes());
    for _ in 0..END_COPIES {
        // Best effort: a sink that misses it stops on its idle timeout.
        let _ = socket.send(&buf[..END_LEN]);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// The outcome of a TCP reachability probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// A listener accepted the connection.
    Open { rtt: Duration },
    /// The host answered with a reset: reachable, nothing listening.
    Refused { rtt: Duration },
    /// The local stack refused at once (no route, interface down, firewall).
    Unreachable(String),
    /// No answer within the timeout (packets dropped on the way).
    TimedOut,
}

impl Reachability {
    /// Whether the destination host answered (open or refused).
    pub fn is_reachable(&self) -> bool {
        matches!(
            self,
            Reachability::Open { .. } | Reachability::Refused { .. }
        )
    }
}

/// Probes `dst` with a TCP connect bounded by `timeout` (no ICMP needed). A refused
/// connection still proves the host reachable.
pub fn probe_tcp(dst: SocketAddr, timeout: Duration) -> Reachability {
    if timeout.is_zero() {
        return Reachability::TimedOut;
    }
    let start = Instant::now();
    match TcpStream::connect_timeout(&dst, timeout) {
        Ok(_) => Reachability::Open {
            rtt: start.elapsed(),
        },
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Reachability::Refused {
            rtt: start.elapsed(),
        },
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Reachability::TimedOut
        }
        Err(e) => Reachability::Unreachable(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn report(bytes: u64, elapsed_ms: u64, first_ms: Option<u64>, last_ms: Option<u64>) -> Report {
        Report {
            bytes,
            elapsed: Duration::from_millis(elapsed_ms),
            first_byte_at: first_ms.map(Duration::from_millis),
            last_byte_at: last_ms.map(Duration::from_millis),
            ..Report::new(Proto::Udp)
        }
    }

    #[test]
    fn rates_over_active_period_and_elapsed() {
        let check = |r: Report, active_ms: u64, rate: f64, avg: f64| {
            assert_eq!(r.active(), Duration::from_millis(active_ms), "{r:?}");
            assert!(
                (r.rate_bps() - rate).abs() < 1e-6,
                "{} != {rate}",
                r.rate_bps()
            );
            assert!(
                (r.average_bps() - avg).abs() < 1e-6,
                "{} != {avg}",
                r.average_bps()
            );
        };
        // 1 MB over an active second inside 2 s: 8 Mbit/s active, 4 average.
        check(
            report(1_000_000, 2000, Some(500), Some(1500)),
            1000,
            8e6,
            4e6,
        );
        // A single chunk: no active period, the rate falls back to the average.
        check(report(1000, 100, Some(10), Some(10)), 0, 80_000.0, 80_000.0);
        // Nothing at all.
        check(report(0, 0, None, None), 0, 0.0, 0.0);
        check(report(0, 1000, None, None), 0, 0.0, 0.0);
    }

    #[test]
    fn record_tracks_first_and_last() {
        let mut r = Report::new(Proto::Tcp);
        r.record(10, Duration::from_millis(5));
        r.record(20, Duration::from_millis(9));
        assert_eq!((r.bytes, r.packets), (30, 2));
        assert_eq!(r.first_byte_at, Some(Duration::from_millis(5)));
        assert_eq!(r.last_byte_at, Some(Duration::from_millis(9)));
    }

    #[test]
    fn pacing_schedule() {
        let t0 = Instant::now();
        // 20 Mbit/s: 2.5 MB is due after one second.
        assert_eq!(due(t0, 2_500_000, 20_000_000) - t0, Duration::from_secs(1));
        assert_eq!(due(t0, 0, 1), t0);
    }

    fn datagram(kind: u8, session: u32, seq: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        Header { kind, session, seq }.write(&mut d);
        d
    }

    fn end(session: u32, sent: u64, bytes: u64) -> Vec<u8> {
        let mut d = datagram(KIND_END, session, sent, END_LEN);
        d[UDP_HEADER_LEN..END_LEN].copy_from_slice(&bytes.to_be_bytes());
        d
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            kind: KIND_DATA,
            session: 0xdead_beef,
            seq: 1 << 40,
        };
        let mut d = [0u8; UDP_HEADER_LEN];
        h.write(&mut d);
        assert_eq!(Header::parse(&d), Some(h));
        assert_eq!(Header::parse(&d[..UDP_HEADER_LEN - 1]), None);
        d[0] ^= 1;
        assert_eq!(Header::parse(&d), None);
    }

    #[test]
    fn udp_tally_counts_loss_reordering_and_foreign() {
        let mut t = UdpTally::default();
        assert_eq!(t.lost(), None);
        for seq in [0, 1, 3, 2, 5] {
            assert_eq!(
                t.on_datagram(&datagram(KIND_DATA, 7, seq, 100)),
                Received::Data
            );
        }
        // Another sender, garbage, and a short datagram are ignored.
        assert_eq!(
            t.on_datagram(&datagram(KIND_DATA, 8, 0, 100)),
            Received::Ignored
        );
        assert_eq!(t.on_datagram(b"hello"), Received::Ignored);
        assert_eq!(t.on_datagram(&[0u8; 64]), Received::Ignored);
        assert_eq!((t.packets, t.reordered, t.foreign), (5, 1, 3));
        // Seq 4 missing: one lost so far by sequence numbers.
        assert_eq!(t.lost(), Some(1));
        assert!(!t.complete());
        // The sender says it sent 7: two lost.
        assert_eq!(t.on_datagram(&end(7, 7, 700)), Received::End);
        assert_eq!(t.lost(), Some(2));
        assert!(!t.complete());
    }

    #[test]
    fn udp_tally_completes_when_all_announced_arrived() {
        let mut t = UdpTally::default();
        for seq in 0..3 {
            t.on_datagram(&datagram(KIND_DATA, 1, seq, 50));
        }
        t.on_datagram(&end(1, 3, 150));
        assert!(t.complete());
        assert_eq!(t.lost(), Some(0));
        // A second copy of the end-of-stream changes nothing.
        t.on_datagram(&end(1, 99, 0));
        assert_eq!(t.end, Some((3, 150)));
    }

    #[test]
    fn specs_are_validated() {
        let dst: SocketAddr = "198.18.0.2:9".parse().unwrap();
        let ok = SendSpec::new(Proto::Udp, dst);
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut SendSpec)| {
            let mut s = SendSpec::new(Proto::Udp, dst);
            f(&mut s);
            assert!(
                matches!(s.validate(), Err(TrafficError::InvalidSpec(_))),
                "{s:?}"
            );
        };
        bad(|s| s.payload = UDP_HEADER_LEN - 1);
        bad(|s| s.payload = UDP_MAX_PAYLOAD + 1);
        bad(|s| s.duration = Duration::ZERO);
        bad(|s| s.rate_bps = Some(0));
        bad(|s| {
            s.proto = Proto::Tcp;
            s.payload = 0
        });
        assert_eq!("TCP".parse::<Proto>().unwrap(), Proto::Tcp);
        assert_eq!(Proto::Udp.to_string().parse::<Proto>().unwrap(), Proto::Udp);
        assert!("sctp".parse::<Proto>().is_err());
    }

    #[test]
    fn unprivileged_loopback_udp_is_exact() {
        let sink = Sink::bind(SinkSpec {
            idle_timeout: Duration::from_secs(2),
            ..SinkSpec::new(Proto::Udp, "127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
        let addr = sink.local_addr().unwrap();
        let progress = sink.progress();
        let h = std::thread::spawn(move || sink.run());
        let sent = send(&SendSpec {
            max_bytes: Some(100_005),
            rate_bps: Some(200_000_000),
            payload: 1000,
            ..SendSpec::new(Proto::Udp, addr)
        })
        .unwrap();
        let got = h.join().unwrap().unwrap();
        // 100 datagrams of 1000 and a last one of 5 would be under the header: stop at 100000.
        assert_eq!(sent.bytes, 100_000);
        assert_eq!(sent.stop, Stop::Completed);
        assert_eq!(got.bytes, sent.bytes);
        assert_eq!(got.packets, 100);
        assert_eq!(got.lost, Some(0));
        assert_eq!(got.stop, Stop::Completed);
        assert_eq!(progress.load(Ordering::Relaxed), 100_000);
    }

    #[test]
    fn unprivileged_loopback_tcp_transfers_max_bytes() {
        let sink = Sink::bind(SinkSpec::new(Proto::Tcp, "127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = sink.local_addr().unwrap();
        let h = std::thread::spawn(move || sink.run());
        let sent = send(&SendSpec {
            max_bytes: Some(3_000_001),
            ..SendSpec::new(Proto::Tcp, addr)
        })
        .unwrap();
        let got = h.join().unwrap().unwrap();
        assert_eq!(sent.bytes, 3_000_001);
        assert_eq!(got.bytes, 3_000_001);
        assert_eq!(got.stop, Stop::Completed);
    }

    #[test]
    fn sink_without_sender_ends_at_its_duration() {
        let sink = Sink::bind(SinkSpec {
            duration: Duration::from_millis(200),
            ..SinkSpec::new(Proto::Tcp, "127.0.0.1:0".parse().unwrap())
        })
        .unwrap();
        let t = Instant::now();
        let r = sink.run().unwrap();
        assert_eq!(r.stop, Stop::Duration);
        assert_eq!(r.bytes, 0);
        assert!(t.elapsed() < Duration::from_millis(200) + Duration::from_millis(150));
    }

    #[test]
    fn probe_distinguishes_open_and_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        assert!(matches!(
            probe_tcp(open, Duration::from_secs(1)),
            Reachability::Open { .. }
        ));
        drop(l);
        let r = probe_tcp(open, Duration::from_secs(1));
        assert!(matches!(r, Reachability::Refused { .. }), "{r:?}");
        assert!(r.is_reachable());
        assert!(!Reachability::TimedOut.is_reachable());
    }
}
