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

/// How a requester checked a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Check {
    /// `freivalds`, `sampled_rows`, `recomputed`, `canary` or `replica`.
    pub check: String,
}

/// Corvid's own series (under `corvid_`), updated by the event loop, the requester's jobs and
/// at each scrape.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    /// Results this node's jobs checked, by how.
    pub checks: Family<Check, Counter>,
    /// Results refused as wrong, replicas that disagreed, peers banned.
    pub results_refused: Counter,
    pub disputes: Counter,
    pub bans: Counter,
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
            "results_checked",
            "Results of this node's jobs checked, by how",
            self.checks.clone(),
        );
        registry.register(
            "results_refused",
            "Results of this node's jobs refused as wrong",
            self.results_refused.clone(),
        );
        registry.register(
            "replica_disputes",
            "Replicas of this node's jobs that disagreed with the accepted result",
            self.disputes.clone(),
        );
        registry.register(
            "peers_banned",
            "Peers this node's jobs banned for a proven lie",
            self.bans.clone(),
        );
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

impl NodeMetrics {
    /// Counts the checks of a finished job.
    pub fn job_checked(&self, v: &crate::requester::VerifySummary) {
        for (check, n) in [
            ("freivalds", v.freivalds),
            ("sampled_rows", v.sampled_rows),
            ("recomputed", v.recomputed),
            ("canary", v.canaries),
            ("replica", v.replicated),
        ] {
            if n > 0 {
                self.checks
                    .get_or_create(&Check {
                        check: check.to_string(),
                    })
                    .inc_by(n as u64);
            }
        }
        self.results_refused.inc_by(v.detections.len() as u64);
        self.disputes.inc_by(v.disputes as u64);
        self.bans.inc_by(v.bans.len() as u64);
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
