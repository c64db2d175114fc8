//! The switch's LLDP: the testbed's switch is a Linux bridge, which announces nothing, so
//! [`LldpAnnouncer`] makes it announce itself like a real leaf switch does: on every node's
//! bridge port, every `interval`, one LLDP frame (IEEE 802.1AB) from the port's MAC to the
//! nearest-bridge group 01:80:c2:00:00:0e, saying "chassis [`SWITCH_NAME`](crate::SWITCH_NAME), port `p<k>`".
//!
//! A bridge never forwards that group (it is link-local; `group_fwd_mask` is 0 by default),
//! so each node hears exactly its own port's announcement, which is what lets an agent
//! report "my `fab0` is cabled to `leaf1:p3`" and a verifier compare that with the declared
//! topology.
//!
//! What the switch announces on each port is kept per testbed: the declared name `p<k>` of
//! node k's port, until a fault changes it.
//! [`Testbed::swap_switch_ports`] models two cables swapped at the switch: node a's cable
//! now arrives at the port the switch calls `p<b>`, so from then on the announcer says
//! `p<b>` on node a's bridge port and `p<a>` on node b's (the veths themselves stay where
//! they are; only the names the switch gives the two ports trade places).
//!
//! Frames go out through a send-only `AF_PACKET` socket opened in the switch namespace (see
//! [`send_raw_frames`](crate::send_raw_frames) for how that works without `unsafe`).

use crate::error::TestbedError;
use crate::raw::{RawSender, RawTarget};
use crate::testbed::{Node, Shared, Testbed};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// LLDP's EtherType.
pub const LLDP_ETHERTYPE: u16 = 0x88cc;
/// The nearest-bridge group address: no bridge forwards it.
pub const LLDP_MULTICAST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];
/// Hard bound on an announcer's life, whatever its owner does: a forgotten announcer ends.
pub const MAX_ANNOUNCER_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Shortest announcement interval [`LldpAnnouncer::start`] accepts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

const TLV_END: u8 = 0;
const TLV_CHASSIS_ID: u8 = 1;
const TLV_PORT_ID: u8 = 2;
const TLV_TTL: u8 = 3;
/// Chassis and port id subtype "locally assigned".
const SUBTYPE_LOCAL: u8 = 7;
/// Chassis id subtype "MAC address" (the port id's is 3).
const CHASSIS_SUBTYPE_MAC: u8 = 4;
const PORT_SUBTYPE_MAC: u8 = 3;
/// Longest chassis or port id value (802.1AB: 1..=255 octets after the subtype).
const MAX_ID_LEN: usize = 255;
/// Shortest Ethernet frame without FCS; shorter frames are padded with zeros.
const MIN_FRAME_LEN: usize = 60;

/// An LLDP frame from `src_mac`: destination [`LLDP_MULTICAST`], EtherType 0x88CC, then the
/// TLVs Chassis ID (subtype 7, locally assigned: `chassis`), Port ID (subtype 7: `port`),
/// TTL (`ttl_s` seconds) and End, padded to 60 bytes. Ids longer than 255 bytes are cut at
/// a character boundary; an empty id makes a frame that [`parse_lldp`] rejects, as 802.1AB
/// requires at least one octet.
pub fn lldp_frame(src_mac: [u8; 6], chassis: &str, port: &str, ttl_s: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME_LEN.max(14 + 4 * 2 + 2 + 2 * MAX_ID_LEN + 2));
    f.extend_from_slice(&LLDP_MULTICAST);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&LLDP_ETHERTYPE.to_be_bytes());
    for (ty, id) in [(TLV_CHASSIS_ID, chassis), (TLV_PORT_ID, port)] {
        let mut value = vec![SUBTYPE_LOCAL];
        value.extend_from_slice(truncate(id, MAX_ID_LEN).as_bytes());
        push_tlv(&mut f, ty, &value);
    }
    push_tlv(&mut f, TLV_TTL, &ttl_s.to_be_bytes());
    push_tlv(&mut f, TLV_END, &[]);
    if f.len() < MIN_FRAME_LEN {
        f.resize(MIN_FRAME_LEN, 0);
    }
    f
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A TLV: 7 bits type, 9 bits length, value. Values here are at most 256 bytes.
fn push_tlv(out: &mut Vec<u8>, ty: u8, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX) & 0x01ff;
    let header = (u16::from(ty & 0x7f) << 9) | len;
    out.extend_from_slice(&header.to_be_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
}

