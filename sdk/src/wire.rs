//! Messages between a requester and a worker, shared by the SDK and the node so they live in
//! one place. Encoded with postcard; tensors travel as raw little-endian bytes.
//!
//! A worker signs every result with its identity key over a [`Receipt`]: the task (subgraph id
//! and the content ids of the inputs it ran on), the requester's nonce, the outputs' content
//! ids, a hash root over every op's output inside the subgraph, and the determinism class. A
//! requester checks the signature against the peer it asked, so a result cannot be replayed for
//! another task, another request or from another peer.

use std::sync::Arc;
use std::time::Duration;

use corvid_kernels::{ContentId, Program, Recipe, Tensor as Data, TensorMeta, TooLarge};
use serde::{Deserialize, Serialize};

use crate::ids::{SubgraphId, ValueId, subgraph_id};
use crate::plan::Subgraph;

/// Version of the task protocol; a peer answers other versions with [`TaskResponse::Failed`].
pub const TASK_VERSION: u16 = 4;

/// Domain separation for receipt signatures.
const RECEIPT_DOMAIN: &[u8] = b"corvid/receipt/2";

/// One input of a task: the data itself, how to make it, or only its id when the worker
/// already holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    Data(Arc<Data>),
    /// The worker makes the values (a block of a seeded random tensor): a few bytes on the
    /// wire instead of the tensor. The receipt still names the content of what it ran on.
    Recipe(Recipe),
    /// The worker holds this value (by the request's input id) from an earlier task of the
    /// same requester.
    Held,
}

/// What a requester asks a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Run(TaskRequest),
    /// Stop task `task` of this requester (a copy that lost, a job that ended): queued, it
    /// never starts; running, it stops at its next check. Answered at once.
    Cancel {
        task: u64,
    },
}

/// Why a worker did not run a task: what the requester decides on (retry elsewhere, cut
/// smaller, give up), never parsed from text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum TaskError {
    /// The request itself is wrong: protocol version, ids, counts, or a program that does not
    /// type-check. No worker would run it.
    #[error("bad request: {0}")]
    Invalid(String),
    /// Over this worker's budget (which it advertises): a peer with a larger one, or a smaller
    /// subgraph, would be admitted.
    #[error("too large for this worker: {0}")]
    TooLarge(TooLarge),
    /// Every slot and the queue are taken.
    #[error("busy: every execution slot is taken")]
    Busy,
    /// The requester cancelled it.
    #[error("cancelled by the requester")]
    Cancelled,
    /// It ran past its time budget and was stopped.
    #[error("stopped after its time budget of {0:?}")]
    Deadline(Duration),
    /// The worker could not run it (a device error, its executor restarting).
    #[error("{0}")]
    Failed(String),
}

impl TaskError {
    /// Longest text kept from another peer's error, in bytes.
    pub const MAX_TEXT: usize = 1024;

    /// The error with its text cut to [`TaskError::MAX_TEXT`] bytes (at a character
    /// boundary): a peer chooses how long its error is, and the requester keeps it in reports.
    pub fn bounded(self) -> TaskError {
        let cut = |mut s: String| {
            if s.len() > Self::MAX_TEXT {
                let mut end = Self::MAX_TEXT;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                s.push_str("… (cut)");
            }
            s
        };
        match self {
            TaskError::Invalid(s) => TaskError::Invalid(cut(s)),
            TaskError::Failed(s) => TaskError::Failed(cut(s)),
            other => other,
        }
    }
}

/// Run this subgraph on these inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub version: u16,
    /// Correlates the response; unique per requester.
    pub task: u64,
    /// Fresh per request: a signed result answers this request and no other.
    pub nonce: [u8; 16],
    pub subgraph: SubgraphId,
    pub program: Program,
    pub input_ids: Vec<ValueId>,
    /// Ids of the outputs, under which the worker keeps them for later tasks.
    pub output_ids: Vec<ValueId>,
    pub inputs: Vec<Input>,
}

impl TaskRequest {
    /// A request for `sg` with the given inputs.
    pub fn new(task: u64, nonce: [u8; 16], sg: &Subgraph, inputs: Vec<Input>) -> Self {
        TaskRequest {
            version: TASK_VERSION,
            task,
            nonce,
            subgraph: sg.id,
            program: sg.program.clone(),
            input_ids: sg.input_ids.clone(),
            output_ids: sg.output_ids.clone(),
            inputs,
        }
    }

    /// Whether the subgraph id matches the program and input ids it claims to cover.
    pub fn id_matches(&self) -> bool {
        subgraph_id(&self.program.canonical_bytes(), &self.input_ids) == self.subgraph
    }
}

