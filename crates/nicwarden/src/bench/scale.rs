//! `nicwarden bench scale`: what linear rule chains cost as per-peer scopes grow.
//!
//! Method: for each scope count N, each variant installs N per-peer scopes on node1's fabric
//! whose last one matches node2 ([`Variant::install_scopes`]: N u32 filters for `tc`, N
//! `ip daddr` rules for `nftables`, nothing for `unenforced`), so every packet of a TCP flow
//! node1 -> node2 walks the whole chain; the flow runs for `--secs` and its goodput at the
//! sink is recorded; then the scopes are removed. Each repetition measures every (N, variant)
//! pair, rotating the variants' order; reported are medians, and the median of the
//! per-repetition ratios to `unenforced` at the same N.
//!
//! TCP over veth is segmented late (GSO): the chains are walked once per GSO packet (up to
//! 64 KiB), not per 9000-byte frame.

use anyhow::bail;
use nicwarden_testbed::traffic::Proto;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::variant::{rotated, Variant, VARIANTS};
use super::{fmt_ratio, median, print, ratio, Bench};
use crate::cli::BenchScaleArgs;
use crate::table::Table;
use crate::units::fmt_rate;

/// A sink stops after this long without data (normally at EOF).
const IDLE: Duration = Duration::from_secs(1);

/// One (N, variant) measurement.
#[derive(Clone, Copy, Debug)]
struct Sample {
    goodput_bps: f64,
    /// How long installing the N scopes took.
    install: Duration,
}

pub fn run(args: BenchScaleArgs) -> anyhow::Result<()> {
    if args.scopes.is_empty() {
        bail!("--scopes: give at least one scope count");
    }
    let bench = Bench::create(
        "scale",
        &format!(
            "{} repetition(s), scopes {:?}, {} s of TCP per measurement",
            args.reps, args.scopes, args.secs
        ),
    )?;
    let (n1, target) = (bench.sender(), bench.receiver().fabric_ip);
    let secs = Duration::from_secs(args.secs);
    bench.warm_up()?;
    let mut samples: BTreeMap<(u32, &str), Vec<Sample>> = BTreeMap::new();
    let mut ratios: BTreeMap<(u32, &str), Vec<f64>> = BTreeMap::new();
    for rep in 0..args.reps {
        for &n in &args.scopes {
            let mut this = Vec::new();
            for v in rotated(rep) {
                let started = Instant::now();
                let Some(installed) = v.install_scopes(n1, n, target)? else {
                    continue;
                };
                let install = started.elapsed();
                let flow =
                    installed.during(|_| bench.flow(n1, bench.spec(Proto::Tcp, secs), IDLE))?;
                let s = Sample {
                    goodput_bps: flow.goodput_bps(),
                    install,
                };
                eprintln!(
                    "  rep {}: {n:>5} scopes, {:<10} {} (installed in {} ms)",
                    rep + 1,
                    v.name(),
                    fmt_rate(s.goodput_bps as u64),
                    install.as_millis()
                );
                this.push((v, s));
            }
            let reference = this
                .iter()
                .find(|(v, _)| *v == Variant::Unenforced)
                .map(|(_, s)| s.goodput_bps);
            for (v, s) in this {
                if let Some(r) = reference {
                    ratios
                        .entry((n, v.name()))
                        .or_default()
                        .push(ratio(s.goodput_bps, r));
                }
                samples.entry((n, v.name())).or_default().push(s);
            }
        }
    }
    let mut headers = vec!["SCOPES".to_string()];
    for v in VARIANTS {
        headers.push(v.name().to_uppercase());
        if *v != Variant::Unenforced {
            headers.push("RATIO".to_string());
        }
    }
    let mut t = Table::new(&headers.iter().map(String::as_str).collect::<Vec<_>>());
    let mut json = Vec::new();
    for &n in &args.scopes {
        let mut row = vec![n.to_string()];
        let mut variants = Vec::new();
        for v in VARIANTS {
            let s = samples.get(&(n, v.name())).map_or(&[][..], Vec::as_slice);
            let r = ratios.get(&(n, v.name())).map_or(&[][..], Vec::as_slice);
            let goodput = median(&s.iter().map(|s| s.goodput_bps).collect::<Vec<_>>());
            let install = median(
                &s.iter()
                    .map(|s| s.install.as_secs_f64())
                    .collect::<Vec<_>>(),
            );
            row.push(if s.is_empty() {
                "-".to_string()
            } else {
                fmt_rate(goodput as u64)
            });
            if *v != Variant::Unenforced {
                row.push(fmt_ratio(if r.is_empty() { f64::NAN } else { median(r) }));
            }
            if !s.is_empty() {
                variants.push(serde_json::json!({
                    "variant": v.name(),
                    "goodput_bps": goodput,
                    "ratio_to_unenforced": if r.is_empty() { None } else { Some(median(r)) },
                    "install_seconds": install,
                    "samples_bps": s.iter().map(|s| s.goodput_bps).collect::<Vec<_>>(),
                }));
            }
        }
        t.row(row);
        json.push(serde_json::json!({ "scopes": n, "variants": variants }));
    }
    print(args.json, serde_json::Value::Array(json), &t);
    bench.teardown()
}
