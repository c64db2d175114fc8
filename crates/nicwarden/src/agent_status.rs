//! `nicwarden agent status`: asks the local agent what it enforces, per scope.

use anyhow::Context as _;
use nicwarden_agent::status::AgentStatus;
use nicwarden_lease::agent::{Enforce, ScopeDecision};
use std::io::Write as _;
use std::time::Duration;

use crate::cli::AgentStatusArgs;
use crate::client::normalize_base;
use crate::table::Table;
use crate::units::{fmt_bytes, fmt_millis, fmt_rate};

/// `allow 200 Mbit/s`, `floor: blocked`, `floor: 10 Mbit/s`.
pub fn fmt_enforce(e: &Enforce) -> String {
    match e {
        Enforce::Allow { rate_bps, .. } => format!("allow {}", fmt_rate(*rate_bps)),
        Enforce::Floor { rate_bps: 0 } => "floor: blocked".to_string(),
        Enforce::Floor { rate_bps } => format!("floor: {}", fmt_rate(*rate_bps)),
    }
}

/// `1.5 MB / 8.5 MB` (used / left), `1.5 MB / unlimited`, or `-` when nothing applies.
pub fn fmt_volume(d: &ScopeDecision) -> String {
    let used = fmt_bytes(d.usage.bytes);
    let left = match (&d.enforce, d.volume_bytes) {
        (
            Enforce::Allow {
                volume_left: Some(l),
                ..
            },
            _,
        ) => fmt_bytes(*l),
        (
            Enforce::Allow {
                volume_left: None, ..
            },
            _,
        ) => "unlimited".to_string(),
        (Enforce::Floor { .. }, Some(total)) => fmt_bytes(total.saturating_sub(d.usage.bytes)),
        (Enforce::Floor { .. }, None) if d.lease.is_some() => "unlimited".to_string(),
        (Enforce::Floor { .. }, None) => return if d.usage.bytes == 0 { "-".into() } else { used },
    };
    format!("{used} / {left}")
}

/// The link-probe part of the status: counters and who the last round heard.
pub fn render_probe(p: &nicwarden_agent::probe::ProbeStatus) -> String {
    let mut out = format!(
        "\nlink probes on {} every {} ms: {} sent, {} heard, {} answered, {} answers heard, {} LLDP; dropped {} (rate limit), {} (undecodable), {} (round full){}\n",
        p.iface,
        p.interval_ms,
        p.probes_sent,
        p.probes_heard,
        p.answers_sent,
        p.answers_heard,
        p.lldp_heard,
        p.dropped_rate_limited,
        p.dropped_undecodable,
        p.dropped_round_full,
        p.last_error
            .as_ref()
            .map(|e| format!("; LAST ERROR: {e}"))
            .unwrap_or_default()
    );
    if let Some(r) = &p.last_round {
        for n in &r.neighbours {
            let rtt = n
                .rtt_us
                .map_or_else(|| "stale nonce".to_string(), |us| format!("rtt {us} us"));
            out.push_str(&format!(
                "  {}: node {} port {} ({rtt})\n",
                r.port, n.node, n.port
            ));
        }
        for s in &r.switches {
            out.push_str(&format!(
                "  {}: switch {} port {}\n",
                r.port, s.chassis, s.port
            ));
        }
    }
    out
}

/// The mesh part of the status: this node's key and its peers.
pub fn render_mesh(m: &nicwarden_agent::mesh::MeshStatus) -> String {
    let mut out = format!(
        "\nmesh: {} on {} ({}), listening on {}, key {}; update seq {}, {} updates refused, {} entries rejected, {} rotations{}\n",
        m.backend,
        m.iface,
        m.address,
        m.endpoint,
        m.public_key.as_deref().unwrap_or("DESTROYED"),
        m.last_seq,
        m.rejected_updates,
        m.rejected_entries,
        m.rotations,
        m.last_error
            .as_ref()
            .map(|e| format!("; LAST ERROR: {e}"))
            .unwrap_or_default()
    );
    if let Some(g) = &m.guard {
        out.push_str(&format!(
            "fabric guard on {}: only WireGuard (udp {}) crosses it; plaintext dropped: {} out, {} in{}{}\n",
            g.iface,
            g.port,
            g.counters.dropped_out_packets,
            g.counters.dropped_in_packets,
            if g.repairs > 0 {
                format!("; re-installed {} times", g.repairs)
            } else {
                String::new()
            },
            g.last_error
                .as_ref()
                .map(|e| format!("; LAST ERROR: {e}"))
                .unwrap_or_default()
        ));
    }
    if m.peers.is_empty() {
        out.push_str("  no peers (none authorized by the controller, or their entries expired)\n");
        return out;
    }
    let mut t = Table::new(&[
        "PEER",
        "GROUP",
        "KEY",
        "ENDPOINT",
        "ALLOWED IPS",
        "EXPIRES IN",
        "HANDSHAKE",
        "RX",
        "TX",
    ]);
    for p in &m.peers {
        t.row(vec![
            p.node.clone(),
            p.group.clone(),
            p.public_key.chars().take(10).collect::<String>() + "…",
            p.endpoint.clone(),
            p.allowed_ips.join(","),
            fmt_millis(p.expires_in_ms),
            p.last_handshake_ms_ago
                .map_or_else(|| "never".into(), |ms| format!("{} ago", fmt_millis(ms))),
            fmt_bytes(p.rx_bytes),
            fmt_bytes(p.tx_bytes),
        ]);
    }
    out.push_str(&t.render());
    out
}

