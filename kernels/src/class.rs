//! Determinism classes: peers in the same class produce bit-identical results for the same work.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which backend executed the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackendKind {
    Cpu,
    Gpu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        })
    }
}

/// Backend, adapter, driver and a hash of the kernel code. On one class, the same op on the same
/// inputs gives the same bits; across classes results agree only within tolerance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeterminismClass {
    pub backend: BackendKind,
    pub adapter: String,
    pub driver: String,
    /// blake3 (hex, 16 digits) of the kernel sources or CPU code path.
    pub kernels: String,
}

impl DeterminismClass {
    pub fn new(
        backend: BackendKind,
        adapter: String,
        driver: String,
        kernels: &blake3::Hash,
    ) -> Self {
        DeterminismClass {
            backend,
            adapter,
            driver,
            kernels: kernels.to_hex()[..16].to_string(),
        }
    }

    /// A stable 32-byte id of the whole class.
    pub fn id(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for part in [
            self.backend.to_string().as_str(),
            &self.adapter,
            &self.driver,
            &self.kernels,
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        *h.finalize().as_bytes()
    }
}

impl fmt::Display for DeterminismClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.backend, self.adapter, self.driver, self.kernels
        )
    }
}
