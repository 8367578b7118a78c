//! The op IR: Corvid's closed set of tensor ops as plain, serialisable data.
//!
//! Elementwise ops are declared once in a table (name, CPU scalar definition, WGSL expression,
//! test domain, tolerance) in the style of candle's `unary_op!`; the CPU reference, the fast CPU
//! path and the WGSL kernel all come from that one row.

use std::f32::consts::PI;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tensor::DType;

/// How close a backend's answer must be to the reference: `|got - want| <= atol + rtol * |want|`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub atol: f32,
    pub rtol: f32,
}

impl Tolerance {
    pub const fn new(atol: f32, rtol: f32) -> Self {
        Tolerance { atol, rtol }
    }

    /// Whether `got` is within tolerance of `want`. NaN matches only NaN; infinities must match.
    pub fn accepts(&self, got: f32, want: f32) -> bool {
        if want.is_nan() || got.is_nan() {
            return want.is_nan() && got.is_nan();
        }
        if want.is_infinite() || got.is_infinite() {
            return want == got;
        }
        (got - want).abs() <= self.atol + self.rtol * want.abs()
    }
}

/// The range random test inputs are drawn from (integers only when `ints`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Domain {
    pub lo: f32,
    pub hi: f32,
    pub ints: bool,
}

const fn dom(lo: f32, hi: f32) -> Domain {
    Domain {
        lo,
        hi,
        ints: false,
    }
}

const fn ints(lo: f32, hi: f32) -> Domain {
    Domain { lo, hi, ints: true }
}

/// Applies `f` element by element; generic so each op's loop is compiled (and vectorised) on its own.
#[inline]
fn map1(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*s);
    }
}

#[inline]
fn map2(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(*x, *y);
    }
}

fn bool_f32(b: bool) -> f32 {
    if b { 1.0 } else { 0.0 }
}

macro_rules! unary_ops {
    ($( $v:ident $name:literal |$x:ident| $cpu:expr, $wgsl:literal, $dom:expr, $tol:expr; )*) => {
        /// Elementwise ops of one f32 input.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum UnaryOp { $($v),* }

        impl UnaryOp {
            pub const ALL: &'static [UnaryOp] = &[$(UnaryOp::$v),*];

            pub fn name(self) -> &'static str {
                match self { $(UnaryOp::$v => $name),* }
            }

            /// The op on one value: the definition the reference and the CPU path share.
            #[inline]
            pub fn apply(self, x: f32) -> f32 {
                match self { $(UnaryOp::$v => { let $x = x; $cpu }),* }
            }

            /// The op over a slice, one monomorphised loop per op.
            pub fn map_slice(self, src: &[f32], dst: &mut [f32]) {
                match self { $(UnaryOp::$v => map1(src, dst, |$x: f32| $cpu)),* }
            }

            /// WGSL expression in `x`.
            pub fn wgsl(self) -> &'static str {
                match self { $(UnaryOp::$v => $wgsl),* }
            }

            pub fn domain(self) -> Domain {
                match self { $(UnaryOp::$v => $dom),* }
            }

            pub fn tolerance(self) -> Tolerance {
                match self { $(UnaryOp::$v => $tol),* }
            }
        }
    };
}

macro_rules! binary_ops {
    ($( $v:ident $name:literal |$a:ident, $b:ident| $cpu:expr, $wgsl:literal, $da:expr, $db:expr, $tol:expr; )*) => {
        /// Elementwise ops of two f32 inputs with NumPy broadcasting. Comparisons give 0.0 or 1.0.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum BinaryOp { $($v),* }

        impl BinaryOp {
            pub const ALL: &'static [BinaryOp] = &[$(BinaryOp::$v),*];

            pub fn name(self) -> &'static str {
                match self { $(BinaryOp::$v => $name),* }
            }

            #[inline]
            pub fn apply(self, a: f32, b: f32) -> f32 {
                match self { $(BinaryOp::$v => { let ($a, $b) = (a, b); $cpu }),* }
            }

            /// The op over equal-length slices, one monomorphised loop per op.
            pub fn map_slices(self, a: &[f32], b: &[f32], dst: &mut [f32]) {
                match self { $(BinaryOp::$v => map2(a, b, dst, |$a: f32, $b: f32| $cpu)),* }
            }

            /// WGSL expression in `a` and `b`.
            pub fn wgsl(self) -> &'static str {
                match self { $(BinaryOp::$v => $wgsl),* }
            }

            pub fn domains(self) -> [Domain; 2] {
                match self { $(BinaryOp::$v => [$da, $db]),* }
            }

            pub fn tolerance(self) -> Tolerance {
                match self { $(BinaryOp::$v => $tol),* }
            }
        }
    };
}

const EXACT: Tolerance = Tolerance::new(0.0, 0.0);
const ULPS: Tolerance = Tolerance::new(1e-6, 2e-6);
const TRANSCENDENTAL: Tolerance = Tolerance::new(2e-6, 2e-5);

