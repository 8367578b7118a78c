//! Training: a [`Trainer`] runs forward, backward ([`Graph::grad`]) and the optimizer's update
//! as one job per [`Trainer::step`], so every step is partitioned, placed and verified like
//! any graph.
//!
//! **Data parallel**: with [`Trainer::with_shards`] the batch is split into shards along axis 0,
//! each shard's gradient is its own branch of the graph (placed on its own peer where there are
//! several), and the gradients are summed in shard order, so a step's result does not depend
//! on where the shards ran: bit-identical within a determinism class, whichever peers ran it
//! and whether one of them failed and its share was redone elsewhere.
//!
//! ```
//! # use std::sync::Arc;
//! use corvid_sdk::{Model, LocalExecutor, kernels::{Backend, CpuBackend, Tensor as Data}};
//! use corvid_sdk::train::{Optimizer, Trainer};
//!
//! // Fit y = 2x with one weight.
//! let model = Model::new("line", [("w", Data::from_f32([1, 1], vec![0.0])?)]);
//! let mut t = Trainer::new("fit", model, Optimizer::sgd(0.1), |_, batch, w| {
//!     let err = &batch[0].matmul(&w["w"])? - &batch[1];
//!     (&err * &err).mean(&[0, 1], false)
//! });
//! let exec: Arc<dyn corvid_sdk::Executor> = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
//! let x = Data::from_f32([4, 1], vec![1.0, 2.0, 3.0, 4.0])?;
//! let y = Data::from_f32([4, 1], vec![2.0, 4.0, 6.0, 8.0])?;
//! for _ in 0..50 {
//!     t.step(&exec, &[x.clone(), y.clone()])?;
//! }
//! let w = t.model().get("w").unwrap().as_f32()?[0];
//! assert!((w - 2.0).abs() < 1e-3, "{w}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use corvid_kernels::Tensor as Data;

use crate::error::{BuildError, EvalError, Site};
use crate::exec::Executor;
use crate::graph::Graph;
use crate::map::Weights;
use crate::model::Model;
use crate::tensor::Tensor;

/// How parameters move along their gradient; its state (momentum, moments) lives with the
/// trainer and travels as constants of each step's graph.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `v = momentum v + g; p -= lr v`.
    Sgd { lr: f32, momentum: f32 },
    /// Adam (Kingma & Ba) with bias correction.
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
}

impl Optimizer {
    pub fn sgd(lr: f32) -> Optimizer {
        Optimizer::Sgd { lr, momentum: 0.0 }
    }

    pub fn momentum(lr: f32, momentum: f32) -> Optimizer {
        Optimizer::Sgd { lr, momentum }
    }

