//! A small client of the operator API: bearer token, JSON in and out, and errors that say
//! what to do about them.

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::cli::ClientOpts;

/// Where the controller writes its operator token by default (`<data_dir>/operator.token`).
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/nicwarden/controller/operator.token";

/// Where the token came from, to explain a 401.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    None,
    Flag,
    File(PathBuf),
}

/// An error answer of the API, or a failure to reach it.
#[derive(Debug)]
pub enum ApiError {
    /// The server answered with an error status.
    Status {
        status: StatusCode,
        message: String,
        token: TokenSource,
    },
    /// The server could not be reached.
    Connect { url: String, detail: String },
    /// Anything else on the way (timeout, bad body).
    Transport { url: String, detail: String },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Status {
                status,
                message,
                token,
            } => {
                write!(f, "{}: {message}", status.as_u16())?;
                if *status == StatusCode::UNAUTHORIZED {
                    match token {
                        TokenSource::None => write!(
                            f,
                            "\n  no operator token was given: pass --token, --token-file or set \
                             NICWARDEN_TOKEN / NICWARDEN_TOKEN_FILE"
                        )?,
                        TokenSource::Flag => write!(
                            f,
                            "\n  the operator token (--token / NICWARDEN_TOKEN) is wrong"
                        )?,
                        TokenSource::File(p) => write!(
                            f,
                            "\n  the operator token in {} is wrong (or from another controller)",
                            p.display()
                        )?,
                    }
                    write!(
                        f,
                        "\n  the controller writes its token to <data_dir>/operator.token \
                         (default {DEFAULT_TOKEN_FILE})"
                    )?;
                }
                Ok(())
            }
            ApiError::Connect { url, detail } => write!(
                f,
                "cannot reach the operator API at {url} ({detail})\n  is `nicwarden controller` \
                 running and listening there? (set --api or NICWARDEN_API)"
            ),
            ApiError::Transport { url, detail } => write!(f, "request to {url} failed: {detail}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// The innermost cause of a reqwest error, which names the actual problem
/// (`Connection refused (os error 111)`).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub struct Client {
    base: String,
    token: Option<String>,
    token_source: TokenSource,
    http: reqwest::Client,
    /// For long-lived streams: no overall timeout (the reader decides when a quiet stream
    /// is dead).
    stream_http: reqwest::Client,
}

/// `127.0.0.1:7080` -> `http://127.0.0.1:7080`; trailing slashes removed.
pub fn normalize_base(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

/// Reads a token file: the first line, trimmed.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read operator token from {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        anyhow::bail!("operator token file {} is empty", path.display());
    }
    Ok(token)
}

impl Client {
    /// `--token` wins over `--token-file`; with neither, the controller's default token file
    /// is used if it is readable (the common case of running on the controller host).
    pub fn new(opts: &ClientOpts) -> anyhow::Result<Self> {
        let (token, token_source) = if let Some(t) = &opts.token {
            (Some(t.trim().to_string()), TokenSource::Flag)
        } else if let Some(p) = &opts.token_file {
            (Some(read_token_file(p)?), TokenSource::File(p.clone()))
        } else {
            let default = PathBuf::from(DEFAULT_TOKEN_FILE);
            match read_token_file(&default) {
                Ok(t) => (Some(t), TokenSource::File(default)),
                Err(_) => (None, TokenSource::None),
            }
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("build HTTP client")?;
        let stream_http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("build HTTP client")?;
        Ok(Client {
            base: normalize_base(&opts.api),
            token,
            token_source,
            http,
            stream_http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns the JSON body of a success answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.send_error(&e, &url))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| ApiError::Transport {
            url: url.clone(),
            detail: format!("read response body: {}", root_cause(&e)),
        })?;
        if !status.is_success() {
            return Err(ApiError::Status {
                status,
                message: error_message(&text, status),
                token: self.token_source.clone(),
            });
        }
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ApiError::Transport {
            url,
            detail: format!("response is not JSON: {e}"),
        })
    }

