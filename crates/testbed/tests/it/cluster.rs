//! The shape of the cluster: addresses, MTUs, separation of fabric and management, isolation
//! between testbeds.

use crate::{addr, assert_connect_fails_within, require_root, send_tcp, start_sink, two_nodes};
use nicwarden_testbed::traffic::{self, Proto, Reachability, SendSpec, SinkSpec, Stop};
use nicwarden_testbed::{Testbed, TestbedSpec, CONTROLLER_IP};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

fn tcp_sink(ip: Ipv4Addr) -> SinkSpec {
    SinkSpec {
        duration: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(2),
        ..SinkSpec::new(Proto::Tcp, addr(ip, 0))
    }
}

#[test]
fn layout_addresses_mtu_and_quiet_ipv6() {
    require_root!();
    let tb = Testbed::create(TestbedSpec::default()).unwrap();
    assert_eq!(tb.nodes().len(), 3);
    assert_eq!(tb.controller_ip(), Ipv4Addr::new(198, 19, 0, 1));
    let n2 = tb.node("node2").unwrap();
    assert_eq!(n2.fabric_ip, Ipv4Addr::new(198, 18, 0, 2));
    assert_eq!(n2.mgmt_ip, Ipv4Addr::new(198, 19, 0, 3));
    assert_eq!(
        (
            n2.fabric_iface.as_str(),
            n2.mgmt_iface.as_str(),
            n2.switch_port.as_str()
        ),
        ("fab0", "mgmt0", "p2")
    );
    assert!(tb.node("node4").is_none());
    for ns in [tb.switch(), tb.mgmt()]
        .into_iter()
        .chain(tb.nodes().iter().map(|n| &n.netns))
    {
        assert!(ns.name().starts_with(tb.id()), "{}", ns.name());
    }
    let link = n2.netns.ip(&["-o", "link", "show", "dev", "fab0"]).unwrap();
    assert!(link.contains("mtu 9000"), "{link}");
    let port = tb
        .switch()
        .ip(&["-o", "link", "show", "dev", "p2"])
        .unwrap();
    assert!(
        port.contains("mtu 9000") && port.contains("master br0"),
        "{port}"
    );
    let mlink = n2
        .netns
        .ip(&["-o", "link", "show", "dev", "mgmt0"])
        .unwrap();
    assert!(mlink.contains("mtu 1500"), "{mlink}");
    // IPv6 is off on everything the testbed made, so no link-local addresses exist.
    for iface in ["fab0", "mgmt0"] {
        let v = n2
            .netns
            .read_net_sysctl(&format!("ipv6/conf/{iface}/disable_ipv6"))
            .unwrap();
        assert_eq!(v, "1", "{iface}");
    }
    assert_eq!(
        tb.switch()
            .read_net_sysctl("ipv6/conf/br0/disable_ipv6")
            .unwrap(),
        "1"
    );
    let v6 = n2
        .netns
        .ip(&["-6", "-o", "addr", "show", "dev", "fab0"])
        .unwrap();
    assert!(v6.trim().is_empty(), "{v6}");
    // Nothing of ours in the root namespace.
    let root_links = nicwarden_testbed_root_links();
    assert!(
        !root_links.iter().any(|l| l.contains(tb.id())),
        "{root_links:?}"
    );
    // A thread in node1 can bind node1's fabric address; the root namespace cannot.
    let fabric = addr(tb.nodes()[0].fabric_ip, 0);
    assert!(tb.nodes()[0]
        .netns
        .run(|| std::net::TcpListener::bind(fabric).is_ok())
        .unwrap());
    assert!(std::net::TcpListener::bind(fabric).is_err());
    tb.teardown().unwrap();
}

fn nicwarden_testbed_root_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn nodes_talk_over_the_fabric_and_reach_the_controller_over_mgmt() {
    require_root!();
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);

    // node1 -> node2 through br0.
    let (dst, _, sink) = start_sink(&n2.netns, tcp_sink(n2.fabric_ip));
    let sent = send_tcp(&n1.netns, dst, 5_000_000);
    let got = sink.join().unwrap().unwrap();
    assert_eq!(sent.stop, Stop::Completed);
    assert_eq!(sent.bytes, 5_000_000);
    assert_eq!(got.bytes, sent.bytes);
    assert_eq!(got.stop, Stop::Completed);
    assert_eq!(got.peer.map(|p| p.ip()), Some(IpAddr::V4(n1.fabric_ip)));

    // node2 -> the controller address in the mgmt namespace, over mgmt0.
    let (dst, _, sink) = start_sink(tb.mgmt(), tcp_sink(CONTROLLER_IP));
    let sent = send_tcp(&n2.netns, dst, 1_000_000);
    let got = sink.join().unwrap().unwrap();
    assert_eq!(got.bytes, 1_000_000);
    assert_eq!(sent.bytes, 1_000_000);
    assert_eq!(got.peer.map(|p| p.ip()), Some(IpAddr::V4(n2.mgmt_ip)));
    tb.teardown().unwrap();
}

