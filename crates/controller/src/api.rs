//! The operator HTTP/JSON API (axum): bearer-token authentication, JSON errors with the
//! right status codes, `/metrics` and `/openapi.json`.

use crate::api_types::*;
use crate::core::{ApiError, ApiErrorKind, Controller};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nicwarden_lease::LeaseId;
use nicwarden_store::AuditLog;
use serde::Deserialize;
use std::sync::Arc;

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Clone)]
pub struct ApiState {
    pub ctl: Arc<Controller>,
    /// SHA-256 of the operator token (the token itself is not kept in memory).
    pub token_hash: [u8; 32],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.kind {
            ApiErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorKind::NotFound => StatusCode::NOT_FOUND,
            ApiErrorKind::Conflict => StatusCode::CONFLICT,
            ApiErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ApiErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if code == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.message, "operator API internal error");
        }
        (
            code,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

fn body<T>(r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    r.map(|Json(t)| t).map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ApiErrorKind::Invalid,
            "request body must be JSON (Content-Type: application/json)",
        ),
        other => ApiError::invalid(format!("request body: {}", other.body_text())),
    })
}

fn query<T>(r: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    r.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))
}

fn lease_id(s: &str) -> Result<LeaseId, ApiError> {
    s.parse::<u64>()
        .map(LeaseId)
        .map_err(|_| ApiError::invalid(format!("lease id must be a number, got `{s}`")))
}

async fn auth(
    State(st): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = presented.is_some_and(|t| {
        use sha2::Digest;
        let h: [u8; 32] = sha2::Sha256::digest(t.trim().as_bytes()).into();
        // Both sides are hashes of fixed length, so comparing them leaks nothing useful
        // about the token itself.
        h == st.token_hash
    });
    if !ok {
        return ApiError::new(
            ApiErrorKind::Unauthenticated,
            "missing or wrong operator token (Authorization: Bearer <token>; the controller wrote it to <data_dir>/operator.token)",
        )
        .into_response();
    }
    next.run(req).await
}

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/nodes", get(list_nodes).post(add_node))
        .route("/nodes/{name}", get(get_node).delete(remove_node))
        .route("/nodes/{name}/token", post(node_token))
        .route("/nodes/{name}/rotate-key", post(rotate_key))
        .route("/nodes/{name}/tamper", post(declare_tamper))
        .route("/leases", get(list_leases).post(grant))
        .route("/leases/{id}", get(get_lease).put(amend))
        .route("/leases/{id}/revoke", post(revoke))
        .route("/leases/{id}/renew", post(renew))
        .route("/telemetry/fleet", get(fleet))
        .route("/telemetry/series", get(series))
        .route("/events", get(events))
        .route("/events/stream", get(event_stream))
        .route("/topology", get(get_topology).put(apply_topology))
        .route("/topology/status", get(topology_status))
        .route("/topology/versions", get(topology_versions))
        .route("/topology/versions/{version}", get(topology_version))
        .route("/quota", get(get_quota))
        .route("/quota/{name}", axum::routing::put(set_quota))
        .route("/audit", get(audit))
        .route("/audit/verify", get(audit_verify))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(crate::dashboard::index))
        .route("/assets/{file}", get(crate::dashboard::asset))
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics(State(st): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.ctl.metrics.encode(),
    )
}

async fn list_nodes(State(st): State<ApiState>) -> Json<Vec<NodeView>> {
    Json(st.ctl.list_nodes())
}

async fn add_node(
    State(st): State<ApiState>,
    req: Result<Json<AddNodeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AddNodeResponse>), ApiError> {
    let r = st.ctl.add_node(body(req)?)?;
    Ok((StatusCode::CREATED, Json(r)))
}

async fn get_node(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    st.ctl.get_node(&name).map(Json)
}

async fn remove_node(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    st.ctl.remove_node(&name).map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    ttl_s: Option<u64>,
}

