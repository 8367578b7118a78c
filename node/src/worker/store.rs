//! The held store: values a worker keeps for each requester (inputs it was sent, outputs it
//! computed), so that a later task names them instead of sending them again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use corvid_kernels::{ContentId, Tensor as Data};
use corvid_sdk::ValueId;
use libp2p::PeerId;

/// Values kept for requesters, by (requester, value id), oldest evicted first, at most `cap`
/// bytes; each with the content id its receipts name (its hash, or the recipe it was made
/// from), so that it is not hashed again.
pub(super) struct Held {
    map: HashMap<(PeerId, ValueId), (Arc<Data>, ContentId)>,
    order: VecDeque<(PeerId, ValueId, u64)>,
    bytes: u64,
    cap: u64,
}

impl Held {
    pub(super) fn new(cap: u64) -> Held {
        Held {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    pub(super) fn get(&self, peer: PeerId, id: ValueId) -> Option<(Arc<Data>, ContentId)> {
        self.map.get(&(peer, id)).cloned()
    }

    /// Keeps `t` as `peer`'s value `id`, replacing what was kept under that id (a requester
    /// that sends data again means it).
    pub(super) fn put(&mut self, peer: PeerId, id: ValueId, t: Arc<Data>, cid: ContentId) {
        // Every entry is charged its bookkeeping, so empty tensors cannot pile up for free.
        let size = t.meta().bytes() + 128;
        if size > self.cap {
            return;
        }
        if let Some(old) = self.map.get_mut(&(peer, id)) {
            // The same id with the same size keeps its place; another size (a requester may
            // send anything under an id) is charged afresh below.
            if old.0.meta().bytes() == t.meta().bytes() {
                *old = (t, cid);
                return;
            }
            self.map.remove(&(peer, id));
            if let Some(k) = self
                .order
                .iter()
                .position(|&(p, v, _)| p == peer && v == id)
                && let Some((_, _, b)) = self.order.remove(k)
            {
                self.bytes -= b;
            }
        }
        while self.bytes + size > self.cap {
            let Some((p, v, b)) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&(p, v));
            self.bytes -= b;
        }
        self.map.insert((peer, id), (t, cid));
        self.order.push_back((peer, id, size));
        self.bytes += size;
    }
}
