//! The traffic generator and sink over the testbed's fabric: exact byte bounds, pacing, and
//! bounded time when nothing gets through.

use crate::{
    addr, assert_connect_fails_within, eventually, require_root, send_from, start_sink, two_nodes,
};
use nicwarden_testbed::traffic::{self, Proto, Report, SendSpec, SinkSpec, Stop};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// On a fresh two-node testbed, runs a sender on node1 towards a UDP sink on node2's fabric
/// address (`spec` builds the sender's spec from the sink's address); returns the sender's and
/// the sink's reports.
fn udp_node1_to_node2(spec: impl FnOnce(SocketAddr) -> SendSpec) -> (Report, Report) {
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    let (dst, _, sink) = start_sink(&n2.netns, SinkSpec::new(Proto::Udp, addr(n2.fabric_ip, 0)));
    let sent = send_from(&n1.netns, &spec(dst));
    (sent, sink.join().unwrap().unwrap())
}

#[test]
fn udp_max_bytes_is_exact_end_to_end() {
    require_root!();
    // Jumbo datagrams (8000 + 28 header bytes fit MTU 9000), unpaced.
    let (sent, got) = udp_node1_to_node2(|dst| SendSpec {
        max_bytes: Some(2_000_037),
        payload: 8000,
        ..SendSpec::new(Proto::Udp, dst)
    });
    // 250 full datagrams and a 37-byte last one: exactly max_bytes, never more.
    assert_eq!(sent.bytes, 2_000_037);
    assert_eq!(sent.packets, 251);
    assert_eq!(sent.stop, Stop::Completed);
    assert_eq!((got.bytes, got.packets), (sent.bytes, sent.packets));
    assert_eq!(got.lost, Some(0));
    assert_eq!(got.stop, Stop::Completed);
    assert_eq!(got.foreign, 0);
}

#[test]
fn udp_pacing_holds_the_rate() {
    require_root!();
    let rate = 20_000_000;
    let (sent, got) = udp_node1_to_node2(|dst| SendSpec {
        duration: Duration::from_secs(1),
        rate_bps: Some(rate),
        payload: 1200,
        ..SendSpec::new(Proto::Udp, dst)
    });
    let within = |x: f64, want: f64, tol: f64| (x - want).abs() <= want * tol;
    assert_eq!(sent.stop, Stop::Duration);
    assert!(sent.elapsed < Duration::from_millis(1100), "{sent}");
    // 20 Mbit/s for 1 s = 2.5 MB of payload.
    assert!(within(sent.bytes as f64, 2_500_000.0, 0.05), "{sent}");
    assert!(within(sent.rate_bps(), rate as f64, 0.05), "{sent}");
    assert!(within(got.rate_bps(), rate as f64, 0.05), "{got}");
    assert_eq!(got.bytes, sent.bytes, "{got}");
}

#[test]
fn senders_return_in_bounded_time_when_nothing_gets_through() {
    require_root!();
    let tb = two_nodes();
    let n1 = &tb.nodes()[0];
    let bound = Duration::from_millis(300);

    // TCP to an address in the fabric subnet that nobody has: ARP never resolves, the
    // connect times out at the sender's duration.
    let nobody = addr(Ipv4Addr::new(198, 18, 0, 200), 5001);
    assert_connect_fails_within(
        &n1.netns,
        &SendSpec {
            duration: Duration::from_secs(1),
            ..SendSpec::new(Proto::Tcp, nobody)
        },
        Duration::from_secs(1) + bound,
    );

    // UDP to the same: the datagrams go nowhere, the sender stops at its duration.
    let t = Instant::now();
    let r = send_from(
        &n1.netns,
        &SendSpec {
            duration: Duration::from_millis(500),
            rate_bps: Some(10_000_000),
            ..SendSpec::new(Proto::Udp, nobody)
        },
    );
    assert_eq!(r.stop, Stop::Duration);
    assert!(t.elapsed() < Duration::from_millis(500) + bound, "{r}");
}

#[test]
fn tcp_sender_returns_when_the_fabric_is_cut_mid_transfer() {
    require_root!();
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    let (dst, progress, sink) = start_sink(
        &n2.netns,
        SinkSpec {
            duration: Duration::from_secs(10),
            idle_timeout: Duration::from_millis(300),
            ..SinkSpec::new(Proto::Tcp, addr(n2.fabric_ip, 0))
        },
    );
    let duration = Duration::from_secs(2);
    let sender = n1
        .netns
        .spawn_thread(move || {
            traffic::send(&SendSpec {
                duration,
                rate_bps: Some(200_000_000),
                ..SendSpec::new(Proto::Tcp, dst)
            })
        })
        .unwrap();
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(2), || progress
        .load(Ordering::Relaxed)
        > 1_000_000));
    tb.set_fabric_link("node2", false).unwrap();
    let sent = sender.join().unwrap().unwrap().unwrap();
    assert!(
        started.elapsed() < duration + Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sent.stop, Stop::Duration);
    let got = sink.join().unwrap().unwrap();
    assert_eq!(got.stop, Stop::Idle);
    assert!(
        got.bytes > 1_000_000 && got.bytes <= sent.bytes,
        "{got} / {sent}"
    );
}
