//! Shape and dtype inference: the single place that decides whether an op accepts its inputs.

use crate::checked::{self, Window};
use crate::op::{Arity, Op, ReduceOp};
use crate::tensor::{DType, TensorMeta};

/// Most axes a tensor may have: a rule of the op set, so that no shape a peer sends can make
/// shape inference or a kernel's index arithmetic do unbounded work per value.
pub const MAX_RANK: usize = 8;

/// Why an op cannot be applied to its inputs. Messages name the op (with parameters) and shapes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("op '{op}' takes {expected} inputs, got {got}")]
    Arity {
        op: String,
        expected: Arity,
        got: usize,
    },
    #[error("op '{op}' expects input {index} to be {expected}, got {got}")]
    DType {
        op: String,
        index: usize,
        expected: DType,
        got: TensorMeta,
    },
    #[error("op '{op}': {reason} (inputs {shapes})")]
    Shape {
        op: String,
        shapes: String,
        reason: String,
    },
    #[error("op '{op}': {what} has rank {rank}, over the limit of {MAX_RANK}")]
    Rank {
        op: String,
        what: String,
        rank: usize,
    },
    /// A size computed from the inputs and parameters does not fit in a machine word.
    #[error("op '{op}': {what} overflows (inputs {shapes})")]
    Overflow {
        op: String,
        shapes: String,
        what: String,
    },
}

/// Infers the output of `op` applied to `inputs`, or says why it does not apply.
pub fn infer(op: &Op, inputs: &[&TensorMeta]) -> Result<TensorMeta, OpError> {
    let cx = Cx { op, inputs };
    if !op.arity().accepts(inputs.len()) {
        return Err(OpError::Arity {
            op: op.to_string(),
            expected: op.arity(),
            got: inputs.len(),
        });
    }
    for (i, m) in inputs.iter().enumerate() {
        if m.rank() > MAX_RANK {
            return Err(cx.rank(format!("input {i}"), m.rank()));
        }
    }
    // Parameters that list one entry per axis are checked before anything walks them.
    let per_axis = match op {
        Op::Permute { axes } => axes.len(),
        Op::Reshape { shape } | Op::BroadcastTo { shape } => shape.len(),
        Op::Slice { starts, .. } => starts.len(),
        Op::Pad { pads, .. } => pads.len(),
        Op::Reduce { axes, .. } => axes.len(),
        _ => 0,
    };
    if per_axis > MAX_RANK {
        return Err(cx.rank("the parameter list".into(), per_axis));
    }
    let out = infer_checked(&cx)?;
    if out.rank() > MAX_RANK {
        return Err(cx.rank("the output".into(), out.rank()));
    }
    Ok(out)
}

