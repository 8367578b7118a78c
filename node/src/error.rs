//! [`NodeError`]: why a node could not start, or a request to it failed.

use std::net::SocketAddr;

use crate::bench::BenchError;
use crate::config::ConfigError;
use crate::identity::IdentityError;
use crate::net::NetError;

/// Why a node could not start, or a request to it failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot open the '{choice}' backend: {source}")]
    Backend {
        choice: corvid_kernels::BackendChoice,
        source: corvid_kernels::BackendError,
    },
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("control endpoint on '{addr}': {source}")]
    Control {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the node has stopped")]
    Stopped,
    #[error("task to peer {peer} failed: {error}")]
    Remote { peer: String, error: String },
    #[error("a blocking task failed: {0}")]
    Task(String),
    #[error("cannot start the executor process: {0}")]
    Executor(String),
}
