//! Swarm execution figures, printed (not asserted), on embedded swarms over loopback.
//!
//! `cargo run --release --example swarm_bench`; `CORVID_BENCH_ONLY=matmul,transfer` runs only
//! those sections (of `cold`, `matmul`, `mlp`, `tiny`, `transfer`), and
//! `RUST_LOG=corvid_node=debug` prints each task's timeline on the worker and the requester.
//!
//! The workers are in-process nodes talking over real loopback TCP + noise + yamux; the
//! machine's cores are shared by requester and workers alike. Every remote result is signed
//! and verified (Freivalds for matmul tiles), and the verification cost is printed.

use std::time::Instant;

use corvid::kernels::verify::FREIVALDS_ROUNDS;
use corvid::kernels::{CpuBackend, Op, Tensor as Data};
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
    // `RUST_LOG=corvid_node=debug` shows each task's timeline (worker and requester).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    let only = std::env::var("CORVID_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);

    // Cold start: 4 nodes and a requester, to the first result.
    if run("cold") {
        let t = Instant::now();
        let four = Client::local(4)?;
        let g = Graph::new("first").with_executor(four.executor());
        g.t(&[1.0, -2.0]).relu()?.eval_data()?;
        println!(
            "cold start of 4 local nodes and a requester to the first result: {:.2} s (goal ≤ \
             0.5 s)",
            t.elapsed().as_secs_f64()
        );
    }

    let settings = Settings {
        block: 2048,
        ..Settings::default()
    };
    let client = Client::local(2)?.with_settings(settings.clone());
    // The same swarm shape with checks off, only to measure what checking costs.
    let unchecked = Client::local(2)?
        .with_settings(settings)
        .without_checks_for_benchmarks();

    let cpu = CpuBackend::new();
    let mut matmul_ratio = None;
    if run("matmul") {
        // 4096² matmul as 2x2 blocks over 2 workers (inputs are recipes: each worker makes its
        // blocks, the requester makes them only to check).
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
        // The same product in this process, on the same CPU kernels, whole (inputs made first).
        let (mut alone, mut make) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let t = Instant::now();
            let a = Data::random_uniform([4096, 4096], -1.0, 1.0, 50 + 2 * i);
            let b = Data::random_uniform([4096, 4096], -1.0, 1.0, 51 + 2 * i);
            make.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            cpu.eval(&Op::MatMul, &[&a, &b])?;
            alone.push(t.elapsed().as_secs_f64());
        }
        let (alone, make) = (median(alone), median(make));
        matmul_ratio = Some(on / alone);
        println!(
            "4096² f32 matmul over 2 workers: {on:.3} s median of {pairs}, after {warm} runs to build \
             trust; one process, same CPU kernels: {alone:.3} s (+ {make:.3} s to make the inputs); \
             ratio {:.2}× (goal ≤ 1.3×)",
            on / alone
        );
        if let Some(s) = last {
            print!("{s}");
            println!(
                "verification of the 4096² job: wall {on:.3} s checked vs {off:.3} s unchecked, \
                 median of per-pair ratios {:+.1} % (goal ≤ 7 %); {}; each tile checked by \
                 Freivalds with {FREIVALDS_ROUNDS} ±1 vectors: an entry wrong by more than its row \
                 threshold passes with probability ≤ 2^-{FREIVALDS_ROUNDS}",
                100.0 * (ratio - 1.0),
                verification(&s)
            );
        }
    }

    if run("mlp") {
        // relu(x @ w1 + b1) @ w2 at 4096 and at 64, against the whole program in this process.
        for n in [4096usize, 64] {
            let (mut times, mut alone) = (Vec::new(), Vec::new());
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
                let (program, leaves) = g.whole_program(&[&y])?;
                let leaves: Vec<Data> = leaves.iter().map(|l| (**l).clone()).collect();
                let t = Instant::now();
                cpu.run(&program, &leaves)?;
                alone.push(t.elapsed().as_secs_f64());
            }
            let (t, alone) = (median(times), median(alone));
            println!(
                "relu(x@w1+b1)@w2 at {n}: {:.2} ms median of 3; one process: {:.2} ms; ratio \
                 {:.2}×{}",
                t * 1e3,
                alone * 1e3,
                t / alone,
                if n == 4096 {
                    let than = matmul_ratio.map_or_else(String::new, |r| {
                        format!(", and no more than the matmul's {r:.2}×")
                    });
                    format!(" (goal ≤ 1.5×{than})")
                } else {
                    String::new()
                }
            );
            if let Some(s) = client.last_summary() {
                println!("  {}", verification(&s));
            }
        }
    }

    if run("tiny") {
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
            "one tiny subgraph, round trip: {:.3} ms median of 200 (goal ≤ 0.2 ms)",
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
            "{n} tiny subgraphs in one job: {:.0} subgraphs/s (goal ≥ 20,000/s)",
            n as f64 / dt
        );
    }

    if run("transfer") {
        // Transfer: a 64 MiB tensor in and out through a cheap op, median of 5, against plain
        // loopback TCP in this process moving the same bytes (no noise, no yamux, no codec).
        // (A data constant: a recipe would travel as a few bytes.)
        let mut rates = Vec::new();
        for i in 0..5 {
            let g = Graph::new("transfer").with_executor(client.executor());
            let y = g
                .constant(Data::random_uniform([4096, 4096], -1.0, 1.0, 7 + i))
                .relu()?;
            let t = Instant::now();
            y.eval_data()?;
            rates.push(2.0 * 64.0 * 1.048576e6 / t.elapsed().as_secs_f64() / 1e9);
        }
        let tcp = loopback_tcp(128 << 20)?;
        println!(
            "64 MiB in + 64 MiB out through one task: {:.2} GB/s median of 5 (goal ≥ 1.5 GB/s); \
             plain loopback TCP here: {tcp:.2} GB/s",
            median(rates)
        );
    }

    Ok(())
}

/// GB/s of `bytes` written through one loopback TCP connection and read on another thread.
fn loopback_tcp(bytes: usize) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let chunk = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    for _ in 0..bytes / chunk.len() {
        s.write_all(&chunk)?;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(got == bytes, "read {got} of {bytes} bytes");
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
}
