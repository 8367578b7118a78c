//! Swarm execution figures, printed (not asserted): an embedded swarm of 2 workers on loopback.
//!
//! `cargo run --release --example swarm_bench`
//!
//! The workers here are in-process nodes talking over real loopback TCP + noise + yamux; the
//! machine's cores are shared by requester and workers alike.

use std::time::Instant;

use corvid::node::Client;
use corvid::sdk::{Graph, Settings};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let t = Instant::now();
    let client = Client::local(2)?.with_settings(Settings {
        block: 2048,
        ..Settings::default()
    });
    println!(
        "cold start of 2 workers and a requester: {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // 4096² matmul as 2x2 blocks over 2 workers (inputs cut and shipped by the requester).
    let g = Graph::new("matmul").with_executor(client.executor());
    let c = g
        .random(&[4096, 4096], -1.0, 1.0, 1)
        .matmul(&g.random(&[4096, 4096], -1.0, 1.0, 2))?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let g2 = Graph::new("matmul").with_executor(client.executor());
        let seed = 10 + times.len() as u64;
        let c2 = g2
            .random(&[4096, 4096], -1.0, 1.0, seed)
            .matmul(&g2.random(&[4096, 4096], -1.0, 1.0, seed + 1))?;
        let t = Instant::now();
        c2.eval_data()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let _ = c;
    println!(
        "4096² f32 matmul over 2 workers: {:.3} s median of 3 (target ≤ 0.40 s)",
        median(times)
    );
    if let Some(s) = client.last_summary() {
        print!("{s}");
    }

    // One tiny subgraph: the round trip.
    let mut rt = Vec::new();
    for i in 0..200 {
        let g = Graph::new("tiny").with_executor(client.executor());
        let x = g.t(&[i as f32, 1.0, 2.0]);
        let y = x.relu()?;
        let t = Instant::now();
        y.eval_data()?;
        rt.push(t.elapsed().as_secs_f64());
    }
    println!(
        "one tiny subgraph, round trip: {:.3} ms median of 200 (target ≤ 0.2 ms)",
        median(rt) * 1e3
    );

    // Many tiny independent subgraphs in one job: throughput.
    let n = 2000;
    let g = Graph::new("many").with_executor(client.executor());
    let outs: Vec<_> = (0..n)
        .map(|i| g.t(&[i as f32, -1.0]).relu())
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    g.eval(&outs.iter().collect::<Vec<_>>())?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{n} tiny subgraphs in one job: {:.0} subgraphs/s (target ≥ 20,000/s)",
        n as f64 / dt
    );

    // Transfer: a 64 MiB tensor in and out through a cheap op.
    let g = Graph::new("transfer").with_executor(client.executor());
    let x = g.random(&[4096, 4096], -1.0, 1.0, 7);
    let y = x.relu()?;
    let t = Instant::now();
    y.eval_data()?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "64 MiB in + 64 MiB out through one task: {:.2} GB/s (target ≥ 1.5 GB/s)",
        2.0 * 64.0 * 1.048576e6 / dt / 1e9
    );
    Ok(())
}
