//! A 2048² matmul cut into 512² blocks: prints the subgraph DAG (ids, sizes, costs), runs it,
//! and checks it is bit for bit the unpartitioned product.
//!
//! `cargo run --release --example blocked_matmul`

use std::sync::Arc;
use std::time::Instant;

use corvid::kernels::{Backend, BackendChoice};
use corvid::sdk::{Graph, LocalExecutor, Settings};

fn main() -> anyhow::Result<()> {
    let backend = Backend::open(BackendChoice::Cpu)?;
    let settings = Settings {
        block: 512,
        ..Settings::default()
    };
    let exec = Arc::new(LocalExecutor::new(backend.clone()).with_settings(settings));
    let g = Graph::new("blocked").with_executor(exec);
    let n = 2048;
    let a = g.random(&[n, n], -1.0, 1.0, 1);
    let b = g.random(&[n, n], -1.0, 1.0, 2);
    let c = a.matmul(&b)?;

    let t = Instant::now();
    let plan = g.plan(&[&c])?;
    let plan_time = t.elapsed().as_secs_f64();
    print!("{}", plan.describe());
    let cost = plan.total_cost();
    println!(
        "{} subgraphs, {:.1} GFLOP, {:.1} MiB in, {:.1} MiB out",
        plan.subgraphs.len(),
        cost.flops as f64 / 1e9,
        cost.bytes_in as f64 / (1 << 20) as f64,
        cost.bytes_out as f64 / (1 << 20) as f64
    );

    println!(
        "partitioning (cutting and hashing the blocks): {:.3} s",
        plan_time
    );
    let t = Instant::now();
    let blocked = c.eval_data()?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "blocked: {:.3} s ({:.0} GFLOP/s)",
        dt,
        2.0 * (n as f64).powi(3) / dt / 1e9
    );

    let (program, leaves) = g.whole_program(&[&c])?;
    let inputs: Vec<_> = leaves.iter().map(|l| (**l).clone()).collect();
    let t = Instant::now();
    let direct = backend.run(&program, &inputs)?.remove(0);
    println!("direct:  {:.3} s", t.elapsed().as_secs_f64());
    println!("bit-equal: {}", blocked.words() == direct.words());
    Ok(())
}
