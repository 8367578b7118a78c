//! Node configuration: TOML file < environment < flags, resolved once into a validated
//! [`NodeConfig`].
//!
//! Flags and their `CORVID_*` environment variables are parsed by clap ([`NodeArgs`]); whatever
//! neither sets is taken from the config file, then from the defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use corvid_kernels::BackendChoice;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};

pub use crate::identity::IdentitySource;
use crate::identity::{IdentityError, Psk};

/// Largest config file we read.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Most execution slots a node may advertise.
pub const MAX_SLOTS: u32 = 1024;

/// Why the configuration was rejected. Each message quotes the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file '{path}': {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file '{path}' is {bytes} bytes, over the {MAX_CONFIG_BYTES}-byte limit")]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("config file '{path}': {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: invalid multiaddr '{value}': {reason}")]
    Multiaddr {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "bootstrap address '{0}' has no /p2p/<peer id> suffix (copy the node's bootstrap line)"
    )]
    BootstrapWithoutPeerId(Multiaddr),
    #[error("{field}: invalid value '{value}': {reason}")]
    Value {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("control address '{0}' is not a loopback address (the endpoint is unauthenticated)")]
    ControlNotLoopback(SocketAddr),
    #[error("no data directory: set --data-dir or CORVID_DATA_DIR")]
    NoDataDir,
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Intervals and limits; short in tests, laptop-friendly by default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// How often the node re-publishes its advert.
    #[serde(with = "humantime_serde")]
    pub advert_interval: Duration,
    /// Peers not heard from for this long leave the peer table; adverts older than this are stale.
    #[serde(with = "humantime_serde")]
    pub peer_expiry: Duration,
    /// How often Kademlia re-bootstraps its routing table.
    #[serde(with = "humantime_serde")]
    pub kad_refresh: Duration,
    /// Connection setup (TCP, PSK, noise, yamux) deadline.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// How often unreachable bootstrap addresses are dialled again.
    #[serde(with = "humantime_serde")]
    pub bootstrap_retry: Duration,
    /// Time allowed for the start-up benchmark.
    #[serde(with = "humantime_serde")]
    pub bench_budget: Duration,
    /// Longest any one task from a peer may run before it is stopped.
    #[serde(with = "humantime_serde")]
    pub max_task_time: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            advert_interval: Duration::from_secs(30),
            peer_expiry: Duration::from_secs(90),
            kad_refresh: Duration::from_secs(300),
            dial_timeout: Duration::from_secs(10),
            bootstrap_retry: Duration::from_secs(15),
            bench_budget: Duration::from_secs(2),
            max_task_time: Duration::from_secs(300),
        }
    }
}

/// The validated configuration of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where the key, `control.addr` and the default config file live; `None` writes nothing.
    pub data_dir: Option<PathBuf>,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    pub identity: IdentitySource,
    pub listen: Vec<Multiaddr>,
    /// Each ends in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    pub backend: BackendChoice,
    /// Memory offered to the network; `None` offers half of what the machine has available.
    pub max_memory: Option<u64>,
    /// Private-network key; only nodes holding the same key connect.
    pub psk: Option<Psk>,
    /// `false` for a requester-only peer: advertises no slots.
    pub contribute: bool,
    pub slots: u32,
    /// Cores the node's kernels may use (the thread pools of the CPU backend, the software GPU
    /// driver and checks); `None`: all of them.
    pub cpus: Option<usize>,
    /// Loopback address of the JSON control endpoint (port 0: chosen, written to `control.addr`).
    pub control: SocketAddr,
    pub max_connections: u32,
    pub timing: Timing,
    /// Where tasks from peers run.
    pub executor: ExecutorMode,
    /// Relaying for peers behind NAT, port mapping, addresses others dial.
    pub nat: NatConfig,
    /// When a contributing node pauses by itself (busy machine, battery).
    pub pause: PauseRules,
    /// Misbehaviour for tests and demos of requesters' defences (the `fault-injection`
    /// feature); set only by the hidden `--cheat` flag, never from files or the environment.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fault: Option<crate::worker::faults::Fault>,
}

