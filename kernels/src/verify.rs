//! Checking a claimed result without trusting whoever computed it.
//!
//! - **Freivalds** for `c = a @ b`: project both sides on random ±1 vectors `r` and compare
//!   `c·r` with `a·(b·r)`, accumulating in f64. [`FREIVALDS_ROUNDS`] vectors run as one thin
//!   matrix product. Each row gets a threshold `t_i` from the op's error bound (see
//!   [`Projection::row_tolerance`]); an entry wrong by more than `t_i` passes one round with
//!   probability at most 1/2 (the sign of its `r_j` decides whether it adds to or cancels the
//!   honest noise), so it passes all rounds with probability at most 2⁻²⁰.
//! - **Sampled recompute** for other programs: when every output row depends only on the same
//!   row of some inputs (elementwise ops, row-wise softmax/reductions/layer norm, `rows @ W`),
//!   recompute a random sample of rows with the reference and compare within tolerance.
//!
//! The random choices are the caller's: it must draw them after the result arrived and never
//! reveal them to the worker.

use std::fmt;

use rand::Rng;
use rayon::prelude::*;

use crate::op::{Op, Tolerance};
use crate::program::Program;
use crate::reference;
use crate::registry;
use crate::tensor::{Tensor, TensorMeta};

/// Random ±1 vectors per Freivalds check: a wrong entry survives with probability ≤ 2⁻²⁰.
pub const FREIVALDS_ROUNDS: usize = 20;
/// Row threshold in standard deviations of the honest projection error (Hoeffding: a false
/// alarm per row and round has probability ≤ 2·exp(-σ²/2) ≈ 5·10⁻¹¹).
pub const FREIVALDS_SIGMAS: f64 = 7.0;
/// Unit roundoff of f32.
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// A value that is outside its tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// What was checked: `matmul (freivalds)`, or the output and op of a recomputed program.
    pub what: String,
    /// Row (Freivalds) or element index (recompute) in the output.
    pub index: Vec<usize>,
    pub got: f64,
    pub want: f64,
    pub tolerance: f64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {:?}: got {}, want {} (tolerance {:.3e})",
            self.what, self.index, self.got, self.want, self.tolerance
        )
    }
}

/// Why a check could not be applied (the caller falls back to recomputing everything).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NotApplicable {
    #[error("not a 2-d f32 matmul of the given shapes")]
    Shapes,
    #[error("the inputs hold NaN or infinity")]
    NonFinite,
    #[error("outputs do not depend row by row on the inputs")]
    NotRowLocal,
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(Mismatch),
}

/// The `b` side of Freivalds' check for `a @ b` with `b` of shape `[k, n]`: random ±1 columns
/// `r` (`n × rounds`), `b·r` (`k × rounds`) and the column norms of `b`. Results sharing a
/// weight matrix share one projection.
#[derive(Clone, Debug)]
pub struct Projection {
    k: usize,
    n: usize,
    r: Vec<f64>,
    br: Vec<f64>,
    b_col_norms: Vec<f64>,
}

