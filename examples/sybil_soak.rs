//! Sybil soak: 100 hostile identities flood a 5-node swarm (4 workers and a requester) while
//! honest jobs run, for 60 s; prints what completed, memory over time and what was dropped.
//!
//! `cargo run --release --features fault-injection --example sybil_soak` (`CORVID_SOAK_SECS`
//! sets the length). The sybils run in a child process (so the swarm's memory is measured
//! alone), all on loopback:
//! - 100 identities, each connected to one of the five nodes, each publishing every 50 ms a
//!   correctly signed advert claiming a million GFLOP/s and 1024 slots, then bytes that are no
//!   advert, alternately (they speak no task protocol: every task sent to one fails);
//! - 100 more identities behind one relay, which no node can reach, advertising the same.
//!
//! Every job's result is compared bit for bit with a local evaluation. The jobs cycle through
//! eight graphs with the requester's result cache cleared before each (every job runs on the
//! workers, whose caches fill in the first round), so memory that grows is the flood's.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corvid::kernels::{Backend, CpuBackend};
use corvid::node::sybil;
use corvid::node::{Client, Multiaddr};
use corvid::sdk::{Graph, LocalExecutor, Settings, Tensor};

const SYBILS: usize = 100;
const EVERY: Duration = Duration::from_millis(50);

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn workload(g: &Graph, seed: u64) -> anyhow::Result<Vec<Tensor>> {
    let s = seed * 10;
    let c =
        g.random(&[256, 96], -1.0, 1.0, s + 1)
            .matmul(&g.random(&[96, 256], -1.0, 1.0, s + 2))?;
    let x = g.random(&[100, 32], -1.0, 1.0, s + 3);
    let h = (x.matmul(&g.random(&[32, 48], -0.5, 0.5, s + 4))?
        + &g.random(&[48], -0.1, 0.1, s + 5))
        .relu()?;
    let y = h
        .matmul(&g.random(&[48, 10], -0.5, 0.5, s + 6))?
        .softmax(1)?;
    Ok(vec![c, y])
}

fn settings() -> Settings {
    Settings {
        block: 64,
        ..Settings::default()
    }
}

/// The child: runs the sybils against `targets` until killed.
fn sybils(targets: &str) -> anyhow::Result<()> {
    let targets: Vec<Multiaddr> = targets
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let direct = sybil::direct(&targets, SYBILS, EVERY)
            .await
            .map_err(anyhow::Error::msg)?;
        let relayed = sybil::relay(targets[0].clone(), SYBILS, EVERY * 2)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let sent = direct.published() + relayed.published();
            eprintln!(
                "  sybils: {sent} messages published ({:.0}/s), {} connections",
                (sent - last) as f64 / 5.0,
                direct
                    .counters
                    .connected
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            last = sent;
        }
    })
}

