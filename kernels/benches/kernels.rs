//! Matmul GFLOP/s and elementwise GB/s on the CPU and GPU backends.
//!
//! `cargo bench -p corvid-kernels` — criterion's `elem/s` on the matmul groups is FLOP/s
//! (2·n³ per product). `CORVID_BENCH_QUICK=1` keeps to the small sizes.
//! GPU figures include upload and readback: what a node pays per task.

use std::hint::black_box;
use std::time::Duration;

use corvid_kernels::op::BinaryOp;
use corvid_kernels::{CpuBackend, GpuBackend, Op, Program, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn quick() -> bool {
    std::env::var("CORVID_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn sizes(all: &[usize]) -> Vec<usize> {
    if quick() {
        all.iter().copied().filter(|&n| n <= 1024).collect()
    } else {
        all.to_vec()
    }
}

/// A rayon pool of one thread, for single-core figures.
fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool")
}

fn square_pair(n: usize) -> [Tensor; 2] {
    [
        Tensor::random_uniform([n, n], -1.0, 1.0, 1),
        Tensor::random_uniform([n, n], -1.0, 1.0, 2),
    ]
}

fn matmul_cpu(c: &mut Criterion) {
    let cpu = CpuBackend::new();
    let one = one_thread();
    let mut g = c.benchmark_group("matmul_cpu_gemm");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for n in sizes(&[512, 1024, 2048, 4096]) {
        let [a, b] = square_pair(n);
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::new("1thread", n), &n, |bch, _| {
            one.install(|| {
                bch.iter(|| black_box(cpu.eval(&Op::MatMul, &[&a, &b]).expect("matmul")))
            })
        });
        g.bench_with_input(BenchmarkId::new("all_threads", n), &n, |bch, _| {
            bch.iter(|| black_box(cpu.eval(&Op::MatMul, &[&a, &b]).expect("matmul")))
        });
    }
    g.finish();

    // The alternative we measured gemm against: ndarray's matrixmultiply.
    let mut g = c.benchmark_group("matmul_cpu_ndarray_matrixmultiply");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for n in sizes(&[512, 1024, 2048, 4096]) {
        let [a, b] = square_pair(n);
        let a = a
            .to_array_f32()
            .expect("f32")
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-d");
        let b = b
            .to_array_f32()
            .expect("f32")
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-d");
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::new("1thread", n), &n, |bch, _| {
            one.install(|| bch.iter(|| black_box(a.dot(&b))))
        });
    }
    g.finish();
}

fn matmul_gpu(c: &mut Criterion) {
    let gpu = match GpuBackend::new(true) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no gpu backend, skipping gpu benches: {e}");
            return;
        }
    };
    eprintln!("gpu adapter: {:?}", gpu.adapter());
    let mut g = c.benchmark_group("matmul_gpu");
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    for n in [512, 1024] {
        let inputs = square_pair(n);
        let p = Program::single(Op::MatMul, inputs.iter().map(|t| t.meta()).collect());
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bch, _| {
            bch.iter(|| black_box(gpu.run(&p, &inputs).expect("matmul")))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("elementwise_gpu");
    g.sample_size(10);
    let n = 1 << 22;
    let a = Tensor::random_uniform([n], -1.0, 1.0, 3);
    let b = Tensor::random_uniform([n], -1.0, 1.0, 4);
    let p = Program::single(Op::Binary(BinaryOp::Add), vec![a.meta(), b.meta()]);
    let inputs = [a, b];
    g.throughput(Throughput::Bytes(3 * 4 * n as u64));
    g.bench_function("add_4M", |bch| {
        bch.iter(|| black_box(gpu.run(&p, &inputs).expect("add")))
    });
    g.finish();
}

fn elementwise_cpu(c: &mut Criterion) {
    let cpu = CpuBackend::new();
    let mut g = c.benchmark_group("elementwise_cpu");
    g.sample_size(20);
    let n = 1 << 24;
    let a = Tensor::random_uniform([n], -1.0, 1.0, 3);
    let b = Tensor::random_uniform([n], -1.0, 1.0, 4);
    // Bytes read and written: two inputs and one output.
    g.throughput(Throughput::Bytes(3 * 4 * n as u64));
    g.bench_function("add_16M", |bch| {
        bch.iter(|| {
            black_box(
                cpu.eval(&Op::Binary(BinaryOp::Add), &[&a, &b])
                    .expect("add"),
            )
        })
    });
    let row = Tensor::random_uniform([4096], -1.0, 1.0, 5);
    let m = Tensor::random_uniform([n / 4096, 4096], -1.0, 1.0, 6);
    g.bench_function("bias_add_16M", |bch| {
        bch.iter(|| {
            black_box(
                cpu.eval(&Op::Binary(BinaryOp::Add), &[&m, &row])
                    .expect("add"),
            )
        })
    });
    g.throughput(Throughput::Bytes(2 * 4 * n as u64));
    g.bench_function("gelu_16M", |bch| {
        bch.iter(|| {
            black_box(
                cpu.eval(&Op::Unary(corvid_kernels::UnaryOp::Gelu), &[&a])
                    .expect("gelu"),
            )
        })
    });
    g.finish();
}

/// Freivalds' check of one 2048×4096 @ 4096×2048 tile (what the swarm's 4096² matmul job
/// checks per result): the weight-side projection, shared by tiles with the same `b`, and the
/// per-result check. Compare with `matmul_cpu_gemm` for the tile's own cost (34 GFLOP).
fn freivalds(c: &mut Criterion) {
    use corvid_kernels::verify::Projection;
    use rand::SeedableRng;
    let (m, k, n) = if quick() {
        (512, 1024, 512)
    } else {
        (2048, 4096, 2048)
    };
    let a = Tensor::random_uniform([m, k], -1.0, 1.0, 1);
    let b = Tensor::random_uniform([k, n], -1.0, 1.0, 2);
    let prod = CpuBackend::new()
        .eval(&Op::MatMul, &[&a, &b])
        .expect("matmul");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let one = one_thread();
    let mut g = c.benchmark_group("freivalds");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let tile = format!("{m}x{k}x{n}");
    g.bench_function(BenchmarkId::new("projection_1thread", &tile), |bch| {
        one.install(|| bch.iter(|| black_box(Projection::new(&b, &mut rng).expect("projection"))))
    });
    let p = Projection::new(&b, &mut rng).expect("projection");
    g.bench_function(BenchmarkId::new("check_1thread", &tile), |bch| {
        one.install(|| bch.iter(|| black_box(p.check(&a, &prod).expect("check"))))
    });
    g.bench_function(BenchmarkId::new("check_all_threads", &tile), |bch| {
        bch.iter(|| black_box(p.check(&a, &prod).expect("check")))
    });
    g.finish();
}

criterion_group!(benches, matmul_cpu, elementwise_cpu, matmul_gpu, freivalds);
criterion_main!(benches);