fn infer_checked(cx: &Cx) -> Result<TensorMeta, OpError> {
    let (op, inputs) = (cx.op, cx.inputs);
    match op {
        Op::Unary(_) | Op::Clamp { .. } | Op::Softmax { .. } | Op::LogSoftmax { .. } => {
            cx.want_f32(&[0])?;
            if let Op::Softmax { axis } | Op::LogSoftmax { axis } = op {
                cx.axis(*axis, inputs[0].rank())?;
            }
            if let Op::Clamp { min, max } = op
                && min.partial_cmp(max) == Some(std::cmp::Ordering::Greater)
            {
                return Err(cx.fail(format!("min {min} is greater than max {max}")));
            }
            Ok(inputs[0].clone())
        }
        Op::Binary(_) => {
            cx.want_f32(&[0, 1])?;
            Ok(TensorMeta::f32(cx.broadcast(&[0, 1])?))
        }
        Op::Where => {
            cx.want_f32(&[0, 1, 2])?;
            Ok(TensorMeta::f32(cx.broadcast(&[0, 1, 2])?))
        }
        Op::Cast { to } => Ok(TensorMeta::new(*to, inputs[0].shape.clone())),
        Op::MatMul => matmul(cx),
        Op::Permute { axes } => {
            let x = inputs[0];
            let mut seen = vec![false; x.rank()];
            if axes.len() != x.rank() {
                return Err(cx.fail(format!("{} axes given for rank {}", axes.len(), x.rank())));
            }
            for &a in axes {
                cx.axis(a, x.rank())?;
                if std::mem::replace(&mut seen[a], true) {
                    return Err(cx.fail(format!("axis {a} appears twice")));
                }
            }
            Ok(TensorMeta::new(
                x.dtype,
                axes.iter().map(|&a| x.shape[a]).collect::<Vec<_>>(),
            ))
        }
        Op::Reshape { shape } => {
            let have = checked::numel(&inputs[0].shape)
                .ok_or_else(|| cx.overflow("the input's element count".into()))?;
            if checked::numel(shape) != Some(have) {
                return Err(cx.fail(format!("cannot reshape {have} elements into {shape:?}")));
            }
            Ok(TensorMeta::new(inputs[0].dtype, shape.clone()))
        }
        Op::BroadcastTo { shape } => {
            let x = inputs[0];
            let ok = x.rank() <= shape.len()
                && x.shape
                    .iter()
                    .rev()
                    .zip(shape.iter().rev())
                    .all(|(&a, &b)| a == b || a == 1);
            if !ok {
                return Err(cx.fail(format!("cannot broadcast to {shape:?}")));
            }
            Ok(TensorMeta::new(x.dtype, shape.clone()))
        }
        Op::Slice {
            starts,
            ends,
            steps,
        } => {
            let x = inputs[0];
            if starts.len() != x.rank() || ends.len() != x.rank() || steps.len() != x.rank() {
                return Err(cx.fail(format!(
                    "slice needs one start, end and step per axis of rank {}",
                    x.rank()
                )));
            }
            let mut shape = Vec::with_capacity(x.rank());
            for d in 0..x.rank() {
                let (s, e, st) = (starts[d], ends[d], steps[d]);
                if st == 0 || s > e || e > x.shape[d] {
                    return Err(cx.fail(format!(
                        "axis {d}: range {s}..{e} step {st} does not fit size {}",
                        x.shape[d]
                    )));
                }
                shape.push((e - s).div_ceil(st));
            }
            Ok(TensorMeta::new(x.dtype, shape))
        }
        Op::Concat { axis } => {
            let first = inputs[0];
            cx.axis(*axis, first.rank())?;
            let mut shape = first.shape.clone();
            shape[*axis] = 0;
            for x in inputs {
                let same_rest = x.rank() == first.rank()
                    && (0..x.rank()).all(|d| d == *axis || x.shape[d] == first.shape[d]);
                if x.dtype != first.dtype || !same_rest {
                    return Err(cx.fail(format!(
                        "inputs must share dtype and every size but axis {axis}"
                    )));
                }
                shape[*axis] = checked::add(shape[*axis], x.shape[*axis])
                    .ok_or_else(|| cx.overflow(format!("the length of axis {axis}")))?;
            }
            Ok(TensorMeta::new(first.dtype, shape))
        }
        Op::Pad { pads, .. } => {
            let x = inputs[0];
            if pads.len() != x.rank() {
                return Err(cx.fail(format!("{} pads given for rank {}", pads.len(), x.rank())));
            }
            let mut shape = Vec::with_capacity(x.rank());
            for (axis, (&d, &[b, a])) in x.shape.iter().zip(pads).enumerate() {
                let len = checked::sum([d, b, a]).ok_or_else(|| {
                    cx.overflow(format!(
                        "axis {axis} padded by [{b}, {a}] ({d} + {b} + {a})"
                    ))
                })?;
                shape.push(len);
            }
            Ok(TensorMeta::new(x.dtype, shape))
        }
        Op::Reduce {
            op: r,
            axes,
            keepdims,
        } => {
            cx.want_f32(&[0])?;
            let out = reduced(cx, axes, *keepdims)?;
            let empty = axes.iter().any(|&a| inputs[0].shape[a] == 0);
            if empty && *r != ReduceOp::Sum {
                return Err(cx.fail(format!("cannot take {} of an empty axis", r.name())));
            }
            Ok(TensorMeta::f32(out))
        }
        Op::ArgMax { axis, keepdims } => {
            cx.want_f32(&[0])?;
            let out = reduced(cx, &[*axis], *keepdims)?;
            if inputs[0].shape[*axis] == 0 {
                return Err(cx.fail("cannot take argmax of an empty axis".into()));
            }
            Ok(TensorMeta::new(DType::I32, out))
        }
        Op::LayerNorm { eps } => {
            cx.want_f32(&[0, 1, 2])?;
            let x = inputs[0];
            let Some(&last) = x.shape.last() else {
                return Err(cx.fail("layer_norm needs rank >= 1".into()));
            };
            if inputs[1].shape != [last] || inputs[2].shape != [last] {
                return Err(cx.fail(format!("gamma and beta must have shape [{last}]")));
            }
            if eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                return Err(cx.fail(format!("eps must be positive, got {eps}")));
            }
            Ok(x.clone())
        }
        Op::Conv2d { stride, padding } => {
            cx.want_f32(&[0, 1])?;
            let (x, w) = (&inputs[0].shape, &inputs[1].shape);
            if x.len() != 4 || w.len() != 4 {
                return Err(
                    cx.fail("conv2d needs input [n, c, h, w] and weight [o, c, kh, kw]".into())
                );
            }
            if x[1] != w[1] {
                return Err(cx.fail(format!(
                    "input has {} channels, weight expects {}",
                    x[1], w[1]
                )));
            }
            let oh = window(cx, x[2], w[2], stride[0], padding[0])?;
            let ow = window(cx, x[3], w[3], stride[1], padding[1])?;
            Ok(TensorMeta::f32(vec![x[0], w[0], oh, ow]))
        }
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => {
            cx.want_f32(&[0])?;
            let x = &inputs[0].shape;
            if x.len() != 4 {
                return Err(cx.fail("max_pool2d needs input [n, c, h, w]".into()));
            }
            if padding[0] >= kernel[0] || padding[1] >= kernel[1] {
                return Err(cx.fail(format!(
                    "padding {padding:?} must be smaller than kernel {kernel:?}"
                )));
            }
            let oh = window(cx, x[2], kernel[0], stride[0], padding[0])?;
            let ow = window(cx, x[3], kernel[1], stride[1], padding[1])?;
            Ok(TensorMeta::f32(vec![x[0], x[1], oh, ow]))
        }
    }
}

