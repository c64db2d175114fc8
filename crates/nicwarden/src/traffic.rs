//! `nicwarden traffic send|sink`: the testbed's bounded traffic generator and sink as
//! commands, to run inside a node's namespace (`ip netns exec NODE nicwarden traffic ...`).

use anyhow::Context as _;
use nicwarden_testbed::traffic::{self, Proto, Report, SendSpec, SinkSpec};

use crate::cli::{TrafficCmd, TrafficSub};
use crate::units::{fmt_bytes, fmt_rate};

pub fn run(cmd: TrafficCmd) -> anyhow::Result<()> {
    match cmd.command {
        TrafficSub::Sink(a) => {
            let proto = if a.udp { Proto::Udp } else { Proto::Tcp };
            let sink = traffic::Sink::bind(SinkSpec {
                proto,
                listen: a.listen,
                duration: a.duration,
                idle_timeout: a.idle,
            })
            .with_context(|| format!("bind the {proto} sink on {}", a.listen))?;
            let local = sink.local_addr()?;
            eprintln!("sink: {proto} on {local}, at most {:?}", a.duration);
            let r = sink.run().context("sink")?;
            print_report("received", &r, a.json);
        }
        TrafficSub::Send(a) => {
            let proto = if a.udp { Proto::Udp } else { Proto::Tcp };
            let spec = SendSpec {
                proto,
                dst: a.dst,
                duration: a.duration,
                max_bytes: a.bytes,
                rate_bps: a.rate,
                payload: a.payload,
            };
            let r = traffic::send(&spec).with_context(|| format!("send {proto} to {}", a.dst))?;
            print_report("sent", &r, a.json);
        }
    }
    Ok(())
}

pub fn report_json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "proto": r.proto.to_string(),
        "bytes": r.bytes,
        "packets": r.packets,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "active_s": r.active().as_secs_f64(),
        "rate_bps": r.rate_bps(),
        "average_bps": r.average_bps(),
        "stop": r.stop.to_string(),
        "peer": r.peer.map(|p| p.to_string()),
        "send_errors": r.send_errors,
        "last_error": r.last_error,
        "lost": r.lost,
        "reordered": r.reordered,
    })
}

fn print_report(what: &str, r: &Report, json: bool) {
    if json {
        println!("{}", report_json(r));
        return;
    }
    println!(
        "{what} {} in {} {} over {:.2} s: {} while active ({}){}",
        fmt_bytes(r.bytes),
        r.packets,
        if r.proto == Proto::Udp {
            "datagrams"
        } else {
            "chunks"
        },
        r.elapsed.as_secs_f64(),
        fmt_rate(r.rate_bps() as u64),
        r.stop,
        r.lost.map(|l| format!(", {l} lost")).unwrap_or_default(),
    );
}
