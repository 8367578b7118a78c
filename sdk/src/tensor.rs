//! The developer's tensor: a lazy handle to a node of a [`Graph`], with a method per op.
//!
//! Methods check shapes at once and return the error at the line that built the tensor.
//! Operators (`&a + &b`, `-&a`, `&a * 2.0`) cannot return errors: a rejected operator records
//! the failure in the graph, which `eval` and [`Graph::end`] report.

use std::panic::Location;

use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_kernels::{DType, Op, Tensor as Data, TensorMeta};
use ndarray::ArrayD;

use crate::error::{BuildError, EvalError, Site};
use crate::graph::{Graph, NodeId};
use crate::ids::ValueId;

/// A lazily evaluated tensor in a [`Graph`]. Cloning clones the handle.
#[derive(Clone, Debug)]
pub struct Tensor {
    graph: Graph,
    node: NodeId,
    meta: TensorMeta,
}

type Built = Result<Tensor, BuildError>;

macro_rules! unary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "`.")]
            #[track_caller]
            pub fn $name(&self) -> Built {
                self.op(Op::Unary(UnaryOp::$op), &[])
            }
        )*
    };
}

macro_rules! binary_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "` with NumPy broadcasting.")]
            #[track_caller]
            pub fn $name(&self, other: &Tensor) -> Built {
                self.op(Op::Binary(BinaryOp::$op), &[other])
            }
        )*
    };
}

macro_rules! reduce_methods {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("`", stringify!($name), "` over `axes`, keeping them as size 1 when `keepdims`.")]
            #[track_caller]
            pub fn $name(&self, axes: &[usize], keepdims: bool) -> Built {
                self.op(Op::Reduce { op: ReduceOp::$op, axes: axes.to_vec(), keepdims }, &[])
            }
        )*
    };
}

