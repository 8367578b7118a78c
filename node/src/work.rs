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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corvid_kernels::backend::Guard;
use corvid_kernels::verify::Projection;
use corvid_kernels::{
    Backend, Cancel, ContentId, DeterminismClass, Program, ProgramError, Tensor as Data,
};
use corvid_sdk::wire::{
    Input, Receipt, TASK_VERSION, TaskError, TaskRequest, TaskResponse, task_key,
};
use corvid_sdk::{ResultCache, SubgraphId, ValueId};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use rand::SeedableRng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Fault;
use crate::limits::Limits;
use crate::task_error;

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

/// The worker's answer to a [`Work`], for the event loop to send back on its channel.
#[derive(Debug)]
pub(crate) struct Finished {
    pub channel: ResponseChannel<TaskResponse>,
    pub response: TaskResponse,
}

/// Everything the worker task owns.
pub(crate) struct Worker {
    queue: mpsc::Receiver<Work>,
    cancels: mpsc::Receiver<(PeerId, u64)>,
    finished: mpsc::Sender<Finished>,
    shared: Arc<Shared>,
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
}

/// A task's outputs and the hash of every op's output, shared with the cache.
type Ran = (Arc<Vec<Arc<Data>>>, Arc<Vec<ContentId>>);

/// Per-op hash lists kept at most; the table is cleared past this.
const MAX_TRACES: usize = 100_000;

/// What running tasks share.
struct Shared {
    engine: Engine,
    results: Mutex<Results>,
    key: Keypair,
    limits: Limits,
    held: Mutex<Held>,
    fault: Option<Fault>,
    /// For faults: results answered so far, and the last answer (to replay).
    answered: Mutex<(u64, Option<TaskResponse>)>,
}

impl Worker {
    pub fn new(
        queue: mpsc::Receiver<Work>,
        cancels: mpsc::Receiver<(PeerId, u64)>,
        finished: mpsc::Sender<Finished>,
        engine: Engine,
        key: Keypair,
        limits: Limits,
        fault: Option<Fault>,
    ) -> Worker {
        Worker {
            queue,
            cancels,
            finished,
            shared: Arc::new(Shared {
                results: Mutex::new(Results {
                    outputs: ResultCache::new(limits.cache_bytes),
                    hashes: HashMap::new(),
                }),
                engine,
                key,
                held: Mutex::new(Held::new(limits.held_bytes)),
                limits,
                fault,
                answered: Mutex::new((0, None)),
            }),
        }
    }
}