#[test]
fn fabric_and_management_are_separate_links() {
    require_root!();
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    n1.netns.set_link("fab0", false).unwrap();

    // The fabric transfer fails fast and cleanly (no route), well within its bound.
    let fabric_dst = addr(n2.fabric_ip, 5001);
    assert_connect_fails_within(
        &n1.netns,
        &SendSpec {
            duration: Duration::from_secs(2),
            max_bytes: Some(1_000_000),
            ..SendSpec::new(Proto::Tcp, fabric_dst)
        },
        Duration::from_millis(500),
    );

    // The management network still carries a transfer to the controller's side.
    let (dst, _, sink) = start_sink(tb.mgmt(), tcp_sink(CONTROLLER_IP));
    let sent = send_tcp(&n1.netns, dst, 500_000);
    assert_eq!(sink.join().unwrap().unwrap().bytes, 500_000);
    assert_eq!(sent.bytes, 500_000);

    // And the fabric comes back.
    n1.netns.set_link("fab0", true).unwrap();
    n1.netns
        .wait_link_state(&["fab0"], true, Duration::from_secs(5))
        .unwrap();
    let (dst, _, sink) = start_sink(&n2.netns, tcp_sink(n2.fabric_ip));
    send_tcp(&n1.netns, dst, 100_000);
    assert_eq!(sink.join().unwrap().unwrap().bytes, 100_000);
}

#[test]
fn cutting_the_mgmt_link_makes_the_controller_unreachable_until_restored() {
    require_root!();
    let tb = two_nodes();
    // A listener standing in for the controller.
    let listener = tb
        .mgmt()
        .run(|| std::net::TcpListener::bind(addr(CONTROLLER_IP, 0)))
        .unwrap()
        .unwrap();
    let controller = listener.local_addr().unwrap();
    let probe = |node: &str, timeout_ms: u64| {
        tb.node(node)
            .unwrap()
            .netns
            .run(|| traffic::probe_tcp(controller, Duration::from_millis(timeout_ms)))
            .unwrap()
    };
    assert!(matches!(probe("node1", 2000), Reachability::Open { .. }));

    tb.set_mgmt_link("node1", false).unwrap();
    let cut = probe("node1", 300);
    assert!(!cut.is_reachable(), "{cut:?}");
    // node2 is unaffected.
    assert!(matches!(probe("node2", 2000), Reachability::Open { .. }));

    tb.set_mgmt_link("node1", true).unwrap();
    let restored = probe("node1", 2000);
    assert!(
        matches!(restored, Reachability::Open { .. }),
        "{restored:?}"
    );

    assert!(matches!(
        tb.set_mgmt_link("node9", false),
        Err(nicwarden_testbed::TestbedError::UnknownNode { .. })
    ));
}

#[test]
fn parallel_testbeds_have_distinct_names_and_do_not_interfere() {
    require_root!();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(two_nodes);
        let b = s.spawn(two_nodes);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.id(), b.id());
    let (na, nb) = (a.namespaces(), b.namespaces());
    assert_eq!(na.len(), 4);
    assert!(na.iter().all(|n| !nb.contains(n)));

    // The same address and port in both, each sink only sees its own testbed's sender.
    let a2 = &a.nodes()[1];
    let b2 = &b.nodes()[1];
    let (dst_a, _, sink_a) = start_sink(&a2.netns, tcp_sink(a2.fabric_ip));
    let spec_b = SinkSpec {
        duration: Duration::from_secs(2),
        ..SinkSpec::new(Proto::Tcp, dst_a)
    };
    let (dst_b, progress_b, sink_b) = start_sink(&b2.netns, spec_b);
    assert_eq!(dst_a, dst_b);
    send_tcp(&a.nodes()[0].netns, dst_a, 2_000_000);
    assert_eq!(sink_a.join().unwrap().unwrap().bytes, 2_000_000);
    assert_eq!(progress_b.load(std::sync::atomic::Ordering::Relaxed), 0);
    // Tearing one down leaves the other working.
    a.teardown().unwrap();
    let report_b = sink_b.join().unwrap().unwrap();
    assert_eq!((report_b.bytes, report_b.stop), (0, Stop::Duration));
    let names = crate::netns_list();
    assert!(nb.iter().all(|n| names.contains(n)));
    assert!(na.iter().all(|n| !names.contains(n)));
}
