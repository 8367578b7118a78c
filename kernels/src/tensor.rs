//! Dense tensors: a dtype, a shape and contiguous row-major data.
//!
//! A tensor's [`ContentId`] is blake3 over its dtype, shape and little-endian bytes, so the same
//! values have the same id on every machine.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::checked;

/// Element types. `F32` for values, `I32` for indices (argmax) and integer data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        4
    }

    fn tag(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::I32 => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dtype and shape of a tensor, without its data: what shape inference works on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorMeta {
            dtype,
            shape: shape.into(),
        }
    }

    pub fn f32(shape: impl Into<Vec<usize>>) -> Self {
        Self::new(DType::F32, shape)
    }

    /// The element count; `usize::MAX` when it overflows, which no size check lets through.
    pub fn numel(&self) -> usize {
        checked::numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// The size of the data in bytes; `u64::MAX` when it overflows.
    pub fn bytes(&self) -> u64 {
        checked::bytes(self.numel(), self.dtype.size()).unwrap_or(u64::MAX)
    }

    /// The element count with empty axes counted as 1 (see [`checked::extent`]); `usize::MAX`
    /// when it overflows.
    pub fn extent(&self) -> usize {
        checked::extent(&self.shape).unwrap_or(usize::MAX)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

/// Errors building a tensor from caller data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} holds {expected} elements but {got} were given")]
    Length {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("expected a {expected} tensor, got {got}")]
    DType { expected: DType, got: DType },
    #[error(
        "tensor bytes: {len} bytes is not a whole number of {dtype} elements for shape {shape:?}"
    )]
    Bytes {
        dtype: DType,
        shape: Vec<usize>,
        len: usize,
    },
}

/// Element storage. Kept typed so the CPU paths need no casts.
#[derive(Clone, Debug)]
pub enum Data {
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Words the tensor shares with others, read-only: a mapping of shared memory that
    /// another process reads in place (see [`SharedWords`]).
    Shared(DType, Arc<dyn SharedWords>),
}

impl Data {
    fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::I32(_) => DType::I32,
            Data::Shared(d, _) => *d,
        }
    }

    fn words(&self) -> &[u32] {
        match self {
            Data::F32(v) => bytemuck::cast_slice(v),
            Data::I32(v) => bytemuck::cast_slice(v),
            Data::Shared(_, w) => w.words(),
        }
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        self.dtype() == other.dtype() && self.words() == other.words()
    }
}

/// Read-only 32-bit words held somewhere other than a `Vec`: what [`Data::Shared`] points to.
/// The words never change while any tensor holds them.
pub trait SharedWords: Send + Sync + fmt::Debug + Any {
    fn words(&self) -> &[u32];
    /// For callers that need the concrete storage back (to pass its handle on).
    fn as_any(&self) -> &dyn Any;
}

/// A dense, row-major tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

/// Buffers at least this large are backed by huge pages where the kernel offers them.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// `n` zeroed elements, in memory the kernel is asked to back with transparent huge pages
/// when the buffer is large (Linux, `madvise` mode): a 64 MiB tensor then costs 32 page
/// faults instead of 16,384, which on a small machine is most of what receiving or making it
/// costs. Elsewhere, or when refused, an ordinary zeroed buffer.
pub fn zeroed<T: bytemuck::Zeroable + Clone>(n: usize) -> Vec<T> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if bytes < HUGE_PAGE_MIN_BYTES {
        return vec![T::zeroed(); n];
    }
    let mut v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        // Advice only, over whole pages inside the allocation, before any of it is touched.
        const PAGE: usize = 4096;
        let start = v.as_mut_ptr() as usize;
        // The allocation spans `start..start + bytes`, so neither sum wraps; checked anyway.
        let range = start
            .checked_next_multiple_of(PAGE)
            .zip(start.checked_add(bytes));
        let (aligned, len) =
            range.map_or((0, 0), |(a, end)| (a, end.saturating_sub(a) / PAGE * PAGE));
        if len > 0 {
            // SAFETY: the range lies inside this allocation, which nothing else uses yet;
            // MADV_HUGEPAGE changes how its pages are backed, never their contents.
            #[allow(unsafe_code)]
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    v.resize(n, T::zeroed());
    v
}

/// blake3 id of a tensor's dtype, shape and bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentId(pub [u8; 32]);

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Twelve hex digits are plenty to tell ids apart in logs.
        let s = self.to_string();
        write!(f, "ContentId({})", &s[..12])
    }
}

impl Tensor {
    pub fn from_f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Result<Self, TensorError> {
        Self::new(shape.into(), Data::F32(data))
    }

    pub fn from_i32(shape: impl Into<Vec<usize>>, data: Vec<i32>) -> Result<Self, TensorError> {
        Self::new(shape.into(), Data::I32(data))
    }