pub fn render(st: &AgentStatus) -> String {
    let mut out = String::new();
    let conn = if st.connected {
        "connected".to_string()
    } else {
        match &st.last_error {
            Some(e) => format!("DISCONNECTED ({e})"),
            None => "DISCONNECTED".to_string(),
        }
    };
    out.push_str(&format!(
        "node {}  controller {}: {conn}\nlast seq {}, {} rejected directives\n\n",
        st.node, st.controller, st.last_seq, st.rejected_directives
    ));
    if let Some(t) = &st.tampered {
        out.push_str(&format!(
            "TAMPERED ({}, from {}): fabric blocked{}{}; controller {}. Re-enroll with a new join token.\n\n",
            t.reason,
            t.source,
            t.blocked_after_us
                .map(|us| format!(" {us} us after the event"))
                .unwrap_or_default(),
            t.keys_destroyed_after_us
                .map(|us| format!(", WireGuard keys destroyed after {us} us"))
                .unwrap_or_default(),
            if t.reported { "told" } else { "not told yet" }
        ));
    }
    if st.scopes.is_empty() {
        out.push_str("no scopes yet (no lease received; the default floor applies)\n");
        return out;
    }
    let mut t = Table::new(&[
        "SCOPE",
        "STATE",
        "ENFORCE",
        "LEASE",
        "SEQ",
        "DEADLINE IN",
        "VOLUME USED / LEFT",
        "REASON",
    ]);
    for d in &st.scopes {
        t.row(vec![
            d.scope.to_string(),
            d.state.to_string(),
            fmt_enforce(&d.enforce),
            d.lease.map_or_else(|| "-".into(), |l| l.to_string()),
            d.seq.map_or_else(|| "-".into(), |s| s.to_string()),
            d.deadline_in_ms.map_or_else(|| "-".into(), fmt_millis),
            fmt_volume(d),
            d.reason.clone(),
        ]);
    }
    out.push_str(&t.render());
    if let Some(m) = &st.mesh {
        out.push_str(&render_mesh(m));
    }
    if let Some(p) = &st.probe {
        out.push_str(&render_probe(p));
    }
    match &st.datapath {
        None => out.push_str("\ndatapath: none (decisions are not programmed into the kernel)\n"),
        Some(dp) => {
            out.push_str(&format!(
                "\ndatapath: {} on {}, {} reconciles changed the kernel{}\n",
                dp.backend,
                dp.fabric_iface,
                dp.changes_applied,
                dp.last_error
                    .as_ref()
                    .map(|e| format!("; LAST ERROR: {e}"))
                    .unwrap_or_default()
            ));
            for p in &dp.unresolved_peers {
                out.push_str(&format!(
                    "  peer {p}: no fabric address configured; its traffic counts as egress\n"
                ));
            }
            let mut k = Table::new(&[
                "SCOPE",
                "MEASURED",
                "SENT",
                "PACKETS",
                "DROPPED",
                "VOLUME DROPS",
                "RECEIVED",
                "RECEIVE DROPS",
            ]);
            for s in &dp.scopes {
                k.row(vec![
                    s.scope.clone(),
                    fmt_rate(s.rate_bps),
                    fmt_bytes(s.bytes),
                    s.packets.to_string(),
                    s.drops.to_string(),
                    s.volume_drops.to_string(),
                    fmt_bytes(s.ingress_bytes),
                    s.ingress_drops.to_string(),
                ]);
            }
            out.push_str(&k.render());
        }
    }
    out
}

async fn fetch(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(AgentStatus, serde_json::Value)> {
    let resp = http.get(url).send().await.map_err(|e| {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        if e.is_connect() {
            anyhow::anyhow!(
                "cannot reach the agent status endpoint {url} ({cause})\n  is `nicwarden agent` \
                 running on this host? (set --status-addr or NICWARDEN_AGENT_STATUS)"
            )
        } else {
            anyhow::anyhow!("GET {url}: {cause}")
        }
    })?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("read the answer of {url}"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{}: {}",
            status.as_u16(),
            crate::client::error_message(&text, status)
        );
    }
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))?;
    let st = serde_json::from_value(raw.clone())
        .with_context(|| format!("decode the agent status from {url}"))?;
    Ok((st, raw))
}

