//! The libp2p swarm: TCP (+ [`psk`] for private networks) + noise + yamux, identify, ping, Kademlia and
//! gossipsub. The event loop (`event_loop`) owns it; [`dial`] turns connection errors into reasons a
//! person can act on.
//!
//! Everything a stranger can open is bounded: connections in total, per peer, per IP address
//! ([`ip_limits`]) and by the process's memory; handshakes by the dial timeout; task streams
//! per connection; gossip by size, topic (a subscription filter) and peer score.

pub(crate) mod catchup;
pub mod dial;
pub(crate) mod event_loop;
pub mod ip_limits;
pub(crate) mod nat;
pub mod psk;
pub mod task;

use std::time::Duration;

use either::Either;
use libp2p::core::Transport;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, MessageId, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, memory_connection_limits,
    noise, ping, relay, tcp, upnp, yamux,
};

use crate::advert::{ADVERT_TOPIC, MAX_ADVERT_BYTES};
use crate::config::NodeConfig;

/// Identify protocol version: nodes of other networks are told apart by it.
pub const PROTOCOL_VERSION: &str = "/corvid/1.0.0";
/// Our Kademlia protocol name (a private DHT, not the public IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/corvid/kad/1.0.0");
/// Gossipsub frames larger than this are dropped by the codec before decoding. Above
/// [`MAX_ADVERT_BYTES`] so that oversized adverts reach (and are counted by) our validator.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
const _: () = assert!(MAX_ADVERT_BYTES < MAX_GOSSIP_BYTES);

/// Established connections per peer: one dialled each way, and AutoNAT v2's dial-backs
/// (a new connection to test an address while the others stay up).
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Longest a connection may take to set up (TCP, handshakes), whatever the dial timeout.
const MAX_DIAL_TIME: Duration = Duration::from_secs(8);
/// How often untested addresses of this node are given to a peer to dial back.
const AUTONAT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Connections being set up at once, each way.
const MAX_PENDING: u32 = 64;
/// Inbound connections from one IP address being set up, and open (see [`ip_limits`]): one
/// host cannot hold every handshake slot with idle sockets, nor fill the node with sybils.
pub const MAX_PENDING_PER_IP: u32 = 4;
pub const MAX_CONNECTIONS_PER_IP: u32 = 8;
/// New connections are refused while the process uses more than this share of the machine's
/// memory (its own tasks are bounded by `--max-memory`; this catches everything else).
const MAX_MEMORY_SHARE: f64 = 0.9;
/// A task request not answered within this fails on the requester.
const TASK_TIMEOUT: Duration = Duration::from_secs(600);
/// Task streams open at once on one connection, either way (each may be decoding a head).
const MAX_TASK_STREAMS: usize = 32;
/// Idle connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("could not build the transport: {0}")]
    Transport(String),
    #[error("could not build the network behaviour: {0}")]
    Behaviour(String),
    #[error("cannot listen on '{addr}': {reason}")]
    Listen {
        addr: libp2p::Multiaddr,
        reason: String,
    },
    #[error("could not subscribe to '{ADVERT_TOPIC}': {0}")]
    Subscribe(String),
}

/// Every protocol the node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub ip_limits: ip_limits::Behaviour,
    pub limits: connection_limits::Behaviour,
    pub memory: memory_connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub gossipsub: Gossip,
    /// Whether peers can dial us (we ask them), and dialling back for them.
    pub autonat: autonat::v2::client::Behaviour<rand_autonat::rngs::StdRng>,
    pub autonat_server: autonat::v2::server::Behaviour,
    /// Relaying for peers behind NAT (while peers can dial us), and reserving a slot on
    /// another node's relay (while they cannot).
    pub relay: Toggle<relay::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    /// Turns relayed connections into direct ones (hole punching).
    pub dcutr: dcutr::Behaviour,
    pub upnp: Toggle<upnp::tokio::Behaviour>,
    pub task: request_response::Behaviour<task::TaskCodec>,
    /// The adverts a peer holds, asked for on joining.
    pub catchup: request_response::Behaviour<catchup::Codec>,
}

/// Gossipsub as the node runs it: only the advert topic is tracked for anyone.
pub(crate) type Gossip =
    gossipsub::Behaviour<gossipsub::IdentityTransform, gossipsub::WhitelistSubscriptionFilter>;