fn main() -> anyhow::Result<()> {
    if let Ok(targets) = std::env::var("CORVID_SOAK_SYBILS") {
        return sybils(&targets);
    }
    let secs: u64 = std::env::var("CORVID_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let client = Client::local(4)?.with_settings(settings());
    let local = LocalExecutor::new(Backend::Cpu(CpuBackend::new())).with_settings(settings());
    let local = std::sync::Arc::new(local);
    let check = |seed: u64, client: &Client| -> anyhow::Result<bool> {
        let g = Graph::new("job").with_executor(client.executor());
        let outs = workload(&g, seed)?;
        let got = g.eval(&outs.iter().collect::<Vec<_>>())?;
        let lg = Graph::new("local").with_executor(local.clone());
        let louts = workload(&lg, seed)?;
        let want = lg.eval(&louts.iter().collect::<Vec<_>>())?;
        Ok(got.iter().zip(&want).all(|(a, b)| a.words() == b.words()))
    };
    // Warm up: every graph once before the flood, and the memory that settles at.
    const GRAPHS: u64 = 8;
    for seed in 0..GRAPHS {
        client.clear_cache();
        check(seed, &client)?;
    }
    let before = rss_bytes();
    let mut nodes: Vec<&corvid::node::NodeHandle> = client.workers().iter().collect();
    nodes.push(client.requester());
    let targets: Vec<String> = nodes
        .iter()
        .map(|n| n.bootstrap_addr().to_string())
        .collect();
    // `CORVID_SOAK_SYBILS_OFF=1`: the same jobs without the flood, for comparison.
    let flood = std::env::var("CORVID_SOAK_SYBILS_OFF").is_err();
    let mut child = if flood {
        Some(
            Command::new(std::env::current_exe()?)
                .env("CORVID_SOAK_SYBILS", targets.join(","))
                .stdin(Stdio::null())
                .spawn()?,
        )
    } else {
        None
    };
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "flooding 5 nodes with {SYBILS} connected sybils and {SYBILS} unreachable ones behind \
         a relay, every {} ms each, for {secs} s; memory before: {:.0} MiB",
        EVERY.as_millis(),
        before as f64 / (1 << 20) as f64
    );
    let started = Instant::now();
    let (mut ok, mut wrong, mut failed) = (0u32, 0u32, 0u32);
    let mut peak = before;
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut seed = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        client.clear_cache();
        match check(seed % GRAPHS, &client) {
            Ok(true) => ok += 1,
            Ok(false) => wrong += 1,
            Err(e) => {
                failed += 1;
                println!("  job {seed} failed: {e}");
            }
        }
        let job_ms = t.elapsed().as_millis();
        seed += 1;
        let rss = rss_bytes();
        peak = peak.max(rss);
        if started.elapsed() >= next_sample {
            let status = rt.block_on(client.requester().status())?;
            println!(
                "  {:>3} s: {ok} jobs right, {wrong} wrong, {failed} failed; last job {job_ms} \
                 ms; memory {:.0} MiB; requester knows {} peers, {} connected",
                started.elapsed().as_secs(),
                rss as f64 / (1 << 20) as f64,
                status.known_peers,
                status.connected_peers
            );
            samples.push((ok + wrong + failed, rss));
            next_sample += Duration::from_secs(10);
        }
    }
    if let Some(child) = &mut child {
        let _ = child.kill();
        let _ = child.wait();
    }
    println!("after {secs} s:");
    println!(
        "  jobs: {ok} right, {wrong} wrong, {failed} failed ({:.1} jobs/s)",
        f64::from(ok) / secs as f64
    );
    println!(
        "  memory: {:.0} MiB before the flood, peak {:.0} MiB, every 10 s {:?} MiB",
        before as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64,
        samples
            .iter()
            .map(|(_, b)| b / (1 << 20))
            .collect::<Vec<_>>()
    );
    // The workers' result caches and held values fill (up to their caps) with every job's
    // canary, flood or not: growth per job after the first sample says what the flood adds.
    if let (Some((j0, m0)), Some((j1, m1))) = (samples.get(1), samples.last())
        && j1 > j0
    {
        println!(
            "  growth after the first 10 s: {:.1} KiB per job ({} jobs; compare \
             CORVID_SOAK_SYBILS_OFF=1)",
            (*m1 as f64 - *m0 as f64) / 1024.0 / f64::from(j1 - j0),
            j1 - j0
        );
    }
    let honest: Vec<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();
    for (i, n) in nodes.iter().enumerate() {
        let s = rt.block_on(n.status())?;
        let peers = rt.block_on(n.peers())?;
        // Sybil adverts say so in their adapter name.
        let sybils = peers.iter().filter(|p| p.adapter.contains("sybil")).count();
        let (mut graylisted, mut negative, mut honest_low) = (0, 0, f64::INFINITY);
        for (peer, score) in &s.gossip_scores {
            if honest.contains(peer) {
                honest_low = honest_low.min(*score);
            } else if *score <= corvid::node::net::GRAYLIST_SCORE {
                graylisted += 1;
            } else if *score < 0.0 {
                negative += 1;
            }
        }
        println!(
            "  node {i}: table {} peers ({sybils} sybils), {} connected; adverts refused \
             {:?}; of the {} lowest gossip scores, {graylisted} sybils graylisted, {negative} \
             more negative, the honest peers' lowest {honest_low:.1}",
            s.known_peers,
            s.connected_peers,
            s.rejections,
            s.gossip_scores.len()
        );
    }
    if let Some(s) = client.last_summary() {
        println!("last job:\n{s}");
    }
    anyhow::ensure!(wrong == 0, "{wrong} jobs gave a wrong answer");
    Ok(())
}
