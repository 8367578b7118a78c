//! Five nodes in one process on loopback, bootstrapped from node 0: everyone holds everyone
//! else's valid advert, offer changes propagate, and a stopped node expires from the tables.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::{init_logs, known, spawn, wait_for};
use corvid_node::{Node, NodeConfig};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_see_each_other_and_expire_a_stopped_one() {
    init_logs();
    let shutdown = CancellationToken::new();
    let first = spawn(0, None, &shutdown).await;
    let mut nodes = vec![first];
    let start = Instant::now();
    for i in 1..5 {
        let mut config = NodeConfig::for_test(i);
        config.bootstrap = vec![nodes[0].bootstrap_addr()];
        // Node 3 is a requester only.
        config.contribute = i != 3;
        nodes.push(Node::spawn(config, shutdown.clone()).await.unwrap());
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();

    let (nodes_ref, ids_ref) = (&nodes, &ids);
    // Every node holds the 4 others' adverts (only validated adverts enter the table).
    wait_for(
        "every node to hold 4 valid adverts",
        Duration::from_secs(10),
        || async move {
            for (i, n) in nodes_ref.iter().enumerate() {
                let mut have = known(n).await;
                have.sort();
                let mut want: Vec<String> = ids_ref
                    .iter()
                    .filter(|id| **id != ids_ref[i])
                    .cloned()
                    .collect();
                want.sort();
                if have != want {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    println!(
        "all 5 nodes saw the 4 others {:?} after the first node was up",
        start.elapsed()
    );
    let requester = nodes[0].peers().await.unwrap();
    let requester = requester.iter().find(|p| p.peer_id == ids[3]).unwrap();
    assert!(
        !requester.contributes && requester.slots_total == 0,
        "{requester:?}"
    );
    for n in &nodes {
        let status = n.status().await.unwrap();
        assert!(
            status.rejections.values().all(|&c| c == 0),
            "{:?}",
            status.rejections
        );
        assert!(
            status.bootstrap.iter().all(|b| b.error.is_none()),
            "{:?}",
            status.bootstrap
        );
    }

    // A change of offer is re-published at once and reaches the others.
    nodes[1].client().set_free_slots(1).await.unwrap();
    wait_for(
        "node 0 to see node 1's new slot count",
        Duration::from_secs(5),
        || async move {
            let peers = nodes_ref[0].peers().await.unwrap();
            peers
                .iter()
                .any(|p| p.peer_id == ids_ref[1] && p.slots_free == 1)
                .then_some(())
        },
    )
    .await;

    // Stop node 4: it expires from every other table.
    let stopped = nodes.pop().unwrap();
    let stopped_id = stopped.peer_id().to_string();
    stopped.join().await;
    let t = Instant::now();
    let (nodes_ref, stopped_ref) = (&nodes, &stopped_id);
    wait_for(
        "node 4 to expire everywhere",
        Duration::from_secs(10),
        || async move {
            for n in nodes_ref {
                if known(n).await.contains(stopped_ref) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    println!(
        "node 4 expired from all tables {:?} after it stopped",
        t.elapsed()
    );
    for n in &nodes {
        assert_eq!(known(n).await.len(), 3);
    }

    shutdown.cancel();
    for n in nodes {
        n.join().await;
    }
}

/// `--external-addr`: a node that is told where others reach it is reachable from the start,
/// says so, and tells others to join there. (A loopback address: nothing here is dialled
/// beyond this machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_address_is_reachable_from_the_start() {
    init_logs();
    let shutdown = CancellationToken::new();
    let mut config = NodeConfig::for_test(40);
    let external: corvid_node::Multiaddr = "/ip4/127.0.0.9/tcp/4999".parse().unwrap();
    config.nat.external = vec![external.clone()];
    let node = Node::spawn(config, shutdown.clone()).await.unwrap();
    let status = wait_for(
        "the node's status to say it is reachable",
        Duration::from_secs(10),
        || async {
            let s = node.status().await.ok()?;
            matches!(s.reachability, corvid_node::Reachability::Reachable { .. }).then_some(s)
        },
    )
    .await;
    let corvid_node::Reachability::Reachable { addrs } = &status.reachability else {
        unreachable!()
    };
    assert_eq!(addrs, &vec![external.to_string()]);
    assert_eq!(
        status.dialable_addrs.first(),
        Some(&format!("{external}/p2p/{}", node.peer_id()))
    );
    assert!(
        status
            .bootstrap_line
            .as_deref()
            .is_some_and(|l| l.contains("/ip4/127.0.0.9/tcp/4999/p2p/")),
        "{:?}",
        status.bootstrap_line
    );
    assert_eq!(
        status.advert.peer_id,
        node.peer_id().to_string(),
        "the status is this node's"
    );
    shutdown.cancel();
}
