//! The `corvid` command line: clap definitions and one function per subcommand.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use corvid_kernels::{Backend, BackendChoice};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bench::{self, BenchError, BenchReport};
use crate::config::{ConfigError, NodeArgs, NodeConfig, Timing, default_data_dir};
use crate::control::{self, ControlError};
use crate::identity::IdentitySource;
use crate::identity::{IdentityError, Psk, load_keypair};
use crate::node::{Node, NodeError, short_id};
use crate::peers::PeerInfo;
use crate::status::{Reachability, Status, bootstrap_line, dialable, interface_ips, printable};

/// Corvid: a peer-to-peer volunteer compute network.
#[derive(Debug, Parser)]
#[command(name = "corvid", version, propagate_version = true)]
pub struct Cli {
    /// Log filter, e.g. "info" or "corvid_node=debug,libp2p=info"
    #[arg(long, env = "CORVID_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node in the foreground
    Node(NodeArgs),
    /// Run the benchmark and print the scores
    Bench {
        /// Backend: auto, gpu or cpu
        #[arg(long, env = "CORVID_BACKEND", default_value = "auto")]
        backend: String,
        /// Time allowed
        #[arg(long, default_value = "2s")]
        budget: humantime::Duration,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the peer id and the bootstrap address others should use
    Id {
        #[command(flatten)]
        node: NodeArgs,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List the peers a running local node knows
    Peers {
        #[command(flatten)]
        target: ControlArgs,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Summarise a running local node: its state, scores, reachability and peers
    Status {
        #[command(flatten)]
        target: ControlArgs,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop taking tasks from peers (running ones finish) until `corvid resume`
    Pause {
        #[command(flatten)]
        target: ControlArgs,
        /// Why, shown in the node's status and log
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take tasks from peers again after `corvid pause`
    Resume {
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Run the node in the background: a systemd user service that starts with your session
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Show the resolved configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Private-network keys
    #[command(subcommand)]
    Psk(PskCommand),
    /// Print shell completions
    Completions { shell: clap_complete::Shell },
    /// Corvid's main job on this machine: start worker processes, run a blocked matmul and an
    /// MLP across them, check the results against local evaluation, print who did what
    Demo {
        /// Worker processes to start
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Size of the square matmul (cut into 2x2 blocks)
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Also start a worker that corrupts its results, to watch it get caught and banned
        /// (needs a build with `--features fault-injection`)
        #[arg(long)]
        cheater: bool,
    },
    /// The confined process a node runs peers' tasks in (started by `corvid node`)
    #[cfg(target_os = "linux")]
    #[command(hide = true)]
    Executor(crate::sandbox::child::ExecutorArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved config as TOML (the key's path and peer id, never the key)
    Dump(NodeArgs),
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the unit for `corvid node <FLAGS>` and start it, e.g.
    /// `corvid service install -- --bootstrap ADDR --cpus 50%`
    Install {
        /// Write the unit only
        #[arg(long)]
        no_start: bool,
        /// `corvid node` flags, after `--`
        #[arg(last = true, value_name = "FLAGS")]
        flags: Vec<String>,
    },
    /// Stop the service (gracefully) and remove its unit
    Uninstall,
    /// Whether the service is installed and running, and the node's summary
    Status,
}

#[derive(Debug, Subcommand)]
pub enum PskCommand {
    /// Write a new random pre-shared key file (mode 0600) for `--psk`
    New { path: PathBuf },
}

/// Which running node to ask.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The node's control address [default: read from DATA_DIR/control.addr]
    #[arg(long, env = "CORVID_CONTROL", value_name = "ADDR")]
    pub control: Option<SocketAddr>,
    /// The node's data directory
    #[arg(long, env = "CORVID_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("cannot open the '{choice}' backend: {source}")]
    Backend {
        choice: String,
        source: corvid_kernels::BackendError,
    },
    #[error("cannot write output: {0}")]
    Output(String),
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error("no corvid service is installed: `corvid service install -- <node flags>`")]
    NotInstalled,
}

impl CliError {
    /// Process exit code: 2 for bad configuration, 3 when no node answers, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_)
            | CliError::Identity(_)
            | CliError::Node(NodeError::Config(_))
            | CliError::Service(crate::service::ServiceError::Flags(_))
            | CliError::Service(crate::service::ServiceError::Config(_)) => 2,
            CliError::Control(_) | CliError::NotInstalled => 3,
            _ => 1,
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Node(args) => run_node(&args).await,
        Command::Bench {
            backend,
            budget,
            json,
        } => run_bench(&backend, budget.into(), json).await,
        Command::Id { node, json } => run_id(&node, json).await,
        Command::Peers { target, json } => run_peers(&target, json).await,
        Command::Status { target, json } => run_status(&target, json).await,
        Command::Pause { target, reason } => {
            set_paused(&target, "/pause", &control::PauseRequest { reason }).await
        }
        Command::Resume { target } => set_paused(&target, "/resume", &()).await,
        Command::Config(ConfigCommand::Dump(args)) => dump_config(&args),
        Command::Service(c) => run_service(c).await,
        Command::Psk(PskCommand::New { path }) => {
            let psk = Psk::generate(&path)?;
            out(format!(
                "wrote {} (fingerprint {})\nstart every node of the private swarm with --psk {}\n",
                path.display(),
                psk.fingerprint(),
                path.display()
            ))
        }
        Command::Demo {
            workers,
            size,
            cheater,
        } => tokio::task::spawn_blocking(move || crate::demo::run(workers, size, cheater))
            .await
            .map_err(|e| CliError::Output(e.to_string()))?
            .map_err(CliError::from),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "corvid", &mut std::io::stdout());
            Ok(())
        }
        // `main` runs it before any runtime starts.
        #[cfg(target_os = "linux")]
        Command::Executor(_) => Err(CliError::Output(
            "the executor runs outside the async runtime".into(),
        )),
    }
}

async fn run_node(args: &NodeArgs) -> Result<(), CliError> {
    let config = NodeConfig::resolve(args)?;
    // This process's kernels (the benchmark, checks, tasks run in process) use this many
    // threads; the executor process gets the same cap from the node.
    if let Some(n) = config.cpus {
        match rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            Ok(()) => tracing::info!(cpus = n, "kernels use at most {n} core(s)"),
            Err(e) => tracing::warn!(error = %e, "cannot cap the kernels' threads"),
        }
    }
    let shutdown = CancellationToken::new();
    let node = Node::spawn(config, shutdown.clone()).await?;
    wait_for_signal().await;
    let grace: Duration = args.stop_grace.map_or(DEFAULT_STOP_GRACE, Into::into);
    tracing::info!(grace = %humantime::format_duration(grace), "stopping: tasks in hand finish first (a second signal stops at once)");
    tokio::select! {
        _ = node.stop(grace) => tracing::info!("stopped"),
        _ = wait_for_signal() => tracing::info!("stopped at once"),
    }
    Ok(())
}

async fn run_service(command: ServiceCommand) -> Result<(), CliError> {
    use crate::service;
    match command {
        ServiceCommand::Install { no_start, flags } => {
            let done = service::install(&flags, no_start)?;
            let mut s = format!("wrote {}\n", done.unit.display());
            match done.started {
                Ok(()) => s.push_str(&format!(
                    "started: the node runs in the background\n  state   corvid status --data-dir {d}\n  logs    journalctl --user -u corvid -f\n  to keep it running while you are logged out: loginctl enable-linger $USER\n",
                    d = done.data_dir.display()
                )),
                Err(why) => s.push_str(&format!(
                    "not started ({why}); in your login session run\n  systemctl --user daemon-reload && systemctl --user enable --now {}\n",
                    service::UNIT
                )),
            }
            out(s)
        }
        ServiceCommand::Uninstall => match service::uninstall()? {
            Some(unit) => out(format!("stopped and removed {}\n", unit.display())),
            None => out("no corvid service was installed\n".into()),
        },
        ServiceCommand::Status => {
            let Some((unit, data_dir, active)) = service::state()? else {
                return Err(CliError::NotInstalled);
            };
            let mut s = format!("service      {}: {active}\n", unit.display());
            let target = ControlArgs {
                control: None,
                data_dir: data_dir.clone(),
            };
            match control_target(&target) {
                Ok((_, addr)) => match control::get_json::<Status>(addr, "/status").await {
                    Ok(status) => s.push_str(&status_summary(&status, addr)),
                    Err(e) => s.push_str(&format!("the node does not answer at {addr}: {e}\n")),
                },
                Err(e) => s.push_str(&format!("the node is not running: {e}\n")),
            }
            out(s)
        }
    }
}

/// How long a stopping node lets the tasks it holds finish (`--stop-grace`).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn run_bench(backend: &str, budget: Duration, json: bool) -> Result<(), CliError> {
    let choice: BackendChoice = backend.parse().map_err(|source| CliError::Backend {
        choice: backend.to_string(),
        source,
    })?;
    let report = tokio::task::spawn_blocking(move || -> Result<BenchReport, CliError> {
        let b = Backend::open(choice).map_err(|source| CliError::Backend {
            choice: choice.to_string(),
            source,
        })?;
        Ok(bench::run(&b, budget, None)?)
    })
    .await
    .map_err(|e| CliError::Output(e.to_string()))??;
    if json {
        return out(json_string(&report)?);
    }
    out(format!(
        "backend      {}\nclass        {}\nmatmul       {:.1} GFLOP/s (f32, {n}x{n})\nelementwise  {:.2} GB/s (add, {} elements)\nmemory       {} available\ntook         {}\n",
        report.adapter,
        report.class,
        report.matmul_gflops,
        report.elementwise_gbps,
        report.elementwise_len,
        bytesize::ByteSize(report.memory_bytes).display().iec(),
        humantime::format_duration(Duration::from_millis(report.took.as_millis() as u64)),
        n = report.matmul_n,
    ))
}

#[derive(Serialize)]
struct IdOut {
    peer_id: String,
    /// Addresses others can use, from the running node or the config's fixed ports.
    bootstrap: Vec<String>,
    bootstrap_line: Option<String>,
    running: bool,
}

async fn run_id(args: &NodeArgs, json: bool) -> Result<(), CliError> {
    let config = NodeConfig::resolve(args)?;
    let peer = load_keypair(&config.identity)?.public().to_peer_id();
    let status: Option<Status> = match config.control_file() {
        Some(f) => match control::read_control_file(&f) {
            Ok(addr) => control::get_json(addr, "/status").await.ok(),
            Err(_) => None,
        },
        None => None,
    };
    let status = status.filter(|s| s.peer_id == peer.to_string());
    let (bootstrap, line) = match &status {
        // The running node knows where peers reach it (checked by them, or through a relay).
        Some(s) if !s.dialable_addrs.is_empty() => {
            (s.dialable_addrs.clone(), s.bootstrap_line.clone())
        }
        Some(s) => (
            s.listen_addrs
                .iter()
                .map(|a| format!("{a}/p2p/{peer}"))
                .collect(),
            s.bootstrap_line.clone(),
        ),
        None => {
            // Fixed ports only, as others can dial them: 0.0.0.0 becomes this machine's
            // interface addresses.
            let fixed: Vec<_> = config
                .listen
                .iter()
                .filter(|a| !a.iter().any(|p| p == libp2p::multiaddr::Protocol::Tcp(0)))
                .cloned()
                .collect();
            let fixed = dialable(&fixed, &interface_ips());
            let line = bootstrap_line(&fixed, &peer, config.psk.as_ref().map(|p| p.path.as_path()));
            (
                fixed.iter().map(|a| format!("{a}/p2p/{peer}")).collect(),
                line,
            )
        }
    };
    let id = IdOut {
        peer_id: peer.to_string(),
        bootstrap,
        bootstrap_line: line,
        running: status.is_some(),
    };
    if json {
        return out(json_string(&id)?);
    }
    let mut s = format!("peer id    {}\n", id.peer_id);
    for a in &id.bootstrap {
        s.push_str(&format!("address    {a}\n"));
    }
    match &id.bootstrap_line {
        Some(l) => s.push_str(&format!("others run {l}\n")),
        None => s.push_str("the node is not running and listens on a port chosen at start: run `corvid node`, then `corvid id` again (or set --listen with a fixed port)\n"),
    }
    out(s)
}

/// The running node's data dir and control address, from the flags or the data dir.
fn control_target(target: &ControlArgs) -> Result<(PathBuf, SocketAddr), CliError> {
    let dir = match &target.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir().ok_or(ConfigError::NoDataDir)?,
    };
    let addr = match target.control {
        Some(a) => a,
        None => control::read_control_file(&dir.join(crate::config::CONTROL_FILE))?,
    };
    Ok((dir, addr))
}

