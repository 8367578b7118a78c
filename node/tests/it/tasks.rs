//! The task protocol between two nodes on loopback: a requester sends the subgraphs of a
//! partitioned graph to a worker and gets exactly the local results; malformed tasks and
//! requester-only nodes are refused with reasons.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{init_logs, spawn, wait_for};
use corvid_kernels::{Backend, CpuBackend};
use corvid_node::trust::{Expected, Forgery, open_receipt};
use corvid_node::{Node, NodeConfig};
use corvid_sdk::plan::Source;
use corvid_sdk::wire::{Input, TaskError, TaskRequest, TaskResponse, task_key};
use corvid_sdk::{Executor, Graph, LocalExecutor, Settings};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_subgraphs_and_refuses_bad_tasks() {
    init_logs();
    let shutdown = CancellationToken::new();
    let worker = spawn(0, None, &shutdown).await;
    let mut config = NodeConfig::for_test(1);
    config.bootstrap = vec![worker.bootstrap_addr()];
    config.contribute = false;
    let requester = Node::spawn(config, shutdown.clone()).await.unwrap();
    let worker_id = worker.peer_id();
    let r = &requester;
    wait_for(
        "the requester to see the worker",
        Duration::from_secs(10),
        || async move {
            r.peers()
                .await
                .unwrap()
                .iter()
                .any(|p| p.peer_id == worker_id.to_string())
                .then_some(())
        },
    )
    .await;

    // A 100x60 @ 60x90 product with bias and relu, cut into 32-blocks: 4 x 3 tiles.
    let local = Arc::new(
        LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(Settings {
            block: 32,
            ..Settings::default()
        }),
    );
    let g = Graph::new("remote").with_executor(local.clone());
    let y = (g
        .random(&[100, 60], -1.0, 1.0, 1)
        .matmul(&g.random(&[60, 90], -1.0, 1.0, 2))
        .unwrap()
        + &g.random(&[90], -1.0, 1.0, 3))
        .relu()
        .unwrap();
    let plan = g.plan(&[&y]).unwrap();
    let want = local.execute(&plan).unwrap();
    let client = requester.client();
    let mut remote_tiles = 0;
    for (i, sg) in plan.subgraphs.iter().enumerate() {
        let Some(inputs) = sg
            .inputs
            .iter()
            .map(|s| match s {
                // Every other tile gets its blocks as recipes, which the worker makes.
                Source::Leaf(l) => Some(match plan.leaves[*l].how() {
                    Some(r) if i % 2 == 1 => Input::Recipe(r.clone()),
                    _ => Input::Data(plan.leaves[*l].get().clone()),
                }),
                Source::Output { .. } => None,
            })
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let response = client
            .run_task(
                worker_id,
                TaskRequest::new(i as u64, [i as u8; 16], sg, inputs),
            )
            .await
            .unwrap();
        let TaskResponse::Done {
            task,
            outputs,
            receipt,
            signature,
            signer,
            ..
        } = response
        else {
            panic!("{response:?}")
        };
        assert_eq!(task, i as u64);
        // Signed by the worker, for this task (its inputs named by content, or by the recipe
        // they were made from), this nonce and these outputs.
        let cids: Vec<_> = sg
            .inputs
            .iter()
            .map(|s| match s {
                Source::Leaf(l) => match plan.leaves[*l].how() {
                    Some(r) if i % 2 == 1 => r.id(),
                    _ => plan.leaves[*l].get().content_id(),
                },
                Source::Output { .. } => unreachable!(),
            })
            .collect();
        let out_cids: Vec<_> = outputs.iter().map(|t| t.content_id()).collect();
        open_receipt(
            &worker_id,
            &signer,
            &signature,
            &receipt,
            &Expected {
                task: &task_key(&sg.id, &cids),
                nonce: &[i as u8; 16],
                outputs: &out_cids,
                program: &sg.program,
            },
        )
        .unwrap();
        assert!(matches!(
            open_receipt(
                &worker_id,
                &signer,
                &signature,
                &receipt,
                &Expected {
                    task: &task_key(&sg.id, &cids),
                    nonce: &[i as u8 + 1; 16],
                    outputs: &out_cids,
                    program: &sg.program,
                },
            ),
            Err(Forgery::Replayed(_))
        ));
        assert_eq!(receipt.op_hashes.len(), sg.program.nodes.len());
        let local_out = local
            .run_subgraph(
                sg,
                &sg.inputs
                    .iter()
                    .map(|s| match s {
                        Source::Leaf(l) => plan.leaves[*l].get().clone(),
                        Source::Output { .. } => unreachable!(),
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert_eq!(outputs.len(), local_out.len());
        for (a, b) in outputs.iter().zip(local_out.iter()) {
            assert_eq!(a.words(), b.words(), "subgraph {i} ({}) differs", sg.ops());
        }
        remote_tiles += 1;
    }
    assert_eq!(remote_tiles, 12, "{}", plan.describe());
    assert_eq!(want.len(), 1);

    // A task whose id does not cover its program is refused; held inputs the worker was sent
    // before are used, and ones it never saw are asked for.
    let sg = plan
        .subgraphs
        .iter()
        .find(|s| s.deps().next().is_none())
        .unwrap();
    let inputs: Vec<Input> = sg
        .inputs
        .iter()
        .map(|s| match s {
            Source::Leaf(l) => Input::Data(plan.leaves[*l].get().clone()),
            Source::Output { .. } => unreachable!(),
        })
        .collect();
    let mut forged = TaskRequest::new(100, [0; 16], sg, inputs.clone());
    forged.program.nodes[0].op = corvid_kernels::Op::Unary(corvid_kernels::UnaryOp::Neg);
    let r = client.run_task(worker_id, forged).await.unwrap();
    assert!(
        matches!(&r, TaskResponse::Failed { error: TaskError::Invalid(e), .. } if e.contains("does not match")),
        "{r:?}"
    );
    // A recipe that makes another shape than the program declares, or no tensor at all.
    let Source::Leaf(l) = sg.inputs[0] else {
        unreachable!()
    };
    let recipe = plan.leaves[l].how().unwrap().clone();
    let wider = corvid_kernels::Recipe::uniform([100, 61], -1.0, 1.0, 1);
    let outside = corvid_kernels::Recipe::Uniform {
        full: vec![2, 2],
        starts: vec![0, 0],
        ends: vec![3, 2],
        lo: 0.0,
        hi: 1.0,
        seed: 1,
    };
    for (bad, says) in [(wider, "the recipe makes"), (outside, "outside")] {
        let mut r = TaskRequest::new(103, [0; 16], sg, inputs.clone());
        r.inputs[0] = Input::Recipe(bad);
        let r = client.run_task(worker_id, r).await.unwrap();
        assert!(
            matches!(&r, TaskResponse::Failed { error: TaskError::Invalid(e), .. } if e.contains(says)),
            "{r:?}"
        );
    }
    // The right recipe gives the same result as the data; the receipt names the recipe.
    let recipe_id = recipe.id();
    let mut by_recipe = TaskRequest::new(104, [0; 16], sg, inputs.clone());
    by_recipe.inputs[0] = Input::Recipe(recipe);
    let by_data = TaskRequest::new(105, [0; 16], sg, inputs.clone());
    let (a, b) = (
        client.run_task(worker_id, by_recipe).await.unwrap(),
        client.run_task(worker_id, by_data).await.unwrap(),
    );
    let (
        TaskResponse::Done {
            outputs: oa,
            receipt: ra,
            ..
        },
        TaskResponse::Done {
            outputs: ob,
            receipt: rb,
            ..
        },
    ) = (&a, &b)
    else {
        panic!("{a:?} {b:?}")
    };
    assert_eq!(oa, ob);
    let mut cids: Vec<_> = inputs
        .iter()
        .map(|i| match i {
            Input::Data(t) => t.content_id(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(rb.task, task_key(&sg.id, &cids));
    cids[0] = recipe_id;
    assert_eq!(
        ra.task,
        task_key(&sg.id, &cids),
        "the receipt names the recipe"
    );
    let n_inputs = inputs.len();
    let mut held = TaskRequest::new(101, [0; 16], sg, inputs);
    held.inputs = vec![Input::Held; n_inputs];
    let r = client.run_task(worker_id, held).await.unwrap();
    assert!(matches!(r, TaskResponse::Done { task: 101, .. }), "{r:?}");
    let other = Graph::new("other").with_executor(local.clone());
    let z = other
        .random(&[8, 8], -1.0, 1.0, 11)
        .matmul(&other.random(&[8, 8], -1.0, 1.0, 12))
        .unwrap();
    let other_plan = other.plan(&[&z]).unwrap();
    let fresh = &other_plan.subgraphs[0];
    let r = client
        .run_task(
            worker_id,
            TaskRequest::new(102, [0; 16], fresh, vec![Input::Held; 2]),
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        TaskResponse::Missing {
            task: 102,
            inputs: vec![0, 1]
        }
    );

    // The requester-only node refuses work.
    let back = worker
        .client()
        .run_task(
            requester.peer_id(),
            TaskRequest::new(5, [0; 16], sg, vec![]),
        )
        .await;
    assert!(
        back.is_err(),
        "a requester-only node does not speak the worker side: {back:?}"
    );

    shutdown.cancel();
    worker.join().await;
    requester.join().await;
}

/// One requester sending more tasks than the worker queues gets `Busy` for those beyond half
/// of the queue: another requester's task still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_requester_cannot_take_the_whole_queue() {
    init_logs();
    let shutdown = CancellationToken::new();
    let worker = spawn(10, None, &shutdown).await;
    let mut requesters = Vec::new();
    for i in [11, 12] {
        let mut config = NodeConfig::for_test(i);
        config.bootstrap = vec![worker.bootstrap_addr()];
        config.contribute = false;
        requesters.push(Node::spawn(config, shutdown.clone()).await.unwrap());
    }
    let worker_id = worker.peer_id();
    for r in &requesters {
        wait_for(
            "the worker in the table",
            Duration::from_secs(10),
            || async move {
                r.peers()
                    .await
                    .unwrap()
                    .iter()
                    .any(|p| p.peer_id == worker_id.to_string())
                    .then_some(())
            },
        )
        .await;
    }
    // A 1024³ product of two recipes: tens of milliseconds of work, a few bytes on the wire.
    let local = Arc::new(
        LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(Settings {
            block: 4096,
            ..Settings::default()
        }),
    );
    let g = Graph::new("queue").with_executor(local);
    let c = g
        .random(&[1024, 1024], -1.0, 1.0, 1)
        .matmul(&g.random(&[1024, 1024], -1.0, 1.0, 2))
        .unwrap();
    let plan = g.plan(&[&c]).unwrap();
    let sg = &plan.subgraphs[0];
    let inputs: Vec<Input> = sg
        .inputs
        .iter()
        .map(|s| match s {
            Source::Leaf(l) => Input::Recipe(plan.leaves[*l].how().unwrap().clone()),
            Source::Output { .. } => unreachable!(),
        })
        .collect();
    let request = |task| TaskRequest::new(task, [1; 16], sg, inputs.clone());
    // The greedy requester: 30 tasks at once (more than the worker's queue of 20, fewer than
    // the 32 streams a connection carries), 1024³ each: a few hundred ms of work on the
    // worker's 2 slots for what it queues.
    let greedy = requesters[0].client();
    let mut sends: futures::stream::FuturesUnordered<_> = (0..30)
        .map(|t| {
            let (c, r) = (greedy.clone(), request(1000 + t));
            tokio::spawn(async move { c.run_task(worker_id, r).await })
        })
        .collect();
    // As soon as it is told "busy" (the worker holds what it may take from it), the other
    // requester asks.
    use futures::StreamExt;
    while let Some(r) = sends.next().await {
        if matches!(
            r.unwrap(),
            Ok(TaskResponse::Failed {
                error: TaskError::Busy,
                ..
            })
        ) {
            break;
        }
    }
    let other = requesters[1]
        .client()
        .run_task(worker_id, request(1))
        .await
        .unwrap();
    assert!(
        matches!(other, TaskResponse::Done { .. }),
        "the second requester was refused: {other:?}"
    );
    shutdown.cancel();
    worker.join().await;
    for r in requesters {
        r.join().await;
    }
}
