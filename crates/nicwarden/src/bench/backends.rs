//! `nicwarden bench backends`: the enforcement variants side by side in one run.
//!
//! Method: a 3-node testbed; node1 sends to node2. Each repetition installs every variant of
//! [`VARIANTS`] on node1's fabric in turn (the order rotates by one per repetition, so no
//! variant always runs first), with an egress lease of 100 Gbit/s that never binds, and
//! measures: a TCP flow for `--secs` (goodput at the sink over its active period, and the
//! machine's busy CPU seconds during the flow divided by the Gbit delivered), then an
//! unpaced UDP flow of 64-byte payloads for `--secs` (datagrams per second delivered at the
//! sink). Then it removes the variant. Reported: medians over the repetitions, and per
//! variant the median of its per-repetition ratios to `unenforced` (measured within the same
//! repetition, so both saw the same machine state).

use nicwarden_testbed::traffic::Proto;
use std::collections::BTreeMap;
use std::time::Duration;

use super::variant::{rotated, Lease, Variant, NON_BINDING_BPS, VARIANTS};
use super::{fmt_ratio, median, print, ratio, Bench, Flow};
use crate::cli::BenchBackendsArgs;
use crate::table::Table;
use crate::units::fmt_rate;

/// UDP payload of the packet-rate test.
const SMALL_PAYLOAD: usize = 64;
/// A sink stops after this long without data (normally at EOF or the end of stream).
const IDLE: Duration = Duration::from_secs(1);

/// One variant's figures in one repetition.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    tcp_bps: f64,
    cpu_per_gbit: f64,
    udp_pps: f64,
}

impl Sample {
    fn of(tcp: &Flow, udp: &Flow) -> Sample {
        Sample {
            tcp_bps: tcp.goodput_bps(),
            cpu_per_gbit: tcp.cpu_per_gbit(),
            udp_pps: udp.delivered_pps(),
        }
    }

    fn ratio_to(&self, r: &Sample) -> Sample {
        Sample {
            tcp_bps: ratio(self.tcp_bps, r.tcp_bps),
            cpu_per_gbit: ratio(self.cpu_per_gbit, r.cpu_per_gbit),
            udp_pps: ratio(self.udp_pps, r.udp_pps),
        }
    }

    fn median(samples: &[Sample]) -> Sample {
        let m = |f: fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
        Sample {
            tcp_bps: m(|s| s.tcp_bps),
            cpu_per_gbit: m(|s| s.cpu_per_gbit),
            udp_pps: m(|s| s.udp_pps),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tcp_goodput_bps": self.tcp_bps,
            "cpu_seconds_per_gbit": self.cpu_per_gbit,
            "udp64_delivered_pps": self.udp_pps,
        })
    }
}

/// Packets per second: `1.234 Mpps`, `812.5 kpps`.
pub fn fmt_pps(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.3} Mpps", pps / 1e6)
    } else {
        format!("{:.1} kpps", pps / 1e3)
    }
}

pub fn run(args: BenchBackendsArgs) -> anyhow::Result<()> {
    let bench = Bench::create(
        "backends",
        &format!(
            "{} repetition(s) of {} variants, {} s of TCP and {} s of UDP each",
            args.reps,
            VARIANTS.len(),
            args.secs,
            args.secs
        ),
    )?;
    let n1 = bench.sender();
    let secs = Duration::from_secs(args.secs);
    bench.warm_up()?;
    let lease = Lease {
        id: 1,
        rate_bps: NON_BINDING_BPS,
        volume: None,
    };
    // Per variant name: one sample per repetition, and its ratios to `unenforced`.
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut ratios: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for rep in 0..args.reps {
        let mut this_rep = Vec::new();
        for v in rotated(rep) {
            let (s, udp_sent_pps) = v.install(n1, lease)?.during(|_| {
                let tcp = bench.flow(n1, bench.spec(Proto::Tcp, secs), IDLE)?;
                let mut spec = bench.spec(Proto::Udp, secs);
                spec.payload = SMALL_PAYLOAD;
                let udp = bench.flow(n1, spec, IDLE)?;
                let sent_pps = udp.sent.packets as f64 / udp.sent.elapsed.as_secs_f64().max(1e-3);
                Ok((Sample::of(&tcp, &udp), sent_pps))
            })?;
            eprintln!(
                "  rep {}: {:<10} TCP {}, {:.3} CPU s/Gbit, UDP 64 B {} delivered of {} sent",
                rep + 1,
                v.name(),
                fmt_rate(s.tcp_bps as u64),
                s.cpu_per_gbit,
                fmt_pps(s.udp_pps),
                fmt_pps(udp_sent_pps)
            );
            this_rep.push((v, s));
        }
        let reference = this_rep
            .iter()
            .find(|(v, _)| *v == Variant::Unenforced)
            .map(|(_, s)| *s);
        for (v, s) in this_rep {
            if let Some(r) = reference {
                ratios.entry(v.name()).or_default().push(s.ratio_to(&r));
            }
            samples.entry(v.name()).or_default().push(s);
        }
    }
    let mut t = Table::new(&[
        "VARIANT",
        "TCP",
        "RATIO",
        "CPU S PER GBIT",
        "RATIO",
        "UDP 64 B",
        "RATIO",
    ]);
    let mut json = Vec::new();
    for v in VARIANTS {
        let Some(s) = samples.get(v.name()) else {
            continue;
        };
        let m = Sample::median(s);
        let r = Sample::median(ratios.get(v.name()).map_or(&[][..], Vec::as_slice));
        t.row(vec![
            v.name().to_string(),
            fmt_rate(m.tcp_bps as u64),
            fmt_ratio(r.tcp_bps),
            format!("{:.3}", m.cpu_per_gbit),
            fmt_ratio(r.cpu_per_gbit),
            fmt_pps(m.udp_pps),
            fmt_ratio(r.udp_pps),
        ]);
        json.push(serde_json::json!({
            "variant": v.name(),
            "repetitions": s.len(),
            "median": m.json(),
            "median_ratio_to_unenforced": r.json(),
            "samples": s.iter().map(Sample::json).collect::<Vec<_>>(),
        }));
    }
    print(args.json, serde_json::Value::Array(json), &t);
    bench.teardown()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_rates() {
        assert_eq!(fmt_pps(1_234_567.0), "1.235 Mpps");
        assert_eq!(fmt_pps(812_500.0), "812.5 kpps");
    }

    #[test]
    fn medians_and_ratios_per_figure() {
        let s = |a, b, c| Sample {
            tcp_bps: a,
            cpu_per_gbit: b,
            udp_pps: c,
        };
        let m = Sample::median(&[s(1.0, 9.0, 5.0), s(3.0, 7.0, 4.0), s(2.0, 8.0, 6.0)]);
        assert_eq!(m, s(2.0, 8.0, 5.0));
        assert_eq!(
            s(1.0, 3.0, 2.0).ratio_to(&s(2.0, 2.0, 8.0)),
            s(0.5, 1.5, 0.25)
        );
    }
}
