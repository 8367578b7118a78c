//! Messages between a requester and a worker, shared by the SDK and the node so they live in
//! one place. Encoded with postcard; tensors travel as raw little-endian bytes.

use corvid_kernels::{Program, Tensor as Data};
use serde::{Deserialize, Serialize};

use crate::ids::{SubgraphId, ValueId, subgraph_id};
use crate::plan::Subgraph;

/// Version of the task protocol; a peer answers other versions with [`TaskResponse::Failed`].
pub const TASK_VERSION: u16 = 1;

/// One input of a task: the data itself, or only its id when the worker already holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    Data(Data),
    Held,
}

/// Run this subgraph on these inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub version: u16,
    /// Correlates the response; unique per requester.
    pub task: u64,
    pub subgraph: SubgraphId,
    pub program: Program,
    pub input_ids: Vec<ValueId>,
    pub inputs: Vec<Input>,
}

impl TaskRequest {
    /// A request for `sg` with the given inputs (`None` where the worker holds the value).
    pub fn new(task: u64, sg: &Subgraph, inputs: Vec<Input>) -> Self {
        TaskRequest {
            version: TASK_VERSION,
            task,
            subgraph: sg.id,
            program: sg.program.clone(),
            input_ids: sg.input_ids.clone(),
            inputs,
        }
    }

    /// Whether the subgraph id matches the program and input ids it claims to cover.
    pub fn id_matches(&self) -> bool {
        subgraph_id(&self.program.canonical_bytes(), &self.input_ids) == self.subgraph
    }
}

/// A worker's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskResponse {
    Done {
        task: u64,
        outputs: Vec<Data>,
        /// Time spent computing, for throughput measurement.
        compute_micros: u64,
    },
    /// The worker no longer holds these inputs (by index): send them as data.
    Missing {
        task: u64,
        inputs: Vec<usize>,
    },
    Failed {
        task: u64,
        error: String,
    },
}
