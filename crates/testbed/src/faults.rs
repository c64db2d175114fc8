//! Fabric faults for interconnect verification, each reversible: two cables swapped at the
//! switch, a cable pulled, and an intruder plugged into the switch.

use crate::error::TestbedError;
use crate::netns::Netns;
use crate::testbed::{new_namespace, Shared, Testbed, FABRIC_IFACE, PREFIX_LEN, SWITCH_BRIDGE};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long links may take to come up.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Interface index of an extra host's `fab0` (as a node's).
const HOST_FABRIC_INDEX: &str = "10";
/// Interface indexes of extra hosts' switch ports: above the nodes' `100 + k`, distinct
/// within the process, so a veth end never has its peer's index (see `testbed::build`).
const HOST_PORT_INDEX_BASE: usize = 1000;
static NEXT_HOST_PORT: AtomicUsize = AtomicUsize::new(0);
/// Longest extra host name: its switch port `h-<name>` must fit in 15 characters.
const MAX_HOST_NAME: usize = 12;

impl Testbed {
    /// Swaps node `a`'s and node `b`'s fabric cables at the switch: from the next
    /// announcement round on, the switch announces (LLDP, [`crate::lldp`]) `a`'s declared
    /// port name on `b`'s bridge port and vice versa, as if `a`'s cable arrived at the port
    /// `b` was declared on. The veths stay where they are, so traffic between nodes is
    /// unaffected (a bridge does not care which port is which); only the switch's view of
    /// its ports changes, which is what a topology verifier checks. Calling it again with the
    /// same nodes swaps back; [`Testbed::reset_switch_ports`] restores every port. Returns
    /// once no announcement round started before the swap is still sending.
    pub fn swap_switch_ports(&self, a: &str, b: &str) -> Result<(), TestbedError> {
        let (a, b) = (
            self.node_or_err(a)?.name.clone(),
            self.node_or_err(b)?.name.clone(),
        );
        let mut ports = self.switch_ports().lock();
        let ia = ports.iter().position(|p| p.node == a);
        let ib = ports.iter().position(|p| p.node == b);
        if let (Some(ia), Some(ib)) = (ia, ib) {
            let name_a = ports[ia].announced.clone();
            ports[ia].announced = std::mem::replace(&mut ports[ib].announced, name_a);
        }
        tracing::debug!(testbed = %self.id(), %a, %b, "switch ports swapped");
        Ok(())
    }

    /// Undoes every [`Testbed::swap_switch_ports`]: each node's port is announced under its
    /// declared name `p<k>` again.
    pub fn reset_switch_ports(&self) {
        for port in self.switch_ports().lock().iter_mut() {
            port.announced = port.declared.clone();
        }
    }

    /// Pulls node `node`'s fabric cable: its switch port goes down, so the node's `fab0` loses
    /// carrier and hears nothing (no LLDP, no traffic). Returns once both ends are down.
    /// [`Testbed::set_fabric_link`] with `false`.
    pub fn cut_link(&self, node: &str) -> Result<(), TestbedError> {
        self.set_fabric_link(node, false)
    }

    /// Plugs node `node`'s fabric cable back in; returns once both ends are up.
    pub fn restore_link(&self, node: &str) -> Result<(), TestbedError> {
        self.set_fabric_link(node, true)
    }

