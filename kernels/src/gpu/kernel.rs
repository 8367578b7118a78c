//! The WGSL kernels: which sources exist and how each op maps onto dispatches of them.
//!
//! Everything here is pure data and logic, so it is tested (and the WGSL validated with naga)
//! without a GPU.
//!
//! Kernel parameters are `u32`. [`plan`] is only called on programs validated against a budget
//! whose tensor limit is the device's binding limit, itself at most `u32::MAX` bytes: every
//! value's extent (see [`crate::checked`]) is then under 2^30 elements, and every size, stride
//! or offset below is a product of a value's axes, so the `as u32` conversions cannot
//! truncate.

use crate::op::{BinaryOp, Op, UnaryOp};
use crate::shape::{broadcast_strides, contiguous_strides};
use crate::tensor::{DType, TensorMeta};

const ELEMENTWISE: &str = include_str!("wgsl/elementwise.wgsl");
const COPY: &str = include_str!("wgsl/copy.wgsl");
const FILL: &str = include_str!("wgsl/fill.wgsl");
const CAST: &str = include_str!("wgsl/cast.wgsl");
const MATMUL: &str = include_str!("wgsl/matmul.wgsl");
const REDUCE: &str = include_str!("wgsl/reduce.wgsl");
const ARGMAX: &str = include_str!("wgsl/argmax.wgsl");
const SOFTMAX: &str = include_str!("wgsl/softmax.wgsl");
const LAYER_NORM: &str = include_str!("wgsl/layer_norm.wgsl");
const CONV2D: &str = include_str!("wgsl/conv2d.wgsl");
const MAX_POOL2D: &str = include_str!("wgsl/max_pool2d.wgsl");

/// Threads per workgroup of the 1-D kernels.
pub const WORKGROUP: u32 = 64;
/// Largest workgroup count per grid dimension that every adapter supports.
pub const MAX_GROUPS: u32 = 65_535;

/// One compiled compute pipeline. Bindings: 0 = params, 1 = output, 2.. = inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Unary(UnaryOp),
    Clamp,
    Binary(BinaryOp),
    Where,
    Copy,
    Fill,
    Cast { from: DType, to: DType },
    MatMul,
    Reduce,
    ArgMax,
    Softmax,
    LayerNorm,
    Conv2d,
    MaxPool2d,
}

impl Kernel {
    /// Every kernel any op can use: what the naga tests validate and the class hash covers.
    pub fn all() -> Vec<Kernel> {
        let mut v: Vec<Kernel> = UnaryOp::ALL.iter().map(|&u| Kernel::Unary(u)).collect();
        v.extend(BinaryOp::ALL.iter().map(|&b| Kernel::Binary(b)));
        v.extend([
            Kernel::Clamp,
            Kernel::Where,
            Kernel::Copy,
            Kernel::Fill,
            Kernel::Cast {
                from: DType::F32,
                to: DType::I32,
            },
            Kernel::Cast {
                from: DType::I32,
                to: DType::F32,
            },
            Kernel::MatMul,
            Kernel::Reduce,
            Kernel::ArgMax,
            Kernel::Softmax,
            Kernel::LayerNorm,
            Kernel::Conv2d,
            Kernel::MaxPool2d,
        ]);
        v
    }

    /// A short label for logs and errors.
    pub fn label(&self) -> String {
        match self {
            Kernel::Unary(u) => format!("unary:{}", u.name()),
            Kernel::Binary(b) => format!("binary:{}", b.name()),
            Kernel::Cast { from, to } => format!("cast:{from}->{to}"),
            k => format!("{k:?}").to_lowercase(),
        }
    }

    /// The complete WGSL module.
    pub fn source(&self) -> String {
        match self {
            Kernel::Unary(u) => elementwise(1, u.wgsl()),
            Kernel::Clamp => elementwise(1, "clamp(x, p0, p1)"),
            Kernel::Binary(b) => elementwise(2, b.wgsl()),
            Kernel::Where => elementwise(3, "select(b, a, c != 0.0)"),
            Kernel::Copy => COPY.into(),
            Kernel::Fill => FILL.into(),
            Kernel::Cast { from, to } => CAST
                .replace("{{FROM}}", from.name())
                .replace("{{TO}}", to.name()),
            Kernel::MatMul => MATMUL.into(),
            Kernel::Reduce => REDUCE.into(),
            Kernel::ArgMax => ARGMAX.into(),
            Kernel::Softmax => SOFTMAX.into(),
            Kernel::LayerNorm => LAYER_NORM.into(),
            Kernel::Conv2d => CONV2D.into(),
            Kernel::MaxPool2d => MAX_POOL2D.into(),
        }
    }
}

