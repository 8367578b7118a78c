//! Capability adverts: what a node offers, signed by its identity and gossiped on
//! [`ADVERT_TOPIC`].
//!
//! The wire form is a postcard [`SignedAdvert`] envelope around a postcard [`Advert`]. Receivers
//! run [`validate`] before accepting or forwarding one: size cap before any decoding, envelope
//! and advert version, signature, signer equal to the gossip source, freshness, sane numbers.

use std::fmt;
use std::time::Duration;

use corvid_kernels::{BackendKind, Budget, DeterminismClass};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

/// Gossipsub topic of version-1 adverts.
pub const ADVERT_TOPIC: &str = "corvid/adverts/v1";
/// Version of the envelope and of the advert inside it.
pub const ADVERT_VERSION: u16 = 3;
/// Largest encoded envelope accepted; checked before decoding.
pub const MAX_ADVERT_BYTES: usize = 4096;
/// Longest text field (adapter name, determinism class parts).
pub const MAX_TEXT: usize = 256;
/// Adverts stamped further than this in the future are rejected (clock skew allowance).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Domain separation for advert signatures.
pub const SIGNING_CONTEXT: &[u8] = b"corvid-advert-v1:";
/// Ceilings on advertised numbers: far above any real machine, low enough to catch nonsense.
const MAX_GFLOPS: f32 = 1.0e7;
const MAX_GBPS: f32 = 1.0e6;

/// What a node offers the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    pub version: u16,
    /// The advertising peer's id (multihash bytes).
    pub peer_id: Vec<u8>,
    /// Unix time in milliseconds when the advert was made.
    pub timestamp_ms: u64,
    /// Increases with every advert the node publishes.
    pub seq: u64,
    pub backend: BackendKind,
    /// Human-readable backend and adapter, e.g. `cpu (x86_64 avx2 fma)`.
    pub adapter: String,
    pub class: DeterminismClass,
    pub matmul_gflops: f32,
    pub elementwise_gbps: f32,
    /// Memory offered, bytes.
    pub memory_bytes: u64,
    /// Largest single tensor the backend takes, bytes.
    pub max_tensor_bytes: u64,
    pub slots_total: u32,
    pub slots_free: u32,
    /// `false` for requester-only peers.
    pub contributes: bool,
    /// What one task may use on this node: requesters cut and place work to fit it.
    pub task_budget: Budget,
    /// Where peers can dial this node (multiaddrs without its `/p2p/` id): addresses peers
    /// dialled back (AutoNAT), given with `--external-addr`, and relay circuits
    /// (`…/p2p/RELAY/p2p-circuit`) while it cannot be dialled. At most [`MAX_ADDRS`].
    pub addrs: Vec<String>,
}

/// Addresses one advert lists at most, and the longest one.
pub const MAX_ADDRS: usize = 8;
const MAX_ADDR_LEN: usize = 256;

impl Advert {
    /// The advertised addresses that parse (all of them, in an advert that passed
    /// [`validate`]).
    pub fn multiaddrs(&self) -> Vec<libp2p::Multiaddr> {
        self.addrs.iter().filter_map(|a| a.parse().ok()).collect()
    }
}

