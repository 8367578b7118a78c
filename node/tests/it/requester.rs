//! The SDK's requester against real `corvid node` processes: it stays attached across advert
//! intervals with every job on workers, it joins a private (PSK) swarm, and with no usable
//! worker a job fails saying why instead of running on the developer's machine.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Proc, node_process, process_status, wait_until};
use corvid_node::identity::Psk;
use corvid_node::{Client, ClientBuilder, ClientError, Node, NodeConfig};
use corvid_sdk::sched::Place;
use corvid_sdk::{EvalError, Graph, Settings, Tensor};
use tokio_util::sync::CancellationToken;

/// Starts `n` worker processes with `extra` flags; returns them and the bootstrap address.
fn swarm(tmp: &Path, n: usize, extra: &[&str]) -> (Vec<Proc>, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dirs: Vec<PathBuf> = (0..n).map(|i| tmp.join(format!("w{i}"))).collect();
    let mut procs = vec![node_process(&dirs[0], None, extra)];
    let first = wait_until("worker 0", Duration::from_secs(60), || {
        rt.block_on(process_status(&dirs[0]))
            .filter(|s| !s.listen_addrs.is_empty())
    });
    let boot = format!("{}/p2p/{}", first.listen_addrs[0], first.peer_id);
    for d in &dirs[1..] {
        procs.push(node_process(d, Some(&boot), extra));
    }
    (procs, boot)
}

/// 4 tiles of 64 x 128 x 64 and their assembly.
fn job(g: &Graph, seed: u64) -> Tensor {
    g.random(&[128, 128], -1.0, 1.0, seed)
        .matmul(&g.random(&[128, 128], -1.0, 1.0, seed + 1))
        .unwrap()
        .relu()
        .unwrap()
}

fn settings() -> Settings {
    Settings {
        block: 64,
        ..Settings::default()
    }
}

/// Runs a fresh job (new inputs: nothing cached) and checks that every subgraph with
/// arithmetic ran on a worker.
fn run_on_workers(client: &Client, seed: u64) {
    let g = Graph::new("attached").with_executor(client.executor());
    job(&g, seed).eval_data().unwrap();
    let s = client.last_summary().unwrap();
    assert_eq!(s.local_compute, 0, "job {seed} ran work locally:\n{s}");
    let on_workers: usize = s
        .places
        .iter()
        .filter(|(p, _)| **p != Place::Local)
        .map(|(_, p)| p.tasks)
        .sum();
    assert!(
        on_workers >= 4,
        "job {seed}: the tiles ran on workers:\n{s}"
    );
}

#[test]
fn a_requester_stays_attached_across_advert_intervals_and_every_job_runs_on_workers() {
    let tmp = tempfile::tempdir().unwrap();
    // Workers re-advertise every 5 s (real nodes: every 30 s); the jobs span three of those
    // intervals. A requester that forgot peers faster than they re-advertise (the old test
    // configuration forgot them after 3 s) would lose them between adverts.
    let (_procs, boot) = swarm(tmp.path(), 3, &["--advert-interval", "5s"]);
    let client = Client::connect([boot.as_str()])
        .unwrap()
        .with_settings(settings());
    client.wait_for_workers(3, Duration::from_secs(30)).unwrap();
    let started = Instant::now();
    let mut seed = 10;
    while started.elapsed() < Duration::from_secs(15) {
        // All three, right now.
        client.wait_for_workers(3, Duration::ZERO).unwrap();
        run_on_workers(&client, seed);
        seed += 2;
        std::thread::sleep(Duration::from_millis(1000));
    }
    assert!(seed >= 20, "at least five jobs");
}

#[test]
fn the_sdk_joins_a_private_swarm_with_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("swarm.key");
    Psk::generate(&key).unwrap();
    let (_procs, boot) = swarm(tmp.path(), 2, &["--psk", key.to_str().unwrap()]);
    let client = Client::builder()
        .bootstrap(&boot)
        .psk(&key)
        .wait_for_workers(2, Duration::from_secs(30))
        .connect()
        .unwrap()
        .with_settings(settings());
    run_on_workers(&client, 1);
    // Without the key the swarm cannot be joined, and the error says so.
    let e = Client::builder()
        .bootstrap(&boot)
        .wait_for_workers(1, Duration::from_secs(3))
        .connect()
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::NoWorkers(why) if why.contains("no bootstrap peer could be reached")),
        "{e}"
    );
}

#[test]
fn with_no_usable_worker_a_job_fails_and_says_why() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    // A swarm with one requester-only node and no workers.
    let lone = rt
        .block_on(Node::spawn(
            NodeConfig {
                contribute: false,
                ..NodeConfig::for_test(7)
            },
            shutdown.clone(),
        ))
        .unwrap();
    let boot = lone.bootstrap_addr().to_string();
    let e = Client::builder()
        .bootstrap(&boot)
        .wait_for_workers(1, Duration::from_secs(2))
        .connect()
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::NoWorkers(why) if why.contains("0 of them contributing")),
        "{e}"
    );
    let client = ClientBuilder::default()
        .bootstrap(&boot)
        .wait_for_workers(0, Duration::ZERO)
        .connect()
        .unwrap()
        .with_settings(settings());
    let g = Graph::new("nowhere").with_executor(client.executor());
    let e = job(&g, 1).eval_data().unwrap_err();
    match &e {
        EvalError::NoWorker { ops, reason, .. } => {
            assert!(ops.contains("matmul"), "{e}");
            assert!(
                reason.contains("no worker is left") && reason.contains("0 contributing"),
                "{e}"
            );
        }
        other => panic!("expected NoWorker, got {other}"),
    }
    // Allowed explicitly, the requester runs it and the summary says so.
    let local = Client::builder()
        .bootstrap(&boot)
        .wait_for_workers(0, Duration::ZERO)
        .allow_local(true)
        .connect()
        .unwrap()
        .with_settings(settings());
    let g = Graph::new("here").with_executor(local.executor());
    job(&g, 1).eval_data().unwrap();
    let s = local.last_summary().unwrap();
    assert!(s.local_compute >= 4, "{s}");
    assert!(
        s.to_string()
            .contains("with arithmetic ran on the requester"),
        "{s}"
    );
    // A bootstrap address that nobody listens on.
    let e = Client::builder()
        .bootstrap(format!("/ip4/127.0.0.1/tcp/9/p2p/{}", lone.peer_id()))
        .wait_for_workers(1, Duration::from_secs(2))
        .connect()
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::NoWorkers(why) if why.contains("no bootstrap peer could be reached")),
        "{e}"
    );
    let e = Client::builder().connect().unwrap_err();
    assert!(matches!(e, ClientError::NoBootstrap), "{e}");
    let e = Client::connect(["/ip4/127.0.0.1/tcp/4001"]).unwrap_err();
    assert!(e.to_string().contains("no /p2p/"), "{e}");
    shutdown.cancel();
}
