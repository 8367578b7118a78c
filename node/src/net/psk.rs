//! The private-network layer: libp2p pnet (XSalsa20 under a pre-shared key) plus a key
//! confirmation, so that a PSK mismatch fails at once with a clear error instead of leaving the
//! next protocol to read garbage until the dial times out.
//!
//! After the pnet nonce exchange each side writes [`CONFIRMATION`] through the encrypted
//! stream and reads the other's; with different keys the bytes decrypt to something else. This
//! step is corvid's own: a plain pnet peer (go-libp2p, say) with the same key would not pass it.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::pnet::{PnetConfig, PnetError, PnetOutput, PreSharedKey};

/// Sent by both sides right after the pnet handshake.
pub const CONFIRMATION: &[u8; 16] = b"corvid-psk-ok-v1";

/// Why the private-network handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("pnet handshake: {0}")]
    Pnet(#[from] PnetError),
    #[error("pnet key confirmation: {0}")]
    Io(#[from] std::io::Error),
    /// The other side holds a different key (or none).
    #[error("psk mismatch: the remote node does not use the same --psk")]
    Mismatch,
}

/// Runs the pnet handshake on `socket`, then confirms both sides hold the same key.
pub async fn handshake<S>(psk: PreSharedKey, socket: S) -> Result<PnetOutput<S>, PskError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut out = PnetConfig::new(psk).handshake(socket).await?;
    out.write_all(CONFIRMATION).await?;
    out.flush().await?;
    let mut got = [0u8; CONFIRMATION.len()];
    out.read_exact(&mut got).await?;
    if &got != CONFIRMATION {
        return Err(PskError::Mismatch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use futures::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A connected pair of in-memory duplex streams.
    fn pair() -> (
        impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
        impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    ) {
        let (a, b) = tokio::io::duplex(4096);
        use tokio_util::compat::TokioAsyncReadCompatExt;
        (a.compat(), b.compat())
    }

    #[tokio::test]
    async fn same_key_connects_and_different_keys_are_named() {
        let k1 = PreSharedKey::new([1; 32]);
        let k2 = PreSharedKey::new([2; 32]);

        let (a, b) = pair();
        let (ra, rb) = tokio::join!(handshake(k1, a), handshake(k1, b));
        let (mut a, mut b) = (ra.unwrap(), rb.unwrap());
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        let (a, b) = pair();
        let (ra, rb) = tokio::join!(handshake(k1, a), handshake(k2, b));
        assert!(matches!(ra, Err(PskError::Mismatch)));
        assert!(matches!(rb, Err(PskError::Mismatch)));
    }
}
