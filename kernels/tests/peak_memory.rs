//! The validator's peak-memory estimate is an upper bound: every op of the registry, and
//! programs that chain them, are run on the CPU backend under a counting allocator, and the
//! most bytes held at once never exceed what `Program::validate` charged.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_kernels::{Backend, Budget, CpuBackend, Op, Program, Tensor, registry};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `p` and returns (bytes the validator charged beyond the inputs, bytes measured above
/// the level before the run).
fn measure(backend: &Backend, p: &Program, inputs: &[Arc<Tensor>]) -> (u64, u64) {
    let fp = p.validate(&Budget::unlimited()).unwrap();
    let input_bytes: u64 = p.inputs.iter().map(|m| m.bytes()).sum();
    // Warm up (thread pools, gemm's per-thread buffers), then measure a second run.
    drop(backend.run_shared(p, inputs).unwrap());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = backend.run_shared(p, inputs).unwrap();
    let peak = PEAK.load(Ordering::Relaxed);
    drop(out);
    (fp.peak_bytes - input_bytes, (peak - base) as u64)
}

#[test]
fn every_registry_op_stays_within_its_estimate() {
    // One test in this binary, so no other test's allocations are counted.
    let backend = Backend::Cpu(CpuBackend::new());
    let mut worst = (0.0f64, String::new());
    for spec in registry() {
        for seed in 0..4 {
            let s = spec.sample(seed);
            let metas = s.inputs.iter().map(|t| t.meta()).collect();
            let p = Program::single(s.op.clone(), metas);
            let inputs: Vec<Arc<Tensor>> = s.inputs.into_iter().map(Arc::new).collect();
            let (charged, used) = measure(&backend, &p, &inputs);
            assert!(
                used <= charged,
                "{}: used {used} bytes, charged {charged} (op {}, inputs {:?})",
                spec.name,
                s.op,
                p.inputs
            );
            let ratio = used as f64 / charged.max(1) as f64;
            if ratio > worst.0 {
                worst = (ratio, format!("{} {:?}", s.op, p.inputs));
            }
        }
    }
    eprintln!(
        "tightest estimate: {:.2} of the charge ({})",
        worst.0, worst.1
    );

    // Larger values, so the estimate's proportional terms dominate its constants.
    let x = Arc::new(Tensor::random_uniform([512, 768], -1.0, 1.0, 1));
    let w = Arc::new(Tensor::random_uniform([768, 384], -1.0, 1.0, 2));
    let bias = Arc::new(Tensor::random_uniform([384], -1.0, 1.0, 3));
    let mut p = Program::new(vec![x.meta(), w.meta(), bias.meta()]);
    let h = p.push(Op::MatMul, &[0, 1]);
    let h = p.push(Op::Binary(BinaryOp::Add), &[h, 2]);
    let h = p.push(Op::Unary(UnaryOp::Gelu), &[h]);
    let s = p.push(Op::Softmax { axis: 1 }, &[h]);
    let v = p.push(
        Op::Reduce {
            op: ReduceOp::Variance,
            axes: vec![0],
            keepdims: true,
        },
        &[s],
    );
    let t = p.push(Op::Permute { axes: vec![1, 0] }, &[h]);
    let c = p.push(Op::Concat { axis: 1 }, &[t, t]);
    p.outputs = vec![v, c];
    let (charged, used) = measure(&backend, &p, &[x.clone(), w, bias.clone()]);
    assert!(
        used <= charged,
        "mlp-like program: used {used}, charged {charged}"
    );
    eprintln!("mlp-like program: used {used} of {charged} bytes charged");

    // Each reference-path op alone on a 1.5 MiB input.
    let img = Arc::new(Tensor::random_uniform([2, 3, 256, 256], -1.0, 1.0, 4));
    let kern = Arc::new(Tensor::random_uniform([4, 3, 5, 5], -1.0, 1.0, 5));
    let gamma = Arc::new(Tensor::random_uniform([768], -1.0, 1.0, 6));
    let big = Arc::new(Tensor::random_uniform([2048, 2048], -1.0, 1.0, 8));
    let col = Arc::new(Tensor::random_uniform([512, 1], -1.0, 1.0, 7));
    let cases: Vec<(Op, Vec<Arc<Tensor>>)> = vec![
        (Op::Where, vec![x.clone(), x.clone(), x.clone()]),
        (
            Op::Clamp {
                min: -0.5,
                max: 0.5,
            },
            vec![x.clone()],
        ),
        (
            Op::Cast {
                to: corvid_kernels::DType::I32,
            },
            vec![x.clone()],
        ),
        (
            Op::ArgMax {
                axis: 1,
                keepdims: false,
            },
            vec![x.clone()],
        ),
        (
            Op::LayerNorm { eps: 1e-5 },
            vec![x.clone(), gamma.clone(), gamma.clone()],
        ),
        (Op::LogSoftmax { axis: 0 }, vec![x.clone()]),
        (
            Op::Reduce {
                op: ReduceOp::Variance,
                axes: vec![0, 1],
                keepdims: false,
            },
            vec![x.clone()],
        ),
        (
            Op::Reduce {
                op: ReduceOp::Max,
                axes: vec![1],
                keepdims: false,
            },
            vec![x.clone()],
        ),
        (
            Op::Pad {
                pads: vec![[3, 4], [5, 6]],
                value: 1.0,
            },
            vec![x.clone()],
        ),
        (
            Op::Slice {
                starts: vec![1, 2],
                ends: vec![500, 700],
                steps: vec![2, 3],
            },
            vec![x.clone()],
        ),
        (
            Op::BroadcastTo {
                shape: vec![3, 512, 768],
            },
            vec![x.clone()],
        ),
        (Op::Binary(BinaryOp::Mul), vec![x.clone(), col]),
        (
            Op::MaxPool2d {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
            vec![img.clone()],
        ),
        (
            Op::Conv2d {
                stride: [1, 1],
                padding: [2, 2],
            },
            vec![img.clone(), kern.clone()],
        ),
        (Op::MatMul, vec![big.clone(), big.clone()]),
        (
            Op::MatMul,
            vec![
                big.clone(),
                Arc::new(Tensor::random_uniform([2048, 1], -1.0, 1.0, 9)),
            ],
        ),
    ];
    for (op, inputs) in cases {
        let p = Program::single(op.clone(), inputs.iter().map(|t| t.meta()).collect());
        let (charged, used) = measure(&backend, &p, &inputs);
        assert!(used <= charged, "{op}: used {used}, charged {charged}");
        eprintln!("{op}: used {used} of {charged} bytes charged");
    }
}
