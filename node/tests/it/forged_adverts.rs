//! Forged, oversized, malformed and stale adverts sent through real gossip are refused, counted
//! by reason and not forwarded; each forged or malformed one costs its sender gossip score,
//! until the receiving node drops its messages unread and drops it from its peers (graylisted,
//! visible in the status); the receiving node keeps working with everyone else.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use common::{init_logs, known, spawn, wait_for};
use corvid_node::advert::{Advert, MAX_ADVERT_BYTES, now_ms};
use corvid_node::config::IdentitySource;
use corvid_node::identity::load_keypair;
use libp2p::identity::Keypair;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_adverts_are_rejected_counted_and_harmless() {
    init_logs();
    let shutdown = CancellationToken::new();
    let honest = spawn(40, None, &shutdown).await;
    let liar = spawn(41, Some(&honest), &shutdown).await;
    let witness = spawn(42, Some(&honest), &shutdown).await;
    let liar_id = liar.peer_id().to_string();
    let (honest_ref, liar_ref) = (&honest, &liar_id);
    wait_for(
        "the honest node to hold the liar's real advert",
        Duration::from_secs(10),
        || async move { known(honest_ref).await.contains(liar_ref).then_some(()) },
    )
    .await;

    // A real advert of the liar's, to tamper with.
    let liar_key = load_keypair(&IdentitySource::Seed(41)).unwrap();
    let real = liar.status().await.unwrap().advert;
    let template = |key: &Keypair| Advert {
        version: corvid_node::advert::ADVERT_VERSION,
        peer_id: key.public().to_peer_id().to_bytes(),
        timestamp_ms: now_ms(),
        seq: 1_000_000,
        backend: corvid_kernels::BackendKind::Cpu,
        adapter: real.adapter.clone(),
        class: corvid_kernels::CpuBackend::new().class().clone(),
        matmul_gflops: 1.0e6,
        elementwise_gbps: 1.0,
        memory_bytes: 1,
        max_tensor_bytes: 1,
        slots_total: 1,
        slots_free: 1,
        contributes: true,
        task_budget: corvid_kernels::Budget::new(1, 1, 1),
        addrs: Vec::new(),
    };
    // Signed by a key that is not the gossip author's: claims to be someone else.
    let stranger = Keypair::generate_ed25519();
    let forged = template(&stranger).sign(&stranger).unwrap();
    // Over the advert size cap (but under gossipsub's frame cap, so it reaches the validator).
    let oversized = vec![7u8; MAX_ADVERT_BYTES * 3];
    let malformed = b"definitely not postcard".to_vec();
    // Correctly signed by the liar, but an hour old.
    let stale = Advert {
        timestamp_ms: now_ms() - 3_600_000,
        ..template(&liar_key)
    }
    .sign(&liar_key)
    .unwrap();
    // Correctly signed, absurd numbers.
    let insane = Advert {
        matmul_gflops: f32::INFINITY,
        ..template(&liar_key)
    }
    .sign(&liar_key)
    .unwrap();
    // Stale first: late, not at fault, it costs nothing; the three after it each do.
    for data in [stale, forged, oversized, malformed, insane] {
        liar.client()
            .publish_raw_advert(data)
            .await
            .unwrap()
            .unwrap();
    }

    let expected = ["stale", "signer_mismatch", "oversized", "malformed"];
    let rejections = wait_for(
        "every bad advert to be counted",
        Duration::from_secs(10),
        || async move {
            let r = honest_ref.status().await.unwrap().rejections;
            expected
                .iter()
                .all(|k| r.get(*k).copied().unwrap_or(0) >= 1)
                .then_some(r)
        },
    )
    .await;
    println!("rejections at the honest node: {rejections:?}");

    // Not forwarded: the witness, reachable only through the honest node or directly, never
    // accepted any of them into its table (the forged one would add the stranger).
    let peers = witness.peers().await.unwrap();
    assert!(
        peers
            .iter()
            .all(|p| p.peer_id != stranger.public().to_peer_id().to_string())
    );
    assert!(peers.iter().all(|p| p.matmul_gflops < 1.0e6), "{peers:?}");
    let honest_peers = honest.peers().await.unwrap();
    assert!(
        honest_peers.iter().all(|p| p.matmul_gflops < 1.0e6),
        "{honest_peers:?}"
    );

    // Three invalid adverts put the liar below the graylist: the honest node says so, and
    // reads nothing more from it (its later adverts, the insane one included, go unread).
    let liar_score = wait_for(
        "the liar's gossip score to fall below the graylist",
        Duration::from_secs(10),
        || async move {
            let s = honest_ref.status().await.unwrap().gossip_scores;
            let (_, score) = s.into_iter().find(|(p, _)| p == liar_ref)?;
            (score <= corvid_node::net::GRAYLIST_SCORE).then_some(score)
        },
    )
    .await;
    println!("the liar's score at the honest node: {liar_score}");
    // ... and no longer counts it among its peers (no requester there would send it work).
    wait_for(
        "the graylisted liar to leave the honest node's table",
        Duration::from_secs(10),
        || async move { (!known(honest_ref).await.contains(liar_ref)).then_some(()) },
    )
    .await;

    // The honest node keeps working: it keeps refreshing the witness's advert.
    let witness_id = witness.peer_id().to_string();
    let seq = |peers: &[corvid_node::PeerInfo]| {
        peers
            .iter()
            .find(|p| p.peer_id == witness_id)
            .map(|p| p.seq)
    };
    let before = wait_for("the witness's advert", Duration::from_secs(10), || async {
        seq(&honest.peers().await.unwrap())
    })
    .await;
    wait_for(
        "a fresh advert from the witness",
        Duration::from_secs(10),
        || async {
            let now = seq(&honest.peers().await.unwrap())?;
            (now > before).then_some(())
        },
    )
    .await;

    shutdown.cancel();
    for n in [honest, liar, witness] {
        n.join().await;
    }
}