/// Hash of every WGSL kernel source: any kernel change gives a new class.
pub fn gpu_kernel_hash() -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    for k in Kernel::all() {
        h.update(k.label().as_bytes());
        h.update(k.source().as_bytes());
    }
    h.finalize()
}

fn elementwise(arity: usize, expr: &str) -> String {
    let names: &[&str] = match arity {
        1 => &["x"],
        2 => &["a", "b"],
        _ => &["c", "a", "b"],
    };
    let mut decls = String::new();
    let mut loads = String::new();
    for (k, name) in names.iter().enumerate() {
        decls += &format!(
            "@group(0) @binding({}) var<storage, read> in{k}: array<f32>;\n",
            k + 2
        );
        loads += &format!("    let {name} = in{k}[src_index(i, {k}u)];\n");
    }
    ELEMENTWISE
        .replace("{{DECLS}}", &decls)
        .replace("{{LOADS}}", &loads)
        .replace("{{EXPR}}", expr)
}

/// One kernel launch: its params, which op inputs it reads, and its grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispatch {
    pub kernel: Kernel,
    /// Indices into the op's inputs, bound from binding 2 on.
    pub inputs: Vec<usize>,
    pub params: Vec<u32>,
    pub groups: [u32; 3],
}

/// How an op runs on the GPU.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// The output is the given input's buffer, reinterpreted (reshape).
    Alias(usize),
    /// Dispatches in order, all writing the op's output buffer.
    Run(Vec<Dispatch>),
}

/// Why an op cannot run on this GPU as it stands.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "'{op}' needs a grid of {groups:?} workgroups, over the limit of {MAX_GROUPS} per dimension"
)]
pub struct GridTooLarge {
    pub op: String,
    pub groups: [u64; 3],
}

/// A 1-D grid of `n` threads folded into x and y so neither exceeds [`MAX_GROUPS`].
/// Returns the groups and the threads per grid row the kernel uses to rebuild the index.
fn grid_1d(n: usize) -> ([u32; 3], u32) {
    let groups = (n as u64).div_ceil(WORKGROUP as u64).max(1);
    let gx = groups.min(MAX_GROUPS as u64);
    let gy = groups.div_ceil(gx);
    ([gx as u32, gy as u32, 1], gx as u32 * WORKGROUP)
}

