//! The developer's way into the swarm: a requester node that runs plans on other peers.
//!
//! `Client::local(n)` starts an embedded swarm of `n` worker nodes plus a requester on loopback
//! (the default for development); `Client::connect(addrs)` joins an existing swarm as a
//! requester-only peer. `client.executor()` plugs into [`corvid_sdk::Graph::with_executor`], so
//! the same graph code runs locally or across the swarm.
//!
//! Every result a worker returns is signed and checked before it is used (see [`crate::trust`]);
//! a peer caught lying is banned and its unconfirmed work in the job is redone. Verified
//! results are cached by subgraph id, and workers keep the values they were sent, so a repeated
//! job or a shared subgraph costs neither compute nor transfer.
//!
//! Layout: `client` (the public [`Client`], its builder and runtime), `executor` (what the
//! requester remembers between jobs, and [`SwarmExecutor`]), `job` (one job's event loop over
//! the scheduler's decisions), `remote` (round trips to workers for work, canaries and replicas),
//! `summary` (the [`JobSummary`] a developer reads); this file
//! holds what they share.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use corvid_kernels::{ContentId, Recipe, Tensor as Data};
use corvid_sdk::job::{JobState, Pending};
use corvid_sdk::plan::{Leaf, Plan, Source, Subgraph};
use corvid_sdk::wire::Input;
use libp2p::PeerId;

use crate::trust::{CheckKind, Claim, Refusal};

mod client;
mod executor;
mod job;
mod remote;
mod summary;

pub use client::{Client, ClientBuilder, ClientError};
pub use executor::SwarmExecutor;
pub use summary::{JobSummary, PlaceSummary, VerifySummary};

use executor::*;
use job::*;
use remote::*;

/// How often running tasks are checked against their deadlines.
const TICK: Duration = Duration::from_millis(50);

/// Verified results the requester keeps across jobs, in bytes.
const CACHE_BYTES: u64 = 1 << 30;

/// Entries of the requester's "who holds what" and content-id tables before they are reset.
const MAX_TABLE: usize = 100_000;

/// How long a peer a task could not reach stays out of later jobs while it is not connected.
const FORGET_UNREACHABLE: Duration = Duration::from_secs(60);

/// Constants on their way to peers tracked before the ones that landed are dropped.
const MAX_LANDING: usize = 1024;
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
/// A result that passed its checks.
#[derive(Debug)]
struct Accepted {
    outputs: Vec<Arc<Data>>,
    cids: Vec<ContentId>,
    op_hashes: Vec<ContentId>,
    class: [u8; 32],
    /// How it was checked (`None`: computed here).
    check: Option<CheckKind>,
    verify_secs: f64,
    compute_secs: Option<f64>,
    /// Round trip of the request, seconds.
    elapsed_secs: f64,
}

impl Accepted {
    fn claim(&self) -> Claim<'_> {
        Claim {
            outputs: &self.outputs,
            cids: &self.cids,
            op_hashes: &self.op_hashes,
            class: &self.class,
        }
    }
}

type TaskOutcome = (u64, Result<Accepted, Refusal>);

struct ReplicaOutcome {
    subgraph: usize,
    primary: PeerId,
    replica: PeerId,
    flops: u64,
    verify_secs: f64,
    verdict: Replica,
}

/// Who produced a subgraph's accepted result, and how it was checked.
#[derive(Clone, Copy, Debug)]
struct Producer {
    peer: Option<PeerId>,
    check: Option<CheckKind>,
}
/// The inputs of subgraph `sg`: constants and earlier results.
fn gather(plan: &Plan, sg: usize, results: &[Option<Arc<Vec<Arc<Data>>>>]) -> Vec<Arg> {
    plan.subgraphs[sg]
        .inputs
        .iter()
        .map(|s| match *s {
            Source::Leaf(i) => Arg::Leaf(plan.leaves[i].clone()),
            Source::Output { subgraph, output } => Arg::Value(
                results[subgraph]
                    .as_ref()
                    .expect("the scheduler waits for dependencies")[output]
                    .clone(),
            ),
        })
        .collect()
}

/// A subgraph input on the requester: a value it holds, or a constant of the plan, which
/// travels as its recipe if it has one and is made here only when something here reads it.
#[derive(Clone, Debug)]
enum Arg {
    Value(Arc<Data>),
    Leaf(Arc<Leaf>),
}

impl Arg {
    /// The values; a recipe not made yet is made now (call it off the async threads).
    fn data(&self) -> Arc<Data> {
        match self {
            Arg::Value(t) => t.clone(),
            Arg::Leaf(l) => l.get().clone(),
        }
    }

    /// The recipe it travels as, if it has one.
    fn recipe(&self) -> Option<&Recipe> {
        match self {
            Arg::Value(_) => None,
            Arg::Leaf(l) => l.how(),
        }
    }

    /// How it travels to a worker.
    fn wire(&self) -> Input {
        match self {
            Arg::Value(t) => Input::Data(t.clone()),
            Arg::Leaf(l) => match l.how() {
                Some(r) => Input::Recipe(r.clone()),
                None => Input::Data(l.get().clone()),
            },
        }
    }
}

/// A result must have the program's output count, dtypes and shapes; says how it differs.
fn check_shapes(sg: &Subgraph, outs: &[Arc<Data>]) -> Result<(), String> {
    let program = &sg.program;
    // The plan's programs type-check (the partitioner made them): inference cannot fail.
    let metas = program.infer().map_err(|e| e.to_string())?;
    if outs.len() != program.outputs.len() {
        return Err(format!(
            "{} outputs returned, {} expected",
            outs.len(),
            program.outputs.len()
        ));
    }
    for (i, (t, &o)) in outs.iter().zip(&program.outputs).enumerate() {
        if t.meta() != metas[o as usize] {
            return Err(format!(
                "output {i} is {}, expected {}",
                t.meta(),
                metas[o as usize]
            ));
        }
    }
    Ok(())
}
