//! A 3-layer MLP forward pass on random data: `softmax(relu(relu(x W1 + b1) W2 + b2) W3 + b3)`.
//!
//! `cargo run --release --example mlp`

use std::time::Instant;

use corvid::sdk::{BuildError, Graph, Tensor};

/// The network's tensors.
#[derive(Debug)]
pub struct Mlp {
    pub x: Tensor,
    pub layers: Vec<(Tensor, Tensor)>,
    pub probs: Tensor,
}

/// Builds the forward pass of a batch through layers of the given widths (`dims[0]` inputs).
pub fn mlp(g: &Graph, batch: usize, dims: &[usize], seed: u64) -> Result<Mlp, BuildError> {
    let x = g.random(&[batch, dims[0]], -1.0, 1.0, seed);
    let mut h = x.clone();
    let mut layers = Vec::new();
    for (i, pair) in dims.windows(2).enumerate() {
        let scale = 1.0 / (pair[0] as f32).sqrt();
        let w = g.random(&[pair[0], pair[1]], -scale, scale, seed + 1 + 2 * i as u64);
        let b = g.random(&[pair[1]], -0.1, 0.1, seed + 2 + 2 * i as u64);
        h = h.matmul(&w)?.add(&b)?;
        if i + 2 < dims.len() {
            h = h.relu()?;
        }
        layers.push((w, b));
    }
    let probs = h.softmax(1)?;
    Ok(Mlp { x, layers, probs })
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let g = Graph::new("mlp");
    let net = mlp(&g, 512, &[784, 512, 256, 10], 7)?;
    let plan = g.plan(&[&net.probs])?;
    println!(
        "{} subgraphs, {:.1} MFLOP",
        plan.subgraphs.len(),
        plan.total_cost().flops as f64 / 1e6
    );
    let t = Instant::now();
    let probs = net.probs.eval()?;
    println!(
        "forward pass of {} rows in {:.1} ms",
        probs.shape()[0],
        t.elapsed().as_secs_f64() * 1e3
    );
    let classes = net.probs.argmax(1, false)?.eval_i32()?;
    println!(
        "first rows' classes: {:?}",
        &classes.as_slice().unwrap_or(&[])[..8]
    );
    println!("probs[0] = {:.4}", probs.index_axis(ndarray::Axis(0), 0));
    g.end()?;
    Ok(())
}
