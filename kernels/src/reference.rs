//! The reference: what each op *means*, written for clarity with ndarray.
//!
//! Accumulating ops (matmul, conv2d, reductions, softmax, layer_norm) accumulate in f64 and round
//! once, so the reference is at least as accurate as any backend and can serve as the verifier.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice, Zip};

use crate::op::{Op, ReduceOp};
use crate::shape::{OpError, infer};
use crate::tensor::{DType, Tensor};

/// Evaluates one op on the reference path.
pub fn eval(op: &Op, inputs: &[&Tensor]) -> Result<Tensor, OpError> {
    let metas: Vec<_> = inputs.iter().map(|t| t.meta()).collect();
    let out = infer(op, &metas.iter().collect::<Vec<_>>())?;
    let f = |i: usize| inputs[i].to_array_f32().expect("dtype checked by infer");
    Ok(match op {
        Op::Unary(u) => Tensor::from_array(f(0).mapv(|x| u.apply(x))),
        Op::Clamp { min, max } => Tensor::from_array(f(0).mapv(|x| x.max(*min).min(*max))),
        Op::Binary(b) => {
            let (x, y) = (f(0), f(1));
            let mut o = ArrayD::<f32>::zeros(IxDyn(&out.shape));
            Zip::from(&mut o)
                .and_broadcast(&x)
                .and_broadcast(&y)
                .for_each(|o, &x, &y| *o = b.apply(x, y));
            Tensor::from_array(o)
        }
        Op::Where => {
            let (c, x, y) = (f(0), f(1), f(2));
            let mut o = ArrayD::<f32>::zeros(IxDyn(&out.shape));
            Zip::from(&mut o)
                .and_broadcast(&c)
                .and_broadcast(&x)
                .and_broadcast(&y)
                .for_each(|o, &c, &x, &y| *o = if c != 0.0 { x } else { y });
            Tensor::from_array(o)
        }
        Op::Cast { to } => cast(inputs[0], *to),
        Op::MatMul => matmul(&f(0), &f(1), &out.shape),
        Op::Conv2d { stride, padding } => conv2d(&f(0), &f(1), *stride, *padding, &out.shape),
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => max_pool2d(&f(0), *kernel, *stride, *padding, &out.shape),
        Op::Reduce { op, axes, keepdims } => {
            let x = f(0).mapv(f64::from);
            Tensor::from_array(reduce(*op, x, axes, *keepdims).mapv(|v| v as f32))
        }
        Op::ArgMax { axis, keepdims } => {
            let x = f(0);
            let mut idx = x.map_axis(Axis(*axis), |lane| {
                let mut best = 0;
                for (i, &v) in lane.iter().enumerate() {
                    if v > lane[best] || (lane[best].is_nan() && !v.is_nan()) {
                        best = i;
                    }
                }
                best as i32
            });
            if *keepdims {
                idx = idx.insert_axis(Axis(*axis));
            }
            Tensor::from_array_i32(idx)
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let log = matches!(op, Op::LogSoftmax { .. });
            let mut x = f(0).mapv(f64::from);
            for mut lane in x.lanes_mut(Axis(*axis)) {
                let max = lane.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f64 = lane.iter().map(|&v| (v - max).exp()).sum();
                lane.mapv_inplace(|v| {
                    if log {
                        v - max - sum.ln()
                    } else {
                        (v - max).exp() / sum
                    }
                });
            }
            Tensor::from_array(x.mapv(|v| v as f32))
        }
        Op::LayerNorm { eps } => {
            let (gamma, beta) = (f(1), f(2));
            let mut x = f(0).mapv(f64::from);
            let last = Axis(x.ndim() - 1);
            for mut lane in x.lanes_mut(last) {
                let n = lane.len() as f64;
                let mean = lane.sum() / n;
                let var = lane.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                let inv = 1.0 / (var + f64::from(*eps)).sqrt();
                for (j, v) in lane.iter_mut().enumerate() {
                    *v = (*v - mean) * inv * f64::from(gamma[[j]]) + f64::from(beta[[j]]);
                }
            }
            Tensor::from_array(x.mapv(|v| v as f32))
        }
        // Structural ops move elements without arithmetic, whatever the dtype.
        Op::Reshape { shape } => inputs[0]
            .clone()
            .reshaped(shape.clone())
            .expect("checked by infer"),
        Op::Permute { .. }
        | Op::BroadcastTo { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::Pad { .. } => match inputs[0].dtype() {
            DType::F32 => {
                let xs: Vec<_> = inputs.iter().map(|t| view(t, t.as_f32())).collect();
                Tensor::from_array(structural(op, &xs, |v| v))
            }
            DType::I32 => {
                let xs: Vec<_> = inputs.iter().map(|t| view(t, t.as_i32())).collect();
                Tensor::from_array_i32(structural(op, &xs, |v| v as i32))
            }
        },
    })
}

fn cast(x: &Tensor, to: DType) -> Tensor {
    match (x.dtype(), to) {
        (DType::F32, DType::I32) => {
            let a = x.to_array_f32().expect("f32");
            // `as` saturates and maps NaN to 0.
            Tensor::from_array_i32(a.mapv(|v| v as i32))
        }
        (DType::I32, DType::F32) => {
            Tensor::from_array(x.to_array_i32().expect("i32").mapv(|v| v as f32))
        }
        _ => x.clone(),
    }
}

/// `[..., m, k] @ [..., k, n]`, batch dims broadcast, f64 accumulation.
fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>, out_shape: &[usize]) -> Tensor {
    let r = out_shape.len();
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let k = a.shape()[a.ndim() - 1];
    let a = a
        .broadcast(batch_shape(out_shape, m, k))
        .expect("checked by infer");
    let b = b
        .broadcast(batch_shape(out_shape, k, n))
        .expect("checked by infer");
    let mut out = ArrayD::<f32>::zeros(IxDyn(out_shape));
    let batch: usize = out_shape[..r - 2].iter().product();
    let a = a.to_shape((batch, m, k)).expect("standard shape");
    let b = b.to_shape((batch, k, n)).expect("standard shape");
    let mut o = out
        .view_mut()
        .into_shape_with_order((batch, m, n))
        .expect("fresh array");
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for p in 0..k {
                    acc += f64::from(a[[z, i, p]]) * f64::from(b[[z, p, j]]);
                }
                o[[z, i, j]] = acc as f32;
            }
        }
    }
    Tensor::from_array(out)
}

