//! The one task that owns the swarm and the peer table. Everything else talks to it through
//! [`Command`]s on a bounded channel, each carrying its own reply channel; the worker's answers
//! to peers' tasks come back on a channel of their own ([`WorkQueues`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, PublishError};
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::dial::{self, DialFailure};
use super::nat::{HOLE_PUNCH_WAIT, Nat, dial_addrs, is_relayed};
use super::task::Envelope;
use super::{Behaviour, BehaviourEvent, advert_topic, catchup};
use crate::advert::{self, Advert};
use crate::config::Timing;
use crate::peers::{Accepted, PeerInfo, PeerTable};
use crate::status::{
    BootstrapStatus, HolePunches, PauseCause, Reachability, Status, bootstrap_line,
};
use crate::worker::{Finished, Work};
use corvid_sdk::wire::{Request, TaskError, TaskRequest, TaskResponse};
use libp2p::request_response::{self, OutboundRequestId};
use std::collections::{BTreeMap, HashMap};

/// Most peers kept in the table.
const MAX_PEERS: usize = 10_000;
/// Adverts from peers never connected to, held while we try to reach their authors: at most
/// this many in all, and this many relayed by any one peer. Only a connection (whose
/// handshake proves the author holds its key, and that it exists somewhere reachable) lets
/// such an advert into the table: adverts signed by keys made up by the thousand never do.
/// An author not reached within the dial timeout is given up on.
const MAX_UNCONFIRMED: usize = 256;
const MAX_UNCONFIRMED_PER_RELAY: usize = 8;
/// The same, for the adverts a peer hands a node that joins: enough for a small swarm's
/// workers behind NAT.
const CATCHUP_QUOTA: usize = 32;
/// Most peers listed with their gossip score in the status (the lowest scores).
const MAX_SCORES_SHOWN: usize = 32;
/// A task whose connection closes under it is sent again at most this often (connections
/// churn when a relayed one is replaced by a hole-punched one, or duplicates are dropped).
const MAX_RESENDS: u8 = 3;
/// Publishing waits this long after a peer subscribes, so several arrivals share one advert.
const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(200);
/// When the start-up summary of who is there is logged.
const SUMMARY_AFTER: Duration = Duration::from_secs(5);

/// Requests to the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// Updates the advertised free slots; a change is published at once.
    SetFreeSlots {
        free: u32,
        reply: oneshot::Sender<()>,
    },
    /// Holds (with the reason) or lifts one cause's pause on taking tasks from peers.
    SetPaused {
        cause: PauseCause,
        reason: Option<String>,
        reply: oneshot::Sender<()>,
    },
    /// Publishes raw bytes on the advert topic (tests of the receivers' validation).
    PublishRaw {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Sends a task to a peer; the reply is its answer or why there is none.
    SendTask {
        peer: PeerId,
        request: Box<TaskRequest>,
        reply: oneshot::Sender<Result<TaskResponse, String>>,
    },
    /// Asks a peer to stop a task this node sent it; the answer is not awaited.
    CancelTask {
        peer: PeerId,
        task: u64,
    },
}

/// An advert from a peer never connected to, waiting for a connection to its author.
#[derive(Debug)]
struct Unconfirmed {
    advert: Advert,
    signed: Arc<[u8]>,
    /// The peer that relayed it.
    via: PeerId,
    since: Instant,
}

#[derive(Debug)]
struct Bootstrap {
    /// Full address, with `/p2p/`.
    addr: Multiaddr,
    base: Multiaddr,
    peer: PeerId,
    dial: Option<ConnectionId>,
    connected: bool,
    last_error: Option<DialFailure>,
}

/// The worker's inboxes (tasks to run, and (peer, task) pairs to stop) and its answers.
#[derive(Debug)]
pub(crate) struct WorkQueues {
    pub tasks: mpsc::Sender<Work>,
    pub cancels: mpsc::Sender<(PeerId, u64)>,
    /// The data of tasks turned away busy, for the worker to keep.
    pub keeps: mpsc::Sender<crate::worker::Kept>,
    pub finished: mpsc::Receiver<Finished>,
}

/// What the status reports besides the network (the worker's limits and its executor), and
/// the metrics the event loop records.
pub(crate) struct Extras {
    pub limits: Option<crate::limits::Limits>,
    #[cfg(target_os = "linux")]
    pub executor: Option<crate::sandbox::Probe>,
    /// What answers to this node's tasks may carry (shared with the task codec).
    pub answers: std::sync::Arc<super::task::Answers>,
    /// Corvid's series and libp2p's, for `GET /metrics`.
    pub metrics: crate::metrics::NodeMetrics,
    pub libp2p_metrics: libp2p::metrics::Metrics,
    /// What this node has contributed, and its recent task errors.
    pub ledger: crate::tally::Ledger,
    /// The owner's caps and pause rules, for the status.
    pub caps: crate::status::Caps,
}

/// Where the answer to a task this node sent goes.
type Reply = oneshot::Sender<Result<TaskResponse, String>>;

