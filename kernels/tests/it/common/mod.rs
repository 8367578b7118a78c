//! Shared helpers for the kernel tests.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use corvid_kernels::{GpuBackend, Tensor, Tolerance};

/// The GPU backend, or `None` (with a note) when there is no adapter. With
/// `CORVID_REQUIRE_GPU=1` a missing adapter fails the test instead; with
/// `CORVID_EXPECT_ADAPTER=name` the adapter's name must contain `name` (CI pins lavapipe).
pub fn gpu() -> Option<GpuBackend> {
    let required = std::env::var("CORVID_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match GpuBackend::new(true) {
        Ok(g) => {
            let a = g.adapter();
            assert!(
                ["vulkan", "metal", "dx12"].contains(&a.backend.as_str()),
                "unexpected wgpu backend {:?}",
                a
            );
            if let Ok(want) = std::env::var("CORVID_EXPECT_ADAPTER") {
                assert!(
                    a.name.to_lowercase().contains(&want.to_lowercase()),
                    "expected adapter '{want}', got {a:?}"
                );
            }
            Some(g)
        }
        Err(e) if required => panic!("CORVID_REQUIRE_GPU=1 but the gpu backend failed: {e}"),
        Err(e) => {
            eprintln!("skipping gpu checks: {e}");
            None
        }
    }
}

/// Compares two tensors element by element; the error names the first bad index.
pub fn compare(got: &Tensor, want: &Tensor, tol: Tolerance) -> Result<(), String> {
    if got.meta() != want.meta() {
        return Err(format!("meta: got {}, want {}", got.meta(), want.meta()));
    }
    match (got.as_f32(), want.as_f32()) {
        (Ok(g), Ok(w)) => {
            for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                if !tol.accepts(g, w) {
                    return Err(format!(
                        "first bad index {i}: got {g:e}, want {w:e}, tolerance atol {:e} rtol {:e}",
                        tol.atol, tol.rtol
                    ));
                }
            }
            Ok(())
        }
        _ => {
            let (g, w) = (got.as_i32().unwrap(), want.as_i32().unwrap());
            match g.iter().zip(w).position(|(a, b)| a != b) {
                Some(i) => Err(format!(
                    "first bad index {i}: got {}, want {} (exact)",
                    g[i], w[i]
                )),
                None => Ok(()),
            }
        }
    }
}

/// Bitwise equality, naming the first differing index.
pub fn same_bits(a: &Tensor, b: &Tensor) -> Result<(), String> {
    if a.meta() != b.meta() {
        return Err(format!("meta {} vs {}", a.meta(), b.meta()));
    }
    match a.words().iter().zip(b.words()).position(|(x, y)| x != y) {
        Some(i) => Err(format!(
            "bits differ at index {i}: {:#010x} vs {:#010x}",
            a.words()[i],
            b.words()[i]
        )),
        None => Ok(()),
    }
}

/// `f32[2, 3]`-style shapes of all inputs.
pub fn shapes(inputs: &[Tensor]) -> String {
    inputs
        .iter()
        .map(|t| t.meta().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