/// How a node deals with NAT: as a relay for others, through a router's port mapping, and
/// the addresses it tells others to dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatConfig {
    /// Relay (circuit relay v2) for unreachable peers, within these limits, while peers can
    /// dial this node (AutoNAT confirmed an address); `None` never relays.
    pub relay: Option<RelayLimits>,
    /// Ask the router for a port mapping (UPnP IGD).
    pub upnp: bool,
    /// Addresses others can dial this node at, known without probing (a forwarded port, a
    /// public address): advertised from the start.
    pub external: Vec<Multiaddr>,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            relay: Some(RelayLimits::default()),
            upnp: true,
            external: Vec::new(),
        }
    }
}

/// What a node relaying for others gives them at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers holding a slot (a reservation) at once.
    pub max_reservations: usize,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// A relayed connection is closed after this long...
    pub circuit_duration: Duration,
    /// ... or after this many bytes each way. Enough for adverts, control traffic and small
    /// tasks: bulk task traffic goes over direct (hole-punched) connections.
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_circuits: 16,
            circuit_duration: Duration::from_secs(120),
            circuit_bytes: 16 << 20,
        }
    }
}

/// Where Linux lists power supplies.
pub const POWER_SUPPLY_DIR: &str = "/sys/class/power_supply";

/// When a node pauses by itself (the rules are applied by [`crate::rules`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PauseRules {
    /// Pause while other programs use more than this share (0–1] of all CPUs.
    pub when_busy: Option<f64>,
    /// Pause while the machine runs on battery.
    pub on_battery: bool,
    /// The power-supply class directory read for the battery rule.
    pub power_supply: PathBuf,
}

impl Default for PauseRules {
    fn default() -> Self {
        PauseRules {
            when_busy: None,
            on_battery: true,
            power_supply: PathBuf::from(POWER_SUPPLY_DIR),
        }
    }
}

impl PauseRules {
    /// No rule: the node pauses only when its owner says so.
    pub fn none() -> PauseRules {
        PauseRules {
            when_busy: None,
            on_battery: false,
            power_supply: PathBuf::from(POWER_SUPPLY_DIR),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.when_busy.is_none() && !self.on_battery
    }
}

/// Where a worker runs tasks from peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorMode {
    /// In a separate, confined executor process (`program executor`) that the node supervises:
    /// the default.
    Process { program: PathBuf },
    /// In the node's own process: no confinement. For tests and debugging.
    InProcess,
}

