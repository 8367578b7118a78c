//! Errors a developer sees: building a graph, and evaluating it.

use std::fmt;
use std::panic::Location;

use corvid_kernels::{ExecError, OpError, TensorMeta};

use crate::failure::JobFailure;

/// Where in the developer's code a tensor was built.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Site(pub &'static Location<'static>);

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.0.file(), self.0.line(), self.0.column())
    }
}

impl fmt::Debug for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a tensor could not be built. Raised at the line that built it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("{at}: {error}")]
    Op { at: Site, error: OpError },
    #[error("{at}: op '{op}' uses a tensor that failed to build at {failed_at}")]
    FailedInput {
        at: Site,
        op: String,
        failed_at: Site,
    },
    #[error("{at}: op '{op}' mixes tensors of graphs '{a}' and '{b}'")]
    MixedGraphs {
        at: Site,
        op: String,
        a: String,
        b: String,
    },
    #[error("{at}: {reason}")]
    Data { at: Site, reason: String },
    #[error("{at}: cannot read '{path}': {reason}")]
    File {
        at: Site,
        path: String,
        reason: String,
    },
    /// A gradient asked of an op that has no useful derivative, or of something that cannot
    /// have one (a loss of many values, an i32 parameter).
    #[error("{at}: no gradient through '{op}': {why}")]
    NoGradient { at: Site, op: String, why: String },
}

impl BuildError {
    /// Where the failing tensor was built.
    pub fn site(&self) -> Site {
        match self {
            BuildError::Op { at, .. }
            | BuildError::FailedInput { at, .. }
            | BuildError::MixedGraphs { at, .. }
            | BuildError::Data { at, .. }
            | BuildError::File { at, .. }
            | BuildError::NoGradient { at, .. } => *at,
        }
    }
}

/// Why an evaluation failed: a build error in the graph, a plan that cannot fit, or an op that
/// failed while running (named with its shapes and where it ran).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("graph '{graph}' has a tensor that failed to build: {error}")]
    Build { graph: String, error: BuildError },
    #[error("cannot partition: {0}")]
    Partition(PartitionError),
    #[error("subgraph {subgraph} ({ops}) failed on {place}: {error}")]
    Exec {
        subgraph: String,
        ops: String,
        place: String,
        error: Box<ExecError>,
    },
    /// A subgraph failed on every place it was tried: which, its ops, and each attempt's
    /// place and typed error.
    #[error("swarm job failed: {0}")]
    Swarm(Box<JobFailure<String>>),
    /// The requester itself could not carry the job (its node or runtime stopped).
    #[error("swarm job failed: {reason}")]
    Requester { reason: String },
    /// No worker in the swarm can run a subgraph, and the requester may not run it itself.
    #[error("no worker can run subgraph {subgraph} ({ops}): {reason}")]
    NoWorker {
        subgraph: usize,
        ops: String,
        reason: String,
    },
    #[error("the tensor to evaluate is {got}, not {expected}")]
    DType { expected: String, got: TensorMeta },
    /// The job was cancelled through its [`crate::JobHandle`].
    #[error("the job was cancelled")]
    Cancelled,
}

/// Why a graph cannot be partitioned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("op '{op}' at {at} makes {meta} ({bytes} bytes), over the limit of {limit} bytes")]
    TooLarge {
        op: String,
        at: Site,
        meta: TensorMeta,
        bytes: u64,
        limit: u64,
    },
}
