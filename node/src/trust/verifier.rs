//! Checking one result on the requester, with random choices drawn after it arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corvid_kernels::verify::{self, Projection, Verdict};
use corvid_kernels::{ContentId, Op, Tensor as Data};
use corvid_sdk::sched::TaskFailure;
use corvid_sdk::{LocalExecutor, Subgraph};

use super::{CheckKind, Refusal};

/// Checks results on the requester. Shares Freivalds projections of weight matrices between
/// the results of one job that multiply by the same matrix.
#[derive(Debug)]
pub struct Verifier {
    local: Arc<LocalExecutor>,
    skip: bool,
    projections: Mutex<HashMap<ContentId, Arc<Projection>>>,
}

/// Projections kept per job at most (each holds a weight matrix's `k × 20` projection).
const MAX_PROJECTIONS: usize = 256;

impl Verifier {
    pub fn new(local: Arc<LocalExecutor>) -> Verifier {
        Verifier::with_checks(local, true)
    }

    /// A verifier that checks nothing when `checks` is false (benchmarks of its cost only).
    pub fn with_checks(local: Arc<LocalExecutor>, checks: bool) -> Verifier {
        Verifier {
            local,
            skip: !checks,
            projections: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `outputs` of `sg` on `inputs`; returns how, or the mismatch as evidence.
    /// `worker_class` is the class id the worker signed: a full recompute compares bits when
    /// it equals the requester's own class, and within tolerance otherwise. A row pipeline
    /// is checked on `sample_rows` random rows.
    pub fn check(
        &self,
        sg: &Subgraph,
        inputs: &[Arc<Data>],
        input_cids: &[ContentId],
        outputs: &[Arc<Data>],
        worker_class: &[u8; 32],
        sample_rows: usize,
    ) -> Result<CheckKind, Refusal> {
        let wrong = |kind: CheckKind, m: verify::Mismatch| Refusal::Cheated {
            reason: format!("wrong result ({kind})"),
            evidence: format!("subgraph {} ({}): {m}", sg.id.short(), sg.ops()),
        };
        if self.skip {
            return Ok(CheckKind::Unchecked);
        }
        let p = &sg.program;
        // A plain 2-d matmul of the two inputs: Freivalds.
        if p.nodes.len() == 1
            && p.nodes[0].op == Op::MatMul
            && p.nodes[0].args == [0, 1]
            && p.outputs == [2]
            && inputs.len() == 2
            && inputs[0].shape().len() == 2
            && inputs[1].shape().len() == 2
        {
            let proj = self.projection(&inputs[1], &input_cids[1]);
            if let Ok(proj) = proj {
                match proj.check(&inputs[0], &outputs[0]) {
                    Ok(Verdict::Pass) => return Ok(CheckKind::Freivalds),
                    // A ban is permanent: confirm with a full recompute, whose mismatch (an
                    // element, got, want) is the evidence. An honest result that tripped the
                    // threshold (overflow to inf, a lower-precision class) passes it.
                    Ok(Verdict::Fail(m)) => {
                        return self
                            .recompute(sg, inputs, outputs, worker_class)
                            .map_err(|e| Refusal::Failed(TaskFailure::Unchecked(e)))?
                            .map(|()| CheckKind::Recomputed)
                            .map_err(|e| Refusal::Cheated {
                                reason: "wrong result (freivalds, confirmed by recompute)".into(),
                                evidence: format!(
                                    "subgraph {} ({}): {e}; {m}",
                                    sg.id.short(),
                                    sg.ops()
                                ),
                            });
                    }
                    Err(_) => {} // non-finite or empty inputs: recompute below
                }
            }
        } else if let Some(rowed) = verify::row_inputs(p) {
            let rows = outputs.first().map_or(0, |o| o.shape()[0]);
            if rows > sample_rows {
                let mut rng = rand::rng();
                let mut sample = rand::seq::index::sample(&mut rng, rows, sample_rows).into_vec();
                sample.sort_unstable();
                let refs: Vec<&Data> = inputs.iter().map(|t| &**t).collect();
                let outs: Vec<&Data> = outputs.iter().map(|t| &**t).collect();
                // Same class as ours: the fast path must agree bit for bit; otherwise the
                // reference within tolerance.
                let verdict = if *worker_class == self.local.backend().class().id() {
                    verify::check_rows_exact(self.local.backend(), p, &rowed, &refs, &outs, &sample)
                } else {
                    verify::check_rows(p, &rowed, &refs, &outs, &sample)
                };
                match verdict {
                    Ok(Verdict::Pass) => return Ok(CheckKind::SampledRows),
                    // The reference disagrees on a sampled row: recompute everything on this
                    // machine's fast path before blaming anyone (it is the same code the
                    // worker runs when the classes match).
                    Ok(Verdict::Fail(_)) | Err(_) => {}
                }
            }
        }
        self.recompute(sg, inputs, outputs, worker_class)
            .map_err(|e| Refusal::Failed(TaskFailure::Unchecked(e)))?
            .map(|()| CheckKind::Recomputed)
            .map_err(|m| wrong(CheckKind::Recomputed, m))
    }

    /// Recomputes `sg` here and compares: bit for bit when the worker's class is ours,
    /// within the program's tolerance otherwise. The outer error is a failure to recompute
    /// here, which proves nothing about the worker.
    pub fn recompute(
        &self,
        sg: &Subgraph,
        inputs: &[Arc<Data>],
        outputs: &[Arc<Data>],
        worker_class: &[u8; 32],
    ) -> Result<Result<(), verify::Mismatch>, String> {
        let mine = self
            .local
            .backend()
            .run_shared(&sg.program, inputs)
            .map_err(|e| format!("subgraph {}: local recompute failed: {e}", sg.id.short()))?;
        Ok(compare(
            sg,
            outputs,
            &mine,
            worker_class == &self.local.backend().class().id(),
        ))
    }

    fn projection(
        &self,
        b: &Data,
        cid: &ContentId,
    ) -> Result<Arc<Projection>, verify::NotApplicable> {
        if let Some(p) = self.lock().get(cid) {
            return Ok(p.clone());
        }
        // Drawn now, after the first result that needs it arrived; never leaves this process.
        let p = Arc::new(Projection::new(b, &mut rand::rng())?);
        let mut map = self.lock();
        if map.len() >= MAX_PROJECTIONS {
            map.clear();
        }
        map.insert(*cid, p.clone());
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Arc<Projection>>> {
        self.projections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Compares claimed `outputs` of `sg` with `mine`, computed here: bit for bit when `exact`
/// (same determinism class), within the program's tolerance otherwise.
pub fn compare(
    sg: &Subgraph,
    outputs: &[Arc<Data>],
    mine: &[Data],
    exact: bool,
) -> Result<(), verify::Mismatch> {
    let tol = verify::program_tolerance(&sg.program);
    for (k, (got, want)) in outputs.iter().zip(mine).enumerate() {
        if **got == *want {
            continue;
        }
        let what = format!("output {k} ({})", sg.ops());
        let (Ok(g), Ok(w)) = (got.as_f32(), want.as_f32()) else {
            return Err(verify::Mismatch {
                what,
                index: vec![],
                got: f64::NAN,
                want: f64::NAN,
                tolerance: 0.0,
            });
        };
        let bad = (0..g.len()).find(|&e| {
            if exact {
                g[e].to_bits() != w[e].to_bits()
            } else {
                !tol.accepts(g[e], w[e])
            }
        });
        if let Some(e) = bad {
            return Err(verify::Mismatch {
                what,
                index: vec![e],
                got: f64::from(g[e]),
                want: f64::from(w[e]),
                tolerance: if exact {
                    0.0
                } else {
                    f64::from(tol.atol + tol.rtol * w[e].abs())
                },
            });
        }
    }
    Ok(())
}

/// Elapsed time of one check, for the summary.
#[derive(Debug)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use corvid_kernels::{Backend, CpuBackend, Program, TensorMeta, UnaryOp};

    use super::*;
    use crate::trust::canary::canary_subgraph;
    use crate::trust::{SAMPLE_ROWS, SAMPLE_ROWS_ALONE};

    /// A subgraph, its inputs and their content ids, and its honest outputs.
    type Task = (Subgraph, Vec<Arc<Data>>, Vec<ContentId>, Vec<Arc<Data>>);

    /// `op` over fresh inputs of `shapes`, and its honest outputs.
    fn task(local: &LocalExecutor, op: Op, shapes: &[[usize; 2]]) -> Task {
        let metas = shapes.iter().map(|s| TensorMeta::f32(s.to_vec())).collect();
        let inputs: Vec<Arc<Data>> = shapes
            .iter()
            .zip(1..)
            .map(|(s, seed)| Arc::new(Data::random_uniform(s.to_vec(), -1.0, 1.0, seed)))
            .collect();
        let ids = inputs.iter().map(|t| t.content_id().into()).collect();
        let (sg, inputs) =
            canary_subgraph(Program::single(op, metas), inputs, ids, Default::default());
        let cids = inputs.iter().map(|t| t.content_id()).collect();
        let outs = local.backend().run_shared(&sg.program, &inputs).unwrap();
        (sg, inputs, cids, outs.into_iter().map(Arc::new).collect())
    }

    /// Output element `at` moved by `by`.
    fn corrupt(outs: &[Arc<Data>], at: usize, by: f32) -> Vec<Arc<Data>> {
        let mut v = outs[0].as_f32().unwrap().to_vec();
        v[at] += by;
        vec![Arc::new(
            Data::from_f32(outs[0].shape().to_vec(), v).unwrap(),
        )]
    }

    /// Each program gets its check (Freivalds for a matmul, sampled rows for a row-local op, a
    /// recompute otherwise); an honest result passes it and one wrong element, anywhere, is
    /// refused as cheating with the element as evidence.
    #[test]
    fn each_check_passes_the_truth_and_catches_one_wrong_element() {
        let local = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
        let verifier = Verifier::new(local.clone());
        let mine = local.backend().class().id();
        let cases = [
            (Op::MatMul, vec![[32, 16], [16, 8]], CheckKind::Freivalds),
            (
                Op::Unary(UnaryOp::Exp),
                vec![[64, 8]],
                CheckKind::SampledRows,
            ),
            (
                Op::Permute { axes: vec![1, 0] },
                vec![[8, 4]],
                CheckKind::Recomputed,
            ),
        ];
        for (op, shapes, kind) in cases {
            let (sg, inputs, cids, outs) = task(&local, op.clone(), &shapes);
            assert_eq!(
                verifier
                    .check(&sg, &inputs, &cids, &outs, &mine, SAMPLE_ROWS)
                    .unwrap(),
                kind,
                "{op}"
            );
            // Every row is wrong somewhere, so a sample of rows cannot miss it.
            let n = outs[0].as_f32().unwrap().len();
            let cols = outs[0].shape()[1];
            let mut bad = outs.clone();
            for row in 0..n / cols {
                bad = corrupt(&bad, row * cols + row % cols, 0.5);
            }
            match verifier.check(&sg, &inputs, &cids, &bad, &mine, SAMPLE_ROWS) {
                Err(Refusal::Cheated { reason, evidence }) => {
                    assert!(reason.starts_with("wrong result"), "{op}: {reason}");
                    assert!(evidence.contains(&sg.id.short()), "{op}: {evidence}");
                }
                other => panic!("{op}: a wrong result passed: {other:?}"),
            }
        }
        // A worker of another class may round differently: within tolerance passes.
        let (sg, inputs, cids, outs) = task(&local, Op::Unary(UnaryOp::Exp), &[[4, 8]]);
        let close = corrupt(&outs, 3, 1e-5);
        verifier
            .check(&sg, &inputs, &cids, &close, &[9; 32], SAMPLE_ROWS)
            .unwrap();
        assert!(
            verifier
                .check(&sg, &inputs, &cids, &close, &mine, SAMPLE_ROWS)
                .is_err()
        );
    }

    /// A result with one row in ten wrong: 4 sampled rows miss it about 65 % of the time,
    /// [`SAMPLE_ROWS_ALONE`] about 3 % (the bound the constant states).
    #[test]
    fn more_sampled_rows_catch_a_sparse_lie_as_stated() {
        let local = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
        let verifier = Verifier::new(local.clone());
        let mine = local.backend().class().id();
        let (sg, inputs, cids, outs) = task(&local, Op::Unary(UnaryOp::Exp), &[[640, 4]]);
        let mut bad = outs.clone();
        for row in (0..640).step_by(10) {
            bad = corrupt(&bad, row * 4, 0.5);
        }
        let missed = |rows: usize| {
            (0..200)
                .filter(|_| {
                    verifier.check(&sg, &inputs, &cids, &bad, &mine, rows).ok()
                        == Some(CheckKind::SampledRows)
                })
                .count()
        };
        let (few, many) = (missed(SAMPLE_ROWS), missed(SAMPLE_ROWS_ALONE));
        assert!(few >= 90, "4 rows missed {few} of 200");
        assert!(many <= 20, "{SAMPLE_ROWS_ALONE} rows missed {many} of 200");
    }
}
