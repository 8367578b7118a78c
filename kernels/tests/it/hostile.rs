//! Programs a stranger could send, through the same entry points a worker uses: each one is an
//! error, quickly, never a crash, a wrapped size, a huge allocation or a hang. Then the backend
//! still runs an honest program.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gpu;
use corvid_kernels::backend::Guard;
use corvid_kernels::cancel::Stopped;
use corvid_kernels::op::UnaryOp;
use corvid_kernels::{
    Backend, Budget, Cancel, CpuBackend, ExecError, Limit, Op, Program, ProgramError, Tensor,
    TensorMeta,
};

fn backends() -> Vec<(&'static str, Backend)> {
    let mut v = vec![("cpu", Backend::Cpu(CpuBackend::new()))];
    if let Some(g) = gpu() {
        v.push(("gpu", Backend::Gpu(g)));
    }
    v
}

fn f(shape: &[usize]) -> TensorMeta {
    TensorMeta::f32(shape.to_vec())
}

/// A worker's budget: 1 GiB per tensor and at once, 10 GFLOP.
fn worker() -> Budget {
    Budget::new(1 << 30, 1 << 30, 10_000_000_000)
}

fn honest(backend: &Backend) {
    let a = Tensor::random_uniform([3, 4], -1.0, 1.0, 1);
    let b = Tensor::random_uniform([4, 2], -1.0, 1.0, 2);
    let p = Program::single(Op::MatMul, vec![a.meta(), b.meta()]);
    let out = backend.run(&p, &[a, b]).unwrap();
    assert_eq!(out[0].shape(), &[3, 2]);
}

/// Runs `p` on empty-or-tiny inputs of its declared metas under both the backend's own budget
/// and a worker's, and returns the worker's error.
fn refuse(backend: &Backend, p: &Program, inputs: &[Tensor]) -> ExecError {
    let started = Instant::now();
    let shared: Vec<Arc<Tensor>> = inputs.iter().cloned().map(Arc::new).collect();
    let own = backend.run(p, inputs).unwrap_err();
    let guard = Guard::new(worker(), Cancel::none());
    let e = backend.run_with(p, &shared, &guard).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusing took {:?}: {own}",
        started.elapsed()
    );
    honest(backend);
    e
}

#[test]
fn wrapping_matmul_shapes_are_refused() {
    // f32[2^63+1, 0] @ f32[0, 2] would be f32[2^63+1, 2]: 2^64+2 elements, which wraps to 2.
    let huge = (1usize << 63) + 1;
    let mut p = Program::new(vec![f(&[huge, 0]), f(&[0, 2]), f(&[2, 2])]);
    let h = p.push(Op::MatMul, &[0, 1]);
    let o = p.push(Op::MatMul, &[h, 2]);
    p.outputs = vec![o];
    let inputs = [
        Tensor::from_f32([huge, 0], vec![]).unwrap(),
        Tensor::from_f32([0, 2], vec![]).unwrap(),
        Tensor::full([2, 2], 1.0),
    ];
    for (name, b) in backends() {
        let e = refuse(&b, &p, &inputs);
        assert!(
            matches!(&e, ExecError::Program(ProgramError::TooLarge(t)) if t.limit == Limit::TensorBytes),
            "{name}: {e}"
        );
        assert!(
            e.to_string()
                .starts_with("input 0 (f32[9223372036854775809, 0])"),
            "{name}: {e}"
        );
    }
}

#[test]
fn a_4_tib_broadcast_is_refused_before_allocating() {
    let one = Tensor::full([1], 2.0);
    let p = Program::single(
        Op::BroadcastTo {
            shape: vec![1 << 20, 1 << 20],
        },
        vec![one.meta()],
    );
    for (name, b) in backends() {
        let e = refuse(&b, &p, std::slice::from_ref(&one));
        assert!(
            e.to_string()
                .contains("a tensor of 4398046511104 bytes is over the limit"),
            "{name}: {e}"
        );
    }
}

#[test]
fn wrapping_pads_concats_and_windows_are_errors() {
    let one = Tensor::full([1], 2.0);
    let pad = Program::single(
        Op::Pad {
            pads: vec![[usize::MAX, 1]],
            value: 0.0,
        },
        vec![one.meta()],
    );
    let empty = Tensor::from_f32([0, 1 << 62], vec![]).unwrap();
    let concat = Program::single(
        Op::Concat { axis: 1 },
        vec![empty.meta(), empty.meta(), empty.meta(), empty.meta()],
    );
    let x = Tensor::full([1, 1, 2, 2], 1.0);
    let conv = Program::single(
        Op::Conv2d {
            stride: [1, 1],
            padding: [usize::MAX / 2 + 1, 0],
        },
        vec![x.meta(), x.meta()],
    );
    let pool = Program::single(
        Op::MaxPool2d {
            kernel: [usize::MAX, 2],
            stride: [1, 1],
            padding: [usize::MAX - 1, 0],
        },
        vec![x.meta()],
    );
    for (name, b) in backends() {
        let e = refuse(&b, &pad, std::slice::from_ref(&one));
        assert!(
            e.to_string()
                .contains("axis 0 padded by [18446744073709551615, 1]")
                && e.to_string().contains("overflows"),
            "{name}: {e}"
        );
        let e = refuse(
            &b,
            &concat,
            &[empty.clone(), empty.clone(), empty.clone(), empty.clone()],
        );
        // The inputs themselves are refused by extent; past that, the length would overflow.
        assert!(e.to_string().contains("over the limit"), "{name}: {e}");
        let e = refuse(&b, &conv, &[x.clone(), x.clone()]);
        assert!(e.to_string().contains("overflows"), "{name}: {e}");
        let e = refuse(&b, &pool, std::slice::from_ref(&x));
        assert!(e.to_string().contains("overflows"), "{name}: {e}");
    }
    // Shape inference alone catches the concat's overflow.
    let e = concat.infer().unwrap_err();
    assert!(
        e.to_string().contains("the length of axis 1 overflows"),
        "{e}"
    );
}

