//! The partitioner: partitioned evaluation equals direct evaluation (bit for bit on the CPU
//! backend, within tolerance on the GPU), plans are deterministic, tiles fit device limits, and
//! results are cached by subgraph id.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use corvid_kernels::{Backend, BackendChoice, CpuBackend, GpuBackend, Tensor as Data, Tolerance};
use corvid_sdk::{EvalError, Graph, LocalExecutor, Settings, Tensor};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cpu_executor(block: usize) -> Arc<LocalExecutor> {
    let settings = Settings {
        block,
        ..Settings::default()
    };
    Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings))
}

/// A random graph of 2-D ops whose sizes rarely divide the block size. Returns the outputs.
fn random_graph(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let dim = |r: &mut ChaCha8Rng| r.random_range(1..=70usize);
    let (m, k) = (dim(&mut r), dim(&mut r));
    let mut x = g.random(&[m, k], -1.0, 1.0, seed);
    let mut seen: Vec<Tensor> = vec![x.clone()];
    let steps = r.random_range(2..8);
    for step in 0..steps {
        let (rows, cols) = (x.shape()[0], x.shape()[1]);
        let s = seed.wrapping_mul(31).wrapping_add(step);
        x = match r.random_range(0..11) {
            0 | 1 => {
                let n = dim(&mut r);
                x.matmul(&g.random(&[cols, n], -0.5, 0.5, s)).unwrap()
            }
            2 => &x + &g.random(&[cols], -1.0, 1.0, s),
            3 => x.relu().unwrap(),
            4 => x.tanh().unwrap(),
            5 => x.softmax(1).unwrap(),
            6 => x.sum(&[1], true).unwrap(),
            7 => x
                .layer_norm(
                    &g.random(&[cols], 0.5, 1.5, s),
                    &g.random(&[cols], -0.5, 0.5, s + 1),
                    1e-5,
                )
                .unwrap(),
            8 => x.transpose().unwrap(),
            9 => match seen
                .iter()
                .find(|t| t.shape() == [rows, cols] && t.id() != x.id())
            {
                Some(other) => (&x * other).sigmoid().unwrap(),
                None => x.gelu().unwrap(),
            },
            _ => g
                .concat(&[&x, &x.square().unwrap()], r.random_range(0..2))
                .unwrap(),
        };
        seen.push(x.clone());
    }
    let side = seen[r.random_range(0..seen.len())].clone();
    vec![x, side]
}

/// The graph run as one program on the CPU backend, no partitioning.
fn direct(g: &Graph, outs: &[&Tensor]) -> Vec<Data> {
    let (program, leaves) = g.whole_program(outs).unwrap();
    let inputs: Vec<Data> = leaves.iter().map(|l| (**l).clone()).collect();
    CpuBackend::new().run(&program, &inputs).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn partitioned_equals_direct_bit_for_bit(seed in any::<u64>(), block in prop::sample::select(vec![7usize, 16, 33, 64])) {
        let g = Graph::new("prop").with_executor(cpu_executor(block));
        let outs = random_graph(&g, seed);
        let refs: Vec<&Tensor> = outs.iter().collect();
        let want = direct(&g, &refs);
        let got = g.eval(&refs).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(a.meta(), b.meta());
            let bad = a.words().iter().zip(b.words()).position(|(x, y)| x != y);
            prop_assert!(bad.is_none(), "output {} differs at {:?}\n{}", i, bad, g.plan(&refs).unwrap().describe());
        }
        // Same graph and settings, same plan.
        let again = Graph::new("prop").with_executor(cpu_executor(block));
        let outs2 = random_graph(&again, seed);
        let p1 = g.plan(&refs).unwrap();
        let p2 = again.plan(&outs2.iter().collect::<Vec<_>>()).unwrap();
        let ids = |p: &corvid_sdk::Plan| p.subgraphs.iter().map(|s| s.id).collect::<Vec<_>>();
        prop_assert_eq!(ids(&p1), ids(&p2));
    }
}