/// A task this node sent, until its answer arrives.
struct Sent {
    request: Box<TaskRequest>,
    reply: Reply,
    /// Times it was sent again because the connection it went on closed.
    resent: u8,
}

/// The swarm's owner.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    key: Keypair,
    table: PeerTable,
    unconfirmed: HashMap<PeerId, Unconfirmed>,
    advert: Advert,
    timing: Timing,
    psk_path: Option<std::path::PathBuf>,
    bootstrap: Vec<Bootstrap>,
    listen_addrs: Vec<Multiaddr>,
    next_publish: Pin<Box<Sleep>>,
    published: u64,
    started: Instant,
    summary_logged: bool,
    /// Where received tasks, and cancels of them, go; `None` on a requester-only node.
    work: Option<WorkQueues>,
    /// Replies owed for tasks this node sent.
    pending: HashMap<OutboundRequestId, Sent>,
    /// Tasks each requester has with the worker (queued or running): at most three quarters
    /// of the worker's queue, so one requester cannot keep everyone else's tasks out.
    queued: HashMap<PeerId, usize>,
    tasks_answered: u64,
    /// Answers handed to libp2p and not yet written to their stream.
    answering: usize,
    /// Reachability, relay slots, the path of each connection.
    nat: Nat,
    /// Why the node takes no new task, by cause, while any holds a pause.
    pauses: BTreeMap<PauseCause, String>,
    /// The worker's free slots (advertised unless paused).
    free_slots: u32,
    /// Our own advert as last published, for peers that ask what we hold.
    own_signed: Option<Arc<[u8]>>,
    /// When we last asked a peer for the adverts it holds.
    caught_up: Option<Instant>,
    /// When we last answered each peer's asking (once per advert interval).
    catchup_answered: HashMap<PeerId, Instant>,
    /// The join command last logged.
    announced: Option<String>,
    /// Tasks for peers reached only through a relay, waiting (a few seconds at most) for hole
    /// punching to give a direct connection.
    waiting: Vec<(PeerId, Box<TaskRequest>, Reply)>,
    extras: Extras,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        key: Keypair,
        advert: Advert,
        timing: Timing,
        psk_path: Option<std::path::PathBuf>,
        bootstrap: &[Multiaddr],
        listen_addrs: Vec<Multiaddr>,
        work: Option<WorkQueues>,
        extras: Extras,
    ) -> EventLoop {
        let bootstrap = bootstrap
            .iter()
            .filter_map(|addr| {
                let (base, peer) = dial::split_peer(addr);
                peer.map(|peer| Bootstrap {
                    addr: addr.clone(),
                    base,
                    peer,
                    dial: None,
                    connected: false,
                    last_error: None,
                })
            })
            .collect();
        let contributes = work.is_some();
        let free_slots = advert.slots_free;
        EventLoop {
            swarm,
            commands,
            key,
            table: PeerTable::new(MAX_PEERS),
            unconfirmed: HashMap::new(),
            advert,
            timing,
            psk_path,
            bootstrap,
            listen_addrs,
            next_publish: Box::pin(tokio::time::sleep(Duration::ZERO)),
            published: 0,
            started: Instant::now(),
            summary_logged: false,
            work,
            pending: HashMap::new(),
            queued: HashMap::new(),
            tasks_answered: 0,
            nat: Nat::new(contributes),
            pauses: BTreeMap::new(),
            answering: 0,
            free_slots,
            own_signed: None,
            caught_up: None,
            catchup_answered: HashMap::new(),
            announced: None,
            waiting: Vec::new(),
            extras,
        }
    }

    /// Runs until `cancel` fires or every handle is dropped.
    pub async fn run(mut self, cancel: CancellationToken) {
        for i in 0..self.bootstrap.len() {
            let b = &self.bootstrap[i];
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&b.peer, b.base.clone());
            self.dial_bootstrap(i);
        }
        let mut expire =
            tokio::time::interval((self.timing.peer_expiry / 4).max(Duration::from_millis(100)));
        // Addresses given with --external-addr: reachable from the start.
        for addr in self.swarm.external_addresses().cloned().collect::<Vec<_>>() {
            self.nat.confirmed(&mut self.swarm, &addr);
        }
        let mut punch_tick = tokio::time::interval(HOLE_PUNCH_WAIT / 10);
        let mut retry = tokio::time::interval(self.timing.bootstrap_retry);
        retry.tick().await; // the first tick is immediate; the dials above were the first try
        let summary = tokio::time::sleep(SUMMARY_AFTER);
        tokio::pin!(summary);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd),
                    None => break,
                },
                Some(done) = next_finished(&mut self.work) => self.respond(done),
                event = self.swarm.select_next_some() => self.handle_event(event),
                _ = &mut self.next_publish => self.publish(),
                _ = expire.tick() => self.expire(),
                _ = retry.tick() => self.retry_bootstrap(),
                _ = punch_tick.tick(), if !self.waiting.is_empty() => self.send_waiting(),
                _ = &mut summary, if !self.summary_logged => self.log_summary(),
            }
        }
        self.extras.ledger.save();
        tracing::info!(peers = self.table.len(), "node stopped");
    }

    fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Peers { reply } => {
                let mut peers = self.table.list(Instant::now());
                for p in &mut peers {
                    p.path = p.peer_id.parse().ok().and_then(|id| self.nat.path(&id));
                }
                let _ = reply.send(peers);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::SetFreeSlots { free, reply } => {
                self.free_slots = free.min(self.advert.slots_total);
                self.advertise_slots();
                let _ = reply.send(());
            }
            Command::SetPaused {
                cause,
                reason,
                reply,
            } => {
                let was = self.paused().map(str::to_string);
                match reason {
                    Some(why) => self.pauses.insert(cause, why),
                    None => self.pauses.remove(&cause),
                };
                match self.paused() {
                    now if now == was.as_deref() => {}
                    Some(why) => {
                        tracing::info!(reason = %why, "paused: no new tasks from peers (running ones finish)")
                    }
                    None => tracing::info!("resumed: taking tasks from peers"),
                }
                self.advertise_slots();
                let _ = reply.send(());
            }
            Command::PublishRaw { data, reply } => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(advert_topic(), data)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::SendTask {
                peer,
                request,
                reply,
            } => {
                // The answer may carry the outputs the program makes, and no more bytes (a
                // program that does not type-check makes none: only a refusal can answer it).
                let outputs = request.program.infer().map_or(0, |metas| {
                    request
                        .program
                        .outputs
                        .iter()
                        .filter_map(|&o| metas.get(o as usize))
                        .map(corvid_kernels::TensorMeta::bytes)
                        .sum()
                });
                self.extras.answers.expect(request.task, outputs);
                if self.nat.direct_soon(&peer) {
                    tracing::debug!(%peer, task = request.task, "task waits for a direct connection");
                    self.waiting.push((peer, request, reply));
                } else {
                    self.send(peer, request, reply, 0);
                }
            }
            Command::CancelTask { peer, task } => {
                // The acknowledgement arrives as a response nobody waits for.
                self.swarm
                    .behaviour_mut()
                    .task
                    .send_request(&peer, Request::Cancel { task }.into());
            }
        }
    }

    /// Sends a task to `peer`, keeping it (its tensors are shared, not copied) to send once more
    /// if the connection it went on closes.
    fn send(&mut self, peer: PeerId, request: Box<TaskRequest>, reply: Reply, resent: u8) {
        let id = self
            .swarm
            .behaviour_mut()
            .task
            .send_request(&peer, Request::Run((*request).clone()).into());
        self.pending.insert(
            id,
            Sent {
                request,
                reply,
                resent,
            },
        );
    }

    /// Why the node is paused (the first cause holding a pause), if it is.
    fn paused(&self) -> Option<&str> {
        self.pauses.values().next().map(String::as_str)
    }

    /// Advertises the worker's free slots, or none while paused; publishes a change at once.
    fn advertise_slots(&mut self) {
        let free = if self.paused().is_some() {
            0
        } else {
            self.free_slots
        };
        if free != self.advert.slots_free {
            self.advert.slots_free = free;
            self.schedule_publish(Duration::ZERO);
        }
    }

    /// Sends the waiting tasks whose peer has a direct connection now, or will not have one
    /// soon.
    fn send_waiting(&mut self) {
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(peer, _, _)| !self.nat.direct_soon(peer));
        self.waiting = still;
        for (peer, request, reply) in ready {
            self.send(peer, request, reply, 0);
        }
    }

    /// Counts `event` in libp2p's metrics.
    fn record(&self, event: &SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        let m = &self.extras.libp2p_metrics;
        m.record(event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => m.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => m.record(e),
            _ => {}
        }
    }

    /// Sends the worker's answer to the peer that asked.
    fn respond(&mut self, done: Finished) {
        if let Some(n) = self.queued.get_mut(&done.peer) {
            *n -= 1;
            if *n == 0 {
                self.queued.remove(&done.peer);
            }
        }
        let m = &self.extras.metrics;
        match &done.response {
            TaskResponse::Done { outputs, .. } => {
                m.task("done");
                m.task_bytes_out
                    .inc_by(outputs.iter().map(|d| d.meta().bytes()).sum());
                self.extras.ledger.done(done.flops);
            }
            TaskResponse::Failed { error, .. } => {
                m.task("failed");
                if !matches!(error, TaskError::Cancelled | TaskError::Busy) {
                    self.extras
                        .ledger
                        .event(&done.peer, "failed", error.to_string());
                }
            }
            TaskResponse::Missing { .. } => m.task("missing_inputs"),
        }
        m.queue_depth
            .set(self.queued.values().sum::<usize>() as i64);
        // Fails only if the requester has gone; nothing to do then.
        if self
            .swarm
            .behaviour_mut()
            .task
            .send_response(done.channel, done.response)
            .is_ok()
        {
            self.answering += 1;
        }
        self.tasks_answered += 1;
    }

    fn handle_task(&mut self, event: request_response::Event<Envelope, TaskResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request:
                        Envelope {
                            request: Request::Cancel { task },
                            ..
                        },
                    channel,
                    ..
                } => {
                    if let Some(w) = &self.work {
                        // A full inbox drops the cancel: the task then runs to its deadline.
                        let _ = w.cancels.try_send((peer, task));
                    }
                    let r = TaskResponse::Failed {
                        task,
                        error: TaskError::Cancelled,
                    };
                    let _ = self.swarm.behaviour_mut().task.send_response(channel, r);
                }
                request_response::Message::Request {
                    request:
                        Envelope {
                            request: Request::Run(request),
                            lease,
                        },
                    channel,
                    ..
                } => {
                    let task = request.task;
                    self.extras.metrics.task_bytes_in.inc_by(
                        request
                            .inputs
                            .iter()
                            .map(|i| match i {
                                corvid_sdk::wire::Input::Data(d) => d.meta().bytes(),
                                _ => 0,
                            })
                            .sum(),
                    );
                    // A task turned away because the queue is full leaves its data with the
                    // worker, so that it crosses the network once.
                    let refusal = match &self.work {
                        // Busy: the requester places it elsewhere, at no cost to its standing.
                        // (Paused, it keeps nothing: it stays out of its owner's way.)
                        Some(_) if self.paused().is_some() => {
                            Some((channel, TaskError::Busy, None))
                        }
                        None => Some((
                            channel,
                            TaskError::Invalid(
                                "this node does not contribute (--no-contribute)".into(),
                            ),
                            None,
                        )),
                        Some(queues)
                            if self.queued.get(&peer).copied().unwrap_or(0)
                                >= queues.tasks.max_capacity() * 3 / 4 =>
                        {
                            Some((channel, TaskError::Busy, Some((request, lease))))
                        }
                        Some(queues) => match queues.tasks.try_send(Work {
                            peer,
                            request,
                            channel,
                            lease,
                        }) {
                            Ok(()) => {
                                *self.queued.entry(peer).or_default() += 1;
                                None
                            }
                            Err(mpsc::error::TrySendError::Full(w)) => {
                                Some((w.channel, TaskError::Busy, Some((w.request, w.lease))))
                            }
                            Err(mpsc::error::TrySendError::Closed(w)) => Some((
                                w.channel,
                                TaskError::Failed("the worker has stopped".into()),
                                None,
                            )),
                        },
                    };
                    let refusal = refusal.map(|(channel, error, kept)| {
                        if let (TaskError::Busy, Some((request, lease)), Some(queues)) =
                            (&error, kept, &self.work)
                        {
                            let values: Vec<_> = request
                                .inputs
                                .into_iter()
                                .zip(request.input_ids)
                                .filter_map(|(input, id)| match input {
                                    corvid_sdk::wire::Input::Data(d) => Some((id, d)),
                                    _ => None,
                                })
                                .collect();
                            // A full inbox drops them: the task sent again carries them again.
                            if !values.is_empty() {
                                let _ = queues.keeps.try_send(crate::worker::Kept {
                                    peer,
                                    values,
                                    lease,
                                });
                            }
                        }
                        (channel, error)
                    });
                    let m = &self.extras.metrics;
                    m.queue_depth
                        .set(self.queued.values().sum::<usize>() as i64);
                    if let Some((channel, error)) = refusal {
                        if matches!(error, TaskError::Busy) {
                            m.task("busy");
                        } else {
                            m.task("refused");
                            self.extras
                                .ledger
                                .event(&peer, "refused", error.to_string());
                        }
                        tracing::debug!(%peer, task, %error, "task refused");
                        let r = TaskResponse::Failed { task, error };
                        let _ = self.swarm.behaviour_mut().task.send_response(channel, r);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(sent) = self.pending.remove(&request_id) {
                        self.extras.answers.forget(sent.request.task);
                        let _ = sent.reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some(sent) = self.pending.remove(&request_id) else {
                    return;
                };
                // A connection that closed under the request (a relayed one replaced by a
                // direct one, a short-lived one, an idle one closing) says nothing about the
                // peer: send it once more, on a connection that is up or a new dial.
                if matches!(error, request_response::OutboundFailure::ConnectionClosed)
                    && sent.resent < MAX_RESENDS
                {
                    tracing::debug!(%peer, task = sent.request.task, "connection closed under a task: sending it again");
                    self.send(peer, sent.request, sent.reply, sent.resent + 1);
                    return;
                }
                self.extras.answers.forget(sent.request.task);
                tracing::debug!(%peer, %error, "task request failed");
                let _ = sent.reply.send(Err(error.to_string()));
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound task failed");
                // Refusals and cancels are not counted in `answering`: never below zero.
                self.answering = self.answering.saturating_sub(1);
            }
            request_response::Event::ResponseSent { .. } => {
                self.answering = self.answering.saturating_sub(1);
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.handle_gossip(e),
            SwarmEvent::Behaviour(BehaviourEvent::Task(e)) => self.handle_task(e),
            SwarmEvent::Behaviour(BehaviourEvent::Catchup(e)) => self.handle_catchup(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.nat.identified(&mut self.swarm, peer_id, &info);
                self.nat
                    .observed(&mut self.swarm, &info.observed_addr, &self.listen_addrs);
                self.advertise_addrs();
                if info.protocols.contains(&super::KAD_PROTOCOL) {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(Err(e)),
                ..
            })) => tracing::debug!(error = %e, "kademlia bootstrap"),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                self.nat.confirmed(&mut self.swarm, &address);
                self.advertise_addrs();
                self.announce();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.nat.expired(&mut self.swarm, &address);
                self.advertise_addrs();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => {
                self.nat.probed(&mut self.swarm, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => {
                self.nat.hole_punch(&mut self.swarm, e);
                self.send_waiting();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.nat.relay_client_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => {
                tracing::debug!(event = ?e, "relay")
            }
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(e)) => upnp_event(e),
            // A relay slot: where peers reach us now.
            #[allow(clippy::collapsible_match)]
            SwarmEvent::NewListenAddr { address, .. } if is_relayed(&address) => {
                if self.nat.listening(&address) {
                    self.advertise_addrs();
                    self.announce();
                }
            }
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.nat.listener_closed(&mut self.swarm, listener_id);
                self.advertise_addrs();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.nat.established(peer_id, connection_id, &endpoint);
                if !endpoint.is_relayed() {
                    self.send_waiting();
                }
                let mut was_bootstrap = false;
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == peer_id) {
                    if !b.connected {
                        tracing::info!(addr = %b.addr, "connected to bootstrap node");
                    }
                    b.connected = true;
                    b.last_error = None;
                    if b.dial == Some(connection_id) {
                        b.dial = None;
                    }
                    was_bootstrap = true;
                }
                if was_bootstrap {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                if let Some(u) = self.unconfirmed.remove(&peer_id) {
                    let _ = self.accept(peer_id, u.advert, u.signed);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.nat
                    .closed(&mut self.swarm, peer_id, connection_id, num_established);
                if num_established > 0 {
                    return;
                }
                self.send_waiting();
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == peer_id) {
                    b.connected = false;
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id {
                    self.nat.dial_failed(peer);
                    self.send_waiting();
                }
                self.dial_failed(connection_id, peer_id, &error)
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                let hint = if self.psk_path.is_some() {
                    " (a node without this network's --psk, or with another key?)"
                } else {
                    ""
                };
                tracing::debug!(from = %send_back_addr, error = %error, "incoming connection failed{hint}");
            }
            _ => {}
        }
    }

    fn handle_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let verdict = advert::validate(
                    &message.data,
                    message.source.as_ref(),
                    advert::now_ms(),
                    self.timing.peer_expiry,
                );
                let me = *self.swarm.local_peer_id();
                let acceptance = match (verdict, message.source) {
                    // Our own, echoed back late: nothing to learn, nobody at fault.
                    (Ok(_), Some(peer)) if peer == me => MessageAcceptance::Ignore,
                    (Ok(advert), Some(peer)) => self.admit(
                        peer,
                        advert,
                        Arc::from(message.data),
                        propagation_source,
                        MAX_UNCONFIRMED_PER_RELAY,
                    ),
                    (Ok(_), None) => MessageAcceptance::Reject, // unreachable: validate needs a source
                    (Err(why), source) => {
                        self.table.reject(why);
                        let n = self.table.rejection_count(why);
                        if n.is_power_of_two() {
                            tracing::warn!(reason = %why, count = n, from = %source.map(|p| p.to_string()).unwrap_or_default(), via = %propagation_source, "refused advert");
                        }
                        if why.is_fault() {
                            MessageAcceptance::Reject
                        } else {
                            MessageAcceptance::Ignore
                        }
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { peer_id, topic } if topic == advert_topic().hash() => {
                tracing::debug!(peer = %peer_id, "peer subscribed to adverts");
                self.schedule_publish(PUBLISH_DEBOUNCE);
                // The first peer we meet (and one each advert interval after that) tells us
                // who else is there.
                if self
                    .caught_up
                    .is_none_or(|t| t.elapsed() >= self.timing.advert_interval)
                {
                    self.caught_up = Some(Instant::now());
                    self.swarm
                        .behaviour_mut()
                        .catchup
                        .send_request(&peer_id, catchup::Ask);
                }
            }
            _ => {}
        }
    }

    /// A peer asked for the adverts we hold, or answered our asking.
    fn handle_catchup(&mut self, e: request_response::Event<catchup::Ask, catchup::Adverts>) {
        match e {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { channel, .. },
                ..
            } => {
                // Once per peer and advert interval: a small request must not buy a large
                // answer over and over.
                let now = Instant::now();
                let again = self.catchup_answered.get(&peer).is_some_and(|t| {
                    now.saturating_duration_since(*t) < self.timing.advert_interval
                });
                self.catchup_answered.insert(peer, now);
                let held: Vec<Arc<[u8]>> = if again {
                    Vec::new()
                } else {
                    self.own_signed
                        .iter()
                        .cloned()
                        .chain(self.table.signed_adverts(catchup::MAX_ADVERTS - 1))
                        .collect()
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .catchup
                    .send_response(channel, catchup::Adverts::new(held));
            }
            request_response::Event::Message {
                peer: via,
                message: request_response::Message::Response { response, .. },
                ..
            } => {
                let me = *self.swarm.local_peer_id();
                let (mut new, n) = (0, response.0.len());
                for bytes in response.0 {
                    let Some(author) = advert::signer(&bytes) else {
                        self.table.reject(advert::Rejection::Malformed);
                        continue;
                    };
                    if author == me {
                        continue;
                    }
                    let known = self.table.contains(&author);
                    match advert::validate(
                        &bytes,
                        Some(&author),
                        advert::now_ms(),
                        self.timing.peer_expiry,
                    ) {
                        // One we hold already (it came by gossip too): nothing to do.
                        Ok(a) if self.table.seq(&author).is_some_and(|held| held >= a.seq) => {}
                        Ok(a) => {
                            let _ = self.admit(
                                author,
                                a,
                                Arc::from(bytes.into_vec()),
                                via,
                                CATCHUP_QUOTA,
                            );
                            new += usize::from(!known);
                        }
                        Err(why) => self.table.reject(why),
                    }
                }
                tracing::debug!(%via, adverts = n, new, "adverts a peer holds");
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "asking for adverts failed");
            }
            _ => {}
        }
    }

    /// A valid advert by `peer`, relayed by `via`: into the table if we are (or have been)
    /// connected to `peer`; otherwise held while we try to reach it, within the bounds.
    fn admit(
        &mut self,
        peer: PeerId,
        advert: Advert,
        signed: Arc<[u8]>,
        via: PeerId,
        quota: usize,
    ) -> MessageAcceptance {
        if self.table.contains(&peer) || self.swarm.is_connected(&peer) {
            self.unconfirmed.remove(&peer);
            return self.accept(peer, advert, signed);
        }
        if let Some(u) = self.unconfirmed.get_mut(&peer) {
            if advert.seq <= u.advert.seq {
                return MessageAcceptance::Ignore;
            }
            // New addresses (a relay slot it just got): try them.
            let fresh: Vec<Multiaddr> = dial_addrs(advert.multiaddrs())
                .into_iter()
                .filter(|a| !u.advert.addrs.contains(&a.to_string()))
                .collect();
            u.advert = advert;
            u.signed = signed;
            if !fresh.is_empty() {
                let _ = self.swarm.dial(
                    DialOpts::peer_id(peer)
                        .addresses(fresh)
                        .condition(PeerCondition::Disconnected)
                        .build(),
                );
            }
            return MessageAcceptance::Accept;
        }
        let relayed = self.unconfirmed.values().filter(|u| u.via == via).count();
        if relayed >= quota || self.unconfirmed.len() >= MAX_UNCONFIRMED {
            self.table.reject(advert::Rejection::RelayQuota);
            let n = self.table.rejection_count(advert::Rejection::RelayQuota);
            if n.is_power_of_two() {
                tracing::warn!(%via, count = n, "dropped adverts of unknown peers over the relay quota");
            }
            return MessageAcceptance::Ignore;
        }
        tracing::debug!(%peer, %via, "advert of a peer never connected to; reaching it");
        let addrs = dial_addrs(advert.multiaddrs());
        self.unconfirmed.insert(
            peer,
            Unconfirmed {
                advert,
                signed,
                via,
                since: Instant::now(),
            },
        );
        // The addresses it advertises (direct, or through a relay), else those Kademlia
        // knows; and a lookup, which reaches the peer itself if the DHT knows where it is.
        let dial = if addrs.is_empty() {
            DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build()
        } else {
            // Even while another dial is under way (a DHT lookup's, at addresses that may
            // be stale or private).
            DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::Disconnected)
                .build()
        };
        let _ = self.swarm.dial(dial);
        self.swarm.behaviour_mut().kad.get_closest_peers(peer);
        MessageAcceptance::Accept
    }

    fn accept(&mut self, peer: PeerId, advert: Advert, signed: Arc<[u8]>) -> MessageAcceptance {
        // Where to dial it when a task needs a connection (request-response keeps these).
        for addr in dial_addrs(advert.multiaddrs()) {
            self.swarm.add_peer_address(peer, addr);
        }
        let (gflops, gbps, slots) = (
            advert.matmul_gflops,
            advert.elementwise_gbps,
            advert.slots_free,
        );
        match self.table.accept(peer, advert, signed, Instant::now()) {
            Ok(Accepted::New) => {
                tracing::info!(peer = %peer, gflops, gbps, slots, peers = self.table.len(), "peer joined");
                MessageAcceptance::Accept
            }
            Ok(Accepted::Changed) => {
                tracing::info!(peer = %peer, gflops, gbps, slots, "peer changed its offer");
                MessageAcceptance::Accept
            }
            Ok(Accepted::Refreshed) => MessageAcceptance::Accept,
            Err(why) => {
                self.table.reject(why);
                MessageAcceptance::Ignore
            }
        }
    }

    fn schedule_publish(&mut self, after: Duration) {
        let at = tokio::time::Instant::now() + after;
        if at < self.next_publish.deadline() {
            self.next_publish.as_mut().reset(at);
        }
    }

    fn publish(&mut self) {
        self.advert.seq += 1;
        self.advert.timestamp_ms = advert::now_ms();
        match self.advert.sign(&self.key) {
            Err(e) => tracing::warn!(error = %e, "could not publish the advert"),
            Ok(bytes) => {
                tracing::debug!(
                    bytes = bytes.len(),
                    seq = self.advert.seq,
                    "publishing advert"
                );
                self.own_signed = Some(Arc::from(bytes.as_slice()));
                match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(advert_topic(), bytes)
                {
                    Ok(_) => self.published += 1,
                    Err(PublishError::NoPeersSubscribedToTopic) => {
                        tracing::trace!("no peers to advertise to yet")
                    }
                    Err(e) => tracing::warn!(error = %e, "could not publish the advert"),
                }
            }
        }
        let next = tokio::time::Instant::now() + self.timing.advert_interval;
        self.next_publish.as_mut().reset(next);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let interval = self.timing.advert_interval;
        self.catchup_answered
            .retain(|_, t| now.saturating_duration_since(*t) < interval);
        let before = self.unconfirmed.len();
        let within = self.timing.dial_timeout;
        self.unconfirmed
            .retain(|_, u| now.saturating_duration_since(u.since) <= within);
        for _ in self.unconfirmed.len()..before {
            self.table.reject(advert::Rejection::Unconfirmed);
        }
        // Peers whose gossip we no longer read (graylisted: they sent invalid adverts) are no
        // workers of ours either.
        let gossip = &self.swarm.behaviour().gossipsub;
        let graylisted: Vec<PeerId> = self
            .table
            .peer_ids()
            .filter(|p| {
                gossip
                    .peer_score(p)
                    .is_some_and(|s| s <= super::GRAYLIST_SCORE)
            })
            .copied()
            .collect();
        for peer in graylisted {
            self.table.remove(&peer);
            tracing::warn!(%peer, peers = self.table.len(), "peer removed: its gossip score is below the graylist (invalid adverts)");
        }
        let swarm = &self.swarm;
        let gone = self
            .table
            .expire(Instant::now(), self.timing.peer_expiry, |p| {
                swarm.is_connected(p)
            });
        for peer in gone {
            tracing::info!(peer = %peer, peers = self.table.len(), "peer expired: not connected and not heard from in {}",
                humantime::format_duration(self.timing.peer_expiry));
        }
    }

    fn dial_bootstrap(&mut self, i: usize) {
        let b = &mut self.bootstrap[i];
        let opts = DialOpts::peer_id(b.peer)
            .addresses(vec![b.base.clone()])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => b.dial = Some(id),
            Err(e) => tracing::debug!(addr = %b.addr, error = %e, "bootstrap dial not started"),
        }
    }

    fn retry_bootstrap(&mut self) {
        for i in 0..self.bootstrap.len() {
            let b = &self.bootstrap[i];
            if !b.connected && !self.swarm.is_connected(&b.peer) {
                self.dial_bootstrap(i);
            }
        }
    }

    fn dial_failed(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        error: &libp2p::swarm::DialError,
    ) {
        let psk = self.psk_path.is_some();
        let timeout = self.timing.dial_timeout;
        // A failed dial to a bootstrap peer we are connected to anyway (another address, a
        // second connection) says nothing about reaching it.
        let connected = |p: &PeerId| self.swarm.is_connected(p);
        for b in self
            .bootstrap
            .iter_mut()
            .filter(|b| b.dial == Some(id) || (Some(b.peer) == peer && !connected(&b.peer)))
        {
            let failure = dial::classify(error, Some(&b.peer), psk, timeout);
            if b.last_error.as_ref() != Some(&failure) {
                tracing::warn!(addr = %b.addr, "cannot reach bootstrap node: {failure}");
            }
            b.dial = None;
            b.last_error = Some(failure);
        }
    }

    fn log_summary(&mut self) {
        self.summary_logged = true;
        if *self.nat.reachability() == Reachability::Checking {
            tracing::info!(
                "reachability: still checking (no peer has tried to dial this node back yet)"
            );
        }
        let peers = self.table.list(Instant::now());
        let connected = self.swarm.connected_peers().count();
        if peers.is_empty() && !self.bootstrap.is_empty() && connected == 0 {
            for b in &self.bootstrap {
                let why = b
                    .last_error
                    .as_ref()
                    .map_or_else(|| "no answer yet".to_string(), ToString::to_string);
                tracing::warn!(addr = %b.addr, "still not connected after {}s: {why}", SUMMARY_AFTER.as_secs());
            }
            return;
        }
        tracing::info!(peers = peers.len(), connected, "part of the swarm");
        for p in &peers {
            tracing::info!(peer = %p.peer_id, backend = %p.backend, gflops = p.matmul_gflops, gbps = p.elementwise_gbps, slots = p.slots_free, "peer");
        }
    }

    /// Puts the addresses peers can dial us at (confirmed external ones, relay circuits) in
    /// the advert, and publishes it at once if they changed.
    fn advertise_addrs(&mut self) {
        let mut addrs: Vec<String> = self
            .swarm
            .external_addresses()
            .filter(|a| !is_relayed(a))
            .chain(
                self.nat
                    .circuits()
                    .iter()
                    .filter(|_| self.nat.needs_relay()),
            )
            .map(ToString::to_string)
            .collect();
        addrs.dedup();
        addrs.truncate(advert::MAX_ADDRS);
        if addrs != self.advert.addrs {
            self.advert.addrs = addrs;
            self.schedule_publish(Duration::ZERO);
        }
    }

    /// The connected peers with the lowest gossip scores, lowest first.
    fn low_scores(&self) -> Vec<(String, f64)> {
        let gossip = &self.swarm.behaviour().gossipsub;
        let mut scores: Vec<(String, f64)> = self
            .swarm
            .connected_peers()
            .filter_map(|p| Some((p.to_string(), gossip.peer_score(p)?)))
            .collect();
        scores.sort_by(|a, b| a.1.total_cmp(&b.1));
        scores.truncate(MAX_SCORES_SHOWN);
        scores
    }

    /// Logs the command others run to join through this node once peers have shown it can be
    /// reached from outside its network (directly or through a relay), and when it changes.
    fn announce(&mut self) {
        let outside = match self.nat.reachability() {
            Reachability::Reachable { .. } => true,
            _ => self.nat.needs_relay() && !self.nat.circuits().is_empty(),
        };
        if !outside {
            return;
        }
        let me = *self.swarm.local_peer_id();
        let line = bootstrap_line(&self.dialable_addrs(), &me, self.psk_path.as_deref());
        if line.is_some() && line != self.announced {
            if let Some(l) = &line {
                tracing::info!("others join this swarm from anywhere with:  {l}");
            }
            self.announced = line;
        }
    }

    /// Where others can dial this node, best first: addresses peers dialled back, relay
    /// circuits while peers cannot dial it, then what it listens on.
    fn dialable_addrs(&self) -> Vec<Multiaddr> {
        let mut addrs: Vec<Multiaddr> = self
            .swarm
            .external_addresses()
            .filter(|a| !is_relayed(a))
            .cloned()
            .collect();
        if self.nat.needs_relay() {
            addrs.extend(self.nat.circuits().iter().cloned());
        }
        addrs.extend(self.listen_addrs.iter().cloned());
        addrs
    }

    fn status(&self) -> Status {
        let me = *self.swarm.local_peer_id();
        let own = PeerInfo::from_advert(&me, &self.advert, Duration::ZERO);
        Status {
            peer_id: me.to_string(),
            listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
            dialable_addrs: self
                .dialable_addrs()
                .iter()
                .map(|a| format!("{a}/p2p/{me}"))
                .collect(),
            bootstrap_line: bootstrap_line(&self.dialable_addrs(), &me, self.psk_path.as_deref()),
            connected_peers: self.swarm.connected_peers().count(),
            known_peers: self.table.len(),
            advert: own,
            adverts_published: self.published,
            rejections: self.table.rejections(),
            bootstrap: self
                .bootstrap
                .iter()
                .map(|b| BootstrapStatus {
                    addr: b.addr.to_string(),
                    connected: b.connected,
                    error: b.last_error.as_ref().map(ToString::to_string),
                    failure: b.last_error.clone(),
                })
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            tasks_answered: self.tasks_answered,
            paused: self.paused().map(str::to_string),
            pause_cause: self.pauses.keys().next().copied(),
            tasks_in_hand: self.queued.values().sum::<usize>() + self.answering,
            contributed: self.extras.ledger.tally(),
            recent_errors: self.extras.ledger.recent(),
            gossip_scores: self.low_scores(),
            reachability: self.nat.reachability().clone(),
            relay_addrs: self
                .nat
                .circuits()
                .iter()
                .map(ToString::to_string)
                .collect(),
            hole_punches: {
                let (succeeded, failed) = self.nat.punches();
                HolePunches { succeeded, failed }
            },
            limits: self.extras.limits.clone(),
            caps: self.extras.caps.clone(),
            #[cfg(target_os = "linux")]
            executor: self.extras.executor.as_ref().and_then(|p| p.status()),
            #[cfg(not(target_os = "linux"))]
            executor: None,
        }
    }
}

/// The worker's next answer; on a node without a worker, never.
async fn next_finished(work: &mut Option<WorkQueues>) -> Option<Finished> {
    match work {
        Some(w) => w.finished.recv().await,
        None => std::future::pending().await,
    }
}

/// What the router said to a port-mapping request.
fn upnp_event(e: libp2p::upnp::Event) {
    use libp2p::upnp::Event;
    match e {
        Event::NewExternalAddr { external_addr, .. } => tracing::info!(
            addr = %external_addr,
            "the router forwards a port to this node (UPnP): {external_addr}"
        ),
        Event::ExpiredExternalAddr { external_addr, .. } => {
            tracing::info!(addr = %external_addr, "port mapping expired")
        }
        Event::GatewayNotFound => {
            tracing::debug!("no UPnP gateway on this network (or it does not answer)")
        }
        Event::NonRoutableGateway => {
            tracing::info!("the UPnP gateway is itself behind NAT: a port mapping would not help")
        }
    }
}
