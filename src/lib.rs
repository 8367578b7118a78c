//! Corvid facade: re-exports the workspace crates.
pub use corvid_kernels as kernels;
pub use corvid_node as node;
pub use corvid_sdk as sdk;
