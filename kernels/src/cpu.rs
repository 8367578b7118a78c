//! The fast CPU backend: `gemm` for matmul and conv2d (im2col), rayon-parallel elementwise loops,
//! and the reference for the rest.
//!
//! Every fast path keeps each output element's arithmetic independent of how the work is split,
//! so results are the same bits at any thread count and batch size.

use std::borrow::Cow;

use gemm_common::Parallelism;
use rayon::prelude::*;

use crate::budget::Budget;
use crate::cancel::{Cancel, Stopped};
use crate::checked;
use crate::class::{BackendKind, DeterminismClass};
use crate::exec::{ExecError, Guard, check_inputs};
use crate::op::{BinaryOp, Op};
use crate::program::{Program, ProgramError};
use crate::reference;
use crate::shape::{OpError, broadcast_strides, contiguous_strides, infer};
use crate::tensor::{ContentId, Tensor, TensorMeta};

/// Largest tensor the CPU backend takes (64 GiB): every index into it fits with room to spare.
/// A node's own budget is usually far lower.
pub const MAX_TENSOR_BYTES: u64 = 1 << 36;

/// Below this many elements, elementwise ops run on one thread.
const PAR_ELEMS: usize = 1 << 15;
/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;
/// Below this many multiply-adds, gemm runs on one thread.
const PAR_FLOPS: usize = 1 << 18;
/// A long matmul runs in blocks of rows of about this many multiply-adds (~0.1 s on a laptop
/// core pair), checking for cancellation between them. Rows of a product do not depend on
/// how many are computed at once, so the bits are those of one call. Smaller blocks cost
/// throughput: gemm packs the right-hand side again for every call (at 2^30 a 2048×4096 ×
/// 4096×2048 tile took 40 % longer; at 2^32 it is within noise of one call).
const CANCEL_FLOPS: usize = 1 << 32;

/// Why one op stopped: it does not apply, or the run was stopped.
#[derive(Debug)]
enum Halt {
    Op(OpError),
    Stopped(Stopped),
}

impl From<Stopped> for Halt {
    fn from(s: Stopped) -> Halt {
        Halt::Stopped(s)
    }
}

/// The CPU backend. Stateless apart from its class; cheap to clone.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    class: DeterminismClass,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        let features = cpu_features();
        let mut h = blake3::Hasher::new();
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(b"gemm-0.19");
        h.update(features.as_bytes());
        let class = DeterminismClass::new(
            BackendKind::Cpu,
            format!("{} {}", std::env::consts::ARCH, features),
            "gemm-0.19".to_string(),
            &h.finalize(),
        );
        CpuBackend { class }
    }

    pub fn class(&self) -> &DeterminismClass {
        &self.class
    }

    /// Evaluates one op (its inputs are trusted to be of a sane size: a local call).
    pub fn eval(&self, op: &Op, inputs: &[&Tensor]) -> Result<Tensor, OpError> {
        match self.eval_within(op, inputs, &Cancel::none()) {
            Ok(t) => Ok(t),
            Err(Halt::Op(e)) => Err(e),
            Err(Halt::Stopped(_)) => unreachable!("an op that cannot be cancelled was cancelled"),
        }
    }

    fn eval_within(&self, op: &Op, inputs: &[&Tensor], cancel: &Cancel) -> Result<Tensor, Halt> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|t| t.meta()).collect();
        let out = infer(op, &metas.iter().collect::<Vec<_>>()).map_err(Halt::Op)?;
        Ok(match op {
            Op::Unary(u) => {
                let x = inputs[0].as_f32().expect("dtype checked by infer");
                let mut o = crate::tensor::zeroed::<f32>(x.len());
                par_zip1(x, &mut o, cancel, |s, d| u.map_slice(s, d))?;
                f32_tensor(&out, o)
            }
            Op::Binary(b) => binary(*b, inputs[0], inputs[1], &out, cancel)?,
            Op::MatMul => matmul(inputs[0], inputs[1], &out, cancel)?,
            Op::Conv2d { stride, padding } => {
                conv2d(inputs[0], inputs[1], *stride, *padding, &out, cancel)?
            }
            Op::Concat { axis } => concat(inputs, *axis, &out),
            _ => return reference::eval(op, inputs).map_err(Halt::Op),
        })
    }

    /// Runs a program within [`crate::Backend::budget`], dropping each intermediate after its
    /// last use.
    pub fn run(&self, program: &Program, inputs: &[Tensor]) -> Result<Vec<Tensor>, ExecError> {
        self.run_refs(program, &inputs.iter().collect::<Vec<_>>())
    }

    /// [`CpuBackend::run`] on borrowed inputs: they are read in place, never copied.
    pub fn run_refs(
        &self,
        program: &Program,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, ExecError> {
        let guard = Guard::new(Budget::local(MAX_TENSOR_BYTES), Cancel::none());
        Ok(self.execute(program, inputs, &guard, false)?.0)
    }

    /// Validates `program` against the guard's budget, then runs it, checking for
    /// cancellation between nodes and inside long kernels; with `trace`, also returns the
    /// content id of every node's output, hashed as it is made.
    pub(crate) fn execute(
        &self,
        program: &Program,
        inputs: &[&Tensor],
        guard: &Guard,
        trace: bool,
    ) -> Result<(Vec<Tensor>, Vec<ContentId>), ExecError> {
        check_inputs(program, inputs, &guard.budget)?;
        let cancel = &guard.cancel;
        let last = program.last_uses();
        let n_in = program.inputs.len();
        let mut hashes = Vec::with_capacity(if trace { program.nodes.len() } else { 0 });
        let mut values: Vec<Option<Cow<'_, Tensor>>> =
            inputs.iter().map(|t| Some(Cow::Borrowed(*t))).collect();
        values.resize(program.value_count(), None);
        for (i, node) in program.nodes.iter().enumerate() {
            cancel.check()?;
            let args: Vec<&Tensor> = node
                .args
                .iter()
                .map(|&a| {
                    values[a as usize]
                        .as_deref()
                        .expect("argument computed and not yet dropped")
                })
                .collect();
            let out = self
                .eval_within(&node.op, &args, cancel)
                .map_err(|h| match h {
                    Halt::Op(source) => ExecError::Program(ProgramError::Op { node: i, source }),
                    Halt::Stopped(s) => ExecError::Stopped(s),
                })?;
            if trace {
                hashes.push(out.content_id());
            }
            values[n_in + i] = Some(Cow::Owned(out));
            for &a in &node.args {
                if last[a as usize] == i {
                    values[a as usize] = None;
                }
            }
            if last[n_in + i] == i {
                values[n_in + i] = None;
            }
        }
        // Move each output out; an output listed twice is copied.
        let mut outs: Vec<Tensor> = Vec::with_capacity(program.outputs.len());
        for (k, &o) in program.outputs.iter().enumerate() {
            let t = match program.outputs[..k].iter().position(|&p| p == o) {
                Some(first) => outs[first].clone(),
                None => values[o as usize]
                    .take()
                    .expect("outputs are never dropped")
                    .into_owned(),
            };
            outs.push(t);
        }
        Ok((outs, hashes))
    }
}

