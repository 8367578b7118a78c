//! What a program may use, checked before anything runs.
//!
//! A worker runs programs that strangers send, so it treats their shapes and sizes the way a
//! WebAssembly runtime treats a module: hostile until a cheap static pass has bounded them.
//! [`Program::validate`] walks the program once, in order, and refuses it with a
//! [`TooLarge`] naming the node, the op and the value when it is over any [`Budget`]:
//!
//! - rank ([`MAX_RANK`], an op-set rule checked by shape inference), node count and encoded
//!   size;
//! - each value's size, counted by its *extent* (empty axes count as 1, so that a `[2^62, 0]`
//!   tensor cannot smuggle huge loop bounds past a byte check);
//! - **peak live memory**: inputs stay live throughout, each intermediate is freed after its
//!   last use (as the backends do), outputs stay to the end, and each op is charged the
//!   workspace its CPU implementation allocates on top of its output ([`workspace_bytes`]);
//! - total FLOPs.
//!
//! The pass lives with [`Program`]; this module holds the limits and what each value and op
//! is charged. Nothing in it allocates in proportion to a claimed size: the pass is linear in
//! the program's encoded length.
//!
//! [`Program`]: crate::program::Program
//! [`Program::validate`]: crate::program::Program::validate

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::checked;
use crate::op::Op;
use crate::tensor::TensorMeta;

pub use crate::shape::MAX_RANK;

/// Bookkeeping charged per value (its meta, its slot in the run's tables), on top of its data.
pub const VALUE_OVERHEAD: u64 = 512;

/// Bytes a matmul or conv2d may allocate inside `gemm` (packing buffers, per thread), on top
/// of the sizes the validator knows.
pub const GEMM_WORKSPACE: u64 = 4 << 20;

/// Limits on one program. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Most nodes (ops).
    pub max_nodes: usize,
    /// Largest encoded program (postcard), bytes.
    pub max_program_bytes: u64,
    /// Largest value, bytes by extent.
    pub max_tensor_bytes: u64,
    /// Most bytes live at once: inputs, intermediates, outputs and op workspace.
    pub max_peak_bytes: u64,
    /// Most floating-point operations in all.
    pub max_flops: u64,
}

impl Budget {
    /// Node limit of the default budget: far above what the partitioner cuts.
    pub const MAX_NODES: usize = 4096;
    /// Encoded size limit of the default budget.
    pub const MAX_PROGRAM_BYTES: u64 = 1 << 20;

    /// Limits that only rule out sizes no machine holds: what local evaluation checks.
    pub fn unlimited() -> Budget {
        Budget {
            max_nodes: usize::MAX,
            max_program_bytes: u64::MAX,
            max_tensor_bytes: u64::MAX,
            max_peak_bytes: u64::MAX,
            max_flops: u64::MAX,
        }
    }

    /// What a backend holds a local run to: the default structure limits and its tensor
    /// limit, with no limit on memory or FLOPs (a local program's own business).
    pub fn local(max_tensor_bytes: u64) -> Budget {
        Budget::new(max_tensor_bytes, u64::MAX, u64::MAX)
    }

    /// The default structure limits, with the given memory and compute limits.
    pub fn new(max_tensor_bytes: u64, max_peak_bytes: u64, max_flops: u64) -> Budget {
        Budget {
            max_nodes: Budget::MAX_NODES,
            max_program_bytes: Budget::MAX_PROGRAM_BYTES,
            max_tensor_bytes,
            max_peak_bytes,
            max_flops,
        }
    }

    /// The tighter of two budgets, limit by limit.
    pub fn min(&self, other: &Budget) -> Budget {
        Budget {
            max_nodes: self.max_nodes.min(other.max_nodes),
            max_program_bytes: self.max_program_bytes.min(other.max_program_bytes),
            max_tensor_bytes: self.max_tensor_bytes.min(other.max_tensor_bytes),
            max_peak_bytes: self.max_peak_bytes.min(other.max_peak_bytes),
            max_flops: self.max_flops.min(other.max_flops),
        }
    }

    /// Whether a program with this footprint fits, limit by limit; `Err` names the first that
    /// does not (without the node: a footprint is the whole program's).
    pub fn admits(&self, f: &Footprint) -> Result<(), TooLarge> {
        let over = |limit, value: u64, max: u64| {
            (value > max).then_some(TooLarge {
                limit,
                at: None,
                value,
                max,
            })
        };
        match over(Limit::Nodes, f.nodes as u64, self.max_nodes as u64)
            .or_else(|| over(Limit::ProgramBytes, f.program_bytes, self.max_program_bytes))
            .or_else(|| over(Limit::TensorBytes, f.largest_value, self.max_tensor_bytes))
            .or_else(|| over(Limit::PeakMemory, f.peak_bytes, self.max_peak_bytes))
            .or_else(|| over(Limit::Flops, f.flops, self.max_flops))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Which limit a program is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Limit {
    Nodes,
    ProgramBytes,
    TensorBytes,
    PeakMemory,
    Flops,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Nodes => "nodes",
            Limit::ProgramBytes => "program bytes",
            Limit::TensorBytes => "tensor bytes",
            Limit::PeakMemory => "peak memory",
            Limit::Flops => "flops",
        })
    }
}

