//! Tensors in shared memory, so the node and its executor process read the same pages instead
//! of copying them through a pipe.
//!
//! The node owns every buffer. A buffer is a `memfd` sealed against shrinking and growing (so
//! no one can truncate it under a reader and turn a read into a SIGBUS), mapped in the node
//! once and kept in a pool when its tensor is dropped: fresh shared pages cost a fault and a
//! zeroing each (about four times a plain copy), reused ones cost nothing. Large inputs are
//! read off the network straight into a pooled buffer; the executor gets a read-only
//! descriptor to it (it cannot write through one). For each large output the node lends a
//! buffer the executor writes into. The executor checks the seals and sizes of whatever it is
//! given before mapping it ([`Mapping`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use corvid_kernels::tensor::SharedWords;
use corvid_kernels::{DType, Tensor, TensorMeta};
use memmap2::{Mmap, MmapMut, MmapOptions};
use rustix::fs::{MemfdFlags, OFlags, SealFlags};

/// Tensors at least this large travel as shared memory; smaller ones are cheaper inline.
pub const SHM_MIN_BYTES: u64 = 64 << 10;

/// The seals every buffer carries: its size never changes.
const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Bytes of idle buffers kept for reuse unless [`set_pool_bytes`] says otherwise.
const DEFAULT_POOL_BYTES: u64 = 256 << 20;

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
    #[error("shared memory is not sealed against resizing (seals {0:?})")]
    Unsealed(SealFlags),
}

fn io(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |e| ShmError::Io {
        what,
        source: e.into(),
    }
}

/// One memfd, mapped read-write in the node, sized to a power of two.
struct Buffer {
    /// Unique in this process: the executor keeps its mapping of the buffer under it.
    id: u64,
    fd: OwnedFd,
    /// The same file opened read-only, made on first use: what the executor gets.
    read_only: OnceLock<OwnedFd>,
    map: MmapMut,
}

impl Buffer {
    fn new(capacity: usize) -> Result<Buffer, ShmError> {
        let fd = rustix::fs::memfd_create(
            "corvid-tensor",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(io("memfd_create"))?;
        rustix::fs::ftruncate(&fd, capacity as u64).map_err(io("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(io("seal"))?;
        #[allow(unsafe_code)]
        // SAFETY: the memfd was made just above and sealed against resizing, so the mapping
        // stays backed; only the node and the executor it lends it to write to it.
        let map =
            unsafe { MmapOptions::new().len(capacity).map_mut(&fd) }.map_err(|e| ShmError::Io {
                what: "mmap",
                source: e,
            })?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Buffer {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            fd,
            read_only: OnceLock::new(),
            map,
        })
    }

    fn capacity(&self) -> usize {
        self.map.len()
    }

    fn read_only(&self) -> Result<BorrowedFd<'_>, ShmError> {
        if let Some(fd) = self.read_only.get() {
            return Ok(fd.as_fd());
        }
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(io("reopen read-only"))?;
        Ok(self.read_only.get_or_init(|| fd).as_fd())
    }
}

/// Idle buffers by capacity.
struct Pool {
    free: BTreeMap<usize, Vec<Buffer>>,
    bytes: u64,
    cap: u64,
    /// Ids of buffers destroyed since the executor was last told (it then unmaps them).
    gone: Vec<u64>,
}

impl Pool {
    fn destroy(&mut self, b: Buffer) {
        // Bounded: a node that never runs a task again keeps at most this many ids.
        if self.gone.len() < 1 << 16 {
            self.gone.push(b.id);
        }
    }
}

/// Ids of buffers destroyed since the last call: mappings of them the executor keeps must go.
pub fn take_gone() -> Vec<u64> {
    std::mem::take(&mut pool().lock().unwrap_or_else(|e| e.into_inner()).gone)
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        Mutex::new(Pool {
            free: BTreeMap::new(),
            bytes: 0,
            cap: DEFAULT_POOL_BYTES,
            gone: Vec::new(),
        })
    })
}

/// Keeps at most `bytes` of idle buffers for reuse (the node sets it from its memory budget).
pub fn set_pool_bytes(bytes: u64) {
    let mut guard = pool().lock().unwrap_or_else(|e| e.into_inner());
    let p = &mut *guard;
    p.cap = bytes;
    while p.bytes > p.cap {
        let Some(mut largest) = p.free.last_entry() else {
            break;
        };
        let popped = largest.get_mut().pop();
        if largest.get().is_empty() {
            largest.remove();
        }
        if let Some(b) = popped {
            p.bytes -= b.capacity() as u64;
            p.destroy(b);
        }
    }
}

