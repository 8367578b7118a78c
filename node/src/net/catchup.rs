//! `/corvid/adverts/1`: a node that joins asks the first peer it meets for the signed adverts
//! it holds, so that it knows the swarm at once instead of as each peer next advertises (every
//! 30 s). Each advert is checked as if it had come by gossip (signature, freshness, sanity) and
//! admitted by the same rules: one from a peer never connected to is held while that peer is
//! dialled (at the addresses it advertises), within a quota per answering peer.

use std::io;
use std::sync::Arc;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use serde::{Deserialize, Serialize};

use crate::advert::MAX_ADVERT_BYTES;

pub const CATCHUP_PROTOCOL: StreamProtocol = StreamProtocol::new("/corvid/adverts/1");
/// Adverts in one answer at most (the most recently heard).
pub const MAX_ADVERTS: usize = 64;
/// An answer's size at most: that many adverts at their cap, with their length prefixes.
const MAX_ANSWER_BYTES: u64 = (MAX_ADVERTS * (MAX_ADVERT_BYTES + 8) + 16) as u64;

/// "Send me the adverts you hold."
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask;

/// Signed adverts, as they travelled by gossip.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adverts(pub Vec<serde_bytes::ByteBuf>);

impl Adverts {
    pub fn new(signed: impl IntoIterator<Item = Arc<[u8]>>) -> Adverts {
        Adverts(
            signed
                .into_iter()
                .take(MAX_ADVERTS)
                .map(|a| serde_bytes::ByteBuf::from(a.to_vec()))
                .collect(),
        )
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Ask;
    type Response = Adverts;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Ask>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(16).read_to_end(&mut buf).await?;
        postcard::from_bytes(&buf).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Adverts>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(MAX_ANSWER_BYTES + 1).read_to_end(&mut buf).await?;
        if buf.len() as u64 > MAX_ANSWER_BYTES {
            return Err(invalid(format!(
                "advert answer over {MAX_ANSWER_BYTES} bytes"
            )));
        }
        let answer: Adverts = postcard::from_bytes(&buf).map_err(invalid)?;
        if answer.0.len() > MAX_ADVERTS {
            return Err(invalid(format!("more than {MAX_ADVERTS} adverts")));
        }
        Ok(answer)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Ask) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&postcard::to_stdvec(&req).map_err(invalid)?)
            .await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Adverts,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&postcard::to_stdvec(&res).map_err(invalid)?)
            .await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use request_response::Codec as _;

    #[tokio::test]
    async fn answers_round_trip_and_oversized_ones_are_refused() {
        let p = CATCHUP_PROTOCOL;
        let answer = Adverts::new((0..3).map(|i| Arc::from(vec![i as u8; 100])));
        let mut wire = futures::io::Cursor::new(Vec::new());
        Codec
            .write_response(&p, &mut wire, answer.clone())
            .await
            .unwrap();
        let mut read = futures::io::Cursor::new(wire.into_inner());
        assert_eq!(Codec.read_response(&p, &mut read).await.unwrap(), answer);

        let too_many = Adverts((0..MAX_ADVERTS + 1).map(|_| vec![1u8].into()).collect());
        let mut wire = futures::io::Cursor::new(Vec::new());
        Codec.write_response(&p, &mut wire, too_many).await.unwrap();
        let mut read = futures::io::Cursor::new(wire.into_inner());
        assert!(Codec.read_response(&p, &mut read).await.is_err());

        let mut huge = futures::io::Cursor::new(vec![0u8; MAX_ANSWER_BYTES as usize + 10]);
        assert!(Codec.read_response(&p, &mut huge).await.is_err());
    }
}