impl NodeConfig {
    /// Node `i` of a loopback test swarm: a key derived from `i`, port 0 everywhere, the CPU
    /// backend, a short benchmark and second-scale intervals, no files written.
    pub fn for_test(i: u64) -> NodeConfig {
        NodeConfig {
            data_dir: None,
            config_file: None,
            identity: IdentitySource::Seed(i),
            listen: vec![loopback_tcp(0)],
            bootstrap: Vec::new(),
            backend: BackendChoice::Cpu,
            max_memory: Some(1 << 30),
            psk: None,
            contribute: true,
            slots: 2,
            cpus: None,
            pause: PauseRules::none(),
            control: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_connections: 64,
            timing: Timing {
                advert_interval: Duration::from_millis(500),
                peer_expiry: Duration::from_secs(3),
                kad_refresh: Duration::from_secs(10),
                dial_timeout: Duration::from_secs(5),
                bootstrap_retry: Duration::from_secs(1),
                bench_budget: Duration::from_millis(150),
                max_task_time: Duration::from_secs(60),
            },
            executor: ExecutorMode::InProcess,
            // No multicast from tests: nothing to map on loopback.
            nat: NatConfig {
                upnp: false,
                ..NatConfig::default()
            },
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }

    /// Resolves flags and environment (already in `args`) over the config file and defaults.
    pub fn resolve(args: &NodeArgs) -> Result<NodeConfig, ConfigError> {
        let data_dir = match &args.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir().ok_or(ConfigError::NoDataDir)?,
        };
        let (file, config_file) = FileConfig::load(args.config.as_deref(), &data_dir)?;
        let defaults = Timing::default();
        let dur = |field, flag: Option<Duration>, file: Option<Duration>, def| {
            positive(field, flag.or(file).unwrap_or(def))
        };
        let timing = Timing {
            advert_interval: dur(
                "advert_interval",
                args.advert_interval.map(Into::into),
                file.advert_interval,
                defaults.advert_interval,
            )?,
            peer_expiry: dur(
                "peer_expiry",
                args.peer_expiry.map(Into::into),
                file.peer_expiry,
                defaults.peer_expiry,
            )?,
            kad_refresh: dur("kad_refresh", None, file.kad_refresh, defaults.kad_refresh)?,
            dial_timeout: dur(
                "dial_timeout",
                None,
                file.dial_timeout,
                defaults.dial_timeout,
            )?,
            bootstrap_retry: dur(
                "bootstrap_retry",
                None,
                file.bootstrap_retry,
                defaults.bootstrap_retry,
            )?,
            bench_budget: dur(
                "bench_budget",
                None,
                file.bench_budget,
                defaults.bench_budget,
            )?,
            max_task_time: dur(
                "max_task_time",
                args.max_task_time.map(Into::into),
                file.max_task_time,
                defaults.max_task_time,
            )?,
        };
        let listen = pick(&args.listen, &file.listen);
        let listen = if listen.is_empty() {
            vec![
                Multiaddr::empty()
                    .with(Protocol::Ip4(Ipv4Addr::UNSPECIFIED))
                    .with(Protocol::Tcp(0)),
            ]
        } else {
            parse_addrs("listen", listen)?
        };
        let backend = match args.backend.as_deref().or(file.backend.as_deref()) {
            Some(b) => b.parse().map_err(|e| ConfigError::Value {
                field: "backend",
                value: b.to_string(),
                reason: format!("{e}"),
            })?,
            None => BackendChoice::Auto,
        };
        let backend = match (args.gpu.map(|g| g == Switch::On).or(file.gpu), backend) {
            (Some(false), BackendChoice::Gpu) | (Some(true), BackendChoice::Cpu) => {
                return Err(value(
                    "gpu",
                    if backend == BackendChoice::Gpu {
                        "off"
                    } else {
                        "on"
                    },
                    &format!("contradicts backend = {backend}"),
                ));
            }
            (Some(false), _) => BackendChoice::Cpu,
            (_, b) => b,
        };
        let pause = PauseRules {
            when_busy: match args
                .pause_when_busy
                .as_deref()
                .or(file.pause_when_busy.as_deref())
            {
                Some(t) => parse_share("pause_when_busy", t)?,
                None => None,
            },
            on_battery: !args.no_pause_on_battery && file.pause_on_battery.unwrap_or(true),
            power_supply: args
                .power_supply_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(POWER_SUPPLY_DIR)),
        };
        let psk = match args.psk.as_ref().or(file.psk.as_ref()) {
            Some(p) => Some(Psk::load(p)?),
            None => None,
        };
        let control = match args.control.or(file.control) {
            Some(c) => c,
            None => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        let config = NodeConfig {
            identity: IdentitySource::File(
                args.key
                    .clone()
                    .or(file.key)
                    .unwrap_or_else(|| data_dir.join("identity.key")),
            ),
            data_dir: Some(data_dir),
            config_file,
            listen,
            bootstrap: parse_addrs("bootstrap", pick(&args.bootstrap, &file.bootstrap))?,
            backend,
            max_memory: args.max_memory.or(file.max_memory).map(|b| b.as_u64()),
            psk,
            contribute: !args.no_contribute && file.contribute.unwrap_or(true),
            slots: args.slots.or(file.slots).unwrap_or(1),
            cpus: match (&args.cpus, &file.cpus) {
                (Some(flag), _) => Some(parse_cpus(flag, available_cores())?),
                (None, Some(toml::Value::Integer(n))) => {
                    Some(parse_cpus(&n.to_string(), available_cores())?)
                }
                (None, Some(toml::Value::String(t))) => Some(parse_cpus(t, available_cores())?),
                (None, Some(other)) => {
                    return Err(value(
                        "cpus",
                        &other.to_string(),
                        "a count or a percentage like \"50%\"",
                    ));
                }
                (None, None) => None,
            },
            control,
            max_connections: file.max_connections.unwrap_or(128),
            timing,
            executor: if args.no_sandbox {
                ExecutorMode::InProcess
            } else {
                ExecutorMode::Process {
                    program: std::env::current_exe().map_err(|e| ConfigError::Value {
                        field: "executor",
                        value: "the corvid binary".into(),
                        reason: format!("cannot find this program's path: {e}"),
                    })?,
                }
            },
            nat: NatConfig {
                relay: (!args.no_relay && file.relay.unwrap_or(true)).then(|| {
                    let d = RelayLimits::default();
                    RelayLimits {
                        max_reservations: file.relay_max_reservations.unwrap_or(d.max_reservations),
                        max_circuits: file.relay_max_circuits.unwrap_or(d.max_circuits),
                        circuit_duration: file.relay_circuit_duration.unwrap_or(d.circuit_duration),
                        circuit_bytes: file
                            .relay_circuit_bytes
                            .map_or(d.circuit_bytes, |b| b.as_u64()),
                    }
                }),
                upnp: !args.no_upnp && file.upnp.unwrap_or(true),
                external: parse_addrs(
                    "external_addr",
                    pick(&args.external_addr, &file.external_addr),
                )?,
            },
            pause,
            #[cfg(feature = "fault-injection")]
            fault: args.cheat.map(Into::into),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the cross-field rules; [`NodeConfig::resolve`] and [`crate::Node::spawn`] call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for addr in &self.bootstrap {
            if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
                return Err(ConfigError::BootstrapWithoutPeerId(addr.clone()));
            }
        }
        if !self.control.ip().is_loopback() {
            return Err(ConfigError::ControlNotLoopback(self.control));
        }
        if self.listen.is_empty() {
            return Err(value(
                "listen",
                "[]",
                "at least one listen address is needed",
            ));
        }
        if self.slots > MAX_SLOTS {
            return Err(value(
                "slots",
                &self.slots.to_string(),
                &format!("at most {MAX_SLOTS}"),
            ));
        }
        if self.max_connections == 0 {
            return Err(value("max_connections", "0", "must be at least 1"));
        }
        if let Some(r) = &self.nat.relay {
            // libp2p's relay panics on a circuit duration over u32::MAX seconds; a day is
            // already far more than a relayed connection needs.
            if r.circuit_duration < Duration::from_secs(1) || r.circuit_duration > MAX_CIRCUIT_TIME
            {
                return Err(value(
                    "relay_circuit_duration",
                    &humantime::format_duration(r.circuit_duration).to_string(),
                    "between 1s and 24h",
                ));
            }
            if r.circuit_bytes == 0 {
                return Err(value("relay_circuit_bytes", "0", "must be above 0"));
            }
        }
        let t = &self.timing;
        if t.peer_expiry < t.advert_interval * 2 {
            return Err(value(
                "peer_expiry",
                &humantime::format_duration(t.peer_expiry).to_string(),
                &format!(
                    "must be at least twice advert_interval ({})",
                    humantime::format_duration(t.advert_interval)
                ),
            ));
        }
        Ok(())
    }

