//! Several jobs at once on a local swarm: `Graph::submit` returns a `JobHandle` at once;
//! `as_completed` yields jobs as they end; a handle can be awaited, polled for progress or
//! cancelled (its tasks stop on the workers).
//!
//! `cargo run --release --example futures`

use std::time::{Duration, Instant};

use corvid::node::Client;
use corvid::sdk::{EvalError, Graph, as_completed};

fn main() -> anyhow::Result<()> {
    let client = Client::local(2)?;
    let g = Graph::new("futures").with_executor(client.executor());
    let t = Instant::now();
    let mut jobs = Vec::new();
    for k in 0..4 {
        let a = g.random(&[256, 256], -1.0, 1.0, k);
        let b = g.random(&[256, 256], -1.0, 1.0, k + 100);
        jobs.push(g.submit(&[&a.matmul(&b)?.tanh()?.sum(&[0, 1], false)?])?);
    }
    println!(
        "4 jobs submitted in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    for (i, out) in as_completed(jobs) {
        println!(
            "job {i} ended after {:.0} ms: sum = {:.4}",
            t.elapsed().as_secs_f64() * 1e3,
            out?[0].as_f32()?[0]
        );
    }

    // A job awaited in async code (any executor; here futures' own).
    let x = g.random(&[64, 64], -1.0, 1.0, 7);
    let handle = g.submit(&[&x.relu()?])?;
    let relu = futures::executor::block_on(handle)?;
    println!("awaited: relu of {:?}", relu[0].shape());

    // A large job cancelled while it runs.
    let big =
        g.random(&[1024, 4096], -1.0, 1.0, 9)
            .matmul(&g.random(&[4096, 1024], -1.0, 1.0, 10))?;
    let mut job = g.submit(&[&big])?;
    std::thread::sleep(Duration::from_millis(200));
    let p = job.progress();
    println!(
        "big job: {}/{} subgraphs after 200 ms; cancelling",
        p.done, p.total
    );
    job.cancel();
    match job.try_wait() {
        Some(Err(EvalError::Cancelled)) => println!("cancelled: its tasks stop on the workers"),
        other => println!("ended otherwise: {:?}", other.map(|r| r.map(|v| v.len()))),
    }
    Ok(())
}