fn f32_tensor(meta: &TensorMeta, data: Vec<f32>) -> Tensor {
    Tensor::from_f32(meta.shape.clone(), data).expect("output sized from its meta")
}

/// `f` over matching chunks of `src` and `dst`, in parallel when large; each chunk checks
/// `cancel` first.
fn par_zip1(
    src: &[f32],
    dst: &mut [f32],
    cancel: &Cancel,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Result<(), Stopped> {
    if dst.len() < PAR_ELEMS {
        f(src, dst);
        Ok(())
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .try_for_each(|(d, s)| {
                cancel.check()?;
                f(s, d);
                Ok(())
            })
    }
}

/// Broadcasting binary op. Works in runs of the longest trailing block over which both inputs
/// are contiguous, so `[m, n] + [n]` and equal shapes use the vectorised slice loop.
fn binary(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out: &TensorMeta,
    cancel: &Cancel,
) -> Result<Tensor, Stopped> {
    let (x, y) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    let n = out.numel();
    let mut o = crate::tensor::zeroed::<f32>(n);
    if a.shape() == out.shape.as_slice() && b.shape() == out.shape.as_slice() {
        if n < PAR_ELEMS {
            op.map_slices(x, y, &mut o);
        } else {
            o.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .try_for_each(|(d, (s, t))| {
                    cancel.check()?;
                    op.map_slices(s, t, d);
                    Ok(())
                })?;
        }
        return Ok(f32_tensor(out, o));
    }
    // Scalars and small operands are expanded once so the hot loop stays the slice loop.
    let expand = |t: &Tensor, xs: &[f32]| -> Option<Vec<f32>> {
        let (sa, so) = (
            broadcast_strides(t.shape(), &out.shape),
            contiguous_strides(&out.shape),
        );
        let inner = run_length(&out.shape, &sa, &so);
        (inner < 64).then(|| broadcast_values(xs, &sa, &out.shape))
    };
    let (xe, ye) = (expand(a, x), expand(b, y));
    let (x, sa) = match &xe {
        Some(v) => (v.as_slice(), contiguous_strides(&out.shape)),
        None => (x, broadcast_strides(a.shape(), &out.shape)),
    };
    let (y, sb) = match &ye {
        Some(v) => (v.as_slice(), contiguous_strides(&out.shape)),
        None => (y, broadcast_strides(b.shape(), &out.shape)),
    };
    let so = contiguous_strides(&out.shape);
    let inner = run_length(&out.shape, &sa, &so)
        .min(run_length(&out.shape, &sb, &so))
        .max(1);
    let row = |r: usize, d: &mut [f32]| {
        let start = r * inner;
        let (oa, ob) = (
            offset(start, &out.shape, &sa),
            offset(start, &out.shape, &sb),
        );
        op.map_slices(&x[oa..oa + inner], &y[ob..ob + inner], d);
    };
    if n < PAR_ELEMS {
        o.chunks_mut(inner).enumerate().for_each(|(r, d)| row(r, d));
    } else {
        // Rows are grouped so that each group is at least a chunk's work between checks.
        let per = CHUNK.div_ceil(inner).max(1);
        o.par_chunks_mut(inner * per)
            .enumerate()
            .try_for_each(|(g, rows)| {
                cancel.check()?;
                for (r, d) in rows.chunks_mut(inner).enumerate() {
                    row(g * per + r, d);
                }
                Ok(())
            })?;
    }
    Ok(f32_tensor(out, o))
}

/// Length of the trailing block over which `strides` are the contiguous strides `so`.
fn run_length(shape: &[usize], strides: &[usize], so: &[usize]) -> usize {
    let mut len = 1;
    for d in (0..shape.len()).rev() {
        if strides[d] != so[d] && shape[d] != 1 {
            break;
        }
        len *= shape[d];
    }
    len
}

fn offset(flat: usize, shape: &[usize], strides: &[usize]) -> usize {
    let mut rem = flat;
    let mut off = 0;
    for d in (0..shape.len()).rev() {
        off += (rem % shape[d]) * strides[d];
        rem /= shape[d];
    }
    off
}

fn broadcast_values(xs: &[f32], strides: &[usize], shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n).map(|i| xs[offset(i, shape, strides)]).collect()
}