    pub fn adam(lr: f32) -> Optimizer {
        Optimizer::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// State tensors kept per parameter.
    fn slots(&self) -> usize {
        match self {
            Optimizer::Sgd { momentum, .. } if *momentum == 0.0 => 0,
            Optimizer::Sgd { .. } => 1,
            Optimizer::Adam { .. } => 2,
        }
    }

    /// The update of one parameter as ops of `g`: the new parameter and the new state.
    /// `step` counts from 1.
    pub fn update(
        &self,
        g: &Graph,
        param: &Tensor,
        grad: &Tensor,
        state: &[Tensor],
        step: u64,
    ) -> Result<(Tensor, Vec<Tensor>), BuildError> {
        let s = |v: f32| g.scalar(v);
        let mul = |a: &Tensor, b: &Tensor| a.mul(b);
        match *self {
            Optimizer::Sgd { lr, momentum } => {
                if momentum == 0.0 {
                    return Ok((param.sub(&mul(grad, &s(lr))?)?, vec![]));
                }
                let v = mul(&state[0], &s(momentum))?.add(grad)?;
                Ok((param.sub(&mul(&v, &s(lr))?)?, vec![v]))
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let m = mul(&state[0], &s(beta1))?.add(&mul(grad, &s(1.0 - beta1))?)?;
                let v = mul(&state[1], &s(beta2))?.add(&mul(&grad.square()?, &s(1.0 - beta2))?)?;
                let t = step as i32;
                let c1 = 1.0 - f64::from(beta1).powi(t);
                let c2 = 1.0 - f64::from(beta2).powi(t);
                // lr * m / c1 / (sqrt(v / c2) + eps)
                let denom = mul(&v, &s((1.0 / c2) as f32))?.sqrt()?.add(&s(eps))?;
                let delta = mul(&m, &s((f64::from(lr) / c1) as f32))?.div(&denom)?;
                Ok((param.sub(&delta)?, vec![m, v]))
            }
        }
    }
}

type LossFn = dyn Fn(&Graph, &[Tensor], &Weights) -> Result<Tensor, BuildError> + Send + Sync;

/// Trains a [`Model`]: `loss(graph, batch, weights)` returns the mean loss over the rows of
/// `batch` (each batch tensor's axis 0 is its rows); every [`Trainer::step`] is one job.
#[derive(Clone)]
pub struct Trainer {
    name: String,
    loss: Arc<LossFn>,
    model: Model,
    optimizer: Optimizer,
    /// Per parameter (the model's order), the optimizer's state.
    state: Vec<Vec<Arc<Data>>>,
    steps: u64,
    shards: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("optimizer", &self.optimizer)
            .field("steps", &self.steps)
            .field("shards", &self.shards)
            .finish()
    }
}

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The mean loss over the batch, before the update.
    pub loss: f32,
    /// The step's number, from 1.
    pub step: u64,
}

impl Trainer {
    pub fn new(
        name: impl Into<String>,
        model: Model,
        optimizer: Optimizer,
        loss: impl Fn(&Graph, &[Tensor], &Weights) -> Result<Tensor, BuildError> + Send + Sync + 'static,
    ) -> Trainer {
        let state = model
            .iter()
            .map(|(_, t)| {
                (0..optimizer.slots())
                    .map(|_| Arc::new(Data::full(t.shape().to_vec(), 0.0)))
                    .collect()
            })
            .collect();
        Trainer {
            name: name.into(),
            loss: Arc::new(loss),
            model,
            optimizer,
            state,
            steps: 0,
            shards: 1,
        }
    }

    /// Splits each batch into `n` shards along axis 0, one gradient branch each (data
    /// parallel); their gradients are summed in shard order.
    pub fn with_shards(mut self, n: usize) -> Trainer {
        self.shards = n.max(1);
        self
    }

