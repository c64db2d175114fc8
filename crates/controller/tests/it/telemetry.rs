//! Live telemetry, events, the event stream, operator renewal and the dashboard, against an
//! in-process controller fed by a real agent session: enrolled with a join token, mutual
//! TLS, Hello, signed directives verified against the pinned lease key, usage reports with
//! chosen sample times and counters so every expected rate is exact.

use crate::{tmp, Running};
use nicwarden_lease::Directive;
use nicwarden_proto::pb;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(10);
/// 12,500,000 bytes per 1000 ms of the agent's clock = exactly 100 Mbit/s.
const BYTES_PER_REPORT: u64 = 12_500_000;
const PACKETS_PER_REPORT: u64 = 10_000;
const FED_BPS: f64 = 100_000_000.0;
const GRANT_BPS: u64 = 200_000_000;
const VOLUME: u64 = 10_000_000_000;

/// Polls `f` until it returns `Ok`, for at most [`WAIT`]; panics with the last `Err`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {WAIT:?}; last: {last}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn add_node(c: &Running, name: &str) -> String {
    let (st, v) = c
        .call("POST", "/v1/nodes", Some(json!({ "name": name })))
        .await;
    assert_eq!(st, 201, "add {name}: {v}");
    v["join_token"].as_str().expect("join token").to_string()
}

/// node1 enrolled and connected, holding an egress lease whose usage its agent reports:
/// the agent, the lease as granted (API view) and as the agent received it.
async fn node1_leased(c: &Running) -> (TestAgent, Value, nicwarden_lease::Lease) {
    let token = add_node(c, "node1").await;
    let mut agent = TestAgent::connect(c, "node1", &token).await;
    let lease = grant(c, "node1").await;
    let held = agent.lease().await;
    agent.track(held.id.0);
    (agent, lease, held)
}

async fn grant(c: &Running, node: &str) -> Value {
    let (st, v) = c
        .call(
            "POST",
            "/v1/leases",
            Some(json!({
                "node": node, "rate_bps": GRANT_BPS, "volume_bytes": VOLUME, "ttl_s": 120,
            })),
        )
        .await;
    assert_eq!(st, 201, "grant: {v}");
    v
}

async fn revoke(c: &Running, id: u64) -> Value {
    let (st, v) = c
        .call(
            "POST",
            &format!("/v1/leases/{id}/revoke"),
            Some(json!({"reason": "test"})),
        )
        .await;
    assert_eq!(st, 200, "revoke: {v}");
    assert_eq!(v["state"], "revoked", "{v}");
    v
}

async fn fleet(c: &Running) -> Value {
    let (st, v) = c.call("GET", "/v1/telemetry/fleet", None).await;
    assert_eq!(st, 200, "fleet: {v}");
    v
}

fn node_in<'a>(fleet: &'a Value, name: &str) -> Option<&'a Value> {
    fleet["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == name)
}

async fn events(c: &Running, query: &str) -> Value {
    let (st, v) = c.call("GET", &format!("/v1/events{query}"), None).await;
    assert_eq!(st, 200, "events{query}: {v}");
    v
}

fn kinds(v: &Value) -> Vec<String> {
    v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_string())
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_u64().expect("id"))
        .collect()
}

/// A real agent session driven by the test.
struct TestAgent {
    lease_key: [u8; 32],
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::ControllerMessage>,
    _client: pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    /// The agent's monotonic clock for the next report, and the cumulative counters.
    sample_ms: u64,
    bytes: u64,
    packets: u64,
    lease_id: u64,
    /// The scope state reported (what the agent's datapath enforces).
    state: &'static str,
}

impl TestAgent {
    /// Enrolls `node` with its join token and opens its session (Hello).
    async fn connect(c: &Running, node: &str, join_token: &str) -> TestAgent {
        let dir = c.dir.join(format!("agent-{node}"));
        let ident = timeout(
            WAIT,
            nicwarden_agent::identity::enroll(&dir, node, &c.agent, join_token),
        )
        .await
        .expect("enrollment answers in time")
        .expect("enroll");
        let tls = nicwarden_pki::agent_client_config(&ident.ca_pem, &ident.cert_pem, &ident.key)
            .expect("client config");
        let hello = pb::Hello {
            node: node.into(),
            agent_version: "telemetry-test".into(),
            ..Default::default()
        };
        let crate::Session {
            tx,
            inbound,
            _client: client,
        } = crate::open_session(c, tls, hello)
            .await
            .expect("session accepted");
        TestAgent {
            lease_key: ident.lease_key,
            tx,
            inbound,
            _client: client,
            sample_ms: 5_000_000,
            bytes: 0,
            packets: 0,
            lease_id: 0,
            state: "active",
        }
    }

