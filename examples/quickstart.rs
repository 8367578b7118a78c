//! RavOp's quickstart in Corvid, on the best local backend (a hardware GPU if there is one,
//! else the CPU; `CORVID_BACKEND=gpu|cpu` forces either).
//!
//! `cargo run --example quickstart`

use std::sync::Arc;

use corvid::kernels::Backend;
use corvid::sdk::{Graph, LocalExecutor};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let backend = Backend::from_env()?;
    println!("backend: {}", backend.describe());
    println!("determinism class: {}", backend.class());
    let executor = Arc::new(LocalExecutor::new(backend));

    let g = Graph::new("quickstart").with_executor(executor);
    let a = g.t(&[1.0, 2.0, 3.0]);
    let b = g.t(&[5.0, 22.0, 7.0]);
    let c = &a + &b;
    println!("a + b = {}", c.eval()?);

    // A small network: softmax(relu(x @ w1 + b1) @ w2), and its mean hidden activation.
    let x = g.random(&[4, 8], -1.0, 1.0, 1);
    let h =
        (x.matmul(&g.random(&[8, 16], -0.5, 0.5, 2))? + &g.random(&[16], -0.1, 0.1, 3)).relu()?;
    let probs = h.matmul(&g.random(&[16, 3], -0.5, 0.5, 4))?.softmax(1)?;
    let mean = h.mean(&[0, 1], false)?;
    let out = g.eval(&[&probs, &mean])?;
    println!("probs =\n{}", out[0].to_array_f32()?);
    println!("mean hidden activation = {:.6}", out[1].as_f32()?[0]);
    println!("probs id = {}", probs.id());

    // A mistake is reported at the line that made it, naming the op and the shapes.
    if let Err(e) = a.matmul(&x) {
        println!("as expected: {e}");
    }
    match g.end() {
        Ok(()) => println!("graph '{}' finished: no failed ops", g.name()),
        Err(report) => print!("{report}"),
    }
    Ok(())
}
