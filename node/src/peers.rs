//! The peer table: the latest valid advert of every peer heard from, expired when silent, and
//! counts of refused adverts by reason. Owned by the network event loop; plain data, no tokio.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::advert::{Advert, Rejection};

/// One peer as shown by `corvid peers` and the control endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub backend: String,
    pub adapter: String,
    pub class: String,
    pub matmul_gflops: f32,
    pub elementwise_gbps: f32,
    pub memory_bytes: u64,
    pub slots_total: u32,
    pub slots_free: u32,
    pub contributes: bool,
    /// What one task may use on this peer.
    #[serde(default)]
    pub task_budget: Option<corvid_kernels::Budget>,
    pub seq: u64,
    /// Milliseconds since the last valid advert arrived.
    pub last_seen_ms: u64,
    /// How this node is connected to the peer, if it is.
    #[serde(default)]
    pub path: Option<PeerPath>,
}

impl PeerInfo {
    /// The row for `peer`'s advert `a`, last heard from `last_seen` ago.
    pub fn from_advert(peer: &PeerId, a: &Advert, last_seen: Duration) -> PeerInfo {
        PeerInfo {
            peer_id: peer.to_string(),
            backend: a.backend.to_string(),
            adapter: a.adapter.clone(),
            class: a.class.to_string(),
            matmul_gflops: a.matmul_gflops,
            elementwise_gbps: a.elementwise_gbps,
            memory_bytes: a.memory_bytes,
            slots_total: a.slots_total,
            slots_free: a.slots_free,
            contributes: a.contributes,
            task_budget: Some(a.task_budget.clone()),
            seq: a.seq,
            last_seen_ms: last_seen.as_millis() as u64,
            path: None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    advert: Advert,
    /// The advert as it travelled, signature and all: passed on to peers that join.
    signed: Arc<[u8]>,
    last_seen: Instant,
}

/// What [`PeerTable::accept`] did with an advert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A peer not in the table.
    New,
    /// A newer advert from a known peer whose offer changed.
    Changed,
    /// A newer advert with the same offer.
    Refreshed,
}

/// Latest adverts by peer, and rejection counts.
#[derive(Debug)]
pub struct PeerTable {
    entries: HashMap<PeerId, Entry>,
    rejections: BTreeMap<Rejection, u64>,
    max_peers: usize,
}

impl PeerTable {
    /// A table holding at most `max_peers` peers; adverts from further peers are dropped.
    pub fn new(max_peers: usize) -> PeerTable {
        PeerTable {
            entries: HashMap::new(),
            rejections: BTreeMap::new(),
            max_peers,
        }
    }

    /// Stores a validated advert unless it is older than (or as old as) the one held.
    pub fn accept(
        &mut self,
        peer: PeerId,
        advert: Advert,
        signed: Arc<[u8]>,
        now: Instant,
    ) -> Result<Accepted, Rejection> {
        if let Some(e) = self.entries.get_mut(&peer) {
            if advert.seq <= e.advert.seq && advert.timestamp_ms <= e.advert.timestamp_ms {
                return Err(Rejection::Replayed);
            }
            let changed = !same_offer(&e.advert, &advert);
            e.advert = advert;
            e.signed = signed;
            e.last_seen = now;
            return Ok(if changed {
                Accepted::Changed
            } else {
                Accepted::Refreshed
            });
        }
        if self.entries.len() >= self.max_peers {
            return Err(Rejection::TableFull);
        }
        self.entries.insert(
            peer,
            Entry {
                advert,
                signed,
                last_seen: now,
            },
        );
        Ok(Accepted::New)
    }

    /// Counts a refused advert.
    pub fn reject(&mut self, why: Rejection) {
        *self.rejections.entry(why).or_default() += 1;
    }

