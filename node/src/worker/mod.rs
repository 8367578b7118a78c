//! The worker: runs subgraphs that peers send, at most `slots` at a time, in the executor
//! process ([`crate::sandbox`]) or, for tests and `--no-sandbox`, on a backend in this
//! process; caches results by task, and signs every result.
//!
//! Every request is treated as hostile until checked: its program is validated against the
//! node's [`Limits`] (rank, nodes, sizes, peak memory, FLOPs) before any of it runs, it gets a
//! deadline from its FLOPs and the benchmark, and a requester can cancel it, queued or running.
//! Failures go back as a typed [`TaskError`].
//!
//! Values a requester sent or had computed here are kept per requester (by the requester's
//! value ids), so its later tasks can name them instead of sending them again. Keeping them per
//! requester means one requester cannot plant values under ids another one will use.
//!
//! Layout: this file (the worker's loop and execution), `store` (the held store), `faults`
//! (cheating on purpose, only with the `fault-injection` feature).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corvid_kernels::backend::Guard;
use corvid_kernels::{
    Backend, Cancel, ContentId, DeterminismClass, Program, ProgramError, Recipe, Tensor as Data,
};
use corvid_sdk::wire::{
    Input, Receipt, TASK_VERSION, TaskError, TaskRequest, TaskResponse, task_key,
};
use corvid_sdk::{ResultCache, SubgraphId, ValueId};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::limits::Limits;
use crate::task_error;

#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod faults;
mod store;

use store::Held;

/// Cancellations of tasks not (yet) seen are remembered, at most this many.
const MAX_EARLY_CANCELS: usize = 4096;

/// One request to run, with the channel its answer goes back on.
#[derive(Debug)]
pub(crate) struct Work {
    pub peer: PeerId,
    pub request: TaskRequest,
    pub channel: ResponseChannel<TaskResponse>,
    /// The request's hold on the inbound budget: released when the task is answered.
    pub lease: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The data inputs of a task the node turned away busy, kept as if it had run: the task sent
/// again (or another naming them) finds them held, so they cross the network once. The lease
/// holds their bytes against the inbound budget until they are in the store.
#[derive(Debug)]
pub(crate) struct Kept {
    pub peer: PeerId,
    pub values: Vec<(ValueId, Arc<Data>)>,
    pub lease: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The worker's answer to a [`Work`], for the event loop to send back on its channel.
#[derive(Debug)]
pub(crate) struct Finished {
    /// The requester (its share of the queue is freed).
    pub peer: PeerId,
    pub channel: ResponseChannel<TaskResponse>,
    pub response: TaskResponse,
    /// The arithmetic of the task's program (0 if it never got that far).
    pub flops: u64,
}

/// Everything the worker task owns.
pub(crate) struct Worker {
    queue: mpsc::Receiver<Work>,
    cancels: mpsc::Receiver<(PeerId, u64)>,
    keeps: mpsc::Receiver<Kept>,
    finished: mpsc::Sender<Finished>,
    shared: Shared,
}

/// Where tasks run.
#[derive(Debug)]
pub(crate) enum Engine {
    /// On a backend in the node's own process (tests, `--no-sandbox`).
    InProcess(Backend),
    /// In the supervised executor process.
    #[cfg(target_os = "linux")]
    Sandboxed {
        sandbox: crate::sandbox::Sandbox,
        class: DeterminismClass,
    },
}

impl Engine {
    fn class(&self) -> &DeterminismClass {
        match self {
            Engine::InProcess(b) => b.class(),
            #[cfg(target_os = "linux")]
            Engine::Sandboxed { class, .. } => class,
        }
    }

