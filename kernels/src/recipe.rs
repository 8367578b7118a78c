//! Tensors described by how to make them: a seeded random tensor travels as its seed, and any
//! window of it is produced directly, identically everywhere.
//!
//! The generator is counter based: element `i` (row-major, in the whole tensor) of a seeded
//! uniform tensor is a function of `(seed, i)` alone, SplitMix64's output for the counter
//! `i + 1` on the seed's stream (Steele, Lea and Flood, "Fast splittable pseudorandom number
//! generators", 2014: passes BigCrush as a counter-based generator). A worker that needs rows
//! 2048..4096 of a 4096² tensor makes exactly those, without the rows before them, and gets
//! the values a whole-tensor evaluation would; each element costs two multiplies, with no
//! state carried from one to the next, so a row is one loop the compiler unrolls.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checked;
use crate::tensor::{ContentId, Tensor, TensorMeta};

/// Domain separation for recipe ids.
const RECIPE_DOMAIN: &[u8] = b"corvid-recipe-v1";
/// Below this many elements a window is made on the calling thread.
const PARALLEL_ELEMS: usize = 1 << 16;
/// Whole tensors larger than this many elements are refused: a window's flat index must fit
/// the generator's counter with room to spare.
const MAX_FULL_ELEMS: u64 = 1 << 60;

/// A recipe that does not describe a tensor.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("bad recipe: {0}")]
pub struct RecipeError(pub String);

/// How to make a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Recipe {
    /// The window `starts..ends` (per axis) of a tensor of shape `full` whose elements are
    /// uniform in `[lo, hi)`, drawn from the seed's stream at their row-major index.
    Uniform {
        full: Vec<usize>,
        starts: Vec<usize>,
        ends: Vec<usize>,
        lo: f32,
        hi: f32,
        seed: u64,
    },
}

impl Recipe {
    /// The whole seeded uniform tensor of `shape`.
    pub fn uniform(shape: impl Into<Vec<usize>>, lo: f32, hi: f32, seed: u64) -> Recipe {
        let full = shape.into();
        Recipe::Uniform {
            starts: vec![0; full.len()],
            ends: full.clone(),
            full,
            lo,
            hi,
            seed,
        }
    }

    /// Checks the recipe describes a tensor: a window inside its whole, a finite range.
    pub fn check(&self) -> Result<(), RecipeError> {
        let bad = |m: String| Err(RecipeError(m));
        match self {
            Recipe::Uniform {
                full,
                starts,
                ends,
                lo,
                hi,
                ..
            } => {
                if starts.len() != full.len() || ends.len() != full.len() {
                    return bad(format!(
                        "a window of rank {}/{} on a tensor of rank {}",
                        starts.len(),
                        ends.len(),
                        full.len()
                    ));
                }
                if let Some(d) = (0..full.len()).find(|&d| starts[d] > ends[d] || ends[d] > full[d])
                {
                    return bad(format!(
                        "axis {d}: window {}..{} outside 0..{}",
                        starts[d], ends[d], full[d]
                    ));
                }
                if checked::numel(full).is_none_or(|n| n as u64 > MAX_FULL_ELEMS) {
                    return bad(format!("a whole tensor of shape {full:?} is too large"));
                }
                if !lo.is_finite() || !hi.is_finite() || lo > hi {
                    return bad(format!("range [{lo}, {hi}) is not a finite interval"));
                }
                Ok(())
            }
        }
    }

