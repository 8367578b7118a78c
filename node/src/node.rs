//! [`Node::spawn`]: identity, benchmark, swarm, control endpoint, event loop; and the
//! [`NodeHandle`] everything else uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::advert::{ADVERT_VERSION, Advert};
use crate::bench::BenchReport;
use crate::config::NodeConfig;
use crate::control;
use crate::identity::load_keypair;
use crate::limits::Limits;
use crate::net::event_loop::{EventLoop, Extras, WorkQueues};
use crate::net::{NetError, build_swarm};
use crate::peers::PeerInfo;
pub use crate::peers::PeerPath;

// Their own files now (so control and the event loop need not import this one); the paths
// `crate::node::…` keep working.
pub use crate::error::NodeError;
pub use crate::node_client::NodeClient;
pub use crate::status::{
    BootstrapStatus, ExecutorStatus, HolePunches, PauseCause, Reachability, Status, bootstrap_line,
};

/// Commands queued for the event loop at most.
const COMMAND_QUEUE: usize = 64;
/// Cancels of tasks queued for the worker at most (more are dropped: the task then runs to
/// its deadline).
const CANCEL_QUEUE: usize = 256;
/// Tasks turned away busy whose data waits for the worker to keep it.
const KEEP_QUEUE: usize = 64;
/// Answers the worker has ready for the event loop at most (the worker then waits).
const FINISHED_QUEUE: usize = 64;
/// How often a stopping node checks whether its tasks are done.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Listeners must report an address within this.
const LISTEN_DEADLINE: Duration = Duration::from_secs(5);
/// After the first address of each listener, further addresses are awaited this long.
const MORE_ADDRS_WAIT: Duration = Duration::from_millis(50);

