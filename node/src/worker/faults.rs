//! Misbehaviour on purpose, for tests and demos of requesters' defences: a worker that cheats
//! in the ways a requester must catch, and an executor process that crashes. Compiled only with
//! the `fault-injection` cargo feature (the node's own tests turn it on); without it there is no
//! [`Fault`], no `corvid node --cheat`, and nothing of this on the worker's path.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use corvid_kernels::verify::Projection;
use corvid_kernels::{ContentId, Program, Recipe, Tensor as Data};
use corvid_sdk::wire::{TaskError, TaskResponse};
use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use rand::SeedableRng;

/// Ways a test worker misbehaves. Each cheat signs what it returns, as a real cheater would
/// have to.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Accepts tasks and never answers.
    Hang,
    /// Every `every`-th result has one element moved by `factor` times the verifier's
    /// tolerance for it (Freivalds' row threshold for a matmul, the element tolerance
    /// otherwise). `factor` just over 1 is the subtlest detectable lie.
    Corrupt { every: u32, factor: f32 },
    /// Returns zeros of the right shapes.
    Zeros,
    /// Answers with the previous task's signed result (correct once, then replayed).
    Replay,
    /// Signs results with a key that is not its identity.
    WrongKey,
    /// A slow machine that says it is fast: advertises `factor` times its measured speed and
    /// takes `delay_ms` longer over every task.
    Inflate { factor: f32, delay_ms: u32 },
    /// The executor process aborts on every `every`-th task (the node must restart it).
    CrashExecutor { every: u32 },
    /// Returns a first output of the wrong shape (one element), signed.
    WrongShape,
    /// Answers with a first output four times larger than the program makes, signed.
    Oversize,
    /// Claims a determinism class of its own invention and moves the last element of every
    /// result that is not a plain matmul (Freivalds would catch that) by 1.0: colluders
    /// telling the same lie, who would vouch for each other as same-class replicas.
    Collude,
    /// Says it is `factor` times faster than it is and fails every task at once: a requester
    /// must route around it, not give up on the job.
    Refuse { factor: f32 },
    /// Makes a recipe input from another seed (cheaper inputs it had lying around, say) and
    /// signs the receipt naming that recipe, or, with `claim_asked`, the recipe it was sent.
    OtherRecipe { claim_asked: bool },
}

/// The cheats `corvid node --cheat` offers.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cheat {
    /// Move one element of every result just over the verifier's tolerance.
    Corrupt,
    Zeros,
    Replay,
    WrongKey,
    /// The executor process aborts on every third task (tests of the node's recovery).
    CrashExecutor,
}

impl From<Cheat> for Fault {
    fn from(c: Cheat) -> Fault {
        match c {
            Cheat::Corrupt => Fault::Corrupt {
                every: 1,
                factor: 1.05,
            },
            Cheat::Zeros => Fault::Zeros,
            Cheat::Replay => Fault::Replay,
            Cheat::WrongKey => Fault::WrongKey,
            Cheat::CrashExecutor => Fault::CrashExecutor { every: 3 },
        }
    }
}

/// The matmul speed a node with `fault` advertises: an inflating one claims `factor` times
/// the `measured` one.
pub(crate) fn advertised_gflops(measured: f32, fault: Option<Fault>) -> f32 {
    match fault {
        Some(Fault::Inflate { factor, .. } | Fault::Refuse { factor }) => measured * factor,
        _ => measured,
    }
}

/// The determinism class a node with `fault` claims: a colluder's is invented.
pub(crate) fn advertised_class(
    real: corvid_kernels::DeterminismClass,
    fault: Option<Fault>,
) -> corvid_kernels::DeterminismClass {
    match fault {
        Some(Fault::Collude) => invented_class(),
        _ => real,
    }
}

fn invented_class() -> corvid_kernels::DeterminismClass {
    corvid_kernels::DeterminismClass {
        adapter: "colluder".into(),
        ..corvid_kernels::CpuBackend::new().class().clone()
    }
}

/// Every how many tasks the executor process aborts (0: never).
#[cfg(target_os = "linux")]
pub(crate) fn crash_every(fault: Option<Fault>) -> u64 {
    match fault {
        Some(Fault::CrashExecutor { every }) => u64::from(every),
        _ => 0,
    }
}

/// What a worker with `fault` makes for `recipe`, and the content id its receipt names.
pub(crate) fn recipe_to_make(fault: Option<&Injector>, recipe: &Recipe) -> (Recipe, ContentId) {
    match fault.map(|f| f.fault) {
        Some(Fault::OtherRecipe { claim_asked }) => {
            let mut other = recipe.clone();
            let Recipe::Uniform { seed, .. } = &mut other;
            *seed = seed.wrapping_add(1);
            let named = if claim_asked { recipe.id() } else { other.id() };
            (other, named)
        }
        _ => (recipe.clone(), recipe.id()),
    }
}

