//! Round trips to workers: one request and its signed answer ([`Remote::round_trip`]), shared
//! by work and canaries ([`Remote::run`], which opens and checks the answer) and by replicas
//! ([`Remote::replica`], which judges it against the accepted one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::{ContentId, Tensor as Data};
use corvid_sdk::plan::Subgraph;
use corvid_sdk::sched::TaskFailure;
use corvid_sdk::wire::{Input, Receipt, TaskRequest, TaskResponse};
use corvid_sdk::{LocalExecutor, ValueId};
use libp2p::PeerId;
use rand::Rng;

use crate::node::{NodeClient, NodeError};
use crate::trust::{self, Forgery, Refusal, ReplicaVerdict, Verifier};

use super::*;

/// What a job needs to talk to workers and judge their answers.
#[derive(Clone, Debug)]
pub(super) struct Remote {
    pub(super) node: NodeClient,
    pub(super) cids: Arc<ContentIds>,
    pub(super) verifier: Arc<Verifier>,
    pub(super) local: Arc<LocalExecutor>,
    /// Bytes sent a second time to each peer, in full, because it did not hold what it was
    /// named (it evicted it, or the task that carried it had not reached it yet).
    pub(super) resent: Arc<Mutex<HashMap<PeerId, u64>>>,
}

/// A worker's signed answer, not yet opened.
struct Signed {
    outputs: Vec<Arc<Data>>,
    compute_micros: u64,
    receipt: Receipt,
    signature: Vec<u8>,
    signer: Vec<u8>,
}

impl Remote {
    /// Sends `request` to `peer` and waits up to `timeout` for its signed answer. A worker that
    /// evicted a value it was told it holds answers `Missing`: then everything is sent once
    /// more. The flag says whether the answer is over values the worker held.
    async fn round_trip(
        &self,
        peer: PeerId,
        request: TaskRequest,
        full: Vec<Input>,
        timeout: Duration,
    ) -> Result<(Signed, bool), TaskFailure> {
        let held = request.inputs.iter().any(|i| matches!(i, Input::Held));
        let n_inputs = request.inputs.len();
        let used_held = AtomicBool::new(held);
        let ask = async {
            // Kept only if it may be needed again (its tensors are shared, not copied).
            let again = held.then(|| request.clone());
            let mut response = self.node.run_task(peer, request).await;
            if let (Ok(TaskResponse::Missing { .. }), Some(mut again)) = (&response, again) {
                used_held.store(false, Ordering::Relaxed);
                let bytes: u64 = full
                    .iter()
                    .map(|i| match i {
                        Input::Data(d) => d.meta().bytes(),
                        Input::Recipe(_) | Input::Held => 0,
                    })
                    .sum();
                tracing::debug!(%peer, bytes, "the worker did not hold what it was named: sending everything again");
                *lock(&self.resent).entry(peer).or_default() += bytes;
                again.inputs = full;
                response = self.node.run_task(peer, again).await;
            }
            response
        };
        let response = match tokio::time::timeout(timeout, ask).await {
            Err(_) => return Err(TaskFailure::NoAnswer(timeout)),
            Ok(Err(NodeError::Remote { error, .. })) => {
                return Err(TaskFailure::Unreachable(error));
            }
            Ok(Err(e)) => return Err(TaskFailure::Transport(e.to_string())),
            Ok(Ok(r)) => r,
        };
        match response {
            TaskResponse::Done {
                outputs,
                compute_micros,
                receipt,
                signature,
                signer,
                ..
            } => Ok((
                Signed {
                    outputs,
                    compute_micros,
                    receipt,
                    signature,
                    signer,
                },
                used_held.into_inner(),
            )),
            TaskResponse::Failed { error, .. } => Err(TaskFailure::Worker(error.bounded())),
            // Positions that exist, each once: the peer chose the list.
            TaskResponse::Missing { mut inputs, .. } => {
                inputs.retain(|&i| i < n_inputs);
                inputs.sort_unstable();
                inputs.dedup();
                Err(TaskFailure::MissingInputs(inputs))
            }
        }
    }

