//! The graph: a lazy, shape-checked DAG of ops over constant leaves.

use std::collections::{BTreeMap, HashMap};
use std::panic::Location;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use corvid_kernels::{Op, Program, Recipe, Tensor as Data, TensorMeta};
use ndarray::{Array, Dimension};

use crate::error::{BuildError, EvalError, Site};
use crate::exec::{Executor, default_executor};
use crate::ids::{ValueId, op_value_id};
use crate::partition::{PartitionError, partition};
use crate::plan::{Leaf, Plan};
use crate::report::{Failure, Report};
use crate::tensor::Tensor;

/// Index of a node in its graph.
pub(crate) type NodeId = usize;

#[derive(Debug)]
pub(crate) enum NodeKind {
    Leaf(Arc<Leaf>),
    Op {
        op: Op,
        args: Vec<NodeId>,
    },
    /// A tensor whose op was rejected (built through an operator, which cannot return an error).
    Failed(BuildError),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub kind: NodeKind,
    pub meta: TensorMeta,
    pub id: ValueId,
    pub at: Site,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub nodes: Vec<Node>,
    /// Identical computations are one node.
    by_id: HashMap<ValueId, NodeId>,
    pub failures: Vec<Failure>,
}

#[derive(Debug)]
struct Shared {
    name: String,
    inner: Mutex<Inner>,
    executor: Mutex<Option<Arc<dyn Executor>>>,
}

