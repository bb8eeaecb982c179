//! Attention masks, in the forms FastVideo normalises before calling torch.
//!
//! - dtype: `bool` (true = attend), integer (non-zero = attend) or floating
//!   (added to the scaled scores; `-inf` hides a key).
//! - shape: `[B, Sk]` (key padding), `[B, Sq, Sk]` or `[B, H, Sq, Sk]`, row
//!   major. The batch, head and query dimensions may be 1 and are then
//!   broadcast; the head dimension counts query heads.
//! - A last dimension `L` shorter than `Sk` is front-padded with "attend":
//!   key `j` reads mask column `j - (Sk - L)`, and keys before `Sk - L` are
//!   always seen. A longer one is an error.
//!
//! - where: host memory ([`AttnMask::new`] over a [`MaskData`]) or CUDA
//!   device memory ([`AttnMask::from_cuda`] over a [`CudaMaskData`]). The
//!   CUDA backend reads either in place, as stored (a host mask is copied
//!   to the device as it is); the CPU backend takes host masks only.
//!
//! A mask that depends on the batch and the key only, and only attends or
//! hides, each batch's visible keys one run, is key padding:
//! [`ResolvedMask::key_runs`] finds the runs, which backends may use
//! instead of reading the mask.
//!
//! ```
//! use sdpa_runtime::AttnMask;
//! // Two sequences of 4 keys; the second has one padding token at the end.
//! let keep = [true, true, true, true, true, true, true, false];
//! let mask = AttnMask::new(&keep[..], &[2, 4]).unwrap();
//! assert_eq!(mask.shape(), &[2, 4]);
//! ```

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView};
use half::{bf16, f16};
pub use kernels_gen::attention::mask::MaskKind;

use crate::error::{Result, SdpaError};
use crate::storage::{on_device, CudaRef, Residence};

/// The elements of a mask.
#[derive(Clone, Copy, Debug)]
pub enum MaskData<'a> {
    /// `true` = attend.
    Bool(&'a [bool]),
    /// Non-zero = attend.
    U8(&'a [u8]),
    /// Non-zero = attend.
    I32(&'a [i32]),
    /// Non-zero = attend.
    I64(&'a [i64]),
    /// Added to the scores.
    F32(&'a [f32]),
    /// Added to the scores.
    F16(&'a [f16]),
    /// Added to the scores.
    BF16(&'a [bf16]),
}

macro_rules! mask_from {
    ($($t:ty => $v:ident),*) => {$(
        impl<'a> From<&'a [$t]> for MaskData<'a> {
            fn from(s: &'a [$t]) -> Self { MaskData::$v(s) }
        }
        impl<'a> From<&'a Vec<$t>> for MaskData<'a> {
            fn from(s: &'a Vec<$t>) -> Self { MaskData::$v(s) }
        }
    )*};
}
mask_from!(bool => Bool, u8 => U8, i32 => I32, i64 => I64, f32 => F32, f16 => F16, bf16 => BF16);

impl MaskData<'_> {
    fn len(&self) -> usize {
        match self {
            MaskData::Bool(s) => s.len(),
            MaskData::U8(s) => s.len(),
            MaskData::I32(s) => s.len(),
            MaskData::I64(s) => s.len(),
            MaskData::F32(s) => s.len(),
            MaskData::F16(s) => s.len(),
            MaskData::BF16(s) => s.len(),
        }
    }

    /// The name of the element type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MaskData::Bool(_) => "bool",
            MaskData::U8(_) => "u8",
            MaskData::I32(_) => "i32",
            MaskData::I64(_) => "i64",
            MaskData::F32(_) => "f32",
            MaskData::F16(_) => "f16",
            MaskData::BF16(_) => "bf16",
        }
    }

    /// The element kind the kernels read (`bool` is stored as `u8`).
    pub fn kind(&self) -> MaskKind {
        match self {
            MaskData::Bool(_) | MaskData::U8(_) => MaskKind::U8,
            MaskData::I32(_) => MaskKind::I32,
            MaskData::I64(_) => MaskKind::I64,
            MaskData::F32(_) => MaskKind::F32,
            MaskData::F16(_) => MaskKind::F16,
            MaskData::BF16(_) => MaskKind::Bf16,
        }
    }

    /// The address of element `start` and the bytes of `n` elements from
    /// it (clamped to the data).
    fn span(&self, start: usize, n: usize) -> (*const u8, usize) {
        fn of<T>(s: &[T], start: usize, n: usize) -> (*const u8, usize) {
            let start = start.min(s.len());
            let n = n.min(s.len() - start);
            (s[start..].as_ptr().cast(), n * std::mem::size_of::<T>())
        }
        match self {
            MaskData::Bool(s) => of(s, start, n),
            MaskData::U8(s) => of(s, start, n),
            MaskData::I32(s) => of(s, start, n),
            MaskData::I64(s) => of(s, start, n),
            MaskData::F32(s) => of(s, start, n),
            MaskData::F16(s) => of(s, start, n),
            MaskData::BF16(s) => of(s, start, n),
        }
    }

    /// Writes the additive bias of `n` consecutive elements from `start`.
    /// Inlined into the CPU kernels, whose instruction sets then vectorise
    /// the conversions.
    #[inline(always)]
    fn bias_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        fn hide(attend: bool) -> f32 {
            if attend {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        }
        match self {
            MaskData::Bool(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = hide(x)
                }
            }
            MaskData::U8(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = hide(x != 0)
                }
            }
            MaskData::I32(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = hide(x != 0)
                }
            }
            MaskData::I64(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = hide(x != 0)
                }
            }
            MaskData::F32(s) => out.copy_from_slice(&s[start..start + n]),
            MaskData::F16(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = x.to_f32()
                }
            }
            MaskData::BF16(s) => {
                for (o, &x) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = x.to_f32()
                }
            }
        }
    }
}

