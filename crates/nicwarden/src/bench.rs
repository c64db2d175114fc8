//! `nicwarden bench`: how exactly does the `tc` datapath hold a node to its leased rate, and
//! what does an unenforced path achieve on the same machine in the same run?
//!
//! Method: a 3-node testbed. For each rate, the egress lease is programmed into node1's
//! datapath (the agent's `tc` backend: HTB + nftables) with the controller's default burst
//! (10 ms at the rate, at least 16 KiB); node1 sends TCP to node2 for `--secs`; the sink's
//! goodput (payload bytes over its active period, first to last byte) and the rate the
//! kernel class counted (link-layer bytes over the same period) are compared with the lease. Then node3, whose
//! fabric carries no enforcement, sends the same way to node2: the unenforced reference.
//! Enforced and unenforced runs alternate, so both see the same machine state.

use anyhow::{bail, Context as _};
use nicwarden_datapath::{Datapath, DesiredState, LinuxDatapath, ScopeEnforce, ScopeSpec};
use nicwarden_lease::{LeaseId, Scope};
use nicwarden_testbed::traffic::{self, Proto, SendSpec, SinkSpec};
use nicwarden_testbed::{Node, Testbed, TestbedSpec};
use std::net::SocketAddr;
use std::time::Duration;

use crate::cli::BenchArgs;
use crate::table::Table;
use crate::units::fmt_rate;

/// One TCP run: goodput at the sink and the sink's active period (first to last byte: the
/// sender's socket buffer drains after the sender stops, so its own elapsed time is short).
struct Run {
    goodput_bps: f64,
    active: Duration,
}

fn tcp(from: &Node, to: &Node, port: u16, secs: u64) -> anyhow::Result<Run> {
    let listen = SocketAddr::from((to.fabric_ip, port));
    let mut sink_spec = SinkSpec::new(Proto::Tcp, listen);
    sink_spec.duration = Duration::from_secs(secs + 10);
    sink_spec.idle_timeout = Duration::from_secs(2);
    let sink = to
        .netns
        .run(move || traffic::Sink::bind(sink_spec))
        .context("enter the receiver's namespace")?
        .context("bind the sink")?;
    let sink_thread = to
        .netns
        .spawn_thread(move || sink.run())
        .context("start the sink thread")?;
    let mut spec = SendSpec::new(Proto::Tcp, listen);
    spec.duration = Duration::from_secs(secs);
    from.netns
        .run(move || traffic::send(&spec))
        .context("enter the sender's namespace")?
        .context("send")?;
    let got = sink_thread
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))?
        .context("enter the receiver's namespace")?
        .context("sink")?;
    Ok(Run {
        goodput_bps: got.rate_bps(),
        active: got.active(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

fn desired(rate_bps: u64) -> DesiredState {
    DesiredState {
        scopes: vec![ScopeSpec {
            scope: Scope::Egress,
            destinations: vec![],
            enforce: ScopeEnforce::Lease {
                lease: LeaseId(1),
                rate_bps,
                // The controller's default burst: 10 ms at the rate, at least 16 KiB.
                burst_bytes: (rate_bps / 8 / 100).max(16 * 1024),
                volume: None,
                start_used_bytes: 0,
            },
        }],
    }
}

fn egress_class_bytes(dp: &mut LinuxDatapath) -> anyhow::Result<u64> {
    Ok(dp
        .counters()
        .context("read node1's counters")?
        .iter()
        .find(|c| c.scope == Scope::Egress)
        .map(|c| c.class.bytes)
        .unwrap_or(0))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::demo::require_root("bench")?;
    if args.rates.is_empty() {
        bail!("--rates: give at least one rate");
    }
    let tb = Testbed::create(TestbedSpec {
        nodes: 3,
        ..TestbedSpec::default()
    })
    .context("create the testbed")?;
    let nodes = tb.nodes();
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut dp = LinuxDatapath::in_netns(n1.netns.name(), &n1.fabric_iface);
    eprintln!(
        "bench: testbed {} (fabric MTU {}), {} s per run, {} repetition(s) per rate",
        tb.id(),
        tb.spec().fabric_mtu,
        args.secs,
        args.reps
    );
    let mut rows = Vec::new();
    let mut port = 5300u16;
    for &rate in &args.rates {
        dp.reconcile(&desired(rate))
            .with_context(|| format!("program a {} lease", fmt_rate(rate)))?;
        let (mut good, mut kern, mut open) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.reps {
            port += 1;
            let before = egress_class_bytes(&mut dp)?;
            let e = tcp(n1, n2, port, args.secs)?;
            let after = egress_class_bytes(&mut dp)?;
            good.push(e.goodput_bps);
            kern.push(after.saturating_sub(before) as f64 * 8.0 / e.active.as_secs_f64().max(1e-3));
            port += 1;
            let u = tcp(n3, n2, port, args.secs)?;
            open.push(u.goodput_bps);
            eprintln!(
                "  {}: goodput {}, kernel {}, unenforced {}",
                fmt_rate(rate),
                fmt_rate(e.goodput_bps as u64),
                fmt_rate(*kern.last().unwrap_or(&0.0) as u64),
                fmt_rate(u.goodput_bps as u64)
            );
        }
        rows.push((rate, median(good), median(kern), median(open)));
    }
    dp.remove().context("remove node1's datapath state")?;
    let err = |m: f64, r: u64| (m - r as f64) / r as f64 * 100.0;
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, g, k, o)| {
                serde_json::json!({
                    "leased_bps": r, "goodput_bps": g, "goodput_error_pct": err(*g, *r),
                    "kernel_bps": k, "kernel_error_pct": err(*k, *r), "unenforced_bps": o,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
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
        print!("{}", t.render());
    }
    tb.teardown().context("tear the testbed down")?;
    Ok(())
}