    /// Plugs a host with no agent and no identity into the switch: a new namespace
    /// `<testbed id>-host-<name>` (removed with the testbed, by stale cleanup after a crash,
    /// and when the returned handle is dropped) whose `fab0` (the fabric MTU, address
    /// `ip`/24) is cabled to a new bridge port `h-<name>`. `name` is 1 to 12 lowercase
    /// letters and digits; `ip` must be a free host address of 198.18.0.0/24 (not a node's).
    /// The switch announces nothing on that port. Returns once the link is up.
    pub fn plug_extra_host(&self, name: &str, ip: Ipv4Addr) -> Result<ExtraHost, TestbedError> {
        validate_host(self, name, ip)?;
        let shared = self.shared();
        let ns_name = shared.id().namespace(&format!("host-{name}"));
        if crate::sys::netns_exists(&ns_name) {
            return Err(TestbedError::InvalidSpec(format!(
                "extra host {name}: already plugged into testbed {}",
                self.id()
            )));
        }
        let netns = new_namespace(shared, &ns_name)?;
        // From here on, dropping `host` removes the namespace again (and with it the veth).
        let host = ExtraHost {
            shared: Arc::clone(shared),
            name: name.to_string(),
            ip,
            netns,
            switch_port: format!("h-{name}"),
            switch: self.switch().clone(),
            removed: false,
        };
        let mtu = self.spec().fabric_mtu.to_string();
        let seq = NEXT_HOST_PORT.fetch_add(1, Ordering::Relaxed) % 1_000_000;
        let port_index = (HOST_PORT_INDEX_BASE + seq).to_string();
        let switch = self.switch();
        crate::testbed::add_veth(
            &host.netns,
            (FABRIC_IFACE, HOST_FABRIC_INDEX),
            (&host.switch_port, &port_index),
            switch,
            &mtu,
        )?;
        switch.ip(&[
            "link",
            "set",
            &host.switch_port,
            "master",
            SWITCH_BRIDGE,
            "up",
        ])?;
        let addr = format!("{ip}/{PREFIX_LEN}");
        host.netns
            .ip(&["addr", "add", &addr, "dev", FABRIC_IFACE])?;
        host.netns.set_link(FABRIC_IFACE, true)?;
        switch.wait_link_state(&[&host.switch_port], true, LINK_TIMEOUT)?;
        host.netns
            .wait_link_state(&[FABRIC_IFACE], true, LINK_TIMEOUT)?;
        tracing::debug!(testbed = %self.id(), host = name, %ip, "extra host plugged");
        Ok(host)
    }
}

fn validate_host(tb: &Testbed, name: &str, ip: Ipv4Addr) -> Result<(), TestbedError> {
    let invalid = |why: String| {
        Err(TestbedError::InvalidSpec(format!(
            "extra host {name:?}: {why}"
        )))
    };
    if name.is_empty()
        || name.len() > MAX_HOST_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return invalid(format!(
            "name must be 1..={MAX_HOST_NAME} lowercase letters and digits"
        ));
    }
    let [a, b, c, d] = ip.octets();
    if (a, b, c) != (198, 18, 0) || d == 0 || d == 255 {
        return invalid(format!("{ip} is not a host address of 198.18.0.0/24"));
    }
    if let Some(node) = tb.nodes().iter().find(|n| n.fabric_ip == ip) {
        return invalid(format!("{ip} belongs to {}", node.name));
    }
    Ok(())
}

/// A host plugged into the switch by [`Testbed::plug_extra_host`]. Dropping it (or
/// [`ExtraHost::remove`]) unplugs it: processes spawned in its namespace are stopped and the
/// namespace is deleted, which deletes its link and the bridge port.
#[derive(Debug)]
pub struct ExtraHost {
    shared: Arc<Shared>,
    name: String,
    ip: Ipv4Addr,
    netns: Netns,
    switch_port: String,
    switch: Netns,
    removed: bool,
}

impl ExtraHost {
    /// The name it was plugged in under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address on `fab0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its namespace: run code there with [`Netns::run`], send forged frames with
    /// [`send_raw_frames`](crate::send_raw_frames), spawn with
    /// [`Testbed::spawn`](crate::Testbed::spawn).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its fabric interface, `fab0`.
    pub fn iface(&self) -> &str {
        FABRIC_IFACE
    }

    /// Its port on the switch (interface name in the switch namespace), `h-<name>`.
    pub fn switch_port(&self) -> &str {
        &self.switch_port
    }

    /// Unplugs it, reporting failures (dropping it does the same and only logs them).
    /// Returns once its switch port is gone: the kernel dismantles a deleted namespace, and
    /// with it the veth pair, asynchronously.
    pub fn remove(mut self) -> Result<(), TestbedError> {
        self.unplug()
    }

