//! Worker memory under sustained honest load: two `corvid node` worker processes with
//! `--max-memory 256 MiB` serve a requester that sends small jobs, each with inputs of its
//! own (so every result is new to the workers' caches), from four threads, for 10 minutes.
//! Prints each worker's resident memory (node and executor process together, from /proc)
//! over time, the jobs done, and whether every sample stayed within the cap.
//!
//! `cargo build -p corvid-node --bin corvid && cargo run --example worker_soak`
//! (`--release` for both for more jobs a second). `CORVID_SOAK_SECS` sets the length,
//! `CORVID_SOAK_MEMORY` the cap, `CORVID_BIN` the `corvid` binary (default: the one built next
//! to this example).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use corvid::node::{Client, Status};
use corvid::sdk::Graph;

const WORKERS: usize = 2;
const THREADS: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(30);

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resident bytes of `pid` and its children (the node and its executor).
fn tree_rss(pid: u32) -> u64 {
    let pid = pid.to_string();
    let mut sum = rss_of(&pid);
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            sum += children.split_whitespace().map(rss_of).sum::<u64>();
        }
    }
    sum
}

fn corvid_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CORVID_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("corvid"))
        .ok_or_else(|| anyhow::anyhow!("cannot place {}", exe.display()))?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p corvid-node --bin corvid, with --release \
         if this example runs with it) or set CORVID_BIN",
        bin.display()
    );
    Ok(bin)
}

fn status(rt: &tokio::runtime::Runtime, dir: &Path) -> Option<Status> {
    let addr = corvid::node::control::read_control_file(&dir.join("control.addr")).ok()?;
    rt.block_on(corvid::node::control::get_json::<Status>(addr, "/status"))
        .ok()
}

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("CORVID_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let memory = std::env::var("CORVID_SOAK_MEMORY").unwrap_or_else(|_| "256 MiB".into());
    let cap: bytesize::ByteSize = memory
        .parse()
        .map_err(|e| anyhow::anyhow!("CORVID_SOAK_MEMORY {memory:?}: {e}"))?;
    let bin = corvid_bin()?;
    let rt = tokio::runtime::Runtime::new()?;
    let tmp = tempfile::tempdir()?;
    let mut workers = Vec::new();
    let mut boot: Option<String> = None;
    for i in 0..WORKERS {
        let dir = tmp.path().join(format!("w{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--log", "warn", "node", "--backend", "cpu", "--slots", "2"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-pause-on-battery"])
            .args(["--max-memory", &memory, "--data-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(b) = &boot {
            cmd.args(["--bootstrap", b]);
        }
        let proc = Proc(cmd.spawn()?);
        let deadline = Instant::now() + Duration::from_secs(60);
        let s = loop {
            if let Some(s) = status(&rt, &dir).filter(|s| !s.listen_addrs.is_empty()) {
                break s;
            }
            anyhow::ensure!(Instant::now() < deadline, "worker {i} did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        boot.get_or_insert_with(|| format!("{}/p2p/{}", s.listen_addrs[0], s.peer_id));
        workers.push(proc);
    }
    let boot = boot.unwrap_or_default();
    let client = Client::connect([boot.as_str()])?;
    client.wait_for_workers(WORKERS, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<u64> = workers.iter().map(|w| tree_rss(w.0.id())).collect();
    let node_only: Vec<u64> = workers
        .iter()
        .map(|w| rss_of(&w.0.id().to_string()))
        .collect();
    println!(
        "{WORKERS} workers, --max-memory {memory} each, {THREADS} requester threads, {secs} s"
    );
    println!(
        "idle RSS: {} (node process alone: {})",
        idle.iter()
            .map(|b| format!("{:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        node_only
            .iter()
            .map(|b| format!("{:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..THREADS as u64 {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let executor = client.executor();
        threads.push(std::thread::spawn(move || {
            let mut seed = t << 40;
            while !stop.load(Ordering::Relaxed) {
                seed += 3;
                let g = Graph::new("soak").with_executor(executor.clone());
                let job = g
                    .random(&[32, 32], -1.0, 1.0, seed)
                    .matmul(&g.random(&[32, 32], -1.0, 1.0, seed + 1))
                    .and_then(|x| (x + &g.random(&[32], -0.1, 0.1, seed + 2)).softmax(1));
                let result = job
                    .map_err(anyhow::Error::from)
                    .and_then(|y| y.eval_data().map_err(anyhow::Error::from));
                match result {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("job failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    let start = Instant::now();
    let mut peak = [0u64; WORKERS];
    let mut last = (0u64, Instant::now());
    println!(
        "{:>6} {:>9} {:>7} {}",
        "t (s)",
        "jobs",
        "jobs/s",
        (0..WORKERS)
            .map(|i| format!("{:>10}", format!("w{i} MB")))
            .collect::<String>()
    );
    while start.elapsed() < Duration::from_secs(secs) {
        let left = Duration::from_secs(secs).saturating_sub(start.elapsed());
        std::thread::sleep(SAMPLE_EVERY.min(left));
        let n = done.load(Ordering::Relaxed);
        let rate = (n - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (n, Instant::now());
        let rss: Vec<u64> = workers.iter().map(|w| tree_rss(w.0.id())).collect();
        for (p, r) in peak.iter_mut().zip(&rss) {
            *p = (*p).max(*r);
        }
        println!(
            "{:>6.0} {n:>9} {rate:>7.0} {}",
            start.elapsed().as_secs_f64(),
            rss.iter()
                .map(|b| format!("{:>10.1}", *b as f64 / 1e6))
                .collect::<String>()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let n = done.load(Ordering::Relaxed);
    let within = peak.iter().all(|p| *p <= cap.as_u64());
    println!(
        "{n} jobs ({:.0}/s), {} failed; peak RSS {} against a cap of {memory}: {}",
        n as f64 / start.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
        peak.iter()
            .map(|b| format!("{:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        if within { "within" } else { "OVER" }
    );
    anyhow::ensure!(within, "a worker went over its --max-memory");
    Ok(())
}