/// The step a slice over `start..end` really takes: a step past the range selects only its
/// first element, as a step of the range's length does. Kernels use this, never the raw step,
/// so that `stride × step` stays within the input's extent whatever step a program names.
pub fn slice_step(start: usize, end: usize, step: usize) -> usize {
    step.min(end.saturating_sub(start).max(1))
}

/// Output size of a sliding window, or an error if it does not fit.
fn window(cx: &Cx, size: usize, k: usize, stride: usize, pad: usize) -> Result<usize, OpError> {
    match checked::window(size, k, stride, pad) {
        Some(Window::Fits(n)) => Ok(n),
        Some(Window::Degenerate) => Err(cx.fail("kernel and stride must be at least 1".into())),
        Some(Window::TooSmall { padded }) => {
            Err(cx.fail(format!("kernel {k} is larger than padded input {padded}")))
        }
        None => Err(cx.overflow(format!("input length {size} padded by {pad} on each side"))),
    }
}

fn matmul(cx: &Cx) -> Result<TensorMeta, OpError> {
    cx.want_f32(&[0, 1])?;
    let (a, b) = (&cx.inputs[0].shape, &cx.inputs[1].shape);
    if a.len() < 2 || b.len() < 2 {
        return Err(cx.fail("matmul needs rank >= 2 on both sides".into()));
    }
    let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
    let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
    if k != k2 {
        return Err(cx.fail(format!("inner dimensions differ: {k} vs {k2}")));
    }
    let mut out = broadcast_shapes(&a[..a.len() - 2], &b[..b.len() - 2])
        .ok_or_else(|| cx.fail("batch dimensions do not broadcast".into()))?;
    out.extend([m, n]);
    Ok(TensorMeta::f32(out))
}

fn reduced(cx: &Cx, axes: &[usize], keepdims: bool) -> Result<Vec<usize>, OpError> {
    let x = cx.inputs[0];
    let mut mark = vec![false; x.rank()];
    for &a in axes {
        cx.axis(a, x.rank())?;
        if std::mem::replace(&mut mark[a], true) {
            return Err(cx.fail(format!("axis {a} appears twice")));
        }
    }
    Ok(x.shape
        .iter()
        .zip(&mark)
        .filter_map(|(&d, &m)| match (m, keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect())
}

/// NumPy broadcasting of two shapes, or `None`.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i < rank - a.len() {
            1
        } else {
            a[i - (rank - a.len())]
        };
        let db = if i < rank - b.len() {
            1
        } else {
            b[i - (rank - b.len())]
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Element strides of `shape` (row-major) viewed as broadcast to `out` (0 on broadcast axes).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < lead || shape[i - lead] == 1 {
                0
            } else {
                own[i - lead]
            }
        })
        .collect()
}

