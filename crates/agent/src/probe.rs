//! Link probes: interconnect verification on the fabric port.
//!
//! Every `[probe] interval_ms` the agent broadcasts a signed [`LinkProbe`](pb::LinkProbe)
//! (`{node, port, fresh 16-byte nonce, time}`) on its fabric interface, as a raw Ethernet
//! frame of EtherType 0x88B5 (`nicwarden_proto::link`). A neighbour answers each probe with
//! its own signed [`LinkAnswer`](pb::LinkAnswer) (`{node, port, to_node, to_port, echoed
//! nonce}`), sent back to the prober's MAC address. For every answer addressed to this node,
//! the agent records the answer bytes and signature as received, with the round-trip time
//! when the nonce is the one of its current round; it also records the switch it is plugged
//! into from the switch's LLDP announcements (EtherType 0x88CC). At the end of each round
//! it hands one [`ProbeRound`](pb::ProbeRound) per port to the agent loop, which forwards it
//! to the controller when connected (and drops it otherwise: probes are about now).
//!
//! The agent does not verify its neighbours' signatures, nor trust their names: the
//! controller, which holds every node's certificate, verifies each answer and its nonce.
//!
//! [`PortProbe`] is the pure part (no socket, no clock: time comes in as an `Instant`);
//! [`Prober`] is the shell: two `AF_PACKET` sockets (one per EtherType, so the kernel hands
//! us only probes and LLDP, never the data traffic) on a thread of its own, stopped when the
//! `Prober` is dropped.
//!
//! Bounded everywhere: frames above 1024 bytes are refused, at most
//! `max_answers_per_round` answers are sent per round (the excess is counted), at most
//! [`MAX_HEARD_PER_ROUND`] frames are recorded per round, and at most
//! [`MAX_FRAMES_PER_WAKE`] frames are read per socket and wake-up.
//!
//! Raw frames without `unsafe`: the sockets come from `socket2` (which takes any EtherType
//! as the protocol; nix only knows `ETH_P_ALL`), and are bound to the fabric interface with
//! nix's `bind` and the interface's own `sockaddr_ll` as `getifaddrs` returns it (its
//! protocol field is 0, so the socket keeps its EtherType). A bound packet socket sends with
//! a plain `send`.

use nicwarden_pki::NodeKey;
use nicwarden_proto::link::{self, LinkFrame, LINK_ETHERTYPE, LINK_MAX_FRAME};
use nicwarden_proto::pb;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// EtherType of LLDP.
pub const LLDP_ETHERTYPE: u16 = 0x88CC;
/// LLDP's "nearest bridge" group address.
pub const LLDP_MULTICAST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];
/// At most this many frames (answers and switch announcements) are recorded per round.
pub const MAX_HEARD_PER_ROUND: usize = 256;
/// At most this many frames are read from one socket per wake-up.
pub const MAX_FRAMES_PER_WAKE: usize = 512;
/// Smallest probe interval.
pub const MIN_INTERVAL_MS: u64 = 100;
/// Longest an LLDP chassis or port ID kept (longer ones are cut).
pub const MAX_LLDP_ID: usize = 64;

const ETH_HLEN: usize = 14;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Receive buffer: the largest frame we accept plus its header, with room to see that a
/// frame is too large.
const FRAME_BUFFER: usize = 2048;
/// How long the thread waits for a frame before it looks at the clock and the stop flag.
const POLL_MS: u64 = 50;
/// `PACKET_OUTGOING`: a frame this host sent, as a packet socket sees it.
const PACKET_OUTGOING: u8 = 4;

/// What the prober of one port needs to know.
#[derive(Clone, Debug)]
pub struct ProberConfig {
    /// This node's name, as in its certificate.
    pub node: String,
    /// The fabric interface (the port; its name is the port name in probes and answers).
    pub iface: String,
    pub interval: Duration,
    pub max_answers_per_round: u32,
}

/// The prober's counters and last round, on `/status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeStatus {
    pub iface: String,
    pub interval_ms: u64,
    pub rounds: u64,
    pub probes_sent: u64,
    /// Probes of other nodes received (answered or not).
    pub probes_heard: u64,
    pub answers_sent: u64,
    /// Answers addressed to this node.
    pub answers_heard: u64,
    /// LLDP announcements of the switch.
    pub lldp_heard: u64,
    /// Probes not answered: more than `max_answers_per_round` in the round.
    pub dropped_rate_limited: u64,
    /// Frames that are not a well-formed probe, answer or LLDP announcement.
    pub dropped_undecodable: u64,
    /// Frames not recorded: the round already holds [`MAX_HEARD_PER_ROUND`].
    pub dropped_round_full: u64,
    /// Well-formed frames not for us: answers to other nodes, probes in our own name,
    /// repeats within a round.
    pub ignored: u64,
    /// Answers to the previous round's probe that arrived after it ended (not reported: a
    /// late answer is not a replay).
    #[serde(default)]
    pub late_answers: u64,
    pub send_errors: u64,
    pub last_error: Option<String>,
    /// The last finished round.
    pub last_round: Option<RoundSummary>,
}