fn take(len: usize) -> Result<Buffer, ShmError> {
    let capacity = len.max(SHM_MIN_BYTES as usize).next_power_of_two();
    {
        let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = p.free.get_mut(&capacity).and_then(Vec::pop) {
            p.bytes -= capacity as u64;
            return Ok(b);
        }
    }
    Buffer::new(capacity)
}

fn give(b: Buffer) {
    let mut p = pool().lock().unwrap_or_else(|e| e.into_inner());
    let size = b.capacity() as u64;
    if p.bytes + size <= p.cap {
        p.bytes += size;
        p.free.entry(b.capacity()).or_default().push(b);
    } else {
        p.destroy(b);
    }
}

/// A buffer being filled (by the network, or by the executor): its first `len` bytes.
pub struct ShmMut {
    buf: Option<Buffer>,
    len: usize,
}

impl fmt::Debug for ShmMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShmMut({} bytes)", self.len)
    }
}

impl ShmMut {
    /// A buffer of `len` bytes from the pool (its contents are whatever was there).
    pub fn new(len: usize) -> Result<ShmMut, ShmError> {
        Ok(ShmMut {
            buf: Some(take(len)?),
            len,
        })
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buffer_mut().map[..len]
    }

    /// The descriptor to lend the executor so that it writes the data.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.buffer().fd.as_fd()
    }

    /// The buffer's id (see [`Shm::id`]).
    pub fn id(&self) -> u64 {
        self.buffer().id
    }

    /// Done writing.
    pub fn freeze(mut self) -> Shm {
        Shm {
            buf: self.buf.take(),
            len: self.len,
        }
    }

    fn buffer(&self) -> &Buffer {
        self.buf.as_ref().expect("present until frozen or dropped")
    }

    fn buffer_mut(&mut self) -> &mut Buffer {
        self.buf.as_mut().expect("present until frozen or dropped")
    }
}

impl Drop for ShmMut {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
    }
}

/// A filled buffer: what a tensor lives in. Back to the pool when the last tensor goes.
pub struct Shm {
    buf: Option<Buffer>,
    len: usize,
}

impl fmt::Debug for Shm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shm({} bytes)", self.len)
    }
}

impl Shm {
    fn buffer(&self) -> &Buffer {
        self.buf.as_ref().expect("present until dropped")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buffer().map[..self.len]
    }

    /// A read-only descriptor of the buffer, for the executor.
    pub fn fd(&self) -> Result<BorrowedFd<'_>, ShmError> {
        self.buffer().read_only()
    }

    /// The buffer's id: the same for the buffer's whole life (it is reused for other tensors),
    /// so the executor maps it once.
    pub fn id(&self) -> u64 {
        self.buffer().id
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give(b);
        }
    }
}

impl SharedWords for Shm {
    fn words(&self) -> &[u32] {
        // Mappings are page-aligned; tensor lengths are whole words (checked by `tensor`).
        bytemuck::cast_slice(&self.bytes()[..self.len - self.len % 4])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A buffer the node handed over, mapped whole and read-only after checking its seals.
pub struct Mapping {
    map: Mmap,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mapping({} bytes)", self.map.len())
    }
}

/// The size of a buffer sealed against resizing, or why it is not one.
fn sealed_size(fd: &OwnedFd) -> Result<usize, ShmError> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(io("get seals"))?;
    if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
        return Err(ShmError::Unsealed(seals));
    }
    let size = rustix::fs::fstat(fd).map_err(io("fstat"))?.st_size;
    usize::try_from(size).map_err(|_| ShmError::Short {
        have: 0,
        want: size as u64,
    })
}

