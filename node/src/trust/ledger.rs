//! What the requester knows of each peer's honesty, across jobs: streaks of verified results
//! (which decide how often a result is replicated) and bans, persisted with their evidence.
//!
//! The ban file holds one JSON ban per line, appended as bans happen (a file of a JSON array,
//! as earlier versions wrote, is read too). Reasons and evidence are bounded before they are
//! kept: they quote what a peer sent, and a peer chooses how long that is.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{MIN_REPLICATION, NEW_PEER_STREAK};

/// Longest reason and evidence kept for a ban, in bytes.
pub const MAX_REASON_BYTES: usize = 512;
pub const MAX_EVIDENCE_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes (at a character boundary), saying how much was cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// A peer proven to have misbehaved, and the proof.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub peer: String,
    pub reason: String,
    /// What the peer signed and what it should have been: subgraph, op, index, values.
    pub evidence: String,
    pub unix_secs: u64,
}

/// What the requester knows of each peer's honesty, across jobs.
#[derive(Debug, Default)]
pub struct Trust {
    streaks: HashMap<PeerId, u32>,
    bans: BTreeMap<String, Ban>,
    file: Option<PathBuf>,
}

/// Why the ban file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("ban list '{path}': {reason}")]
pub struct BanFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl Trust {
    /// Trust state that persists bans to `file` (read now if it exists).
    pub fn with_file(file: &Path) -> Result<Trust, BanFileError> {
        let err = |reason: String| BanFileError {
            path: file.to_path_buf(),
            reason,
        };
        let bans: Vec<Ban> = match std::fs::read(file) {
            Ok(bytes) if bytes.trim_ascii_start().starts_with(b"[") => {
                serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?
            }
            Ok(bytes) => bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .filter(|(_, l)| !l.trim_ascii().is_empty())
                .map(|(i, l)| {
                    serde_json::from_slice(l).map_err(|e| err(format!("line {}: {e}", i + 1)))
                })
                .collect::<Result<_, _>>()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Trust {
            streaks: HashMap::new(),
            bans: bans.into_iter().map(|b| (b.peer.clone(), b)).collect(),
            file: Some(file.to_path_buf()),
        })
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.bans.contains_key(&peer.to_string())
    }

    pub fn bans(&self) -> impl Iterator<Item = &Ban> {
        self.bans.values()
    }

    /// Bans `peer` with the evidence, and saves the list. Returns false if it already was.
    pub fn ban(&mut self, peer: &PeerId, reason: &str, evidence: &str) -> bool {
        let key = peer.to_string();
        if self.bans.contains_key(&key) {
            return false;
        }
        let ban = Ban {
            peer: key.clone(),
            reason: bounded(reason, MAX_REASON_BYTES),
            evidence: bounded(evidence, MAX_EVIDENCE_BYTES),
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        tracing::warn!(%peer, reason = ban.reason, evidence = ban.evidence, "peer banned");
        self.streaks.remove(peer);
        if let Some(path) = &self.file
            && let Err(e) = append(path, &ban)
        {
            tracing::error!(path = %path.display(), error = %e, "could not save the ban");
        }
        self.bans.insert(key, ban);
        true
    }

    /// A verified result from `peer`.
    pub fn credit(&mut self, peer: &PeerId) {
        *self.streaks.entry(*peer).or_default() += 1;
    }

    pub fn streak(&self, peer: &PeerId) -> u32 {
        self.streaks.get(peer).copied().unwrap_or(0)
    }

    /// Whether to replicate a result of `peer`: always while it is new, then with probability
    /// `max(MIN_REPLICATION, 1/streak)`.
    pub fn replicate(&self, peer: &PeerId, rng: &mut impl Rng) -> bool {
        let s = self.streak(peer);
        s < NEW_PEER_STREAK || rng.random::<f64>() < MIN_REPLICATION.max(1.0 / f64::from(s))
    }
}

/// Appends `ban` to the file at `path` as one line (created if missing).
fn append(path: &Path, ban: &Ban) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(ban).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    // One write: concurrent appenders (two requesters sharing a file) never interleave lines.
    f.write_all(&line)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bans_persist_with_their_evidence_and_streaks_set_replication() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        let cheat = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let honest = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let mut t = Trust::with_file(&path).unwrap();
        assert!(t.ban(&cheat, "wrong result (freivalds)", "row 3: got 1, want 2"));
        assert!(!t.ban(&cheat, "again", ""), "a second ban changes nothing");
        // Evidence quoting a peer's endless list is kept bounded; bans are appended, a line
        // each, not rewritten.
        let liar = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let endless = "1, ".repeat(1 << 20);
        assert!(t.ban(&liar, &endless, &endless));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{}", &text[..200.min(text.len())]);
        assert!(text.len() < MAX_REASON_BYTES + MAX_EVIDENCE_BYTES + 1024);
        let back = Trust::with_file(&path).unwrap();
        assert!(back.is_banned(&cheat) && back.is_banned(&liar) && !back.is_banned(&honest));
        let ban = back.bans().find(|b| b.peer == cheat.to_string()).unwrap();
        assert_eq!(ban.evidence, "row 3: got 1, want 2");
        let long = back.bans().find(|b| b.peer == liar.to_string()).unwrap();
        assert!(
            long.evidence.ends_with("more bytes)"),
            "{}",
            long.evidence.len()
        );
        // A list as earlier versions wrote it is read too.
        std::fs::write(&path, serde_json::to_vec(&[ban]).unwrap()).unwrap();
        assert!(Trust::with_file(&path).unwrap().is_banned(&cheat));
        // A corrupt file is an error that names it, not an empty list.
        std::fs::write(&path, b"{not json").unwrap();
        let e = Trust::with_file(&path).unwrap_err();
        assert!(e.to_string().contains("bans.json"), "{e}");

        // New peers are always replicated; trusted ones about 1 in max(20, streak).
        let mut t = Trust::default();
        let mut rng = rand::rng();
        assert!((0..100).all(|_| t.replicate(&honest, &mut rng)));
        for _ in 0..100 {
            t.credit(&honest);
        }
        let n = (0..10_000)
            .filter(|_| t.replicate(&honest, &mut rng))
            .count();
        assert!((300..700).contains(&n), "{n} of 10000 at streak 100");
    }
}
