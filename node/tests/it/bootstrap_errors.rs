//! Unreachable bootstrap nodes are reported with the address and the reason: refused, wrong
//! peer id, PSK mismatch. Nodes with the wrong PSK cannot join; nodes with the right one can.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::{init_logs, known, spawn, wait_for};
use corvid_node::identity::Psk;
use corvid_node::net::dial::DialFailure;
use corvid_node::{BootstrapStatus, Node, NodeConfig, NodeHandle};
use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

/// Waits until `node`'s only bootstrap address has a recorded failure.
async fn bootstrap_failure(node: &NodeHandle) -> BootstrapStatus {
    wait_for(
        "a recorded bootstrap failure",
        Duration::from_secs(10),
        || async move {
            let s = node.status().await.unwrap();
            s.bootstrap.into_iter().find(|b| b.failure.is_some())
        },
    )
    .await
}

fn with_psk(i: u64, dir: &std::path::Path, name: &str) -> NodeConfig {
    let path = dir.join(name);
    let psk = Psk::load(&path).unwrap_or_else(|_| Psk::generate(&path).unwrap());
    NodeConfig {
        psk: Some(psk),
        ..NodeConfig::for_test(i)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_psk_cannot_join_and_the_error_says_so() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let head = Node::spawn(with_psk(20, dir.path(), "a.key"), shutdown.clone())
        .await
        .unwrap();

    let mut config = with_psk(21, dir.path(), "b.key");
    config.bootstrap = vec![head.bootstrap_addr()];
    let intruder = Node::spawn(config, shutdown.clone()).await.unwrap();

    let mut config = with_psk(22, dir.path(), "a.key");
    config.bootstrap = vec![head.bootstrap_addr()];
    let member = Node::spawn(config, shutdown.clone()).await.unwrap();

    let failure = bootstrap_failure(&intruder).await;
    println!("wrong psk: {}", failure.error.as_deref().unwrap());
    assert_eq!(
        failure.failure,
        Some(DialFailure::PskMismatch),
        "{failure:?}"
    );
    assert!(failure.error.as_deref().unwrap().contains("--psk"));
    assert_eq!(failure.addr, head.bootstrap_addr().to_string());

    // The member with the right key joins; the intruder is never in anyone's table.
    let member_id = member.peer_id().to_string();
    let (head_ref, member_ref) = (&head, &member_id);
    wait_for(
        "the member to join",
        Duration::from_secs(10),
        || async move { known(head_ref).await.contains(member_ref).then_some(()) },
    )
    .await;
    let intruder_id = intruder.peer_id().to_string();
    assert!(!known(&head).await.contains(&intruder_id));
    assert!(!known(&member).await.contains(&intruder_id));
    assert!(known(&intruder).await.is_empty());
    assert_eq!(intruder.status().await.unwrap().connected_peers, 0);

    // A node without any PSK cannot join either.
    let mut config = NodeConfig::for_test(23);
    config.bootstrap = vec![head.bootstrap_addr()];
    let outsider = Node::spawn(config, shutdown.clone()).await.unwrap();
    let failure = bootstrap_failure(&outsider).await;
    println!("no psk: {}", failure.error.as_deref().unwrap());
    assert!(
        matches!(
            failure.failure,
            Some(DialFailure::Handshake { psk: false, .. })
        ),
        "{failure:?}"
    );

    shutdown.cancel();
    for n in [head, intruder, member, outsider] {
        n.join().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_wrong_peer_id_are_named() {
    init_logs();
    let shutdown = CancellationToken::new();
    let head = spawn(30, None, &shutdown).await;

    // Nothing listens on a port we just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = NodeConfig::for_test(31);
    config.bootstrap = vec![
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", PeerId::random())
            .parse()
            .unwrap(),
    ];
    let lonely = Node::spawn(config, shutdown.clone()).await.unwrap();
    let failure = bootstrap_failure(&lonely).await;
    println!(
        "refused: {} -> {}",
        failure.addr,
        failure.error.as_deref().unwrap()
    );
    assert_eq!(failure.failure, Some(DialFailure::Refused));
    assert!(failure.addr.contains(&format!("/tcp/{port}/")));

    // The head's address with another peer id.
    let mut wrong = head.bootstrap_addr();
    wrong.pop();
    let claimed = PeerId::random();
    wrong.push(libp2p::multiaddr::Protocol::P2p(claimed));
    let mut config = NodeConfig::for_test(32);
    config.bootstrap = vec![wrong];
    let confused = Node::spawn(config, shutdown.clone()).await.unwrap();
    let failure = bootstrap_failure(&confused).await;
    println!("wrong peer id: {}", failure.error.as_deref().unwrap());
    let Some(DialFailure::WrongPeerId { expected, obtained }) = failure.failure else {
        panic!("{failure:?}")
    };
    assert_eq!(expected, claimed.to_string());
    assert_eq!(obtained, head.peer_id().to_string());

    shutdown.cancel();
    for n in [head, lonely, confused] {
        n.join().await;
    }
}
