//! Canaries: tasks whose answer the requester knows, drawn to look like the job's work.

use std::sync::Arc;

use corvid_kernels::{Recipe, Tensor as Data};
use corvid_sdk::plan::{Plan, Source, Subgraph};
use corvid_sdk::{LocalExecutor, ValueId};
use rand::Rng;

/// Probability that a trusted peer gets a canary in a job.
pub const CANARY_RATE: f64 = 0.1;

/// Largest job subgraph copied as a canary: flops and input bytes.
pub const CANARY_MAX_FLOPS: u64 = 200_000_000;
pub const CANARY_MAX_BYTES: u64 = 4 << 20;

/// A canary, as a subgraph with its inputs: where the job has a subgraph that reads only
/// constants and costs little, a copy of it that keeps the constants other subgraphs share
/// (weights, which workers may hold) and draws the rest afresh, uniform over each one's range
/// (so that signs, and with them the ops' domains, are kept), so that it runs the job's ops
/// on the job's shapes and weights; otherwise, or if nothing could be drawn afresh, `a @ b`
/// for fresh random 64×64 `a` and `b`.
pub fn canary(rng: &mut impl Rng, plan: &Plan) -> (Subgraph, Vec<Arc<Data>>) {
    use rand::seq::IndexedRandom;
    let like_work: Vec<&Subgraph> = plan
        .subgraphs
        .iter()
        .filter(|s| {
            (1..=CANARY_MAX_FLOPS).contains(&s.cost.flops)
                && s.cost.bytes_in <= CANARY_MAX_BYTES
                && s.inputs.iter().all(|i| matches!(i, Source::Leaf(_)))
        })
        .collect();
    if let Some(sg) = like_work.choose(rng) {
        let shared = |l: usize| {
            plan.subgraphs
                .iter()
                .filter(|s| s.inputs.contains(&Source::Leaf(l)))
                .count()
                > 1
        };
        let (mut inputs, mut ids) = (Vec::new(), Vec::new());
        for s in &sg.inputs {
            let Source::Leaf(l) = *s else {
                unreachable!("filtered above")
            };
            let leaf = &plan.leaves[l];
            let range = match leaf.how() {
                Some(Recipe::Uniform { lo, hi, .. }) => (lo < hi).then_some((*lo, *hi)),
                None => leaf.get().as_f32().ok().and_then(|v| {
                    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    (lo.is_finite() && hi.is_finite() && lo < hi).then_some((lo, hi))
                }),
            };
            match range {
                Some((lo, hi)) if !shared(l) => {
                    let fresh =
                        Data::random_uniform(leaf.meta().shape.clone(), lo, hi, rng.random());
                    ids.push(fresh.content_id().into());
                    inputs.push(Arc::new(fresh));
                }
                _ => {
                    ids.push(plan.leaf_ids[l]);
                    inputs.push(leaf.get().clone());
                }
            }
        }
        if ids != sg.input_ids {
            return canary_subgraph(sg.program.clone(), inputs, ids, sg.cost);
        }
    }
    matmul_canary(rng)
}

/// `a @ b` for fresh random 64×64 `a` and `b`.
pub fn matmul_canary(rng: &mut impl Rng) -> (Subgraph, Vec<Arc<Data>>) {
    use corvid_kernels::{Op, Program, TensorMeta};
    let n = 64;
    let inputs: Vec<Arc<Data>> = (0..2)
        .map(|_| Arc::new(Data::random_uniform(vec![n, n], -1.0, 1.0, rng.random())))
        .collect();
    let program = Program::single(Op::MatMul, vec![TensorMeta::f32(vec![n, n]); 2]);
    let cost = corvid_sdk::Cost {
        flops: 2 * (n * n * n) as u64,
        bytes_in: 2 * (4 * n * n) as u64,
        bytes_out: (4 * n * n) as u64,
    };
    let ids = inputs.iter().map(|t| t.content_id().into()).collect();
    canary_subgraph(program, inputs, ids, cost)
}

/// A subgraph of `program` over `inputs` (with value ids `input_ids`), with the other ids
/// derived as the planner derives them.
pub fn canary_subgraph(
    program: corvid_kernels::Program,
    inputs: Vec<Arc<Data>>,
    input_ids: Vec<ValueId>,
    cost: corvid_sdk::Cost,
) -> (Subgraph, Vec<Arc<Data>>) {
    use corvid_sdk::ids::{op_value_id, subgraph_id};
    let mut ids = input_ids.clone();
    for node in &program.nodes {
        let args: Vec<ValueId> = node.args.iter().map(|&a| ids[a as usize]).collect();
        ids.push(op_value_id(&node.op, &args));
    }
    let sg = Subgraph {
        id: subgraph_id(&program.canonical_bytes(), &input_ids),
        output_ids: program.outputs.iter().map(|&o| ids[o as usize]).collect(),
        inputs: (0..inputs.len()).map(Source::Leaf).collect(),
        input_ids,
        cost,
        program,
    };
    (sg, inputs)
}

