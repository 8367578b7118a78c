//! Real network stacks (`common::netns`: an internet namespace, two public hosts, two homes
//! each behind its own NAT router that drops unsolicited packets). The internet has no route
//! to either home: answers reach a home only because its router rewrote the address, so a job
//! that completes has crossed a real NAT.
//!
//! - A requester in home1 runs a job on public workers; each node's AutoNAT verdict is
//!   checked (the public ones reachable at their public addresses, the one behind NAT not).
//! - A worker in home2 serves a requester in home1: it takes relay slots on the public nodes,
//!   the requester reaches it through one, hole punching makes the connection direct; then
//!   fresh requesters, one after another, each counted as reaching it directly or not. The
//!   figures (verdict times, time to the first task, hole punches) are printed.
//!
//! Without root (or `ip`/`nft`) the tests say why they were skipped; with
//! `CORVID_REQUIRE_NETNS=1` (the test script sets it when it runs as root) that is a failure.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{Net, available, in_ns, node_in, peer_id};
use corvid_kernels::{Backend, CpuBackend};
use corvid_node::Client;
use corvid_sdk::sched::Place;
use corvid_sdk::{Graph, LocalExecutor, Settings};

fn settings() -> Settings {
    Settings {
        block: 64,
        ..Settings::default()
    }
}

#[test]
fn a_requester_behind_nat_runs_jobs_on_the_swarm() {
    if !available("nat::a_requester_behind_nat_runs_jobs_on_the_swarm") {
        return;
    }
    let (_net, [public, home1, home2, public2]) = Net::build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d0, d2) = (dir.path().join("public"), dir.path().join("home2"));
    let id0 = peer_id(&d0);
    let _public = node_in(&public, &d0, 4001, None);
    let boot = format!("/ip4/10.77.3.2/tcp/4001/p2p/{id0}");
    // A second public node, so that each public one has a public peer to ask whether it is
    // reachable.
    let _public2 = node_in(&public2, &dir.path().join("public2"), 4001, Some(&boot));
    let id2 = peer_id(&d2);
    let _behind_nat = node_in(&home2, &d2, 4001, Some(&boot));

    // The requester, in home1: the SDK's client, joined through the public worker.
    let boot1 = boot.clone();
    let (id0c, id2c) = (id0.clone(), id2.clone());
    let report = in_ns(&home1, move || {
        let started = Instant::now();
        let client = Client::builder()
            .bootstrap(boot1)
            .wait_for_workers(1, Duration::from_secs(20))
            .connect()
            .unwrap()
            .with_settings(settings());
        let joined = started.elapsed();
        let mlp = |g: &Graph| {
            let x = g.random(&[256, 32], -1.0, 1.0, 1);
            (x.matmul(&g.random(&[32, 48], -0.5, 0.5, 2)).unwrap() + &g.random(&[48], -0.1, 0.1, 3))
                .tanh()
                .unwrap()
        };
        let exec =
            Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings()));
        let want = mlp(&Graph::new("local").with_executor(exec))
            .eval_data()
            .unwrap();
        let got = mlp(&Graph::new("nat").with_executor(client.executor()))
            .eval_data()
            .unwrap();
        let s = client.last_summary().unwrap();
        assert_eq!(got.words(), want.words(), "{s}");
        let tasks = |id: &str| {
            s.places
                .get(&Place::Peer(id.to_string()))
                .map_or(0, |p| p.tasks)
        };
        format!(
            "joined in {:.1} s; tasks: public worker {}, worker behind NAT {}\n{s}",
            joined.as_secs_f64(),
            tasks(&id0c),
            tasks(&id2c)
        )
    });
    println!("{report}");
    // Each node's reachability verdict, from AutoNAT probes by its peers: the public worker
    // is dialled back, the one behind NAT is not.
    use common::netns::status_in;
    use corvid_node::Reachability;
    let verdict = |ns: &str, dir: &std::path::Path, want: fn(&Reachability) -> bool| {
        common::wait_until("a reachability verdict", Duration::from_secs(30), || {
            let r = status_in(ns, dir)?.reachability;
            want(&r).then_some(r)
        })
    };
    let public_verdict = verdict(&public, &d0, |r| {
        matches!(r, Reachability::Reachable { .. })
    });
    let nat_verdict = verdict(&home2, &d2, |r| {
        matches!(r, Reachability::Unreachable { .. })
    });
    println!("public worker: {public_verdict:?}; worker behind NAT: {nat_verdict:?}");
    let Reachability::Reachable { addrs } = &public_verdict else {
        unreachable!()
    };
    assert!(
        addrs.iter().any(|a| a.starts_with("/ip4/10.77.")),
        "{public_verdict:?}"
    );
    assert!(
        !report.contains("public worker 0,"),
        "the public worker did no task: {report}"
    );
}

/// Tries of a fresh requester reaching the worker behind NAT, each counted as hole-punched
/// or left on the relay.
const PUNCH_TRIES: usize = 10;