/// Batched matmul through `gemm`; each batch's product is one call (or one per block of rows,
/// which computes the same bits), so bits do not depend on the batch size.
///
/// The shapes were validated (their extents fit), so the products of their axes below cannot
/// overflow; slicing checks every range against the real lengths.
fn matmul(a: &Tensor, b: &Tensor, out: &TensorMeta, cancel: &Cancel) -> Result<Tensor, Stopped> {
    let r = out.rank();
    let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
    let k = a.shape()[a.shape().len() - 1];
    let batch_shape = &out.shape[..r - 2];
    let batch: usize = batch_shape.iter().product();
    let sa = broadcast_strides(&a.shape()[..a.shape().len() - 2], batch_shape);
    let sb = broadcast_strides(&b.shape()[..b.shape().len() - 2], batch_shape);
    let (x, y) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    let mut o = crate::tensor::zeroed::<f32>(out.numel());
    if m * n > 0 {
        // Rows per gemm call: about CANCEL_FLOPS of work, at least 64 rows.
        let rows = (CANCEL_FLOPS / (n * k).max(1)).max(64);
        for (z, dst) in o.chunks_mut(m * n).enumerate().take(batch) {
            let ao = offset(z, batch_shape, &sa) * m * k;
            let bo = offset(z, batch_shape, &sb) * k * n;
            let (lhs, rhs) = (&x[ao..ao + m * k], &y[bo..bo + k * n]);
            let mut i = 0;
            while i < m {
                cancel.check()?;
                let h = rows.min(m - i);
                // A block of one row would take gemm's matrix-vector path: keep two.
                let h = if m - i - h == 1 { h + 1 } else { h };
                gemm_f32(
                    h,
                    n,
                    k,
                    &lhs[i * k..(i + h) * k],
                    rhs,
                    &mut dst[i * n..(i + h) * n],
                );
                i += h;
            }
        }
    }
    Ok(f32_tensor(out, o))
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]`, all row-major and contiguous.
///
/// gemm takes a matrix-vector path when `m` or `n` is 1, which sums in another order than its
/// matrix kernels; a single row or column of a larger product would then differ in the last
/// bit. Such products are padded to two rows or columns so every call uses the matrix kernels
/// and any block of a product has the bits of the whole.
fn gemm_f32(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    if n == 1 && k > 0 {
        let rhs2: Vec<f32> = rhs[..k].iter().flat_map(|&v| [v, v]).collect();
        let mut dst2 = vec![0.0f32; 2 * m];
        gemm_f32(m, 2, k, lhs, &rhs2, &mut dst2);
        for (d, pair) in dst[..m].iter_mut().zip(dst2.chunks(2)) {
            *d = pair[0];
        }
    } else if m == 1 && k > 0 {
        let lhs2: Vec<f32> = lhs[..k].iter().chain(&lhs[..k]).copied().collect();
        let mut dst2 = vec![0.0f32; 2 * n];
        gemm_f32(2, n, k, &lhs2, rhs, &mut dst2);
        dst[..n].copy_from_slice(&dst2[..n]);
    } else {
        gemm_matrix(m, n, k, lhs, rhs, dst);
    }
}

#[allow(unsafe_code)]
fn gemm_matrix(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &mut [f32]) {
    // The invariant the unsafe call below relies on, computed with products that cannot wrap
    // (a wrapped product could pass this check with buffers far too small).
    let covers = |len: usize, rows: usize, cols: usize| {
        checked::mul(rows, cols).is_some_and(|need| len >= need)
    };
    assert!(
        covers(lhs.len(), m, k) && covers(rhs.len(), k, n) && covers(dst.len(), m, n),
        "gemm buffers do not cover {m}x{k} @ {k}x{n}"
    );
    // Strides are passed as isize.
    assert!(
        isize::try_from(n.max(k)).is_ok(),
        "gemm stride over isize::MAX"
    );
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    let par = if checked::mul(m, n)
        .and_then(|mn| checked::mul(mn, k))
        .is_none_or(|f| f >= PAR_FLOPS)
    {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above prove, without wrapping, that every pointer covers its
    // row-major m×k, k×n and m×n matrix with the strides given and that the strides fit an
    // isize; `dst` does not alias the inputs (it is a &mut).
    unsafe {
        // What `gemm::gemm` does for f32 with these (positive) strides: a row-major destination
        // wider than one column is computed as its transpose, `rhs^T lhs^T`, which the
        // microkernels prefer. Kept exactly, so results stay bit-identical to that crate's.
        let f = gemm_f32::gemm::f32::get_gemm_fn();
        let (ni, ki) = (n as isize, k as isize);
        if n > 1 {
            f(
                n,
                m,
                k,
                dst.as_mut_ptr(),
                ni,
                1,
                false,
                rhs.as_ptr(),
                ni,
                1,
                lhs.as_ptr(),
                ki,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        } else {
            f(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                ni,
                false,
                lhs.as_ptr(),
                1,
                ki,
                rhs.as_ptr(),
                1,
                ni,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
}

/// conv2d as im2col + gemm, one image at a time (the validator charged the columns).
fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: [usize; 2],
    pad: [usize; 2],
    out: &TensorMeta,
    cancel: &Cancel,
) -> Result<Tensor, Stopped> {
    let (xs, ws) = (x.shape(), w.shape());
    let (nb, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, kh, kw) = (ws[0], ws[2], ws[3]);
    let (oh, ow) = (out.shape[2], out.shape[3]);
    let (xv, wv) = (x.as_f32().expect("f32"), w.as_f32().expect("f32"));
    let ckk = c * kh * kw;
    let mut cols = vec![0.0f32; ckk * oh * ow];
    let mut res = vec![0.0f32; out.numel()];
    for n in 0..nb {
        cancel.check()?;
        let img = &xv[n * c * h * wd..(n + 1) * c * h * wd];
        cols.par_chunks_mut((oh * ow).max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (ci, dy, dx) = (row / (kh * kw), (row / kw) % kh, row % kw);
                for oy in 0..oh {
                    let y = (oy * stride[0] + dy) as isize - pad[0] as isize;
                    for ox in 0..ow {
                        let xx = (ox * stride[1] + dx) as isize - pad[1] as isize;
                        dst[oy * ow + ox] =
                            if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                                img[(ci * h + y as usize) * wd + xx as usize]
                            } else {
                                0.0
                            };
                    }
                }
            });
        let dst = &mut res[n * o * oh * ow..(n + 1) * o * oh * ow];
        gemm_f32(o, oh * ow, ckk, wv, &cols, dst);
    }
    Ok(f32_tensor(out, res))
}

/// Concatenation as row copies: each input contributes one contiguous run per outer index.
fn concat(inputs: &[&Tensor], axis: usize, out: &TensorMeta) -> Tensor {
    let outer: usize = out.shape[..axis].iter().product();
    let runs: Vec<usize> = inputs
        .iter()
        .map(|t| t.shape()[axis..].iter().product())
        .collect();
    let mut words: Vec<u32> = Vec::with_capacity(out.numel());
    for o in 0..outer {
        for (t, &run) in inputs.iter().zip(&runs) {
            words.extend_from_slice(&t.words()[o * run..(o + 1) * run]);
        }
    }
    Tensor::from_word_vec(out.dtype, out.shape.clone(), words).expect("sized from the output meta")
}

/// The vector extensions the gemm kernels can use here: they decide the CPU class.
fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f".into();
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2-fma".into();
        }
        "sse2".into()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "generic".into()
    }
}
