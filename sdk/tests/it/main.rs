//! The SDK's integration tests in one test binary (one link instead of one per file).

mod build;
mod partition;