/// Gossip scores at or below this stop a peer's messages from being processed at all
/// (gossipsub's graylist); an invalid advert costs 10 × the square of
/// the invalid adverts it has sent, decaying slowly.
pub const GRAYLIST_SCORE: f64 = -80.0;
const INVALID_ADVERT_WEIGHT: f64 = -10.0;

/// The advert topic.
pub fn advert_topic() -> IdentTopic {
    IdentTopic::new(ADVERT_TOPIC)
}

/// A gossip message's id: its author and its bytes, so that a peer re-publishing someone
/// else's advert first makes another message and cannot suppress the real one as a duplicate.
fn message_id(m: &gossipsub::Message) -> MessageId {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid-gossip-id-v1");
    h.update(&m.source.map(|p| p.to_bytes()).unwrap_or_default());
    h.update(&m.data);
    MessageId::from(h.finalize().as_bytes().to_vec())
}

/// Gossipsub peer scoring (v1.1) for a swarm whose one topic carries a signed advert per peer
/// every half minute. Invalid adverts (forged, malformed, insane) weigh heavily and decay
/// slowly: three or four put a peer below the graylist, and its messages are then dropped
/// unread.
/// Many peers from one IP address (sybils on one machine) lose score beyond ten; this
/// machine's own loopback address does not count (local swarms, tests). Delivery-rate
/// penalties (P3) are off: adverts are too rare to measure a peer's mesh deliveries by.
fn gossip_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_ADVERT_WEIGHT,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    };
    let params = gossipsub::PeerScoreParams {
        topics: std::iter::once((advert_topic().hash(), topic)).collect(),
        ip_colocation_factor_weight: -5.0,
        ip_colocation_factor_threshold: 10.0,
        ip_colocation_factor_whitelist: [
            std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ]
        .into_iter()
        .collect(),
        // Protocol misbehaviour (grafting during a backoff, IWANT promises not kept): a few
        // happen to honest peers under load and cost nothing; beyond them, a little each.
        behaviour_penalty_weight: -1.0,
        behaviour_penalty_threshold: 6.0,
        // Off: a worker busy computing is slow to drain its gossip queues, and would sink
        // below the publish threshold for doing its job.
        slow_peer_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: GRAYLIST_SCORE,
        ..gossipsub::PeerScoreThresholds::default()
    };
    (params, thresholds)
}