/// A named graph of tensor ops, like RavOp's `R.Graph(name=...)`. Cheap to clone (a handle).
///
/// ```
/// use corvid_sdk::Graph;
/// let g = Graph::new("test");
/// let a = g.t(&[1.0, 2.0, 3.0]);
/// let b = g.t(&[5.0, 22.0, 7.0]);
/// let c = &a + &b;
/// assert_eq!(c.eval()?.as_slice().unwrap(), &[6.0, 24.0, 10.0]);
/// assert!(g.end().is_ok());
/// # Ok::<(), corvid_sdk::EvalError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Graph {
    shared: Arc<Shared>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            shared: Arc::new(Shared {
                name: name.into(),
                inner: Mutex::new(Inner::default()),
                executor: Mutex::new(None),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Evaluates through `executor` instead of the process's default local one.
    pub fn with_executor(self, executor: Arc<dyn Executor>) -> Graph {
        *lock(&self.shared.executor) = Some(executor);
        self
    }

    pub(crate) fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.shared.inner)
    }

    pub(crate) fn executor(&self) -> Arc<dyn Executor> {
        lock(&self.shared.executor)
            .clone()
            .unwrap_or_else(default_executor)
    }

    // ---- leaves -------------------------------------------------------------------------

    /// A constant from a kernels tensor.
    #[track_caller]
    pub fn constant(&self, data: Data) -> Tensor {
        let meta = data.meta();
        let id = data.content_id().into();
        self.add_node(
            NodeKind::Leaf(Arc::new(Leaf::data(Arc::new(data)))),
            meta,
            id,
            Site(Location::caller()),
        )
    }

    /// A model's tensors as constants of this graph, by name: not copied and not hashed
    /// again, so using the same model in many graphs costs nothing per graph, and workers
    /// that hold its tensors are sent their ids only.
    #[track_caller]
    pub fn model(&self, model: &crate::Model) -> BTreeMap<String, Tensor> {
        let at = Site(Location::caller());
        model
            .entries()
            .map(|(name, data, id)| {
                let leaf = NodeKind::Leaf(Arc::new(Leaf::data(data.clone())));
                (name.to_string(), self.add_node(leaf, data.meta(), id, at))
            })
            .collect()
    }

    /// A 1-D f32 tensor, like RavOp's `R.t([1, 2, 3])`.
    #[track_caller]
    pub fn t(&self, values: &[f32]) -> Tensor {
        let data =
            Data::from_f32([values.len()], values.to_vec()).expect("a 1-d shape fits any slice");
        self.constant(data)
    }

    /// A rank-0 f32 tensor.
    #[track_caller]
    pub fn scalar(&self, v: f32) -> Tensor {
        self.constant(Data::scalar(v))
    }

    /// An f32 tensor of `shape` from row-major values.
    #[track_caller]
    pub fn from_vec(&self, shape: &[usize], values: Vec<f32>) -> Result<Tensor, BuildError> {
        let at = Site(Location::caller());
        let data = Data::from_f32(shape.to_vec(), values).map_err(|e| BuildError::Data {
            at,
            reason: e.to_string(),
        })?;
        Ok(self.constant_at(data, at))
    }

    /// An f32 tensor from an ndarray array of any dimension.
    #[track_caller]
    pub fn from_array<D: Dimension>(&self, a: Array<f32, D>) -> Tensor {
        let at = Site(Location::caller());
        self.constant_at(Data::from_array(a.into_dyn()), at)
    }

    /// Seeded uniform random values in `[lo, hi)`; the same seed gives the same tensor anywhere.
    ///
    /// The tensor is its recipe: no values are made until something reads them, and a worker
    /// that needs a block of it makes that block (see [`Recipe`]).
    ///
    /// # Panics
    /// If the range is not finite or `lo > hi`, or the shape has more elements than fit in
    /// memory, like [`Data::random_uniform`].
    #[track_caller]
    pub fn random(&self, shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        let at = Site(Location::caller());
        let recipe = Recipe::uniform(shape.to_vec(), lo, hi, seed);
        if let Err(e) = recipe.check() {
            panic!("{e}");
        }
        let meta = recipe.meta();
        let id = recipe.id().into();
        self.add_node(NodeKind::Leaf(Arc::new(Leaf::recipe(recipe))), meta, id, at)
    }

    /// Loads a `.npy` file holding f32 or i32 values.
    #[track_caller]
    pub fn load_npy(&self, path: impl AsRef<Path>) -> Result<Tensor, BuildError> {
        let at = Site(Location::caller());
        let path = path.as_ref();
        let fail = |reason: String| BuildError::File {
            at,
            path: path.display().to_string(),
            reason,
        };
        let data = match ndarray_npy::read_npy::<_, ndarray::ArrayD<f32>>(path) {
            Ok(a) => Data::from_array(a),
            Err(ndarray_npy::ReadNpyError::Io(e)) => return Err(fail(e.to_string())),
            Err(first) => match ndarray_npy::read_npy::<_, ndarray::ArrayD<i32>>(path) {
                Ok(a) => Data::from_array_i32(a),
                Err(_) => return Err(fail(format!("{first} (corvid reads f32 and i32 arrays)"))),
            },
        };
        Ok(self.constant_at(data, at))
    }

    /// Concatenates tensors along `axis`.
    #[track_caller]
    pub fn concat(&self, parts: &[&Tensor], axis: usize) -> Result<Tensor, BuildError> {
        self.apply_at(Op::Concat { axis }, parts, Site(Location::caller()))
    }

    fn constant_at(&self, data: Data, at: Site) -> Tensor {
        let meta = data.meta();
        let id = data.content_id().into();
        self.add_node(
            NodeKind::Leaf(Arc::new(Leaf::data(Arc::new(data)))),
            meta,
            id,
            at,
        )
    }

    // ---- ops ----------------------------------------------------------------------------

    /// Applies any op to tensors of this graph, checking shapes now.
    #[track_caller]
    pub fn apply(&self, op: Op, args: &[&Tensor]) -> Result<Tensor, BuildError> {
        self.apply_at(op, args, Site(Location::caller()))
    }

    pub(crate) fn apply_at(
        &self,
        op: Op,
        args: &[&Tensor],
        at: Site,
    ) -> Result<Tensor, BuildError> {
        let mut ids = Vec::with_capacity(args.len());
        let mut nodes = Vec::with_capacity(args.len());
        let mut metas = Vec::with_capacity(args.len());
        {
            let inner = self.inner();
            for a in args {
                if a.graph() != self {
                    return Err(BuildError::MixedGraphs {
                        at,
                        op: op.to_string(),
                        a: self.name().into(),
                        b: a.graph().name().into(),
                    });
                }
                let n = &inner.nodes[a.node()];
                if let NodeKind::Failed(e) = &n.kind {
                    return Err(BuildError::FailedInput {
                        at,
                        op: op.to_string(),
                        failed_at: e.site(),
                    });
                }
                ids.push(n.id);
                nodes.push(a.node());
                metas.push(n.meta.clone());
            }
        }
        let refs: Vec<&TensorMeta> = metas.iter().collect();
        let meta = corvid_kernels::shape::infer(&op, &refs)
            .map_err(|error| BuildError::Op { at, error })?;
        let id = op_value_id(&op, &ids);
        Ok(self.add_node(NodeKind::Op { op, args: nodes }, meta, id, at))
    }

    /// Like [`Graph::apply_at`], but records a failure instead of returning it: for operators.
    pub(crate) fn apply_or_record(&self, op: Op, args: &[&Tensor], at: Site) -> Tensor {
        match self.apply_at(op, args, at) {
            Ok(t) => t,
            Err(e) => {
                let meta = args
                    .first()
                    .map_or(TensorMeta::f32(vec![]), |a| a.meta().clone());
                let mut inner = self.inner();
                inner.failures.push(Failure::build(&e));
                let id = ValueId(
                    *blake3::hash(format!("failed {} {e}", inner.nodes.len()).as_bytes())
                        .as_bytes(),
                );
                drop(inner);
                self.add_node(NodeKind::Failed(e), meta, id, at)
            }
        }
    }

    fn add_node(&self, kind: NodeKind, meta: TensorMeta, id: ValueId, at: Site) -> Tensor {
        let mut inner = self.inner();
        let node = match inner.by_id.get(&id) {
            Some(&n) => n,
            None => {
                let n = inner.nodes.len();
                inner.nodes.push(Node {
                    kind,
                    meta: meta.clone(),
                    id,
                    at,
                });
                inner.by_id.insert(id, n);
                n
            }
        };
        drop(inner);
        Tensor::new(self.clone(), node, meta)
    }

    // ---- evaluation ---------------------------------------------------------------------

    /// Evaluates several tensors at once, sharing their common work.
    pub fn eval(&self, outputs: &[&Tensor]) -> Result<Vec<Data>, EvalError> {
        let result = self
            .planned(outputs)
            .and_then(|(executor, plan)| executor.execute(&plan));
        match result {
            Ok(values) => Ok(values.iter().map(|v| (**v).clone()).collect()),
            Err(e) => {
                self.record(&e);
                Err(e)
            }
        }
    }

    /// Starts evaluating `outputs` and returns at once: wait on the handle (or `.await` it),
    /// poll it, cancel it or read its progress; several jobs run at the same time. Errors in
    /// building or partitioning come back here, before anything runs.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use corvid_sdk::{Graph, LocalExecutor, kernels::{Backend, CpuBackend}};
    /// let g = Graph::new("jobs").with_executor(Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new()))));
    /// let a = g.random(&[64, 64], -1.0, 1.0, 1);
    /// let first = g.submit(&[&a.matmul(&a)?])?;
    /// let second = g.submit(&[&a.relu()?])?;
    /// for (i, out) in corvid_sdk::as_completed([first, second]) {
    ///     println!("job {i}: {:?}", out?[0].meta());
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn submit(&self, outputs: &[&Tensor]) -> Result<crate::JobHandle, EvalError> {
        let (executor, plan) = self.planned(outputs).inspect_err(|e| self.record(e))?;
        let state = Arc::new(crate::JobState::default());
        state.set_total(plan.subgraphs.len());
        let rx = match executor.start(&plan, &state) {
            Some(rx) => rx,
            None => {
                let (tx, rx) = futures::channel::oneshot::channel();
                let job = state.clone();
                std::thread::spawn(move || {
                    let outcome = executor.execute(&plan);
                    if outcome.is_ok() {
                        job.set_done(plan.subgraphs.len());
                    }
                    let _ = tx.send(outcome);
                });
                rx
            }
        };
        Ok(crate::JobHandle::new(rx, state, self.clone()))
    }

    /// The executor and the plan it would run for `outputs`.
    fn planned(&self, outputs: &[&Tensor]) -> Result<(Arc<dyn Executor>, Plan), EvalError> {
        let executor = self.executor();
        let plan = {
            let inner = self.inner();
            let mut roots = Vec::with_capacity(outputs.len());
            for t in outputs {
                if t.graph() != self {
                    return Err(EvalError::Build {
                        graph: self.name().into(),
                        error: BuildError::MixedGraphs {
                            at: t.site(),
                            op: "eval".into(),
                            a: self.name().into(),
                            b: t.graph().name().into(),
                        },
                    });
                }
                roots.push(t.node());
            }
            partition(&inner.nodes, &roots, &executor.settings())
        };
        let plan = plan.map_err(|e| match e {
            PartitionError::Build(error) => EvalError::Build {
                graph: self.name().into(),
                error,
            },
            e @ PartitionError::TooLarge { .. } => EvalError::Partition(e),
        })?;
        Ok((executor, plan))
    }

    /// Keeps an evaluation's failure for [`Graph::end`] (build errors were kept when they
    /// happened).
    pub(crate) fn record(&self, e: &EvalError) {
        if !matches!(e, EvalError::Build { .. }) {
            self.inner().failures.push(Failure::eval(e));
        }
    }

    /// Ends the graph: every op that failed to build or run, and why. Ok when none did.
    pub fn end(&self) -> Result<(), Report> {
        let failures = self.inner().failures.clone();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Report {
                graph: self.name().into(),
                failures,
            })
        }
    }

    /// Number of distinct nodes (identical computations count once).
    pub fn len(&self) -> usize {
        self.inner().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The partition the executor would run for `outputs`, without running it.
    pub fn plan(&self, outputs: &[&Tensor]) -> Result<crate::plan::Plan, PartitionError> {
        let roots: Vec<NodeId> = outputs.iter().map(|t| t.node()).collect();
        partition(&self.inner().nodes, &roots, &self.executor().settings())
    }

    /// The graph's canonical encoding: its nodes' ops, argument ids and leaf content ids in
    /// order. Equal graphs have equal bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let inner = self.inner();
        let mut out = Vec::new();
        for n in &inner.nodes {
            let entry: (Option<&Op>, Vec<ValueId>, ValueId) = match &n.kind {
                NodeKind::Leaf(_) => (None, vec![], n.id),
                NodeKind::Op { op, args } => (
                    Some(op),
                    args.iter().map(|&a| inner.nodes[a].id).collect(),
                    n.id,
                ),
                NodeKind::Failed(_) => (None, vec![], n.id),
            };
            out.extend(postcard::to_allocvec(&entry).expect("graph entries serialise"));
        }
        out
    }

    /// blake3 of [`Graph::canonical_bytes`].
    pub fn id(&self) -> ValueId {
        ValueId(*blake3::hash(&self.canonical_bytes()).as_bytes())
    }

    /// The part of the graph `outputs` need as one kernels program over its constants,
    /// unpartitioned: what evaluating "directly" on one backend means.
    pub fn whole_program(
        &self,
        outputs: &[&Tensor],
    ) -> Result<(Program, Vec<Arc<Data>>), BuildError> {
        let inner = self.inner();
        let mut needed = vec![false; inner.nodes.len()];
        let mut stack: Vec<NodeId> = outputs.iter().map(|t| t.node()).collect();
        while let Some(n) = stack.pop() {
            if !std::mem::replace(&mut needed[n], true)
                && let NodeKind::Op { args, .. } = &inner.nodes[n].kind
            {
                stack.extend(args);
            }
        }
        let mut program = Program::default();
        let mut leaves = Vec::new();
        let mut local: HashMap<NodeId, u32> = HashMap::new();
        for (i, n) in inner.nodes.iter().enumerate().filter(|(i, _)| needed[*i]) {
            if let NodeKind::Leaf(d) = &n.kind {
                local.insert(i, program.inputs.len() as u32);
                program.inputs.push(n.meta.clone());
                leaves.push(d.get().clone());
            }
        }
        let first_op = program.inputs.len() as u32;
        let mut next = first_op;
        for (i, n) in inner.nodes.iter().enumerate().filter(|(i, _)| needed[*i]) {
            match &n.kind {
                NodeKind::Leaf(_) => {}
                NodeKind::Failed(e) => return Err(e.clone()),
                NodeKind::Op { op, args } => {
                    let args: Vec<u32> = args.iter().map(|a| local[a]).collect();
                    program.nodes.push(corvid_kernels::Node {
                        op: op.clone(),
                        args,
                    });
                    local.insert(i, next);
                    next += 1;
                }
            }
        }
        program.outputs = outputs.iter().map(|t| local[&t.node()]).collect();
        Ok((program, leaves))
    }
}

/// Locks, recovering from a poisoned lock: graph state stays consistent under panics because
/// every mutation is a single push.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
