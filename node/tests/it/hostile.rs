//! A hostile requester, built from the public crates, speaks `/corvid/task/4` to a real
//! `corvid node` process (tasks in its confined executor process) and sends programs meant to
//! crash, exhaust or hang it. Each gets an error quickly; an honest task sent right after
//! succeeds; the node's and executor's memory stays within the node's budget; a cancel stops a
//! running task; an executor that crashes is restarted and the node keeps serving.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corvid_kernels::{Limit, Op, Program, Tensor, TensorMeta, UnaryOp};
use corvid_node::sandbox::proto::Landlock;
use corvid_node::{Node, NodeClient, NodeConfig, NodeHandle, Status};
use corvid_sdk::ValueId;
use corvid_sdk::ids::subgraph_id;
use corvid_sdk::wire::{Input, TASK_VERSION, TaskError, TaskRequest, TaskResponse};
use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

use common::{Proc, process_status as status};

/// The budget the worker is given: 256 MiB per task.
const MEMORY: u64 = 1 << 30;

fn worker(dir: &Path, extra: &[&str]) -> Proc {
    worker_on("cpu", dir, extra)
}

fn worker_on(backend: &str, dir: &Path, extra: &[&str]) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corvid"));
    cmd.args([
        "--log",
        "warn",
        "node",
        "--backend",
        backend,
        "--slots",
        "1",
    ])
    .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--max-memory", "1GiB"])
    // Short deadlines, so that the slow case is stopped quickly.
    .args(["--max-task-time", "3s"])
    .args(extra)
    .arg("--data-dir")
    .arg(dir)
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    Proc(cmd.spawn().unwrap())
}