/// Starts nodes: see [`Node::spawn`].
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Starts a node: loads its identity, benchmarks its backend, starts listening, then runs
    /// the event loop and control endpoint until `shutdown` is cancelled. Returns once listening.
    pub async fn spawn(
        config: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<NodeHandle, NodeError> {
        config.validate()?;
        let key = load_keypair(&config.identity)?;
        let peer_id = key.public().to_peer_id();
        let span = tracing::info_span!("node", id = %short_id(&peer_id));
        async move {
            let (bench, backend) = benchmark(&config).await?;
            let limits = Limits::derive(
                bench.memory_bytes,
                config.slots,
                bench.max_tensor_bytes,
                bench.matmul_gflops,
                bench.elementwise_gbps,
                config.timing.max_task_time,
            );
            let advert = Advert {
                version: ADVERT_VERSION,
                peer_id: peer_id.to_bytes(),
                timestamp_ms: 0,
                seq: 0,
                backend: bench.backend,
                adapter: bench.adapter.clone(),
                class: bench.class.clone(),
                matmul_gflops: bench.matmul_gflops as f32,
                elementwise_gbps: bench.elementwise_gbps as f32,
                memory_bytes: bench.memory_bytes,
                max_tensor_bytes: bench.max_tensor_bytes,
                slots_total: if config.contribute { config.slots } else { 0 },
                slots_free: if config.contribute { config.slots } else { 0 },
                contributes: config.contribute,
                task_budget: limits.task.clone(),
                addrs: config.nat.external.iter().take(crate::advert::MAX_ADDRS).map(ToString::to_string).collect(),
            };
            #[cfg(feature = "fault-injection")]
            let advert = Advert {
                matmul_gflops: crate::worker::faults::advertised_gflops(advert.matmul_gflops, config.fault),
                class: crate::worker::faults::advertised_class(advert.class, config.fault),
                ..advert
            };
            let codec = if config.contribute {
                // A peer's request that stops arriving gives its room back.
                crate::net::task::TaskCodec::worker(
                    limits.inbound_bytes,
                    matches!(config.executor, crate::config::ExecutorMode::Process { .. }),
                )
                .with_stall(config.timing.dial_timeout)
            } else {
                crate::net::task::TaskCodec::default()
            };
            let answers = codec.answers();
            let mut registry = prometheus_client::registry::Registry::default();
            let mut swarm = build_swarm(&key, &config, codec, &mut registry)?;
            let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
            let node_metrics = crate::metrics::NodeMetrics::default();
            let metrics_handle = node_metrics.clone();
            node_metrics.register(registry.sub_registry_with_prefix("corvid"));
            node_metrics.memory_cap_bytes.set(
                i64::try_from(limits.memory).unwrap_or(i64::MAX),
            );
            let registry = std::sync::Arc::new(registry);
            let listen_addrs = listen(&mut swarm, &config.listen).await?;
            // Addresses the operator vouches for (a forwarded port): no probe needed.
            for addr in &config.nat.external {
                swarm.add_external_address(addr.clone());
            }

            let cancel = shutdown.child_token();
            let mut worker_task = None;
            #[cfg(target_os = "linux")]
            let mut probe: Option<crate::sandbox::Probe> = None;
            let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
            let client = NodeClient::new(tx);
            let (control_addr, control_task) =
                control::serve(
                    config.control,
                    client.clone(),
                    control::Scrape {
                        registry,
                        node: node_metrics.clone(),
                    },
                    control::new_token(
                        config
                            .data_dir
                            .as_ref()
                            .map(|d| d.join(crate::config::TOKEN_FILE))
                            .as_deref(),
                    ),
                    cancel.clone(),
                )
                .await?;
            let control_file = config.control_file();
            if let Some(path) = &control_file
                && let Err(e) = std::fs::write(path, format!("{control_addr}\n"))
            {
                tracing::warn!(path = %path.display(), error = %e, "could not write the control address");
            }
            let psk_path = config.psk.as_ref().map(|p| p.path.clone());
            let line = bootstrap_line(&listen_addrs, &peer_id, psk_path.as_deref());
            tracing::info!(%peer_id, addrs = ?listen_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                control = %control_addr, gflops = advert.matmul_gflops, gbps = advert.elementwise_gbps,
                adapter = %advert.adapter, "node started");
            tracing::info!("status page http://{control_addr}/");
            // Said again, for peers outside this network, once peers have shown they can
            // reach this node (directly or through a relay).
            if let Some(line) = &line {
                tracing::info!("others on this network join with:  {line}");
            }
            // The worker: tasks from peers run on this node's backend, `slots` at a time.
            let work = if config.contribute {
                let slots = config.slots as usize;
                tracing::info!(memory = %bytesize::ByteSize(limits.memory).display().iec(),
                    task_memory = %bytesize::ByteSize(limits.task.max_peak_bytes).display().iec(),
                    task_tensor = %bytesize::ByteSize(limits.task.max_tensor_bytes).display().iec(),
                    task_gflop = limits.task.max_flops as f64 / 1e9,
                    max_task_time = %humantime::format_duration(limits.max_task_time),
                    "limits on every task from a peer");
                // Room for a requester's queued tasks (small ones queue deeper: see
                // `SchedConfig::small_queue_depth`) plus its checks (canaries, replicas).
                let (work_tx, work_rx) = mpsc::channel(2 * slots.max(1) + 16);
                let (cancel_tx, cancel_rx) = mpsc::channel(CANCEL_QUEUE);
                let (keep_tx, keep_rx) = mpsc::channel(KEEP_QUEUE);
                let (finished_tx, finished_rx) = mpsc::channel(FINISHED_QUEUE);
                let engine = engine(&config, &limits, &bench, backend).await?;
                #[cfg(target_os = "linux")]
                if let crate::worker::Engine::Sandboxed { sandbox, .. } = &engine {
                    probe = Some(sandbox.probe());
                }
                let worker = crate::worker::Worker::new(
                    work_rx,
                    cancel_rx,
                    keep_rx,
                    finished_tx,
                    engine,
                    key.clone(),
                    limits.clone(),
                );
                #[cfg(feature = "fault-injection")]
                let worker = worker.with_fault(config.fault);
                let worker = crate::worker::run(worker, cancel.clone());
                worker_task = Some(tokio::spawn(worker.in_current_span()));
                Some(WorkQueues {
                    tasks: work_tx,
                    cancels: cancel_tx,
                    keeps: keep_tx,
                    finished: finished_rx,
                })
            } else {
                None
            };
            let event_loop = EventLoop::new(
                swarm,
                rx,
                key,
                advert,
                config.timing.clone(),
                psk_path,
                &config.bootstrap,
                listen_addrs.clone(),
                work,
                Extras {
                    limits: config.contribute.then(|| limits.clone()),
                    #[cfg(target_os = "linux")]
                    executor: probe,
                    answers,
                    metrics: node_metrics,
                    libp2p_metrics,
                    caps: crate::status::Caps {
                        cpus: config.cpus,
                        pause_when_busy: config.pause.when_busy,
                        pause_on_battery: config.pause.on_battery,
                    },
                    ledger: crate::tally::Ledger::open(
                        config.data_dir.as_ref().map(|d| d.join(crate::tally::TALLY_FILE)),
                    ),
                },
            );
            let task = tokio::spawn(event_loop.run(cancel.clone()).in_current_span());
            let mut tasks = vec![task, control_task];
            tasks.extend(worker_task);
            if config.contribute && !config.pause.is_empty() {
                let rules = crate::rules::watch(config.pause.clone(), client.clone(), cancel.clone());
                tasks.push(tokio::spawn(rules.in_current_span()));
            }
            Ok(NodeHandle {
                client,
                peer_id,
                listen_addrs,
                bootstrap_line: line,
                control_addr,
                control_file,
                bench,
                limits,
                metrics: metrics_handle,
                cancel,
                tasks,
            })
        }
        .instrument(span)
        .await
    }
}