    /// The parameters as they are now.
    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// The graph of the next step over `batch`, on `executor`, and the tensors to evaluate:
    /// the loss, the new parameters, then the new state.
    #[track_caller]
    pub fn plan_step(
        &self,
        executor: &Arc<dyn Executor>,
        batch: &[Data],
    ) -> Result<(Graph, Vec<Tensor>), EvalError> {
        let at = Site(std::panic::Location::caller());
        let step = self.steps + 1;
        let g = Graph::new(format!("{} step {step}", self.name)).with_executor(executor.clone());
        let build = |error| EvalError::Build {
            graph: g.name().into(),
            error,
        };
        let rows = batch
            .first()
            .map_or(0, |t| t.shape().first().copied().unwrap_or(0));
        if rows == 0 || batch.iter().any(|t| t.shape().first() != Some(&rows)) {
            return Err(build(BuildError::Data {
                at,
                reason: format!(
                    "a batch needs one or more rows in every tensor, all with the same count \
                     (axis 0): shapes {:?}",
                    batch.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()
                ),
            }));
        }
        let shards = self.shards.min(rows);
        let w = g.model(&self.model);
        let names: Vec<&String> = w.keys().collect();
        let params: Vec<&Tensor> = w.values().collect();
        let mut total: Option<(Tensor, Vec<Tensor>)> = None;
        for k in 0..shards {
            let (lo, hi) = (k * rows / shards, (k + 1) * rows / shards);
            let part: Vec<Tensor> = batch
                .iter()
                .map(|t| g.constant(rows_of(t, lo, hi)))
                .collect();
            let loss = (self.loss)(&g, &part, &w).map_err(build)?;
            // The shard's mean weighted by its share of the rows: the batch mean in all.
            let share = (hi - lo) as f32 / rows as f32;
            let loss = if shards == 1 {
                loss
            } else {
                loss.mul(&g.scalar(share)).map_err(build)?
            };
            let grads = g.grad(&loss, &params).map_err(build)?;
            total = Some(match total {
                None => (loss, grads),
                Some((l, gs)) => {
                    let l = l.add(&loss).map_err(build)?;
                    let gs = gs
                        .iter()
                        .zip(&grads)
                        .map(|(a, b)| a.add(b))
                        .collect::<Result<_, _>>()
                        .map_err(build)?;
                    (l, gs)
                }
            });
        }
        let (loss, grads) = total.expect("at least one shard");
        let mut outs = vec![loss];
        let mut states = Vec::new();
        for (i, (p, grad)) in params.iter().zip(&grads).enumerate() {
            let state: Vec<Tensor> = self.state[i]
                .iter()
                .map(|d| g.constant((**d).clone()))
                .collect();
            let (new, state) = self
                .optimizer
                .update(&g, p, grad, &state, step)
                .map_err(build)?;
            outs.push(new);
            states.extend(state);
        }
        debug_assert_eq!(outs.len(), names.len() + 1);
        outs.extend(states);
        Ok((g, outs))
    }

    /// One step over `batch`: forward, backward and update as one job on `executor`. The
    /// trainer keeps the new parameters and state; on an error it keeps the old ones.
    #[track_caller]
    pub fn step(
        &mut self,
        executor: &Arc<dyn Executor>,
        batch: &[Data],
    ) -> Result<Step, EvalError> {
        let (g, outs) = self.plan_step(executor, batch)?;
        let values = g.eval(&outs.iter().collect::<Vec<_>>())?;
        self.finish_step(values)
    }

    /// Takes the values of the tensors [`Trainer::plan_step`] returned.
    pub fn finish_step(&mut self, values: Vec<Data>) -> Result<Step, EvalError> {
        let n = self.model.len();
        let want = 1 + n + n * self.optimizer.slots();
        if values.len() != want {
            return Err(EvalError::Requester {
                reason: format!(
                    "a step of '{}' gives {want} values (the loss, {n} parameters and the \
                     optimizer's state), not {}",
                    self.name,
                    values.len()
                ),
            });
        }
        let mut values = values.into_iter();
        let loss = values
            .next()
            .and_then(|l| l.as_f32().ok().and_then(|v| v.first().copied()))
            .unwrap_or(f32::NAN);
        let names: Vec<String> = self.model.names().map(str::to_string).collect();
        let params: Vec<(String, Data)> = names.into_iter().zip(values.by_ref().take(n)).collect();
        let slots = self.optimizer.slots();
        let rest: Vec<Arc<Data>> = values.map(Arc::new).collect();
        self.state = rest.chunks(slots.max(1)).map(|c| c.to_vec()).collect();
        if slots == 0 {
            self.state = vec![Vec::new(); n];
        }
        self.model = Model::new(self.model.name(), params);
        self.steps += 1;
        Ok(Step {
            loss,
            step: self.steps,
        })
    }
}

/// Rows `lo..hi` of `t` (row-major: one contiguous run).
fn rows_of(t: &Data, lo: usize, hi: usize) -> Data {
    let per: usize = t.shape()[1..].iter().product();
    let mut shape = t.shape().to_vec();
    shape[0] = hi - lo;
    Data::from_words(t.dtype(), shape, &t.words()[lo * per..hi * per])
        .expect("a run of rows of a valid tensor")
}
