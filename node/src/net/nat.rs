//! Reachability and NAT traversal, owned by the event loop: what AutoNAT v2 probes found, the
//! relay slots this node holds while peers cannot dial it, and the path of every connection
//! (direct, hole-punched by DCUtR, or relayed).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, autonat, dcutr, kad, relay};

use super::Behaviour;
use crate::peers::PeerPath;
use crate::status::Reachability;

/// The protocol AutoNAT v2 servers answer on.
const AUTONAT_DIAL_REQUEST: StreamProtocol = StreamProtocol::new("/libp2p/autonat/2/dial-request");
/// The protocol relays (circuit relay v2) answer reservations on.
const RELAY_HOP: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");
/// Relays an unreachable node holds a slot on: one to be reached, a second in case it goes.
const RELAY_SLOTS: usize = 2;
/// A task for a peer reached only through a relay waits this long for hole punching to give a
/// direct connection, then goes through the relay. A punch that works takes a few round trips
/// (milliseconds in the namespace test); one that fails is often only known when its dial
/// times out, so the wait is what a peer behind a symmetric NAT costs a job once. A task sent
/// on the relay just before a punch succeeds is sent again on the direct connection.
pub(crate) const HOLE_PUNCH_WAIT: Duration = Duration::from_secs(2);

/// One connection of ours.
struct Conn {
    peer: PeerId,
    path: PeerPath,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Nat {
    /// Whether this node holds relay slots while it cannot be dialled: a worker must be
    /// reachable, a requester only dials out.
    wants_slots: bool,
    reachability: Reachability,
    /// A peer saw us at an IP address that is none of ours: a NAT rewrote it.
    behind_nat: bool,
    /// Peers we have a direct connection to that we dialled, at the address we dialled; peers
    /// dialled to be asked about our reachability (once each).
    dialled: HashMap<PeerId, Multiaddr>,
    autonat_dials: HashSet<PeerId>,
    /// Peers that relay, at the address we dialled them at.
    relays: HashMap<PeerId, Multiaddr>,
    /// Relays we listen through (a reservation asked for or held), and the circuit
    /// addresses they gave us.
    reserved: HashMap<PeerId, ListenerId>,
    circuits: Vec<Multiaddr>,
    conns: HashMap<ConnectionId, Conn>,
    /// Peers a hole punch to failed: their tasks go through the relay at once.
    punch_failed: HashSet<PeerId>,
    /// Whether we relay for others, once no relayed connection is open (see
    /// [`Nat::set_relaying`]).
    relaying_wanted: Option<bool>,
    /// Counts for the status: hole punches that succeeded and failed.
    punched: u64,
    punch_failures: u64,
}

impl Nat {
    pub fn new(wants_slots: bool) -> Nat {
        Nat {
            wants_slots,
            ..Nat::default()
        }
    }

    pub fn reachability(&self) -> &Reachability {
        &self.reachability
    }

    /// The circuit addresses relays gave this node (`…/p2p/RELAY/p2p-circuit`).
    pub fn circuits(&self) -> &[Multiaddr] {
        &self.circuits
    }

    /// (succeeded, failed) hole punches.
    pub fn punches(&self) -> (u64, u64) {
        (self.punched, self.punch_failures)
    }

    pub fn established(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let path = if endpoint.is_relayed() {
            PeerPath::Relayed
        } else {
            PeerPath::Direct
        };
        if let (ConnectedPoint::Dialer { address, .. }, PeerPath::Direct) = (endpoint, path) {
            self.dialled.insert(peer, strip_p2p(address));
        }
        self.conns.insert(
            id,
            Conn {
                peer,
                path,
                since: Instant::now(),
            },
        );
    }

    pub fn closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        id: ConnectionId,
        remaining: u32,
    ) {
        self.conns.remove(&id);
        if let Some(on) = self.relaying_wanted {
            self.set_relaying(swarm, on);
        }
        if remaining == 0 {
            self.dialled.remove(&peer);
            self.autonat_dials.remove(&peer);
            self.punch_failed.remove(&peer);
        }
    }