/// What one task is: the subgraph and the exact inputs it ran on.
pub fn task_key(subgraph: &SubgraphId, inputs: &[ContentId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid/task-key");
    h.update(&subgraph.0);
    for c in inputs {
        h.update(&c.0);
    }
    *h.finalize().as_bytes()
}

/// The hash root over the content ids of every op's output in a subgraph, in program order.
pub fn op_root(op_hashes: &[ContentId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid/op-root");
    for c in op_hashes {
        h.update(&c.0);
    }
    *h.finalize().as_bytes()
}

/// What a worker signs for a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// [`task_key`] of the subgraph and the inputs the worker ran it on.
    pub task: [u8; 32],
    pub nonce: [u8; 16],
    pub outputs: Vec<ContentId>,
    /// Content id of every op's output, in program order; [`op_root`] of these is signed.
    pub op_hashes: Vec<ContentId>,
    /// [`corvid_kernels::DeterminismClass::id`] of the backend that ran it.
    pub class: [u8; 32],
    /// Human-readable class, for reports (not signed: the id is).
    pub class_name: String,
}

impl Receipt {
    /// The bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(RECEIPT_DOMAIN.len() + 32 * (3 + self.outputs.len()) + 24);
        m.extend_from_slice(RECEIPT_DOMAIN);
        m.extend_from_slice(&self.task);
        m.extend_from_slice(&self.nonce);
        m.extend_from_slice(&(self.outputs.len() as u64).to_le_bytes());
        for c in &self.outputs {
            m.extend_from_slice(&c.0);
        }
        m.extend_from_slice(&op_root(&self.op_hashes));
        m.extend_from_slice(&self.class);
        m
    }
}

/// A worker's answer.
// One per task, moved not copied; boxing the receipt would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskResponse {
    Done {
        task: u64,
        outputs: Vec<Arc<Data>>,
        /// Time spent computing, for throughput measurement.
        compute_micros: u64,
        receipt: Receipt,
        /// ed25519 signature by the worker's identity over [`Receipt::message`].
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        /// The worker's public key (libp2p protobuf encoding); must be the peer asked.
        #[serde(with = "serde_bytes")]
        signer: Vec<u8>,
    },
    /// The worker no longer holds these inputs (by index): send them as data.
    Missing {
        task: u64,
        inputs: Vec<usize>,
    },
    Failed {
        task: u64,
        error: TaskError,
    },
}

impl TaskResponse {
    /// The task this answers.
    pub fn task(&self) -> u64 {
        match self {
            TaskResponse::Done { task, .. }
            | TaskResponse::Missing { task, .. }
            | TaskResponse::Failed { task, .. } => *task,
        }
    }
}

/// How a message travels: a small postcard head, then the raw little-endian bytes of each
/// tensor it carries, in order, so tensors are written straight from their memory and read
/// straight into their final buffers (no serialised copy on either side).
pub trait Framed: Sized {
    /// The head, and the tensors that follow it.
    fn split(&self) -> Result<(Vec<u8>, Vec<Arc<Data>>), postcard::Error>;
    /// The metas of the tensors that follow a head, to size and check them before reading.
    fn tensor_metas(head: &[u8]) -> Result<Vec<TensorMeta>, postcard::Error>;
    /// The message from its head and tensors (as many as `tensor_metas` said, in order).
    fn join(head: &[u8], tensors: Vec<Arc<Data>>) -> Result<Self, postcard::Error>;
    /// The task a response head answers (requests: none), to hold it to what was asked.
    fn task(_head: &[u8]) -> Option<u64> {
        None
    }
}

#[derive(Serialize, Deserialize)]
enum InputHead {
    Data(TensorMeta),
    Held,
    Recipe(Recipe),
}

#[derive(Serialize, Deserialize)]
enum RequestHead {
    Run(RunHead),
    Cancel { task: u64 },
}

#[derive(Serialize, Deserialize)]
struct RunHead {
    version: u16,
    task: u64,
    nonce: [u8; 16],
    subgraph: SubgraphId,
    program: Program,
    input_ids: Vec<ValueId>,
    output_ids: Vec<ValueId>,
    inputs: Vec<InputHead>,
}

// One per message, moved once.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
enum ResponseHead {
    Done {
        task: u64,
        outputs: Vec<TensorMeta>,
        compute_micros: u64,
        receipt: Receipt,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signer: Vec<u8>,
    },
    Missing {
        task: u64,
        inputs: Vec<usize>,
    },
    Failed {
        task: u64,
        error: TaskError,
    },
}

/// A head that lists more (or fewer) tensors than arrived.
const MISCOUNT: postcard::Error = postcard::Error::DeserializeBadEncoding;

