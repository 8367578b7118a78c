//! Helpers shared by the multi-node tests: predicates with deadlines, never sleeps.
#![allow(dead_code, clippy::unwrap_used)]

pub mod netns;

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corvid_node::control::{get_json, read_control_file};
use corvid_node::{Node, NodeConfig, NodeHandle, Status};
use tokio_util::sync::CancellationToken;

/// Logs to the test's captured output once per process; `RUST_LOG` overrides the filter.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("corvid_node=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking [`wait_for`]: polls `check` every 20 ms until it returns `Some`, or fails after
/// `timeout` with `what`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process, killed and reaped when dropped: a failing test leaks nothing.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `corvid node` process in `dir` on loopback (CPU, one slot, warnings only),
/// bootstrapped from `boot`, with `extra` flags.
pub fn node_process(dir: &Path, boot: Option<&str>, extra: &[&str]) -> Proc {
    let mut cmd = node_command(dir, boot, extra);
    // Tests on a laptop unplugged would otherwise find their nodes paused.
    cmd.env("CORVID_NO_PAUSE_ON_BATTERY", "1");
    Proc(cmd.spawn().unwrap())
}

/// The command [`node_process`] runs, with the node's default pause rules.
pub fn node_command(dir: &Path, boot: Option<&str>, extra: &[&str]) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corvid"));
    cmd.args(["--log", "warn", "node", "--backend", "cpu", "--slots", "1"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    cmd
}

/// The status of the node running in `dir`, if its control endpoint answers.
pub async fn process_status(dir: &Path) -> Option<Status> {
    let addr = read_control_file(&dir.join("control.addr")).ok()?;
    get_json::<Status>(addr, "/status").await.ok()
}

/// Starts test node `i`, bootstrapped from `bootstrap` if given.
pub async fn spawn(
    i: u64,
    bootstrap: Option<&NodeHandle>,
    shutdown: &CancellationToken,
) -> NodeHandle {
    let mut config = NodeConfig::for_test(i);
    if let Some(b) = bootstrap {
        config.bootstrap = vec![b.bootstrap_addr()];
    }
    Node::spawn(config, shutdown.clone()).await.unwrap()
}

/// The peer ids a node currently holds valid adverts from.
pub async fn known(node: &NodeHandle) -> Vec<String> {
    node.peers()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.peer_id)
        .collect()
}