    /// Runs `sg` on `peer` (work or a canary), waits for the answer within `timeout`, opens its
    /// receipt and checks it. Inputs flagged in `held` travel by id only.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        &self,
        peer: PeerId,
        wire_task: u64,
        sg: &Subgraph,
        args: Vec<Arg>,
        held: Vec<bool>,
        timeout: Duration,
        sample_rows: usize,
    ) -> Result<Accepted, Refusal> {
        let nonce: [u8; 16] = rand::rng().random();
        let full: Vec<Input> = args.iter().map(Arg::wire).collect();
        let data = full
            .iter()
            .zip(&held)
            .map(|(i, &h)| if h { Input::Held } else { i.clone() })
            .collect();
        let request = TaskRequest::new(wire_task, nonce, sg, data);
        let sent = Instant::now();
        // While the worker computes, the inputs are made here (recipes, for the checks) and
        // their content ids hashed (for the receipt).
        let small = is_small(sg);
        let hashing = {
            let (memo, ids) = (self.cids.clone(), sg.input_ids.clone());
            OffThread::start(small, move || {
                let clock = trust::Stopwatch::start();
                let inputs: Vec<Arc<Data>> = args.iter().map(Arg::data).collect();
                (
                    content_ids(&memo, &ids, &args, &inputs),
                    inputs,
                    clock.secs(),
                )
            })
        };
        let (signed, used_held) = self.round_trip(peer, request, full, timeout).await?;
        let elapsed_secs = sent.elapsed().as_secs_f64();
        let (input_cids, inputs, hash_secs) = hashing
            .finish()
            .await
            .map_err(|e| TaskFailure::Unchecked(format!("hashing panicked: {e}")))?;
        let this = self.clone();
        let sg = sg.clone();
        OffThread::start(small, move || {
            let clock = trust::Stopwatch::start();
            let cids: Vec<ContentId> = signed.outputs.iter().map(|t| t.content_id()).collect();
            match open(peer, &signed, &sg, &input_cids, &nonce, &cids) {
                // It ran on values it held, which differ from what we meant: stale, not proof.
                // (The job tells the scheduler it no longer holds them.)
                Err(Forgery::OtherInputs(evidence)) if used_held => {
                    let held = (0..held.len()).filter(|&i| held[i]).collect();
                    return Err(TaskFailure::StaleHeld { held, evidence }.into());
                }
                opened => opened?,
            }
            // Signed, so the wrong shape is the peer's word: no honest run of this program
            // makes it.
            check_shapes(&sg, &signed.outputs).map_err(|why| Refusal::Cheated {
                reason: format!("malformed result, signed: {why}"),
                evidence: format!(
                    "subgraph {} ({}): {why}; the receipt signs outputs {}",
                    sg.id.short(),
                    sg.ops(),
                    cids.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
            let check = this.verifier.check(
                &sg,
                &inputs,
                &input_cids,
                &signed.outputs,
                &signed.receipt.class,
                sample_rows,
            )?;
            let checked = clock.secs();
            tracing::debug!(%peer, sg = %sg.id.short(), answered_after = elapsed_secs,
                inputs_made_and_hashed = hash_secs, checked, "answer accepted");
            Ok(Accepted {
                outputs: signed.outputs,
                cids,
                op_hashes: signed.receipt.op_hashes,
                class: signed.receipt.class,
                check: Some(check),
                verify_secs: checked + hash_secs,
                compute_secs: Some(signed.compute_micros as f64 / 1e6),
                elapsed_secs,
            })
        })
        .finish()
        .await
        .map_err(|e| TaskFailure::Unchecked(format!("verification panicked: {e}")))?
    }

    /// Runs `sg` again on `peer` and judges its answer against `first`, accepted from another
    /// peer; a disagreement is settled by a recompute here.
    pub(super) async fn replica(
        &self,
        peer: PeerId,
        sg: Subgraph,
        args: Vec<Arg>,
        first: Arc<Accepted>,
    ) -> Replica {
        let nonce: [u8; 16] = rand::rng().random();
        let full: Vec<Input> = args.iter().map(Arg::wire).collect();
        let request = TaskRequest::new(rand::rng().random(), nonce, &sg, full.clone());
        // As long as a task's deadline would be, from the primary's round trip.
        let timeout = Duration::from_secs_f64(2.0 + 4.0 * first.elapsed_secs);
        let signed = match self.round_trip(peer, request, full, timeout).await {
            Ok((signed, _)) => signed,
            Err(e) => return Replica::Unusable(e),
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = check_shapes(&sg, &signed.outputs) {
                return Replica::Unusable(TaskFailure::Malformed(e));
            }
            let inputs: Vec<Arc<Data>> = args.iter().map(Arg::data).collect();
            let input_cids = content_ids(&this.cids, &sg.input_ids, &args, &inputs);
            let cids: Vec<ContentId> = signed.outputs.iter().map(|t| t.content_id()).collect();
            if let Err(f) = open(peer, &signed, &sg, &input_cids, &nonce, &cids) {
                return Replica::Forged(f);
            }
            let second = trust::Claim {
                outputs: &signed.outputs,
                cids: &cids,
                op_hashes: &signed.receipt.op_hashes,
                class: &signed.receipt.class,
            };
            Replica::Judged(trust::judge_replica(
                &this.verifier,
                &this.local,
                &sg,
                &inputs,
                &first.claim(),
                &second,
            ))
        })
        .await
        .unwrap_or_else(|e| {
            Replica::Unusable(TaskFailure::Unchecked(format!("dispute panicked: {e}")))
        })
    }
}

/// The content ids a worker's receipt names for inputs `args` (values `ids`, made as
/// `inputs`): a recipe's own id, as the worker was sent it; a value's hash, memoised.
fn content_ids(
    memo: &ContentIds,
    ids: &[ValueId],
    args: &[Arg],
    inputs: &[Arc<Data>],
) -> Vec<ContentId> {
    let (mut hash_ids, mut hash_inputs) = (Vec::new(), Vec::new());
    for ((id, a), t) in ids.iter().zip(args).zip(inputs) {
        if a.recipe().is_none() {
            hash_ids.push(*id);
            hash_inputs.push(t.clone());
        }
    }
    let mut hashed = memo.of(&hash_ids, &hash_inputs).into_iter();
    args.iter()
        .map(|a| match a.recipe() {
            Some(r) => r.id(),
            None => hashed.next().expect("one hash per input without a recipe"),
        })
        .collect()
}

/// Opens `signed` as the answer of `peer` to the request for `sg` on inputs with content ids
/// `input_cids`, with this `nonce`, carrying outputs with content ids `cids`.
fn open(
    peer: PeerId,
    signed: &Signed,
    sg: &Subgraph,
    input_cids: &[ContentId],
    nonce: &[u8; 16],
    cids: &[ContentId],
) -> Result<(), Forgery> {
    trust::open_receipt(
        &peer,
        &signed.signer,
        &signed.signature,
        &signed.receipt,
        &trust::Expected {
            task: &trust::key_of(sg, input_cids),
            nonce,
            outputs: cids,
            program: &sg.program,
        },
    )
}

/// Inputs and outputs of at most this many bytes in all, and at most this much arithmetic,
/// make a task whose hashing and checks run on the async thread that handles its answer:
/// microseconds of work, where a hop to the blocking pool and back costs more.
const SMALL_BYTES: u64 = 64 << 10;
const SMALL_FLOPS: u64 = 1 << 20;

fn is_small(sg: &Subgraph) -> bool {
    sg.cost.bytes_in + sg.cost.bytes_out <= SMALL_BYTES && sg.cost.flops <= SMALL_FLOPS
}

/// Work done right here (small) or on the blocking pool, awaited the same way.
enum OffThread<T> {
    Done(T),
    Spawned(tokio::task::JoinHandle<T>),
}

impl<T: Send + 'static> OffThread<T> {
    fn start(here: bool, f: impl FnOnce() -> T + Send + 'static) -> Self {
        if here {
            OffThread::Done(f())
        } else {
            OffThread::Spawned(tokio::task::spawn_blocking(f))
        }
    }

    async fn finish(self) -> Result<T, tokio::task::JoinError> {
        match self {
            OffThread::Done(t) => Ok(t),
            OffThread::Spawned(h) => h.await,
        }
    }
}

/// What a replica showed.
#[derive(Debug)]
pub(super) enum Replica {
    /// Its answer, judged against the accepted one.
    Judged(ReplicaVerdict),
    /// Its answer could not be used; nothing is known.
    Unusable(TaskFailure),
    /// Its answer was forged (a bad signature, a replay): proof against the replica.
    Forged(Forgery),
}
