//! The task protocol (`/corvid/task/2`): a requester sends a subgraph with its inputs, a worker
//! answers with the outputs. Messages are postcard frames behind a u64 length, checked against
//! a cap before anything is allocated, and read as they arrive rather than into a buffer sized
//! by the sender's claim.

use std::io;

use corvid_sdk::wire::{TaskRequest, TaskResponse};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/corvid/task/2");
/// Largest task request or response, in bytes.
pub const MAX_TASK_BYTES: u64 = 1 << 30;

/// Postcard codec with an explicit size cap (libp2p's stock codecs stop at a few MiB).
#[derive(Clone, Debug)]
pub struct TaskCodec {
    pub max_bytes: u64,
}

impl Default for TaskCodec {
    fn default() -> Self {
        TaskCodec {
            max_bytes: MAX_TASK_BYTES,
        }
    }
}

async fn read_frame<T: AsyncRead + Unpin + Send, M: DeserializeOwned>(
    io: &mut T,
    max: u64,
) -> io::Result<M> {
    let mut len = [0u8; 8];
    io.read_exact(&mut len).await?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("task message of {len} bytes is over the limit of {max} bytes"),
        ));
    }
    let mut buf = Vec::new();
    (&mut *io).take(len).read_to_end(&mut buf).await?;
    if buf.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("task message ended after {} of {len} bytes", buf.len()),
        ));
    }
    postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T: AsyncWrite + Unpin + Send, M: Serialize>(
    io: &mut T,
    msg: &M,
    max: u64,
) -> io::Result<()> {
    let bytes =
        postcard::to_allocvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "task message of {} bytes is over the limit of {max} bytes",
                bytes.len()
            ),
        ));
    }
    io.write_all(&(bytes.len() as u64).to_le_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

impl libp2p::request_response::Codec for TaskCodec {
    type Protocol = StreamProtocol;
    type Request = TaskRequest;
    type Response = TaskResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TaskRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TaskResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: TaskRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: TaskResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_claims_over_the_cap_are_refused_before_reading() {
        futures::executor::block_on(async {
            let res = TaskResponse::Failed {
                task: 7,
                error: "no".into(),
            };
            let mut buf = Vec::new();
            write_frame(&mut buf, &res, 1024).await.unwrap();
            let back: TaskResponse = read_frame(&mut buf.as_slice(), 1024).await.unwrap();
            assert_eq!(back, res);
            // A sender claiming 2^40 bytes is refused on the length alone.
            let mut lying = (1u64 << 40).to_le_bytes().to_vec();
            lying.extend([0u8; 16]);
            let e = read_frame::<_, TaskResponse>(&mut lying.as_slice(), 1 << 30)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            // A truncated frame is an error, not a hang or a panic.
            let e = read_frame::<_, TaskResponse>(&mut &buf[..buf.len() - 1], 1024)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