/// `corvid pause` and `corvid resume`: the request carries the token the node wrote in its data
/// dir (only its owner can read it).
async fn set_paused<B: Serialize>(
    target: &ControlArgs,
    path: &str,
    body: &B,
) -> Result<(), CliError> {
    let (dir, addr) = control_target(target)?;
    let token_file = dir.join(crate::config::TOKEN_FILE);
    let token = std::fs::read_to_string(&token_file).map_err(|e| {
        CliError::Output(format!(
            "cannot read the node's control token '{}': {e} (is the node running with this data dir, and are you its owner?)",
            token_file.display()
        ))
    })?;
    let status: Status = control::post_json(addr, path, token.trim(), body).await?;
    out(match status.pause_line() {
        Some(line) => format!("{line}\n  (no new tasks; running ones finish)\n"),
        None => format!(
            "taking tasks again: {} of {} slots free\n",
            status.advert.slots_free, status.advert.slots_total
        ),
    })
}

async fn run_status(target: &ControlArgs, json: bool) -> Result<(), CliError> {
    let (_, addr) = control_target(target)?;
    let status: Status = control::get_json(addr, "/status").await?;
    if json {
        return out(json_string(&status)?);
    }
    out(status_summary(&status, addr))
}

/// What `corvid status` prints: the status page, in a terminal.
pub fn status_summary(status: &Status, control: SocketAddr) -> String {
    let me = &status.advert;
    let mut s = format!("corvid node {}\n", status.peer_id);
    s.push_str(&match status.pause_line() {
        Some(line) => format!("  state        {line}\n"),
        None if me.contributes => format!(
            "  state        taking tasks, {} of {} slots free\n",
            me.slots_free, me.slots_total
        ),
        None => "  state        requester only\n".to_string(),
    });
    s.push_str(&format!(
        "  backend      {} ({})\n  scores       {:.1} GFLOP/s matmul, {:.2} GB/s elementwise\n  memory       {} offered\n  tasks        {} answered, {} in hand\n  contributed  {}\n  caps         {}\n  up           {} s\n",
        me.backend,
        printable(&me.adapter, 60),
        me.matmul_gflops,
        me.elementwise_gbps,
        bytesize::ByteSize(me.memory_bytes).display().iec(),
        status.tasks_answered,
        status.tasks_in_hand,
        status.contributed,
        status.caps,
        status.uptime_ms / 1000,
    ));
    if let Some(e) = status.recent_errors.first() {
        s.push_str(&format!(
            "  last error   {} from {}: {} ({} recent)\n",
            e.kind,
            printable(&e.peer, 60),
            printable(&e.error, 120),
            status.recent_errors.len()
        ));
    }
    s.push_str(&match &status.reachability {
        Reachability::Checking => "  reachable    still checking\n".to_string(),
        Reachability::Reachable { addrs } => format!("  reachable    at {}\n", addrs.join(", ")),
        Reachability::Unreachable { tested, .. } => format!(
            "  reachable    no (peers could not dial {tested}){}\n",
            if status.relay_addrs.is_empty() {
                String::new()
            } else {
                format!("; through a relay at {}", status.relay_addrs.join(", "))
            }
        ),
    });
    s.push_str(&format!(
        "  peers        {} connected, {} known; hole punches {} succeeded, {} failed\n",
        status.connected_peers,
        status.known_peers,
        status.hole_punches.succeeded,
        status.hole_punches.failed
    ));
    if let Some(line) = &status.bootstrap_line {
        s.push_str(&format!("  others run   {line}\n"));
    }
    s.push_str(&format!("  status page  http://{control}/\n"));
    s
}