    /// The best path we have to `peer`, if connected.
    pub fn path(&self, peer: &PeerId) -> Option<PeerPath> {
        self.conns
            .values()
            .filter(|c| c.peer == *peer)
            .map(|c| c.path)
            .max_by_key(|p| match p {
                PeerPath::Relayed => 0,
                PeerPath::Direct => 1,
                PeerPath::HolePunched => 2,
            })
    }

    /// Whether a task for `peer` should wait a little: it is reached only through a relay,
    /// and hole punching may still give a direct connection.
    pub fn direct_soon(&self, peer: &PeerId) -> bool {
        if self.punch_failed.contains(peer) {
            return false;
        }
        let mut relayed = self.conns.values().filter(|c| c.peer == *peer).peekable();
        relayed.peek().is_some()
            && relayed.all(|c| c.path == PeerPath::Relayed && c.since.elapsed() < HOLE_PUNCH_WAIT)
    }

    /// A dial to `peer` failed: while it is reached only through a relay, that was likely a
    /// hole punch (the side that did not start it hears of no other failure), so its tasks
    /// stop waiting for one.
    pub fn dial_failed(&mut self, peer: PeerId) {
        if self.conns.values().any(|c| c.peer == peer)
            && self
                .conns
                .values()
                .all(|c| c.peer != peer || c.path == PeerPath::Relayed)
        {
            self.punch_failed.insert(peer);
        }
    }

