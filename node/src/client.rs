//! The developer's way into the swarm: a requester node that runs plans on other peers.
//!
//! `Client::local(n)` starts an embedded swarm of `n` worker nodes plus a requester on loopback
//! (the default for development); `Client::connect(addrs)` joins an existing swarm as a
//! requester-only peer. `client.executor()` plugs into [`corvid_sdk::Graph::with_executor`], so
//! the same graph code runs locally or across the swarm.
//!
//! Every result a worker returns is signed and checked before it is used (see [`crate::trust`]);
//! a peer caught lying is banned and its unconfirmed work in the job is redone. Verified
//! results are cached by subgraph id, and workers keep the values they were sent, so a repeated
//! job or a shared subgraph costs neither compute nor transfer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::{Backend, BackendChoice, Budget, ContentId, Tensor as Data};
use corvid_sdk::plan::{Plan, Settings, Source, Subgraph};
use corvid_sdk::sched::{Decision, Place, SchedConfig, Scheduler};
use corvid_sdk::wire::{Input, Receipt, TaskRequest, TaskResponse};
use corvid_sdk::{EvalError, Executor, LocalExecutor, ResultCache, ValueId};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;
use crate::config::{ConfigError, ExecutorMode, IdentitySource, Timing};
use crate::identity::Psk;
use crate::node::{Node, NodeClient, NodeError, NodeHandle};
use crate::trust::{self, BanFileError, CheckKind, Refusal, Trust, Verifier};

/// Prefix of errors that mean the peer cannot be reached: it leaves the job's placement.
const UNREACHABLE: &str = "unreachable: ";

/// How often running tasks are checked against their deadlines.
const TICK: Duration = Duration::from_millis(50);

/// Verified results the requester keeps across jobs, in bytes.
const CACHE_BYTES: u64 = 1 << 30;

/// Entries of the requester's "who holds what" and content-id tables before they are reset.
const MAX_TABLE: usize = 100_000;

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("could not start the client runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    NoWorkers(String),
    #[error(
        "no bootstrap address: give the client a node's bootstrap line \
         (`corvid node` prints it: /ip4/…/tcp/…/p2p/<peer id>)"
    )]
    NoBootstrap,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bans(#[from] BanFileError),
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

/// How the job's results were verified.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifySummary {
    /// Results checked, by how.
    pub freivalds: usize,
    pub sampled_rows: usize,
    pub recomputed: usize,
    /// Canary tasks (fresh random inputs, answer known here) sent to peers.
    pub canaries: usize,
    /// Results also run on a second peer, and how many of those agreed.
    pub replicated: usize,
    pub replicas_agreed: usize,
    /// Disagreements between two peers, settled by a local recompute.
    pub disputes: usize,
    /// Each refused result: peer, reason, evidence.
    pub detections: Vec<String>,
    /// Peers banned during the job.
    pub bans: Vec<String>,
    /// Subgraphs run again because their producer was banned.
    pub reopened: usize,
    /// Requester time spent checking and hashing results: the elapsed time of each check,
    /// summed over checks that ran at the same time. A check uses all cores for its span, so
    /// on an idle machine this is close to the wall time it adds; on a loaded one it includes
    /// waiting for a core.
    pub check_time: Duration,
    /// FLOPs run remotely only to check (replicas).
    pub extra_remote_flops: u64,
}

