//! Placement and failure handling for one job, as a pure state machine: no clock, no network.
//!
//! The caller (the swarm executor) feeds it time and events — a peer appeared, a task finished
//! or failed — and carries out the decisions it returns. That keeps every policy here testable
//! without tokio:
//!
//! - **Placement**: each ready subgraph goes where it is estimated to finish first:
//!   `max(now, peer busy until) + flops / speed + bytes to move / link`. Inputs the peer already
//!   holds cost nothing to move. Speeds start from adverts and are replaced by measured
//!   throughput as results come back, so a peer that lies about its speed stops attracting work.
//!   Peers take at most `slots` tasks at once, plus `queue_depth` queued behind them (the next
//!   task travels while the current one computes); with no peer free the job runs locally (if
//!   allowed) or waits.
//! - **Failures**: a task has a deadline from its estimate; a failure or timeout sends the
//!   subgraph elsewhere (peers that failed it are avoided) up to `max_attempts`; a task running
//!   much longer than its estimate gets a speculative copy on a free peer. The first accepted
//!   result wins; later copies are cancelled, so every result is used exactly once.
//! - **Failing peers**: a peer that has failed more tasks than it has done (in this job and
//!   the ones before) gets work only when no peer in good standing can take it, and only a
//!   failure at a peer in good standing (one that has done work and fails less than it works)
//!   uses up one of a subgraph's attempts: peers that only fail, however fast they say they
//!   are, cannot fail a job that honest peers can finish. A subgraph still tries each peer at
//!   most once, so the job ends when every peer has failed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use corvid_kernels::{Budget, Footprint};

pub use crate::failure::{AttemptError, JobFailure, Place, TaskFailure};
use crate::ids::ValueId;
use crate::plan::{Plan, Source};

/// A busy peer is waited for if it would finish in less than this fraction of the time the
/// best free peer would take.
const WAIT_FOR_BUSY: f64 = 0.5;

/// A peer with room holding most of what a subgraph reads (two thirds of its bytes: weights,
/// optimizer state, the values an earlier run of the same graph left there) keeps the
/// subgraph unless another would take less than its time (past the round trip, its queue
/// included) divided by this. On a fast link moving the data looks almost free to the estimate, so any difference
/// in measured speed would win: a training step's update wandered between workers taking the
/// whole optimizer state with it, and a graph run again landed each task on the worker that
/// did not hold its inputs.
const STAY_WITH_DATA: f64 = 1.5;

/// A peer that says it is busy is tried again for the same subgraph, up to this many times.
const BUSY_TRIES: usize = 3;

/// Transfers at least this large measure a peer's link.
const LINK_SAMPLE_BYTES: u64 = 1 << 20;

/// What a job's scheduler learned that the next job's can use: who holds which values, and
/// each peer's measured speed and link. One scheduler owns it for its job
/// ([`Scheduler::resume`]) and gives it back at the end ([`Scheduler::knowledge`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Knowledge<P: Ord> {
    pub held: HashMap<ValueId, BTreeSet<P>>,
    pub measured: BTreeMap<P, Measured>,
}

impl<P: Ord> Default for Knowledge<P> {
    fn default() -> Self {
        Knowledge {
            held: HashMap::new(),
            measured: BTreeMap::new(),
        }
    }
}

impl<P: Ord + Clone> Knowledge<P> {
    /// Takes back what a job learned, the job having started from this knowledge (its
    /// measurements, and who holds `read`: the values it read) with nothing checked in since:
    /// for those values and for every peer's measurements its view is the newest; what else
    /// it learned is added.
    pub fn check_in(&mut self, job: Knowledge<P>, read: &[ValueId]) {
        for id in read {
            self.held.remove(id);
        }
        self.measured = BTreeMap::new();
        self.merge(job);
    }

    /// Adds what `newer` knows; what it measured wins, what it did not measure is kept.
    pub fn merge(&mut self, newer: Knowledge<P>) {
        for (id, holders) in newer.held {
            self.held.entry(id).or_default().extend(holders);
        }
        for (p, n) in newer.measured {
            let m = self.measured.entry(p).or_default();
            m.flops = n.flops.or(m.flops);
            m.link = n.link.or(m.link);
            // A job starts from the counts before it, so the newer counts include the older.
            m.done = m.done.max(n.done);
            m.failed = m.failed.max(n.failed);
        }
    }
}

/// A peer's measured FLOP/s and link bytes/s (`None`: not measured yet), and how many tasks
/// it has done and failed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    pub flops: Option<f64>,
    pub link: Option<f64>,
    pub done: usize,
    pub failed: usize,
}

/// Identifies one attempt at one subgraph.
pub type TaskId = u64;

/// Scheduling policy.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedConfig {
    pub max_attempts: usize,
    /// Run a subgraph with arithmetic on the requester when no peer can take it. Off by
    /// default: with no usable worker the job fails and says why (see [`Scheduler::stuck`]).
    pub allow_local: bool,
    /// Requester speed estimate, FLOP/s, for local placement.
    pub local_flops: f64,
    /// A task's deadline is `slack × estimate + grace` seconds after dispatch.
    pub deadline_slack: f64,
    pub deadline_grace: f64,
    /// A running task gets a speculative copy past `straggler × estimate` seconds, and never
    /// before `straggler_min` seconds.
    pub straggler: f64,
    pub straggler_min: f64,
    /// Round-trip time added to every remote estimate, seconds.
    pub latency: f64,
    /// Run subgraphs without arithmetic (assembly, slicing) on the requester: their inputs
    /// come back to it anyway, so shipping them out again only costs transfer. Independent of
    /// `allow_local`.
    pub local_data_movement: bool,
    /// Tasks a peer may hold beyond its slots, queued behind the ones it runs: its next task
    /// (and its inputs) arrive while the current one computes, so it never idles through a
    /// round trip and the requester's checks.
    pub queue_depth: usize,
    /// The queue for small subgraphs (at most `small_flops` of arithmetic and `small_bytes`
    /// in and out): the round trip, not the worker, limits their rate, so more of them travel
    /// at once.
    pub small_queue_depth: usize,
    pub small_flops: u64,
    pub small_bytes: u64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            max_attempts: 3,
            allow_local: false,
            local_flops: 50e9,
            deadline_slack: 4.0,
            deadline_grace: 2.0,
            straggler: 2.0,
            straggler_min: 0.5,
            latency: 0.002,
            local_data_movement: true,
            queue_depth: 1,
            small_queue_depth: 8,
            small_flops: 1 << 20,
            small_bytes: 64 << 10,
        }
    }
}

/// What the scheduler knows of a peer.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInfo {
    /// FLOP/s: advertised at first, measured once results arrive.
    pub flops: f64,
    /// Bytes/s to and from the requester.
    pub link: f64,
    pub slots: usize,
    pub in_flight: usize,
    /// Estimated time this peer's queue drains.
    pub busy_until: f64,
    /// Whether `flops` is measured rather than advertised.
    pub measured: bool,
    /// Whether `link` is measured rather than assumed.
    pub link_measured: bool,
    /// Tasks it did and failed, in this job and (when it joins) the ones before.
    pub done: usize,
    pub failed: usize,
    /// What one task may use there (advertised); `None`: unknown, anything is sent.
    pub budget: Option<Budget>,
    /// Seconds before a task sent there starts moving (a peer reached through a relay waits
    /// for hole punching): added to its tasks' estimates and deadlines.
    pub setup: f64,
}

impl PeerInfo {
    /// Failed more tasks than it did: placed only where no other peer can take the work.
    pub fn failing(&self) -> bool {
        self.failed > self.done
    }

    /// Has done work and does not mostly fail: its failures say something about the task,
    /// and count against a subgraph's attempts.
    pub fn in_good_standing(&self) -> bool {
        self.done > 0 && !self.failing()
    }

    /// Writes what this job measured and counted of the peer into `m`, for the next job.
    fn record(&self, m: &mut Measured) {
        m.done = self.done;
        m.failed = self.failed;
        if self.measured {
            m.flops = Some(self.flops);
        }
        if self.link_measured {
            m.link = Some(self.link);
        }
    }
}

/// A decision for the caller to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision<P> {
    Dispatch {
        task: TaskId,
        subgraph: usize,
        place: Place<P>,
        /// Absolute time after which the task counts as failed.
        deadline: f64,
        /// Per input: whether the peer already holds it (sent or computed there before), so
        /// only its id need travel.
        held: Vec<bool>,
    },
    /// A copy of a subgraph whose result was already accepted elsewhere.
    Cancel { task: TaskId, place: Place<P> },
}

