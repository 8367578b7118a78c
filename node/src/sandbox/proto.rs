//! What the node and its executor process say to each other over their Unix socket.
//!
//! A frame is a 4-byte length, a kind byte and a postcard body. Descriptors of shared-memory
//! tensors ride along as `SCM_RIGHTS` on the frame's first byte; a message with more of them
//! than one frame carries is preceded by descriptor-only frames. The receiver queues every
//! descriptor it gets, and a message's [`Slot::Shared`] entries take them from the queue in
//! order.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use corvid_kernels::{Budget, ContentId, DeterminismClass, Program, Tensor, TensorMeta};
use corvid_sdk::wire::TaskError;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest frame body. Programs are at most a few MiB; big tensors travel as descriptors.
pub const MAX_FRAME: usize = 64 << 20;
/// Descriptors per frame (the kernel takes at most 253).
const FDS_PER_FRAME: usize = 250;
const KIND_MESSAGE: u8 = 0;
const KIND_FDS: u8 = 1;

/// From the node to its executor.
// One per task, moved once: boxing the run would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum ToExecutor {
    /// Run `program` on `inputs` within `budget`, stopping after `deadline`. For each output
    /// whose `lent` entry is set, a buffer to write it into follows the inputs' descriptors.
    Run {
        id: u64,
        program: Program,
        inputs: Vec<Slot>,
        lent: Vec<bool>,
        /// The node's id of each buffer whose descriptor comes with the message, in order:
        /// the executor keeps its mapping of a buffer and reuses it when the id comes again.
        buffers: Vec<u64>,
        /// Buffers the node destroyed: their mappings must go.
        forget: Vec<u64>,
        budget: Budget,
        deadline: Duration,
    },
    /// Stop task `id` at its next check.
    Cancel { id: u64 },
}

/// From the executor to the node.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromExecutor {
    /// Sent once, when the executor is confined and its backend open.
    Ready(Ready),
    /// `Slot::Shared` outputs were written into the buffers the node lent.
    Done {
        id: u64,
        outputs: Vec<Slot>,
        /// Content id of every op's output, in program order.
        hashes: Vec<ContentId>,
    },
    Failed {
        id: u64,
        error: TaskError,
    },
}

/// What the executor runs on and which protections it has.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ready {
    pub class: DeterminismClass,
    pub backend: String,
    pub confinement: Confinement,
}

/// How far Landlock confines the executor's filesystem access. Travels (and shows in
/// `GET /status`) as its text, "fully enforced" etc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Landlock {
    FullyEnforced,
    /// An older kernel enforces only part of the rules.
    PartiallyEnforced,
    /// Not enforced, and why (no Landlock in this kernel, or the error).
    NotEnforced(String),
}

impl From<Landlock> for String {
    fn from(l: Landlock) -> String {
        l.to_string()
    }
}

impl From<String> for Landlock {
    fn from(s: String) -> Landlock {
        if s == Landlock::FullyEnforced.to_string() {
            Landlock::FullyEnforced
        } else if s == Landlock::PartiallyEnforced.to_string() {
            Landlock::PartiallyEnforced
        } else {
            Landlock::NotEnforced(s.strip_prefix("not enforced: ").unwrap_or(&s).to_string())
        }
    }
}

impl Default for Landlock {
    fn default() -> Self {
        Landlock::NotEnforced("not reported".into())
    }
}

impl std::fmt::Display for Landlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Landlock::FullyEnforced => f.write_str("fully enforced"),
            Landlock::PartiallyEnforced => f.write_str("partially enforced (an older kernel)"),
            Landlock::NotEnforced(why) => write!(f, "not enforced: {why}"),
        }
    }
}

/// What confines the executor, as it found out for itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Confinement {
    /// Filesystem confinement (Landlock).
    pub landlock: Landlock,
    /// Whether the seccomp filter (no exec, no new sockets, no ptrace, no raising limits) is on.
    pub seccomp: bool,
    /// Address-space limit in bytes, if one is set.
    pub address_space: Option<u64>,
    /// Lifetime CPU-time limit in seconds.
    pub cpu_seconds: Option<u64>,
    /// Whether files the executor must not read (the identity key) could still be opened.
    pub forbidden_readable: Vec<String>,
}

