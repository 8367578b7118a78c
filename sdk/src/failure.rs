//! Where a task ran and why it failed: what the scheduler decides on and what a developer can
//! `match` on when a job fails ([`crate::EvalError::Swarm`]), never parsed from text.

use std::fmt;
use std::time::Duration;

use corvid_kernels::ExecError;

use crate::wire::TaskError;

/// Where a task runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place<P> {
    Peer(P),
    /// On the requester itself.
    Local,
}

impl<P: fmt::Display> fmt::Display for Place<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Peer(p) => write!(f, "{p}"),
            Place::Local => f.write_str("local"),
        }
    }
}

impl<P> Place<P> {
    /// The same place with the peer mapped (e.g. to its printed id).
    pub fn map<Q>(self, f: impl FnOnce(P) -> Q) -> Place<Q> {
        match self {
            Place::Peer(p) => Place::Peer(f(p)),
            Place::Local => Place::Local,
        }
    }
}

/// Why one attempt at a subgraph failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskFailure {
    /// The requester's deadline for the round trip passed.
    #[error("no answer within {:.1} s", .0.as_secs_f64())]
    NoAnswer(Duration),
    /// The scheduler's deadline for the task passed.
    #[error("no answer before the deadline")]
    Deadline,
    /// The peer could not be reached: it leaves the job's placement.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request or its answer was lost on the way (a stream broke, the requester's own
    /// node stopped).
    #[error("{0}")]
    Transport(String),
    /// The worker did not run it, and said why.
    #[error("{0}")]
    Worker(TaskError),
    /// The worker lacks inputs (by position) even when they were sent.
    #[error("the worker lacks inputs {0:?} even when sent")]
    MissingInputs(Vec<usize>),
    /// The worker signed a result for the values it held, which were not the ones meant:
    /// the inputs (by position) it was told to use from what it held, and the evidence.
    #[error("the worker's held inputs were stale ({evidence})")]
    StaleHeld { held: Vec<usize>, evidence: String },
    /// The result has the wrong number, dtypes or shapes of outputs.
    #[error("{0}")]
    Malformed(String),
    /// The result was forged or wrong, with proof; the peer is banned.
    #[error("{reason} (peer banned)")]
    Cheated { reason: String },
    /// The peer was banned for another result while this one ran.
    #[error("{peer} was banned")]
    Banned { peer: String },
    /// Running it on the requester failed.
    #[error("{0}")]
    Local(ExecError),
    /// The requester could not check the result (its own recompute failed, a check panicked):
    /// proof of nothing against the worker.
    #[error("{0}")]
    Unchecked(String),
}

/// One failed attempt, for the job report.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptError<P> {
    pub place: Place<P>,
    pub error: TaskFailure,
}

/// Why the job cannot finish: the subgraph, its ops, the places tried and each error.
#[derive(Clone, Debug, PartialEq)]
pub struct JobFailure<P> {
    pub subgraph: usize,
    pub ops: String,
    pub attempts: Vec<AttemptError<P>>,
    /// Why no place is left to try it, when that is what ended the job.
    pub unplaceable: Option<String>,
}

impl<P> JobFailure<P> {
    /// The same failure with every peer mapped (e.g. to its printed id).
    pub fn map_places<Q>(self, mut f: impl FnMut(P) -> Q) -> JobFailure<Q> {
        JobFailure {
            subgraph: self.subgraph,
            ops: self.ops,
            attempts: self
                .attempts
                .into_iter()
                .map(|a| AttemptError {
                    place: a.place.map(&mut f),
                    error: a.error,
                })
                .collect(),
            unplaceable: self.unplaceable,
        }
    }
}

impl<P: fmt::Display> fmt::Display for JobFailure<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.unplaceable {
            Some(why) => write!(
                f,
                "subgraph {} ({}) has nowhere to run: {why}",
                self.subgraph, self.ops
            )?,
            None => write!(
                f,
                "subgraph {} ({}) failed {} time(s):",
                self.subgraph,
                self.ops,
                self.attempts.len()
            )?,
        }
        if self.unplaceable.is_some() && !self.attempts.is_empty() {
            f.write_str("; attempts:")?;
        }
        for a in &self.attempts {
            write!(f, " [{}: {}]", a.place, a.error)?;
        }
        Ok(())
    }
}
