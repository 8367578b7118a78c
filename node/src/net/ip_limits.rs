//! Inbound connections per remote IP address: libp2p's `connection_limits` counts per peer id
//! and in total, and peer ids cost nothing to make, so one host could hold every pending
//! handshake slot with idle sockets, or every connection with sybil identities. This
//! behaviour refuses an inbound connection from an address that already has
//! `max_pending` handshakes under way or `max_established` connections open. This machine's
//! own loopback address (127.0.0.1, ::1) is not counted: local swarms and tests run there, and
//! it is not a stranger.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

/// Why an inbound connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub ip: IpAddr,
    pub what: &'static str,
    pub limit: u32,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} already has {} {}", self.ip, self.limit, self.what)
    }
}

impl std::error::Error for Exceeded {}

/// The per-address limits and what is counted against them.
#[derive(Debug)]
pub struct Behaviour {
    max_pending: u32,
    max_established: u32,
    pending: HashMap<ConnectionId, IpAddr>,
    established: HashMap<ConnectionId, IpAddr>,
    pending_per_ip: HashMap<IpAddr, u32>,
    established_per_ip: HashMap<IpAddr, u32>,
}

/// The IP address of `addr`, unless it is this machine's own loopback address.
fn counted_ip(addr: &Multiaddr) -> Option<IpAddr> {
    let ip = addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })?;
    let own = match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
    };
    (!own).then_some(ip)
}

fn take(
    map: &mut HashMap<ConnectionId, IpAddr>,
    counts: &mut HashMap<IpAddr, u32>,
    id: ConnectionId,
) {
    if let Some(ip) = map.remove(&id)
        && let Some(n) = counts.get_mut(&ip)
    {
        *n -= 1;
        if *n == 0 {
            counts.remove(&ip);
        }
    }
}

impl Behaviour {
    pub fn new(max_pending: u32, max_established: u32) -> Behaviour {
        Behaviour {
            max_pending,
            max_established,
            pending: HashMap::new(),
            established: HashMap::new(),
            pending_per_ip: HashMap::new(),
            established_per_ip: HashMap::new(),
        }
    }

    /// Connections from `ip` being set up, and established.
    pub fn counts(&self, ip: &IpAddr) -> (u32, u32) {
        (
            self.pending_per_ip.get(ip).copied().unwrap_or(0),
            self.established_per_ip.get(ip).copied().unwrap_or(0),
        )
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = counted_ip(remote) else {
            return Ok(());
        };
        let n = self.pending_per_ip.entry(ip).or_default();
        if *n >= self.max_pending {
            return Err(ConnectionDenied::new(Exceeded {
                ip,
                what: "connections being set up",
                limit: self.max_pending,
            }));
        }
        *n += 1;
        self.pending.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        take(&mut self.pending, &mut self.pending_per_ip, id);
        let Some(ip) = counted_ip(remote) else {
            return Ok(dummy::ConnectionHandler);
        };
        let n = self.established_per_ip.entry(ip).or_default();
        if *n >= self.max_established {
            return Err(ConnectionDenied::new(Exceeded {
                ip,
                what: "connections open",
                limit: self.max_established,
            }));
        }
        *n += 1;
        self.established.insert(id, ip);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Dialled by us: never refused, not counted against the remote.
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(c) => {
                take(
                    &mut self.established,
                    &mut self.established_per_ip,
                    c.connection_id,
                );
            }
            FromSwarm::ListenFailure(f) => {
                // A handshake that failed, or a connection another behaviour refused.
                take(&mut self.pending, &mut self.pending_per_ip, f.connection_id);
                take(
                    &mut self.established,
                    &mut self.established_per_ip,
                    f.connection_id,
                );
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_address_gets_its_share_and_this_machine_is_not_counted() {
        let mut b = Behaviour::new(2, 3);
        let local: Multiaddr = "/ip4/10.0.0.9/tcp/4001".parse().unwrap();
        let host: Multiaddr = "/ip4/203.0.113.7/tcp/5555".parse().unwrap();
        let other: Multiaddr = "/ip4/203.0.113.8/tcp/5555".parse().unwrap();
        let me: Multiaddr = "/ip4/127.0.0.1/tcp/5555".parse().unwrap();
        let peer = PeerId::random();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let (a, b2, c) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
            ConnectionId::new_unchecked(3),
        );
        b.handle_pending_inbound_connection(a, &local, &host)
            .unwrap();
        b.handle_pending_inbound_connection(b2, &local, &host)
            .unwrap();
        let e = b
            .handle_pending_inbound_connection(c, &local, &host)
            .unwrap_err();
        assert_eq!(e.downcast_ref::<Exceeded>().unwrap().ip, ip);
        b.handle_pending_inbound_connection(c, &local, &other)
            .unwrap();
        assert_eq!(b.counts(&ip), (2, 0));
        // Established: the handshake slot is freed, the connection counted.
        for (i, id) in [a, b2].into_iter().enumerate() {
            b.handle_established_inbound_connection(id, peer, &local, &host)
                .unwrap();
            assert_eq!(b.counts(&ip), (1 - i as u32, 1 + i as u32));
        }
        for n in 10..11 {
            let id = ConnectionId::new_unchecked(n);
            b.handle_pending_inbound_connection(id, &local, &host)
                .unwrap();
            b.handle_established_inbound_connection(id, peer, &local, &host)
                .unwrap();
        }
        let id = ConnectionId::new_unchecked(20);
        b.handle_pending_inbound_connection(id, &local, &host)
            .unwrap();
        assert!(
            b.handle_established_inbound_connection(id, peer, &local, &host)
                .is_err(),
            "a fourth connection from one address"
        );
        // This machine's own address is never refused.
        for n in 100..200 {
            let id = ConnectionId::new_unchecked(n);
            b.handle_pending_inbound_connection(id, &local, &me)
                .unwrap();
            b.handle_established_inbound_connection(id, peer, &local, &me)
                .unwrap();
        }
    }
}
