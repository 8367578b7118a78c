//! What this node has given the network: tasks done and their arithmetic, today (UTC) and in
//! all, kept across restarts in `DATA_DIR/contributed.json`; and the recent task errors and
//! refusals its owner may want to read. Owned by the event loop, which counts every answer.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// File in the data dir holding the tally.
pub const TALLY_FILE: &str = "contributed.json";
/// Recent errors and refusals kept.
pub const RECENT: usize = 20;
/// The tally is written at most this often (and when the node stops).
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// Tasks done and their arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Contributed {
    pub tasks: u64,
    /// Billions of floating-point operations, as the tasks' programs count them.
    pub gflop: f64,
}

impl Contributed {
    fn add(&mut self, flops: u64) {
        self.tasks += 1;
        self.gflop += flops as f64 / 1e9;
    }
}

/// Today's and the total contribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub total: Contributed,
    pub today: Contributed,
    /// The UTC day `today` counts, in days since 1970-01-01.
    pub day: u64,
}

impl Tally {
    /// Counts a task done of `flops`, at `now`: a new UTC day starts `today` again.
    pub fn add(&mut self, flops: u64, now: SystemTime) {
        self.roll(now);
        self.total.add(flops);
        self.today.add(flops);
    }

    /// Starts a new `today` if `now` is on a later day.
    pub fn roll(&mut self, now: SystemTime) {
        let day = day_of(now);
        if day != self.day {
            self.day = day;
            self.today = Contributed::default();
        }
    }
}

/// "today 12 tasks, 3.4 GFLOP · in all 340 tasks, 95.1 GFLOP".
impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "today {} tasks, {:.1} GFLOP · in all {} tasks, {:.1} GFLOP",
            self.today.tasks, self.today.gflop, self.total.tasks, self.total.gflop
        )
    }
}

fn day_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

/// A task that failed here or was refused, for the status page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub unix_secs: u64,
    /// The requester.
    pub peer: String,
    /// `failed` or `refused`.
    pub kind: String,
    pub error: String,
}

/// The tally, where it is kept, and the recent errors.
#[derive(Debug)]
pub struct Ledger {
    tally: Tally,
    path: Option<PathBuf>,
    dirty: bool,
    saved: Instant,
    recent: VecDeque<TaskEvent>,
}

impl Ledger {
    /// The tally kept at `path` (none: counted in memory only). A missing or unreadable file
    /// starts from zero, said in the log.
    pub fn open(path: Option<PathBuf>) -> Ledger {
        let tally = path.as_deref().map_or_else(Tally::default, |p| match std::fs::read(p) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %p.display(), error = %e, "unreadable contribution tally: counting from zero");
                Tally::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tally::default(),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot read the contribution tally: counting from zero");
                Tally::default()
            }
        });
        Ledger {
            tally,
            path,
            dirty: false,
            saved: Instant::now(),
            recent: VecDeque::new(),
        }
    }

    /// Today's and the total contribution, as of now.
    pub fn tally(&self) -> Tally {
        let mut t = self.tally;
        t.roll(SystemTime::now());
        t
    }

    pub fn recent(&self) -> Vec<TaskEvent> {
        self.recent.iter().rev().cloned().collect()
    }

    /// Counts a task done; writes the file if it was last written a while ago.
    pub fn done(&mut self, flops: u64) {
        self.tally.add(flops, SystemTime::now());
        self.dirty = true;
        if self.saved.elapsed() >= SAVE_EVERY {
            self.save();
        }
    }

    /// Keeps a failure or refusal among the recent ones.
    pub fn event(&mut self, peer: &libp2p::PeerId, kind: &str, error: String) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(TaskEvent {
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            peer: peer.to_string(),
            kind: kind.to_string(),
            error,
        });
    }

    /// Writes the tally if it changed (through a temporary file, so a crash leaves the old
    /// one whole).
    pub fn save(&mut self) {
        self.saved = Instant::now();
        let Some(path) = self.path.as_deref().filter(|_| self.dirty) else {
            return;
        };
        match write(path, &self.tally) {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the contribution tally")
            }
        }
    }
}

fn write(path: &Path, tally: &Tally) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(tally).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_new_day_starts_today_again_and_the_total_goes_on() {
        let day = |d: u64, s: u64| UNIX_EPOCH + Duration::from_secs(d * 86_400 + s);
        let mut t = Tally::default();
        t.add(2_000_000_000, day(20_000, 10));
        t.add(1_000_000_000, day(20_000, 86_000));
        assert_eq!(t.today.tasks, 2);
        assert!((t.today.gflop - 3.0).abs() < 1e-9);
        t.add(500_000_000, day(20_001, 5));
        assert_eq!(t.today.tasks, 1);
        assert!((t.today.gflop - 0.5).abs() < 1e-9);
        assert_eq!(t.total.tasks, 3);
        assert!((t.total.gflop - 3.5).abs() < 1e-9);
    }

    #[test]
    fn the_tally_survives_a_restart_and_recent_errors_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TALLY_FILE);
        let mut l = Ledger::open(Some(path.clone()));
        l.done(3_000_000_000);
        l.save();
        let again = Ledger::open(Some(path.clone()));
        assert_eq!(again.tally().total.tasks, 1);
        assert!((again.tally().today.gflop - 3.0).abs() < 1e-9);

        std::fs::write(&path, "not json").unwrap();
        assert_eq!(Ledger::open(Some(path)).tally().total.tasks, 0);

        let peer = libp2p::PeerId::random();
        for i in 0..50 {
            l.event(&peer, "failed", format!("error {i}"));
        }
        let recent = l.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].error, "error 49", "newest first");
    }
}