/// A canary ready to send, with the answer computed here.
#[derive(Debug)]
pub struct Canary {
    pub sg: Subgraph,
    pub inputs: Vec<Arc<Data>>,
    pub want: Vec<Data>,
    /// The class of the machine that computed `want`.
    pub class: [u8; 32],
}

/// Runs a canary here. A copy whose answer is not finite (a moved input left an op's domain)
/// is swapped for the matmul canary, so that honest rounding of a NaN or an overflow never
/// decides a ban.
pub fn canary_answer(
    local: &LocalExecutor,
    sg: Subgraph,
    inputs: Vec<Arc<Data>>,
) -> Option<Canary> {
    let finite = |t: &Data| t.as_f32().map_or(true, |v| v.iter().all(|x| x.is_finite()));
    let run = |sg: &Subgraph, inputs: &[Arc<Data>]| {
        local
            .backend()
            .run_shared(&sg.program, inputs)
            .ok()
            .filter(|w| w.iter().all(finite))
    };
    let class = local.backend().class().id();
    if let Some(want) = run(&sg, &inputs) {
        return Some(Canary {
            sg,
            inputs,
            want,
            class,
        });
    }
    let (sg, inputs) = matmul_canary(&mut rand::rng());
    run(&sg, &inputs).map(|want| Canary {
        sg,
        inputs,
        want,
        class,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::SeedableRng;

    /// A canary copies a cheap job subgraph that reads only constants: same program and input
    /// shapes, unshared inputs drawn afresh over their range, ids derived from them; a job with
    /// no such subgraph gets the 64×64 matmul.
    #[test]
    fn canaries_look_like_the_jobs_work() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let g = corvid_sdk::Graph::new("canary");
        let y = (g
            .random(&[64, 32], 0.5, 1.5, 1)
            .matmul(&g.random(&[32, 16], 0.5, 1.5, 2))
            .unwrap()
            .log()
            .unwrap())
        .sum(&[1], false)
        .unwrap();
        let plan = g.plan(&[&y]).unwrap();
        let (sg, inputs) = canary(&mut rng, &plan);
        let twin = plan
            .subgraphs
            .iter()
            .find(|s| s.program == sg.program)
            .expect("a copy of one of the job's subgraphs");
        assert_ne!(sg.id, twin.id, "fresh inputs make a new task");
        assert_eq!(sg.cost, twin.cost);
        assert_eq!(sg.output_ids.len(), twin.output_ids.len());
        for (k, t) in inputs.iter().enumerate() {
            let Source::Leaf(l) = twin.inputs[k] else {
                panic!("copied a subgraph that reads results")
            };
            let leaf = plan.leaves[l].get();
            assert_eq!(t.meta(), leaf.meta());
            // Used by this subgraph only: drawn afresh over the leaf's range.
            assert_ne!(t.content_id(), leaf.content_id());
            assert_ne!(sg.input_ids[k], twin.input_ids[k]);
            // A recipe's range, or the range of the values.
            let (a, b) = (t.as_f32().unwrap(), leaf.as_f32().unwrap());
            let (lo, hi) = match plan.leaves[l].how() {
                Some(Recipe::Uniform { lo, hi, .. }) => (*lo, *hi),
                None => (
                    b.iter().copied().fold(f32::INFINITY, f32::min),
                    b.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                ),
            };
            assert!(a.iter().all(|x| (lo..=hi).contains(x)));
        }
        // Its outputs' value ids follow from the new inputs: none collides with the job's.
        assert!(sg.output_ids.iter().all(|id| !twin.output_ids.contains(id)));

        // A weight that two subgraphs share is kept (by its id: workers may hold it).
        let g = corvid_sdk::Graph::new("shared");
        let w = g.random(&[32, 16], -1.0, 1.0, 3);
        let y1 = g.random(&[8, 32], -1.0, 1.0, 4).matmul(&w).unwrap();
        let y2 = g.random(&[8, 32], -1.0, 1.0, 5).matmul(&w).unwrap();
        let plan = g.plan(&[&y1, &y2]).unwrap();
        assert_eq!(plan.subgraphs.len(), 2, "{}", plan.describe());
        let (sg, inputs) = canary(&mut rng, &plan);
        let twin = plan
            .subgraphs
            .iter()
            .find(|s| s.program == sg.program && s.input_ids[1] == sg.input_ids[1])
            .expect("a copy that keeps the shared weight");
        assert_ne!(sg.input_ids[0], twin.input_ids[0]);
        let Source::Leaf(l) = twin.inputs[1] else {
            panic!("copied a subgraph that reads results")
        };
        assert_eq!(inputs[1].content_id(), plan.leaves[l].get().content_id());

        let big = corvid_sdk::Graph::new("big");
        let y = big
            .random(&[1024, 1024], -1.0, 1.0, 1)
            .matmul(&big.random(&[1024, 1024], -1.0, 1.0, 2))
            .unwrap();
        let (sg, inputs) = canary(&mut rng, &big.plan(&[&y]).unwrap());
        assert_eq!(sg.program.nodes.len(), 1);
        assert_eq!(sg.program.nodes[0].op, corvid_kernels::Op::MatMul);
        assert_eq!(inputs[0].shape(), &[64, 64]);
    }
}