    /// Where the running node writes its control endpoint address.
    pub fn control_file(&self) -> Option<PathBuf> {
        self.data_dir.as_ref().map(|d| d.join(CONTROL_FILE))
    }
}

/// Longest a relayed connection may be allowed to last.
const MAX_CIRCUIT_TIME: Duration = Duration::from_secs(24 * 3600);

/// File in the data dir holding the running node's control address.
pub const CONTROL_FILE: &str = "control.addr";
/// File in the data dir (mode 0600) holding the token that requests changing the running
/// node's state (pause, resume) must carry; a new one each start.
pub const TOKEN_FILE: &str = "control.token";

/// The platform's data dir for corvid (`~/.local/share/corvid` on Linux).
pub fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "corvid").map(|d| d.data_dir().to_path_buf())
}

/// `/ip4/127.0.0.1/tcp/{port}`.
pub fn loopback_tcp(port: u16) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(Ipv4Addr::LOCALHOST))
        .with(Protocol::Tcp(port))
}

/// Flags of `corvid node` (and of the commands that read the same config); each also reads a
/// `CORVID_*` environment variable.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NodeArgs {
    /// Config file (TOML) [default: DATA_DIR/config.toml if it exists]
    #[arg(long, env = "CORVID_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the key, config and control.addr
    #[arg(long, env = "CORVID_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Listen multiaddr, repeatable [default: /ip4/0.0.0.0/tcp/0]
    #[arg(
        long,
        env = "CORVID_LISTEN",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub listen: Vec<String>,
    /// Bootstrap multiaddr ending in /p2p/PEER_ID, repeatable
    #[arg(
        long,
        env = "CORVID_BOOTSTRAP",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<String>,
    /// ed25519 identity file, created (mode 0600) if missing [default: DATA_DIR/identity.key]
    #[arg(long, env = "CORVID_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Execution backend: auto, gpu or cpu
    #[arg(long, env = "CORVID_BACKEND", value_name = "BACKEND")]
    pub backend: Option<String>,
    /// Memory offered to the network, e.g. "8 GiB": every task, message and kept value fits
    /// in it [default: half of what is available]
    #[arg(long, env = "CORVID_MAX_MEMORY", value_name = "SIZE")]
    pub max_memory: Option<ByteSize>,
    /// Longest one task from a peer may run, e.g. "5m" [default: 5m]
    #[arg(long, env = "CORVID_MAX_TASK_TIME", value_name = "DURATION")]
    pub max_task_time: Option<humantime::Duration>,
    /// Private-network pre-shared key file: only nodes with the same key connect
    #[arg(long, env = "CORVID_PSK", value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Join as a requester only: advertise no execution slots
    #[arg(long, env = "CORVID_NO_CONTRIBUTE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_contribute: bool,
    /// Execution slots offered [default: 1]
    #[arg(long, env = "CORVID_SLOTS", value_name = "N")]
    pub slots: Option<u32>,
    /// Cores the node's kernels may use: a count ("2") or a share of this machine's ("50%")
    /// [default: all]
    #[arg(long, env = "CORVID_CPUS", value_name = "N|P%")]
    pub cpus: Option<String>,
    /// Use the GPU ("on": if there is one) or never touch it ("off": the CPU backend)
    /// [default: on]
    #[arg(long, env = "CORVID_GPU", value_name = "on|off")]
    pub gpu: Option<Switch>,
    /// Pause while other programs use more than this share of the CPUs, e.g. "50%"; resume
    /// once they use less [default: never]
    #[arg(long, env = "CORVID_PAUSE_WHEN_BUSY", value_name = "P%")]
    pub pause_when_busy: Option<String>,
    /// Keep working while the machine runs on battery (by default the node pauses)
    #[arg(long, env = "CORVID_NO_PAUSE_ON_BATTERY", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_pause_on_battery: bool,
    /// The Linux power-supply class directory the battery rule reads (tests)
    #[arg(long, hide = true, value_name = "DIR")]
    pub power_supply_dir: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, how long the tasks in hand may take to finish before they go back
    /// to their requesters, e.g. "30s" [default: 30s]
    #[arg(long, env = "CORVID_STOP_GRACE", value_name = "DURATION")]
    pub stop_grace: Option<humantime::Duration>,
    /// Loopback address of the control endpoint [default: 127.0.0.1:0]
    #[arg(long, env = "CORVID_CONTROL", value_name = "ADDR")]
    pub control: Option<SocketAddr>,
    /// How often to re-publish the advert, e.g. "30s"
    #[arg(long, env = "CORVID_ADVERT_INTERVAL", value_name = "DURATION")]
    pub advert_interval: Option<humantime::Duration>,
    /// Forget peers not heard from for this long, e.g. "90s"
    #[arg(long, env = "CORVID_PEER_EXPIRY", value_name = "DURATION")]
    pub peer_expiry: Option<humantime::Duration>,
    /// Never relay for peers behind NAT (by default a node that peers can dial relays, within
    /// the relay_* limits of the config file)
    #[arg(long, env = "CORVID_NO_RELAY", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_relay: bool,
    /// Do not ask the router for a port mapping (UPnP)
    #[arg(long, env = "CORVID_NO_UPNP", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_upnp: bool,
    /// An address others can dial this node at (a forwarded port, a public address),
    /// repeatable: advertised without waiting for peers to confirm it
    #[arg(
        long,
        env = "CORVID_EXTERNAL_ADDR",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub external_addr: Vec<String>,
    /// Run peers' tasks inside the node process instead of a confined executor process
    /// (debugging only: a bug a task triggers then costs the node)
    #[arg(long, env = "CORVID_NO_SANDBOX", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_sandbox: bool,
    /// Misbehave on purpose, to show requesters' defences (`corvid demo --cheater`). Hidden,
    /// and only in a build with the `fault-injection` feature; no environment variable or
    /// config key sets it.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true, value_name = "HOW")]
    pub cheat: Option<crate::worker::faults::Cheat>,
}

