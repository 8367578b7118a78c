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

use crate::error::{BuildError, EvalError};
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
}

impl std::fmt::Debug for Computation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Computation")
            .field("name", &self.name)
            .field("model", &self.model.as_ref().map(|m| (m.name(), m.id())))
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
        }
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

    /// Starts the job for one input.
    fn submit(
        &self,
        executor: &Arc<dyn Executor>,
        i: usize,
        inputs: Vec<Data>,
    ) -> Result<crate::JobHandle, EvalError> {
        let g = Graph::new(format!("{}[{i}]", self.name)).with_executor(executor.clone());
        let xs: Vec<Tensor> = inputs.into_iter().map(|d| g.constant(d)).collect();
        let w = self.model.as_ref().map(|m| g.model(m)).unwrap_or_default();
        let outs = (self.build)(&g, &xs, &w).map_err(|error| EvalError::Build {
            graph: g.name().into(),
            error,
        })?;
        g.submit(&outs.iter().collect::<Vec<_>>())
    }

    /// Runs the computation on each input (one `Vec` of tensors per job), up to `window`
    /// jobs at a time, yielding each input's outcome in input order.
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
    pub fn map_unordered<'a>(
        &'a self,
        executor: Arc<dyn Executor>,
        inputs: impl IntoIterator<Item = Vec<Data>> + 'a,
        window: usize,
    ) -> impl Iterator<Item = (usize, MapOutcome)> + 'a {
        self.jobs(executor, inputs, window, false)
            .map(|(i, outcome, _)| (i, outcome))
    }

    /// Each input's index, outcome and job state (where the executor leaves its report), in
    /// input order if `ordered`, else as they end.
    pub fn jobs<'a>(
        &'a self,
        executor: Arc<dyn Executor>,
        inputs: impl IntoIterator<Item = Vec<Data>> + 'a,
        window: usize,
        ordered: bool,
    ) -> Box<dyn Iterator<Item = (usize, MapOutcome, Option<Arc<crate::JobState>>)> + 'a> {
        let mut inputs = inputs.into_iter().enumerate();
        let Some((_, first)) = inputs.next() else {
            return Box::new(std::iter::empty());
        };
        // The first job alone: once it ends, the requester knows who holds the model.
        let exec = executor.clone();
        let first = std::iter::once_with(move || {
            let job = self.submit(&exec, 0, first);
            futures::executor::block_on(run(0, job))
        });
        let rest =
            futures::stream::iter(inputs).map(move |(i, x)| run(i, self.submit(&executor, i, x)));
        let window = window.max(1);
        let rest: std::pin::Pin<Box<dyn futures::Stream<Item = _> + 'a>> = if ordered {
            Box::pin(rest.buffered(window))
        } else {
            Box::pin(rest.buffer_unordered(window))
        };
        Box::new(first.chain(futures::executor::block_on_stream(rest)))
    }
}

fn run(
    i: usize,
    job: Result<crate::JobHandle, EvalError>,
) -> impl std::future::Future<Output = (usize, MapOutcome, Option<Arc<crate::JobState>>)> {
    // Made before the first poll: a map dropped before this job ended (its caller stopped
    // iterating) cancels it, polled or not.
    let guard = CancelOnDrop(job.as_ref().ok().map(|h| h.state().clone()));
    async move {
        match job {
            Ok(h) => {
                let outcome = h.await;
                (i, outcome, guard.disarm())
            }
            Err(e) => (i, Err(e), None),
        }
    }
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