/// Opens the backend and benchmarks it; the backend then serves tasks.
async fn benchmark(
    config: &NodeConfig,
) -> Result<(BenchReport, corvid_kernels::Backend), NodeError> {
    let choice = config.backend;
    let budget = config.timing.bench_budget;
    let max_memory = config.max_memory;
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _g = span.enter();
        let backend = corvid_kernels::Backend::open(choice)
            .map_err(|source| NodeError::Backend { choice, source })?;
        let report = crate::bench::run_once(&backend, choice, budget, max_memory)?;
        tracing::info!(matmul_gflops = report.matmul_gflops, matmul_n = report.matmul_n,
            elementwise_gbps = report.elementwise_gbps, took = ?report.took, "benchmark done");
        Ok((report, backend))
    })
    .await
    .map_err(|e| NodeError::Task(e.to_string()))?
}

/// Address space an executor process needs beyond the memory it is given: code, thread
/// stacks, allocator arenas, gemm's buffers.
const EXECUTOR_BASE_ADDRESS_SPACE: u64 = 2 << 30;

/// Where this worker will run peers' tasks: the confined executor process (started here, and
/// its protections logged), or `backend` in this process.
async fn engine(
    config: &NodeConfig,
    limits: &Limits,
    bench: &BenchReport,
    backend: corvid_kernels::Backend,
) -> Result<crate::worker::Engine, NodeError> {
    use crate::config::ExecutorMode;
    let program = match &config.executor {
        ExecutorMode::InProcess => {
            tracing::warn!(
                "peers' tasks run inside the node process (no executor process, no sandbox)"
            );
            return Ok(crate::worker::Engine::InProcess(backend));
        }
        ExecutorMode::Process { program } => program.clone(),
    };
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (program, limits, bench);
        tracing::warn!("no executor process on this platform: peers' tasks run inside the node");
        Ok(crate::worker::Engine::InProcess(backend))
    }
    #[cfg(target_os = "linux")]
    {
        use crate::sandbox::{Sandbox, SandboxConfig, child::DEFAULT_CPU_SECONDS, confine};
        let choice = match bench.backend {
            corvid_kernels::BackendKind::Cpu => corvid_kernels::BackendChoice::Cpu,
            corvid_kernels::BackendKind::Gpu => corvid_kernels::BackendChoice::Gpu,
        };
        // The executor opens its own.
        drop(backend);
        let mut forbid: Vec<std::path::PathBuf> = Vec::new();
        if let crate::identity::IdentitySource::File(p) = &config.identity {
            forbid.push(p.clone());
        }
        forbid.extend(config.data_dir.iter().cloned());
        forbid.extend(config.psk.iter().map(|p| p.path.clone()));
        for f in &forbid {
            if confine::under_read_roots(f) {
                tracing::warn!(path = %f.display(), "under a system directory the executor may read:                     move the data directory (--data-dir) to keep it from the executor");
            }
        }
        let cfg = SandboxConfig {
            program,
            backend: choice,
            address_space: Some(limits.memory / 2 + EXECUTOR_BASE_ADDRESS_SPACE),
            cpu_seconds: DEFAULT_CPU_SECONDS,
            forbid,
            threads: config.slots as usize,
            cpus: config.cpus,
            #[cfg(feature = "fault-injection")]
            crash_every: crate::worker::faults::crash_every(config.fault),
        };
        crate::sandbox::shm::set_pool_bytes(limits.inbound_bytes);
        // Every shared tensor holds a descriptor or two: take what the system allows.
        raise_open_files();
        let (sandbox, ready) = tokio::task::spawn_blocking(move || Sandbox::start(cfg))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))?
            .map_err(|e| NodeError::Executor(e.to_string()))?;
        if ready.class != bench.class {
            tracing::warn!(executor = %ready.class, benchmarked = %bench.class,
                "the executor's determinism class differs from the benchmarked one");
        }
        let c = &ready.confinement;
        tracing::info!(pid = sandbox.pid(), backend = %ready.backend, landlock = %c.landlock,
            seccomp = c.seccomp, address_space = ?c.address_space.map(|b| bytesize::ByteSize(b).display().iec().to_string()),
            cpu_seconds = ?c.cpu_seconds, "peers' tasks run in a confined executor process");
        if !c.forbidden_readable.is_empty() {
            tracing::warn!(files = ?c.forbidden_readable, "the executor can read files it should not");
        }
        if !c.seccomp || c.landlock != crate::sandbox::proto::Landlock::FullyEnforced {
            tracing::warn!(landlock = %c.landlock, seccomp = c.seccomp,
                "the executor is only partly confined on this system");
        }
        Ok(crate::worker::Engine::Sandboxed {
            sandbox,
            class: ready.class,
        })
    }
}

