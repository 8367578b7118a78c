//! Hostile gossip peers, for tests and the sybil soak: real libp2p peers (TCP, noise, yamux,
//! gossipsub with their own keys) that speak the advert topic the way an attacker would.
//! Compiled only with the `fault-injection` cargo feature.
//!
//! - [`relay`]: one peer connected to a target, behind which `n` identities that the target
//!   can never reach publish correctly signed adverts claiming enormous speed; the relay
//!   forwards them without validating anything.
//! - [`direct`]: `n` identities, each connected to a target itself, each publishing such an
//!   advert and invalid ones as fast as it is told to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use tokio_util::sync::CancellationToken;

use crate::advert::{ADVERT_VERSION, Advert, now_ms};
use crate::net::{MAX_GOSSIP_BYTES, advert_topic};

/// What the hostile peers sent, and how many of them got a connection.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub connected: AtomicU64,
}

/// Hostile peers running until their token is cancelled.
#[doc(hidden)]
#[derive(Debug)]
pub struct Sybils {
    /// Every identity that publishes adverts.
    pub ids: Vec<PeerId>,
    pub counters: Arc<Counters>,
    cancel: CancellationToken,
}

impl Sybils {
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Sybils {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A gossipsub-only peer with `key`: forwards whatever it receives, validates nothing.
fn gossip_peer(key: Keypair) -> Result<Swarm<gossipsub::Behaviour>, String> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .flood_publish(true)
        .heartbeat_interval(Duration::from_millis(500))
        .build()
        .map_err(|e| e.to_string())?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let mut g =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?;
            g.subscribe(&advert_topic())?;
            Ok(g)
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    Ok(swarm)
}

/// A correctly signed advert by `key` claiming the largest speed and slot count that pass
/// validation.
pub fn fast_advert(key: &Keypair, seq: u64) -> Vec<u8> {
    Advert {
        version: ADVERT_VERSION,
        peer_id: key.public().to_peer_id().to_bytes(),
        timestamp_ms: now_ms(),
        seq,
        backend: corvid_kernels::BackendKind::Cpu,
        adapter: "cpu (sybil)".into(),
        class: corvid_kernels::CpuBackend::new().class().clone(),
        matmul_gflops: 1.0e6,
        elementwise_gbps: 1.0e5,
        memory_bytes: 1 << 40,
        max_tensor_bytes: 1 << 40,
        slots_total: 1024,
        slots_free: 1024,
        contributes: true,
        task_budget: corvid_kernels::Budget::new(1 << 40, 1 << 40, 1 << 50),
        addrs: Vec::new(),
    }
    .sign(key)
    .unwrap_or_default()
}

/// Drives `swarm` until `cancel`, publishing `next()` every `every` (once it has a peer), and
/// dialling `target` again whenever it has no connection (a refused sybil keeps trying).
async fn run(
    mut swarm: Swarm<gossipsub::Behaviour>,
    every: Duration,
    mut next: impl FnMut() -> Vec<u8> + Send,
    target: Option<Multiaddr>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    if let Some(t) = &target {
        let _ = swarm.dial(t.clone());
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            e = swarm.select_next_some() => {
                if let libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } = e {
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tick.tick() => {
                if let Some(t) = &target
                    && swarm.connected_peers().next().is_none()
                {
                    let _ = swarm.dial(t.clone());
                }
                if swarm.behaviour_mut().publish(advert_topic(), next()).is_ok() {
                    counters.published.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Starts a peer with `key` publishing `next()` every `every`, connected to `target`;
/// returns its id.
fn spawn_identity(
    key: Keypair,
    every: Duration,
    next: impl FnMut() -> Vec<u8> + Send + 'static,
    target: Option<Multiaddr>,
    counters: &Arc<Counters>,
    cancel: &CancellationToken,
) -> Result<PeerId, String> {
    let id = key.public().to_peer_id();
    let swarm = gossip_peer(key)?;
    tokio::spawn(run(
        swarm,
        every,
        next,
        target,
        counters.clone(),
        cancel.clone(),
    ));
    Ok(id)
}

/// One relay connected to `target`, and `n` identities behind it (connected only to the
/// relay) publishing fast adverts every `every`.
pub async fn relay(target: Multiaddr, n: usize, every: Duration) -> Result<Sybils, String> {
    let cancel = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let mut relay = gossip_peer(Keypair::generate_ed25519())?;
    relay
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    let relay_target = target;
    let addr = loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            relay.select_next_some().await
        {
            break address;
        }
    };
    // The relay forwards; it never publishes anything itself.
    tokio::spawn(run(
        relay,
        Duration::from_secs(3600),
        Vec::new,
        Some(relay_target),
        counters.clone(),
        cancel.clone(),
    ));
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let key = Keypair::generate_ed25519();
        let mut seq = 0;
        let next = {
            let key = key.clone();
            move || {
                seq += 1;
                fast_advert(&key, seq)
            }
        };
        ids.push(spawn_identity(
            key,
            every,
            next,
            Some(addr.clone()),
            &counters,
            &cancel,
        )?);
    }
    Ok(Sybils {
        ids,
        counters,
        cancel,
    })
}

/// `n` identities, each connected to one of `targets` (in turn), each publishing every
/// `every` a fast advert, then an invalid one (bytes that are no advert), alternately.
pub async fn direct(targets: &[Multiaddr], n: usize, every: Duration) -> Result<Sybils, String> {
    let cancel = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let key = Keypair::generate_ed25519();
        let target = targets.get(i % targets.len().max(1)).cloned();
        let mut seq = 0u64;
        let next = {
            let key = key.clone();
            move || {
                seq += 1;
                if seq % 2 == 1 {
                    fast_advert(&key, seq)
                } else {
                    format!("garbage {seq} from a sybil").into_bytes()
                }
            }
        };
        ids.push(spawn_identity(
            key, every, next, target, &counters, &cancel,
        )?);
    }
    Ok(Sybils {
        ids,
        counters,
        cancel,
    })
}
