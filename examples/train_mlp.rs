//! Trains an MLP classifier on a swarm of 2 embedded workers: three interleaved spirals (made
//! here, 900 points), softmax cross-entropy, Adam; every step (forward, backward, update) is one
//! verified job with the batch split into 2 gradient branches summed in a fixed order. Prints
//! the loss per epoch and the test accuracy, then checks the weights are bit-identical to the
//! same training run on this machine.
//!
//! `cargo run --release --example train_mlp`

use std::sync::Arc;
use std::time::Instant;

use corvid::kernels::{Backend, CpuBackend, Tensor as Data};
use corvid::node::Client;
use corvid::sdk::train::{Optimizer, Trainer};
use corvid::sdk::{Executor, LocalExecutor, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLASSES: usize = 3;
const HIDDEN: usize = 64;

/// Points of `CLASSES` spirals with noise, and their one-hot labels.
fn spirals(n: usize, seed: u64) -> (Vec<[f32; 2]>, Vec<usize>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let class = i % CLASSES;
            let t = r.random_range(0.0..1.0f32);
            let angle = t * 4.0
                + class as f32 * 2.0 * std::f32::consts::PI / CLASSES as f32
                + r.random_range(-0.2..0.2);
            ([t * angle.cos(), t * angle.sin()], class)
        })
        .unzip()
}

fn tensors(points: &[[f32; 2]], labels: &[usize]) -> anyhow::Result<(Data, Data)> {
    let x = points.iter().flatten().copied().collect();
    let mut y = vec![0.0; labels.len() * CLASSES];
    for (i, &c) in labels.iter().enumerate() {
        y[i * CLASSES + c] = 1.0;
    }
    Ok((
        Data::from_f32([points.len(), 2], x)?,
        Data::from_f32([labels.len(), CLASSES], y)?,
    ))
}

fn init(seed: u64) -> anyhow::Result<Model> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut glorot = |i: usize, o: usize| {
        let limit = (6.0 / (i + o) as f32).sqrt();
        let v = (0..i * o).map(|_| r.random_range(-limit..limit)).collect();
        Data::from_f32([i, o], v)
    };
    Ok(Model::new(
        "mlp",
        [
            ("w1", glorot(2, HIDDEN)?),
            ("b1", Data::full([1, HIDDEN], 0.0)),
            ("w2", glorot(HIDDEN, HIDDEN)?),
            ("b2", Data::full([1, HIDDEN], 0.0)),
            ("w3", glorot(HIDDEN, CLASSES)?),
            ("b3", Data::full([1, CLASSES], 0.0)),
        ],
    ))
}

fn trainer() -> anyhow::Result<Trainer> {
    Ok(
        Trainer::new("spirals", init(7)?, Optimizer::adam(0.02), |_, batch, w| {
            let (x, y) = (&batch[0], &batch[1]);
            let h = x.matmul(&w["w1"])?.add(&w["b1"])?.relu()?;
            let h = h.matmul(&w["w2"])?.add(&w["b2"])?.relu()?;
            let logp = h.matmul(&w["w3"])?.add(&w["b3"])?.log_softmax(1)?;
            let rows = x.shape()[0] as f32;
            Ok(-&(&logp * y).sum(&[0, 1], false)? / rows)
        })
        .with_shards(2),
    )
}

/// The fraction of `points` the model puts in their class (computed here, in plain Rust).
fn accuracy(m: &Model, points: &[[f32; 2]], labels: &[usize]) -> anyhow::Result<f32> {
    let w = |n: &str| -> anyhow::Result<&[f32]> { Ok(m.get(n).expect("a parameter").as_f32()?) };
    let (w1, b1, w2, b2, w3, b3) = (w("w1")?, w("b1")?, w("w2")?, w("b2")?, w("w3")?, w("b3")?);
    let layer = |x: &[f32], w: &[f32], b: &[f32], relu: bool| -> Vec<f32> {
        let o = b.len();
        (0..o)
            .map(|j| {
                let v = b[j]
                    + x.iter()
                        .enumerate()
                        .map(|(i, xi)| xi * w[i * o + j])
                        .sum::<f32>();
                if relu { v.max(0.0) } else { v }
            })
            .collect()
    };
    let right = points
        .iter()
        .zip(labels)
        .filter(|&(p, &c)| {
            let h = layer(&p[..], w1, b1, true);
            let h = layer(&h, w2, b2, true);
            let out = layer(&h, w3, b3, false);
            let best = (0..CLASSES)
                .max_by(|&a, &b| out[a].total_cmp(&out[b]))
                .unwrap_or(0);
            best == c
        })
        .count();
    Ok(right as f32 / points.len() as f32)
}

