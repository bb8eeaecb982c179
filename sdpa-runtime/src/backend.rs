//! FastVideo's backend API in Rust: [`AttentionBackend`] describes a set of
//! compiled variants and builds layers; [`AttentionImpl`] runs them.

use crate::error::{Result, SdpaError};
use crate::grad::{BackwardInputs, Gradients};
use crate::metadata::AttentionMetadata;
use crate::params::AttentionParams;
use crate::problem::Problem;
use crate::select::{select, BackendKind, Residence, Selection};
use crate::tensor::{Tensor, TensorView, TensorViewMut};
use crate::variant::{Variant, VariantTable};

/// A set of compiled attention variants, as FastVideo's `AttentionBackend`.
///
/// Implemented by `#[sdpa_variants(...)]` on a type of the consuming crate;
/// only [`variant_table`](AttentionBackend::variant_table) is generated, the
/// rest follows from it.
pub trait AttentionBackend: Send + Sync {
    /// The variants this type was declared with.
    fn variant_table(&self) -> &'static VariantTable;

    /// The backend's name: `"SDPA"`.
    fn name(&self) -> &'static str {
        "SDPA"
    }

    /// The declared head sizes.
    fn supported_head_sizes(&self) -> &'static [usize] {
        self.variant_table().head_sizes()
    }

    /// Whether `forward_into` takes a caller's output buffer: always.
    fn accept_output_buffer(&self) -> bool {
        true
    }

    /// Builds an attention layer, checking the parameters against the
    /// declared variants.
    fn build_impl(&self, params: AttentionParams) -> Result<SdpaImpl> {
        SdpaImpl::new(self.variant_table(), params)
    }
}

/// One attention layer, as FastVideo's `AttentionImpl`.
pub trait AttentionImpl: Send + Sync {
    /// Computes attention into a new `[B, Sq, Hq, D]` tensor of `q`'s dtype,
    /// living where `q` lives: host memory for host tensors (whichever
    /// backend ran), device memory on `q`'s stream for CUDA tensors.
    fn forward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<Tensor>;

    /// Computes attention into the caller's `out` (`[B, Sq, Hq, D]`, any
    /// non-overlapping strides, `q`'s dtype, in the same place as `q`). On a
    /// CUDA device the kernel is queued on `out`'s stream and the call
    /// returns without waiting for it.
    fn forward_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        out: &mut TensorViewMut<'_>,
    ) -> Result<()>;

    /// [`forward`](AttentionImpl::forward), also returning the row
    /// log-sum-exp: a new `f32` tensor of shape `[B, Hq, Sq, 1]` whose
    /// element `(b, h, i)` is the natural log of the softmax denominator of
    /// query row `i` of head `h` over the scaled, masked scores, `-inf` for
    /// a row that sees no key. The backward pass takes it. Both tensors live
    /// where `q` lives: on the CPU backend for host tensors (or on the GPU,
    /// staged through device 0, with the `cuda` backend), on `q`'s device
    /// for CUDA tensors, where the forward kernel writes the lse in the same
    /// launch.
    fn forward_with_lse(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<(Tensor, Tensor)>;

    /// [`forward_into`](AttentionImpl::forward_into), also writing the row
    /// log-sum-exp into the caller's `lse` (`f32`, `[B, Hq, Sq, 1]`, any
    /// non-overlapping strides, in the same place as `q`: a device buffer
    /// of `q`'s device for CUDA tensors, queued on `out`'s stream like the
    /// output).
    fn forward_with_lse_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        out: &mut TensorViewMut<'_>,
        lse: &mut TensorViewMut<'_>,
    ) -> Result<()>;

    /// The gradients `(dq, dk, dv)` of a loss whose gradient with respect
    /// to the forward's output `out` is `dout`, given the forward's row
    /// log-sum-exp `lse` (from [`forward_with_lse`](Self::forward_with_lse)):
    /// new tensors in q's dtype, `dq` shaped as `q`, `dk` and `dv` as `k`
    /// (summed over each key/value head's query heads). Same views, masks,
    /// scale and causal rule as the forward; masks get no gradient; rows
    /// that see no key give zeros. Deterministic: bit-identical run to run.
    /// Needs a variant declared with `backward = true`. Runs where the
    /// forward would: CUDA tensors on their device (new tensors on `q`'s
    /// stream, the kernels queued without waiting), host tensors on the
    /// CPU, or on CUDA device 0 when the layer asks for the `cuda` backend
    /// (copied there and back, as the forward does).
    #[allow(clippy::too_many_arguments)] // the signature: torch's order
    fn backward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &TensorView<'_>,
        dout: &TensorView<'_>,
        lse: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)>;

    /// [`backward`](Self::backward) into the caller's gradient buffers
    /// (any non-overlapping strides, q's dtype, in the same place as `q`).
    /// On a CUDA device the kernels are queued on `dq`'s stream and the
    /// call returns without waiting for them; every row of the device
    /// tensors must start on a 16-byte boundary.
    fn backward_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
    ) -> Result<()>;
}