impl Tensor {
    pub(crate) fn new(graph: Graph, node: NodeId, meta: TensorMeta) -> Tensor {
        Tensor { graph, node, meta }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub(crate) fn node(&self) -> NodeId {
        self.node
    }

    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    pub fn shape(&self) -> &[usize] {
        &self.meta.shape
    }

    pub fn dtype(&self) -> DType {
        self.meta.dtype
    }

    /// The content-addressed id of this value (see [`crate::ids`]).
    pub fn id(&self) -> ValueId {
        self.graph.inner().nodes[self.node].id
    }

    /// Where in the developer's code this tensor was built.
    pub fn site(&self) -> Site {
        self.graph.inner().nodes[self.node].at
    }

    /// Whether this tensor was built successfully; the build error otherwise.
    pub fn check(&self) -> Result<(), BuildError> {
        match &self.graph.inner().nodes[self.node].kind {
            crate::graph::NodeKind::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    #[track_caller]
    fn op(&self, op: Op, rest: &[&Tensor]) -> Built {
        let mut args = vec![self];
        args.extend_from_slice(rest);
        self.graph.apply_at(op, &args, Site(Location::caller()))
    }

    // ---- evaluation ---------------------------------------------------------------------

    /// Evaluates an f32 tensor to an ndarray array.
    pub fn eval(&self) -> Result<ArrayD<f32>, EvalError> {
        let data = self.eval_data()?;
        data.to_array_f32().map_err(|_| EvalError::DType {
            expected: "f32".into(),
            got: data.meta(),
        })
    }

    /// Evaluates an i32 tensor (argmax, cast) to an ndarray array.
    pub fn eval_i32(&self) -> Result<ArrayD<i32>, EvalError> {
        let data = self.eval_data()?;
        data.to_array_i32().map_err(|_| EvalError::DType {
            expected: "i32".into(),
            got: data.meta(),
        })
    }

    /// Evaluates to a dense kernels tensor (either dtype).
    pub fn eval_data(&self) -> Result<Data, EvalError> {
        Ok(self.graph.eval(&[self])?.remove(0))
    }

    // ---- ops ----------------------------------------------------------------------------

    unary_methods! {
        neg => Neg, abs => Abs, exp => Exp, log => Log, sqrt => Sqrt, rsqrt => Rsqrt,
        square => Square, reciprocal => Reciprocal, sin => Sin, cos => Cos, tanh => Tanh,
        sigmoid => Sigmoid, relu => Relu, gelu => Gelu, softplus => Softplus,
    }

    binary_methods! {
        add => Add, sub => Sub, mul => Mul, div => Div, pow => Pow, maximum => Maximum,
        minimum => Minimum, eq => Eq, ne => Ne, lt => Lt, le => Le, gt => Gt, ge => Ge,
    }

    reduce_methods! {
        sum => Sum, mean => Mean, max => Max, min => Min, variance => Variance,
    }

    /// `min(max(x, min), max)`.
    #[track_caller]
    pub fn clamp(&self, min: f32, max: f32) -> Built {
        self.op(Op::Clamp { min, max }, &[])
    }

    /// `a` where `self != 0`, else `b`; all three broadcast.
    #[track_caller]
    pub fn select(&self, a: &Tensor, b: &Tensor) -> Built {
        self.op(Op::Where, &[a, b])
    }

    #[track_caller]
    pub fn cast(&self, to: DType) -> Built {
        self.op(Op::Cast { to }, &[])
    }

    /// Matrix product over the last two axes, batch axes broadcast.
    #[track_caller]
    pub fn matmul(&self, other: &Tensor) -> Built {
        self.op(Op::MatMul, &[other])
    }

    /// Swaps the last two axes.
    #[track_caller]
    pub fn transpose(&self) -> Built {
        let r = self.meta.rank();
        let mut axes: Vec<usize> = (0..r).collect();
        if r >= 2 {
            axes.swap(r - 1, r - 2);
        }
        self.op(Op::Permute { axes }, &[])
    }

    #[track_caller]
    pub fn permute(&self, axes: &[usize]) -> Built {
        self.op(
            Op::Permute {
                axes: axes.to_vec(),
            },
            &[],
        )
    }

    #[track_caller]
    pub fn reshape(&self, shape: &[usize]) -> Built {
        self.op(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[],
        )
    }

    #[track_caller]
    pub fn broadcast_to(&self, shape: &[usize]) -> Built {
        self.op(
            Op::BroadcastTo {
                shape: shape.to_vec(),
            },
            &[],
        )
    }

    /// Per axis, the range `start..end` by `step`.
    #[track_caller]
    pub fn slice(&self, ranges: &[(usize, usize, usize)]) -> Built {
        self.op(
            Op::Slice {
                starts: ranges.iter().map(|r| r.0).collect(),
                ends: ranges.iter().map(|r| r.1).collect(),
                steps: ranges.iter().map(|r| r.2).collect(),
            },
            &[],
        )
    }

    /// Per axis `[before, after]` elements of `value`.
    #[track_caller]
    pub fn pad(&self, pads: &[[usize; 2]], value: f32) -> Built {
        self.op(
            Op::Pad {
                pads: pads.to_vec(),
                value,
            },
            &[],
        )
    }

    #[track_caller]
    pub fn argmax(&self, axis: usize, keepdims: bool) -> Built {
        self.op(Op::ArgMax { axis, keepdims }, &[])
    }

    #[track_caller]
    pub fn softmax(&self, axis: usize) -> Built {
        self.op(Op::Softmax { axis }, &[])
    }

    #[track_caller]
    pub fn log_softmax(&self, axis: usize) -> Built {
        self.op(Op::LogSoftmax { axis }, &[])
    }

    /// Normalises over the last axis, then scales by `gamma` and shifts by `beta`.
    #[track_caller]
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32) -> Built {
        self.op(Op::LayerNorm { eps }, &[gamma, beta])
    }

    /// NCHW convolution with weights `[o, c, kh, kw]`.
    #[track_caller]
    pub fn conv2d(&self, weight: &Tensor, stride: [usize; 2], padding: [usize; 2]) -> Built {
        self.op(Op::Conv2d { stride, padding }, &[weight])
    }

    #[track_caller]
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Built {
        self.op(
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
            },
            &[],
        )
    }
}