/// Who a finished round heard, as they claim to be (the names are not verified here).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundSummary {
    pub port: String,
    pub neighbours: Vec<NeighbourSeen>,
    pub switches: Vec<SwitchSeen>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NeighbourSeen {
    pub node: String,
    pub port: String,
    /// Round-trip time; `None` when the answer echoed a nonce other than the round's.
    pub rtt_us: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SwitchSeen {
    pub chassis: String,
    pub port: String,
}

/// The probing state of one port: pure (frames in, frames to send out, rounds out).
#[derive(Debug)]
pub struct PortProbe {
    node: String,
    port: String,
    max_answers: u32,
    round: Round,
    status: ProbeStatus,
    /// The nonce of the round before the current one: answers to it are late, not replays.
    prev_nonce: Option<[u8; 16]>,
    /// Switch ports announced by LLDP, with the rounds they stay valid for: an announcement
    /// holds until its TTL (4 announcement intervals) as in LLDP, so a round that happens not
    /// to contain one does not read as the link going down.
    lldp: Vec<(String, String, u8)>,
}

/// Rounds an LLDP announcement stays valid for.
const LLDP_HOLD_ROUNDS: u8 = 4;

#[derive(Debug, Default)]
struct Round {
    nonce: [u8; 16],
    /// When the probe left (None: not sent, nothing can be timed).
    sent_at: Option<Instant>,
    heard: Vec<pb::HeardFrame>,
    summary: RoundSummary,
    answers_sent: u32,
}

/// What [`PortProbe::on_frame`] asks the shell to send.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerOut {
    /// Destination MAC: the prober's.
    pub dst: [u8; 6],
    pub answer: pb::LinkAnswer,
}

impl PortProbe {
    pub fn new(node: &str, port: &str, max_answers_per_round: u32, interval: Duration) -> Self {
        PortProbe {
            node: node.to_string(),
            port: port.to_string(),
            max_answers: max_answers_per_round,
            round: Round::default(),
            prev_nonce: None,
            lldp: Vec::new(),
            status: ProbeStatus {
                iface: port.to_string(),
                interval_ms: interval.as_millis() as u64,
                ..Default::default()
            },
        }
    }

    pub fn status(&self) -> &ProbeStatus {
        &self.status
    }

    pub fn status_mut(&mut self) -> &mut ProbeStatus {
        &mut self.status
    }

    /// Ends the current round and starts one with `nonce`. Returns the round that ended
    /// (`None` at the first call) and the probe to send now; call [`PortProbe::probe_sent`]
    /// once it has left.
    pub fn start_round(
        &mut self,
        nonce: [u8; 16],
        unix_ms: u64,
    ) -> (Option<pb::ProbeRound>, pb::LinkProbe) {
        let ended = std::mem::replace(
            &mut self.round,
            Round {
                nonce,
                ..Default::default()
            },
        );
        let out = if self.status.rounds > 0 {
            self.status.last_round = Some(ended.summary);
            Some(pb::ProbeRound {
                port: self.port.clone(),
                nonce: ended.nonce.to_vec(),
                heard: ended.heard,
            })
        } else {
            None
        };
        self.prev_nonce = (self.status.rounds > 0).then_some(ended.nonce);
        self.status.rounds += 1;
        self.round.summary.port = self.port.clone();
        // Announcements still within their hold time are heard in this round too.
        self.lldp.retain_mut(|(_, _, left)| {
            *left = left.saturating_sub(1);
            *left > 0
        });
        for (chassis, port, _) in &self.lldp {
            self.round.summary.switches.push(SwitchSeen {
                chassis: chassis.clone(),
                port: port.clone(),
            });
            self.round.heard.push(pb::HeardFrame {
                switch_chassis: chassis.clone(),
                switch_port: port.clone(),
                ..Default::default()
            });
        }
        let probe = pb::LinkProbe {
            node: self.node.clone(),
            port: self.port.clone(),
            nonce: nonce.to_vec(),
            sent_unix_ms: unix_ms,
        };
        (out, probe)
    }

    /// The round's probe left at `now`: answers to it are timed from here.
    pub fn probe_sent(&mut self, now: Instant) {
        self.round.sent_at = Some(now);
        self.status.probes_sent += 1;
    }