    /// The next directive pushed on the session, its signature verified.
    async fn directive(&mut self) -> Directive {
        loop {
            let m = timeout(WAIT, self.inbound.message())
                .await
                .expect("a directive within 10 s")
                .expect("session stream ok")
                .expect("session still open");
            match m.msg {
                Some(pb::controller_message::Msg::Directive(sd)) => {
                    return nicwarden_proto::verify_directive(&sd, &self.lease_key)
                        .expect("directive signed by the pinned lease key")
                }
                Some(pb::controller_message::Msg::Error(e)) => {
                    panic!("session error: {} (lease {})", e.message, e.lease_id)
                }
                Some(pb::controller_message::Msg::Mesh(_))
                | Some(pb::controller_message::Msg::RotateKey(_))
                | None => continue,
            }
        }
    }

    /// The next directive, which must be a lease.
    async fn lease(&mut self) -> nicwarden_lease::Lease {
        match self.directive().await {
            Directive::Lease(l) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    /// Starts reporting usage of `lease_id` on `egress` with fresh counters.
    fn track(&mut self, lease_id: u64) {
        self.lease_id = lease_id;
        self.bytes = 0;
        self.packets = 0;
    }

    async fn send_report(&mut self) {
        let report = pb::UsageReport {
            scopes: vec![pb::ScopeUsage {
                scope: "egress".into(),
                lease_id: self.lease_id,
                bytes: self.bytes,
                packets: self.packets,
                dropped_packets: 0,
                state: self.state.into(),
                deadline_in_ms: if self.lease_id == 0 { 0 } else { 100_000 },
            }],
            sample_time_ms: self.sample_ms,
        };
        self.tx
            .send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Usage(report)),
            })
            .await
            .expect("send usage report");
    }

    /// Sends a baseline report and then `n` reports, each 1000 ms of the agent's clock and
    /// [`BYTES_PER_REPORT`] later: every rate after the baseline is exactly [`FED_BPS`].
    async fn feed(&mut self, n: usize) {
        self.send_report().await;
        for _ in 0..n {
            self.sample_ms += 1000;
            self.bytes += BYTES_PER_REPORT;
            self.packets += PACKETS_PER_REPORT;
            self.send_report().await;
        }
    }

    /// `n` reports 1000 ms apart with no traffic (a scope at its floor of 0).
    async fn idle(&mut self, n: usize) {
        for _ in 0..n {
            self.sample_ms += 1000;
            self.send_report().await;
        }
    }

    /// Ends the session (the request stream closes, as when an agent stops).
    fn close(self) {
        drop(self);
    }
}