#[test]
fn a_rank_100000_chain_is_refused_at_once() {
    let shape = vec![1usize; 100_000];
    let mut p = Program::new(vec![f(&shape)]);
    let mut v = 0;
    for _ in 0..100_000 {
        v = p.push(Op::Unary(UnaryOp::Neg), &[v]);
    }
    p.outputs = vec![v];
    let x = Tensor::from_f32(shape.clone(), vec![1.0]).unwrap();
    let started = Instant::now();
    for (name, b) in backends() {
        let e = refuse(&b, &p, std::slice::from_ref(&x));
        assert!(
            e.to_string()
                .contains("the program has 100000 nodes, over the limit of 4096"),
            "{name}: {e}"
        );
    }
    // Without the node limit, the rank limit stops it at the first input.
    let e = p
        .validate(&Budget {
            max_nodes: usize::MAX,
            ..Budget::unlimited()
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "input 0 has rank 100000, over the limit of 8"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn each_budget_refuses_what_is_over_it() {
    let x = Tensor::full([256, 256], 0.5);
    let p = Program::single(Op::MatMul, vec![x.meta(), x.meta()]);
    let inputs = [Arc::new(x.clone()), Arc::new(x.clone())];
    let fp = p.validate(&Budget::unlimited()).unwrap();
    assert_eq!(fp.flops, 2 * 256 * 256 * 256);
    let cases = [
        (
            Limit::Flops,
            Budget {
                max_flops: fp.flops - 1,
                ..Budget::unlimited()
            },
        ),
        (
            Limit::PeakMemory,
            Budget {
                max_peak_bytes: fp.peak_bytes - 1,
                ..Budget::unlimited()
            },
        ),
        (
            Limit::TensorBytes,
            Budget {
                max_tensor_bytes: 256 * 256 * 4 - 1,
                ..Budget::unlimited()
            },
        ),
        (
            Limit::ProgramBytes,
            Budget {
                max_program_bytes: 4,
                ..Budget::unlimited()
            },
        ),
        (
            Limit::Nodes,
            Budget {
                max_nodes: 0,
                ..Budget::unlimited()
            },
        ),
    ];
    for (name, b) in backends() {
        for (limit, budget) in &cases {
            let e = b
                .run_with(&p, &inputs, &Guard::new(budget.clone(), Cancel::none()))
                .unwrap_err();
            assert!(
                matches!(&e, ExecError::Program(ProgramError::TooLarge(t)) if t.limit == *limit),
                "{name} {limit}: {e}"
            );
        }
        // Exactly at every limit, it runs.
        let exact = Budget {
            max_nodes: 1,
            max_program_bytes: fp.program_bytes,
            max_tensor_bytes: fp.largest_value,
            max_peak_bytes: fp.peak_bytes,
            max_flops: fp.flops,
        };
        b.run_with(&p, &inputs, &Guard::new(exact, Cancel::none()))
            .unwrap();
    }
}

#[test]
fn im2col_workspace_counts_against_peak_memory() {
    // A 1 MiB input and a 64 KiB output, but 4 GiB of im2col columns in between.
    let x = TensorMeta::f32([1, 64, 64, 64]);
    let p = Program::single(
        Op::Conv2d {
            stride: [1, 1],
            padding: [63, 63],
        },
        vec![x.clone(), TensorMeta::f32([1, 64, 64, 64])],
    );
    let e = p.validate(&worker()).unwrap_err();
    assert!(
        matches!(&e, ProgramError::TooLarge(t) if t.limit == Limit::PeakMemory),
        "{e}"
    );
}

/// A matmul long enough to be stopped in the middle.
fn long_matmul() -> (Program, Vec<Arc<Tensor>>) {
    let n = 1536;
    let a = Arc::new(Tensor::random_uniform([n, n], -1.0, 1.0, 3));
    let b = Arc::new(Tensor::random_uniform([n, n], -1.0, 1.0, 4));
    let mut p = Program::new(vec![a.meta(), b.meta()]);
    let mut v = p.push(Op::MatMul, &[0, 1]);
    for _ in 0..7 {
        v = p.push(Op::MatMul, &[v, 1]);
    }
    p.outputs = vec![v];
    (p, vec![a, b])
}

#[test]
fn cancellation_and_deadlines_stop_a_run_midway() {
    let (p, inputs) = long_matmul();
    for (name, b) in backends() {
        // A deadline.
        let started = Instant::now();
        let guard = Guard::new(
            Budget::unlimited(),
            Cancel::within(Duration::from_millis(100)),
        );
        let e = b.run_with(&p, &inputs, &guard).unwrap_err();
        assert!(
            matches!(e, ExecError::Stopped(Stopped::Deadline(_))),
            "{name}: {e}"
        );
        let took = started.elapsed();
        // A cancel from another thread.
        let cancel = Cancel::none();
        let guard = Guard::new(Budget::unlimited(), cancel.clone());
        let started = Instant::now();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.cancel();
        });
        let e = b.run_with(&p, &inputs, &guard).unwrap_err();
        stopper.join().unwrap();
        assert!(
            matches!(e, ExecError::Stopped(Stopped::Cancelled)),
            "{name}: {e}"
        );
        eprintln!(
            "{name}: deadline stopped after {took:?}, cancel after {:?}",
            started.elapsed()
        );
        // The backend (on the gpu, a fresh device) serves the next program.
        honest(&b);
    }
}