#[derive(Clone, Debug)]
struct Task<P> {
    subgraph: usize,
    place: Place<P>,
    started: f64,
    estimate: f64,
    deadline: f64,
    speculative_sent: bool,
    /// Input bytes that had to travel (the peer did not hold them).
    moved: u64,
    /// Sent to a peer whose slots were all taken: it waited in the peer's queue first.
    queued: bool,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting,
    Ready,
    Running,
    Done,
}

/// Per-place record of what it did in this job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlaceStats {
    pub tasks: usize,
    pub flops: u64,
    /// Bytes sent to it: inputs of its tasks that it did not hold, failed ones included.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub busy_secs: f64,
    pub failures: usize,
}

/// The scheduler of one job.
#[derive(Debug)]
pub struct Scheduler<P: Ord + Clone> {
    cfg: SchedConfig,
    /// Speeds measured in earlier jobs, applied when their peer joins this one.
    measured_before: BTreeMap<P, Measured>,
    flops: Vec<u64>,
    bytes_out: Vec<u64>,
    inputs: Vec<Vec<(ValueId, u64)>>,
    ops: Vec<String>,
    /// What each subgraph needs of a worker's budget (`None`: it does not validate, and no
    /// worker would take it).
    needs: Vec<Option<Footprint>>,
    /// Subgraphs already reported as fitting no peer.
    unfit_noted: BTreeSet<usize>,
    state: Vec<State>,
    /// Subgraphs reading each subgraph's outputs, and how many distinct dependencies each
    /// still waits for.
    dependents: Vec<Vec<usize>>,
    deps: Vec<Vec<usize>>,
    unmet: Vec<usize>,
    /// Ready subgraphs, lowest index first; zero-FLOP ones apart when they run locally.
    ready: BTreeSet<usize>,
    ready_local: BTreeSet<usize>,
    errors: Vec<Vec<AttemptError<P>>>,
    /// Per subgraph, how many of its errors do not count against `max_attempts`: failures
    /// at peers not in good standing (see [`PeerInfo::in_good_standing`]).
    uncounted: Vec<usize>,
    tasks: HashMap<TaskId, Task<P>>,
    next_task: TaskId,
    /// Every task of the job, running or not, by id: its subgraph and place.
    dispatched: Vec<(usize, Place<P>)>,
    peers: BTreeMap<P, PeerInfo>,
    /// When each peer last returned a result: a queued task started no earlier.
    last_done: BTreeMap<P, f64>,
    /// Which peers hold which values (inputs they were sent, outputs they computed).
    held: HashMap<ValueId, BTreeSet<P>>,
    local_busy_until: f64,
    local_in_flight: usize,
    stats: BTreeMap<Place<P>, PlaceStats>,
    redispatches: Vec<(usize, String)>,
    /// The first ready subgraph found with no place left to run (no peer can take it and the
    /// requester may not): the job cannot finish.
    stuck: Option<JobFailure<P>>,
}

impl<P: Ord + Clone + fmt::Debug + fmt::Display> Scheduler<P> {
    pub fn new(plan: &Plan, cfg: SchedConfig) -> Self {
        let n = plan.subgraphs.len();
        let mut inputs = Vec::with_capacity(n);
        for sg in &plan.subgraphs {
            // A recipe travels as a few bytes, whatever it makes.
            let v: Vec<(ValueId, u64)> = sg
                .input_ids
                .iter()
                .zip(&sg.program.inputs)
                .zip(&sg.inputs)
                .map(|((id, m), s)| match s {
                    Source::Leaf(l) if plan.leaves[*l].how().is_some() => (*id, 0),
                    _ => (*id, m.bytes()),
                })
                .collect();
            inputs.push(v);
        }
        let mut dependents = vec![Vec::new(); n];
        let mut unmet = vec![0; n];
        let mut deps_of = Vec::with_capacity(n);
        for (i, sg) in plan.subgraphs.iter().enumerate() {
            let deps: BTreeSet<usize> = sg.deps().collect();
            unmet[i] = deps.len();
            for &d in &deps {
                dependents[d].push(i);
            }
            deps_of.push(deps.into_iter().collect());
        }
        let mut sched = Scheduler {
            measured_before: BTreeMap::new(),
            cfg,
            flops: plan.subgraphs.iter().map(|s| s.cost.flops).collect(),
            bytes_out: plan.subgraphs.iter().map(|s| s.cost.bytes_out).collect(),
            inputs,
            ops: plan.subgraphs.iter().map(|s| s.ops()).collect(),
            needs: plan
                .subgraphs
                .iter()
                .map(|s| {
                    let mut f = s.program.validate(&Budget::unlimited()).ok()?;
                    f.metas = Vec::new();
                    Some(f)
                })
                .collect(),
            unfit_noted: BTreeSet::new(),
            state: vec![State::Waiting; n],
            dependents,
            deps: deps_of,
            unmet,
            ready: BTreeSet::new(),
            ready_local: BTreeSet::new(),
            errors: vec![Vec::new(); n],
            uncounted: vec![0; n],
            tasks: HashMap::new(),
            next_task: 0,
            dispatched: Vec::new(),
            peers: BTreeMap::new(),
            last_done: BTreeMap::new(),
            held: HashMap::new(),
            local_busy_until: 0.0,
            local_in_flight: 0,
            stats: BTreeMap::new(),
            redispatches: Vec::new(),
            stuck: None,
        };
        for i in 0..n {
            if sched.unmet[i] == 0 {
                sched.make_ready(i);
            }
        }
        sched
    }

    fn runs_locally(&self, sg: usize) -> bool {
        self.cfg.local_data_movement && self.flops[sg] == 0
    }

    fn make_ready(&mut self, sg: usize) {
        self.state[sg] = State::Ready;
        if self.runs_locally(sg) {
            self.ready_local.insert(sg);
        } else {
            self.ready.insert(sg);
        }
    }

    /// Marks `sg` done without running it (its result was cached); dependents may become
    /// ready.
    pub fn completed(&mut self, sg: usize) {
        if self.state[sg] == State::Done {
            return;
        }
        self.ready.remove(&sg);
        self.ready_local.remove(&sg);
        self.finish(sg);
    }

    fn finish(&mut self, sg: usize) {
        self.state[sg] = State::Done;
        for k in 0..self.dependents[sg].len() {
            let d = self.dependents[sg][k];
            self.unmet[d] -= 1;
            if self.unmet[d] == 0 && self.state[d] == State::Waiting {
                self.make_ready(d);
            }
        }
    }