/// The config file: every field optional, unknown fields rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    key: Option<PathBuf>,
    backend: Option<String>,
    max_memory: Option<ByteSize>,
    psk: Option<PathBuf>,
    contribute: Option<bool>,
    slots: Option<u32>,
    cpus: Option<toml::Value>,
    gpu: Option<bool>,
    pause_when_busy: Option<String>,
    pause_on_battery: Option<bool>,
    control: Option<SocketAddr>,
    max_connections: Option<u32>,
    relay: Option<bool>,
    relay_max_reservations: Option<usize>,
    relay_max_circuits: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    relay_circuit_duration: Option<Duration>,
    relay_circuit_bytes: Option<ByteSize>,
    upnp: Option<bool>,
    external_addr: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    advert_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    peer_expiry: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    kad_refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    dial_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    bootstrap_retry: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    bench_budget: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_task_time: Option<Duration>,
}

impl FileConfig {
    /// Reads `explicit`, else `DATA_DIR/config.toml` if it exists, else nothing.
    fn load(
        explicit: Option<&Path>,
        data_dir: &Path,
    ) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = data_dir.join("config.toml");
                if !p.exists() {
                    return Ok((FileConfig::default(), None));
                }
                p
            }
        };
        let read_err = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        let bytes = std::fs::metadata(&path).map_err(read_err)?.len();
        if bytes > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path, bytes });
        }
        let text = std::fs::read_to_string(&path).map_err(read_err)?;
        let file = FileConfig::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.clone(),
            source: Box::new(source),
        })?;
        Ok((file, Some(path)))
    }

    fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(text)
    }
}

