//! Sybil identities on the advert topic, from real libp2p peers: adverts signed by identities
//! a node can never reach, relayed by one peer, never enter its peer table (so no requester's
//! scheduler sees them), cost it a bounded amount of checking, and do not keep honest
//! newcomers out.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::{init_logs, known, spawn, wait_for};
use corvid_node::sybil;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adverts_of_unreachable_identities_never_enter_the_peer_table() {
    init_logs();
    let shutdown = CancellationToken::new();
    let victim = spawn(60, None, &shutdown).await;
    let witness = spawn(61, Some(&victim), &shutdown).await;
    // 200 identities behind one relay, each advertising a million GFLOP/s and 1024 slots
    // every 300 ms.
    let sybils = sybil::relay(victim.bootstrap_addr(), 200, Duration::from_millis(300))
        .await
        .unwrap();
    let victim_ref = &victim;
    let rejections = wait_for(
        "the relay quota to drop adverts and the first unreached authors to be given up on",
        Duration::from_secs(20),
        || async move {
            let r = victim_ref.status().await.unwrap().rejections;
            (r.get("relay_quota").copied().unwrap_or(0) > 100
                && r.get("unconfirmed").copied().unwrap_or(0) >= 8)
                .then_some(r)
        },
    )
    .await;
    println!(
        "{} adverts published by sybils; refused at the victim: {rejections:?}",
        sybils.published()
    );

    // An honest node joining during the flood is admitted everywhere.
    let newcomer = spawn(62, Some(&witness), &shutdown).await;
    let new_id = newcomer.peer_id().to_string();
    for node in [&victim, &witness] {
        let id = &new_id;
        wait_for(
            "the newcomer in the table",
            Duration::from_secs(10),
            || async move { known(node).await.contains(id).then_some(()) },
        )
        .await;
    }
    // No sybil is in any table, and nothing claims their speed.
    let sybil_ids: Vec<String> = sybils.ids.iter().map(ToString::to_string).collect();
    for node in [&victim, &witness, &newcomer] {
        let peers = node.peers().await.unwrap();
        assert!(
            peers
                .iter()
                .all(|p| !sybil_ids.contains(&p.peer_id) && p.matmul_gflops < 1.0e5),
            "{peers:?}"
        );
        assert!(peers.len() <= 2, "{peers:?}");
    }
    // The honest peers keep a good gossip score with each other throughout.
    let witness_id = witness.peer_id().to_string();
    let scores = victim.status().await.unwrap().gossip_scores;
    let witness_score = scores.iter().find(|(p, _)| *p == witness_id).map(|s| s.1);
    assert!(witness_score.is_some_and(|s| s >= 0.0), "{scores:?}");
    sybils.stop();
    shutdown.cancel();
    for n in [victim, witness, newcomer] {
        n.join().await;
    }
}
