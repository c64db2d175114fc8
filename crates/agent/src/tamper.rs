//! Tamper inputs (a Unix socket and a watched file) and the persisted tamper record.
//!
//! A tamper event is final for this enrollment. The agent's loop handles it in a fixed
//! order: block the fabric, destroy the WireGuard keys and drop every peer, persist this
//! record, then tell the controller. The record makes a restarted agent come up tampered
//! (fabric blocked, no mesh) and report again; only a re-enrollment with a new join token
//! clears it.
//!
//! The socket speaks one line each way: `tamper REASON\n` in, `ok ...\n` or `error ...\n`
//! out, the reply sent once the fabric is blocked. The watched file is read every
//! `watch_interval_ms`: sysfs GPIO values and most sensor files do not support inotify,
//! and reading a small file that often costs nothing.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

const RECORD_FILE: &str = "tamper.json";
/// Longest reason accepted (bytes); the line limit of the socket protocol.
const MAX_LINE: usize = 1024;

/// Why and when this node was tampered with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TamperRecord {
    pub reason: String,
    /// Where it came from: `socket`, `watch:PATH`, `restart` (record found at start).
    pub source: String,
    pub detected_unix_ms: u64,
}

pub fn load(dir: &Path) -> anyhow::Result<Option<TamperRecord>> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "read tamper record {}: not valid (fix or remove it only after re-enrolling)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read tamper record {}", path.display())),
    }
}

/// Writes the record durably (mode 0600, temp file, fsync, rename, fsync of the directory).
pub fn save(dir: &Path, rec: &TamperRecord) -> anyhow::Result<()> {
    let path = dir.join(RECORD_FILE);
    let body = serde_json::to_vec_pretty(rec).context("encode tamper record")?;
    nicwarden_pki::write_private(&path, &body)
        .with_context(|| format!("write tamper record {}", path.display()))
}

pub fn clear(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(RECORD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove tamper record {}", path.display())),
    }
}

/// A tamper event for the agent's loop; `reply` gets the outcome once the fabric is blocked.
pub struct TamperRequest {
    pub reason: String,
    pub source: String,
    pub reply: Option<oneshot::Sender<String>>,
}

/// Whether a watched file's content means "tampered": anything but empty or `0`.
pub fn watched_value_is_tamper(content: &str) -> bool {
    let v = content.trim();
    !v.is_empty() && v != "0"
}

/// Listens on the tamper socket (mode 0600). A stale socket file is replaced.
pub fn serve_socket(
    path: PathBuf,
    tx: mpsc::Sender<TamperRequest>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("remove stale tamper socket {}", path.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind tamper socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 tamper socket {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let (conn, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "tamper socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let mut rd = BufReader::new(rd).take(MAX_LINE as u64 + 1);
                let mut line = String::new();
                let reply =
                    match tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line))
                        .await
                    {
                        Ok(Ok(_)) => match parse_line(&line) {
                            Ok(reason) => {
                                let (otx, orx) = oneshot::channel();
                                let req = TamperRequest {
                                    reason,
                                    source: "socket".into(),
                                    reply: Some(otx),
                                };
                                if tx.send(req).await.is_err() {
                                    "error agent stopping\n".to_string()
                                } else {
                                    match orx.await {
                                        Ok(outcome) => format!("{outcome}\n"),
                                        Err(_) => "error agent stopping\n".to_string(),
                                    }
                                }
                            }
                            Err(e) => format!("error {e}\n"),
                        },
                        Ok(Err(e)) => format!("error read: {e}\n"),
                        Err(_) => "error no request line within 5 s\n".to_string(),
                    };
                let _ = wr.write_all(reply.as_bytes()).await;
            });
        }
    }))
}

fn parse_line(line: &str) -> Result<String, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    match line.strip_prefix("tamper ") {
        Some(r) if !r.trim().is_empty() => Ok(r.trim().to_string()),
        _ => Err("expected `tamper REASON`".into()),
    }
}