/// Flags/env win when given at all; otherwise the file's list.
fn pick<'a>(flags: &'a [String], file: &'a Option<Vec<String>>) -> &'a [String] {
    if flags.is_empty() {
        file.as_deref().unwrap_or(&[])
    } else {
        flags
    }
}

pub(crate) fn parse_addrs(
    field: &'static str,
    values: &[String],
) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .iter()
        .map(|v| {
            v.trim().parse().map_err(|e| ConfigError::Multiaddr {
                field,
                value: v.clone(),
                reason: format!("{e}"),
            })
        })
        .collect()
}

fn positive(field: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(value(field, "0s", "must be positive"))
    } else {
        Ok(d)
    }
}

/// Cores this machine lets the process use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// `--cpus`: a count of cores, or a percentage of `available`; at least one, at most all.
pub fn parse_cpus(text: &str, available: usize) -> Result<usize, ConfigError> {
    let bad = |why: &str| value("cpus", text, why);
    let text = text.trim();
    let n = match text.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| bad("a percentage like \"50%\""))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad("a percentage above 0 and at most 100"));
            }
            ((available as f64 * p / 100.0).round() as usize).max(1)
        }
        None => text
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| bad("a count of cores (1 or more) or a percentage like \"50%\""))?,
    };
    if n > available {
        return Err(bad(&format!("this machine has {available} cores")));
    }
    Ok(n)
}

/// On or off, as `--gpu` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// A share of the machine's CPUs, "P%" with 0 < P ≤ 100 (or "off": none).
pub fn parse_share(field: &'static str, text: &str) -> Result<Option<f64>, ConfigError> {
    let t = text.trim();
    if t == "off" {
        return Ok(None);
    }
    t.strip_suffix('%')
        .and_then(|p| p.trim().parse::<f64>().ok())
        .filter(|p| *p > 0.0 && *p <= 100.0)
        .map(|p| Some(p / 100.0))
        .ok_or_else(|| {
            value(
                field,
                text,
                "a percentage above 0 and at most 100, like \"50%\"",
            )
        })
}

