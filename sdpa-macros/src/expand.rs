//! Code generation from a declaration that passed `valid`: nothing here can
//! fail.

use kernels_gen::{DType, VariantSpec};
use proc_macro2::{Literal, TokenStream};
use quote::quote;
use syn::{Error, Item, Result};

use crate::attr::Attr;
use crate::valid::{self, Valid};

/// The struct, unchanged, and its `AttentionBackend` impl.
pub fn sdpa_variants(attr: &Attr, item: &Item) -> Result<TokenStream> {
    let valid = valid::validate(attr, item)?;
    Ok(generate(&valid))
}

/// The user's item, unchanged, beside the errors: the struct still exists,
/// so uses of it raise no follow-on errors.
pub fn with_errors(item: &Item, errors: Error) -> TokenStream {
    let errors = errors.to_compile_error();
    quote! {
        #item
        #errors
    }
}

fn generate(valid: &Valid) -> TokenStream {
    let item = valid.item;
    let ident = &item.ident;
    let count = Literal::usize_unsuffixed(valid.variants.len());
    let variants = valid.variants.iter().map(variant);
    let head_sizes = valid
        .head_sizes
        .iter()
        .map(|&d| Literal::usize_unsuffixed(d));
    let causal = &valid.causal;
    let dtypes = valid.dtypes.iter().map(|&dtype| dtype_path(dtype));
    quote! {
        #item

        #[automatically_derived]
        impl ::sdpa_runtime::AttentionBackend for #ident {
            fn variant_table(&self) -> &'static ::sdpa_runtime::VariantTable {
                static VARIANTS: [::sdpa_runtime::Variant; #count] = [
                    #(#variants,)*
                ];
                static TABLE: ::sdpa_runtime::VariantTable = ::sdpa_runtime::VariantTable::new(
                    &VARIANTS,
                    &[#(#head_sizes),*],
                    &[#(#causal),*],
                    &[#(#dtypes),*],
                );
                &TABLE
            }
        }
    }
}

/// One entry of the variant table: the spec and everything generated for
/// it, one `Variant::new` argument each.
fn variant(spec: &VariantSpec) -> TokenStream {
    let head_size = Literal::usize_unsuffixed(spec.head_size);
    let causal = spec.causal;
    let dtype = dtype_path(spec.dtype);
    let element = element_type(spec.dtype);
    quote! {
        ::sdpa_runtime::Variant::new(
            ::sdpa_runtime::VariantSpec { head_size: #head_size, causal: #causal, dtype: #dtype },
            ::sdpa_runtime::cpu::attention::<#head_size, #causal, #element>,
        )
    }
}

fn dtype_path(dtype: DType) -> TokenStream {
    match dtype {
        DType::F32 => quote!(::sdpa_runtime::DType::F32),
        DType::F16 => quote!(::sdpa_runtime::DType::F16),
        DType::BF16 => quote!(::sdpa_runtime::DType::BF16),
    }
}

/// The Rust type of one element.
fn element_type(dtype: DType) -> TokenStream {
    match dtype {
        DType::F32 => quote!(::core::primitive::f32),
        DType::F16 => quote!(::sdpa_runtime::half::f16),
        DType::BF16 => quote!(::sdpa_runtime::half::bf16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::parse_quote;

    fn expand(args: TokenStream) -> syn::File {
        let item: Item = parse_quote!(
            pub struct WanAttention;
        );
        let attr = crate::attr::parse(args).unwrap();
        let tokens = sdpa_variants(&attr, &item).unwrap();
        syn::parse2(tokens).unwrap()
    }

    #[test]
    fn one_variant_per_combination_in_declaration_order() {
        let file = expand(quote!(
            head_sizes = [64, 80],
            causal = [true],
            dtypes = [f32, bf16]
        ));
        let expected: syn::File = parse_quote! {
            pub struct WanAttention;

            #[automatically_derived]
            impl ::sdpa_runtime::AttentionBackend for WanAttention {
                fn variant_table(&self) -> &'static ::sdpa_runtime::VariantTable {
                    static VARIANTS: [::sdpa_runtime::Variant; 4] = [
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 64, causal: true, dtype: ::sdpa_runtime::DType::F32 },
                            ::sdpa_runtime::cpu::attention::<64, true, ::core::primitive::f32>,
                        ),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 64, causal: true, dtype: ::sdpa_runtime::DType::BF16 },
                            ::sdpa_runtime::cpu::attention::<64, true, ::sdpa_runtime::half::bf16>,
                        ),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 80, causal: true, dtype: ::sdpa_runtime::DType::F32 },
                            ::sdpa_runtime::cpu::attention::<80, true, ::core::primitive::f32>,
                        ),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 80, causal: true, dtype: ::sdpa_runtime::DType::BF16 },
                            ::sdpa_runtime::cpu::attention::<80, true, ::sdpa_runtime::half::bf16>,
                        ),
                    ];
                    static TABLE: ::sdpa_runtime::VariantTable = ::sdpa_runtime::VariantTable::new(
                        &VARIANTS,
                        &[64, 80],
                        &[true],
                        &[::sdpa_runtime::DType::F32, ::sdpa_runtime::DType::BF16],
                    );
                    &TABLE
                }
            }
        };
        assert_eq!(quote!(#file).to_string(), quote!(#expected).to_string());
    }

    #[test]
    fn defaults_give_every_causal_value_and_dtype() {
        let file = expand(quote!(head_sizes = [128]));
        let text = quote!(#file).to_string();
        assert!(text.contains("[:: sdpa_runtime :: Variant ; 6]"), "{text}");
        assert!(text.contains("& [false , true]"), "{text}");
        assert!(text.contains(
            "& [:: sdpa_runtime :: DType :: BF16 , :: sdpa_runtime :: DType :: F16 , \
             :: sdpa_runtime :: DType :: F32]"
        ));
    }

    #[test]
    fn errors_keep_the_item() {
        let item: Item = parse_quote!(
            pub struct WanAttention;
        );
        let err = Error::new(
            proc_macro2::Span::call_site(),
            "head size 65 is not supported",
        );
        let text = with_errors(&item, err).to_string();
        assert!(text.starts_with("pub struct WanAttention ;"), "{text}");
        assert!(text.contains("compile_error"), "{text}");
    }
}
