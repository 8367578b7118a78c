//! Untrusted workers on a loopback swarm: every result is checked, cheaters are caught and
//! banned with evidence, honest peers never are, and the developer still gets the honest
//! answer bit for bit.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use corvid_kernels::{Backend, CpuBackend};
use corvid_node::trust::Ban;
use corvid_node::{Client, Fault, JobSummary};
use corvid_sdk::sched::Place;
use corvid_sdk::{Graph, LocalExecutor, Settings, Tensor};

fn settings() -> Settings {
    Settings {
        block: 64,
        ..Settings::default()
    }
}

/// Job `seed`: a 256x96 @ 96x256 product cut into 16 tiles of 64x64 (each checked with
/// Freivalds), plus a small MLP (row pipelines, checked by sampled rows).
fn workload(g: &Graph, seed: u64, mlp: bool) -> Vec<Tensor> {
    let s = seed * 10;
    let c = g
        .random(&[256, 96], -1.0, 1.0, s + 1)
        .matmul(&g.random(&[96, 256], -1.0, 1.0, s + 2))
        .unwrap();
    let mut outs = vec![c];
    if mlp {
        let x = g.random(&[100, 32], -1.0, 1.0, s + 3);
        let h = (x.matmul(&g.random(&[32, 48], -0.5, 0.5, s + 4)).unwrap()
            + &g.random(&[48], -0.1, 0.1, s + 5))
            .relu()
            .unwrap();
        outs.push(
            h.matmul(&g.random(&[48, 10], -0.5, 0.5, s + 6))
                .unwrap()
                .softmax(1)
                .unwrap(),
        );
    }
    outs
}

fn local(seed: u64, mlp: bool) -> Vec<corvid_kernels::Tensor> {
    let exec = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings());
    let g = Graph::new("local").with_executor(Arc::new(exec));
    let outs = workload(&g, seed, mlp);
    g.eval(&outs.iter().collect::<Vec<_>>()).unwrap()
}

/// Runs job `seed` and checks it against local evaluation, bit for bit.
fn run(client: &Client, seed: u64, mlp: bool) -> JobSummary {
    let g = Graph::new("job").with_executor(client.executor());
    let outs = workload(&g, seed, mlp);
    let got = g.eval(&outs.iter().collect::<Vec<_>>()).unwrap();
    let summary = client.last_summary().unwrap();
    for (a, b) in got.iter().zip(&local(seed, mlp)) {
        assert_eq!(
            a.words(),
            b.words(),
            "job {seed} differs from local:\n{summary}"
        );
    }
    summary
}

/// Why `peer` was banned; panics, listing the bans, if it was not.
fn ban_reason(bans: &[Ban], peer: &str) -> String {
    bans.iter()
        .find(|b| b.peer == peer)
        .map(|b| b.reason.clone())
        .unwrap_or_else(|| panic!("{peer} was not banned: {bans:?}"))
}

fn tasks_of(s: &JobSummary, peer: &str) -> usize {
    s.places
        .get(&Place::Peer(peer.to_string()))
        .map_or(0, |p| p.tasks + p.failures)
}

#[test]
fn a_peer_corrupting_one_result_in_ten_is_banned_within_30_tasks() {
    // Worker 3 moves one element of every 10th result by 1.05x the verifier's tolerance.
    let client = Client::local_with(4, |i, c| {
        if i == 3 {
            c.fault = Some(Fault::Corrupt {
                every: 10,
                factor: 1.05,
            });
        }
    })
    .unwrap()
    .with_settings(settings());
    let cheater = client.workers()[3].peer_id().to_string();
    let mut given = 0;
    let mut jobs = 0;
    while client.bans().is_empty() {
        jobs += 1;
        assert!(
            jobs <= 12,
            "no ban after {jobs} jobs, {given} tasks to the cheater"
        );
        let s = run(&client, jobs, false);
        println!("{s}");
        given += tasks_of(&s, &cheater);
        assert!(s.verify.freivalds > 0, "{s}");
    }
    let bans = client.bans();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].peer, cheater, "an honest peer was banned: {bans:?}");
    assert!(given <= 30, "the cheater got {given} tasks before its ban");
    assert!(bans[0].reason.contains("freivalds"), "{bans:?}");
    assert!(bans[0].evidence.contains("matmul"), "{bans:?}");
    // After the ban the cheater gets nothing, and the answers stay right.
    let s = run(&client, 100, true);
    assert_eq!(tasks_of(&s, &cheater), 0, "{s}");
    assert!(s.verify.sampled_rows > 0, "{s}");
}

