//! Pause rules: a contributing node steps aside while its owner needs the machine. Two rules,
//! each checked once a second by a task the node starts ([`watch`]), each pausing the node with
//! its own reason (shown in `corvid status`, the status page and the log) and resuming it when
//! the condition has passed:
//!
//! - **busy machine**: other programs use more than a set share of all CPUs (`/proc/stat`
//!   less this node's own process tree), for [`BUSY_SAMPLES`] samples in a row; resumed after
//!   [`IDLE_SAMPLES`] samples below it;
//! - **on battery**: a battery of the Linux power-supply class is discharging and no mains
//!   supply is online.
//!
//! The readers are plain functions of the files' text, so every rule is a unit test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use crate::config::{POWER_SUPPLY_DIR, PauseRules};
use crate::node_client::NodeClient;
use crate::status::PauseCause;

/// Samples in a row above the share that pause the node.
pub const BUSY_SAMPLES: u32 = 3;
/// Samples in a row below the share that resume it.
pub const IDLE_SAMPLES: u32 = 5;
/// How often the rules are checked.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// CPU time of the whole machine, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    pub total: u64,
    /// Time no program ran (idle and waiting for I/O).
    pub idle: u64,
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal …`
/// (guest time is already counted in user time).
pub fn machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().next()?;
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    Some(MachineTicks {
        total: v.iter().sum(),
        idle: v[3] + v[4],
    })
}

/// User plus system time of one process from its `/proc/PID/stat`, with `children` also
/// counting its reaped children's. The command name may hold spaces and parentheses: the
/// fields start after its last `)`.
pub fn process_ticks(stat: &str, children: bool) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3… of proc(5); utime, stime, cutime, cstime are fields 14–17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    let own = n(14)? + n(15)?;
    Some(if children { own + n(16)? + n(17)? } else { own })
}

/// CPU ticks used by this process (with the children it reaped) and every live descendant (the
/// executor process).
fn own_tree_ticks() -> u64 {
    let read = |pid: &str, children: bool| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| process_ticks(&s, children))
            .unwrap_or(0)
    };
    let me = std::process::id().to_string();
    let mut sum = read(&me, true);
    let mut stack = vec![me];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        // `children` lists each thread's children.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
                continue;
            };
            for child in list.split_whitespace() {
                seen += 1;
                if seen > 256 {
                    return sum;
                }
                sum += read(child, false);
                stack.push(child.to_string());
            }
        }
    }
    sum
}

/// The share (0–1) of all CPUs other programs used between two readings.
pub fn others_share(before: (MachineTicks, u64), after: (MachineTicks, u64)) -> f64 {
    let total = after.0.total.saturating_sub(before.0.total);
    if total == 0 {
        return 0.0;
    }
    let busy = total.saturating_sub(after.0.idle.saturating_sub(before.0.idle));
    let own = after.1.saturating_sub(before.1);
    busy.saturating_sub(own) as f64 / total as f64
}

/// Whether the machine runs on battery: a mains supply that is online says no; otherwise a
/// battery that is discharging says yes. No power-supply directory (a desktop, a server, a
/// container): no.
pub fn on_battery(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut discharging = false;
    for e in entries.flatten() {
        let p = e.path();
        match read(p.join("type")).as_str() {
            "Mains" if read(p.join("online")) == "1" => return false,
            "Battery" if read(p.join("status")) == "Discharging" => discharging = true,
            _ => {}
        }
    }
    discharging
}

/// The busy-machine rule's memory: how many samples in a row were above or below the share.
#[derive(Debug)]
pub struct BusyRule {
    limit: f64,
    run: u32,
    paused: bool,
}

impl BusyRule {
    pub fn new(limit: f64) -> BusyRule {
        BusyRule {
            limit,
            run: 0,
            paused: false,
        }
    }

    /// Takes a sample of the others' share; returns the new state when it changes (`true`:
    /// pause).
    pub fn sample(&mut self, share: f64) -> Option<bool> {
        let against = if self.paused {
            share <= self.limit
        } else {
            share > self.limit
        };
        self.run = if against { self.run + 1 } else { 0 };
        let needed = if self.paused {
            IDLE_SAMPLES
        } else {
            BUSY_SAMPLES
        };
        if self.run >= needed {
            self.paused = !self.paused;
            self.run = 0;
            Some(self.paused)
        } else {
            None
        }
    }
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// Checks the rules every [`SAMPLE_EVERY`] until `cancel`, pausing and resuming the node.
pub async fn watch(rules: PauseRules, node: NodeClient, cancel: CancellationToken) {
    if rules.is_empty() {
        return;
    }
    let read = || {
        let m = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| machine_ticks(&s));
        m.map(|m| (m, own_tree_ticks()))
    };
    let mut busy = rules.when_busy.map(BusyRule::new);
    let mut last = read();
    if busy.is_some() && last.is_none() {
        tracing::warn!("cannot read /proc/stat: the busy-machine pause rule is off");
        busy = None;
    }
    let mut battery = false;
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if rules.on_battery {
            let now = on_battery(&rules.power_supply);
            if now != battery {
                battery = now;
                let reason = now.then(|| "the machine runs on battery".to_string());
                if node.set_pause(PauseCause::Battery, reason).await.is_err() {
                    return;
                }
            }
        }
        if let Some(rule) = &mut busy
            && let (Some(before), Some(now)) = (last, read())
        {
            last = Some(now);
            let share = others_share(before, now);
            if let Some(pause) = rule.sample(share) {
                let reason = pause.then(|| {
                    format!(
                        "the machine is busy: other programs use {} of the CPUs (limit {})",
                        percent(share),
                        percent(rule.limit)
                    )
                });
                if node
                    .set_pause(PauseCause::BusyMachine, reason)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_gives_total_and_idle() {
        let s = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n";
        assert_eq!(
            machine_ticks(s),
            Some(MachineTicks {
                total: 981,
                idle: 820
            })
        );
        assert_eq!(machine_ticks("intr 1 2 3"), None);
        assert_eq!(machine_ticks(""), None);
    }

    #[test]
    fn a_process_stat_gives_user_and_system_time() {
        // A command name with a space and a parenthesis.
        let s = "1234 (corvid (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 70 30 5 6 20 0 9 0";
        assert_eq!(process_ticks(s, false), Some(100));
        assert_eq!(process_ticks(s, true), Some(111));
        assert_eq!(process_ticks("garbage", false), None);
    }

    #[test]
    fn others_share_leaves_out_this_node() {
        let m = |total, idle| MachineTicks { total, idle };
        // 200 ticks pass; 100 idle; the node used 40 of the 100 busy ones.
        let s = others_share((m(1000, 500), 10), (m(1200, 600), 50));
        assert!((s - 0.3).abs() < 1e-9, "{s}");
        assert_eq!(others_share((m(10, 5), 0), (m(10, 5), 0)), 0.0);
        // Counters that go backwards never give a negative share.
        assert_eq!(others_share((m(100, 50), 90), (m(120, 70), 95)), 0.0);
    }

    #[test]
    fn the_busy_rule_waits_for_samples_in_a_row() {
        let mut r = BusyRule::new(0.5);
        assert_eq!(r.sample(0.9), None);
        assert_eq!(r.sample(0.9), None);
        assert_eq!(r.sample(0.1), None, "a quiet sample starts the count again");
        assert_eq!(r.sample(0.9), None);
        assert_eq!(r.sample(0.9), None);
        assert_eq!(r.sample(0.9), Some(true));
        assert_eq!(r.sample(0.9), None, "already paused");
        for _ in 1..IDLE_SAMPLES {
            assert_eq!(r.sample(0.2), None);
        }
        assert_eq!(r.sample(0.2), Some(false));
    }

    fn supply(dir: &Path, name: &str, files: &[(&str, &str)]) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in files {
            std::fs::write(d.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn battery_means_discharging_with_no_mains_online() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            !on_battery(&dir.path().join("none")),
            "no power-supply class"
        );
        supply(
            dir.path(),
            "BAT0",
            &[("type", "Battery"), ("status", "Discharging")],
        );
        assert!(on_battery(dir.path()));
        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        assert!(on_battery(dir.path()));
        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "1")]);
        assert!(!on_battery(dir.path()), "plugged in");
        supply(dir.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        supply(dir.path(), "BAT0", &[("status", "Charging")]);
        assert!(!on_battery(dir.path()));
    }
}