/// Reads `path` every `every`; sends one event when it first reads as tampered, then stops
/// (tampering is final). A file that cannot be read is logged once and retried.
pub fn watch_file(
    path: PathBuf,
    every: Duration,
    tx: mpsc::Sender<TamperRequest>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            match tokio::fs::read_to_string(&path).await {
                Ok(v) if watched_value_is_tamper(&v) => {
                    let req = TamperRequest {
                        reason: format!(
                            "tamper sensor {} reads {:?}",
                            path.display(),
                            v.trim().chars().take(64).collect::<String>()
                        ),
                        source: format!("watch:{}", path.display()),
                        reply: None,
                    };
                    let _ = tx.send(req).await;
                    return;
                }
                Ok(_) => warned = false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => warned = false,
                Err(e) => {
                    if !warned {
                        tracing::warn!(path = %path.display(), error = %e, "tamper sensor file unreadable");
                        warned = true;
                    }
                }
            }
        }
    })
}

/// `nicwarden agent tamper`: sends one event to a running agent and returns its answer.
pub async fn report(socket: &Path, reason: &str) -> anyhow::Result<String> {
    if reason.trim().is_empty() || reason.contains('\n') || reason.len() > MAX_LINE - 8 {
        anyhow::bail!(
            "the reason must be one non-empty line of at most {} bytes",
            MAX_LINE - 8
        );
    }
    let conn = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
            "connect to the agent's tamper socket {} (is the agent running? see [tamper] socket)",
            socket.display()
        )
        })?;
    let (rd, mut wr) = conn.into_split();
    wr.write_all(format!("tamper {reason}\n").as_bytes())
        .await
        .context("send tamper request")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(rd).take(4096).read_line(&mut line),
    )
    .await
    .context("no answer from the agent within 30 s")?
    .context("read the agent's answer")?;
    let line = line.trim_end().to_string();
    match line.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => anyhow::bail!(
            "the agent refused: {}",
            line.strip_prefix("error ").unwrap_or(&line)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_values() {
        for (v, want) in [
            ("", false),
            ("0", false),
            ("0\n", false),
            ("1\n", true),
            ("open", true),
            ("  \n", false),
        ] {
            assert_eq!(watched_value_is_tamper(v), want, "{v:?}");
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(parse_line("tamper lid opened\n"), Ok("lid opened".into()));
        assert!(parse_line("tamper \n").is_err());
        assert!(parse_line("hello\n").is_err());
        assert!(parse_line(&format!("tamper {}\n", "x".repeat(2000))).is_err());
    }

    #[test]
    fn record_round_trip_and_clear() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(d.path()).expect("load"), None);
        let r = TamperRecord {
            reason: "lid".into(),
            source: "socket".into(),
            detected_unix_ms: 5,
        };
        save(d.path(), &r).expect("save");
        assert_eq!(load(d.path()).expect("load"), Some(r));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(RECORD_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        clear(d.path()).expect("clear");
        assert_eq!(load(d.path()).expect("load"), None);
        std::fs::write(d.path().join(RECORD_FILE), b"{").expect("write");
        assert!(load(d.path()).is_err());
    }

    #[tokio::test]
    async fn socket_round_trip() {
        let d = tempfile::tempdir().expect("tempdir");
        let sock = d.path().join("t.sock");
        let (tx, mut rx) = mpsc::channel(4);
        let h = serve_socket(sock.clone(), tx).expect("serve");
        let agent = tokio::spawn(async move {
            let req = rx.recv().await.expect("request");
            assert_eq!(req.reason, "lid opened");
            req.reply
                .expect("reply channel")
                .send("ok fabric blocked".into())
                .expect("send");
        });
        let out = report(&sock, "lid opened").await.expect("report");
        assert_eq!(out, "fabric blocked");
        agent.await.expect("agent");
        assert!(report(&sock, "").await.is_err());
        h.abort();
    }

    #[tokio::test]
    async fn watched_file_fires_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("gpio");
        std::fs::write(&f, "0\n").expect("write");
        let (tx, mut rx) = mpsc::channel(4);
        let h = watch_file(f.clone(), Duration::from_millis(10), tx);
        std::fs::write(&f, "1\n").expect("write");
        let req = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event within 5 s")
            .expect("event");
        assert!(req.reason.contains("reads \"1\""), "{}", req.reason);
        h.await.expect("watcher ends after firing");
    }
}