    fn run_traced(
        &self,
        program: &Program,
        inputs: &[Arc<Data>],
        guard: &Guard,
    ) -> Result<(Vec<Arc<Data>>, Vec<ContentId>), TaskError> {
        match self {
            Engine::InProcess(b) => b
                .run_traced(program, inputs, guard)
                .map(|(o, h)| (o.into_iter().map(Arc::new).collect(), h))
                .map_err(task_error::from_exec),
            #[cfg(target_os = "linux")]
            Engine::Sandboxed { sandbox, .. } => sandbox.run_traced(program, inputs, guard),
        }
    }
}

/// Results by task key, with their per-op hashes.
struct Results {
    outputs: ResultCache,
    hashes: HashMap<SubgraphId, Arc<Vec<ContentId>>>,
    /// What `hashes` takes, charged like the cache charges its entries.
    hash_bytes: u64,
}

/// A task's outputs and the hash of every op's output, shared with the cache.
type Ran = (Arc<Vec<Arc<Data>>>, Arc<Vec<ContentId>>);

/// The share of the cache's memory the per-op hash lists may take: the table is cleared
/// past it (a result whose hashes are gone runs again).
const TRACE_SHARE: u64 = 8;
/// What a hash list's entry costs beyond its hashes.
const TRACE_ENTRY_BYTES: u64 = 96;

/// What running tasks share.
struct Shared {
    engine: Engine,
    results: Mutex<Results>,
    key: Keypair,
    limits: Limits,
    held: Mutex<Held>,
    /// Misbehaviour for tests of requesters' defences.
    #[cfg(feature = "fault-injection")]
    faults: Option<faults::Injector>,
}

impl Worker {
    pub fn new(
        queue: mpsc::Receiver<Work>,
        cancels: mpsc::Receiver<(PeerId, u64)>,
        keeps: mpsc::Receiver<Kept>,
        finished: mpsc::Sender<Finished>,
        engine: Engine,
        key: Keypair,
        limits: Limits,
    ) -> Worker {
        Worker {
            queue,
            cancels,
            keeps,
            finished,
            shared: Shared {
                results: Mutex::new(Results {
                    outputs: ResultCache::new(
                        limits.cache_bytes - limits.cache_bytes / TRACE_SHARE,
                    ),
                    hashes: HashMap::new(),
                    hash_bytes: 0,
                }),
                engine,
                key,
                held: Mutex::new(Held::new(limits.held_bytes)),
                limits,
                #[cfg(feature = "fault-injection")]
                faults: None,
            },
        }
    }

    /// The worker misbehaves as `fault` says (tests of requesters' defences).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(mut self, fault: Option<faults::Fault>) -> Worker {
        self.shared.faults = fault.map(faults::Injector::new);
        self
    }
}

/// Runs work items until cancelled or the queue closes; answers go to `finished`, for the
/// event loop to send.
pub(crate) async fn run(worker: Worker, cancel: CancellationToken) {
    let Worker {
        mut queue,
        mut cancels,
        mut keeps,
        finished,
        shared,
    } = worker;
    let shared = Arc::new(shared);
    let slots = shared.limits.slots as usize;
    // Tasks running now, by requester and task id, with the flag that stops each.
    let mut running: HashMap<(PeerId, u64), Cancel> = HashMap::new();
    let mut tasks: JoinSet<(PeerId, u64)> = JoinSet::new();
    // Cancels that arrived before their task left the queue.
    let mut early = EarlyCancels::default();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(key) = done {
                    running.remove(&key);
                }
            }
            Some(key) = cancels.recv() => match running.get(&key) {
                Some(flag) => {
                    tracing::debug!(peer = %key.0, task = key.1, "cancelling a running task");
                    flag.cancel();
                }
                None => early.insert(key),
            },
            // Before the queue, and waited for: a task sent after the refusal that named
            // these values must find them.
            Some(kept) = keeps.recv() => {
                let shared = shared.clone();
                let _ = tokio::task::spawn_blocking(move || shared.keep(kept)).await;
            }
            w = queue.recv(), if tasks.len() < slots => {
                let Some(work) = w else { break };
                #[cfg(feature = "fault-injection")]
                if let Some(f) = &shared.faults {
                    if f.hangs() {
                        f.hold(work.channel);
                        continue;
                    }
                    if f.refuses() {
                        let error = TaskError::Failed("refused (a test fault)".into());
                        let response = TaskResponse::Failed { task: work.request.task, error };
                        let _ = finished.send(Finished { peer: work.peer, channel: work.channel, response, flops: 0 }).await;
                        continue;
                    }
                }
                let key = (work.peer, work.request.task);
                if early.remove(&key) {
                    let response = TaskResponse::Failed { task: key.1, error: TaskError::Cancelled };
                    let _ = finished.send(Finished { peer: key.0, channel: work.channel, response, flops: 0 }).await;
                    continue;
                }
                let flag = Cancel::none();
                running.insert(key, flag.clone());
                let shared = shared.clone();
                let finished = finished.clone();
                tasks.spawn(async move {
                    let Work { peer, request, channel, lease } = work;
                    let task = request.task;
                    // A tiny task runs right here: the hop to the blocking pool and back
                    // would cost more than it does.
                    let (response, flops) = if shared.is_tiny(&request) {
                        shared.execute(peer, request, flag)
                    } else {
                        tokio::task::spawn_blocking(move || shared.execute(peer, request, flag))
                            .await
                            .unwrap_or_else(|e| (TaskResponse::Failed {
                                task,
                                error: TaskError::Failed(format!("worker panicked: {e}")),
                            }, 0))
                    };
                    if let TaskResponse::Failed { error, .. } = &response {
                        tracing::warn!(%peer, task, %error, "task failed");
                    }
                    let _ = finished.send(Finished { peer, channel, response, flops }).await;
                    drop(lease);
                    (peer, task)
                });
            }
        }
    }
    // Whatever still runs stops at its next check.
    for flag in running.values() {
        flag.cancel();
    }
}