impl Mapping {
    /// Maps all of `fd` read-only, if it is sealed against resizing.
    pub fn read(fd: OwnedFd) -> Result<Mapping, ShmError> {
        let len = sealed_size(&fd)?;
        #[allow(unsafe_code)]
        // SAFETY: the file is sealed against shrinking (checked above), so every mapped page
        // stays backed for the mapping's life.
        let map = unsafe { MmapOptions::new().len(len).populate().map(&fd) }.map_err(|e| {
            ShmError::Io {
                what: "mmap",
                source: e,
            }
        })?;
        Ok(Mapping { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// A buffer the node lent to be written, mapped whole after checking its seals.
pub struct MappingMut {
    map: Mutex<MmapMut>,
}

impl fmt::Debug for MappingMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappingMut")
    }
}

impl MappingMut {
    /// Maps all of `fd` to write it, if it is sealed against resizing.
    pub fn write(fd: OwnedFd) -> Result<MappingMut, ShmError> {
        let len = sealed_size(&fd)?;
        #[allow(unsafe_code)]
        // SAFETY: as for `Mapping::read`; the node lends the buffer to one task at a time.
        let map = unsafe { MmapOptions::new().len(len).populate().map_mut(&fd) }.map_err(|e| {
            ShmError::Io {
                what: "mmap",
                source: e,
            }
        })?;
        Ok(MappingMut {
            map: Mutex::new(map),
        })
    }

    /// Writes `data` at the start of the buffer.
    pub fn write_prefix(&self, data: &[u8]) -> Result<(), ShmError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let have = map.len() as u64;
        map.get_mut(..data.len())
            .ok_or(ShmError::Short {
                have,
                want: data.len() as u64,
            })?
            .copy_from_slice(data);
        Ok(())
    }
}

/// The first `len` bytes of a mapped buffer, as a tensor's storage.
#[derive(Debug)]
pub struct View {
    map: Arc<Mapping>,
    len: usize,
}

impl View {
    pub fn new(map: Arc<Mapping>, len: usize) -> Result<View, ShmError> {
        if len > map.bytes().len() {
            return Err(ShmError::Short {
                have: map.bytes().len() as u64,
                want: len as u64,
            });
        }
        Ok(View { map, len })
    }
}

impl SharedWords for View {
    fn words(&self) -> &[u32] {
        bytemuck::cast_slice(&self.map.bytes()[..self.len - self.len % 4])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A tensor over shared words, checking their length against `meta`.
pub fn tensor<S: SharedWords>(meta: &TensorMeta, words: S) -> Result<Tensor, String> {
    let have = words.words().len() as u64 * 4;
    if have != meta.bytes() {
        return Err(format!(
            "a {meta} tensor is {} bytes, its shared memory {have}",
            meta.bytes()
        ));
    }
    Tensor::from_shared(meta.dtype, meta.shape.clone(), Arc::new(words)).map_err(|e| e.to_string())
}

/// The node's buffer a tensor already lives in, if it does.
pub fn of(t: &Tensor) -> Option<&Shm> {
    t.shared()?.as_any().downcast_ref::<Shm>()
}

/// A copy of `t` in a pooled buffer (for a tensor that was in a `Vec`).
pub fn copy(t: &Tensor) -> Result<Shm, ShmError> {
    let bytes: &[u8] = bytemuck::cast_slice(t.words());
    let mut w = ShmMut::new(bytes.len())?;
    w.bytes_mut().copy_from_slice(bytes);
    Ok(w.freeze())
}

/// Whether a tensor's dtype and size make it worth sharing rather than inlining.
pub fn worth_sharing(meta: &TensorMeta) -> bool {
    meta.bytes() >= SHM_MIN_BYTES && matches!(meta.dtype, DType::F32 | DType::I32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_round_trip_are_reused_and_resizing_is_refused() {
        let t = Tensor::random_uniform([300, 70], -1.0, 1.0, 5);
        let shm = copy(&t).unwrap();
        let ro = shm.fd().unwrap().try_clone_to_owned().unwrap();
        let back = tensor(&t.meta(), shm).unwrap();
        assert_eq!(back, t);
        assert!(of(&back).is_some());
        // The read-only descriptor (what the executor gets) maps the same data, and cannot be
        // mapped for writing.
        let len = t.meta().bytes() as usize;
        let view = View::new(Arc::new(Mapping::read(ro).unwrap()), len).unwrap();
        let again = tensor(&t.meta(), view).unwrap();
        assert_eq!(again, t);
        let ro = of(&back)
            .unwrap()
            .fd()
            .unwrap()
            .try_clone_to_owned()
            .unwrap();
        assert!(
            MappingMut::write(ro).is_err(),
            "read-only descriptors stay read-only"
        );
        // A lent buffer written through the executor's mapping reads back in the node.
        let lent = ShmMut::new(64).unwrap();
        let w = MappingMut::write(lent.fd().try_clone_to_owned().unwrap()).unwrap();
        w.write_prefix(&[9; 64]).unwrap();
        assert_eq!(lent.freeze().bytes(), &[9; 64]);
        // Nobody can shrink it.
        let rw = of(&back).unwrap().buffer().fd.try_clone().unwrap();
        assert!(rustix::fs::ftruncate(&rw, 0).is_err());
        // Dropped, its buffer is reused.
        let fd_before = of(&back).unwrap().buffer().fd.as_raw_fd();
        drop((back, again));
        let reused = ShmMut::new(300 * 70 * 4).unwrap();
        assert_eq!(reused.buffer().fd.as_raw_fd(), fd_before);

        // A memfd without seals is refused, and so is one shorter than claimed.
        let raw = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&raw, 4096).unwrap();
        assert!(matches!(Mapping::read(raw), Err(ShmError::Unsealed(_))));
        let small = copy(&Tensor::full([4], 1.0)).unwrap();
        let fd = small.fd().unwrap().try_clone_to_owned().unwrap();
        let map = Arc::new(Mapping::read(fd).unwrap());
        assert!(matches!(
            View::new(map, 1 << 30),
            Err(ShmError::Short { .. })
        ));
    }
}
