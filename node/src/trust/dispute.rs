//! A replica's answer against the result already accepted: agreement, or a recompute on the
//! requester that says which of the two lied.

use std::cell::OnceCell;
use std::sync::Arc;

use corvid_kernels::{ContentId, Tensor as Data, verify};
use corvid_sdk::{LocalExecutor, Subgraph};

use super::Verifier;

/// A result as its worker signed it (receipt already opened).
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub outputs: &'a [Arc<Data>],
    /// Content ids of `outputs`.
    pub cids: &'a [ContentId],
    /// One hash per op of the program, as signed.
    pub op_hashes: &'a [ContentId],
    /// The worker's determinism class.
    pub class: &'a [u8; 32],
}

/// What the requester concludes from a primary result and its replica.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaVerdict {
    /// The same outputs (bit for bit, or within tolerance across classes).
    Agreed,
    /// They disagree; the evidence against each one a local recompute found wrong.
    Dispute {
        primary_wrong: Option<String>,
        replica_wrong: Option<String>,
    },
    /// They disagree and this machine could not recompute to decide: proof of nothing.
    Undecided(String),
}

/// Judges the replica's answer `second` against the accepted `first`, both for `sg` on
/// `inputs`.
///
/// When both workers and this requester share a determinism class, their per-op hashes are
/// comparable bit for bit: the first op where the two receipts differ is recomputed here (with
/// only the ops it depends on) and whoever's hash for it differs from ours is wrong there. If
/// only the replica is, the primary's result — already accepted, and not vouched for by the
/// replica's lie — is then recomputed in full. Otherwise (classes differ, or the receipts agree
/// op by op but not on the outputs) the whole subgraph is recomputed and each result compared
/// with it, exactly within a class and within tolerance across classes.
pub fn judge_replica(
    verifier: &Verifier,
    local: &LocalExecutor,
    sg: &Subgraph,
    inputs: &[Arc<Data>],
    first: &Claim<'_>,
    second: &Claim<'_>,
) -> ReplicaVerdict {
    if first.cids == second.cids {
        return ReplicaVerdict::Agreed;
    }
    // Different classes agree within tolerance.
    if first.class != second.class {
        let tol = verify::program_tolerance(&sg.program);
        // The replica's values against the accepted ones (the tolerance scales with the
        // second).
        let close =
            second
                .outputs
                .iter()
                .zip(first.outputs)
                .all(|(a, b)| match (a.as_f32(), b.as_f32()) {
                    (Ok(x), Ok(y)) => x.iter().zip(y).all(|(p, q)| tol.accepts(*p, *q)),
                    _ => a == b,
                });
        if close {
            return ReplicaVerdict::Agreed;
        }
    }
    let mine = local.backend().class().id();
    let name = |k: usize| format!("op {k} ({})", sg.program.nodes[k].op);
    let first_differing = first
        .op_hashes
        .iter()
        .zip(second.op_hashes)
        .position(|(a, b)| a != b);
    let full = || FullRecompute::new(verifier, local, sg, inputs);
    if *first.class == mine
        && *second.class == mine
        && let Some(k) = first_differing
        && let Some((cone, kept)) = sg.program.cone(k)
        && let Ok((_, hashes)) = local
            .backend()
            .run_traced(&cone, inputs, &local.backend().guard())
    {
        // Both receipts were opened against this program: one hash per op.
        let judge = |claimed: &[ContentId]| {
            kept.iter()
                .zip(&hashes)
                .find(|&(&i, h)| claimed.get(i) != Some(h))
                .map(|(&i, _)| {
                    format!(
                        "subgraph {}: {} differs from a local recompute of that op ({} of {} \
                         ops recomputed)",
                        sg.id.short(),
                        name(i),
                        kept.len(),
                        sg.program.nodes.len()
                    )
                })
        };
        let mut primary_wrong = judge(first.op_hashes);
        let replica_wrong = judge(second.op_hashes);
        if primary_wrong.is_none() && replica_wrong.is_some() {
            match full().judge(first) {
                Ok(verdict) => primary_wrong = verdict,
                Err(why) => tracing::warn!(%why, "could not recompute the primary's result"),
            }
        }
        tracing::warn!(subgraph = %sg.id.short(), op = %name(k), ?primary_wrong, ?replica_wrong,
            "replicas disagree; recomputed the first op that differs");
        return ReplicaVerdict::Dispute {
            primary_wrong,
            replica_wrong,
        };
    }
    let full = full();
    match full.judge(first).and_then(|p| Ok((p, full.judge(second)?))) {
        Ok((primary_wrong, replica_wrong)) => {
            tracing::warn!(subgraph = %sg.id.short(), ?primary_wrong, ?replica_wrong,
                "replicas disagree; recomputed the subgraph");
            ReplicaVerdict::Dispute {
                primary_wrong,
                replica_wrong,
            }
        }
        Err(why) => ReplicaVerdict::Undecided(format!("replicas disagree, undecided: {why}")),
    }
}