/// Plans `op` on inputs `ins` producing `out` (metas already checked by shape inference).
pub fn plan(op: &Op, ins: &[&TensorMeta], out: &TensorMeta) -> Result<Plan, GridTooLarge> {
    let n = out.numel();
    let (groups, row) = grid_1d(n);
    if groups[1] > MAX_GROUPS {
        return Err(GridTooLarge {
            op: op.to_string(),
            groups: [groups[0] as u64, groups[1] as u64, 1],
        });
    }
    let one = |kernel: Kernel, inputs: Vec<usize>, extra: &[u32]| {
        let mut params = vec![n as u32, row];
        params.extend_from_slice(extra);
        Plan::Run(vec![Dispatch {
            kernel,
            inputs,
            params,
            groups,
        }])
    };
    let ew = |kernel: Kernel, p: [f32; 2]| {
        let rank = out.rank() as u32;
        let mut extra = vec![rank, p[0].to_bits(), p[1].to_bits()];
        extra.extend(out.shape.iter().map(|&d| d as u32));
        for m in ins {
            extra.push(u32::from(m.shape == out.shape));
            extra.extend(
                broadcast_strides(&m.shape, &out.shape)
                    .iter()
                    .map(|&s| s as u32),
            );
        }
        one(kernel, (0..ins.len()).collect(), &extra)
    };
    Ok(match op {
        Op::Unary(u) => ew(Kernel::Unary(*u), [0.0; 2]),
        Op::Clamp { min, max } => ew(Kernel::Clamp, [*min, *max]),
        Op::Binary(b) => ew(Kernel::Binary(*b), [0.0; 2]),
        Op::Where => ew(Kernel::Where, [0.0; 2]),
        Op::Cast { to } if *to == ins[0].dtype => {
            let s = contiguous_strides(&out.shape);
            Plan::Run(vec![copy(&out.shape, 0, &s, 0, &s)])
        }
        Op::Cast { to } => one(
            Kernel::Cast {
                from: ins[0].dtype,
                to: *to,
            },
            vec![0],
            &[],
        ),
        Op::Reshape { .. } => Plan::Alias(0),
        Op::Permute { axes } => {
            let own = contiguous_strides(&ins[0].shape);
            let src: Vec<usize> = axes.iter().map(|&a| own[a]).collect();
            Plan::Run(vec![copy(
                &out.shape,
                0,
                &src,
                0,
                &contiguous_strides(&out.shape),
            )])
        }
        Op::BroadcastTo { shape } => {
            let src = broadcast_strides(&ins[0].shape, shape);
            Plan::Run(vec![copy(shape, 0, &src, 0, &contiguous_strides(shape))])
        }
        Op::Slice {
            starts,
            ends,
            steps,
        } => {
            let own = contiguous_strides(&ins[0].shape);
            let base = starts.iter().zip(&own).map(|(s, st)| s * st).sum();
            let src: Vec<usize> = (0..own.len())
                .map(|d| own[d] * crate::shape::slice_step(starts[d], ends[d], steps[d]))
                .collect();
            Plan::Run(vec![copy(
                &out.shape,
                base,
                &src,
                0,
                &contiguous_strides(&out.shape),
            )])
        }
        Op::Concat { axis } => {
            let dst = contiguous_strides(&out.shape);
            let mut at = 0;
            let mut ds = Vec::new();
            for (i, m) in ins.iter().enumerate() {
                let mut d = copy(
                    &m.shape,
                    0,
                    &contiguous_strides(&m.shape),
                    at * dst[*axis],
                    &dst,
                );
                d.inputs = vec![i];
                ds.push(d);
                at += m.shape[*axis];
            }
            Plan::Run(ds)
        }
        Op::Pad { pads, value } => {
            let dst = contiguous_strides(&out.shape);
            let value_bits = match ins[0].dtype {
                DType::F32 => value.to_bits(),
                DType::I32 => (*value as i32) as u32,
            };
            let Plan::Run(mut ds) = one(Kernel::Fill, vec![], &[value_bits]) else {
                unreachable!("one() always plans a run")
            };
            let base = pads.iter().zip(&dst).map(|([b, _], s)| b * s).sum();
            let m = ins[0];
            ds.push(copy(&m.shape, 0, &contiguous_strides(&m.shape), base, &dst));
            Plan::Run(ds)
        }
        Op::MatMul => return matmul(op, ins, out),
        Op::Reduce { op: r, axes, .. } => {
            let x = ins[0];
            let own = contiguous_strides(&x.shape);
            let kept: Vec<usize> = (0..x.rank()).filter(|d| !axes.contains(d)).collect();
            let mut extra = vec![r.code(), kept.len() as u32, axes.len() as u32];
            extra.push(axes.iter().map(|&a| x.shape[a]).product::<usize>() as u32);
            extra.extend(kept.iter().map(|&d| x.shape[d] as u32));
            extra.extend(kept.iter().map(|&d| own[d] as u32));
            extra.extend(axes.iter().map(|&d| x.shape[d] as u32));
            extra.extend(axes.iter().map(|&d| own[d] as u32));
            one(Kernel::Reduce, vec![0], &extra)
        }
        Op::ArgMax { axis, .. } => {
            let x = ins[0];
            let own = contiguous_strides(&x.shape);
            let kept: Vec<usize> = (0..x.rank()).filter(|d| d != axis).collect();
            let mut extra = vec![kept.len() as u32, x.shape[*axis] as u32, own[*axis] as u32];
            extra.extend(kept.iter().map(|&d| x.shape[d] as u32));
            extra.extend(kept.iter().map(|&d| own[d] as u32));
            one(Kernel::ArgMax, vec![0], &extra)
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let x = &ins[0].shape;
            let len = x[*axis];
            let inner: usize = x[axis + 1..].iter().product();
            let lanes = n.checked_div(len).unwrap_or(0);
            let (groups, row) = grid_1d(lanes);
            let log = u32::from(matches!(op, Op::LogSoftmax { .. }));
            Plan::Run(vec![Dispatch {
                kernel: Kernel::Softmax,
                inputs: vec![0],
                params: vec![lanes as u32, row, len as u32, inner.max(1) as u32, log],
                groups,
            }])
        }
        Op::LayerNorm { eps } => {
            let len = *ins[0].shape.last().expect("rank checked by infer");
            let rows = n.checked_div(len).unwrap_or(0);
            let (groups, row) = grid_1d(rows);
            Plan::Run(vec![Dispatch {
                kernel: Kernel::LayerNorm,
                inputs: vec![0, 1, 2],
                params: vec![rows as u32, row, len as u32, eps.to_bits()],
                groups,
            }])
        }
        Op::Conv2d { stride, padding } => {
            let (x, w) = (&ins[0].shape, &ins[1].shape);
            let extra: Vec<u32> = [
                x[1],
                x[2],
                x[3],
                w[0],
                w[2],
                w[3],
                out.shape[2],
                out.shape[3],
                stride[0],
                stride[1],
                padding[0],
                padding[1],
            ]
            .iter()
            .map(|&v| v as u32)
            .collect();
            one(Kernel::Conv2d, vec![0, 1], &extra)
        }
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => {
            let x = &ins[0].shape;
            let extra: Vec<u32> = [
                x[2],
                x[3],
                kernel[0],
                kernel[1],
                out.shape[2],
                out.shape[3],
                stride[0],
                stride[1],
                padding[0],
                padding[1],
            ]
            .iter()
            .map(|&v| v as u32)
            .collect();
            one(Kernel::MaxPool2d, vec![0], &extra)
        }
    })
}

