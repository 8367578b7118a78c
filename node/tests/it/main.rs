//! The node's integration tests, one module per subject, in one test binary (one link instead
//! of one per file). Run one with `cargo test -p corvid-node --test it requester::`.

mod common;

mod bootstrap_errors;
mod connections;
mod demo;
mod forged_adverts;

mod fuzz_corpus;
mod hostile;
mod jobs;
mod kill_worker;
mod metrics;
mod nat;
mod page;
mod process;
mod requester;
mod service;
mod stepping_aside;
mod swarm;
mod swarm_exec;
mod sybils;
mod tasks;
mod train;
mod trust;
