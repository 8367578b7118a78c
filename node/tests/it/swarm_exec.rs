//! Graphs evaluated across a loopback swarm: the same bits as local evaluation (one
//! determinism class: every node runs the CPU backend), work spread over the workers, and a
//! worker that accepts tasks but never answers is routed around.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use corvid_kernels::{Backend, CpuBackend};
use corvid_node::{Client, Fault, Node, NodeConfig};
use corvid_sdk::sched::Place;
use corvid_sdk::{Graph, LocalExecutor, Settings, Tensor};
use tokio_util::sync::CancellationToken;

/// An MLP over 130 rows and a 96x70 @ 70x100 product, cut into 32-blocks.
fn workload(g: &Graph) -> Vec<Tensor> {
    let x = g.random(&[130, 40], -1.0, 1.0, 1);
    let h = (x.matmul(&g.random(&[40, 64], -0.5, 0.5, 2)).unwrap()
        + &g.random(&[64], -0.1, 0.1, 3))
        .relu()
        .unwrap();
    let probs = h
        .matmul(&g.random(&[64, 10], -0.5, 0.5, 4))
        .unwrap()
        .softmax(1)
        .unwrap();
    let c = g
        .random(&[96, 70], -1.0, 1.0, 5)
        .matmul(&g.random(&[70, 100], -1.0, 1.0, 6))
        .unwrap();
    vec![probs, c.tanh().unwrap()]
}

fn settings() -> Settings {
    Settings {
        block: 32,
        ..Settings::default()
    }
}

fn local_results() -> Vec<corvid_kernels::Tensor> {
    let exec = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings());
    let g = Graph::new("local").with_executor(Arc::new(exec));
    let outs = workload(&g);
    g.eval(&outs.iter().collect::<Vec<_>>()).unwrap()
}

#[test]
fn a_four_node_swarm_gives_exactly_the_local_result() {
    let client = Client::local(4).unwrap().with_settings(settings());
    let g = Graph::new("swarm").with_executor(client.executor());
    let outs = workload(&g);
    let got = g.eval(&outs.iter().collect::<Vec<_>>()).unwrap();
    let want = local_results();
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.meta(), b.meta());
        assert_eq!(a.words(), b.words(), "swarm and local results differ");
    }
    let summary = client.last_summary().unwrap();
    println!("{summary}");
    let workers_used = summary
        .places
        .iter()
        .filter(|(p, s)| **p != Place::Local && s.tasks > 0)
        .count();
    assert!(
        workers_used >= 2,
        "work should spread over the workers:\n{summary}"
    );
    assert!(summary.redispatches.is_empty(), "{summary}");
    assert!(g.end().is_ok());
}

#[test]
fn a_worker_that_never_answers_is_routed_around() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shutdown = CancellationToken::new();
    let (good, bad) = rt.block_on(async {
        let mut c = NodeConfig::for_test(2000);
        c.slots = 2;
        let good = Node::spawn(c, shutdown.clone()).await.unwrap();
        let mut c = NodeConfig::for_test(2001);
        c.slots = 4;
        c.fault = Some(Fault::Hang);
        c.bootstrap = vec![good.bootstrap_addr()];
        let bad = Node::spawn(c, shutdown.clone()).await.unwrap();
        (good, bad)
    });
    let client = Client::connect(vec![good.bootstrap_addr()])
        .unwrap()
        .with_settings(settings());
    client.wait_for_workers(2, Duration::from_secs(20)).unwrap();
    let g = Graph::new("hang").with_executor(client.executor());
    let outs = workload(&g);
    let got = g.eval(&outs.iter().collect::<Vec<_>>()).unwrap();
    let want = local_results();
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.words(), b.words());
    }
    let summary = client.last_summary().unwrap();
    println!("{summary}");
    let bad_id = bad.peer_id().to_string();
    assert!(
        summary
            .places
            .get(&Place::Peer(bad_id.clone()))
            .is_none_or(|s| s.tasks == 0),
        "{summary}"
    );
    assert!(
        summary
            .redispatches
            .iter()
            .any(|(_, why)| why.contains("no answer") || why.contains("straggling")),
        "the hung tasks must show as re-dispatched:\n{summary}"
    );
    shutdown.cancel();
    drop(client);
    rt.block_on(async {
        good.join().await;
        bad.join().await;
    });
}

