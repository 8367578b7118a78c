//! The local control endpoint on loopback: the status page (`GET /`), JSON (`GET /peers`,
//! `GET /status`), Prometheus metrics (`GET /metrics`), pause and resume (`POST`, with the
//! token); and the client `corvid peers`, `corvid id`, `corvid pause` use to reach it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::NodeError;
use crate::node_client::NodeClient;
use crate::peers::PeerInfo;
use crate::status::Status;

/// Largest response the client reads.
const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// How long a request may wait for the event loop, or the client for the node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no running node found: '{path}' is missing ({source}); start `corvid node` or pass --control ADDR"
    )]
    NoControlFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("'{path}' holds '{value}', not a socket address")]
    BadControlFile {
        path: std::path::PathBuf,
        value: String,
    },
    #[error("cannot reach the node's control endpoint at '{addr}': {reason}")]
    Request { addr: SocketAddr, reason: String },
    #[error("control endpoint at '{addr}' answered {status}")]
    Status { addr: SocketAddr, status: u16 },
    #[error("control endpoint at '{addr}' sent invalid JSON: {reason}")]
    Json { addr: SocketAddr, reason: String },
}

/// Binds `addr` (loopback) and serves until `cancel`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    node: NodeClient,
    scrape: Scrape,
    token: String,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), NodeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Control { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| NodeError::Control { addr, source })?;
    let app = Router::new()
        .route("/", get(page))
        .route("/peers", get(peers))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/pause", axum::routing::post(pause))
        .route("/resume", axum::routing::post(resume))
        .layer(axum::middleware::from_fn(loopback_host_only))
        .with_state(Served {
            node,
            scrape,
            token: std::sync::Arc::from(token),
        });
    let task = tokio::spawn(
        async move {
            let shutdown = cancel.clone();
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
            {
                tracing::warn!(error = %e, "control endpoint stopped");
            }
        }
        .in_current_span(),
    );
    Ok((bound, task))
}

/// Refuses a request whose `Host` is not a loopback name: a web page the user visits can make
/// the browser send requests here through a DNS name it controls (DNS rebinding), but the
/// browser then sends that name as the `Host`.
async fn loopback_host_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    if host.is_some_and(is_loopback_host) {
        next.run(request).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this endpoint answers only requests addressed to 127.0.0.1, [::1] or localhost\n",
        )
            .into_response()
    }
}

/// `127.0.0.1`, `[::1]` or `localhost`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What `GET /metrics` reads: the registry, and the gauges set as it is read.
#[derive(Clone)]
pub(crate) struct Scrape {
    pub registry: std::sync::Arc<prometheus_client::registry::Registry>,
    pub node: crate::metrics::NodeMetrics,
}

#[derive(Clone)]
struct Served {
    node: NodeClient,
    scrape: Scrape,
    /// What requests that change the node's state carry (`Authorization: Bearer …`).
    token: std::sync::Arc<str>,
}

/// The body of `POST /pause`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PauseRequest {
    /// Shown in the status and the log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Whether `headers` carry the node's token.
fn authorized(headers: &axum::http::HeaderMap, token: &str) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|given| {
            // Same length and every byte compared: no early exit to time.
            given.len() == token.len()
                && given
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
}

/// Longest pause reason kept.
const MAX_REASON: usize = 200;

async fn pause(
    State(s): State<Served>,
    headers: axum::http::HeaderMap,
    body: Option<Json<PauseRequest>>,
) -> Result<Json<Status>, StatusCode> {
    if !authorized(&headers, &s.token) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let reason = body
        .and_then(|Json(b)| b.reason)
        .map(|r| crate::status::printable(&r, MAX_REASON))
        .unwrap_or_else(|| "paused by its owner".to_string());
    ask(s.node.set_paused(Some(reason))).await?;
    ask(s.node.status()).await.map(Json)
}

