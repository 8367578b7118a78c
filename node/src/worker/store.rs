//! The held store: values a worker keeps for each requester (inputs it was sent, outputs it
//! computed), so that a later task names them instead of sending them again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use corvid_kernels::{ContentId, Tensor as Data};
use corvid_sdk::ValueId;
use libp2p::PeerId;

/// One kept value, its content id, the bytes it is charged and its generation (a value kept
/// again under the same id is a new generation; older queue entries for it are stale).
struct Entry {
    data: Arc<Data>,
    cid: ContentId,
    size: u64,
    generation: u64,
}

/// Values kept for requesters, by (requester, value id), oldest evicted first, at most `cap`
/// bytes in all and `cap / 2` for any one requester (a requester's values beyond that evict
/// its own oldest, not others'); each with the content id its receipts name (its hash, or the
/// recipe it was made from), so that it is not hashed again. A value sent again under an id
/// is charged again, whatever its size.
pub(super) struct Held {
    map: HashMap<(PeerId, ValueId), Entry>,
    /// Outputs also known by their content id (as a constant with those values is named):
    /// the id they are kept under. An alias whose value is gone finds nothing.
    aliases: HashMap<(PeerId, ValueId), ValueId>,
    /// Keys oldest first, with the generation queued (stale entries are skipped).
    order: VecDeque<(PeerId, ValueId, u64)>,
    /// The same, per requester.
    by_peer: HashMap<PeerId, (u64, VecDeque<(ValueId, u64)>)>,
    bytes: u64,
    cap: u64,
    next_generation: u64,
}

impl Held {
    pub(super) fn new(cap: u64) -> Held {
        Held {
            map: HashMap::new(),
            aliases: HashMap::new(),
            order: VecDeque::new(),
            by_peer: HashMap::new(),
            bytes: 0,
            cap,
            next_generation: 0,
        }
    }

    /// Most bytes one requester's values may take.
    fn share(&self) -> u64 {
        self.cap / 2
    }

    pub(super) fn get(&self, peer: PeerId, id: ValueId) -> Option<(Arc<Data>, ContentId)> {
        let e = self.map.get(&(peer, id)).or_else(|| {
            let kept = self.aliases.get(&(peer, id))?;
            // Only while the value kept there is still the one the alias names (the same id
            // may have been given other values since).
            self.map
                .get(&(peer, *kept))
                .filter(|e| ValueId::from(e.cid) == id)
        })?;
        Some((e.data.clone(), e.cid))
    }