/// A whole subgraph recomputed here to judge results against (traced once, when a result of
/// this machine's class needs it).
struct FullRecompute<'a> {
    verifier: &'a Verifier,
    local: &'a LocalExecutor,
    sg: &'a Subgraph,
    inputs: &'a [Arc<Data>],
    here: OnceCell<Result<Trace, String>>,
}

/// Content ids of a local run's outputs, and of every op's value.
type Trace = (Vec<ContentId>, Vec<ContentId>);

impl<'a> FullRecompute<'a> {
    fn new(
        verifier: &'a Verifier,
        local: &'a LocalExecutor,
        sg: &'a Subgraph,
        inputs: &'a [Arc<Data>],
    ) -> Self {
        FullRecompute {
            verifier,
            local,
            sg,
            inputs,
            here: OnceCell::new(),
        }
    }

    /// `Some(evidence)` if the result is wrong, `None` if right; an error if this machine
    /// could not tell.
    fn judge(&self, claim: &Claim<'_>) -> Result<Option<String>, String> {
        let sg = self.sg;
        if *claim.class != self.local.backend().class().id() {
            // Another class: within tolerance of a recompute here.
            return Ok(self
                .verifier
                .recompute(sg, self.inputs, claim.outputs, claim.class)?
                .err()
                .map(|m| format!("subgraph {}: {m}", sg.id.short())));
        }
        // Same class: the outputs and every op's hash must be ours, bit for bit.
        let here = self.here.get_or_init(|| {
            self.local
                .backend()
                .run_traced(&sg.program, self.inputs, &self.local.backend().guard())
                .map(|(outs, hashes)| (outs.iter().map(Data::content_id).collect(), hashes))
                .map_err(|e| format!("subgraph {}: local recompute failed: {e}", sg.id.short()))
        });
        let (cids, hashes) = here.as_ref().map_err(Clone::clone)?;
        if claim.cids == cids.as_slice() && claim.op_hashes == hashes.as_slice() {
            return Ok(None);
        }
        let at = hashes
            .iter()
            .zip(claim.op_hashes)
            .position(|(a, b)| a != b)
            .map_or("its outputs".to_string(), |k| {
                format!("op {k} ({})", sg.program.nodes[k].op)
            });
        Ok(Some(format!(
            "subgraph {} first differs from a local recompute at {at}",
            sg.id.short()
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use corvid_kernels::{Backend, CpuBackend, Op, Program, TensorMeta, UnaryOp};

    use super::*;
    use crate::trust::canary::canary_subgraph;

    /// A signed result, owned.
    struct Owned {
        outputs: Vec<Arc<Data>>,
        cids: Vec<ContentId>,
        op_hashes: Vec<ContentId>,
        class: [u8; 32],
    }

    impl Owned {
        fn claim(&self) -> Claim<'_> {
            Claim {
                outputs: &self.outputs,
                cids: &self.cids,
                op_hashes: &self.op_hashes,
                class: &self.class,
            }
        }

        /// The same result with output element 0 moved by `by` and, if `op` is given, that
        /// op's signed hash (and every later one) changed, as a liar's would be.
        fn lie(&self, by: f32, op: Option<usize>) -> Owned {
            let t = &self.outputs[0];
            let mut v = t.as_f32().unwrap().to_vec();
            v[0] += by;
            let out = Arc::new(Data::from_f32(t.shape().to_vec(), v).unwrap());
            let mut op_hashes = self.op_hashes.clone();
            if let Some(k) = op {
                for h in &mut op_hashes[k..] {
                    *h = out.content_id();
                }
            }
            Owned {
                cids: vec![out.content_id()],
                outputs: vec![out],
                op_hashes,
                class: self.class,
            }
        }
    }

    /// `relu(a @ b)` on 8×8 inputs, the local executor and verifier, and the honest result.
    fn setup() -> (
        Verifier,
        Arc<LocalExecutor>,
        Subgraph,
        Vec<Arc<Data>>,
        Owned,
    ) {
        let local = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
        let mut program = Program::single(Op::MatMul, vec![TensorMeta::f32(vec![8, 8]); 2]);
        program.nodes.push(corvid_kernels::program::Node {
            op: Op::Unary(UnaryOp::Relu),
            args: vec![2],
        });
        program.outputs = vec![3];
        let inputs: Vec<Arc<Data>> = (0..2)
            .map(|s| Arc::new(Data::random_uniform(vec![8, 8], -1.0, 1.0, s)))
            .collect();
        let ids = inputs.iter().map(|t| t.content_id().into()).collect();
        let (sg, inputs) = canary_subgraph(program, inputs, ids, corvid_sdk::Cost::default());
        let (outs, op_hashes) = local
            .backend()
            .run_traced(&sg.program, &inputs, &local.backend().guard())
            .unwrap();
        let honest = Owned {
            cids: outs.iter().map(Data::content_id).collect(),
            outputs: outs.into_iter().map(Arc::new).collect(),
            op_hashes,
            class: local.backend().class().id(),
        };
        (Verifier::new(local.clone()), local, sg, inputs, honest)
    }

    #[test]
    fn the_same_answer_agrees() {
        let (verifier, local, sg, inputs, honest) = setup();
        let judge = |a: &Owned, b: &Owned| {
            judge_replica(&verifier, &local, &sg, &inputs, &a.claim(), &b.claim())
        };
        let v = judge(&honest, &honest);
        assert_eq!(v, ReplicaVerdict::Agreed);
    }

    /// Same class everywhere: the first op whose signed hashes differ is recomputed, and the
    /// side whose hash differs from ours there is the liar, whichever side it is.
    #[test]
    fn within_a_class_the_first_differing_op_names_the_liar() {
        let (verifier, local, sg, inputs, honest) = setup();
        let judge = |a: &Owned, b: &Owned| {
            judge_replica(&verifier, &local, &sg, &inputs, &a.claim(), &b.claim())
        };
        let liar = honest.lie(1.0, Some(0));
        let v = judge(&honest, &liar);
        let ReplicaVerdict::Dispute {
            primary_wrong: None,
            replica_wrong: Some(e),
        } = v
        else {
            panic!("the replica lied: {v:?}")
        };
        assert!(e.contains("op 0 (matmul)"), "{e}");
        let v = judge(&liar, &honest);
        assert!(
            matches!(
                v,
                ReplicaVerdict::Dispute {
                    primary_wrong: Some(_),
                    replica_wrong: None
                }
            ),
            "the primary lied: {v:?}"
        );
        // A liar that signs honest per-op hashes but sends other outputs is caught by the
        // full recompute.
        let quiet = honest.lie(1.0, None);
        let v = judge(&honest, &quiet);
        let ReplicaVerdict::Dispute {
            primary_wrong: None,
            replica_wrong: Some(e),
        } = v
        else {
            panic!("the replica's outputs are wrong: {v:?}")
        };
        assert!(e.contains("its outputs"), "{e}");
    }

    /// Across classes: within the program's tolerance is agreement (rounding differs between
    /// backends); beyond it, a recompute here judges each side within tolerance.
    #[test]
    fn across_classes_rounding_agrees_and_a_wrong_value_is_found() {
        let (verifier, local, sg, inputs, honest) = setup();
        let judge = |a: &Owned, b: &Owned| {
            judge_replica(&verifier, &local, &sg, &inputs, &a.claim(), &b.claim())
        };
        let mut other = honest.lie(1e-6, None);
        other.class = [7; 32];
        let v = judge(&honest, &other);
        assert_eq!(v, ReplicaVerdict::Agreed);
        let mut wrong = honest.lie(10.0, Some(1));
        wrong.class = [7; 32];
        let v = judge(&honest, &wrong);
        assert!(
            matches!(
                v,
                ReplicaVerdict::Dispute {
                    primary_wrong: None,
                    replica_wrong: Some(_)
                }
            ),
            "{v:?}"
        );
    }
}