    fn unplug(&mut self) -> Result<(), TestbedError> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        self.shared.remove_namespace(self.netns.name())?;
        let deadline = Instant::now() + LINK_TIMEOUT;
        // `ip` fails once the port (or the whole switch namespace, after teardown) is gone.
        while self.switch.link_state(&self.switch_port).is_ok() {
            if Instant::now() >= deadline {
                return Err(TestbedError::Timeout {
                    what: format!(
                        "switch port {} of extra host {} to disappear",
                        self.switch_port, self.name
                    ),
                    timeout: LINK_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for ExtraHost {
    fn drop(&mut self) {
        if let Err(e) = self.unplug() {
            tracing::error!(error = %e, host = %self.name, "extra host removal on drop");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::capture::{Capture, CaptureLimit};
    use crate::lldp::tests::lldp_heard;
    use crate::lldp::LldpAnnouncer;
    use crate::{send_raw_frames, TestbedSpec};

    fn require_root() -> bool {
        if crate::has_privileges() {
            return true;
        }
        eprintln!("skipped: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)");
        false
    }

    fn testbed(nodes: usize) -> Testbed {
        Testbed::create(TestbedSpec {
            nodes,
            ..TestbedSpec::default()
        })
        .unwrap()
    }

    const INTERVAL: Duration = Duration::from_millis(50);

    fn ports(heard: &[(String, String)]) -> Vec<&str> {
        let mut p: Vec<&str> = heard.iter().map(|(_, p)| p.as_str()).collect();
        p.dedup();
        p
    }

    /// Privileged: after a swap node1 hears p2 and node2 p1 (only), node3 is unaffected;
    /// swapping back and resetting restore the declared names.
    #[test]
    fn swapped_ports_are_announced_crosswise() {
        if !require_root() {
            return;
        }
        let tb = testbed(3);
        let lldp = LldpAnnouncer::start(&tb, INTERVAL).unwrap();
        let [n1, n2, n3] = [&tb.nodes()[0], &tb.nodes()[1], &tb.nodes()[2]];
        assert_eq!(ports(&lldp_heard(&lldp, &n1.netns, "fab0", 2)), ["p1"]);

        tb.swap_switch_ports("node1", "node2").unwrap();
        assert_eq!(tb.switch_port_of("node1").unwrap(), "p2");
        assert_eq!(tb.switch_port_of("node2").unwrap(), "p1");
        assert_eq!(tb.switch_port_of("node3").unwrap(), "p3");
        assert_eq!(
            n1.switch_port_name, "p1",
            "the declared name does not change"
        );
        for (node, want) in [(n1, "p2"), (n2, "p1"), (n3, "p3")] {
            let heard = lldp_heard(&lldp, &node.netns, "fab0", 2);
            assert_eq!(ports(&heard), [want], "{}", node.name);
            assert!(heard.iter().all(|(c, _)| c == "leaf1"));
        }

        tb.swap_switch_ports("node2", "node1").unwrap();
        assert_eq!(ports(&lldp_heard(&lldp, &n1.netns, "fab0", 2)), ["p1"]);
        tb.swap_switch_ports("node1", "node3").unwrap();
        tb.swap_switch_ports("node1", "node2").unwrap();
        assert_eq!(tb.switch_port_of("node1").unwrap(), "p2");
        tb.reset_switch_ports();
        for node in tb.nodes() {
            assert_eq!(
                tb.switch_port_of(&node.name).unwrap(),
                node.switch_port_name
            );
        }
        assert!(tb.swap_switch_ports("node1", "node9").is_err());
        assert!(tb.switch_port_of("node9").is_err());
        let stats = lldp.stop();
        assert_eq!(stats.send_errors, 0, "{stats:?}");
        tb.teardown().unwrap();
    }

    /// Privileged: a cut link silences LLDP on the node (the switch's sends on the down port
    /// fail), restoring it brings LLDP back; the other node hears throughout.
    #[test]
    fn cut_link_silences_lldp_until_restored() {
        if !require_root() {
            return;
        }
        let tb = testbed(2);
        let lldp = LldpAnnouncer::start(&tb, INTERVAL).unwrap();
        let [n1, n2] = [&tb.nodes()[0], &tb.nodes()[1]];
        assert_eq!(ports(&lldp_heard(&lldp, &n1.netns, "fab0", 2)), ["p1"]);

        tb.cut_link("node1").unwrap();
        let errors_before = lldp.stats().send_errors;
        assert!(lldp_heard(&lldp, &n1.netns, "fab0", 3).is_empty());
        assert_eq!(ports(&lldp_heard(&lldp, &n2.netns, "fab0", 2)), ["p2"]);
        let stats = lldp.stats();
        assert!(stats.send_errors >= errors_before + 2, "{stats:?}");
        assert!(
            stats
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("p1")),
            "{stats:?}"
        );

        tb.restore_link("node1").unwrap();
        assert_eq!(ports(&lldp_heard(&lldp, &n1.netns, "fab0", 2)), ["p1"]);
        assert!(tb.cut_link("node9").is_err());
        drop(lldp);
        tb.teardown().unwrap();
    }

    /// Privileged: an extra host's raw frames reach node1 through the switch; it hears no
    /// LLDP; it is removed on drop, and on teardown when still plugged.
    #[test]
    fn extra_host_is_on_the_fabric_and_removed() {
        if !require_root() {
            return;
        }
        let tb = testbed(2);
        let lldp = LldpAnnouncer::start(&tb, INTERVAL).unwrap();
        let host = tb
            .plug_extra_host("intruder", Ipv4Addr::new(198, 18, 0, 200))
            .unwrap();
        assert_eq!(host.ip(), Ipv4Addr::new(198, 18, 0, 200));
        assert_eq!(host.iface(), "fab0");
        assert_eq!(host.switch_port(), "h-intruder");
        let ns_name = host.netns().name().to_string();
        assert!(ns_name.starts_with(tb.id()) && ns_name.ends_with("-host-intruder"));
        assert!(tb.namespaces().contains(&ns_name));

        // A broadcast frame of the local experimental EtherType, flooded by the bridge.
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xc8, 0x88, 0xb5]);
        frame.extend_from_slice(b"FORGED-PROBE-FROM-INTRUDER");
        frame.resize(60, 0);
        let n1 = &tb.nodes()[0];
        let cap = Capture::start(&n1.netns, "fab0", CaptureLimit::default()).unwrap();
        let host_cap = Capture::start(host.netns(), host.iface(), CaptureLimit::default()).unwrap();
        let sent = send_raw_frames(host.netns(), host.iface(), vec![frame.clone(); 3]).unwrap();
        assert_eq!(sent, 3);
        // The frames were sent before the rounds below ended; let them cross the bridge.
        lldp.wait_rounds(2, Duration::from_secs(10)).unwrap();
        let got = cap.stop();
        assert_eq!(
            got.frames.iter().filter(|f| **f == frame).count(),
            3,
            "{got:?}"
        );
        let host_got = host_cap.stop();
        assert!(
            host_got
                .frames
                .iter()
                .all(|f| crate::parse_lldp(f).is_none()),
            "the switch announces nothing on an extra host's port"
        );

        // Bad arguments.
        let bad = |name: &str, last: u8| tb.plug_extra_host(name, Ipv4Addr::new(198, 18, 0, last));
        assert!(bad("intruder", 201).is_err(), "name taken");
        assert!(bad("Bad", 201).is_err());
        assert!(bad("waytoolongname", 201).is_err());
        assert!(bad("other", 1).is_err(), "node1's address");
        assert!(bad("other", 255).is_err());
        assert!(tb
            .plug_extra_host("other", Ipv4Addr::new(198, 19, 0, 9))
            .is_err());
        assert!(send_raw_frames(host.netns(), "nosuch0", vec![frame.clone()]).is_err());

        drop(host);
        assert!(!crate::sys::netns_exists(&ns_name));
        assert!(!tb.namespaces().contains(&ns_name));
        assert!(tb.switch().link_state("h-intruder").is_err(), "port gone");

        // Still plugged at teardown: removed with the testbed; the handle's drop is a no-op.
        let host = tb
            .plug_extra_host("late", Ipv4Addr::new(198, 18, 0, 201))
            .unwrap();
        let late = host.netns().name().to_string();
        drop(lldp);
        tb.teardown().unwrap();
        assert!(!crate::sys::netns_exists(&late));
        host.remove().unwrap();
    }
}