async fn run_peers(target: &ControlArgs, json: bool) -> Result<(), CliError> {
    let (_, addr) = control_target(target)?;
    let status: Status = control::get_json(addr, "/status").await?;
    let peers: Vec<PeerInfo> = control::get_json(addr, "/peers").await?;
    if json {
        return out(json_string(
            &serde_json::json!({ "status": status, "peers": peers }),
        )?);
    }
    out(peer_table(&status, &peers))
}

/// The human-readable `corvid peers` output.
pub fn peer_table(status: &Status, peers: &[PeerInfo]) -> String {
    let mut s = format!(
        "{:<16} {:<7} {:<28} {:>8} {:>7} {:>6} {:>9}  {}\n",
        "PEER", "BACKEND", "ADAPTER", "GFLOP/S", "GB/S", "SLOTS", "LAST SEEN", "PATH"
    );
    for p in peers {
        let short = p
            .peer_id
            .parse()
            .map(|id| short_id(&id))
            .unwrap_or_else(|_| p.peer_id.clone());
        let adapter = printable(&p.adapter, 28);
        s.push_str(&format!(
            "{:<16} {:<7} {:<28} {:>8.1} {:>7.2} {:>6} {:>9}  {}\n",
            short,
            p.backend,
            adapter,
            p.matmul_gflops,
            p.elementwise_gbps,
            format!("{}/{}", p.slots_free, p.slots_total),
            format!("{:.1}s ago", p.last_seen_ms as f64 / 1000.0),
            p.path.map_or("-".to_string(), |p| p.to_string()),
        ));
    }
    let refused: u64 = status.rejections.values().sum();
    s.push_str(&format!(
        "{} peers known, {} connected; this node {} ({:.1} GFLOP/s); {refused} adverts refused\n",
        peers.len(),
        status.connected_peers,
        status.peer_id,
        status.advert.matmul_gflops,
    ));
    s.push_str(&match &status.reachability {
        Reachability::Checking => "reachability: still checking\n".to_string(),
        Reachability::Reachable { addrs } => {
            format!("reachable: peers dial this node at {}\n", addrs.join(", "))
        }
        Reachability::Unreachable { tested, .. } => format!(
            "not reachable from outside (peers could not dial {tested}){}\n",
            if status.relay_addrs.is_empty() {
                String::new()
            } else {
                format!("; through a relay at {}", status.relay_addrs.join(", "))
            }
        ),
    });
    if let Some(line) = status.pause_line() {
        s.push_str(&format!("{line}\n"));
    }
    let punches = status.hole_punches;
    if punches.succeeded + punches.failed > 0 {
        s.push_str(&format!(
            "hole punches: {} succeeded, {} failed\n",
            punches.succeeded, punches.failed
        ));
    }
    for b in &status.bootstrap {
        if let Some(e) = &b.error {
            s.push_str(&format!("bootstrap {}: {e}\n", b.addr));
        }
    }
    s
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    peer_id: String,
    data_dir: Option<String>,
    config_file: Option<String>,
    key: String,
    listen: Vec<String>,
    bootstrap: Vec<String>,
    backend: String,
    max_memory: Option<String>,
    psk: Option<String>,
    psk_fingerprint: Option<String>,
    contribute: bool,
    slots: u32,
    /// Where peers' tasks run: "executor process" or "in process".
    executor: String,
    control: String,
    max_connections: u32,
    /// Cores the kernels may use, or "all".
    cpus: String,
    /// Pause while other programs use more than this share of the CPUs, or "never".
    pause_when_busy: String,
    pause_on_battery: bool,
    /// Relay limits, or "off".
    relay: String,
    upnp: bool,
    external_addrs: Vec<String>,
    timing: &'a Timing,
}

