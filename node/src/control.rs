//! The local control endpoint: JSON over HTTP on loopback (`GET /peers`, `GET /status`), and the
//! client `corvid peers` and `corvid id` use to read it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::{BodyExt, Empty, Limited};
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
pub async fn serve(
    addr: SocketAddr,
    node: NodeClient,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), NodeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Control { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| NodeError::Control { addr, source })?;
    let app = Router::new()
        .route("/peers", get(peers))
        .route("/status", get(status))
        .with_state(node);
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

async fn peers(State(node): State<NodeClient>) -> Result<Json<Vec<PeerInfo>>, StatusCode> {
    ask(node.peers()).await.map(Json)
}

async fn status(State(node): State<NodeClient>) -> Result<Json<Status>, StatusCode> {
    ask(node.status()).await.map(Json)
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
    let err = |reason: String| ControlError::Request { addr, reason };
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| err(e.to_string()))?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.get(uri))
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
