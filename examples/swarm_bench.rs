//! Swarm execution figures, printed (not asserted), on embedded swarms over loopback.
//!
//! `cargo run --release --example swarm_bench`
//!
//! The workers are in-process nodes talking over real loopback TCP + noise + yamux; the
//! machine's cores are shared by requester and workers alike. Every remote result is signed
//! and verified (Freivalds for matmul tiles), and the verification cost is printed.

use std::time::Instant;

use corvid::kernels::verify::FREIVALDS_ROUNDS;
use corvid::node::{Client, JobSummary};
use corvid::sdk::{Graph, Settings};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn verification(s: &JobSummary) -> String {
    format!(
        "requester time in checks and hashing {:.1} ms = {:.1} % of wall (summed over \
         concurrent checks, on cores shared with the workers); {:.2} GFLOP extra remote work",
        s.verify.check_time.as_secs_f64() * 1e3,
        100.0 * s.verify.check_time.as_secs_f64() / s.wall.as_secs_f64(),
        s.verify.extra_remote_flops as f64 / 1e9
    )
}

fn main() -> anyhow::Result<()> {
    // Cold start: 4 nodes and a requester, to the first result.
    let t = Instant::now();
    let four = Client::local(4)?;
    let g = Graph::new("first").with_executor(four.executor());
    g.t(&[1.0, -2.0]).relu()?.eval_data()?;
    println!(
        "cold start of 4 local nodes and a requester to the first result: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    drop(four);

    let settings = Settings {
        block: 2048,
        ..Settings::default()
    };
    let client = Client::local(2)?.with_settings(settings.clone());
    // The same swarm shape with checks off, only to measure what checking costs.
    let unchecked = Client::local(2)?
        .with_settings(settings)
        .without_checks_for_benchmarks();

    // 4096² matmul as 2x2 blocks over 2 workers (inputs cut and shipped by the requester).
    // Trust is warmed up first (new peers' results are replicated until they have a streak),
    // then checked and unchecked runs alternate, so that both see the same machine load.
    let matmul = |c: &Client, seed: u64| -> anyhow::Result<f64> {
        let g = Graph::new("matmul").with_executor(c.executor());
        let m = g.random(&[4096, 4096], -1.0, 1.0, seed).matmul(&g.random(
            &[4096, 4096],
            -1.0,
            1.0,
            seed + 1,
        ))?;
        let t = Instant::now();
        m.eval_data()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut warm = 0;
    while client
        .last_summary()
        .is_none_or(|s| s.verify.replicated > 0 || s.verify.canaries > 0)
        && warm < 8
    {
        matmul(&client, 1000 + warm)?;
        warm += 1;
    }
    matmul(&unchecked, 999)?;
    let pairs = 9;
    let (mut on, mut off, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for i in 0..pairs {
        let seed = 10 + 2 * i;
        let a = matmul(&client, seed)?;
        last = client.last_summary();
        let b = matmul(&unchecked, seed + 100)?;
        on.push(a);
        off.push(b);
        ratio.push(a / b);
    }
    drop(unchecked);
    let (on, off, ratio) = (median(on), median(off), median(ratio));
    println!(
        "4096² f32 matmul over 2 workers: {on:.3} s median of {pairs} (target ≤ 0.40 s), \
         after {warm} runs to build trust"
    );
    if let Some(s) = last {
        print!("{s}");
        println!(
            "verification of the 4096² job: wall {on:.3} s checked vs {off:.3} s unchecked, \
             median of per-pair ratios {:+.1} % (target ≤ 7 %); {}; each tile checked by \
             Freivalds with {FREIVALDS_ROUNDS} ±1 vectors: an entry wrong by more than its row \
             threshold passes with probability ≤ 2^-{FREIVALDS_ROUNDS}",
            100.0 * (ratio - 1.0),
            verification(&s)
        );
    }

    // relu(x @ w1 + b1) @ w2 at 4096 and at 64.
    for n in [4096usize, 64] {
        let mut times = Vec::new();
        for i in 0..3 {
            let g = Graph::new("mlp").with_executor(client.executor());
            let s = 100 + 10 * i;
            let x = g.random(&[n, n], -1.0, 1.0, s);
            let h = (x.matmul(&g.random(&[n, n], -0.05, 0.05, s + 1))?
                + &g.random(&[n], -0.1, 0.1, s + 2))
                .relu()?;
            let y = h.matmul(&g.random(&[n, n], -0.05, 0.05, s + 3))?;
            let t = Instant::now();
            y.eval_data()?;
            times.push(t.elapsed().as_secs_f64());
        }
        println!(
            "relu(x@w1+b1)@w2 at {n}: {:.4} s median of 3",
            median(times)
        );
        if let Some(s) = client.last_summary() {
            println!("  {}", verification(&s));
        }
    }

    // One tiny subgraph: the round trip.
    let mut rt = Vec::new();
    for i in 0..200 {
        let g = Graph::new("tiny").with_executor(client.executor());
        let y = g.t(&[i as f32, 1.0, 2.0]).relu()?;
        let t = Instant::now();
        y.eval_data()?;
        rt.push(t.elapsed().as_secs_f64());
    }
    println!(
        "one tiny subgraph, round trip: {:.3} ms median of 200 (target ≤ 0.2 ms)",
        median(rt) * 1e3
    );

    // Many tiny independent subgraphs in one job: throughput.
    let n = 10_000;
    let g = Graph::new("many").with_executor(client.executor());
    let outs: Vec<_> = (0..n)
        .map(|i| g.t(&[i as f32 + 0.5, -1.0]).relu())
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
    let y = g.random(&[4096, 4096], -1.0, 1.0, 7).relu()?;
    let t = Instant::now();
    y.eval_data()?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "64 MiB in + 64 MiB out through one task: {:.2} GB/s (target ≥ 1.5 GB/s)",
        2.0 * 64.0 * 1.048576e6 / dt / 1e9
    );
    Ok(())
}
