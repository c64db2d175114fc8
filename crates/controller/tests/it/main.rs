//! Integration tests of the controller in-process: the operator API against its OpenAPI
//! document, bad input, and mutual-TLS refusals on the agent port.

use nicwarden_controller::ControllerConfig;
use nicwarden_proto::pb;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod mesh;
mod telemetry;
mod topology;

pub(crate) struct Running {
    pub(crate) api: String,
    pub(crate) agent: String,
    pub(crate) dir: PathBuf,
    pub(crate) http: reqwest::Client,
    ctl: nicwarden_controller::InProcess,
}

impl Running {
    pub(crate) async fn start(dir: &Path) -> Running {
        let ctl = nicwarden_controller::InProcess::start(ControllerConfig {
            data_dir: dir.to_path_buf(),
            ..ControllerConfig::default()
        })
        .await
        .expect("start the controller");
        Running {
            api: ctl.api.clone(),
            agent: format!("https://{}", ctl.agent),
            dir: dir.to_path_buf(),
            http: reqwest::Client::new(),
            ctl,
        }
    }

    pub(crate) fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("operator.token"))
            .expect("token")
            .trim()
            .to_string()
    }

    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{path}", self.api))
            .bearer_auth(self.token());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let st = r.status().as_u16();
        let text = r.text().await.expect("text");
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The status of a request made without the operator token.
    pub(crate) async fn status_without_token(&self, method: &str, path: &str) -> u16 {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        self.http
            .request(m, format!("{}{path}", self.api))
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    }

    pub(crate) async fn stop(self) {
        self.ctl
            .stop()
            .await
            .expect("the controller stops cleanly within 10 s");
    }
}

/// An agent's session as a test holds it: messages to the controller go into `tx`.
pub(crate) struct Session {
    pub(crate) tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub(crate) inbound: tonic::Streaming<pb::ControllerMessage>,
    pub(crate) _client: pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
}

/// Adds `node` (an existing node gets a fresh join token instead, when `add` is false) and
/// enrolls it into `<data dir>/agent-<dir>`; its identity and session TLS.
pub(crate) async fn enroll_as(
    c: &Running,
    node: &str,
    dir: &str,
    add: bool,
) -> (nicwarden_agent::identity::Identity, rustls::ClientConfig) {
    let (method, path) = if add {
        ("POST", "/v1/nodes".to_string())
    } else {
        ("POST", format!("/v1/nodes/{node}/token"))
    };
    let body = add.then(|| json!({ "name": node }));
    let (st, v) = c.call(method, &path, body).await;
    assert!(st == 201 || st == 200, "{method} {path}: {st} {v}");
    let token = v["join_token"].as_str().expect("join token").to_string();
    let ident = tokio::time::timeout(
        Duration::from_secs(10),
        nicwarden_agent::identity::enroll(
            &c.dir.join(format!("agent-{dir}")),
            node,
            &c.agent,
            &token,
        ),
    )
    .await
    .expect("enrollment answers in time")
    .expect("enroll");
    let tls = nicwarden_pki::agent_client_config(&ident.ca_pem, &ident.cert_pem, &ident.key)
        .expect("client config");
    (ident, tls)
}

/// Opens a session and sends `hello`; the controller's refusal is the error.
pub(crate) async fn open_session(
    c: &Running,
    tls: rustls::ClientConfig,
    hello: pb::Hello,
) -> Result<Session, tonic::Status> {
    let wait = Duration::from_secs(10);
    let ch = tokio::time::timeout(wait, nicwarden_agent::transport::connect(&c.agent, tls))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    })
    .await
    .expect("queue hello");
    let inbound = tokio::time::timeout(
        wait,
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("session answers in time")?
    .into_inner();
    Ok(Session {
        tx,
        inbound,
        _client: client,
    })
}

pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let doc: Value = c
        .http
        .get(format!("{}/openapi.json", c.api))
        .send()
        .await
        .expect("get openapi")
        .json()
        .await
        .expect("openapi is JSON");
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let paths = doc["paths"].as_object().expect("paths");
    assert!(
        paths.len() >= 20,
        "the document lists the API: {}",
        paths.len()
    );
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{name}", "node-x")
            .replace("{id}", "999")
            .replace("{file}", "app.js");
        for method in ops.as_object().expect("ops").keys() {
            if !["get", "post", "put", "delete"].contains(&method.as_str()) {
                continue;
            }
            let documented_sse = ops[method.as_str()]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some();
            if documented_sse {
                // An event stream never ends: check its status and type, not its body.
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.http
                        .request(
                            reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                                .expect("method"),
                            format!("{}{concrete}", c.api),
                        )
                        .bearer_auth(c.token())
                        .send(),
                )
                .await
                .expect("stream answers within 10 s")
                .expect("request");
                let ct = r
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                assert_eq!(r.status().as_u16(), 200, "{method} {path}");
                assert!(ct.starts_with("text/event-stream"), "{method} {path}: {ct}");
                drop(r);
                checked += 1;
                continue;
            }
            let body = matches!(method.as_str(), "post" | "put").then(|| json!({}));
            let (st, v) = c.call(&method.to_uppercase(), &concrete, body).await;
            // Served: anything but "no such route" (our fallback) or 405.
            let fallback = v["error"]
                .as_str()
                .is_some_and(|e| e.contains("no such route"));
            assert!(
                !fallback && st != 405,
                "{method} {path} is documented but not served: {st} {v}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 24, "checked {checked} operations");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let (st, v) = c
        .call("POST", "/v1/nodes", Some(json!({"name": "node1"})))
        .await;
    assert_eq!(st, 201, "{v}");
    // (method, path, body, expected status, the error must mention)
    let cases: &[(&str, &str, Option<Value>, u16, &str)] = &[
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 0})),
            422,
            "rate must be > 0",
        ),
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": "fast"})),
            422,
            "rate_bps",
        ),
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 1000, "colour": "red"})),
            422,
            "colour",
        ),
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 1000, "scope": "sideways"})),
            422,
            "scope",
        ),
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 1000, "ttl_s": -1})),
            422,
            "ttl_s",
        ),
        (
            "POST",
            "/v1/leases",
            Some(json!({"node": "ghost", "rate_bps": 1000})),
            404,
            "ghost",
        ),
        ("GET", "/v1/leases/abc", None, 422, "lease id"),
        ("GET", "/v1/leases?state=sideways", None, 422, "state"),
        (
            "POST",
            "/v1/nodes",
            Some(json!({"name": "Bad Name!"})),
            422,
            "name",
        ),
        (
            "POST",
            "/v1/nodes",
            Some(json!({"name": "node1"})),
            409,
            "node1",
        ),
        (
            "PUT",
            "/v1/quota/fabric",
            Some(json!({"capacity_bps": 0})),
            422,
            "capacity",
        ),
    ];
    for (method, path, body, want_st, want) in cases {
        let (st, v) = c.call(method, path, body.clone()).await;
        assert_eq!(st, *want_st, "{method} {path}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.contains(want),
            "{method} {path}: `{e}` should mention `{want}`"
        );
    }

    // Oversubscription of a static fabric is refused with numbers.
    let (st, _) = c
        .call(
            "PUT",
            "/v1/quota/fabric",
            Some(json!({"capacity_bps": 1000})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = c
        .call(
            "POST",
            "/v1/leases",
            Some(json!({"node": "node1", "rate_bps": 2000})),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("oversubscribed"),
        "{v}"
    );
    // Not JSON at all.
    let r = c
        .http
        .post(format!("{}/v1/leases", c.api))
        .bearer_auth(c.token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 422);
    // No token, wrong token.
    let r = c
        .http
        .get(format!("{}/v1/nodes", c.api))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .http
        .get(format!("{}/v1/nodes", c.api))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // The controller is still fine after all that.
    let (st, _) = c.call("GET", "/v1/nodes", None).await;
    assert_eq!(st, 200);
    c.stop().await;
}

/// Opens a session with the given TLS config and Hello; returns the gRPC status if refused.
async fn session_with(
    agent: &str,
    tls: rustls::ClientConfig,
    node: &str,
) -> Result<(), tonic::Status> {
    let ch = match nicwarden_agent::transport::connect(agent, tls).await {
        Ok(ch) => ch,
        Err(e) => return Err(tonic::Status::unavailable(format!("{e:#}"))),
    };
    let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            node: node.into(),
            last_seq: 0,
            agent_version: "test".into(),
            ..Default::default()
        })),
    };
    // Keep the request stream open: a refused session must be refused by the controller,
    // not by our stream ending.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello).await.expect("queue hello");
    let resp = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    let mut inbound = resp.into_inner();
    // Accepted: the stream stays open (no message is due without leases).
    match tokio::time::timeout(Duration::from_millis(300), inbound.message()).await {
        Err(_) => Ok(()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refusals() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let (st, v) = c
        .call("POST", "/v1/nodes", Some(json!({"name": "node1"})))
        .await;
    assert_eq!(st, 201);
    let token = v["join_token"].as_str().expect("token").to_string();
    let (st, _) = c
        .call("POST", "/v1/nodes", Some(json!({"name": "node2"})))
        .await;
    assert_eq!(st, 201);
    let agent_dir = d.path().join("agent1");
    let ident = nicwarden_agent::identity::enroll(&agent_dir, "node1", &c.agent, &token)
        .await
        .expect("enroll");
    let good = || {
        nicwarden_pki::agent_client_config(&ident.ca_pem, &ident.cert_pem, &ident.key)
            .expect("client config")
    };
    // The enrolled identity is accepted.
    session_with(&c.agent, good(), "node1")
        .await
        .expect("accepted");

    // No client certificate: refused.
    let tok = nicwarden_pki::JoinToken::parse(&token).expect("token");
    let nocert = nicwarden_pki::enrollment_client_config(tok.ca_fingerprint).expect("config");
    let e = session_with(&c.agent, nocert, "node1")
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("client certificate is required"),
        "{e:?}"
    );

    // Presenting node1's certificate while claiming to be node2: refused.
    let e = session_with(&c.agent, good(), "node2")
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("certificate is for node node1"),
        "{e:?}"
    );

    // A certificate from another CA: the TLS handshake itself fails.
    let other = tmp();
    let rogue_ca =
        nicwarden_pki::ControllerIdentity::load_or_create(other.path(), &["localhost".into()])
            .expect("rogue CA");
    let key = nicwarden_pki::NodeKey::generate().expect("key");
    let (cert, _) = rogue_ca
        .issue_node_cert("node1", &key.csr_pem("node1").expect("csr"), 1)
        .expect("rogue cert");
    let rogue = nicwarden_pki::agent_client_config(&ident.ca_pem, &cert, &key).expect("config");
    let e = session_with(&c.agent, rogue, "node1")
        .await
        .expect_err("refused");
    assert_ne!(e.code(), tonic::Code::Ok);

    // After the node is removed its certificate no longer opens a session.
    let (st, _) = c.call("DELETE", "/v1/nodes/node1", None).await;
    assert_eq!(st, 200);
    let e = session_with(&c.agent, good(), "node1")
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_controller_on_same_data_dir_is_refused() {
    let d = tmp();
    let c = Running::start(d.path()).await;
    let agent_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cfg = ControllerConfig {
        data_dir: d.path().to_path_buf(),
        ..ControllerConfig::default()
    };
    let err = nicwarden_controller::serve(cfg, agent_l, api_l, async {})
        .await
        .expect_err("refused");
    assert!(format!("{err:#}").contains("another controller"), "{err:#}");
    c.stop().await;
}