// ---- fleet --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_joins_leases_with_reported_usage() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    // Added first, sorted after node1.
    add_node(&c, "node2").await;
    let (mut agent, lease, l) = node1_leased(&c).await;
    let id = lease["id"].as_u64().expect("id");
    assert_eq!((l.id.0, l.rate_bps), (id, GRANT_BPS));
    agent.feed(3).await;
    let (bytes, packets) = (3 * BYTES_PER_REPORT, 3 * PACKETS_PER_REPORT);

    let f = eventually("node1 shows the fed counters", || async {
        let f = fleet(&c).await;
        match node_in(&f, "node1") {
            Some(n) if n["scopes"][0]["bytes"] == bytes => Ok(f),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let names: Vec<&str> = f["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["node1", "node2"], "sorted by name: {f}");
    assert_eq!(f["stale_after_ms"], 5000, "{f}");
    assert!(f["now_unix_ms"].as_u64().expect("now") > 0);

    let n = node_in(&f, "node1").expect("node1");
    assert_eq!(n["group"], "default", "{n}");
    assert_eq!(n["connected"], true, "{n}");
    assert_eq!(n["stale"], false, "{n}");
    assert!(n["last_report_unix_ms"].as_u64().is_some(), "{n}");
    assert_eq!(n["state"], "active", "{n}");
    assert_eq!(n["leased_bps"], GRANT_BPS, "{n}");
    assert_eq!(n["floor_bps"], 0, "{n}");
    assert_eq!(n["rate_bps"].as_f64(), Some(FED_BPS), "{n}");
    assert_eq!(n["volume_bytes"], VOLUME, "{n}");
    assert_eq!(n["used_bytes"], bytes, "{n}");
    let exp = n["expires_in_ms"].as_u64().expect("expires_in_ms");
    assert!(exp > 0 && exp <= 121_000, "{n}");
    let scopes = n["scopes"].as_array().expect("scopes");
    assert_eq!(scopes.len(), 1, "{n}");
    let s = &scopes[0];
    assert_eq!(s["scope"], "egress", "{s}");
    assert_eq!(s["lease_id"], id, "{s}");
    assert_eq!(s["state"], "active", "{s}");
    assert_eq!(s["leased_bps"], GRANT_BPS, "{s}");
    assert_eq!(s["floor_bps"], 0, "{s}");
    assert_eq!(s["rate_bps"].as_f64(), Some(FED_BPS), "{s}");
    assert_eq!(s["bytes"], bytes, "{s}");
    assert_eq!(s["packets"], packets, "{s}");
    assert_eq!(s["dropped_packets"], 0, "{s}");
    assert_eq!(s["volume_bytes"], VOLUME, "{s}");
    assert_eq!(s["used_bytes"], bytes, "{s}");

    // A node with no lease (never enrolled): nothing leased, nothing measured.
    let n2 = node_in(&f, "node2").expect("node2");
    assert_eq!(n2["state"], "none", "{n2}");
    assert_eq!(n2["connected"], false, "{n2}");
    assert_eq!(n2["stale"], true, "{n2}");
    assert_eq!(n2["leased_bps"], 0, "{n2}");
    assert_eq!(n2["rate_bps"].as_f64(), Some(0.0), "{n2}");
    assert_eq!(n2["last_report_unix_ms"], Value::Null, "{n2}");
    assert_eq!(n2["volume_bytes"], Value::Null, "{n2}");
    assert_eq!(n2["scopes"], json!([]), "{n2}");

    // The same numbers in /metrics.
    let m = c
        .http
        .get(format!("{}/metrics", c.api))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = |prefix: &str| -> Option<f64> {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(
        value("nicwarden_scope_rate_bits_per_second{node=\"node1\",scope=\"egress\"} "),
        Some(FED_BPS),
        "{m}"
    );
    assert_eq!(
        value("nicwarden_scope_leased_bits_per_second{node=\"node1\",scope=\"egress\"} "),
        Some(GRANT_BPS as f64),
        "{m}"
    );
    assert_eq!(
        value("nicwarden_scope_lease_bytes{node=\"node1\",scope=\"egress\"} "),
        Some(bytes as f64),
        "{m}"
    );
    let reports = value("nicwarden_telemetry_reports_total ").expect("reports counter");
    assert!(reports >= 4.0, "4 reports sent: {m}");

    // Revoked: the agent reports the scope revoked and idle; nothing is leased any more.
    revoke(&c, id).await;
    assert!(matches!(agent.directive().await, Directive::Revoke(_)));
    agent.state = "revoked";
    agent.idle(1).await;
    let n = eventually("node1 shows the revocation", || async {
        let f = fleet(&c).await;
        match node_in(&f, "node1") {
            Some(n) if n["state"] == "revoked" => Ok(n.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(n["leased_bps"], 0, "{n}");
    assert_eq!(n["rate_bps"].as_f64(), Some(0.0), "{n}");
    assert_eq!(n["expires_in_ms"], Value::Null, "{n}");
    assert_eq!(n["scopes"][0]["state"], "revoked", "{n}");
    assert_eq!(n["scopes"][0]["lease_id"], id, "{n}");
    assert_eq!(n["scopes"][0]["bytes"], bytes, "{n}");

    // The session closes: the node is disconnected and stale.
    agent.close();
    let n = eventually("node1 goes stale once its session closes", || async {
        let f = fleet(&c).await;
        match node_in(&f, "node1") {
            Some(n) if n["connected"] == false => Ok(n.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(n["stale"], true, "{n}");
    assert!(n["last_report_unix_ms"].as_u64().is_some(), "{n}");
    c.stop().await;
}

// ---- series -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_holds_measured_rate_and_leased_steps() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let (mut agent, lease, _) = node1_leased(&c).await;
    let id = lease["id"].as_u64().expect("id");
    agent.feed(2).await;
    let bytes = 2 * BYTES_PER_REPORT;

    let path = "/v1/telemetry/series?node=node1&scope=egress";
    let v = eventually("the series holds the fed bytes", || async {
        let (st, v) = c.call("GET", path, None).await;
        if st != 200 {
            return Err(format!("{st} {v}"));
        }
        let sum: u64 = v["series"][0]["bytes"]
            .as_array()
            .map(|b| b.iter().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        if sum == bytes {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await;
    assert_eq!(v["node"], "node1", "{v}");
    assert_eq!(v["step_ms"], 1000, "{v}");
    let series = v["series"].as_array().expect("series");
    assert_eq!(series.len(), 1, "{v}");
    let s = &series[0];
    assert_eq!(s["scope"], "egress", "{s}");
    let t: Vec<u64> = s["t"]
        .as_array()
        .expect("t")
        .iter()
        .map(|x| x.as_u64().expect("t"))
        .collect();
    assert!(!t.is_empty(), "{s}");
    assert!(t.windows(2).all(|w| w[0] < w[1]), "ascending: {s}");
    assert!(t.iter().all(|x| x % 1000 == 0), "second starts: {s}");
    for col in ["rate_bps", "bytes", "packets", "dropped_packets", "state"] {
        assert_eq!(s[col].as_array().map(Vec::len), Some(t.len()), "{col}: {s}");
    }
    let rates = s["rate_bps"].as_array().expect("rates");
    assert_eq!(rates.last().and_then(Value::as_f64), Some(FED_BPS), "{s}");
    let packets: u64 = s["packets"]
        .as_array()
        .expect("packets")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(packets, 2 * PACKETS_PER_REPORT, "{s}");
    assert!(
        s["state"]
            .as_array()
            .expect("state")
            .iter()
            .all(|x| x == "active"),
        "{s}"
    );
    assert!(
        s.get("peak_rate_bps").is_none(),
        "1 s points have no peak: {s}"
    );
    let leased = s["leased"].as_array().expect("leased");
    assert_eq!(leased.len(), 1, "one step while the lease lasts: {s}");
    assert_eq!(leased[0]["leased_bps"], GRANT_BPS, "{s}");
    assert_eq!(leased[0]["floor_bps"], 0, "{s}");
    assert_eq!(leased[0]["volume_bytes"], VOLUME, "{s}");
    assert_eq!(leased[0]["lease_id"], id, "{s}");
    let granted_t = leased[0]["t"].as_u64().expect("t");

    // All scopes (no scope parameter) include it too.
    let (st, all) = c.call("GET", "/v1/telemetry/series?node=node1", None).await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(all["series"][0]["scope"], "egress", "{all}");

    // Revoked: a second step, at the floor with no lease.
    revoke(&c, id).await;
    let (st, v) = c.call("GET", path, None).await;
    assert_eq!(st, 200, "{v}");
    let leased = v["series"][0]["leased"].as_array().expect("leased").clone();
    assert_eq!(leased.len(), 2, "{v}");
    assert_eq!(leased[0]["lease_id"], id, "{v}");
    assert_eq!(leased[1]["leased_bps"], 0, "{v}");
    assert_eq!(leased[1]["lease_id"], Value::Null, "{v}");
    assert_eq!(leased[1]["floor_bps"], 0, "{v}");
    assert_eq!(leased[1]["volume_bytes"], Value::Null, "{v}");
    assert!(leased[1]["t"].as_u64().expect("t") >= granted_t, "{v}");

    // Per minute: served from the store (possibly still empty).
    let (st, v) = c.call("GET", &format!("{path}&step=1m"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["step_ms"], 60_000, "{v}");

    // Bad requests.
    let now = nicwarden_controller::core::now_ms();
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("{path}&step=5s"), 422, "step must be 1s"),
        (
            format!("{path}&since_ms={now}&until_ms={}", now - 1000),
            422,
            "is before since_ms",
        ),
        (format!("{path}&since_ms=1000"), 422, "use step=1m"),
        (
            "/v1/telemetry/series?node=node1&scope=sideways".into(),
            422,
            "scope must be `egress` or `peer:NODE`",
        ),
        (
            "/v1/telemetry/series?node=node1&scope=peer:".into(),
            422,
            "scope",
        ),
        ("/v1/telemetry/series".into(), 422, "node"),
        (
            "/v1/telemetry/series?node=node1&colour=red".into(),
            422,
            "colour",
        ),
        ("/v1/telemetry/series?node=ghost".into(), 404, "ghost"),
    ];
    for (p, want_st, want) in &cases {
        let (st, v) = c.call("GET", p, None).await;
        assert_eq!(st, *want_st, "GET {p}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(want), "GET {p}: `{e}` should mention `{want}`");
    }
    // No token.
    assert_eq!(c.status_without_token("GET", path).await, 401);
    agent.close();
    c.stop().await;
}

// ---- events -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_the_lease_life_cycle_and_filter() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let token = add_node(&c, "node1").await;
    let lease = grant(&c, "node1").await;
    let id = lease["id"].as_u64().expect("id");
    // Connecting re-issues the node's active lease on the new session.
    let mut agent = TestAgent::connect(&c, "node1", &token).await;
    assert_eq!(agent.lease().await.id.0, id);
    revoke(&c, id).await;
    match agent.directive().await {
        Directive::Revoke(r) => assert_eq!(r.lease_id.0, id),
        other => panic!("expected the revocation, got {other:?}"),
    }
    add_node(&c, "node2").await;

    let v = events(&c, "").await;
    assert_eq!(
        kinds(&v),
        [
            "node.added",
            "lease.granted",
            "node.enrolled",
            "agent.connected",
            "lease.revoked",
            "node.added"
        ],
        "{v}"
    );
    let all_ids = ids(&v);
    assert!(all_ids.windows(2).all(|w| w[1] == w[0] + 1), "{v}");
    assert_eq!(v["last_id"].as_u64(), all_ids.last().copied(), "{v}");
    assert_eq!(v["gap"], false, "{v}");
    let ev = v["events"].as_array().expect("events");
    for e in &ev[..5] {
        assert_eq!(e["node"], "node1", "{e}");
        assert!(e["t"].as_u64().expect("t") > 0, "{e}");
        assert!(!e["message"].as_str().expect("message").is_empty(), "{e}");
    }
    assert_eq!(ev[5]["node"], "node2");
    assert_eq!(ev[0]["lease_id"], Value::Null);
    assert_eq!(ev[1]["lease_id"], id);
    assert_eq!(ev[1]["scope"], "egress");
    assert_eq!(ev[1]["severity"], "info");
    assert_eq!(ev[3]["lease_id"], Value::Null);
    assert_eq!(ev[3]["severity"], "info");
    assert_eq!(ev[4]["lease_id"], id);
    assert_eq!(ev[4]["scope"], "egress");
    assert_eq!(ev[4]["severity"], "warning");
    assert!(
        ev[4]["message"]
            .as_str()
            .expect("message")
            .contains("revoked: test"),
        "{}",
        ev[4]
    );

    // Filters.
    let v = events(&c, "?kind=lease").await;
    assert_eq!(kinds(&v), ["lease.granted", "lease.revoked"], "{v}");
    let v = events(&c, "?kind=lease.revoked").await;
    assert_eq!(kinds(&v), ["lease.revoked"], "{v}");
    let v = events(&c, "?kind=lea").await;
    assert_eq!(
        kinds(&v),
        Vec::<String>::new(),
        "a prefix ends at a dot: {v}"
    );
    let v = events(&c, "?node=node2").await;
    assert_eq!(kinds(&v), ["node.added"], "{v}");
    let v = events(&c, "?node=node1").await;
    assert_eq!(ids(&v), all_ids[..5], "{v}");
    let v = events(&c, "?severity=warning").await;
    assert_eq!(kinds(&v), ["lease.revoked"], "{v}");
    let connected_id = all_ids[3];
    let v = events(&c, &format!("?since_id={connected_id}")).await;
    assert_eq!(ids(&v), all_ids[4..], "{v}");
    let v = events(&c, &format!("?since_id={}&kind=lease", all_ids[0])).await;
    assert_eq!(ids(&v), [all_ids[1], all_ids[4]], "{v}");
    let v = events(&c, &format!("?since_id={}", all_ids[5])).await;
    assert_eq!(ids(&v), Vec::<u64>::new(), "{v}");
    assert_eq!(v["last_id"], all_ids[5], "{v}");
    // The most recent `limit`, oldest first.
    let v = events(&c, "?limit=2").await;
    assert_eq!(ids(&v), all_ids[4..], "{v}");

    for (q, want) in [
        ("?severity=bogus", "severity"),
        ("?limit=0", "limit"),
        ("?limit=1000000", "limit"),
        ("?since_id=abc", "since_id"),
        ("?colour=red", "colour"),
    ] {
        let (st, v) = c.call("GET", &format!("/v1/events{q}"), None).await;
        assert_eq!(st, 422, "{q}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(want), "{q}: `{e}` should mention `{want}`");
    }
    assert_eq!(c.status_without_token("GET", "/v1/events").await, 401);

    // The session ends: agent.disconnected.
    agent.close();
    let v = eventually("agent.disconnected is recorded", || async {
        let v = events(&c, "?kind=agent.disconnected").await;
        if kinds(&v).len() == 1 {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await;
    assert_eq!(v["events"][0]["node"], "node1", "{v}");
    assert_eq!(v["events"][0]["severity"], "warning", "{v}");
    c.stop().await;
}

// ---- event stream -------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Frame {
    event: Option<String>,
    id: Option<u64>,
    data: String,
    comment: bool,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }
}

/// Reads a `text/event-stream` body incrementally.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
    frames: VecDeque<Frame>,
}

impl SseReader {
    /// Opens the stream; asserts 200 and the content type.
    async fn open(c: &Running, query: &str, last_event_id: Option<&str>) -> SseReader {
        let mut rb = c
            .http
            .get(format!("{}/v1/events/stream{query}", c.api))
            .bearer_auth(c.token());
        if let Some(l) = last_event_id {
            rb = rb.header("Last-Event-ID", l);
        }
        let resp = timeout(WAIT, rb.send())
            .await
            .expect("stream answers in time")
            .expect("stream request");
        assert_eq!(resp.status().as_u16(), 200, "stream{query}");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        SseReader {
            resp,
            buf: String::new(),
            frames: VecDeque::new(),
        }
    }

    fn parse(block: &str) -> Frame {
        let mut f = Frame::default();
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if line.starts_with(':') {
                f.comment = true;
            } else if let Some(v) = line.strip_prefix("event:") {
                f.event = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("id:") {
                f.id = Some(v.trim().parse().expect("numeric id"));
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        f.data = data.join("\n");
        f
    }

    /// The next frame (comments included), within [`WAIT`].
    async fn next(&mut self) -> Frame {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(f) = self.frames.pop_front() {
                return f;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = timeout(left, self.resp.chunk())
                .await
                .expect("a frame within 10 s")
                .expect("stream read")
                .expect("stream still open");
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                self.frames.push_back(Self::parse(&block));
            }
        }
    }

    /// Reads frames until one satisfies `pred` (within [`WAIT`] overall); returns it and
    /// the frames read before it.
    async fn until(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> (Frame, Vec<Frame>) {
        let mut before = Vec::new();
        let found = timeout(WAIT, async {
            loop {
                let f = self.next().await;
                if pred(&f) {
                    return f;
                }
                before.push(f);
            }
        })
        .await;
        match found {
            Ok(f) => (f, before),
            Err(_) => panic!("{what}: not within {WAIT:?}; frames seen: {before:?}"),
        }
    }

    /// Reads the replayed `event` frames up to and including id `last`.
    async fn replay_until(&mut self, last: u64) -> Vec<Frame> {
        let (f, mut before) = self
            .until(&format!("replay up to event {last}"), |f| {
                f.event.as_deref() == Some("event") && f.id == Some(last)
            })
            .await;
        before.push(f);
        before
    }
}

fn event_ids(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("event"))
        .map(|f| f.id.expect("event frames carry an id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_replays_then_streams_events_and_ticks() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let (mut agent, lease, _) = node1_leased(&c).await;
    let id = lease["id"].as_u64().expect("id");
    let stored = events(&c, "").await;
    let stored_ids = ids(&stored);
    let last = *stored_ids.last().expect("some events");
    assert!(stored_ids.len() >= 4, "{stored}");

    // Replay of everything stored, oldest first, each as it is in /v1/events.
    let mut s = SseReader::open(&c, "?since_id=0", None).await;
    let replay = s.replay_until(last).await;
    assert_eq!(event_ids(&replay), stored_ids, "{replay:?}");
    for (f, e) in replay
        .iter()
        .filter(|f| f.event.as_deref() == Some("event"))
        .zip(stored["events"].as_array().expect("events"))
    {
        assert_eq!(&f.json(), e, "{f:?}");
    }
    assert!(
        replay.iter().all(|f| f.event.as_deref() != Some("resync")),
        "{replay:?}"
    );

    // Fed usage shows up in a tick.
    agent.feed(2).await;
    let (tick, _) = s
        .until("a tick with node1 at the fed rate", |f| {
            f.event.as_deref() == Some("tick")
                && f.json()["nodes"].as_array().is_some_and(|ns| {
                    ns.iter()
                        .any(|n| n["node"] == "node1" && n["rate_bps"].as_f64() == Some(FED_BPS))
                })
        })
        .await;
    let t = tick.json();
    assert!(t["t"].as_u64().expect("t") > 0, "{t}");
    assert_eq!(tick.id, None, "ticks carry no id: {tick:?}");
    let n = t["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == "node1")
        .expect("node1");
    assert_eq!(n["state"], "active", "{n}");
    assert_eq!(n["leased_bps"], GRANT_BPS, "{n}");
    assert_eq!(n["scopes"][0]["bytes"], 2 * BYTES_PER_REPORT, "{n}");

    // A revocation made now arrives live, after the replayed ids.
    revoke(&c, id).await;
    let (f, skipped) = s
        .until("the live lease.revoked event", |f| {
            f.event.as_deref() == Some("event")
        })
        .await;
    assert!(
        skipped
            .iter()
            .all(|f| f.event.as_deref() == Some("tick") || f.comment),
        "{skipped:?}"
    );
    let e = f.json();
    assert_eq!(e["kind"], "lease.revoked", "{e}");
    assert_eq!(e["lease_id"], id, "{e}");
    assert_eq!(e["node"], "node1", "{e}");
    assert_eq!(f.id, Some(last + 1), "{f:?}");
    assert_eq!(e["id"], last + 1, "{e}");

    // Last-Event-ID: replay starts after it (and wins over since_id).
    let revoked_id = last + 1;
    let second = stored_ids[1];
    let mut s2 = SseReader::open(&c, "?since_id=0", Some(&second.to_string())).await;
    let replay = s2.replay_until(revoked_id).await;
    assert_eq!(
        event_ids(&replay),
        (second + 1..=revoked_id).collect::<Vec<_>>(),
        "{replay:?}"
    );
    let mut s3 = SseReader::open(&c, &format!("?since_id={last}"), None).await;
    let replay = s3.replay_until(revoked_id).await;
    assert_eq!(event_ids(&replay), [revoked_id], "{replay:?}");

    // Bad resume point, no token.
    let r = c
        .http
        .get(format!("{}/v1/events/stream", c.api))
        .bearer_auth(c.token())
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 422);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Last-Event-ID"),
        "{v}"
    );
    assert_eq!(
        c.status_without_token("GET", "/v1/events/stream").await,
        401
    );

    // The agent goes away: a tick shows node1 disconnected and stale.
    drop((s2, s3));
    agent.close();
    let (tick, _) = s
        .until("a tick with node1 stale", |f| {
            f.event.as_deref() == Some("tick")
                && f.json()["nodes"].as_array().is_some_and(|ns| {
                    ns.iter()
                        .any(|n| n["node"] == "node1" && n["stale"] == true)
                })
        })
        .await;
    let t = tick.json();
    let n = t["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == "node1")
        .expect("node1");
    assert_eq!(n["connected"], false, "{n}");
    assert_eq!(n["rate_bps"].as_f64(), Some(0.0), "{n}");
    drop(s);
    c.stop().await;
}

/// A dashboard left open must not keep the controller from stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_stops_with_an_event_stream_open() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    add_node(&c, "node1").await;
    let mut s = SseReader::open(&c, "", None).await;
    let (f, _) = s
        .until("the stored event", |f| f.event.as_deref() == Some("event"))
        .await;
    assert_eq!(f.json()["kind"], "node.added");
    // `stop` allows 10 s; the stream stays open on our side.
    c.stop().await;
    // The stream was ended cleanly by the server.
    let end = timeout(WAIT, async {
        loop {
            match s.resp.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("the stream ends once the controller stops");
    assert!(end.is_ok(), "{end:?}");
}

// ---- renew --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_renew_reissues_the_lease() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let token = add_node(&c, "node1").await;
    let mut agent = TestAgent::connect(&c, "node1", &token).await;
    let before = grant(&c, "node1").await;
    let id = before["id"].as_u64().expect("id");
    let first = agent.lease().await;
    assert_eq!(first.seq, before["seq"].as_u64().expect("seq"));
    // Let the controller's clock move on so the new deadline is later.
    let issued = before["issued_at"].as_u64().expect("issued_at");
    while nicwarden_controller::core::now_ms() <= issued + 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let (st, after) = c
        .call("POST", &format!("/v1/leases/{id}/renew"), None)
        .await;
    assert_eq!(st, 200, "{after}");
    assert_eq!(after["id"], id, "{after}");
    assert_eq!(after["state"], "active", "{after}");
    let seq = after["seq"].as_u64().expect("seq");
    assert!(seq > first.seq, "{before} -> {after}");
    assert!(
        after["expires_at"].as_u64() > before["expires_at"].as_u64(),
        "{before} -> {after}"
    );
    assert_eq!(
        after["renewals"].as_u64(),
        before["renewals"].as_u64().map(|r| r + 1),
        "{after}"
    );
    // The agent receives the re-issued lease, signed, with that seq.
    let l = agent.lease().await;
    assert_eq!((l.id.0, l.seq, l.rate_bps), (id, seq, GRANT_BPS));
    let v = events(&c, "?kind=lease.renewed").await;
    assert_eq!(v["events"][0]["lease_id"], id, "{v}");
    assert!(
        v["events"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("renewed by the operator"),
        "{v}"
    );

    // A revoked lease cannot be renewed: 409, saying why.
    revoke(&c, id).await;
    let (st, v) = c
        .call("POST", &format!("/v1/leases/{id}/renew"), None)
        .await;
    assert_eq!(st, 409, "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(&format!("lease {id} is revoked")) && e.contains("not active"),
        "{e}"
    );
    let (st, v) = c.call("POST", "/v1/leases/999/renew", None).await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = c.call("POST", "/v1/leases/abc/renew", None).await;
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("lease id"));
    assert_eq!(
        c.status_without_token("POST", &format!("/v1/leases/{id}/renew"))
            .await,
        401
    );
    agent.close();
    c.stop().await;
}

// ---- dashboard ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_is_served_without_token_with_a_csp() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let header = |r: &reqwest::Response, h: &str| -> String {
        r.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let r = c.http.get(format!("{}/", c.api)).send().await.expect("/");
    assert_eq!(r.status().as_u16(), 200);
    assert!(header(&r, "content-type").starts_with("text/html"));
    let csp = header(&r, "content-security-policy");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(r.text().await.expect("body").contains("<html"));
    for (file, ct) in [("app.js", "text/javascript"), ("style.css", "text/css")] {
        let r = c
            .http
            .get(format!("{}/assets/{file}", c.api))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status().as_u16(), 200, "{file}");
        assert!(header(&r, "content-type").starts_with(ct), "{file}");
        assert!(!header(&r, "content-security-policy").is_empty(), "{file}");
    }
    let r = c
        .http
        .get(format!("{}/assets/nope.js", c.api))
        .send()
        .await
        .expect("asset");
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.expect("json error");
    assert!(v["error"].as_str().unwrap_or_default().contains("nope.js"));
    c.stop().await;
}
