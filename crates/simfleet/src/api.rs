//! The few operator API calls the fleet makes: join tokens and grants.

use serde_json::{json, Value};
use std::time::Duration;

/// How long one operator API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// An answer that was not a success: the status (0 if none) and the reason.
pub(crate) struct Failure {
    pub status: u16,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status == 0 {
            f.write_str(&self.detail)
        } else {
            write!(f, "HTTP {}: {}", self.status, self.detail)
        }
    }
}

/// `127.0.0.1:7080` -> `http://127.0.0.1:7080`, without trailing slashes.
pub(crate) fn normalize_base(api: &str) -> String {
    let api = api.trim().trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

/// The innermost cause of an error, which names the actual problem.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Api {
    pub fn new(base: &str, token: &str) -> Result<Api, String> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| format!("build the HTTP client: {e}"))?;
        Ok(Api {
            base: normalize_base(base),
            token: token.trim().to_string(),
            http,
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let mut rb = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| Failure {
            status: 0,
            detail: format!("{method} {url}: {}", root_cause(&e)),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| Failure {
            status: status.as_u16(),
            detail: format!("read the answer: {}", root_cause(&e)),
        })?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(value)
        } else {
            let detail = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            Err(Failure {
                status: status.as_u16(),
                detail,
            })
        }
    }

    /// A one-time join token for `node`: adds the node if `add` (an existing node gets a
    /// fresh token instead), else asks for a fresh token of an existing node.
    pub async fn join_token(&self, node: &str, add: bool) -> Result<String, (String, Failure)> {
        let answer = if add {
            match self.post("/v1/nodes", &json!({ "name": node })).await {
                Err(f) if f.status == 409 => self
                    .post(&format!("/v1/nodes/{node}/token"), &json!({}))
                    .await
                    .map_err(|f| ("get a join token (node exists)".to_string(), f)),
                other => other.map_err(|f| ("add node".to_string(), f)),
            }
        } else {
            self.post(&format!("/v1/nodes/{node}/token"), &json!({}))
                .await
                .map_err(|f| ("get a join token".to_string(), f))
        }?;
        answer["join_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                (
                    "get a join token".to_string(),
                    Failure {
                        status: 0,
                        detail: format!("answer has no `join_token`: {answer}"),
                    },
                )
            })
    }

    /// Grants a lease; returns its id. If the scope already has an active lease (a node
    /// of an earlier run, re-enrolled: the controller re-sends it on connect), that lease
    /// is changed to these terms instead.
    pub async fn grant(
        &self,
        node: &str,
        scope: &str,
        rate_bps: u64,
        ttl_s: f64,
        volume_bytes: Option<u64>,
    ) -> Result<u64, Failure> {
        let mut body =
            json!({ "node": node, "scope": scope, "rate_bps": rate_bps, "ttl_s": ttl_s });
        if let Some(v) = volume_bytes {
            body["volume_bytes"] = json!(v);
        }
        let answer = match self.post("/v1/leases", &body).await {
            Err(f) if f.status == 409 => match self.active_lease(node, scope).await? {
                Some(id) => {
                    let path = format!("/v1/leases/{id}");
                    self.request(reqwest::Method::PUT, &path, Some(&body))
                        .await
                        .map_err(|c| Failure {
                            status: c.status,
                            detail: format!("change the active lease {id}: {}", c.detail),
                        })?
                }
                None => return Err(f),
            },
            other => other?,
        };
        lease_id(&answer)
    }

    /// The id of the node's active lease on `scope`, if it has one.
    async fn active_lease(&self, node: &str, scope: &str) -> Result<Option<u64>, Failure> {
        // Lease records carry the scope in its serde form (`{"kind": "peer", ...}`).
        let want = scope
            .parse::<nicwarden_lease::Scope>()
            .ok()
            .and_then(|s| serde_json::to_value(s).ok());
        let Some(want) = want else {
            return Ok(None);
        };
        let path = format!("/v1/leases?node={node}&state=active");
        let list = self.request(reqwest::Method::GET, &path, None).await?;
        let found = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["terms"]["scope"] == want);
        found.map(lease_id).transpose()
    }
}

fn lease_id(lease: &Value) -> Result<u64, Failure> {
    lease["id"].as_u64().ok_or_else(|| Failure {
        status: 0,
        detail: format!("answer has no lease `id`: {lease}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases() {
        assert_eq!(normalize_base("127.0.0.1:7080/"), "http://127.0.0.1:7080");
        assert_eq!(normalize_base("https://h:1"), "https://h:1");
    }
}
