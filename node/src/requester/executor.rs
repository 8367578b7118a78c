//! The requester's memory between jobs and the `Executor` that runs plans across the swarm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corvid_kernels::{Budget, ContentId, Tensor as Data};
use corvid_sdk::plan::{Plan, Settings};
use corvid_sdk::sched::{Knowledge, SchedConfig};
use corvid_sdk::{EvalError, Executor, LocalExecutor, ResultCache, ValueId};
use libp2p::PeerId;

use crate::node::NodeClient;
use crate::trust::{Trust, Verifier};

use super::*;

/// What the requester remembers between jobs. Only jobs touch it, at their start (a job
/// copies the scheduler's knowledge and reads the cache), on a ban and at their end.
#[derive(Debug)]
pub(super) struct Memory {
    /// Verified results by subgraph id.
    pub(super) cache: ResultCache,
    /// Who holds which values and measured speeds, as the last job left it: each job's
    /// scheduler starts from a copy and checks its own back in.
    pub(super) knowledge: Knowledge<PeerId>,
    /// Check-ins so far: a job that finds none since its start replaces the knowledge (what it
    /// forgot stays forgotten); otherwise it merges into what a job that ran alongside left.
    pub(super) check_ins: u64,
    /// Bumped whenever a job marks a constant it sends as held by the peer (or unmarks one a
    /// peer did not hold), so that running jobs know when to look again.
    pub(super) marks: u64,
    /// Values on their way to a peer (constants, results of earlier subgraphs): the receiver
    /// ends when the task carrying them has answered. A task that names one as held there waits for that first, so it cannot
    /// overtake its carrier (which would cost a Missing and a full resend).
    pub(super) landing: HashMap<(PeerId, corvid_sdk::ValueId), tokio::sync::watch::Receiver<()>>,
    /// Peers a task could not reach, and when: later jobs leave them out while they stay
    /// unconnected (a worker that died is still advertised until its advert expires).
    pub(super) unreachable: HashMap<PeerId, std::time::Instant>,
    /// Cached results that only a sample vouched for, and their producer: dropped if it is
    /// banned later.
    pub(super) sampled_from: HashMap<corvid_sdk::SubgraphId, PeerId>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            cache: ResultCache::new(CACHE_BYTES),
            knowledge: Knowledge::default(),
            check_ins: 0,
            marks: 0,
            landing: HashMap::new(),
            unreachable: HashMap::new(),
            sampled_from: HashMap::new(),
        }
    }
}

/// Content ids of values, so that each is hashed once: a memo the checks of every job share
/// (they run on blocking threads).
#[derive(Debug, Default)]
pub(super) struct ContentIds(Mutex<HashMap<ValueId, ContentId>>);

impl ContentIds {
    /// Content ids of `inputs` (values `ids`), hashing only those not seen before.
    pub(super) fn of(&self, ids: &[ValueId], inputs: &[Arc<Data>]) -> Vec<ContentId> {
        let known: Vec<Option<ContentId>> = {
            let map = lock(&self.0);
            ids.iter().map(|id| map.get(id).copied()).collect()
        };
        let cids: Vec<ContentId> = known
            .iter()
            .zip(inputs)
            .map(|(k, t)| k.unwrap_or_else(|| t.content_id()))
            .collect();
        self.record(ids, &cids);
        cids
    }

    pub(super) fn record(&self, ids: &[ValueId], cids: &[ContentId]) {
        let mut map = lock(&self.0);
        if map.len() > MAX_TABLE {
            map.clear();
        }
        for (id, c) in ids.iter().zip(cids) {
            map.insert(*id, *c);
        }
    }

    pub(super) fn forget(&self, ids: &[ValueId]) {
        let mut map = lock(&self.0);
        for id in ids {
            map.remove(id);
        }
    }
}

/// Runs plans across the swarm: places subgraphs with the SDK's scheduler, ships their inputs,
/// verifies and collects results, retries failures elsewhere.
#[derive(Debug)]
pub struct SwarmExecutor {
    pub(super) handle: tokio::runtime::Handle,
    pub(super) node: NodeClient,
    pub(super) local: Arc<LocalExecutor>,
    pub(super) settings: Mutex<Settings>,
    pub(super) sched: SchedConfig,
    pub(super) last: Arc<Mutex<Option<JobSummary>>>,
    pub(super) memory: Arc<Mutex<Memory>>,
    pub(super) cids: Arc<ContentIds>,
    pub(super) trust: Arc<Mutex<Trust>>,
    pub(super) checks: std::sync::atomic::AtomicBool,
    /// The requester node's metrics, where each job's checks are counted.
    pub(super) metrics: crate::metrics::NodeMetrics,
}