/// Builds the swarm for `config` (not yet listening or dialling).
pub(crate) fn build_swarm(
    key: &Keypair,
    config: &NodeConfig,
    codec: task::TaskCodec,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Swarm<Behaviour>, NetError> {
    let psk = config.psk.as_ref().map(|p| p.key);
    // AutoNAT v2 clients give up on a probe after 10 s and then hear nothing: a dial back to a
    // node whose router drops it must fail before that, or that node never learns it cannot
    // be dialled.
    let dial_timeout = config.timing.dial_timeout.min(MAX_DIAL_TIME);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_other_transport(|key| {
            let noise = noise::Config::new(key)?;
            // TCP, wrapped in the PSK handshake when the network is private.
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            let base = match psk {
                Some(psk) => {
                    Either::Left(tcp.and_then(move |socket, _| psk::handshake(psk, socket)))
                }
                None => Either::Right(tcp),
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                base.upgrade(Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(dial_timeout),
            )
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_dns()
        .map_err(|e| NetError::Transport(e.to_string()))?
        // Connections through a relay: noise and yamux again, inside the relayed stream.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| behaviour(key, config, codec, relay_client))
        .map_err(|e| NetError::Behaviour(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    Ok(swarm)
}

fn behaviour(
    key: &Keypair,
    config: &NodeConfig,
    codec: task::TaskCodec,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
        .with_max_pending_incoming(Some(MAX_PENDING))
        .with_max_pending_outgoing(Some(MAX_PENDING));

    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
    kad_config.set_periodic_bootstrap_interval(Some(config.timing.kad_refresh));
    let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
    // Answer queries even before confirming an external address (loopback, LANs).
    kad.set_mode(Some(kad::Mode::Server));

    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        // Bound to its author: a peer re-publishing someone else's advert first makes another
        // message, and cannot suppress the real one as a duplicate.
        .message_id_fn(message_id)
        // Small swarms: a mesh of two is enough; flood publishing reaches everyone subscribed.
        .mesh_n_low(2)
        .mesh_outbound_min(1)
        .flood_publish(true)
        .heartbeat_interval(Duration::from_millis(500))
        // An advert's useful life: a duplicate arriving later is still dropped.
        .duplicate_cache_time(config.timing.peer_expiry)
        // Our own advert echoed back after that reaches the validator, which ignores it:
        // gossipsub would otherwise penalise the honest peer that forwarded it late.
        .allow_self_origin(true)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))?;
    // Peers may subscribe only to the advert topic: others' subscriptions are not tracked.
    let only_adverts =
        gossipsub::WhitelistSubscriptionFilter(std::iter::once(advert_topic().hash()).collect());
    let mut gossipsub = Gossip::new_with_subscription_filter(
        MessageAuthenticity::Signed(key.clone()),
        gossip_config,
        only_adverts,
    )?;
    let (params, thresholds) = gossip_scoring();
    gossipsub.with_peer_score(params, thresholds)?;
    gossipsub
        .subscribe(&advert_topic())
        .map_err(|e| format!("subscribe: {e}"))?;

    Ok(Behaviour {
        ip_limits: ip_limits::Behaviour::new(MAX_PENDING_PER_IP, MAX_CONNECTIONS_PER_IP),
        limits: connection_limits::Behaviour::new(limits),
        // No new connections while the process uses this share of the machine's memory.
        memory: memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_SHARE),
        identify: identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.to_string(), key.public())
                .with_agent_version(format!("corvid/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::default(),
        kad,
        gossipsub,
        // Each address is tested once, by one peer: a second between tests gives a verdict
        // within the node's first seconds (the default waits 5 s before the first).
        autonat: autonat::v2::client::Behaviour::new(
            rand_autonat::make_rng(),
            autonat::v2::client::Config::default().with_probe_interval(AUTONAT_PROBE_INTERVAL),
        ),
        autonat_server: autonat::v2::server::Behaviour::default(),
        relay: config
            .nat
            .relay
            .as_ref()
            .map(|l| {
                let mut relay = relay::Behaviour::new(
                    peer_id,
                    relay::Config {
                        max_reservations: l.max_reservations,
                        max_circuits: l.max_circuits,
                        max_circuit_duration: l.circuit_duration,
                        max_circuit_bytes: l.circuit_bytes,
                        ..relay::Config::default()
                    },
                );
                // Off until peers dial this node back (the event loop turns it on).
                relay.set_status(Some(relay::Status::Disable));
                relay
            })
            .into(),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        // Only for a node others may reach: one listening on loopback alone (local swarms,
        // tests) has no port to map, and asks no router on the network.
        upnp: (config.nat.upnp && config.listen.iter().any(|a| !nat::is_loopback(a)))
            .then(upnp::tokio::Behaviour::default)
            .into(),
        task: request_response::Behaviour::with_codec(
            codec,
            [(
                task::TASK_PROTOCOL,
                if config.contribute {
                    ProtocolSupport::Full
                } else {
                    ProtocolSupport::Outbound
                },
            )],
            request_response::Config::default()
                .with_request_timeout(TASK_TIMEOUT)
                .with_max_concurrent_streams(MAX_TASK_STREAMS),
        ),
        catchup: request_response::Behaviour::new(
            [(catchup::CATCHUP_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.timing.dial_timeout)
                .with_max_concurrent_streams(8),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_from_another_author_are_another_message() {
        let advert = vec![1, 2, 3];
        let message = |source: Option<libp2p::PeerId>| gossipsub::Message {
            source,
            data: advert.clone(),
            sequence_number: Some(1),
            topic: advert_topic().hash(),
        };
        let (honest, thief) = (libp2p::PeerId::random(), libp2p::PeerId::random());
        assert_eq!(
            message_id(&message(Some(honest))),
            message_id(&message(Some(honest)))
        );
        assert_ne!(
            message_id(&message(Some(honest))),
            message_id(&message(Some(thief)))
        );
        assert_ne!(
            message_id(&message(Some(honest))),
            message_id(&message(None))
        );
    }
}