fn batch_shape(out_shape: &[usize], rows: usize, cols: usize) -> IxDyn {
    let mut s = out_shape[..out_shape.len() - 2].to_vec();
    s.extend([rows, cols]);
    IxDyn(&s)
}

fn conv2d(
    x: &ArrayD<f32>,
    w: &ArrayD<f32>,
    stride: [usize; 2],
    pad: [usize; 2],
    out_shape: &[usize],
) -> Tensor {
    let (c, h, wd) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let (kh, kw) = (w.shape()[2], w.shape()[3]);
    let mut out = ArrayD::<f32>::zeros(IxDyn(out_shape));
    for ((n, o, oy, ox), v) in indexed4(&mut out) {
        let mut acc = 0.0f64;
        for ci in 0..c {
            for dy in 0..kh {
                for dx in 0..kw {
                    let (y, xx) = (
                        (oy * stride[0] + dy) as isize,
                        (ox * stride[1] + dx) as isize,
                    );
                    let (y, xx) = (y - pad[0] as isize, xx - pad[1] as isize);
                    if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                        acc += f64::from(x[[n, ci, y as usize, xx as usize]])
                            * f64::from(w[[o, ci, dy, dx]]);
                    }
                }
            }
        }
        *v = acc as f32;
    }
    Tensor::from_array(out)
}

fn max_pool2d(
    x: &ArrayD<f32>,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    out_shape: &[usize],
) -> Tensor {
    let (h, wd) = (x.shape()[2], x.shape()[3]);
    let mut out = ArrayD::<f32>::zeros(IxDyn(out_shape));
    for ((n, c, oy, ox), v) in indexed4(&mut out) {
        let mut best = f32::NEG_INFINITY;
        for dy in 0..k[0] {
            for dx in 0..k[1] {
                let y = (oy * stride[0] + dy) as isize - pad[0] as isize;
                let xx = (ox * stride[1] + dx) as isize - pad[1] as isize;
                if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                    best = best.max(x[[n, c, y as usize, xx as usize]]);
                }
            }
        }
        *v = best;
    }
    Tensor::from_array(out)
}

