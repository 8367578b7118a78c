//! Runs a small graph on the auto-selected backend (a hardware GPU if there is one, else the
//! CPU; `CORVID_BACKEND=gpu|cpu` forces either) and prints the adapter and the results.
//!
//! `cargo run --example quickstart`

use corvid::kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid::kernels::{Backend, Op, Program, Tensor};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let backend = Backend::from_env()?;
    println!("backend: {}", backend.describe());
    println!("determinism class: {}", backend.class());

    // RavOp's quickstart: c = a + b.
    let a = Tensor::from_f32([3], vec![1.0, 2.0, 3.0])?;
    let b = Tensor::from_f32([3], vec![5.0, 22.0, 7.0])?;
    let add = Program::single(Op::Binary(BinaryOp::Add), vec![a.meta(), b.meta()]);
    let c = backend.run(&add, &[a, b])?;
    println!("a + b = {:?}", c[0].as_f32()?);

    // A two-layer MLP forward pass as one program, intermediates kept on the device:
    // probs = softmax(relu(x @ w1 + b1) @ w2), plus the mean activation.
    let x = Tensor::random_uniform([4, 8], -1.0, 1.0, 1);
    let w1 = Tensor::random_uniform([8, 16], -0.5, 0.5, 2);
    let b1 = Tensor::random_uniform([16], -0.1, 0.1, 3);
    let w2 = Tensor::random_uniform([16, 3], -0.5, 0.5, 4);
    let mut p = Program::new(vec![x.meta(), w1.meta(), b1.meta(), w2.meta()]);
    let h = p.push(Op::MatMul, &[0, 1]);
    let h = p.push(Op::Binary(BinaryOp::Add), &[h, 2]);
    let h = p.push(Op::Unary(UnaryOp::Relu), &[h]);
    let mean = p.push(
        Op::Reduce {
            op: ReduceOp::Mean,
            axes: vec![0, 1],
            keepdims: false,
        },
        &[h],
    );
    let logits = p.push(Op::MatMul, &[h, 3]);
    let probs = p.push(Op::Softmax { axis: 1 }, &[logits]);
    p.outputs = vec![probs, mean];
    let out = backend.run(&p, &[x, w1, b1, w2])?;
    println!("mean hidden activation = {:.6}", out[1].as_f32()?[0]);
    for (i, row) in out[0].as_f32()?.chunks(3).enumerate() {
        println!(
            "probs[{i}] = {row:.4?}  (sum {:.6})",
            row.iter().sum::<f32>()
        );
    }
    println!("output id = {}", out[0].content_id());
    Ok(())
}
