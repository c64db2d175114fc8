//! `nicwarden bench latency`: time from a lease change applied by a datapath backend to the
//! first packets that obey it.
//!
//! Method: for each backend, repetition and case, node1 holds a fresh 1 Gbit/s egress lease
//! and sends UDP to node2 paced at 200 Mbit/s in 8000-byte datagrams (one every 320 us, the
//! resolution). A bench-local receiver on node2 records each datagram's arrival instant
//! (the testbed's sink only reports totals). After [`LEAD`], the backend's `reconcile` is
//! called with the changed lease; the sender goes on for [`TAIL`] more.
//! - Revocation (the scope at floor 0): the time from the start of the reconcile call to
//!   the arrival of the last datagram (0 if none arrived after the call started). Not
//!   reached if datagrams still arrived in the last [`QUIET`] of the sender's period.
//! - Rate change 1 Gbit/s -> 10 Mbit/s: the time from the start of the reconcile call to the
//!   start of the first [`WINDOW`] that carries no more than the new rate's bytes in a
//!   window plus one burst (the controller's default, 16 KiB at 10 Mbit/s), counted in frame
//!   bytes as HTB counts them. Candidate windows are `(s, s + WINDOW]` with `s` the call's
//!   start or an arrival after it, lying wholly inside the sender's period.
//!
//! Both cases alternate within a repetition. Arrival instants are taken in user space on the
//! receiver (CLOCK_MONOTONIC, the same clock as the call's start).

use anyhow::{bail, Context as _};
use nicwarden_datapath::{Datapath, DesiredState};
use nicwarden_testbed::traffic;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use super::variant::{backends, Lease};
use super::{
    blocked_state, default_burst, lease_state, max, median, print, receive, Arrival, Bench,
    DATAGRAM, LEASE_BPS,
};
use crate::cli::BenchLatencyArgs;
use crate::table::Table;

/// Flow time before the change.
const LEAD: Duration = Duration::from_millis(300);
/// Flow time after the change: the longest latency measurable is about this minus [`QUIET`].
const TAIL: Duration = Duration::from_millis(700);
/// The receiver stops this long after the sender's period (the sender ends by then).
const RECEIVER_MARGIN: Duration = Duration::from_millis(300);
/// Revocation: traffic counts as stopped if nothing arrived in this last part of the
/// sender's period.
const QUIET: Duration = Duration::from_millis(100);
/// Rate change: the window whose bytes are compared with the new rate.
const WINDOW: Duration = Duration::from_millis(20);
/// Rate change: the new rate.
const CUT_BPS: u64 = 10_000_000;
/// Frame bytes per datagram beyond its payload: UDP 8 + IPv4 20 + Ethernet 14 (what HTB
/// counts).
const FRAME_HEADERS: u64 = 42;

/// The two lease changes measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Revocation,
    RateCut,
}

impl Case {
    const ALL: [Case; 2] = [Case::Revocation, Case::RateCut];

    fn label(self) -> &'static str {
        match self {
            Case::Revocation => "revocation -> last datagram",
            Case::RateCut => "1 Gbit/s -> 10 Mbit/s",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Case::Revocation => "revocation",
            Case::RateCut => "rate_cut",
        }
    }

    /// The changed state for the lease `id` at [`LEASE_BPS`].
    fn after(self, id: u64) -> DesiredState {
        match self {
            Case::Revocation => blocked_state(),
            Case::RateCut => lease_state(id, CUT_BPS, None),
        }
    }

    /// The latency in one capture; `None`: the change did not show within the capture.
    fn latency(self, c: &Capture) -> Option<Duration> {
        let frames = frames(&c.arrivals, DATAGRAM);
        match self {
            Case::Revocation => last_arrival(&frames, c.t0, c.sender_end),
            Case::RateCut => {
                let limit =
                    (CUT_BPS as f64 * WINDOW.as_secs_f64() / 8.0) as u64 + default_burst(CUT_BPS);
                settled(&frames, c.t0, c.sender_end, WINDOW, limit)
            }
        }
    }
}

/// One run: the flow, the change, what arrived.
struct Capture {
    /// When the reconcile call started.
    t0: Instant,
    /// How long the reconcile call took.
    call: Duration,
    /// When the sender's period ended.
    sender_end: Instant,
    arrivals: Vec<Arrival>,
}

/// The datagrams of the flow (`payload` long: the sender's three end-of-stream datagrams
/// are shorter), as (arrival, frame bytes).
fn frames(arrivals: &[Arrival], payload: usize) -> Vec<(Instant, u64)> {
    arrivals
        .iter()
        .filter(|a| a.len == payload)
        .map(|a| (a.at, a.len as u64 + FRAME_HEADERS))
        .collect()
}