/// Row-major element strides of a validated shape (see [`crate::checked`]: its extent fits,
/// so no stride overflows; a shape that does not is a bug in the caller, not in the input).
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    checked::strides(shape).expect("strides of a shape whose extent was validated")
}

/// Inference context: the op and its inputs, for error messages.
struct Cx<'a> {
    op: &'a Op,
    inputs: &'a [&'a TensorMeta],
}

impl Cx<'_> {
    fn fail(&self, reason: String) -> OpError {
        OpError::Shape {
            op: self.op.to_string(),
            shapes: self.shapes(),
            reason,
        }
    }

    fn rank(&self, what: String, rank: usize) -> OpError {
        OpError::Rank {
            op: self.op.to_string(),
            what,
            rank,
        }
    }

    fn overflow(&self, what: String) -> OpError {
        OpError::Overflow {
            op: self.op.to_string(),
            shapes: self.shapes(),
            what,
        }
    }

    fn shapes(&self) -> String {
        self.inputs
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn want_f32(&self, idx: &[usize]) -> Result<(), OpError> {
        for &i in idx {
            if self.inputs[i].dtype != DType::F32 {
                return Err(OpError::DType {
                    op: self.op.to_string(),
                    index: i,
                    expected: DType::F32,
                    got: self.inputs[i].clone(),
                });
            }
        }
        Ok(())
    }

    fn axis(&self, axis: usize, rank: usize) -> Result<(), OpError> {
        if axis >= rank {
            return Err(self.fail(format!("axis {axis} is out of range for rank {rank}")));
        }
        Ok(())
    }

    fn broadcast(&self, idx: &[usize]) -> Result<Vec<usize>, OpError> {
        let mut out = self.inputs[idx[0]].shape.clone();
        for &i in &idx[1..] {
            out = broadcast_shapes(&out, &self.inputs[i].shape)
                .ok_or_else(|| self.fail("shapes do not broadcast".into()))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::BinaryOp;

    fn f(shape: &[usize]) -> TensorMeta {
        TensorMeta::f32(shape.to_vec())
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shapes(&[], &[5]), Some(vec![5]));
        assert_eq!(broadcast_shapes(&[2, 3], &[3, 2]), None);
        assert_eq!(broadcast_strides(&[4, 1], &[2, 4, 3]), vec![0, 1, 0]);
    }

    #[test]
    fn errors_name_op_and_shapes() {
        let e = infer(&Op::Binary(BinaryOp::Add), &[&f(&[2, 3]), &f(&[4])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "op 'add': shapes do not broadcast (inputs f32[2, 3], f32[4])"
        );
        let e = infer(&Op::MatMul, &[&f(&[2, 3]), &f(&[4, 5])]).unwrap_err();
        assert!(
            e.to_string().contains("inner dimensions differ: 3 vs 4"),
            "{e}"
        );
        let e = infer(&Op::MatMul, &[&f(&[2, 3])]).unwrap_err();
        assert_eq!(e.to_string(), "op 'matmul' takes 2 inputs, got 1");
        let e = infer(
            &Op::Reduce {
                op: ReduceOp::Sum,
                axes: vec![2],
                keepdims: false,
            },
            &[&f(&[2, 3])],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("axis 2 is out of range for rank 2"),
            "{e}"
        );
        let i = TensorMeta::new(DType::I32, vec![3]);
        let e = infer(&Op::Binary(BinaryOp::Mul), &[&i, &i]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "op 'mul' expects input 0 to be f32, got i32[3]"
        );
    }

    #[test]
    fn conv_and_pool_shapes() {
        let conv = Op::Conv2d {
            stride: [2, 1],
            padding: [1, 0],
        };
        assert_eq!(
            infer(&conv, &[&f(&[1, 3, 7, 5]), &f(&[4, 3, 3, 3])])
                .unwrap()
                .shape,
            [1, 4, 4, 3]
        );
        let pool = Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        assert_eq!(
            infer(&pool, &[&f(&[2, 3, 5, 4])]).unwrap().shape,
            [2, 3, 2, 2]
        );
    }
}
