//! Metrics in the Prometheus text format (`GET /metrics` on the control endpoint): libp2p's own
//! (connections, bandwidth, gossipsub, Kademlia, identify, ping, relay, hole punching) and
//! Corvid's (tasks by outcome, task bytes, queue depth, peers, memory against the cap).
//!
//! The registry is filled once at start and then only read (by the endpoint); the metrics in
//! it are shared counters the event loop updates.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What happened to a task from a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `done`, `failed`, `missing_inputs`, `refused` or `busy`.
    pub outcome: String,
}

/// Corvid's own series (under `corvid_`), updated by the event loop and at each scrape.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    pub tasks: Family<Outcome, Counter>,
    pub task_bytes_in: Counter,
    pub task_bytes_out: Counter,
    pub queue_depth: Gauge,
    pub peers_known: Gauge,
    pub peers_connected: Gauge,
    pub memory_cap_bytes: Gauge,
    pub resident_bytes: Gauge,
}

impl NodeMetrics {
    /// Registers every series in `registry` (give it a `corvid` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("tasks", "Tasks from peers, by outcome", self.tasks.clone());
        registry.register(
            "task_bytes_in",
            "Bytes of tensors received with tasks",
            self.task_bytes_in.clone(),
        );
        registry.register(
            "task_bytes_out",
            "Bytes of tensors sent back in answers",
            self.task_bytes_out.clone(),
        );
        registry.register(
            "queue_depth",
            "Tasks from peers queued or running",
            self.queue_depth.clone(),
        );
        registry.register(
            "peers_known",
            "Peers with a valid advert in the table",
            self.peers_known.clone(),
        );
        registry.register(
            "peers_connected",
            "Peers with an open connection",
            self.peers_connected.clone(),
        );
        registry.register(
            "memory_cap_bytes",
            "Memory offered to the network (--max-memory)",
            self.memory_cap_bytes.clone(),
        );
        registry.register(
            "resident_bytes",
            "Resident memory of the node process",
            self.resident_bytes.clone(),
        );
    }

    /// Counts a task from a peer.
    pub fn task(&self, outcome: &str) {
        self.tasks
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// Resident memory of this process, bytes (Linux; 0 elsewhere).
pub fn resident_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<i64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// `registry` in the Prometheus text (OpenMetrics) format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
