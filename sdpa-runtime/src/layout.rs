//! The shape and strides of a `[batch, seq, heads, head_dim]` tensor,
//! independent of where its elements live.
//!
//! Any strides are accepted for the batch, token and head dimensions
//! (FastVideo hands over transposed views); the last dimension must be
//! contiguous.

use crate::error::{Result, SdpaError};

/// Shape and strides (in elements) of a `[batch, seq, heads, head_dim]`
/// tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: [usize; 4],
    strides: [usize; 4],
}

impl Layout {
    /// The row-major layout of `shape`.
    pub fn contiguous(shape: [usize; 4]) -> Layout {
        let [_, s, h, d] = shape;
        // Saturating: sizes that overflow can only come with a zero size
        // elsewhere (no buffer holds them otherwise), and such a layout
        // addresses no element.
        let hd = h.saturating_mul(d);
        Layout {
            shape,
            strides: [s.saturating_mul(hd), hd, d, 1],
        }
    }

    /// A layout with explicit strides; the head dimension must have stride 1.
    pub fn strided(shape: [usize; 4], strides: [usize; 4]) -> Result<Layout> {
        if strides[3] != 1 && shape[3] > 1 {
            return Err(SdpaError::Shape(format!(
                "the head dimension must be contiguous (stride 1), found stride {}; \
                 call .contiguous() on the tensor first",
                strides[3]
            )));
        }
        let layout = Layout { shape, strides };
        layout.required_len()?;
        Ok(layout)
    }

    /// `[batch, seq, heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// Strides in elements, in the order of [`Layout::shape`].
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }
    /// The batch size.
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    /// The number of tokens.
    pub fn seq(&self) -> usize {
        self.shape[1]
    }
    /// The number of heads.
    pub fn heads(&self) -> usize {
        self.shape[2]
    }
    /// The head dimension.
    pub fn head_size(&self) -> usize {
        self.shape[3]
    }
    /// The number of elements.
    pub fn numel(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.shape.iter().fold(1usize, |a, &n| a.saturating_mul(n))
    }

    /// The offset of element `[b, s, h, 0]`.
    #[inline(always)]
    pub fn offset(&self, b: usize, s: usize, h: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2]
    }

    /// The smallest buffer length that holds every element.
    pub fn required_len(&self) -> Result<usize> {
        if self.shape.contains(&0) {
            return Ok(0);
        }
        let mut last = 0usize;
        for (n, st) in self.shape.iter().zip(self.strides) {
            last = (n - 1)
                .checked_mul(st)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| {
                    SdpaError::Shape(format!(
                        "shape {:?} with strides {:?} overflows the address space",
                        self.shape, self.strides
                    ))
                })?;
        }
        Ok(last + 1)
    }

    /// Whether no two elements share an offset (a precondition for writing).
    pub fn is_non_overlapping(&self) -> bool {
        // A tensor with no elements has nothing that could overlap.
        if self.numel() == 0 {
            return true;
        }
        let mut dims: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(self.strides)
            .filter(|(&n, _)| n > 1)
            .map(|(&n, s)| (s, n))
            .collect();
        dims.sort_unstable();
        let mut span = 0usize;
        for (stride, n) in dims {
            if stride <= span {
                return false;
            }
            span += stride * (n - 1);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_len_of_transposed_view() {
        let l = Layout::strided([2, 3, 4, 8], [96, 8, 24, 1]).unwrap();
        assert_eq!(l.required_len().unwrap(), 2 * 96);
        assert!(l.is_non_overlapping());
    }

    #[test]
    fn overlap_is_detected() {
        let l = Layout::strided([1, 4, 2, 8], [64, 8, 4, 1]).unwrap();
        assert!(!l.is_non_overlapping());
        let broadcast = Layout::strided([1, 4, 2, 8], [0, 0, 8, 1]).unwrap();
        assert!(!broadcast.is_non_overlapping());
        // No elements, nothing to overlap: an empty output is a valid buffer.
        assert!(Layout::contiguous([2, 0, 1, 64]).is_non_overlapping());
    }

    #[test]
    fn head_dim_must_be_contiguous() {
        assert!(Layout::strided([1, 1, 1, 8], [8, 8, 8, 2]).is_err());
    }

    #[test]
    fn overflowing_strides_are_refused() {
        assert!(Layout::strided([3, 2, 2, 8], [usize::MAX / 2, 8, 8, 1]).is_err());
    }
}