async fn node_token(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<TokenQuery>, QueryRejection>,
) -> Result<Json<AddNodeResponse>, ApiError> {
    let q = query(q)?;
    st.ctl.node_token(&name, q.ttl_s).map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseQuery {
    node: Option<String>,
    state: Option<String>,
}

async fn list_leases(
    State(st): State<ApiState>,
    q: Result<Query<LeaseQuery>, QueryRejection>,
) -> Result<Json<Vec<LeaseView>>, ApiError> {
    let q = query(q)?;
    st.ctl
        .list_leases(q.node.as_deref(), q.state.as_deref())
        .map(Json)
}

async fn grant(
    State(st): State<ApiState>,
    req: Result<Json<GrantRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<LeaseView>), ApiError> {
    let v = st.ctl.grant(body(req)?)?;
    Ok((StatusCode::CREATED, Json(v)))
}

async fn get_lease(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    st.ctl.get_lease(lease_id(&id)?).map(Json)
}

async fn amend(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    req: Result<Json<AmendRequest>, JsonRejection>,
) -> Result<Json<LeaseView>, ApiError> {
    let id = lease_id(&id)?;
    st.ctl.amend(id, body(req)?).map(Json)
}

async fn revoke(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    req: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<LeaseView>, ApiError> {
    let id = lease_id(&id)?;
    // An empty body is fine: the reason is optional.
    let reason = match req {
        Ok(Json(r)) => r.reason,
        Err(JsonRejection::MissingJsonContentType(_)) => None,
        Err(e) => {
            return Err(ApiError::invalid(format!(
                "request body: {}",
                e.body_text()
            )))
        }
    };
    let reason = reason.unwrap_or_else(|| "revoked by operator".into());
    st.ctl.revoke(id, &reason).map(Json)
}

/// An optional `{"reason": ...}` body (absent body: `default`).
fn reason_of(
    req: Result<Json<RevokeRequest>, JsonRejection>,
    default: &str,
) -> Result<String, ApiError> {
    match req {
        Ok(Json(r)) => Ok(r.reason.unwrap_or_else(|| default.to_string())),
        Err(JsonRejection::MissingJsonContentType(_)) => Ok(default.to_string()),
        Err(e) => Err(ApiError::invalid(format!(
            "request body: {}",
            e.body_text()
        ))),
    }
}

async fn rotate_key(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    req: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<NodeView>), ApiError> {
    let reason = reason_of(req, "operator request")?;
    st.ctl.request_rotation(&name, &reason)?;
    st.ctl.audit_operator(
        "mesh.rotate_key",
        serde_json::json!({"node": name, "reason": reason}),
    );
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(st.ctl.get_node(&name)?),
    ))
}

