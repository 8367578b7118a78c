//! The node's ed25519 identity (a key file created with mode 0600 on first start) and the
//! private-network pre-shared key.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// Where the node's ed25519 identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// A protobuf-encoded keypair file, created with mode 0600 on first start.
    File(PathBuf),
    /// A fresh random key for this run only (a requester's default): nothing is written.
    Ephemeral,
    /// A key derived from a number: for tests only, never secret.
    Seed(u64),
}

/// Largest key or PSK file we read; both are well under 200 bytes.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why the identity or PSK could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file '{path}' is {bytes} bytes, over the {MAX_KEY_FILE_BYTES}-byte limit")]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("key file '{path}' is not a protobuf-encoded libp2p keypair: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("key file '{path}' holds a {kind} key; corvid identities are ed25519")]
    NotEd25519 { path: PathBuf, kind: String },
    #[error("psk file '{path}': {source}")]
    PskIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "psk file '{path}' is not a libp2p swarm key ({reason:?}); expected three lines: \
         /key/swarm/psk/1.0.0/, /base16/, 64 hex digits"
    )]
    PskParse { path: PathBuf, reason: String },
}

/// Whether `signature` is `key`'s ed25519 signature over `msg`, by the strict rules
/// (`verify_strict`: no small-order keys or malleable signatures, so one message has one
/// valid signature per key). Corvid identities are ed25519; any other key never verifies.
pub fn verify_strict(key: &libp2p::identity::PublicKey, msg: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = key.clone().try_into_ed25519() else {
        return false;
    };
    let (Ok(key), Ok(signature)) = (
        ed25519_dalek::VerifyingKey::from_bytes(&key.to_bytes()),
        ed25519_dalek::Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(msg, &signature).is_ok()
}

/// Loads the keypair named by `source`, creating the key file if it does not exist.
pub fn load_keypair(source: &IdentitySource) -> Result<Keypair, IdentityError> {
    match source {
        IdentitySource::Ephemeral => Ok(Keypair::generate_ed25519()),
        IdentitySource::Seed(i) => Ok(seeded(*i)),
        IdentitySource::File(path) => load_or_create(path),
    }
}

/// A deterministic, non-secret key for tests.
fn seeded(i: u64) -> Keypair {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&i.to_le_bytes());
    bytes[8..16].copy_from_slice(b"corvid-t");
    #[allow(clippy::expect_used)] // Invariant: any 32 bytes are a valid ed25519 secret key.
    Keypair::ed25519_from_bytes(bytes).expect("32 bytes make an ed25519 key")
}

fn load_or_create(path: &Path) -> Result<Keypair, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.len() > MAX_KEY_FILE_BYTES {
                return Err(IdentityError::TooLarge {
                    path: path.to_path_buf(),
                    bytes: meta.len(),
                });
            }
            warn_if_readable_by_others(path, &meta);
            let bytes = std::fs::read(path).map_err(io)?;
            let key =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Decode {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                return Err(IdentityError::NotEd25519 {
                    path: path.to_path_buf(),
                    kind: format!("{:?}", key.key_type()),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Decode {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            // Written whole under a temporary name, then linked into place: a process that
            // reads the key at the same time (`corvid id` while the node starts) sees either
            // no file or the whole key, and of two processes making one, the second uses the
            // first's.
            let tmp = path.with_extension(format!(
                "new-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let _ = std::fs::remove_file(&tmp);
            let written = private_file(&tmp).and_then(|mut file| {
                file.write_all(&bytes)?;
                file.sync_all()
            });
            let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    tracing::info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created a new identity");
                    Ok(key)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

/// Creates `path` (it must not exist) readable and writable by the owner only.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

fn warn_if_readable_by_others(path: &Path, meta: &std::fs::Metadata) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                "key file is readable by other users; run chmod 600 on it");
        }
    }
    #[cfg(not(unix))]
    let _ = (path, meta);
}

/// A private-network pre-shared key and the file it came from. `Debug` shows only the path and
/// the key's fingerprint, never the key.
#[derive(Clone)]
pub struct Psk {
    pub path: PathBuf,
    pub key: PreSharedKey,
}

impl Psk {
    /// Reads a libp2p swarm key file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
    pub fn load(path: &Path) -> Result<Psk, IdentityError> {
        let io = |source| IdentityError::PskIo {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::metadata(path).map_err(io)?.len();
        if bytes > MAX_KEY_FILE_BYTES {
            return Err(IdentityError::TooLarge {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let key = text
            .parse::<PreSharedKey>()
            .map_err(|e| IdentityError::PskParse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Psk {
            path: path.to_path_buf(),
            key,
        })
    }

    /// Writes a new random key to `path` (mode 0600); fails if the file exists.
    pub fn generate(path: &Path) -> Result<Psk, IdentityError> {
        let io = |source| IdentityError::PskIo {
            path: path.to_path_buf(),
            source,
        };
        let bytes: [u8; 32] = rand::random();
        let key = PreSharedKey::new(bytes);
        let mut file = private_file(path).map_err(io)?;
        file.write_all(key.to_key_file().as_bytes()).map_err(io)?;
        Ok(Psk {
            path: path.to_path_buf(),
            key,
        })
    }

    /// The key's public fingerprint (safe to print and compare).
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint().to_string()
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Psk")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let a = load_keypair(&IdentitySource::File(path.clone())).unwrap();
        let b = load_keypair(&IdentitySource::File(path.clone())).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn processes_making_the_key_at_once_end_with_one_key() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("identity.key");
            let ids: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| load_or_create(&path).map(|k| k.public().to_peer_id())))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap().unwrap().to_string())
                    .collect()
            });
            assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                1,
                "no temporary left"
            );
        }
    }

    #[test]
    fn corrupt_key_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, b"not a key").unwrap();
        let e = load_keypair(&IdentitySource::File(path))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.key"), "{e}");
    }

    #[test]
    fn strict_verification_refuses_what_plain_verification_lets_through() {
        let key = seeded(3);
        let msg = b"an advert";
        let sig = key.sign(msg).unwrap();
        assert!(verify_strict(&key.public(), msg, &sig));
        assert!(!verify_strict(&key.public(), b"another advert", &sig));
        // The identity point as a public key, and the signature (R = identity, s = 0): plain
        // verification accepts it for every message (anyone can "sign" as this key); strict
        // verification refuses small-order keys.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let weak = libp2p::identity::PublicKey::from(
            libp2p::identity::ed25519::PublicKey::try_from_bytes(&weak).unwrap(),
        );
        let mut forged = [0u8; 64];
        forged[0] = 1;
        assert!(weak.verify(msg, &forged), "plain verify lets it through");
        assert!(!verify_strict(&weak, msg, &forged));
    }

    #[test]
    fn seeded_keys_are_deterministic_and_distinct() {
        assert_eq!(seeded(1).public(), seeded(1).public());
        assert_ne!(seeded(1).public(), seeded(2).public());
    }

    #[test]
    fn psk_round_trip_and_debug_hides_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let a = Psk::generate(&path).unwrap();
        let b = Psk::load(&path).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let text = std::fs::read_to_string(&path).unwrap();
        let hex = text.lines().nth(2).unwrap();
        assert!(!format!("{b:?}").contains(hex));
        std::fs::write(&path, "garbage").unwrap();
        assert!(
            Psk::load(&path)
                .unwrap_err()
                .to_string()
                .contains("swarm.key")
        );
    }
}
