//! The `#[sdpa_variants]` attribute. Use it through `sdpa-runtime`, whose
//! prelude re-exports it and whose paths the generated code names.

mod attr;
mod expand;
mod valid;

use proc_macro::TokenStream;
use syn::{parse_macro_input, Item};

/// Declares the attention kernel variants a backend is specialised for.
///
/// On a struct, generates an `::sdpa_runtime::AttentionBackend` impl whose
/// variant table holds one kernel per combination of head size, causal flag
/// and dtype, each compiled for its constants. Every combination is checked
/// at compile time against the generator's rules, so a variant that cannot be
/// built is a compile error at the value that asks for it, not a failure at
/// run time.
///
/// # Keys
///
/// Each key takes a list in brackets; keys may come in any order, and
/// trailing commas are accepted.
///
/// - `head_sizes` (required): the head dimensions, integer literals, each a
///   multiple of 8 from 8 to 256, e.g. `[64, 80, 128]`.
/// - `causal` (optional, default `[false, true]`): which of non-causal and
///   causal (top-left aligned) masking to generate.
/// - `dtypes` (optional, default `[bf16, f16, f32]`): the element types, among
///   `bf16`, `f16` and `f32`.
///
/// The table lists variants in declaration order: head sizes outer, then
/// causal values, then dtypes. Duplicates, unknown keys or dtypes, a key given
/// twice and an empty list are errors; all of them are reported at once.
///
/// # Example
///
/// This needs `sdpa-runtime` and cannot run in this crate; the same example
/// compiles as a doctest of `sdpa-runtime`'s README.
///
/// ```ignore
/// use sdpa_runtime::prelude::*;
///
/// #[sdpa_variants(head_sizes = [64, 80, 128], causal = [false, true], dtypes = [bf16, f16, f32])]
/// pub struct WanAttention;
/// ```
///
/// The struct must not be generic: its variant table is a single static.
#[proc_macro_attribute]
pub fn sdpa_variants(args: TokenStream, input: TokenStream) -> TokenStream {
    let item = parse_macro_input!(input as Item);
    attr::parse(args.into())
        .and_then(|attr| expand::sdpa_variants(&attr, &item))
        .unwrap_or_else(|errors| expand::with_errors(&item, errors))
        .into()
}
