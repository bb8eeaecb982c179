//! The parameters an attention layer is built from, as FastVideo's
//! `AttentionImpl.__init__`.

use crate::select::BackendKind;

/// Construction parameters of an attention layer.
///
/// ```
/// use sdpa_runtime::AttentionParams;
/// let p = AttentionParams::new(32, 128).causal(true).num_kv_heads(8);
/// assert_eq!(p.scale(), 1.0 / (128f32).sqrt());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionParams {
    /// Query heads.
    pub num_heads: usize,
    /// The head dimension `D`.
    pub head_size: usize,
    /// Top-left aligned causal masking (query `i` sees keys `j <= i`).
    pub causal: bool,
    /// Multiplies `q·kᵀ`; `None` means `1/sqrt(head_size)`.
    pub softmax_scale: Option<f32>,
    /// Key/value heads; `None` means `num_heads`. Must divide `num_heads`.
    pub num_kv_heads: Option<usize>,
    /// The layer's name, for logs.
    pub prefix: String,
    /// Dropout probability; only 0 is supported.
    pub dropout_p: f64,
    /// An explicit backend; `None` defers to `SDPA_BACKEND`, then `auto`.
    pub backend: Option<BackendKind>,
}

impl AttentionParams {
    /// Parameters with FastVideo's defaults: not causal, scale
    /// `1/sqrt(head_size)`, as many kv heads as query heads, no dropout.
    pub fn new(num_heads: usize, head_size: usize) -> Self {
        AttentionParams {
            num_heads,
            head_size,
            causal: false,
            softmax_scale: None,
            num_kv_heads: None,
            prefix: String::new(),
            dropout_p: 0.0,
            backend: None,
        }
    }
    /// Sets causal masking.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the softmax scale.
    pub fn softmax_scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }
    /// Sets the number of key/value heads (GQA/MQA).
    pub fn num_kv_heads(mut self, n: usize) -> Self {
        self.num_kv_heads = Some(n);
        self
    }
    /// Sets the layer's name.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Sets the dropout probability (FastVideo's extra `dropout_p`).
    pub fn dropout_p(mut self, p: f64) -> Self {
        self.dropout_p = p;
        self
    }
    /// Chooses a backend explicitly, overriding `SDPA_BACKEND`.
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = Some(backend);
        self
    }
    /// The effective softmax scale.
    pub fn scale(&self) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (self.head_size as f32).sqrt())
    }
    /// The effective number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
}