/// Time from `t0` to the last arrival (zero if it came before `t0`); `None` if arrivals went
/// on into the last [`QUIET`] before `end`, or nothing arrived.
fn last_arrival(frames: &[(Instant, u64)], t0: Instant, end: Instant) -> Option<Duration> {
    let (last, _) = frames.last()?;
    if *last + QUIET > end {
        return None;
    }
    Some(last.saturating_duration_since(t0))
}

/// Time from `t0` to the start `s` of the first window `(s, s + window]` carrying at most
/// `limit` bytes, for `s` = `t0` or an arrival after it, with `s + window <= end`.
fn settled(
    frames: &[(Instant, u64)],
    t0: Instant,
    end: Instant,
    window: Duration,
    limit: u64,
) -> Option<Duration> {
    let mut prefix = Vec::with_capacity(frames.len() + 1);
    prefix.push(0u64);
    for (_, b) in frames {
        prefix.push(prefix.last().copied().unwrap_or(0) + b);
    }
    let upto = |t: Instant| prefix[frames.partition_point(|(a, _)| *a <= t)];
    std::iter::once(t0)
        .chain(frames.iter().map(|(a, _)| *a).filter(|a| *a >= t0))
        .take_while(|s| *s + window <= end)
        .find(|s| upto(*s + window) - upto(*s) <= limit)
        .map(|s| s - t0)
}