impl SwarmExecutor {
    /// The budget a subgraph should fit to be taken by at least half of the contributing,
    /// unbanned peers (the lower median of each limit; a few peers with tiny budgets do not
    /// shrink everyone's work). `None` when no peer says.
    fn typical_budget(&self) -> Option<Budget> {
        // Called from the developer's thread: ask the node on the client's runtime.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let node = self.node.clone();
        self.handle.spawn(async move {
            let _ = tx.send(node.peers().await);
        });
        let peers = rx.recv_timeout(Duration::from_secs(2)).ok()?.ok()?;
        let trust = lock(&self.trust);
        let budgets: Vec<Budget> = peers
            .into_iter()
            .filter(|p| p.contributes && p.slots_total > 0)
            .filter(|p| p.peer_id.parse().is_ok_and(|id| !trust.is_banned(&id)))
            .filter_map(|p| p.task_budget)
            .collect();
        lower_median(&budgets)
    }
}

/// Each limit's lower median over `budgets`.
pub(super) fn lower_median(budgets: &[Budget]) -> Option<Budget> {
    if budgets.is_empty() {
        return None;
    }
    fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
        v.sort_unstable();
        v[(v.len() - 1) / 2]
    }
    let of = |f: fn(&Budget) -> u64| median(budgets.iter().map(f).collect());
    Some(Budget {
        max_nodes: median(budgets.iter().map(|b| b.max_nodes).collect()),
        max_program_bytes: of(|b| b.max_program_bytes),
        max_tensor_bytes: of(|b| b.max_tensor_bytes),
        max_peak_bytes: of(|b| b.max_peak_bytes),
        max_flops: of(|b| b.max_flops),
    })
}

impl Executor for SwarmExecutor {
    /// The client's settings, cut to fit what the swarm's peers take.
    fn settings(&self) -> Settings {
        let base = lock(&self.settings).clone();
        match self.typical_budget() {
            Some(b) => base.within(&b),
            None => base,
        }
    }

    fn execute(&self, plan: &Plan) -> Result<Vec<Arc<Data>>, EvalError> {
        // Runs on the client's runtime; this thread only waits (it may be any thread).
        let pending = self.spawn(plan, Arc::new(JobState::default()));
        futures::executor::block_on(pending).unwrap_or_else(|_| {
            Err(EvalError::Requester {
                reason: "the client stopped during the job".into(),
            })
        })
    }

    fn start(&self, plan: &Plan, job: &Arc<JobState>) -> Option<Pending> {
        Some(self.spawn(plan, job.clone()))
    }
}

impl SwarmExecutor {
    /// Runs `plan` as a job on the client's runtime, reporting to `state`; the outcome
    /// arrives on the receiver, the summary in `last` and in the job's state (and the checks
    /// in the metrics).
    fn spawn(&self, plan: &Plan, state: Arc<JobState>) -> Pending {
        let (tx, rx) = futures::channel::oneshot::channel();
        let checks = self.checks.load(std::sync::atomic::Ordering::Relaxed);
        let job = run_job(
            plan.clone(),
            Remote {
                node: self.node.clone(),
                local: self.local.clone(),
                cids: self.cids.clone(),
                verifier: Arc::new(Verifier::with_checks(self.local.clone(), checks)),
                resent: Arc::default(),
            },
            self.sched.clone(),
            self.memory.clone(),
            self.trust.clone(),
            checks,
            state.clone(),
        );
        let (metrics, last) = (self.metrics.clone(), self.last.clone());
        self.handle.spawn(async move {
            let (result, summary) = job.await;
            metrics.job_checked(&summary.verify);
            state.set_report(Arc::new(summary.clone()));
            *lock(&last) = Some(summary);
            let _ = tx.send(result);
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_typical_budget_is_each_limits_lower_median() {
        let b = |peak: u64, flops: u64| Budget::new(peak, peak, flops);
        assert_eq!(lower_median(&[]), None);
        let m = lower_median(&[b(8, 1), b(2, 100), b(4, 10)]).unwrap();
        assert_eq!((m.max_peak_bytes, m.max_flops), (4, 10));
        // Two peers: the smaller of each, so both take the work.
        let m = lower_median(&[b(8, 1), b(2, 100)]).unwrap();
        assert_eq!((m.max_peak_bytes, m.max_flops), (2, 1));
    }
}
