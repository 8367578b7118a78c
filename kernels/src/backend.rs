//! One interface over the CPU and GPU backends, and the auto-selection between them.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::budget::Budget;
use crate::cancel::Cancel;
use crate::class::DeterminismClass;
use crate::cpu::CpuBackend;
use crate::gpu::GpuBackend;
use crate::program::Program;
use crate::tensor::{ContentId, Tensor};

// Their home is `exec`, which both backends import; re-exported where they used to live.
pub use crate::exec::{BackendError, ExecError, Guard, check_inputs};

/// Environment variable that forces the backend: `auto`, `gpu` or `cpu`.
pub const BACKEND_ENV: &str = "CORVID_BACKEND";

/// Which backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A hardware GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// Any native GPU adapter, software rasterisers (lavapipe) included; an error if none.
    Gpu,
    Cpu,
}

impl FromStr for BackendChoice {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BackendChoice::Auto),
            "gpu" => Ok(BackendChoice::Gpu),
            "cpu" => Ok(BackendChoice::Cpu),
            _ => Err(BackendError::Choice(s.to_string())),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Gpu => "gpu",
            BackendChoice::Cpu => "cpu",
        })
    }
}

/// An execution backend.
#[derive(Clone, Debug)]
pub enum Backend {
    Cpu(CpuBackend),
    Gpu(GpuBackend),
}

impl Backend {
    /// Opens the backend named by `CORVID_BACKEND` (default `auto`).
    pub fn from_env() -> Result<Backend, BackendError> {
        let choice = match std::env::var(BACKEND_ENV) {
            Ok(v) => v.parse()?,
            Err(_) => BackendChoice::Auto,
        };
        Backend::open(choice)
    }

    /// Opens a backend and logs which one, on which adapter, and why.
    pub fn open(choice: BackendChoice) -> Result<Backend, BackendError> {
        let backend = match choice {
            BackendChoice::Cpu => {
                let b = Backend::Cpu(CpuBackend::new());
                tracing::info!(backend = "cpu", class = %b.class(), "using the cpu backend: requested");
                b
            }
            BackendChoice::Gpu => {
                let g = GpuBackend::new(true)?;
                let a = g.adapter();
                tracing::info!(backend = "gpu", adapter = %a.name, api = %a.backend, driver = %a.driver,
                    device_type = %a.device_type, "using the gpu backend: requested");
                Backend::Gpu(g)
            }
            BackendChoice::Auto => match GpuBackend::new(false) {
                Ok(g) => {
                    let a = g.adapter();
                    tracing::info!(backend = "gpu", adapter = %a.name, api = %a.backend, driver = %a.driver,
                        device_type = %a.device_type, "using the gpu backend: hardware adapter found");
                    Backend::Gpu(g)
                }
                Err(e) => {
                    let b = Backend::Cpu(CpuBackend::new());
                    tracing::info!(backend = "cpu", class = %b.class(),
                        "using the cpu backend: {e}; software adapters are slower than the cpu path \
                         (set {BACKEND_ENV}=gpu to use one anyway)");
                    b
                }
            },
        };
        Ok(backend)
    }

    /// Runs a program within this backend's own [`Backend::budget`], never cancelled.
    pub fn run(&self, program: &Program, inputs: &[Tensor]) -> Result<Vec<Tensor>, ExecError> {
        match self {
            Backend::Cpu(c) => c.run(program, inputs),
            Backend::Gpu(g) => g.run(program, inputs),
        }
    }

    /// Like [`Backend::run`], for inputs shared with the caller: nothing is copied on the host.
    pub fn run_shared(
        &self,
        program: &Program,
        inputs: &[Arc<Tensor>],
    ) -> Result<Vec<Tensor>, ExecError> {
        self.run_with(program, inputs, &self.guard())
    }

    /// Runs a program that `guard`'s budget admits, stopping when its cancel token says so.
    pub fn run_with(
        &self,
        program: &Program,
        inputs: &[Arc<Tensor>],
        guard: &Guard,
    ) -> Result<Vec<Tensor>, ExecError> {
        Ok(self.execute(program, inputs, guard, false)?.0)
    }

    /// Runs a program and also returns the content id of every node's output, in program
    /// order: what a worker signs so that two disagreeing results can be traced to the first
    /// op where they differ. Each value is hashed as it is made and freed after its last use,
    /// so a traced run needs no more memory than a plain one.
    pub fn run_traced(
        &self,
        program: &Program,
        inputs: &[Arc<Tensor>],
        guard: &Guard,
    ) -> Result<(Vec<Tensor>, Vec<ContentId>), ExecError> {
        self.execute(program, inputs, guard, true)
    }

    fn execute(
        &self,
        program: &Program,
        inputs: &[Arc<Tensor>],
        guard: &Guard,
        trace: bool,
    ) -> Result<(Vec<Tensor>, Vec<ContentId>), ExecError> {
        match self {
            Backend::Cpu(c) => {
                let refs: Vec<&Tensor> = inputs.iter().map(|t| &**t).collect();
                c.execute(program, &refs, guard, trace)
            }
            Backend::Gpu(g) => g.execute(program, inputs.to_vec(), guard, trace),
        }
    }

    /// The limits every run on this backend is held to unless the caller sets tighter ones:
    /// the device's binding limit per tensor, the default structure limits, and no limit on
    /// memory or FLOPs (a local program's own business).
    pub fn budget(&self) -> Budget {
        Budget::local(self.max_tensor_bytes())
    }

    /// [`Backend::budget`] with no deadline.
    pub fn guard(&self) -> Guard {
        Guard::new(self.budget(), Cancel::none())
    }

    pub fn class(&self) -> &DeterminismClass {
        match self {
            Backend::Cpu(c) => c.class(),
            Backend::Gpu(g) => g.class(),
        }
    }

    /// Largest tensor this backend accepts, in bytes (by extent; see [`crate::budget`]).
    pub fn max_tensor_bytes(&self) -> u64 {
        match self {
            Backend::Cpu(_) => crate::cpu::MAX_TENSOR_BYTES,
            Backend::Gpu(g) => g.adapter().max_binding,
        }
    }

    /// One line naming the backend and adapter.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu(c) => format!("cpu ({})", c.class().adapter),
            Backend::Gpu(g) => {
                let a = g.adapter();
                format!(
                    "gpu: {} ({}, {}, driver {})",
                    a.name, a.backend, a.device_type, a.driver
                )
            }
        }
    }
}
