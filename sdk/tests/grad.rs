//! Gradient checks generated over the op registry: each op's vector-Jacobian product (built by
//! `Graph::grad` as ordinary ops and run by the local executor) against central finite
//! differences of the reference, with the loss `sum(r * op(inputs))` for a random `r`
//! accumulated in f64. A new op gets its gradient check from its registry entry, like its other
//! tests; an op without a derivative must say so.
#![allow(clippy::unwrap_used)]

use corvid_kernels::registry::registry;
use corvid_kernels::{DType, Op, Tensor as Data, reference};
use corvid_sdk::{BuildError, Graph};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Ops whose gradient is refused: the result is an index, a class or an integer.
const NO_DERIVATIVE: &[&str] = &["eq", "ne", "lt", "le", "gt", "ge", "argmax", "cast"];

/// Ops with kinks (all piecewise linear): an element whose one-sided differences disagree
/// sits on one, or moves a broadcast partner across one, and is skipped.
const KINKED: &[&str] = &[
    "abs",
    "relu",
    "clamp",
    "maximum",
    "minimum",
    "max",
    "min",
    "max_pool2d",
];

const SEEDS: u64 = 12;
/// Elements perturbed per input per case.
const PROBES: usize = 10;

fn loss(op: &Op, inputs: &[Data], r: &[f32]) -> f64 {
    let refs: Vec<&Data> = inputs.iter().collect();
    let y = reference::eval(op, &refs).unwrap();
    y.as_f32()
        .unwrap()
        .iter()
        .zip(r)
        .map(|(&y, &r)| f64::from(y) * f64::from(r))
        .sum()
}

fn with(inputs: &[Data], which: usize, at: usize, v: f32) -> Vec<Data> {
    let mut out = inputs.to_vec();
    let mut values = out[which].as_f32().unwrap().to_vec();
    values[at] = v;
    out[which] = Data::from_f32(inputs[which].shape().to_vec(), values).unwrap();
    out
}

#[test]
fn every_op_with_a_derivative_matches_finite_differences() {
    let mut checked_ops = Vec::new();
    for spec in registry() {
        let mut probes = 0;
        let mut refused = 0;
        for seed in 0..SEEDS {
            let sample = spec.sample(seed);
            let g = Graph::new(format!("grad {}", spec.name));
            let xs: Vec<_> = sample
                .inputs
                .iter()
                .map(|d| g.constant(d.clone()))
                .collect();
            let refs: Vec<_> = xs.iter().collect();
            let y = g.apply(sample.op.clone(), &refs).unwrap();
            // Which inputs are parameters: f32 ones (the condition of `where` gets no
            // gradient by definition).
            let params: Vec<usize> = (0..xs.len())
                .filter(|&i| xs[i].dtype() == DType::F32)
                .filter(|&i| !(spec.name == "where" && i == 0))
                .collect();
            if params.is_empty() {
                continue;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + seed);
            let n = y.meta().numel();
            let r: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let p: Vec<&corvid_sdk::Tensor> = params.iter().map(|&i| &xs[i]).collect();
            let loss_t = if y.dtype() == DType::F32 {
                let rt = g.from_vec(y.shape(), r.clone()).unwrap();
                let all: Vec<usize> = (0..y.shape().len()).collect();
                let prod = y.mul(&rt).unwrap();
                if all.is_empty() {
                    prod
                } else {
                    prod.sum(&all, false).unwrap()
                }
            } else {
                // An integer result: the loss over it cast back (which itself refuses).
                let all: Vec<usize> = (0..y.shape().len()).collect();
                let f = y.cast(DType::F32).unwrap();
                if all.is_empty() {
                    f
                } else {
                    f.sum(&all, false).unwrap()
                }
            };
            let grads = match g.grad(&loss_t, &p) {
                Err(BuildError::NoGradient { op, why, .. }) => {
                    assert!(
                        NO_DERIVATIVE.contains(&spec.name),
                        "{}: refused a gradient: {op}: {why}",
                        spec.name
                    );
                    assert!(!why.is_empty());
                    refused += 1;
                    continue;
                }
                Err(e) => panic!("{} (seed {seed}): {e}", spec.name),
                Ok(grads) => grads,
            };
            assert!(
                !NO_DERIVATIVE.contains(&spec.name),
                "{}: a gradient through an op without a derivative was not refused",
                spec.name
            );
            let grefs: Vec<_> = grads.iter().collect();
            let values = g.eval(&grefs).unwrap();
            let tol = spec.tolerance;
            for (k, &which) in params.iter().enumerate() {
                let analytic = values[k].as_f32().unwrap();
                assert_eq!(values[k].shape(), sample.inputs[which].shape());
                let scale = analytic.iter().fold(0f32, |m, v| m.max(v.abs()));
                let x = sample.inputs[which].as_f32().unwrap();
                for _ in 0..PROBES.min(x.len()) {
                    let at = rng.random_range(0..x.len());
                    let h = 1e-3 * x[at].abs().max(1.0);
                    let (up, down) = (x[at] + h, x[at] - h);
                    let l_up = loss(&sample.op, &with(&sample.inputs, which, at, up), &r);
                    let l_down = loss(&sample.op, &with(&sample.inputs, which, at, down), &r);
                    let width = f64::from(up) - f64::from(down);
                    let central = (l_up - l_down) / width;
                    if KINKED.contains(&spec.name) {
                        let l0 = loss(&sample.op, &sample.inputs, &r);
                        let fwd = (l_up - l0) / (f64::from(up) - f64::from(x[at]));
                        let bwd = (l0 - l_down) / (f64::from(x[at]) - f64::from(down));
                        if (fwd - bwd).abs() > 2e-3 * fwd.abs().max(bwd.abs()) + 2e-3 {
                            continue;
                        }
                    }
                    let a = f64::from(analytic[at]);
                    let allowed = 1e-2 * a.abs().max(central.abs())
                        + 1e-3 * (1.0 + f64::from(scale))
                        + 10.0 * f64::from(tol.atol.max(tol.rtol));
                    assert!(
                        (a - central).abs() <= allowed,
                        "{} (seed {seed}): d loss / d input {which}[{at}] is {a}, finite \
                         differences say {central} (allowed {allowed}); op {:?}, shapes {:?}",
                        spec.name,
                        sample.op,
                        sample
                            .inputs
                            .iter()
                            .map(|d| d.shape().to_vec())
                            .collect::<Vec<_>>()
                    );
                    probes += 1;
                }
            }
        }
        if NO_DERIVATIVE.contains(&spec.name) {
            assert!(refused > 0, "{}: no case asked for its gradient", spec.name);
        } else {
            assert!(probes > 0, "{}: no element was checked", spec.name);
            checked_ops.push((spec.name, probes));
        }
    }
    eprintln!("gradient checks: {checked_ops:?}");
    assert!(checked_ops.len() >= 30, "{checked_ops:?}");
}