/// Public host A (`d0`, at 10.77.3.2): the bootstrap node, which relays once peers can dial
/// it; host B only lets A learn that (AutoNAT servers answer peers that dialled them).
/// Neither works. Returns their processes, A's peer id and its bootstrap address.
fn relays(
    public: &str,
    public2: &str,
    d0: &std::path::Path,
    d1: &std::path::Path,
) -> ([common::Proc; 2], String, String) {
    use common::netns::node_in_with;
    let id0 = peer_id(d0);
    let a = node_in_with(public, d0, 4001, None, &["--no-contribute"]);
    let boot = format!("/ip4/10.77.3.2/tcp/4001/p2p/{id0}");
    let b = node_in_with(public2, d1, 4001, Some(&boot), &["--no-contribute"]);
    ([a, b], id0, boot)
}

/// The MLP the NAT tests run, on `g`.
fn small_mlp(g: &Graph, seed: u64) -> corvid_sdk::Tensor {
    let x = g.random(&[64, 32], -1.0, 1.0, seed);
    (x.matmul(&g.random(&[32, 16], -0.5, 0.5, seed + 1)).unwrap()
        + &g.random(&[16], -0.1, 0.1, seed + 2))
        .tanh()
        .unwrap()
}

#[test]
fn a_worker_behind_nat_serves_a_requester_behind_another_nat() {
    use common::netns::{node_in_with, spawn_in_ns, status_in};
    use corvid_node::{PeerPath, Reachability};
    if !available("nat::a_worker_behind_nat_serves_a_requester_behind_another_nat") {
        return;
    }
    common::init_logs();
    let (_net, [public, home1, home2, public2]) = Net::build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d0, d2) = (dir.path().join("relay"), dir.path().join("worker"));
    let (_relays, id0, boot) = relays(&public, &public2, &d0, &dir.path().join("public2"));
    let started = Instant::now();
    let relay_verdict = common::wait_until("the relay's verdict", Duration::from_secs(30), || {
        let r = status_in(&public, &d0)?.reachability;
        matches!(r, Reachability::Reachable { .. }).then_some(r)
    });
    println!(
        "relay reachable after {:.1} s: {relay_verdict:?}",
        started.elapsed().as_secs_f64()
    );

    // The worker, in home2, and at the same time a requester in home1: the worker's first
    // task is timed from its start.
    let id2 = peer_id(&d2);
    let started = Instant::now();
    // It advertises only when something changes (every 10 minutes otherwise): requesters that
    // join later learn of it from the adverts the relay holds, or not at all.
    let _worker = node_in_with(
        &home2,
        &d2,
        4001,
        Some(&boot),
        &["--advert-interval", "10m", "--peer-expiry", "30m"],
    );
    let (boot1, id2c) = (boot.clone(), id2.clone());
    let requester = spawn_in_ns(&home1, move || {
        let client = Client::builder()
            .bootstrap(&boot1)
            .wait_for_workers(1, Duration::from_secs(40))
            .connect()
            .unwrap()
            .with_settings(settings());
        let exec =
            Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings()));
        let want = small_mlp(&Graph::new("local").with_executor(exec), 1)
            .eval_data()
            .unwrap();
        let got = small_mlp(&Graph::new("nat").with_executor(client.executor()), 1)
            .eval_data()
            .unwrap();
        let s = client.last_summary().unwrap();
        assert_eq!(got.words(), want.words(), "{s}");
        let on_worker = s
            .places
            .get(&Place::Peer(id2c.clone()))
            .map_or(0, |p| p.tasks);
        assert!(on_worker > 0, "the worker behind NAT did no task: {s}");
        format!("{s}")
    });
    let mut verdict_at = None;
    let mut first_task_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while first_task_at.is_none() && Instant::now() < deadline && !requester.is_finished() {
        if let Some(s) = status_in(&home2, &d2) {
            if verdict_at.is_none() && !s.relay_addrs.is_empty() {
                verdict_at = Some((started.elapsed(), s.reachability.clone(), s.relay_addrs));
            }
            if s.tasks_answered > 0 {
                first_task_at = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let summary = requester.join().unwrap();
    if first_task_at.is_none() && status_in(&home2, &d2).is_some_and(|s| s.tasks_answered > 0) {
        first_task_at = Some(started.elapsed()); // the job ended between two looks
    }
    println!("{summary}");
    let worker = status_in(&home2, &d2).unwrap();
    let (at, reachability, relay_addrs) = verdict_at.unwrap_or((
        started.elapsed(),
        worker.reachability.clone(),
        worker.relay_addrs.clone(),
    ));
    println!(
        "worker behind NAT: reachable through {relay_addrs:?} after {:.1} s; first task {:.1} s after start",
        at.as_secs_f64(),
        first_task_at.unwrap_or(started.elapsed()).as_secs_f64()
    );
    assert!(
        relay_addrs
            .iter()
            .any(|a| a.contains(&id0) && a.ends_with("/p2p-circuit")),
        "{relay_addrs:?}"
    );
    // What it tells people to run to join through it: its relay circuit, not its LAN
    // address; the relay's is its public one.
    let line = worker.bootstrap_line.clone().unwrap_or_default();
    assert!(line.contains("/p2p-circuit/p2p/"), "{line}");
    let relay = status_in(&public, &d0).unwrap();
    assert!(
        relay
            .dialable_addrs
            .first()
            .is_some_and(|a| a.starts_with("/ip4/10.77.3.2/tcp/4001/p2p/")),
        "{:?}",
        relay.dialable_addrs
    );
    assert!(
        first_task_at.is_some(),
        "the worker behind NAT had answered no task when the job ended"
    );
    // The verdict: its router drops the dial-backs, so it comes when they time out.
    let verdict = common::wait_until("the worker's verdict", Duration::from_secs(40), || {
        let r = status_in(&home2, &d2)?.reachability;
        matches!(r, Reachability::Unreachable { .. }).then_some(r)
    });
    // Its own public address was tested (not a relay circuit a peer saw it at).
    assert!(
        matches!(&verdict, Reachability::Unreachable { tested, .. } if tested == "/ip4/10.77.2.2/tcp/4001"),
        "{verdict:?}"
    );
    println!(
        "worker behind NAT (was {reachability:?}): {verdict:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Fresh requesters (new identities) in home1, one after another: each reaches the worker
    // through the relay, hole punching tries to make that direct, and a small job runs.
    let mut paths = Vec::new();
    for i in 0..PUNCH_TRIES {
        let (boot1, id2c) = (boot.clone(), id2.clone());
        let path = in_ns(&home1, move || {
            let started = Instant::now();
            let client = Client::builder()
                .bootstrap(&boot1)
                .wait_for_workers(1, Duration::from_secs(40))
                .connect()
                .unwrap()
                .with_settings(settings());
            let joined = started.elapsed();
            small_mlp(
                &Graph::new("try").with_executor(client.executor()),
                10 + i as u64,
            )
            .eval_data()
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let peers = rt.block_on(client.requester().peers()).unwrap();
            let path = peers
                .into_iter()
                .find(|p| p.peer_id == id2c)
                .and_then(|p| p.path);
            (path, joined)
        });
        println!(
            "requester {i}: knew the worker after {:.1} s, reached it {path:?}",
            path.1.as_secs_f64()
        );
        paths.push(path.0);
    }
    let worker = status_in(&home2, &d2).unwrap();
    let punched = paths
        .iter()
        .filter(|p| **p == Some(PeerPath::HolePunched))
        .count();
    println!(
        "hole punching: {punched} of {PUNCH_TRIES} fresh requesters reached the worker directly ({paths:?}); the worker counts {:?}",
        worker.hole_punches
    );
    assert!(
        paths.iter().all(Option::is_some),
        "a requester was not connected to the worker after its job: {paths:?}"
    );
    assert!(
        worker.hole_punches.succeeded > 0,
        "no hole punch succeeded: {:?}, paths {paths:?}",
        worker.hole_punches
    );
}

/// A worker behind a router that maps every connection to a random port (like a symmetric
/// NAT): hole punching cannot work, and the worker is still used, through the relay.
#[test]
fn a_worker_behind_a_symmetric_nat_is_used_through_the_relay() {
    use common::netns::Mapping;
    if !available("nat::a_worker_behind_a_symmetric_nat_is_used_through_the_relay") {
        return;
    }
    common::init_logs();
    let (_net, [public, home1, home2, public2]) =
        Net::build_with([Mapping::PortPreserving, Mapping::Random]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (d0, d2) = (dir.path().join("relay"), dir.path().join("worker"));
    let (_relays, _, boot) = relays(&public, &public2, &d0, &dir.path().join("public2"));
    let id2 = peer_id(&d2);
    let _worker = node_in(&home2, &d2, 4001, Some(&boot));
    let summary = in_ns(&home1, move || {
        let client = Client::builder()
            .bootstrap(&boot)
            .wait_for_workers(1, Duration::from_secs(40))
            .connect()
            .unwrap()
            .with_settings(settings());
        let exec =
            Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings()));
        let want = small_mlp(&Graph::new("local").with_executor(exec), 5)
            .eval_data()
            .unwrap();
        let got = small_mlp(&Graph::new("symmetric").with_executor(client.executor()), 5)
            .eval_data()
            .unwrap();
        let s = client.last_summary().unwrap();
        assert_eq!(got.words(), want.words(), "{s}");
        s
    });
    println!("{summary}");
    let on_worker = summary.places.get(&Place::Peer(id2)).unwrap();
    assert!(on_worker.tasks > 0, "{summary}");
    assert_eq!(
        on_worker.path,
        Some(corvid_node::PeerPath::Relayed),
        "{summary}"
    );
}
