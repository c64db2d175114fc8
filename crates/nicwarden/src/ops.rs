//! The operator commands (`node`, `lease`, `quota`, `audit`): one API call each (two for
//! `lease change`), printed as a table, key/value lines, or the raw JSON with `--json`.
//! The live views (`events`, `top`) are in `live_cli`.

use anyhow::Context as _;
use nicwarden_controller::api_types::{
    AddNodeRequest, AddNodeResponse, AmendRequest, GrantRequest, LeaseView, NodeView, QuotaView,
    RevokeRequest, SetQuotaRequest,
};
use nicwarden_lease::ledger::{LeaseRecord, LeaseStatus};
use reqwest::Method;
use serde::Deserialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cli::{
    AgentHint, AuditCmd, AuditSub, LeaseCmd, LeaseSub, NodeCmd, NodeSub, QuotaCmd, QuotaSub,
    TermsArgs,
};
use crate::client::{encode, Client};
use crate::table::{fields, Table};
use crate::units::{fmt_bytes, fmt_millis, fmt_rate};

/// `GET /v1/audit` entries. Mirrors the controller's type; `detail` is taken as any JSON so
/// that a structured detail still prints.
#[derive(Debug, Deserialize)]
pub struct AuditEntry {
    pub index: u64,
    pub at_unix_ms: u64,
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// `GET /v1/audit/verify`
#[derive(Debug, Deserialize)]
pub struct AuditVerify {
    pub ok: bool,
    pub entries: u64,
    pub first_broken: Option<u64>,
    #[serde(default)]
    pub message: String,
}

pub fn print_json(raw: &serde_json::Value) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(raw).context("format JSON")?
    );
    Ok(())
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
pub fn fmt_unix_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn fmt_floor(bps: u64) -> String {
    if bps == 0 {
        "blocked".to_string()
    } else {
        fmt_rate(bps)
    }
}

fn opt_or<T>(v: Option<T>, f: impl FnOnce(T) -> String, none: &str) -> String {
    v.map_or_else(|| none.to_string(), f)
}

// ---------------------------------------------------------------------------------------
// nodes

/// The host of the operator API URL, for the default agent endpoint (`https://HOST:7443`).
pub fn api_host(base: &str) -> String {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        if let Some((host, _)) = v6.split_once(']') {
            return format!("[{host}]");
        }
    }
    authority
        .split_once(':')
        .map_or(authority, |(h, _)| h)
        .to_string()
}

fn print_join_token(client: &Client, hint: &AgentHint, resp: &AddNodeResponse, verb: &str) {
    let endpoint = hint
        .agent_endpoint
        .clone()
        .unwrap_or_else(|| format!("https://{}:7443", api_host(client.base())));
    let left = resp.token_expires_at_unix_ms.saturating_sub(now_unix_ms());
    println!("{verb} node {}", resp.name);
    println!(
        "join token (one use, expires in {}, at {}):",
        fmt_millis(left),
        fmt_unix_ms(resp.token_expires_at_unix_ms)
    );
    println!("  {}", resp.join_token);
    println!("start the agent on {} with:", resp.name);
    println!(
        "  nicwarden agent --node {} --controller {endpoint} --token {}",
        resp.name, resp.join_token
    );
}

fn node_state(n: &NodeView) -> &'static str {
    if n.record.removed {
        "removed"
    } else if n.mesh.as_ref().is_some_and(|m| m.tampered.is_some()) {
        "TAMPERED"
    } else if n.connected {
        "connected"
    } else if n.enrolled {
        "offline"
    } else {
        "awaiting enrollment"
    }
}

pub fn node_table(nodes: &[NodeView]) -> String {
    let mut t = Table::new(&["NAME", "GROUP", "CAPACITY", "STATE", "LEASES", "LAST SEQ"]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            n.group.clone(),
            fmt_rate(n.capacity_bps),
            node_state(n).to_string(),
            n.active_leases.to_string(),
            n.last_seq.to_string(),
        ]);
    }
    t.render()
}

