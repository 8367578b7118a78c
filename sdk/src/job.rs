//! Jobs that run while the caller does something else: [`crate::Graph::submit`] returns a
//! [`JobHandle`] to wait on (blocking, or `.await`), poll, cancel or watch; [`as_completed`]
//! yields several as they finish.
//!
//! An executor that runs jobs on its own threads or runtime (the swarm client) starts them
//! itself ([`crate::Executor::start`]), reporting progress to the job's [`JobState`] and
//! stopping when it is cancelled; any other runs on a thread of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use corvid_kernels::Tensor as Data;
use futures::StreamExt;
use futures::channel::oneshot;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;

use crate::error::EvalError;
use crate::graph::Graph;

/// What a job ends with: its outputs, in the order asked, or why there are none.
pub type Outcome = Result<Vec<Arc<Data>>, EvalError>;

/// Where a job's [`Outcome`] arrives.
pub type Pending = oneshot::Receiver<Outcome>;

type Canceller = Box<dyn FnOnce() + Send>;

/// What a running job shares with its handle: how far it is, and whether it was cancelled.
#[derive(Default)]
pub struct JobState {
    done: AtomicUsize,
    total: AtomicUsize,
    cancelled: AtomicBool,
    on_cancel: Mutex<Vec<Canceller>>,
    /// The task waiting on the handle, woken by a cancel.
    waiter: AtomicWaker,
    /// What the executor reports about the job once it ended (the swarm client: its
    /// `JobSummary`).
    report: Mutex<Option<Arc<dyn std::any::Any + Send + Sync>>>,
}

impl std::fmt::Debug for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobState")
            .field("progress", &self.progress())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// Subgraphs with a result so far, of all the job's subgraphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

impl JobState {
    pub fn set_total(&self, n: usize) {
        self.total.store(n, Ordering::Relaxed);
    }

    pub fn set_done(&self, n: usize) {
        self.done.store(n, Ordering::Relaxed);
    }

    /// One more subgraph has a result.
    pub fn finished_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// A result was withdrawn (its producer turned out to lie): one fewer.
    pub fn withdrew_one(&self) {
        let _ = self
            .done
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1));
    }

    pub fn progress(&self) -> Progress {
        Progress {
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }

    /// Keeps the executor's report of the job (set once it ended).
    pub fn set_report(&self, report: Arc<dyn std::any::Any + Send + Sync>) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// The executor's report of the job, if it made one and it is a `T`.
    pub fn report<T: std::any::Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let r = self
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        r.downcast::<T>().ok()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Runs `f` when the job is cancelled, or at once if it already was.
    pub fn on_cancel(&self, f: impl FnOnce() + Send + 'static) {
        let mut waiting = self.on_cancel.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            drop(waiting);
            f();
        } else {
            waiting.push(Box::new(f));
        }
    }

    /// Cancels the job: what registered with [`JobState::on_cancel`] runs once.
    pub fn cancel(&self) {
        let waiting = {
            let mut w = self.on_cancel.lock().unwrap_or_else(|p| p.into_inner());
            self.cancelled.store(true, Ordering::Release);
            std::mem::take(&mut *w)
        };
        for f in waiting {
            f();
        }
        self.waiter.wake();
    }
}

/// A job started by [`crate::Graph::submit`]: wait for it ([`JobHandle::wait`] or `.await`),
/// ask whether it is done ([`JobHandle::try_wait`]), [`JobHandle::cancel`] it, or read its
/// [`JobHandle::progress`]. Dropping the handle lets the job run on, its outcome unread.
#[derive(Debug)]
pub struct JobHandle {
    rx: Pending,
    state: Arc<JobState>,
    graph: Graph,
}

impl JobHandle {
    pub(crate) fn new(rx: Pending, state: Arc<JobState>, graph: Graph) -> JobHandle {
        JobHandle { rx, state, graph }
    }

    /// Blocks until the job ends; its outputs, as [`crate::Graph::eval`] returns them.
    pub fn wait(self) -> Result<Vec<Data>, EvalError> {
        futures::executor::block_on(self)
    }