/// The elements of a mask, owned: what a file reader or a generator makes
/// before borrowing it as an [`AttnMask`].
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedMaskData {
    /// `true` = attend.
    Bool(Vec<bool>),
    /// Non-zero = attend.
    U8(Vec<u8>),
    /// Non-zero = attend.
    I32(Vec<i32>),
    /// Non-zero = attend.
    I64(Vec<i64>),
    /// Added to the scores.
    F32(Vec<f32>),
    /// Added to the scores.
    F16(Vec<f16>),
    /// Added to the scores.
    BF16(Vec<bf16>),
}

impl OwnedMaskData {
    /// Borrows the elements.
    pub fn as_data(&self) -> MaskData<'_> {
        match self {
            OwnedMaskData::Bool(v) => MaskData::Bool(v),
            OwnedMaskData::U8(v) => MaskData::U8(v),
            OwnedMaskData::I32(v) => MaskData::I32(v),
            OwnedMaskData::I64(v) => MaskData::I64(v),
            OwnedMaskData::F32(v) => MaskData::F32(v),
            OwnedMaskData::F16(v) => MaskData::F16(v),
            OwnedMaskData::BF16(v) => MaskData::BF16(v),
        }
    }
}

/// The elements of a mask in CUDA device memory, read in place by the
/// kernels (never copied).
#[derive(Clone, Copy, Debug)]
pub enum CudaMaskData<'a> {
    /// `true` = attend (one byte per element).
    Bool(CudaRef<'a, bool>),
    /// Non-zero = attend.
    U8(CudaRef<'a, u8>),
    /// Non-zero = attend.
    I32(CudaRef<'a, i32>),
    /// Non-zero = attend.
    I64(CudaRef<'a, i64>),
    /// Added to the scores.
    F32(CudaRef<'a, f32>),
    /// Added to the scores.
    F16(CudaRef<'a, f16>),
    /// Added to the scores.
    BF16(CudaRef<'a, bf16>),
}

macro_rules! cuda_mask_from {
    ($($t:ty => $v:ident),*) => {$(
        impl<'a> From<CudaRef<'a, $t>> for CudaMaskData<'a> {
            fn from(s: CudaRef<'a, $t>) -> Self { CudaMaskData::$v(s) }
        }
        impl<'a> From<&'a CudaSlice<$t>> for CudaMaskData<'a> {
            fn from(s: &'a CudaSlice<$t>) -> Self { CudaMaskData::$v(s.into()) }
        }
        impl<'a> From<&'a CudaView<'a, $t>> for CudaMaskData<'a> {
            fn from(s: &'a CudaView<'a, $t>) -> Self { CudaMaskData::$v(s.into()) }
        }
    )*};
}
cuda_mask_from!(
    bool => Bool, u8 => U8, i32 => I32, i64 => I64, f32 => F32, f16 => F16, bf16 => BF16
);

/// Applies `$e` to the `CudaRef` inside a [`CudaMaskData`].
macro_rules! on_cuda_mask {
    ($d:expr, $r:ident => $e:expr) => {
        match $d {
            CudaMaskData::Bool($r) => $e,
            CudaMaskData::U8($r) => $e,
            CudaMaskData::I32($r) => $e,
            CudaMaskData::I64($r) => $e,
            CudaMaskData::F32($r) => $e,
            CudaMaskData::F16($r) => $e,
            CudaMaskData::BF16($r) => $e,
        }
    };
}

impl<'a> CudaMaskData<'a> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        on_cuda_mask!(self, r => r.len())
    }

    /// Whether there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name of the element type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            CudaMaskData::Bool(_) => "bool",
            CudaMaskData::U8(_) => "u8",
            CudaMaskData::I32(_) => "i32",
            CudaMaskData::I64(_) => "i64",
            CudaMaskData::F32(_) => "f32",
            CudaMaskData::F16(_) => "f16",
            CudaMaskData::BF16(_) => "bf16",
        }
    }

    /// The element kind the kernels read (`bool` is read as `u8`).
    pub fn kind(&self) -> MaskKind {
        match self {
            CudaMaskData::Bool(_) | CudaMaskData::U8(_) => MaskKind::U8,
            CudaMaskData::I32(_) => MaskKind::I32,
            CudaMaskData::I64(_) => MaskKind::I64,
            CudaMaskData::F32(_) => MaskKind::F32,
            CudaMaskData::F16(_) => MaskKind::F16,
            CudaMaskData::BF16(_) => MaskKind::Bf16,
        }
    }

    /// The device the elements live on.
    pub fn residence(&self) -> Residence {
        on_cuda_mask!(self, r => on_device(r.stream()))
    }

    /// The stream the memory was allocated on.
    pub fn stream(&self) -> &'a std::sync::Arc<cudarc::driver::CudaStream> {
        on_cuda_mask!(self, r => r.stream())
    }

    /// The address for reading on `stream`, and the guard that records the
    /// read on `stream` once dropped after the work that reads it.
    pub(crate) fn device_ptr<'s>(
        &'s self,
        stream: &'s cudarc::driver::CudaStream,
    ) -> (u64, cudarc::driver::SyncOnDrop<'s>) {
        on_cuda_mask!(self, r => r.device_ptr(stream))
    }
}

