//! The traffic generator and sink over the testbed's fabric: exact byte bounds, pacing, and
//! bounded time when nothing gets through.

use crate::{addr, eventually, require_root, send_from, start_sink, try_send_from, two_nodes};
use nicwarden_testbed::traffic::{self, Proto, SendSpec, SinkSpec, Stop};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn udp_max_bytes_is_exact_end_to_end() {
    require_root!();
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    let (dst, _, h) = start_sink(&n2.netns, SinkSpec::new(Proto::Udp, addr(n2.fabric_ip, 0)));
    // Jumbo datagrams (8000 + 28 header bytes fit MTU 9000), unpaced.
    let spec = SendSpec {
        max_bytes: Some(2_000_037),
        payload: 8000,
        ..SendSpec::new(Proto::Udp, dst)
    };
    let sent = send_from(&n1.netns, &spec);
    let got = h.join().unwrap().unwrap();
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
    let tb = two_nodes();
    let (n1, n2) = (&tb.nodes()[0], &tb.nodes()[1]);
    let (dst, _, h) = start_sink(&n2.netns, SinkSpec::new(Proto::Udp, addr(n2.fabric_ip, 0)));
    let rate = 20_000_000;
    let spec = SendSpec {
        duration: Duration::from_secs(1),
        rate_bps: Some(rate),
        payload: 1200,
        ..SendSpec::new(Proto::Udp, dst)
    };
    let sent = send_from(&n1.netns, &spec);
    let got = h.join().unwrap().unwrap();
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
    let t = Instant::now();
    let r = try_send_from(
        &n1.netns,
        &SendSpec {
            duration: Duration::from_secs(1),
            ..SendSpec::new(Proto::Tcp, nobody)
        },
    );
    assert!(
        matches!(r, Err(traffic::TrafficError::Connect { .. })),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1) + bound,
        "{:?}",
        t.elapsed()
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