#[test]
fn zeroed_replayed_and_wrongly_signed_results_are_refused() {
    let faults = [
        None,
        Some(Fault::Zeros),
        Some(Fault::Replay),
        Some(Fault::WrongKey),
    ];
    let client = Client::local_with(4, |i, c| c.fault = faults[i])
        .unwrap()
        .with_settings(settings());
    let ids: Vec<String> = client
        .workers()
        .iter()
        .map(|w| w.peer_id().to_string())
        .collect();
    for seed in 1..=6 {
        let s = run(&client, seed, seed % 2 == 0);
        println!("{s}");
        if seed == 1 {
            assert_eq!(s.verify.canaries, 4, "every new peer gets a canary:\n{s}");
        }
        if client.bans().len() == 3 {
            break;
        }
    }
    let bans = client.bans();
    let reason = |peer: &str| ban_reason(&bans, peer);
    assert!(reason(&ids[1]).contains("wrong result"), "{bans:?}");
    assert!(reason(&ids[2]).starts_with("replayed result"), "{bans:?}");
    assert!(
        reason(&ids[3]).starts_with("result signed by another peer"),
        "{bans:?}"
    );
    assert!(
        bans.iter().all(|b| b.peer != ids[0]),
        "the honest peer was banned: {bans:?}"
    );
}

/// A result of the wrong shape, signed, is no accident: no honest run of the program makes
/// it. The peer is banned with the shapes as evidence, and the job finishes elsewhere.
#[test]
fn a_signed_result_of_the_wrong_shape_is_grounds_for_a_ban() {
    let faults = [None, Some(Fault::WrongShape)];
    let client = Client::local_with(2, |i, c| c.fault = faults[i])
        .unwrap()
        .with_settings(settings());
    let liar = client.workers()[1].peer_id().to_string();
    for seed in 1..=4 {
        println!("{}", run(&client, seed, true));
        if !client.bans().is_empty() {
            break;
        }
    }
    let bans = client.bans();
    assert_eq!(bans.len(), 1, "{bans:?}");
    let reason = ban_reason(&bans, &liar);
    assert!(reason.starts_with("malformed result, signed"), "{bans:?}");
    assert!(
        reason.contains("expected") && bans[0].evidence.contains("the receipt signs"),
        "{bans:?}"
    );
}

/// An answer larger than the task's outputs is not even read: the requester refuses it at
/// its head (so a peer cannot make it hold gigabytes), the task goes elsewhere, and nothing
/// proves a lie (it was never opened), so nobody is banned for it.
#[test]
fn an_answer_larger_than_its_task_makes_is_refused_unread() {
    let faults = [None, Some(Fault::Oversize)];
    let client = Client::local_with(2, |i, c| c.fault = faults[i])
        .unwrap()
        .with_settings(settings());
    let big = client.workers()[1].peer_id().to_string();
    let s = run(&client, 1, true);
    println!("{s}");
    let failures = s.places.get(&Place::Peer(big)).map_or(0, |p| p.failures);
    assert!(failures > 0, "{s}");
    assert!(client.bans().is_empty(), "{:?}", client.bans());
}