/// Runs work items until cancelled or the queue closes; answers go to `finished`, for the
/// event loop to send.
pub(crate) async fn run(mut worker: Worker, cancel: CancellationToken) {
    let slots = worker.shared.limits.slots as usize;
    // Tasks running now, by requester and task id, with the flag that stops each.
    let mut running: HashMap<(PeerId, u64), Cancel> = HashMap::new();
    let mut tasks: JoinSet<(PeerId, u64)> = JoinSet::new();
    // Cancels that arrived before their task left the queue.
    let mut early = EarlyCancels::default();
    // A hanging test worker keeps the channels it never answers on.
    let mut hung = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(key) = done {
                    running.remove(&key);
                }
            }
            Some(key) = worker.cancels.recv() => match running.get(&key) {
                Some(flag) => {
                    tracing::debug!(peer = %key.0, task = key.1, "cancelling a running task");
                    flag.cancel();
                }
                None => early.insert(key),
            },
            w = worker.queue.recv(), if tasks.len() < slots => {
                let Some(work) = w else { break };
                if worker.shared.fault == Some(Fault::Hang) {
                    hung.push(work.channel);
                    continue;
                }
                let key = (work.peer, work.request.task);
                if early.remove(&key) {
                    let response = TaskResponse::Failed { task: key.1, error: TaskError::Cancelled };
                    let _ = worker.finished.send(Finished { channel: work.channel, response }).await;
                    continue;
                }
                let flag = Cancel::none();
                running.insert(key, flag.clone());
                let shared = worker.shared.clone();
                let finished = worker.finished.clone();
                tasks.spawn(async move {
                    let Work { peer, request, channel, lease } = work;
                    let task = request.task;
                    let response =
                        tokio::task::spawn_blocking(move || shared.execute(peer, request, flag))
                            .await
                            .unwrap_or_else(|e| TaskResponse::Failed {
                                task,
                                error: TaskError::Failed(format!("worker panicked: {e}")),
                            });
                    if let TaskResponse::Failed { error, .. } = &response {
                        tracing::warn!(%peer, task, %error, "task failed");
                    }
                    let _ = finished.send(Finished { channel, response }).await;
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

impl Shared {
    /// Checks, runs and signs one request; `flag` is raised if the requester cancels it.
    fn execute(&self, peer: PeerId, request: TaskRequest, flag: Cancel) -> TaskResponse {
        let task = request.task;
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
        let mut inputs: Vec<Arc<Data>> = Vec::with_capacity(n);
        let mut missing = Vec::new();
        {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for (i, input) in request.inputs.into_iter().enumerate() {
                match input {
                    Input::Data(t) => inputs.push(t),
                    Input::Held => match held.get(peer, request.input_ids[i]) {
                        Some(t) => inputs.push(t),
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
        for (index, (t, want)) in inputs.iter().zip(&request.program.inputs).enumerate() {
            if t.dtype() != want.dtype || t.shape() != want.shape.as_slice() {
                return invalid(format!(
                    "input {index}: the program expects {want}, the task holds {}",
                    t.meta()
                ));
            }
        }
        let input_cids: Vec<_> = inputs.iter().map(|t| t.content_id()).collect();
        // Cache by the task key: the subgraph id *and* the content of the inputs, so a
        // requester cannot plant a result under an id that other requesters will ask for.
        let key = task_key(&request.subgraph, &input_cids);
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
        if let Some(Fault::Inflate { delay_ms, .. }) = self.fault {
            std::thread::sleep(std::time::Duration::from_millis(u64::from(delay_ms)));
        }
        let compute_micros = started.elapsed().as_micros() as u64;
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for (id, t) in request.input_ids.iter().zip(&inputs) {
                held.put(peer, *id, t.clone());
            }
            for (id, t) in request.output_ids.iter().zip(outputs.iter()) {
                held.put(peer, *id, t.clone());
            }
        }
        let mut outputs: Vec<Arc<Data>> = outputs.to_vec();
        let mut op_hashes = op_hashes.to_vec();
        let count = {
            let mut a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            a.0 += 1;
            a.0
        };
        match self.fault {
            Some(Fault::Corrupt { every, factor }) if count % u64::from(every.max(1)) == 0 => {
                corrupt(&request.program, &inputs, &mut outputs, factor, count);
                rehash_outputs(&request.program, &outputs, &mut op_hashes);
            }
            Some(Fault::Zeros) => {
                for o in &mut outputs {
                    *o = Arc::new(Data::full(o.shape().to_vec(), 0.0));
                }
                rehash_outputs(&request.program, &outputs, &mut op_hashes);
            }
            _ => {}
        }
        let class = self.engine.class();
        let receipt = Receipt {
            task: key,
            nonce: request.nonce,
            outputs: outputs.iter().map(|t| t.content_id()).collect(),
            op_hashes,
            class: class.id(),
            class_name: class.to_string(),
        };
        let key = match self.fault {
            Some(Fault::WrongKey) => Keypair::generate_ed25519(),
            _ => self.key.clone(),
        };
        let signature = match key.sign(&receipt.message()) {
            Ok(s) => s,
            Err(e) => {
                return fail(TaskError::Failed(format!("could not sign the result: {e}")));
            }
        };
        let response = TaskResponse::Done {
            task,
            outputs,
            compute_micros,
            receipt,
            signature,
            signer: key.public().encode_protobuf(),
        };
        if self.fault == Some(Fault::Replay) {
            let mut a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(TaskResponse::Done {
                outputs,
                compute_micros,
                receipt,
                signature,
                signer,
                ..
            }) = a.1.clone()
            {
                return TaskResponse::Done {
                    task,
                    outputs,
                    compute_micros,
                    receipt,
                    signature,
                    signer,
                };
            }
            a.1 = Some(response.clone());
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
        if r.hashes.len() >= MAX_TRACES {
            r.hashes.clear();
        }
        r.hashes.insert(key, hashes.clone());
        Ok((outputs, hashes))
    }
}

/// A consistent cheat: the per-op hashes of the output ops match the altered outputs.
fn rehash_outputs(
    program: &corvid_kernels::Program,
    outputs: &[Arc<Data>],
    op_hashes: &mut [corvid_kernels::ContentId],
) {
    let n_in = program.inputs.len();
    for (k, &o) in program.outputs.iter().enumerate() {
        if let Some(h) = (o as usize)
            .checked_sub(n_in)
            .and_then(|i| op_hashes.get_mut(i))
        {
            *h = outputs[k].content_id();
        }
    }
}

/// Moves one element of one output by `factor` times the tolerance the verifier will use.
fn corrupt(
    program: &corvid_kernels::Program,
    inputs: &[Arc<Data>],
    outputs: &mut [Arc<Data>],
    factor: f32,
    count: u64,
) {
    let Some(out) = outputs.first_mut() else {
        return;
    };
    let out = Arc::make_mut(out);
    let Ok(values) = out.as_f32() else {
        return;
    };
    let mut values = values.to_vec();
    if values.is_empty() {
        return;
    }
    let e = (count as usize * 7919) % values.len();
    let single_matmul = program.nodes.len() == 1
        && matches!(program.nodes[0].op, corvid_kernels::Op::MatMul)
        && program.nodes[0].args == [0, 1]
        && inputs.len() == 2
        && out.shape().len() == 2;
    let delta = if single_matmul {
        // Freivalds' threshold for this row, from the same public bound the verifier uses.
        let n = out.shape()[1];
        let m = out.shape()[0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(count);
        match (Projection::new(&inputs[1], &mut rng), inputs[0].as_f32()) {
            (Ok(p), Ok(a)) => p.row_tolerance(a, &values, m)[e / n] as f32,
            _ => 1.0,
        }
    } else {
        let tol = corvid_kernels::verify::program_tolerance(program);
        tol.atol + tol.rtol * values[e].abs()
    };
    values[e] += factor * delta.max(f32::MIN_POSITIVE);
    if let Ok(t) = Data::from_f32(out.shape().to_vec(), values) {
        *out = t;
    }
}

/// Values kept for requesters, by (requester, value id), oldest evicted first, at most `cap`
/// bytes.
struct Held {
    map: HashMap<(PeerId, ValueId), Arc<Data>>,
    order: VecDeque<(PeerId, ValueId, u64)>,
    bytes: u64,
    cap: u64,
}

impl Held {
    fn new(cap: u64) -> Held {
        Held {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    fn get(&self, peer: PeerId, id: ValueId) -> Option<Arc<Data>> {
        self.map.get(&(peer, id)).cloned()
    }

    /// Keeps `t` as `peer`'s value `id`, replacing what was kept under that id (a requester
    /// that sends data again means it).
    fn put(&mut self, peer: PeerId, id: ValueId, t: Arc<Data>) {
        // Every entry is charged its bookkeeping, so empty tensors cannot pile up for free.
        let size = t.meta().bytes() + 128;
        if size > self.cap {
            return;
        }
        if let Some(old) = self.map.get_mut(&(peer, id)) {
            // The same id with the same size keeps its place; another size (a requester may
            // send anything under an id) is charged afresh below.
            if old.meta().bytes() == t.meta().bytes() {
                *old = t;
                return;
            }
            self.map.remove(&(peer, id));
            if let Some(k) = self
                .order
                .iter()
                .position(|&(p, v, _)| p == peer && v == id)
                && let Some((_, _, b)) = self.order.remove(k)
            {
                self.bytes -= b;
            }
        }
        while self.bytes + size > self.cap {
            let Some((p, v, b)) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&(p, v));
            self.bytes -= b;
        }
        self.map.insert((peer, id), t);
        self.order.push_back((peer, id, size));
        self.bytes += size;
    }
}
