//! Checked arithmetic over sizes that may come from a stranger.
//!
//! Shapes, pads, windows and axis lengths arrive in programs that peers send. Every product,
//! sum or window formula over them goes through this module, so that one grep
//! (`checked::`) finds every place a remote size is combined, and none of them can wrap. Each
//! helper returns `None` on overflow; callers turn that into an error naming the op and value.
//!
//! Backends run only programs that [`crate::budget`] validated: every value's *extent* (its
//! element count with empty axes counted as 1, see [`extent`]) fits the budget, so any product
//! of a subset of its dimensions (strides, batch counts, row lengths) is at most that extent
//! and cannot overflow either.

/// `a * b`, or `None` on overflow.
#[inline]
pub fn mul(a: usize, b: usize) -> Option<usize> {
    a.checked_mul(b)
}

/// `a + b`, or `None` on overflow.
#[inline]
pub fn add(a: usize, b: usize) -> Option<usize> {
    a.checked_add(b)
}

/// The sum of `xs`, or `None` on overflow.
pub fn sum(xs: impl IntoIterator<Item = usize>) -> Option<usize> {
    xs.into_iter().try_fold(0usize, usize::checked_add)
}

/// The element count of `shape`, or `None` on overflow.
///
/// An empty axis makes the count 0 whatever the other axes are, so a count that fits says
/// nothing about the products of the other axes: use [`extent`] to bound those.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The product of `shape` with every empty axis counted as 1, or `None` on overflow.
///
/// It bounds every product of any subset of the axes, so once a shape's extent is known to
/// fit, strides, batch counts and loop bounds computed from its axes cannot overflow.
pub fn extent(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))
}

/// Bytes of `numel` elements of `size` bytes each, or `None` on overflow.
pub fn bytes(numel: usize, size: usize) -> Option<u64> {
    (numel as u64).checked_mul(size as u64)
}

/// `x` as a `u32` (what GPU kernels index with), or `None` if it does not fit.
#[inline]
pub fn u32(x: usize) -> Option<u32> {
    u32::try_from(x).ok()
}

/// Longest padded input a sliding window may cover: every window index then fits an `i32`,
/// so no position or offset computed from it (on any backend) can wrap.
pub const MAX_WINDOW: usize = 1 << 31;

/// Output length of a sliding window of `k` taps moved by `stride` over `size` elements padded
/// by `pad` on both sides: `(size + 2·pad − k) / stride + 1`. `None` when the padded length
/// overflows or is over [`MAX_WINDOW`].
pub fn window(size: usize, k: usize, stride: usize, pad: usize) -> Option<Window> {
    let padded = mul(pad, 2).and_then(|p| add(size, p))?;
    if padded > MAX_WINDOW {
        return None;
    }
    if stride == 0 || k == 0 {
        return Some(Window::Degenerate);
    }
    // A stride past the padded input takes one window, as a stride of its length does.
    if padded < k || stride > padded {
        return Some(Window::TooSmall { padded });
    }
    Some(Window::Fits((padded - k) / stride + 1))
}

/// What [`window`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The output length.
    Fits(usize),
    /// A zero kernel or stride.
    Degenerate,
    /// The kernel (or the stride) is longer than the padded input.
    TooSmall { padded: usize },
}

/// Row-major element strides of `shape`, or `None` on overflow.
pub fn strides(shape: &[usize]) -> Option<Vec<usize>> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = mul(s[i + 1], shape[i + 1])?;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_none_everywhere() {
        assert_eq!(numel(&[1 << 33, 1 << 33]), None);
        assert_eq!(numel(&[(1 << 63) + 1, 0]), Some(0));
        assert_eq!(extent(&[(1 << 63) + 1, 0]), Some((1 << 63) + 1));
        assert_eq!(extent(&[(1 << 63) + 1, 0, 2]), None);
        assert_eq!(sum([usize::MAX, 1]), None);
        assert_eq!(add(usize::MAX, 1), None);
        assert_eq!(bytes(usize::MAX, 4), None);
        assert_eq!(u32(1 << 32), None);
        assert_eq!(window(usize::MAX, 1, 1, 1), None);
        assert_eq!(window(2, 1, 1, 1 << 30), None);
        assert_eq!(window(2, 1, 1 << 20, 1 << 29), Some(Window::Fits(1025)));
        assert_eq!(strides(&[0, 1 << 40, 1 << 40]), None);
        assert_eq!(strides(&[2, 3, 4]), Some(vec![12, 4, 1]));
    }

    #[test]
    fn windows() {
        assert_eq!(window(7, 3, 2, 1), Some(Window::Fits(4)));
        assert_eq!(window(2, 5, 1, 1), Some(Window::TooSmall { padded: 4 }));
        assert_eq!(window(2, 0, 1, 0), Some(Window::Degenerate));
    }
}
