//! Executors run a [`Plan`]. The local one runs subgraphs on this machine's backend, independent
//! ones in parallel, caching results by subgraph id; it is also what a node uses to run a
//! subgraph it received.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use corvid_kernels::{Backend, BackendChoice, ExecError, Tensor as Data};
use rayon::prelude::*;

use crate::error::EvalError;
use crate::ids::SubgraphId;
use crate::plan::{Plan, Settings, Source, Subgraph};

/// Something that runs plans: the local machine, or (later) the swarm.
pub trait Executor: Send + Sync + fmt::Debug {
    /// How plans for this executor should be cut.
    fn settings(&self) -> Settings;
    /// Runs the plan and returns its outputs in order.
    fn execute(&self, plan: &Plan) -> Result<Vec<Arc<Data>>, EvalError>;

    /// Starts running the plan on the executor's own threads or runtime, reporting progress
    /// to `job` and stopping when it is cancelled, and returns where the outcome will arrive.
    /// `None` (the default): the caller runs [`Executor::execute`] on a thread of its own.
    fn start(&self, plan: &Plan, job: &Arc<crate::job::JobState>) -> Option<crate::job::Pending> {
        let _ = (plan, job);
        None
    }
}

/// Default cap on cached results, in bytes.
pub const CACHE_BYTES: u64 = 1 << 30;

/// Runs plans on a local [`Backend`].
#[derive(Debug)]
pub struct LocalExecutor {
    backend: Backend,
    settings: Settings,
    cache: Mutex<ResultCache>,
}

impl LocalExecutor {
    pub fn new(backend: Backend) -> Self {
        let settings = Settings {
            max_tensor_bytes: backend.max_tensor_bytes(),
            ..Settings::default()
        };
        LocalExecutor {
            backend,
            settings,
            cache: Mutex::new(ResultCache::new(CACHE_BYTES)),
        }
    }

    /// Same executor, caching nothing: for a requester, whose local runs (assembling tiles,
    /// settling disputes) take inputs from workers before every check on them is settled. A
    /// subgraph's id names its inputs by value id, so a result cached under it would outlive
    /// the discovery that one of those inputs was a lie and is being computed again.
    pub fn without_cache(self) -> Self {
        LocalExecutor {
            cache: Mutex::new(ResultCache::new(0)),
            ..self
        }
    }

    /// Same executor with other partition settings (block size, limits).
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Runs one subgraph on its inputs, or returns the cached result of an earlier run.
    pub fn run_subgraph(
        &self,
        sg: &Subgraph,
        inputs: &[Arc<Data>],
    ) -> Result<Arc<Vec<Arc<Data>>>, ExecError> {
        self.run_program(sg.id, &sg.program, inputs)
    }

    /// Runs a program known by its subgraph id (what a worker receives), cached by that id.
    /// The caller vouches that `id` is the program's id over these inputs.
    pub fn run_program(
        &self,
        id: SubgraphId,
        program: &corvid_kernels::Program,
        inputs: &[Arc<Data>],
    ) -> Result<Arc<Vec<Arc<Data>>>, ExecError> {
        if let Some(hit) = self.cache().get(&id) {
            return Ok(hit);
        }
        let out: Vec<Arc<Data>> = self
            .backend
            .run_shared(program, inputs)?
            .into_iter()
            .map(Arc::new)
            .collect();
        let out = Arc::new(out);
        self.cache().put(id, out.clone());
        Ok(out)
    }

    /// How many subgraph results are cached.
    pub fn cached(&self) -> usize {
        self.cache().map.len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ResultCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Executor for LocalExecutor {
    fn settings(&self) -> Settings {
        self.settings.clone()
    }

    fn execute(&self, plan: &Plan) -> Result<Vec<Arc<Data>>, EvalError> {
        // Wave by wave: every subgraph whose inputs are ready runs in parallel.
        let n = plan.subgraphs.len();
        let mut level = vec![0usize; n];
        for (i, sg) in plan.subgraphs.iter().enumerate() {
            level[i] = sg.deps().map(|d| level[d] + 1).max().unwrap_or(0);
        }
        let mut remaining_reads = vec![0usize; n];
        for sg in &plan.subgraphs {
            for d in sg.deps() {
                remaining_reads[d] += 1;
            }
        }
        for s in &plan.outputs {
            if let Source::Output { subgraph, .. } = s {
                remaining_reads[*subgraph] += 1;
            }
        }
        let mut results: Vec<Option<Arc<Vec<Arc<Data>>>>> = vec![None; n];
        let depth = level.iter().max().map_or(0, |d| d + 1);
        for l in 0..depth {
            let wave: Vec<usize> = (0..n).filter(|&i| level[i] == l).collect();
            let fetch = |s: &Source| -> Arc<Data> {
                match *s {
                    Source::Leaf(i) => plan.leaves[i].get().clone(),
                    Source::Output { subgraph, output } => {
                        results[subgraph].as_ref().expect("earlier wave")[output].clone()
                    }
                }
            };
            let inputs: Vec<Vec<Arc<Data>>> = wave
                .iter()
                .map(|&i| plan.subgraphs[i].inputs.iter().map(fetch).collect())
                .collect();
            let outs: Vec<Result<Arc<Vec<Arc<Data>>>, EvalError>> = wave
                .par_iter()
                .zip(inputs.par_iter())
                .map(|(&i, ins)| {
                    let sg = &plan.subgraphs[i];
                    self.run_subgraph(sg, ins).map_err(|error| EvalError::Exec {
                        subgraph: sg.id.short(),
                        ops: sg.ops(),
                        place: format!("local {}", self.backend.describe()),
                        error: Box::new(error),
                    })
                })
                .collect();
            for (&i, out) in wave.iter().zip(outs) {
                results[i] = Some(out?);
            }
            // Drop what no later subgraph or output reads.
            for &i in &wave {
                for d in plan.subgraphs[i].deps() {
                    remaining_reads[d] -= 1;
                    if remaining_reads[d] == 0 {
                        results[d] = None;
                    }
                }
            }
        }
        Ok(plan
            .outputs
            .iter()
            .map(|s| match *s {
                Source::Leaf(i) => plan.leaves[i].get().clone(),
                Source::Output { subgraph, output } => {
                    results[subgraph].as_ref().expect("outputs are kept")[output].clone()
                }
            })
            .collect())
    }
}

/// The process-wide local executor graphs use by default: `CORVID_BACKEND` (auto by default),
/// falling back to the CPU with a warning if the requested backend cannot be opened.
pub fn default_executor() -> Arc<dyn Executor> {
    static DEFAULT: OnceLock<Arc<LocalExecutor>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let backend = Backend::from_env().unwrap_or_else(|e| {
                tracing::warn!("{e}; using the cpu backend");
                Backend::open(BackendChoice::Cpu).expect("the cpu backend always opens")
            });
            Arc::new(LocalExecutor::new(backend))
        })
        .clone()
}