async fn resume(
    State(s): State<Served>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Status>, StatusCode> {
    if !authorized(&headers, &s.token) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    ask(s.node.set_paused(None)).await?;
    ask(s.node.status()).await.map(Json)
}

/// The status page.
async fn page(State(s): State<Served>) -> Result<axum::response::Html<String>, StatusCode> {
    let status = ask(s.node.status()).await?;
    let peers = ask(s.node.peers()).await?;
    Ok(axum::response::Html(crate::page::render(&status, &peers)))
}

async fn peers(State(s): State<Served>) -> Result<Json<Vec<PeerInfo>>, StatusCode> {
    ask(s.node.peers()).await.map(Json)
}

async fn status(State(s): State<Served>) -> Result<Json<Status>, StatusCode> {
    ask(s.node.status()).await.map(Json)
}

/// Prometheus text format: libp2p's series and Corvid's (`corvid_…`).
async fn metrics(State(s): State<Served>) -> Result<impl axum::response::IntoResponse, StatusCode> {
    let status = ask(s.node.status()).await?;
    let m = &s.scrape.node;
    m.peers_known
        .set(i64::try_from(status.known_peers).unwrap_or(i64::MAX));
    m.peers_connected
        .set(i64::try_from(status.connected_peers).unwrap_or(i64::MAX));
    m.resident_bytes.set(crate::metrics::resident_bytes());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(&s.scrape.registry),
    ))
}

async fn ask<T>(f: impl Future<Output = Result<T, NodeError>>) -> Result<T, StatusCode> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(StatusCode::SERVICE_UNAVAILABLE),
        Err(_) => Err(StatusCode::GATEWAY_TIMEOUT),
    }
}

/// Reads the control address a running node wrote into its data dir.
pub fn read_control_file(path: &Path) -> Result<SocketAddr, ControlError> {
    let text = std::fs::read_to_string(path).map_err(|source| ControlError::NoControlFile {
        path: path.to_path_buf(),
        source,
    })?;
    let value = text.trim();
    value.parse().map_err(|_| ControlError::BadControlFile {
        path: path.to_path_buf(),
        value: value.chars().take(64).collect(),
    })
}

/// `GET http://{addr}{path}` and decodes the JSON body (at most 8 MiB).
pub async fn get_json<T: DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<T, ControlError> {
    let request = hyper::Request::get(format!("http://{addr}{path}")).body(Full::default());
    send_json(addr, request).await
}

/// `POST http://{addr}{path}` with the node's `token` and a JSON `body`; decodes the JSON
/// answer (the node's status).
pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    token: &str,
    body: &B,
) -> Result<T, ControlError> {
    let body = serde_json::to_vec(body).map_err(|e| ControlError::Request {
        addr,
        reason: e.to_string(),
    })?;
    let request = hyper::Request::post(format!("http://{addr}{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)));
    send_json(addr, request).await
}

/// Sends `request` to the endpoint at `addr` and decodes its JSON answer (at most 8 MiB).
async fn send_json<T: DeserializeOwned>(
    addr: SocketAddr,
    request: Result<hyper::Request<Full<Bytes>>, hyper::http::Error>,
) -> Result<T, ControlError> {
    let err = |reason: String| ControlError::Request { addr, reason };
    let request = request.map_err(|e| err(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.request(request))
        .await
        .map_err(|_| err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
        .map_err(|e| err(error_chain(&e)))?;
    if !response.status().is_success() {
        return Err(ControlError::Status {
            addr,
            status: response.status().as_u16(),
        });
    }
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ControlError::Json {
        addr,
        reason: e.to_string(),
    })
}

/// A new control token, written to `path` readable by the owner only (a previous one is
/// replaced).
pub(crate) fn new_token(path: Option<&Path>) -> String {
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
        let written = crate::identity::private_file(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not write the control token: pause and resume will not work from the command line");
        }
    }
    token
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(inner) = next {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        next = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_answered() {
        for ok in [
            "127.0.0.1:4000",
            "127.0.0.1",
            "localhost:80",
            "LOCALHOST",
            "[::1]:9",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:4000",
            "localhost.attacker.example",
            "192.168.1.2:4000",
            "[2001:db8::1]:80",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
