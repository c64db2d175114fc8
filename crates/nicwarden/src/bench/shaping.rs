//! `nicwarden bench shaping`: how exactly does the `tc` datapath hold a node to its leased
//! rate, and what does an unenforced path achieve on the same machine in the same run?
//!
//! Method: a 3-node testbed. For each rate, the egress lease is programmed into node1's
//! datapath (the agent's `tc` backend: HTB + u32 + nftables, or `--datapath ebpf`) with the controller's default burst
//! (10 ms at the rate, at least 16 KiB); node1 sends TCP to node2 for `--secs`; the sink's
//! goodput (payload bytes over its active period, first to last byte) and the rate the
//! kernel class counted (link-layer bytes over the same period) are compared with the lease. Then node3, whose
//! fabric carries no enforcement, sends the same way to node2: the unenforced reference.
//! Enforced and unenforced runs alternate, so both see the same machine state.

use anyhow::{bail, Context as _};
use nicwarden_datapath::Datapath;
use nicwarden_lease::Scope;
use nicwarden_testbed::traffic::Proto;
use std::time::Duration;

use super::{lease_state, median, print, Bench};
use crate::cli::BenchShapingArgs;
use crate::table::Table;
use crate::units::fmt_rate;

/// The sink stops after this long without data (a TCP sink normally stops at EOF).
const IDLE: Duration = Duration::from_secs(2);

fn egress_class_bytes(dp: &mut dyn Datapath) -> anyhow::Result<u64> {
    Ok(dp
        .counters()
        .context("read node1's counters")?
        .iter()
        .find(|c| c.scope == Scope::Egress)
        .map(|c| c.class.bytes)
        .unwrap_or(0))
}

pub fn run(args: BenchShapingArgs) -> anyhow::Result<()> {
    if args.rates.is_empty() {
        bail!("--rates: give at least one rate");
    }
    let bench = Bench::create(
        "shaping",
        &format!(
            "{} s per run, {} repetition(s) per rate",
            args.secs, args.reps
        ),
    )?;
    let (n1, n3) = (bench.sender(), bench.bystander());
    let variant = match args.datapath.as_str() {
        "ebpf" => super::variant::Variant::Ebpf,
        _ => super::variant::Variant::Tc,
    };
    let mut dp = variant
        .datapath(n1)
        .context("a datapath backend to measure")?;
    let secs = Duration::from_secs(args.secs);
    let mut rows = Vec::new();
    for &rate in &args.rates {
        dp.reconcile(&lease_state(1, rate, None))
            .with_context(|| format!("program a {} lease", fmt_rate(rate)))?;
        let (mut good, mut kern, mut open) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.reps {
            let before = egress_class_bytes(dp.as_mut())?;
            let e = bench.flow(n1, bench.spec(Proto::Tcp, secs), IDLE)?;
            let after = egress_class_bytes(dp.as_mut())?;
            good.push(e.goodput_bps());
            kern.push(
                after.saturating_sub(before) as f64 * 8.0 / e.got.active().as_secs_f64().max(1e-3),
            );
            let u = bench.flow(n3, bench.spec(Proto::Tcp, secs), IDLE)?;
            open.push(u.goodput_bps());
            eprintln!(
                "  {}: goodput {}, kernel {}, unenforced {}",
                fmt_rate(rate),
                fmt_rate(e.goodput_bps() as u64),
                fmt_rate(*kern.last().unwrap_or(&0.0) as u64),
                fmt_rate(u.goodput_bps() as u64)
            );
        }
        rows.push((rate, median(&good), median(&kern), median(&open)));
    }
    dp.remove().context("remove node1's datapath state")?;
    let err = |m: f64, r: u64| (m - r as f64) / r as f64 * 100.0;
    let json = rows
        .iter()
        .map(|(r, g, k, o)| {
            serde_json::json!({
                "leased_bps": r, "goodput_bps": g, "goodput_error_pct": err(*g, *r),
                "kernel_bps": k, "kernel_error_pct": err(*k, *r), "unenforced_bps": o,
            })
        })
        .collect();
    let mut t = Table::new(&[
        "LEASED",
        "GOODPUT",
        "ERROR",
        "KERNEL (L2)",
        "ERROR",
        "UNENFORCED",
    ]);
    for (r, g, k, o) in &rows {
        t.row(vec![
            fmt_rate(*r),
            fmt_rate(*g as u64),
            format!("{:+.2}%", err(*g, *r)),
            fmt_rate(*k as u64),
            format!("{:+.2}%", err(*k, *r)),
            fmt_rate(*o as u64),
        ]);
    }
    print(args.json, serde_json::Value::Array(json), &t);
    bench.teardown()
}
