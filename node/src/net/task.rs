//! The task protocol (`/corvid/task/2`): a requester sends a subgraph with its inputs, a worker
//! answers with the outputs.
//!
//! A message is a postcard head behind a u64 length, then the raw little-endian bytes of each
//! tensor the head lists ([`Framed`]). The head's length, and then the total of the tensor
//! sizes it declares, are checked against a cap before anything is allocated; tensors are
//! written straight from their memory and read straight into their final buffers, whose pages
//! are committed only as bytes arrive.

use std::io;
use std::sync::Arc;

use corvid_kernels::{DType, Tensor};
use corvid_sdk::wire::{Framed, Request, TaskResponse};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/corvid/task/3");
/// Largest task request or response, in bytes.
pub const MAX_TASK_BYTES: u64 = 1 << 30;
/// Largest message head (program, ids, receipt, tensor shapes), in bytes. A program is at
/// most [`corvid_kernels::Budget::MAX_PROGRAM_BYTES`]; the rest is ids and metas. Kept small
/// because decoding a head builds structures some times its size.
const MAX_HEAD_BYTES: u64 = 4 << 20;
/// Most tensors one message carries, and the bookkeeping each is charged.
const MAX_TENSORS: usize = 4096;
const TENSOR_OVERHEAD: u64 = 256;

/// The task codec with an explicit size cap (libp2p's stock codecs stop at a few MiB).
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

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn read_message<T: AsyncRead + Unpin + Send, M: Framed>(
    io: &mut T,
    max: u64,
) -> io::Result<M> {
    let mut len = [0u8; 8];
    io.read_exact(&mut len).await?;
    let len = u64::from_le_bytes(len);
    if len > max.min(MAX_HEAD_BYTES) {
        return Err(invalid(format!(
            "task message head of {len} bytes is over the limit of {max} bytes"
        )));
    }
    let mut head = vec![0u8; len as usize];
    io.read_exact(&mut head).await.map_err(|e| eof(e, "head"))?;
    let metas = M::tensor_metas(&head).map_err(|e| invalid(e.to_string()))?;
    if metas.len() > MAX_TENSORS {
        return Err(invalid(format!(
            "task message carries {} tensors, over the limit of {MAX_TENSORS}",
            metas.len()
        )));
    }
    // Every size is checked before any tensor is allocated.
    let mut total = len;
    let mut sizes = Vec::with_capacity(metas.len());
    for m in &metas {
        let numel = m
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| invalid(format!("tensor of shape {:?} is too large", m.shape)))?;
        total = total.saturating_add(4 * numel as u64 + TENSOR_OVERHEAD);
        sizes.push(numel);
    }
    if total > max {
        return Err(invalid(format!(
            "task message of {total} bytes is over the limit of {max} bytes"
        )));
    }
    let mut tensors = Vec::with_capacity(metas.len());
    for (m, n) in metas.into_iter().zip(sizes) {
        let t = match m.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                io.read_exact(bytemuck::cast_slice_mut(&mut v))
                    .await
                    .map_err(|e| eof(e, "tensor"))?;
                if cfg!(target_endian = "big") {
                    v.iter_mut()
                        .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
                Tensor::from_f32(m.shape, v)
            }
            DType::I32 => {
                let mut v = vec![0i32; n];
                io.read_exact(bytemuck::cast_slice_mut(&mut v))
                    .await
                    .map_err(|e| eof(e, "tensor"))?;
                if cfg!(target_endian = "big") {
                    v.iter_mut().for_each(|x| *x = i32::from_le(*x));
                }
                Tensor::from_i32(m.shape, v)
            }
        }
        .map_err(|e| invalid(e.to_string()))?;
        tensors.push(Arc::new(t));
    }
    M::join(&head, tensors).map_err(|e| invalid(e.to_string()))
}

fn eof(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("task message ended inside its {what}"),
        )
    } else {
        e
    }
}

async fn write_message<T: AsyncWrite + Unpin + Send, M: Framed>(
    io: &mut T,
    msg: &M,
    max: u64,
) -> io::Result<()> {
    let (head, tensors) = msg
        .split()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let total = head.len() as u64 + tensors.iter().map(|t| t.meta().bytes()).sum::<u64>();
    if total > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("task message of {total} bytes is over the limit of {max} bytes"),
        ));
    }
    io.write_all(&(head.len() as u64).to_le_bytes()).await?;
    io.write_all(&head).await?;
    for t in &tensors {
        if cfg!(target_endian = "little") {
            io.write_all(bytemuck::cast_slice(t.words())).await?;
        } else {
            io.write_all(&t.to_le_bytes()).await?;
        }
    }
    io.flush().await
}

impl libp2p::request_response::Codec for TaskCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = TaskResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TaskResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req, self.max_bytes).await
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
        write_message(io, &res, self.max_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use corvid_sdk::wire::{Input, Receipt, TaskRequest};
    use corvid_sdk::{Graph, LocalExecutor};

    use super::*;

    fn request() -> Request {
        let exec = Arc::new(LocalExecutor::new(corvid_kernels::Backend::Cpu(
            corvid_kernels::CpuBackend::new(),
        )));
        let g = Graph::new("t").with_executor(exec);
        let c = g
            .random(&[3, 5], -1.0, 1.0, 1)
            .matmul(&g.random(&[5, 2], -1.0, 1.0, 2))
            .unwrap();
        let plan = g.plan(&[&c]).unwrap();
        let sg = &plan.subgraphs[0];
        let inputs = vec![Input::Data(plan.leaves[0].clone()), Input::Held];
        Request::Run(TaskRequest::new(7, [3; 16], sg, inputs))
    }

    #[test]
    fn messages_round_trip_and_oversized_claims_are_refused_before_reading() {
        futures::executor::block_on(async {
            let req = request();
            let mut buf = Vec::new();
            write_message(&mut buf, &req, 1 << 20).await.unwrap();
            let back: Request = read_message(&mut buf.as_slice(), 1 << 20).await.unwrap();
            assert_eq!(back, req);
            let res = TaskResponse::Done {
                task: 7,
                outputs: vec![Arc::new(Tensor::from_i32([2], vec![-1, 9]).unwrap())],
                compute_micros: 3,
                receipt: Receipt {
                    task: [1; 32],
                    nonce: [2; 16],
                    outputs: vec![],
                    op_hashes: vec![],
                    class: [3; 32],
                    class_name: "cpu".into(),
                },
                signature: vec![4; 64],
                signer: vec![5; 36],
            };
            let mut rbuf = Vec::new();
            write_message(&mut rbuf, &res, 1 << 20).await.unwrap();
            let back: TaskResponse = read_message(&mut rbuf.as_slice(), 1 << 20).await.unwrap();
            assert_eq!(back, res);
            // A head claiming 2^40 bytes is refused on the length alone.
            let mut lying = (1u64 << 40).to_le_bytes().to_vec();
            lying.extend([0u8; 16]);
            let e = read_message::<_, TaskResponse>(&mut lying.as_slice(), 1 << 30)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            // A head declaring tensors over the cap is refused before they are read.
            let e = read_message::<_, Request>(&mut buf.as_slice(), buf.len() as u64 - 9)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            // A truncated message is an error, not a hang or a panic.
            let e = read_message::<_, Request>(&mut &buf[..buf.len() - 1], 1 << 20)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
