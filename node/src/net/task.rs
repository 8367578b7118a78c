//! The task protocol (`/corvid/task/4`): a requester sends a subgraph with its inputs (or a
//! cancel), a worker answers with the outputs.
//!
//! A message is a postcard head behind a u64 length, then the raw little-endian bytes of each
//! tensor the head lists ([`Framed`]). The head's length, and then the total of the tensor
//! sizes it declares, are checked against a cap before anything is allocated; tensors are
//! written straight from their memory and read straight into their final buffers, whose pages
//! are committed only as bytes arrive.
//!
//! On a worker, a request first takes a lease on the node's inbound budget for all of its
//! bytes (waiting while other requests hold it), so requests being received or waiting for a
//! slot never hold more memory than `--max-memory` sets aside for them; the lease ends when
//! the task does. With an executor process, large input tensors are read straight into
//! sealed shared memory, which the executor then reads in place.

use std::io;
use std::sync::Arc;

use corvid_kernels::{DType, Tensor};
use corvid_sdk::wire::{Framed, Request, TaskResponse};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/corvid/task/4");
/// Inbound budget is counted in units of this many bytes.
const LEASE_UNIT: u64 = 4096;
/// Largest task request or response, in bytes.
pub const MAX_TASK_BYTES: u64 = 1 << 30;
/// Largest message head (program, ids, receipt, tensor shapes), in bytes. A program is at
/// most [`corvid_kernels::Budget::MAX_PROGRAM_BYTES`]; the rest is ids and metas. Kept small
/// because decoding a head builds structures some times its size.
const MAX_HEAD_BYTES: u64 = 4 << 20;
/// A request's tensors must arrive at least this fast (on top of the stall allowance), or the
/// stream is dropped and its lease on the inbound budget freed: a peer cannot hold the budget
/// by sending slowly.
const MIN_INBOUND_RATE: u64 = 1 << 20;
/// Most tensors one message carries, and the bookkeeping each is charged.
const MAX_TENSORS: usize = 4096;
const TENSOR_OVERHEAD: u64 = 256;

/// What each task this node sent may answer with: the bytes of the outputs its program makes,
/// by wire task id. The event loop records a task before sending it and forgets it once
/// answered; the codec reads no more of a response than its task's entry allows (a response
/// with tensors for a task not recorded is refused unread).
#[derive(Debug, Default)]
pub struct Answers(std::sync::Mutex<std::collections::HashMap<u64, u64>>);

impl Answers {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Task `task` answers with at most `bytes` of tensors.
    pub fn expect(&self, task: u64, bytes: u64) {
        self.lock().insert(task, bytes);
    }

    /// Task `task` was answered (or will not be).
    pub fn forget(&self, task: u64) {
        self.lock().remove(&task);
    }

    fn allowed(&self, task: Option<u64>) -> u64 {
        task.and_then(|t| self.lock().get(&t).copied()).unwrap_or(0)
    }
}

/// A request as it travels through the node: the message, and on a worker the lease on the
/// inbound budget that its bytes hold until the task is answered.
#[derive(Debug)]
pub struct Envelope {
    pub request: Request,
    pub lease: Option<OwnedSemaphorePermit>,
}

impl From<Request> for Envelope {
    fn from(request: Request) -> Envelope {
        Envelope {
            request,
            lease: None,
        }
    }
}

/// The task codec with explicit size caps (libp2p's stock codecs stop at a few MiB).
#[derive(Clone, Debug)]
pub struct TaskCodec {
    /// Largest request read (a worker's inbound budget caps it further).
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    /// The worker's inbound budget, in [`LEASE_UNIT`]s; `None` on a requester-only node.
    inbound: Option<Arc<Semaphore>>,
    /// Read large request tensors into shared memory (for an executor process).
    shared_memory: bool,
    /// What answers to this node's tasks may carry.
    answers: Arc<Answers>,
    /// How long a request may go without arriving: its head within this, its tensors within
    /// this plus their bytes at [`MIN_INBOUND_RATE`]. `None`: no limit.
    stall: Option<std::time::Duration>,
}

impl Default for TaskCodec {
    fn default() -> Self {
        TaskCodec {
            max_request_bytes: MAX_TASK_BYTES,
            max_response_bytes: MAX_TASK_BYTES,
            inbound: None,
            shared_memory: false,
            answers: Arc::default(),
            stall: None,
        }
    }
}

