//! `nicwarden bench volume`: how many bytes get past a volume limit, per datapath backend.
//!
//! Method: for each backend and repetition, node1 gets a fresh 1 Gbit/s egress lease with
//! `--volume` (a new lease id, so counting starts at zero), then sends UDP to node2 paced at
//! 200 Mbit/s (below the rate: shaping loses nothing, every datagram the volume admits
//! arrives) in 8000-byte datagrams, offering 1.5 times the volume. The volume counts IP
//! bytes, so the sink's payload bytes plus 28 per datagram (UDP and IP headers) are what
//! was delivered against it; the figure is that minus the volume. As in the enforcement test
//! `a_10_mb_volume_lets_10_mb_through_then_nothing`.

use anyhow::bail;
use std::time::Duration;

use super::variant::{backends, Lease};
use super::{max, median, min, print, Bench, DATAGRAM, LEASE_BPS, PACED_BPS};
use crate::cli::BenchVolumeArgs;
use crate::table::Table;
use crate::units::fmt_bytes;

/// UDP and IPv4 headers: what the volume counts on top of the payload.
const IP_UDP_HEADERS: u64 = 28;
/// Largest `--volume`: a run offers 1.5 times it at 200 Mbit/s (1 GB: one minute).
const MAX_VOLUME: u64 = 1_000_000_000;
/// A sink stops after this long without data, once the volume has closed the scope.
const IDLE: Duration = Duration::from_millis(500);

/// One repetition: what arrived against the volume.
#[derive(Clone, Copy, Debug)]
struct Sample {
    delivered_ip: u64,
    /// Sends the node refused (nftables' drop answers a local sender EPERM).
    refused: u64,
}

/// IP bytes delivered minus the volume (negative: stopped short of it).
fn excess(delivered_ip: u64, volume: u64) -> f64 {
    delivered_ip as f64 - volume as f64
}

/// Bytes with a sign: `+3.972 kB`, `-8.028 kB`, `0 B`.
fn fmt_signed_bytes(b: f64) -> String {
    let sign = if b > 0.0 {
        "+"
    } else if b < 0.0 {
        "-"
    } else {
        ""
    };
    format!("{sign}{}", fmt_bytes(b.abs() as u64))
}

pub fn run(args: BenchVolumeArgs) -> anyhow::Result<()> {
    let volume = args.volume;
    if !(1..=MAX_VOLUME).contains(&volume) {
        bail!("--volume: 1 B to 1GB (a run offers 1.5 times it at 200 Mbit/s)");
    }
    let bench = Bench::create(
        "volume",
        &format!(
            "{} repetition(s) of a {} volume",
            args.reps,
            fmt_bytes(volume)
        ),
    )?;
    let n1 = bench.sender();
    let offered = volume + volume / 2;
    // Long enough to offer it all at the paced rate, plus a second.
    let duration = Duration::from_secs_f64(offered as f64 * 8.0 / PACED_BPS as f64 + 1.0);
    let packet = DATAGRAM as u64 + IP_UDP_HEADERS;
    let mut t = Table::new(&[
        "BACKEND",
        "VOLUME",
        "REPS",
        "EXCESS MEDIAN",
        "MIN",
        "MAX",
        "IN DATAGRAMS (MEDIAN)",
    ]);
    let mut json = Vec::new();
    let mut lease_id = 0;
    for v in backends(n1) {
        let mut samples = Vec::new();
        for rep in 0..args.reps {
            lease_id += 1;
            let lease = Lease {
                id: lease_id,
                rate_bps: LEASE_BPS,
                volume: Some(volume),
            };
            let flow = v.install(n1, lease)?.during(|_| {
                let mut spec = bench.paced_udp(duration);
                spec.max_bytes = Some(offered);
                bench.flow(n1, spec, IDLE)
            })?;
            let s = Sample {
                delivered_ip: flow.got.bytes + flow.got.packets * IP_UDP_HEADERS,
                refused: flow.sent.send_errors,
            };
            eprintln!(
                "  rep {}: {:<4} delivered {} IP bytes of a {volume}-byte volume ({}), {} sends refused",
                rep + 1,
                v.name(),
                s.delivered_ip,
                fmt_signed_bytes(excess(s.delivered_ip, volume)),
                s.refused
            );
            samples.push(s);
        }
        let ex: Vec<f64> = samples
            .iter()
            .map(|s| excess(s.delivered_ip, volume))
            .collect();
        t.row(vec![
            v.name().to_string(),
            fmt_bytes(volume),
            samples.len().to_string(),
            fmt_signed_bytes(median(&ex)),
            fmt_signed_bytes(min(&ex)),
            fmt_signed_bytes(max(&ex)),
            format!("{:+.2}", median(&ex) / packet as f64),
        ]);
        json.push(serde_json::json!({
            "backend": v.name(),
            "volume_bytes": volume,
            "offered_payload_bytes": offered,
            "ip_packet_bytes": packet,
            "excess_bytes_median": median(&ex),
            "excess_bytes_min": min(&ex),
            "excess_bytes_max": max(&ex),
            "samples": samples.iter().map(|s| serde_json::json!({
                "delivered_ip_bytes": s.delivered_ip,
                "excess_bytes": excess(s.delivered_ip, volume),
                "refused_sends": s.refused,
            })).collect::<Vec<_>>(),
        }));
    }
    print(args.json, serde_json::Value::Array(json), &t);
    bench.teardown()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_bytes() {
        assert_eq!(fmt_signed_bytes(3972.0), "+3.972 kB");
        assert_eq!(fmt_signed_bytes(-8028.0), "-8.028 kB");
        assert_eq!(fmt_signed_bytes(0.0), "0 B");
        assert_eq!(excess(10_003_972, 10_000_000), 3972.0);
        assert_eq!(excess(9_991_972, 10_000_000), -8028.0);
    }
}