/// A worker's fault, and what applying it remembers.
pub(crate) struct Injector {
    fault: Fault,
    /// Results answered so far, and the last answer (to replay).
    answered: Mutex<(u64, Option<TaskResponse>)>,
    /// A hanging worker keeps the channels it never answers on.
    hung: Mutex<Vec<ResponseChannel<TaskResponse>>>,
}

impl Injector {
    pub(crate) fn new(fault: Fault) -> Injector {
        Injector {
            fault,
            answered: Mutex::new((0, None)),
            hung: Mutex::new(Vec::new()),
        }
    }

    /// Whether this worker takes tasks and never answers them.
    pub(crate) fn hangs(&self) -> bool {
        self.fault == Fault::Hang
    }

    /// Whether this worker fails every task at once.
    pub(crate) fn refuses(&self) -> bool {
        matches!(self.fault, Fault::Refuse { .. })
    }

    /// Keeps `channel` open, never to answer on it.
    pub(crate) fn hold(&self, channel: ResponseChannel<TaskResponse>) {
        self.hung
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(channel);
    }

    /// Turns an honest answer to a task into this fault's: delayed, with corrupted or zeroed
    /// outputs (and per-op hashes to match), signed with another key, or the previous answer
    /// replayed. `key` is the worker's identity, which signs every altered result. Blocking
    /// (the delay sleeps).
    pub(crate) fn apply(
        &self,
        response: TaskResponse,
        program: &Program,
        inputs: &[Arc<Data>],
        key: &Keypair,
    ) -> TaskResponse {
        let TaskResponse::Done {
            task,
            mut outputs,
            mut compute_micros,
            mut receipt,
            signature,
            signer,
        } = response
        else {
            return response;
        };
        if let Fault::Inflate { delay_ms, .. } = self.fault {
            let started = Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(u64::from(delay_ms)));
            compute_micros += started.elapsed().as_micros() as u64;
        }
        let count = {
            let mut a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            a.0 += 1;
            a.0
        };
        let altered = match self.fault {
            Fault::Corrupt { every, factor } if count % u64::from(every.max(1)) == 0 => {
                corrupt(program, inputs, &mut outputs, factor, count);
                true
            }
            Fault::Zeros => {
                for o in &mut outputs {
                    *o = Arc::new(Data::full(o.shape().to_vec(), 0.0));
                }
                true
            }
            Fault::WrongShape => {
                if let Some(o) = outputs.first_mut() {
                    *o = Arc::new(Data::full(vec![1], 0.0));
                }
                true
            }
            Fault::Oversize => {
                if let Some(o) = outputs.first_mut() {
                    *o = Arc::new(Data::full(
                        vec![4 * o.shape().iter().product::<usize>()],
                        0.0,
                    ));
                }
                true
            }
            Fault::Collude => {
                let plain_matmul = program.nodes.len() == 1
                    && matches!(program.nodes[0].op, corvid_kernels::Op::MatMul);
                receipt.class = invented_class().id();
                receipt.class_name = invented_class().to_string();
                if !plain_matmul
                    && let Some(out) = outputs.first_mut()
                    && let Ok(v) = out.as_f32()
                    && !v.is_empty()
                {
                    let mut v = v.to_vec();
                    let last = v.len() - 1;
                    v[last] += 1.0;
                    if let Ok(t) = Data::from_f32(out.shape().to_vec(), v) {
                        *out = Arc::new(t);
                    }
                }
                true
            }
            _ => false,
        };
        let (signature, signer) = if altered || self.fault == Fault::WrongKey {
            if altered {
                rehash_outputs(program, &outputs, &mut receipt.op_hashes);
                receipt.outputs = outputs.iter().map(|t| t.content_id()).collect();
            }
            let key = match self.fault {
                Fault::WrongKey => Keypair::generate_ed25519(),
                _ => key.clone(),
            };
            match key.sign(&receipt.message()) {
                Ok(s) => (s, key.public().encode_protobuf()),
                Err(e) => {
                    return TaskResponse::Failed {
                        task,
                        error: TaskError::Failed(format!("could not sign the result: {e}")),
                    };
                }
            }
        } else {
            (signature, signer)
        };
        let response = TaskResponse::Done {
            task,
            outputs,
            compute_micros,
            receipt,
            signature,
            signer,
        };
        if self.fault == Fault::Replay {
            let mut a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            // The first answer again, under this request's task id.
            if let Some(mut old) = a.1.clone() {
                if let TaskResponse::Done { task: t, .. } = &mut old {
                    *t = task;
                }
                return old;
            }
            a.1 = Some(response.clone());
        }
        response
    }
}

/// A consistent cheat: the per-op hashes of the output ops match the altered outputs.
fn rehash_outputs(
    program: &Program,
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
    program: &Program,
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