#[test]
fn blocked_matmul_is_a_grid_of_tiles() {
    let g = Graph::new("blocked").with_executor(cpu_executor(64));
    let a = g.random(&[150, 40], -1.0, 1.0, 1);
    let b = g.random(&[40, 100], -1.0, 1.0, 2);
    let bias = g.random(&[100], -1.0, 1.0, 3);
    let y = (a.matmul(&b).unwrap() + &bias).relu().unwrap();
    let plan = g.plan(&[&y]).unwrap();
    // 3 row blocks x 2 column blocks, each fused with its bias add and relu, then assembly.
    let tiles: Vec<_> = plan
        .subgraphs
        .iter()
        .filter(|s| s.ops() == "matmul, add, relu")
        .collect();
    assert_eq!(tiles.len(), 6, "{}", plan.describe());
    let flops: u64 = tiles.iter().map(|s| s.cost.flops).sum();
    assert_eq!(
        flops,
        2 * 150 * 40 * 100 + 2 * 150 * 100,
        "matmul plus add and relu"
    );
    // A tile ships only its blocks: at most 64 rows of A and 64 columns of B.
    for t in &tiles {
        assert!(t.cost.bytes_in <= ((64 * 40) + (40 * 64) + 64) * 4, "{t:?}");
        assert!(t.deps().next().is_none(), "tiles read only constants");
    }
    assert_eq!(y.eval().unwrap().shape(), &[150, 100]);
}

#[test]
fn mlp_runs_as_row_pipelines() {
    let g = Graph::new("mlp").with_executor(cpu_executor(32));
    let x = g.random(&[100, 20], -1.0, 1.0, 1);
    let h = (x.matmul(&g.random(&[20, 30], -0.5, 0.5, 2)).unwrap()
        + &g.random(&[30], -0.1, 0.1, 3))
        .relu()
        .unwrap();
    let y = h
        .matmul(&g.random(&[30, 10], -0.5, 0.5, 4))
        .unwrap()
        .softmax(1)
        .unwrap();
    let plan = g.plan(&[&y]).unwrap();
    let pipelines = plan
        .subgraphs
        .iter()
        .filter(|s| s.ops() == "matmul, add, relu, matmul, softmax")
        .count();
    assert_eq!(pipelines, 4, "one per 32-row block:\n{}", plan.describe());
}

