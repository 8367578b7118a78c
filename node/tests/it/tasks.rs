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
                Source::Leaf(l) => Some(Input::Data(plan.leaves[*l].clone())),
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
        // Signed by the worker, for this task, this nonce and these outputs.
        let cids: Vec<_> = sg
            .inputs
            .iter()
            .map(|s| match s {
                Source::Leaf(l) => plan.leaves[*l].content_id(),
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
            Source::Leaf(l) => Input::Data(plan.leaves[*l].clone()),
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