/// One tensor of a message: inline, or the next shared-memory descriptor.
#[derive(Debug, Serialize, Deserialize)]
pub enum Slot {
    Inline(Tensor),
    Shared(TensorMeta),
}

/// Sends `msg` with `fds` attached.
pub fn send<M: Serialize>(sock: &UnixStream, msg: &M, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = postcard::to_allocvec(msg).map_err(|e| io::Error::other(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "message of {} bytes is over the {MAX_FRAME}-byte frame limit",
            body.len()
        )));
    }
    let mut chunks = fds.chunks(FDS_PER_FRAME).peekable();
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_some() {
            frame(sock, KIND_FDS, &[], chunk)?;
        } else {
            return frame(sock, KIND_MESSAGE, &body, chunk);
        }
    }
    frame(sock, KIND_MESSAGE, &body, &[])
}

fn frame(sock: &UnixStream, kind: u8, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    head[4] = kind;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_FRAME))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one frame"));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&head), IoSlice::new(body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; the rest is plain bytes.
    let mut w = sock;
    if sent < head.len() {
        w.write_all(&head[sent..])?;
        w.write_all(body)
    } else {
        w.write_all(&body[sent - head.len()..])
    }
}

/// Reads one message (queueing the descriptors that came with it), or `None` at a clean end
/// of stream.
pub fn recv<M: DeserializeOwned>(
    sock: &UnixStream,
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<Option<M>> {
    loop {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            let mut space =
                vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_FRAME))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let r = rustix::net::recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut head[got..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            if r.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::other(
                    "descriptors were dropped (control data truncated)",
                ));
            }
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = msg {
                    fds.extend(received);
                }
            }
            if r.bytes == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            got += r.bytes;
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::other(format!(
                "frame of {len} bytes is over the {MAX_FRAME}-byte limit"
            )));
        }
        let mut body = vec![0u8; len];
        let mut r = sock;
        r.read_exact(&mut body)?;
        if head[4] == KIND_FDS {
            continue;
        }
        return postcard::from_bytes(&body)
            .map(Some)
            .map_err(|e| io::Error::other(e.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::shm;

    /// The status JSON shows Landlock's state as text, and reads it back to the same value.
    #[test]
    fn landlock_travels_as_its_text() {
        for l in [
            Landlock::FullyEnforced,
            Landlock::PartiallyEnforced,
            Landlock::NotEnforced("the kernel has no landlock".into()),
        ] {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(json, format!("\"{l}\""));
            assert_eq!(serde_json::from_str::<Landlock>(&json).unwrap(), l);
        }
    }

    #[test]
    fn messages_carry_hundreds_of_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let tensors: Vec<Tensor> = (0..600).map(|i| Tensor::full([3], i as f32)).collect();
        let shms: Vec<shm::Shm> = tensors.iter().map(|t| shm::copy(t).unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = shms.iter().map(|s| s.fd().unwrap()).collect();
        let msg = FromExecutor::Done {
            id: 9,
            outputs: tensors.iter().map(|t| Slot::Shared(t.meta())).collect(),
            hashes: vec![],
        };
        let mut queue = VecDeque::new();
        let got: FromExecutor = std::thread::scope(|s| {
            let sender = s.spawn(|| send(&a, &msg, &fds));
            let got = recv(&b, &mut queue).unwrap().unwrap();
            sender.join().unwrap().unwrap();
            got
        });
        let FromExecutor::Done { id: 9, outputs, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!((outputs.len(), queue.len()), (600, 600));
        for (i, fd) in queue.into_iter().enumerate() {
            let map = std::sync::Arc::new(shm::Mapping::read(fd).unwrap());
            let t = shm::tensor(
                &Tensor::full([3], 0.0).meta(),
                shm::View::new(map, 12).unwrap(),
            )
            .unwrap();
            assert_eq!(t.as_f32().unwrap(), &[i as f32; 3]);
        }
    }
}