/// What happened in one job: which peer did what, bytes moved, time, re-dispatches, checks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSummary {
    pub subgraphs: usize,
    /// Subgraphs whose verified result was already cached on the requester.
    pub cached: usize,
    pub wall: Duration,
    pub places: BTreeMap<String, PlaceSummary>,
    /// Subgraph index and why it ran again.
    pub redispatches: Vec<(usize, String)>,
    pub verify: VerifySummary,
    /// Subgraphs with arithmetic that ran on the requester (only with local execution
    /// allowed), and pure data-movement ones (assembling tiles, slicing) that always do.
    pub local_compute: usize,
    pub local_moves: usize,
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} subgraphs ({} cached) in {:.3} s",
            self.subgraphs,
            self.cached,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:<54} {:>6} {:>9} {:>9} {:>9} {:>7}",
            "place", "tasks", "GFLOP", "MiB in", "MiB out", "failed"
        )?;
        for (place, s) in &self.places {
            let place = if place == "local" {
                "requester (this machine)"
            } else {
                place
            };
            writeln!(
                f,
                "{:<54} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                place,
                s.tasks,
                s.flops as f64 / 1e9,
                s.bytes_in as f64 / (1 << 20) as f64,
                s.bytes_out as f64 / (1 << 20) as f64,
                s.failures
            )?;
        }
        if self.local_moves > 0 {
            writeln!(
                f,
                "{} data-movement subgraph(s) (assembly, slicing: no arithmetic) ran on the \
                 requester",
                self.local_moves
            )?;
        }
        if self.local_compute > 0 {
            writeln!(
                f,
                "{} subgraph(s) with arithmetic ran on the requester, not on a worker (local \
                 execution allowed)",
                self.local_compute
            )?;
        }
        let v = &self.verify;
        writeln!(
            f,
            "verified: {} freivalds, {} sampled rows, {} recomputed, {} canaries; {} replicated \
             ({} agreed), {} disputes; checks and hashing ran {:.1} ms ({:.1} % of wall, summed over \
             concurrent checks), \
             {:.2} GFLOP of extra remote work",
            v.freivalds,
            v.sampled_rows,
            v.recomputed,
            v.canaries,
            v.replicated,
            v.replicas_agreed,
            v.disputes,
            v.check_time.as_secs_f64() * 1e3,
            100.0 * v.check_time.as_secs_f64() / self.wall.as_secs_f64().max(1e-9),
            v.extra_remote_flops as f64 / 1e9
        )?;
        for d in &v.detections {
            writeln!(f, "detected: {d}")?;
        }
        for b in &v.bans {
            writeln!(f, "banned: {b}")?;
        }
        if v.reopened > 0 {
            writeln!(f, "re-ran {} subgraphs of banned peers", v.reopened)?;
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
        Client::local_with(n, |_, _| {})
    }

    /// [`Client::local`], with each worker's config adjusted by `tweak(index, config)` first
    /// (tests use it to make a worker misbehave).
    #[doc(hidden)]
    pub fn local_with(
        n: usize,
        tweak: impl Fn(usize, &mut NodeConfig),
    ) -> Result<Client, ClientError> {
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
                tweak(i, &mut c);
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
        let client = Client::from_parts(
            runtime,
            requester,
            workers,
            shutdown,
            Trust::default(),
            SchedConfig::default(),
        )?;
        client.wait_for_workers(n, Duration::from_secs(20))?;
        Ok(client)
    }

    /// Joins the swarm at `bootstrap` (each address a node's bootstrap line,
    /// `/ip4/…/tcp/…/p2p/<peer id>`) as a requester with the defaults of
    /// [`Client::builder`]: returns once a worker is known, or fails saying why.
    ///
    /// ```no_run
    /// let client = corvid_node::Client::connect(["/ip4/192.0.2.1/tcp/4001/p2p/12D3KooW…"])?;
    /// # Ok::<(), corvid_node::ClientError>(())
    /// ```
    pub fn connect<A: ToString>(
        bootstrap: impl IntoIterator<Item = A>,
    ) -> Result<Client, ClientError> {
        Client::builder().bootstraps(bootstrap).connect()
    }

    /// [`Client::connect`], reading and saving banned peers (with the evidence) in `bans`.
    pub fn connect_with_bans<A: ToString>(
        bootstrap: impl IntoIterator<Item = A>,
        bans: &Path,
    ) -> Result<Client, ClientError> {
        Client::builder().bootstraps(bootstrap).bans(bans).connect()
    }

    /// A requester for a real swarm, configured step by step:
    ///
    /// ```no_run
    /// let client = corvid_node::Client::builder()
    ///     .bootstrap("/ip4/192.0.2.1/tcp/4001/p2p/12D3KooW…")
    ///     .psk("swarm.key")
    ///     .bans("bans.json")
    ///     .connect()?;
    /// # Ok::<(), corvid_node::ClientError>(())
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn from_parts(
        runtime: tokio::runtime::Runtime,
        requester: NodeHandle,
        workers: Vec<NodeHandle>,
        shutdown: CancellationToken,
        trust: Trust,
        sched: SchedConfig,
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
            sched,
            last: Mutex::new(None),
            memory: Arc::new(Mutex::new(Memory::default())),
            trust: Arc::new(Mutex::new(trust)),
            checks: std::sync::atomic::AtomicBool::new(true),
        });
        Ok(Client {
            runtime,
            requester,
            workers,
            shutdown,
            executor,
        })
    }

    /// Waits until at least `n` contributing peers are known; on timeout, says what the
    /// requester does see (bootstrap connections and their errors, peers known, bans).
    pub fn wait_for_workers(&self, n: usize, timeout: Duration) -> Result<usize, ClientError> {
        let node = self.requester.client();
        self.runtime.block_on(async {
            let deadline = Instant::now() + timeout;
            loop {
                let peers = node.peers().await?;
                let have = {
                    let trust = lock(&self.executor.trust);
                    peers
                        .iter()
                        .filter(|p| p.contributes && p.slots_total > 0)
                        .filter(|p| p.peer_id.parse().is_ok_and(|id| !trust.is_banned(&id)))
                        .count()
                };
                if have >= n {
                    return Ok(have);
                }
                if Instant::now() > deadline {
                    let status = node.status().await?;
                    return Err(ClientError::NoWorkers(
                        self.no_workers_report(n, timeout, &status, &peers),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn no_workers_report(
        &self,
        n: usize,
        timeout: Duration,
        status: &crate::node::Status,
        peers: &[crate::PeerInfo],
    ) -> String {
        let mut out = format!(
            "waited {} for {n} worker(s): ",
            humantime::format_duration(timeout)
        );
        let connected = status.bootstrap.iter().filter(|b| b.connected).count();
        if !status.bootstrap.is_empty() && connected == 0 {
            out.push_str("no bootstrap peer could be reached (");
            let why: Vec<String> = status
                .bootstrap
                .iter()
                .map(|b| match &b.error {
                    Some(e) => format!("{}: {e}", b.addr),
                    None => format!("{}: still dialling", b.addr),
                })
                .collect();
            out.push_str(&why.join("; "));
            out.push_str("); check the address, that the node runs, and the PSK");
            return out;
        }
        let workers: Vec<&crate::PeerInfo> = peers
            .iter()
            .filter(|p| p.contributes && p.slots_total > 0)
            .collect();
        let banned = {
            let trust = lock(&self.executor.trust);
            workers
                .iter()
                .filter(|p| p.peer_id.parse().is_ok_and(|id| trust.is_banned(&id)))
                .count()
        };
        out.push_str(&format!(
            "connected to {connected} of {} bootstrap peer(s); {} peer(s) known, {} of them \
             contributing{}",
            status.bootstrap.len(),
            peers.len(),
            workers.len(),
            if banned > 0 {
                format!(" ({banned} banned by this client)")
            } else {
                String::new()
            }
        ));
        out
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

    /// Same client, but results are accepted unchecked (signatures are still verified). Only
    /// for measuring what checking costs: a swarm of strangers must never be run this way.
    #[doc(hidden)]
    pub fn without_checks_for_benchmarks(self) -> Self {
        self.executor
            .checks
            .store(false, std::sync::atomic::Ordering::Relaxed);
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

    /// Peers this client has banned, with the evidence.
    pub fn bans(&self) -> Vec<trust::Ban> {
        lock(&self.executor.trust).bans().cloned().collect()
    }

    /// Forgets cached results (the next job computes everything again).
    pub fn clear_cache(&self) {
        lock(&self.executor.memory).cache = ResultCache::new(CACHE_BYTES);
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

/// Configures a requester for a real swarm: [`Client::builder`].
///
/// Defaults: a fresh random identity each run, the node's timings (a peer counts while it is
/// connected or its advert is fresher than 90 s), no PSK, bans kept in memory, listening on
/// all interfaces (loopback only when every bootstrap address is loopback), and no local
/// execution: a job that no worker can run fails and says why.
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    bootstrap: Vec<String>,
    listen: Vec<String>,
    psk: Option<PathBuf>,
    key: Option<PathBuf>,
    bans: Option<PathBuf>,
    allow_local: bool,
    workers: usize,
    wait: Duration,
    timing: Timing,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            bootstrap: Vec::new(),
            listen: Vec::new(),
            psk: None,
            key: None,
            bans: None,
            allow_local: false,
            workers: 1,
            wait: Duration::from_secs(30),
            timing: Timing {
                // A requester offers no compute: its benchmark only fills its advert.
                bench_budget: Duration::from_millis(100),
                ..Timing::default()
            },
        }
    }
}

impl ClientBuilder {
    /// A peer to join through: a node's bootstrap line, `/ip4/…/tcp/…/p2p/<peer id>`.
    pub fn bootstrap(mut self, addr: impl ToString) -> Self {
        self.bootstrap.push(addr.to_string());
        self
    }

    /// Several bootstrap peers; any one reachable is enough.
    pub fn bootstraps<A: ToString>(mut self, addrs: impl IntoIterator<Item = A>) -> Self {
        self.bootstrap
            .extend(addrs.into_iter().map(|a| a.to_string()));
        self
    }

    /// The private swarm's key file (the one its nodes were given with `--psk`).
    pub fn psk(mut self, path: impl Into<PathBuf>) -> Self {
        self.psk = Some(path.into());
        self
    }

    /// Keeps this requester's identity in `path` (created, mode 0600, if missing) instead of
    /// a new one each run: workers then recognise it across runs.
    pub fn key(mut self, path: impl Into<PathBuf>) -> Self {
        self.key = Some(path.into());
        self
    }

    /// Reads and saves banned peers, with the evidence, in this JSON file.
    pub fn bans(mut self, path: impl Into<PathBuf>) -> Self {
        self.bans = Some(path.into());
        self
    }

    /// An address to listen on (default: `/ip4/0.0.0.0/tcp/0`).
    pub fn listen(mut self, addr: impl ToString) -> Self {
        self.listen.push(addr.to_string());
        self
    }

    /// Lets the requester run a subgraph itself when no worker can take it. Off by default;
    /// when on, the progress bar and the job summary say what ran here.
    pub fn allow_local(mut self, allow: bool) -> Self {
        self.allow_local = allow;
        self
    }

    /// `connect` waits until `n` workers are known (default 1), for at most `timeout`
    /// (default 30 s). `n = 0` returns as soon as the node is up.
    pub fn wait_for_workers(mut self, n: usize, timeout: Duration) -> Self {
        self.workers = n;
        self.wait = timeout;
        self
    }

    /// Other intervals (tests shorten them; the defaults are the node's).
    #[doc(hidden)]
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// The node configuration this builder describes.
    fn config(&self) -> Result<NodeConfig, ClientError> {
        if self.bootstrap.is_empty() {
            return Err(ClientError::NoBootstrap);
        }
        let bootstrap = crate::config::parse_addrs("bootstrap", &self.bootstrap)?;
        let listen = if self.listen.is_empty() {
            let ip = if bootstrap.iter().all(is_loopback) {
                std::net::Ipv4Addr::LOCALHOST
            } else {
                std::net::Ipv4Addr::UNSPECIFIED
            };
            vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4(ip))
                    .with(Protocol::Tcp(0)),
            ]
        } else {
            crate::config::parse_addrs("listen", &self.listen)?
        };
        let config = NodeConfig {
            data_dir: None,
            config_file: None,
            identity: match &self.key {
                Some(p) => IdentitySource::File(p.clone()),
                None => IdentitySource::Ephemeral,
            },
            listen,
            bootstrap,
            backend: BackendChoice::Cpu,
            max_memory: None,
            psk: match &self.psk {
                Some(p) => Some(Psk::load(p).map_err(ConfigError::from)?),
                None => None,
            },
            contribute: false,
            slots: 1,
            control: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            max_connections: 128,
            timing: self.timing.clone(),
            executor: ExecutorMode::InProcess,
            fault: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Starts the requester and joins the swarm. Fails, saying why, if no bootstrap peer can
    /// be reached or too few workers are heard from in time.
    pub fn connect(self) -> Result<Client, ClientError> {
        let config = self.config()?;
        let trust = match &self.bans {
            Some(p) => Trust::with_file(p)?,
            None => Trust::default(),
        };
        let runtime = runtime()?;
        let shutdown = CancellationToken::new();
        let requester = runtime.block_on(Node::spawn(config, shutdown.clone()))?;
        let sched = SchedConfig {
            allow_local: self.allow_local,
            ..SchedConfig::default()
        };
        let client = Client::from_parts(runtime, requester, Vec::new(), shutdown, trust, sched)?;
        if self.workers > 0 {
            client.wait_for_workers(self.workers, self.wait)?;
        }
        Ok(client)
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => h == "localhost",
        _ => false,
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("corvid-client")
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the requester remembers between jobs.
#[derive(Debug)]
struct Memory {
    /// Verified results by subgraph id.
    cache: ResultCache,
    /// Which peers hold which values.
    held: HashMap<ValueId, BTreeSet<PeerId>>,
    /// Content ids of values, so each is hashed once.
    cids: HashMap<ValueId, ContentId>,
    /// Measured FLOP/s and link bytes/s per peer.
    measured: HashMap<PeerId, (Option<f64>, Option<f64>)>,
    /// Cached results that only a sample vouched for, and their producer: dropped if it is
    /// banned later.
    sampled_from: HashMap<corvid_sdk::SubgraphId, PeerId>,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            cache: ResultCache::new(CACHE_BYTES),
            held: HashMap::new(),
            cids: HashMap::new(),
            measured: HashMap::new(),
            sampled_from: HashMap::new(),
        }
    }
}

/// Runs plans across the swarm: places subgraphs with the SDK's scheduler, ships their inputs,
/// verifies and collects results, retries failures elsewhere.
#[derive(Debug)]
pub struct SwarmExecutor {
    handle: tokio::runtime::Handle,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    settings: Mutex<Settings>,
    sched: SchedConfig,
    last: Mutex<Option<JobSummary>>,
    memory: Arc<Mutex<Memory>>,
    trust: Arc<Mutex<Trust>>,
    checks: std::sync::atomic::AtomicBool,
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
fn lower_median(budgets: &[Budget]) -> Option<Budget> {
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
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job = run_job(
            plan.clone(),
            self.node.clone(),
            self.local.clone(),
            self.sched.clone(),
            self.memory.clone(),
            self.trust.clone(),
            self.checks.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.handle.spawn(async move {
            let _ = tx.send(job.await);
        });
        let (result, summary) = rx.recv().map_err(|_| EvalError::Swarm {
            report: "the client stopped during the job".into(),
        })?;
        *lock(&self.last) = Some(summary);
        result
    }
}

/// A result that passed its checks.
#[derive(Debug)]
struct Accepted {
    outputs: Vec<Arc<Data>>,
    cids: Vec<ContentId>,
    op_hashes: Vec<ContentId>,
    class: [u8; 32],
    /// How it was checked (`None`: computed here).
    check: Option<CheckKind>,
    verify_secs: f64,
    compute_secs: Option<f64>,
    /// Round trip of the request, seconds.
    elapsed_secs: f64,
}

type TaskOutcome = (u64, Result<Accepted, Refusal>);

/// A replica's verdict on a result already accepted from `primary`.
#[derive(Debug)]
enum Replica {
    Agreed,
    /// The replica's own answer could not be used; nothing is known.
    Unusable(String),
    /// The replica proved itself a cheat (bad signature or replay).
    Cheated(Refusal),
    /// The two disagreed; a local recompute says who was wrong.
    Dispute {
        primary_wrong: Option<String>,
        replica_wrong: Option<String>,
    },
}

struct ReplicaOutcome {
    subgraph: usize,
    primary: PeerId,
    replica: PeerId,
    flops: u64,
    verify_secs: f64,
    verdict: Replica,
}

/// Who produced a subgraph's accepted result, and how it was checked.
#[derive(Clone, Copy, Debug)]
struct Producer {
    peer: Option<PeerId>,
    check: Option<CheckKind>,
}

/// One job in flight: the plan, its scheduler, results so far and the running tasks.
struct Job {
    plan: Plan,
    sched: Scheduler<PeerId>,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    verifier: Arc<Verifier>,
    memory: Arc<Mutex<Memory>>,
    trust: Arc<Mutex<Trust>>,
    results: Vec<Option<Arc<Vec<Arc<Data>>>>>,
    accepted: Vec<Option<Arc<Accepted>>>,
    producer: Vec<Option<Producer>>,
    running: JoinSet<TaskOutcome>,
    replicas: JoinSet<ReplicaOutcome>,
    canaries: JoinSet<(PeerId, Result<Accepted, Refusal>)>,
    /// Peers running a replica now.
    replicating: BTreeSet<PeerId>,
    task_subgraph: BTreeMap<u64, usize>,
    task_peer: BTreeMap<u64, PeerId>,
    /// The id each remote task travels under (random), to cancel it.
    task_wire: BTreeMap<u64, u64>,
    /// Advertised determinism class of each peer: replicas go to the same class.
    peer_class: HashMap<PeerId, String>,
    started: Instant,
    cached: usize,
    verify: VerifySummary,
    progress: ProgressBar,
    /// What the requester saw of the swarm at the job's start, for a job no worker can run.
    pool: String,
    /// Subgraphs run on the requester: with arithmetic (only when local execution is
    /// allowed), and pure data movement (assembly, slicing).
    local_compute: usize,
    local_moves: usize,
}

async fn run_job(
    plan: Plan,
    node: NodeClient,
    local: Arc<LocalExecutor>,
    cfg: SchedConfig,
    memory: Arc<Mutex<Memory>>,
    trust: Arc<Mutex<Trust>>,
    checks: bool,
) -> (Result<Vec<Arc<Data>>, EvalError>, JobSummary) {
    let mut sched: Scheduler<PeerId> = Scheduler::new(&plan, cfg);
    let mut peer_class = HashMap::new();
    let pool;
    match node.peers().await {
        Ok(peers) => {
            let trust = lock(&trust);
            let workers: Vec<_> = peers
                .iter()
                .filter(|p| p.contributes && p.slots_total > 0)
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
                    peer_class.insert(id, p.class.clone());
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
    let n = plan.subgraphs.len();
    let mut results = vec![None; n];
    let mut cached = 0;
    {
        let mem = lock(&memory);
        for (&p, &(flops, link)) in &mem.measured {
            sched.measured(&p, flops, link);
        }
        for (i, sg) in plan.subgraphs.iter().enumerate() {
            if let Some(hit) = mem.cache.get(&sg.id) {
                results[i] = Some(hit);
                sched.completed(i);
                cached += 1;
            }
            for id in &sg.input_ids {
                for p in mem.held.get(id).into_iter().flatten() {
                    sched.holds(*p, *id);
                }
            }
        }
    }
    let progress = ProgressBar::new(n as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} subgraphs · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_position(cached as u64);
    let mut job = Job {
        results,
        accepted: vec![None; n],
        producer: vec![None; n],
        verifier: Arc::new(Verifier::with_checks(local.clone(), checks)),
        plan,
        sched,
        node,
        local,
        memory,
        trust,
        running: JoinSet::new(),
        replicas: JoinSet::new(),
        canaries: JoinSet::new(),
        replicating: BTreeSet::new(),
        task_subgraph: BTreeMap::new(),
        task_peer: BTreeMap::new(),
        task_wire: BTreeMap::new(),
        peer_class,
        started: Instant::now(),
        cached,
        verify: VerifySummary::default(),
        progress,
        pool,
        local_compute: 0,
        local_moves: 0,
    };
    if checks && cached < n {
        job.send_canaries();
    }
    let result = job.run().await;
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
    let outputs = result.map(|()| {
        job.remember();
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
        // Done when every subgraph has a result and every replica has reported: a replica
        // may still prove a result wrong.
        // (Canaries only build trust: the job does not wait for them.)
        while !self.sched.finished() || !self.replicas.is_empty() {
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

    /// Asks the worker running `task` to stop it (a copy that lost, a task past its deadline,
    /// a job that ended). Fire and forget.
    fn cancel_remote(&self, task: u64) {
        if let (Some(&peer), Some(&wire)) = (self.task_peer.get(&task), self.task_wire.get(&task)) {
            let node = self.node.clone();
            tokio::spawn(async move {
                let _ = node.cancel_task(peer, wire).await;
            });
        }
    }

    fn fail(&mut self, task: u64, error: String) -> Result<(), EvalError> {
        self.cancel_remote(task);
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

    fn outcome(&mut self, task: u64, outcome: Result<Accepted, Refusal>) -> Result<(), EvalError> {
        let Some(&sg) = self.task_subgraph.get(&task) else {
            return Ok(());
        };
        let peer = self.task_peer.get(&task).copied();
        if let Ok(a) = &outcome {
            self.verify.check_time += Duration::from_secs_f64(a.verify_secs);
        }
        // Proof of cheating counts even from a copy that lost the race; the ban comes first,
        // so no retry budget can save the cheater.
        if let (Err(Refusal::Cheated { reason, evidence }), Some(p)) = (&outcome, peer) {
            let (reason, evidence) = (reason.clone(), evidence.clone());
            self.ban(p, &reason, &evidence)?;
            if self.sched.knows(task) {
                self.fail(task, format!("{reason} (peer banned)"))?;
            }
            return Ok(());
        }
        if !self.sched.knows(task) {
            return Ok(()); // expired or cancelled: its subgraph went elsewhere
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
                {
                    let mut mem = lock(&self.memory);
                    if mem.cids.len() > MAX_TABLE {
                        mem.cids.clear();
                    }
                    for (id, c) in ids.iter().zip(&a.cids) {
                        mem.cids.insert(*id, *c);
                    }
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
            Err(Refusal::Failed(error)) => self.fail(task, error),
            Err(Refusal::Cheated { reason, .. }) => {
                // Local results are never refused as cheating; handled above for peers.
                self.fail(task, reason)
            }
        }
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
        // Even if another job banned it first: this job stops using it too.
        if !self.sched.peers().contains_key(&peer) {
            return Ok(());
        }
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
        let running: Vec<u64> = self
            .task_peer
            .iter()
            .filter(|&(t, p)| *p == peer && self.sched.knows(*t))
            .map(|(&t, _)| t)
            .collect();
        for t in running {
            self.fail(t, format!("{peer} was banned"))?;
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
        let mut mem = lock(&self.memory);
        for i in reopened {
            if self.results[i].take().is_some() {
                self.progress.dec(1);
            }
            self.accepted[i] = None;
            self.producer[i] = None;
            for id in &self.plan.subgraphs[i].output_ids {
                self.sched.forget(id);
                mem.held.remove(id);
                mem.cids.remove(id);
            }
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
            let (node, memory, verifier, local) = (
                self.node.clone(),
                self.memory.clone(),
                self.verifier.clone(),
                self.local.clone(),
            );
            self.canaries.spawn(async move {
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
                    return (
                        peer,
                        Err(Refusal::Failed("no canary could be run here".into())),
                    );
                };
                // Values the peer holds (shared weights) are named, not sent, as for work.
                let held: Vec<bool> = {
                    let mem = lock(&memory);
                    sg.input_ids
                        .iter()
                        .map(|id| mem.held.get(id).is_some_and(|h| h.contains(&peer)))
                        .collect()
                };
                // Room for the inputs on a slow link and the flops on a slow CPU.
                let timeout = Duration::from_secs_f64(
                    2.0 + sg.cost.bytes_in as f64 / 20e6 + sg.cost.flops as f64 / 1e9,
                );
                let wire = rand::rng().random();
                let r = remote(
                    &node, &memory, &verifier, peer, wire, &sg, inputs, held, timeout,
                )
                .await;
                let r = match r {
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

    /// Runs `sg` again on another peer of the same class as `primary` and compares.
    fn replicate(&mut self, sg: usize, primary: PeerId, first: Arc<Accepted>) {
        // Another peer with no replica in flight (so checks never crowd out work), of the
        // same class if there is one (bit-exact comparison), else any (within tolerance).
        let class = self.peer_class.get(&primary).cloned();
        let free: Vec<PeerId> = self
            .sched
            .peers()
            .keys()
            .filter(|p| **p != primary && !self.replicating.contains(p))
            .copied()
            .collect();
        let same: Vec<PeerId> = free
            .iter()
            .filter(|p| self.peer_class.get(p) == class.as_ref())
            .copied()
            .collect();
        let candidates = if same.is_empty() { free } else { same };
        // The candidate with the fewest failures, then the least loaded.
        let Some(replica) = candidates
            .iter()
            .min_by_key(|p| {
                let i = &self.sched.peers()[p];
                (i.failed, i.in_flight)
            })
            .copied()
        else {
            return;
        };
        self.verify.replicated += 1;
        self.replicating.insert(replica);
        let subgraph = self.plan.subgraphs[sg].clone();
        let inputs = gather(&self.plan, sg, &self.results);
        let node = self.node.clone();
        let memory = self.memory.clone();
        let verifier = self.verifier.clone();
        let local = self.local.clone();
        let flops = subgraph.cost.flops;
        self.replicas.spawn(async move {
            let started = Instant::now();
            let verdict = replica_verdict(
                node, memory, verifier, local, replica, subgraph, inputs, first,
            )
            .await;
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
            Replica::Agreed => {
                self.verify.replicas_agreed += 1;
                lock(&self.trust).credit(&r.replica);
                Ok(())
            }
            Replica::Unusable(why) => {
                tracing::debug!(replica = %r.replica, %why, "replica gave no usable answer");
                Ok(())
            }
            Replica::Cheated(Refusal::Cheated { reason, evidence }) => {
                self.ban(r.replica, &reason, &evidence)
            }
            Replica::Cheated(Refusal::Failed(why)) => {
                tracing::debug!(replica = %r.replica, %why, "replica failed");
                Ok(())
            }
            Replica::Dispute {
                primary_wrong,
                replica_wrong,
            } => {
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
        self.task_subgraph.insert(task, subgraph);
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
                let local = self.local.clone();
                self.running.spawn(async move {
                    let r = tokio::task::spawn_blocking(move || local.run_subgraph(&sg, &inputs))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
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
                self.task_peer.insert(task, peer);
                // A random id on the wire: a worker cannot tell work from checks by numbering.
                let wire: u64 = rand::rng().random();
                self.task_wire.insert(task, wire);
                let node = self.node.clone();
                let memory = self.memory.clone();
                let verifier = self.verifier.clone();
                self.running.spawn(async move {
                    let r = remote(
                        &node, &memory, &verifier, peer, wire, &sg, inputs, held, timeout,
                    )
                    .await;
                    (task, r)
                });
            }
        }
    }

    /// Keeps what the next job can use: verified results, who holds what, measured speeds.
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
        if mem.held.len() > MAX_TABLE {
            mem.held.clear();
        }
        for (id, holders) in self.sched.held() {
            mem.held
                .entry(*id)
                .or_default()
                .extend(holders.iter().copied());
        }
        for (p, info) in self.sched.peers() {
            mem.measured.insert(
                *p,
                (
                    info.measured.then_some(info.flops),
                    info.link_measured.then_some(info.link),
                ),
            );
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

/// Content ids of `inputs` (values `ids`), hashing only those not seen before.
fn content_ids(memory: &Mutex<Memory>, ids: &[ValueId], inputs: &[Arc<Data>]) -> Vec<ContentId> {
    let known: Vec<Option<ContentId>> = {
        let mem = lock(memory);
        ids.iter().map(|id| mem.cids.get(id).copied()).collect()
    };
    let cids: Vec<ContentId> = known
        .iter()
        .zip(inputs)
        .map(|(k, t)| k.unwrap_or_else(|| t.content_id()))
        .collect();
    let mut mem = lock(memory);
    if mem.cids.len() > MAX_TABLE {
        mem.cids.clear();
    }
    for (id, c) in ids.iter().zip(&cids) {
        mem.cids.insert(*id, *c);
    }
    cids
}

/// Sends a task, waits for the answer within `timeout`, and checks it.
#[allow(clippy::too_many_arguments)]
async fn remote(
    node: &NodeClient,
    memory: &Arc<Mutex<Memory>>,
    verifier: &Arc<Verifier>,
    peer: PeerId,
    wire_task: u64,
    sg: &Subgraph,
    inputs: Vec<Arc<Data>>,
    held: Vec<bool>,
    timeout: Duration,
) -> Result<Accepted, Refusal> {
    let nonce: [u8; 16] = rand::rng().random();
    let sent = Instant::now();
    let send = |held: &[bool]| {
        let data = inputs
            .iter()
            .zip(held)
            .map(|(t, &h)| {
                if h {
                    Input::Held
                } else {
                    Input::Data(t.clone())
                }
            })
            .collect();
        TaskRequest::new(wire_task, nonce, sg, data)
    };
    let used_held = std::sync::atomic::AtomicBool::new(held.iter().any(|&h| h));
    let ask = async {
        let mut response = node.run_task(peer, send(&held)).await;
        if let Ok(TaskResponse::Missing { .. }) = &response {
            // The worker evicted a value: send everything.
            used_held.store(false, std::sync::atomic::Ordering::Relaxed);
            response = node.run_task(peer, send(&vec![false; inputs.len()])).await;
        }
        response
    };
    // The inputs' content ids (for the receipt) are hashed while the worker computes.
    let hashing = {
        let (memory, ids, inputs) = (memory.clone(), sg.input_ids.clone(), inputs.clone());
        tokio::task::spawn_blocking(move || {
            let clock = trust::Stopwatch::start();
            (content_ids(&memory, &ids, &inputs), clock.secs())
        })
    };
    let response = match tokio::time::timeout(timeout, ask).await {
        Err(_) => {
            return Err(Refusal::Failed(format!(
                "no answer within {:.1} s",
                timeout.as_secs_f64()
            )));
        }
        Ok(Err(NodeError::Remote { error, .. })) => {
            return Err(Refusal::Failed(format!("{UNREACHABLE}{error}")));
        }
        Ok(Err(e)) => return Err(Refusal::Failed(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let elapsed_secs = sent.elapsed().as_secs_f64();
    let (outputs, compute_micros, receipt, signature, signer) = match response {
        TaskResponse::Done {
            outputs,
            compute_micros,
            receipt,
            signature,
            signer,
            ..
        } => (outputs, compute_micros, receipt, signature, signer),
        TaskResponse::Failed { error, .. } => return Err(Refusal::Failed(error.to_string())),
        TaskResponse::Missing { inputs, .. } => {
            return Err(Refusal::Failed(format!(
                "the worker lacks inputs {inputs:?} even when sent"
            )));
        }
    };
    let (input_cids, hash_secs) = hashing
        .await
        .map_err(|e| Refusal::Failed(format!("hashing panicked: {e}")))?;
    let used_held = used_held.into_inner();
    let memory = memory.clone();
    let verifier = verifier.clone();
    let sg = sg.clone();
    tokio::task::spawn_blocking(move || {
        let clock = trust::Stopwatch::start();
        check_shapes(&sg, &outputs).map_err(Refusal::Failed)?;
        let cids: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        let opened = trust::open_receipt(
            &peer,
            &signer,
            &signature,
            &receipt,
            &trust::Expected {
                task: &trust::key_of(&sg, &input_cids),
                nonce: &nonce,
                outputs: &cids,
                program: &sg.program,
            },
        );
        if let Err(Refusal::Cheated { reason, evidence }) = &opened
            && reason == trust::OTHER_INPUTS
            && used_held
        {
            // It ran on values it held, which differ from what we meant: stale, not proof.
            let mut mem = lock(&memory);
            for (id, h) in sg.input_ids.iter().zip(&held) {
                if *h && let Some(holders) = mem.held.get_mut(id) {
                    holders.remove(&peer);
                }
            }
            return Err(Refusal::Failed(format!(
                "the worker's held inputs were stale ({evidence})"
            )));
        }
        opened?;
        let check = verifier.check(&sg, &inputs, &input_cids, &outputs, &receipt.class)?;
        Ok(Accepted {
            outputs,
            cids,
            op_hashes: receipt.op_hashes,
            class: receipt.class,
            check: Some(check),
            verify_secs: clock.secs() + hash_secs,
            compute_secs: Some(compute_micros as f64 / 1e6),
            elapsed_secs,
        })
    })
    .await
    .map_err(|e| Refusal::Failed(format!("verification panicked: {e}")))?
}

/// Runs the replica and, if it disagrees with `first`, settles the dispute locally.
#[allow(clippy::too_many_arguments)]
async fn replica_verdict(
    node: NodeClient,
    memory: Arc<Mutex<Memory>>,
    verifier: Arc<Verifier>,
    local: Arc<LocalExecutor>,
    peer: PeerId,
    sg: Subgraph,
    inputs: Vec<Arc<Data>>,
    first: Arc<Accepted>,
) -> Replica {
    let nonce: [u8; 16] = rand::rng().random();
    let req = TaskRequest::new(
        rand::rng().random(),
        nonce,
        &sg,
        inputs.iter().map(|t| Input::Data(t.clone())).collect(),
    );
    // As long as a task's deadline would be, from the primary's round trip.
    let timeout = Duration::from_secs_f64(2.0 + 4.0 * first.elapsed_secs);
    let (outputs, receipt, signature, signer) =
        match tokio::time::timeout(timeout, node.run_task(peer, req)).await {
            Ok(Ok(TaskResponse::Done {
                outputs,
                receipt,
                signature,
                signer,
                ..
            })) => (outputs, receipt, signature, signer),
            Ok(Ok(other)) => return Replica::Unusable(format!("{other:?}")),
            Ok(Err(e)) => return Replica::Unusable(e.to_string()),
            Err(_) => return Replica::Unusable("timed out".into()),
        };
    tokio::task::spawn_blocking(move || {
        if let Err(e) = check_shapes(&sg, &outputs) {
            return Replica::Unusable(e);
        }
        let input_cids = content_ids(&memory, &sg.input_ids, &inputs);
        let cids: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        if let Err(r) = trust::open_receipt(
            &peer,
            &signer,
            &signature,
            &receipt,
            &trust::Expected {
                task: &trust::key_of(&sg, &input_cids),
                nonce: &nonce,
                outputs: &cids,
                program: &sg.program,
            },
        ) {
            return Replica::Cheated(r);
        }
        if cids == first.cids {
            return Replica::Agreed;
        }
        // Different classes agree within tolerance.
        if receipt.class != first.class {
            let tol = corvid_kernels::verify::program_tolerance(&sg.program);
            let close =
                outputs
                    .iter()
                    .zip(&first.outputs)
                    .all(|(a, b)| match (a.as_f32(), b.as_f32()) {
                        (Ok(x), Ok(y)) => x.iter().zip(y).all(|(p, q)| tol.accepts(*p, *q)),
                        _ => a == b,
                    });
            if close {
                return Replica::Agreed;
            }
        }
        dispute(&verifier, &local, &sg, &inputs, &first, &outputs, &receipt)
    })
    .await
    .unwrap_or_else(|e| Replica::Unusable(format!("dispute panicked: {e}")))
}

/// Two signed results disagree: decide here who is wrong.
///
/// When both workers and this requester share a determinism class, their per-op hashes are
/// comparable bit for bit: the first op where the two receipts differ is recomputed here (with
/// only the ops it depends on) and whoever's hash for it differs from ours is wrong there. If
/// only the replica is, the primary's result — already accepted, and not vouched for by the
/// replica's lie — is then recomputed in full. Otherwise (classes differ, or the receipts agree
/// op by op but not on the outputs) the whole subgraph is recomputed and each result compared
/// with it, exactly within a class and within tolerance across classes. A failure to compute
/// here decides nothing.
fn dispute(
    verifier: &Verifier,
    local: &LocalExecutor,
    sg: &Subgraph,
    inputs: &[Arc<Data>],
    first: &Accepted,
    second: &[Arc<Data>],
    receipt: &Receipt,
) -> Replica {
    let mine = local.backend().class().id();
    let name = |k: usize| format!("op {k} ({})", sg.program.nodes[k].op);
    let first_differing = first
        .op_hashes
        .iter()
        .zip(&receipt.op_hashes)
        .position(|(a, b)| a != b);
    let full = || FullRecompute::new(verifier, local, sg, inputs);
    if first.class == mine
        && receipt.class == mine
        && let Some(k) = first_differing
        && let Some((cone, kept)) = sg.program.cone(k)
        && let Ok((_, hashes)) = local
            .backend()
            .run_traced(&cone, inputs, &local.backend().guard())
    {
        // Both receipts were opened against this program: one hash per op.
        let judge = |claimed: &[ContentId]| {
            kept.iter()
                .zip(&hashes)
                .find(|&(&i, h)| claimed.get(i) != Some(h))
                .map(|(&i, _)| {
                    format!(
                        "subgraph {}: {} differs from a local recompute of that op ({} of {} \
                         ops recomputed)",
                        sg.id.short(),
                        name(i),
                        kept.len(),
                        sg.program.nodes.len()
                    )
                })
        };
        let mut primary_wrong = judge(&first.op_hashes);
        let replica_wrong = judge(&receipt.op_hashes);
        if primary_wrong.is_none() && replica_wrong.is_some() {
            match full().judge(&first.outputs, &first.op_hashes, &first.class) {
                Ok(verdict) => primary_wrong = verdict,
                Err(why) => tracing::warn!(%why, "could not recompute the primary's result"),
            }
        }
        tracing::warn!(subgraph = %sg.id.short(), op = %name(k), ?primary_wrong, ?replica_wrong,
            "replicas disagree; recomputed the first op that differs");
        return Replica::Dispute {
            primary_wrong,
            replica_wrong,
        };
    }
    let full = full();
    let verdicts = full
        .judge(&first.outputs, &first.op_hashes, &first.class)
        .and_then(|p| Ok((p, full.judge(second, &receipt.op_hashes, &receipt.class)?)));
    match verdicts {
        Ok((primary_wrong, replica_wrong)) => {
            tracing::warn!(subgraph = %sg.id.short(), ?primary_wrong, ?replica_wrong,
                "replicas disagree; recomputed the subgraph");
            Replica::Dispute {
                primary_wrong,
                replica_wrong,
            }
        }
        Err(why) => Replica::Unusable(format!("replicas disagree, undecided: {why}")),
    }
}

/// A whole subgraph recomputed here to judge results against (traced once, when a result of
/// this machine's class needs it).
struct FullRecompute<'a> {
    verifier: &'a Verifier,
    local: &'a LocalExecutor,
    sg: &'a Subgraph,
    inputs: &'a [Arc<Data>],
    here: std::cell::OnceCell<Result<Trace, String>>,
}

/// Content ids of a local run's outputs, and of every op's value.
type Trace = (Vec<ContentId>, Vec<ContentId>);

impl<'a> FullRecompute<'a> {
    fn new(
        verifier: &'a Verifier,
        local: &'a LocalExecutor,
        sg: &'a Subgraph,
        inputs: &'a [Arc<Data>],
    ) -> Self {
        FullRecompute {
            verifier,
            local,
            sg,
            inputs,
            here: std::cell::OnceCell::new(),
        }
    }

    /// `Some(evidence)` if the result is wrong, `None` if right; an error if this machine
    /// could not tell.
    fn judge(
        &self,
        outputs: &[Arc<Data>],
        op_hashes: &[ContentId],
        class: &[u8; 32],
    ) -> Result<Option<String>, String> {
        let sg = self.sg;
        if *class != self.local.backend().class().id() {
            // Another class: within tolerance of a recompute here.
            return Ok(self
                .verifier
                .recompute(sg, self.inputs, outputs, class)?
                .err()
                .map(|m| format!("subgraph {}: {m}", sg.id.short())));
        }
        // Same class: the outputs and every op's hash must be ours, bit for bit.
        let here = self.here.get_or_init(|| {
            self.local
                .backend()
                .run_traced(&sg.program, self.inputs, &self.local.backend().guard())
                .map(|(outs, hashes)| (outs.iter().map(Data::content_id).collect(), hashes))
                .map_err(|e| format!("subgraph {}: local recompute failed: {e}", sg.id.short()))
        });
        let (cids, hashes) = here.as_ref().map_err(Clone::clone)?;
        let got: Vec<ContentId> = outputs.iter().map(|t| t.content_id()).collect();
        if got == *cids && op_hashes == hashes.as_slice() {
            return Ok(None);
        }
        let at = hashes
            .iter()
            .zip(op_hashes)
            .position(|(a, b)| a != b)
            .map_or("its outputs".to_string(), |k| {
                format!("op {k} ({})", sg.program.nodes[k].op)
            });
        Ok(Some(format!(
            "subgraph {} first differs from a local recompute at {at}",
            sg.id.short()
        )))
    }
}

/// Probability that a trusted peer gets a canary in a job.
const CANARY_RATE: f64 = 0.1;

/// Largest job subgraph copied as a canary: flops and input bytes.
const CANARY_MAX_FLOPS: u64 = 200_000_000;
const CANARY_MAX_BYTES: u64 = 4 << 20;

/// A canary, as a subgraph with its inputs: where the job has a subgraph that reads only
/// constants and costs little, a copy of it that keeps the constants other subgraphs share
/// (weights, which workers may hold) and draws the rest afresh, uniform over each one's range
/// (so that signs, and with them the ops' domains, are kept), so that it runs the job's ops
/// on the job's shapes and weights; otherwise, or if nothing could be drawn afresh, `a @ b`
/// for fresh random 64×64 `a` and `b`.
fn canary(rng: &mut impl Rng, plan: &Plan) -> (Subgraph, Vec<Arc<Data>>) {
    use rand::seq::IndexedRandom;
    let like_work: Vec<&Subgraph> = plan
        .subgraphs
        .iter()
        .filter(|s| {
            (1..=CANARY_MAX_FLOPS).contains(&s.cost.flops)
                && s.cost.bytes_in <= CANARY_MAX_BYTES
                && s.inputs.iter().all(|i| matches!(i, Source::Leaf(_)))
        })
        .collect();
    if let Some(sg) = like_work.choose(rng) {
        let shared = |l: usize| {
            plan.subgraphs
                .iter()
                .filter(|s| s.inputs.contains(&Source::Leaf(l)))
                .count()
                > 1
        };
        let (mut inputs, mut ids) = (Vec::new(), Vec::new());
        for s in &sg.inputs {
            let Source::Leaf(l) = *s else {
                unreachable!("filtered above")
            };
            let leaf = &plan.leaves[l];
            let range = leaf.as_f32().ok().and_then(|v| {
                let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (lo.is_finite() && hi.is_finite() && lo < hi).then_some((lo, hi))
            });
            match range {
                Some((lo, hi)) if !shared(l) => {
                    let fresh = Data::random_uniform(leaf.shape().to_vec(), lo, hi, rng.random());
                    ids.push(fresh.content_id().into());
                    inputs.push(Arc::new(fresh));
                }
                _ => {
                    ids.push(plan.leaf_ids[l]);
                    inputs.push(leaf.clone());
                }
            }
        }
        if ids != sg.input_ids {
            return canary_subgraph(sg.program.clone(), inputs, ids, sg.cost);
        }
    }
    matmul_canary(rng)
}

/// `a @ b` for fresh random 64×64 `a` and `b`.
fn matmul_canary(rng: &mut impl Rng) -> (Subgraph, Vec<Arc<Data>>) {
    use corvid_kernels::{Op, Program, TensorMeta};
    let n = 64;
    let inputs: Vec<Arc<Data>> = (0..2)
        .map(|_| Arc::new(Data::random_uniform(vec![n, n], -1.0, 1.0, rng.random())))
        .collect();
    let program = Program::single(Op::MatMul, vec![TensorMeta::f32(vec![n, n]); 2]);
    let cost = corvid_sdk::Cost {
        flops: 2 * (n * n * n) as u64,
        bytes_in: 2 * (4 * n * n) as u64,
        bytes_out: (4 * n * n) as u64,
    };
    let ids = inputs.iter().map(|t| t.content_id().into()).collect();
    canary_subgraph(program, inputs, ids, cost)
}

/// A subgraph of `program` over `inputs` (with value ids `input_ids`), with the other ids
/// derived as the planner derives them.
fn canary_subgraph(
    program: corvid_kernels::Program,
    inputs: Vec<Arc<Data>>,
    input_ids: Vec<ValueId>,
    cost: corvid_sdk::Cost,
) -> (Subgraph, Vec<Arc<Data>>) {
    use corvid_sdk::ids::{op_value_id, subgraph_id};
    let mut ids = input_ids.clone();
    for node in &program.nodes {
        let args: Vec<ValueId> = node.args.iter().map(|&a| ids[a as usize]).collect();
        ids.push(op_value_id(&node.op, &args));
    }
    let sg = Subgraph {
        id: subgraph_id(&program.canonical_bytes(), &input_ids),
        output_ids: program.outputs.iter().map(|&o| ids[o as usize]).collect(),
        inputs: (0..inputs.len()).map(Source::Leaf).collect(),
        input_ids,
        cost,
        program,
    };
    (sg, inputs)
}

/// A canary ready to send, with the answer computed here.
struct Canary {
    sg: Subgraph,
    inputs: Vec<Arc<Data>>,
    want: Vec<Data>,
    /// The class of the machine that computed `want`.
    class: [u8; 32],
}

/// Runs a canary here. A copy whose answer is not finite (a moved input left an op's domain)
/// is swapped for the matmul canary, so that honest rounding of a NaN or an overflow never
/// decides a ban.
fn canary_answer(local: &LocalExecutor, sg: Subgraph, inputs: Vec<Arc<Data>>) -> Option<Canary> {
    let finite = |t: &Data| t.as_f32().map_or(true, |v| v.iter().all(|x| x.is_finite()));
    let run = |sg: &Subgraph, inputs: &[Arc<Data>]| {
        local
            .backend()
            .run_shared(&sg.program, inputs)
            .ok()
            .filter(|w| w.iter().all(finite))
    };
    let class = local.backend().class().id();
    if let Some(want) = run(&sg, &inputs) {
        return Some(Canary {
            sg,
            inputs,
            want,
            class,
        });
    }
    let (sg, inputs) = matmul_canary(&mut rand::rng());
    run(&sg, &inputs).map(|want| Canary {
        sg,
        inputs,
        want,
        class,
    })
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
fn check_shapes(sg: &Subgraph, outs: &[Arc<Data>]) -> Result<(), String> {
    let program = &sg.program;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rand::SeedableRng;

    /// A canary copies a cheap job subgraph that reads only constants: same program and input
    /// shapes, unshared inputs drawn afresh over their range, ids derived from them; a job with
    /// no such subgraph gets the 64×64 matmul.
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

    #[test]
    fn canaries_look_like_the_jobs_work() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let g = corvid_sdk::Graph::new("canary");
        let y = (g
            .random(&[64, 32], 0.5, 1.5, 1)
            .matmul(&g.random(&[32, 16], 0.5, 1.5, 2))
            .unwrap()
            .log()
            .unwrap())
        .sum(&[1], false)
        .unwrap();
        let plan = g.plan(&[&y]).unwrap();
        let (sg, inputs) = canary(&mut rng, &plan);
        let twin = plan
            .subgraphs
            .iter()
            .find(|s| s.program == sg.program)
            .expect("a copy of one of the job's subgraphs");
        assert_ne!(sg.id, twin.id, "fresh inputs make a new task");
        assert_eq!(sg.cost, twin.cost);
        assert_eq!(sg.output_ids.len(), twin.output_ids.len());
        for (k, t) in inputs.iter().enumerate() {
            let Source::Leaf(l) = twin.inputs[k] else {
                panic!("copied a subgraph that reads results")
            };
            let leaf = &plan.leaves[l];
            assert_eq!(t.meta(), leaf.meta());
            // Used by this subgraph only: drawn afresh over the leaf's range.
            assert_ne!(t.content_id(), leaf.content_id());
            assert_ne!(sg.input_ids[k], twin.input_ids[k]);
            let (a, b) = (t.as_f32().unwrap(), leaf.as_f32().unwrap());
            let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(a.iter().all(|x| (lo..=hi).contains(x)));
        }
        // Its outputs' value ids follow from the new inputs: none collides with the job's.
        assert!(sg.output_ids.iter().all(|id| !twin.output_ids.contains(id)));

        // A weight that two subgraphs share is kept (by its id: workers may hold it).
        let g = corvid_sdk::Graph::new("shared");
        let w = g.random(&[32, 16], -1.0, 1.0, 3);
        let y1 = g.random(&[8, 32], -1.0, 1.0, 4).matmul(&w).unwrap();
        let y2 = g.random(&[8, 32], -1.0, 1.0, 5).matmul(&w).unwrap();
        let plan = g.plan(&[&y1, &y2]).unwrap();
        assert_eq!(plan.subgraphs.len(), 2, "{}", plan.describe());
        let (sg, inputs) = canary(&mut rng, &plan);
        let twin = plan
            .subgraphs
            .iter()
            .find(|s| s.program == sg.program && s.input_ids[1] == sg.input_ids[1])
            .expect("a copy that keeps the shared weight");
        assert_ne!(sg.input_ids[0], twin.input_ids[0]);
        let Source::Leaf(l) = twin.inputs[1] else {
            panic!("copied a subgraph that reads results")
        };
        assert_eq!(inputs[1].content_id(), plan.leaves[l].content_id());

        let big = corvid_sdk::Graph::new("big");
        let y = big
            .random(&[1024, 1024], -1.0, 1.0, 1)
            .matmul(&big.random(&[1024, 1024], -1.0, 1.0, 2))
            .unwrap();
        let (sg, inputs) = canary(&mut rng, &big.plan(&[&y]).unwrap());
        assert_eq!(sg.program.nodes.len(), 1);
        assert_eq!(sg.program.nodes[0].op, corvid_kernels::Op::MatMul);
        assert_eq!(inputs[0].shape(), &[64, 64]);
    }
}
