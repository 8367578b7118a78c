//! A worker process killed in the middle of a job: the job still completes with the local
//! result, and the summary shows the re-dispatch.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corvid_kernels::{Backend, CpuBackend};
use corvid_node::{Client, Status};
use corvid_sdk::{Graph, LocalExecutor, Settings, Tensor};

fn status(rt: &tokio::runtime::Runtime, dir: &Path) -> Option<Status> {
    rt.block_on(common::process_status(dir))
}

fn wait<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::wait_until(what, Duration::from_secs(60), f)
}

/// 48 tiles of 128 x 2048 x 128 and their assembly.
fn job(g: &Graph) -> Tensor {
    g.random(&[768, 2048], -1.0, 1.0, 1)
        .matmul(&g.random(&[2048, 1024], -1.0, 1.0, 2))
        .unwrap()
}

fn settings() -> Settings {
    Settings {
        block: 128,
        ..Settings::default()
    }
}

#[test]
fn killing_a_worker_mid_job_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("w{i}"))).collect();
    let mut procs = vec![Some(common::node_process(&dirs[0], None, &[]))];
    let first = wait("worker 0", || {
        status(&rt, &dirs[0]).filter(|s| !s.listen_addrs.is_empty())
    });
    let boot = format!("{}/p2p/{}", first.listen_addrs[0], first.peer_id);
    for d in &dirs[1..] {
        procs.push(Some(common::node_process(d, Some(&boot), &[])));
    }
    let client = Client::connect([boot.as_str()])
        .unwrap()
        .with_settings(settings());
    client.wait_for_workers(3, Duration::from_secs(60)).unwrap();
    let victim = wait("worker 2's id", || status(&rt, &dirs[2])).peer_id;

    let g = Graph::new("kill").with_executor(client.executor());
    let out = job(&g);
    let eval = std::thread::spawn(move || out.eval_data());
    // Once the victim has answered a task, the job is under way: kill it.
    wait("the victim to answer a task", || {
        status(&rt, &dirs[2]).filter(|s| s.tasks_answered > 0)
    });
    procs[2] = None;
    let got = eval.join().unwrap().unwrap();

    let local = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings());
    let lg = Graph::new("local").with_executor(Arc::new(local));
    let want = job(&lg).eval_data().unwrap();
    assert_eq!(
        got.words(),
        want.words(),
        "the swarm's result differs from the local one"
    );
    let summary = client.last_summary().unwrap();
    println!("{summary}");
    assert!(
        !summary.redispatches.is_empty(),
        "the killed worker's work was re-dispatched:\n{summary}"
    );
    assert!(
        summary
            .redispatches
            .iter()
            .any(|(_, why)| why.contains(&victim[..8])),
        "{summary}"
    );
}
