//! Connection-level attacks on a real node: one host holding idle sockets open (each a
//! handshake that never starts) no longer blocks everyone else's connections.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{init_logs, known, spawn, wait_for};
use corvid_node::{Node, NodeConfig};
use libp2p::multiaddr::Protocol;
use tokio_util::sync::CancellationToken;

/// Keeps `n` idle TCP connections from `from` to `to` open, opening a new one whenever the
/// node closes one; counts the connections opened.
fn hold_idle_sockets(
    from: std::net::IpAddr,
    to: SocketAddr,
    n: usize,
    stop: CancellationToken,
) -> Arc<AtomicU64> {
    let opened = Arc::new(AtomicU64::new(0));
    let count = opened.clone();
    tokio::spawn(async move {
        let mut open: Vec<tokio::net::TcpStream> = Vec::new();
        while !stop.is_cancelled() {
            // Drop the ones the node closed (a read of 0 bytes, or an error).
            let mut alive = Vec::with_capacity(open.len());
            for s in open.drain(..) {
                let mut buf = [0u8; 64];
                match s.try_read(&mut buf) {
                    // Open, nothing to read; or the node said something (it never will
                    // hear back).
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => alive.push(s),
                    Ok(n) if n > 0 => alive.push(s),
                    // Closed by the node.
                    _ => {}
                }
            }
            open = alive;
            while open.len() < n {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(from, 0)).unwrap();
                match tokio::time::timeout(Duration::from_millis(200), socket.connect(to)).await {
                    Ok(Ok(s)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        open.push(s);
                    }
                    _ => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_host_do_not_block_other_peers() {
    init_logs();
    let shutdown = CancellationToken::new();
    // Handshakes may take a minute here: the attacker's sockets are never timed out while
    // the test runs, so only the per-address limit can let anyone else in.
    let mut config = NodeConfig::for_test(70);
    config.timing.dial_timeout = Duration::from_secs(60);
    let victim = Node::spawn(config, shutdown.clone()).await.unwrap();
    let port = victim
        .bootstrap_addr()
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    // 127.0.0.2 is another host as far as the node can tell (only its own 127.0.0.1 is
    // exempt from the per-address limits). 100 sockets: more than every pending slot there
    // is, held open and reopened as soon as closed.
    let stop = CancellationToken::new();
    let opened = hold_idle_sockets(
        [127, 0, 0, 2].into(),
        SocketAddr::from(([127, 0, 0, 1], port)),
        100,
        stop.clone(),
    );
    let opened_ref = &opened;
    wait_for(
        "the attacker's sockets",
        Duration::from_secs(10),
        || async move { (opened_ref.load(Ordering::Relaxed) >= 100).then_some(()) },
    )
    .await;
    // An honest peer still gets in.
    let honest = spawn(71, Some(&victim), &shutdown).await;
    let id = honest.peer_id().to_string();
    let (victim_ref, id_ref) = (&victim, &id);
    wait_for(
        "the honest peer to join the victim",
        Duration::from_secs(20),
        || async move { known(victim_ref).await.contains(id_ref).then_some(()) },
    )
    .await;
    println!(
        "{} idle connections opened by the attacker",
        opened.load(Ordering::Relaxed)
    );
    stop.cancel();
    shutdown.cancel();
    for n in [victim, honest] {
        n.join().await;
    }
}

/// 40 sybil identities from one host (a home behind its NAT router, so one address to the
/// node) get at most [`MAX_CONNECTIONS_PER_IP`] connections to a node on a public host, and
/// an honest peer from another address still joins.
#[test]
fn sybils_from_one_address_cannot_fill_a_node() {
    use common::netns::{Net, available, node_in, peer_id, spawn_in_ns, status_in};
    use corvid_node::net::MAX_CONNECTIONS_PER_IP;
    use corvid_node::sybil;

    if !available("connections::sybils_from_one_address_cannot_fill_a_node") {
        return;
    }
    let (_net, [public, home1, home2, _]) = Net::build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d0, d2) = (dir.path().join("victim"), dir.path().join("honest"));
    let id0 = peer_id(&d0);
    let _victim = node_in(&public, &d0, 4001, None);
    let victim = format!("/ip4/10.77.3.2/tcp/4001/p2p/{id0}");
    let wait_status = |what: &str, ok: &dyn Fn(&corvid_node::Status) -> bool| {
        common::wait_until(what, Duration::from_secs(60), || {
            status_in(&public, &d0).filter(|s| ok(s))
        })
    };
    wait_status("the victim to start", &|_| true);

    // The attacker, in home1: 40 identities, each dialling the victim.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let target = victim.parse().unwrap();
    let attacker = spawn_in_ns(&home1, move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sybils = rt
            .block_on(sybil::direct(&[target], 40, Duration::from_millis(500)))
            .unwrap();
        let _ = stopped.recv_timeout(Duration::from_secs(60));
        drop(sybils);
    });
    // The attack under way, then a few seconds of 40 identities redialling every 500 ms
    // (without the limit, the victim held 31 of them by then), then an honest peer joins from
    // home2.
    let full = wait_status("the attacker's first connection", &|s| {
        s.connected_peers >= 1
    });
    std::thread::sleep(Duration::from_secs(3));
    let id2 = peer_id(&d2);
    let _honest = node_in(&home2, &d2, 4001, Some(&victim));
    common::wait_until(
        "the honest peer to connect to the victim",
        Duration::from_secs(60),
        || status_in(&home2, &d2).filter(|s| s.connected_peers >= 1),
    );
    let after = status_in(&public, &d0).unwrap();
    println!(
        "victim: {} connected at the attack's start; {} with the honest peer {id2}",
        full.connected_peers, after.connected_peers
    );
    assert!(
        after.connected_peers <= MAX_CONNECTIONS_PER_IP as usize + 1,
        "{} connections",
        after.connected_peers
    );
    let _ = stop.send(());
    attacker.join().unwrap();
}
