//! The kernels' integration tests, one module per subject, in one test binary (one link
//! instead of one per file). `peak_memory.rs` stays apart: it installs a counting allocator.

mod common;

mod conformance;
mod fuzz_corpus;
mod hostile;
mod known_answers;
mod verify;
mod wgsl;
mod wire;
