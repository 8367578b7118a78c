//! The task protocol between two nodes on loopback: a requester sends the subgraphs of a
//! partitioned graph to a worker and gets exactly the local results; malformed tasks and
//! requester-only nodes are refused with reasons.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{init_logs, spawn, wait_for};
use corvid_kernels::{Backend, CpuBackend};
use corvid_node::{Node, NodeConfig};
use corvid_sdk::plan::Source;
use corvid_sdk::wire::{Input, TaskRequest, TaskResponse};
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
                Source::Leaf(l) => Some(Input::Data((*plan.leaves[*l]).clone())),
                Source::Output { .. } => None,
            })
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        let response = client
            .run_task(worker_id, TaskRequest::new(i as u64, sg, inputs))
            .await
            .unwrap();
        let TaskResponse::Done { task, outputs, .. } = response else {
            panic!("{response:?}")
        };
        assert_eq!(task, i as u64);
        let local_out = local
            .run_subgraph(
                sg,
                &sg.inputs
                    .iter()
                    .map(|s| match s {
                        Source::Leaf(l) => plan.leaves[*l].clone(),
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

    // A task whose id does not cover its program is refused, and so is one with held inputs
    // the worker never saw.
    let sg = plan
        .subgraphs
        .iter()
        .find(|s| s.deps().next().is_none())
        .unwrap();
    let inputs: Vec<Input> = sg
        .inputs
        .iter()
        .map(|s| match s {
            Source::Leaf(l) => Input::Data((*plan.leaves[*l]).clone()),
            Source::Output { .. } => unreachable!(),
        })
        .collect();
    let mut forged = TaskRequest::new(100, sg, inputs.clone());
    forged.program.nodes[0].op = corvid_kernels::Op::Unary(corvid_kernels::UnaryOp::Neg);
    let r = client.run_task(worker_id, forged).await.unwrap();
    assert!(
        matches!(&r, TaskResponse::Failed { error, .. } if error.contains("does not match")),
        "{r:?}"
    );
    let mut held = TaskRequest::new(101, sg, inputs);
    held.inputs[0] = Input::Held;
    let r = client.run_task(worker_id, held).await.unwrap();
    assert_eq!(
        r,
        TaskResponse::Missing {
            task: 101,
            inputs: vec![0]
        }
    );

    // The requester-only node refuses work.
    let back = worker
        .client()
        .run_task(requester.peer_id(), TaskRequest::new(5, sg, vec![]))
        .await;
    assert!(
        back.is_err(),
        "a requester-only node does not speak the worker side: {back:?}"
    );

    shutdown.cancel();
    worker.join().await;
    requester.join().await;
}
