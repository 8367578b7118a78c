//! Every registry op, on seeded random inputs, against the reference: the fast CPU path and the
//! wgpu kernels (on lavapipe in CI). Also determinism (same bits on repeat runs and at every batch
//! size) and whole programs kept on the device.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{compare, gpu, same_bits, shapes};
use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_kernels::{
    Backend, CpuBackend, ExecError, Limit, Op, Program, ProgramError, Tensor, TensorMeta,
    reference, registry,
};

const SEEDS: u64 = 6;

fn run_one(backend: &Backend, op: &Op, inputs: &[Tensor]) -> Tensor {
    let program = Program::single(op.clone(), inputs.iter().map(|t| t.meta()).collect());
    backend
        .run(&program, inputs)
        .unwrap_or_else(|e| panic!("{op} on {}: {e}", shapes(inputs)))
        .remove(0)
}

/// Runs every op's samples through `backend` and checks them against the reference.
fn conformance(name: &str, backend: &Backend) {
    let mut failures = Vec::new();
    for spec in registry() {
        for seed in 0..SEEDS {
            let s = spec.sample(seed);
            let refs: Vec<&Tensor> = s.inputs.iter().collect();
            let want = reference::eval(&s.op, &refs).expect("samples are valid");
            let got = run_one(backend, &s.op, &s.inputs);
            if let Err(e) = compare(&got, &want, spec.tolerance) {
                failures.push(format!(
                    "{name}: op {} inputs {} seed {seed}: {e}",
                    s.op,
                    shapes(&s.inputs)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cpu_matches_reference_on_every_op() {
    let cpu = CpuBackend::new();
    conformance("cpu", &Backend::Cpu(cpu));
}

#[test]
fn gpu_matches_reference_on_every_op() {
    let Some(gpu) = gpu() else { return };
    conformance("gpu", &Backend::Gpu(gpu));
}

/// Same op, same inputs, same bits: twice over, for every registry op.
fn repeatable(name: &str, backend: &Backend) {
    for spec in registry() {
        let s = spec.sample(99);
        let a = run_one(backend, &s.op, &s.inputs);
        let b = run_one(backend, &s.op, &s.inputs);
        same_bits(&a, &b).unwrap_or_else(|e| panic!("{name}: {} not repeatable: {e}", s.op));
    }
}

#[test]
fn cpu_is_bitwise_repeatable() {
    let cpu = CpuBackend::new();
    repeatable("cpu", &Backend::Cpu(cpu));
}

#[test]
fn gpu_is_bitwise_repeatable() {
    let Some(gpu) = gpu() else { return };
    repeatable("gpu", &Backend::Gpu(gpu));
}

/// Row `i` of a batched result has the same bits as computing row `i` on its own: what lets
/// the partitioner split batches across peers without changing the answer.
fn batch_invariant(name: &str, backend: &Backend) {
    let (m, k, n) = (37, 300, 129);
    let a = Tensor::random_uniform([m, k], -1.0, 1.0, 1);
    let w = Tensor::random_uniform([k, n], -1.0, 1.0, 2);
    let full = run_one(backend, &Op::MatMul, &[a.clone(), w.clone()]);
    let x = a.as_f32().unwrap();
    for rows in [(0, 1), (5, 17), (36, 37)] {
        let part =
            Tensor::from_f32([rows.1 - rows.0, k], x[rows.0 * k..rows.1 * k].to_vec()).unwrap();
        let got = run_one(backend, &Op::MatMul, &[part, w.clone()]);
        let want = Tensor::from_f32(
            [rows.1 - rows.0, n],
            full.as_f32().unwrap()[rows.0 * n..rows.1 * n].to_vec(),
        )
        .unwrap();
        same_bits(&got, &want).unwrap_or_else(|e| panic!("{name}: matmul rows {rows:?}: {e}"));
    }
    // Column blocks of W give the same columns of the product.
    for cols in [(0, 1), (32, 100), (128, 129)] {
        let nb = cols.1 - cols.0;
        let wv = w.as_f32().unwrap();
        let block: Vec<f32> = (0..k)
            .flat_map(|r| wv[r * n + cols.0..r * n + cols.1].to_vec())
            .collect();
        let got = run_one(
            backend,
            &Op::MatMul,
            &[a.clone(), Tensor::from_f32([k, nb], block).unwrap()],
        );
        let fv = full.as_f32().unwrap();
        let want: Vec<f32> = (0..m)
            .flat_map(|r| fv[r * n + cols.0..r * n + cols.1].to_vec())
            .collect();
        same_bits(&got, &Tensor::from_f32([m, nb], want).unwrap())
            .unwrap_or_else(|e| panic!("{name}: matmul cols {cols:?}: {e}"));
    }
    // Batched matmul: each batch item equals the unbatched product.
    let batch = Tensor::random_uniform([3, m, k], -1.0, 1.0, 3);
    let full = run_one(backend, &Op::MatMul, &[batch.clone(), w.clone()]);
    for z in 0..3 {
        let item = Tensor::from_f32(
            [m, k],
            batch.as_f32().unwrap()[z * m * k..(z + 1) * m * k].to_vec(),
        )
        .unwrap();
        let got = run_one(backend, &Op::MatMul, &[item, w.clone()]);
        let want = Tensor::from_f32(
            [m, n],
            full.as_f32().unwrap()[z * m * n..(z + 1) * m * n].to_vec(),
        )
        .unwrap();
        same_bits(&got, &want).unwrap_or_else(|e| panic!("{name}: batched matmul item {z}: {e}"));
    }
    // Row-wise reductions and softmax.
    for op in [
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![1],
            keepdims: false,
        },
        Op::Softmax { axis: 1 },
        Op::LayerNorm { eps: 1e-5 },
    ] {
        let x = Tensor::random_uniform([9, 301], -1.0, 1.0, 4);
        let extra: Vec<Tensor> = if matches!(op, Op::LayerNorm { .. }) {
            vec![Tensor::full([301], 1.0), Tensor::full([301], 0.0)]
        } else {
            vec![]
        };
        let all = run_one(backend, &op, &[vec![x.clone()], extra.clone()].concat());
        let row =
            Tensor::from_f32([1, 301], x.as_f32().unwrap()[4 * 301..5 * 301].to_vec()).unwrap();
        let one = run_one(backend, &op, &[vec![row], extra].concat());
        let per_row = all.numel() / 9;
        assert_eq!(
            one.words(),
            &all.words()[4 * per_row..5 * per_row],
            "{name}: {op} row 4 differs when run alone"
        );
    }
}

#[test]
fn cpu_is_batch_invariant() {
    let cpu = CpuBackend::new();
    batch_invariant("cpu", &Backend::Cpu(cpu));
}

#[test]
fn gpu_is_batch_invariant() {
    let Some(gpu) = gpu() else { return };
    batch_invariant("gpu", &Backend::Gpu(gpu));
}

/// `softmax(relu(x @ w1 + b1) @ w2)` plus a reshape and a sum, as one program.
fn mlp_program() -> (Program, Vec<Tensor>) {
    let x = Tensor::random_uniform([70, 33], -1.0, 1.0, 10);
    let w1 = Tensor::random_uniform([33, 65], -0.5, 0.5, 11);
    let b1 = Tensor::random_uniform([65], -0.1, 0.1, 12);
    let w2 = Tensor::random_uniform([65, 10], -0.5, 0.5, 13);
    let mut p = Program::new(vec![x.meta(), w1.meta(), b1.meta(), w2.meta()]);
    let h = p.push(Op::MatMul, &[0, 1]);
    let h = p.push(Op::Binary(BinaryOp::Add), &[h, 2]);
    let h = p.push(Op::Unary(UnaryOp::Relu), &[h]);
    let flat = p.push(
        Op::Reshape {
            shape: vec![70 * 65],
        },
        &[h],
    );
    let total = p.push(
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keepdims: false,
        },
        &[flat],
    );
    let logits = p.push(Op::MatMul, &[h, 3]);
    let probs = p.push(Op::Softmax { axis: 1 }, &[logits]);
    p.outputs = vec![probs, total, h];
    (p, vec![x, w1, b1, w2])
}

/// The same program evaluated op by op on the reference.
fn reference_program(p: &Program, inputs: &[Tensor]) -> Vec<Tensor> {
    let mut values: Vec<Tensor> = inputs.to_vec();
    for node in &p.nodes {
        let args: Vec<&Tensor> = node.args.iter().map(|&a| &values[a as usize]).collect();
        let out = reference::eval(&node.op, &args).unwrap();
        values.push(out);
    }
    p.outputs
        .iter()
        .map(|&o| values[o as usize].clone())
        .collect()
}

fn programs_match(name: &str, backend: &Backend) {
    let (p, inputs) = mlp_program();
    let got = backend.run(&p, &inputs).unwrap();
    let want = reference_program(&p, &inputs);
    assert_eq!(got.len(), 3);
    let tol = corvid_kernels::Tolerance::new(1e-3, 1e-4);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        compare(g, w, tol).unwrap_or_else(|e| panic!("{name}: output {i}: {e}"));
    }
    // Same program, same bits.
    let again = backend.run(&p, &inputs).unwrap();
    for (a, b) in got.iter().zip(&again) {
        same_bits(a, b).unwrap();
    }
}

#[test]
fn cpu_runs_programs() {
    let cpu = CpuBackend::new();
    programs_match("cpu", &Backend::Cpu(cpu));
}

#[test]
fn gpu_runs_programs_on_the_device() {
    let Some(gpu) = gpu() else { return };
    programs_match("gpu", &Backend::Gpu(gpu));
}

#[test]
fn gpu_refuses_tensors_over_the_binding_limit() {
    let Some(gpu) = gpu() else { return };
    let limit = gpu.adapter().max_binding;
    let side = ((limit / 4) as f64).sqrt() as usize + 2;
    let col = Tensor::full([side, 1], 1.0);
    let p = Program::single(
        Op::BroadcastTo {
            shape: vec![side, side],
        },
        vec![col.meta()],
    );
    let e = gpu.run(&p, &[col]).unwrap_err();
    assert!(
        matches!(&e, ExecError::Program(ProgramError::TooLarge(t))
            if t.limit == Limit::TensorBytes && t.max == limit),
        "unexpected error: {e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("broadcast_to") && msg.contains(&format!("over the limit of {limit} bytes")),
        "{msg}"
    );
    // The backend still works afterwards.
    let (p, inputs) = mlp_program();
    gpu.run(&p, &inputs).unwrap();
}

#[test]
fn bad_inputs_are_clear_errors_on_both_backends() {
    let mut backends = vec![("cpu", Backend::Cpu(CpuBackend::new()))];
    if let Some(g) = gpu() {
        backends.push(("gpu", Backend::Gpu(g)));
    }
    let p = Program::single(
        Op::MatMul,
        vec![TensorMeta::f32([2, 3]), TensorMeta::f32([3, 4])],
    );
    let wrong = [Tensor::full([2, 3], 1.0), Tensor::full([4, 3], 1.0)];
    for (name, backend) in &backends {
        let e = backend.run(&p, &wrong).unwrap_err();
        assert_eq!(
            e.to_string(),
            "input 1: program expects f32[3, 4], got f32[4, 3]",
            "{name}"
        );
        let e = backend.run(&p, &wrong[..1]).unwrap_err();
        assert_eq!(e.to_string(), "program takes 2 inputs, got 1", "{name}");
        let mut bad = Program::new(vec![TensorMeta::f32([2, 3])]);
        let out = bad.push(Op::Softmax { axis: 5 }, &[0]);
        bad.outputs.push(out);
        let e = backend.run(&bad, &wrong[..1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node 0: op 'softmax(axis=5)': axis 5 is out of range for rank 2 (inputs f32[2, 3])",
            "{name}"
        );
    }
}