impl Projection {
    /// Draws the random vectors and projects `b`.
    pub fn new(b: &Tensor, rng: &mut impl Rng) -> Result<Projection, NotApplicable> {
        let [k, n] = b.shape() else {
            return Err(NotApplicable::Shapes);
        };
        let (k, n) = (*k, *n);
        let bd = b.as_f32().map_err(|_| NotApplicable::Shapes)?;
        let r: Vec<f64> = (0..n * FREIVALDS_ROUNDS)
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect();
        let mut br = vec![0.0; k * FREIVALDS_ROUNDS];
        project_rows(bd, n, &r, &mut br, RowStat::None);
        // Column norms: per run of row blocks, then summed.
        let sq = bd
            .par_chunks(n.max(1) * ROW_BLOCK)
            .fold(
                || vec![0.0f64; n],
                |mut s, rows| {
                    for row in rows.chunks_exact(n.max(1)) {
                        for (s, &x) in s.iter_mut().zip(row) {
                            *s += f64::from(x) * f64::from(x);
                        }
                    }
                    s
                },
            )
            .reduce(
                || vec![0.0f64; n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        // A NaN or infinity anywhere in `b` makes its column's sum of squares non-finite.
        if sq.iter().any(|s| !s.is_finite()) {
            return Err(NotApplicable::NonFinite);
        }
        Ok(Projection {
            k,
            n,
            r,
            br,
            b_col_norms: sq.into_iter().map(f64::sqrt).collect(),
        })
    }

    /// Checks a claimed `c = a @ b` (`a` of shape `[m, k]`).
    pub fn check(&self, a: &Tensor, c: &Tensor) -> Result<Verdict, NotApplicable> {
        let (k, n) = (self.k, self.n);
        let [m, ka] = a.shape() else {
            return Err(NotApplicable::Shapes);
        };
        let m = *m;
        if *ka != k || c.shape() != [m, n] || m == 0 || k == 0 || n == 0 {
            return Err(NotApplicable::Shapes);
        }
        let ad = a.as_f32().map_err(|_| NotApplicable::Shapes)?;
        let cd = c.as_f32().map_err(|_| NotApplicable::Shapes)?;
        let rounds = FREIVALDS_ROUNDS;
        let mut abr = vec![0.0; m * rounds];
        let a_sq = project_rows(ad, k, &self.br, &mut abr, RowStat::SumSquares);
        // A NaN or infinity in a row of `a` makes its sum of squares non-finite.
        if a_sq.iter().any(|s| !s[0].is_finite()) {
            return Err(NotApplicable::NonFinite);
        }
        let mut cr = vec![0.0; m * rounds];
        let bn = &self.b_col_norms;
        let c_stats = project_rows(cd, n, &self.r, &mut cr, RowStat::Weighted(bn));
        // Σ_j τ_ij² expanded (see `row_tolerance`), from the per-row sums above.
        let tol = registry::tolerance(&Op::MatMul);
        let (atol, rtol) = (f64::from(tol.atol), f64::from(tol.rtol));
        let (bn1, bn2): (f64, f64) = (bn.iter().sum(), bn.iter().map(|b| b * b).sum());
        let dot = U32 * (k as f64).sqrt();
        let tol: Vec<f64> = (0..m)
            .map(|i| {
                let beta = dot * a_sq[i][0].sqrt();
                let [s1, s2, s3] = c_stats[i];
                let s = n as f64 * atol * atol
                    + 2.0 * atol * rtol * s1
                    + rtol * rtol * s2
                    + 2.0 * beta * (atol * bn1 + rtol * s3)
                    + beta * beta * bn2;
                FREIVALDS_SIGMAS * s.max(0.0).sqrt() + 1e-9
            })
            .collect();
        // A non-finite claimed entry (with finite inputs) shows up as a non-finite projection,
        // which fails the comparison below.
        for i in 0..m {
            for j in 0..rounds {
                let (got, want) = (cr[i * rounds + j], abr[i * rounds + j]);
                if (got - want).abs() > tol[i] || !got.is_finite() {
                    return Ok(Verdict::Fail(Mismatch {
                        what: "matmul: Freivalds projection of output row".into(),
                        index: vec![i],
                        got,
                        want,
                        tolerance: tol[i],
                    }));
                }
            }
        }
        Ok(Verdict::Pass)
    }

    /// Per-row thresholds `t_i = σ·sqrt(Σ_j τ_ij²)` for `c = a @ b`, where the element bound
    /// `τ_ij = atol + rtol·|c_ij| + u·√k·‖a_i‖·‖b_j‖` is matmul's registry tolerance plus the
    /// rounding of a k-term f32 dot product. A worker may use it to know what "just over
    /// tolerance" means (fault injection does).
    pub fn row_tolerance(&self, a: &[f32], c: &[f32], m: usize) -> Vec<f64> {
        let (k, n) = (self.k, self.n);
        let tol = registry::tolerance(&Op::MatMul);
        let (atol, rtol) = (f64::from(tol.atol), f64::from(tol.rtol));
        let dot = U32 * (k as f64).sqrt();
        (0..m)
            .into_par_iter()
            .map(|i| {
                let a_norm = a[i * k..(i + 1) * k]
                    .iter()
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum::<f64>()
                    .sqrt();
                let s: f64 = c[i * n..(i + 1) * n]
                    .iter()
                    .zip(&self.b_col_norms)
                    .map(|(&cij, bn)| {
                        let t = atol + rtol * f64::from(cij).abs() + dot * a_norm * bn;
                        t * t
                    })
                    .sum();
                FREIVALDS_SIGMAS * s.sqrt() + 1e-9
            })
            .collect()
    }
}

/// Which program inputs carry the output rows, if every output row `i` depends only on row
/// `i` of those inputs (and on all of the others). `None` if the program is not of that form.
pub fn row_inputs(program: &Program) -> Option<Vec<bool>> {
    let metas = program.infer().ok()?;
    let first = *program.outputs.first()?;
    let rows = *metas[first as usize].shape.first()?;
    let n_in = program.inputs.len();
    // Inputs whose first axis has the output's row count, then each of them alone.
    let candidates: Vec<usize> = (0..n_in)
        .filter(|&i| program.inputs[i].rank() >= 1 && program.inputs[i].shape[0] == rows)
        .collect();
    let mut tries: Vec<Vec<bool>> = vec![(0..n_in).map(|i| candidates.contains(&i)).collect()];
    tries.extend(
        candidates
            .iter()
            .map(|&c| (0..n_in).map(|i| i == c).collect::<Vec<bool>>()),
    );
    tries
        .into_iter()
        .find(|rowed| row_local(program, &metas, rowed, rows))
}

/// Whether, with `rowed` inputs carrying rows, every output is row-local.
fn row_local(program: &Program, metas: &[TensorMeta], rowed: &[bool], rows: usize) -> bool {
    if !rowed.iter().any(|&r| r) {
        return false;
    }
    let n_in = program.inputs.len();
    let mut row: Vec<bool> = rowed.to_vec();
    for (i, node) in program.nodes.iter().enumerate() {
        let out = &metas[n_in + i];
        let args: Vec<bool> = node.args.iter().map(|&a| row[a as usize]).collect();
        let arg_meta = |k: usize| &metas[node.args[k] as usize];
        let any = args.iter().any(|&r| r);
        let ok = if !any {
            Some(false)
        } else {
            match &node.op {
                Op::Unary(_) | Op::Clamp { .. } | Op::Cast { .. } => Some(true),
                Op::Binary(_) | Op::Where => {
                    // Rowed args align their first axis with the output's; the others
                    // broadcast over it.
                    let fine = (0..args.len()).all(|k| {
                        let m = arg_meta(k);
                        if args[k] {
                            m.rank() == out.rank()
                        } else {
                            m.rank() < out.rank() || m.shape.first() == Some(&1)
                        }
                    });
                    fine.then_some(true)
                }
                Op::MatMul => {
                    (args == [true, false] && arg_meta(0).rank() == 2 && arg_meta(1).rank() == 2)
                        .then_some(true)
                }
                Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::ArgMax { axis, .. } => {
                    (*axis != 0).then_some(true)
                }
                Op::Reduce { axes, .. } => (!axes.contains(&0)).then_some(true),
                Op::LayerNorm { .. } => {
                    (args == [true, false, false] && arg_meta(0).rank() >= 2).then_some(true)
                }
                Op::Concat { axis } => (*axis != 0 && args.iter().all(|&r| r)).then_some(true),
                _ => None,
            }
        };
        match ok {
            Some(r) => {
                if r && out.shape.first() != Some(&rows) {
                    return false;
                }
                row.push(r);
            }
            None => return false,
        }
    }
    program.outputs.iter().all(|&o| row[o as usize])
}

/// The tolerance for comparing a program's outputs with the reference: the sum of its ops'.
pub fn program_tolerance(program: &Program) -> Tolerance {
    program.nodes.iter().fold(Tolerance::new(0.0, 0.0), |t, n| {
        let o = registry::tolerance(&n.op);
        Tolerance::new(t.atol + o.atol, t.rtol + o.rtol)
    })
}

/// Recomputes rows `sample` (sorted, in range) of a row-local program's outputs with the
/// reference and compares them with the claimed `outputs`.
pub fn check_rows(
    program: &Program,
    rowed: &[bool],
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    sample: &[usize],
) -> Result<Verdict, NotApplicable> {
    let (small, sliced) = slice_rows(program, rowed, inputs, sample)?;
    let n_in = small.inputs.len();
    let mut values: Vec<Tensor> = sliced;
    for node in &small.nodes {
        let args: Vec<&Tensor> = node.args.iter().map(|&a| &values[a as usize]).collect();
        let v = reference::eval(&node.op, &args).map_err(|_| NotApplicable::NotRowLocal)?;
        values.push(v);
    }
    let tol = program_tolerance(program);
    for (k, &o) in small.outputs.iter().enumerate() {
        let want = &values[o as usize];
        let got = take_rows(outputs[k], sample).ok_or(NotApplicable::NotRowLocal)?;
        if got.meta() != want.meta() {
            return Err(NotApplicable::NotRowLocal);
        }
        let (Ok(g), Ok(w)) = (got.as_f32(), want.as_f32()) else {
            // i32 outputs (argmax) compare exactly.
            if got != *want {
                return Ok(Verdict::Fail(Mismatch {
                    what: format!("output {k} ({})", op_of(&small, o, n_in)),
                    index: vec![],
                    got: f64::NAN,
                    want: f64::NAN,
                    tolerance: 0.0,
                }));
            }
            continue;
        };
        if let Some(e) = (0..g.len()).find(|&e| !tol.accepts(g[e], w[e])) {
            let per_row = g.len() / sample.len().max(1);
            let row = sample[e / per_row.max(1)];
            return Ok(Verdict::Fail(Mismatch {
                what: format!("output {k} ({})", op_of(&small, o, n_in)),
                index: vec![row, e % per_row.max(1)],
                got: f64::from(g[e]),
                want: f64::from(w[e]),
                tolerance: f64::from(tol.atol + tol.rtol * w[e].abs()),
            }));
        }
    }
    Ok(Verdict::Pass)
}

/// [`check_rows`] for a worker of the checker's own determinism class: the sampled rows are
/// recomputed on `backend` and must match bit for bit (a backend's results do not depend on
/// which rows it is given).
pub fn check_rows_exact(
    backend: &crate::Backend,
    program: &Program,
    rowed: &[bool],
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    sample: &[usize],
) -> Result<Verdict, NotApplicable> {
    let (small, sliced) = slice_rows(program, rowed, inputs, sample)?;
    let sliced: Vec<std::sync::Arc<Tensor>> = sliced.into_iter().map(std::sync::Arc::new).collect();
    let want = backend
        .run_shared(&small, &sliced)
        .map_err(|_| NotApplicable::NotRowLocal)?;
    for (k, w) in want.iter().enumerate() {
        let got = take_rows(outputs[k], sample).ok_or(NotApplicable::NotRowLocal)?;
        if got.meta() != w.meta() {
            return Err(NotApplicable::NotRowLocal);
        }
        if let Some(e) = (0..w.numel()).find(|&e| got.words()[e] != w.words()[e]) {
            let per_row = w.numel() / sample.len().max(1);
            let value = |t: &Tensor| t.as_f32().map_or(f64::NAN, |v| f64::from(v[e]));
            return Ok(Verdict::Fail(Mismatch {
                what: format!("output {k} (bit-exact rows)"),
                index: vec![sample[e / per_row.max(1)], e % per_row.max(1)],
                got: value(&got),
                want: value(w),
                tolerance: 0.0,
            }));
        }
    }
    Ok(Verdict::Pass)
}

/// The program over `sample` rows of its row-carrying inputs, and those inputs.
fn slice_rows(
    program: &Program,
    rowed: &[bool],
    inputs: &[&Tensor],
    sample: &[usize],
) -> Result<(Program, Vec<Tensor>), NotApplicable> {
    let mut sliced = Vec::with_capacity(inputs.len());
    let mut small = program.clone();
    for (i, t) in inputs.iter().enumerate() {
        if rowed[i] {
            let t = take_rows(t, sample).ok_or(NotApplicable::NotRowLocal)?;
            small.inputs[i] = t.meta();
            sliced.push(t);
        } else {
            sliced.push((*t).clone());
        }
    }
    Ok((small, sliced))
}

fn op_of(p: &Program, value: u32, n_in: usize) -> String {
    (value as usize)
        .checked_sub(n_in)
        .map_or("input".into(), |i| p.nodes[i].op.to_string())
}

/// Rows `rows` of `t` (first axis), in that order.
pub fn take_rows(t: &Tensor, rows: &[usize]) -> Option<Tensor> {
    let shape = t.shape();
    let n = *shape.first()?;
    if rows.iter().any(|&r| r >= n) {
        return None;
    }
    let per: usize = shape[1..].iter().product();
    let words = t.words();
    let mut out = Vec::with_capacity(rows.len() * per);
    for &r in rows {
        out.extend_from_slice(&words[r * per..(r + 1) * per]);
    }
    let mut s = shape.to_vec();
    s[0] = rows.len();
    Tensor::from_words(t.dtype(), s, &out).ok()
}

/// Rows per parallel work item of [`project_rows`].
const ROW_BLOCK: usize = 32;
/// Columns of `lhs` per pass over the rows of a block: the matching `rhs` rows
/// (`K_BLOCK × FREIVALDS_ROUNDS` f64, 160 KiB) stay in L2 while every row of the block uses them.
const K_BLOCK: usize = 1024;
/// Independent partial sums per row statistic, so that the compiler can vectorise them.
const LANES: usize = 8;

/// What [`project_rows`] also sums over each row of `lhs`.
#[derive(Clone, Copy)]
enum RowStat<'a> {
    None,
    /// `[Σ x², 0, 0]`.
    SumSquares,
    /// `[Σ |x_j|, Σ x_j², Σ |x_j|·w_j]`.
    Weighted(&'a [f64]),
}

/// `dst (rows × FREIVALDS_ROUNDS) = lhs (rows × width, f32) · rhs (width × FREIVALDS_ROUNDS)`
/// in f64, blocks of rows in parallel, and `stat` of every row of `lhs`.
///
/// A thin product: `gemm` would pack `rhs` and a converted copy of every block of `lhs`, and
/// spend more time on that than on arithmetic. Here `lhs` is converted in registers, with no
/// f64 copy; the accumulators of two rows stay in registers over a block of columns (the row
/// sums read the block again, from cache). On x86-64 with AVX2 and FMA (checked at run time)
/// this runs near the core's f64 FMA throughput; elsewhere the same code, compiled for the
/// baseline target without fused multiply-add, is the fallback.
fn project_rows(
    lhs: &[f32],
    width: usize,
    rhs: &[f64],
    dst: &mut [f64],
    stat: RowStat<'_>,
) -> Vec<[f64; 3]> {
    let w = width.max(1);
    let mut stats = vec![[0.0; 3]; lhs.len() / w];
    dst.par_chunks_mut(ROW_BLOCK * FREIVALDS_ROUNDS)
        .zip(lhs.par_chunks(ROW_BLOCK * w))
        .zip(stats.par_chunks_mut(ROW_BLOCK))
        .for_each(|((out, rows), st)| project_block(rows, width, rhs, out, stat, st));
    stats
}

/// One block of [`project_rows`], on the fastest path this CPU has.
fn project_block(
    rows: &[f32],
    width: usize,
    rhs: &[f64],
    out: &mut [f64],
    stat: RowStat<'_>,
    st: &mut [[f64; 3]],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: `project_block_fma` only requires the CPU features detected just above.
        unsafe {
            project_block_fma(rows, width, rhs, out, stat, st)
        };
        return;
    }
    project_block_with::<false>(rows, width, rhs, out, stat, st);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn project_block_fma(
    rows: &[f32],
    width: usize,
    rhs: &[f64],
    out: &mut [f64],
    stat: RowStat<'_>,
    st: &mut [[f64; 3]],
) {
    project_block_with::<true>(rows, width, rhs, out, stat, st);
}

/// The body of [`project_block`]; `FMA` fuses multiply and add (only fast where the target
/// has FMA instructions, otherwise a library call).
#[inline(always)]
fn project_block_with<const FMA: bool>(
    rows: &[f32],
    width: usize,
    rhs: &[f64],
    out: &mut [f64],
    stat: RowStat<'_>,
    st: &mut [[f64; 3]],
) {
    const R: usize = FREIVALDS_ROUNDS;
    let madd = |x: f64, y: f64, acc: f64| if FMA { x.mul_add(y, acc) } else { acc + x * y };
    out.fill(0.0);
    if width == 0 {
        st.fill([0.0; 3]);
        return;
    }
    let (rhs, _) = rhs[..width * R].as_chunks::<R>();
    let (out, _) = out.as_chunks_mut::<R>();
    for k0 in (0..width).step_by(K_BLOCK) {
        let k1 = (k0 + K_BLOCK).min(width);
        let rhs = &rhs[k0..k1];
        // Two rows at a time: ten independent chains of FMAs hide their latency, and each
        // `rhs` row loaded serves both.
        let pairs = rows.chunks_exact(2 * width);
        let last = pairs.remainder();
        let (out_pairs, out_last) = out.as_chunks_mut::<2>();
        for (two, o) in pairs.zip(out_pairs.iter_mut()) {
            let (r0, r1) = two.split_at(width);
            let [mut a0, mut a1] = *o;
            for ((&x0, &x1), r) in r0[k0..k1].iter().zip(&r1[k0..k1]).zip(rhs) {
                let (x0, x1) = (f64::from(x0), f64::from(x1));
                for j in 0..R {
                    a0[j] = madd(x0, r[j], a0[j]);
                    a1[j] = madd(x1, r[j], a1[j]);
                }
            }
            *o = [a0, a1];
        }
        if let (Some(o), false) = (out_last.first_mut(), last.is_empty()) {
            let mut acc = *o;
            for (&x, r) in last[k0..k1].iter().zip(rhs) {
                let x = f64::from(x);
                for j in 0..R {
                    acc[j] = madd(x, r[j], acc[j]);
                }
            }
            *o = acc;
        }
    }
    for (row, s) in rows.chunks_exact(width).zip(st.iter_mut()) {
        *s = match stat {
            RowStat::None => [0.0; 3],
            RowStat::SumSquares => {
                let mut sq = [0.0f64; LANES];
                let (chunks, rest) = row.as_chunks::<LANES>();
                for c in chunks {
                    for l in 0..LANES {
                        let x = f64::from(c[l]);
                        sq[l] = madd(x, x, sq[l]);
                    }
                }
                let tail: f64 = rest.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                [sq.iter().sum::<f64>() + tail, 0.0, 0.0]
            }
            RowStat::Weighted(w) => {
                let (mut s1, mut s2, mut s3) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
                let (chunks, rest) = row.as_chunks::<LANES>();
                let (wc, wrest) = w[..width].as_chunks::<LANES>();
                for (c, wc) in chunks.iter().zip(wc) {
                    for l in 0..LANES {
                        let a = f64::from(c[l]).abs();
                        s1[l] += a;
                        s2[l] = madd(a, a, s2[l]);
                        s3[l] = madd(a, wc[l], s3[l]);
                    }
                }
                let mut t = [s1.iter().sum(), s2.iter().sum(), s3.iter().sum::<f64>()];
                for (&x, &w) in rest.iter().zip(wrest) {
                    let a = f64::from(x).abs();
                    t[0] += a;
                    t[1] += a * a;
                    t[2] += a * w;
                }
                t
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The thin product and row sums against a plain f64 loop, on shapes that are not
    /// multiples of the row, column and lane blocks, on the detected path and the fallback.
    #[test]
    fn project_rows_matches_a_plain_loop() {
        const R: usize = FREIVALDS_ROUNDS;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (m, w) = (2 * ROW_BLOCK + 5, 2 * K_BLOCK + 3 * LANES + 5);
        let lhs: Vec<f32> = (0..m * w).map(|_| rng.random_range(-2.0..2.0)).collect();
        let rhs: Vec<f64> = (0..w * R).map(|_| rng.random_range(-3.0..3.0)).collect();
        let weights: Vec<f64> = (0..w).map(|_| rng.random_range(0.0..1.0)).collect();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        for stat in [RowStat::SumSquares, RowStat::Weighted(&weights)] {
            let mut fast = vec![f64::NAN; m * R];
            let stats = project_rows(&lhs, w, &rhs, &mut fast, stat);
            let mut portable = vec![f64::NAN; m * R];
            let mut portable_stats = vec![[0.0; 3]; m];
            project_block_with::<false>(&lhs, w, &rhs, &mut portable, stat, &mut portable_stats);
            for i in 0..m {
                let row = &lhs[i * w..(i + 1) * w];
                for j in 0..R {
                    let want: f64 = (0..w).map(|k| f64::from(row[k]) * rhs[k * R + j]).sum();
                    assert!(close(fast[i * R + j], want), "row {i} round {j}");
                    assert!(close(portable[i * R + j], want), "row {i} round {j}");
                }
                let abs = row.iter().map(|&x| f64::from(x).abs());
                let want = match stat {
                    RowStat::SumSquares => [abs.map(|a| a * a).sum(), 0.0, 0.0],
                    RowStat::Weighted(wt) => [
                        abs.clone().sum(),
                        abs.clone().map(|a| a * a).sum(),
                        abs.zip(wt).map(|(a, b)| a * b).sum(),
                    ],
                    RowStat::None => unreachable!(),
                };
                for s in [&stats[i], &portable_stats[i]] {
                    assert!(
                        (0..3).all(|t| close(s[t], want[t])),
                        "row {i}: {s:?} vs {want:?}"
                    );
                }
            }
        }
    }
}
