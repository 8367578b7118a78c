//! The developer's way into the swarm: a requester node that runs plans on other peers.
//!
//! `Client::local(n)` starts an embedded swarm of `n` worker nodes plus a requester on loopback
//! (the default for development); `Client::connect(addrs)` joins an existing swarm as a
//! requester-only peer. `client.executor()` plugs into [`corvid_sdk::Graph::with_executor`], so
//! the same graph code runs locally or across the swarm.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::{Backend, BackendChoice, Tensor as Data};
use corvid_sdk::plan::{Plan, Settings, Source};
use corvid_sdk::sched::{Decision, Place, SchedConfig, Scheduler};
use corvid_sdk::wire::{Input, TaskRequest, TaskResponse};
use corvid_sdk::{EvalError, Executor, LocalExecutor};
use libp2p::{Multiaddr, PeerId};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;
use crate::node::{Node, NodeClient, NodeError, NodeHandle};

/// Prefix of errors that mean the peer cannot be reached: it leaves the job's placement.
const UNREACHABLE: &str = "unreachable: ";

/// How often running tasks are checked against their deadlines.
const TICK: Duration = Duration::from_millis(50);

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("could not start the client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("no worker joined within {0:?}")]
    NoWorkers(Duration),
}

/// What one place did in a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlaceSummary {
    pub tasks: usize,
    pub flops: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub busy: Duration,
    pub failures: usize,
}

/// What happened in one job: which peer did what, bytes moved, time, re-dispatches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSummary {
    pub subgraphs: usize,
    pub wall: Duration,
    pub places: BTreeMap<String, PlaceSummary>,
    /// Subgraph index and why it ran again.
    pub redispatches: Vec<(usize, String)>,
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} subgraphs in {:.3} s",
            self.subgraphs,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:<24} {:>6} {:>10} {:>10} {:>10} {:>8}",
            "place", "tasks", "GFLOP", "MiB in", "MiB out", "failed"
        )?;
        for (place, s) in &self.places {
            writeln!(
                f,
                "{:<24} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>8}",
                place,
                s.tasks,
                s.flops as f64 / 1e9,
                s.bytes_in as f64 / (1 << 20) as f64,
                s.bytes_out as f64 / (1 << 20) as f64,
                s.failures
            )?;
        }
        for (sg, why) in &self.redispatches {
            writeln!(f, "re-dispatched subgraph {sg}: {why}")?;
        }
        Ok(())
    }
}

/// A requester in the swarm (and, for `local`, the workers it started).
#[derive(Debug)]
pub struct Client {
    runtime: tokio::runtime::Runtime,
    requester: NodeHandle,
    workers: Vec<NodeHandle>,
    shutdown: CancellationToken,
    executor: Arc<SwarmExecutor>,
}

impl Client {
    /// Starts `n` worker nodes and a requester in this process, on loopback, and waits until
    /// the requester sees every worker.
    pub fn local(n: usize) -> Result<Client, ClientError> {
        let runtime = runtime()?;
        let shutdown = CancellationToken::new();
        let (requester, workers) = runtime.block_on(async {
            let mut workers: Vec<NodeHandle> = Vec::with_capacity(n);
            for i in 0..n {
                let mut c = NodeConfig::for_test(1000 + i as u64);
                c.slots = 1;
                if let Some(first) = workers.first() {
                    c.bootstrap = vec![first.bootstrap_addr()];
                }
                workers.push(Node::spawn(c, shutdown.clone()).await?);
            }
            let mut c = NodeConfig::for_test(999);
            c.contribute = false;
            c.bootstrap = workers
                .first()
                .map(|w| vec![w.bootstrap_addr()])
                .unwrap_or_default();
            let requester = Node::spawn(c, shutdown.clone()).await?;
            Ok::<_, ClientError>((requester, workers))
        })?;
        let client = Client::from_parts(runtime, requester, workers, shutdown)?;
        client.wait_for_workers(n, Duration::from_secs(20))?;
        Ok(client)
    }

    /// Joins the swarm at `bootstrap` as a requester-only peer.
    pub fn connect(bootstrap: Vec<Multiaddr>) -> Result<Client, ClientError> {
        let runtime = runtime()?;
        let shutdown = CancellationToken::new();
        let requester = runtime.block_on(async {
            let mut c = NodeConfig::for_test(rand_seed());
            c.contribute = false;
            c.bootstrap = bootstrap;
            Node::spawn(c, shutdown.clone()).await
        })?;
        Client::from_parts(runtime, requester, Vec::new(), shutdown)
    }

    fn from_parts(
        runtime: tokio::runtime::Runtime,
        requester: NodeHandle,
        workers: Vec<NodeHandle>,
        shutdown: CancellationToken,
    ) -> Result<Client, ClientError> {
        let local = Backend::open(BackendChoice::Cpu).map_err(|source| NodeError::Backend {
            choice: BackendChoice::Cpu,
            source,
        })?;
        let executor = Arc::new(SwarmExecutor {
            handle: runtime.handle().clone(),
            node: requester.client(),
            local: Arc::new(LocalExecutor::new(local)),
            settings: Mutex::new(Settings::default()),
            sched: SchedConfig::default(),
            last: Mutex::new(None),
        });
        Ok(Client {
            runtime,
            requester,
            workers,
            shutdown,
            executor,
        })
    }

