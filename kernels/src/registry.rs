//! The op registry: every op Corvid executes, with its tolerance and a seeded generator of
//! valid random cases. Tests, benchmarks and the network's verifier iterate this list, so a new
//! op gets its conformance tests for free.

use std::sync::OnceLock;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::op::{BinaryOp, Domain, Op, ReduceOp, Tolerance, UnaryOp};
use crate::tensor::{DType, Tensor};

/// One random, valid application of an op.
#[derive(Clone, Debug)]
pub struct Sample {
    pub op: Op,
    pub inputs: Vec<Tensor>,
}

type Sampler = Box<dyn Fn(&mut ChaCha8Rng) -> Sample + Send + Sync>;

/// A registry entry.
pub struct OpSpec {
    pub name: &'static str,
    /// Which family the op belongs to, for listings.
    pub family: &'static str,
    /// How far a backend may stray from the reference on the sampled inputs.
    pub tolerance: Tolerance,
    sampler: Sampler,
}

impl std::fmt::Debug for OpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpSpec")
            .field("name", &self.name)
            .field("family", &self.family)
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl OpSpec {
    /// A random valid case; the same seed gives the same case everywhere.
    pub fn sample(&self, seed: u64) -> Sample {
        (self.sampler)(&mut ChaCha8Rng::seed_from_u64(seed))
    }
}

/// Every op, in a fixed order.
pub fn registry() -> &'static [OpSpec] {
    static REGISTRY: OnceLock<Vec<OpSpec>> = OnceLock::new();
    REGISTRY.get_or_init(build)
}

/// The registry entry for an op name.
pub fn spec(name: &str) -> Option<&'static OpSpec> {
    registry().iter().find(|s| s.name == name)
}

/// The tolerance of `op`: its registry entry's.
pub fn tolerance(op: &Op) -> Tolerance {
    spec(op.name()).map_or(Tolerance::new(1e-4, 1e-4), |s| s.tolerance)
}

fn entry(
    name: &'static str,
    family: &'static str,
    tolerance: Tolerance,
    f: impl Fn(&mut ChaCha8Rng) -> Sample + Send + Sync + 'static,
) -> OpSpec {
    OpSpec {
        name,
        family,
        tolerance,
        sampler: Box::new(f),
    }
}

const ACCUMULATE: Tolerance = Tolerance::new(2e-4, 1e-4);

