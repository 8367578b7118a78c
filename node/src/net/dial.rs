//! Connection errors as reasons a person can act on: refused, timed out, wrong peer id, PSK
//! mismatch.

use std::error::Error;
use std::fmt;
use std::io;
use std::time::Duration;

use libp2p::swarm::DialError;
use libp2p::{Multiaddr, TransportError};
use serde::{Deserialize, Serialize};

/// Why a dial failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DialFailure {
    /// Nothing listens at the address.
    Refused,
    /// No connection within the dial timeout.
    Timeout { after_ms: u64, psk: bool },
    /// Host or network unreachable.
    Unreachable { detail: String },
    /// A node answered, but not the one the address names.
    WrongPeerId { expected: String, obtained: String },
    /// The remote holds a different private-network key (or none).
    PskMismatch,
    /// TCP connected, then the PSK / noise / yamux handshake failed.
    Handshake { psk: bool, detail: String },
    /// Anything else (denied by limits, unsupported address, ...).
    Other { detail: String },
}

impl fmt::Display for DialFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialFailure::Refused => {
                f.write_str("connection refused: is a corvid node listening there?")
            }
            DialFailure::Timeout { after_ms, psk } => {
                write!(f, "timed out after {after_ms} ms")?;
                if *psk {
                    f.write_str(
                        " (if the address is right, check that both nodes use the same --psk)",
                    )?;
                }
                Ok(())
            }
            DialFailure::Unreachable { detail } => write!(f, "unreachable: {detail}"),
            DialFailure::WrongPeerId { expected, obtained } => write!(
                f,
                "wrong peer id: expected {expected}, but the node there is {obtained} \
                 (copy the bootstrap line again)"
            ),
            DialFailure::PskMismatch => f.write_str(
                "psk mismatch: the node there does not use the same --psk (both need the same key file)",
            ),
            DialFailure::Handshake { psk: true, detail } => write!(
                f,
                "handshake failed: check that both nodes use the same --psk (PSK mismatch; {detail})"
            ),
            DialFailure::Handshake { psk: false, detail } => write!(
                f,
                "handshake failed: {detail} (if the remote runs a private network, start this \
                 node with its --psk)"
            ),
            DialFailure::Other { detail } => f.write_str(detail),
        }
    }
}

/// Classifies a failed dial to `addr` (whose `/p2p/` suffix names `expected`).
pub fn classify(
    error: &DialError,
    expected: Option<&libp2p::PeerId>,
    psk: bool,
    timeout: Duration,
) -> DialFailure {
    match error {
        DialError::WrongPeerId { obtained, .. } => DialFailure::WrongPeerId {
            expected: expected.map_or_else(|| "?".to_string(), ToString::to_string),
            obtained: obtained.to_string(),
        },
        DialError::Transport(errors) => {
            // Report the most telling of the per-address errors.
            let mut failures: Vec<DialFailure> = errors
                .iter()
                .map(|(_, e)| classify_transport(e, psk, timeout))
                .collect();
            failures.sort_by_key(rank);
            failures.into_iter().next().unwrap_or(DialFailure::Other {
                detail: "no address could be dialled".into(),
            })
        }
        other => DialFailure::Other {
            detail: other.to_string(),
        },
    }
}

/// Most specific first.
fn rank(f: &DialFailure) -> u8 {
    match f {
        DialFailure::WrongPeerId { .. } | DialFailure::PskMismatch => 0,
        DialFailure::Handshake { .. } => 1,
        DialFailure::Timeout { .. } => 2,
        DialFailure::Refused => 3,
        DialFailure::Unreachable { .. } => 4,
        DialFailure::Other { .. } => 5,
    }
}

