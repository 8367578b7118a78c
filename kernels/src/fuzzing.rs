//! Fuzz targets over the op interpreter, shared by the cargo-fuzz harness (`fuzz/`) and the
//! corpus replay that CI runs on the stable toolchain. Behind the `fuzzing` feature.
//!
//! - [`validate_bytes`]: any bytes as an encoded [`Program`], validated against a worker's
//!   budget.
//! - [`run_structured`]: a *well-typed but adversarial* program built from the bytes (shapes
//!   with empty and huge axes, extreme pads, windows, strides and axes; most ops valid, some
//!   not), validated and, when it fits, run on the CPU backend within a deadline, its
//!   outputs checked against the shapes inference promised.
//!
//! Each must return, never panic, abort or hang, whatever the bytes.

use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Result, Unstructured};

use crate::exec::Guard;
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::program::{Program, ValueId};
use crate::shape::infer;
use crate::tensor::{DType, Tensor, TensorMeta};
use crate::{Backend, Budget, Cancel, CpuBackend};

/// What a fuzzed program may use: small enough that one case runs in milliseconds.
pub fn budget() -> Budget {
    Budget::new(16 << 20, 64 << 20, 1 << 27)
}

/// Decodes `data` as a program and validates it. Never panics.
pub fn validate_bytes(data: &[u8]) {
    if let Ok(p) = postcard::from_bytes::<Program>(data) {
        let _ = p.validate(&budget());
        let _ = p.infer();
        for node in 0..p.nodes.len().min(4) {
            let _ = p.cone(node);
        }
    }
}

/// Builds a program from `data`, validates it and, if it fits, runs it on the CPU backend.
/// Panics only if a backend breaks a promise: outputs of other shapes than inference gave.
pub fn run_structured(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((program, inputs)) = program(&mut u) else {
        return;
    };
    let Ok(footprint) = program.validate(&budget()) else {
        return;
    };
    let backend = Backend::Cpu(CpuBackend::new());
    let guard = Guard::new(budget(), Cancel::within(Duration::from_secs(2)));
    if let Ok((outs, hashes)) = backend.run_traced(&program, &inputs, &guard) {
        assert_eq!(hashes.len(), program.nodes.len());
        for (t, &o) in outs.iter().zip(&program.outputs) {
            assert_eq!(
                t.meta(),
                footprint.metas[o as usize],
                "output {o} of {program:?}"
            );
        }
    }
}

/// Sizes a fuzzer tries: empty, small, odd, and far too large.
fn dim(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => 0,
        1..=3 => 1,
        4..=6 => u.int_in_range(2..=5)?,
        7..=9 => u.int_in_range(6..=40)?,
        10 => 64,
        11 => 1 << u.int_in_range(20..=40u32)?,
        12 => usize::MAX,
        13 => usize::MAX / 2 + 1,
        14 => (1 << 63) + 1,
        _ => u.arbitrary()?,
    })
}

/// A parameter such as a pad, stride or window: mostly small, sometimes extreme.
fn param(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0..=9u8)? {
        0..=6 => u.int_in_range(0..=4)?,
        7 => usize::MAX,
        8 => 1 << u.int_in_range(16..=62u32)?,
        _ => u.arbitrary()?,
    })
}

fn float(u: &mut Unstructured) -> Result<f32> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => -f32::INFINITY,
        3 => 0.0,
        _ => u.int_in_range(-8i32..=8)? as f32 / 2.0,
    })
}