/// Resident memory of `pid` and of its children (the executor), bytes.
fn rss_with_children(pid: u32) -> u64 {
    let rss = |p: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let mut total = rss(pid);
    for c in children(pid) {
        total += rss(c);
    }
    total
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// A request for `program` on `inputs`, with a matching subgraph id, as anyone could build.
fn request(task: u64, program: Program, inputs: Vec<Tensor>) -> TaskRequest {
    let input_ids: Vec<ValueId> = (0..inputs.len()).map(|i| ValueId([i as u8; 32])).collect();
    let output_ids = (0..program.outputs.len())
        .map(|i| ValueId([200 + i as u8; 32]))
        .collect();
    TaskRequest {
        version: TASK_VERSION,
        task,
        nonce: [7; 16],
        subgraph: subgraph_id(&program.canonical_bytes(), &input_ids),
        program,
        input_ids,
        output_ids,
        inputs: inputs
            .into_iter()
            .map(|t| Input::Data(Arc::new(t)))
            .collect(),
    }
}

fn honest(task: u64) -> TaskRequest {
    let a = Tensor::random_uniform([30, 40], -1.0, 1.0, task);
    let b = Tensor::random_uniform([40, 20], -1.0, 1.0, task + 1);
    let p = Program::single(Op::MatMul, vec![a.meta(), b.meta()]);
    request(task, p, vec![a, b])
}

fn f(shape: &[usize]) -> TensorMeta {
    TensorMeta::f32(shape.to_vec())
}

/// Sends a request and returns the answer, within `within`.
async fn ask(client: &NodeClient, peer: PeerId, r: TaskRequest, within: Duration) -> TaskResponse {
    let started = Instant::now();
    let task = r.task;
    let answer = tokio::time::timeout(within, client.run_task(peer, r))
        .await
        .unwrap_or_else(|_| panic!("task {task} not answered within {within:?}"))
        .unwrap();
    eprintln!(
        "task {task}: {:?} after {:?}",
        brief(&answer),
        started.elapsed()
    );
    answer
}

fn brief(r: &TaskResponse) -> String {
    match r {
        TaskResponse::Done { outputs, .. } => format!("done ({} outputs)", outputs.len()),
        TaskResponse::Failed { error, .. } => format!("failed: {error}"),
        TaskResponse::Missing { inputs, .. } => format!("missing {inputs:?}"),
    }
}

async fn requester(boot: &Status, shutdown: &CancellationToken) -> (NodeHandle, PeerId) {
    let peer: PeerId = boot.peer_id.parse().unwrap();
    let mut c = NodeConfig::for_test(4242);
    c.contribute = false;
    let addr: libp2p::Multiaddr = boot.listen_addrs[0].parse().unwrap();
    c.bootstrap = vec![addr.with_p2p(peer).unwrap()];
    let node = Node::spawn(c, shutdown.clone()).await.unwrap();
    common::wait_for("the worker's advert", Duration::from_secs(30), || async {
        let peers = node.peers().await.ok()?;
        peers
            .iter()
            .any(|p| p.peer_id == boot.peer_id)
            .then_some(())
    })
    .await;
    (node, peer)
}

async fn running(dir: &Path) -> Status {
    common::wait_for("the worker to run", Duration::from_secs(60), || status(dir)).await
}

/// Thousands of 16 MiB copies: no FLOPs, but far longer than any deadline.
fn slow() -> Program {
    let mut p = Program::new(vec![f(&[1, 1])]);
    let mut v = p.push(
        Op::BroadcastTo {
            shape: vec![2048, 2048],
        },
        &[0],
    );
    for _ in 0..4000 {
        v = p.push(Op::Permute { axes: vec![1, 0] }, &[v]);
    }
    p.outputs = vec![v];
    p
}

fn refused(r: &TaskResponse) -> &TaskError {
    match r {
        TaskResponse::Failed { error, .. } => error,
        other => panic!("expected a refusal, got {}", brief(other)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_programs_get_errors_and_the_node_keeps_serving() {
    common::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("worker");
    let mut proc = worker(&dir, &[]);
    let pid = proc.0.id();
    let boot = running(&dir).await;
    // The executor holds no key and cannot read it.
    let exec = boot
        .executor
        .clone()
        .expect("tasks run in an executor process");
    eprintln!("executor: {exec:?}");
    assert!(exec.confinement.seccomp, "{exec:?}");
    assert_eq!(exec.pid, children(pid).first().copied(), "{exec:?}");
    if exec.confinement.landlock == Landlock::FullyEnforced {
        assert!(
            exec.confinement.forbidden_readable.is_empty(),
            "the executor can read {:?}",
            exec.confinement.forbidden_readable
        );
    } else {
        eprintln!(
            "landlock is not available here: {}",
            exec.confinement.landlock
        );
    }
    let limits = boot
        .limits
        .clone()
        .expect("a contributing node reports its limits");
    assert_eq!(limits.task.max_peak_bytes, MEMORY / 4);
    let shutdown = CancellationToken::new();
    let (node, peer) = requester(&boot, &shutdown).await;
    let client = node.client();
    let quick = Duration::from_secs(10);
    let done = |r: &TaskResponse| matches!(r, TaskResponse::Done { .. });
    assert!(done(&ask(&client, peer, honest(1), quick).await));
    let baseline = rss_with_children(pid);

    let huge = (1usize << 63) + 1;
    let one = Tensor::full([1], 2.0);
    let too_large = |r: &TaskResponse, limit: Limit| matches!(refused(r), TaskError::TooLarge(t) if t.limit == limit);
    let invalid = |r: &TaskResponse, what: &str| matches!(refused(r), TaskError::Invalid(m) if m.contains(what));

    // f32[2^63+1, 0] @ f32[0, 2] @ f32[2, 2]: the product's size wraps in unchecked arithmetic.
    let mut p = Program::new(vec![f(&[huge, 0]), f(&[0, 2]), f(&[2, 2])]);
    let h = p.push(Op::MatMul, &[0, 1]);
    let o = p.push(Op::MatMul, &[h, 2]);
    p.outputs = vec![o];
    let inputs = vec![
        Tensor::from_f32([huge, 0], vec![]).unwrap(),
        Tensor::from_f32([0, 2], vec![]).unwrap(),
        Tensor::full([2, 2], 1.0),
    ];
    let r = ask(&client, peer, request(10, p, inputs), quick).await;
    assert!(too_large(&r, Limit::TensorBytes), "{}", brief(&r));
    assert!(done(&ask(&client, peer, honest(11), quick).await));

    // f32[1] broadcast to 4 TiB.
    let p = Program::single(
        Op::BroadcastTo {
            shape: vec![1 << 20, 1 << 20],
        },
        vec![one.meta()],
    );
    let r = ask(&client, peer, request(20, p, vec![one.clone()]), quick).await;
    assert!(too_large(&r, Limit::TensorBytes), "{}", brief(&r));
    assert!(done(&ask(&client, peer, honest(21), quick).await));

    // Padding by usize::MAX wraps the padded length.
    let p = Program::single(
        Op::Pad {
            pads: vec![[usize::MAX, 1]],
            value: 0.0,
        },
        vec![one.meta()],
    );
    let r = ask(&client, peer, request(30, p, vec![one.clone()]), quick).await;
    assert!(invalid(&r, "overflows"), "{}", brief(&r));

    // A rank-100,000 input through 100,000 negations: more nodes than a message may carry,
    // so decoding stops at the count, before building them, and drops the request.
    let chain = |n: usize| {
        let shape = vec![1usize; 100_000];
        let mut p = Program::new(vec![f(&shape)]);
        let mut v = 0;
        for _ in 0..n {
            v = p.push(Op::Unary(UnaryOp::Neg), &[v]);
        }
        p.outputs = vec![v];
        (p, Tensor::from_f32(shape, vec![1.0]).unwrap())
    };
    let (p, x) = chain(100_000);
    let started = Instant::now();
    let r = tokio::time::timeout(quick, client.run_task(peer, request(40, p, vec![x])))
        .await
        .expect("answered in time");
    assert!(
        r.is_err(),
        "a request that cannot be decoded is dropped: {r:?}"
    );
    eprintln!("task 40: {} after {:?}", r.unwrap_err(), started.elapsed());
    assert!(done(&ask(&client, peer, honest(41), quick).await));
    // 50,000 of them decode, and are refused by the node limit.
    let (p, x) = chain(50_000);
    let r = ask(&client, peer, request(42, p, vec![x]), quick).await;
    assert!(too_large(&r, Limit::Nodes), "{}", brief(&r));
    assert!(done(&ask(&client, peer, honest(43), quick).await));

    // Concat lengths that overflow, and conv windows that do.
    let empty = Tensor::from_f32([0, 1 << 62], vec![]).unwrap();
    let p = Program::single(Op::Concat { axis: 1 }, vec![empty.meta(); 4]);
    let r = ask(&client, peer, request(50, p, vec![empty; 4]), quick).await;
    assert!(too_large(&r, Limit::TensorBytes), "{}", brief(&r));
    let img = Tensor::full([1, 1, 2, 2], 1.0);
    let p = Program::single(
        Op::Conv2d {
            stride: [1, 1],
            padding: [usize::MAX / 2 + 1, 0],
        },
        vec![img.meta(), img.meta()],
    );
    let r = ask(&client, peer, request(51, p, vec![img.clone(), img]), quick).await;
    assert!(invalid(&r, "overflows"), "{}", brief(&r));

    // Peak memory: 4 GiB of im2col columns between a 256 KiB input and a 64 KiB output.
    let x = Tensor::full([1, 16, 64, 64], 0.5);
    let p = Program::single(
        Op::Conv2d {
            stride: [1, 1],
            padding: [63, 63],
        },
        vec![x.meta(), x.meta()],
    );
    let r = ask(&client, peer, request(60, p, vec![x.clone(), x]), quick).await;
    assert!(too_large(&r, Limit::PeakMemory), "{}", brief(&r));

    // FLOPs: 137 GFLOP from a one-element input, over what 3 s allows (a second at 4x).
    let mut p = Program::new(vec![f(&[1, 1])]);
    let big = p.push(
        Op::BroadcastTo {
            shape: vec![4096, 4096],
        },
        &[0],
    );
    let mm = p.push(Op::MatMul, &[big, big]);
    p.outputs = vec![mm];
    let r = ask(
        &client,
        peer,
        request(70, p, vec![Tensor::full([1, 1], 1.0)]),
        quick,
    )
    .await;
    assert!(too_large(&r, Limit::Flops), "{}", brief(&r));
    assert!(done(&ask(&client, peer, honest(71), quick).await));

    // Time: thousands of copies cost no FLOPs but take far longer than the deadline.
    let started = Instant::now();
    let r = ask(
        &client,
        peer,
        request(80, slow(), vec![Tensor::full([1, 1], 1.0)]),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        matches!(refused(&r), TaskError::Deadline(_)),
        "{}",
        brief(&r)
    );
    let stopped_after = started.elapsed();
    assert!(done(&ask(&client, peer, honest(81), quick).await));

    // A cancel stops a running task.
    let (c2, started) = (client.clone(), Instant::now());
    let long = tokio::spawn(async move {
        c2.run_task(peer, request(90, slow(), vec![Tensor::full([1, 1], 1.0)]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.cancel_task(peer, 90).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(refused(&r), TaskError::Cancelled), "{}", brief(&r));
    let cancelled_after = started.elapsed();
    assert!(done(&ask(&client, peer, honest(91), quick).await));

    let after = rss_with_children(pid);
    eprintln!(
        "rss: {} MiB before the hostile tasks, {} MiB after; the deadline stopped a task after \
         {stopped_after:?}, a cancel after {cancelled_after:?}",
        baseline >> 20,
        after >> 20
    );
    assert!(
        after < baseline + MEMORY,
        "rss grew from {baseline} to {after}"
    );
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "the node process exited"
    );
    let s = status(&dir).await.expect("the node still answers");
    assert!(s.tasks_answered >= 17, "{}", s.tasks_answered);
    shutdown.cancel();
    node.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_executor_is_restarted_and_the_node_keeps_serving() {
    common::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crashy");
    // The executor aborts on every third task.
    let mut proc = worker(&dir, &["--cheat", "crash-executor"]);
    let boot = running(&dir).await;
    let shutdown = CancellationToken::new();
    let (node, peer) = requester(&boot, &shutdown).await;
    let client = node.client();
    let within = Duration::from_secs(30);
    let first = children(proc.0.id());
    let mut crashed = 0;
    for task in 1..=7 {
        match ask(&client, peer, honest(task), within).await {
            TaskResponse::Done { .. } => {}
            TaskResponse::Failed {
                error: TaskError::Failed(m),
                ..
            } if m.contains("executor process was killed by signal 6") => crashed += 1,
            other => panic!("task {task}: {}", brief(&other)),
        }
    }
    assert_eq!(crashed, 2, "tasks 3 and 6 crash the executor");
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "the node process exited"
    );
    let now = children(proc.0.id());
    assert_eq!(now.len(), 1, "one executor runs: {now:?}");
    assert_ne!(first, now, "it is a new process");
    shutdown.cancel();
    node.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_executor_refuses_stops_and_recovers() {
    common::init_logs();
    // The executor needs an adapter; CI requires one (lavapipe).
    let required = std::env::var("CORVID_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if let Err(e) = corvid_kernels::GpuBackend::new(true) {
        assert!(!required, "CORVID_REQUIRE_GPU=1 but no gpu adapter: {e}");
        eprintln!("skipping: no gpu adapter ({e})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gpu");
    let mut proc = worker_on("gpu", &dir, &[]);
    let boot = running(&dir).await;
    assert!(boot.advert.backend == "gpu", "{}", boot.advert.backend);
    let shutdown = CancellationToken::new();
    let (node, peer) = requester(&boot, &shutdown).await;
    let client = node.client();
    let quick = Duration::from_secs(20);
    let done = |r: &TaskResponse| matches!(r, TaskResponse::Done { .. });
    assert!(done(&ask(&client, peer, honest(1), quick).await));
    let one = Tensor::full([1], 2.0);
    let p = Program::single(
        Op::BroadcastTo {
            shape: vec![1 << 20, 1 << 20],
        },
        vec![one.meta()],
    );
    let r = ask(&client, peer, request(2, p, vec![one]), quick).await;
    assert!(
        matches!(refused(&r), TaskError::TooLarge(t) if t.limit == Limit::TensorBytes),
        "{}",
        brief(&r)
    );
    // Past its deadline the device is left busy; the executor replaces it.
    let r = ask(
        &client,
        peer,
        request(3, slow(), vec![Tensor::full([1, 1], 1.0)]),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        matches!(refused(&r), TaskError::Deadline(_)),
        "{}",
        brief(&r)
    );
    assert!(done(
        &ask(&client, peer, honest(4), Duration::from_secs(60)).await
    ));
    assert!(
        proc.0.try_wait().unwrap().is_none(),
        "the node process exited"
    );
    shutdown.cancel();
    node.join().await;
}