fn classify_transport(e: &TransportError<io::Error>, psk: bool, timeout: Duration) -> DialFailure {
    let io_err = match e {
        TransportError::MultiaddrNotSupported(a) => {
            return DialFailure::Other {
                detail: format!(
                    "address '{a}' is not supported (expected /ip4|ip6|dns/../tcp/PORT/p2p/ID)"
                ),
            };
        }
        TransportError::Other(e) => e,
    };
    let chain = chain(io_err);
    let kinds: Vec<io::ErrorKind> = chain.iter().filter_map(|(k, _)| *k).collect();
    let text = tidy(
        &chain
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join(": "),
    );
    let lower = text.to_ascii_lowercase();
    // The DNS layer aggregates per-address errors into text, so kinds are checked and then text.
    if lower.contains("psk mismatch") {
        DialFailure::PskMismatch
    } else if kinds.contains(&io::ErrorKind::ConnectionRefused)
        || lower.contains("connection refused")
    {
        DialFailure::Refused
    } else if kinds.contains(&io::ErrorKind::TimedOut)
        || lower.contains("timeout has been reached")
        || lower.contains("timed out")
    {
        DialFailure::Timeout {
            after_ms: timeout.as_millis() as u64,
            psk,
        }
    } else if kinds.iter().any(|k| {
        matches!(
            k,
            io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable
        )
    }) || lower.contains("unreachable")
    {
        DialFailure::Unreachable { detail: text }
    } else {
        // The TCP connection was made (otherwise the OS would have said why), so the failure
        // is in the upgrade: the PSK exchange, noise or the multiplexer.
        DialFailure::Handshake { psk, detail: text }
    }
}

/// One line: drops the DNS layer's "multiple dial errors" framing and repeated segments.
fn tidy(text: &str) -> String {
    let flat = text
        .replace("Multiple dial errors occurred:", "")
        .replace("\n - ", " ")
        .replace('\n', " ");
    let mut parts: Vec<&str> = flat
        .split(": ")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    parts.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    parts.join(": ")
}

/// Every error in the chain with its io kind. `io::Error::source` skips the error it wraps, so
/// the wrapped one is visited through `get_ref`.
fn chain(top: &io::Error) -> Vec<(Option<io::ErrorKind>, String)> {
    let mut out = vec![(Some(top.kind()), top.to_string())];
    let mut next: Option<&(dyn Error + 'static)> =
        top.get_ref().map(|e| e as &(dyn Error + 'static));
    while let Some(e) = next {
        if out.len() > 16 {
            break;
        }
        match e.downcast_ref::<io::Error>() {
            Some(io) => {
                out.push((Some(io.kind()), io.to_string()));
                next = io.get_ref().map(|e| e as &(dyn Error + 'static));
            }
            None => {
                out.push((None, e.to_string()));
                next = e.source();
            }
        }
    }
    out
}

/// The address with its `/p2p/` suffix removed, and that peer id.
pub fn split_peer(addr: &Multiaddr) -> (Multiaddr, Option<libp2p::PeerId>) {
    let mut base = addr.clone();
    match base.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(id)) => (base, Some(id)),
        _ => (addr.clone(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(e: io::Error) -> DialError {
        DialError::Transport(vec![(
            "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
            TransportError::Other(e),
        )])
    }

    #[test]
    fn refused_timeout_and_handshake_are_told_apart() {
        let t = Duration::from_secs(3);
        let refused = transport(io::Error::other(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(classify(&refused, None, false, t), DialFailure::Refused);
        let timeout = transport(io::Error::other("Timeout has been reached"));
        assert!(matches!(
            classify(&timeout, None, true, t),
            DialFailure::Timeout {
                after_ms: 3000,
                psk: true
            }
        ));
        let eof = transport(io::Error::other(io::Error::from(
            io::ErrorKind::UnexpectedEof,
        )));
        let f = classify(&eof, None, true, t);
        assert!(f.to_string().contains("same --psk"), "{f}");
        assert_eq!(
            tidy("Multiple dial errors occurred:\n - Handshake failed: Handshake failed: reset"),
            "Handshake failed: reset"
        );
    }

    #[test]
    fn wrong_peer_id_names_both() {
        let a = libp2p::PeerId::random();
        let b = libp2p::PeerId::random();
        let e = DialError::WrongPeerId {
            obtained: b,
            address: "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
        };
        let s = classify(&e, Some(&a), false, Duration::from_secs(1)).to_string();
        assert!(
            s.contains(&a.to_string()) && s.contains(&b.to_string()),
            "{s}"
        );
    }
}