    /// A peer told us what it speaks and where it listens.
    pub fn identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        info: &libp2p::identify::Info,
    ) {
        // AutoNAT v2 servers answer only on connections the asking peer dialled: while our
        // verdict is pending, dial (once) each peer that serves it and that only dialled us,
        // so that a node others dial also gets asked about.
        if self.reachability == Reachability::Checking
            && info.protocols.contains(&AUTONAT_DIAL_REQUEST)
            && !self.dialled.contains_key(&peer)
            && self.autonat_dials.insert(peer)
        {
            let _ = swarm.dial(
                DialOpts::peer_id(peer)
                    .addresses(info.listen_addrs.clone())
                    .condition(PeerCondition::Always)
                    .build(),
            );
        }
        if info.protocols.contains(&RELAY_HOP) {
            if !self.relays.contains_key(&peer) {
                // The address we dialled it at, else one it listens on that is not loopback.
                let addr = self.dialled.get(&peer).cloned().or_else(|| {
                    info.listen_addrs
                        .iter()
                        .find(|a| !is_relayed(a) && !is_loopback(a))
                        .cloned()
                });
                if let Some(addr) = addr {
                    tracing::debug!(%peer, %addr, "peer relays");
                    self.relays.insert(peer, addr);
                }
            }
            self.reserve(swarm);
        } else if self.relays.remove(&peer).is_some() {
            tracing::debug!(%peer, "peer stopped relaying");
        }
    }

    /// A peer saw us at `observed`. If that IP address is none of ours, a NAT rewrote it: peers
    /// most likely cannot dial us, so a relay slot is taken at once rather than after the
    /// probes time out (dropped again if they succeed).
    pub fn observed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        observed: &Multiaddr,
        ours: &[Multiaddr],
    ) {
        let ip = |a: &Multiaddr| {
            a.iter().find_map(|p| match p {
                Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            })
        };
        let Some(seen) = ip(observed).filter(|_| !is_relayed(observed)) else {
            return;
        };
        if self.behind_nat || ours.iter().any(|a| ip(a) == Some(seen)) {
            return;
        }
        self.behind_nat = true;
        // Peers would put the addresses it listens on, which they cannot dial, in their
        // routing tables: answer no DHT queries unless a probe shows peers can dial us.
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
        tracing::info!(%observed, "behind NAT: peers see this node at {observed}, an address it does not have; checking whether they can dial it{}",
            if self.wants_slots { ", with a relay slot meanwhile" } else { "" });
        self.reserve(swarm);
    }

    /// Whether the relay circuits should be advertised: peers cannot (or may not) dial us.
    pub fn needs_relay(&self) -> bool {
        match self.reachability {
            Reachability::Reachable { .. } => false,
            Reachability::Unreachable { .. } => true,
            Reachability::Checking => self.behind_nat,
        }
    }

    /// Offers relaying (circuit relay v2) to peers, or stops: only while peers can dial this
    /// node directly (a relay address of its own does not count, as libp2p would count it).
    /// libp2p-relay 0.22 tells every connection's handler of the change, including relayed
    /// connections, whose handler cannot take it and panics: the change waits until no
    /// relayed connection is open.
    fn set_relaying(&mut self, swarm: &mut Swarm<Behaviour>, on: bool) {
        if self.conns.values().any(|c| c.path == PeerPath::Relayed) {
            self.relaying_wanted = Some(on);
            return;
        }
        self.relaying_wanted = None;
        if let Some(relay) = swarm.behaviour_mut().relay.as_mut() {
            relay.set_status(Some(if on {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
        }
    }

    /// While peers cannot dial us, hold a slot on up to [`RELAY_SLOTS`] relays.
    fn reserve(&mut self, swarm: &mut Swarm<Behaviour>) {
        if !self.wants_slots || !self.needs_relay() {
            return;
        }
        let wanted: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reserved.contains_key(p))
            .take(RELAY_SLOTS.saturating_sub(self.reserved.len()))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (relay, addr) in wanted {
            let circuit = strip_p2p(&addr)
                .with(Protocol::P2p(relay))
                .with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::debug!(%circuit, "asking for a relay slot");
                    self.reserved.insert(relay, id);
                }
                Err(e) => tracing::warn!(%circuit, error = %e, "cannot ask for a relay slot"),
            }
        }
    }

    /// A listener closed: if it was a relay slot, look for another.
    pub fn listener_closed(&mut self, swarm: &mut Swarm<Behaviour>, id: ListenerId) {
        let Some(relay) = self
            .reserved
            .iter()
            .find_map(|(p, l)| (*l == id).then_some(*p))
        else {
            return;
        };
        tracing::info!(%relay, "relay slot closed");
        self.reserved.remove(&relay);
        // Not asked again until it says it relays again (identify): a relay that refuses or
        // cannot be reached is not retried in a loop.
        self.relays.remove(&relay);
        self.circuits
            .retain(|c| !c.iter().any(|p| p == Protocol::P2p(relay)));
        self.reserve(swarm);
    }

    /// A new listen address: a circuit address is where peers now reach us through a relay.
    pub fn listening(&mut self, address: &Multiaddr) -> bool {
        if !is_relayed(address) {
            return false;
        }
        let address = strip_trailing_p2p(address);
        if self.circuits.contains(&address) {
            return false;
        }
        tracing::info!(%address, "reachable through a relay at {address}");
        self.circuits.push(address);
        true
    }

    /// A peer dialled us back at `address`: others can reach us there. Relay addresses the
    /// relay client confirms are not direct reachability.
    pub fn confirmed(&mut self, swarm: &mut Swarm<Behaviour>, address: &Multiaddr) {
        if is_relayed(address) {
            return;
        }
        let address = address.to_string();
        match &mut self.reachability {
            Reachability::Reachable { addrs } => {
                if !addrs.contains(&address) {
                    addrs.push(address.clone());
                }
            }
            other => {
                tracing::info!(%address, "reachable: peers can dial this node at {address}");
                *other = Reachability::Reachable {
                    addrs: vec![address.clone()],
                };
                // Others can reach us: answer DHT queries, relay for those they cannot reach,
                // and need no relay slot of our own.
                swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
                self.set_relaying(swarm, true);
                for (relay, listener) in self.reserved.drain() {
                    tracing::debug!(%relay, "relay slot no longer needed");
                    swarm.remove_listener(listener);
                }
                self.circuits.clear();
            }
        }
    }

    pub fn expired(&mut self, swarm: &mut Swarm<Behaviour>, address: &Multiaddr) {
        if let Reachability::Reachable { addrs } = &mut self.reachability {
            addrs.retain(|a| *a != address.to_string());
            if addrs.is_empty() {
                self.reachability = Reachability::Checking;
                self.set_relaying(swarm, false);
            }
        }
    }

    /// An AutoNAT probe: a peer tried to dial us back at an address it saw us at.
    pub fn probed(&mut self, swarm: &mut Swarm<Behaviour>, e: autonat::v2::client::Event) {
        let Err(error) = e.result else {
            return; // a success also confirms the address (`ExternalAddrConfirmed`)
        };
        // A peer that reached us through a relay saw us at a circuit address: testing it says
        // nothing about dialling us directly.
        if is_relayed(&e.tested_addr) {
            return;
        }
        tracing::debug!(tested = %e.tested_addr, server = %e.server, %error, "reachability probe failed");
        if matches!(self.reachability, Reachability::Reachable { .. }) {
            return;
        }
        let first = self.reachability == Reachability::Checking;
        let port = e.tested_addr.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        });
        self.reachability = Reachability::Unreachable {
            tested: e.tested_addr.to_string(),
            error: error.to_string(),
        };
        if first {
            // Nobody can dial us to ask: stop answering DHT queries (peers would add an
            // address they cannot reach to their routing tables).
            swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
            let relays = if !self.wants_slots {
                "it dials out to its peers and needs no more".to_string()
            } else if self.relays.is_empty() {
                "no relay known yet: one is used as soon as a peer offers it".to_string()
            } else {
                format!(
                    "peers reach it through a relay ({} known)",
                    self.relays.len()
                )
            };
            tracing::warn!(tested = %e.tested_addr, "not reachable from outside: {} could not dial this node back at {} (behind NAT or a firewall): {relays}. To accept direct connections, {}or pass --external-addr",
                e.server, e.tested_addr,
                port.map(|p| format!("forward TCP port {p} to this machine ")).unwrap_or_default());
            self.reserve(swarm);
        }
    }

    /// A hole punch ended: on success the relayed connections to that peer are closed, so that
    /// everything takes the direct one.
    pub fn hole_punch(&mut self, swarm: &mut Swarm<Behaviour>, e: dcutr::Event) {
        let peer = e.remote_peer_id;
        match e.result {
            Ok(id) => {
                self.punched += 1;
                if let Some(c) = self.conns.get_mut(&id) {
                    c.path = PeerPath::HolePunched;
                }
                let relayed: Vec<ConnectionId> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.peer == peer && c.path == PeerPath::Relayed)
                    .map(|(id, _)| *id)
                    .collect();
                tracing::info!(%peer, "hole punched: a direct connection replaces the relayed one");
                for id in relayed {
                    swarm.close_connection(id);
                }
            }
            Err(error) => {
                self.punch_failures += 1;
                self.punch_failed.insert(peer);
                tracing::info!(%peer, %error, "hole punching failed: staying on the relay");
            }
        }
    }

    pub fn relay_client_event(&mut self, e: relay::client::Event) {
        match e {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            } => tracing::info!(relay = %relay_peer_id, "holding a slot on a relay"),
            other => tracing::debug!(event = ?other, "relay client"),
        }
    }
}

