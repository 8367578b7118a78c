//! The requester's defences against untrusted workers: functions and state with no tokio and
//! no network (only the ledger touches a file, its ban list), so each rule is unit-tested on
//! its own.
//!
//! - [`receipt`]: a result is signed by the peer that was asked, for this task (subgraph and
//!   input content), this request's nonce and the outputs it carries; anything else is a
//!   [`Forgery`], proof of misbehaviour that bans the peer.
//! - [`verifier`]: every accepted result is checked on the requester, with random choices drawn
//!   after it arrived: Freivalds for matmuls, a sampled recompute of rows against the CPU
//!   reference for row-local programs, a full local recompute for anything else.
//! - [`dispute`]: a replica's answer against the accepted one: agreement, or a local recompute
//!   (of the first op whose signed hashes differ, when the classes allow) that says who lied.
//! - [`canary`]: tasks like the job's whose answer the requester computes itself.
//! - [`ledger`]: per-peer streaks of verified results decide how often a result is also
//!   replicated; banned peers (with the evidence) are persisted to a JSON file and never given
//!   work again.
//!
//! The requester's job loop (`crate::requester`) does the waiting and the sending, and calls
//! these.

use std::fmt;

use corvid_sdk::sched::TaskFailure;

pub mod canary;
pub mod dispute;
pub mod ledger;
pub mod receipt;
pub mod verifier;

pub use dispute::{Claim, ReplicaVerdict, judge_replica};
pub use ledger::{Ban, BanFileError, Trust};
pub use receipt::{Expected, Forgery, key_of, open_receipt};
pub use verifier::{Stopwatch, Verifier, compare};

/// Rows recomputed per sampled check of a new peer's result (every one is also replicated).
pub const SAMPLE_ROWS: usize = 4;
/// Rows recomputed per sampled check of a trusted peer's result, which is replicated only
/// sometimes: a result with at least 10 % of its rows wrong passes unnoticed with probability
/// at most 0.9³² ≈ 3.4 % (sampling without replacement misses less), 25 % with at most
/// 0.75³² ≈ 10⁻⁴.
pub const SAMPLE_ROWS_ALONE: usize = 32;
/// Verified results a new peer needs before its results are replicated only sometimes.
pub const NEW_PEER_STREAK: u32 = 8;
/// Replication probability once trusted: `max(MIN_REPLICATION, 1 / streak)`.
pub const MIN_REPLICATION: f64 = 0.05;

/// How a result was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckKind {
    /// Freivalds' test with [`corvid_kernels::verify::FREIVALDS_ROUNDS`] random ±1 vectors: a
    /// wrong entry passes with probability ≤ 2⁻²⁰.
    Freivalds,
    /// [`SAMPLE_ROWS`] or [`SAMPLE_ROWS_ALONE`] random rows recomputed: bit for bit on the requester's backend when the
    /// worker shares its class, else with the reference within tolerance.
    SampledRows,
    /// Recomputed in full on the requester.
    Recomputed,
    /// Not checked: only for measuring what checking costs (see
    /// `Client::without_checks_for_benchmarks`).
    Unchecked,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Freivalds => "freivalds",
            CheckKind::SampledRows => "sampled rows",
            CheckKind::Recomputed => "recomputed",
            CheckKind::Unchecked => "unchecked",
        })
    }
}

/// Why a result was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// Not the peer's fault, or not provably: retry elsewhere (an unreachable peer also leaves
    /// the job's placement).
    Failed(TaskFailure),
    /// Proof that the peer lied: ban it.
    Cheated { reason: String, evidence: String },
}

impl From<TaskFailure> for Refusal {
    fn from(f: TaskFailure) -> Refusal {
        Refusal::Failed(f)
    }
}

impl From<Forgery> for Refusal {
    fn from(f: Forgery) -> Refusal {
        Refusal::Cheated {
            reason: f.to_string(),
            evidence: f.evidence().to_string(),
        }
    }
}