#[test]
fn a_gradient_through_argmax_names_the_op_and_where_it_was_asked() {
    let g = Graph::new("no grad");
    let x = g.t(&[1.0, 3.0, 2.0]);
    let i = x.argmax(0, false).unwrap().cast(DType::F32).unwrap();
    let loss = &x.sum(&[0], false).unwrap() * &i;
    let e = g.grad(&loss, &[&x]).unwrap_err().to_string();
    assert!(e.contains("grad.rs") && e.contains("cast"), "{e}");
    // Not a scalar: refused, saying how to make one.
    let e = g.grad(&x, &[&x]).unwrap_err().to_string();
    assert!(e.contains("one f32 value"), "{e}");
}

#[test]
fn a_small_network_trains_its_gradient_down() {
    // Softmax cross-entropy of a 2-layer MLP: the gradient step lowers the loss.
    let g = Graph::new("mlp grad");
    let x = g.random(&[8, 5], -1.0, 1.0, 1);
    let w1 = g.random(&[5, 16], -0.5, 0.5, 2);
    let w2 = g.random(&[16, 3], -0.5, 0.5, 3);
    let labels = g
        .from_vec(
            &[8, 3],
            (0..24)
                .map(|i| if i % 3 == (i / 3) % 3 { 1.0 } else { 0.0 })
                .collect(),
        )
        .unwrap();
    let ce = |w1: &corvid_sdk::Tensor, w2: &corvid_sdk::Tensor| {
        let h = x.matmul(w1).unwrap().relu().unwrap();
        let lp = h.matmul(w2).unwrap().log_softmax(1).unwrap();
        -&(&lp * &labels).sum(&[0, 1], false).unwrap()
    };
    let l0 = ce(&w1, &w2);
    let d = g.grad(&l0, &[&w1, &w2]).unwrap();
    let w1b = &w1 - &(&d[0] * 0.1);
    let w2b = &w2 - &(&d[1] * 0.1);
    let l1 = ce(&w1b, &w2b);
    let v = g.eval(&[&l0, &l1]).unwrap();
    let (a, b) = (v[0].as_f32().unwrap()[0], v[1].as_f32().unwrap()[0]);
    assert!(b < a, "loss {a} then {b}");
}
