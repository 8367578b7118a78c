//! The verifier's checks: honest results pass, wrong ones fail.
#![allow(clippy::unwrap_used)]

use corvid_kernels::verify::{Projection, Verdict, check_rows, check_rows_exact, row_inputs};
use corvid_kernels::{BinaryOp, CpuBackend, Op, Program, Tensor, TensorMeta, UnaryOp};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn product(m: usize, k: usize, n: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
    let a = Tensor::random_uniform(vec![m, k], -1.0, 1.0, seed);
    let b = Tensor::random_uniform(vec![k, n], -1.0, 1.0, seed + 1);
    let c = CpuBackend::new().eval(&Op::MatMul, &[&a, &b]).unwrap();
    (a, b, c)
}

fn with(t: &Tensor, index: usize, f: impl Fn(f32) -> f32) -> Tensor {
    let mut d = t.as_f32().unwrap().to_vec();
    d[index] = f(d[index]);
    Tensor::from_f32(t.shape().to_vec(), d).unwrap()
}

#[test]
fn freivalds_passes_honest_products_and_catches_an_entry_just_over_tolerance() {
    let (m, k, n) = (70, 300, 90);
    let (a, b, c) = product(m, k, n, 1);
    for seed in 0..5 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let p = Projection::new(&b, &mut rng).unwrap();
        assert_eq!(p.check(&a, &c).unwrap(), Verdict::Pass, "seed {seed}");
        // One entry off by just over its row's threshold, anywhere: caught every time.
        let tol = p.row_tolerance(a.as_f32().unwrap(), c.as_f32().unwrap(), m);
        for (i, j) in [(0, 0), (13, 77), (m - 1, n - 1)] {
            let bad = with(&c, i * n + j, |x| x + (tol[i] * 1.01) as f32);
            match p.check(&a, &bad).unwrap() {
                Verdict::Fail(e) => assert_eq!(e.index, vec![i], "{e}"),
                Verdict::Pass => panic!("entry ({i}, {j}) off by 1.01 t passed (seed {seed})"),
            }
        }
        let zeros = Tensor::full(vec![m, n], 0.0);
        assert!(matches!(p.check(&a, &zeros).unwrap(), Verdict::Fail(_)));
        let nan = with(&c, 5, |_| f32::NAN);
        assert!(matches!(p.check(&a, &nan).unwrap(), Verdict::Fail(_)));
    }
    // Honest noise is far below the threshold: the thresholds are loose by design but not
    // vacuous (an entry off by 1 on values of size ~10 is caught).
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let p = Projection::new(&b, &mut rng).unwrap();
    let tol = p.row_tolerance(a.as_f32().unwrap(), c.as_f32().unwrap(), m);
    assert!(tol.iter().all(|&t| t < 1.0), "{:?}", &tol[..4]);
    // Wrong shapes are not checked, they are refused.
    assert!(p.check(&b, &c).is_err());
}

fn mlp() -> (Program, Vec<Tensor>) {
    let (r, d, h, o) = (40, 30, 20, 10);
    let x = Tensor::random_uniform(vec![r, d], -1.0, 1.0, 1);
    let w1 = Tensor::random_uniform(vec![d, h], -1.0, 1.0, 2);
    let b1 = Tensor::random_uniform(vec![h], -1.0, 1.0, 3);
    // Square second layer weights: same first dim as the rows, to confuse a naive guess.
    let w2 = Tensor::random_uniform(vec![h, r], -1.0, 1.0, 4);
    let _ = o;
    let mut p = Program::new(vec![
        TensorMeta::f32(vec![r, d]),
        TensorMeta::f32(vec![d, h]),
        TensorMeta::f32(vec![h]),
        TensorMeta::f32(vec![h, r]),
    ]);
    let h1 = p.push(Op::MatMul, &[0, 1]);
    let h2 = p.push(Op::Binary(BinaryOp::Add), &[h1, 2]);
    let h3 = p.push(Op::Unary(UnaryOp::Relu), &[h2]);
    let y = p.push(Op::MatMul, &[h3, 3]);
    let s = p.push(Op::Softmax { axis: 1 }, &[y]);
    p.outputs = vec![s];
    (p, vec![x, w1, b1, w2])
}

#[test]
fn sampled_rows_pass_honest_pipelines_and_catch_a_wrong_sampled_row() {
    let (p, ins) = mlp();
    let rowed = row_inputs(&p).expect("an MLP is row-local in x");
    assert_eq!(rowed, vec![true, false, false, false]);
    let refs: Vec<&Tensor> = ins.iter().collect();
    let out = CpuBackend::new().run(&p, &ins).unwrap();
    assert_eq!(
        check_rows(
            &p,
            &rowed,
            &refs,
            &out.iter().collect::<Vec<_>>(),
            &[0, 7, 39]
        )
        .unwrap(),
        Verdict::Pass
    );
    let n = out[0].shape()[1];
    let bad = [with(&out[0], 7 * n + 3, |x| x + 1e-3)];
    match check_rows(
        &p,
        &rowed,
        &refs,
        &bad.iter().collect::<Vec<_>>(),
        &[0, 7, 39],
    )
    .unwrap()
    {
        Verdict::Fail(e) => assert_eq!(e.index, vec![7, 3], "{e}"),
        Verdict::Pass => panic!("a wrong sampled row passed"),
    }
    // Unsampled rows are not looked at.
    assert_eq!(
        check_rows(&p, &rowed, &refs, &bad.iter().collect::<Vec<_>>(), &[0, 39]).unwrap(),
        Verdict::Pass
    );
    // A transpose mixes rows: not row-local.
    let t = Program::single(
        Op::Permute { axes: vec![1, 0] },
        vec![TensorMeta::f32(vec![4, 4])],
    );
    assert_eq!(row_inputs(&t), None);
    // A softmax over the rows' axis mixes rows too.
    let s = Program::single(Op::Softmax { axis: 0 }, vec![TensorMeta::f32(vec![4, 4])]);
    assert_eq!(row_inputs(&s), None);
}

#[test]
fn exact_row_samples_match_the_whole_run_bit_for_bit() {
    let (p, ins) = mlp();
    let rowed = row_inputs(&p).unwrap();
    let refs: Vec<&Tensor> = ins.iter().collect();
    let backend = corvid_kernels::Backend::Cpu(CpuBackend::new());
    let out = CpuBackend::new().run(&p, &ins).unwrap();
    let sample = [1, 2, 30, 39];
    assert_eq!(
        check_rows_exact(
            &backend,
            &p,
            &rowed,
            &refs,
            &out.iter().collect::<Vec<_>>(),
            &sample
        )
        .unwrap(),
        Verdict::Pass
    );
    // One ulp in a sampled row is caught.
    let n = out[0].shape()[1];
    let bad = [with(&out[0], 30 * n + 9, |x| {
        f32::from_bits(x.to_bits() + 1)
    })];
    match check_rows_exact(
        &backend,
        &p,
        &rowed,
        &refs,
        &bad.iter().collect::<Vec<_>>(),
        &sample,
    )
    .unwrap()
    {
        Verdict::Fail(e) => assert_eq!(e.index, vec![30, 9], "{e}"),
        Verdict::Pass => panic!("an ulp off in a sampled row passed"),
    }
}