fn copy(
    shape: &[usize],
    src_base: usize,
    src: &[usize],
    dst_base: usize,
    dst: &[usize],
) -> Dispatch {
    let n: usize = shape.iter().product();
    let (groups, row) = grid_1d(n);
    let mut params = vec![
        n as u32,
        row,
        shape.len() as u32,
        src_base as u32,
        dst_base as u32,
    ];
    params.extend(shape.iter().map(|&d| d as u32));
    params.extend(src.iter().map(|&d| d as u32));
    params.extend(dst.iter().map(|&d| d as u32));
    Dispatch {
        kernel: Kernel::Copy,
        inputs: vec![0],
        params,
        groups,
    }
}

fn matmul(op: &Op, ins: &[&TensorMeta], out: &TensorMeta) -> Result<Plan, GridTooLarge> {
    let r = out.rank();
    let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
    let k = ins[0].shape[ins[0].rank() - 1];
    let batch_shape = &out.shape[..r - 2];
    let batch: usize = batch_shape.iter().product();
    // Element offset of each batch's matrix in A and B, following broadcast batch strides.
    let offsets = |x: &TensorMeta, mat: usize| -> Vec<u32> {
        let xb = &x.shape[..x.rank() - 2];
        let strides = broadcast_strides(xb, batch_shape);
        let out_strides = contiguous_strides(batch_shape);
        (0..batch)
            .map(|z| {
                let mut off = 0;
                for d in 0..batch_shape.len() {
                    off += (z / out_strides[d]) % batch_shape[d] * strides[d];
                }
                (off * mat) as u32
            })
            .collect()
    };
    let groups = [
        (n as u64).div_ceil(32).max(1),
        (m as u64).div_ceil(32).max(1),
        batch.max(1) as u64,
    ];
    if groups.iter().any(|&g| g > MAX_GROUPS as u64) {
        return Err(GridTooLarge {
            op: op.to_string(),
            groups,
        });
    }
    let mut params = vec![m as u32, n as u32, k as u32, batch as u32];
    params.extend(offsets(ins[0], m * k));
    params.extend(offsets(ins[1], k * n));
    Ok(Plan::Run(vec![Dispatch {
        kernel: Kernel::MatMul,
        inputs: vec![0, 1],
        params,
        groups: groups.map(|g| g as u32),
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_fold_into_two_dimensions() {
        assert_eq!(grid_1d(0), ([1, 1, 1], 64));
        assert_eq!(grid_1d(65), ([2, 1, 1], 128));
        let (g, row) = grid_1d(64 * 65_535 + 1);
        assert_eq!(g, [65_535, 2, 1]);
        assert_eq!(row, 65_535 * 64);
    }

    #[test]
    fn matmul_broadcasts_batch_offsets() {
        let a = TensorMeta::f32(vec![2, 1, 3, 4]);
        let b = TensorMeta::f32(vec![3, 4, 5]);
        let out = TensorMeta::f32(vec![2, 3, 3, 5]);
        let Plan::Run(ds) = plan(&Op::MatMul, &[&a, &b], &out).unwrap() else {
            panic!()
        };
        let p = &ds[0].params;
        assert_eq!(&p[..4], &[3, 5, 4, 6]);
        // A offsets: batch (i, j) -> i * 12; B offsets: j * 20.
        assert_eq!(&p[4..10], &[0, 0, 0, 12, 12, 12]);
        assert_eq!(&p[10..16], &[0, 20, 40, 0, 20, 40]);
    }
}