/// Two colluders claim a determinism class nobody else has and tell the same lie in row
/// pipelines (which sampled rows rarely catch). As each other's same-class replicas they
/// would agree bit for bit; a replica of another class disagrees, the dispute is settled by
/// a recompute, both are banned, and every answer is right.
#[test]
fn colluders_inventing_a_class_cannot_vouch_for_each_other() {
    // Two honest peers (of the requester's class, so they replicate each other) and two
    // colluders.
    let faults = [None, None, Some(Fault::Collude), Some(Fault::Collude)];
    let client = Client::local_with(4, |i, c| c.fault = faults[i])
        .unwrap()
        .with_settings(settings());
    let ids: Vec<String> = client
        .workers()
        .iter()
        .map(|w| w.peer_id().to_string())
        .collect();
    // Row pipelines only: no matmul tile for Freivalds to catch them on, or to earn trust by.
    let mlp = |g: &Graph, seed: u64| {
        let x = g.random(&[640, 32], -1.0, 1.0, seed);
        (x.matmul(&g.random(&[32, 48], -0.5, 0.5, seed + 1)).unwrap()
            + &g.random(&[48], -0.1, 0.1, seed + 2))
            .tanh()
            .unwrap()
    };
    let exec =
        Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings()));
    for seed in [10, 20, 30] {
        let want = mlp(&Graph::new("local").with_executor(exec.clone()), seed)
            .eval_data()
            .unwrap();
        let got = mlp(&Graph::new("mlp").with_executor(client.executor()), seed)
            .eval_data()
            .unwrap();
        let s = client.last_summary().unwrap();
        println!("{s}");
        assert_eq!(got.words(), want.words(), "job {seed}:\n{s}");
    }
    let bans = client.bans();
    for colluder in &ids[2..] {
        let reason = ban_reason(&bans, colluder);
        assert!(reason.contains("wrong result"), "{bans:?}");
    }
    assert!(
        bans.iter().all(|b| b.peer != ids[0] && b.peer != ids[1]),
        "{bans:?}"
    );
}

/// Recipes are inputs like any other: a worker that makes a recipe input from another seed is
/// caught whether its receipt names the recipe it made (a result for other inputs) or the one
/// it was sent (a wrong result), and the job's answer is still exact.
#[test]
fn a_worker_cannot_claim_another_recipe() {
    let faults = [
        None,
        Some(Fault::OtherRecipe { claim_asked: false }),
        Some(Fault::OtherRecipe { claim_asked: true }),
    ];
    let client = Client::local_with(3, |i, c| c.fault = faults[i])
        .unwrap()
        .with_settings(settings());
    let ids: Vec<String> = client
        .workers()
        .iter()
        .map(|w| w.peer_id().to_string())
        .collect();
    for seed in 1..=6 {
        println!("{}", run(&client, seed, false));
        if client.bans().len() == 2 {
            break;
        }
    }
    let bans = client.bans();
    let reason = |peer: &str| ban_reason(&bans, peer);
    assert!(
        reason(&ids[1]).starts_with("result for other inputs"),
        "{bans:?}"
    );
    assert!(reason(&ids[2]).contains("wrong result"), "{bans:?}");
    assert!(
        bans.iter().all(|b| b.peer != ids[0]),
        "the honest peer was banned: {bans:?}"
    );
}

