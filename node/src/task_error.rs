//! The requester-facing [`TaskError`] for an [`ExecError`]: one mapping for tasks run in the
//! node's process (`worker`) and in the executor process (`sandbox::child`).

use corvid_kernels::cancel::Stopped;
use corvid_kernels::{ExecError, ProgramError};
use corvid_sdk::wire::TaskError;

/// The requester-facing reason for an execution error.
pub(crate) fn from_exec(e: ExecError) -> TaskError {
    match e {
        ExecError::Program(ProgramError::TooLarge(t)) => TaskError::TooLarge(t),
        e @ (ExecError::Program(_) | ExecError::InputCount { .. } | ExecError::Input { .. }) => {
            TaskError::Invalid(e.to_string())
        }
        ExecError::Stopped(Stopped::Cancelled) => TaskError::Cancelled,
        ExecError::Stopped(Stopped::Deadline(d)) => TaskError::Deadline(d),
        e => TaskError::Failed(e.to_string()),
    }
}