    /// Waits until at least `n` contributing peers are known.
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) -> Result<usize, ClientError> {
        let node = self.requester.client();
        self.runtime.block_on(async {
            let deadline = Instant::now() + timeout;
            loop {
                let have = node
                    .peers()
                    .await?
                    .iter()
                    .filter(|p| p.contributes && p.slots_total > 0)
                    .count();
                if have >= n {
                    return Ok(have);
                }
                if Instant::now() > deadline {
                    return Err(ClientError::NoWorkers(timeout));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    /// The executor to give graphs: `Graph::new("x").with_executor(client.executor())`.
    pub fn executor(&self) -> Arc<dyn Executor> {
        self.executor.clone()
    }

    /// Same client, plans cut with other settings (block size).
    pub fn with_settings(self, settings: Settings) -> Self {
        *self
            .executor
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = settings;
        self
    }

    /// The summary of the last job this client ran.
    pub fn last_summary(&self) -> Option<JobSummary> {
        self.executor
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn requester(&self) -> &NodeHandle {
        &self.requester
    }

    /// The embedded workers (for `local`).
    pub fn workers(&self) -> &[NodeHandle] {
        &self.workers
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("corvid-client")
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Runs plans across the swarm: places subgraphs with the SDK's scheduler, ships their inputs,
/// collects results, retries failures elsewhere.
#[derive(Debug)]
pub struct SwarmExecutor {
    handle: tokio::runtime::Handle,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    settings: Mutex<Settings>,
    sched: SchedConfig,
    last: Mutex<Option<JobSummary>>,
}

impl Executor for SwarmExecutor {
    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn execute(&self, plan: &Plan) -> Result<Vec<Arc<Data>>, EvalError> {
        // Runs on the client's runtime; this thread only waits (it may be any thread).
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = run_job(
            plan.clone(),
            self.node.clone(),
            self.local.clone(),
            self.sched.clone(),
        );
        self.handle.spawn(async move {
            let _ = tx.send(job.await);
        });
        let (result, summary) = rx.recv().map_err(|_| EvalError::Swarm {
            report: "the client stopped during the job".into(),
        })?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(summary);
        result
    }
}

type TaskOutcome = (u64, Result<Vec<Data>, String>);

/// One job in flight: the plan, its scheduler, results so far and the running tasks.
struct Job {
    plan: Plan,
    sched: Scheduler<PeerId>,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    results: Vec<Option<Arc<Vec<Arc<Data>>>>>,
    running: JoinSet<TaskOutcome>,
    task_subgraph: BTreeMap<u64, usize>,
    task_peer: BTreeMap<u64, PeerId>,
    started: Instant,
}

async fn run_job(
    plan: Plan,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    cfg: SchedConfig,
) -> (Result<Vec<Arc<Data>>, EvalError>, JobSummary) {
    let mut sched: Scheduler<PeerId> = Scheduler::new(&plan, cfg);
    match node.peers().await {
        Ok(peers) => {
            for p in peers.iter().filter(|p| p.contributes && p.slots_total > 0) {
                if let Ok(id) = p.peer_id.parse::<PeerId>() {
                    sched.peer(
                        id,
                        f64::from(p.matmul_gflops) * 1e9,
                        1e9,
                        p.slots_total as usize,
                    );
                }
            }
        }
        Err(e) => {
            return (
                Err(EvalError::Swarm {
                    report: e.to_string(),
                }),
                JobSummary::default(),
            );
        }
    }
    let mut job = Job {
        results: vec![None; plan.subgraphs.len()],
        plan,
        sched,
        node,
        local,
        running: JoinSet::new(),
        task_subgraph: BTreeMap::new(),
        task_peer: BTreeMap::new(),
        started: Instant::now(),
    };
    let result = job.run().await;
    job.running.abort_all();
    let outputs = result.map(|()| {
        job.plan
            .outputs
            .iter()
            .map(|s| match *s {
                Source::Leaf(i) => job.plan.leaves[i].clone(),
                Source::Output { subgraph, output } => job.results[subgraph]
                    .as_ref()
                    .expect("finished jobs have every result")[output]
                    .clone(),
            })
            .collect()
    });
    (outputs, job.summary())
}

impl Job {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    async fn run(&mut self) -> Result<(), EvalError> {
        let mut tick = tokio::time::interval(TICK);
        while !self.sched.finished() {
            for d in self.sched.schedule(self.now()) {
                self.dispatch(d);
            }
            tokio::select! {
                done = self.running.join_next(), if !self.running.is_empty() => {
                    if let Some(Ok((task, outcome))) = done {
                        self.outcome(task, outcome)?;
                    }
                }
                _ = tick.tick() => {
                    let (expired, copies) = self.sched.tick(self.now());
                    for task in expired {
                        self.fail(task, "no answer before the deadline".into())?;
                    }
                    for d in copies {
                        self.dispatch(d);
                    }
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, task: u64, error: String) -> Result<(), EvalError> {
        if error.starts_with(UNREACHABLE)
            && let Some(peer) = self.task_peer.get(&task).copied()
        {
            tracing::warn!(%peer, %error, "peer unreachable; no more tasks go to it in this job");
            self.sched.remove_peer(&peer);
        }
        self.sched
            .on_failed(task, error)
            .map_err(|failure| EvalError::Swarm {
                report: failure.to_string(),
            })
    }

    fn outcome(&mut self, task: u64, outcome: Result<Vec<Data>, String>) -> Result<(), EvalError> {
        let Some(&sg) = self.task_subgraph.get(&task) else {
            return Ok(());
        };
        if !self.sched.knows(task) {
            return Ok(()); // expired or cancelled: its subgraph went elsewhere
        }
        match outcome.and_then(|outs| check_outputs(&self.plan, sg, outs)) {
            Ok(outs) => {
                let ids = self.plan.subgraphs[sg].output_ids.clone();
                if self.results[sg].is_none() {
                    self.results[sg] = Some(Arc::new(outs.into_iter().map(Arc::new).collect()));
                }
                let now = self.now();
                self.sched.on_done(task, now, &ids);
                Ok(())
            }
            Err(error) => self.fail(task, error),
        }
    }

    /// Starts a task where the scheduler placed it.
    fn dispatch(&mut self, d: Decision<PeerId>) {
        let Decision::Dispatch {
            task,
            subgraph,
            place,
            deadline,
        } = d
        else {
            return;
        };
        self.task_subgraph.insert(task, subgraph);
        let inputs = gather(&self.plan, subgraph, &self.results);
        let sg = self.plan.subgraphs[subgraph].clone();
        let timeout = Duration::from_secs_f64((deadline - self.now()).max(0.001));
        match place {
            Place::Local => {
                let local = self.local.clone();
                self.running.spawn(async move {
                    let r = tokio::task::spawn_blocking(move || local.run_subgraph(&sg, &inputs))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                        .map(|v| v.iter().map(|t| (**t).clone()).collect());
                    (task, r)
                });
            }
            Place::Peer(peer) => {
                self.task_peer.insert(task, peer);
                let node = self.node.clone();
                self.running.spawn(async move {
                    let data = inputs.iter().map(|t| Input::Data((**t).clone())).collect();
                    let req = TaskRequest::new(task, &sg, data);
                    let r = match tokio::time::timeout(timeout, node.run_task(peer, req)).await {
                        Err(_) => Err(format!("no answer within {:.1} s", timeout.as_secs_f64())),
                        Ok(Err(NodeError::Remote { error, .. })) => {
                            Err(format!("{UNREACHABLE}{error}"))
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Ok(Ok(TaskResponse::Done { outputs, .. })) => Ok(outputs),
                        Ok(Ok(TaskResponse::Failed { error, .. })) => Err(error),
                        Ok(Ok(TaskResponse::Missing { inputs, .. })) => {
                            Err(format!("the worker lacks inputs {inputs:?}"))
                        }
                    };
                    (task, r)
                });
            }
        }
    }

    fn summary(&self) -> JobSummary {
        let mut places = BTreeMap::new();
        for (place, s) in self.sched.stats() {
            places.insert(
                place.to_string(),
                PlaceSummary {
                    tasks: s.tasks,
                    flops: s.flops,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    busy: Duration::from_secs_f64(s.busy_secs),
                    failures: s.failures,
                },
            );
        }
        JobSummary {
            subgraphs: self.plan.subgraphs.len(),
            wall: self.started.elapsed(),
            places,
            redispatches: self.sched.redispatches().to_vec(),
        }
    }
}

/// The inputs of subgraph `sg`: constants and earlier results.
fn gather(plan: &Plan, sg: usize, results: &[Option<Arc<Vec<Arc<Data>>>>]) -> Vec<Arc<Data>> {
    plan.subgraphs[sg]
        .inputs
        .iter()
        .map(|s| match *s {
            Source::Leaf(i) => plan.leaves[i].clone(),
            Source::Output { subgraph, output } => results[subgraph]
                .as_ref()
                .expect("the scheduler waits for dependencies")[output]
                .clone(),
        })
        .collect()
}

/// A result must have the program's output count, dtypes and shapes.
fn check_outputs(plan: &Plan, sg: usize, outs: Vec<Data>) -> Result<Vec<Data>, String> {
    let program = &plan.subgraphs[sg].program;
    let metas = program.infer().map_err(|e| e.to_string())?;
    if outs.len() != program.outputs.len() {
        return Err(format!(
            "{} outputs returned, {} expected",
            outs.len(),
            program.outputs.len()
        ));
    }
    for (i, (t, &o)) in outs.iter().zip(&program.outputs).enumerate() {
        if t.meta() != metas[o as usize] {
            return Err(format!(
                "output {i} is {}, expected {}",
                t.meta(),
                metas[o as usize]
            ));
        }
    }
    Ok(outs)
}