    /// Adds holders of `id` learned elsewhere (jobs running alongside sent it to them);
    /// only peers of this job count.
    pub fn learn_held<'a>(&mut self, id: ValueId, peers: impl IntoIterator<Item = &'a P>)
    where
        P: 'a,
    {
        for p in peers {
            if self.peers.contains_key(p) {
                self.held.entry(id).or_default().insert(p.clone());
            }
        }
    }

    /// Input `input` of running `task` turned out held by its peer after all (a job running
    /// alongside sent it there meanwhile): it travels by id and is not counted as moved.
    pub fn held_after_all(&mut self, task: TaskId, input: usize) {
        if let Some(t) = self.tasks.get_mut(&task)
            && let Some((_, bytes)) = self.inputs[t.subgraph].get(input)
        {
            t.moved = t.moved.saturating_sub(*bytes);
        }
    }

    /// Forgets who holds value `id` (it turned out wrong; no copy of it may be reused).
    pub fn forget(&mut self, id: &ValueId) {
        self.held.remove(id);
    }

    /// Every value each peer is known to hold.
    pub fn held(&self) -> &HashMap<ValueId, BTreeSet<P>> {
        &self.held
    }

    /// A scheduler for `plan` that starts from what earlier jobs learned.
    pub fn resume(plan: &Plan, cfg: SchedConfig, knowledge: Knowledge<P>) -> Self {
        let mut s = Scheduler::new(plan, cfg);
        s.held = knowledge.held;
        s.measured_before = knowledge.measured;
        s
    }

    /// Like [`Scheduler::resume`], but copying from `known` only who holds the values this
    /// plan reads ([`Scheduler::input_ids`]): a requester's table of held values grows with
    /// every job, and copying all of it for each job made every job slower than the last.
    pub fn resume_from(plan: &Plan, cfg: SchedConfig, known: &Knowledge<P>) -> Self {
        let mut s = Scheduler::new(plan, cfg);
        for id in s.input_ids() {
            if let Some(holders) = known.held.get(&id) {
                s.held.insert(id, holders.clone());
            }
        }
        s.measured_before = known.measured.clone();
        s
    }

    /// Every value a subgraph of this plan reads, once each.
    pub fn input_ids(&self) -> Vec<ValueId> {
        let mut ids: Vec<ValueId> = self.inputs.iter().flatten().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// What this job learned, with what it started from, for the next job.
    pub fn knowledge(&self) -> Knowledge<P> {
        let mut measured = self.measured_before.clone();
        for (p, info) in &self.peers {
            if !info.measured && !info.link_measured && info.done == 0 && info.failed == 0 {
                continue;
            }
            info.record(measured.entry(p.clone()).or_default());
        }
        Knowledge {
            held: self.held.clone(),
            measured,
        }
    }

    /// `p` no longer holds `ids` (it answered with stale values for them).
    pub fn not_held_by(&mut self, p: &P, ids: &[ValueId]) {
        for id in ids {
            if let Some(holders) = self.held.get_mut(id) {
                holders.remove(p);
            }
        }
    }

    /// Adds or updates a peer with its advertised speed, link and slots.
    pub fn peer(&mut self, p: P, flops: f64, link: f64, slots: usize) {
        let p_key = p.clone();
        let new = !self.peers.contains_key(&p);
        let e = self.peers.entry(p).or_insert(PeerInfo {
            flops,
            link,
            slots,
            in_flight: 0,
            busy_until: 0.0,
            measured: false,
            link_measured: false,
            done: 0,
            failed: 0,
            budget: None,
            setup: 0.0,
        });
        if !e.measured {
            e.flops = flops;
        }
        if !e.link_measured {
            e.link = link;
        }
        e.slots = slots;
        // A peer measured in an earlier job starts from that measurement.
        if new && let Some(m) = self.measured_before.get(&p_key).copied() {
            self.measured(&p_key, m.flops, m.link);
            if let Some(info) = self.peers.get_mut(&p_key) {
                info.done = m.done;
                info.failed = m.failed;
            }
        }
    }

    /// Sets what one task may use on peer `p`: subgraphs over it are never sent there.
    /// Seconds each task sent to `p` waits before it starts moving (see [`PeerInfo::setup`]).
    pub fn setup(&mut self, p: &P, seconds: f64) {
        if let Some(info) = self.peers.get_mut(p) {
            info.setup = seconds.max(0.0);
        }
    }

    pub fn budget(&mut self, p: &P, budget: Budget) {
        if let Some(info) = self.peers.get_mut(p) {
            info.budget = Some(budget);
        }
    }

    /// Whether subgraph `sg` fits peer `info`'s budget (an unknown budget takes anything).
    fn fits(&self, sg: usize, info: &PeerInfo) -> bool {
        match (&info.budget, &self.needs[sg]) {
            (None, _) => true,
            (Some(b), Some(f)) => b.admits(f).is_ok(),
            (Some(_), None) => false,
        }
    }

    /// Seeds a peer's measured speed (FLOP/s) and link (bytes/s) from earlier jobs.
    fn measured(&mut self, p: &P, flops: Option<f64>, link: Option<f64>) {
        if let Some(info) = self.peers.get_mut(p) {
            if let Some(f) = flops {
                info.flops = f;
                info.measured = true;
            }
            if let Some(l) = link {
                info.link = l;
                info.link_measured = true;
            }
        }
    }

    /// Runs `subgraphs` again, with everything downstream of them: their results turned out
    /// to be untrustworthy. Running copies are forgotten (their results will be ignored).
    /// Returns every subgraph reopened.
    pub fn reopen(&mut self, subgraphs: &[usize]) -> Vec<usize> {
        let mut closure = BTreeSet::new();
        let mut stack: Vec<usize> = subgraphs.to_vec();
        while let Some(sg) = stack.pop() {
            if closure.insert(sg) {
                stack.extend(self.dependents[sg].iter().copied());
            }
        }
        let dropped: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| closure.contains(&t.subgraph))
            .map(|(&id, _)| id)
            .collect();
        for id in dropped {
            if let Some(t) = self.tasks.remove(&id) {
                self.release(&t);
            }
        }
        for &sg in &closure {
            self.state[sg] = State::Waiting;
            self.ready.remove(&sg);
            self.ready_local.remove(&sg);
        }
        // Recount what each reopened subgraph waits for, and start those with none.
        for &sg in &closure {
            self.unmet[sg] = self.deps[sg]
                .iter()
                .filter(|&&d| self.state[d] != State::Done)
                .count();
            if self.unmet[sg] == 0 {
                self.make_ready(sg);
            }
        }
        closure.into_iter().collect()
    }

    /// Forgets a peer (disconnected, banned) for this job; what it did and failed is kept for
    /// the next. Its running tasks must be reported as failed.
    pub fn remove_peer(&mut self, p: &P) {
        if let Some(info) = self.peers.remove(p) {
            info.record(self.measured_before.entry(p.clone()).or_default());
        }
        for holders in self.held.values_mut() {
            holders.remove(p);
        }
    }

    pub fn peers(&self) -> &BTreeMap<P, PeerInfo> {
        &self.peers
    }

    /// Whether `task` is still running as far as the scheduler knows (not expired, failed,
    /// cancelled or finished).
    pub fn knows(&self, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
    }

    /// The subgraph and place of any task of this job, still running or not.
    pub fn task(&self, task: TaskId) -> Option<(usize, &Place<P>)> {
        let (sg, place) = self.dispatched.get(usize::try_from(task).ok()?)?;
        Some((*sg, place))
    }

    /// Tasks on `p` that are still running.
    pub fn running_on(&self, p: &P) -> Vec<TaskId> {
        let mut on: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.place == Place::Peer(p.clone()))
            .map(|(&id, _)| id)
            .collect();
        on.sort_unstable();
        on
    }

    /// Whether every subgraph has an accepted result.
    pub fn finished(&self) -> bool {
        self.state.iter().all(|s| *s == State::Done)
    }

    /// Records that `p` holds value `id` (in tests; jobs learn it from dispatches and
    /// results, and start from [`Scheduler::resume`]).
    #[cfg(test)]
    fn holds(&mut self, p: P, id: ValueId) {
        self.held.entry(id).or_default().insert(p);
    }

    fn estimate(&self, sg: usize, place: &Place<P>, now: f64) -> f64 {
        let flops = self.flops[sg] as f64;
        match place {
            Place::Local => now.max(self.local_busy_until) + flops / self.cfg.local_flops,
            Place::Peer(p) => {
                let info = &self.peers[p];
                let moved: u64 = self.inputs[sg]
                    .iter()
                    .filter(|(id, _)| !self.held.get(id).is_some_and(|h| h.contains(p)))
                    .map(|(_, b)| b)
                    .sum();
                now.max(info.busy_until)
                    + self.cfg.latency
                    + flops / info.flops.max(1.0)
                    + (moved + self.bytes_out[sg]) as f64 / info.link.max(1.0)
            }
        }
    }

    /// Places every ready subgraph that can start now.
    pub fn schedule(&mut self, now: f64) -> Vec<Decision<P>> {
        let mut out = Vec::new();
        while let Some(sg) = self.ready_local.pop_first() {
            out.push(self.dispatch(sg, Place::Local, now));
        }
        let mut skipped = Vec::new();
        while let Some(sg) = self.ready.pop_first() {
            let tried = self.tried(sg);
            match self.best_place(sg, now, &tried, self.depth(sg)) {
                Some(place) => out.push(self.dispatch(sg, place, now)),
                None => {
                    if self.stuck.is_none()
                        && let Some(why) = self.nowhere(sg, &tried)
                    {
                        self.stuck = Some(JobFailure {
                            subgraph: sg,
                            ops: self.ops[sg].clone(),
                            attempts: self.errors[sg].clone(),
                            unplaceable: Some(why),
                        });
                    }
                    skipped.push(sg);
                    // Nothing else fits either once every peer is full (or worth waiting for)
                    // and the requester is busy or not allowed; a subgraph that avoided
                    // peers where it failed may be followed by one that can use them.
                    let depth = self.depth(sg);
                    let free = self.peers.values().any(|i| i.in_flight < i.slots + depth);
                    let local = self.cfg.allow_local && self.local_in_flight == 0;
                    if (!free && !local) || self.errors[sg].is_empty() {
                        break;
                    }
                }
            }
        }
        self.ready.extend(skipped);
        out
    }

    /// Places `sg` is not sent to again: those where it failed, except a peer that only said
    /// it was busy (fewer than [`BUSY_TRIES`] times): busy passes.
    fn tried(&self, sg: usize) -> BTreeSet<Place<P>> {
        let busy = |e: &AttemptError<P>| {
            matches!(e.error, TaskFailure::Worker(crate::wire::TaskError::Busy))
        };
        let mut busy_at: BTreeMap<&Place<P>, usize> = BTreeMap::new();
        let mut tried = BTreeSet::new();
        for e in &self.errors[sg] {
            if busy(e) {
                *busy_at.entry(&e.place).or_default() += 1;
            } else {
                tried.insert(e.place.clone());
            }
        }
        tried.extend(
            busy_at
                .into_iter()
                .filter(|(_, n)| *n >= BUSY_TRIES)
                .map(|(p, _)| p.clone()),
        );
        tried
    }

    /// Failed attempts at `sg` that count against `max_attempts`: a task lost because its
    /// peer was banned says nothing about the subgraph (a queue full of tasks on a cheater
    /// would otherwise use up every attempt of them at once), nor does a failure at a peer
    /// not in good standing (three fake fast peers would otherwise fail any job).
    fn attempts(&self, sg: usize) -> usize {
        self.errors[sg]
            .iter()
            .filter(|e| !matches!(e.error, TaskFailure::Banned { .. }))
            .count()
            .saturating_sub(self.uncounted[sg])
    }

    /// How deep a peer's queue may be for `sg`.
    fn depth(&self, sg: usize) -> usize {
        let bytes = self.inputs[sg].iter().map(|(_, b)| b).sum::<u64>() + self.bytes_out[sg];
        if self.flops[sg] <= self.cfg.small_flops && bytes <= self.cfg.small_bytes {
            self.cfg.queue_depth.max(self.cfg.small_queue_depth)
        } else {
            self.cfg.queue_depth
        }
    }

    /// Where `sg` would finish first, among peers with fewer than `slots + depth` tasks.
    fn best_place(
        &self,
        sg: usize,
        now: f64,
        avoid: &BTreeSet<Place<P>>,
        depth: usize,
    ) -> Option<Place<P>> {
        let mut best: Option<(f64, Place<P>)> = None;
        let mut best_busy: Option<f64> = None;
        // Peers that mostly fail are used only when no other peer could take it.
        let others_can = self.peers.iter().any(|(p, info)| {
            !info.failing() && !avoid.contains(&Place::Peer(p.clone())) && self.fits(sg, info)
        });
        for (p, info) in &self.peers {
            let place = Place::Peer(p.clone());
            if avoid.contains(&place) || !self.fits(sg, info) || (others_can && info.failing()) {
                continue;
            }
            let t = self.estimate(sg, &place, now);
            if info.in_flight >= info.slots + depth {
                best_busy = Some(best_busy.map_or(t, |b| b.min(t)));
            } else if best.as_ref().is_none_or(|(b, _)| t < *b) {
                best = Some((t, place));
            }
        }
        // Compared without the round trip both pay (where latency dominates every peer
        // looks nearly as soon as every other).
        let base = now + self.cfg.latency;
        if let Some((t, place)) = self.stay_with_data(sg, now, avoid, depth)
            && let Some((b, other)) = &best
            && *other != place
            && t - base <= STAY_WITH_DATA * (b - base)
        {
            best = Some((t, place));
        }
        // Earliest finish counts queueing: wait for a busy peer that would still finish in
        // less than half the time of the best free one (a slow peer is not worth its slot).
        if let (Some((free, _)), Some(busy)) = (&best, best_busy)
            && busy - now < WAIT_FOR_BUSY * (free - now)
        {
            return None;
        }
        // Locally only when no peer could ever take it (none known, or all failed it); busy
        // peers are waited for.
        let no_peer = self
            .peers
            .iter()
            .all(|(p, info)| avoid.contains(&Place::Peer(p.clone())) || !self.fits(sg, info));
        let local_free = self.local_in_flight == 0;
        if self.cfg.allow_local && local_free && no_peer {
            best = Some((self.estimate(sg, &Place::Local, now), Place::Local));
        }
        best.map(|(_, p)| p)
    }

    /// The peer with room for `sg` that holds most of its input bytes, if those are two
    /// thirds of all `sg` reads, and its estimate. The estimate counts the holder's queue, so
    /// the shards of a batch, which all read the weights one worker holds, still spread.
    fn stay_with_data(
        &self,
        sg: usize,
        now: f64,
        avoid: &BTreeSet<Place<P>>,
        depth: usize,
    ) -> Option<(f64, Place<P>)> {
        let total: u64 = self.inputs[sg].iter().map(|(_, b)| b).sum();
        // Most held bytes; of peers holding the same (a model every worker was sent), the
        // soonest.
        let (held, t, place) = self
            .peers
            .iter()
            .filter(|(p, info)| {
                info.in_flight < info.slots + depth
                    && !info.failing()
                    && !avoid.contains(&Place::Peer((*p).clone()))
                    && self.fits(sg, info)
            })
            .map(|(p, _)| {
                let held: u64 = self.inputs[sg]
                    .iter()
                    .filter(|(id, _)| self.held.get(id).is_some_and(|h| h.contains(p)))
                    .map(|(_, b)| b)
                    .sum();
                let place = Place::Peer(p.clone());
                (held, self.estimate(sg, &place, now), place)
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))?;
        if held == 0 || 3 * held < 2 * total {
            return None;
        }
        Some((t, place))
    }

    /// Why ready subgraph `sg` can never be placed in this job, if it cannot: every known peer
    /// failed it, left or is too small for it, and the requester may not run it.
    fn nowhere(&self, sg: usize, avoid: &BTreeSet<Place<P>>) -> Option<String> {
        if self.cfg.allow_local
            || self
                .peers
                .iter()
                .any(|(p, info)| !avoid.contains(&Place::Peer(p.clone())) && self.fits(sg, info))
        {
            return None;
        }
        let mut why = if self.peers.is_empty() {
            "no worker is left in the job (none was known, or every one was unreachable or \
             banned)"
                .to_string()
        } else if let Some(unfit) = self.unfit(sg) {
            format!("it {unfit}")
        } else {
            let failed = self
                .peers
                .keys()
                .filter(|p| avoid.contains(&Place::Peer((*p).clone())))
                .count();
            let small = self.peers.len() - failed;
            if small == 0 {
                format!("every one of the {failed} workers failed it")
            } else {
                format!("{failed} workers failed it and it fits none of the other {small}")
            }
        };
        why.push_str(" (local execution is off)");
        Some(why)
    }

    /// The job cannot finish: a ready subgraph has no place left to run. Check it after
    /// [`Scheduler::schedule`].
    pub fn stuck(&self) -> Option<&JobFailure<P>> {
        self.stuck.as_ref()
    }

    /// Why `sg` fits no known peer, if it fits none (for the job report).
    fn unfit(&self, sg: usize) -> Option<String> {
        if self.peers.is_empty() || self.peers.values().any(|i| self.fits(sg, i)) {
            return None;
        }
        let Some(f) = &self.needs[sg] else {
            return Some("it does not validate".into());
        };
        let why = self
            .peers
            .values()
            .filter_map(|i| i.budget.as_ref()?.admits(f).err())
            .max_by_key(|e| e.max)
            .map_or_else(String::new, |e| format!(": {e}"));
        Some(format!("fits no peer's budget{why}"))
    }

    fn dispatch(&mut self, sg: usize, place: Place<P>, now: f64) -> Decision<P> {
        if place == Place::Local
            && !self.runs_locally(sg)
            && !self.unfit_noted.contains(&sg)
            && let Some(why) = self.unfit(sg)
        {
            self.unfit_noted.insert(sg);
            self.redispatches
                .push((sg, format!("ran on the requester: {why}")));
        }
        let finish = self.estimate(sg, &place, now);
        let estimate = (finish - now).max(1e-3);
        let queued = match &place {
            Place::Peer(p) => self.peers[p].in_flight >= self.peers[p].slots,
            Place::Local => false,
        };
        let setup = match &place {
            Place::Peer(p) => self.peers[p].setup,
            Place::Local => 0.0,
        };
        let deadline = now + setup + self.cfg.deadline_slack * estimate + self.cfg.deadline_grace;
        let held = match &place {
            Place::Peer(p) => self.inputs[sg]
                .iter()
                .map(|(id, _)| self.held.get(id).is_some_and(|h| h.contains(p)))
                .collect(),
            Place::Local => vec![false; self.inputs[sg].len()],
        };
        match &place {
            Place::Peer(p) => {
                let info = self.peers.get_mut(p).expect("placed on a known peer");
                info.in_flight += 1;
                info.busy_until = finish;
                for (id, _) in &self.inputs[sg] {
                    self.held.entry(*id).or_default().insert(p.clone());
                }
            }
            Place::Local => {
                self.local_in_flight += 1;
                self.local_busy_until = finish;
            }
        }
        self.state[sg] = State::Running;
        let task = self.next_task;
        self.next_task += 1;
        self.dispatched.push((sg, place.clone()));
        self.tasks.insert(
            task,
            Task {
                subgraph: sg,
                place: place.clone(),
                started: now,
                estimate,
                deadline,
                speculative_sent: false,
                moved: self.inputs[sg]
                    .iter()
                    .zip(&held)
                    .filter(|(_, h)| !**h)
                    .map(|((_, b), _)| b)
                    .sum(),
                queued,
            },
        );
        Decision::Dispatch {
            task,
            subgraph: sg,
            place,
            deadline,
            held,
        }
    }

    fn release(&mut self, t: &Task<P>) {
        match &t.place {
            Place::Peer(p) => {
                if let Some(info) = self.peers.get_mut(p) {
                    info.in_flight = info.in_flight.saturating_sub(1);
                }
            }
            Place::Local => self.local_in_flight = self.local_in_flight.saturating_sub(1),
        }
    }

    /// A task's result was accepted. `compute_secs` is the worker's own compute time, when it
    /// reported one: the rest of the round trip measures the link. Returns cancellations of the
    /// subgraph's other copies. A result for a subgraph that is already done (or an unknown
    /// task) is ignored.
    pub fn on_done(
        &mut self,
        task: TaskId,
        now: f64,
        output_ids: &[ValueId],
        compute_secs: Option<f64>,
    ) -> Vec<Decision<P>> {
        let Some(t) = self.tasks.remove(&task) else {
            return vec![];
        };
        self.release(&t);
        let sg = t.subgraph;
        if self.state[sg] == State::Done {
            return vec![];
        }
        // A queued task started when the peer finished the one before it.
        let started = match &t.place {
            Place::Peer(p) if t.queued => {
                t.started.max(self.last_done.get(p).copied().unwrap_or(0.0))
            }
            _ => t.started,
        };
        if let Place::Peer(p) = &t.place {
            self.last_done.insert(p.clone(), now);
        }
        let elapsed = (now - started).max(1e-6);
        let moved = t.moved + self.bytes_out[sg];
        let s = self.stats.entry(t.place.clone()).or_default();
        s.tasks += 1;
        s.flops += self.flops[sg];
        s.bytes_in += t.moved;
        s.bytes_out += self.bytes_out[sg];
        s.busy_secs += elapsed;
        if let Place::Peer(p) = &t.place {
            if let Some(info) = self.peers.get_mut(p) {
                // Measured throughput replaces the advert: exponential average of FLOP/s over
                // the worker's compute time (the whole round trip if it did not say).
                // A worker cannot claim to be more than 4x faster than the round trip shows.
                let compute = compute_secs.map_or(elapsed, |c| c.clamp(0.25 * elapsed, elapsed));
                let measured = self.flops[sg] as f64 / compute;
                // The rest of the round trip is latency and transfer; large transfers measure
                // the link.
                let transfer = elapsed - compute - self.cfg.latency;
                if compute_secs.is_some() && moved >= LINK_SAMPLE_BYTES && transfer > 0.0 {
                    let link = moved as f64 / transfer;
                    info.link = if info.link_measured {
                        0.5 * info.link + 0.5 * link
                    } else {
                        link
                    };
                    info.link_measured = true;
                }
                if self.flops[sg] > 0 {
                    info.flops = if info.measured {
                        0.5 * info.flops + 0.5 * measured
                    } else {
                        measured
                    };
                    info.measured = true;
                }
                info.done += 1;
                if info.in_flight == 0 {
                    info.busy_until = now;
                }
            }
            for id in output_ids {
                self.held.entry(*id).or_default().insert(p.clone());
            }
        }
        self.finish(sg);
        // Cancel the other copies of this subgraph.
        let others: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, o)| o.subgraph == sg)
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::new();
        for id in others {
            let o = self.tasks.remove(&id).expect("listed above");
            self.release(&o);
            out.push(Decision::Cancel {
                task: id,
                place: o.place,
            });
        }
        out
    }

    /// A task failed (error, disconnect, timeout, bad result). Returns the job failure if the
    /// subgraph has used up its attempts.
    pub fn on_failed(&mut self, task: TaskId, error: TaskFailure) -> Result<(), JobFailure<P>> {
        let Some(t) = self.tasks.remove(&task) else {
            return Ok(());
        };
        self.release(&t);
        let sg = t.subgraph;
        // Judged before this failure counts against the peer; a peer already gone (banned,
        // unreachable) is not in good standing.
        let counts = match &t.place {
            Place::Peer(p) => self.peers.get(p).is_some_and(PeerInfo::in_good_standing),
            Place::Local => true,
        };
        // Busy says nothing about the subgraph either (see `tried` for how often it is
        // asked again).
        let busy = matches!(error, TaskFailure::Worker(crate::wire::TaskError::Busy));
        if (!counts || busy) && !matches!(error, TaskFailure::Banned { .. }) {
            self.uncounted[sg] += 1;
        }
        if let Place::Peer(p) = &t.place
            && let Some(info) = self.peers.get_mut(p)
        {
            info.failed += 1;
        }
        let s = self.stats.entry(t.place.clone()).or_default();
        s.failures += 1;
        // What it carried crossed the network all the same (a busy worker reads a task
        // before turning it away), unless the peer could not be reached at all.
        if matches!(t.place, Place::Peer(_)) && !matches!(error, TaskFailure::Unreachable(_)) {
            s.bytes_in += t.moved;
        }
        self.errors[sg].push(AttemptError {
            place: t.place.clone(),
            error: error.clone(),
        });
        if self.state[sg] == State::Done || self.tasks.values().any(|o| o.subgraph == sg) {
            return Ok(()); // another copy is still running or already won
        }
        if self.attempts(sg) >= self.cfg.max_attempts {
            return Err(JobFailure {
                subgraph: sg,
                ops: self.ops[sg].clone(),
                attempts: self.errors[sg].clone(),
                unplaceable: None,
            });
        }
        self.redispatches
            .push((sg, format!("after {} failed: {error}", t.place)));
        self.make_ready(sg);
        Ok(())
    }

    /// Tasks past their deadline, to be reported back through [`Scheduler::on_failed`]; and
    /// speculative copies of stragglers on places that would finish sooner.
    pub fn tick(&mut self, now: f64) -> (Vec<TaskId>, Vec<Decision<P>>) {
        let expired: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| now > t.deadline)
            .map(|(&id, _)| id)
            .collect();
        let mut copies = Vec::new();
        let stragglers: Vec<(TaskId, usize, Place<P>)> = self
            .tasks
            .iter()
            .filter(|(id, t)| {
                !expired.contains(id)
                    && !t.speculative_sent
                    && now - t.started
                        > (self.cfg.straggler * t.estimate).max(self.cfg.straggler_min)
            })
            .map(|(&id, t)| (id, t.subgraph, t.place.clone()))
            .collect();
        for (id, sg, place) in stragglers {
            let copies_running = self.tasks.values().filter(|t| t.subgraph == sg).count();
            if copies_running > 1 || self.attempts(sg) + copies_running >= self.cfg.max_attempts {
                continue;
            }
            let avoid: BTreeSet<Place<P>> = std::iter::once(place.clone())
                .chain(self.errors[sg].iter().map(|e| e.place.clone()))
                .collect();
            // A copy goes only to a peer with a free slot: in a queue it would wait too.
            if let Some(other) = self.best_place(sg, now, &avoid, 0) {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.speculative_sent = true;
                }
                self.redispatches
                    .push((sg, format!("straggling on {place}")));
                copies.push(self.dispatch(sg, other, now));
            }
        }
        (expired, copies)
    }

    /// What each place did in this job.
    pub fn stats(&self) -> &BTreeMap<Place<P>, PlaceStats> {
        &self.stats
    }

    /// Every re-dispatch: the subgraph and why.
    pub fn redispatches(&self) -> &[(usize, String)] {
        &self.redispatches
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use corvid_kernels::{Backend, CpuBackend};

    use super::*;
    use crate::{Graph, LocalExecutor, Settings};

    /// Four independent 32x32 tiles (block 32 on a 64x64 product) and their assembly.
    fn plan() -> Plan {
        product(32, [64, 40, 64])
    }

    /// The plan of a `[m, k] x [k, n]` product of data in blocks of `block`.
    fn product(block: usize, [m, k, n]: [usize; 3]) -> Plan {
        let exec = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(Settings {
            block,
            ..Settings::default()
        });
        let g = Graph::new("sched").with_executor(Arc::new(exec));
        // Data, not recipes: these inputs cost their bytes to move.
        let data = |shape: [usize; 2], seed| {
            g.constant(corvid_kernels::Tensor::random_uniform(
                shape, -1.0, 1.0, seed,
            ))
        };
        let c = data([m, k], 1).matmul(&data([k, n], 2)).unwrap();
        g.plan(&[&c]).unwrap()
    }

    /// A job checks out only who holds the values it reads, and checks in its view of those
    /// (a holder it found gone is forgotten) and what it learned, keeping the rest.
    #[test]
    fn a_job_copies_only_the_holders_of_what_it_reads() {
        let p = plan();
        let mut known: Knowledge<&str> = Knowledge::default();
        for i in 0..10_000u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            known
                .held
                .insert(ValueId(id), BTreeSet::from(["elsewhere"]));
        }
        let read = Scheduler::<&str>::new(&p, no_local()).input_ids();
        assert!(!read.is_empty());
        for id in &read {
            known.held.insert(*id, BTreeSet::from(["a", "b"]));
        }
        let mut s = Scheduler::resume_from(&p, no_local(), &known);
        assert_eq!(s.held().len(), read.len(), "only what the plan reads");
        s.not_held_by(&"b", &read[..1]);
        known.check_in(s.knowledge(), &read);
        assert_eq!(known.held.len(), 10_000 + read.len(), "the rest is kept");
        assert_eq!(
            known.held[&read[0]],
            BTreeSet::from(["a"]),
            "b's copy is gone"
        );
        assert_eq!(known.held[&read[1]], BTreeSet::from(["a", "b"]));
    }

    /// Everything on peers, assembly too; no subgraph counts as small (this plan's tiles are
    /// tiny, and most tests are about the general policy).
    fn no_local() -> SchedConfig {
        SchedConfig {
            allow_local: false,
            local_data_movement: false,
            small_flops: 0,
            ..SchedConfig::default()
        }
    }

    /// [`no_local`] with no queue: a peer takes as many tasks as it has slots.
    fn unqueued() -> SchedConfig {
        SchedConfig {
            queue_depth: 0,
            ..no_local()
        }
    }

    /// The requester may run anything no peer can take.
    fn with_local() -> SchedConfig {
        SchedConfig {
            allow_local: true,
            small_flops: 0,
            ..SchedConfig::default()
        }
    }

    fn dispatched(ds: &[Decision<&'static str>]) -> Vec<(TaskId, usize, Place<&'static str>)> {
        ds.iter()
            .filter_map(|d| match d {
                Decision::Dispatch {
                    task,
                    subgraph,
                    place,
                    ..
                } => Some((*task, *subgraph, place.clone())),
                Decision::Cancel { .. } => None,
            })
            .collect()
    }

    #[test]
    fn independent_tiles_spread_over_peers_within_slots_and_queues() {
        let p = plan();
        let mut s = Scheduler::new(&p, unqueued());
        s.peer("a", 1e9, 1e9, 1);
        s.peer("b", 1e9, 1e9, 1);
        let d = dispatched(&s.schedule(0.0));
        assert_eq!(d.len(), 2, "one task per slot");
        let places: BTreeSet<_> = d.iter().map(|x| x.2.clone()).collect();
        assert_eq!(places.len(), 2, "{d:?}");

        // With a queue of one, each peer also gets its next task while the first computes.
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e9, 1);
        s.peer("b", 1e9, 1e9, 1);
        let d = dispatched(&s.schedule(0.0));
        assert_eq!(d.len(), 4, "a slot and a queue place each: {d:?}");
        for peer in ["a", "b"] {
            assert_eq!(
                d.iter().filter(|x| x.2 == Place::Peer(peer)).count(),
                2,
                "{d:?}"
            );
        }
        assert!(
            dispatched(&s.schedule(0.0)).is_empty(),
            "both queues are full"
        );
        // Small subgraphs queue deeper: one peer with one slot takes all 4 tiles at once (1
        // running, 3 queued) when they count as small, 2 when they do not.
        for (small_flops, want) in [(u64::MAX, 4), (0, 2)] {
            let mut one = Scheduler::new(
                &p,
                SchedConfig {
                    small_flops,
                    small_bytes: u64::MAX,
                    small_queue_depth: 3,
                    ..no_local()
                },
            );
            one.peer("a", 1e9, 1e9, 1);
            let d = dispatched(&one.schedule(0.0));
            assert_eq!(d.len(), want, "{d:?}");
        }
        // The queued task's time runs from when the one before it finished: two tasks back to
        // back, one second each (by the round trip: the worker did not say), measure one
        // second each, not two for the second.
        let on_a: Vec<TaskId> = d
            .iter()
            .filter(|x| x.2 == Place::Peer("a"))
            .map(|x| x.0)
            .collect();
        let flops = p.subgraphs[d[0].1].cost.flops as f64;
        s.on_done(on_a[0], 1.0, &[], None);
        s.on_done(on_a[1], 2.0, &[], None);
        let a = &s.peers()["a"];
        assert!(
            (a.flops - flops).abs() < 1e-6 * flops,
            "{} vs {flops}",
            a.flops
        );
    }

    #[test]
    fn recipes_cost_nothing_to_move() {
        let exec = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(Settings {
            block: 32,
            ..Settings::default()
        });
        let g = Graph::new("recipes").with_executor(Arc::new(exec));
        let c = g
            .random(&[64, 40], -1.0, 1.0, 1)
            .matmul(&g.random(&[40, 64], -1.0, 1.0, 2))
            .unwrap();
        let p = g.plan(&[&c]).unwrap();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e6, 1);
        let tile = (0..p.subgraphs.len())
            .find(|&i| p.subgraphs[i].cost.flops > 0)
            .unwrap();
        assert!(p.subgraphs[tile].cost.bytes_in > 0);
        assert!(
            s.inputs[tile].iter().all(|(_, b)| *b == 0),
            "{:?}",
            s.inputs[tile]
        );
    }

    #[test]
    fn subgraphs_go_only_where_they_fit_and_the_report_says_when_none_fits() {
        let p = plan();
        // A tile: 32x40 @ 40x32, well under a MiB at its peak.
        let tile = (0..p.subgraphs.len())
            .find(|&i| p.subgraphs[i].cost.flops > 0)
            .unwrap();
        let need = p.subgraphs[tile]
            .program
            .validate(&Budget::unlimited())
            .unwrap();
        let roomy = Budget::new(1 << 30, 1 << 30, 1 << 40);
        let tight = Budget::new(1 << 30, need.peak_bytes - 1, 1 << 40);
        let mut s = Scheduler::new(&p, no_local());
        s.peer("small", 1e12, 1e9, 4);
        s.peer("big", 1e9, 1e9, 4);
        s.budget(&"small", tight.clone());
        s.budget(&"big", roomy);
        let d = dispatched(&s.schedule(0.0));
        assert!(!d.is_empty());
        assert!(
            d.iter().all(|x| x.2 == Place::Peer("big")),
            "the much faster peer is too small for the tiles: {d:?}"
        );
        // When no peer fits, the job cannot finish, and says why.
        let mut s = Scheduler::new(&p, SchedConfig::default());
        s.peer("small", 1e12, 1e9, 4);
        s.budget(&"small", tight.clone());
        assert!(dispatched(&s.schedule(0.0)).is_empty());
        let stuck = s.stuck().expect("no place for the tiles").to_string();
        assert!(
            stuck.contains("has nowhere to run")
                && stuck.contains("fits no peer's budget")
                && stuck.contains("local execution is off"),
            "{stuck}"
        );
        // Allowed to, the requester runs it and the report says why.
        let mut s = Scheduler::new(&p, with_local());
        s.peer("small", 1e12, 1e9, 4);
        s.budget(&"small", tight);
        let d = dispatched(&s.schedule(0.0));
        assert!(d.iter().any(|x| x.2 == Place::Local), "{d:?}");
        assert!(
            s.redispatches()
                .iter()
                .any(|(_, why)| why.contains("fits no peer's budget")
                    && why.contains("bytes of memory at once")),
            "{:?}",
            s.redispatches()
        );
    }

    #[test]
    fn measured_speed_replaces_a_lying_advert() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("liar", 1e15, 1e9, 1);
        s.peer("honest", 1e9, 1e9, 1);
        let d = dispatched(&s.schedule(0.0));
        let liar_task = d.iter().find(|x| x.2 == Place::Peer("liar")).unwrap().0;
        let honest_task = d.iter().find(|x| x.2 == Place::Peer("honest")).unwrap().0;
        // The honest peer answers in 0.1 ms; the liar takes 10 s for the same ~82 kFLOP.
        s.on_done(honest_task, 0.0001, &[], None);
        s.on_done(liar_task, 10.0, &[], None);
        assert!(s.peers()["liar"].flops < 1e5, "{:?}", s.peers()["liar"]);
        let next = dispatched(&s.schedule(10.0));
        assert_eq!(
            next[0].2,
            Place::Peer("honest"),
            "the fast peer gets the next tile first: {next:?}"
        );
    }

    /// What earlier jobs learned of `peers`: each did a task, so its failures count.
    fn proven(peers: &[&'static str]) -> Knowledge<&'static str> {
        Knowledge {
            held: HashMap::new(),
            measured: peers
                .iter()
                .map(|p| {
                    let m = Measured {
                        done: 1,
                        ..Measured::default()
                    };
                    (*p, m)
                })
                .collect(),
        }
    }

    #[test]
    fn failures_go_elsewhere_then_fail_the_job_with_a_report() {
        let p = plan();
        let mut s = Scheduler::resume(&p, no_local(), proven(&["a", "b", "c"]));
        for peer in ["a", "b", "c"] {
            s.peer(peer, 1e9, 1e9, 4);
        }
        let first = dispatched(&s.schedule(0.0));
        let (task, sg, place) = first.iter().find(|x| x.1 == 0).unwrap().clone();
        s.on_failed(task, TaskFailure::Transport("connection closed".into()))
            .unwrap();
        let retry = dispatched(&s.schedule(0.1));
        let (t2, _, p2) = retry.iter().find(|x| x.1 == sg).unwrap().clone();
        assert_ne!(p2, place, "the retry avoids the peer that failed");
        s.on_failed(t2, TaskFailure::Deadline).unwrap();
        let (t3, _, p3) = dispatched(&s.schedule(0.2))
            .into_iter()
            .find(|x| x.1 == sg)
            .unwrap();
        assert!(p3 != place && p3 != p2);
        let e = s
            .on_failed(t3, TaskFailure::Malformed("wrong shape".into()))
            .unwrap_err();
        assert_eq!(e.subgraph, sg);
        assert_eq!(e.attempts.len(), 3);
        assert_eq!(
            e.attempts[1].error,
            TaskFailure::Deadline,
            "typed, in order"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("connection closed")
                && msg.contains("no answer before the deadline")
                && msg.contains("matmul"),
            "{msg}"
        );
        assert_eq!(s.redispatches().len(), 2);
    }

    #[test]
    fn peers_that_only_fail_lose_placement_and_use_up_no_attempts() {
        let p = plan();
        let refused = || TaskFailure::Worker(crate::wire::TaskError::Failed("refused".into()));
        let mut s = Scheduler::new(&p, no_local());
        // Three fake peers, a million times faster than the honest one by their adverts.
        let fakes = ["fake1", "fake2", "fake3"];
        for f in fakes {
            s.peer(f, 1e15, 1e12, 4);
        }
        s.peer("honest", 1e9, 1e9, 1);
        let mut now = 0.0;
        let mut failures = 0;
        let mut done_by_honest = 0;
        while !s.finished() {
            assert!(now < 100.0, "the job never finished");
            let d = dispatched(&s.schedule(now));
            assert!(s.stuck().is_none(), "{:?}", s.stuck());
            for (task, _, place) in d {
                now += 0.01;
                if place == Place::Peer("honest") {
                    done_by_honest += 1;
                    s.on_done(task, now, &[], None);
                } else {
                    failures += 1;
                    s.on_failed(task, refused())
                        .expect("a fake peer's failure uses up no attempt");
                }
            }
            now += 0.01;
        }
        assert_eq!(done_by_honest, p.subgraphs.len());
        // Each fake failed at most what it took before it failed more than it did: after
        // their first round they get nothing while the honest peer can take the work.
        assert!(failures <= 3 * (4 + 1), "{failures}");
        for f in fakes {
            assert!(s.peers()[f].failing());
        }
        // What this job learned carries over: the next job starts with the fakes failing.
        let mut next = Scheduler::resume(&p, no_local(), s.knowledge());
        for f in fakes {
            next.peer(f, 1e15, 1e12, 4);
        }
        next.peer("honest", 1e9, 1e9, 1);
        let d = dispatched(&next.schedule(0.0));
        assert!(
            !d.is_empty() && d.iter().all(|x| x.2 == Place::Peer("honest")),
            "{d:?}"
        );

        // A subgraph that every peer fails still ends the job, once each peer has tried it.
        let mut s = Scheduler::new(&p, no_local());
        for f in fakes {
            s.peer(f, 1e15, 1e12, 4);
        }
        let mut now = 0.0;
        let stuck = loop {
            assert!(now < 100.0, "never gave up");
            for (task, _, _) in dispatched(&s.schedule(now)) {
                let _ = s.on_failed(task, refused());
            }
            if let Some(stuck) = s.stuck() {
                break stuck.to_string();
            }
            now += 0.01;
        };
        assert!(
            stuck.contains("every one of the 3 workers failed it"),
            "{stuck}"
        );
    }

    #[test]
    fn a_busy_peer_is_asked_again_and_busy_uses_up_no_attempt() {
        let p = plan();
        let mut s = Scheduler::resume(&p, unqueued(), proven(&["only"]));
        s.peer("only", 1e9, 1e9, 1);
        let busy = || TaskFailure::Worker(crate::wire::TaskError::Busy);
        // Busy twice, then it takes the subgraph: the job goes on on its only peer.
        let (t, sg, _) = dispatched(&s.schedule(0.0))[0].clone();
        s.on_failed(t, busy()).unwrap();
        let (t, again, _) = dispatched(&s.schedule(0.1))[0].clone();
        assert_eq!(again, sg);
        s.on_failed(t, busy()).unwrap();
        let (t, again, _) = dispatched(&s.schedule(0.2))[0].clone();
        assert_eq!(again, sg);
        assert!(s.stuck().is_none());
        s.on_done(t, 0.3, &[], None);
        // A third busy for one subgraph, and it looks elsewhere (here: nowhere, and says so).
        let (t, sg2, _) = dispatched(&s.schedule(0.4))[0].clone();
        for k in 0..3 {
            s.on_failed(t + k, busy()).unwrap();
            let d = dispatched(&s.schedule(0.5 + k as f64));
            if k < 2 {
                assert_eq!(d[0].1, sg2);
            } else {
                assert!(d.iter().all(|x| x.1 != sg2), "{d:?}");
            }
        }
        assert!(s.stuck().is_some_and(|f| f.subgraph == sg2));
    }

    #[test]
    fn tasks_lost_to_banned_peers_do_not_use_up_attempts() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        for peer in ["a", "b", "c", "d", "e"] {
            s.peer(peer, 1e9, 1e9, 4);
        }
        let sg = 0;
        // Four peers in turn are banned while holding the subgraph: it still goes to the fifth.
        for round in 0..4 {
            let d = dispatched(&s.schedule(round as f64));
            let (task, _, place) = d.into_iter().find(|x| x.1 == sg).unwrap();
            let Place::Peer(peer) = place else {
                panic!("placed locally")
            };
            s.remove_peer(&peer);
            s.on_failed(
                task,
                TaskFailure::Banned {
                    peer: peer.to_string(),
                },
            )
            .expect("a ban is not an attempt at the subgraph");
        }
        assert!(dispatched(&s.schedule(5.0)).iter().any(|x| x.1 == sg));
    }

    #[test]
    fn a_subgraph_every_peer_failed_or_left_ends_the_job_naming_each_attempt() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e9, 4);
        s.peer("b", 1e9, 1e9, 4);
        s.peer("c", 1e9, 1e9, 4);
        let first = dispatched(&s.schedule(0.0));
        let (task, sg, place) = first.iter().find(|x| x.1 == 0).unwrap().clone();
        s.on_failed(
            task,
            TaskFailure::Worker(crate::wire::TaskError::Failed("out of memory".into())),
        )
        .unwrap();
        let Place::Peer(failed) = place else {
            panic!("{place:?}")
        };
        // The two others leave (unreachable): no place is left for the subgraph.
        for p in ["a", "b", "c"].into_iter().filter(|p| *p != failed) {
            s.remove_peer(&p);
        }
        assert!(s.stuck().is_none(), "nothing was tried since");
        let again = dispatched(&s.schedule(0.1));
        assert!(again.iter().all(|x| x.1 != sg), "{again:?}");
        let stuck = s.stuck().expect("subgraph 0 has nowhere to go");
        assert_eq!(stuck.subgraph, sg);
        let msg = stuck.to_string();
        assert!(
            msg.contains("every one of the 1 workers failed it") && msg.contains("out of memory"),
            "{msg}"
        );
    }

    #[test]
    fn deadlines_expire_and_stragglers_get_a_copy_used_once() {
        let p = plan();
        let mut s = Scheduler::new(&p, unqueued());
        s.peer("slow", 1e6, 1e9, 1);
        let d = dispatched(&s.schedule(0.0));
        assert_eq!(d.len(), 1);
        let (task, sg, _) = d[0].clone();
        s.peer("spare", 1e6, 1e9, 1);
        // ~82 kFLOP at 1 MFLOP/s: estimated 0.08 s, deadline 4 x 0.08 + 2 s. At 0.6 s the task
        // straggles but has not expired: a speculative copy goes to the spare peer.
        let (expired, copies) = s.tick(0.6);
        assert!(expired.is_empty());
        let copy = dispatched(&copies);
        assert_eq!(copy.len(), 1, "{copies:?}");
        assert_eq!((copy[0].1, copy[0].2.clone()), (sg, Place::Peer("spare")));
        // The copy wins; the original is cancelled and its late result ignored.
        let cancels = s.on_done(copy[0].0, 0.7, &[], None);
        assert_eq!(
            cancels,
            vec![Decision::Cancel {
                task,
                place: Place::Peer("slow")
            }]
        );
        assert!(s.on_done(task, 0.8, &[], None).is_empty());
        assert_eq!(s.stats()[&Place::Peer("spare")].tasks, 1);
        assert!(!s.stats().contains_key(&Place::Peer("slow")));
        // A task that never answers expires at its deadline.
        let next = dispatched(&s.schedule(1.0));
        let (t, ..) = next[0].clone();
        let (expired, _) = s.tick(1e6);
        assert!(expired.contains(&t));
    }

    #[test]
    fn data_stays_where_it_is_and_local_runs_when_no_peer_can() {
        let p = plan();
        let mut s = Scheduler::new(&p, with_local());
        assert_eq!(
            dispatched(&s.schedule(0.0))[0].2,
            Place::Local,
            "no peers, local allowed: run locally"
        );
        assert!(s.stuck().is_none());
        let mut s = Scheduler::new(&p, SchedConfig::default());
        assert!(
            dispatched(&s.schedule(0.0)).is_empty(),
            "no peers: nothing runs"
        );
        let stuck = s.stuck().expect("no peers, local off").to_string();
        assert!(stuck.contains("no worker is left"), "{stuck}");
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e6, 4);
        s.peer("b", 1e9, 1e6, 4);
        for id in &p.subgraphs[0].input_ids {
            s.holds("b", *id);
        }
        let d = dispatched(&s.schedule(0.0));
        let first = d.iter().find(|x| x.1 == 0).unwrap();
        assert_eq!(
            first.2,
            Place::Peer("b"),
            "b already holds the inputs: {d:?}"
        );
    }

    #[test]
    fn a_subgraph_stays_with_the_state_it_reads_unless_another_peer_is_much_faster() {
        // One subgraph (no tiling) reading 64 KiB of data.
        let p = product(1024, [64, 128, 64]);
        assert_eq!(p.subgraphs.len(), 1);
        let first = |fast: f64| {
            let mut s = Scheduler::new(&p, no_local());
            // 1 MFLOP, 10 ms on the holder; on a fast link moving 64 KiB costs 0.06 ms: by
            // the estimate alone a peer a little faster than the holder wins.
            s.peer("fast", fast, 1e9, 1);
            s.peer("holder", 1e8, 1e9, 1);
            for id in &p.subgraphs[0].input_ids {
                s.holds("holder", *id);
            }
            dispatched(&s.schedule(0.0))[0].2.clone()
        };
        assert_eq!(first(1.2e8), Place::Peer("holder"), "20 % faster: stays");
        assert_eq!(first(3e8), Place::Peer("fast"), "3x faster: moves");
    }

    #[test]
    fn the_job_finishes_when_every_subgraph_is_done() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e9, 8);
        let mut now = 0.0;
        while !s.finished() {
            let d = dispatched(&s.schedule(now));
            assert!(!d.is_empty(), "stuck at {now}");
            for (t, ..) in d {
                now += 0.001;
                s.on_done(t, now, &[], None);
            }
        }
        assert_eq!(s.stats()[&Place::Peer("a")].tasks, p.subgraphs.len());
    }

    #[test]
    fn assembly_runs_locally_held_inputs_are_flagged_and_reopen_redoes_downstream() {
        let p = plan();
        let assembly: Vec<usize> = (0..p.subgraphs.len())
            .filter(|&i| p.subgraphs[i].cost.flops == 0)
            .collect();
        assert!(!assembly.is_empty(), "{}", p.describe());
        let mut s = Scheduler::new(&p, SchedConfig::default());
        s.peer("a", 1e9, 1e9, 8);
        s.holds("a", p.subgraphs[0].input_ids[0]);
        let mut now = 0.0;
        let mut local = Vec::new();
        let mut first_held = None;
        while !s.finished() {
            let ds = s.schedule(now);
            assert!(!ds.is_empty(), "stuck at {now}");
            for d in ds {
                let Decision::Dispatch {
                    task,
                    subgraph,
                    place,
                    held,
                    ..
                } = d
                else {
                    continue;
                };
                if subgraph == 0 {
                    first_held = Some(held);
                }
                if place == Place::Local {
                    local.push(subgraph);
                }
                now += 0.001;
                let ids = p.subgraphs[subgraph].output_ids.clone();
                s.on_done(task, now, &ids, Some(0.0005));
            }
        }
        assert_eq!(local, assembly, "zero-FLOP subgraphs run on the requester");
        let held = first_held.unwrap();
        assert!(held[0] && !held[1], "{held:?}");
        // A tile turned out wrong: it and the assembly reading it run again, nothing else.
        let reopened = s.reopen(&[0]);
        assert!(reopened.contains(&0) && reopened.iter().any(|r| assembly.contains(r)));
        assert!(!reopened.contains(&1), "{reopened:?}");
        assert!(!s.finished());
        let again = dispatched(&s.schedule(now));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1, 0);
        // A cached subgraph is done without running.
        let mut c = Scheduler::new(&p, no_local());
        c.peer("a", 1e9, 1e9, 8);
        for i in 0..p.subgraphs.len() {
            c.completed(i);
        }
        assert!(c.finished());
        assert!(c.schedule(0.0).is_empty());
    }

    #[test]
    fn a_much_faster_busy_peer_is_waited_for() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("fast", 1e9, 1e12, 1);
        s.peer("slow", 1e9, 1e12, 1);
        // Measured: the slow peer needs 1000x longer.
        s.measured(&"slow", Some(1e6), None);
        let d = dispatched(&s.schedule(0.0));
        assert!(
            !d.is_empty() && d.iter().all(|x| x.2 == Place::Peer("fast")),
            "only the fast peer gets work (its slot, then its queue); the slow one is not \
             worth it: {d:?}"
        );
    }

    /// What one job's scheduler learned (measured speeds, who holds what) starts the next
    /// job's: a lying advert stays discounted and held inputs are not sent again. Tasks keep
    /// their subgraph and place after they end.
    #[test]
    fn the_next_job_starts_from_what_this_one_learned() {
        let p = plan();
        let mut s = Scheduler::new(&p, no_local());
        s.peer("a", 1e9, 1e9, 8);
        let first = dispatched(&s.schedule(0.0));
        let (task, sg, place) = first[0].clone();
        assert_eq!(
            s.running_on(&"a"),
            first.iter().map(|d| d.0).collect::<Vec<_>>()
        );
        let ids = p.subgraphs[sg].output_ids.clone();
        // 10x slower than advertised.
        let secs = p.subgraphs[sg].cost.flops as f64 / 1e8;
        s.on_done(task, secs, &ids, Some(secs));
        assert_eq!(s.task(task), Some((sg, &place)), "kept after it ended");
        assert!(!s.knows(task) && !s.running_on(&"a").contains(&task));
        let k = s.knowledge();
        let flops = k.measured[&"a"].flops.unwrap();
        assert!((flops / 1e8 - 1.0).abs() < 0.01, "{flops}");

        let mut next = Scheduler::resume(&p, no_local(), k);
        next.peer("a", 1e12, 1e9, 8);
        let info = &next.peers()[&"a"];
        assert!(
            info.measured && (info.flops / 1e8 - 1.0).abs() < 0.01,
            "{info:?}"
        );
        assert!(next.held().get(&ids[0]).is_some_and(|h| h.contains(&"a")));
        next.not_held_by(&"a", &ids);
        assert!(!next.held().get(&ids[0]).is_some_and(|h| h.contains(&"a")));
    }
}