unary_ops! {
    Neg "neg" |x| -x, "-x", dom(-10.0, 10.0), EXACT;
    Abs "abs" |x| x.abs(), "abs(x)", dom(-10.0, 10.0), EXACT;
    Exp "exp" |x| x.exp(), "exp(x)", dom(-10.0, 10.0), TRANSCENDENTAL;
    Log "log" |x| x.ln(), "log(x)", dom(0.01, 100.0), Tolerance::new(1e-5, 2e-6);
    Sqrt "sqrt" |x| x.sqrt(), "sqrt(x)", dom(0.0, 100.0), ULPS;
    Rsqrt "rsqrt" |x| 1.0 / x.sqrt(), "inverseSqrt(x)", dom(0.01, 100.0), ULPS;
    Square "square" |x| x * x, "x * x", dom(-10.0, 10.0), EXACT;
    Reciprocal "reciprocal" |x| 1.0 / x, "1.0 / x", dom(0.1, 10.0), ULPS;
    Sin "sin" |x| x.sin(), "sin(x)", dom(-PI, PI), Tolerance::new(5e-4, 0.0);
    Cos "cos" |x| x.cos(), "cos(x)", dom(-PI, PI), Tolerance::new(5e-4, 0.0);
    Tanh "tanh" |x| x.tanh(), "tanh(clamp(x, -15.0, 15.0))", dom(-5.0, 5.0), TRANSCENDENTAL;
    Sigmoid "sigmoid" |x| 1.0 / (1.0 + (-x).exp()), "1.0 / (1.0 + exp(-x))", dom(-10.0, 10.0), TRANSCENDENTAL;
    Relu "relu" |x| if x > 0.0 { x } else { 0.0 }, "select(0.0, x, x > 0.0)", dom(-10.0, 10.0), EXACT;
    // GELU, tanh approximation (PyTorch's `approximate="tanh"`): WGSL has no erf.
    Gelu "gelu" |x| 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        "0.5 * x * (1.0 + tanh(clamp(0.7978846 * (x + 0.044715 * x * x * x), -15.0, 15.0)))",
        dom(-5.0, 5.0), TRANSCENDENTAL;
    // Stable form: max(x, 0) + log(1 + exp(-|x|)).
    Softplus "softplus" |x| x.max(0.0) + (1.0 + (-x.abs()).exp()).ln(),
        "max(x, 0.0) + log(1.0 + exp(-abs(x)))", dom(-10.0, 10.0), TRANSCENDENTAL;
}

binary_ops! {
    Add "add" |a, b| a + b, "a + b", dom(-10.0, 10.0), dom(-10.0, 10.0), EXACT;
    Sub "sub" |a, b| a - b, "a - b", dom(-10.0, 10.0), dom(-10.0, 10.0), EXACT;
    Mul "mul" |a, b| a * b, "a * b", dom(-10.0, 10.0), dom(-10.0, 10.0), EXACT;
    Div "div" |a, b| a / b, "a / b", dom(-10.0, 10.0), dom(0.5, 4.0), ULPS;
    // Negative bases with integral exponents follow `powf`; see `corvid_pow` in elementwise.wgsl.
    Pow "pow" |a, b| a.powf(b), "corvid_pow(a, b)", dom(0.1, 4.0), dom(-3.0, 3.0), Tolerance::new(1e-5, 1e-4);
    Maximum "maximum" |a, b| a.max(b), "max(a, b)", dom(-10.0, 10.0), dom(-10.0, 10.0), EXACT;
    Minimum "minimum" |a, b| a.min(b), "min(a, b)", dom(-10.0, 10.0), dom(-10.0, 10.0), EXACT;
    Eq "eq" |a, b| bool_f32(a == b), "select(0.0, 1.0, a == b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
    Ne "ne" |a, b| bool_f32(a != b), "select(0.0, 1.0, a != b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
    Lt "lt" |a, b| bool_f32(a < b), "select(0.0, 1.0, a < b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
    Le "le" |a, b| bool_f32(a <= b), "select(0.0, 1.0, a <= b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
    Gt "gt" |a, b| bool_f32(a > b), "select(0.0, 1.0, a > b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
    Ge "ge" |a, b| bool_f32(a >= b), "select(0.0, 1.0, a >= b)", ints(-2.0, 2.0), ints(-2.0, 2.0), EXACT;
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    /// Population variance (NumPy's default, `ddof = 0`).
    Variance,
}