    /// Lets `peer` name its value `id` by the content id `cid` too (a later job's constant with
    /// those values: the next training step's weights). Only content ids are aliases, so what
    /// an alias finds is exactly what it names.
    pub(super) fn alias(&mut self, peer: PeerId, cid: ContentId, id: ValueId) {
        let alias = ValueId::from(cid);
        if alias == id {
            return;
        }
        // Dangling ones (their value evicted or replaced) are dropped once they outnumber
        // the values: the live ones are at most one per value.
        if self.aliases.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.aliases.retain(|k, v| {
                map.get(&(k.0, *v))
                    .is_some_and(|e| ValueId::from(e.cid) == k.1)
            });
        }
        self.aliases.insert((peer, alias), id);
    }

    /// Bytes held for `peer`, and in all.
    #[cfg(test)]
    fn bytes(&self, peer: &PeerId) -> (u64, u64) {
        (self.by_peer.get(peer).map_or(0, |p| p.0), self.bytes)
    }

    fn remove(&mut self, peer: PeerId, id: ValueId) {
        if let Some(e) = self.map.remove(&(peer, id)) {
            self.bytes -= e.size;
            if let Some(p) = self.by_peer.get_mut(&peer) {
                p.0 -= e.size;
                if p.0 == 0 {
                    self.by_peer.remove(&peer);
                }
            }
        }
    }

    /// Whether (`peer`, `id`) at `generation` is what the store holds now.
    fn current(&self, peer: PeerId, id: ValueId, generation: u64) -> bool {
        self.map
            .get(&(peer, id))
            .is_some_and(|e| e.generation == generation)
    }

    /// Evicts `peer`'s oldest value; false if it has none.
    fn evict_oldest_of(&mut self, peer: PeerId) -> bool {
        loop {
            let Some((id, generation)) = self.by_peer.get_mut(&peer).and_then(|p| p.1.pop_front())
            else {
                return false;
            };
            if self.current(peer, id, generation) {
                self.remove(peer, id);
                return true;
            }
        }
    }

    /// Evicts the oldest value of anyone's; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((peer, id, generation)) = self.order.pop_front() {
            if self.current(peer, id, generation) {
                self.remove(peer, id);
                return true;
            }
        }
        false
    }

    /// Keeps `t` as `peer`'s value `id`, replacing what was kept under that id (a requester
    /// that sends data again means it).
    pub(super) fn put(&mut self, peer: PeerId, id: ValueId, t: Arc<Data>, cid: ContentId) {
        // Every entry is charged its bookkeeping, so empty tensors cannot pile up for free.
        let size = t.meta().bytes() + 128;
        if size > self.share() {
            return;
        }
        self.remove(peer, id);
        while self.by_peer.get(&peer).map_or(0, |p| p.0) + size > self.share() {
            if !self.evict_oldest_of(peer) {
                break;
            }
        }
        while self.bytes + size > self.cap {
            if !self.evict_oldest() {
                break;
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.map.insert(
            (peer, id),
            Entry {
                data: t,
                cid,
                size,
                generation,
            },
        );
        self.order.push_back((peer, id, generation));
        let p = self.by_peer.entry(peer).or_default();
        p.0 += size;
        p.1.push_back((id, generation));
        self.bytes += size;
        // Stale queue entries (values replaced or evicted through the other queue) are
        // dropped once they outnumber the live ones.
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order
                .retain(|&(p, v, g)| map.get(&(p, v)).is_some_and(|e| e.generation == g));
            for (peer, (_, q)) in &mut self.by_peer {
                q.retain(|&(v, g)| map.get(&(*peer, v)).is_some_and(|e| e.generation == g));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn value(floats: usize) -> Arc<Data> {
        Arc::new(Data::full(vec![floats], 1.0))
    }

    fn id(n: u8) -> ValueId {
        ValueId([n; 32])
    }

    #[test]
    fn an_alias_finds_only_the_values_it_names() {
        let mut h = Held::new(1 << 20);
        let peer = PeerId::random();
        let (one, two) = (value(10), Arc::new(Data::full(vec![10], 2.0)));
        let (c1, c2) = (one.content_id(), two.content_id());
        h.put(peer, id(1), one, c1);
        h.alias(peer, c1, id(1));
        assert!(h.get(peer, ValueId::from(c1)).is_some());
        // The same id given other values: the old alias finds nothing, the new one finds them.
        h.put(peer, id(1), two, c2);
        h.alias(peer, c2, id(1));
        assert!(h.get(peer, ValueId::from(c1)).is_none());
        assert_eq!(h.get(peer, ValueId::from(c2)).unwrap().1, c2);
        // Another requester cannot use them.
        assert!(h.get(PeerId::random(), ValueId::from(c2)).is_none());
        // Stale aliases do not pile up.
        for n in 0..5000u32 {
            let t = Arc::new(Data::full(vec![1], n as f32));
            let c = t.content_id();
            h.put(peer, id(1), t, c);
            h.alias(peer, c, id(1));
        }
        assert!(
            h.aliases.len() <= 2 * h.map.len() + 1025,
            "{}",
            h.aliases.len()
        );
    }

    #[test]
    fn each_requester_gets_at_most_half_and_resent_ids_are_recounted() {
        // 1000 floats is 4128 bytes charged; the store takes 5 of them, one requester 2.
        let mut h = Held::new(5 * 4128 + 100);
        let (a, b) = (PeerId::random(), PeerId::random());
        let cid = ContentId([0; 32]);
        for n in 0..2 {
            h.put(b, id(n), value(1000), cid);
        }
        // A floods the store: it evicts only its own values, B keeps both of its.
        for n in 0..50 {
            h.put(a, id(100 + n), value(1000), cid);
        }
        assert!(h.get(b, id(0)).is_some() && h.get(b, id(1)).is_some());
        assert!(h.get(a, id(149)).is_some() && h.get(a, id(147)).is_none());
        assert_eq!(h.bytes(&a).0, 2 * 4128);
        // The same id sent again, larger, is charged at its new size (and still within A's
        // share).
        h.put(a, id(149), value(2000), cid);
        assert_eq!(h.bytes(&a).0, 8128);
        assert!(h.get(a, id(148)).is_none(), "A's older value made room");
        let (_, total) = h.bytes(&a);
        assert_eq!(total, 8128 + 2 * 4128);
        // Many replacements leave no stale bookkeeping behind.
        for _ in 0..1000 {
            h.put(b, id(0), value(10), cid);
        }
        assert!(h.order.len() <= 2 * h.map.len() + 65, "{}", h.order.len());
    }
}
