//! Known answers on the reference, one or more per registry op. A new op without a known answer
//! fails `every_op_has_a_known_answer`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use corvid_kernels::op::{BinaryOp as B, ReduceOp as R, UnaryOp as U};
use corvid_kernels::{DType, Op, Tensor, reference, registry};

fn t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
}

fn ti(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::from_i32(shape.to_vec(), v.to_vec()).unwrap()
}

/// (op, inputs, expected)
fn cases() -> Vec<(Op, Vec<Tensor>, Tensor)> {
    let x = t(&[4], &[-2.0, -0.5, 0.0, 1.5]);
    let pos = t(&[3], &[0.25, 1.0, 4.0]);
    let un = |u: U, input: &Tensor, want: &[f32]| {
        (Op::Unary(u), vec![input.clone()], t(input.shape(), want))
    };
    let a = t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let row = t(&[3], &[5.0, 22.0, 7.0]);
    let bin = |b: B, want: &[f32]| {
        (
            Op::Binary(b),
            vec![a.clone(), row.clone()],
            t(&[2, 3], want),
        )
    };
    let cmp_a = t(&[3], &[1.0, 2.0, 3.0]);
    let cmp_b = t(&[3], &[2.0, 2.0, 2.0]);
    let cmp = |b: B, want: &[f32]| {
        (
            Op::Binary(b),
            vec![cmp_a.clone(), cmp_b.clone()],
            t(&[3], want),
        )
    };
    let m = t(&[2, 3], &[1.0, 9.0, 3.0, -4.0, 5.0, 5.0]);
    let red = |r: R, axes: Vec<usize>, keepdims: bool, shape: &[usize], want: &[f32]| {
        (
            Op::Reduce {
                op: r,
                axes,
                keepdims,
            },
            vec![m.clone()],
            t(shape, want),
        )
    };
    let e = std::f32::consts::E;
    let (s1, s2, s3) = (
        1.0 / (1.0 + e + e * e),
        e / (1.0 + e + e * e),
        e * e / (1.0 + e + e * e),
    );
    let lse = (1.0 + e + e * e).ln();
    vec![
        un(U::Neg, &x, &[2.0, 0.5, -0.0, -1.5]),
        un(U::Abs, &x, &[2.0, 0.5, 0.0, 1.5]),
        un(U::Exp, &t(&[2], &[0.0, 1.0]), &[1.0, e]),
        un(U::Log, &t(&[2], &[1.0, e]), &[0.0, 1.0]),
        un(U::Sqrt, &pos, &[0.5, 1.0, 2.0]),
        un(U::Rsqrt, &pos, &[2.0, 1.0, 0.5]),
        un(U::Square, &x, &[4.0, 0.25, 0.0, 2.25]),
        un(U::Reciprocal, &pos, &[4.0, 1.0, 0.25]),
        un(
            U::Sin,
            &t(&[2], &[0.0, std::f32::consts::FRAC_PI_2]),
            &[0.0, 1.0],
        ),
        un(U::Cos, &t(&[2], &[0.0, std::f32::consts::PI]), &[1.0, -1.0]),
        un(U::Tanh, &t(&[3], &[0.0, 100.0, -100.0]), &[0.0, 1.0, -1.0]),
        un(
            U::Sigmoid,
            &t(&[3], &[0.0, 100.0, -100.0]),
            &[0.5, 1.0, 0.0],
        ),
        un(U::Relu, &x, &[0.0, 0.0, 0.0, 1.5]),
        // gelu(1) with the tanh approximation is 0.841192; gelu(0) = 0; gelu(-10) ~ 0.
        un(
            U::Gelu,
            &t(&[3], &[0.0, 1.0, -10.0]),
            &[0.0, 0.841_192, -0.0],
        ),
        un(
            U::Softplus,
            &t(&[3], &[0.0, 100.0, -100.0]),
            &[std::f32::consts::LN_2, 100.0, 0.0],
        ),
        (
            Op::Clamp {
                min: -1.0,
                max: 1.0,
            },
            vec![x.clone()],
            t(&[4], &[-1.0, -0.5, 0.0, 1.0]),
        ),
        bin(B::Add, &[6.0, 24.0, 10.0, 9.0, 27.0, 13.0]),
        bin(B::Sub, &[-4.0, -20.0, -4.0, -1.0, -17.0, -1.0]),
        bin(B::Mul, &[5.0, 44.0, 21.0, 20.0, 110.0, 42.0]),
        bin(
            B::Div,
            &[0.2, 2.0 / 22.0, 3.0 / 7.0, 0.8, 5.0 / 22.0, 6.0 / 7.0],
        ),
        (
            Op::Binary(B::Pow),
            vec![
                t(&[4], &[2.0, -2.0, -2.0, 4.0]),
                t(&[4], &[3.0, 3.0, 2.0, 0.5]),
            ],
            t(&[4], &[8.0, -8.0, 4.0, 2.0]),
        ),
        bin(B::Maximum, &[5.0, 22.0, 7.0, 5.0, 22.0, 7.0]),
        bin(B::Minimum, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        cmp(B::Eq, &[0.0, 1.0, 0.0]),
        cmp(B::Ne, &[1.0, 0.0, 1.0]),
        cmp(B::Lt, &[1.0, 0.0, 0.0]),
        cmp(B::Le, &[1.0, 1.0, 0.0]),
        cmp(B::Gt, &[0.0, 0.0, 1.0]),
        cmp(B::Ge, &[0.0, 1.0, 1.0]),
        (
            Op::Where,
            vec![
                t(&[3], &[1.0, 0.0, 2.0]),
                t(&[3], &[1.0, 2.0, 3.0]),
                t(&[], &[-1.0]),
            ],
            t(&[3], &[1.0, -1.0, 3.0]),
        ),
        (
            Op::Cast { to: DType::I32 },
            vec![t(&[3], &[1.7, -1.7, 3e10])],
            ti(&[3], &[1, -1, i32::MAX]),
        ),
        (
            Op::Cast { to: DType::F32 },
            vec![ti(&[2], &[7, -3])],
            t(&[2], &[7.0, -3.0]),
        ),
        (
            Op::MatMul,
            vec![a.clone(), t(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])],
            t(&[2, 2], &[4.0, 5.0, 10.0, 11.0]),
        ),
        (
            Op::MatMul,
            vec![
                t(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]),
                t(&[2, 1], &[10.0, 1.0]),
            ],
            t(&[2, 1, 1], &[12.0, 34.0]),
        ),
        (
            Op::Permute { axes: vec![1, 0] },
            vec![a.clone()],
            t(&[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]),
        ),
        (
            Op::Reshape { shape: vec![3, 2] },
            vec![a.clone()],
            t(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ),
        (
            Op::BroadcastTo { shape: vec![2, 3] },
            vec![t(&[2, 1], &[1.0, 2.0])],
            t(&[2, 3], &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]),
        ),
        (
            Op::Slice {
                starts: vec![0, 0],
                ends: vec![2, 3],
                steps: vec![1, 2],
            },
            vec![a.clone()],
            t(&[2, 2], &[1.0, 3.0, 4.0, 6.0]),
        ),
        (
            Op::Concat { axis: 1 },
            vec![t(&[2, 1], &[7.0, 8.0]), a.clone()],
            t(&[2, 4], &[7.0, 1.0, 2.0, 3.0, 8.0, 4.0, 5.0, 6.0]),
        ),
        (
            Op::Pad {
                pads: vec![[1, 0], [0, 1]],
                value: 9.0,
            },
            vec![t(&[1, 2], &[1.0, 2.0])],
            t(&[2, 3], &[9.0, 9.0, 9.0, 1.0, 2.0, 9.0]),
        ),
        (
            Op::Pad {
                pads: vec![[1, 1]],
                value: -1.0,
            },
            vec![ti(&[1], &[5])],
            ti(&[3], &[-1, 5, -1]),
        ),
        red(R::Sum, vec![1], false, &[2], &[13.0, 6.0]),
        red(R::Sum, vec![0, 1], true, &[1, 1], &[19.0]),
        red(R::Mean, vec![0], false, &[3], &[-1.5, 7.0, 4.0]),
        red(R::Max, vec![1], true, &[2, 1], &[9.0, 5.0]),
        red(R::Min, vec![0, 1], false, &[], &[-4.0]),
        red(R::Variance, vec![0], false, &[3], &[6.25, 4.0, 1.0]),
        (
            Op::ArgMax {
                axis: 1,
                keepdims: false,
            },
            vec![m.clone()],
            ti(&[2], &[1, 1]),
        ),
        (
            Op::ArgMax {
                axis: 0,
                keepdims: true,
            },
            vec![m.clone()],
            ti(&[1, 3], &[0, 0, 1]),
        ),
        (
            Op::Softmax { axis: 0 },
            vec![t(&[3], &[0.0, 1.0, 2.0])],
            t(&[3], &[s1, s2, s3]),
        ),
        (
            Op::LogSoftmax { axis: 0 },
            vec![t(&[3], &[0.0, 1.0, 2.0])],
            t(&[3], &[-lse, 1.0 - lse, 2.0 - lse]),
        ),
        (
            // mean 2, variance 2/3 over [1, 2, 3]; gamma scales, beta shifts.
            Op::LayerNorm { eps: 0.0001 },
            vec![
                t(&[1, 3], &[1.0, 2.0, 3.0]),
                t(&[3], &[1.0, 2.0, 1.0]),
                t(&[3], &[0.0, 0.0, 1.0]),
            ],
            {
                let inv = 1.0 / (2.0f32 / 3.0 + 0.0001).sqrt();
                t(&[1, 3], &[-inv, 0.0, inv + 1.0])
            },
        ),
        (
            // 3x3 image, 2x2 ones kernel: sums of each 2x2 window.
            Op::Conv2d {
                stride: [1, 1],
                padding: [0, 0],
            },
            vec![
                t(
                    &[1, 1, 3, 3],
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                ),
                t(&[1, 1, 2, 2], &[1.0; 4]),
            ],
            t(&[1, 1, 2, 2], &[12.0, 16.0, 24.0, 28.0]),
        ),
        (
            // Padding 1, stride 2, a single centre tap: picks every other pixel of the padded image.
            Op::Conv2d {
                stride: [2, 2],
                padding: [1, 1],
            },
            vec![
                t(
                    &[1, 1, 3, 3],
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                ),
                t(
                    &[1, 1, 3, 3],
                    &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                ),
            ],
            t(&[1, 1, 2, 2], &[1.0, 3.0, 7.0, 9.0]),
        ),
        (
            Op::MaxPool2d {
                kernel: [2, 2],
                stride: [2, 2],
                padding: [1, 1],
            },
            vec![t(
                &[1, 1, 3, 3],
                &[1.0, 2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0, -9.0],
            )],
            t(&[1, 1, 2, 2], &[1.0, 3.0, 7.0, 8.0]),
        ),
    ]
}

#[test]
fn reference_gives_known_answers() {
    let mut failures = Vec::new();
    for (op, inputs, want) in cases() {
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let got = reference::eval(&op, &refs).unwrap_or_else(|e| panic!("{op}: {e}"));
        let tol = corvid_kernels::Tolerance::new(1e-6, 1e-6);
        let ok = got.meta() == want.meta()
            && match (got.as_f32(), want.as_f32()) {
                (Ok(g), Ok(w)) => g.iter().zip(w).all(|(g, w)| tol.accepts(*g, *w)),
                _ => got == want,
            };
        if !ok {
            failures.push(format!("{op}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_op_has_a_known_answer() {
    let covered: BTreeSet<&str> = cases().iter().map(|(op, _, _)| op.name()).collect();
    let missing: Vec<&str> = registry()
        .iter()
        .map(|s| s.name)
        .filter(|n| !covered.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a known answer: {missing:?}"
    );
}