/// Runs the paced flow, applies `change` through `dp` after [`LEAD`], and records arrivals.
fn capture(bench: &Bench, dp: &mut dyn Datapath, change: &DesiredState) -> anyhow::Result<Capture> {
    let spec = bench.paced_udp(LEAD + TAIL);
    let dst = spec.dst;
    let socket = bench
        .receiver()
        .netns
        .run(move || UdpSocket::bind(dst))
        .context("enter the receiver's namespace")?
        .with_context(|| format!("bind the receiver on {dst}"))?;
    let deadline = Instant::now() + LEAD + TAIL + RECEIVER_MARGIN;
    let receiver = bench
        .receiver()
        .netns
        .spawn_thread(move || receive(&socket, deadline))
        .context("start the receiver")?;
    let sender = bench
        .sender()
        .netns
        .spawn_thread(move || {
            let start = Instant::now();
            traffic::send(&spec).map(|r| start + r.elapsed)
        })
        .context("start the sender")?;
    std::thread::sleep(LEAD);
    let t0 = Instant::now();
    let applied = dp.reconcile(change);
    let call = t0.elapsed();
    // Both threads end by their deadlines; join them before looking at the reconcile.
    let sender_end = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
        .context("enter the sender's namespace")?
        .context("send")?;
    let arrivals = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
        .context("enter the receiver's namespace")?
        .context("receive")?;
    applied.context("apply the lease change")?;
    if !frames(&arrivals, DATAGRAM).iter().any(|(a, _)| *a < t0) {
        bail!("no datagram arrived before the change: the flow did not start");
    }
    Ok(Capture {
        t0,
        call,
        sender_end,
        arrivals,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(args: BenchLatencyArgs) -> anyhow::Result<()> {
    let bench = Bench::create(
        "latency",
        &format!(
            "{} repetition(s) of {} cases per backend",
            args.reps,
            Case::ALL.len()
        ),
    )?;
    let n1 = bench.sender();
    let mut t = Table::new(&[
        "BACKEND",
        "CHANGE",
        "REPS",
        "MEDIAN",
        "MAX",
        "NOT REACHED",
        "RECONCILE CALL (MEDIAN)",
    ]);
    let mut json = Vec::new();
    let mut lease_id = 0;
    for v in backends(n1) {
        let first = Lease {
            id: lease_id + 1,
            rate_bps: LEASE_BPS,
            volume: None,
        };
        // Per case: (latency, reconcile call) per repetition.
        let results = v.install(n1, first)?.during(|installed| {
            let dp = installed
                .datapath()
                .context("a backend variant has a datapath")?;
            let mut results: Vec<Vec<(Option<Duration>, Duration)>> =
                vec![Vec::new(); Case::ALL.len()];
            for rep in 0..args.reps {
                for (i, case) in Case::ALL.into_iter().enumerate() {
                    lease_id += 1;
                    dp.reconcile(&lease_state(lease_id, LEASE_BPS, None))
                        .context("program the 1 Gbit/s lease")?;
                    let c = capture(&bench, dp, &case.after(lease_id))?;
                    let latency = case.latency(&c);
                    eprintln!(
                        "  rep {}: {:<4} {:<28} {} (reconcile call {:.1} ms, {} arrivals)",
                        rep + 1,
                        v.name(),
                        case.label(),
                        latency.map_or("not reached".to_string(), |d| format!("{:.1} ms", ms(d))),
                        ms(c.call),
                        c.arrivals.len()
                    );
                    results[i].push((latency, c.call));
                }
            }
            Ok(results)
        })?;
        for (case, r) in Case::ALL.into_iter().zip(&results) {
            let reached: Vec<f64> = r.iter().filter_map(|(l, _)| l.map(ms)).collect();
            let calls: Vec<f64> = r.iter().map(|(_, c)| ms(*c)).collect();
            let fmt = |v: f64| format!("{v:.1} ms");
            t.row(vec![
                v.name().to_string(),
                case.label().to_string(),
                r.len().to_string(),
                if reached.is_empty() {
                    "-".into()
                } else {
                    fmt(median(&reached))
                },
                if reached.is_empty() {
                    "-".into()
                } else {
                    fmt(max(&reached))
                },
                (r.len() - reached.len()).to_string(),
                fmt(median(&calls)),
            ]);
            json.push(serde_json::json!({
                "backend": v.name(),
                "change": case.key(),
                "repetitions": r.len(),
                "latency_ms_median": (!reached.is_empty()).then(|| median(&reached)),
                "latency_ms_max": (!reached.is_empty()).then(|| max(&reached)),
                "not_reached": r.len() - reached.len(),
                "latency_ms": r.iter().map(|(l, _)| l.map(ms)).collect::<Vec<_>>(),
                "reconcile_call_ms": calls,
            }));
        }
    }
    print(args.json, serde_json::Value::Array(json), &t);
    bench.teardown()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames at these millisecond offsets from `base`, `bytes` each.
    fn at(base: Instant, offsets_ms: &[f64], bytes: u64) -> Vec<(Instant, u64)> {
        offsets_ms
            .iter()
            .map(|m| (base + Duration::from_secs_f64(m / 1000.0), bytes))
            .collect()
    }

    #[test]
    fn only_the_flows_datagrams_count() {
        let t = Instant::now();
        let a = [Arrival { at: t, len: 8000 }, Arrival { at: t, len: 28 }];
        assert_eq!(frames(&a, 8000), vec![(t, 8042)]);
    }

    #[test]
    fn revocation_is_the_last_arrival_after_the_call() {
        let base = Instant::now();
        let t0 = base + Duration::from_millis(300);
        let end = base + Duration::from_millis(1000);
        let f = at(base, &[100.0, 299.0, 301.5, 303.0], 8042);
        assert_eq!(last_arrival(&f, t0, end), Some(Duration::from_millis(3)));
        // Nothing after the call: zero.
        assert_eq!(
            last_arrival(&at(base, &[100.0, 299.0], 1), t0, end),
            Some(Duration::ZERO)
        );
        // Still arriving near the end of the sender's period: not stopped.
        assert_eq!(last_arrival(&at(base, &[100.0, 950.0], 1), t0, end), None);
        assert_eq!(last_arrival(&[], t0, end), None);
    }

    #[test]
    fn rate_change_settles_at_the_first_quiet_window() {
        let base = Instant::now();
        let t0 = base;
        let end = base + Duration::from_millis(100);
        let w = Duration::from_millis(20);
        // 10 frames, one per ms up to 9 ms, then one every 10 ms.
        let mut offs: Vec<f64> = (0..10).map(f64::from).collect();
        offs.extend([20.0, 30.0, 40.0, 50.0, 60.0, 70.0]);
        let f = at(base, &offs, 100);
        // At most 2 frames per window: (8, 28] holds the frames at 9 and 20 ms; every
        // window starting earlier holds more.
        assert_eq!(settled(&f, t0, end, w, 200), Some(Duration::from_millis(8)));
        // A limit the flow never exceeds: settled at the call itself.
        assert_eq!(settled(&f, t0, end, w, 10_000), Some(Duration::ZERO));
        // An empty window is needed: only (70, 90] is, and a period ending at 80 ms has no
        // room for it.
        assert_eq!(settled(&f, t0, end, w, 0), Some(Duration::from_millis(70)));
        assert_eq!(
            settled(&f, t0, base + Duration::from_millis(80), w, 0),
            None
        );
        // Windows must end inside the sender's period.
        assert_eq!(
            settled(&f, t0, base + Duration::from_millis(25), w, 200),
            None
        );
    }
}
