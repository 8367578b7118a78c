//! One computation over many inputs (`Pool.map`, Dask's `client.map`): a [`Computation`] is
//! defined once over its inputs and, optionally, a [`Model`] of shared weights; [`Computation::map`]
//! runs it on each input as its own job, a window of jobs at a time, and yields verified
//! results in input order; [`Computation::map_unordered`] yields them as they end.
//!
//! The model's tensors are constants with their content ids: the first job sends them to the
//! worker that runs it, and a worker that holds them is sent their ids only. The first job
//! runs alone, so that the requester knows a holder before the others start.
//! [`Computation::update`] replaces the model (a new content id, so new weights go out).
//!
//! Small inputs cost a round trip each: [`Computation::with_batch`] joins `k` inputs along
//! axis 0 into one job and splits every output back along axis 0, for computations that treat
//! rows independently (axis 0 is the batch axis of every input and output).
//!
//! ```
//! # use std::sync::Arc;
//! use corvid_sdk::{Computation, LocalExecutor, Model, kernels::{Backend, CpuBackend, Tensor as Data}};
//!
//! let model = Model::new("scale", [("w", Data::from_f32([2, 2], vec![2.0, 0.0, 0.0, 3.0])?)]);
//! let double = Computation::new("scale", |_, x, w| Ok(vec![x[0].matmul(&w["w"])?])).with_model(model);
//! let exec = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
//! let inputs = (0..4).map(|i| vec![Data::from_f32([1, 2], vec![i as f32, 1.0]).unwrap()]);
//! for (i, out) in double.map(exec, inputs, 2).enumerate() {
//!     assert_eq!(out?[0].as_f32()?, &[2.0 * i as f32, 3.0]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use corvid_kernels::{Tensor as Data, TensorMeta};
use futures::StreamExt;

use crate::error::{BuildError, EvalError, Site};
use crate::exec::Executor;
use crate::graph::Graph;
use crate::ids::ValueId;
use crate::model::Model;
use crate::tensor::Tensor;

/// The model's tensors, by name, as constants of the graph being built.
pub type Weights = BTreeMap<String, Tensor>;

type Build = dyn Fn(&Graph, &[Tensor], &Weights) -> Result<Vec<Tensor>, BuildError> + Send + Sync;

/// What one input's job ended with: its outputs, or why there are none.
pub type MapOutcome = Result<Vec<Data>, EvalError>;

/// A computation defined once: `build(graph, inputs, weights) -> outputs`.
#[derive(Clone)]
pub struct Computation {
    name: String,
    build: Arc<Build>,
    model: Option<Model>,
    batch: usize,
}

impl std::fmt::Debug for Computation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Computation")
            .field("name", &self.name)
            .field("model", &self.model.as_ref().map(|m| (m.name(), m.id())))
            .field("batch", &self.batch)
            .finish()
    }
}

impl Computation {
    pub fn new(
        name: impl Into<String>,
        build: impl Fn(&Graph, &[Tensor], &Weights) -> Result<Vec<Tensor>, BuildError>
        + Send
        + Sync
        + 'static,
    ) -> Computation {
        Computation {
            name: name.into(),
            build: Arc::new(build),
            model: None,
            batch: 1,
        }
    }

    /// Joins up to `k` inputs along axis 0 into one job and splits each output back along
    /// axis 0, by the rows each input brought: far fewer round trips for small inputs. Only
    /// for computations whose rows are independent (a row-wise MLP, not a softmax over axis
    /// 0); inputs that cannot be joined, or outputs without those rows, are an error for every
    /// input of that job. `k` of 0 or 1 runs one job per input.
    pub fn with_batch(mut self, k: usize) -> Computation {
        self.batch = k.max(1);
        self
    }

    /// How many inputs one job joins ([`Computation::with_batch`]).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The shared weights every input's job uses.
    pub fn with_model(mut self, model: Model) -> Computation {
        self.model = Some(model);
        self
    }

