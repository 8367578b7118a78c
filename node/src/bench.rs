//! The start-up benchmark: matmul GFLOP/s and elementwise-add GB/s on the node's backend, sized
//! to fit a time budget (2 s by default), plus the memory the node can offer.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use corvid_kernels::{
    Backend, BackendChoice, BackendKind, BinaryOp, DeterminismClass, ExecError, Op, Program, Tensor,
};
use serde::Serialize;

/// Largest matmul side tried.
const MAX_MATMUL_N: usize = 2048;
/// Largest elementwise length tried (64 MiB per operand).
const MAX_ELEMENTWISE_LEN: usize = 1 << 24;

/// Benchmark results, as advertised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    pub backend: BackendKind,
    /// [`Backend::describe`].
    pub adapter: String,
    pub class: DeterminismClass,
    /// Best matmul throughput, and the square size that reached it.
    pub matmul_gflops: f64,
    pub matmul_n: usize,
    /// Elementwise add throughput (two reads and one write per element), and the length used.
    pub elementwise_gbps: f64,
    pub elementwise_len: usize,
    /// Memory available to work, bytes.
    pub memory_bytes: u64,
    pub max_tensor_bytes: u64,
    /// Wall time of the whole benchmark.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
}

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark {what} failed: {source}")]
    Exec {
        what: String,
        #[source]
        source: ExecError,
    },
}

/// [`run`], once per process for each backend choice and budget: the nodes of a local swarm
/// share one machine, so the first node's score stands for the others, which start without
/// measuring it again (a cold start of four nodes spends one budget, not four).
pub fn run_once(
    backend: &Backend,
    choice: BackendChoice,
    budget: Duration,
    max_memory: Option<u64>,
) -> Result<BenchReport, BenchError> {
    type Key = (BackendChoice, Duration, Option<u64>);
    static SCORES: Mutex<Vec<(Key, BenchReport)>> = Mutex::new(Vec::new());
    let key = (choice, budget, max_memory);
    // Held while measuring: nodes starting together wait for one measurement rather than
    // each measure a machine the others are loading.
    let mut scores = SCORES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = scores
        .iter()
        .find(|(k, r)| *k == key && r.adapter == backend.describe())
    {
        return Ok(r.clone());
    }
    let report = run(backend, budget, max_memory)?;
    scores.push((key, report.clone()));
    Ok(report)
}

/// Runs the benchmark on `backend` within about `budget`. Blocking: call from
/// `spawn_blocking`. The matmul gets 60 % of the budget, elementwise the rest; each doubles its
/// size while the next run is predicted to fit.
pub fn run(
    backend: &Backend,
    budget: Duration,
    max_memory: Option<u64>,
) -> Result<BenchReport, BenchError> {
    let start = Instant::now();
    let matmul_end = start + budget.mul_f64(0.6);
    let end = start + budget;

    let (mut matmul_gflops, mut matmul_n) = (0.0f64, 0);
    let mut n = 64;
    loop {
        let t = time_matmul(backend, n)?;
        let gflops = 2.0 * (n as f64).powi(3) / t.as_secs_f64().max(1e-9) / 1e9;
        if gflops > matmul_gflops {
            (matmul_gflops, matmul_n) = (gflops, n);
        }
        // A run 8x longer plus input generation must fit.
        if n >= MAX_MATMUL_N || Instant::now() + t * 10 > matmul_end {
            break;
        }
        n *= 2;
    }

    let (mut elementwise_gbps, mut elementwise_len) = (0.0f64, 0);
    let mut len = 1 << 16;
    loop {
        let t = time_add(backend, len)?;
        let gbps = 12.0 * len as f64 / t.as_secs_f64().max(1e-9) / 1e9;
        if gbps > elementwise_gbps {
            (elementwise_gbps, elementwise_len) = (gbps, len);
        }
        if len >= MAX_ELEMENTWISE_LEN || Instant::now() + t * 5 > end {
            break;
        }
        len *= 2;
    }

    let available = available_memory();
    Ok(BenchReport {
        backend: backend.class().backend,
        adapter: backend.describe(),
        class: backend.class().clone(),
        matmul_gflops,
        matmul_n,
        elementwise_gbps,
        elementwise_len,
        memory_bytes: max_memory.map_or(available / 2, |m| m.min(available)),
        max_tensor_bytes: backend.max_tensor_bytes(),
        took: start.elapsed(),
    })
}

fn time_matmul(backend: &Backend, n: usize) -> Result<Duration, BenchError> {
    let a = Tensor::random_uniform([n, n], -1.0, 1.0, 1);
    let b = Tensor::random_uniform([n, n], -1.0, 1.0, 2);
    let program = Program::single(Op::MatMul, vec![a.meta(), b.meta()]);
    time(backend, &program, &[a, b], format!("matmul {n}x{n}"))
}

fn time_add(backend: &Backend, len: usize) -> Result<Duration, BenchError> {
    let a = Tensor::random_uniform([len], -1.0, 1.0, 3);
    let b = Tensor::random_uniform([len], -1.0, 1.0, 4);
    let program = Program::single(Op::Binary(BinaryOp::Add), vec![a.meta(), b.meta()]);
    time(backend, &program, &[a, b], format!("add of {len} elements"))
}

/// Best of two runs (the first warms caches, pipelines and thread pools).
fn time(
    backend: &Backend,
    program: &Program,
    inputs: &[Tensor],
    what: String,
) -> Result<Duration, BenchError> {
    let mut best = Duration::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        let out = backend
            .run(program, inputs)
            .map_err(|source| BenchError::Exec {
                what: what.clone(),
                source,
            })?;
        best = best.min(t.elapsed());
        drop(std::hint::black_box(out));
    }
    Ok(best)
}

/// Memory the OS reports as available, bytes.
pub fn available_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

#[cfg(test)]
mod tests {
    use corvid_kernels::BackendChoice;

    use super::*;

    #[test]
    fn cpu_bench_fits_its_budget_and_reports_positive_rates() {
        let backend = Backend::open(BackendChoice::Cpu).unwrap();
        let r = run(&backend, Duration::from_millis(200), Some(1 << 20)).unwrap();
        assert!(r.matmul_gflops > 0.0 && r.elementwise_gbps > 0.0, "{r:?}");
        assert!(r.matmul_n >= 64 && r.elementwise_len >= 1 << 16);
        assert!(r.memory_bytes <= 1 << 20);
        assert_eq!(r.backend, BackendKind::Cpu);
    }
}
