//! gRPC channels to the controller over our own rustls configs.
//!
//! tonic's `ClientTlsConfig` cannot express "trust the CA whose fingerprint the join token
//! pins", so TLS is done here with tokio-rustls and tonic gets an already-encrypted stream
//! through `connect_with_connector`.

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// Splits `https://HOST:PORT` into host and port.
pub fn parse_controller(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .with_context(|| format!("controller must be https://HOST:PORT, got `{url}`"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("controller must be https://HOST:PORT, got `{url}`"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .with_context(|| format!("controller port `{port}` is not a number"))?;
    Ok((host.to_string(), port))
}

/// Opens a channel to the controller with the given TLS client config.
pub async fn connect(controller: &str, tls: rustls::ClientConfig) -> anyhow::Result<Channel> {
    let (host, port) = parse_controller(controller)?;
    let server_name = rustls_pki_types::ServerName::try_from(host.clone())
        .with_context(|| format!("`{host}` is not a valid server name"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let h = host.clone();
    let svc = tower::service_fn(move |_uri: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let h = h.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let ep = Endpoint::from_shared(format!("http://{authority}"))
        .context("controller endpoint")?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let ch = ep
        .connect_with_connector(svc)
        .await
        .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
    Ok(ch)
}

/// Renders an error with its sources ("transport error: tls: invalid peer certificate ...").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_controller_urls() {
        let ok = |u: &str, h: &str, p: u16| {
            assert_eq!(parse_controller(u).ok(), Some((h.to_string(), p)), "{u}");
        };
        ok("https://127.0.0.1:7443", "127.0.0.1", 7443);
        ok("https://localhost:1/", "localhost", 1);
        ok("https://[::1]:7443", "::1", 7443);
        for bad in ["http://x:1", "https://x", "https://x:port", "x:1", ""] {
            assert!(parse_controller(bad).is_err(), "{bad}");
        }
    }
}
