//! `corvid-node`: the `corvid` binary as a library. A node joins a libp2p swarm from bootstrap
//! addresses, benchmarks its backend and gossips a signed capability advert; every node keeps a
//! table of the others' adverts.
//!
//! ```no_run
//! # async fn demo() -> Result<(), corvid_node::NodeError> {
//! use corvid_node::{Node, NodeConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! let first = Node::spawn(NodeConfig::for_test(0), CancellationToken::new()).await?;
//! let mut config = NodeConfig::for_test(1);
//! config.bootstrap = vec![first.bootstrap_addr()];
//! let second = Node::spawn(config, CancellationToken::new()).await?;
//! println!("{:?}", second.peers().await?);
//! second.join().await;
//! first.join().await;
//! # Ok(()) }
//! ```

pub mod advert;
pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
mod error;
pub mod identity;
pub mod limits;
mod metrics;
pub mod net;
pub mod node;
mod node_client;
mod page;
pub mod peers;
pub mod requester;
pub mod rules;
#[cfg(target_os = "linux")]
pub mod sandbox;
pub mod service;
mod status;
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod sybil;
pub mod tally;
mod task_error;
pub mod trust;
mod worker;

pub use advert::{ADVERT_TOPIC, Advert, Rejection, SignedAdvert};
pub use bench::BenchReport;
pub use config::{NatConfig, NodeArgs, NodeConfig, RelayLimits};
/// Peer addresses, as `corvid node` prints them (`/ip4/…/tcp/…/p2p/<peer id>`).
pub use libp2p::Multiaddr;
pub use limits::Limits;
pub use node::{
    BootstrapStatus, HolePunches, Node, NodeClient, NodeError, NodeHandle, PauseCause, PeerPath,
    Reachability, Status,
};
pub use peers::PeerInfo;
pub use requester::{Client, ClientBuilder, ClientError, JobSummary, SwarmExecutor};
pub use rules::PauseRules;
#[cfg(feature = "fault-injection")]
pub use worker::faults::Fault;
