//! What `graph.end()` reports: every op that failed to build or run, and why.

use std::fmt;

use crate::error::{BuildError, EvalError};

/// One failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// `build` or `eval`.
    pub stage: &'static str,
    pub message: String,
}

impl Failure {
    pub(crate) fn build(e: &BuildError) -> Failure {
        Failure {
            stage: "build",
            message: e.to_string(),
        }
    }

    pub(crate) fn eval(e: &EvalError) -> Failure {
        Failure {
            stage: "eval",
            message: e.to_string(),
        }
    }
}

/// Every failure of a graph, in the order they happened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct Report {
    pub graph: String,
    pub failures: Vec<Failure>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "graph '{}': {} op(s) failed",
            self.graph,
            self.failures.len()
        )?;
        for x in &self.failures {
            writeln!(f, "  [{}] {}", x.stage, x.message)?;
        }
        Ok(())
    }
}