fn build() -> Vec<OpSpec> {
    let mut v = Vec::new();
    for &u in UnaryOp::ALL {
        v.push(entry(u.name(), "unary", u.tolerance(), move |r| {
            let s = shape(r, 1, 3, 700);
            Sample {
                op: Op::Unary(u),
                inputs: vec![tensor(r, &s, u.domain())],
            }
        }));
    }
    v.push(entry("clamp", "unary", Tolerance::new(0.0, 0.0), |r| {
        let s = shape(r, 1, 3, 700);
        let min = r.random_range(-3.0..0.0f32);
        Sample {
            op: Op::Clamp {
                min,
                max: min + r.random_range(0.0..4.0f32),
            },
            inputs: vec![tensor(r, &s, uni(-5.0, 5.0))],
        }
    }));
    for &b in BinaryOp::ALL {
        v.push(entry(b.name(), "binary", b.tolerance(), move |r| {
            let (sa, sb) = broadcast_pair(r);
            let [da, db] = b.domains();
            Sample {
                op: Op::Binary(b),
                inputs: vec![tensor(r, &sa, da), tensor(r, &sb, db)],
            }
        }));
    }
    v.push(entry("where", "binary", Tolerance::new(0.0, 0.0), |r| {
        let (sa, sb) = broadcast_pair(r);
        let cond = tensor(
            r,
            &sb,
            Domain {
                lo: 0.0,
                hi: 1.0,
                ints: true,
            },
        );
        Sample {
            op: Op::Where,
            inputs: vec![
                cond,
                tensor(r, &sa, uni(-5.0, 5.0)),
                tensor(r, &sb, uni(-5.0, 5.0)),
            ],
        }
    }));
    v.push(entry(
        "cast",
        "elementwise",
        Tolerance::new(0.0, 0.0),
        |r| {
            let s = shape(r, 1, 3, 500);
            if r.random_bool(0.5) {
                Sample {
                    op: Op::Cast { to: DType::I32 },
                    inputs: vec![tensor(r, &s, uni(-1000.0, 1000.0))],
                }
            } else {
                Sample {
                    op: Op::Cast { to: DType::F32 },
                    inputs: vec![int_tensor(r, &s)],
                }
            }
        },
    ));
    v.push(entry("matmul", "linear algebra", ACCUMULATE, |r| {
        let (m, k, n) = (dim(r, 1, 70), dim(r, 1, 70), dim(r, 1, 70));
        let (sa, sb) = match r.random_range(0..3) {
            0 => (vec![m, k], vec![k, n]),
            1 => {
                let b = dim(r, 1, 4);
                (vec![b, m, k], vec![b, k, n])
            }
            _ => {
                let b = dim(r, 2, 3);
                (vec![b, 1, m, k], vec![2, k, n])
            }
        };
        Sample {
            op: Op::MatMul,
            inputs: vec![
                tensor(r, &sa, uni(-1.0, 1.0)),
                tensor(r, &sb, uni(-1.0, 1.0)),
            ],
        }
    }));
    v.extend(structural());
    for &op in ReduceOp::ALL {
        v.push(entry(op.name(), "reduction", ACCUMULATE, move |r| {
            let s = shape(r, 1, 4, 2000);
            let mut axes: Vec<usize> = (0..s.len()).filter(|_| r.random_bool(0.5)).collect();
            if axes.is_empty() {
                axes.push(r.random_range(0..s.len()));
            }
            axes.shuffle(r);
            Sample {
                op: Op::Reduce {
                    op,
                    axes,
                    keepdims: r.random_bool(0.5),
                },
                inputs: vec![tensor(r, &s, uni(-1.0, 1.0))],
            }
        }));
    }
    v.push(entry(
        "argmax",
        "reduction",
        Tolerance::new(0.0, 0.0),
        |r| {
            let s = shape(r, 1, 4, 2000);
            Sample {
                op: Op::ArgMax {
                    axis: r.random_range(0..s.len()),
                    keepdims: r.random_bool(0.5),
                },
                inputs: vec![tensor(r, &s, uni(-1.0, 1.0))],
            }
        },
    ));
    for log in [false, true] {
        let name = if log { "log_softmax" } else { "softmax" };
        v.push(entry(
            name,
            "normalisation",
            Tolerance::new(2e-6, 1e-4),
            move |r| {
                let s = shape(r, 1, 3, 1500);
                let axis = r.random_range(0..s.len());
                Sample {
                    op: if log {
                        Op::LogSoftmax { axis }
                    } else {
                        Op::Softmax { axis }
                    },
                    inputs: vec![tensor(r, &s, uni(-5.0, 5.0))],
                }
            },
        ));
    }
    v.push(entry(
        "layer_norm",
        "normalisation",
        Tolerance::new(1e-4, 1e-4),
        |r| {
            let mut s = shape(r, 1, 3, 1500);
            let last = s.len() - 1;
            s[last] = s[last].max(2);
            let len = [s[last]];
            Sample {
                op: Op::LayerNorm { eps: 1e-5 },
                inputs: vec![
                    tensor(r, &s, uni(-3.0, 3.0)),
                    tensor(r, &len, uni(0.5, 1.5)),
                    tensor(r, &len, uni(-1.0, 1.0)),
                ],
            }
        },
    ));
    v.push(entry("conv2d", "convolution", ACCUMULATE, |r| {
        let (n, c, o) = (dim(r, 1, 2), dim(r, 1, 4), dim(r, 1, 5));
        let (kh, kw) = (dim(r, 1, 3), dim(r, 1, 3));
        let (h, w) = (dim(r, kh, 12), dim(r, kw, 13));
        Sample {
            op: Op::Conv2d {
                stride: [dim(r, 1, 2), dim(r, 1, 2)],
                padding: [r.random_range(0..2), r.random_range(0..2)],
            },
            inputs: vec![
                tensor(r, &[n, c, h, w], uni(-1.0, 1.0)),
                tensor(r, &[o, c, kh, kw], uni(-1.0, 1.0)),
            ],
        }
    }));
    v.push(entry(
        "max_pool2d",
        "convolution",
        Tolerance::new(0.0, 0.0),
        |r| {
            let kernel = [dim(r, 1, 3), dim(r, 1, 3)];
            let padding = [r.random_range(0..kernel[0]), r.random_range(0..kernel[1])];
            let s = [
                dim(r, 1, 2),
                dim(r, 1, 3),
                dim(r, kernel[0], 12),
                dim(r, kernel[1], 12),
            ];
            Sample {
                op: Op::MaxPool2d {
                    kernel,
                    stride: [dim(r, 1, 2), dim(r, 1, 2)],
                    padding,
                },
                inputs: vec![tensor(r, &s, uni(-1.0, 1.0))],
            }
        },
    ));
    v
}