/// Cancels for tasks not seen yet, oldest forgotten first.
#[derive(Default)]
struct EarlyCancels {
    set: HashSet<(PeerId, u64)>,
    order: VecDeque<(PeerId, u64)>,
}

impl EarlyCancels {
    fn insert(&mut self, key: (PeerId, u64)) {
        if self.set.insert(key) {
            self.order.push_back(key);
        }
        while self.order.len() > MAX_EARLY_CANCELS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn remove(&mut self, key: &(PeerId, u64)) -> bool {
        self.set.remove(key)
    }
}

/// A task's input once held values are looked up: values, with the content id its receipt
/// names when that is known without hashing (a held value's, a recipe's own id), or a recipe
/// still to make.
enum Resolved {
    Values(Arc<Data>, Option<ContentId>),
    Recipe(Recipe),
}

/// Content ids of a program's outputs: an output that an op made already has its id among the
/// op hashes (hashing 16 MiB again would cost milliseconds); others are hashed.
fn output_cids(
    program: &Program,
    outputs: &[Arc<Data>],
    op_hashes: &[ContentId],
) -> Vec<ContentId> {
    let first_op = program.inputs.len();
    program
        .outputs
        .iter()
        .zip(outputs)
        .map(|(&o, t)| {
            (o as usize)
                .checked_sub(first_op)
                .filter(|_| op_hashes.len() == program.nodes.len())
                .and_then(|k| op_hashes.get(k).copied())
                .unwrap_or_else(|| t.content_id())
        })
        .collect()
}

/// Tasks at most this large (arithmetic, and bytes at their peak) run on the async thread
/// that received them.
const TINY_FLOPS: u64 = 1 << 20;
const TINY_PEAK_BYTES: u64 = 256 << 10;

impl Shared {
    /// Keeps the values of a task turned away busy (hashed here: the store names each by its
    /// content id).
    fn keep(&self, kept: Kept) {
        let hashed: Vec<_> = kept
            .values
            .into_iter()
            .map(|(id, t)| {
                let cid = t.content_id();
                (id, t, cid)
            })
            .collect();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for (id, t, cid) in hashed {
            held.put(kept.peer, id, t, cid);
        }
        drop(kept.lease);
    }

    /// Whether `request` is tiny enough to run without a hop to the blocking pool: its
    /// program validates within this node's limits at a tiny footprint.
    fn is_tiny(&self, request: &TaskRequest) -> bool {
        request.program.nodes.len() <= 16
            && request
                .program
                .validate(&self.limits.task)
                .is_ok_and(|f| f.flops <= TINY_FLOPS && f.peak_bytes <= TINY_PEAK_BYTES)
    }

