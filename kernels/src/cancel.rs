//! Stopping a running program: a flag anyone holding a clone can raise, and a deadline.
//!
//! Backends check [`Cancel::check`] between nodes and, inside long kernels, between blocks of
//! rows, so a task that was cancelled or ran out of time stops within one block's work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why a run stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("cancelled")]
    Cancelled,
    #[error("over its time budget of {0:?}")]
    Deadline(Duration),
}

/// A cancellation flag with an optional deadline. Cheap to clone; clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    deadline: Option<(Instant, Duration)>,
}

impl Cancel {
    /// Never stops unless [`Cancel::cancel`] is called.
    pub fn none() -> Cancel {
        Cancel::default()
    }

    /// Stops `budget` from now, or when cancelled.
    pub fn within(budget: Duration) -> Cancel {
        Cancel {
            flag: Arc::default(),
            deadline: Instant::now().checked_add(budget).map(|at| (at, budget)),
        }
    }

    /// A token sharing this one's flag, with a deadline `budget` from now (replacing any).
    pub fn with_deadline(&self, budget: Duration) -> Cancel {
        Cancel {
            flag: self.flag.clone(),
            deadline: Instant::now().checked_add(budget).map(|at| (at, budget)),
        }
    }

    /// Raises the flag: every clone's next check fails.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// Whether the flag is raised (the deadline aside).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The time left before the deadline (`None`: no deadline).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
    }

    /// `Err` once cancelled or past the deadline.
    #[inline]
    pub fn check(&self) -> Result<(), Stopped> {
        if self.flag.load(Ordering::Relaxed) {
            return Err(Stopped::Cancelled);
        }
        match self.deadline {
            Some((at, budget)) if Instant::now() >= at => Err(Stopped::Deadline(budget)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag_and_deadlines_pass() {
        let c = Cancel::none();
        let d = c.clone();
        assert_eq!(d.check(), Ok(()));
        c.cancel();
        assert_eq!(d.check(), Err(Stopped::Cancelled));
        let t = Cancel::within(Duration::ZERO);
        assert_eq!(t.check(), Err(Stopped::Deadline(Duration::ZERO)));
        assert_eq!(Cancel::within(Duration::from_secs(60)).check(), Ok(()));
        let e = Cancel::none();
        let timed = e.with_deadline(Duration::from_secs(60));
        assert_eq!(timed.check(), Ok(()));
        e.cancel();
        assert_eq!(timed.check(), Err(Stopped::Cancelled));
    }
}