impl TaskCodec {
    /// Where the event loop records what answers may carry.
    pub fn answers(&self) -> Arc<Answers> {
        self.answers.clone()
    }

    /// Requests that stop arriving are dropped: the head must arrive within `stall`, the
    /// tensors within `stall` plus their size at 1 MiB/s.
    pub fn with_stall(mut self, stall: std::time::Duration) -> TaskCodec {
        self.stall = Some(stall);
        self
    }

    /// A worker's codec: requests lease `inbound_bytes` in all, each at most that much.
    pub fn worker(inbound_bytes: u64, shared_memory: bool) -> TaskCodec {
        let units = (inbound_bytes / LEASE_UNIT).clamp(1, u64::from(u32::MAX));
        TaskCodec {
            max_request_bytes: MAX_TASK_BYTES.min(units * LEASE_UNIT),
            inbound: Some(Arc::new(Semaphore::new(units as usize))),
            shared_memory,
            ..TaskCodec::default()
        }
    }
}

/// How a message's tensors are held while reading it.
#[derive(Default)]
struct Reading<'a> {
    inbound: Option<&'a Arc<Semaphore>>,
    shared_memory: bool,
    /// For responses: what each task may answer with.
    answers: Option<&'a Answers>,
    /// See [`TaskCodec::with_stall`].
    stall: Option<std::time::Duration>,
}

/// `f`, failing with a timeout after `limit` (if any): a sender that stalls gets its stream
/// dropped.
async fn within<T>(
    limit: Option<std::time::Duration>,
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        None => f.await,
        Some(d) => tokio::time::timeout(d, f).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the sender stalled: the task's {what} did not arrive within {d:?}"),
            )
        })?,
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