/// The addresses of a peer worth dialling: every direct one and the first relay circuit. Two
/// circuits dialled at once would give two relayed connections, whose two hole punches race
/// for the same ports and both fail.
pub(crate) fn dial_addrs(addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let mut relayed = false;
    addrs
        .into_iter()
        .filter(|a| !is_relayed(a) || !std::mem::replace(&mut relayed, true))
        .collect()
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// `addr` without a trailing `/p2p/…`.
fn strip_trailing_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// `addr` up to its first `/p2p/…`.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .take_while(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// A loopback IP address.
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified_and_trimmed() {
        let relay = PeerId::random();
        let me = PeerId::random();
        let circuit: Multiaddr =
            format!("/ip4/10.77.3.2/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{me}")
                .parse()
                .unwrap();
        assert!(is_relayed(&circuit));
        assert_eq!(
            strip_trailing_p2p(&circuit).to_string(),
            format!("/ip4/10.77.3.2/tcp/4001/p2p/{relay}/p2p-circuit")
        );
        assert_eq!(strip_p2p(&circuit).to_string(), "/ip4/10.77.3.2/tcp/4001");
        let direct: Multiaddr = "/ip4/10.77.3.2/tcp/4001".parse().unwrap();
        assert!(!is_relayed(&direct));
        assert!(!is_loopback(&direct));
        let other: Multiaddr = format!("/ip4/10.77.4.2/tcp/4001/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(
            dial_addrs(vec![circuit.clone(), direct.clone(), other]),
            vec![circuit, direct],
            "one relay circuit at a time"
        );
        assert!(is_loopback(&"/ip4/127.0.0.1/tcp/1".parse().unwrap()));
    }
}