/// The (chassis id, port id) of an untagged Ethernet LLDP frame; `None` for anything else
/// or a malformed LLDPDU (the first three TLVs must be Chassis ID, Port ID and a 2-byte TTL,
/// every TLV must fit, and an End TLV must follow). MAC-address ids (chassis subtype 4, port
/// subtype 3) are printed `aa:bb:cc:dd:ee:ff`; the others must be UTF-8 text (locally
/// assigned, interface name, ...). The destination address is not checked: LLDP may also be
/// sent to the other two reserved groups.
pub fn parse_lldp(frame: &[u8]) -> Option<(String, String)> {
    if frame.get(12..14)? != LLDP_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let mut rest = frame.get(14..)?;
    let mut next_tlv = || -> Option<(u8, &[u8])> {
        let header = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        let len = usize::from(header & 0x01ff);
        let value = rest.get(2..2 + len)?;
        rest = &rest[2 + len..];
        Some(((header >> 9) as u8, value))
    };
    let (TLV_CHASSIS_ID, chassis) = next_tlv()? else {
        return None;
    };
    let (TLV_PORT_ID, port) = next_tlv()? else {
        return None;
    };
    let (TLV_TTL, [_, _]) = next_tlv()? else {
        return None;
    };
    // Optional TLVs until End; each takes at least 2 bytes, so this ends within the frame.
    let mut ended = false;
    for _ in 0..frame.len() / 2 {
        if next_tlv()?.0 == TLV_END {
            ended = true;
            break;
        }
    }
    if !ended {
        return None;
    }
    Some((
        id_text(chassis, CHASSIS_SUBTYPE_MAC)?,
        id_text(port, PORT_SUBTYPE_MAC)?,
    ))
}

/// A chassis or port id value (subtype, then 1..=255 octets) as text.
fn id_text(value: &[u8], mac_subtype: u8) -> Option<String> {
    let (&subtype, id) = value.split_first()?;
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return None;
    }
    if subtype == mac_subtype && id.len() == 6 {
        let hex: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
        return Some(hex.join(":"));
    }
    String::from_utf8(id.to_vec()).ok()
}

/// The TTL announced with `interval`: four intervals, rounded up to whole seconds, at least
/// 1 s, at most `u16::MAX`.
pub fn ttl_for(interval: Duration) -> u16 {
    let secs = interval.saturating_mul(4).as_secs_f64().ceil();
    // The float is finite, non-negative and clamped, so the cast is exact.
    secs.clamp(1.0, f64::from(u16::MAX)) as u16
}

/// What the switch announces on each node's port: one entry per node, in node order.
#[derive(Debug)]
pub(crate) struct SwitchPorts {
    switch_name: String,
    ports: Mutex<Vec<PortEntry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortEntry {
    /// The node whose cable arrives at this bridge port.
    pub node: String,
    /// The bridge port's interface name in the switch namespace.
    pub iface: String,
    /// The name the switch announces for it.
    pub announced: String,
    /// The port's declared name (`p<k>` of the node).
    pub declared: String,
}

impl SwitchPorts {
    pub(crate) fn new(switch_name: &str, nodes: &[Node]) -> SwitchPorts {
        let ports = nodes
            .iter()
            .map(|n| PortEntry {
                node: n.name.clone(),
                iface: n.switch_port.clone(),
                announced: n.switch_port_name.clone(),
                declared: n.switch_port_name.clone(),
            })
            .collect();
        SwitchPorts {
            switch_name: switch_name.to_string(),
            ports: Mutex::new(ports),
        }
    }

    pub(crate) fn switch_name(&self) -> &str {
        &self.switch_name
    }

    /// The entries, locked: an announcement round holds the lock while it sends, so a change
    /// made through it is in effect for every round that starts after it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<PortEntry>> {
        self.ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The name announced on `node`'s port.
    pub(crate) fn announced_for(&self, node: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|p| p.node == node)
            .map(|p| p.announced.clone())
    }
}

impl Testbed {
    /// The switch's name, [`SWITCH_NAME`](crate::SWITCH_NAME) (`leaf1`): the LLDP chassis id and the switch's
    /// name in topology files.
    pub fn switch_name(&self) -> &str {
        self.switch_ports().switch_name()
    }

    /// The name of the switch port node `node`'s fabric cable arrives at, as the switch
    /// announces it: `p<k>` for node k ([`Node::switch_port_name`]), until
    /// [`Testbed::swap_switch_ports`] swaps it with another node's.
    pub fn switch_port_of(&self, node: &str) -> Result<String, TestbedError> {
        let n = self.node_or_err(node)?;
        Ok(self
            .switch_ports()
            .announced_for(&n.name)
            .unwrap_or_else(|| n.switch_port_name.clone()))
    }
}

