//! `corvid demo`: Corvid's main job on one machine. Starts worker node *processes* on loopback,
//! joins them as a requester, runs a blocked matmul and an MLP forward pass across them, checks
//! both against local evaluation and prints what each peer did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corvid_kernels::{Backend, CpuBackend, Tensor as Data, Tolerance};
use corvid_sdk::{Graph, LocalExecutor, Settings, Tensor};
use libp2p::Multiaddr;

use crate::control::{ControlError, get_json, read_control_file};
use crate::requester::{Client, ClientError};
use crate::status::Status;

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Build(#[from] corvid_sdk::BuildError),
    #[error(transparent)]
    Eval(#[from] corvid_sdk::EvalError),
    #[error("worker {0} did not start within 60 s (its log: {1})")]
    WorkerStart(usize, PathBuf),
    #[error("the swarm's result differs from local evaluation: {0}")]
    Mismatch(String),
    #[error("{job}: {n} subgraph(s) with arithmetic ran on the requester, not on a worker")]
    RanLocally { job: String, n: usize },
    #[cfg(not(feature = "fault-injection"))]
    #[error(
        "--cheater needs a corvid built with fault injection: \
         cargo run -p corvid-node --features fault-injection -- demo --cheater"
    )]
    NoFaultInjection,
}

/// Kills the worker process when dropped: nothing outlives the demo.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the demo with `workers` worker processes (plus one that cheats, if `cheater`) and an
/// `n`×`n` matmul. Blocking.
pub fn run(workers: usize, n: usize, cheater: bool) -> Result<(), DemoError> {
    // The cheating worker is `corvid node --cheat`, which only such a build has.
    #[cfg(not(feature = "fault-injection"))]
    if cheater {
        return Err(DemoError::NoFaultInjection);
    }
    let workers = workers.max(1);
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut procs = vec![spawn_worker(&exe, dir.path(), 0, None, false)?];
    let first = rt.block_on(wait_status(dir.path(), 0))?;
    let boot: Multiaddr = format!("{}/p2p/{}", first.listen_addrs[0], first.peer_id)
        .parse()
        .map_err(|e| std::io::Error::other(format!("bad bootstrap address: {e}")))?;
    for i in 1..workers {
        procs.push(spawn_worker(&exe, dir.path(), i, Some(&boot), false)?);
    }
    println!("started {workers} worker processes (`corvid node`) on loopback; bootstrap {boot}");
    match &first.executor {
        Some(e) => println!(
            "each runs peers' tasks in a confined executor process (`corvid executor`: {}; \
             landlock {}, seccomp {})",
            e.backend,
            e.confinement.landlock,
            if e.confinement.seccomp { "on" } else { "off" }
        ),
        None => println!("each runs peers' tasks inside its own process (no executor process)"),
    }
    if cheater {
        procs.push(spawn_worker(&exe, dir.path(), workers, Some(&boot), true)?);
        println!(
            "started 1 more worker that moves one element of every result just over the \
             verifier's tolerance (`corvid node --cheat corrupt`)"
        );
    }
    let workers = workers + usize::from(cheater);

    let block = (n / 2).max(1);
    let settings = Settings {
        block,
        ..Settings::default()
    };
    let client = Client::connect(vec![boot])?.with_settings(settings.clone());
    let seen = client.wait_for_workers(workers, Duration::from_secs(60))?;
    println!(
        "requester {} sees {seen} workers after {:.1} s",
        client.requester().peer_id(),
        started.elapsed().as_secs_f64()
    );

    let local =
        Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings));
    let jobs: [(&str, Workload); 2] = [("blocked matmul", matmul), ("MLP forward pass", mlp)];
    for (name, build) in jobs {
        let g = Graph::new(name).with_executor(client.executor());
        let out = build(&g, n)?;
        let plan = g.plan(&[&out]).map_err(corvid_sdk::EvalError::Partition)?;
        let t = Instant::now();
        let got = out.eval_data()?;
        let wall = t.elapsed();
        let lg = Graph::new(name).with_executor(local.clone());
        let want = build(&lg, n)?.eval_data()?;
        let verdict = compare(&got, &want)?;
        println!(
            "\n== {name}: {} subgraphs, {:.2} GFLOP, {:.3} s across the swarm; {verdict}",
            plan.subgraphs.len(),
            plan.total_cost().flops as f64 / 1e9,
            wall.as_secs_f64()
        );
        let summary = client.last_summary().unwrap_or_default();
        print!("{summary}");
        // "Across the swarm" must be true: only data movement may have run here.
        if summary.local_compute > 0 {
            return Err(DemoError::RanLocally {
                job: name.to_string(),
                n: summary.local_compute,
            });
        }
        g.end().map_err(|r| DemoError::Mismatch(r.to_string()))?;
    }
    for ban in client.bans() {
        println!(
            "\nbanned {}: {}\n  evidence: {}",
            ban.peer, ban.reason, ban.evidence
        );
    }
    drop(client);
    drop(procs);
    println!(
        "\ndone in {:.1} s; workers stopped",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds a workload of size `n` in a graph.
type Workload = fn(&Graph, usize) -> Result<Tensor, corvid_sdk::BuildError>;

fn matmul(g: &Graph, n: usize) -> Result<Tensor, corvid_sdk::BuildError> {
    g.random(&[n, n], -1.0, 1.0, 1)
        .matmul(&g.random(&[n, n], -1.0, 1.0, 2))
}

/// `softmax(relu(x W1 + b1) W2 + b2)` over `n` rows.
fn mlp(g: &Graph, n: usize) -> Result<Tensor, corvid_sdk::BuildError> {
    let x = g.random(&[n, 256], -1.0, 1.0, 3);
    let h = x
        .matmul(&g.random(&[256, 512], -0.06, 0.06, 4))?
        .add(&g.random(&[512], -0.1, 0.1, 5))?
        .relu()?;
    h.matmul(&g.random(&[512, 10], -0.05, 0.05, 6))?
        .add(&g.random(&[10], -0.1, 0.1, 7))?
        .softmax(1)
}

/// Bit-identical when the workers share the requester's determinism class, else within
/// tolerance.
fn compare(got: &Data, want: &Data) -> Result<String, DemoError> {
    if got.words() == want.words() {
        return Ok("matches local evaluation bit for bit".into());
    }
    let tol = Tolerance::new(1e-4, 1e-4);
    let (g, w) = (
        got.as_f32()
            .map_err(|e| DemoError::Mismatch(e.to_string()))?,
        want.as_f32()
            .map_err(|e| DemoError::Mismatch(e.to_string()))?,
    );
    match g.iter().zip(w).position(|(a, b)| !tol.accepts(*a, *b)) {
        None => Ok("matches local evaluation within tolerance".into()),
        Some(i) => Err(DemoError::Mismatch(format!(
            "element {i}: swarm {}, local {}",
            g[i], w[i]
        ))),
    }
}

fn spawn_worker(
    exe: &Path,
    dir: &Path,
    i: usize,
    boot: Option<&Multiaddr>,
    cheat: bool,
) -> Result<Worker, DemoError> {
    let data = dir.join(format!("worker{i}"));
    std::fs::create_dir_all(&data)?;
    let log = std::fs::File::create(data.join("node.log"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "node",
        "--backend",
        "cpu",
        "--slots",
        "1",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        // The demo's workers serve the demo on this machine: they need not step aside for it.
        "--no-pause-on-battery",
        "--data-dir",
    ])
    .arg(&data)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", &b.to_string()]);
    }
    if cheat {
        cmd.args(["--cheat", "corrupt"]);
    }
    Ok(Worker(cmd.spawn()?))
}

async fn wait_status(dir: &Path, i: usize) -> Result<Status, DemoError> {
    let data = dir.join(format!("worker{i}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(addr) = read_control_file(&data.join("control.addr"))
            && let Ok(s) = get_json::<Status>(addr, "/status").await
            && !s.listen_addrs.is_empty()
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(DemoError::WorkerStart(i, data.join("node.log")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
