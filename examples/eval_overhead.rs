//! The cost of one small evaluation from Rust: a 4×4 constant, two elementwise ops, `eval`,
//! on the CPU backend, `n` times with different values (nothing cached). Its Python twin,
//! `python/examples/overhead.py`, runs the same loop; the difference is the Python layer's
//! cost per eval.
//!
//! `cargo run --release --example eval_overhead [-- n]`

use std::time::Instant;

use corvid::sdk::Graph;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let g = Graph::new("overhead");
    let mut sum = 0.0f32;
    let t = Instant::now();
    for i in 0..n {
        let x = g.from_vec(&[4, 4], (0..16).map(|k| (i * 16 + k) as f32).collect())?;
        let y = x.mul(&g.scalar(2.0))?.relu()?;
        sum += y.eval()?[[0, 1]];
    }
    let per = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "rust: {:.1} us per small eval ({n} evals, checksum {sum})",
        per * 1e6
    );
    Ok(())
}