    /// What the recipe makes. Only meaningful for a recipe that passes [`Recipe::check`].
    pub fn meta(&self) -> TensorMeta {
        match self {
            Recipe::Uniform { starts, ends, .. } => TensorMeta::f32(
                starts
                    .iter()
                    .zip(ends)
                    .map(|(s, e)| e.saturating_sub(*s))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// The recipe's id: blake3 over its canonical encoding. Equal recipes, equal ids.
    pub fn id(&self) -> ContentId {
        let mut h = blake3::Hasher::new();
        h.update(RECIPE_DOMAIN);
        h.update(&postcard::to_allocvec(self).expect("recipes serialise"));
        ContentId(*h.finalize().as_bytes())
    }

    /// The recipe for `slice(starts, ends, steps)` of this tensor, when a window can say it
    /// (unit steps, within bounds).
    pub fn slice(&self, s: &[usize], e: &[usize], steps: &[usize]) -> Option<Recipe> {
        let Recipe::Uniform {
            full,
            starts,
            ends,
            lo,
            hi,
            seed,
        } = self;
        let rank = full.len();
        if s.len() != rank
            || e.len() != rank
            || steps.len() != rank
            || steps.iter().any(|&k| k != 1)
        {
            return None;
        }
        let mut ns = Vec::with_capacity(rank);
        let mut ne = Vec::with_capacity(rank);
        for d in 0..rank {
            let (a, b) = (starts[d].checked_add(s[d])?, starts[d].checked_add(e[d])?);
            if s[d] > e[d] || b > ends[d] {
                return None;
            }
            ns.push(a);
            ne.push(b);
        }
        Some(Recipe::Uniform {
            full: full.clone(),
            starts: ns,
            ends: ne,
            lo: *lo,
            hi: *hi,
            seed: *seed,
        })
    }

    /// Makes the tensor (in parallel for large windows).
    pub fn materialise(&self) -> Result<Tensor, RecipeError> {
        self.check()?;
        let meta = self.meta();
        let Recipe::Uniform {
            full,
            starts,
            lo,
            hi,
            seed,
            ..
        } = self;
        let shape = meta.shape;
        let numel = checked::numel(&shape).ok_or_else(|| RecipeError("too large".into()))?;
        let mut data = crate::tensor::zeroed::<f32>(numel);
        if numel > 0 {
            // Runs along the last axis are contiguous in the whole tensor.
            let run = shape.last().copied().unwrap_or(1);
            let key = mix64(*seed);
            let (lo, hi) = (*lo, *hi);
            let fill = |row: usize, out: &mut [f32]| {
                fill_uniform(out, key, flat_start(full, starts, &shape, row), lo, hi);
            };
            if numel >= PARALLEL_ELEMS {
                data.par_chunks_mut(run)
                    .enumerate()
                    .for_each(|(row, out)| fill(row, out));
            } else {
                data.chunks_mut(run)
                    .enumerate()
                    .for_each(|(row, out)| fill(row, out));
            }
        }
        Tensor::from_f32(shape, data).map_err(|e| RecipeError(e.to_string()))
    }
}

impl Tensor {
    /// Seeded uniform random values in `[lo, hi)`: the same seed gives the same tensor
    /// everywhere, and any window of it is [`Recipe::slice`] of its recipe.
    ///
    /// # Panics
    /// If the element count overflows, like [`Tensor::full`], or the range is not finite.
    pub fn random_uniform(shape: impl Into<Vec<usize>>, lo: f32, hi: f32, seed: u64) -> Self {
        Recipe::uniform(shape, lo, hi, seed)
            .materialise()
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Row-major index, in the whole tensor, of the first element of run `row` of the window.
fn flat_start(full: &[usize], starts: &[usize], window: &[usize], mut row: usize) -> u64 {
    let rank = full.len();
    if rank == 0 {
        return 0;
    }
    let mut flat = 0u64;
    let mut stride = 1u64;
    for d in (0..rank).rev() {
        let i = if d == rank - 1 {
            starts[d]
        } else {
            let k = row % window[d];
            row /= window[d];
            starts[d] + k
        };
        flat += i as u64 * stride;
        stride *= full[d] as u64;
    }
    flat
}

/// Elements `first..first + out.len()` of the stream `key`, mapped to `[lo, hi)`. Compiled
/// for the SIMD extensions the machine has (picked at run time), where the loop is vectorised.
#[multiversion::multiversion(targets = "simd")]
fn fill_uniform(out: &mut [f32], key: u64, first: u64, lo: f32, hi: f32) {
    for (j, x) in out.iter_mut().enumerate() {
        let counter = first.wrapping_add(j as u64).wrapping_add(1);
        let bits = mix64(key.wrapping_add(counter.wrapping_mul(GOLDEN_GAMMA)));
        *x = unit(bits, lo, hi);
    }
}

/// SplitMix64's increment: the odd integer nearest 2^64 / φ.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finaliser (David Stafford's Mix13 variant).
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The top 24 of 64 random bits to `[lo, hi)` (`lo` when rounding would reach `hi`).
#[inline(always)]
fn unit(bits: u64, lo: f32, hi: f32) -> f32 {
    // Through i32: a signed conversion vectorises everywhere, and 24 bits fit.
    let u = ((bits >> 40) as i32) as f32 * (1.0 / (1u32 << 24) as f32);
    let v = lo + (hi - lo) * u;
    if v < hi { v } else { lo }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Op;
    use crate::reference;

    #[test]
    fn any_window_equals_that_slice_of_the_whole() {
        let whole = Recipe::uniform([7, 5, 9], -2.0, 3.0, 42);
        let all = whole.materialise().unwrap();
        assert_eq!(all.shape(), &[7, 5, 9]);
        let v = all.as_f32().unwrap();
        assert!(v.iter().all(|x| (-2.0..3.0).contains(x)));
        // Not constant, and the seed matters.
        assert!(v.iter().any(|&x| x != v[0]));
        let other = Recipe::uniform([7, 5, 9], -2.0, 3.0, 43)
            .materialise()
            .unwrap();
        assert_ne!(other, all);
        for (s, e) in [
            ([0, 0, 0], [7, 5, 9]),
            ([2, 1, 3], [5, 4, 8]),
            ([6, 0, 0], [7, 5, 1]),
            ([3, 2, 4], [3, 2, 4]),
        ] {
            let window = whole.slice(&s, &e, &[1, 1, 1]).unwrap();
            let op = Op::Slice {
                starts: s.to_vec(),
                ends: e.to_vec(),
                steps: vec![1; 3],
            };
            let want = reference::eval(&op, &[&all]).unwrap();
            assert_eq!(window.meta(), want.meta());
            assert_eq!(window.materialise().unwrap(), want, "window {s:?}..{e:?}");
            // A window of a window is the same window of the whole.
            if e.iter().zip(&s).all(|(e, s)| e > s) {
                let inner = window
                    .slice(&[0, 0, 1], &[e[0] - s[0], 1, e[2] - s[2]], &[1, 1, 1])
                    .unwrap();
                let direct = whole
                    .slice(&s, &[e[0], s[1] + 1, e[2]], &[1, 1, 1])
                    .unwrap()
                    .slice(&[0, 0, 1], &[e[0] - s[0], 1, e[2] - s[2]], &[1, 1, 1])
                    .unwrap();
                assert_eq!(inner.materialise().unwrap(), direct.materialise().unwrap());
            }
        }
        // Large windows are made in parallel: the same values.
        let big = Recipe::uniform([300, 400], 0.0, 1.0, 9);
        let rows = big.slice(&[100, 0], &[300, 400], &[1, 1]).unwrap();
        let want = reference::eval(
            &Op::Slice {
                starts: vec![100, 0],
                ends: vec![300, 400],
                steps: vec![1, 1],
            },
            &[&big.materialise().unwrap()],
        )
        .unwrap();
        assert_eq!(rows.materialise().unwrap(), want);
    }

    #[test]
    fn values_look_uniform_and_independent() {
        // Mean, variance and lag-1 correlation of a million draws from [0, 1), and the share
        // in each tenth: far looser than the bounds a uniform sample of this size meets.
        let n = 1 << 20;
        let t = Recipe::uniform([n], 0.0, 1.0, 12345).materialise().unwrap();
        let v = t.as_f32().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let lag = v
            .windows(2)
            .map(|w| (w[0] as f64 - mean) * (w[1] as f64 - mean))
            .sum::<f64>()
            / (n as f64 * var);
        assert!((mean - 0.5).abs() < 0.002, "{mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.001, "{var}");
        assert!(lag.abs() < 0.005, "{lag}");
        let mut tenths = [0usize; 10];
        for &x in v {
            tenths[(x * 10.0) as usize] += 1;
        }
        for c in tenths {
            assert!((c as f64 / n as f64 - 0.1).abs() < 0.002, "{tenths:?}");
        }
        // Neighbouring seeds give unrelated tensors.
        let u = Recipe::uniform([n], 0.0, 1.0, 12346).materialise().unwrap();
        let cross = v
            .iter()
            .zip(u.as_f32().unwrap())
            .map(|(&a, &b)| (a as f64 - 0.5) * (b as f64 - 0.5))
            .sum::<f64>()
            / (n as f64 / 12.0);
        assert!(cross.abs() < 0.005, "{cross}");
    }

    #[test]
    fn ids_name_the_recipe_and_bad_recipes_are_refused() {
        let a = Recipe::uniform([4, 4], 0.0, 1.0, 1);
        assert_eq!(a.id(), Recipe::uniform([4, 4], 0.0, 1.0, 1).id());
        assert_ne!(a.id(), Recipe::uniform([4, 4], 0.0, 1.0, 2).id());
        assert_ne!(a.id(), a.slice(&[0, 0], &[2, 4], &[1, 1]).unwrap().id());
        // Strided or out-of-window slices are not windows.
        assert!(a.slice(&[0, 0], &[4, 4], &[2, 1]).is_none());
        assert!(a.slice(&[0, 0], &[5, 4], &[1, 1]).is_none());
        for bad in [
            Recipe::Uniform {
                full: vec![4],
                starts: vec![0],
                ends: vec![5],
                lo: 0.0,
                hi: 1.0,
                seed: 0,
            },
            Recipe::Uniform {
                full: vec![4, 4],
                starts: vec![0],
                ends: vec![4],
                lo: 0.0,
                hi: 1.0,
                seed: 0,
            },
            Recipe::uniform([4], 1.0, 0.0, 0),
            Recipe::uniform([4], f32::NAN, 0.0, 0),
            Recipe::uniform([usize::MAX, 2], 0.0, 1.0, 0),
        ] {
            assert!(bad.materialise().is_err(), "{bad:?}");
        }
        // A huge whole with a small window is fine: only the window is made.
        let huge = Recipe::uniform([1 << 30, 1 << 20], 0.0, 1.0, 5);
        let w = huge
            .slice(&[(1 << 30) - 1, 7], &[1 << 30, 10], &[1, 1])
            .unwrap();
        assert_eq!(w.materialise().unwrap().shape(), &[1, 3]);
        // Rank 0.
        assert_eq!(
            Recipe::uniform([], 0.0, 1.0, 3)
                .materialise()
                .unwrap()
                .shape(),
            &[] as &[usize]
        );
    }
}
