//! Batch prediction with `map`: a small classifier's weights written to a `.safetensors` file,
//! loaded as a [`Model`] (named by its content hash), and a [`Computation`] run over 1,000
//! inputs on a local swarm of embedded workers; every result verified, in input order, checked
//! here against local evaluation; the summed job summary shows what crossed the network.
//! Then the same map with 50 inputs joined per job (`with_batch`), timed in the same run.
//!
//! `cargo run --release --example batch_predict [-- inputs]`

use std::sync::Arc;
use std::time::Instant;

use corvid::kernels::Tensor as Data;
use corvid::node::{Client, JobSummary};
use corvid::sdk::{Computation, Graph, Model};

fn weights(seed: u64) -> Vec<(&'static str, Data)> {
    let g = Graph::new("weights");
    let w = |shape: &[usize], k: u64| {
        let scale = 1.0 / (shape[0] as f32).sqrt();
        g.random(shape, -scale, scale, seed + k)
            .eval_data()
            .expect("a random tensor evaluates")
    };
    vec![
        ("w1", w(&[64, 256], 1)),
        ("b1", w(&[256], 2)),
        ("w2", w(&[256, 10], 3)),
        ("b2", w(&[10], 4)),
    ]
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("classifier.safetensors");
    corvid::sdk::model::save_safetensors(&path, weights(7).iter().map(|(k, d)| (*k, d)))?;
    let model = Model::load(&path)?;
    println!(
        "model {} from {}: {} tensors, {} bytes, id {}",
        model.name(),
        path.display(),
        model.len(),
        model.bytes(),
        model.id().short()
    );

    let classify = Computation::new("classify", |_, x, w| {
        let h = x[0].matmul(&w["w1"])?.add(&w["b1"])?.relu()?;
        Ok(vec![h.matmul(&w["w2"])?.add(&w["b2"])?.softmax(1)?])
    })
    .with_model(model.clone());
    let inputs: Vec<Vec<Data>> = (0..n)
        .map(|i| {
            let g = Graph::new("input");
            vec![
                g.random(&[1, 64], -1.0, 1.0, 1000 + i as u64)
                    .eval_data()
                    .expect("random input"),
            ]
        })
        .collect();

    let client = Client::local(2)?;
    let t = Instant::now();
    let mut summaries = Vec::new();
    let mut results = Vec::with_capacity(n);
    for (i, outcome, state) in classify.jobs(client.executor(), inputs.clone(), 32, true) {
        let out = outcome.map_err(|e| anyhow::anyhow!("input {i}: {e}"))?;
        results.push(out);
        summaries.extend(state.and_then(|s| JobSummary::of_state(&s)));
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{n} inputs in {secs:.2} s ({:.0} per second), in input order",
        n as f64 / secs
    );

    // The same computation on this machine, for comparison.
    let local = corvid::sdk::LocalExecutor::new(corvid::kernels::Backend::Cpu(
        corvid::kernels::CpuBackend::new(),
    ));
    let mut worst = 0f32;
    for (i, want) in classify.map(Arc::new(local), inputs.clone(), 8).enumerate() {
        let (got, want) = (results[i][0].as_f32()?, want?[0].as_f32()?.to_vec());
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("largest difference from local evaluation: {worst:e}");
    anyhow::ensure!(worst < 1e-4, "results differ from local evaluation");

    let mut total = JobSummary::total(&summaries);
    // Busy workers turn tasks away at times (the window keeps more in flight than slots):
    // counted, not listed.
    let redispatched = std::mem::take(&mut total.redispatches).len();
    let sent: u64 = total.places.values().map(|p| p.bytes_in).sum();
    let workers = total
        .places
        .keys()
        .filter(|p| **p != corvid::sdk::sched::Place::Local)
        .count();
    println!(
        "{} jobs, {redispatched} tasks sent again; {sent} bytes sent to workers in all: inputs {} \
         and the model ({} bytes) once per worker would be {}\n{total}",
        summaries.len(),
        n * 64 * 4,
        model.bytes(),
        n as u64 * 64 * 4 + workers as u64 * model.bytes()
    );

    // Row-wise, so 50 inputs can share a job: one round trip for 50 rows.
    let batched = classify.clone().with_batch(50);
    let t = Instant::now();
    let mut worst = 0f32;
    for (i, outcome) in batched.map(client.executor(), inputs, 4).enumerate() {
        let got = outcome.map_err(|e| anyhow::anyhow!("input {i}: {e}"))?;
        anyhow::ensure!(got[0].shape() == [1, 10], "input {i}: {}", got[0].meta());
        for (a, b) in got[0].as_f32()?.iter().zip(results[i][0].as_f32()?) {
            worst = worst.max((a - b).abs());
        }
    }
    let batched_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        worst < 1e-5,
        "batched results differ from one job per input"
    );
    println!(
        "with_batch(50): {n} inputs in {batched_secs:.3} s, {:.1}x the speed of one job per \
         input; largest difference from those results: {worst:e}",
        secs / batched_secs
    );
    Ok(())
}