#[test]
fn repeated_jobs_reuse_verified_results_and_values_workers_hold() {
    let client = Client::local(2).unwrap().with_settings(settings());
    let run = || {
        let g = Graph::new("again").with_executor(client.executor());
        let outs = workload(&g);
        let got = g.eval(&outs.iter().collect::<Vec<_>>()).unwrap();
        for (a, b) in got.iter().zip(&local_results()) {
            assert_eq!(a.words(), b.words());
        }
        client.last_summary().unwrap()
    };
    let first = run();
    let remote_in = |s: &corvid_node::JobSummary| -> u64 {
        s.places
            .iter()
            .filter(|(p, _)| **p != Place::Local)
            .map(|(_, p)| p.bytes_in)
            .sum()
    };
    assert!(remote_in(&first) > 0, "{first}");
    // The same graph again: every subgraph comes from the requester's cache.
    let second = run();
    println!("{second}");
    assert_eq!(second.cached, second.subgraphs, "{second}");
    assert!(
        second.places.values().all(|p| p.tasks == 0),
        "nothing runs again:\n{second}"
    );
    // Without the requester's cache, the workers still hold the inputs they were sent: only
    // ids travel for the tasks that land where their inputs are.
    client.clear_cache();
    let third = run();
    println!("{third}");
    assert_eq!(third.cached, 0);
    assert!(
        remote_in(&third) < remote_in(&first),
        "held inputs are not sent again: {} then {} bytes\n{third}",
        remote_in(&first),
        remote_in(&third)
    );
}

#[test]
fn plans_are_cut_to_fit_small_worker_budgets_and_nothing_is_refused() {
    // Workers that offer 64 MiB: 16 MiB for a task. A 1024² product in the default 1024
    // blocks needs about 30 MiB, so the requester must cut smaller tiles.
    let client = Client::local_with(2, |_, c| c.max_memory = Some(64 << 20)).unwrap();
    let budget = client.workers()[0].limits().task.clone();
    assert_eq!(budget.max_peak_bytes, 16 << 20);
    let build = |g: &Graph| {
        let a = g.random(&[1024, 1024], -1.0, 1.0, 1);
        let b = g.random(&[1024, 1024], -1.0, 1.0, 2);
        (a.matmul(&b).unwrap() + &g.random(&[1024], -1.0, 1.0, 3))
            .relu()
            .unwrap()
    };
    let g = Graph::new("fit").with_executor(client.executor());
    let y = build(&g);
    let plan = g.plan(&[&y]).unwrap();
    for sg in plan.subgraphs.iter().filter(|s| s.cost.flops > 0) {
        let f = sg
            .program
            .validate(&corvid_kernels::Budget::unlimited())
            .unwrap();
        assert!(
            budget.admits(&f).is_ok(),
            "subgraph {} ({}) needs {} bytes at peak, over {}",
            sg.id.short(),
            sg.ops(),
            f.peak_bytes,
            budget.max_peak_bytes
        );
    }
    let got = y.eval_data().unwrap();
    let local = Graph::new("fit-local").with_executor(Arc::new(LocalExecutor::new(Backend::Cpu(
        CpuBackend::new(),
    ))));
    let want = build(&local).eval_data().unwrap();
    assert_eq!(got.words(), want.words(), "swarm and local results differ");
    let summary = client.last_summary().unwrap();
    let failed: usize = summary.places.values().map(|s| s.failures).sum();
    assert_eq!(failed, 0, "no task may be refused:\n{summary}");
    let remote: usize = summary
        .places
        .iter()
        .filter(|(p, _)| **p != Place::Local)
        .map(|(_, s)| s.tasks)
        .sum();
    assert!(remote >= 4, "the tiles ran on the workers:\n{summary}");
}
