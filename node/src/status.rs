//! What a node reports about itself ([`Status`], served at `GET /status`), and the
//! `corvid node --bootstrap …` line others join it with.

use std::collections::BTreeMap;
use std::net::IpAddr;
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
    /// Where others can dial this node, best first: addresses peers dialled back, relay
    /// circuits while they cannot, then what it listens on.
    #[serde(default)]
    pub dialable_addrs: Vec<String>,
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
    /// Why the node takes no new task, if it is paused: its owner (`corvid pause`), a pause
    /// rule, or stopping. The first cause in [`PauseCause`] order is shown.
    #[serde(default)]
    pub paused: Option<String>,
    /// The cause of that pause.
    #[serde(default)]
    pub pause_cause: Option<PauseCause>,
    /// Tasks from peers queued or running here now.
    #[serde(default)]
    pub tasks_in_hand: usize,
    /// Tasks done for peers and their arithmetic, today (UTC) and in all (across restarts,
    /// with a data dir).
    #[serde(default)]
    pub contributed: crate::tally::Tally,
    /// The latest task failures and refusals here, newest first.
    #[serde(default)]
    pub recent_errors: Vec<crate::tally::TaskEvent>,
    /// Tasks from peers this node has answered (done or failed).
    #[serde(default)]
    pub tasks_answered: u64,
    /// Whether peers outside this node's network can dial it (AutoNAT v2).
    #[serde(default)]
    pub reachability: Reachability,
    /// Where peers reach this node through a relay (`…/p2p/RELAY/p2p-circuit`), while they
    /// cannot dial it.
    #[serde(default)]
    pub relay_addrs: Vec<String>,
    /// Hole punches (DCUtR) that turned a relayed connection into a direct one, and that
    /// failed.
    #[serde(default)]
    pub hole_punches: HolePunches,
    /// Gossip scores (gossipsub v1.1) of the connected peers with the lowest ones, lowest
    /// first: below [`crate::net::GRAYLIST_SCORE`] a peer's messages are dropped unread.
    #[serde(default)]
    pub gossip_scores: Vec<(String, f64)>,
    /// What one task from a peer may use here (contributing nodes).
    #[serde(default)]
    pub limits: Option<Limits>,
    /// The owner's caps and pause rules in force.
    #[serde(default)]
    pub caps: Caps,
    /// Where peers' tasks run: the executor process and its protections (`None`: in the node
    /// process, or not contributing).
    #[serde(default)]
    pub executor: Option<ExecutorStatus>,
}

/// The caps and pause rules a node's owner set, as the node applies them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Caps {
    /// Cores the kernels may use (`None`: all).
    pub cpus: Option<usize>,
    /// Pause while other programs use more than this share of the CPUs.
    pub pause_when_busy: Option<f64>,
    pub pause_on_battery: bool,
}

impl std::fmt::Display for Caps {
    /// "2 cores; pauses when others use over 50% of the CPUs, and on battery".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.cpus {
            Some(n) => write!(f, "{n} core(s)")?,
            None => write!(f, "all cores")?,
        }
        let mut rules = Vec::new();
        if let Some(s) = self.pause_when_busy {
            rules.push(format!(
                "when others use over {:.0}% of the CPUs",
                s * 100.0
            ));
        }
        if self.pause_on_battery {
            rules.push("on battery".to_string());
        }
        if rules.is_empty() {
            write!(f, "; no pause rule")
        } else {
            write!(f, "; pauses {}", rules.join(" and "))
        }
    }
}

/// Why a node pauses, most important first: each cause holds or releases its own pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// The node is stopping (SIGTERM): running tasks finish, no new ones.
    Stopping,
    /// `corvid pause`.
    Owner,
    /// The machine runs on battery.
    Battery,
    /// Other programs use the CPUs.
    BusyMachine,
}

impl PauseCause {
    /// What ends a pause of this cause, for the owner to read.
    pub fn ends(self) -> &'static str {
        match self {
            PauseCause::Stopping => "the node is stopping",
            PauseCause::Owner => "`corvid resume` to take tasks again",
            PauseCause::Battery => "resumes on mains power",
            PauseCause::BusyMachine => "resumes once the machine is quiet",
        }
    }
}

impl Status {
    /// "paused (why); what ends it", if paused.
    pub fn pause_line(&self) -> Option<String> {
        let why = self.paused.as_ref()?;
        Some(match self.pause_cause {
            Some(c) => format!("paused ({why}); {}", c.ends()),
            None => format!("paused ({why})"),
        })
    }
}

