//! The CPU kernels: tiled attention with an online softmax, generic over the
//! head size, the causal flag and the element type.
//!
//! The `#[sdpa_variants]` macro instantiates [`attention`] once per declared
//! variant, so every loop over the head dimension has a constant trip count.
//!
//! Work is split into tasks of one (batch, query head, block of
//! [`BLOCK_Q`] queries) and spread over rayon's thread pool. Each task
//! streams the keys in blocks of [`BLOCK_K`], keeping a running maximum, a
//! running sum and an `f32` accumulator per query row: memory grows with the
//! tiles, never with `Sq·Sk`.

mod tile;

use rayon::prelude::*;

use crate::element::Element;
use crate::error::{Result, SdpaError};
use crate::problem::Problem;
use crate::tensor::{Layout, TensorViewMut};

pub use tile::{BLOCK_K, BLOCK_Q};

/// Computes attention for `p` into `out` on the CPU.
///
/// `D` must equal the problem's head size, `CAUSAL` selects top-left causal
/// masking and `T` is the element type of every tensor. The macro emits one
/// instantiation per declared variant; calling it directly is fine too.
pub fn attention<const D: usize, const CAUSAL: bool, T: Element>(
    p: &Problem<'_>,
    out: &mut TensorViewMut<'_>,
) -> Result<()> {
    p.check_output(out)?;
    if p.head_size != D {
        return Err(SdpaError::Shape(format!(
            "the CPU kernel for head size {D} was called with head size {}",
            p.head_size
        )));
    }
    let not_host = |what: &str| SdpaError::BackendUnavailable {
        backend: "cpu",
        reason: format!("{what} is not in host memory of dtype {}", T::DTYPE),
    };
    let q = p.q.host_slice::<T>().ok_or_else(|| not_host("q"))?;
    let k = p.k.host_slice::<T>().ok_or_else(|| not_host("k"))?;
    let v = p.v.host_slice::<T>().ok_or_else(|| not_host("v"))?;
    let out_layout = *out.layout();
    let o = out
        .host_slice_mut::<T>()
        .ok_or_else(|| not_host("the output"))?;
    let inputs = tile::Inputs {
        p,
        q,
        k,
        v,
        q_layout: *p.q.layout(),
        k_layout: *p.k.layout(),
        v_layout: *p.v.layout(),
    };
    let sink = OutputRows {
        ptr: o.as_mut_ptr(),
        layout: out_layout,
    };
    let q_blocks = p.seq_q.div_ceil(BLOCK_Q);
    let tasks = p.batch * p.heads_q * q_blocks;
    (0..tasks)
        .into_par_iter()
        .for_each_init(tile::Workspace::<D>::new, |ws, task| {
            let qb = task % q_blocks;
            let h = (task / q_blocks) % p.heads_q;
            let b = task / (q_blocks * p.heads_q);
            tile::query_block::<D, CAUSAL, T>(&inputs, ws, b, h, qb * BLOCK_Q, &sink);
        });
    Ok(())
}

/// The output buffer, shared by the tasks, each of which writes its own rows.
pub(crate) struct OutputRows<T> {
    ptr: *mut T,
    layout: Layout,
}

// SAFETY: tasks write disjoint rows (see `write_row`); `T` is a plain number.
unsafe impl<T: Send> Send for OutputRows<T> {}
unsafe impl<T: Send> Sync for OutputRows<T> {}

impl<T: Element> OutputRows<T> {
    /// Writes the `D` elements of output row `(b, i, h)`.
    #[inline]
    pub(crate) fn write_row<const D: usize>(&self, b: usize, i: usize, h: usize, row: &[f32; D]) {
        debug_assert!(b < self.layout.batch() && i < self.layout.seq() && h < self.layout.heads());
        let base = self.layout.offset(b, i, h);
        for (d, &x) in row.iter().enumerate() {
            // SAFETY: `TensorViewMut::new` checked that the layout fits the
            // buffer (so `base + d` is in bounds for every in-range index)
            // and that no two elements overlap; each (b, i, h) row belongs to
            // exactly one task, so no two threads write the same element, and
            // the `&mut` borrow of the buffer is held for the whole parallel
            // loop in `attention`.
            unsafe { self.ptr.add(base + d).write(T::from_f32(x)) };
        }
    }
}
