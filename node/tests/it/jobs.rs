//! Jobs as futures on a swarm: several submitted at once end with the same answers as local
//! evaluation, in the order they finish; one can be awaited; a cancelled one stops sending
//! work and says so.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use corvid_kernels::{Backend, CpuBackend};
use corvid_node::Client;
use corvid_sdk::{EvalError, Graph, JobHandle, LocalExecutor, Settings, Tensor, as_completed};

fn settings() -> Settings {
    Settings {
        block: 64,
        ..Settings::default()
    }
}

fn job(g: &Graph, seed: u64) -> Tensor {
    let x = g.random(&[128, 96], -1.0, 1.0, seed);
    x.matmul(&g.random(&[96, 128], -1.0, 1.0, seed + 1))
        .unwrap()
        .softmax(1)
        .unwrap()
}

#[test]
fn submitted_jobs_run_together_and_end_as_they_finish() {
    let client = Client::local(2).unwrap().with_settings(settings());
    let g = Graph::new("futures").with_executor(client.executor());
    let outs: Vec<Tensor> = (0..6).map(|i| job(&g, 10 * i)).collect();
    let handles: Vec<JobHandle> = outs.iter().map(|t| g.submit(&[t]).unwrap()).collect();
    let local = Graph::new("local").with_executor(Arc::new(
        LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings()),
    ));
    let mut seen = Vec::new();
    for (i, got) in as_completed(handles) {
        let want = job(&local, 10 * i as u64).eval_data().unwrap();
        let got = got.unwrap();
        let diff = got[0]
            .as_f32()
            .unwrap()
            .iter()
            .zip(want.as_f32().unwrap())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "job {i} differs from local by {diff}");
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..6).collect::<Vec<_>>());

    // A handle is a future too: two awaited together.
    let a = g.submit(&[&job(&g, 99)]).unwrap();
    let b = g.submit(&[&job(&g, 77)]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = rt.block_on(async { futures::join!(a, b) });
    assert_eq!(a.unwrap()[0].meta().shape, vec![128, 128]);
    assert_eq!(b.unwrap()[0].meta().shape, vec![128, 128]);
    g.end().unwrap();
}

#[test]
fn a_cancelled_job_stops_sending_work() {
    let client = Client::local(2).unwrap().with_settings(Settings {
        block: 128,
        ..Settings::default()
    });
    let g = Graph::new("cancel").with_executor(client.executor());
    // 64 tiles of 128 x 4096 x 128.
    let big = g
        .random(&[1024, 4096], -1.0, 1.0, 1)
        .matmul(&g.random(&[4096, 1024], -1.0, 1.0, 2))
        .unwrap();
    let h = g.submit(&[&big]).unwrap();
    let total = h.progress().total;
    common_wait("the job to make progress", || {
        (h.progress().done > 0).then_some(())
    });
    h.cancel();
    let started = std::time::Instant::now();
    assert!(matches!(h.wait(), Err(EvalError::Cancelled)));
    println!(
        "cancelled after {:?} of {total} subgraphs",
        started.elapsed()
    );

    // The workers end up idle, having answered far fewer tasks than the job had.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answered = common_wait("the workers to be idle", || {
        let s: Vec<_> = client
            .workers()
            .iter()
            .map(|w| rt.block_on(w.status()).unwrap())
            .collect();
        s.iter()
            .all(|s| s.tasks_in_hand == 0)
            .then(|| s.iter().map(|s| s.tasks_answered).sum::<u64>())
    });
    println!("workers answered {answered} tasks of a job of {total} subgraphs");
    assert!(
        (answered as usize) < total / 2,
        "{answered} of {total}: the cancelled job kept sending work"
    );
    let report = g.end().unwrap_err().to_string();
    assert!(report.contains("cancelled"), "{report}");

    // The client goes on.
    let small = job(&g, 5);
    assert_eq!(small.eval_data().unwrap().meta().shape, vec![128, 128]);
}

fn common_wait<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    crate::common::wait_until(what, Duration::from_secs(60), f)
}

/// A map of a small MLP over many inputs, with more jobs in flight than workers have slots
/// (busy workers turn tasks away): every worker is sent the weights once, never again,
/// whatever the order tasks land in.
#[test]
fn a_map_sends_shared_weights_once_per_worker() {
    use corvid_kernels::Tensor as Data;
    use corvid_node::JobSummary;
    use corvid_sdk::{Computation, Model};

    let weights = Graph::new("weights");
    let model = Model::new(
        "mlp",
        [
            ("w1", weights.random(&[64, 256], -0.1, 0.1, 1)),
            ("b1", weights.random(&[1, 256], -0.1, 0.1, 2)),
            ("w2", weights.random(&[256, 10], -0.1, 0.1, 3)),
            ("b2", weights.random(&[1, 10], -0.1, 0.1, 4)),
        ]
        .map(|(n, t)| (n, t.eval_data().unwrap())),
    );
    let mlp = Computation::new("mlp", |_, x, w| {
        let h = x[0].matmul(&w["w1"])?.add(&w["b1"])?.relu()?;
        Ok(vec![h.matmul(&w["w2"])?.add(&w["b2"])?])
    })
    .with_model(model.clone());
    let n = 400;
    let inputs: Vec<Vec<Data>> = (0..n)
        .map(|i| {
            let g = Graph::new("input");
            vec![g.random(&[1, 64], -1.0, 1.0, 100 + i).eval_data().unwrap()]
        })
        .collect();
    let client = Client::local(2).unwrap();
    let local: Arc<dyn corvid_sdk::Executor> =
        Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
    let want: Vec<_> = mlp.map(local, inputs.clone(), 8).collect();
    let mut summaries = Vec::new();
    for (i, outcome, state) in mlp.jobs(client.executor(), inputs, 32, true) {
        let got = outcome.unwrap();
        let want = want[i].as_ref().unwrap();
        let (got, want) = (got[0].as_f32().unwrap(), want[0].as_f32().unwrap());
        assert!(
            got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
            "input {i}"
        );
        summaries.extend(state.and_then(|s| JobSummary::of_state(&s)));
    }
    assert_eq!(summaries.len(), n as usize, "every job left its summary");
    let total = JobSummary::total(&summaries);
    let input_bytes = 64 * 4;
    let mut workers = 0;
    for (place, s) in &total.places {
        if s.tasks == 0 || !matches!(place, corvid_sdk::sched::Place::Peer(_)) {
            continue;
        }
        workers += 1;
        // Beyond the inputs of its tasks: the model, give or take the inputs of tasks it
        // turned away busy (sent again, here or elsewhere, or kept and then named).
        let beyond = s.bytes_in as i64 - (s.tasks as u64 * input_bytes) as i64;
        let slack = (s.failures as u64 * input_bytes) as i64;
        assert!(
            (beyond - model.bytes() as i64).abs() <= slack,
            "{place}: {beyond} bytes beyond the inputs, the model is {} (slack {slack})\n{total}",
            model.bytes()
        );
        assert_eq!(s.resent, 0, "{place}: nothing sent again in full\n{total}");
    }
    assert_eq!(workers, 2, "{total}");
}