/// The signed wire envelope. `signature` covers [`SIGNING_CONTEXT`] followed by `advert`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedAdvert {
    pub version: u16,
    /// Protobuf-encoded libp2p public key of the signer.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Postcard-encoded [`Advert`].
    #[serde(with = "serde_bytes")]
    pub advert: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why an advert could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AdvertError {
    #[error("could not sign the advert: {0}")]
    Sign(String),
    #[error("could not encode the advert: {0}")]
    Encode(#[from] postcard::Error),
    #[error("encoded advert is {0} bytes, over the {MAX_ADVERT_BYTES}-byte limit")]
    TooLarge(usize),
}

impl Advert {
    /// Signs and encodes the advert for the wire.
    pub fn sign(&self, key: &Keypair) -> Result<Vec<u8>, AdvertError> {
        let advert = postcard::to_stdvec(self)?;
        let mut msg = SIGNING_CONTEXT.to_vec();
        msg.extend_from_slice(&advert);
        let signature = key
            .sign(&msg)
            .map_err(|e| AdvertError::Sign(e.to_string()))?;
        let bytes = postcard::to_stdvec(&SignedAdvert {
            version: ADVERT_VERSION,
            public_key: key.public().encode_protobuf(),
            advert,
            signature,
        })?;
        if bytes.len() > MAX_ADVERT_BYTES {
            return Err(AdvertError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }
}

/// Why a received advert was refused. `Stale`, `Replayed`, `TableFull`, `Unconfirmed` and
/// `RelayQuota` are ignored (not forwarded, no penalty); the rest are rejected as malformed
/// or forged, and cost their sender gossip score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    Oversized,
    Malformed,
    Version,
    BadKey,
    BadSignature,
    SignerMismatch,
    Future,
    Stale,
    Insane,
    Replayed,
    /// The peer table is full; a new peer's advert is dropped.
    TableFull,
    /// From a peer never connected to, and not reached within the time allowed: its advert
    /// never entered the table.
    Unconfirmed,
    /// One more advert from a peer never connected to, relayed by a peer that already relays
    /// as many such adverts as we check at once.
    RelayQuota,
}

impl Rejection {
    /// Whether the sender is at fault (reject and penalise) rather than merely late (ignore).
    pub fn is_fault(self) -> bool {
        !matches!(
            self,
            Rejection::Stale
                | Rejection::Replayed
                | Rejection::TableFull
                | Rejection::Unconfirmed
                | Rejection::RelayQuota
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Rejection::Oversized => "oversized",
            Rejection::Malformed => "malformed",
            Rejection::Version => "version",
            Rejection::BadKey => "bad_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::SignerMismatch => "signer_mismatch",
            Rejection::Future => "future",
            Rejection::Stale => "stale",
            Rejection::Insane => "insane",
            Rejection::Replayed => "replayed",
            Rejection::TableFull => "table_full",
            Rejection::Unconfirmed => "unconfirmed",
            Rejection::RelayQuota => "relay_quota",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Validates a received advert. `source` is the gossip message's (signature-checked) author,
/// `now_ms` the local unix time, `max_age` the freshness window.
pub fn validate(
    data: &[u8],
    source: Option<&PeerId>,
    now_ms: u64,
    max_age: Duration,
) -> Result<Advert, Rejection> {
    if data.len() > MAX_ADVERT_BYTES {
        return Err(Rejection::Oversized);
    }
    let env: SignedAdvert = postcard::from_bytes(data).map_err(|_| Rejection::Malformed)?;
    if env.version != ADVERT_VERSION {
        return Err(Rejection::Version);
    }
    let key = PublicKey::try_decode_protobuf(&env.public_key).map_err(|_| Rejection::BadKey)?;
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&env.advert);
    if !crate::identity::verify_strict(&key, &msg, &env.signature) {
        return Err(Rejection::BadSignature);
    }
    let signer = key.to_peer_id();
    if source != Some(&signer) {
        return Err(Rejection::SignerMismatch);
    }
    let advert: Advert = postcard::from_bytes(&env.advert).map_err(|_| Rejection::Malformed)?;
    if advert.version != ADVERT_VERSION {
        return Err(Rejection::Version);
    }
    if advert.peer_id != signer.to_bytes() {
        return Err(Rejection::SignerMismatch);
    }
    if advert.timestamp_ms > now_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64) {
        return Err(Rejection::Future);
    }
    if now_ms.saturating_sub(advert.timestamp_ms) > max_age.as_millis() as u64 {
        return Err(Rejection::Stale);
    }
    if !sane(&advert) {
        return Err(Rejection::Insane);
    }
    Ok(advert)
}

/// Who signed `data` (a signed advert), if it decodes that far; [`validate`] checks the rest.
pub fn signer(data: &[u8]) -> Option<PeerId> {
    if data.len() > MAX_ADVERT_BYTES {
        return None;
    }
    let env: SignedAdvert = postcard::from_bytes(data).ok()?;
    Some(
        PublicKey::try_decode_protobuf(&env.public_key)
            .ok()?
            .to_peer_id(),
    )
}

fn sane(a: &Advert) -> bool {
    let rate = |x: f32, max: f32| x.is_finite() && (0.0..=max).contains(&x);
    let text = [
        &a.adapter,
        &a.class.adapter,
        &a.class.driver,
        &a.class.kernels,
    ];
    rate(a.matmul_gflops, MAX_GFLOPS)
        && rate(a.elementwise_gbps, MAX_GBPS)
        && a.slots_free <= a.slots_total
        && a.slots_total <= crate::config::MAX_SLOTS
        && (a.contributes || a.slots_total == 0)
        && text.iter().all(|t| t.len() <= MAX_TEXT)
        && a.task_budget.max_tensor_bytes <= a.task_budget.max_peak_bytes
        && a.task_budget.max_peak_bytes <= a.memory_bytes
        && a.addrs.len() <= MAX_ADDRS
        && a.addrs.iter().all(|t| dialable_addr(t, &a.peer_id))
}

/// An address an advert may list: short, a multiaddr, and not naming its own peer id (the
/// receiver appends that).
fn dialable_addr(text: &str, own_id: &[u8]) -> bool {
    use libp2p::multiaddr::Protocol;
    text.len() <= MAX_ADDR_LEN
        && text.parse::<libp2p::Multiaddr>().is_ok_and(|m| {
            !m.iter()
                .any(|p| matches!(p, Protocol::P2p(id) if id.to_bytes() == own_id))
        })
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(key: &Keypair, timestamp_ms: u64) -> Advert {
        Advert {
            version: ADVERT_VERSION,
            peer_id: key.public().to_peer_id().to_bytes(),
            timestamp_ms,
            seq: 1,
            backend: BackendKind::Cpu,
            adapter: "cpu (test)".into(),
            class: corvid_kernels::CpuBackend::new().class().clone(),
            matmul_gflops: 50.0,
            elementwise_gbps: 8.0,
            memory_bytes: 1 << 30,
            max_tensor_bytes: u64::MAX,
            slots_total: 2,
            slots_free: 2,
            contributes: true,
            task_budget: Budget::new(256 << 20, 256 << 20, 1 << 40),
            addrs: Vec::new(),
        }
    }

    const AGE: Duration = Duration::from_secs(60);
    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn a_small_order_key_cannot_sign_every_advert() {
        // The identity point as a key and (R = identity, s = 0) as the signature verify for
        // any message by the plain rules: a forger could advertise as this key at will.
        let mut point = [0u8; 32];
        point[0] = 1;
        let weak =
            PublicKey::from(libp2p::identity::ed25519::PublicKey::try_from_bytes(&point).unwrap());
        let peer = weak.to_peer_id();
        let key = Keypair::generate_ed25519();
        let advert = Advert {
            peer_id: peer.to_bytes(),
            ..sample(&key, NOW)
        };
        let mut signature = vec![0u8; 64];
        signature[0] = 1;
        let bytes = postcard::to_stdvec(&SignedAdvert {
            version: ADVERT_VERSION,
            public_key: weak.encode_protobuf(),
            advert: postcard::to_stdvec(&advert).unwrap(),
            signature,
        })
        .unwrap();
        assert_eq!(
            validate(&bytes, Some(&peer), NOW, AGE),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn valid_advert_round_trips() {
        let key = Keypair::generate_ed25519();
        let a = sample(&key, NOW);
        let bytes = a.sign(&key).unwrap();
        let pid = key.public().to_peer_id();
        assert_eq!(validate(&bytes, Some(&pid), NOW + 10, AGE), Ok(a));
    }

    #[test]
    fn forged_adverts_are_rejected() {
        let key = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let pid = key.public().to_peer_id();
        // Signed by another key but relayed under `key`'s id.
        let bytes = sample(&other, NOW).sign(&other).unwrap();
        assert_eq!(
            validate(&bytes, Some(&pid), NOW, AGE),
            Err(Rejection::SignerMismatch)
        );
        // Claims `key`'s peer id inside, signed by `other`.
        let bytes = sample(&key, NOW).sign(&other).unwrap();
        let opid = other.public().to_peer_id();
        assert_eq!(
            validate(&bytes, Some(&opid), NOW, AGE),
            Err(Rejection::SignerMismatch)
        );
        // Tampered payload.
        let mut env: SignedAdvert =
            postcard::from_bytes(&sample(&key, NOW).sign(&key).unwrap()).unwrap();
        let last = env.advert.len() - 1;
        env.advert[last] ^= 1;
        let bytes = postcard::to_stdvec(&env).unwrap();
        assert_eq!(
            validate(&bytes, Some(&pid), NOW, AGE),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn size_version_time_and_numbers_are_checked() {
        let key = Keypair::generate_ed25519();
        let pid = key.public().to_peer_id();
        let check = |a: &Advert| validate(&a.sign(&key).unwrap(), Some(&pid), NOW, AGE);
        assert_eq!(
            validate(&vec![0u8; MAX_ADVERT_BYTES + 1], Some(&pid), NOW, AGE),
            Err(Rejection::Oversized)
        );
        assert_eq!(
            validate(&[0xff; 40], Some(&pid), NOW, AGE),
            Err(Rejection::Malformed)
        );
        let mut a = sample(&key, NOW);
        a.version = ADVERT_VERSION + 1;
        assert_eq!(check(&a), Err(Rejection::Version));
        assert_eq!(check(&sample(&key, NOW + 31_000)), Err(Rejection::Future));
        assert_eq!(check(&sample(&key, NOW - 61_000)), Err(Rejection::Stale));
        let mut a = sample(&key, NOW);
        a.matmul_gflops = f32::NAN;
        assert_eq!(check(&a), Err(Rejection::Insane));
        let mut a = sample(&key, NOW);
        a.slots_free = 3;
        assert_eq!(check(&a), Err(Rejection::Insane));
        let mut a = sample(&key, NOW);
        a.adapter = "x".repeat(MAX_TEXT + 1);
        assert_eq!(check(&a), Err(Rejection::Insane));
        // A task budget over the memory offered is a lie.
        let mut a = sample(&key, NOW);
        a.task_budget.max_peak_bytes = a.memory_bytes + 1;
        assert_eq!(check(&a), Err(Rejection::Insane));
        // Addresses: multiaddrs, a few, not naming the advertiser itself.
        let relay = libp2p::PeerId::random();
        let circuit = format!("/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuit");
        let mut a = sample(&key, NOW);
        a.addrs = vec!["/ip4/198.51.100.2/tcp/4001".into(), circuit.clone()];
        assert_eq!(check(&a).map(|a| a.multiaddrs().len()), Ok(2));
        a.addrs = vec![format!("{circuit}/p2p/{pid}")];
        assert_eq!(check(&a), Err(Rejection::Insane));
        a.addrs = vec!["not a multiaddr".into()];
        assert_eq!(check(&a), Err(Rejection::Insane));
        a.addrs = vec![circuit; MAX_ADDRS + 1];
        assert_eq!(check(&a), Err(Rejection::Insane));
    }

    #[test]
    fn oversized_adverts_are_not_signed() {
        let key = Keypair::generate_ed25519();
        let mut a = sample(&key, NOW);
        a.adapter = "x".repeat(MAX_ADVERT_BYTES);
        assert!(matches!(a.sign(&key), Err(AdvertError::TooLarge(_))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any advert that fits the cap round-trips through sign and validate.
        #[test]
        fn signed_adverts_round_trip(seq in 0u64..u64::MAX, gflops in 0.0f32..1.0e6,
                                     slots in 0u32..64, adapter in "[ -~]{0,200}") {
            let key = Keypair::generate_ed25519();
            let mut a = sample(&key, NOW);
            a.seq = seq;
            a.matmul_gflops = gflops;
            a.slots_total = slots;
            a.slots_free = slots / 2;
            a.adapter = adapter;
            let bytes = a.sign(&key).unwrap();
            proptest::prop_assert!(bytes.len() <= MAX_ADVERT_BYTES);
            let pid = key.public().to_peer_id();
            proptest::prop_assert_eq!(validate(&bytes, Some(&pid), NOW, AGE), Ok(a));
        }

        /// Arbitrary bytes are refused, never a panic.
        #[test]
        fn arbitrary_bytes_are_refused(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6000)) {
            let pid = PeerId::random();
            proptest::prop_assert!(validate(&data, Some(&pid), NOW, AGE).is_err());
        }
    }
}