    /// A request that got no answer: unreachable (named by the base URL), timed out, or
    /// failed on the way.
    fn send_error(&self, e: &reqwest::Error, url: &str) -> ApiError {
        if e.is_connect() {
            ApiError::Connect {
                url: self.base.clone(),
                detail: root_cause(e),
            }
        } else if e.is_timeout() {
            ApiError::Transport {
                url: url.to_string(),
                detail: "timed out".into(),
            }
        } else {
            ApiError::Transport {
                url: url.to_string(),
                detail: root_cause(e),
            }
        }
    }

    /// Opens a long-lived `GET` (`text/event-stream`) and returns the response once the
    /// server has answered with success; its body is read by the caller as it arrives.
    /// Error answers are read whole and returned as [`Client::call`] does.
    pub async fn open_stream(&self, path: &str) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .stream_http
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| self.send_error(&e, &url))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(ApiError::Status {
            status,
            message: error_message(&text, status),
            token: self.token_source.clone(),
        })
    }

    /// [`Client::call`] and decode the body as `T`; also returns the raw JSON (for `--json`).
    pub async fn call_as<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> anyhow::Result<(T, serde_json::Value)> {
        let raw = self.call(method.clone(), path, body).await?;
        let typed = serde_json::from_value(raw.clone())
            .with_context(|| format!("decode the answer to {method} {path}"))?;
        Ok((typed, raw))
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<(T, serde_json::Value)> {
        self.call_as(Method::GET, path, None::<&()>).await
    }
}

/// The `error` field of an `{"error": "..."}` body, or the body itself, or the status text.
pub fn error_message(body: &str, status: StatusCode) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if let Some(m) = v.get("error").and_then(|m| m.as_str()) {
            return m.to_string();
        }
    }
    let body = body.trim();
    if body.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        body.to_string()
    }
}

/// Percent-encodes a path segment or query value (names are restricted, but be safe).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        let cases: &[(&str, u16, &str)] = &[
            (r#"{"error":"rate must be > 0"}"#, 422, "rate must be > 0"),
            ("plain text", 500, "plain text"),
            ("", 404, "Not Found"),
            (r#"{"other":1}"#, 400, r#"{"other":1}"#),
        ];
        for (body, code, want) in cases {
            let status = StatusCode::from_u16(*code).expect("valid status");
            assert_eq!(error_message(body, status), *want, "{body:?}");
        }
    }

    #[test]
    fn status_error_display() {
        let e = ApiError::Status {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: "rate must be > 0".into(),
            token: TokenSource::Flag,
        };
        assert_eq!(e.to_string(), "422: rate must be > 0");
        let e = ApiError::Status {
            status: StatusCode::UNAUTHORIZED,
            message: "missing bearer token".into(),
            token: TokenSource::None,
        };
        let text = e.to_string();
        assert!(text.starts_with("401: missing bearer token\n"), "{text}");
        assert!(text.contains("--token-file"), "{text}");
        assert!(text.contains("operator.token"), "{text}");
        let e = ApiError::Connect {
            url: "http://127.0.0.1:7080".into(),
            detail: "Connection refused (os error 111)".into(),
        };
        let text = e.to_string();
        assert!(text.contains("http://127.0.0.1:7080"), "{text}");
        assert!(text.contains("nicwarden controller"), "{text}");
    }

    #[test]
    fn base_urls() {
        let cases = [
            ("http://127.0.0.1:7080", "http://127.0.0.1:7080"),
            ("http://127.0.0.1:7080/", "http://127.0.0.1:7080"),
            ("127.0.0.1:7080", "http://127.0.0.1:7080"),
            ("https://ctl.example:443//", "https://ctl.example:443"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_base(input), want, "{input}");
        }
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(encode("node-1.a_b~"), "node-1.a_b~");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