    /// One received frame, Ethernet header included, received at `now`. Returns the answer
    /// to send when it is a probe to answer.
    pub fn on_frame(&mut self, now: Instant, frame: &[u8]) -> Option<AnswerOut> {
        let Some((dst, src, ethertype, payload)) = ethernet(frame) else {
            self.status.dropped_undecodable += 1;
            return None;
        };
        match ethertype {
            LINK_ETHERTYPE => match link::decode_frame(payload) {
                Ok(LinkFrame::Probe { probe, .. }) => self.on_probe(src, probe),
                Ok(LinkFrame::Answer {
                    answer,
                    body,
                    signature,
                }) => {
                    self.on_answer(now, answer, body, signature);
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "undecodable link frame");
                    self.status.dropped_undecodable += 1;
                    None
                }
            },
            LLDP_ETHERTYPE if dst == LLDP_MULTICAST => {
                match parse_lldp(payload) {
                    Ok((chassis, port)) => self.on_lldp(chassis, port),
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable LLDP frame");
                        self.status.dropped_undecodable += 1;
                    }
                }
                None
            }
            _ => {
                self.status.ignored += 1;
                None
            }
        }
    }

    fn on_probe(&mut self, src: [u8; 6], probe: pb::LinkProbe) -> Option<AnswerOut> {
        if probe.node == self.node {
            // Our own name: ours looped back, or someone claiming to be us. Never answer
            // ourselves.
            self.status.ignored += 1;
            return None;
        }
        self.status.probes_heard += 1;
        if self.round.answers_sent >= self.max_answers {
            self.status.dropped_rate_limited += 1;
            return None;
        }
        self.round.answers_sent += 1;
        // A group source address is bogus: answer to everyone rather than to it.
        let dst = if src[0] & 1 == 1 { BROADCAST } else { src };
        Some(AnswerOut {
            dst,
            answer: pb::LinkAnswer {
                node: self.node.clone(),
                port: self.port.clone(),
                to_node: probe.node,
                to_port: probe.port,
                nonce: probe.nonce,
            },
        })
    }

    fn on_answer(
        &mut self,
        now: Instant,
        answer: pb::LinkAnswer,
        body: Vec<u8>,
        signature: Vec<u8>,
    ) {
        if answer.to_node != self.node {
            self.status.ignored += 1;
            return;
        }
        if self.prev_nonce.is_some_and(|n| answer.nonce == n) {
            self.status.late_answers += 1;
            return;
        }
        if self
            .round
            .heard
            .iter()
            .any(|h| h.answer == body && h.signature == signature)
        {
            self.status.ignored += 1;
            return;
        }
        self.status.answers_heard += 1;
        if self.round.heard.len() >= MAX_HEARD_PER_ROUND {
            self.status.dropped_round_full += 1;
            return;
        }
        let rtt_us = match self.round.sent_at {
            Some(at) if answer.nonce == self.round.nonce => {
                Some((now.saturating_duration_since(at).as_micros() as u64).max(1))
            }
            _ => None,
        };
        self.round.summary.neighbours.push(NeighbourSeen {
            node: answer.node,
            port: answer.port,
            rtt_us,
        });
        self.round.heard.push(pb::HeardFrame {
            answer: body,
            signature,
            rtt_us: rtt_us.unwrap_or(0),
            switch_chassis: String::new(),
            switch_port: String::new(),
        });
    }

    fn on_lldp(&mut self, chassis: String, port: String) {
        match self
            .lldp
            .iter_mut()
            .find(|(c, p, _)| *c == chassis && *p == port)
        {
            Some(e) => e.2 = LLDP_HOLD_ROUNDS,
            None => {
                // The switch port changed (or a first announcement): the old one is gone.
                self.lldp.retain(|(c, _, _)| *c != chassis);
                self.lldp
                    .push((chassis.clone(), port.clone(), LLDP_HOLD_ROUNDS));
            }
        }
        if self
            .round
            .heard
            .iter()
            .any(|h| h.switch_chassis == chassis && h.switch_port == port)
        {
            self.status.ignored += 1;
            return;
        }
        self.status.lldp_heard += 1;
        if self.round.heard.len() >= MAX_HEARD_PER_ROUND {
            self.status.dropped_round_full += 1;
            return;
        }
        self.round.summary.switches.push(SwitchSeen {
            chassis: chassis.clone(),
            port: port.clone(),
        });
        self.round.heard.push(pb::HeardFrame {
            switch_chassis: chassis,
            switch_port: port,
            ..Default::default()
        });
    }
}

/// (destination, source, EtherType, payload) of an Ethernet frame.
type EthernetParts<'a> = ([u8; 6], [u8; 6], u16, &'a [u8]);

fn ethernet(frame: &[u8]) -> Option<EthernetParts<'_>> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let dst: [u8; 6] = frame[0..6].try_into().ok()?;
    let src: [u8; 6] = frame[6..12].try_into().ok()?;
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    Some((dst, src, ethertype, &frame[ETH_HLEN..]))
}