fn node_fields(n: &NodeView) -> String {
    fields(&[
        ("name", n.name.clone()),
        ("group", n.group.clone()),
        ("capacity", fmt_rate(n.capacity_bps)),
        ("state", node_state(n).to_string()),
        (
            "enrolled at",
            opt_or(n.enrolled_at_unix_ms, fmt_unix_ms, "-"),
        ),
        (
            "certificate",
            opt_or(n.cert_fingerprint.clone(), |f| f, "-"),
        ),
        ("active leases", n.active_leases.to_string()),
        ("last seq", n.last_seq.to_string()),
        (
            "mesh key",
            n.mesh
                .as_ref()
                .and_then(|m| m.public_key.clone())
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "mesh",
            match &n.mesh {
                None => "not in the mesh (its agent reported no key)".into(),
                Some(m) => format!(
                    "{} {} ({}); {}; {} rotations{}",
                    m.endpoint.as_deref().unwrap_or("-"),
                    m.allowed_ips.join(","),
                    if m.published {
                        format!(
                            "published to its group until {}",
                            opt_or(m.published_until_unix_ms, fmt_unix_ms, "-")
                        )
                    } else {
                        "not published: no active lease, or tampered".into()
                    },
                    format_args!("key since {}", fmt_unix_ms(m.key_since_unix_ms)),
                    m.rotations,
                    if m.rotation_pending {
                        ", rotation asked"
                    } else {
                        ""
                    }
                ),
            },
        ),
        (
            "tampered",
            n.mesh
                .as_ref()
                .and_then(|m| m.tampered.as_ref())
                .map(|t| format!("{} (at {})", t.reason, fmt_unix_ms(t.at_unix_ms)))
                .unwrap_or_else(|| "no".into()),
        ),
    ])
}

