//! One job in flight: carries out the scheduler's decisions, judges results, replicas and
//! canaries as they return, bans cheaters and reopens their work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::Tensor as Data;
use corvid_sdk::EvalError;
use corvid_sdk::plan::{Plan, Source};
use corvid_sdk::sched::{Decision, Knowledge, Place, SchedConfig, Scheduler, TaskFailure};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::PeerId;
use rand::Rng;
use tokio::task::JoinSet;

use crate::trust::canary::{CANARY_RATE, Canary, canary, canary_answer};
use crate::trust::{self, CheckKind, Refusal, ReplicaVerdict, Trust};

use super::*;

/// One job in flight: the plan, its scheduler, results so far and the running tasks.
pub(super) struct Job {
    pub(super) plan: Plan,
    /// Owns which task runs which subgraph where, who holds which values, measured speeds.
    pub(super) sched: Scheduler<PeerId>,
    pub(super) remote: Remote,
    /// The requester's memory between jobs: the cache and whose results only a sample
    /// vouched for (the scheduler's knowledge is checked out of it for the job's run).
    pub(super) memory: Arc<Mutex<Memory>>,
    pub(super) trust: Arc<Mutex<Trust>>,
    pub(super) results: Vec<Option<Arc<Vec<Arc<Data>>>>>,
    pub(super) accepted: Vec<Option<Arc<Accepted>>>,
    pub(super) producer: Vec<Option<Producer>>,
    pub(super) running: JoinSet<TaskOutcome>,
    pub(super) replicas: JoinSet<ReplicaOutcome>,
    pub(super) canaries: JoinSet<(PeerId, Result<Accepted, Refusal>)>,
    /// Peers running a replica now.
    pub(super) replicating: BTreeSet<PeerId>,
    /// The id each remote task travels under (random), to cancel it.
    pub(super) task_wire: BTreeMap<u64, u64>,
    /// Advertised determinism class of each peer: replicas go to the same class.
    pub(super) peer_class: HashMap<PeerId, String>,
    pub(super) started: Instant,
    pub(super) cached: usize,
    pub(super) verify: VerifySummary,
    pub(super) progress: ProgressBar,
    /// What the job's handle reads (progress) and how it is cancelled.
    pub(super) state: Arc<JobState>,
    /// What the requester saw of the swarm at the job's start, for a job no worker can run.
    pub(super) pool: String,
    /// Subgraphs run on the requester: with arithmetic (only when local execution is
    /// allowed), and pure data movement (assembly, slicing).
    pub(super) local_compute: usize,
    pub(super) local_moves: usize,
    /// The requester memory's `marks` when the job last looked at who holds its constants.
    pub(super) marks_seen: u64,
    /// Tasks that carried constants their peer was marked as holding, until they answer.
    pub(super) carrying: BTreeMap<u64, (PeerId, Vec<corvid_sdk::ValueId>)>,
}

