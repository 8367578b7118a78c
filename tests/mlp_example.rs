//! The MLP example's output matches the same network computed directly with ndarray.

#![allow(clippy::unwrap_used)]

#[path = "../examples/mlp.rs"]
mod example;

use corvid::sdk::Graph;
use ndarray::{Array2, Axis, Ix2};

#[test]
fn mlp_example_matches_ndarray() {
    let g = Graph::new("mlp-test");
    let dims = [37, 50, 20, 7];
    let net = example::mlp(&g, 45, &dims, 11).unwrap();
    let got = net
        .probs
        .eval()
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap();

    // Direct ndarray: the same constants, the same formula.
    let arr = |t: &corvid::sdk::Tensor| t.eval().unwrap();
    let mut h: Array2<f32> = arr(&net.x).into_dimensionality().unwrap();
    for (i, (w, b)) in net.layers.iter().enumerate() {
        let w: Array2<f32> = arr(w).into_dimensionality().unwrap();
        let b = arr(b).into_dimensionality::<ndarray::Ix1>().unwrap();
        h = h.dot(&w) + &b;
        if i + 1 < net.layers.len() {
            h.mapv_inplace(|v| v.max(0.0));
        }
    }
    for mut row in h.axis_iter_mut(Axis(0)) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    assert_eq!(got.shape(), &[45, 7]);
    for ((i, j), want) in h.indexed_iter() {
        let g = got[[i, j]];
        assert!(
            (g - want).abs() <= 1e-5 + 1e-4 * want.abs(),
            "[{i}, {j}]: got {g}, want {want}"
        );
    }
}