/// The layer built by [`AttentionBackend::build_impl`].
#[derive(Debug, Clone)]
pub struct SdpaImpl {
    table: &'static VariantTable,
    params: AttentionParams,
    scale: f32,
    num_kv_heads: usize,
    request: BackendKind,
}

impl SdpaImpl {
    /// Checks `params` against `table` and resolves the backend request.
    pub fn new(table: &'static VariantTable, params: AttentionParams) -> Result<SdpaImpl> {
        table.check_declared(params.head_size, params.causal)?;
        if params.dropout_p != 0.0 {
            return Err(SdpaError::Dropout(params.dropout_p));
        }
        let num_kv_heads = params.kv_heads();
        if params.num_heads == 0
            || num_kv_heads == 0
            || !params.num_heads.is_multiple_of(num_kv_heads)
        {
            return Err(SdpaError::Param(format!(
                "num_heads = {} and num_kv_heads = {num_kv_heads}: both must be positive and \
                 num_heads a multiple of num_kv_heads",
                params.num_heads
            )));
        }
        let scale = params.scale();
        if !scale.is_finite() {
            return Err(SdpaError::Param(format!(
                "softmax_scale = {scale} is not finite; pass a finite scale or none for 1/sqrt(D)"
            )));
        }
        let request = BackendKind::resolve(params.backend)?;
        Ok(SdpaImpl {
            table,
            params,
            scale,
            num_kv_heads,
            request,
        })
    }

    /// The parameters the layer was built from.
    pub fn params(&self) -> &AttentionParams {
        &self.params
    }

    /// The backend request after precedence (explicit, `SDPA_BACKEND`,
    /// `auto`).
    pub fn backend_request(&self) -> BackendKind {
        self.request
    }

    fn problem<'a>(
        &self,
        q: &TensorView<'a>,
        k: &TensorView<'a>,
        v: &TensorView<'a>,
        metadata: &AttentionMetadata<'a>,
    ) -> Result<Problem<'a>> {
        let p = Problem::with_varlen(
            *q,
            *k,
            *v,
            metadata.attn_mask.as_ref(),
            metadata.varlen.as_ref(),
            self.scale,
        )?;
        let want = |what: &str, found: usize, expected: usize| -> Result<()> {
            if found == expected {
                Ok(())
            } else {
                Err(SdpaError::Shape(format!(
                    "{} was built for {what} = {expected} but the tensors have {found}",
                    self.layer_name()
                )))
            }
        };
        want("num_heads", p.heads_q, self.params.num_heads)?;
        want("num_kv_heads", p.heads_kv, self.num_kv_heads)?;
        want("head_size", p.head_size, self.params.head_size)?;
        Ok(p)
    }

    fn layer_name(&self) -> String {
        if self.params.prefix.is_empty() {
            "the attention layer".into()
        } else {
            format!("attention layer {:?}", self.params.prefix)
        }
    }
}

impl AttentionImpl for SdpaImpl {
    fn forward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<Tensor> {
        let p = self.problem(q, k, v, metadata)?;
        let (variant, selection) = self.plan(&p)?;
        let mut out = match p.residence() {
            Residence::Host => Tensor::zeros(p.dtype(), p.out_shape()),
            _ => crate::cuda::alloc_output(&p)?,
        };
        self.run(&p, variant, &selection, &mut out.view_mut(), None)?;
        Ok(out)
    }