/// An Ethernet frame: header and payload.
pub fn build_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn mac_text(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Printable text of an ID: invalid UTF-8 and control characters replaced, cut at
/// [`MAX_LLDP_ID`] bytes (on a character boundary).
fn id_text(b: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let mut end = s.len().min(MAX_LLDP_ID);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// An LLDP chassis or port ID (subtype byte, then the ID) as text: MAC addresses (chassis
/// subtype 4, port subtype 3) as `aa:bb:..`, network addresses (chassis 5, port 4) with an
/// IPv4 family as dotted quads, everything else (names, locally assigned) as text.
fn lldp_id(tlv: u8, value: &[u8]) -> Result<String, String> {
    let (&subtype, id) = value
        .split_first()
        .ok_or_else(|| format!("TLV {tlv}: empty"))?;
    if id.is_empty() {
        return Err(format!("TLV {tlv}: empty ID"));
    }
    let mac_subtype = if tlv == 1 { 4 } else { 3 };
    let addr_subtype = if tlv == 1 { 5 } else { 4 };
    Ok(match (subtype, id) {
        (s, [a, b, c, d, e, f]) if s == mac_subtype => mac_text(&[*a, *b, *c, *d, *e, *f]),
        (s, [1, a, b, c, d]) if s == addr_subtype => format!("{a}.{b}.{c}.{d}"),
        _ => id_text(id),
    })
}

/// Parses an LLDP payload (after the Ethernet header) into (chassis ID, port ID). TLVs are a
/// 7-bit type and a 9-bit length; the chassis ID (type 1) and port ID (type 2) are
/// required, everything up to the End TLV (type 0) is walked and the rest ignored.
pub fn parse_lldp(payload: &[u8]) -> Result<(String, String), String> {
    let mut rest = payload;
    let (mut chassis, mut port) = (None, None);
    loop {
        if rest.len() < 2 {
            return Err("truncated TLV header (no End TLV)".into());
        }
        let head = u16::from_be_bytes([rest[0], rest[1]]);
        let (tlv, len) = ((head >> 9) as u8, (head & 0x1ff) as usize);
        let value = rest
            .get(2..2 + len)
            .ok_or_else(|| format!("TLV {tlv}: length {len} beyond the frame"))?;
        rest = &rest[2 + len..];
        match tlv {
            0 => break,
            1 if chassis.is_none() => chassis = Some(lldp_id(1, value)?),
            2 if port.is_none() => port = Some(lldp_id(2, value)?),
            1 | 2 => return Err(format!("TLV {tlv} repeated")),
            _ => {}
        }
    }
    match (chassis, port) {
        (Some(c), Some(p)) => Ok((c, p)),
        (None, _) => Err("no chassis ID".into()),
        (_, None) => Err("no port ID".into()),
    }
}

/// Why the prober could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{op} on {iface}: {source}")]
    Sys {
        op: &'static str,
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link probes on {iface}: {reason}")]
    Invalid { iface: String, reason: String },
}

fn sys(op: &'static str, iface: &str) -> impl FnOnce(std::io::Error) -> ProbeError {
    let iface = iface.to_string();
    move |source| ProbeError::Sys { op, iface, source }
}

/// The fabric port: one bound packet socket per EtherType.
struct PortSocket {
    link: OwnedFd,
    lldp: OwnedFd,
    ifindex: usize,
    mac: [u8; 6],
}

impl PortSocket {
    /// Opens the sockets in the calling thread's network namespace.
    fn open(iface: &str) -> Result<PortSocket, ProbeError> {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| sys("list interfaces (getifaddrs)", iface)(e.into()))?;
        let link_addr = addrs
            .filter(|a| a.interface_name == iface)
            .find_map(|a| a.address.filter(|s| s.as_link_addr().is_some()))
            .ok_or_else(|| ProbeError::Invalid {
                iface: iface.to_string(),
                reason: "no such interface (or it has no link-layer address)".into(),
            })?;
        let Some((ifindex, mac)) = link_addr
            .as_link_addr()
            .map(|l| (l.ifindex(), l.addr().unwrap_or_default()))
        else {
            return Err(ProbeError::Invalid {
                iface: iface.to_string(),
                reason: "no link-layer address".into(),
            });
        };
        let open = |ethertype: u16| -> Result<OwnedFd, ProbeError> {
            let s = socket2::Socket::new(
                socket2::Domain::PACKET,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(i32::from(ethertype.to_be()))),
            )
            .map_err(sys("open AF_PACKET socket", iface))?;
            s.set_nonblocking(true)
                .map_err(sys("make packet socket non-blocking", iface))?;
            let fd = OwnedFd::from(s);
            nix::sys::socket::bind(fd.as_raw_fd(), &link_addr)
                .map_err(|e| sys("bind packet socket", iface)(e.into()))?;
            Ok(fd)
        };
        Ok(PortSocket {
            link: open(LINK_ETHERTYPE)?,
            lldp: open(LLDP_ETHERTYPE)?,
            ifindex,
            mac,
        })
    }
}

/// The running prober of the fabric port; dropping it stops its thread.
#[derive(Debug)]
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<ProbeStatus>>,
}

