//! Corvid's developer SDK: build graphs of tensor ops like RavOp, and evaluate them locally or
//! (later) across the swarm.
//!
//! ```
//! use corvid_sdk::Graph;
//!
//! let g = Graph::new("quickstart");
//! let a = g.t(&[1.0, 2.0, 3.0]);
//! let b = g.t(&[5.0, 22.0, 7.0]);
//! let c = &a + &b;
//! println!("{}", c.eval()?);
//!
//! // Methods check shapes where the tensor is built:
//! let w = g.random(&[4, 2], -1.0, 1.0, 7);
//! let err = a.matmul(&w).unwrap_err();
//! assert!(err.to_string().contains("op 'matmul': matmul needs rank >= 2"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A graph is partitioned ([`plan`]) into content-addressed subgraphs ([`ids`]): large matmuls
//! are tiled, cheap ops fused, and the result is the same bits as evaluating the whole graph at
//! once on the CPU backend.

mod autodiff;
pub mod error;
pub mod exec;
pub mod failure;
pub mod graph;
pub mod ids;
pub mod job;
pub mod map;
pub mod model;
mod ops;
pub mod partition;
pub mod plan;
pub mod report;
pub mod sched;
pub mod tensor;
pub mod train;
pub mod wire;

pub use corvid_kernels as kernels;
pub use error::{BuildError, EvalError, Site};
pub use exec::{Executor, LocalExecutor, ResultCache};
pub use graph::Graph;
pub use ids::{SubgraphId, ValueId};
pub use job::{JobHandle, JobState, Progress, as_completed};
pub use map::Computation;
pub use model::{Model, ModelError};
pub use plan::{Cost, Leaf, Plan, Settings, Source, Subgraph};
pub use report::Report;
pub use tensor::Tensor;