impl ReduceOp {
    pub const ALL: &'static [ReduceOp] = &[
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Variance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Variance => "variance",
        }
    }

    /// Code passed to `reduce.wgsl`.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// One tensor op with its parameters. Shapes are checked by [`crate::shape::infer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Unary(UnaryOp),
    /// `min(max(x, min), max)`.
    Clamp {
        min: f32,
        max: f32,
    },
    Binary(BinaryOp),
    /// `where(cond, a, b)`: `a` where `cond != 0`, else `b`; all three broadcast.
    Where,
    /// f32 → i32 truncates toward zero (saturating, NaN → 0); i32 → f32 rounds to nearest.
    Cast {
        to: DType,
    },
    /// `[..., m, k] @ [..., k, n]` with broadcast batch dims; both inputs rank ≥ 2.
    MatMul,
    Permute {
        axes: Vec<usize>,
    },
    Reshape {
        shape: Vec<usize>,
    },
    BroadcastTo {
        shape: Vec<usize>,
    },
    /// Per axis `start..end` by `step` (step ≥ 1).
    Slice {
        starts: Vec<usize>,
        ends: Vec<usize>,
        steps: Vec<usize>,
    },
    Concat {
        axis: usize,
    },
    /// Per axis `[before, after]` elements of `value`.
    Pad {
        pads: Vec<[usize; 2]>,
        value: f32,
    },
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// Index of the first maximum along `axis`, as i32.
    ArgMax {
        axis: usize,
        keepdims: bool,
    },
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// Over the last axis: `(x - mean) / sqrt(var + eps) * gamma + beta`; inputs x, gamma, beta.
    LayerNorm {
        eps: f32,
    },
    /// NCHW input `[n, c, h, w]`, weights `[o, c, kh, kw]`, zero padding.
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 2],
    },
    /// NCHW; padded positions never win.
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
}

/// How many inputs an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Exact(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Exact(k) => write!(f, "{k}"),
            Arity::AtLeast(k) => write!(f, "at least {k}"),
        }
    }
}

impl Op {
    /// The op's registry name, e.g. `"add"`, `"matmul"`, `"sum"`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Unary(u) => u.name(),
            Op::Clamp { .. } => "clamp",
            Op::Binary(b) => b.name(),
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::MatMul => "matmul",
            Op::Permute { .. } => "permute",
            Op::Reshape { .. } => "reshape",
            Op::BroadcastTo { .. } => "broadcast_to",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Pad { .. } => "pad",
            Op::Reduce { op, .. } => op.name(),
            Op::ArgMax { .. } => "argmax",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Conv2d { .. } => "conv2d",
            Op::MaxPool2d { .. } => "max_pool2d",
        }
    }

    pub fn arity(&self) -> Arity {
        match self {
            Op::Binary(_) | Op::MatMul | Op::Conv2d { .. } => Arity::Exact(2),
            Op::Where | Op::LayerNorm { .. } => Arity::Exact(3),
            Op::Concat { .. } => Arity::AtLeast(1),
            _ => Arity::Exact(1),
        }
    }

    /// Multiply-adds and other arithmetic the op performs, for cost estimates and the FLOP
    /// budget. Ops that only move data (reshape, permute, slice, concat, pad, broadcast)
    /// count zero. Saturates: any meta, however absurd, gives a number, never an overflow.
    pub fn flops(&self, inputs: &[&crate::TensorMeta], out: &crate::TensorMeta) -> u64 {
        let n = out.numel() as u64;
        let prod = |xs: &[usize]| xs.iter().fold(1u64, |p, &x| p.saturating_mul(x as u64));
        match self {
            Op::MatMul => {
                let k = inputs[0].shape.last().copied().unwrap_or(0) as u64;
                n.saturating_mul(k).saturating_mul(2)
            }
            Op::Conv2d { .. } => {
                let w = &inputs[1].shape;
                n.saturating_mul(prod(w.get(1..).unwrap_or(&[])))
                    .saturating_mul(2)
            }
            Op::Reduce { .. } | Op::ArgMax { .. } => inputs[0].numel() as u64,
            Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::LayerNorm { .. } => {
                n.saturating_mul(5)
            }
            Op::MaxPool2d { kernel, .. } => n.saturating_mul(prod(kernel)),
            Op::Permute { .. }
            | Op::Reshape { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Pad { .. } => 0,
            _ => n,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::MatMul => f.write_str(name),
            Op::Clamp { min, max } => write!(f, "clamp(min={min}, max={max})"),
            Op::Cast { to } => write!(f, "cast(to={to})"),
            Op::Permute { axes } => write!(f, "permute(axes={axes:?})"),
            Op::Reshape { shape } | Op::BroadcastTo { shape } => {
                write!(f, "{name}(shape={shape:?})")
            }
            Op::Slice {
                starts,
                ends,
                steps,
            } => write!(
                f,
                "slice(starts={starts:?}, ends={ends:?}, steps={steps:?})"
            ),
            Op::Concat { axis } => write!(f, "concat(axis={axis})"),
            Op::Pad { pads, value } => write!(f, "pad(pads={pads:?}, value={value})"),
            Op::Reduce { axes, keepdims, .. } => {
                write!(f, "{name}(axes={axes:?}, keepdims={keepdims})")
            }
            Op::ArgMax { axis, keepdims } => write!(f, "argmax(axis={axis}, keepdims={keepdims})"),
            Op::Softmax { axis } | Op::LogSoftmax { axis } => write!(f, "{name}(axis={axis})"),
            Op::LayerNorm { eps } => write!(f, "layer_norm(eps={eps})"),
            Op::Conv2d { stride, padding } => {
                write!(f, "conv2d(stride={stride:?}, padding={padding:?})")
            }
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
            } => write!(
                f,
                "max_pool2d(kernel={kernel:?}, stride={stride:?}, padding={padding:?})"
            ),
        }
    }
}
