//! What a worker lets one stranger's task use: memory, FLOPs and time, derived once at start
//! from `--max-memory`, `--slots`, `--max-task-time` and the benchmark. Pure arithmetic, so
//! every rule is a unit test.
//!
//! The memory offered (`M`) is split in four: messages being received or queued, the tasks
//! running (each admitted only if its peak fits `M / (4 · slots)`), values kept for
//! requesters, and cached results. A task's deadline is four times what the benchmark says it
//! should take, plus two seconds, and never more than `--max-task-time`; the FLOP budget is
//! what fits in that time.

use std::time::Duration;

use corvid_kernels::{Budget, Footprint};
use serde::{Deserialize, Serialize};

/// A task may take this many times its benchmarked time before it is stopped.
pub const HEADROOM: f64 = 4.0;
/// Added to every deadline: start-up, hashing, a busy machine.
pub const DEADLINE_BASE: Duration = Duration::from_secs(2);

/// A worker's limits. Advertised (the budget) so that requesters cut work to fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory offered in all, bytes.
    pub memory: u64,
    /// Tasks that run at once.
    pub slots: u32,
    /// What one task may use.
    pub task: Budget,
    /// Bytes of task messages being received or waiting for a slot.
    pub inbound_bytes: u64,
    /// Bytes of values kept for requesters.
    pub held_bytes: u64,
    /// Bytes of cached results.
    pub cache_bytes: u64,
    /// Longest any task may run.
    pub max_task_time: Duration,
    /// Benchmarked matmul speed, FLOP/s, and memory speed, bytes/s.
    pub flops_per_sec: f64,
    pub bytes_per_sec: f64,
}

impl Limits {
    /// Limits for `memory` bytes shared by `slots` slots on a backend that takes tensors up
    /// to `max_tensor_bytes`, measured at `gflops` and `gbps`.
    pub fn derive(
        memory: u64,
        slots: u32,
        max_tensor_bytes: u64,
        gflops: f64,
        gbps: f64,
        max_task_time: Duration,
    ) -> Limits {
        let quarter = memory / 4;
        let per_task = quarter / u64::from(slots.max(1));
        let flops_per_sec = (gflops * 1e9).max(1e6);
        let bytes_per_sec = (gbps * 1e9).max(1e6);
        let usable = max_task_time.saturating_sub(DEADLINE_BASE).as_secs_f64() / HEADROOM;
        let max_flops = (usable * flops_per_sec).min(u64::MAX as f64) as u64;
        Limits {
            memory,
            slots: slots.max(1),
            task: Budget::new(max_tensor_bytes.min(per_task), per_task, max_flops),
            inbound_bytes: quarter,
            held_bytes: quarter,
            cache_bytes: quarter,
            max_task_time,
            flops_per_sec,
            bytes_per_sec,
        }
    }

    /// How long a task with this footprint may run: [`HEADROOM`] times its FLOPs at the
    /// benchmarked speed and its bytes at memory speed, plus [`DEADLINE_BASE`], at most
    /// `max_task_time`.
    pub fn deadline(&self, f: &Footprint) -> Duration {
        let secs = f.flops as f64 / self.flops_per_sec + f.peak_bytes as f64 / self.bytes_per_sec;
        let d = DEADLINE_BASE.as_secs_f64() + HEADROOM * secs;
        Duration::from_secs_f64(d.min(self.max_task_time.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_split_in_four_and_tasks_share_their_quarter() {
        let l = Limits::derive(8 << 30, 2, u64::MAX, 100.0, 10.0, Duration::from_secs(300));
        assert_eq!(l.task.max_peak_bytes, 1 << 30);
        assert_eq!(l.task.max_tensor_bytes, 1 << 30);
        assert_eq!(l.inbound_bytes + l.held_bytes + l.cache_bytes, 6 << 30);
        // 298 s / 4 at 100 GFLOP/s.
        assert_eq!(l.task.max_flops, 7_450_000_000_000);
        // A GPU's binding limit caps single tensors below the memory share.
        let g = Limits::derive(8 << 30, 1, 128 << 20, 100.0, 10.0, Duration::from_secs(300));
        assert_eq!(g.task.max_tensor_bytes, 128 << 20);
    }

    #[test]
    fn deadlines_scale_with_work_and_stop_at_the_maximum() {
        let l = Limits::derive(8 << 30, 1, u64::MAX, 100.0, 10.0, Duration::from_secs(60));
        let fp = |flops, peak_bytes| Footprint {
            metas: Vec::new(),
            nodes: 1,
            program_bytes: 10,
            largest_value: 0,
            peak_bytes,
            flops,
        };
        assert_eq!(l.deadline(&fp(0, 0)), DEADLINE_BASE);
        // 100 GFLOP at 100 GFLOP/s, and 1 GB at 10 GB/s: 1.1 s, times four, plus two.
        let d = l.deadline(&fp(100_000_000_000, 1_000_000_000));
        assert!((d.as_secs_f64() - 6.4).abs() < 1e-9, "{d:?}");
        assert_eq!(l.deadline(&fp(u64::MAX, u64::MAX)), Duration::from_secs(60));
    }
}