/// The operator declares a node tampered (an enclosure alarm seen by another system).
async fn declare_tamper(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    req: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<NodeView>, ApiError> {
    let reason = reason_of(req, "declared by the operator")?;
    st.ctl.get_node(&name)?;
    st.ctl.tamper(&name, &reason, crate::core::now_ms());
    st.ctl.get_node(&name).map(Json)
}

async fn get_topology(
    State(st): State<ApiState>,
) -> Result<Json<crate::topology::TopologyView>, ApiError> {
    crate::topology::current(&st.ctl).map(Json)
}

async fn apply_topology(
    State(st): State<ApiState>,
    req: Result<Json<crate::topology::ApplyTopologyRequest>, JsonRejection>,
) -> Result<Json<crate::topology::TopologyView>, ApiError> {
    crate::topology::apply(&st.ctl, body(req)?).map(Json)
}

async fn topology_status(State(st): State<ApiState>) -> Json<crate::topology::TopologyStatus> {
    Json(crate::topology::status(&st.ctl))
}

async fn topology_versions(
    State(st): State<ApiState>,
) -> Result<Json<Vec<crate::topology::VersionView>>, ApiError> {
    crate::topology::versions(&st.ctl).map(Json)
}

async fn topology_version(
    State(st): State<ApiState>,
    Path(version): Path<String>,
) -> Result<Json<crate::topology::TopologyView>, ApiError> {
    let v = version.parse::<u64>().map_err(|_| {
        ApiError::invalid(format!(
            "topology version must be a number, got `{version}`"
        ))
    })?;
    crate::topology::version(&st.ctl, v).map(Json)
}

async fn get_quota(State(st): State<ApiState>) -> Json<QuotaView> {
    Json(st.ctl.quota())
}

async fn set_quota(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    req: Result<Json<SetQuotaRequest>, JsonRejection>,
) -> Result<Json<QuotaView>, ApiError> {
    st.ctl.set_quota(&name, body(req)?).map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn audit(
    State(st): State<ApiState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<nicwarden_store::AuditEntry>>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(st.ctl.store().entries(q.from.unwrap_or(0), limit)?))
}

async fn audit_verify(State(st): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    use nicwarden_store::AuditVerification;
    let v = st.ctl.store().verify()?;
    Ok(Json(match v {
        AuditVerification::Intact { entries, head_hash } => serde_json::json!({
            "ok": true, "entries": entries, "first_broken": null, "head_hash": head_hash,
            "message": format!("audit log intact: {entries} entries, head {head_hash}"),
        }),
        AuditVerification::Broken { index, reason } => serde_json::json!({
            "ok": false, "entries": index, "first_broken": index, "head_hash": null,
            "message": format!("audit log broken at entry {index}: {reason}"),
        }),
    }))
}

async fn renew(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<LeaseView>, ApiError> {
    st.ctl.renew_by_operator(lease_id(&id)?).map(Json)
}

async fn fleet(State(st): State<ApiState>) -> Result<Json<FleetView>, ApiError> {
    let ctl = st.ctl.clone();
    // Up to a whole fleet's worth of JSON: built off the async workers.
    tokio::task::spawn_blocking(move || ctl.fleet())
        .await
        .map(Json)
        .map_err(|e| ApiError::new(ApiErrorKind::Internal, format!("fleet view: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesQuery {
    node: String,
    scope: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    step: Option<String>,
}

async fn series(
    State(st): State<ApiState>,
    q: Result<Query<SeriesQuery>, QueryRejection>,
) -> Result<Json<SeriesResponse>, ApiError> {
    let q = query(q)?;
    let now = crate::core::now_ms();
    let step_ms = match q.step.as_deref().unwrap_or("1s") {
        "1s" => 1000,
        "1m" => 60_000,
        other => {
            return Err(ApiError::invalid(format!(
                "step must be 1s (in-memory history) or 1m (per-minute store), got `{other}`"
            )))
        }
    };
    let until = q.until_ms.unwrap_or(now);
    let default_window = if step_ms == 1000 { 300_000 } else { 3_600_000 };
    let since = q.since_ms.unwrap_or(until.saturating_sub(default_window));
    if until < since {
        return Err(ApiError::invalid(format!(
            "until_ms ({until}) is before since_ms ({since})"
        )));
    }
    if step_ms == 1000 {
        let secs = st.ctl.live.telemetry().config().history_secs as u64;
        if since + secs * 1000 + 1000 < now {
            return Err(ApiError::invalid(format!(
                "step=1s covers the last {secs} s; since_ms is older: use step=1m for older data"
            )));
        }
    } else if since + st.ctl.live.minute_retention_ms + 60_000 < now {
        return Err(ApiError::invalid(format!(
            "step=1m covers the last {} h; since_ms is older",
            st.ctl.live.minute_retention_ms / 3_600_000
        )));
    }
    if let Some(s) = &q.scope {
        s.parse::<nicwarden_lease::Scope>()
            .map_err(|e| ApiError::invalid(format!("scope: {e}")))?;
    }
    st.ctl
        .series(&q.node, q.scope.as_deref(), since, until, step_ms)
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since_id: Option<u64>,
    limit: Option<usize>,
    kind: Option<String>,
    node: Option<String>,
    severity: Option<String>,
}

fn event_filter(q: &EventsQuery) -> Result<nicwarden_telemetry::EventFilter, ApiError> {
    let min_severity = match q.severity.as_deref() {
        None | Some("") => None,
        Some(s) => Some(nicwarden_telemetry::Severity::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "severity must be info, warning or critical, got `{s}`"
            ))
        })?),
    };
    Ok(nicwarden_telemetry::EventFilter {
        kind: q.kind.clone().filter(|k| !k.is_empty()),
        node: q.node.clone().filter(|n| !n.is_empty()),
        min_severity,
    })
}

async fn events(
    State(st): State<ApiState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsResponse>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(200);
    if limit == 0 || limit > crate::live::EVENT_LOG_CAPACITY {
        return Err(ApiError::invalid(format!(
            "limit must be between 1 and {}",
            crate::live::EVENT_LOG_CAPACITY
        )));
    }
    let f = event_filter(&q)?;
    let s = st.ctl.live.events_since(q.since_id.unwrap_or(0), limit, &f);
    Ok(Json(EventsResponse {
        events: s.events,
        last_id: s.last_id,
        first_id: s.first_id,
        gap: s.gap,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    since_id: Option<u64>,
}

/// `text/event-stream`: stored events after `since_id` (or `Last-Event-ID`), then live
/// events and ticks. A subscriber that falls behind gets `resync` and carries on.
async fn event_stream(
    State(st): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use tokio::sync::broadcast::error::RecvError;
    let q = query(q)?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be an event id (a number)"))?,
        ),
    };
    let after = last_event_id.or(q.since_id).unwrap_or(0);
    let (backlog, rx) = st.ctl.live.subscribe(after);
    let mut first: Vec<Sse> = Vec::new();
    if backlog.gap {
        first.push(Sse::default().event("resync").data("{}"));
    }
    // Live frames after the newest stored one are new, whatever id the client sent (an id
    // from another controller life may be above them).
    let mut last = after.min(backlog.last_id);
    for e in backlog.events {
        last = e.id;
        if let Ok(json) = serde_json::to_string(&e) {
            first.push(
                Sse::default()
                    .event("event")
                    .id(e.id.to_string())
                    .data(json),
            );
        }
    }
    let live = futures::stream::unfold((rx, last), |(mut rx, last)| async move {
        loop {
            match rx.recv().await {
                Ok(f) => match &*f {
                    crate::live::Frame::Event { id, json } => {
                        // Already sent in the backlog.
                        if *id <= last {
                            continue;
                        }
                        let ev = Sse::default()
                            .event("event")
                            .id(id.to_string())
                            .data(json.as_str());
                        return Some((Ok::<_, std::convert::Infallible>(ev), (rx, *id)));
                    }
                    crate::live::Frame::Tick { json } => {
                        let ev = Sse::default().event("tick").data(json.as_str());
                        return Some((Ok(ev), (rx, last)));
                    }
                },
                Err(RecvError::Lagged(n)) => {
                    tracing::info!(
                        skipped = n,
                        "event stream subscriber fell behind; asking it to resync"
                    );
                    let ev = Sse::default().event("resync").data("{}");
                    return Some((Ok(ev), (rx, last)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    use futures::StreamExt;
    // Ends when the controller stops, so the server can drain its connections.
    let stream = futures::stream::iter(first.into_iter().map(Ok))
        .chain(live)
        .take_until(st.ctl.live.closed());
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(std::time::Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response())
}