pub async fn run(args: AgentStatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/status", normalize_base(&args.status_addr));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("build HTTP client")?;
    if !args.watch {
        let (st, raw) = fetch(&http, &url).await?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&raw).context("format JSON")?
            );
        } else {
            print!("{}", render(&st));
        }
        return Ok(());
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut stdout = std::io::stdout();
    loop {
        let frame = match fetch(&http, &url).await {
            Ok((_, raw)) if args.json => format!("{raw}\n"),
            Ok((st, _)) => render(&st),
            Err(e) => format!("error: {e:#}\n"),
        };
        let written = if args.json {
            write!(stdout, "{frame}")
        } else {
            // Clear the screen and home the cursor, then draw the frame.
            write!(
                stdout,
                "\x1b[2J\x1b[H{url}  (every 1s, Ctrl-C to stop)\n\n{frame}"
            )
        }
        .and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            // The reader went away (`| head`): that is the end, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("write to stdout"),
        }
        tokio::select! {
            r = &mut ctrl_c => {
                r.context("wait for Ctrl-C")?;
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_lease::agent::SlotState;
    use nicwarden_lease::{LeaseId, Scope, Usage};

    fn decision(enforce: Enforce, volume_bytes: Option<u64>, used: u64) -> ScopeDecision {
        ScopeDecision {
            scope: Scope::Egress,
            state: SlotState::Active,
            lease: Some(LeaseId(7)),
            enforce,
            reason: "lease 7 active".into(),
            deadline_in_ms: Some(28_500),
            seq: Some(12),
            rate_bps: Some(200_000_000),
            volume_bytes,
            usage: Usage {
                bytes: used,
                packets: 10,
                dropped_packets: 0,
            },
        }
    }

    #[test]
    fn enforce_text() {
        let allow = Enforce::Allow {
            rate_bps: 200_000_000,
            burst_bytes: 65_536,
            volume_left: None,
        };
        assert_eq!(fmt_enforce(&allow), "allow 200 Mbit/s");
        assert_eq!(
            fmt_enforce(&Enforce::Floor { rate_bps: 0 }),
            "floor: blocked"
        );
        assert_eq!(
            fmt_enforce(&Enforce::Floor {
                rate_bps: 10_000_000
            }),
            "floor: 10 Mbit/s"
        );
    }

    #[test]
    fn volume_text() {
        let allow = |left| Enforce::Allow {
            rate_bps: 1,
            burst_bytes: 1,
            volume_left: left,
        };
        let cases = [
            (
                decision(allow(Some(8_500_000)), Some(10_000_000), 1_500_000),
                "1.5 MB / 8.5 MB",
            ),
            (decision(allow(None), None, 1_500_000), "1.5 MB / unlimited"),
            (
                decision(Enforce::Floor { rate_bps: 0 }, Some(10_000_000), 10_000_000),
                "10 MB / 0 B",
            ),
        ];
        for (d, want) in cases {
            assert_eq!(fmt_volume(&d), want);
        }
        let mut pending = decision(Enforce::Floor { rate_bps: 0 }, None, 0);
        pending.lease = None;
        assert_eq!(fmt_volume(&pending), "-");
    }

    #[test]
    fn status_rendering() {
        let st = AgentStatus {
            node: "node-1".into(),
            controller: "https://127.0.0.1:7443".into(),
            connected: false,
            last_seq: 12,
            last_error: Some("connection refused".into()),
            rejected_directives: 0,
            scopes: vec![decision(
                Enforce::Allow {
                    rate_bps: 200_000_000,
                    burst_bytes: 65_536,
                    volume_left: None,
                },
                None,
                0,
            )],
            datapath: Some(nicwarden_agent::enforce::DatapathStatus {
                backend: "tc".into(),
                fabric_iface: "fab0".into(),
                changes_applied: 3,
                last_error: None,
                unresolved_peers: vec![],
                scopes: vec![nicwarden_agent::enforce::ScopeKernel {
                    scope: "egress".into(),
                    bytes: 1_000_000,
                    packets: 700,
                    drops: 5,
                    rate_bps: 199_000_000,
                    volume_drops: 0,
                    ingress_bytes: 0,
                    ingress_drops: 0,
                }],
            }),
            mesh: None,
            tampered: None,
            probe: None,
        };
        let text = render(&st);
        assert!(text.contains("datapath: tc on fab0"), "{text}");
        let kernel_row = text.lines().last().expect("a kernel row");
        assert!(
            kernel_row.contains("199 Mbit/s") && kernel_row.contains("700"),
            "{kernel_row}"
        );
        let text = text
            .split("\ndatapath:")
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(text.contains("DISCONNECTED (connection refused)"), "{text}");
        let row = text.lines().last().expect("a row");
        for want in [
            "egress",
            "active",
            "allow 200 Mbit/s",
            "7",
            "12",
            "28.5s",
            "0 B / unlimited",
            "lease 7 active",
        ] {
            assert!(row.contains(want), "{want:?} not in {row:?}");
        }
    }
}
