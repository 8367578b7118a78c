//! What a node reports about itself ([`Status`], served at `GET /status`), and the
//! `corvid node --bootstrap …` line others join it with.

use std::collections::BTreeMap;
use std::path::Path;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::limits::Limits;
use crate::net::dial::DialFailure;
use crate::peers::PeerInfo;

/// A node's view of itself, served at `GET /status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    /// The command others run to join through this node.
    pub bootstrap_line: Option<String>,
    pub connected_peers: usize,
    pub known_peers: usize,
    /// This node's own advert.
    pub advert: PeerInfo,
    pub adverts_published: u64,
    /// Refused adverts by reason.
    pub rejections: BTreeMap<String, u64>,
    pub bootstrap: Vec<BootstrapStatus>,
    pub uptime_ms: u64,
    /// Tasks from peers this node has answered (done or failed).
    #[serde(default)]
    pub tasks_answered: u64,
    /// What one task from a peer may use here (contributing nodes).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Where peers' tasks run: the executor process and its protections (`None`: in the node
    /// process, or not contributing).
    #[serde(default)]
    pub executor: Option<ExecutorStatus>,
}

/// The executor process as the status shows it.
#[cfg(target_os = "linux")]
pub use crate::sandbox::ExecutorStatus;
/// The executor process as the status shows it (none on this platform).
#[cfg(not(target_os = "linux"))]
pub type ExecutorStatus = ();

/// One configured bootstrap address and why it was last unreachable.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootstrapStatus {
    pub addr: String,
    pub connected: bool,
    pub error: Option<String>,
    pub failure: Option<DialFailure>,
}

/// Whether `addr` points at this machine's loopback interface.
pub(crate) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => h == "localhost",
        _ => false,
    })
}

/// `corvid node --bootstrap ADDR/p2p/ID [--psk FILE]`, with the most reachable address:
/// a non-loopback one if there is one.
pub fn bootstrap_line(addrs: &[Multiaddr], peer: &PeerId, psk: Option<&Path>) -> Option<String> {
    let addr = addrs
        .iter()
        .find(|a| !is_loopback(a))
        .or_else(|| addrs.first())?;
    let mut line = format!(
        "corvid node --bootstrap {}",
        addr.clone().with_p2p(*peer).ok()?
    );
    if let Some(p) = psk {
        line.push_str(&format!(" --psk {}", p.display()));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_line_prefers_a_routable_address() {
        let peer = PeerId::random();
        let addrs: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/tcp/4001".parse().unwrap(),
            "/ip4/192.168.1.7/tcp/4001".parse().unwrap(),
        ];
        let line = bootstrap_line(&addrs, &peer, Some(Path::new("/k/swarm.key"))).unwrap();
        assert_eq!(
            line,
            format!(
                "corvid node --bootstrap /ip4/192.168.1.7/tcp/4001/p2p/{peer} --psk /k/swarm.key"
            )
        );
        assert!(bootstrap_line(&[], &peer, None).is_none());
    }
}