impl Prober {
    /// Opens the fabric port (in the calling thread's network namespace) and starts probing
    /// on a thread of its own. `report` gets one [`pb::ProbeReport`] per finished round; it
    /// must not block (hand it to a bounded queue, drop it when full).
    pub fn start(
        cfg: ProberConfig,
        key: NodeKey,
        report: impl FnMut(pb::ProbeReport) + Send + 'static,
    ) -> Result<Prober, ProbeError> {
        if let Err(e) = key.sign_fixed(b"nicwarden link probe self-test") {
            return Err(ProbeError::Invalid {
                iface: cfg.iface.clone(),
                reason: format!("the node key cannot sign probes: {e}"),
            });
        }
        if cfg.interval < Duration::from_millis(MIN_INTERVAL_MS) {
            return Err(ProbeError::Invalid {
                iface: cfg.iface.clone(),
                reason: format!("interval below {MIN_INTERVAL_MS} ms"),
            });
        }
        let sock = PortSocket::open(&cfg.iface)?;
        let core = PortProbe::new(
            &cfg.node,
            &cfg.iface,
            cfg.max_answers_per_round,
            cfg.interval,
        );
        let status = Arc::new(Mutex::new(core.status().clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let shell = Shell {
            sock,
            core,
            key,
            interval: cfg.interval,
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new()
            .name("nw-probe".into())
            .spawn(move || shell.run(report))
            .map_err(sys("start the probe thread", &cfg.iface))?;
        tracing::info!(iface = %cfg.iface, interval_ms = cfg.interval.as_millis() as u64, "link probes started");
        Ok(Prober {
            stop,
            thread: Some(thread),
            status,
        })
    }

    /// The counters and the last finished round.
    pub fn status(&self) -> ProbeStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Within one poll interval.
            let _ = t.join();
        }
    }
}

struct Shell {
    sock: PortSocket,
    core: PortProbe,
    key: NodeKey,
    interval: Duration,
    status: Arc<Mutex<ProbeStatus>>,
    stop: Arc<AtomicBool>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shell {
    fn run(mut self, mut report: impl FnMut(pb::ProbeReport)) {
        let mut next_round = Instant::now();
        let mut buf = vec![0u8; FRAME_BUFFER];
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next_round {
                if let Some(round) = self.round() {
                    report(pb::ProbeReport {
                        rounds: vec![round],
                    });
                }
                next_round += self.interval;
                if next_round <= now {
                    next_round = now + self.interval;
                }
            }
            let wait = next_round
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(POLL_MS));
            self.wait_and_read(wait, &mut buf);
            let snapshot = self.core.status().clone();
            *self.status.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
        }
    }

    /// Ends the round, sends the next probe; returns the round that ended.
    fn round(&mut self) -> Option<pb::ProbeRound> {
        let nonce: [u8; 16] = rand::random();
        let (ended, probe) = self.core.start_round(nonce, unix_ms());
        let sent = signed(&self.key, |s| link::encode_probe(&probe, s)).and_then(|payload| {
            let frame = build_frame(BROADCAST, self.sock.mac, LINK_ETHERTYPE, &payload);
            send_frame(&self.sock.link, &frame)
        });
        match sent {
            Ok(()) => self.core.probe_sent(Instant::now()),
            Err(e) => self.send_failed(e),
        }
        ended
    }

    fn send_failed(&mut self, e: String) {
        tracing::debug!(error = %e, "sending a link frame failed");
        let st = self.core.status_mut();
        st.send_errors += 1;
        st.last_error = Some(e);
    }

    /// Waits up to `wait` for frames, then reads what is queued (bounded).
    fn wait_and_read(&mut self, wait: Duration, buf: &mut [u8]) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let ready = {
            let mut fds = [
                PollFd::new(self.sock.link.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.sock.lldp.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => return,
                Ok(_) => fds.map(|f| f.revents().is_some_and(|r| !r.is_empty())),
                Err(nix::errno::Errno::EINTR) => return,
                Err(e) => {
                    self.core.status_mut().last_error = Some(format!("poll: {e}"));
                    std::thread::sleep(wait);
                    return;
                }
            }
        };
        for (i, r) in ready.into_iter().enumerate() {
            if r {
                self.drain(i == 0, buf);
            }
        }
    }

    fn drain(&mut self, link: bool, buf: &mut [u8]) {
        use nix::sys::socket::{recvfrom, SockaddrStorage};
        for _ in 0..MAX_FRAMES_PER_WAKE {
            let fd = if link {
                self.sock.link.as_raw_fd()
            } else {
                self.sock.lldp.as_raw_fd()
            };
            let (n, addr) = match recvfrom::<SockaddrStorage>(fd, buf) {
                Ok(r) => r,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    self.core.status_mut().last_error = Some(format!("receive: {e}"));
                    return;
                }
            };
            let ours = addr
                .as_ref()
                .and_then(|a| a.as_link_addr())
                .is_some_and(|l| {
                    l.ifindex() == self.sock.ifindex && l.pkttype() != PACKET_OUTGOING
                });
            if !ours {
                continue;
            }
            if n > ETH_HLEN + LINK_MAX_FRAME {
                self.core.status_mut().dropped_undecodable += 1;
                continue;
            }
            let Some(out) = self.core.on_frame(Instant::now(), &buf[..n]) else {
                continue;
            };
            let sent =
                signed(&self.key, |s| link::encode_answer(&out.answer, s)).and_then(|payload| {
                    let frame = build_frame(out.dst, self.sock.mac, LINK_ETHERTYPE, &payload);
                    send_frame(&self.sock.link, &frame)
                });
            match sent {
                Ok(()) => self.core.status_mut().answers_sent += 1,
                Err(e) => self.send_failed(e),
            }
        }
    }
}