/// Raises this process's open-file limit to its hard limit.
#[cfg(target_os = "linux")]
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // The kernel caps descriptors at nr_open (2^20 by default) whatever the limit says.
    let want = maximum.unwrap_or(1 << 20).min(1 << 20);
    if current.is_some_and(|c| c < want) {
        let raised = Rlimit {
            current: Some(want),
            maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(from = ?current, to = want, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
}

/// Starts every listener and waits until each reports its address.
async fn listen(
    swarm: &mut libp2p::Swarm<crate::net::Behaviour>,
    addrs: &[Multiaddr],
) -> Result<Vec<Multiaddr>, NodeError> {
    let mut waiting = Vec::new();
    for addr in addrs {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        waiting.push((id, addr.clone()));
    }
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + LISTEN_DEADLINE;
    while !waiting.is_empty() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .map_err(|_| NetError::Listen {
                addr: waiting[0].1.clone(),
                reason: "no address reported in time".into(),
            })?;
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                waiting.retain(|(id, _)| *id != listener_id);
                out.push(address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some((_, addr)) = waiting.iter().find(|(id, _)| *id == listener_id) {
                    return Err(NetError::Listen {
                        addr: addr.clone(),
                        reason: format!("{reason:?}"),
                    }
                    .into());
                }
            }
            _ => {}
        }
    }
    // A listener on 0.0.0.0 reports one address per interface in quick succession: collect
    // them so the bootstrap line can name a routable one.
    for _ in 0..64 {
        match tokio::time::timeout(MORE_ADDRS_WAIT, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => out.push(address),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The first 8 and last 6 characters of a peer id.
pub fn short_id(peer: &PeerId) -> String {
    let s = peer.to_string();
    if s.len() > 16 {
        format!("{}…{}", &s[..8], &s[s.len() - 6..])
    } else {
        s
    }
}

/// The handle of a running node: ask it things, then [`NodeHandle::shutdown`] and
/// [`NodeHandle::join`].
#[derive(Debug)]
pub struct NodeHandle {
    client: NodeClient,
    peer_id: PeerId,
    listen_addrs: Vec<Multiaddr>,
    bootstrap_line: Option<String>,
    control_addr: SocketAddr,
    control_file: Option<PathBuf>,
    bench: BenchReport,
    limits: Limits,
    metrics: crate::metrics::NodeMetrics,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the node listened on at start.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// The first listen address with `/p2p/<peer id>`: what others pass to `--bootstrap`.
    pub fn bootstrap_addr(&self) -> Multiaddr {
        let mut a = self
            .listen_addrs
            .first()
            .cloned()
            .unwrap_or_else(Multiaddr::empty);
        a.push(Protocol::P2p(self.peer_id));
        a
    }

    /// The ready-to-copy `corvid node --bootstrap …` line.
    pub fn bootstrap_line(&self) -> Option<&str> {
        self.bootstrap_line.as_deref()
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The start-up benchmark.
    pub fn bench(&self) -> &BenchReport {
        &self.bench
    }

    /// What one task from a peer may use here.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The node's own series, shared with `GET /metrics`.
    pub(crate) fn metrics(&self) -> &crate::metrics::NodeMetrics {
        &self.metrics
    }

    pub fn client(&self) -> NodeClient {
        self.client.clone()
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.client.peers().await
    }

    pub async fn status(&self) -> Result<Status, NodeError> {
        self.client.status().await
    }

    /// Asks the node to stop; [`NodeHandle::join`] waits for it.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Stops the node gracefully: it takes no new task (advertising no free slot), the tasks
    /// it holds run and are answered for up to `grace`, then it stops; tasks still held then
    /// go back to their requesters (whose connections close, so they place them elsewhere).
    /// Returns how many were handed back.
    pub async fn stop(self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        let reason = "stopping: running tasks finish, no new ones".to_string();
        let mut left = 0;
        if self
            .client
            .set_pause(PauseCause::Stopping, Some(reason))
            .await
            .is_ok()
        {
            loop {
                left = match self.client.status().await {
                    Ok(s) => s.tasks_in_hand,
                    Err(_) => 0,
                };
                if left == 0 || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(STOP_POLL).await;
            }
        }
        if left > 0 {
            tracing::warn!(tasks = left, grace = %humantime::format_duration(grace), "tasks not done in time go back to their requesters");
        }
        self.join().await;
        left
    }

    /// Stops the node and waits until its tasks have ended.
    pub async fn join(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "node task ended abnormally");
            }
        }
        if let Some(path) = &self.control_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Dropping the handle stops the node (the control endpoint's client would otherwise keep the
/// event loop's inbox open).
impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