/// Bytes each step sent to workers and received from them, summed over the steps.
#[derive(Default)]
struct Moved {
    steps: u64,
    to_workers: u64,
    from_workers: u64,
    resent: u64,
}

fn train(
    executor: &Arc<dyn Executor>,
    (x, y): &(Data, Data),
    test: (&[[f32; 2]], &[usize]),
    client: Option<&Client>,
    moved: &mut Moved,
) -> anyhow::Result<Model> {
    let print = client.is_some();
    let mut t = trainer()?;
    let (rows, batch) = (x.shape()[0], 100);
    for epoch in 1..=30 {
        let started = Instant::now();
        let mut losses = Vec::new();
        for lo in (0..rows).step_by(batch) {
            let hi = (lo + batch).min(rows);
            let part = |d: &Data, width: usize| {
                Data::from_f32(
                    [hi - lo, width],
                    d.as_f32()?[lo * width..hi * width].to_vec(),
                )
            };
            losses.push(t.step(executor, &[part(x, 2)?, part(y, CLASSES)?])?.loss);
            if let Some(s) = client.and_then(Client::last_summary) {
                moved.steps += 1;
                for (place, p) in &s.places {
                    if matches!(place, corvid::sdk::sched::Place::Peer(_)) {
                        moved.to_workers += p.bytes_in;
                        moved.from_workers += p.bytes_out;
                        moved.resent += p.resent;
                    }
                }
            }
        }
        if print && (epoch % 5 == 0 || epoch == 1) {
            println!(
                "epoch {epoch:2}: loss {:.4}, test accuracy {:.3}, {:.0} ms per step",
                losses.iter().sum::<f32>() / losses.len() as f32,
                accuracy(t.model(), test.0, test.1)?,
                started.elapsed().as_secs_f64() * 1e3 / losses.len() as f64
            );
        }
    }
    Ok(t.model().clone())
}

fn main() -> anyhow::Result<()> {
    let (train_points, train_labels) = spirals(900, 1);
    let (test_points, test_labels) = spirals(300, 2);
    let data = tensors(&train_points, &train_labels)?;
    let test = (&test_points[..], &test_labels[..]);

    let client = Client::local(2)?;
    let mut moved = Moved::default();
    let swarm = train(&client.executor(), &data, test, Some(&client), &mut moved)?;
    let model_bytes = swarm.bytes();
    let batch_bytes = 100 * (2 + CLASSES) as u64 * 4;
    println!(
        "per step, on average: {:.0} bytes to workers ({:.0} of them sent again after a \
         Missing), {:.0} from them; the model is {model_bytes} bytes (Adam's state twice that), \
         a batch {batch_bytes}",
        moved.to_workers as f64 / moved.steps as f64,
        moved.resent as f64 / moved.steps as f64,
        moved.from_workers as f64 / moved.steps as f64,
    );
    println!(
        "test accuracy {:.3} after 30 epochs on the swarm; the last step:\n{}",
        accuracy(&swarm, test.0, test.1)?,
        client
            .last_summary()
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    let local: Arc<dyn Executor> = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
    let here = train(&local, &data, test, None, &mut Moved::default())?;
    anyhow::ensure!(
        here.id() == swarm.id(),
        "the swarm's weights differ from this machine's"
    );
    println!(
        "weights bit-identical to the same run on this machine (model {})",
        swarm.id().short()
    );
    Ok(())
}
