//! Helpers shared by the multi-node tests: predicates with deadlines, never sleeps.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use corvid_node::{Node, NodeConfig, NodeHandle};
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