/// An input: a shape whose data is small enough to hold (or empty), of either dtype.
fn input(u: &mut Unstructured) -> Result<Tensor> {
    let rank = match u.int_in_range(0..=20u8)? {
        0 => u.int_in_range(9..=12usize)?,
        r => (r as usize) % 5,
    };
    let mut shape: Vec<usize> = (0..rank).map(|_| dim(u)).collect::<Result<_>>()?;
    let numel = crate::checked::numel(&shape);
    if numel.is_none_or(|n| n > 4096) {
        // Too many elements to hold: keep the absurd axes but empty the tensor.
        if let Some(d) = shape.first_mut() {
            *d = 0;
        }
    }
    let n = crate::checked::numel(&shape).unwrap_or(0);
    if u.ratio(1, 8)? {
        let data = (0..n)
            .map(|_| u.int_in_range(-3..=3))
            .collect::<Result<_>>()?;
        return Ok(Tensor::from_i32(shape, data).unwrap_or_else(|_| Tensor::scalar(0.0)));
    }
    let data = (0..n).map(|_| float(u)).collect::<Result<_>>()?;
    Ok(Tensor::from_f32(shape, data).unwrap_or_else(|_| Tensor::scalar(0.0)))
}

/// An axis of a value of rank `rank`: mostly in range.
fn axis(u: &mut Unstructured, rank: usize) -> Result<usize> {
    if rank > 0 && !u.ratio(1, 10)? {
        u.int_in_range(0..=rank - 1)
    } else {
        Ok(u.int_in_range(0..=rank + 2)?)
    }
}

/// An op applied to `args` (whose metas are given), mostly one that applies.
fn op(u: &mut Unstructured, args: &[&TensorMeta]) -> Result<Op> {
    let x = args[0];
    let r = x.rank();
    let axes = |u: &mut Unstructured| -> Result<Vec<usize>> {
        let n = u.int_in_range(0..=r.min(3))?;
        let mut v: Vec<usize> = (0..n).map(|_| axis(u, r)).collect::<Result<_>>()?;
        if !u.ratio(1, 10)? {
            v.sort_unstable();
            v.dedup();
        }
        Ok(v)
    };
    Ok(match u.int_in_range(0..=19u8)? {
        0 => Op::Unary(*u.choose(UnaryOp::ALL)?),
        1 => Op::Clamp {
            min: float(u)?,
            max: float(u)?,
        },
        2 => Op::Binary(*u.choose(BinaryOp::ALL)?),
        3 => Op::Where,
        4 => Op::Cast {
            to: if u.arbitrary()? {
                DType::F32
            } else {
                DType::I32
            },
        },
        5 | 6 => Op::MatMul,
        7 => {
            let mut axes: Vec<usize> = (0..r).collect();
            for i in (1..axes.len()).rev() {
                let j = u.int_in_range(0..=i)?;
                axes.swap(i, j);
            }
            if u.ratio(1, 10)? {
                axes.push(0);
            }
            Op::Permute { axes }
        }
        8 => {
            let mut shape = x.shape.clone();
            if u.ratio(1, 2)? {
                // The same elements, regrouped: merge or split the first axes.
                if shape.len() >= 2 {
                    let merged = shape[0].saturating_mul(shape[1]);
                    shape.splice(0..2, [merged]);
                } else {
                    shape.push(1);
                }
            } else {
                shape = (0..u.int_in_range(0..=4)?)
                    .map(|_| dim(u))
                    .collect::<Result<_>>()?;
            }
            Op::Reshape { shape }
        }
        9 => {
            let mut shape = x.shape.clone();
            if u.arbitrary()? {
                shape.insert(0, dim(u)?);
            }
            for d in shape.iter_mut() {
                if *d == 1 && u.arbitrary()? {
                    *d = dim(u)?;
                }
            }
            Op::BroadcastTo { shape }
        }
        10 => {
            let (mut starts, mut ends, mut steps) = (Vec::new(), Vec::new(), Vec::new());
            for &d in &x.shape {
                let s = if d > 0 { u.int_in_range(0..=d)? } else { 0 };
                let e = if u.ratio(1, 10)? {
                    param(u)?
                } else {
                    u.int_in_range(s..=d.max(s))?
                };
                starts.push(s);
                ends.push(e);
                steps.push(if u.ratio(1, 10)? {
                    param(u)?
                } else {
                    u.int_in_range(1..=3)?
                });
            }
            Op::Slice {
                starts,
                ends,
                steps,
            }
        }
        11 => Op::Concat { axis: axis(u, r)? },
        12 => Op::Pad {
            pads: (0..r)
                .map(|_| Ok([param(u)?, param(u)?]))
                .collect::<Result<_>>()?,
            value: float(u)?,
        },
        13 | 14 => Op::Reduce {
            op: *u.choose(ReduceOp::ALL)?,
            axes: axes(u)?,
            keepdims: u.arbitrary()?,
        },
        15 => Op::ArgMax {
            axis: axis(u, r)?,
            keepdims: u.arbitrary()?,
        },
        16 => {
            let a = axis(u, r)?;
            if u.arbitrary()? {
                Op::Softmax { axis: a }
            } else {
                Op::LogSoftmax { axis: a }
            }
        }
        17 => Op::LayerNorm {
            eps: if u.ratio(1, 10)? { float(u)? } else { 1e-5 },
        },
        18 => Op::Conv2d {
            stride: [param(u)?.max(1), param(u)?.max(1)],
            padding: [param(u)?, param(u)?],
        },
        _ => Op::MaxPool2d {
            kernel: [param(u)?.max(1), param(u)?.max(1)],
            stride: [param(u)?.max(1), param(u)?.max(1)],
            padding: [param(u)?, param(u)?],
        },
    })
}