/// Peers that claim to be fast and refuse every task cost a job time, not its result: they
/// lose placement after their first failures, their failures use up none of a subgraph's
/// attempts, and the job finishes on the one honest peer, bit for bit.
#[test]
fn fast_peers_that_refuse_every_task_cannot_fail_a_job() {
    let client = Client::local_with(4, |i, c| {
        if i > 0 {
            c.fault = Some(Fault::Refuse { factor: 1000.0 });
        }
    })
    .unwrap()
    .with_settings(settings());
    let honest = client.workers()[0].peer_id().to_string();
    let fakes: Vec<String> = client.workers()[1..]
        .iter()
        .map(|w| w.peer_id().to_string())
        .collect();
    let first = run(&client, 1, true);
    println!("{first}");
    let refused: usize = fakes
        .iter()
        .map(|f| {
            first
                .places
                .get(&Place::Peer(f.clone()))
                .map_or(0, |p| p.failures)
        })
        .sum();
    assert!(refused > 0, "the fakes were never tried:\n{first}");
    assert!(
        first.places[&Place::Peer(honest.clone())].tasks > 0,
        "{first}"
    );
    // The next job starts from what this one learned: the fakes get nothing while the
    // honest peer can take the work.
    let second = run(&client, 2, true);
    println!("{second}");
    for f in &fakes {
        assert_eq!(tasks_of(&second, f), 0, "{second}");
    }
    assert!(client.bans().is_empty(), "refusing is not cheating");
}

#[test]
fn a_slow_peer_advertising_a_fast_benchmark_stops_attracting_work() {
    // Worker 1 claims 1000x its speed and takes 40 ms longer over every task.
    let client = Client::local_with(2, |i, c| {
        if i == 1 {
            c.fault = Some(Fault::Inflate {
                factor: 1000.0,
                delay_ms: 40,
            });
        }
    })
    .unwrap()
    .with_settings(settings());
    let liar = client.workers()[1].peer_id().to_string();
    let first = run(&client, 1, false);
    let second = run(&client, 2, false);
    let third = run(&client, 3, false);
    println!("{first}{second}{third}");
    let later = tasks_of(&second, &liar) + tasks_of(&third, &liar);
    assert!(
        later <= 4,
        "after its first tasks were measured the liar still got {later} of 32 tasks"
    );
    assert!(client.bans().is_empty(), "being slow is not cheating");
}

#[test]
fn a_lie_in_a_sampled_result_is_caught_by_a_replica_and_its_work_redone() {
    // Row pipelines are checked by a sample of rows, so a single wrong element usually slips
    // past the sample; a new peer's results are also replicated on another peer of the same
    // class, and the disagreement is settled by a local recompute.
    let client = Client::local_with(3, |i, c| {
        if i == 2 {
            c.fault = Some(Fault::Corrupt {
                every: 2,
                factor: 1.05,
            });
        }
    })
    .unwrap()
    .with_settings(settings());
    let cheater = client.workers()[2].peer_id().to_string();
    let mlp = |g: &Graph| {
        let x = g.random(&[640, 32], -1.0, 1.0, 7);
        (x.matmul(&g.random(&[32, 48], -0.5, 0.5, 8)).unwrap() + &g.random(&[48], -0.1, 0.1, 9))
            .tanh()
            .unwrap()
    };
    let exec = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings());
    let want = mlp(&Graph::new("local").with_executor(Arc::new(exec)))
        .eval_data()
        .unwrap();
    let g = Graph::new("mlp").with_executor(client.executor());
    let got = mlp(&g).eval_data().unwrap();
    let s = client.last_summary().unwrap();
    println!("{s}");
    assert_eq!(got.words(), want.words(), "{s}");
    assert!(s.verify.sampled_rows > 0 && s.verify.replicated > 0, "{s}");
    let bans = client.bans();
    assert_eq!(bans.len(), 1, "{bans:?}\n{s}");
    assert_eq!(bans[0].peer, cheater);
    assert!(!bans[0].evidence.is_empty());
    // Caught by a replica (usually: the sample is 4 rows of 640) and settled on the first op
    // where the two receipts differ, the corrupted output's, recomputed here with what it
    // depends on; or caught by the sample (confirmed by a recompute) or by its canary.
    if bans[0].reason.contains("dispute") {
        assert!(
            bans[0]
                .evidence
                .contains("(tanh) differs from a local recompute of that op"),
            "{bans:?}"
        );
    } else {
        assert!(
            bans[0].reason.starts_with("wrong result (recomputed)"),
            "{bans:?}"
        );
    }
}