fn dump_config(args: &NodeArgs) -> Result<(), CliError> {
    let c = NodeConfig::resolve(args)?;
    let (key, peer_id) = match &c.identity {
        IdentitySource::File(p) if p.exists() => (
            p.display().to_string(),
            load_keypair(&c.identity)?.public().to_peer_id().to_string(),
        ),
        IdentitySource::File(p) => (
            p.display().to_string(),
            "(no key yet: created on first `corvid node`)".to_string(),
        ),
        IdentitySource::Ephemeral => (
            "(a new key each run)".to_string(),
            "(new each run)".to_string(),
        ),
        IdentitySource::Seed(i) => (
            format!("(test key {i})"),
            load_keypair(&c.identity)?.public().to_peer_id().to_string(),
        ),
    };
    let dump = ConfigDump {
        peer_id,
        data_dir: c.data_dir.as_ref().map(|d| d.display().to_string()),
        config_file: c.config_file.as_ref().map(|d| d.display().to_string()),
        key,
        listen: c.listen.iter().map(ToString::to_string).collect(),
        bootstrap: c.bootstrap.iter().map(ToString::to_string).collect(),
        backend: c.backend.to_string(),
        max_memory: c
            .max_memory
            .map(|m| bytesize::ByteSize(m).display().iec().to_string()),
        psk: c.psk.as_ref().map(|p| p.path.display().to_string()),
        psk_fingerprint: c.psk.as_ref().map(Psk::fingerprint),
        contribute: c.contribute,
        slots: c.slots,
        executor: match &c.executor {
            crate::config::ExecutorMode::Process { program } => {
                format!("executor process ({} executor)", program.display())
            }
            crate::config::ExecutorMode::InProcess => "in process (no sandbox)".into(),
        },
        control: c.control.to_string(),
        max_connections: c.max_connections,
        cpus: c.cpus.map_or_else(
            || format!("all ({})", crate::config::available_cores()),
            |n| n.to_string(),
        ),
        pause_when_busy: c
            .pause
            .when_busy
            .map_or_else(|| "never".into(), |s| format!("{:.0}%", s * 100.0)),
        pause_on_battery: c.pause.on_battery,
        relay: match &c.nat.relay {
            None => "off".into(),
            Some(r) => format!(
                "{} slots, {} circuits, each up to {} and {}",
                r.max_reservations,
                r.max_circuits,
                humantime::format_duration(r.circuit_duration),
                bytesize::ByteSize(r.circuit_bytes).display().iec()
            ),
        },
        upnp: c.nat.upnp,
        external_addrs: c.nat.external.iter().map(ToString::to_string).collect(),
        timing: &c.timing,
    };
    out(toml::to_string(&dump).map_err(|e| CliError::Output(e.to_string()))?)
}

fn json_string<T: Serialize>(v: &T) -> Result<String, CliError> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| CliError::Output(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

fn out(s: String) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(s.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::Output(e.to_string()))
}

/// Logs to stderr with `filter` (an `EnvFilter` directive; `RUST_LOG` wins when set).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: not into files, pipes or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn node_flags_parse() {
        let cli = Cli::try_parse_from([
            "corvid",
            "node",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/tcp/1",
            "--backend",
            "cpu",
            "--no-contribute",
            "--max-memory",
            "1 GiB",
        ])
        .unwrap();
        let Command::Node(a) = cli.command else {
            panic!("not node")
        };
        assert_eq!(a.listen.len(), 2);
        assert!(a.no_contribute);
        assert_eq!(a.max_memory.unwrap().as_u64(), 1 << 30);
    }
}