/// A program: a few inputs, up to a dozen ops over earlier values, one or two outputs.
pub fn program(u: &mut Unstructured) -> Result<(Program, Vec<Arc<Tensor>>)> {
    let inputs: Vec<Tensor> = (0..u.int_in_range(1..=3)?)
        .map(|_| input(u))
        .collect::<Result<_>>()?;
    let mut p = Program::new(inputs.iter().map(Tensor::meta).collect());
    let mut metas: Vec<Option<TensorMeta>> = p.inputs.iter().cloned().map(Some).collect();
    for _ in 0..u.int_in_range(1..=12)? {
        let n = metas.len() as ValueId;
        let arity = u.int_in_range(1..=3usize)?;
        let args: Vec<ValueId> = (0..arity)
            .map(|_| u.int_in_range(0..=n - 1))
            .collect::<Result<_>>()?;
        let known: Vec<TensorMeta> = args
            .iter()
            .map(|&a| {
                metas[a as usize]
                    .clone()
                    .unwrap_or_else(|| TensorMeta::f32([1]))
            })
            .collect();
        let refs: Vec<&TensorMeta> = known.iter().collect();
        let mut op = op(u, &refs)?;
        // Mostly keep to ops that apply, so that the backends get exercised.
        let mut tries = 0;
        let out = loop {
            match infer(&op, &refs[..op_arity(&op).min(refs.len())]) {
                Ok(m) => break Some(m),
                Err(_) if tries < 4 && !u.ratio(1, 6)? => {
                    tries += 1;
                    op = self::op(u, &refs)?;
                }
                Err(_) => break None,
            }
        };
        let take = op_arity(&op).min(args.len());
        p.push(op, &args[..take]);
        metas.push(out);
    }
    let n = metas.len() as ValueId;
    p.outputs = (0..u.int_in_range(1..=2)?)
        .map(|_| u.int_in_range(0..=n - 1))
        .collect::<Result<_>>()?;
    Ok((p, inputs.into_iter().map(Arc::new).collect()))
}

/// How many of the drawn arguments an op takes.
fn op_arity(op: &Op) -> usize {
    match op.arity() {
        crate::op::Arity::Exact(k) => k,
        crate::op::Arity::AtLeast(k) => k.max(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_make_programs_that_validate_or_are_refused() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut ran = 0;
        for _ in 0..300 {
            let bytes: Vec<u8> = (0..rng.random_range(16..512))
                .map(|_| rng.random())
                .collect();
            run_structured(&bytes);
            validate_bytes(&bytes);
            let mut u = Unstructured::new(&bytes);
            if let Ok((p, _)) = program(&mut u)
                && p.validate(&budget()).is_ok()
            {
                ran += 1;
            }
        }
        assert!(ran > 30, "only {ran} of 300 programs were valid");
    }
}