async fn read_message<T: AsyncRead + Unpin + Send, M: Framed>(
    io: &mut T,
    max: u64,
    how: Reading<'_>,
) -> io::Result<(M, Option<OwnedSemaphorePermit>)> {
    let mut len = [0u8; 8];
    io.read_exact(&mut len).await?;
    let len = u64::from_le_bytes(len);
    if len > max.min(MAX_HEAD_BYTES) {
        return Err(invalid(format!(
            "task message head of {len} bytes is over the limit of {max} bytes"
        )));
    }
    // Grown as bytes arrive: a peer that announces a large head and sends nothing holds
    // nothing.
    let mut head = Vec::new();
    within(
        how.stall,
        "head",
        AsyncReadExt::take(&mut *io, len).read_to_end(&mut head),
    )
    .await
    .map_err(|e| eof(e, "head"))?;
    if head.len() as u64 != len {
        return Err(eof(io::ErrorKind::UnexpectedEof.into(), "head"));
    }
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
    if let Some(answers) = how.answers {
        let task = M::task(&head);
        let tensors: u64 = sizes.iter().map(|&n| 4 * n as u64).sum();
        let allowed = answers.allowed(task);
        if tensors > allowed {
            return Err(invalid(format!(
                "the answer to task {} announces {tensors} bytes of outputs; the task makes \
                 {allowed} (not read)",
                task.map_or_else(|| "?".into(), |t| format!("{t:016x}"))
            )));
        }
    }
    // Wait for room in the inbound budget before allocating any of it.
    let lease = match how.inbound {
        Some(sem) => {
            let units = u32::try_from(total.div_ceil(LEASE_UNIT))
                .map_err(|_| invalid(format!("task message of {total} bytes is too large")))?;
            Some(
                sem.clone()
                    .acquire_many_owned(units)
                    .await
                    .map_err(|_| invalid("the worker is stopping".into()))?,
            )
        }
        None => None,
    };
    // The tensors arrive at a minimum rate, or the stream is dropped (and the lease freed).
    let limit = how
        .stall
        .map(|d| d + std::time::Duration::from_secs(total / MIN_INBOUND_RATE));
    let tensors = within(limit, "tensors", async {
        let mut tensors = Vec::with_capacity(metas.len());
        for (m, n) in metas.into_iter().zip(sizes) {
            #[cfg(target_os = "linux")]
            if how.shared_memory
                && cfg!(target_endian = "little")
                && crate::sandbox::shm::worth_sharing(&m)
            {
                // Out of descriptors or memory maps: the heap will do (the executor then gets a
                // copy).
                match crate::sandbox::shm::ShmMut::new(4 * n) {
                    Ok(mut w) => {
                        io.read_exact(w.bytes_mut())
                            .await
                            .map_err(|e| eof(e, "tensor"))?;
                        tensors.push(Arc::new(
                            crate::sandbox::shm::tensor(&m, w.freeze()).map_err(invalid)?,
                        ));
                        continue;
                    }
                    Err(e) => tracing::debug!(error = %e, "no shared memory for a received tensor"),
                }
            }
            let t = match m.dtype {
                DType::F32 => {
                    let mut v = corvid_kernels::tensor::zeroed::<f32>(n);
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
                    let mut v = corvid_kernels::tensor::zeroed::<i32>(n);
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
        Ok(tensors)
    })
    .await?;
    let msg = M::join(&head, tensors).map_err(|e| invalid(e.to_string()))?;
    Ok((msg, lease))
}

/// Fuzz target: any bytes as a task request, decoded as a worker would (cap 1 MiB), then the
/// worker's first checks on what decoded. Returns, whatever the bytes.
#[doc(hidden)]
pub fn decode_request_for_fuzzing(data: &[u8]) {
    let mut reader = data;
    let decoded = futures::executor::block_on(read_message::<_, Request>(
        &mut reader,
        1 << 20,
        Reading::default(),
    ));
    if let Ok((Request::Run(r), _)) = decoded {
        let _ = r.id_matches();
        let _ = r
            .program
            .validate(&corvid_kernels::Budget::new(16 << 20, 64 << 20, 1 << 30));
    }
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
    type Request = Envelope;
    type Response = TaskResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Envelope>
    where
        T: AsyncRead + Unpin + Send,
    {
        let how = Reading {
            inbound: self.inbound.as_ref(),
            shared_memory: self.shared_memory,
            answers: None,
            stall: self.stall,
        };
        let (request, lease) = read_message(io, self.max_request_bytes, how).await?;
        Ok(Envelope { request, lease })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TaskResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let how = Reading {
            answers: Some(&self.answers),
            ..Reading::default()
        };
        let (r, _) = read_message(io, self.max_response_bytes, how).await?;
        Ok(r)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Envelope,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req.request, self.max_request_bytes).await
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
        write_message(io, &res, self.max_response_bytes).await
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
        // Data, a recipe and a held value: the codec does not check counts against the program.
        let recipe = plan.leaves[1]
            .how()
            .expect("a random leaf is a recipe")
            .clone();
        let inputs = vec![
            Input::Data(plan.leaves[0].get().clone()),
            Input::Recipe(recipe),
            Input::Held,
        ];
        Request::Run(TaskRequest::new(7, [3; 16], sg, inputs))
    }

    #[test]
    fn messages_round_trip_and_oversized_claims_are_refused_before_reading() {
        futures::executor::block_on(async {
            let req = request();
            let mut buf = Vec::new();
            write_message(&mut buf, &req, 1 << 20).await.unwrap();
            let (back, _): (Request, _) =
                read_message(&mut buf.as_slice(), 1 << 20, Reading::default())
                    .await
                    .unwrap();
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
            let (back, _): (TaskResponse, _) =
                read_message(&mut rbuf.as_slice(), 1 << 20, Reading::default())
                    .await
                    .unwrap();
            assert_eq!(back, res);
            // An answer is read only as far as its task's outputs go: 8 bytes expected reads,
            // 4 does not (and nothing of the tensor is consumed); an unknown task's tensors
            // are refused.
            let answers = Answers::default();
            let reading = |a| Reading {
                answers: Some(a),
                ..Reading::default()
            };
            answers.expect(7, 8);
            read_message::<_, TaskResponse>(&mut rbuf.as_slice(), 1 << 20, reading(&answers))
                .await
                .unwrap();
            answers.expect(7, 4);
            let mut rest = rbuf.as_slice();
            let e = read_message::<_, TaskResponse>(&mut rest, 1 << 20, reading(&answers))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("announces 8 bytes"), "{e}");
            assert_eq!(rest.len(), 8, "the tensor was left unread");
            answers.forget(7);
            assert!(
                read_message::<_, TaskResponse>(&mut rbuf.as_slice(), 1 << 20, reading(&answers))
                    .await
                    .is_err()
            );
            // A head claiming 2^40 bytes is refused on the length alone.
            let mut lying = (1u64 << 40).to_le_bytes().to_vec();
            lying.extend([0u8; 16]);
            let e =
                read_message::<_, TaskResponse>(&mut lying.as_slice(), 1 << 30, Reading::default())
                    .await
                    .unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            // A head declaring tensors over the cap is refused before they are read.
            let e = read_message::<_, Request>(
                &mut buf.as_slice(),
                buf.len() as u64 - 9,
                Reading::default(),
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            // A truncated message is an error, not a hang or a panic.
            let e =
                read_message::<_, Request>(&mut &buf[..buf.len() - 1], 1 << 20, Reading::default())
                    .await
                    .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        });
    }

    /// A request carrying one `side × side` tensor.
    fn big_request(side: usize) -> Vec<u8> {
        let sg = corvid_sdk::plan::Subgraph {
            id: corvid_sdk::SubgraphId([0; 32]),
            program: corvid_kernels::Program::single(
                corvid_kernels::Op::Unary(corvid_kernels::UnaryOp::Neg),
                vec![corvid_kernels::TensorMeta::f32([side, side])],
            ),
            inputs: vec![],
            input_ids: vec![corvid_sdk::ValueId([1; 32])],
            output_ids: vec![corvid_sdk::ValueId([2; 32])],
            cost: Default::default(),
        };
        let t = Arc::new(Tensor::random_uniform([side, side], -1.0, 1.0, 3));
        let req = Request::Run(TaskRequest::new(1, [0; 16], &sg, vec![Input::Data(t)]));
        let mut buf = Vec::new();
        futures::executor::block_on(write_message(&mut buf, &req, 1 << 30)).unwrap();
        buf
    }

    #[test]
    fn requests_wait_for_room_in_the_inbound_budget_and_land_in_shared_memory() {
        use futures::FutureExt;
        let buf = big_request(256); // 256 KiB of tensor
        let codec = TaskCodec::worker(400 << 10, true);
        let how = || Reading {
            inbound: codec.inbound.as_ref(),
            shared_memory: true,
            answers: None,
            stall: None,
        };
        futures::executor::block_on(async {
            let (first, lease): (Request, _) =
                read_message(&mut buf.as_slice(), codec.max_request_bytes, how())
                    .await
                    .unwrap();
            let Request::Run(r) = &first else { panic!() };
            let Input::Data(t) = &r.inputs[0] else {
                panic!()
            };
            assert!(
                crate::sandbox::shm::of(t).is_some(),
                "a large input is read into shared memory"
            );
            // The budget holds one such request: a second waits until the first is done.
            let mut reader = buf.as_slice();
            let mut second = Box::pin(read_message::<_, Request>(
                &mut reader,
                codec.max_request_bytes,
                how(),
            ));
            assert!(
                (&mut second).now_or_never().is_none(),
                "the second request waits"
            );
            drop(lease);
            let (again, _) = second.await.unwrap();
            assert_eq!(again, first);
        });
        // One request over the whole budget is refused outright.
        let small = TaskCodec::worker(128 << 10, false);
        let e = futures::executor::block_on(read_message::<_, Request>(
            &mut buf.as_slice(),
            small.max_request_bytes,
            Reading {
                inbound: small.inbound.as_ref(),
                shared_memory: false,
                answers: None,
                stall: None,
            },
        ))
        .unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    /// Never sends another byte.
    struct Silent;

    impl AsyncRead for Silent {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_request_that_stops_arriving_is_dropped_and_frees_its_lease() {
        let buf = big_request(256); // 256 KiB of tensor; the budget holds one such request
        let codec =
            TaskCodec::worker(400 << 10, false).with_stall(std::time::Duration::from_millis(200));
        let how = || Reading {
            inbound: codec.inbound.as_ref(),
            shared_memory: false,
            answers: None,
            stall: codec.stall,
        };
        // A sender that takes the lease with its head and half the tensor, then goes silent.
        let mut stalled = AsyncReadExt::chain(&buf[..buf.len() - (128 << 10)], Silent);
        let budget = codec.inbound.clone().unwrap();
        let all = budget.available_permits();
        let honest = async {
            // Once the silent sender holds its lease.
            while budget.available_permits() == all {
                tokio::task::yield_now().await;
            }
            read_message::<_, Request>(&mut buf.as_slice(), codec.max_request_bytes, how()).await
        };
        let both = async {
            tokio::join!(
                read_message::<_, Request>(&mut stalled, codec.max_request_bytes, how()),
                honest
            )
        };
        let (stalled, honest) = tokio::time::timeout(std::time::Duration::from_secs(30), both)
            .await
            .expect("the silent sender held the budget");
        let e = stalled.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("stalled"), "{e}");
        honest.expect("the honest request got the budget once the silent one was dropped");
    }
}