impl Framed for Request {
    fn split(&self) -> Result<(Vec<u8>, Vec<Arc<Data>>), postcard::Error> {
        let r = match self {
            Request::Run(r) => r,
            Request::Cancel { task } => {
                return Ok((
                    postcard::to_allocvec(&RequestHead::Cancel { task: *task })?,
                    Vec::new(),
                ));
            }
        };
        let mut tensors = Vec::new();
        let inputs = r
            .inputs
            .iter()
            .map(|i| match i {
                Input::Data(t) => {
                    tensors.push(t.clone());
                    InputHead::Data(t.meta())
                }
                Input::Held => InputHead::Held,
                Input::Recipe(r) => InputHead::Recipe(r.clone()),
            })
            .collect();
        let head = RequestHead::Run(RunHead {
            version: r.version,
            task: r.task,
            nonce: r.nonce,
            subgraph: r.subgraph,
            program: r.program.clone(),
            input_ids: r.input_ids.clone(),
            output_ids: r.output_ids.clone(),
            inputs,
        });
        Ok((postcard::to_allocvec(&head)?, tensors))
    }

    fn tensor_metas(head: &[u8]) -> Result<Vec<TensorMeta>, postcard::Error> {
        Ok(match postcard::from_bytes(head)? {
            RequestHead::Run(h) => h
                .inputs
                .into_iter()
                .filter_map(|i| match i {
                    InputHead::Data(m) => Some(m),
                    InputHead::Held | InputHead::Recipe(_) => None,
                })
                .collect(),
            RequestHead::Cancel { .. } => Vec::new(),
        })
    }

    fn join(head: &[u8], tensors: Vec<Arc<Data>>) -> Result<Self, postcard::Error> {
        let h = match postcard::from_bytes(head)? {
            RequestHead::Run(h) => h,
            RequestHead::Cancel { task } => return Ok(Request::Cancel { task }),
        };
        let mut tensors = tensors.into_iter();
        let inputs = h
            .inputs
            .into_iter()
            .map(|i| match i {
                InputHead::Data(_) => tensors.next().map(Input::Data).ok_or(MISCOUNT),
                InputHead::Held => Ok(Input::Held),
                InputHead::Recipe(r) => Ok(Input::Recipe(r)),
            })
            .collect::<Result<_, _>>()?;
        Ok(Request::Run(TaskRequest {
            version: h.version,
            task: h.task,
            nonce: h.nonce,
            subgraph: h.subgraph,
            program: h.program,
            input_ids: h.input_ids,
            output_ids: h.output_ids,
            inputs,
        }))
    }
}

impl Framed for TaskResponse {
    fn split(&self) -> Result<(Vec<u8>, Vec<Arc<Data>>), postcard::Error> {
        let (head, tensors) = match self {
            TaskResponse::Done {
                task,
                outputs,
                compute_micros,
                receipt,
                signature,
                signer,
            } => (
                ResponseHead::Done {
                    task: *task,
                    outputs: outputs.iter().map(|t| t.meta()).collect(),
                    compute_micros: *compute_micros,
                    receipt: receipt.clone(),
                    signature: signature.clone(),
                    signer: signer.clone(),
                },
                outputs.clone(),
            ),
            TaskResponse::Missing { task, inputs } => (
                ResponseHead::Missing {
                    task: *task,
                    inputs: inputs.clone(),
                },
                Vec::new(),
            ),
            TaskResponse::Failed { task, error } => (
                ResponseHead::Failed {
                    task: *task,
                    error: error.clone(),
                },
                Vec::new(),
            ),
        };
        Ok((postcard::to_allocvec(&head)?, tensors))
    }

    fn tensor_metas(head: &[u8]) -> Result<Vec<TensorMeta>, postcard::Error> {
        Ok(match postcard::from_bytes(head)? {
            ResponseHead::Done { outputs, .. } => outputs,
            _ => Vec::new(),
        })
    }

    fn task(head: &[u8]) -> Option<u64> {
        Some(match postcard::from_bytes(head).ok()? {
            ResponseHead::Done { task, .. }
            | ResponseHead::Missing { task, .. }
            | ResponseHead::Failed { task, .. } => task,
        })
    }

    fn join(head: &[u8], tensors: Vec<Arc<Data>>) -> Result<Self, postcard::Error> {
        Ok(match postcard::from_bytes(head)? {
            ResponseHead::Done {
                task,
                compute_micros,
                receipt,
                signature,
                signer,
                outputs,
            } => {
                if outputs.len() != tensors.len() {
                    return Err(MISCOUNT);
                }
                TaskResponse::Done {
                    task,
                    outputs: tensors,
                    compute_micros,
                    receipt,
                    signature,
                    signer,
                }
            }
            ResponseHead::Missing { task, inputs } => TaskResponse::Missing { task, inputs },
            ResponseHead::Failed { task, error } => TaskResponse::Failed { task, error },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_error_text_is_kept_bounded() {
        let long = "é".repeat(1 << 20);
        let TaskError::Failed(cut) = TaskError::Failed(long).bounded() else {
            panic!("the kind changed")
        };
        assert!(cut.len() <= TaskError::MAX_TEXT + 16 && cut.ends_with("(cut)"));
        let short = TaskError::Invalid("no such op".into());
        assert_eq!(short.clone().bounded(), short);
    }
}