/// Runs `plan` on the swarm through `remote`, with the requester's memory and trust.
/// `checks`: whether results are verified (and canaries sent).
pub(super) async fn run_job(
    plan: Plan,
    remote: Remote,
    cfg: SchedConfig,
    memory: Arc<Mutex<Memory>>,
    trust: Arc<Mutex<Trust>>,
    checks: bool,
    state: Arc<JobState>,
) -> (Result<Vec<Arc<Data>>, EvalError>, JobSummary) {
    // The scheduler owns who holds what and measured speeds for the job's run.
    let (mut sched, since) = {
        let mem = lock(&memory);
        (
            Scheduler::<PeerId>::resume_from(&plan, cfg, &mem.knowledge),
            mem.check_ins,
        )
    };
    let read = sched.input_ids();
    let mut peer_class = HashMap::new();
    let pool;
    match remote.node.peers().await {
        Ok(peers) => {
            // Unreachable lately and not connected since: left out (its advert outlives it).
            // (The memory before the trust, as everywhere: jobs run side by side.)
            let gone: std::collections::HashSet<PeerId> = {
                let mut mem = lock(&memory);
                mem.unreachable
                    .retain(|_, at| at.elapsed() < FORGET_UNREACHABLE);
                peers
                    .iter()
                    .filter(|p| p.path.is_none())
                    .filter_map(|p| p.peer_id.parse().ok())
                    .filter(|id| mem.unreachable.contains_key(id))
                    .collect()
            };
            let trust = lock(&trust);
            let workers: Vec<_> = peers
                .iter()
                .filter(|p| p.contributes && p.slots_total > 0)
                .filter(|p| p.peer_id.parse().is_ok_and(|id| !gone.contains(&id)))
                .collect();
            let banned = workers
                .iter()
                .filter(|p| p.peer_id.parse().is_ok_and(|id| trust.is_banned(&id)))
                .count();
            pool = format!(
                "the requester knew {} peer(s), {} contributing, {banned} of those banned",
                peers.len(),
                workers.len()
            );
            for p in workers {
                if let Ok(id) = p.peer_id.parse::<PeerId>()
                    && !trust.is_banned(&id)
                {
                    sched.peer(
                        id,
                        f64::from(p.matmul_gflops) * 1e9,
                        1e9,
                        p.slots_total as usize,
                    );
                    if let Some(b) = &p.task_budget {
                        sched.budget(&id, b.clone());
                    }
                    // Reached through a relay: its tasks may wait for hole punching.
                    if p.path == Some(crate::peers::PeerPath::Relayed) {
                        sched.setup(&id, crate::net::nat::HOLE_PUNCH_WAIT.as_secs_f64());
                    }
                    peer_class.insert(id, p.class.clone());
                }
            }
        }
        Err(e) => {
            check_in(&memory, sched.knowledge(), &read, since);
            return (
                Err(EvalError::Requester {
                    reason: format!("cannot list the swarm's peers: {e}"),
                }),
                JobSummary::default(),
            );
        }
    }
    let n = plan.subgraphs.len();
    let mut results = vec![None; n];
    let mut cached = 0;
    {
        let mem = lock(&memory);
        for (i, sg) in plan.subgraphs.iter().enumerate() {
            if let Some(hit) = mem.cache.get(&sg.id) {
                results[i] = Some(hit);
                sched.completed(i);
                cached += 1;
            }
        }
    }
    let progress = ProgressBar::new(n as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} subgraphs · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_position(cached as u64);
    state.set_total(n);
    state.set_done(cached);
    let mut job = Job {
        results,
        accepted: vec![None; n],
        producer: vec![None; n],
        remote,
        memory,
        plan,
        sched,
        trust,
        running: JoinSet::new(),
        replicas: JoinSet::new(),
        canaries: JoinSet::new(),
        replicating: BTreeSet::new(),
        task_wire: BTreeMap::new(),
        peer_class,
        started: Instant::now(),
        cached,
        verify: VerifySummary::default(),
        progress,
        state: state.clone(),
        pool,
        local_compute: 0,
        local_moves: 0,
        marks_seen: u64::MAX,
        carrying: BTreeMap::new(),
    };
    if checks && cached < n {
        job.send_canaries();
    }
    // A cancel through the job's handle stops it here; the clean-up below cancels what
    // still runs on peers.
    let cancelled = tokio_util::sync::CancellationToken::new();
    state.on_cancel({
        let c = cancelled.clone();
        move || c.cancel()
    });
    let result = tokio::select! {
        r = job.run() => r,
        () = cancelled.cancelled() => Err(EvalError::Cancelled),
    };
    // Whatever still runs remotely is no longer wanted.
    let still: Vec<u64> = job
        .task_wire
        .keys()
        .copied()
        .filter(|&t| job.sched.knows(t))
        .collect();
    for t in still {
        job.cancel_remote(t);
    }
    job.running.abort_all();
    job.replicas.abort_all();
    job.canaries.abort_all();
    job.progress.finish_and_clear();
    check_in(&job.memory, job.sched.knowledge(), &read, since);
    let outputs = result.map(|()| {
        job.remember();
        job.plan
            .outputs
            .iter()
            .map(|s| match *s {
                Source::Leaf(i) => job.plan.leaves[i].get().clone(),
                Source::Output { subgraph, output } => job.results[subgraph]
                    .as_ref()
                    .expect("finished jobs have every result")[output]
                    .clone(),
            })
            .collect()
    });
    let mut summary = job.summary();
    // How the requester is connected to each peer that worked, now the job is over.
    if let Ok(peers) = job.remote.node.peers().await {
        for p in peers {
            if let Some(s) = summary.places.get_mut(&Place::Peer(p.peer_id)) {
                s.path = p.path;
            }
        }
    }
    (outputs, summary)
}

impl Job {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Who holds the job's constants as jobs running alongside have marked since it last
    /// looked (they sent them): shared weights one job sent are named by the others, not
    /// sent again.
    fn learn_holders(&mut self) {
        let mem = lock(&self.memory);
        if mem.marks == self.marks_seen {
            return;
        }
        self.marks_seen = mem.marks;
        for id in &self.plan.leaf_ids {
            if let Some(holders) = mem.knowledge.held.get(id) {
                self.sched.learn_held(*id, holders);
            }
        }
    }

