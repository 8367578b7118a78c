//! [`NodeClient`]: the cloneable handle that asks a running node's event loop things.

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use crate::error::NodeError;
use crate::net::event_loop::Command;
use crate::peers::PeerInfo;
use crate::status::{PauseCause, Status};

/// A cheap, cloneable way to ask the event loop things.
#[derive(Clone, Debug)]
pub struct NodeClient {
    tx: mpsc::Sender<Command>,
}

impl NodeClient {
    /// A client of the event loop that reads `tx`.
    pub(crate) fn new(tx: mpsc::Sender<Command>) -> NodeClient {
        NodeClient { tx }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Every peer with a valid, unexpired advert.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    pub async fn status(&self) -> Result<Status, NodeError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// Pauses the node as its owner (`Some(reason)`: it takes no new task and advertises no
    /// free slot; running tasks finish) or lifts the owner's pause (`None`).
    pub async fn set_paused(&self, reason: Option<String>) -> Result<(), NodeError> {
        self.set_pause(PauseCause::Owner, reason).await
    }

    /// Holds (`Some(reason)`) or lifts (`None`) the pause for one cause: the node takes tasks
    /// again once no cause holds one.
    pub async fn set_pause(
        &self,
        cause: PauseCause,
        reason: Option<String>,
    ) -> Result<(), NodeError> {
        self.ask(|reply| Command::SetPaused {
            cause,
            reason,
            reply,
        })
        .await
    }

    /// Sets the advertised free execution slots; a change is re-published at once.
    pub async fn set_free_slots(&self, free: u32) -> Result<(), NodeError> {
        self.ask(|reply| Command::SetFreeSlots { free, reply })
            .await
    }

    /// Asks `peer` to stop task `task` this node sent it (fire and forget).
    pub async fn cancel_task(&self, peer: PeerId, task: u64) -> Result<(), NodeError> {
        self.tx
            .send(Command::CancelTask { peer, task })
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Sends `peer` a task and waits for its answer.
    pub async fn run_task(
        &self,
        peer: PeerId,
        request: corvid_sdk::wire::TaskRequest,
    ) -> Result<corvid_sdk::wire::TaskResponse, NodeError> {
        self.ask(|reply| Command::SendTask {
            peer,
            request: Box::new(request),
            reply,
        })
        .await?
        .map_err(|error| NodeError::Remote {
            peer: peer.to_string(),
            error,
        })
    }

    /// Publishes arbitrary bytes on the advert topic. For tests of other nodes' validation.
    #[doc(hidden)]
    pub async fn publish_raw_advert(&self, data: Vec<u8>) -> Result<Result<(), String>, NodeError> {
        self.ask(|reply| Command::PublishRaw { data, reply }).await
    }
}