/// Where a mask's elements are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum MaskElems<'a> {
    /// Host memory.
    Host(MaskData<'a>),
    /// CUDA device memory.
    Cuda(CudaMaskData<'a>),
}

impl MaskElems<'_> {
    fn len(&self) -> usize {
        match self {
            MaskElems::Host(d) => d.len(),
            MaskElems::Cuda(d) => d.len(),
        }
    }
}

/// An attention mask: row-major elements (in host or device memory) and a
/// shape of rank 2, 3 or 4.
#[derive(Clone, Debug)]
pub struct AttnMask<'a> {
    data: MaskElems<'a>,
    shape: Vec<usize>,
}

impl<'a> AttnMask<'a> {
    /// A mask over `data` with `shape` (`[B, Sk]`, `[B, Sq, Sk]` or
    /// `[B, H, Sq, Sk]`); `data` must hold exactly the shape's elements.
    pub fn new(data: impl Into<MaskData<'a>>, shape: &[usize]) -> Result<Self> {
        Self::with_elems(MaskElems::Host(data.into()), shape)
    }

    /// A mask over elements in CUDA device memory (`&CudaSlice<T>`,
    /// `&CudaView<T>` or a [`CudaRef`] of `bool`, `u8`, `i32`, `i64`,
    /// `f32`, `f16` or `bf16`) with `shape`, as [`AttnMask::new`]: the same
    /// shapes, broadcasts and front padding. The CUDA backend reads it in
    /// place on its device (which must be `q`'s); the CPU backend refuses
    /// it.
    pub fn from_cuda(data: impl Into<CudaMaskData<'a>>, shape: &[usize]) -> Result<Self> {
        Self::with_elems(MaskElems::Cuda(data.into()), shape)
    }

    fn with_elems(data: MaskElems<'a>, shape: &[usize]) -> Result<Self> {
        if !(2..=4).contains(&shape.len()) {
            return Err(SdpaError::Mask(format!(
                "a mask of rank {} (shape {shape:?}) is not supported; pass [B, Sk], \
                 [B, Sq, Sk] or [B, H, Sq, Sk]",
                shape.len()
            )));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| SdpaError::Mask(format!("mask shape {shape:?} overflows")))?;
        if n != data.len() {
            return Err(SdpaError::Mask(format!(
                "mask shape {shape:?} has {n} elements but its buffer holds {}",
                data.len()
            )));
        }
        Ok(AttnMask {
            data,
            shape: shape.to_vec(),
        })
    }

