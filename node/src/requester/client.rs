//! The public client: an embedded swarm (`Client::local`) or a requester joining a real one
//! (`Client::connect`, `Client::builder`), its runtime, and what it waits for before a job.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::{Backend, BackendChoice};
use corvid_sdk::plan::Settings;
use corvid_sdk::sched::SchedConfig;
use corvid_sdk::{Executor, LocalExecutor, ResultCache};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio_util::sync::CancellationToken;

use crate::NodeConfig;
use crate::config::{ConfigError, ExecutorMode, IdentitySource, Timing};
use crate::identity::Psk;
use crate::node::{Node, NodeError, NodeHandle};
use crate::status::is_loopback;
use crate::trust::{self, BanFileError, Trust};

use super::*;

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
            let config = |i: usize, bootstrap: Option<&NodeHandle>| {
                let mut c = NodeConfig::for_test(1000 + i as u64);
                c.slots = 1;
                c.bootstrap = bootstrap
                    .map(|b| vec![b.bootstrap_addr()])
                    .unwrap_or_default();
                tweak(i, &mut c);
                c
            };
            // The first worker, then the others and the requester together, all joining
            // through the first (they share its benchmark: see `bench::run_once`).
            let mut workers: Vec<NodeHandle> = Vec::with_capacity(n);
            if n > 0 {
                workers.push(Node::spawn(config(0, None), shutdown.clone()).await?);
            }
            let first = workers.first();
            let others = futures::future::try_join_all(
                (1..n).map(|i| Node::spawn(config(i, first), shutdown.clone())),
            );
            let mut c = NodeConfig::for_test(999);
            c.contribute = false;
            c.bootstrap = first.map(|w| vec![w.bootstrap_addr()]).unwrap_or_default();
            let (others, requester) =
                futures::future::try_join(others, Node::spawn(c, shutdown.clone())).await?;
            workers.extend(others);
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
            // Nothing cached by subgraph id: a value a worker sent may yet be proved wrong
            // and computed again under the same id (verified results are cached by job).
            local: Arc::new(LocalExecutor::new(local).without_cache()),
            settings: Mutex::new(Settings::default()),
            sched,
            last: Arc::new(Mutex::new(None)),
            memory: Arc::new(Mutex::new(Memory::default())),
            cids: Arc::default(),
            trust: Arc::new(Mutex::new(trust)),
            checks: std::sync::atomic::AtomicBool::new(true),
            metrics: requester.metrics().clone(),
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
            cpus: None,
            control: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            max_connections: 128,
            timing: self.timing.clone(),
            executor: ExecutorMode::InProcess,
            // A requester only dials out: it relays for nobody and maps no port.
            nat: crate::config::NatConfig {
                relay: None,
                upnp: false,
                external: Vec::new(),
            },
            pause: crate::rules::PauseRules::none(),
            #[cfg(feature = "fault-injection")]
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

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("corvid-client")
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}
