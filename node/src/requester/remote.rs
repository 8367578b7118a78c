//! Round trips to workers (work, replicas) and settling disputes by a local recompute.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::{ContentId, Tensor as Data};
use corvid_sdk::LocalExecutor;
use corvid_sdk::plan::Subgraph;
use corvid_sdk::wire::{Input, Receipt, TaskRequest, TaskResponse};
use libp2p::PeerId;
use rand::Rng;

use crate::node::{NodeClient, NodeError};
use crate::trust::{self, Refusal, Verifier};

use super::*;

/// Sends a task, waits for the answer within `timeout`, and checks it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn remote(
    node: &NodeClient,
    memory: &Arc<Mutex<Memory>>,
    verifier: &Arc<Verifier>,
    peer: PeerId,
    wire_task: u64,
    sg: &Subgraph,
    inputs: Vec<Arc<Data>>,
    held: Vec<bool>,
    timeout: Duration,
) -> Result<Accepted, Refusal> {
    let nonce: [u8; 16] = rand::rng().random();
    let sent = Instant::now();
    let send = |held: &[bool]| {
        let data = inputs
            .iter()
            .zip(held)
            .map(|(t, &h)| {
                if h {
                    Input::Held
                } else {
                    Input::Data(t.clone())
                }
            })
            .collect();
        TaskRequest::new(wire_task, nonce, sg, data)
    };
    let used_held = std::sync::atomic::AtomicBool::new(held.iter().any(|&h| h));
    let ask = async {
        let mut response = node.run_task(peer, send(&held)).await;
        if let Ok(TaskResponse::Missing { .. }) = &response {
            // The worker evicted a value: send everything.
            used_held.store(false, std::sync::atomic::Ordering::Relaxed);
            response = node.run_task(peer, send(&vec![false; inputs.len()])).await;
        }
        response
    };
    // The inputs' content ids (for the receipt) are hashed while the worker computes.
    let hashing = {
        let (memory, ids, inputs) = (memory.clone(), sg.input_ids.clone(), inputs.clone());
        tokio::task::spawn_blocking(move || {
            let clock = trust::Stopwatch::start();
            (content_ids(&memory, &ids, &inputs), clock.secs())
        })
    };
    let response = match tokio::time::timeout(timeout, ask).await {
        Err(_) => {
            return Err(Refusal::Failed(format!(
                "no answer within {:.1} s",
                timeout.as_secs_f64()
            )));
        }
        Ok(Err(NodeError::Remote { error, .. })) => {
            return Err(Refusal::Unreachable(error.to_string()));
        }
        Ok(Err(e)) => return Err(Refusal::Failed(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let elapsed_secs = sent.elapsed().as_secs_f64();
    let (outputs, compute_micros, receipt, signature, signer) = match response {
        TaskResponse::Done {
            outputs,
            compute_micros,
            receipt,
            signature,
            signer,
            ..
        } => (outputs, compute_micros, receipt, signature, signer),
        TaskResponse::Failed { error, .. } => return Err(Refusal::Failed(error.to_string())),
        TaskResponse::Missing { inputs, .. } => {
            return Err(Refusal::Failed(format!(
                "the worker lacks inputs {inputs:?} even when sent"
            )));
        }
    };
    let (input_cids, hash_secs) = hashing
        .await
        .map_err(|e| Refusal::Failed(format!("hashing panicked: {e}")))?;
    let used_held = used_held.into_inner();
    let memory = memory.clone();
    let verifier = verifier.clone();
    let sg = sg.clone();
    tokio::task::spawn_blocking(move || {
        let clock = trust::Stopwatch::start();
        check_shapes(&sg, &outputs).map_err(Refusal::Failed)?;
        let cids: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        let opened = trust::open_receipt(
            &peer,
            &signer,
            &signature,
            &receipt,
            &trust::Expected {
                task: &trust::key_of(&sg, &input_cids),
                nonce: &nonce,
                outputs: &cids,
                program: &sg.program,
            },
        );
        if let Err(Refusal::Cheated { reason, evidence }) = &opened
            && reason == trust::OTHER_INPUTS
            && used_held
        {
            // It ran on values it held, which differ from what we meant: stale, not proof.
            let mut mem = lock(&memory);
            for (id, h) in sg.input_ids.iter().zip(&held) {
                if *h && let Some(holders) = mem.held.get_mut(id) {
                    holders.remove(&peer);
                }
            }
            return Err(Refusal::Failed(format!(
                "the worker's held inputs were stale ({evidence})"
            )));
        }
        opened?;
        let check = verifier.check(&sg, &inputs, &input_cids, &outputs, &receipt.class)?;
        Ok(Accepted {
            outputs,
            cids,
            op_hashes: receipt.op_hashes,
            class: receipt.class,
            check: Some(check),
            verify_secs: clock.secs() + hash_secs,
            compute_secs: Some(compute_micros as f64 / 1e6),
            elapsed_secs,
        })
    })
    .await
    .map_err(|e| Refusal::Failed(format!("verification panicked: {e}")))?
}

/// Runs the replica and, if it disagrees with `first`, settles the dispute locally.
#[allow(clippy::too_many_arguments)]
pub(super) async fn replica_verdict(
    node: NodeClient,
    memory: Arc<Mutex<Memory>>,
    verifier: Arc<Verifier>,
    local: Arc<LocalExecutor>,
    peer: PeerId,
    sg: Subgraph,
    inputs: Vec<Arc<Data>>,
    first: Arc<Accepted>,
) -> Replica {
    let nonce: [u8; 16] = rand::rng().random();
    let req = TaskRequest::new(
        rand::rng().random(),
        nonce,
        &sg,
        inputs.iter().map(|t| Input::Data(t.clone())).collect(),
    );
    // As long as a task's deadline would be, from the primary's round trip.
    let timeout = Duration::from_secs_f64(2.0 + 4.0 * first.elapsed_secs);
    let (outputs, receipt, signature, signer) =
        match tokio::time::timeout(timeout, node.run_task(peer, req)).await {
            Ok(Ok(TaskResponse::Done {
                outputs,
                receipt,
                signature,
                signer,
                ..
            })) => (outputs, receipt, signature, signer),
            Ok(Ok(other)) => return Replica::Unusable(format!("{other:?}")),
            Ok(Err(e)) => return Replica::Unusable(e.to_string()),
            Err(_) => return Replica::Unusable("timed out".into()),
        };
    tokio::task::spawn_blocking(move || {
        if let Err(e) = check_shapes(&sg, &outputs) {
            return Replica::Unusable(e);
        }
        let input_cids = content_ids(&memory, &sg.input_ids, &inputs);
        let cids: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        if let Err(r) = trust::open_receipt(
            &peer,
            &signer,
            &signature,
            &receipt,
            &trust::Expected {
                task: &trust::key_of(&sg, &input_cids),
                nonce: &nonce,
                outputs: &cids,
                program: &sg.program,
            },
        ) {
            return Replica::Cheated(r);
        }
        if cids == first.cids {
            return Replica::Agreed;
        }
        // Different classes agree within tolerance.
        if receipt.class != first.class {
            let tol = corvid_kernels::verify::program_tolerance(&sg.program);
            let close =
                outputs
                    .iter()
                    .zip(&first.outputs)
                    .all(|(a, b)| match (a.as_f32(), b.as_f32()) {
                        (Ok(x), Ok(y)) => x.iter().zip(y).all(|(p, q)| tol.accepts(*p, *q)),
                        _ => a == b,
                    });
            if close {
                return Replica::Agreed;
            }
        }
        dispute(&verifier, &local, &sg, &inputs, &first, &outputs, &receipt)
    })
    .await
    .unwrap_or_else(|e| Replica::Unusable(format!("dispute panicked: {e}")))
}

/// Two signed results disagree: decide here who is wrong.
///
/// When both workers and this requester share a determinism class, their per-op hashes are
/// comparable bit for bit: the first op where the two receipts differ is recomputed here (with
/// only the ops it depends on) and whoever's hash for it differs from ours is wrong there. If
/// only the replica is, the primary's result — already accepted, and not vouched for by the
/// replica's lie — is then recomputed in full. Otherwise (classes differ, or the receipts agree
/// op by op but not on the outputs) the whole subgraph is recomputed and each result compared
/// with it, exactly within a class and within tolerance across classes. A failure to compute
/// here decides nothing.
pub(super) fn dispute(
    verifier: &Verifier,
    local: &LocalExecutor,
    sg: &Subgraph,
    inputs: &[Arc<Data>],
    first: &Accepted,
    second: &[Arc<Data>],
    receipt: &Receipt,
) -> Replica {
    let mine = local.backend().class().id();
    let name = |k: usize| format!("op {k} ({})", sg.program.nodes[k].op);
    let first_differing = first
        .op_hashes
        .iter()
        .zip(&receipt.op_hashes)
        .position(|(a, b)| a != b);
    let full = || FullRecompute::new(verifier, local, sg, inputs);
    if first.class == mine
        && receipt.class == mine
        && let Some(k) = first_differing
        && let Some((cone, kept)) = sg.program.cone(k)
        && let Ok((_, hashes)) = local
            .backend()
            .run_traced(&cone, inputs, &local.backend().guard())
    {
        // Both receipts were opened against this program: one hash per op.
        let judge = |claimed: &[ContentId]| {
            kept.iter()
                .zip(&hashes)
                .find(|&(&i, h)| claimed.get(i) != Some(h))
                .map(|(&i, _)| {
                    format!(
                        "subgraph {}: {} differs from a local recompute of that op ({} of {} \
                         ops recomputed)",
                        sg.id.short(),
                        name(i),
                        kept.len(),
                        sg.program.nodes.len()
                    )
                })
        };
        let mut primary_wrong = judge(&first.op_hashes);
        let replica_wrong = judge(&receipt.op_hashes);
        if primary_wrong.is_none() && replica_wrong.is_some() {
            match full().judge(&first.outputs, &first.op_hashes, &first.class) {
                Ok(verdict) => primary_wrong = verdict,
                Err(why) => tracing::warn!(%why, "could not recompute the primary's result"),
            }
        }
        tracing::warn!(subgraph = %sg.id.short(), op = %name(k), ?primary_wrong, ?replica_wrong,
            "replicas disagree; recomputed the first op that differs");
        return Replica::Dispute {
            primary_wrong,
            replica_wrong,
        };
    }
    let full = full();
    let verdicts = full
        .judge(&first.outputs, &first.op_hashes, &first.class)
        .and_then(|p| Ok((p, full.judge(second, &receipt.op_hashes, &receipt.class)?)));
    match verdicts {
        Ok((primary_wrong, replica_wrong)) => {
            tracing::warn!(subgraph = %sg.id.short(), ?primary_wrong, ?replica_wrong,
                "replicas disagree; recomputed the subgraph");
            Replica::Dispute {
                primary_wrong,
                replica_wrong,
            }
        }
        Err(why) => Replica::Unusable(format!("replicas disagree, undecided: {why}")),
    }
}

/// A whole subgraph recomputed here to judge results against (traced once, when a result of
/// this machine's class needs it).
pub(super) struct FullRecompute<'a> {
    verifier: &'a Verifier,
    local: &'a LocalExecutor,
    sg: &'a Subgraph,
    inputs: &'a [Arc<Data>],
    here: std::cell::OnceCell<Result<Trace, String>>,
}

/// Content ids of a local run's outputs, and of every op's value.
pub(super) type Trace = (Vec<ContentId>, Vec<ContentId>);

impl<'a> FullRecompute<'a> {
    fn new(
        verifier: &'a Verifier,
        local: &'a LocalExecutor,
        sg: &'a Subgraph,
        inputs: &'a [Arc<Data>],
    ) -> Self {
        FullRecompute {
            verifier,
            local,
            sg,
            inputs,
            here: std::cell::OnceCell::new(),
        }
    }

    /// `Some(evidence)` if the result is wrong, `None` if right; an error if this machine
    /// could not tell.
    fn judge(
        &self,
        outputs: &[Arc<Data>],
        op_hashes: &[ContentId],
        class: &[u8; 32],
    ) -> Result<Option<String>, String> {
        let sg = self.sg;
        if *class != self.local.backend().class().id() {
            // Another class: within tolerance of a recompute here.
            return Ok(self
                .verifier
                .recompute(sg, self.inputs, outputs, class)?
                .err()
                .map(|m| format!("subgraph {}: {m}", sg.id.short())));
        }
        // Same class: the outputs and every op's hash must be ours, bit for bit.
        let here = self.here.get_or_init(|| {
            self.local
                .backend()
                .run_traced(&sg.program, self.inputs, &self.local.backend().guard())
                .map(|(outs, hashes)| (outs.iter().map(Data::content_id).collect(), hashes))
                .map_err(|e| format!("subgraph {}: local recompute failed: {e}", sg.id.short()))
        });
        let (cids, hashes) = here.as_ref().map_err(Clone::clone)?;
        let got: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        if got == *cids && op_hashes == hashes.as_slice() {
            return Ok(None);
        }
        let at = hashes
            .iter()
            .zip(op_hashes)
            .position(|(a, b)| a != b)
            .map_or("its outputs".to_string(), |k| {
                format!("op {k} ({})", sg.program.nodes[k].op)
            });
        Ok(Some(format!(
            "subgraph {} first differs from a local recompute at {at}",
            sg.id.short()
        )))
    }
}