pub async fn node(cmd: NodeCmd) -> anyhow::Result<()> {
    let client = Client::new(&cmd.client)?;
    let json = cmd.client.json;
    match cmd.command {
        NodeSub::Add(a) => {
            let req = AddNodeRequest {
                name: a.name,
                group: a.group,
                capacity_bps: a.capacity,
                token_ttl_s: a.token_ttl.map(|d| d.as_secs().max(1)),
            };
            let (resp, raw): (AddNodeResponse, _) = client
                .call_as(Method::POST, "/v1/nodes", Some(&req))
                .await?;
            if json {
                return print_json(&raw);
            }
            print_join_token(&client, &a.hint, &resp, "added");
        }
        NodeSub::List => {
            let (nodes, raw): (Vec<NodeView>, _) = client.get("/v1/nodes").await?;
            if json {
                return print_json(&raw);
            }
            print!("{}", node_table(&nodes));
        }
        NodeSub::Show { name } => {
            let (n, raw): (NodeView, _) =
                client.get(&format!("/v1/nodes/{}", encode(&name))).await?;
            if json {
                return print_json(&raw);
            }
            print!("{}", node_fields(&n));
        }
        NodeSub::Remove { name } => {
            let (n, raw): (NodeView, _) = client
                .call_as(
                    Method::DELETE,
                    &format!("/v1/nodes/{}", encode(&name)),
                    None::<&()>,
                )
                .await?;
            if json {
                return print_json(&raw);
            }
            println!(
                "removed node {}: its leases are revoked and its certificate is no longer accepted",
                n.name
            );
        }
        NodeSub::Token(a) => {
            let mut path = format!("/v1/nodes/{}/token", encode(&a.name));
            if let Some(ttl) = a.token_ttl {
                path.push_str(&format!("?ttl_s={}", ttl.as_secs().max(1)));
            }
            let (resp, raw): (AddNodeResponse, _) =
                client.call_as(Method::POST, &path, None::<&()>).await?;
            if json {
                return print_json(&raw);
            }
            print_join_token(&client, &a.hint, &resp, "new join token for");
        }
        NodeSub::RotateKey(a) => {
            let path = format!("/v1/nodes/{}/rotate-key", encode(&a.name));
            let (before, raw): (NodeView, _) = client
                .call_as(
                    Method::POST,
                    &path,
                    Some(&serde_json::json!({"reason": "operator request"})),
                )
                .await?;
            let old_key = before.mesh.as_ref().and_then(|m| m.public_key.clone());
            let Some(wait) = a.wait else {
                if json {
                    return print_json(&raw);
                }
                println!(
                    "asked node {} for a new WireGuard key (current key {}); its peers get the new key as soon as it reports it",
                    a.name,
                    old_key.as_deref().unwrap_or("-")
                );
                return Ok(());
            };
            let deadline = std::time::Instant::now() + wait;
            loop {
                let (n, raw): (NodeView, _) = client
                    .get(&format!("/v1/nodes/{}", encode(&a.name)))
                    .await?;
                let key = n.mesh.as_ref().and_then(|m| m.public_key.clone());
                if key.is_some() && key != old_key {
                    if json {
                        return print_json(&raw);
                    }
                    println!(
                        "node {} rotated its WireGuard key: {} -> {}; its peers have the new key",
                        a.name,
                        old_key.as_deref().unwrap_or("-"),
                        key.as_deref().unwrap_or("-")
                    );
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "node {} did not report a new key within {} (asked; it may still)",
                        a.name,
                        humantime::format_duration(wait)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        NodeSub::Tamper(a) => {
            let (n, raw): (NodeView, _) = client
                .call_as(
                    Method::POST,
                    &format!("/v1/nodes/{}/tamper", encode(&a.name)),
                    Some(&serde_json::json!({"reason": a.reason})),
                )
                .await?;
            if json {
                return print_json(&raw);
            }
            println!(
                "node {} declared tampered: leases revoked, WireGuard key withdrawn from every peer, certificate refused; re-enroll it with `nicwarden node token {}`",
                n.name, n.name
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// leases

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `PUT /v1/leases/{id}` wants all the terms: those not given keep the lease's current
/// value, except the renewal interval, which goes back to its default (TTL/3) when only the
/// TTL changes (the old interval may not fit the new TTL).
pub fn amend_request(cur: &LeaseRecord, rate: Option<u64>, t: &TermsArgs) -> AmendRequest {
    let terms = &cur.terms;
    let renew_s = match (t.renew, t.ttl) {
        (Some(r), _) => Some(secs(r)),
        (None, Some(_)) => None,
        (None, None) => Some(terms.renew_interval_ms as f64 / 1000.0),
    };
    GrantRequest {
        node: cur.node.clone(),
        scope: Some(t.scope.clone().unwrap_or_else(|| terms.scope.to_string())),
        rate_bps: rate.unwrap_or(terms.want_bps),
        burst_bytes: Some(t.burst.unwrap_or(terms.burst_bytes)),
        volume_bytes: t.volume.or(terms.volume_bytes),
        ttl_s: Some(t.ttl.map_or(terms.ttl_ms as f64 / 1000.0, secs)),
        renew_s,
        floor_bps: Some(t.floor.unwrap_or(terms.floor.rate_bps)),
    }
}

fn grant_request(node: String, rate: u64, t: &TermsArgs) -> GrantRequest {
    GrantRequest {
        node,
        scope: t.scope.clone(),
        rate_bps: rate,
        burst_bytes: t.burst,
        volume_bytes: t.volume,
        ttl_s: t.ttl.map(secs),
        renew_s: t.renew.map(secs),
        floor_bps: t.floor,
    }
}

fn fmt_lease_rate(r: &LeaseRecord) -> String {
    if r.rate_bps == r.terms.want_bps {
        fmt_rate(r.rate_bps)
    } else {
        format!(
            "{} (wants {})",
            fmt_rate(r.rate_bps),
            fmt_rate(r.terms.want_bps)
        )
    }
}

fn fmt_volume(r: &LeaseRecord) -> String {
    match r.terms.volume_bytes {
        Some(v) => format!("{} / {}", fmt_bytes(r.usage.bytes), fmt_bytes(v)),
        None => format!("{} / unlimited", fmt_bytes(r.usage.bytes)),
    }
}

fn fmt_state(v: &LeaseView) -> String {
    match &v.record.status {
        LeaseStatus::Revoked { reason, .. } if !reason.is_empty() => {
            format!("{} ({reason})", v.state)
        }
        _ if v.volume_exhausted => format!("{} (volume used up)", v.state),
        _ => v.state.clone(),
    }
}

pub fn lease_table(leases: &[LeaseView]) -> String {
    let mut t = Table::new(&[
        "ID",
        "NODE",
        "SCOPE",
        "STATE",
        "RATE",
        "VOLUME",
        "EXPIRES IN",
        "SEQ",
    ]);
    for v in leases {
        let r = &v.record;
        t.row(vec![
            r.id.to_string(),
            r.node.clone(),
            r.terms.scope.to_string(),
            fmt_state(v),
            fmt_lease_rate(r),
            fmt_volume(r),
            opt_or(v.expires_in_ms, fmt_millis, "-"),
            r.seq.to_string(),
        ]);
    }
    t.render()
}

pub fn lease_fields(v: &LeaseView) -> String {
    let r = &v.record;
    let state = match &r.status {
        LeaseStatus::Active => fmt_state(v),
        LeaseStatus::Revoked { at, reason } => {
            format!("{} at {} ({reason})", v.state, fmt_unix_ms(at.as_millis()))
        }
        LeaseStatus::Expired { at } => format!("{} at {}", v.state, fmt_unix_ms(at.as_millis())),
    };
    fields(&[
        ("id", r.id.to_string()),
        ("node", r.node.clone()),
        ("scope", r.terms.scope.to_string()),
        ("state", state),
        ("rate", fmt_lease_rate(r)),
        ("burst", fmt_bytes(r.terms.burst_bytes)),
        ("volume used", fmt_volume(r)),
        (
            "packets",
            format!(
                "{} sent, {} dropped",
                r.usage.packets, r.usage.dropped_packets
            ),
        ),
        ("ttl", fmt_millis(r.terms.ttl_ms)),
        ("renew every", fmt_millis(r.terms.renew_interval_ms)),
        ("floor", fmt_floor(r.terms.floor.rate_bps)),
        ("expires in", opt_or(v.expires_in_ms, fmt_millis, "-")),
        ("seq", r.seq.to_string()),
        ("renewals", r.renewals.to_string()),
        ("granted at", fmt_unix_ms(r.granted_at.as_millis())),
        ("issued at", fmt_unix_ms(r.issued_at.as_millis())),
    ])
}

pub async fn lease(cmd: LeaseCmd) -> anyhow::Result<()> {
    let client = Client::new(&cmd.client)?;
    let json = cmd.client.json;
    let (view, raw, verb): (LeaseView, _, &str) = match cmd.command {
        LeaseSub::Grant(g) => {
            let req = grant_request(g.node, g.rate, &g.terms);
            let (v, raw) = client
                .call_as(Method::POST, "/v1/leases", Some(&req))
                .await?;
            (v, raw, "granted")
        }
        LeaseSub::List(l) => {
            let mut query = Vec::new();
            if let Some(n) = &l.node {
                query.push(format!("node={}", encode(n)));
            }
            if let Some(s) = &l.state {
                query.push(format!("state={}", encode(s)));
            }
            let path = if query.is_empty() {
                "/v1/leases".to_string()
            } else {
                format!("/v1/leases?{}", query.join("&"))
            };
            let (leases, raw): (Vec<LeaseView>, _) = client.get(&path).await?;
            if json {
                return print_json(&raw);
            }
            print!("{}", lease_table(&leases));
            return Ok(());
        }
        LeaseSub::Show { id } => {
            let (v, raw) = client.get(&format!("/v1/leases/{id}")).await?;
            (v, raw, "")
        }
        LeaseSub::Change(c) => {
            let (cur, _): (LeaseView, _) = client.get(&format!("/v1/leases/{}", c.id)).await?;
            let req = amend_request(&cur.record, c.rate, &c.terms);
            let (v, raw) = client
                .call_as(Method::PUT, &format!("/v1/leases/{}", c.id), Some(&req))
                .await?;
            (v, raw, "changed")
        }
        LeaseSub::Renew { id } => {
            let (v, raw) = client
                .call_as(Method::POST, &format!("/v1/leases/{id}/renew"), None::<&()>)
                .await?;
            (v, raw, "renewed")
        }
        LeaseSub::Revoke(r) => {
            let req = RevokeRequest { reason: r.reason };
            let (v, raw) = client
                .call_as(
                    Method::POST,
                    &format!("/v1/leases/{}/revoke", r.id),
                    Some(&req),
                )
                .await?;
            (v, raw, "revoked")
        }
    };
    if json {
        return print_json(&raw);
    }
    if !verb.is_empty() {
        println!(
            "{verb} lease {} ({} on {})",
            view.record.id, view.record.terms.scope, view.record.node
        );
    }
    print!("{}", lease_fields(&view));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// quota

/// Granted rate under `fabric`, a group or a node (the API omits names with nothing granted).
fn allocated(q: &QuotaView, name: &str) -> String {
    fmt_rate(q.allocated_bps.get(name).copied().unwrap_or(0))
}

pub fn quota_table(q: &QuotaView) -> String {
    let mut t = Table::new(&["NAME", "KIND", "CAPACITY", "ALGORITHM", "ALLOCATED"]);
    t.row(vec![
        "fabric".into(),
        "fabric".into(),
        fmt_rate(q.tree.fabric.capacity_bps),
        q.tree.fabric.algorithm.to_string(),
        allocated(q, "fabric"),
    ]);
    for (g, e) in &q.tree.groups {
        t.row(vec![
            format!("  {g}"),
            "group".into(),
            fmt_rate(e.capacity_bps),
            e.algorithm.to_string(),
            allocated(q, g),
        ]);
        for (n, nq) in q.tree.nodes.iter().filter(|(_, nq)| &nq.group == g) {
            t.row(vec![
                format!("    {n}"),
                "node".into(),
                fmt_rate(nq.capacity_bps),
                nq.algorithm.to_string(),
                allocated(q, n),
            ]);
        }
    }
    // Nodes whose group is missing from the tree (should not happen; show them anyway).
    for (n, nq) in &q.tree.nodes {
        if !q.tree.groups.contains_key(&nq.group) {
            t.row(vec![
                format!("  {n}"),
                format!("node (group {} missing)", nq.group),
                fmt_rate(nq.capacity_bps),
                nq.algorithm.to_string(),
                allocated(q, n),
            ]);
        }
    }
    t.render()
}

pub async fn quota(cmd: QuotaCmd) -> anyhow::Result<()> {
    let client = Client::new(&cmd.client)?;
    let (q, raw): (QuotaView, _) = match cmd.command {
        QuotaSub::Show => client.get("/v1/quota").await?,
        QuotaSub::Set(s) => {
            let req = SetQuotaRequest {
                capacity_bps: s.capacity,
                algorithm: s.algorithm,
                group: s.group,
            };
            client
                .call_as(
                    Method::PUT,
                    &format!("/v1/quota/{}", encode(&s.name)),
                    Some(&req),
                )
                .await?
        }
    };
    if cmd.client.json {
        return print_json(&raw);
    }
    print!("{}", quota_table(&q));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// audit

fn fmt_detail(d: &serde_json::Value) -> String {
    match d {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub fn audit_table(entries: &[AuditEntry]) -> String {
    let mut t = Table::new(&["INDEX", "TIME", "ACTOR", "ACTION", "DETAIL"]);
    for e in entries {
        t.row(vec![
            e.index.to_string(),
            fmt_unix_ms(e.at_unix_ms),
            e.actor.clone(),
            e.action.clone(),
            fmt_detail(&e.detail),
        ]);
    }
    t.render()
}

pub async fn audit(cmd: AuditCmd) -> anyhow::Result<()> {
    let client = Client::new(&cmd.client)?;
    match cmd.command {
        Some(AuditSub::Verify) => {
            if cmd.from.is_some() || cmd.limit.is_some() {
                anyhow::bail!(
                    "--from and --limit list entries; `audit verify` checks the whole log"
                );
            }
            let (v, raw): (AuditVerify, _) = client.get("/v1/audit/verify").await?;
            if cmd.client.json {
                print_json(&raw)?;
            } else if v.ok {
                println!(
                    "audit log intact: {} entries, hash chain verified",
                    v.entries
                );
            }
            if !v.ok {
                let at = v
                    .first_broken
                    .map_or_else(String::new, |i| format!(" at entry {i}"));
                anyhow::bail!(
                    "audit log broken{at} ({} entries checked): {}",
                    v.entries,
                    v.message
                );
            }
        }
        None => {
            let mut query = Vec::new();
            if let Some(f) = cmd.from {
                query.push(format!("from={f}"));
            }
            if let Some(l) = cmd.limit {
                query.push(format!("limit={l}"));
            }
            let path = if query.is_empty() {
                "/v1/audit".to_string()
            } else {
                format!("/v1/audit?{}", query.join("&"))
            };
            let (entries, raw): (Vec<AuditEntry>, _) = client.get(&path).await?;
            if cmd.client.json {
                return print_json(&raw);
            }
            print!("{}", audit_table(&entries));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nicwarden_lease::ledger::LeaseTerms;
    use nicwarden_lease::{Floor, LeaseId, Scope, Time, Usage};

    fn record() -> LeaseRecord {
        LeaseRecord {
            id: LeaseId(7),
            node: "n1".into(),
            terms: LeaseTerms {
                scope: Scope::Peer("n2".into()),
                want_bps: 300_000_000,
                burst_bytes: 65_536,
                volume_bytes: Some(10_000_000_000),
                ttl_ms: 30_000,
                renew_interval_ms: 10_000,
                floor: Floor {
                    rate_bps: 1_000_000,
                },
            },
            rate_bps: 200_000_000,
            seq: 12,
            granted_at: Time(1_700_000_000_000),
            issued_at: Time(1_700_000_010_000),
            expires_at: Time(1_700_000_041_000),
            status: LeaseStatus::Active,
            usage: Usage {
                bytes: 1_500_000,
                packets: 1000,
                dropped_packets: 3,
            },
            renewals: 1,
        }
    }

    fn terms() -> TermsArgs {
        TermsArgs {
            scope: None,
            burst: None,
            volume: None,
            ttl: None,
            renew: None,
            floor: None,
        }
    }

    #[test]
    fn change_keeps_unspecified_terms() {
        let req = amend_request(&record(), Some(500_000_000), &terms());
        assert_eq!(req.node, "n1");
        assert_eq!(req.scope.as_deref(), Some("peer:n2"));
        assert_eq!(req.rate_bps, 500_000_000);
        assert_eq!(req.burst_bytes, Some(65_536));
        assert_eq!(req.volume_bytes, Some(10_000_000_000));
        assert_eq!(req.ttl_s, Some(30.0));
        assert_eq!(req.renew_s, Some(10.0));
        assert_eq!(req.floor_bps, Some(1_000_000));
    }

    #[test]
    fn change_of_ttl_resets_renewal_to_default() {
        let mut t = terms();
        t.ttl = Some(Duration::from_secs(120));
        let req = amend_request(&record(), None, &t);
        assert_eq!(
            req.rate_bps, 300_000_000,
            "keeps the wanted rate, not the granted one"
        );
        assert_eq!(req.ttl_s, Some(120.0));
        assert_eq!(req.renew_s, None);
        t.renew = Some(Duration::from_secs(40));
        assert_eq!(amend_request(&record(), None, &t).renew_s, Some(40.0));
    }

    #[test]
    fn lease_rendering() {
        let v = LeaseView {
            record: record(),
            state: "active".into(),
            volume_exhausted: false,
            expires_in_ms: Some(29_500),
        };
        let table = lease_table(std::slice::from_ref(&v));
        let row = table.lines().nth(1).expect("one row");
        for want in [
            "7",
            "n1",
            "peer:n2",
            "active",
            "200 Mbit/s (wants 300 Mbit/s)",
            "1.5 MB / 10 GB",
            "29.5s",
            "12",
        ] {
            assert!(row.contains(want), "{want:?} not in {row:?}");
        }
        let f = lease_fields(&v);
        assert!(f.contains("floor        1 Mbit/s"), "{f}");
        assert!(f.contains("renew every  10s"), "{f}");
        assert!(f.contains("3 dropped"), "{f}");
    }

    #[test]
    fn revoked_state_shows_reason() {
        let mut r = record();
        r.status = LeaseStatus::Revoked {
            at: Time(1_700_000_050_000),
            reason: "maintenance".into(),
        };
        let v = LeaseView {
            record: r,
            state: "revoked".into(),
            volume_exhausted: false,
            expires_in_ms: None,
        };
        assert_eq!(fmt_state(&v), "revoked (maintenance)");
        assert!(lease_fields(&v).contains("revoked at 2023-11-14T22:14:10Z (maintenance)"));
    }

    #[test]
    fn quota_rendering() {
        let q: QuotaView = serde_json::from_str(
            r#"{"tree":{"fabric":{"capacity_bps":100000000000,"algorithm":"static"},
                "groups":{"default":{"capacity_bps":10000000000,"algorithm":"fair_share"},
                          "rack-a":{"capacity_bps":40000000000,"algorithm":"static"}},
                "nodes":{"n1":{"group":"rack-a","capacity_bps":1000000000,"algorithm":"static"}}},
                "allocated_bps":{"fabric":200000000,"rack-a":200000000,"n1":200000000}}"#,
        )
        .expect("decodes");
        let t = quota_table(&q);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(
            lines[1].starts_with("fabric") && lines[1].ends_with("200 Mbit/s"),
            "{t}"
        );
        assert!(
            lines[2].contains("default") && lines[2].ends_with("0 bit/s"),
            "{t}"
        );
        assert!(lines[2].contains("fair_share"), "{t}");
        assert!(
            lines[3].contains("rack-a") && lines[3].contains("40 Gbit/s"),
            "{t}"
        );
        assert!(
            lines[4].starts_with("    n1") && lines[4].contains("1 Gbit/s"),
            "{t}"
        );
    }

    #[test]
    fn api_hosts() {
        let cases = [
            ("http://127.0.0.1:7080", "127.0.0.1"),
            ("http://ctl.example:7080/prefix", "ctl.example"),
            ("https://ctl.example", "ctl.example"),
            ("http://[::1]:7080", "[::1]"),
            ("http://user@h:1", "h"),
        ];
        for (base, want) in cases {
            assert_eq!(api_host(base), want, "{base}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(fmt_unix_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_unix_ms(1_700_000_000_999), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn audit_rendering() {
        let entries: Vec<AuditEntry> = serde_json::from_str(
            r#"[{"index":0,"at_unix_ms":0,"actor":"operator","action":"node.add","detail":"n1","prev_hash":"00","hash":"ab"},
                {"index":1,"at_unix_ms":1000,"actor":"controller","action":"lease.expire","detail":{"lease":7},"prev_hash":"ab","hash":"cd"}]"#,
        )
        .expect("decodes");
        let t = audit_table(&entries);
        assert!(t.contains("node.add      n1"), "{t}");
        assert!(t.contains(r#"{"lease":7}"#), "{t}");
    }
}