    /// The outcome if the job has ended, without waiting.
    pub fn try_wait(&mut self) -> Option<Result<Vec<Data>, EvalError>> {
        match self.rx.try_recv() {
            Ok(Some(outcome)) => Some(self.finish(outcome)),
            Ok(None) if self.state.is_cancelled() => Some(self.finish(Err(EvalError::Cancelled))),
            Ok(None) => None,
            Err(_) => Some(self.finish(Err(stopped()))),
        }
    }

    /// Stops the job: its running tasks are cancelled where they run, and waiting returns
    /// [`EvalError::Cancelled`] (at once, whatever is still running).
    pub fn cancel(&self) {
        self.state.cancel();
    }

    pub fn progress(&self) -> Progress {
        self.state.progress()
    }

    /// The job's shared state (executors report to it).
    pub fn state(&self) -> &Arc<JobState> {
        &self.state
    }

    fn finish(&self, outcome: Outcome) -> Result<Vec<Data>, EvalError> {
        match outcome {
            Ok(values) => Ok(values.iter().map(|v| (**v).clone()).collect()),
            Err(e) => {
                self.graph.record(&e);
                Err(e)
            }
        }
    }
}

fn stopped() -> EvalError {
    EvalError::Requester {
        reason: "the executor stopped before the job ended".into(),
    }
}

impl Future for JobHandle {
    type Output = Result<Vec<Data>, EvalError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.state.is_cancelled() {
            return Poll::Ready(self.finish(Err(EvalError::Cancelled)));
        }
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(self.finish(outcome)),
            Poll::Ready(Err(_)) => Poll::Ready(self.finish(Err(stopped()))),
            Poll::Pending => {
                // A cancel wakes the waiting task, so that it returns at once.
                self.state.waiter.register(cx.waker());
                if self.state.is_cancelled() {
                    return Poll::Ready(self.finish(Err(EvalError::Cancelled)));
                }
                Poll::Pending
            }
        }
    }
}

/// Each job's index in `handles` and its outcome, as the jobs end (blocking).
pub fn as_completed(
    handles: impl IntoIterator<Item = JobHandle>,
) -> impl Iterator<Item = (usize, Result<Vec<Data>, EvalError>)> {
    let mut pending: FuturesUnordered<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| async move { (i, h.await) })
        .collect();
    std::iter::from_fn(move || futures::executor::block_on(pending.next()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::LocalExecutor;
    use corvid_kernels::{Backend, CpuBackend};

    fn graph() -> Graph {
        Graph::new("jobs").with_executor(Arc::new(LocalExecutor::new(Backend::Cpu(
            CpuBackend::new(),
        ))))
    }

    #[test]
    fn submitted_jobs_end_with_what_eval_gives() {
        let g = graph();
        let x = g.random(&[48, 48], -1.0, 1.0, 7);
        let y = x.matmul(&x).unwrap().tanh().unwrap();
        let want = g.eval(&[&y]).unwrap();
        let mut h = g.submit(&[&y]).unwrap();
        let got = loop {
            if let Some(r) = h.try_wait() {
                break r.unwrap();
            }
            std::thread::yield_now();
        };
        assert_eq!(got[0].words(), want[0].words());
        assert_eq!(h.progress().done, h.progress().total);

        let jobs: Vec<JobHandle> = (0..4)
            .map(|i| g.submit(&[&(&x + f32::from(i as u8))]).unwrap())
            .collect();
        let mut seen: Vec<usize> = as_completed(jobs)
            .map(|(i, r)| {
                r.unwrap();
                i
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_cancelled_job_says_so_at_once_and_the_graph_remembers() {
        let g = graph();
        let x = g.random(&[512, 512], -1.0, 1.0, 1);
        let mut y = x.clone();
        for _ in 0..8 {
            y = y.matmul(&x).unwrap();
        }
        let h = g.submit(&[&y]).unwrap();
        h.cancel();
        assert!(matches!(h.wait(), Err(EvalError::Cancelled)));
        let report = g.end().unwrap_err().to_string();
        assert!(report.contains("cancelled"), "{report}");
    }
}