#[test]
fn tiles_shrink_to_fit_the_device_limit() {
    let limit = 64 * 1024;
    let settings = Settings {
        block: 1024,
        max_tensor_bytes: limit,
        ..Settings::default()
    };
    let exec =
        Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings));
    let g = Graph::new("limits").with_executor(exec.clone());
    let a = g.random(&[300, 20], -1.0, 1.0, 1);
    let b = g.random(&[20, 100], -1.0, 1.0, 2);
    let line = line!() + 1;
    let c = a.matmul(&b).unwrap();
    // Row sums of the 300x100 product: 128-row tiles (51 KB) each reduce their own rows.
    let s = c.sum(&[1], false).unwrap();
    let plan = g.plan(&[&s]).unwrap();
    assert_eq!(
        plan.subgraphs.len(),
        4,
        "3 tiles and the assembly:\n{}",
        plan.describe()
    );
    for sg in &plan.subgraphs {
        assert!(
            sg.program.inputs.iter().all(|m| m.bytes() <= limit),
            "{}",
            plan.describe()
        );
    }
    assert_eq!(s.eval().unwrap().shape(), &[300]);
    // The 300x100 product itself (120 KB) cannot be assembled under a 64 KiB limit.
    let e = c.eval().unwrap_err();
    assert!(matches!(e, EvalError::Partition(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("op 'concat(axis=0)'") && msg.contains(&format!("partition.rs:{line}:")),
        "{msg}"
    );
}

#[test]
fn results_are_cached_by_subgraph_id() {
    let exec = cpu_executor(16);
    let g = Graph::new("cache").with_executor(exec.clone());
    let a = g.random(&[40, 24], -1.0, 1.0, 1);
    let b = g.random(&[24, 40], -1.0, 1.0, 2);
    let c = a.matmul(&b).unwrap().tanh().unwrap();
    let first = c.eval().unwrap();
    let cached = exec.cached();
    assert!(cached >= 9, "3x3 tiles and assembly cached, got {cached}");
    // A second graph with the same work hits the cache: nothing new is computed.
    let g2 = Graph::new("cache-again").with_executor(exec.clone());
    let c2 = g2
        .random(&[40, 24], -1.0, 1.0, 1)
        .matmul(&g2.random(&[24, 40], -1.0, 1.0, 2))
        .unwrap()
        .tanh()
        .unwrap();
    assert_eq!(c2.eval().unwrap(), first);
    assert_eq!(exec.cached(), cached);
}

#[test]
fn gpu_partitioned_matches_cpu_direct_within_tolerance() {
    let required = std::env::var("CORVID_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let gpu = match GpuBackend::new(true) {
        Ok(g) => g,
        Err(e) if required => panic!("CORVID_REQUIRE_GPU=1 but {e}"),
        Err(e) => return eprintln!("skipping: {e}"),
    };
    let settings = Settings {
        block: 24,
        ..Settings::default()
    };
    let exec = Arc::new(LocalExecutor::new(Backend::Gpu(gpu)).with_settings(settings));
    let tol = Tolerance::new(1e-3, 1e-3);
    for seed in 0..6 {
        let g = Graph::new("gpu").with_executor(exec.clone());
        let outs = random_graph(&g, seed);
        let refs: Vec<&Tensor> = outs.iter().collect();
        let want = direct(&g, &refs);
        let got = g.eval(&refs).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(a.meta(), b.meta());
            for (i, (x, y)) in a
                .as_f32()
                .unwrap()
                .iter()
                .zip(b.as_f32().unwrap())
                .enumerate()
            {
                assert!(
                    tol.accepts(*x, *y),
                    "seed {seed} index {i}: gpu {x} vs cpu {y}"
                );
            }
        }
    }
    let _ = Backend::open(BackendChoice::Cpu);
}

#[test]
fn a_small_training_step_is_a_few_subgraphs_and_its_shards_stay_apart() {
    use corvid_sdk::train::{Optimizer, Trainer};
    let w = |shape: [usize; 2], seed| {
        Graph::new("w")
            .random(&shape, -0.3, 0.3, seed)
            .eval_data()
            .unwrap()
    };
    let model = corvid_sdk::Model::new(
        "mlp",
        [
            ("w1", w([2, 64], 1)),
            ("w2", w([64, 64], 2)),
            ("w3", w([64, 3], 3)),
        ],
    );
    let t = Trainer::new("step", model, Optimizer::adam(0.01), |_, batch, w| {
        let h = batch[0].matmul(&w["w1"])?.relu()?;
        let h = h.matmul(&w["w2"])?.relu()?;
        let logp = h.matmul(&w["w3"])?.log_softmax(1)?;
        Ok(-&(&logp * &batch[1]).sum(&[0, 1], false)? / 100.0)
    })
    .with_shards(2);
    let exec: Arc<dyn corvid_sdk::Executor> = cpu_executor(1024);
    let (g, outs) = t
        .plan_step(&exec, &[w([100, 2], 4), w([100, 3], 5)])
        .unwrap();
    let plan = g.plan(&outs.iter().collect::<Vec<_>>()).unwrap();
    // Fused only where a value had one reader, a step like this (examples/train_mlp) was 90
    // subgraphs of an op or two.
    assert!(plan.subgraphs.len() <= 8, "{}", plan.describe());
    // Each shard's forward and backward pass is one subgraph of constants only, free to run
    // beside the other: data parallel.
    let shards = plan
        .subgraphs
        .iter()
        .filter(|s| {
            let ops = s.ops();
            s.deps().next().is_none() && ops.contains("log_softmax") && ops.contains("permute")
        })
        .count();
    assert_eq!(shards, 2, "{}", plan.describe());
}