/// Counters of an [`LldpAnnouncer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnouncerStats {
    /// Rounds completed (one frame attempted on every node's port).
    pub rounds: u64,
    /// Frames the kernel took.
    pub frames_sent: u64,
    /// Frames the kernel refused; a port that is down refuses with ENETDOWN.
    pub send_errors: u64,
    /// The latest refusal, naming the port.
    pub last_error: Option<String>,
    /// Why the announcer ended, once it has (stopped, testbed torn down, lifetime reached).
    pub ended: Option<String>,
}

#[derive(Debug, Default)]
struct StatsCell {
    stats: Mutex<AnnouncerStats>,
    changed: Condvar,
}

impl StatsCell {
    fn lock(&self) -> MutexGuard<'_, AnnouncerStats> {
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The switch's LLDP announcer: a background thread sending one LLDP frame on every node's
/// bridge port every interval (see the [module docs](self)). It stops on
/// [`LldpAnnouncer::stop`], on drop, when its testbed is torn down, and at the latest after
/// [`MAX_ANNOUNCER_LIFETIME`].
#[derive(Debug)]
pub struct LldpAnnouncer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<StatsCell>,
    interval: Duration,
}

impl LldpAnnouncer {
    /// Starts announcing on `tb`'s switch, the first round at once, then every `interval`
    /// (at least [`MIN_INTERVAL`], at most [`MAX_ANNOUNCER_LIFETIME`]), with TTL
    /// [`ttl_for`]`(interval)`. Fails if a port cannot be found or the socket not opened.
    pub fn start(tb: &Testbed, interval: Duration) -> Result<LldpAnnouncer, TestbedError> {
        if !(MIN_INTERVAL..=MAX_ANNOUNCER_LIFETIME).contains(&interval) {
            return Err(TestbedError::InvalidSpec(format!(
                "LLDP interval {interval:?}: must be {MIN_INTERVAL:?}..={MAX_ANNOUNCER_LIFETIME:?}"
            )));
        }
        let ports = Arc::clone(tb.switch_ports());
        let ifaces: Vec<String> = ports.lock().iter().map(|p| p.iface.clone()).collect();
        let names: Vec<&str> = ifaces.iter().map(String::as_str).collect();
        let switch = tb.switch();
        let (sender, targets) =
            switch
                .run(|| RawSender::open(&names))?
                .map_err(|(op, what, errno)| TestbedError::Io {
                    op,
                    path: PathBuf::from(format!("{what} in {}", switch.name())),
                    source: errno.into(),
                })?;
        let targets: HashMap<String, RawTarget> = ifaces.into_iter().zip(targets).collect();
        let shared = Arc::clone(tb.shared());
        let stats = Arc::new(StatsCell::default());
        let (stop, stop_rx) = mpsc::channel();
        let cell = Arc::clone(&stats);
        let job = Job {
            sender,
            targets,
            ports,
            shared,
            interval,
            ttl: ttl_for(interval),
        };
        let thread = std::thread::Builder::new()
            .name("nwtb-lldp".to_string())
            .spawn(move || job.run(&stop_rx, &cell))
            .map_err(|source| TestbedError::Thread {
                netns: switch.name().to_string(),
                source,
            })?;
        Ok(LldpAnnouncer {
            stop: Some(stop),
            thread: Some(thread),
            stats,
            interval,
        })
    }

    /// The announcement interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The counters so far.
    pub fn stats(&self) -> AnnouncerStats {
        self.stats.lock().clone()
    }