    fn forward_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        out: &mut TensorViewMut<'_>,
    ) -> Result<()> {
        let p = self.problem(q, k, v, metadata)?;
        p.check_output(out)?;
        let (variant, selection) = self.plan(&p)?;
        self.run(&p, variant, &selection, out, None)
    }

    fn forward_with_lse(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.problem(q, k, v, metadata)?;
        let (variant, selection) = self.plan(&p)?;
        let (mut out, mut lse) = match p.residence() {
            Residence::Host => (
                Tensor::zeros(p.dtype(), p.out_shape()),
                Tensor::zeros(crate::DType::F32, p.lse_shape()),
            ),
            _ => (crate::cuda::alloc_output(&p)?, crate::cuda::alloc_lse(&p)?),
        };
        self.run(
            &p,
            variant,
            &selection,
            &mut out.view_mut(),
            Some(&mut lse.view_mut()),
        )?;
        Ok((out, lse))
    }

    fn forward_with_lse_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        out: &mut TensorViewMut<'_>,
        lse: &mut TensorViewMut<'_>,
    ) -> Result<()> {
        let p = self.problem(q, k, v, metadata)?;
        p.check_output(out)?;
        p.check_lse(lse)?;
        let (variant, selection) = self.plan(&p)?;
        self.run(&p, variant, &selection, out, Some(lse))
    }

    fn backward(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        out: &TensorView<'_>,
        dout: &TensorView<'_>,
        lse: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let p = self.problem(q, k, v, metadata)?;
        let (variant, selection) = self.backward_plan(&p)?;
        let (mut dq, mut dk, mut dv) = match p.residence() {
            Residence::Host => (
                Tensor::zeros(p.dtype(), p.out_shape()),
                Tensor::zeros(p.dtype(), p.k.layout().shape()),
                Tensor::zeros(p.dtype(), p.k.layout().shape()),
            ),
            _ => crate::cuda::backward::alloc_gradients(&p)?,
        };
        let inputs = BackwardInputs {
            out: *out,
            dout: *dout,
            lse: *lse,
        };
        let mut grads = Gradients {
            dq: dq.view_mut(),
            dk: dk.view_mut(),
            dv: dv.view_mut(),
        };
        p.check_backward(&inputs, &grads)?;
        run_backward(&p, variant, &selection, &inputs, &mut grads)?;
        Ok((dq, dk, dv))
    }

    fn backward_into(
        &self,
        q: &TensorView<'_>,
        k: &TensorView<'_>,
        v: &TensorView<'_>,
        metadata: &AttentionMetadata<'_>,
        inputs: &BackwardInputs<'_>,
        grads: &mut Gradients<'_>,
    ) -> Result<()> {
        let p = self.problem(q, k, v, metadata)?;
        p.check_backward(inputs, grads)?;
        let (variant, selection) = self.backward_plan(&p)?;
        run_backward(&p, variant, &selection, inputs, grads)
    }
}

impl SdpaImpl {
    /// The backward's variant and backend for a checked problem, after the
    /// checks that do not depend on the buffers: the variant has the
    /// backward kernel of the selected backend (the macro adds both with
    /// `backward = true`).
    fn backward_plan(&self, p: &Problem<'_>) -> Result<(&'static Variant, Selection)> {
        let (variant, selection) = self.plan(p)?;
        match selection.backend {
            BackendKind::Cuda => variant.gpu_backward().map(drop)?,
            _ => variant.cpu_backward().map(drop)?,
        }
        tracing::debug!(
            layer = %self.params.prefix,
            variant = %variant.spec(),
            backend = %selection.backend,
            reason = %selection.reason,
            shape = ?p.out_shape(),
            kv_heads = p.heads_kv,
            seq_k = p.seq_k,
            masked = p.mask.is_some(),
            "sdpa backward"
        );
        Ok((variant, selection))
    }
}

/// Runs the planned backward: the CPU kernel, or the GPU kernels where the
/// selection says CUDA (on the tensors' device, or device 0 for host
/// tensors).
fn run_backward(
    p: &Problem<'_>,
    variant: &Variant,
    selection: &Selection,
    inputs: &BackwardInputs<'_>,
    grads: &mut Gradients<'_>,
) -> Result<()> {
    match selection.backend {
        BackendKind::Cuda => crate::cuda::backward::run(variant, p, inputs, grads),
        _ => {
            p.check_cpu()?;
            (variant.cpu_backward()?)(p, inputs, grads)
        }
    }
}

impl SdpaImpl {
    /// Picks the variant and the backend for a checked problem.
    fn plan(&self, p: &Problem<'_>) -> Result<(&'static Variant, Selection)> {
        let variant = self
            .table
            .find(p.head_size, self.params.causal, p.dtype())?;
        let selection = select(self.request, p.residence())?;
        Ok((variant, selection))
    }

    /// Runs the planned variant and backend.
    fn run(
        &self,
        p: &Problem<'_>,
        variant: &Variant,
        selection: &Selection,
        out: &mut TensorViewMut<'_>,
        lse: Option<&mut TensorViewMut<'_>>,
    ) -> Result<()> {
        tracing::debug!(
            layer = %self.params.prefix,
            variant = %variant.spec(),
            backend = %selection.backend,
            reason = %selection.reason,
            shape = ?p.out_shape(),
            kv_heads = p.heads_kv,
            seq_k = p.seq_k,
            masked = p.mask.is_some(),
            lse = lse.is_some(),
            "sdpa forward"
        );
        match selection.backend {
            BackendKind::Cuda => crate::cuda::run(variant, p, out, lse),
            _ => {
                p.check_cpu()?;
                (variant.cpu_kernel())(p, out, lse)
            }
        }
    }
}
