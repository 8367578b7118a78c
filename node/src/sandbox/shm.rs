//! Tensors in sealed shared memory, so the node and its executor process read the same pages
//! instead of copying them through a pipe.
//!
//! A buffer is a `memfd`: written once through a writable mapping, then sealed against
//! shrinking, growing and writing and mapped read-only. Whoever receives its descriptor checks
//! the seals and the size before mapping it, so the other side can neither change the data
//! under a reader nor truncate the file (which would turn a read into a SIGBUS).

use std::any::Any;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use corvid_kernels::tensor::SharedWords;
use corvid_kernels::{DType, Tensor, TensorMeta};
use memmap2::{Mmap, MmapMut, MmapOptions};
use rustix::fs::{MemfdFlags, SealFlags};

/// Tensors at least this large travel as shared memory; smaller ones are cheaper inline.
pub const SHM_MIN_BYTES: u64 = 64 << 10;

/// The seals a buffer must carry before anyone maps it.
const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::WRITE)
    .union(SealFlags::SEAL);

/// Why shared memory could not be made or taken.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("shared memory: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("shared memory of {have} bytes cannot hold {want} bytes")]
    Short { have: u64, want: u64 },
    #[error("shared memory is not sealed against change (seals {0:?})")]
    Unsealed(SealFlags),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ShmError {
    move |source| ShmError::Io { what, source }
}

/// A buffer being filled. [`ShmWriter::seal`] turns it into a read-only [`Shm`].
#[derive(Debug)]
pub struct ShmWriter {
    fd: OwnedFd,
    map: MmapMut,
    len: usize,
}

impl ShmWriter {
    /// A zeroed buffer of `len` bytes (pages are committed as they are written).
    pub fn new(len: usize) -> Result<ShmWriter, ShmError> {
        let fd = rustix::fs::memfd_create(
            "corvid-tensor",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| io("memfd_create")(e.into()))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(|e| io("ftruncate")(e.into()))?;
        #[allow(unsafe_code)]
        // SAFETY: the memfd was created just above and is only written through this mapping
        // until it is sealed; nothing else can shrink it (only we hold it). memmap2 maps an
        // empty file as an empty slice.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&fd) }.map_err(io("mmap"))?;
        Ok(ShmWriter { fd, map, len })
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }

    /// Seals the buffer and maps it read-only.
    pub fn seal(self) -> Result<Shm, ShmError> {
        let ShmWriter { fd, map, len } = self;
        // Write seals need every writable mapping gone.
        drop(map);
        rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(|e| io("seal")(e.into()))?;
        Shm::map(fd, len)
    }
}

/// A sealed, read-only shared buffer and its descriptor (to hand to another process).
pub struct Shm {
    fd: OwnedFd,
    map: Mmap,
    len: usize,
}

impl fmt::Debug for Shm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shm({} bytes)", self.len)
    }
}

impl Shm {
    /// Maps a buffer someone else made: refuses it unless it is sealed against change and
    /// holds at least `len` bytes.
    pub fn map(fd: OwnedFd, len: usize) -> Result<Shm, ShmError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| io("get seals")(e.into()))?;
        if !seals.contains(SEALS) {
            return Err(ShmError::Unsealed(seals));
        }
        let have = rustix::fs::fstat(&fd)
            .map_err(|e| io("fstat")(e.into()))?
            .st_size as u64;
        if have < len as u64 {
            return Err(ShmError::Short {
                have,
                want: len as u64,
            });
        }
        #[allow(unsafe_code)]
        // SAFETY: the file is sealed against shrinking and writing (checked above) and holds
        // at least `len` bytes, so the mapping stays valid and never changes.
        let map = unsafe { MmapOptions::new().len(len).populate().map(&fd) }.map_err(io("mmap"))?;
        Ok(Shm { fd, map, len })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl SharedWords for Shm {
    fn words(&self) -> &[u32] {
        // Mappings are page-aligned, and lengths are whole words (checked by `tensor`).
        bytemuck::cast_slice(&self.map[..self.len - self.len % 4])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A tensor over a sealed buffer, checking the buffer's length against `meta`.
pub fn tensor(meta: &TensorMeta, shm: Shm) -> Result<Tensor, String> {
    let want = meta.bytes();
    if shm.len() as u64 != want {
        return Err(format!(
            "a {meta} tensor is {want} bytes, its shared memory {}",
            shm.len()
        ));
    }
    Tensor::from_shared(meta.dtype, meta.shape.clone(), Arc::new(shm)).map_err(|e| e.to_string())
}

/// The sealed buffer a tensor already lives in, if it does.
pub fn of(t: &Tensor) -> Option<&Shm> {
    t.shared()?.as_any().downcast_ref::<Shm>()
}

/// A copy of `t` in a sealed buffer (for a tensor that was in a `Vec`).
pub fn copy(t: &Tensor) -> Result<Shm, ShmError> {
    let bytes: &[u8] = bytemuck::cast_slice(t.words());
    let mut w = ShmWriter::new(bytes.len())?;
    w.bytes_mut().copy_from_slice(bytes);
    w.seal()
}

/// A zeroed tensor of `meta` in a writable buffer, for a reader to fill before sealing.
pub fn writer_for(meta: &TensorMeta) -> Result<ShmWriter, ShmError> {
    ShmWriter::new(meta.bytes() as usize)
}

/// Whether `t`'s dtype and size make it worth sharing rather than inlining.
pub fn worth_sharing(meta: &TensorMeta) -> bool {
    meta.bytes() >= SHM_MIN_BYTES && matches!(meta.dtype, DType::F32 | DType::I32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_buffers_round_trip_and_unsealed_ones_are_refused() {
        let t = Tensor::random_uniform([300, 70], -1.0, 1.0, 5);
        let shm = copy(&t).unwrap();
        let back = tensor(&t.meta(), shm).unwrap();
        assert_eq!(back, t);
        assert!(of(&back).is_some());
        // The same descriptor mapped again (as the other process would) reads the same.
        let dup = of(&back).unwrap().fd().try_clone_to_owned().unwrap();
        let again = tensor(&t.meta(), Shm::map(dup, t.meta().bytes() as usize).unwrap()).unwrap();
        assert_eq!(again, t);
        // Writing through the descriptor fails: it is sealed.
        let fd = of(&back).unwrap().fd().try_clone_to_owned().unwrap();
        assert!(rustix::io::write(&fd, &[1, 2, 3]).is_err());

        // A memfd without seals is refused, and so is one shorter than claimed.
        let raw = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&raw, 4096).unwrap();
        assert!(matches!(Shm::map(raw, 4096), Err(ShmError::Unsealed(_))));
        let w = ShmWriter::new(16).unwrap();
        let sealed = w.seal().unwrap();
        let dup = sealed.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            Shm::map(dup, 4096),
            Err(ShmError::Short { have: 16, .. })
        ));
    }
}