    /// The shape as given.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, where they are in host memory.
    pub fn host_data(&self) -> Option<&MaskData<'a>> {
        match &self.data {
            MaskElems::Host(d) => Some(d),
            MaskElems::Cuda(_) => None,
        }
    }

    /// The elements, where they are in device memory.
    pub fn cuda_data(&self) -> Option<&CudaMaskData<'a>> {
        match &self.data {
            MaskElems::Host(_) => None,
            MaskElems::Cuda(d) => Some(d),
        }
    }

    /// Where the elements live.
    pub fn residence(&self) -> Residence {
        match &self.data {
            MaskElems::Host(_) => Residence::Host,
            MaskElems::Cuda(d) => d.residence(),
        }
    }

    /// Checks the mask against the problem's sizes and computes how kernels
    /// index it.
    pub(crate) fn resolve(
        &self,
        batch: usize,
        heads: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> Result<ResolvedMask<'a>> {
        let s = &self.shape;
        let (bm, hm, qm, len) = match s.len() {
            2 => (s[0], 1, 1, s[1]),
            3 => (s[0], 1, s[1], s[2]),
            _ => (s[0], s[1], s[2], s[3]),
        };
        let bad = |what: &str, found: usize, want: usize| {
            let expected = if want == 1 {
                "1".to_string()
            } else {
                format!("{want} or 1")
            };
            SdpaError::Mask(format!(
                "mask shape {s:?} does not fit q [B={batch}, Sq={seq_q}, H={heads}] and \
                 k [Sk={seq_k}]: its {what} dimension is {found}, expected {expected}"
            ))
        };
        if bm != batch && bm != 1 {
            return Err(bad("batch", bm, batch));
        }
        if hm != heads && hm != 1 {
            return Err(bad("head", hm, heads));
        }
        if qm != seq_q && qm != 1 {
            return Err(bad("query", qm, seq_q));
        }
        if len > seq_k {
            return Err(SdpaError::Mask(format!(
                "mask shape {s:?} has {len} key columns but k has only {seq_k} keys; \
                 a mask may be shorter than Sk (it is front-padded with attend) but not longer"
            )));
        }
        let stride_q = len;
        let stride_h = qm * len;
        let stride_b = hm * qm * len;
        Ok(ResolvedMask {
            data: self.data,
            batch,
            dims: [bm, hm, qm],
            seq_k,
            stride_b: if bm == 1 { 0 } else { stride_b },
            stride_h: if hm == 1 { 0 } else { stride_h },
            stride_q: if qm == 1 { 0 } else { stride_q },
            pad: seq_k - len,
        })
    }
}

/// A mask checked against one problem: where row `(b, h, i)` starts and how
/// many leading keys are padding.
#[derive(Clone, Copy, Debug)]
pub struct ResolvedMask<'a> {
    data: MaskElems<'a>,
    /// The problem's batch size.
    batch: usize,
    /// The batch, head and query sizes as stored (1 where broadcast).
    dims: [usize; 3],
    seq_k: usize,
    stride_b: usize,
    stride_h: usize,
    stride_q: usize,
    pad: usize,
}