/// Every element of a rank-4 array with its index.
fn indexed4(a: &mut ArrayD<f32>) -> impl Iterator<Item = ((usize, usize, usize, usize), &mut f32)> {
    a.indexed_iter_mut()
        .map(|(i, v)| ((i[0], i[1], i[2], i[3]), v))
}

fn reduce(op: ReduceOp, x: ArrayD<f64>, axes: &[usize], keepdims: bool) -> ArrayD<f64> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    let count: usize = sorted.iter().map(|&a| x.shape()[a]).product();
    // Fold the reduced axes one at a time, highest first so lower indices stay valid.
    let fold = |x: ArrayD<f64>, f: &dyn Fn(ArrayViewD<f64>) -> f64| {
        sorted
            .iter()
            .rev()
            .fold(x, |acc, &a| acc.map_axis(Axis(a), |l| f(l.into_dyn())))
    };
    let mut r = match op {
        ReduceOp::Sum => fold(x, &|l| l.sum()),
        ReduceOp::Mean => fold(x, &|l| l.sum()).mapv(|s| s / count as f64),
        ReduceOp::Max => fold(x, &|l| l.fold(f64::NEG_INFINITY, |m, &v| m.max(v))),
        ReduceOp::Min => fold(x, &|l| l.fold(f64::INFINITY, |m, &v| m.min(v))),
        ReduceOp::Variance => {
            let mean = reduce(ReduceOp::Mean, x.clone(), axes, true);
            let sq = (&x - &mean).mapv(|d| d * d);
            fold(sq, &|l| l.sum()).mapv(|s| s / count as f64)
        }
    };
    if keepdims {
        for &a in &sorted {
            r = r.insert_axis(Axis(a));
        }
    }
    r
}

/// Permute, broadcast_to, slice, concat and pad on any element type.
/// A view of a tensor's data in place (structural ops need no copy of their inputs).
fn view<'a, T>(t: &Tensor, data: Result<&'a [T], crate::tensor::TensorError>) -> ArrayViewD<'a, T> {
    // All inputs of a structural op share a dtype (checked by infer).
    ArrayViewD::from_shape(IxDyn(t.shape()), data.expect("dtype checked by infer"))
        .expect("length matches shape")
}

fn structural<T: Copy>(op: &Op, xs: &[ArrayViewD<T>], from_f32: impl Fn(f32) -> T) -> ArrayD<T> {
    let x = &xs[0];
    match op {
        Op::Permute { axes } => x
            .clone()
            .permuted_axes(axes.clone())
            .as_standard_layout()
            .into_owned(),
        Op::BroadcastTo { shape } => x
            .broadcast(IxDyn(shape))
            .expect("checked by infer")
            .to_owned(),
        Op::Slice {
            starts,
            ends,
            steps,
        } => x
            .slice_each_axis(|ax| {
                let d = ax.axis.index();
                // Validated: starts and ends are within the axis, so within the extent; the
                // effective step is at most the range.
                let step = crate::shape::slice_step(starts[d], ends[d], steps[d]);
                Slice::new(starts[d] as isize, Some(ends[d] as isize), step as isize)
            })
            .to_owned(),
        Op::Concat { axis } => {
            let views: Vec<_> = xs.iter().map(|a| a.view()).collect();
            ndarray::concatenate(Axis(*axis), &views).expect("checked by infer")
        }
        Op::Pad { pads, value } => {
            let shape: Vec<usize> = x
                .shape()
                .iter()
                .zip(pads)
                .map(|(d, [b, a])| d + b + a)
                .collect();
            let mut out = ArrayD::from_elem(IxDyn(&shape), from_f32(*value));
            out.slice_each_axis_mut(|ax| {
                let d = ax.axis.index();
                Slice::from(pads[d][0]..pads[d][0] + x.shape()[d])
            })
            .assign(x);
            out
        }
        _ => unreachable!("structural() is only called for structural ops"),
    }
}
