//! The agent-facing gRPC service over mutual TLS, and the TLS listener that feeds it.
//!
//! tonic's own TLS config cannot take a `rustls::ServerConfig`, so the listener terminates
//! TLS itself with the config from `nicwarden-pki` (one place for TLS policy) and hands tonic
//! connections that carry the peer's certificate as connect info.

use crate::core::{ApiErrorKind, Controller};
use nicwarden_lease::LeaseId;
use nicwarden_proto::pb;
use nicwarden_proto::pb::agent_service_server::AgentService;
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new session may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The client certificate, verified against our CA by rustls, if one was presented.
    pub cert: Option<CertificateDer<'static>>,
}

/// A TLS connection accepted by [`tls_incoming`].
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow or hostile
/// client cannot stall the accept loop); failed handshakes are logged and dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on agent port failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let cert = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.clone().into_owned());
                        let conn = TlsConn {
                            inner: tls,
                            info: PeerInfo { remote, cert },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn status(e: crate::core::ApiError) -> Status {
    match e.kind {
        ApiErrorKind::Invalid => Status::invalid_argument(e.message),
        ApiErrorKind::NotFound => Status::not_found(e.message),
        ApiErrorKind::Conflict => Status::failed_precondition(e.message),
        ApiErrorKind::Forbidden => Status::permission_denied(e.message),
        ApiErrorKind::Unauthenticated => Status::unauthenticated(e.message),
        ApiErrorKind::Internal => Status::internal(e.message),
    }
}

/// The `AgentService` implementation.
pub struct AgentSvc {
    pub ctl: Arc<Controller>,
}

#[tonic::async_trait]
impl AgentService for AgentSvc {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = req.into_inner();
        self.ctl
            .enroll(&r.node, &r.token, &r.csr_pem)
            .map(Response::new)
            .map_err(status)
    }

    type SessionStream = ReceiverStream<Result<pb::ControllerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let refused = |m: &str| {
            self.ctl.metrics.session_refusals.inc();
            Status::unauthenticated(m.to_string())
        };
        let cert = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.cert.clone())
            .ok_or_else(|| refused("a client certificate is required: enroll first"))?;
        let (node, fingerprint) = nicwarden_pki::node_identity_from_cert(&cert)
            .map_err(|e| refused(&format!("client certificate: {e}")))?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Some(Ok(_))) => {
                return Err(Status::invalid_argument(
                    "session: the first message must be Hello",
                ))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(Status::cancelled("session: closed before Hello")),
            Err(_) => return Err(Status::deadline_exceeded("session: no Hello within 10 s")),
        };
        let (tx, rx) = mpsc::channel(256);
        // The reader keeps only a weak handle: when the controller drops the session (node
        // removed, re-enrolled, replaced by a newer session), the outbound stream ends and
        // the agent sees it.
        let weak = tx.downgrade();
        let sid = self.ctl.connect(&node, &fingerprint, &hello, tx)?;
        let ctl = self.ctl.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                if !ctl.session_current(&node, sid) {
                    break;
                }
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::info!(%node, error = %e, "session stream error");
                        break;
                    }
                };
                match msg.msg {
                    Some(pb::agent_message::Msg::Renew(r)) => {
                        if let Err(e) = ctl.renew(&node, LeaseId(r.lease_id)) {
                            tracing::info!(%node, lease = r.lease_id, error = %e, "renewal refused");
                            if let Some(tx) = weak.upgrade() {
                                let _ = tx.try_send(Ok(pb::ControllerMessage {
                                    msg: Some(pb::controller_message::Msg::Error(
                                        pb::SessionError {
                                            message: e.message,
                                            lease_id: r.lease_id,
                                        },
                                    )),
                                }));
                            }
                        }
                    }
                    Some(pb::agent_message::Msg::Usage(u)) => ctl.record_usage(&node, &u),
                    Some(pb::agent_message::Msg::MeshKey(m)) => {
                        if let Err(e) = ctl.mesh_key(&node, &m) {
                            tracing::warn!(%node, error = %e, "mesh key refused");
                            if let Some(tx) = weak.upgrade() {
                                let _ = tx.try_send(Ok(pb::ControllerMessage {
                                    msg: Some(pb::controller_message::Msg::Error(
                                        pb::SessionError {
                                            message: e.message,
                                            lease_id: 0,
                                        },
                                    )),
                                }));
                            }
                        }
                    }
                    Some(pb::agent_message::Msg::ProbeReport(r)) => ctl.probe_report(&node, &r),
                    Some(pb::agent_message::Msg::PeerBytes(r)) => {
                        crate::topology::peer_bytes(&ctl, &node, &r)
                    }
                    Some(pb::agent_message::Msg::Tamper(t)) => {
                        ctl.tamper(&node, &t.reason, t.detected_unix_ms);
                        break;
                    }
                    Some(pb::agent_message::Msg::Hello(_)) | None => {
                        tracing::info!(%node, "unexpected message on session; ignored");
                    }
                }
            }
            ctl.disconnect(&node, sid);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