    /// Checks, runs and signs one request; `flag` is raised if the requester cancels it.
    /// Returns the answer and the program's arithmetic (once it passed the static checks).
    fn execute(&self, peer: PeerId, request: TaskRequest, flag: Cancel) -> (TaskResponse, u64) {
        let mut flops = 0;
        let response = self.answer(peer, request, flag, &mut flops);
        (response, flops)
    }

    fn answer(
        &self,
        peer: PeerId,
        request: TaskRequest,
        flag: Cancel,
        flops: &mut u64,
    ) -> TaskResponse {
        let task = request.task;
        let received = Instant::now();
        let fail = |error: TaskError| TaskResponse::Failed { task, error };
        let invalid = |msg: String| fail(TaskError::Invalid(msg));
        if request.version != TASK_VERSION {
            return invalid(format!(
                "task protocol version {} is not {TASK_VERSION}",
                request.version
            ));
        }
        if !request.id_matches() {
            return invalid(format!(
                "subgraph id {} does not match its program and inputs",
                request.subgraph.short()
            ));
        }
        // The static pass next: nothing below allocates or loops over what a program claims
        // until it fits this node's limits.
        let footprint = match request.program.validate(&self.limits.task) {
            Ok(f) => f,
            Err(ProgramError::TooLarge(t)) => return fail(TaskError::TooLarge(t)),
            Err(e) => return invalid(e.to_string()),
        };
        *flops = footprint.flops;
        let n = request.program.inputs.len();
        if request.inputs.len() != n || request.input_ids.len() != n {
            return invalid(format!(
                "the program takes {n} inputs, the task carries {} (and {} ids)",
                request.inputs.len(),
                request.input_ids.len()
            ));
        }
        if request.output_ids.len() != request.program.outputs.len() {
            return invalid(format!(
                "the program has {} outputs, the task names {}",
                request.program.outputs.len(),
                request.output_ids.len()
            ));
        }
        // Resolve held inputs; report every one that is gone.
        let mut resolved: Vec<Resolved> = Vec::with_capacity(n);
        let mut missing = Vec::new();
        {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for (i, input) in request.inputs.into_iter().enumerate() {
                match input {
                    Input::Data(t) => resolved.push(Resolved::Values(t, None)),
                    // Made here before from this very recipe (a block two tiles share): the
                    // same values, kept under the recipe's id.
                    Input::Recipe(r) => match held.get(peer, request.input_ids[i]) {
                        Some((t, cid)) if cid == r.id() => {
                            resolved.push(Resolved::Values(t, Some(cid)))
                        }
                        _ => resolved.push(Resolved::Recipe(r)),
                    },
                    Input::Held => match held.get(peer, request.input_ids[i]) {
                        Some((t, cid)) => resolved.push(Resolved::Values(t, Some(cid))),
                        None => missing.push(i),
                    },
                }
            }
        }
        if !missing.is_empty() {
            return TaskResponse::Missing {
                task,
                inputs: missing,
            };
        }
        // Recipes are made only when they describe exactly the input the program declares
        // (which fits this node's limits, checked above).
        let mut inputs: Vec<Arc<Data>> = Vec::with_capacity(n);
        let mut known: Vec<Option<ContentId>> = Vec::with_capacity(n);
        for (index, (input, want)) in resolved
            .into_iter()
            .zip(&request.program.inputs)
            .enumerate()
        {
            match input {
                Resolved::Values(t, cid) => {
                    inputs.push(t);
                    known.push(cid);
                }
                Resolved::Recipe(recipe) => {
                    if let Err(e) = recipe.check() {
                        return invalid(format!("input {index}: {e}"));
                    }
                    if &recipe.meta() != want {
                        return invalid(format!(
                            "input {index}: the program expects {want}, the recipe makes {}",
                            recipe.meta()
                        ));
                    }
                    #[cfg(feature = "fault-injection")]
                    let (recipe, named) = faults::recipe_to_make(self.faults.as_ref(), &recipe);
                    #[cfg(not(feature = "fault-injection"))]
                    let named = recipe.id();
                    match recipe.materialise() {
                        Ok(t) => inputs.push(Arc::new(t)),
                        Err(e) => return invalid(format!("input {index}: {e}")),
                    }
                    known.push(Some(named));
                }
            }
        }
        for (index, (t, want)) in inputs.iter().zip(&request.program.inputs).enumerate() {
            if t.dtype() != want.dtype || t.shape() != want.shape.as_slice() {
                return invalid(format!(
                    "input {index}: the program expects {want}, the task holds {}",
                    t.meta()
                ));
            }
        }
        let made = received.elapsed();
        // A recipe's input is named by the recipe (which fixes every value): hashing what it
        // made would cost as much as making it.
        let input_cids: Vec<ContentId> = inputs
            .iter()
            .zip(&known)
            .map(|(t, k)| k.unwrap_or_else(|| t.content_id()))
            .collect();
        let hashed = received.elapsed();
        // Cache by the task key: the subgraph id *and* the content of the inputs, so a
        // requester cannot plant a result under an id that other requesters will ask for.
        let key = task_key(&request.subgraph, &input_cids);
        // Held from now on, before computing: a task of another job naming them may arrive
        // while this one runs (the requester marks them held when it sends them).
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for ((id, t), cid) in request.input_ids.iter().zip(&inputs).zip(&input_cids) {
                held.put(peer, *id, t.clone(), *cid);
            }
        }
        let started = Instant::now();
        let guard = Guard::new(
            self.limits.task.clone(),
            flag.with_deadline(self.limits.deadline(&footprint)),
        );
        let (outputs, op_hashes) =
            match self.run_cached(SubgraphId(key), &request.program, &inputs, &guard) {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
        let compute_micros = started.elapsed().as_micros() as u64;
        let computed = received.elapsed();
        let out_cids = output_cids(&request.program, &outputs, &op_hashes);
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for ((id, t), cid) in request.output_ids.iter().zip(outputs.iter()).zip(&out_cids) {
                held.put(peer, *id, t.clone(), *cid);
                held.alias(peer, *cid, *id);
            }
        }
        let class = self.engine.class();
        let receipt = Receipt {
            task: key,
            nonce: request.nonce,
            outputs: out_cids,
            op_hashes: op_hashes.to_vec(),
            class: class.id(),
            class_name: class.to_string(),
        };
        let signature = match self.key.sign(&receipt.message()) {
            Ok(s) => s,
            Err(e) => {
                return fail(TaskError::Failed(format!("could not sign the result: {e}")));
            }
        };
        tracing::debug!(%peer, task, inputs_made = ?made, inputs_hashed = ?hashed, computed = ?computed,
            signed = ?received.elapsed(), "task done");
        let response = TaskResponse::Done {
            task,
            outputs: outputs.to_vec(),
            compute_micros,
            receipt,
            signature,
            signer: self.key.public().encode_protobuf(),
        };
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &self.faults {
            return f.apply(response, &request.program, &inputs, &self.key);
        }
        response
    }
}

impl Shared {
    /// Runs a task, or answers it from the cache when the same subgraph ran on the same
    /// inputs before.
    fn run_cached(
        &self,
        key: SubgraphId,
        program: &Program,
        inputs: &[Arc<Data>],
        guard: &Guard,
    ) -> Result<Ran, TaskError> {
        {
            let r = self.results.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(o), Some(h)) = (r.outputs.get(&key), r.hashes.get(&key)) {
                return Ok((o, h.clone()));
            }
        }
        let (outputs, hashes) = self.engine.run_traced(program, inputs, guard)?;
        let (outputs, hashes) = (Arc::new(outputs), Arc::new(hashes));
        let mut r = self.results.lock().unwrap_or_else(|p| p.into_inner());
        r.outputs.put(key, outputs.clone());
        let cost = TRACE_ENTRY_BYTES + 32 * hashes.len() as u64;
        if r.hash_bytes + cost > self.limits.cache_bytes / TRACE_SHARE {
            r.hashes.clear();
            r.hash_bytes = 0;
        }
        if r.hashes.insert(key, hashes.clone()).is_none() {
            r.hash_bytes += cost;
        }
        Ok((outputs, hashes))
    }
}