/// Whether other peers can dial this node, as AutoNAT v2 probes by other peers found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Reachability {
    /// No peer has tested an address of this node yet.
    #[default]
    Checking,
    /// Peers dialled back these addresses.
    Reachable { addrs: Vec<String> },
    /// A peer could not dial back the address it saw this node at (behind NAT or a
    /// firewall): others cannot connect to it, it connects out.
    Unreachable { tested: String, error: String },
}

/// Hole punching so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunches {
    pub succeeded: u64,
    pub failed: u64,
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

/// Whether `addr` names no host (`0.0.0.0`, `::`): a place to listen, not to dial.
pub(crate) fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// `addrs` as others can dial them: an unspecified IP (`0.0.0.0`, `::`) becomes each of
/// `interfaces` of its family, non-loopback ones first.
pub fn dialable(addrs: &[Multiaddr], interfaces: &[IpAddr]) -> Vec<Multiaddr> {
    let mut ips = interfaces.to_vec();
    ips.sort_by_key(|ip| ip.is_loopback());
    let mut out = Vec::new();
    for a in addrs {
        let unspecified = a.iter().find_map(|p| match p {
            Protocol::Ip4(ip) if ip.is_unspecified() => Some(false),
            Protocol::Ip6(ip) if ip.is_unspecified() => Some(true),
            _ => None,
        });
        let Some(v6) = unspecified else {
            out.push(a.clone());
            continue;
        };
        for ip in ips.iter().filter(|ip| ip.is_ipv6() == v6) {
            let host = match ip {
                IpAddr::V4(v4) => Protocol::Ip4(*v4),
                IpAddr::V6(v6) => Protocol::Ip6(*v6),
            };
            let replaced: Multiaddr = a
                .iter()
                .map(|p| match p {
                    Protocol::Ip4(_) | Protocol::Ip6(_) => host.clone(),
                    p => p,
                })
                .collect();
            if !out.contains(&replaced) {
                out.push(replaced);
            }
        }
    }
    out
}

/// This machine's interface addresses (none if they cannot be read).
pub fn interface_ips() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|list| list.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// `corvid node --bootstrap ADDR/p2p/ID [--psk FILE]`, with the most reachable address:
/// a non-loopback one if there is one, never an unspecified one (`0.0.0.0` cannot be dialled).
pub fn bootstrap_line(addrs: &[Multiaddr], peer: &PeerId, psk: Option<&Path>) -> Option<String> {
    let usable: Vec<&Multiaddr> = addrs.iter().filter(|a| !is_unspecified(a)).collect();
    let addr = usable
        .iter()
        .find(|a| !is_loopback(a))
        .or_else(|| usable.first())?;
    let mut line = format!(
        "corvid node --bootstrap {}",
        (*addr).clone().with_p2p(*peer).ok()?
    );
    if let Some(p) = psk {
        line.push_str(&format!(" --psk {}", p.display()));
    }
    Some(line)
}

/// Text a peer chose, made safe for a terminal: control characters (escape sequences could
/// rewrite the screen or the title) shown as `\u{…}`, at most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_cannot_reach_the_terminal_raw() {
        let hostile = "GPU\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nfake line";
        let shown = printable(hostile, 200);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("GPU\\u{1b}]0;pwned"), "{shown:?}");
        assert_eq!(printable("cpu (x86_64 avx2)", 3), "cpu");
    }

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
        let anywhere: Multiaddr = "/ip4/0.0.0.0/tcp/4001".parse().unwrap();
        assert!(
            bootstrap_line(std::slice::from_ref(&anywhere), &peer, None).is_none(),
            "0.0.0.0 is not an address anyone can dial"
        );
    }

    /// `/ip4/0.0.0.0/tcp/4001` becomes this machine's IPv4 addresses, non-loopback first;
    /// `::` its IPv6 ones; a fixed address stays as it is.
    #[test]
    fn unspecified_addresses_become_the_interfaces() {
        let ips: Vec<IpAddr> = ["127.0.0.1", "192.168.1.7", "::1", "fe80::1", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let addrs: Vec<Multiaddr> = [
            "/ip4/0.0.0.0/tcp/4001",
            "/ip6/::/tcp/4002",
            "/ip4/172.16.0.1/tcp/4003",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let got: Vec<String> = dialable(&addrs, &ips)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "/ip4/192.168.1.7/tcp/4001",
                "/ip4/10.0.0.2/tcp/4001",
                "/ip4/127.0.0.1/tcp/4001",
                "/ip6/fe80::1/tcp/4002",
                "/ip6/::1/tcp/4002",
                "/ip4/172.16.0.1/tcp/4003",
            ]
        );
        let peer = PeerId::random();
        let line = bootstrap_line(&dialable(&addrs[..1], &ips), &peer, None).unwrap();
        assert!(line.contains("/ip4/192.168.1.7/tcp/4001/p2p/"), "{line}");
    }
}