    async fn run(&mut self) -> Result<(), EvalError> {
        let mut tick = tokio::time::interval(TICK);
        // Done when every subgraph has a result and every replica has reported: a replica
        // may still prove a result wrong.
        // (Canaries only build trust: the job does not wait for them.)
        while !self.sched.finished() || !self.replicas.is_empty() {
            self.learn_holders();
            for d in self.sched.schedule(self.now()) {
                self.dispatch(d);
            }
            if let Some(f) = self.sched.stuck() {
                let attempts: String = f
                    .attempts
                    .iter()
                    .map(|a| format!(" [{}: {}]", a.place, a.error))
                    .collect();
                return Err(EvalError::NoWorker {
                    subgraph: f.subgraph,
                    ops: f.ops.clone(),
                    reason: format!(
                        "{}{}{attempts}; {}",
                        f.unplaceable.as_deref().unwrap_or("no place left"),
                        if attempts.is_empty() {
                            ""
                        } else {
                            "; attempts:"
                        },
                        self.pool
                    ),
                });
            }
            tokio::select! {
                done = self.running.join_next(), if !self.running.is_empty() => {
                    if let Some(Ok((task, outcome))) = done {
                        self.outcome(task, outcome)?;
                    }
                }
                r = self.replicas.join_next(), if !self.replicas.is_empty() => {
                    if let Some(Ok(r)) = r {
                        self.replica(r)?;
                    }
                }
                c = self.canaries.join_next(), if !self.canaries.is_empty() => {
                    if let Some(Ok((peer, outcome))) = c {
                        self.canary(peer, outcome)?;
                    }
                }
                _ = tick.tick() => {
                    let (expired, copies) = self.sched.tick(self.now());
                    for task in expired {
                        self.fail(task, TaskFailure::Deadline)?;
                    }
                    for d in copies {
                        self.dispatch(d);
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks the worker running `task` to stop it (a copy that lost, a task past its deadline,
    /// a job that ended). Fire and forget.
    fn cancel_remote(&self, task: u64) {
        if let (Some(peer), Some(&wire)) = (self.peer_of(task), self.task_wire.get(&task)) {
            let node = self.remote.node.clone();
            tokio::spawn(async move {
                let _ = node.cancel_task(peer, wire).await;
            });
        }
    }

    /// The peer `task` was sent to (`None`: it ran here, or no such task).
    fn peer_of(&self, task: u64) -> Option<PeerId> {
        match self.sched.task(task)? {
            (_, Place::Peer(p)) => Some(*p),
            (_, Place::Local) => None,
        }
    }

    fn fail(&mut self, task: u64, error: TaskFailure) -> Result<(), EvalError> {
        self.cancel_remote(task);
        self.sched
            .on_failed(task, error)
            .map_err(|failure| EvalError::Swarm(Box::new(failure.map_places(|p| p.to_string()))))
    }

    fn outcome(&mut self, task: u64, outcome: Result<Accepted, Refusal>) -> Result<(), EvalError> {
        let Some((sg, _)) = self.sched.task(task) else {
            return Ok(());
        };
        let peer = self.peer_of(task);
        if let Ok(a) = &outcome {
            self.verify.check_time += Duration::from_secs_f64(a.verify_secs);
        }
        // Proof of cheating counts even from a copy that lost the race; the ban comes first,
        // so no retry budget can save the cheater.
        if let (Err(Refusal::Cheated { reason, evidence }), Some(p)) = (&outcome, peer) {
            let (reason, evidence) = (reason.clone(), evidence.clone());
            self.ban(p, &reason, &evidence)?;
            if self.sched.knows(task) {
                self.fail(task, TaskFailure::Cheated { reason })?;
            }
            return Ok(());
        }
        if !self.sched.knows(task) {
            return Ok(()); // expired or cancelled: its subgraph went elsewhere
        }
        // A task that carried constants and failed: the peer does not hold them after all
        // (unless it was turned away busy: the worker keeps the data of those).
        let busy = matches!(
            &outcome,
            Err(Refusal::Failed(TaskFailure::Worker(
                corvid_sdk::wire::TaskError::Busy
            )))
        );
        if let (Some((peer, sent)), Err(_), false) = (self.carrying.remove(&task), &outcome, busy) {
            let mut mem = lock(&self.memory);
            for id in &sent {
                if let Some(h) = mem.knowledge.held.get_mut(id) {
                    h.remove(&peer);
                }
            }
            mem.marks += 1;
        }
        match outcome {
            Ok(a) => {
                match a.check {
                    Some(CheckKind::Freivalds) => self.verify.freivalds += 1,
                    Some(CheckKind::SampledRows) => self.verify.sampled_rows += 1,
                    Some(CheckKind::Recomputed) => self.verify.recomputed += 1,
                    Some(CheckKind::Unchecked) | None => {}
                }
                let ids = self.plan.subgraphs[sg].output_ids.clone();
                self.remote.cids.record(&ids, &a.cids);
                if let Some(p) = peer {
                    self.held_by_content(sg, p, &a.cids);
                }
                let a = Arc::new(a);
                self.results[sg] = Some(Arc::new(a.outputs.clone()));
                self.accepted[sg] = Some(a.clone());
                self.producer[sg] = Some(Producer {
                    peer,
                    check: a.check,
                });
                let now = self.now();
                for d in self.sched.on_done(task, now, &ids, a.compute_secs) {
                    self.dispatch(d);
                }
                self.progress.inc(1);
                self.state.finished_one();
                self.progress.set_message(self.progress_message());
                if let Some(p) = peer {
                    let replicate = {
                        let mut trust = lock(&self.trust);
                        trust.credit(&p);
                        // Only a sampled check leaves room for a lie; Freivalds (2^-20) and a
                        // full recompute do not need a second opinion.
                        a.check == Some(CheckKind::SampledRows)
                            && trust.replicate(&p, &mut rand::rng())
                    };
                    if replicate {
                        self.replicate(sg, p, a);
                    }
                }
                Ok(())
            }
            Err(Refusal::Failed(error)) => {
                match (&error, peer) {
                    (TaskFailure::Unreachable(why), Some(peer)) => {
                        tracing::warn!(%peer, %why, "peer unreachable; no more tasks go to it in this job");
                        lock(&self.memory)
                            .unreachable
                            .insert(peer, std::time::Instant::now());
                        // Counted against the peer first, so the next job knows it fails.
                        let r = self.fail(task, error);
                        self.sched.remove_peer(&peer);
                        return r;
                    }
                    (TaskFailure::StaleHeld { held, .. }, Some(peer)) => {
                        let inputs = &self.plan.subgraphs[sg].input_ids;
                        let stale: Vec<_> = held
                            .iter()
                            .filter_map(|&i| inputs.get(i))
                            .copied()
                            .collect();
                        self.sched.not_held_by(&peer, &stale);
                        // Nor may other jobs name them there.
                        let mut mem = lock(&self.memory);
                        for id in &stale {
                            if let Some(h) = mem.knowledge.held.get_mut(id) {
                                h.remove(&peer);
                            }
                        }
                        mem.marks += 1;
                    }
                    _ => {}
                }
                self.fail(task, error)
            }
            Err(Refusal::Cheated { reason, .. }) => {
                // Local results are never refused as cheating; handled above for peers.
                self.fail(task, TaskFailure::Cheated { reason })
            }
        }
    }

    /// The job's outputs that subgraph `sg` made on `peer` are kept there under their content
    /// ids too: a later job whose constants have those values (the next training step's
    /// weights and optimizer state) names them there instead of sending them.
    fn held_by_content(&mut self, sg: usize, peer: PeerId, cids: &[corvid_kernels::ContentId]) {
        let finals: Vec<corvid_sdk::ValueId> = self
            .plan
            .outputs
            .iter()
            .filter_map(|s| match *s {
                Source::Output { subgraph, output } if subgraph == sg => cids.get(output),
                _ => None,
            })
            .map(|&c| c.into())
            .collect();
        if finals.is_empty() {
            return;
        }
        let mut mem = lock(&self.memory);
        for id in finals {
            self.sched.learn_held(id, [&peer]);
            mem.knowledge.held.entry(id).or_default().insert(peer);
        }
        mem.marks += 1;
    }

    fn progress_message(&self) -> String {
        let busy = self
            .sched
            .peers()
            .values()
            .filter(|i| i.in_flight > 0)
            .count();
        let flops: u64 = self.sched.stats().values().map(|s| s.flops).sum();
        let mut msg = format!(
            "{busy} peers busy · {:.1} GFLOP/s",
            flops as f64 / 1e9 / self.now().max(1e-3)
        );
        if self.local_compute > 0 {
            msg.push_str(&format!(" · {} ran on this machine", self.local_compute));
        }
        msg
    }

    /// Bans `peer`: no more work, its running tasks fail over, and its results in this job
    /// that only a sample vouched for are computed again.
    fn ban(&mut self, peer: PeerId, reason: &str, evidence: &str) -> Result<(), EvalError> {
        self.verify
            .detections
            .push(format!("{peer}: {reason}: {evidence}"));
        if lock(&self.trust).ban(&peer, reason, evidence) {
            self.verify.bans.push(format!("{peer} ({reason})"));
        }
        // Even if another job banned it first, or this job dropped it as unreachable: this
        // job stops using it and redoes what only a sample vouched for.
        self.sched.remove_peer(&peer);
        // Its cached results that only a sample vouched for go.
        {
            let mut mem = lock(&self.memory);
            let ids: Vec<corvid_sdk::SubgraphId> = mem
                .sampled_from
                .iter()
                .filter(|(_, p)| **p == peer)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                mem.cache.remove(&id);
                mem.sampled_from.remove(&id);
            }
        }
        for t in self.sched.running_on(&peer) {
            self.fail(
                t,
                TaskFailure::Banned {
                    peer: peer.to_string(),
                },
            )?;
        }
        let suspect: Vec<usize> = (0..self.producer.len())
            .filter(|&i| {
                self.producer[i].is_some_and(|p| {
                    p.peer == Some(peer) && p.check == Some(CheckKind::SampledRows)
                })
            })
            .collect();
        if !suspect.is_empty() {
            self.reopen(&suspect);
        }
        Ok(())
    }

    /// Runs `subgraphs` and everything downstream again, forgetting their results and who
    /// holds their values (a worker must not reuse a wrong value it was sent).
    fn reopen(&mut self, subgraphs: &[usize]) {
        let reopened = self.sched.reopen(subgraphs);
        self.verify.reopened += reopened.len();
        for i in reopened {
            if self.results[i].take().is_some() {
                self.progress.dec(1);
                self.state.withdrew_one();
            }
            self.accepted[i] = None;
            self.producer[i] = None;
            let ids = &self.plan.subgraphs[i].output_ids;
            for id in ids {
                self.sched.forget(id);
            }
            self.remote.cids.forget(ids);
        }
    }

    /// Sends a canary — a small subgraph like the job's on fresh inputs, whose answer the
    /// requester computes itself — to every peer without a verified result yet, and to others
    /// with probability [`CANARY_RATE`]. A worker of the requester's class must match that
    /// answer bit for bit; others are checked like work.
    fn send_canaries(&mut self) {
        let mut rng = rand::rng();
        let peers: Vec<PeerId> = {
            let trust = lock(&self.trust);
            self.sched
                .peers()
                .keys()
                .filter(|p| trust.streak(p) == 0 || rng.random::<f64>() < CANARY_RATE)
                .copied()
                .collect()
        };
        for peer in peers {
            let (sg, inputs) = canary(&mut rng, &self.plan);
            self.verify.canaries += 1;
            self.verify.extra_remote_flops += sg.cost.flops;
            // Values the peer holds (shared weights) are named, not sent, as for work.
            let held: Vec<bool> = sg
                .input_ids
                .iter()
                .map(|id| self.sched.held().get(id).is_some_and(|h| h.contains(&peer)))
                .collect();
            let copied = sg.id;
            // The job's constants it keeps travel as the job's work sends them (a recipe as
            // its recipe), so that the worker names them the same way.
            let kept: Vec<Option<Arc<Leaf>>> = sg
                .input_ids
                .iter()
                .map(|id| {
                    let l = self.plan.leaf_ids.iter().position(|x| x == id)?;
                    Some(self.plan.leaves[l].clone())
                })
                .collect();
            let remote = self.remote.clone();
            self.canaries.spawn(async move {
                let local = remote.local.clone();
                let answered =
                    tokio::task::spawn_blocking(move || canary_answer(&local, sg, inputs))
                        .await
                        .ok()
                        .flatten();
                let Some(Canary {
                    sg,
                    inputs,
                    want,
                    class: mine,
                }) = answered
                else {
                    let why = "no canary could be run here".to_string();
                    return (peer, Err(TaskFailure::Unchecked(why).into()));
                };
                // The copy was swapped for a matmul on fresh inputs: nothing is held.
                let held = if sg.id == copied {
                    held
                } else {
                    vec![false; sg.inputs.len()]
                };
                // Room for the inputs on a slow link and the flops on a slow CPU.
                let timeout = Duration::from_secs_f64(
                    2.0 + sg.cost.bytes_in as f64 / 20e6 + sg.cost.flops as f64 / 1e9,
                );
                let wire = rand::rng().random();
                let args = inputs
                    .into_iter()
                    .enumerate()
                    .map(|(k, t)| match kept.get(k) {
                        Some(Some(leaf)) if sg.id == copied => Arg::Leaf(leaf.clone()),
                        _ => Arg::Value(t),
                    })
                    .collect();
                let r = match remote
                    .run(peer, wire, &sg, args, held, timeout, trust::SAMPLE_ROWS)
                    .await
                {
                    Ok(a) if a.class == mine => {
                        match trust::compare(&sg, &a.outputs, &want, true) {
                            Ok(()) => Ok(a),
                            Err(m) => Err(Refusal::Cheated {
                                reason: "wrong result (recomputed)".into(),
                                evidence: format!("subgraph {} ({}): {m}", sg.id.short(), sg.ops()),
                            }),
                        }
                    }
                    other => other,
                };
                (peer, r)
            });
        }
    }

    fn canary(
        &mut self,
        peer: PeerId,
        outcome: Result<Accepted, Refusal>,
    ) -> Result<(), EvalError> {
        match outcome {
            Ok(a) => {
                self.verify.check_time += Duration::from_secs_f64(a.verify_secs);
                lock(&self.trust).credit(&peer);
                Ok(())
            }
            Err(Refusal::Cheated { reason, evidence }) => {
                self.ban(peer, &format!("{reason} (canary)"), &evidence)
            }
            Err(Refusal::Failed(why)) => {
                tracing::debug!(%peer, %why, "canary failed");
                Ok(())
            }
        }
    }

    /// Runs `sg` again on another peer and compares: one of the same class when that is the
    /// requester's own, else one claiming another class.
    fn replicate(&mut self, sg: usize, primary: PeerId, first: Arc<Accepted>) {
        let own = self.remote.local.backend().class().to_string();
        let peers: Vec<(PeerId, Option<&str>, bool)> = self
            .sched
            .peers()
            .keys()
            .filter(|p| **p != primary)
            .map(|p| {
                let class = self.peer_class.get(p).map(String::as_str);
                (*p, class, self.replicating.contains(p))
            })
            .collect();
        let class = self.peer_class.get(&primary).map(String::as_str);
        let candidates = replica_candidates(class, &own, &peers);
        // Chosen at random, never by a rule a peer could predict and game (two colluding
        // peers would otherwise always replicate each other): peers that fail less, and are
        // less loaded, weigh more; peers failing more than they work only when nobody else is
        // there.
        let weigh = |p: &PeerId| {
            let i = &self.sched.peers()[p];
            if i.failing() {
                1e-6
            } else {
                1.0 / ((1 + i.failed) as f64 * (1 + i.in_flight) as f64)
            }
        };
        use rand::seq::IndexedRandom;
        let Ok(&replica) = candidates.choose_weighted(&mut rand::rng(), weigh) else {
            return;
        };
        self.verify.replicated += 1;
        self.replicating.insert(replica);
        let subgraph = self.plan.subgraphs[sg].clone();
        let inputs = gather(&self.plan, sg, &self.results);
        let remote = self.remote.clone();
        let flops = subgraph.cost.flops;
        self.replicas.spawn(async move {
            let started = Instant::now();
            let verdict = remote.replica(replica, subgraph, inputs, first).await;
            ReplicaOutcome {
                subgraph: sg,
                primary,
                replica,
                flops,
                verify_secs: started.elapsed().as_secs_f64(),
                verdict,
            }
        });
    }

    fn replica(&mut self, r: ReplicaOutcome) -> Result<(), EvalError> {
        self.verify.extra_remote_flops += r.flops;
        self.replicating.remove(&r.replica);
        match r.verdict {
            Replica::Judged(ReplicaVerdict::Agreed) => {
                self.verify.replicas_agreed += 1;
                lock(&self.trust).credit(&r.replica);
                Ok(())
            }
            Replica::Unusable(why) => {
                tracing::debug!(replica = %r.replica, %why, "replica gave no usable answer");
                Ok(())
            }
            Replica::Judged(ReplicaVerdict::Undecided(why)) => {
                tracing::debug!(replica = %r.replica, %why, "replica disagrees, undecided");
                Ok(())
            }
            Replica::Forged(f) => self.ban(r.replica, &f.to_string(), f.evidence()),
            Replica::Judged(ReplicaVerdict::Dispute {
                primary_wrong,
                replica_wrong,
            }) => {
                self.verify.disputes += 1;
                self.verify.check_time += Duration::from_secs_f64(r.verify_secs);
                if let Some(e) = replica_wrong {
                    self.ban(r.replica, "wrong result (replica dispute)", &e)?;
                }
                if let Some(e) = primary_wrong {
                    // Its result was accepted: redo it and everything downstream.
                    self.reopen(&[r.subgraph]);
                    self.ban(r.primary, "wrong result (replica dispute)", &e)?;
                }
                Ok(())
            }
        }
    }

    /// Starts a task where the scheduler placed it, or stops one it no longer needs.
    fn dispatch(&mut self, d: Decision<PeerId>) {
        let (task, subgraph, place, deadline, held) = match d {
            Decision::Dispatch {
                task,
                subgraph,
                place,
                deadline,
                held,
            } => (task, subgraph, place, deadline, held),
            Decision::Cancel { task, .. } => return self.cancel_remote(task),
        };
        let inputs = gather(&self.plan, subgraph, &self.results);
        let sg = self.plan.subgraphs[subgraph].clone();
        let timeout = Duration::from_secs_f64((deadline - self.now()).max(0.001));
        match place {
            Place::Local => {
                if sg.cost.flops > 0 {
                    self.local_compute += 1;
                } else {
                    self.local_moves += 1;
                }
                let local = self.remote.local.clone();
                self.running.spawn(async move {
                    let r = tokio::task::spawn_blocking(move || {
                        let inputs: Vec<Arc<Data>> = inputs.iter().map(Arg::data).collect();
                        local.run_subgraph(&sg, &inputs)
                    })
                    .await
                    .map_err(|e| TaskFailure::Unchecked(format!("the local run ended: {e}")))
                    .and_then(|r| r.map_err(TaskFailure::Local))
                    .map(|v| {
                        let outputs: Vec<Arc<Data>> = v.to_vec();
                        Accepted {
                            cids: outputs.iter().map(|t| t.content_id()).collect(),
                            outputs,
                            op_hashes: Vec::new(),
                            class: [0; 32],
                            check: None,
                            verify_secs: 0.0,
                            compute_secs: None,
                            elapsed_secs: 0.0,
                        }
                    })
                    .map_err(Refusal::Failed);
                    (task, r)
                });
            }
            Place::Peer(peer) => {
                // A random id on the wire: a worker cannot tell work from checks by numbering.
                let wire: u64 = rand::rng().random();
                self.task_wire.insert(task, wire);
                // A new peer's results are all replicated; a trusted one's only sometimes, so
                // its sampled checks look at more rows.
                let rows = if lock(&self.trust).streak(&peer) < trust::NEW_PEER_STREAK {
                    trust::SAMPLE_ROWS
                } else {
                    trust::SAMPLE_ROWS_ALONE
                };
                // The job's constants sent now are held by the peer from now on, for the
                // jobs running alongside too: they name them rather than send them again
                // (shared weights cross once per worker, not once per running job). Marked
                // at once, not on the answer: that would leave every job placed meanwhile
                // sending them (5 to 13 copies measured). A task that names them there
                // meanwhile waits for the carrier's answer (below); a worker that lost them
                // anyway answers Missing and gets them again (counted).
                let mut held = held;
                // A task naming a value still on its way there waits for its carrier's
                // answer: sent at once, it could land first and get a Missing.
                let (sent, waits, landed) = {
                    let mut mem = lock(&self.memory);
                    let mut sent = Vec::new();
                    for (i, id) in sg.input_ids.iter().enumerate() {
                        if held[i] || !self.plan.leaf_ids.contains(id) {
                            continue;
                        }
                        // Another job sent it there since this one last looked.
                        if mem
                            .knowledge
                            .held
                            .get(id)
                            .is_some_and(|h| h.contains(&peer))
                        {
                            held[i] = true;
                            self.sched.held_after_all(task, i);
                        } else {
                            sent.push(*id);
                        }
                    }
                    let waits: Vec<(usize, _)> = sg
                        .input_ids
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| held[i])
                        .filter_map(|(i, id)| Some((i, mem.landing.get(&(peer, *id))?)))
                        .filter(|(_, rx)| rx.has_changed().is_ok())
                        .map(|(i, rx)| (i, rx.clone()))
                        .collect();
                    if !sent.is_empty() {
                        for id in &sent {
                            mem.knowledge.held.entry(*id).or_default().insert(peer);
                        }
                        mem.marks += 1;
                    }
                    // Everything it carries, constants or results of earlier subgraphs: the
                    // scheduler counts them held there from now on, so a task of this job
                    // may name them before this one lands.
                    let carried: Vec<corvid_sdk::ValueId> = sg
                        .input_ids
                        .iter()
                        .zip(&held)
                        .filter(|(_, h)| !**h)
                        .map(|(id, _)| *id)
                        .collect();
                    let landed = (!carried.is_empty()).then(|| {
                        if mem.landing.len() > MAX_LANDING {
                            mem.landing.retain(|_, rx| rx.has_changed().is_ok());
                        }
                        let (tx, rx) = tokio::sync::watch::channel(());
                        for id in carried {
                            mem.landing.insert((peer, id), rx.clone());
                        }
                        tx
                    });
                    (sent, waits, landed)
                };
                if !sent.is_empty() {
                    self.carrying.insert(task, (peer, sent));
                }
                let remote = self.remote.clone();
                self.running.spawn(async move {
                    // At most half the task's time: a carrier slow to answer (queued, or
                    // computing) has its values sent in full instead.
                    let waited = std::time::Instant::now();
                    let mut held = held;
                    for (i, mut carrier) in waits {
                        let left = (timeout / 2).saturating_sub(waited.elapsed());
                        // Ends (Err) when the carrier's sender is dropped: it has answered.
                        if tokio::time::timeout(left, carrier.changed()).await.is_err() {
                            held[i] = false;
                        }
                    }
                    let timeout = timeout.saturating_sub(waited.elapsed());
                    let r = remote
                        .run(peer, wire, &sg, inputs, held, timeout, rows)
                        .await;
                    drop(landed);
                    (task, r)
                });
            }
        }
    }

    /// Keeps what the next job can use: verified results and who produced them.
    fn remember(&self) {
        let mut mem = lock(&self.memory);
        let trust = lock(&self.trust);
        for (i, sg) in self.plan.subgraphs.iter().enumerate() {
            let banned = self.producer[i]
                .and_then(|p| p.peer)
                .is_some_and(|p| trust.is_banned(&p));
            if let (Some(r), false) = (&self.results[i], banned) {
                mem.cache.put(sg.id, r.clone());
                if let Some(Producer {
                    peer: Some(p),
                    check: Some(CheckKind::SampledRows),
                }) = self.producer[i]
                {
                    if mem.sampled_from.len() > MAX_TABLE {
                        mem.sampled_from.clear();
                    }
                    mem.sampled_from.insert(sg.id, p);
                }
            }
        }
    }

    fn summary(&self) -> JobSummary {
        let mut places = BTreeMap::new();
        let resent = lock(&self.remote.resent);
        for (place, s) in self.sched.stats() {
            let again = match place {
                Place::Peer(p) => resent.get(p).copied().unwrap_or(0),
                Place::Local => 0,
            };
            places.insert(
                place.clone().map(|p| p.to_string()),
                PlaceSummary {
                    tasks: s.tasks,
                    flops: s.flops,
                    bytes_in: s.bytes_in + again,
                    bytes_out: s.bytes_out,
                    busy: Duration::from_secs_f64(s.busy_secs),
                    failures: s.failures,
                    resent: again,
                    path: None,
                },
            );
        }
        JobSummary {
            subgraphs: self.plan.subgraphs.len(),
            cached: self.cached,
            wall: self.started.elapsed(),
            places,
            redispatches: self.sched.redispatches().to_vec(),
            verify: self.verify.clone(),
            local_compute: self.local_compute,
            local_moves: self.local_moves,
        }
    }
}

/// Returns a job's knowledge to the requester's memory: it replaces what is there, unless
/// another job checked in since this one started (`since`), when the two are merged.
fn check_in(
    memory: &Mutex<Memory>,
    knowledge: Knowledge<PeerId>,
    read: &[corvid_sdk::ValueId],
    since: u64,
) {
    let mut mem = lock(memory);
    if mem.check_ins == since {
        mem.knowledge.check_in(knowledge, read);
    } else {
        mem.knowledge.merge(knowledge);
    }
    mem.check_ins += 1;
    // Bounded: past this many values, who holds what is learned again.
    if mem.knowledge.held.len() > MAX_TABLE {
        mem.knowledge.held.clear();
    }
}

/// Who may replicate a result of a peer of class `primary` (the others: id, claimed class,
/// whether a replica is in flight there), the requester being of class `own`. Peers with no
/// replica in flight, so that checks never crowd out work. A class claim is the peer's word:
/// only the requester's own class is checked (its canaries compare bit for bit), so only there
/// does a same-class replica (bit for bit) prove more than one of another class (within
/// tolerance). For any other class the replica claims another, busy or not: two peers
/// inventing a class together would otherwise vouch for each other.
fn replica_candidates(
    primary: Option<&str>,
    own: &str,
    peers: &[(PeerId, Option<&str>, bool)],
) -> Vec<PeerId> {
    let free = || peers.iter().filter(|p| !p.2);
    if primary == Some(own) {
        let same: Vec<PeerId> = free().filter(|p| p.1 == primary).map(|p| p.0).collect();
        if !same.is_empty() {
            return same;
        }
    } else {
        let other: Vec<PeerId> = peers
            .iter()
            .filter(|p| p.1 != primary)
            .map(|p| p.0)
            .collect();
        if !other.is_empty() {
            return other;
        }
    }
    free().map(|p| p.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invented_class_never_gets_its_own_replica_while_another_exists() {
        let (honest, partner, busy_honest) = (PeerId::random(), PeerId::random(), PeerId::random());
        let own = "cpu/x86_64/avx2/abc";
        let peers = [
            (honest, Some(own), false),
            (partner, Some("invented"), false),
            (busy_honest, Some(own), true),
        ];
        // A colluder's result: its partner is free and of its class, yet only peers of
        // another class replicate it, busy or not.
        let c = replica_candidates(Some("invented"), own, &peers);
        assert_eq!(c.len(), 2);
        assert!(!c.contains(&partner), "{c:?}");
        // An honest result of the requester's class: a free peer of that class.
        assert_eq!(replica_candidates(Some(own), own, &peers), vec![honest]);
        // Nobody of another class: any free peer (nothing better to ask).
        let alone = [(partner, Some("invented"), false)];
        assert_eq!(
            replica_candidates(Some("invented"), own, &alone),
            vec![partner]
        );
    }
}