impl<'a> ResolvedMask<'a> {
    /// The elements, where they are in host memory.
    pub fn host_data(&self) -> Option<MaskData<'a>> {
        match self.data {
            MaskElems::Host(d) => Some(d),
            MaskElems::Cuda(_) => None,
        }
    }

    /// The elements, where they are in device memory.
    pub fn cuda_data(&self) -> Option<CudaMaskData<'a>> {
        match self.data {
            MaskElems::Host(_) => None,
            MaskElems::Cuda(d) => Some(d),
        }
    }

    /// The same mask over other host elements (as many, in the same
    /// order): a device mask's copy on the host.
    pub(crate) fn with_host_data<'b>(&self, data: MaskData<'b>) -> ResolvedMask<'b> {
        debug_assert_eq!(data.len(), self.data.len());
        ResolvedMask {
            data: MaskElems::Host(data),
            batch: self.batch,
            dims: self.dims,
            seq_k: self.seq_k,
            stride_b: self.stride_b,
            stride_h: self.stride_h,
            stride_q: self.stride_q,
            pad: self.pad,
        }
    }

    /// The element kind the kernels read.
    pub fn kind(&self) -> MaskKind {
        match &self.data {
            MaskElems::Host(d) => d.kind(),
            MaskElems::Cuda(d) => d.kind(),
        }
    }

    /// Whether the elements are an additive (floating) bias.
    pub fn is_float(&self) -> bool {
        matches!(self.kind(), MaskKind::F32 | MaskKind::F16 | MaskKind::Bf16)
    }

    /// Where the elements live.
    pub fn residence(&self) -> Residence {
        match &self.data {
            MaskElems::Host(_) => Residence::Host,
            MaskElems::Cuda(d) => d.residence(),
        }
    }

    /// The batch, head and query sizes as stored (1 where broadcast).
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// The element strides of the batch, head and query dimensions, 0
    /// where broadcast (the key dimension is contiguous): the launch
    /// contract's `mask_stride_b`, `mask_stride_h`, `mask_stride_q`.
    pub fn strides(&self) -> [usize; 3] {
        [self.stride_b, self.stride_h, self.stride_q]
    }

    /// The leading keys that always attend (`Sk` minus the mask's last
    /// dimension): the launch contract's `mask_pad`.
    pub fn pad(&self) -> usize {
        self.pad
    }

    /// The number of stored elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no element is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key-padding runs of a host mask, one per batch entry of the
    /// problem, where the mask is key padding: it depends on the batch and
    /// the key only (head and query dimensions 1), every element attends or
    /// hides (`bool`, integers, or floats whose values are only `0` and
    /// `-inf`), and each batch entry's visible keys (front padding
    /// included) form one contiguous run `lo..hi` (`0..0` where it sees
    /// none). `None` otherwise, and for masks in device memory (not read).
    pub fn key_runs(&self) -> Option<KeyRuns> {
        let MaskElems::Host(_) = self.data else {
            return None;
        };
        let [bm, hm, qm] = self.dims;
        if hm != 1 || qm != 1 {
            return None;
        }
        let mut row = vec![0.0f32; self.seq_k];
        let mut stored = Vec::with_capacity(bm);
        for b in 0..bm {
            self.bias_row(b, 0, 0, 0, &mut row);
            let mut run: Option<Range<usize>> = None;
            for (j, &x) in row.iter().enumerate() {
                if x == 0.0 {
                    match &mut run {
                        None => run = Some(j..j + 1),
                        Some(r) if r.end == j => r.end = j + 1,
                        // A second run.
                        Some(_) => return None,
                    }
                } else if x != f32::NEG_INFINITY {
                    return None;
                }
            }
            stored.push(run.unwrap_or(0..0));
        }
        let runs = (0..self.batch)
            .map(|b| stored[if bm == 1 { 0 } else { b }].clone())
            .collect();
        Some(KeyRuns(runs))
    }

    /// The mask as a dense `f32` additive bias: row-major `[B', H', Sq', Sk]`
    /// where each of `B'`, `H'`, `Sq'` is the problem's size or 1 (broadcast),
    /// with front padding filled in and booleans and integers turned into
    /// `0` / `-inf`. Returns the buffer and the element strides of the batch,
    /// head and query dimensions, 0 where broadcast: the mask format of the
    /// GPU launch contract (`kernels_gen::contract`).
    pub fn dense_bias(&self) -> (Vec<f32>, [usize; 3]) {
        let [bm, hm, qm] = self.dims;
        let sk = self.seq_k;
        let mut data = vec![0.0f32; bm * hm * qm * sk];
        if sk > 0 {
            let mut rows = data.chunks_exact_mut(sk);
            for b in 0..bm {
                for h in 0..hm {
                    for i in 0..qm {
                        if let Some(row) = rows.next() {
                            self.bias_row(b, h, i, 0, row);
                        }
                    }
                }
            }
        }
        let stride = |n: usize, s: usize| if n == 1 { 0 } else { s };
        let strides = [
            stride(bm, hm * qm * sk),
            stride(hm, qm * sk),
            stride(qm, sk),
        ];
        (data, strides)
    }

    /// Writes the additive bias for keys `j0..j0 + out.len()` of query row
    /// `i` of batch `b`, head `h`: 0 to attend, `-inf` to hide, or the float
    /// mask's value.
    ///
    /// Host masks only: the CPU backend refuses device masks before its
    /// kernels run, and this panics on one.
    #[inline(always)]
    pub fn bias_row(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [f32]) {
        let MaskElems::Host(data) = &self.data else {
            panic!("bias_row reads host masks; a device mask reached a host reader");
        };
        let (n_pad, start) = self.stored_keys(b, h, i, j0, out.len());
        out[..n_pad].fill(0.0);
        if n_pad < out.len() {
            data.bias_into(start, &mut out[n_pad..]);
        }
    }

    /// Where keys `j0..j0 + n` of query row `i` of batch `b`, head `h`
    /// are: how many of them lie in the front padding (not stored;
    /// "attend"), and the element index of the first stored one (meaningful
    /// only when some key is stored).
    #[inline(always)]
    fn stored_keys(&self, b: usize, h: usize, i: usize, j0: usize, n: usize) -> (usize, usize) {
        let row = b * self.stride_b + h * self.stride_h + i * self.stride_q;
        let n_pad = self.pad.saturating_sub(j0).min(n);
        (n_pad, (row + j0 + n_pad).saturating_sub(self.pad))
    }

    /// The host memory that [`bias_row`](Self::bias_row) reads for keys
    /// `j0..j0 + n` of query row `i` of batch `b`, head `h`: its first byte
    /// and its length in bytes (0 where the keys are all front padding, or
    /// for a device mask). For prefetching: the address is never read.
    pub fn row_span(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j0: usize,
        n: usize,
    ) -> (*const u8, usize) {
        let MaskElems::Host(data) = &self.data else {
            return (std::ptr::null(), 0);
        };
        let (n_pad, start) = self.stored_keys(b, h, i, j0, n);
        if n_pad == n {
            return (std::ptr::null(), 0);
        }
        data.span(start, n - n_pad)
    }

    /// The first row, as `[b, h, i]` in the mask's own (possibly
    /// broadcast) sizes, that a finite bias at or below `limit` hides from
    /// every key it sees (keys `0..=i` when `causal`, top-left, else all):
    /// the rows whose log-sum-exp is as large as the bias. A row broadcast
    /// over the queries is checked for its most hidden query.
    pub fn row_hidden_by_finite(&self, limit: f32, causal: bool) -> Option<[usize; 3]> {
        const CHUNK: usize = 64;
        let [bm, hm, qm] = self.dims;
        let mut chunk = [0.0f32; CHUNK];
        for b in 0..bm {
            for h in 0..hm {
                for i in 0..qm {
                    // The keys the row sees; a broadcast row's most hidden
                    // causal query is query 0.
                    let seen = if causal {
                        let last = if qm == 1 { 0 } else { i };
                        (last + 1).min(self.seq_k)
                    } else {
                        self.seq_k
                    };
                    // Read in chunks, stopping at the first key the row
                    // sees with a bias above the limit (most rows: at once).
                    let mut max = f32::NEG_INFINITY;
                    let mut j0 = 0;
                    while j0 < seen && max <= limit {
                        let n = CHUNK.min(seen - j0);
                        self.bias_row(b, h, i, j0, &mut chunk[..n]);
                        max = chunk[..n].iter().copied().fold(max, f32::max);
                        j0 += n;
                    }
                    if max.is_finite() && max <= limit {
                        return Some([b, h, i]);
                    }
                }
            }
        }
        None
    }
}