    /// Replaces the shared weights: later maps use (and send) the new ones.
    pub fn update(&mut self, model: Model) {
        self.model = Some(model);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn model(&self) -> Option<&Model> {
        self.model.as_ref()
    }

    /// The computation's content id for inputs of these shapes: the id of its graph over
    /// placeholder inputs (zeros) and the model.
    pub fn id(&self, inputs: &[TensorMeta]) -> Result<ValueId, BuildError> {
        let g = Graph::new(self.name.clone());
        let xs: Vec<Tensor> = inputs
            .iter()
            .map(|m| {
                let words = vec![0u32; m.numel()];
                let d = Data::from_words(m.dtype, m.shape.clone(), &words)
                    .expect("zeros of a valid meta");
                g.constant(d)
            })
            .collect();
        let w = self.model.as_ref().map(|m| g.model(m)).unwrap_or_default();
        (self.build)(&g, &xs, &w)?;
        Ok(g.id())
    }

    /// Starts the job of one input, or of several joined, named `label`.
    fn submit(
        &self,
        executor: &Arc<dyn Executor>,
        label: String,
        inputs: Vec<Data>,
    ) -> Result<crate::JobHandle, EvalError> {
        let g = Graph::new(label).with_executor(executor.clone());
        let xs: Vec<Tensor> = inputs.into_iter().map(|d| g.constant(d)).collect();
        let w = self.model.as_ref().map(|m| g.model(m)).unwrap_or_default();
        let outs = (self.build)(&g, &xs, &w).map_err(|error| EvalError::Build {
            graph: g.name().into(),
            error,
        })?;
        g.submit(&outs.iter().collect::<Vec<_>>())
    }

    /// Runs the computation on each input (one `Vec` of tensors per job, or per `k` joined
    /// with [`Computation::with_batch`]), up to `window` jobs at a time, yielding each input's
    /// outcome in input order.
    #[track_caller]
    pub fn map<'a>(
        &'a self,
        executor: Arc<dyn Executor>,
        inputs: impl IntoIterator<Item = Vec<Data>> + 'a,
        window: usize,
    ) -> impl Iterator<Item = MapOutcome> + 'a {
        self.jobs(executor, inputs, window, true)
            .map(|(_, outcome, _)| outcome)
    }

    /// As [`Computation::map`], yielding `(input index, outcome)` as jobs end.
    #[track_caller]
    pub fn map_unordered<'a>(
        &'a self,
        executor: Arc<dyn Executor>,
        inputs: impl IntoIterator<Item = Vec<Data>> + 'a,
        window: usize,
    ) -> impl Iterator<Item = (usize, MapOutcome)> + 'a {
        self.jobs(executor, inputs, window, false)
            .map(|(i, outcome, _)| (i, outcome))
    }

    /// Each input's index, outcome and job state (where the executor leaves its report; the
    /// inputs of a batch share theirs), in input order if `ordered`, else as jobs end.
    #[track_caller]
    pub fn jobs<'a>(
        &'a self,
        executor: Arc<dyn Executor>,
        inputs: impl IntoIterator<Item = Vec<Data>> + 'a,
        window: usize,
        ordered: bool,
    ) -> Box<dyn Iterator<Item = (usize, MapOutcome, Option<Arc<crate::JobState>>)> + 'a> {
        let at = Site(std::panic::Location::caller());
        let k = self.batch;
        let mut inputs = inputs.into_iter().enumerate();
        let mut chunks = std::iter::from_fn(move || {
            let group: Vec<(usize, Vec<Data>)> = inputs.by_ref().take(k).collect();
            (!group.is_empty()).then_some(group)
        });
        let Some(first) = chunks.next() else {
            return Box::new(std::iter::empty());
        };
        // The first job alone: once it ends, the requester knows who holds the model.
        let exec = executor.clone();
        let first = std::iter::once_with(move || {
            futures::executor::block_on(self.run_chunk(&exec, first, at))
        })
        .flatten();
        let rest =
            futures::stream::iter(chunks).map(move |group| self.run_chunk(&executor, group, at));
        let window = window.max(1);
        let rest: std::pin::Pin<Box<dyn futures::Stream<Item = _> + 'a>> = if ordered {
            Box::pin(rest.buffered(window))
        } else {
            Box::pin(rest.buffer_unordered(window))
        };
        Box::new(first.chain(futures::executor::block_on_stream(rest).flatten()))
    }

    /// Starts the job of `group` (one input, or several to join) now and returns a future of
    /// each input's outcome.
    fn run_chunk(
        &self,
        executor: &Arc<dyn Executor>,
        group: Vec<(usize, Vec<Data>)>,
        at: Site,
    ) -> impl std::future::Future<Output = Vec<(usize, MapOutcome, Option<Arc<crate::JobState>>)>> + use<>
    {
        let index: Vec<usize> = group.iter().map(|(i, _)| *i).collect();
        let (label, job, rows) = if self.batch == 1 {
            let (i, x) = group.into_iter().next().expect("a group has an input");
            let label = format!("{}[{i}]", self.name);
            (label.clone(), self.submit(executor, label, x), None)
        } else {
            let label = format!("{}[{}-{}]", self.name, index[0], index[index.len() - 1]);
            match join(&group) {
                Ok((joined, rows)) => (
                    label.clone(),
                    self.submit(executor, label, joined),
                    Some(rows),
                ),
                Err(reason) => {
                    let e = batch_error(&label, at, reason);
                    (label, Err(e), None)
                }
            }
        };
        // Made before the first poll: a map dropped before this job ended (its caller stopped
        // iterating) cancels it, polled or not.
        let guard = CancelOnDrop(job.as_ref().ok().map(|h| h.state().clone()));
        async move {
            let (outcome, state) = match job {
                Ok(h) => {
                    let outcome = h.await;
                    (outcome, guard.disarm())
                }
                Err(e) => (Err(e), None),
            };
            let outcomes: Vec<MapOutcome> = match (outcome, rows) {
                (Ok(outs), None) => vec![Ok(outs)],
                (Ok(outs), Some(rows)) => match split(&outs, &rows) {
                    Ok(parts) => parts.into_iter().map(Ok).collect(),
                    Err(reason) => vec![Err(batch_error(&label, at, reason)); index.len()],
                },
                (Err(e), _) => vec![Err(e); index.len()],
            };
            index
                .into_iter()
                .zip(outcomes)
                .map(|(i, o)| (i, o, state.clone()))
                .collect()
        }
    }
}

