//! What a job did, as the developer reads it: per place, per check, and what ran here.

use std::collections::BTreeMap;
use std::time::Duration;

use corvid_sdk::sched::Place;

/// What one place did in a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlaceSummary {
    pub tasks: usize,
    pub flops: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub busy: Duration,
    pub failures: usize,
    /// Of `bytes_in`, bytes sent a second time in full because the peer did not hold
    /// values it was named (evicted, or not arrived yet).
    pub resent: u64,
    /// How the requester was connected to the peer at the end of the job (direct,
    /// hole-punched or relayed); `None` for the requester itself or a peer gone.
    pub path: Option<crate::peers::PeerPath>,
}

/// How the job's results were verified.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifySummary {
    /// Results checked, by how.
    pub freivalds: usize,
    pub sampled_rows: usize,
    pub recomputed: usize,
    /// Canary tasks (fresh random inputs, answer known here) sent to peers.
    pub canaries: usize,
    /// Results also run on a second peer, and how many of those agreed.
    pub replicated: usize,
    pub replicas_agreed: usize,
    /// Disagreements between two peers, settled by a local recompute.
    pub disputes: usize,
    /// Each refused result: peer, reason, evidence.
    pub detections: Vec<String>,
    /// Peers banned during the job.
    pub bans: Vec<String>,
    /// Subgraphs run again because their producer was banned.
    pub reopened: usize,
    /// Requester time spent checking and hashing results: the elapsed time of each check,
    /// summed over checks that ran at the same time. A check uses all cores for its span, so
    /// on an idle machine this is close to the wall time it adds; on a loaded one it includes
    /// waiting for a core.
    pub check_time: Duration,
    /// FLOPs run remotely only to check (replicas).
    pub extra_remote_flops: u64,
}

/// What happened in one job: which peer did what, bytes moved, time, re-dispatches, checks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSummary {
    pub subgraphs: usize,
    /// Subgraphs whose verified result was already cached on the requester.
    pub cached: usize,
    pub wall: Duration,
    /// Per place: a peer (by its printed id) or the requester itself.
    pub places: BTreeMap<Place<String>, PlaceSummary>,
    /// Subgraph index and why it ran again.
    pub redispatches: Vec<(usize, String)>,
    pub verify: VerifySummary,
    /// Subgraphs with arithmetic that ran on the requester (only with local execution
    /// allowed), and pure data-movement ones (assembling tiles, slicing) that always do.
    pub local_compute: usize,
    pub local_moves: usize,
}

impl std::fmt::Display for JobSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} subgraphs ({} cached) in {:.3} s",
            self.subgraphs,
            self.cached,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:<54} {:>6} {:>9} {:>9} {:>9} {:>7}  path",
            "place", "tasks", "GFLOP", "MiB in", "MiB out", "failed"
        )?;
        for (place, s) in &self.places {
            let place = match place {
                Place::Local => "requester (this machine)",
                Place::Peer(id) => id,
            };
            writeln!(
                f,
                "{:<54} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>7}  {}",
                place,
                s.tasks,
                s.flops as f64 / 1e9,
                s.bytes_in as f64 / (1 << 20) as f64,
                s.bytes_out as f64 / (1 << 20) as f64,
                s.failures,
                s.path.map_or(String::new(), |p| p.to_string())
            )?;
        }
        let resent: u64 = self.places.values().map(|p| p.resent).sum();
        if resent > 0 {
            writeln!(
                f,
                "{resent} bytes sent again in full to workers that did not hold what they were \
                 named (in MiB in)"
            )?;
        }
        if self.local_moves > 0 {
            writeln!(
                f,
                "{} data-movement subgraph(s) (assembly, slicing: no arithmetic) ran on the \
                 requester",
                self.local_moves
            )?;
        }
        if self.local_compute > 0 {
            writeln!(
                f,
                "{} subgraph(s) with arithmetic ran on the requester, not on a worker (local \
                 execution allowed)",
                self.local_compute
            )?;
        }
        let v = &self.verify;
        writeln!(
            f,
            "verified: {} freivalds, {} sampled rows, {} recomputed, {} canaries; {} replicated \
             ({} agreed), {} disputes; checks and hashing ran {:.1} ms ({:.1} % of wall, summed over \
             concurrent checks), \
             {:.2} GFLOP of extra remote work",
            v.freivalds,
            v.sampled_rows,
            v.recomputed,
            v.canaries,
            v.replicated,
            v.replicas_agreed,
            v.disputes,
            v.check_time.as_secs_f64() * 1e3,
            100.0 * v.check_time.as_secs_f64() / self.wall.as_secs_f64().max(1e-9),
            v.extra_remote_flops as f64 / 1e9
        )?;
        for d in &v.detections {
            writeln!(f, "detected: {d}")?;
        }
        for b in &v.bans {
            writeln!(f, "banned: {b}")?;
        }
        if v.reopened > 0 {
            writeln!(f, "re-ran {} subgraphs of banned peers", v.reopened)?;
        }
        for (sg, why) in &self.redispatches {
            writeln!(f, "re-dispatched subgraph {sg}: {why}")?;
        }
        Ok(())
    }
}

impl JobSummary {
    /// The summary of a job started with `Graph::submit` on a swarm client, once it ended.
    pub fn of(job: &corvid_sdk::JobHandle) -> Option<JobSummary> {
        job.state().report::<JobSummary>().map(|s| (*s).clone())
    }

    /// The summary of the job whose state this is (see [`JobSummary::of`]).
    pub fn of_state(state: &corvid_sdk::JobState) -> Option<JobSummary> {
        state.report::<JobSummary>().map(|s| (*s).clone())
    }

    /// Several jobs as one: counts, bytes and times summed per place and check (wall times
    /// too, so for jobs that ran at once the wall is their sum, not the time they took).
    pub fn total<'a>(jobs: impl IntoIterator<Item = &'a JobSummary>) -> JobSummary {
        let mut t = JobSummary::default();
        for j in jobs {
            t.subgraphs += j.subgraphs;
            t.cached += j.cached;
            t.wall += j.wall;
            t.local_compute += j.local_compute;
            t.local_moves += j.local_moves;
            t.redispatches.extend(j.redispatches.iter().cloned());
            for (place, s) in &j.places {
                let p = t.places.entry(place.clone()).or_default();
                p.tasks += s.tasks;
                p.flops += s.flops;
                p.bytes_in += s.bytes_in;
                p.bytes_out += s.bytes_out;
                p.busy += s.busy;
                p.failures += s.failures;
                p.resent += s.resent;
                p.path = s.path.or(p.path);
            }
            let (v, w) = (&mut t.verify, &j.verify);
            v.freivalds += w.freivalds;
            v.sampled_rows += w.sampled_rows;
            v.recomputed += w.recomputed;
            v.canaries += w.canaries;
            v.replicated += w.replicated;
            v.replicas_agreed += w.replicas_agreed;
            v.disputes += w.disputes;
            v.detections.extend(w.detections.iter().cloned());
            v.bans.extend(w.bans.iter().cloned());
            v.reopened += w.reopened;
            v.check_time += w.check_time;
            v.extra_remote_flops += w.extra_remote_flops;
        }
        t
    }
}