    fn new(shape: Vec<usize>, data: Data) -> Result<Self, TensorError> {
        let got = data.words().len();
        // An element count that overflows can never equal a real length.
        let expected = checked::numel(&shape).unwrap_or(usize::MAX);
        if expected != got {
            return Err(TensorError::Length {
                shape,
                expected,
                got,
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A rank-0 f32 tensor.
    pub fn scalar(v: f32) -> Self {
        Tensor {
            shape: vec![],
            data: Data::F32(vec![v]),
        }
    }

    /// A tensor filled with `v`.
    ///
    /// # Panics
    /// If the element count overflows, like `vec![v; n]` for an `n` too large to allocate.
    pub fn full(shape: impl Into<Vec<usize>>, v: f32) -> Self {
        let shape = shape.into();
        let n = local_numel(&shape);
        Tensor {
            shape,
            data: Data::F32(vec![v; n]),
        }
    }

    /// Rebuilds a tensor from little-endian bytes, checking the length first.
    pub fn from_le_bytes(
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        bytes: &[u8],
    ) -> Result<Self, TensorError> {
        let shape = shape.into();
        // Checked: the shape may come off the wire.
        let numel = checked::numel(&shape);
        if numel.and_then(|n| checked::mul(n, 4)) != Some(bytes.len()) {
            return Err(TensorError::Bytes {
                dtype,
                shape,
                len: bytes.len(),
            });
        }
        let data = if cfg!(target_endian = "little") {
            // One aligned memcpy.
            match dtype {
                DType::F32 => Data::F32(bytemuck::pod_collect_to_vec(bytes)),
                DType::I32 => Data::I32(bytemuck::pod_collect_to_vec(bytes)),
            }
        } else {
            let words = bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
            match dtype {
                DType::F32 => Data::F32(words.map(f32::from_le_bytes).collect()),
                DType::I32 => Data::I32(words.map(i32::from_le_bytes).collect()),
            }
        };
        Ok(Tensor { shape, data })
    }

    pub fn from_array(a: ArrayD<f32>) -> Self {
        let shape = a.shape().to_vec();
        let data = if a.is_standard_layout() {
            a.into_raw_vec_and_offset().0
        } else {
            a.iter().copied().collect()
        };
        Tensor {
            shape,
            data: Data::F32(data),
        }
    }

    pub fn from_array_i32(a: ArrayD<i32>) -> Self {
        let shape = a.shape().to_vec();
        let data = if a.is_standard_layout() {
            a.into_raw_vec_and_offset().0
        } else {
            a.iter().copied().collect()
        };
        Tensor {
            shape,
            data: Data::I32(data),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// A tensor over shared words (read in place, never copied), checking the length.
    pub fn from_shared(
        dtype: DType,
        shape: Vec<usize>,
        words: Arc<dyn SharedWords>,
    ) -> Result<Self, TensorError> {
        Self::new(shape, Data::Shared(dtype, words))
    }

    /// The shared storage this tensor reads, if it is not in a `Vec` of its own.
    pub fn shared(&self) -> Option<&Arc<dyn SharedWords>> {
        match &self.data {
            Data::Shared(_, w) => Some(w),
            _ => None,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element count: the length of the data, which the shape was checked against.
    pub fn numel(&self) -> usize {
        self.data.words().len()
    }

    pub fn meta(&self) -> TensorMeta {
        TensorMeta::new(self.dtype(), self.shape.clone())
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    pub fn as_f32(&self) -> Result<&[f32], TensorError> {
        match &self.data {
            Data::F32(v) => Ok(v),
            Data::Shared(DType::F32, w) => Ok(bytemuck::cast_slice(w.words())),
            d => Err(TensorError::DType {
                expected: DType::F32,
                got: d.dtype(),
            }),
        }
    }

    pub fn as_i32(&self) -> Result<&[i32], TensorError> {
        match &self.data {
            Data::I32(v) => Ok(v),
            Data::Shared(DType::I32, w) => Ok(bytemuck::cast_slice(w.words())),
            d => Err(TensorError::DType {
                expected: DType::I32,
                got: d.dtype(),
            }),
        }
    }

    /// The raw 32-bit words, whatever the dtype: what the GPU uploads.
    pub fn words(&self) -> &[u32] {
        self.data.words()
    }

    /// Rebuilds a tensor from raw 32-bit words of the given dtype.
    pub fn from_words(dtype: DType, shape: Vec<usize>, words: &[u32]) -> Result<Self, TensorError> {
        let data = match dtype {
            DType::F32 => Data::F32(words.iter().map(|w| f32::from_bits(*w)).collect()),
            DType::I32 => Data::I32(words.iter().map(|w| *w as i32).collect()),
        };
        Self::new(shape, data)
    }

    /// A tensor owning `words` as its data, reinterpreted as `dtype` without a copy.
    pub fn from_word_vec(
        dtype: DType,
        shape: Vec<usize>,
        words: Vec<u32>,
    ) -> Result<Self, TensorError> {
        let data = match dtype {
            DType::F32 => Data::F32(bytemuck::allocation::cast_vec(words)),
            DType::I32 => Data::I32(bytemuck::allocation::cast_vec(words)),
        };
        Self::new(shape, data)
    }

    /// Little-endian bytes of the data: the canonical encoding, on any host.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * 4);
        for w in self.words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Same dtype and data under a new shape with the same element count.
    pub fn reshaped(mut self, shape: Vec<usize>) -> Result<Self, TensorError> {
        let expected = checked::numel(&shape).unwrap_or(usize::MAX);
        if expected != self.numel() {
            return Err(TensorError::Length {
                shape,
                expected,
                got: self.numel(),
            });
        }
        self.shape = shape;
        Ok(self)
    }

    pub fn to_array_f32(&self) -> Result<ArrayD<f32>, TensorError> {
        let v = self.as_f32()?.to_vec();
        Ok(ArrayD::from_shape_vec(IxDyn(&self.shape), v).expect("tensor length matches its shape"))
    }

    pub fn to_array_i32(&self) -> Result<ArrayD<i32>, TensorError> {
        let v = self.as_i32()?.to_vec();
        Ok(ArrayD::from_shape_vec(IxDyn(&self.shape), v).expect("tensor length matches its shape"))
    }

    /// blake3 over dtype, rank, dims (u64 LE) and the little-endian data.
    pub fn content_id(&self) -> ContentId {
        if cfg!(target_endian = "little") {
            content_id_of(
                self.dtype(),
                &self.shape,
                bytemuck::cast_slice(self.words()),
            )
        } else {
            content_id_of(self.dtype(), &self.shape, &self.to_le_bytes())
        }
    }
}

/// The [`ContentId`] of a tensor given as its dtype, shape and little-endian bytes (what a GPU
/// read-back holds), without building the tensor.
pub fn content_id_of(dtype: DType, shape: &[usize], le_bytes: &[u8]) -> ContentId {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid-tensor-v1");
    h.update(&[dtype.tag()]);
    h.update(&(shape.len() as u64).to_le_bytes());
    for d in shape {
        h.update(&(*d as u64).to_le_bytes());
    }
    // blake3 hashes a tree: the same id whether the chunks run on one thread or many.
    if le_bytes.len() >= 1 << 20 {
        h.update_rayon(le_bytes);
    } else {
        h.update(le_bytes);
    }
    ContentId(*h.finalize().as_bytes())
}

/// The element count of a shape the local program asked for (not one off the wire).
fn local_numel(shape: &[usize]) -> usize {
    checked::numel(shape).unwrap_or_else(|| {
        panic!("a tensor of shape {shape:?} has more elements than fit in memory")
    })
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 8;
        write!(f, "Tensor({}{:?} ", self.dtype(), self.shape)?;
        match (self.as_f32(), self.as_i32()) {
            (Ok(v), _) => write!(f, "{:?}", &v[..v.len().min(SHOW)])?,
            (_, Ok(v)) => write!(f, "{:?}", &v[..v.len().min(SHOW)])?,
            _ => {}
        }
        if self.numel() > SHOW {
            write!(f, "…")?;
        }
        write!(f, ")")
    }
}

/// Wire form: dtype, shape and raw little-endian bytes (no per-element encoding).
#[derive(Serialize, Deserialize)]
struct TensorWire<'a> {
    dtype: DType,
    shape: Vec<usize>,
    #[serde(borrow, with = "serde_bytes")]
    bytes: std::borrow::Cow<'a, [u8]>,
}

impl Serialize for Tensor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TensorWire {
            dtype: self.dtype(),
            shape: self.shape.clone(),
            bytes: if cfg!(target_endian = "little") {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.words()))
            } else {
                std::borrow::Cow::Owned(self.to_le_bytes())
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = TensorWire::deserialize(d)?;
        Tensor::from_le_bytes(w.dtype, w.shape, &w.bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_covers_dtype_shape_and_data() {
        let a = Tensor::from_f32([2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = Tensor::from_f32([4], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let c = Tensor::from_i32([2, 2], vec![1, 2, 3, 4]).unwrap();
        let d = Tensor::from_f32([2, 2], vec![1.0, 2.0, 3.0, 4.5]).unwrap();
        let ids = [
            a.content_id(),
            b.content_id(),
            c.content_id(),
            d.content_id(),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "{i} vs {j}");
            }
        }
        assert_eq!(a.content_id(), a.clone().content_id());
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let e = Tensor::from_f32([2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shape [2, 3] holds 6 elements but 5 were given"
        );
    }

    #[test]
    fn zeroed_buffers_are_zero_at_any_size() {
        for n in [
            0,
            3,
            (HUGE_PAGE_MIN_BYTES / 4) - 1,
            3 * HUGE_PAGE_MIN_BYTES / 4 + 5,
        ] {
            let v = zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0));
            let w = zeroed::<i32>(n);
            assert!(w.len() == n && w.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn wire_round_trip_and_bad_length() {
        let t = Tensor::random_uniform([3, 5], -1.0, 1.0, 7);
        let bytes = postcard::to_allocvec(&t).unwrap();
        let back: Tensor = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(t, back);
        let bad = Tensor::from_le_bytes(DType::F32, [2, 2], &[0u8; 15]).unwrap_err();
        assert!(bad.to_string().contains("15 bytes"), "{bad}");
    }
}