/// A batch that could not be joined or split: every input of it fails with this.
fn batch_error(label: &str, at: Site, reason: String) -> EvalError {
    EvalError::Build {
        graph: label.into(),
        error: BuildError::Data {
            at,
            reason: format!("a batched map ({label}): {reason}"),
        },
    }
}

/// Joins the inputs' tensors position by position along axis 0; the rows each input brought.
fn join(inputs: &[(usize, Vec<Data>)]) -> Result<(Vec<Data>, Vec<usize>), String> {
    let (first, head) = (inputs[0].0, &inputs[0].1);
    if let Some((i, x)) = inputs.iter().find(|(_, x)| x.len() != head.len()) {
        return Err(format!(
            "input {i} has {} tensors, input {first} {}",
            x.len(),
            head.len()
        ));
    }
    if head.is_empty() {
        return Err("inputs without tensors have no rows to join".into());
    }
    let mut rows = Vec::with_capacity(inputs.len());
    for (i, x) in inputs {
        let Some(&r) = x[0].shape().first() else {
            return Err(format!(
                "input {i} is a scalar: it has no axis 0 to join on"
            ));
        };
        if let Some((k, t)) = x
            .iter()
            .enumerate()
            .find(|(_, t)| t.shape().first() != Some(&r))
        {
            return Err(format!(
                "input {i}'s tensor {k} is {}, its tensor 0 {}: their rows differ",
                t.meta(),
                x[0].meta()
            ));
        }
        rows.push(r);
    }
    let joined = (0..head.len())
        .map(|k| {
            let (dtype, rest) = (head[k].dtype(), &head[k].shape()[1..]);
            let mut words = Vec::new();
            for (i, x) in inputs {
                let t = &x[k];
                if t.dtype() != dtype || &t.shape()[1..] != rest {
                    return Err(format!(
                        "input {i}'s tensor {k} is {}: it cannot join input {first}'s {} along \
                         axis 0",
                        t.meta(),
                        head[k].meta()
                    ));
                }
                words.extend_from_slice(t.words());
            }
            let shape = [&[rows.iter().sum()][..], rest].concat();
            Data::from_word_vec(dtype, shape, words).map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok((joined, rows))
}

/// Splits each output along axis 0 into the inputs' rows: one `Vec` of outputs per input.
fn split(outputs: &[Data], rows: &[usize]) -> Result<Vec<Vec<Data>>, String> {
    let total: usize = rows.iter().sum();
    let mut parts = vec![Vec::with_capacity(outputs.len()); rows.len()];
    for (k, out) in outputs.iter().enumerate() {
        if out.shape().first() != Some(&total) {
            return Err(format!(
                "output {k} is {} for {total} input rows: every output needs axis 0 to be the \
                 batch axis",
                out.meta()
            ));
        }
        let width = out.words().len() / total.max(1);
        let mut lo = 0;
        for (n, &r) in rows.iter().enumerate() {
            let shape = [&[r][..], &out.shape()[1..]].concat();
            let words = &out.words()[lo * width..(lo + r) * width];
            parts[n].push(Data::from_words(out.dtype(), shape, words).map_err(|e| e.to_string())?);
            lo += r;
        }
    }
    Ok(parts)
}

/// Cancels a job when dropped, unless disarmed first.
struct CancelOnDrop(Option<Arc<crate::JobState>>);

impl CancelOnDrop {
    fn disarm(mut self) -> Option<Arc<crate::JobState>> {
        self.0.take()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalExecutor;
    use corvid_kernels::{Backend, CpuBackend};

    fn exec() -> Arc<dyn Executor> {
        Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())))
    }

    fn affine() -> Computation {
        let m = Model::new(
            "affine",
            [
                (
                    "w",
                    Data::from_f32([3, 2], vec![1., 2., 3., 4., 5., 6.]).unwrap(),
                ),
                ("b", Data::from_f32([2], vec![0.5, -0.5]).unwrap()),
            ],
        );
        Computation::new("affine", |_, x, w| {
            Ok(vec![x[0].matmul(&w["w"])?.add(&w["b"])?])
        })
        .with_model(m)
    }

    fn input(i: usize) -> Vec<Data> {
        vec![Data::from_f32([1, 3], vec![i as f32, 1.0, 0.0]).unwrap()]
    }

    fn want(i: usize) -> Vec<f32> {
        vec![i as f32 + 3.0 + 0.5, 2.0 * i as f32 + 4.0 - 0.5]
    }

    #[test]
    fn ordered_and_unordered_maps_give_every_result() {
        let c = affine();
        let got: Vec<Vec<f32>> = c
            .map(exec(), (0..40).map(input), 8)
            .map(|o| o.unwrap()[0].as_f32().unwrap().to_vec())
            .collect();
        assert_eq!(got, (0..40).map(want).collect::<Vec<_>>());
        let mut seen = [false; 40];
        for (i, o) in c.map_unordered(exec(), (0..40).map(input), 8) {
            assert_eq!(o.unwrap()[0].as_f32().unwrap(), want(i).as_slice());
            assert!(!std::mem::replace(&mut seen[i], true), "input {i} twice");
        }
        assert!(seen.iter().all(|s| *s));
    }

    /// A started job, and the sender of its outcome if it never ends.
    type Started = (
        Arc<crate::JobState>,
        Option<futures::channel::oneshot::Sender<crate::job::Outcome>>,
    );

    /// Runs the first `done` jobs it is given and keeps every later one running forever.
    #[derive(Debug)]
    struct Stalls {
        local: LocalExecutor,
        done: usize,
        started: std::sync::Mutex<Vec<Started>>,
    }

    impl Executor for Stalls {
        fn settings(&self) -> crate::Settings {
            self.local.settings()
        }
        fn execute(&self, plan: &crate::Plan) -> Result<Vec<Arc<Data>>, EvalError> {
            self.local.execute(plan)
        }
        fn start(
            &self,
            plan: &crate::Plan,
            job: &Arc<crate::JobState>,
        ) -> Option<crate::job::Pending> {
            let (tx, rx) = futures::channel::oneshot::channel();
            let mut started = self.started.lock().unwrap();
            if started.len() < self.done {
                let _ = tx.send(self.local.execute(plan));
                started.push((job.clone(), None));
            } else {
                started.push((job.clone(), Some(tx)));
            }
            Some(rx)
        }
    }

    #[test]
    fn a_map_left_early_cancels_the_jobs_it_started() {
        let stalls = Arc::new(Stalls {
            local: LocalExecutor::new(Backend::Cpu(CpuBackend::new())),
            done: 2,
            started: Default::default(),
        });
        let c = affine();
        {
            let mut jobs = c.map(stalls.clone(), (0..40).map(input), 8);
            assert!(jobs.next().unwrap().is_ok());
            assert!(jobs.next().unwrap().is_ok());
        }
        let started = stalls.started.lock().unwrap();
        // The first alone, then a window of 8: jobs 1 to 8 started, 2 to 8 never end.
        assert_eq!(started.len(), 9);
        for (k, (state, _)) in started.iter().enumerate() {
            assert_eq!(state.is_cancelled(), k >= 2, "job {k}");
        }
    }

    /// Input `i` with `1 + i % 3` rows: row `r` is `[i + r, 1, 0]`.
    fn rows(i: usize) -> Vec<Data> {
        let n = 1 + i % 3;
        let v = (0..n).flat_map(|r| [(i + r) as f32, 1.0, 0.0]).collect();
        vec![Data::from_f32([n, 3], v).unwrap()]
    }

    #[test]
    fn a_batched_map_joins_inputs_into_fewer_jobs_and_splits_every_result_back() {
        let one = affine();
        let batched = affine().with_batch(6);
        assert_eq!((one.batch(), batched.batch()), (1, 6));
        let want: Vec<MapOutcome> = one.map(exec(), (0..40).map(rows), 4).collect();
        let mut jobs = Vec::new();
        for (i, outcome, state) in batched.jobs(exec(), (0..40).map(rows), 4, true) {
            let (got, want) = (outcome.unwrap(), want[i].as_ref().unwrap());
            assert_eq!(got[0].shape(), [1 + i % 3, 2], "input {i}");
            assert_eq!(
                got[0].as_f32().unwrap(),
                want[0].as_f32().unwrap(),
                "input {i}"
            );
            let state = state.expect("a started job has a state");
            if !jobs.iter().any(|s| Arc::ptr_eq(s, &state)) {
                jobs.push(state);
            }
        }
        assert_eq!(jobs.len(), 7, "40 inputs, 6 per job");
        let mut seen = [false; 40];
        for (i, o) in batched.map_unordered(exec(), (0..40).map(rows), 4) {
            assert_eq!(o.unwrap()[0].shape(), [1 + i % 3, 2]);
            assert!(!std::mem::replace(&mut seen[i], true), "input {i} twice");
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn a_batch_that_cannot_join_or_split_fails_its_own_inputs_at_the_callers_line() {
        // Input 5 has 4 columns: the batch of inputs 4 and 5 cannot be joined.
        let mut inputs: Vec<Vec<Data>> = (0..6).map(input).collect();
        inputs[5] = vec![Data::from_f32([1, 4], vec![0.0; 4]).unwrap()];
        let out: Vec<MapOutcome> = affine().with_batch(2).map(exec(), inputs, 2).collect();
        let line = line!() - 1;
        assert!(out[..4].iter().all(|o| o.is_ok()));
        for o in &out[4..] {
            let e = o.as_ref().unwrap_err().to_string();
            assert!(
                e.contains(&format!("map.rs:{line}:")) && e.contains("affine[4-5]"),
                "{e}"
            );
            assert!(
                e.contains("input 5's tensor 0 is f32[1, 4]: it cannot join input 4's f32[1, 3]"),
                "{e}"
            );
        }

        // A sum over axis 0 mixes the rows: its output has none to split.
        let total =
            Computation::new("total", |_, x, _| Ok(vec![x[0].sum(&[0], true)?])).with_batch(3);
        let out: Vec<MapOutcome> = total.map(exec(), (0..3).map(input), 1).collect();
        for o in &out {
            let e = o.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("output 0 is f32[1, 3]") && e.contains("total[0-2]"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_bad_input_fails_alone_and_update_changes_the_id() {
        let mut c = affine();
        let inputs = vec![
            input(1),
            vec![Data::from_f32([1, 4], vec![0.0; 4]).unwrap()],
            input(2),
        ];
        let out: Vec<MapOutcome> = c.map(exec(), inputs, 2).collect();
        assert!(out[0].is_ok() && out[2].is_ok());
        let e = out[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("matmul") && e.contains("affine[1]"), "{e}");

        let meta = [input(0)[0].meta()];
        let before = c.id(&meta).unwrap();
        assert_eq!(
            before,
            affine().id(&meta).unwrap(),
            "the id is the content's"
        );
        c.update(Model::new(
            "affine",
            [
                ("w", Data::from_f32([3, 2], vec![0.0; 6]).unwrap()),
                ("b", Data::from_f32([2], vec![0.0; 2]).unwrap()),
            ],
        ));
        assert_ne!(c.id(&meta).unwrap(), before);
        let zeros = c.map(exec(), [input(5)], 1).next().unwrap().unwrap();
        assert_eq!(zeros[0].as_f32().unwrap(), &[0.0, 0.0]);
    }
}