/// Where in a program a limit was crossed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    Input {
        index: usize,
        meta: TensorMeta,
    },
    Node {
        index: usize,
        op: String,
        meta: TensorMeta,
    },
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Input { index, meta } => write!(f, "input {index} ({meta})"),
            At::Node { index, op, meta } => write!(f, "node {index} ('{op}' making {meta})"),
        }
    }
}

/// A program over a [`Budget`]: which limit, where, by how much.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct TooLarge {
    pub limit: Limit,
    pub at: Option<At>,
    pub value: u64,
    pub max: u64,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (value, max) = (self.value, self.max);
        let what = match self.limit {
            Limit::Nodes => format!("the program has {value} nodes, over the limit of {max}"),
            Limit::ProgramBytes => {
                format!("the program is {value} bytes, over the limit of {max} bytes")
            }
            Limit::TensorBytes => {
                format!("a tensor of {value} bytes is over the limit of {max} bytes per tensor")
            }
            Limit::PeakMemory => format!(
                "the program needs {value} bytes of memory at once, over the limit of {max} bytes"
            ),
            Limit::Flops => {
                format!("the program needs {value} flops, over the limit of {max}")
            }
        };
        match &self.at {
            Some(at) => write!(f, "{at}: {what}"),
            None => f.write_str(&what),
        }
    }
}

/// What a valid program uses: the meta of every value and the totals the budget bounds.
#[derive(Clone, Debug, PartialEq)]
pub struct Footprint {
    /// Inputs first, then one per node.
    pub metas: Vec<TensorMeta>,
    pub nodes: usize,
    pub program_bytes: u64,
    /// The largest value, bytes by extent.
    pub largest_value: u64,
    /// Most bytes live at once (see the module docs).
    pub peak_bytes: u64,
    pub flops: u64,
}

/// Bytes of a value by extent: what a size check must bound.
pub(crate) fn extent_bytes(m: &TensorMeta) -> u64 {
    checked::bytes(m.extent(), m.dtype.size()).unwrap_or(u64::MAX)
}

/// Bytes an op's CPU implementation may allocate while it runs, on top of its output: input
/// copies and f64 temporaries of the reference path, expanded broadcasts, im2col columns and
/// `gemm`'s packing buffers. An upper bound, checked against a counting allocator in the
/// tests; saturates rather than overflowing.
pub fn workspace_bytes(op: &Op, inputs: &[&TensorMeta], out: &TensorMeta) -> u64 {
    let ins: u64 = inputs.iter().fold(0u64, |s, m| s.saturating_add(m.bytes()));
    let first = inputs.first().map_or(0, |m| m.bytes());
    let o = out.bytes();
    match op {
        Op::Unary(_) => 0,
        Op::Binary(_) => o.saturating_mul(2),
        Op::MatMul => {
            let a = &inputs[0].shape;
            let k = a.get(a.len().wrapping_sub(1)).copied().unwrap_or(0) as u64;
            let r = out.rank();
            let (m, n) = if r >= 2 {
                (out.shape[r - 2] as u64, out.shape[r - 1] as u64)
            } else {
                (0, 0)
            };
            // gemm's own buffers, and the two-column copies of a matrix-vector product.
            GEMM_WORKSPACE.saturating_add(k.saturating_add(m).saturating_add(n).saturating_mul(8))
        }
        Op::Conv2d { .. } => {
            let (x, w) = (&inputs[0].shape, &inputs[1].shape);
            if x.len() != 4 || w.len() != 4 || out.rank() != 4 {
                return 0;
            }
            // im2col columns: c·kh·kw rows of oh·ow.
            let cols = [w[1], w[2], w[3], out.shape[2], out.shape[3], 4]
                .iter()
                .fold(1u64, |p, &d| p.saturating_mul(d as u64));
            GEMM_WORKSPACE.saturating_add(cols)
        }
        Op::Concat { .. } => o,
        // f64 copies of the input, and of the mean and deviations for a variance.
        Op::Reduce { .. } => first.saturating_mul(10).saturating_add(o.saturating_mul(3)),
        Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::LayerNorm { .. } => {
            ins.saturating_mul(3).saturating_add(o.saturating_mul(2))
        }
        Op::Where | Op::Clamp { .. } | Op::Cast { .. } | Op::ArgMax { .. } => ins,
        Op::MaxPool2d { .. } => first,
        Op::Permute { .. }
        | Op::Reshape { .. }
        | Op::BroadcastTo { .. }
        | Op::Slice { .. }
        | Op::Pad { .. } => o,
    }
}
