//! Corvid's closed set of tensor ops.
//!
//! Each op is plain data ([`Op`]) with shape inference ([`shape::infer`]), a clear ndarray
//! reference that defines it ([`mod@reference`]), a fast CPU path ([`cpu`]) and a WGSL kernel run
//! through wgpu ([`gpu`]). [`registry()`] lists every op with its tolerance and a generator of
//! random valid cases; the conformance tests, benchmarks and the network's verifier iterate it.
//!
//! ```
//! use corvid_kernels::{Backend, BackendChoice, Op, BinaryOp, Program, Tensor};
//!
//! let a = Tensor::from_f32([3], vec![1.0, 2.0, 3.0])?;
//! let b = Tensor::from_f32([3], vec![5.0, 22.0, 7.0])?;
//! let program = Program::single(Op::Binary(BinaryOp::Add), vec![a.meta(), b.meta()]);
//! let backend = Backend::open(BackendChoice::Cpu)?;
//! let out = backend.run(&program, &[a, b])?;
//! assert_eq!(out[0].as_f32()?, &[6.0, 24.0, 10.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backend;
pub mod budget;
pub mod cancel;
pub mod checked;
pub mod class;
pub mod cpu;
pub mod exec;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
pub mod op;
pub mod program;
pub mod recipe;
pub mod reference;
pub mod registry;
pub mod shape;
pub mod tensor;
pub mod verify;

pub use backend::{Backend, BackendChoice};
pub use budget::{Budget, Footprint, Limit, TooLarge};
pub use cancel::Cancel;
pub use class::{BackendKind, DeterminismClass};
pub use cpu::CpuBackend;
pub use exec::{BackendError, ExecError};
pub use gpu::{AdapterSummary, GpuBackend};
pub use op::{BinaryOp, Op, ReduceOp, Tolerance, UnaryOp};
pub use program::{Node, Program, ProgramError, ValueId};
pub use recipe::{Recipe, RecipeError};
pub use registry::{OpSpec, Sample, registry};
pub use shape::OpError;
pub use tensor::{ContentId, DType, Tensor, TensorError, TensorMeta};