    /// Waits until `rounds` more rounds have completed after this call, so every frame of a
    /// round that started after the call has been handed to the kernel; fails after
    /// `timeout` or if the announcer ends first.
    pub fn wait_rounds(&self, rounds: u64, timeout: Duration) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        let mut stats = self.stats.lock();
        let target = stats.rounds.saturating_add(rounds);
        let what = || format!("{rounds} LLDP announcement rounds");
        loop {
            if stats.rounds >= target {
                return Ok(());
            }
            if let Some(why) = &stats.ended {
                return Err(TestbedError::Timeout {
                    what: format!("{} (announcer ended: {why})", what()),
                    timeout,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TestbedError::Timeout {
                    what: what(),
                    timeout,
                });
            }
            stats = self
                .stats
                .changed
                .wait_timeout(stats, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Stops the announcer (within one send round) and returns its counters.
    pub fn stop(mut self) -> AnnouncerStats {
        self.finish();
        self.stats()
    }

    fn finish(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl Drop for LldpAnnouncer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What the announcer thread owns.
struct Job {
    sender: RawSender,
    targets: HashMap<String, RawTarget>,
    ports: Arc<SwitchPorts>,
    shared: Arc<Shared>,
    interval: Duration,
    ttl: u16,
}

impl Job {
    /// Announces every interval until stopped, torn down or out of time. Each iteration
    /// waits one interval (at least [`MIN_INTERVAL`]) unless stopped, so the loop ends by
    /// [`MAX_ANNOUNCER_LIFETIME`].
    fn run(self, stop: &mpsc::Receiver<()>, cell: &StatsCell) {
        let deadline = Instant::now() + MAX_ANNOUNCER_LIFETIME;
        let ended = loop {
            if self.shared.is_torn_down() {
                break "testbed torn down";
            }
            self.round(cell);
            match stop.recv_timeout(self.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break "stopped",
            }
            if Instant::now() >= deadline {
                break "maximum lifetime reached";
            }
        };
        tracing::debug!(testbed = %self.shared.name(), ended, "LLDP announcer ended");
        cell.lock().ended = Some(ended.to_string());
        cell.changed.notify_all();
    }

    /// One frame on every node's port, under the port-name lock.
    fn round(&self, cell: &StatsCell) {
        let (mut sent, mut errors, mut last_error) = (0u64, 0u64, None);
        {
            let ports = self.ports.lock();
            for port in ports.iter() {
                let Some(target) = self.targets.get(&port.iface) else {
                    continue;
                };
                let frame = lldp_frame(
                    target.mac(),
                    self.ports.switch_name(),
                    &port.announced,
                    self.ttl,
                );
                match self.sender.send(target, &frame) {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        errors += 1;
                        last_error = Some(format!("send LLDP on {}: {e}", port.iface));
                    }
                }
            }
        }
        let mut stats = cell.lock();
        stats.rounds += 1;
        stats.frames_sent += sent;
        stats.send_errors += errors;
        if last_error.is_some() {
            stats.last_error = last_error;
        }
        drop(stats);
        cell.changed.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
pub(crate) mod tests {
    use super::*;
    use crate::capture::{Capture, CaptureLimit};
    use crate::netns::Netns;
    use crate::TestbedSpec;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    #[test]
    fn frame_layout() {
        let f = lldp_frame(MAC, "leaf1", "p2", 4);
        #[rustfmt::skip]
        let expect: &[u8] = &[
            0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e, // dst
            0x02, 0, 0, 0, 0, 0x01,             // src
            0x88, 0xcc,                         // EtherType
            0x02, 0x06, 7, b'l', b'e', b'a', b'f', b'1', // Chassis ID, len 6, subtype 7
            0x04, 0x03, 7, b'p', b'2',          // Port ID, len 3, subtype 7
            0x06, 0x02, 0, 4,                   // TTL 4 s
            0x00, 0x00,                         // End
        ];
        assert_eq!(&f[..expect.len()], expect);
        assert_eq!(f.len(), 60);
        assert!(f[expect.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn frames_round_trip() {
        let check = |chassis: &str, port: &str| {
            let got = parse_lldp(&lldp_frame(MAC, chassis, port, 120));
            assert_eq!(got, Some((chassis.to_string(), port.to_string())));
        };
        check("leaf1", "p1");
        check("spine-02.dc1", "Ethernet1/49");
        check("ä", "p253");
        check(&"c".repeat(255), &"p".repeat(255));
        // Longer ids are cut at 255 bytes, on a character boundary.
        let long = "é".repeat(200);
        let (chassis, _) = parse_lldp(&lldp_frame(MAC, &long, "p1", 1)).unwrap();
        assert_eq!(chassis, "é".repeat(127));
    }

    #[test]
    fn parse_rejects_what_is_not_an_lldpdu() {
        let good = lldp_frame(MAC, "leaf1", "p1", 4);
        let check = |frame: &[u8]| assert_eq!(parse_lldp(frame), None, "{frame:02x?}");
        let with = |at: usize, b: u8| {
            let mut f = good.clone();
            f[at] = b;
            f
        };
        check(&[]);
        check(&good[..13]);
        check(&with(13, 0x00)); // another EtherType
        check(&with(14, 0x04)); // first TLV is a Port ID
        check(&with(22, 0x02)); // second TLV is a Chassis ID
        check(&with(27, 0x08)); // third TLV is not a TTL
        check(&with(28, 0x03)); // TTL of 3 bytes
        check(&with(15, 0xff)); // Chassis ID longer than the frame
        check(&good[..31]); // no End TLV
        check(&lldp_frame(MAC, "", "p1", 4)); // empty id
        check(&lldp_frame(MAC, "leaf1", "", 4));
        check(&with(17, 0xff)); // not UTF-8
    }

    #[test]
    fn parses_mac_ids_and_optional_tlvs() {
        let mut f = LLDP_MULTICAST.to_vec();
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xcc]);
        f.extend_from_slice(&[0x02, 0x07, 4, 0xaa, 0xbb, 0xcc, 0, 1, 2]); // chassis MAC
        f.extend_from_slice(&[0x04, 0x05, 5, b'e', b't', b'h', b'3']); // port ifname
        f.extend_from_slice(&[0x06, 0x02, 0, 120]);
        f.extend_from_slice(&[0x0a, 0x03, b's', b'w', b'1']); // System Name
        f.extend_from_slice(&[0x00, 0x00]);
        let got = parse_lldp(&f).unwrap();
        assert_eq!(got, ("aa:bb:cc:00:01:02".to_string(), "eth3".to_string()));
    }

    #[test]
    fn ttl_is_four_intervals_in_whole_seconds() {
        let check = |ms: u64, s: u16| assert_eq!(ttl_for(Duration::from_millis(ms)), s, "{ms}");
        check(0, 1);
        check(10, 1);
        check(250, 1);
        check(251, 2);
        check(1000, 4);
        check(30_000, 120);
        check(u64::MAX, u16::MAX);
    }

    /// Starts a capture of `iface` in `netns`, lets `rounds` announcement rounds pass and
    /// returns the (chassis, port) of every LLDP frame the capture kept.
    pub(crate) fn lldp_heard(
        announcer: &LldpAnnouncer,
        netns: &Netns,
        iface: &str,
        rounds: u64,
    ) -> Vec<(String, String)> {
        let cap = Capture::start(netns, iface, CaptureLimit::default()).unwrap();
        announcer
            .wait_rounds(rounds, Duration::from_secs(10))
            .unwrap();
        let got = cap.stop();
        assert!(got.error.is_none() && !got.limit_reached, "{got:?}");
        got.frames.iter().filter_map(|f| parse_lldp(f)).collect()
    }

    /// The MAC of `iface` in `netns`, from `ip -o link show`.
    pub(crate) fn mac_of(netns: &Netns, iface: &str) -> [u8; 6] {
        let out = netns.ip(&["-o", "link", "show", "dev", iface]).unwrap();
        let hex = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap();
        let mut mac = [0u8; 6];
        for (b, h) in mac.iter_mut().zip(hex.split(':')) {
            *b = u8::from_str_radix(h, 16).unwrap();
        }
        mac
    }

    /// Privileged: every node hears `leaf1` and its own port, and no other port.
    #[test]
    fn each_node_hears_only_its_own_port() {
        if !crate::has_privileges() {
            eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
            return;
        }
        let tb = Testbed::create(TestbedSpec::default()).unwrap();
        assert_eq!(tb.switch_name(), "leaf1");
        let interval = Duration::from_millis(50);
        let announcer = LldpAnnouncer::start(&tb, interval).unwrap();
        // Capture everywhere at once, so a frame leaking to another port would be seen.
        let caps: Vec<Capture> = tb
            .nodes()
            .iter()
            .map(|n| Capture::start(&n.netns, &n.fabric_iface, CaptureLimit::default()).unwrap())
            .collect();
        announcer.wait_rounds(4, Duration::from_secs(10)).unwrap();
        for (node, cap) in tb.nodes().iter().zip(caps) {
            let got = cap.stop();
            let lldp: Vec<&Vec<u8>> = got
                .frames
                .iter()
                .filter(|f| f.get(12..14) == Some(&[0x88, 0xcc]))
                .collect();
            assert!(lldp.len() >= 2, "{}: {} LLDP frames", node.name, lldp.len());
            let want = ("leaf1".to_string(), format!("p{}", node.index));
            assert_eq!(tb.switch_port_of(&node.name).unwrap(), want.1);
            assert_eq!(node.switch_port_name, want.1);
            for f in lldp {
                assert_eq!(parse_lldp(f).as_ref(), Some(&want), "{}", node.name);
                assert_eq!(f[..6], LLDP_MULTICAST);
                assert_eq!(
                    f[6..12],
                    mac_of(tb.switch(), &node.switch_port),
                    "source MAC"
                );
            }
        }
        let stats = announcer.stop();
        assert!(stats.rounds >= 4 && stats.send_errors == 0, "{stats:?}");
        assert_eq!(stats.frames_sent, stats.rounds * 3);
        assert_eq!(stats.ended.as_deref(), Some("stopped"));
        assert!(LldpAnnouncer::start(&tb, Duration::ZERO).is_err());
        tb.teardown().unwrap();
    }
}