    /// Removes peers silent for longer than `expiry`, except those `connected` says are still
    /// connected (a live connection keeps a peer, whatever its advert's age); returns them.
    pub fn expire(
        &mut self,
        now: Instant,
        expiry: Duration,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Vec<PeerId> {
        let gone: Vec<PeerId> = self
            .entries
            .iter()
            .filter(|(p, e)| now.saturating_duration_since(e.last_seen) > expiry && !connected(p))
            .map(|(p, _)| *p)
            .collect();
        for p in &gone {
            self.entries.remove(p);
        }
        gone
    }

    /// Removes `peer` (it misbehaved); whether it was there.
    pub fn remove(&mut self, peer: &PeerId) -> bool {
        self.entries.remove(peer).is_some()
    }

    /// The peers in the table.
    pub fn peer_ids(&self) -> impl Iterator<Item = &PeerId> {
        self.entries.keys()
    }

    /// Every peer, fastest matmul first.
    pub fn list(&self, now: Instant) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .entries
            .iter()
            .map(|(p, e)| {
                PeerInfo::from_advert(p, &e.advert, now.saturating_duration_since(e.last_seen))
            })
            .collect();
        out.sort_by(|a, b| {
            b.matmul_gflops
                .total_cmp(&a.matmul_gflops)
                .then_with(|| a.peer_id.cmp(&b.peer_id))
        });
        out
    }

    /// The signed adverts heard most recently, newest first, at most `n`.
    pub fn signed_adverts(&self, n: usize) -> Vec<Arc<[u8]>> {
        let mut all: Vec<&Entry> = self.entries.values().collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
        all.into_iter().take(n).map(|e| e.signed.clone()).collect()
    }

    /// The sequence number of `peer`'s advert in the table.
    pub fn seq(&self, peer: &PeerId) -> Option<u64> {
        self.entries.get(peer).map(|e| e.advert.seq)
    }

    /// Whether `peer` has an advert in the table.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.entries.contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many adverts were refused for `why`.
    pub fn rejection_count(&self, why: Rejection) -> u64 {
        self.rejections.get(&why).copied().unwrap_or(0)
    }

    /// Refused adverts by reason.
    pub fn rejections(&self) -> BTreeMap<String, u64> {
        self.rejections
            .iter()
            .map(|(k, v)| (k.name().to_string(), *v))
            .collect()
    }
}

/// Same offer, ignoring the timestamp and sequence number.
fn same_offer(a: &Advert, b: &Advert) -> bool {
    Advert {
        timestamp_ms: 0,
        seq: 0,
        ..a.clone()
    } == Advert {
        timestamp_ms: 0,
        seq: 0,
        ..b.clone()
    }
}

/// How this node reaches a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPath {
    /// A connection one side dialled.
    Direct,
    /// A direct connection made by hole punching through both NATs.
    HolePunched,
    /// Through a relay, within its limits.
    Relayed,
}

impl std::fmt::Display for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerPath::Direct => "direct",
            PeerPath::HolePunched => "hole-punched",
            PeerPath::Relayed => "relayed",
        })
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;
    use crate::advert::tests::sample;

    #[test]
    fn accepts_newer_refuses_replays_and_expires() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut t = PeerTable::new(8);
        let t0 = Instant::now();
        let mut a = sample(&key, 1000);
        assert_eq!(
            t.accept(peer, a.clone(), Arc::from(vec![]), t0),
            Ok(Accepted::New)
        );
        assert_eq!(
            t.accept(peer, a.clone(), Arc::from(vec![]), t0),
            Err(Rejection::Replayed)
        );
        a.seq += 1;
        a.timestamp_ms += 1;
        assert_eq!(
            t.accept(peer, a.clone(), Arc::from(vec![]), t0),
            Ok(Accepted::Refreshed)
        );
        a.seq += 1;
        a.slots_free = 1;
        assert_eq!(
            t.accept(peer, a, Arc::from(vec![]), t0),
            Ok(Accepted::Changed)
        );
        assert_eq!(t.list(t0)[0].slots_free, 1);
        let later = t0 + Duration::from_secs(5);
        assert!(
            t.expire(later, Duration::from_secs(10), |_| false)
                .is_empty()
        );
        assert!(
            t.expire(later, Duration::from_secs(1), |_| true).is_empty(),
            "a connected peer stays"
        );
        assert_eq!(
            t.expire(later, Duration::from_secs(1), |_| false),
            vec![peer]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded_and_counts_rejections() {
        let mut t = PeerTable::new(1);
        let now = Instant::now();
        for _ in 0..2 {
            let key = Keypair::generate_ed25519();
            let _ = t.accept(
                key.public().to_peer_id(),
                sample(&key, 1),
                Arc::from(vec![]),
                now,
            );
        }
        assert_eq!(t.len(), 1);
        t.reject(Rejection::BadSignature);
        t.reject(Rejection::BadSignature);
        assert_eq!(t.rejections()["bad_signature"], 2);
    }
}