fn value(field: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Value {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_limits_out_of_range_are_refused_by_name() {
        let mut c = NodeConfig::for_test(0);
        for (d, bytes) in [
            (Duration::ZERO, 1),
            (Duration::from_secs(200 * 365 * 24 * 3600), 1),
            (Duration::from_secs(60), 0),
        ] {
            c.nat.relay = Some(RelayLimits {
                circuit_duration: d,
                circuit_bytes: bytes,
                ..RelayLimits::default()
            });
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("relay_circuit"), "{e}");
        }
        c.nat.relay = Some(RelayLimits::default());
        c.validate().unwrap();
    }

    #[test]
    fn busy_shares_are_percentages() {
        assert_eq!(parse_share("f", "50%").unwrap(), Some(0.5));
        assert_eq!(parse_share("f", " 100 % ").unwrap(), Some(1.0));
        assert_eq!(parse_share("f", "off").unwrap(), None);
        for bad in ["0%", "101%", "50", "half", "-5%"] {
            let e = parse_share("pause_when_busy", bad).unwrap_err().to_string();
            assert!(e.contains("pause_when_busy"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpus_are_a_count_or_a_share() {
        assert_eq!(parse_cpus("1", 8).unwrap(), 1);
        assert_eq!(parse_cpus("50%", 8).unwrap(), 4);
        assert_eq!(parse_cpus(" 25 % ", 2).unwrap(), 1, "rounded, at least one");
        assert_eq!(parse_cpus("100%", 6).unwrap(), 6);
        for bad in ["0", "-1", "0%", "150%", "two", "", "9"] {
            let e = parse_cpus(bad, 8).unwrap_err().to_string();
            assert!(e.contains("cpus"), "{bad}: {e}");
        }
    }

    fn args(dir: &Path) -> NodeArgs {
        NodeArgs {
            data_dir: Some(dir.to_path_buf()),
            ..NodeArgs::default()
        }
    }

    #[test]
    fn defaults_without_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeConfig::resolve(&args(dir.path())).unwrap();
        assert_eq!(c.listen[0].to_string(), "/ip4/0.0.0.0/tcp/0");
        assert_eq!(
            c.identity,
            IdentitySource::File(dir.path().join("identity.key"))
        );
        assert!(c.contribute);
        assert_eq!(c.timing, Timing::default());
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "slots = 4\nbackend = \"cpu\"\nadvert_interval = \"10s\"\npeer_expiry = \"1m\"\n\
             listen = [\"/ip4/127.0.0.1/tcp/4001\"]\nmax_memory = \"2 GiB\"\n",
        )
        .unwrap();
        let mut a = args(dir.path());
        a.slots = Some(8);
        let c = NodeConfig::resolve(&a).unwrap();
        assert_eq!(c.slots, 8);
        assert_eq!(c.backend, BackendChoice::Cpu);
        assert_eq!(c.timing.advert_interval, Duration::from_secs(10));
        assert_eq!(c.listen, vec![loopback_tcp(4001)]);
        assert_eq!(c.max_memory, Some(2 << 30));
    }

    #[test]
    fn the_gpu_switch_and_pause_rules_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeConfig::resolve(&args(dir.path())).unwrap();
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.pause.when_busy, None);
        assert!(c.pause.on_battery, "on by default");

        std::fs::write(
            dir.path().join("config.toml"),
            "gpu = false\npause_when_busy = \"40%\"\npause_on_battery = false\n",
        )
        .unwrap();
        let c = NodeConfig::resolve(&args(dir.path())).unwrap();
        assert_eq!(c.backend, BackendChoice::Cpu, "gpu off: the CPU backend");
        assert_eq!(c.pause.when_busy, Some(0.4));
        assert!(!c.pause.on_battery);

        // The flag wins over the file; a switch that contradicts the backend is refused.
        let mut a = args(dir.path());
        a.gpu = Some(Switch::On);
        a.pause_when_busy = Some("off".into());
        let c = NodeConfig::resolve(&a).unwrap();
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.pause.when_busy, None);
        a.backend = Some("cpu".into());
        let e = NodeConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("gpu") && e.contains("backend"), "{e}");
    }

    #[test]
    fn bad_values_are_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.bootstrap = vec!["/ip4/127.0.0.1/tcp/1".into()];
        let e = NodeConfig::resolve(&a).unwrap_err().to_string();
        assert!(
            e.contains("'/ip4/127.0.0.1/tcp/1'") && e.contains("/p2p/"),
            "{e}"
        );

        let mut a = args(dir.path());
        a.listen = vec!["/ip4/nonsense".into()];
        let e = NodeConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("'/ip4/nonsense'"), "{e}");

        let mut a = args(dir.path());
        a.backend = Some("tpu".into());
        let e = NodeConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("'tpu'"), "{e}");

        let mut a = args(dir.path());
        a.control = Some("10.0.0.1:80".parse().unwrap());
        let e = NodeConfig::resolve(&a).unwrap_err().to_string();
        assert!(e.contains("'10.0.0.1:80'"), "{e}");
    }

    #[test]
    fn unknown_file_fields_are_rejected() {
        let e = FileConfig::parse("slotz = 3\n").unwrap_err().to_string();
        assert!(e.contains("slotz"), "{e}");
    }

    #[test]
    fn test_config_is_valid() {
        NodeConfig::for_test(3).validate().unwrap();
    }
}
