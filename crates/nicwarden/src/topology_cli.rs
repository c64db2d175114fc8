//! `nicwarden topology`: apply a declared topology, show it and its versions, and the
//! verifier's findings.

use anyhow::Context as _;
use nicwarden_controller::topology::{
    ApplyTopologyRequest, TopologyStatus, TopologyView, VersionView,
};
use reqwest::Method;

use crate::cli::{TopologyCmd, TopologySub};
use crate::client::Client;
use crate::ops::{fmt_unix_ms, print_json};
use crate::table::Table;
use crate::units::fmt_millis;

fn print_view(v: &TopologyView, source: bool) {
    if source {
        print!("{}", v.source);
        if !v.source.ends_with('\n') {
            println!();
        }
        return;
    }
    println!(
        "topology version {} (fingerprint {}), applied {}{}",
        v.version,
        v.fingerprint,
        fmt_unix_ms(v.applied_at_unix_ms),
        v.note
            .as_ref()
            .map(|n| format!(": {n}"))
            .unwrap_or_default()
    );
    println!(
        "{} nodes, {} switches, {} links",
        v.nodes.len(),
        v.switches.len(),
        v.links.len()
    );
    let mut t = Table::new(&["LINK", "", "RTT BOUND"]);
    for l in &v.links {
        t.row(vec![
            l.a.clone(),
            format!("<-> {}", l.b),
            format!("{} us", l.rtt_max_us),
        ]);
    }
    print!("{}", t.render());
}

pub fn status_text(st: &TopologyStatus) -> String {
    let mut out = match (st.version, &st.fingerprint) {
        (Some(v), Some(f)) => format!("topology version {v} (fingerprint {f})\n"),
        _ => "no topology applied yet (`nicwarden topology apply FILE`): only untrusted neighbours are reported\n".to_string(),
    };
    if st.findings.is_empty() {
        out.push_str("no findings\n");
    } else {
        let mut t = Table::new(&["SEVERITY", "FINDING", "SUBJECT", "FOR", "BLAMES", "DETAIL"]);
        for f in &st.findings {
            t.row(vec![
                format!("{:?}", f.severity).to_uppercase(),
                f.kind.as_str().to_string(),
                f.subject.clone(),
                fmt_millis(st.now_unix_ms.saturating_sub(f.first_seen.0)),
                if f.culprits.is_empty() {
                    "-".into()
                } else {
                    f.culprits.join(",")
                },
                f.detail.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !st.revoke_policy.is_empty() {
        out.push_str(&format!(
            "policy: these findings revoke the blamed nodes' leases: {}\n",
            st.revoke_policy.join(", ")
        ));
    }
    if st.ports.is_empty() {
        out.push_str("\nno port has reported a probe round yet\n");
    } else {
        let mut t = Table::new(&["PORT", "LAST ROUND", "HEARD"]);
        for p in &st.ports {
            t.row(vec![
                format!("{}:{}", p.node, p.port),
                format!(
                    "{} ago",
                    fmt_millis(st.now_unix_ms.saturating_sub(p.last_round_unix_ms))
                ),
                if p.heard.is_empty() {
                    "nothing".into()
                } else {
                    p.heard.join(", ")
                },
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub async fn topology(cmd: TopologyCmd) -> anyhow::Result<()> {
    let client = Client::new(&cmd.client)?;
    let json = cmd.client.json;
    match cmd.command {
        TopologySub::Apply(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("read topology file {}", a.file.display()))?;
            let req = ApplyTopologyRequest {
                toml: text,
                dry_run: a.dry_run,
            };
            let (v, raw): (TopologyView, _) = client
                .call_as(Method::PUT, "/v1/topology", Some(&req))
                .await
                .with_context(|| format!("apply {}", a.file.display()))?;
            if json {
                return print_json(&raw);
            }
            if v.dry_run {
                println!(
                    "{} is valid: {} nodes, {} switches, {} links (fingerprint {}){}",
                    a.file.display(),
                    v.nodes.len(),
                    v.switches.len(),
                    v.links.len(),
                    v.fingerprint,
                    if v.changed {
                        ""
                    } else {
                        "; it is what is applied now"
                    }
                );
            } else if !v.changed {
                println!(
                    "{} declares what is applied already: still version {}",
                    a.file.display(),
                    v.version
                );
            } else {
                println!("applied {} as", a.file.display());
                print_view(&v, false);
            }
        }
        TopologySub::Show(s) => {
            let path = match s.version {
                Some(v) => format!("/v1/topology/versions/{v}"),
                None => "/v1/topology".to_string(),
            };
            let (v, raw): (TopologyView, _) = client.get(&path).await?;
            if json {
                return print_json(&raw);
            }
            print_view(&v, s.source);
        }
        TopologySub::History => {
            let (vs, raw): (Vec<VersionView>, _) = client.get("/v1/topology/versions").await?;
            if json {
                return print_json(&raw);
            }
            if vs.is_empty() {
                println!("no topology applied yet");
                return Ok(());
            }
            let mut t = Table::new(&["VERSION", "APPLIED", "FINGERPRINT", "LINKS", "NOTE"]);
            for v in &vs {
                t.row(vec![
                    v.version.to_string(),
                    fmt_unix_ms(v.applied_at_unix_ms),
                    v.fingerprint.clone(),
                    v.links.to_string(),
                    v.note.clone().unwrap_or_default(),
                ]);
            }
            print!("{}", t.render());
        }
        TopologySub::Status => {
            let (st, raw): (TopologyStatus, _) = client.get("/v1/topology/status").await?;
            if json {
                return print_json(&raw);
            }
            print!("{}", status_text(&st));
        }
    }
    Ok(())
}