/// Key-padding runs: for each batch entry, the one contiguous run of keys
/// `lo..hi` it sees ([`ResolvedMask::key_runs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRuns(Vec<Range<usize>>);

impl KeyRuns {
    /// The runs, one per batch entry.
    pub fn runs(&self) -> &[Range<usize>] {
        &self.0
    }

    /// Whether every run starts at key 0 (the GPU kernels' causal rule is
    /// in local positions, so only such runs keep causal's meaning there).
    pub fn all_start_at_zero(&self) -> bool {
        self.0.iter().all(|r| r.start == 0)
    }

    /// Whether every run is every key `0..seq_k` (nothing hidden).
    pub fn is_full(&self, seq_k: usize) -> bool {
        self.0.iter().all(|r| *r == (0..seq_k))
    }

    /// The launch contract's `k_start` array followed by its `k_end` array
    /// (`i32`, one entry per batch entry each).
    pub fn starts_then_ends(&self) -> Vec<i32> {
        let starts = self.0.iter().map(|r| r.start as i32);
        let ends = self.0.iter().map(|r| r.end as i32);
        starts.chain(ends).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_the_size_it_expected() {
        let m = [true; 8];
        let mask = AttnMask::new(&m[..], &[2, 4]).unwrap();
        let err = mask.resolve(1, 1, 1, 4).unwrap_err().to_string();
        assert!(err.contains("batch dimension is 2, expected 1"), "{err}");
        assert!(!err.contains("1 or 1"), "{err}");
        let err = mask.resolve(3, 1, 1, 4).unwrap_err().to_string();
        assert!(err.contains("expected 3 or 1"), "{err}");
    }

    #[test]
    fn rows_hidden_by_large_finite_values_are_found() {
        let big = -1e9f32;
        // [B=2, Sk=3] key padding (broadcast over heads and queries): batch 1
        // hides every key.
        let m = [0.0, big, 0.0, big, big, big];
        let r = AttnMask::new(&m[..], &[2, 3])
            .unwrap()
            .resolve(2, 1, 4, 3)
            .unwrap();
        assert_eq!(r.row_hidden_by_finite(-65536.0, false), Some([1, 0, 0]));
        // -inf hides too, but its lse is -inf, not large: not reported.
        let inf = f32::NEG_INFINITY;
        let m = [0.0, big, 0.0, inf, inf, inf];
        let r = AttnMask::new(&m[..], &[2, 3])
            .unwrap()
            .resolve(2, 1, 4, 3)
            .unwrap();
        assert_eq!(r.row_hidden_by_finite(-65536.0, false), None);
        // Causal: query 0 sees key 0 only, which this mask hides; a
        // non-causal row still sees key 1.
        let m = [big, 0.0, 0.0];
        let r = AttnMask::new(&m[..], &[1, 3])
            .unwrap()
            .resolve(1, 1, 2, 3)
            .unwrap();
        assert_eq!(r.row_hidden_by_finite(-65536.0, false), None);
        assert_eq!(r.row_hidden_by_finite(-65536.0, true), Some([0, 0, 0]));
        // Long rows are read in chunks: a key seen only in the last chunk
        // keeps the row; none seen hides it.
        let mut m = vec![big; 2 * 150];
        m[149] = 0.0;
        let r = AttnMask::new(&m[..], &[2, 150])
            .unwrap()
            .resolve(2, 1, 1, 150)
            .unwrap();
        assert_eq!(r.row_hidden_by_finite(-65536.0, false), Some([1, 0, 0]));
        // Values above the limit are left to the kernels.
        let m = [-1000.0f32; 3];
        let r = AttnMask::new(&m[..], &[1, 3])
            .unwrap()
            .resolve(1, 1, 2, 3)
            .unwrap();
        assert_eq!(r.row_hidden_by_finite(-65536.0, false), None);
    }

    #[test]
    fn front_padding_attends() {
        let m = [false, true];
        let mask = AttnMask::new(&m[..], &[1, 2]).unwrap();
        let r = mask.resolve(1, 1, 1, 4).unwrap();
        let mut out = [1.0f32; 4];
        r.bias_row(0, 0, 0, 0, &mut out);
        assert_eq!(out, [0.0, 0.0, f32::NEG_INFINITY, 0.0]);
        let mut tail = [1.0f32; 2];
        r.bias_row(0, 0, 0, 1, &mut tail);
        assert_eq!(tail, [0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn long_masks_are_refused() {
        let m = [1i64; 5];
        let mask = AttnMask::new(&m[..], &[1, 5]).unwrap();
        assert!(mask.resolve(1, 1, 1, 4).is_err());
    }

    #[test]
    fn wrong_rank_and_length_are_refused() {
        let m = [0.0f32; 8];
        assert!(AttnMask::new(&m[..], &[8]).is_err());
        assert!(AttnMask::new(&m[..], &[3, 3]).is_err());
    }

    #[test]
    fn dense_bias_fills_padding_and_broadcasts() {
        // Key padding [B=2, 3 of Sk=4]: one leading key always attends.
        let m = [true, false, true, false, true, true];
        let mask = AttnMask::new(&m[..], &[2, 3]).unwrap();
        let (dense, strides) = mask.resolve(2, 5, 7, 4).unwrap().dense_bias();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(dense, [0.0, 0.0, ninf, 0.0, 0.0, ninf, 0.0, 0.0]);
        assert_eq!(strides, [4, 0, 0]);

        // Float [1, H=2, Sq=1, Sk=2]: broadcast over batch and queries.
        let f = [1.5f32, -2.0, 0.25, ninf];
        let mask = AttnMask::new(&f[..], &[1, 2, 1, 2]).unwrap();
        let (dense, strides) = mask.resolve(3, 2, 9, 2).unwrap().dense_bias();
        assert_eq!(dense, f);
        assert_eq!(strides, [0, 2, 0]);

        // Integers [B=1, Sq=2, Sk=2], nothing broadcast but the batch.
        let i = [0i64, 7, 1, 0];
        let mask = AttnMask::new(&i[..], &[1, 2, 2]).unwrap();
        let (dense, strides) = mask.resolve(1, 1, 2, 2).unwrap().dense_bias();
        assert_eq!(dense, [ninf, 0.0, 0.0, ninf]);
        assert_eq!(strides, [0, 0, 2]);
    }

    #[test]
    fn head_broadcast_and_mismatch() {
        let m = [0.0f32; 2 * 3 * 4];
        let mask = AttnMask::new(&m[..], &[2, 1, 3, 4]).unwrap();
        assert!(mask.resolve(2, 8, 3, 4).is_ok());
        let mask = AttnMask::new(&m[..], &[2, 3, 1, 4]).unwrap();
        let err = mask.resolve(2, 8, 1, 4).unwrap_err().to_string();
        assert!(err.contains("head dimension is 3"), "{err}");
    }

    fn runs_of<'a>(
        m: impl Into<MaskData<'a>>,
        shape: &[usize],
        b: usize,
        sk: usize,
    ) -> Option<KeyRuns> {
        AttnMask::new(m, shape)
            .unwrap()
            .resolve(b, 2, 3, sk)
            .unwrap()
            .key_runs()
    }

    #[test]
    fn key_padding_gives_one_run_per_batch_entry() {
        // [B=3, Sk=4]: keys 0..2, 1..4, none.
        let m = [
            true, true, false, false, false, true, true, true, false, false, false, false,
        ];
        let runs = runs_of(&m[..], &[3, 4], 3, 4).unwrap();
        assert_eq!(runs.runs(), [0..2, 1..4, 0..0]);
        assert!(!runs.all_start_at_zero());
        assert!(!runs.is_full(4));
        assert_eq!(runs.starts_then_ends(), [0, 1, 0, 2, 4, 0]);
        // Integers, [B, 1, Sk] and [B, 1, 1, Sk] shapes, and a batch of 1
        // broadcast to the problem's.
        let i = [0i64, 5, 5, 0];
        assert_eq!(
            runs_of(&i[..], &[1, 1, 4], 2, 4).unwrap().runs(),
            [1..3, 1..3]
        );
        assert_eq!(
            runs_of(&i[..], &[1, 1, 1, 4], 1, 4).unwrap().runs()[0],
            1..3
        );
        // A short mask: its front padding attends and joins the run.
        let short = [true, false];
        let runs = runs_of(&short[..], &[1, 2], 1, 5).unwrap();
        assert_eq!(runs.runs()[0], 0..4);
        assert!(runs.all_start_at_zero());
        // Everything seen.
        let all = [1u8; 4];
        assert!(runs_of(&all[..], &[1, 4], 2, 4).unwrap().is_full(4));
    }

    #[test]
    fn masks_that_are_not_key_padding_have_no_runs() {
        // Two runs in one entry.
        let m = [true, false, true, true];
        assert_eq!(runs_of(&m[..], &[1, 4], 1, 4), None);
        // Short mask whose padding and visible keys are apart.
        let short = [false, true];
        assert_eq!(runs_of(&short[..], &[1, 2], 1, 4), None);
        // Depends on the query or the head.
        let q = [true; 3 * 4];
        assert_eq!(runs_of(&q[..], &[1, 3, 4], 1, 4), None);
        let h = [true; 2 * 4];
        assert_eq!(runs_of(&h[..], &[1, 2, 1, 4], 1, 4), None);
    }

    #[test]
    fn float_masks_have_runs_only_with_zero_and_minus_infinity() {
        let inf = f32::NEG_INFINITY;
        let m = [inf, 0.0, -0.0, inf];
        assert_eq!(runs_of(&m[..], &[1, 4], 1, 4).unwrap().runs()[0], 1..3);
        let h = [f16::NEG_INFINITY, f16::ZERO, f16::ZERO];
        assert_eq!(runs_of(&h[..], &[1, 3], 1, 3).unwrap().runs()[0], 1..3);
        for other in [-1e9f32, 1.0, -0.5, f32::NAN, f32::INFINITY] {
            let m = [0.0, other, 0.0, 0.0];
            assert_eq!(runs_of(&m[..], &[1, 4], 1, 4), None, "{other}");
        }
        // -1e9 hides in torch's sense but is a finite bias: not a run.
        let m = [0.0f32, 0.0, -1e9, -1e9];
        assert_eq!(runs_of(&m[..], &[1, 4], 1, 4), None);
    }

    #[test]
    fn kinds_strides_and_padding_are_the_launch_contracts() {
        let m = [1i32; 2 * 3];
        let r = AttnMask::new(&m[..], &[2, 1, 3])
            .unwrap()
            .resolve(2, 4, 5, 7)
            .unwrap();
        assert_eq!(r.kind(), MaskKind::I32);
        assert_eq!(r.strides(), [3, 0, 0]);
        assert_eq!(r.pad(), 4);
        assert_eq!(r.dims(), [2, 1, 1]);
        assert!(!r.is_float());
        let b = [true; 2];
        let r = AttnMask::new(&b[..], &[1, 2])
            .unwrap()
            .resolve(1, 1, 1, 2)
            .unwrap();
        assert_eq!(r.kind(), MaskKind::U8);
        assert_eq!(r.residence(), Residence::Host);
        let h = [bf16::ZERO; 2];
        let r = AttnMask::new(&h[..], &[1, 2])
            .unwrap()
            .resolve(1, 1, 1, 2)
            .unwrap();
        assert_eq!((r.kind(), r.is_float()), (MaskKind::Bf16, true));
    }
}
