//! Property tests for the wire types: ops, programs and tensors survive a postcard round trip
//! with the same content ids, and truncated or corrupted bytes are errors, never panics.

#![allow(clippy::unwrap_used)]

use corvid_kernels::{Op, Program, Tensor, registry};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn samples_round_trip(seed in any::<u64>(), which in any::<prop::sample::Index>()) {
        let spec = &registry()[which.index(registry().len())];
        let s = spec.sample(seed);
        let op: Op = postcard::from_bytes(&postcard::to_allocvec(&s.op).unwrap()).unwrap();
        prop_assert_eq!(&op, &s.op);
        for t in &s.inputs {
            let back: Tensor = postcard::from_bytes(&postcard::to_allocvec(t).unwrap()).unwrap();
            prop_assert_eq!(back.content_id(), t.content_id());
            prop_assert_eq!(&back, t);
        }
        let p = Program::single(s.op.clone(), s.inputs.iter().map(|t| t.meta()).collect());
        let bytes = p.canonical_bytes();
        let back: Program = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(back.canonical_bytes(), bytes);
    }

    #[test]
    fn damaged_bytes_are_errors(seed in any::<u64>(), cut in any::<prop::sample::Index>(), flip in any::<u8>()) {
        let t = Tensor::random_uniform([3, 7], -1.0, 1.0, seed);
        let bytes = postcard::to_allocvec(&t).unwrap();
        let n = cut.index(bytes.len());
        prop_assert!(postcard::from_bytes::<Tensor>(&bytes[..n]).is_err());
        // A corrupted header either fails or decodes to a tensor whose bytes fit its shape.
        let mut bad = bytes.clone();
        bad[n.min(3)] ^= flip | 1;
        if let Ok(t) = postcard::from_bytes::<Tensor>(&bad) {
            prop_assert_eq!(t.numel() * 4, t.to_le_bytes().len());
        }
    }
}

#[test]
fn absurd_shapes_are_rejected_before_allocation() {
    // dtype f32, shape [2^62, 2^62] (overflows), 0 bytes.
    let huge = Tensor::from_le_bytes(corvid_kernels::DType::F32, vec![1 << 62, 1 << 62], &[]);
    assert!(huge.is_err());
}
