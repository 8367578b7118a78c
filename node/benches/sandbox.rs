//! What running a task in the executor process costs over running it in the node: a tile of a
//! 4096² matmul (2048×4096 by 4096×2048, inputs already in shared memory, as a worker receives
//! them) and a tiny task. Alternating pairs on one machine, medians and the median ratio;
//! printed, not asserted. `cargo bench -p corvid-node --bench sandbox`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use corvid_kernels::backend::Guard;
use corvid_kernels::{Backend, BackendChoice, Budget, Cancel, Op, Program, Tensor};
use corvid_node::sandbox::{Sandbox, SandboxConfig, shm};

fn shared(t: Tensor) -> Arc<Tensor> {
    let meta = t.meta();
    Arc::new(shm::tensor(&meta, shm::copy(&t).unwrap()).unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let (sandbox, ready) = Sandbox::start(SandboxConfig {
        program: env!("CARGO_BIN_EXE_corvid").into(),
        backend: BackendChoice::Cpu,
        address_space: Some(16 << 30),
        cpu_seconds: 3600,
        forbid: Vec::new(),
        threads: 1,
        cpus: None,
        #[cfg(feature = "fault-injection")]
        crash_every: 0,
    })
    .unwrap();
    println!(
        "executor: {} (landlock {}, seccomp {})",
        ready.backend, ready.confinement.landlock, ready.confinement.seccomp
    );
    let backend = Backend::open(BackendChoice::Cpu).unwrap();
    let guard = Guard::new(Budget::unlimited(), Cancel::none());
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };

    // One tile of a 4096² product.
    let a = shared(Tensor::random_uniform([2048, 4096], -1.0, 1.0, 1));
    let b = shared(Tensor::random_uniform([4096, 2048], -1.0, 1.0, 2));
    let p = Program::single(Op::MatMul, vec![a.meta(), b.meta()]);
    let inputs = [a, b];
    let local = || {
        backend.run_traced(&p, &inputs, &guard).unwrap();
    };
    let remote = || {
        sandbox.run_traced(&p, &inputs, &guard).unwrap();
    };
    local();
    remote();
    let (mut l, mut r, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        let (x, y) = (time(&local), time(&remote));
        l.push(x);
        r.push(y);
        ratio.push(y / x);
    }
    println!(
        "4096² matmul tile (2048x4096 @ 4096x2048, traced): in process {:.1} ms, in the executor {:.1} ms; \
         median ratio {:.3} ({:+.1} %)",
        median(l) * 1e3,
        median(r) * 1e3,
        median(ratio.clone()),
        (median(ratio) - 1.0) * 100.0
    );

    // A tiny task: 8×8 + 8×8.
    let x = Arc::new(Tensor::random_uniform([8, 8], -1.0, 1.0, 3));
    let p = Program::single(
        Op::Binary(corvid_kernels::BinaryOp::Add),
        vec![x.meta(), x.meta()],
    );
    let inputs = [x.clone(), x];
    let n = 500;
    let batch = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() / n as f64
    };
    let local = || {
        backend.run_traced(&p, &inputs, &guard).unwrap();
    };
    let remote = || {
        sandbox.run_traced(&p, &inputs, &guard).unwrap();
    };
    batch(&local);
    batch(&remote);
    let (mut l, mut r) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        l.push(batch(&local));
        r.push(batch(&remote));
    }
    let (l, r) = (median(l), median(r));
    // The floor: a program with no ops (its output is its input) is only the round trip.
    let mut empty = Program::new(vec![inputs[0].meta()]);
    empty.outputs = vec![0];
    let trip = || {
        sandbox.run_traced(&empty, &inputs[..1], &guard).unwrap();
    };
    batch(&trip);
    let floor = median((0..7).map(|_| batch(&trip)).collect());
    println!(
        "round trip to the executor (a program with no ops): {:.1} µs",
        floor * 1e6
    );
    println!(
        "tiny task (8x8 add, traced): in process {:.1} µs, in the executor {:.1} µs; added {:.1} µs",
        l * 1e6,
        r * 1e6,
        (r - l) * 1e6
    );
    drop(sandbox);
    std::thread::sleep(Duration::from_millis(50));
}
