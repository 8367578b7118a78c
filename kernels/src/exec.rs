//! What every backend shares: the errors opening one and running a program end with, the
//! limits and cancel token a run is held to, and the input check it starts with. The backends
//! (`cpu`, `gpu`) and the dispatcher over them (`backend`) all import it.

use crate::budget::{Budget, Footprint};
use crate::cancel::{Cancel, Stopped};
use crate::gpu::kernel::GridTooLarge;
use crate::program::{Program, ProgramError};
use crate::tensor::{Tensor, TensorMeta};

/// Why a backend could not be opened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend '{0}' (expected auto, gpu or cpu)")]
    Choice(String),
    #[error("no usable GPU adapter (found: {})", if found.is_empty() { "none".to_string() } else { found.join("; ") })]
    NoAdapter { found: Vec<String> },
    #[error("could not open a device on adapter '{adapter}': {reason}")]
    Device { adapter: String, reason: String },
    #[error("gpu thread: {0}")]
    Thread(String),
}

/// Why a program did not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error("program takes {expected} inputs, got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input {index}: program expects {expected}, got {got}")]
    Input {
        index: usize,
        expected: TensorMeta,
        got: TensorMeta,
    },
    #[error("node {node}: {source}")]
    Grid {
        node: usize,
        #[source]
        source: GridTooLarge,
    },
    /// The run was cancelled or ran out of time.
    #[error("stopped: {0}")]
    Stopped(#[from] Stopped),
    #[error("gpu out of memory: {0}")]
    OutOfMemory(String),
    #[error("gpu device error: {0}")]
    Device(String),
    #[error("the backend has shut down")]
    BackendGone,
}

/// What one run may use, and when it must stop.
#[derive(Clone, Debug)]
pub struct Guard {
    pub budget: Budget,
    pub cancel: Cancel,
}

impl Guard {
    pub fn new(budget: Budget, cancel: Cancel) -> Guard {
        Guard { budget, cancel }
    }
}

/// Checks inputs against the program's declared inputs, then validates the program against
/// `budget` (every value's meta, peak memory, FLOPs) before anything is allocated.
pub fn check_inputs(
    program: &Program,
    inputs: &[&Tensor],
    budget: &Budget,
) -> Result<Footprint, ExecError> {
    if inputs.len() != program.inputs.len() {
        return Err(ExecError::InputCount {
            expected: program.inputs.len(),
            got: inputs.len(),
        });
    }
    for (index, (t, want)) in inputs.iter().zip(&program.inputs).enumerate() {
        if t.dtype() != want.dtype || t.shape() != want.shape.as_slice() {
            return Err(ExecError::Input {
                index,
                expected: want.clone(),
                got: t.meta(),
            });
        }
    }
    Ok(program.validate(budget)?)
}