/// Results by subgraph id, oldest evicted first past a byte budget.
#[derive(Debug)]
pub struct ResultCache {
    map: HashMap<SubgraphId, Arc<Vec<Arc<Data>>>>,
    order: VecDeque<(SubgraphId, u64)>,
    bytes: u64,
    cap: u64,
}

/// What the cache charges for an entry's bookkeeping (its key in the map and the queue, the
/// vector), and for each tensor's (its `Data` and shape), beyond the tensor bytes.
const ENTRY_BYTES: u64 = 160;
const TENSOR_BYTES: u64 = 128;

impl ResultCache {
    /// An empty cache holding at most `cap` bytes of tensors.
    pub fn new(cap: u64) -> Self {
        ResultCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    pub fn get(&self, id: &SubgraphId) -> Option<Arc<Vec<Arc<Data>>>> {
        self.map.get(id).cloned()
    }

    /// Keeps `v` under `id`, evicting the oldest entries to stay under the byte cap. Each entry
    /// is charged its bookkeeping as well as its tensors' bytes, so that a stream of tiny
    /// results cannot hold many times the cap.
    pub fn put(&mut self, id: SubgraphId, v: Arc<Vec<Arc<Data>>>) {
        let size: u64 = ENTRY_BYTES
            + v.iter()
                .map(|t| t.meta().bytes() + TENSOR_BYTES)
                .sum::<u64>();
        if size > self.cap || self.map.contains_key(&id) {
            return;
        }
        while self.bytes + size > self.cap {
            let Some((old, b)) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
            self.bytes -= b;
        }
        self.map.insert(id, v);
        self.order.push_back((id, size));
        self.bytes += size;
    }

    /// Drops the result under `id` (it is no longer trusted).
    pub fn remove(&mut self, id: &SubgraphId) {
        if self.map.remove(id).is_some()
            && let Some(k) = self.order.iter().position(|(o, _)| o == id)
            && let Some((_, b)) = self.order.remove(k)
        {
            self.bytes -= b;
        }
    }

    /// How many results are held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use corvid_kernels::{Op, Program, TensorMeta, UnaryOp};

    /// Tiny results are charged their bookkeeping: a stream of them cannot hold many times
    /// the cap (a worker's cache is a share of its `--max-memory`).
    #[test]
    fn tiny_results_count_their_bookkeeping_against_the_cap() {
        let mut c = ResultCache::new(1 << 20);
        let empty = Arc::new(vec![Arc::new(Data::full(vec![0], 0.0))]);
        for i in 0..100_000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            c.put(SubgraphId(id), empty.clone());
        }
        assert_eq!(c.len() as u64, (1 << 20) / (ENTRY_BYTES + TENSOR_BYTES));
        // A cache of no bytes keeps nothing, not even empty results.
        let mut none = ResultCache::new(0);
        none.put(SubgraphId([1; 32]), empty);
        assert!(none.is_empty());
    }

    /// The same subgraph id over other values: a caching executor answers from its cache, one
    /// without a cache computes what it was given.
    #[test]
    fn an_executor_without_a_cache_computes_what_it_is_given() {
        let program = Program::single(Op::Unary(UnaryOp::Neg), vec![TensorMeta::f32([2])]);
        let id = SubgraphId([7; 32]);
        let one = Arc::new(Data::from_f32([2], vec![1.0, 2.0]).unwrap());
        let other = Arc::new(Data::from_f32([2], vec![5.0, 6.0]).unwrap());
        let cpu = || Backend::open(corvid_kernels::BackendChoice::Cpu).unwrap();
        let caching = LocalExecutor::new(cpu());
        caching
            .run_program(id, &program, std::slice::from_ref(&one))
            .unwrap();
        let stale = caching
            .run_program(id, &program, std::slice::from_ref(&other))
            .unwrap();
        assert_eq!(stale[0].as_f32().unwrap(), &[-1.0, -2.0]);
        let fresh = LocalExecutor::new(cpu()).without_cache();
        fresh.run_program(id, &program, &[one]).unwrap();
        let got = fresh.run_program(id, &program, &[other]).unwrap();
        assert_eq!(got[0].as_f32().unwrap(), &[-5.0, -6.0]);
        assert_eq!(fresh.cached(), 0);
    }
}