/// Permute, reshape, broadcast_to, slice, concat, pad: exact, on f32 or i32.
fn structural() -> Vec<OpSpec> {
    let exact = Tolerance::new(0.0, 0.0);
    vec![
        entry("permute", "layout", exact, |r| {
            let s = shape(r, 2, 4, 1500);
            let mut axes: Vec<usize> = (0..s.len()).collect();
            axes.shuffle(r);
            Sample {
                op: Op::Permute { axes },
                inputs: vec![any_tensor(r, &s)],
            }
        }),
        entry("reshape", "layout", exact, |r| {
            let s = shape(r, 1, 3, 1500);
            let n: usize = s.iter().product();
            let first = (1..=n).filter(|d| n.is_multiple_of(*d)).collect::<Vec<_>>();
            let d = first[r.random_range(0..first.len())];
            Sample {
                op: Op::Reshape {
                    shape: vec![d, n / d],
                },
                inputs: vec![any_tensor(r, &s)],
            }
        }),
        entry("broadcast_to", "layout", exact, |r| {
            let (small, big) = broadcast_pair(r);
            let (small, big) = if small.iter().product::<usize>() <= big.iter().product() {
                (small, big)
            } else {
                (big, small)
            };
            let target = crate::shape::broadcast_shapes(&small, &big).expect("pair broadcasts");
            Sample {
                op: Op::BroadcastTo { shape: target },
                inputs: vec![any_tensor(r, &small)],
            }
        }),
        entry("slice", "layout", exact, |r| {
            let s = shape(r, 1, 4, 2000);
            let (mut starts, mut ends, mut steps) = (vec![], vec![], vec![]);
            for &d in &s {
                let a = r.random_range(0..=d);
                let b = r.random_range(a..=d);
                starts.push(a);
                ends.push(b);
                steps.push(dim(r, 1, 3));
            }
            Sample {
                op: Op::Slice {
                    starts,
                    ends,
                    steps,
                },
                inputs: vec![any_tensor(r, &s)],
            }
        }),
        entry("concat", "layout", exact, |r| {
            let s = shape(r, 1, 3, 800);
            let axis = r.random_range(0..s.len());
            let parts = dim(r, 1, 3);
            let int = r.random_bool(0.25);
            let inputs = (0..parts)
                .map(|_| {
                    let mut p = s.clone();
                    p[axis] = dim(r, 0, 40);
                    if int {
                        int_tensor(r, &p)
                    } else {
                        tensor(r, &p, uni(-1.0, 1.0))
                    }
                })
                .collect();
            Sample {
                op: Op::Concat { axis },
                inputs,
            }
        }),
        entry("pad", "layout", exact, |r| {
            let s = shape(r, 1, 3, 800);
            let pads = s
                .iter()
                .map(|_| [r.random_range(0..3), r.random_range(0..3)])
                .collect();
            Sample {
                op: Op::Pad {
                    pads,
                    value: r.random_range(-2i32..3) as f32,
                },
                inputs: vec![any_tensor(r, &s)],
            }
        }),
    ]
}

fn uni(lo: f32, hi: f32) -> Domain {
    Domain {
        lo,
        hi,
        ints: false,
    }
}

fn dim(r: &mut ChaCha8Rng, lo: usize, hi: usize) -> usize {
    r.random_range(lo..=hi)
}

/// A shape of rank `lo..=hi` with at most about `max` elements; sizes are often not multiples
/// of the workgroup size.
fn shape(r: &mut ChaCha8Rng, lo: usize, hi: usize, max: usize) -> Vec<usize> {
    let rank = r.random_range(lo..=hi);
    let mut s = Vec::with_capacity(rank);
    let mut left = max;
    for i in 0..rank {
        let cap = if i + 1 == rank {
            left
        } else {
            (left as f64).sqrt() as usize + 1
        };
        let d = r.random_range(1..=cap.clamp(1, 200));
        s.push(d);
        left = (left / d).max(1);
    }
    s
}

/// Two shapes that broadcast together: some axes of one set to 1, or leading axes dropped.
fn broadcast_pair(r: &mut ChaCha8Rng) -> (Vec<usize>, Vec<usize>) {
    let a = shape(r, 1, 3, 600);
    let mut b = a.clone();
    match r.random_range(0..4) {
        0 => {}
        1 => b = b[r.random_range(0..b.len())..].to_vec(),
        2 => {
            for d in b.iter_mut() {
                if r.random_bool(0.5) {
                    *d = 1;
                }
            }
        }
        _ => b = vec![],
    }
    if r.random_bool(0.5) { (a, b) } else { (b, a) }
}

fn tensor(r: &mut ChaCha8Rng, shape: &[usize], d: Domain) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            if d.ints {
                r.random_range(d.lo as i32..=d.hi as i32) as f32
            } else {
                r.random_range(d.lo..d.hi)
            }
        })
        .collect();
    Tensor::from_f32(shape.to_vec(), data).expect("sized from shape")
}

fn int_tensor(r: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|_| r.random_range(-100_000..100_000)).collect();
    Tensor::from_i32(shape.to_vec(), data).expect("sized from shape")
}

/// f32 most of the time, sometimes i32: structural ops must not care.
fn any_tensor(r: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    if r.random_bool(0.25) {
        int_tensor(r, shape)
    } else {
        tensor(r, shape, uni(-1.0, 1.0))
    }
}