/// Encodes a frame payload signed by the node key.
fn signed(
    key: &NodeKey,
    encode: impl FnOnce(&mut dyn FnMut(&[u8]) -> [u8; 64]) -> Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut failed = None;
    let payload = encode(&mut |m: &[u8]| match key.sign_fixed(m) {
        Ok(s) => s,
        Err(e) => {
            failed = Some(format!("sign: {e}"));
            [0u8; 64]
        }
    });
    match failed {
        None => Ok(payload),
        Some(e) => Err(e),
    }
}

fn send_frame(fd: &OwnedFd, frame: &[u8]) -> Result<(), String> {
    nix::sys::socket::send(fd.as_raw_fd(), frame, nix::sys::socket::MsgFlags::empty())
        .map(|_| ())
        .map_err(|e| format!("send: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const INTERVAL: Duration = Duration::from_secs(1);

    fn sign(m: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[..m.len().min(64)].copy_from_slice(&m[..m.len().min(64)]);
        s
    }

    fn probe_frame(node: &str, nonce: [u8; 16]) -> Vec<u8> {
        let p = pb::LinkProbe {
            node: node.into(),
            port: "fab0".into(),
            nonce: nonce.to_vec(),
            sent_unix_ms: 1,
        };
        build_frame(BROADCAST, B, LINK_ETHERTYPE, &link::encode_probe(&p, sign))
    }

    fn answer(from: &str, to: &str, nonce: [u8; 16]) -> pb::LinkAnswer {
        pb::LinkAnswer {
            node: from.into(),
            port: "fab0".into(),
            to_node: to.into(),
            to_port: "fab0".into(),
            nonce: nonce.to_vec(),
        }
    }

    fn answer_frame(from: &str, to: &str, nonce: [u8; 16]) -> Vec<u8> {
        build_frame(
            A,
            B,
            LINK_ETHERTYPE,
            &link::encode_answer(&answer(from, to, nonce), sign),
        )
    }

    /// An LLDP payload from (type, value) TLVs, End TLV appended.
    fn lldp(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (t, v) in tlvs.iter().chain([(0u8, &[][..])].iter()) {
            let head = (u16::from(*t) << 9) | v.len() as u16;
            out.extend_from_slice(&head.to_be_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    #[test]
    fn frames_are_built_and_split() {
        let f = build_frame(BROADCAST, A, LINK_ETHERTYPE, b"xyz");
        assert_eq!(
            &f[..14],
            &[255, 255, 255, 255, 255, 255, 2, 0, 0, 0, 0, 1, 0x88, 0xb5]
        );
        assert_eq!(ethernet(&f), Some((BROADCAST, A, 0x88b5, &b"xyz"[..])));
        assert_eq!(ethernet(&f[..13]), None);
    }

    #[test]
    fn lldp_ids() {
        #[track_caller]
        fn check(tlvs: &[(u8, &[u8])], want: Result<(&str, &str), &str>) {
            let got = parse_lldp(&lldp(tlvs));
            match want {
                Ok((c, p)) => assert_eq!(got, Ok((c.to_string(), p.to_string()))),
                Err(e) => {
                    let err = got.unwrap_err();
                    assert!(err.contains(e), "{err} (wanted {e:?})");
                }
            }
        }
        check(
            &[(1, b"\x07leaf1"), (2, b"\x05p3"), (3, b"\x00\x78")],
            Ok(("leaf1", "p3")),
        );
        check(
            &[
                (1, b"\x04\xaa\xbb\xcc\x00\x11\x22"),
                (2, b"\x07Ethernet1/3"),
            ],
            Ok(("aa:bb:cc:00:11:22", "Ethernet1/3")),
        );
        check(
            &[
                (1, b"\x05\x01\x0a\x00\x00\x01"),
                (2, b"\x03\x02\x00\x00\x00\x00\x09"),
            ],
            Ok(("10.0.0.1", "02:00:00:00:00:09")),
        );
        check(
            &[(1, b"\x06swp\x01x"), (2, b"\x01\xff")],
            Ok(("swp?x", "\u{fffd}")),
        );
        // System name and other TLVs before the End are skipped; TLV order does not matter.
        check(
            &[(5, b"leaf1.dc"), (2, b"\x05p1"), (1, b"\x07c")],
            Ok(("c", "p1")),
        );
        // Long IDs are cut at 64 bytes.
        let long = [b"\x07".to_vec(), vec![b'x'; 200]].concat();
        let got = parse_lldp(&lldp(&[(1, &long), (2, b"\x05p")])).unwrap();
        assert_eq!(got.0.len(), MAX_LLDP_ID);
        // Malformed.
        check(&[(2, b"\x05p3")], Err("no chassis ID"));
        check(&[(1, b"\x07c")], Err("no port ID"));
        check(&[(1, b"\x07")], Err("TLV 1: empty ID"));
        check(&[(1, b""), (2, b"\x05p")], Err("TLV 1: empty"));
        check(
            &[(1, b"\x07a"), (1, b"\x07b"), (2, b"\x05p")],
            Err("TLV 1 repeated"),
        );
        assert!(parse_lldp(&[]).unwrap_err().contains("truncated"));
        assert!(parse_lldp(&[0x02, 0x09, 0x07])
            .unwrap_err()
            .contains("beyond the frame"));
        // No End TLV.
        let mut no_end = lldp(&[(1, b"\x07c"), (2, b"\x05p")]);
        no_end.truncate(no_end.len() - 2);
        assert!(parse_lldp(&no_end).unwrap_err().contains("no End TLV"));
    }

    #[test]
    fn answers_probes_of_others_only_and_rate_limits() {
        let mut p = PortProbe::new("node1", "fab0", 2, INTERVAL);
        let (ended, probe) = p.start_round([1; 16], 5);
        assert_eq!(ended, None);
        assert_eq!(
            (
                probe.node.as_str(),
                probe.port.as_str(),
                probe.nonce.as_slice(),
                probe.sent_unix_ms
            ),
            ("node1", "fab0", &[1u8; 16][..], 5)
        );
        let now = Instant::now();
        let out = p.on_frame(now, &probe_frame("node2", [9; 16])).unwrap();
        assert_eq!(
            out,
            AnswerOut {
                dst: B,
                answer: pb::LinkAnswer {
                    node: "node1".into(),
                    port: "fab0".into(),
                    to_node: "node2".into(),
                    to_port: "fab0".into(),
                    nonce: vec![9; 16]
                }
            }
        );
        // Our own name: never answered.
        assert_eq!(p.on_frame(now, &probe_frame("node1", [9; 16])), None);
        assert!(p.on_frame(now, &probe_frame("node3", [9; 16])).is_some());
        // The third answer in the round is one too many.
        assert_eq!(p.on_frame(now, &probe_frame("node4", [9; 16])), None);
        assert_eq!(p.on_frame(now, &probe_frame("node5", [9; 16])), None);
        let st = p.status();
        assert_eq!(
            (st.probes_heard, st.dropped_rate_limited, st.ignored),
            (4, 2, 1)
        );
        // A new round, a new allowance.
        p.start_round([2; 16], 6);
        assert!(p.on_frame(now, &probe_frame("node4", [9; 16])).is_some());
        // A probe from a group address is answered to everyone.
        let mut f = probe_frame("node6", [9; 16]);
        f[6] = 0x01;
        assert_eq!(p.on_frame(now, &f).map(|o| o.dst), Some(BROADCAST));
    }

    #[test]
    fn late_answers_are_dropped_and_switches_hold_for_their_ttl() {
        let mut p = PortProbe::new("node1", "fab0", 64, INTERVAL);
        let t0 = Instant::now();
        p.start_round([1; 16], 0);
        p.probe_sent(t0);
        let sw = |port: &[u8]| {
            let mut v = b"\x05".to_vec();
            v.extend_from_slice(port);
            build_frame(
                LLDP_MULTICAST,
                B,
                LLDP_ETHERTYPE,
                &lldp(&[(1, b"\x07leaf1"), (2, &v)]),
            )
        };
        p.on_frame(t0, &sw(b"p1"));
        let (r1, _) = p.start_round([2; 16], 0);
        assert_eq!(r1.expect("round").heard.len(), 1);
        // The previous round's answer arriving now is late: not reported (not a replay).
        p.on_frame(t0, &answer_frame("node2", "node1", [1; 16]));
        assert_eq!(p.status().late_answers, 1);
        // A much older nonce is still reported (the controller calls it a replay).
        p.on_frame(t0, &answer_frame("node2", "node1", [9; 16]));
        // No announcement in this round: the switch port still holds.
        let (r2, _) = p.start_round([3; 16], 0);
        let r2 = r2.expect("round");
        assert_eq!(r2.heard.len(), 2, "{r2:?}");
        assert!(r2.heard.iter().any(|h| h.switch_port == "p1"));
        // ...until its hold time runs out.
        for n in 4..8u8 {
            p.start_round([n; 16], 0);
        }
        let (r, _) = p.start_round([8; 16], 0);
        assert!(r.expect("round").heard.is_empty());
        // A new port replaces the old one at once (a swapped cable).
        p.on_frame(t0, &sw(b"p1"));
        p.on_frame(t0, &sw(b"p2"));
        p.start_round([9; 16], 0);
        let (r, _) = p.start_round([10; 16], 0);
        let ports: Vec<String> = r
            .expect("round")
            .heard
            .iter()
            .map(|h| h.switch_port.clone())
            .collect();
        assert_eq!(ports, vec!["p2".to_string()]);
    }

    #[test]
    fn rounds_carry_raw_answers_with_rtt_and_switches() {
        let mut p = PortProbe::new("node1", "fab0", 64, INTERVAL);
        let t0 = Instant::now();
        p.start_round([1; 16], 0);
        p.probe_sent(t0);
        // The answer to this round: timed.
        let a2 = answer_frame("node2", "node1", [1; 16]);
        assert_eq!(p.on_frame(t0 + Duration::from_micros(250), &a2), None);
        // Repeated within the round: once.
        p.on_frame(t0 + Duration::from_micros(300), &a2);
        // A stale nonce (a replay of an old answer): recorded, not timed.
        p.on_frame(t0, &answer_frame("node3", "node1", [7; 16]));
        // An answer to someone else: ignored.
        p.on_frame(t0, &answer_frame("node3", "node9", [1; 16]));
        // Garbage and a switch.
        p.on_frame(t0, &build_frame(A, B, LINK_ETHERTYPE, b"\xff\xff"));
        let sw = lldp(&[(1, b"\x07leaf1"), (2, b"\x05p3")]);
        p.on_frame(t0, &build_frame(LLDP_MULTICAST, B, LLDP_ETHERTYPE, &sw));
        p.on_frame(t0, &build_frame(LLDP_MULTICAST, B, LLDP_ETHERTYPE, &sw));
        // LLDP to another address is not the nearest bridge's.
        p.on_frame(t0, &build_frame(BROADCAST, B, LLDP_ETHERTYPE, &sw));
        p.on_frame(t0, &build_frame(LLDP_MULTICAST, B, LLDP_ETHERTYPE, b"\x02"));

        let (ended, _) = p.start_round([2; 16], 0);
        let round = ended.unwrap();
        assert_eq!(
            (round.port.as_str(), round.nonce.as_slice()),
            ("fab0", &[1u8; 16][..])
        );
        assert_eq!(round.heard.len(), 3, "{round:?}");
        let h = &round.heard[0];
        assert_eq!(h.rtt_us, 250);
        // Raw: the exact signed body and the signature as received.
        let Ok(LinkFrame::Answer { body, .. }) = link::decode_frame(&link::encode_answer(
            &answer("node2", "node1", [1; 16]),
            sign,
        )) else {
            panic!("not an answer")
        };
        assert_eq!(h.answer, body);
        assert_eq!(h.signature, sign(&link::link_signed_bytes(&body)).to_vec());
        assert_eq!(
            (round.heard[1].rtt_us, round.heard[1].answer.is_empty()),
            (0, false)
        );
        assert_eq!(
            (
                round.heard[2].switch_chassis.as_str(),
                round.heard[2].switch_port.as_str(),
                round.heard[2].answer.is_empty()
            ),
            ("leaf1", "p3", true)
        );
        let st = p.status();
        assert_eq!(
            (
                st.answers_heard,
                st.lldp_heard,
                st.ignored,
                st.dropped_undecodable,
                st.rounds,
                st.probes_sent
            ),
            (2, 1, 4, 2, 2, 1)
        );
        assert_eq!(
            st.last_round,
            Some(RoundSummary {
                port: "fab0".into(),
                neighbours: vec![
                    NeighbourSeen {
                        node: "node2".into(),
                        port: "fab0".into(),
                        rtt_us: Some(250)
                    },
                    NeighbourSeen {
                        node: "node3".into(),
                        port: "fab0".into(),
                        rtt_us: None
                    },
                ],
                switches: vec![SwitchSeen {
                    chassis: "leaf1".into(),
                    port: "p3".into()
                }],
            })
        );
        // The next round starts empty; an answer before our probe left is not timed.
        p.on_frame(t0, &answer_frame("node2", "node1", [2; 16]));
        let (ended, _) = p.start_round([3; 16], 0);
        assert_eq!(ended.unwrap().heard[0].rtt_us, 0);
    }

    #[test]
    fn a_round_holds_a_bounded_number_of_frames() {
        let mut p = PortProbe::new("node1", "fab0", 64, INTERVAL);
        p.start_round([1; 16], 0);
        p.probe_sent(Instant::now());
        for i in 0..MAX_HEARD_PER_ROUND + 10 {
            p.on_frame(
                Instant::now(),
                &answer_frame(&format!("n{i}"), "node1", [1; 16]),
            );
        }
        let (ended, _) = p.start_round([2; 16], 0);
        assert_eq!(ended.unwrap().heard.len(), MAX_HEARD_PER_ROUND);
        assert_eq!(p.status().dropped_round_full, 10);
        assert_eq!(
            p.status().last_round.as_ref().map(|r| r.neighbours.len()),
            Some(MAX_HEARD_PER_ROUND)
        );
    }
}
