//! Code generation from a declaration that passed `valid`: nothing here can
//! fail, except the generator itself (a bug there is reported as a compile
//! error on the attribute rather than a panic of the macro).

use std::thread;

use kernels_gen::ptx::Target;
use kernels_gen::{BackwardKernels, DType, GpuKernel, VariantSpec};
use proc_macro2::{Literal, Span, TokenStream};
use quote::quote;
use syn::{Error, Item, Result};

use crate::attr::Attr;
use crate::valid::{self, Valid};

/// The struct, unchanged, and its `AttentionBackend` impl.
pub fn sdpa_variants(attr: &Attr, item: &Item) -> Result<TokenStream> {
    let valid = valid::validate(attr, item)?;
    let kernels = gpu_kernels(&valid.variants, valid.backward)?;
    Ok(generate(&valid, &kernels))
}

/// The GPU kernels of one variant: the forward's in the runtime's order of
/// preference ([`kernels_gen::kernels`]: the architecture-specific ones
/// first, the portable (sm_80) one last), and the backward's
/// ([`kernels_gen::backward_kernels`]) where the declaration says
/// `backward = true`.
type Kernels = (Vec<GpuKernel>, Option<BackwardKernels>);

/// Runs the generator for every variant (its backward too, with
/// `backward`), spread over the machine's cores (the generator is pure and
/// each variant independent; only plain strings cross threads, as compiler
/// tokens must stay on the macro's thread).
fn gpu_kernels(variants: &[VariantSpec], backward: bool) -> Result<Vec<Kernels>> {
    let threads = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(variants.len())
        .max(1);
    let chunk = variants.len().div_ceil(threads).max(1);
    let results: Vec<thread::Result<Vec<Kernels>>> = thread::scope(|scope| {
        let handles: Vec<_> = variants
            .chunks(chunk)
            .map(|specs| {
                scope.spawn(move || {
                    specs
                        .iter()
                        .map(|spec| {
                            let gpu = kernels_gen::kernels(spec);
                            (gpu, backward.then(|| kernels_gen::backward_kernels(spec)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut kernels = Vec::with_capacity(variants.len());
    for (result, specs) in results.into_iter().zip(variants.chunks(chunk)) {
        match result {
            Ok(mut batch) => kernels.append(&mut batch),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                let names: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
                return Err(Error::new(
                    Span::call_site(),
                    format!(
                        "the kernel generator failed for one of the variants [{}]: {why}; \
                         this is a bug in kernels-gen, please report it",
                        names.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(kernels)
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

fn generate(valid: &Valid, kernels: &[Kernels]) -> TokenStream {
    let item = valid.item;
    let ident = &item.ident;
    let count = Literal::usize_unsuffixed(valid.variants.len());
    let variants = valid
        .variants
        .iter()
        .zip(kernels)
        .map(|(s, (gpu, backward))| variant(s, gpu, backward.as_ref()));
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

/// One entry of the variant table: the spec, the CPU kernel instantiated
/// for it and the GPU kernels generated for it in order of preference (PTX
/// text and launch metadata, embedded as literals), and its CPU backward
/// kernel and GPU backward kernels (`gpu_backward`) where the declaration
/// says `backward = true`.
fn variant(
    spec: &VariantSpec,
    kernels: &[GpuKernel],
    gpu_backward: Option<&BackwardKernels>,
) -> TokenStream {
    let head_size = Literal::usize_unsuffixed(spec.head_size);
    let causal = spec.causal;
    let dtype = dtype_path(spec.dtype);
    let element = element_type(spec.dtype);
    let gpu = kernels.iter().map(gpu_kernel);
    let backward = gpu_backward.is_some().then(|| {
        quote! {
            .with_cpu_backward(::sdpa_runtime::cpu::backward::<#head_size, #causal, #element>)
        }
    });
    let gpu_backward = gpu_backward.map(|b| {
        let b = backward_kernels(b);
        quote! { .with_gpu_backward(#b) }
    });
    quote! {
        ::sdpa_runtime::Variant::new(
            ::sdpa_runtime::VariantSpec { head_size: #head_size, causal: #causal, dtype: #dtype },
            ::sdpa_runtime::cpu::attention_lse::<#head_size, #causal, #element>,
        )
        .with_gpu_kernels(&[#(#gpu),*])
        #backward
        #gpu_backward
    }
}

/// A `GpuBackward::new(...)` expression holding the backward kernels `b`.
fn backward_kernels(b: &BackwardKernels) -> TokenStream {
    let preprocess = gpu_kernel(&b.preprocess);
    let main = gpu_kernel(&b.main);
    let block_n = Literal::u32_unsuffixed(b.block_n);
    let convert = gpu_kernel(&b.convert);
    quote! {
        ::sdpa_runtime::GpuBackward::new(#preprocess, #main, #block_n, #convert)
    }
}

/// A `GpuKernel::new(...)` expression holding `gpu`, with
/// `.with_tensor_maps(q_rows, kv_rows)` where the kernel takes tensor maps.
fn gpu_kernel(gpu: &GpuKernel) -> TokenStream {
    let ptx = Literal::string(&gpu.ptx);
    let entry = Literal::string(&gpu.entry);
    let target = match gpu.target {
        Target::Sm80 => quote!(::sdpa_runtime::Target::Sm80),
        Target::Sm90a => quote!(::sdpa_runtime::Target::Sm90a),
    };
    let block_m = Literal::u32_unsuffixed(gpu.block_m);
    let threads = Literal::u32_unsuffixed(gpu.threads);
    let smem = Literal::u32_unsuffixed(gpu.smem_bytes);
    let mask_smem = (gpu.mask_smem_bytes > 0).then(|| {
        let bytes = Literal::u32_unsuffixed(gpu.mask_smem_bytes);
        quote! { .with_mask_smem(#bytes) }
    });
    let maps = gpu.tensor_maps.map(|m| {
        let q_rows = Literal::u32_unsuffixed(m.q_rows);
        let kv_rows = Literal::u32_unsuffixed(m.kv_rows);
        quote! { .with_tensor_maps(#q_rows, #kv_rows) }
    });
    quote! {
        ::sdpa_runtime::GpuKernel::new(#ptx, #entry, #target, #block_m, #threads, #smem)
        #mask_smem
        #maps
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

    /// The `GpuKernel::new(...)` the macro embeds for a variant.
    fn gpu(head_size: usize, causal: bool, dtype: DType) -> TokenStream {
        let spec = VariantSpec::new(head_size, causal, dtype).unwrap();
        gpu_kernel(&kernels_gen::generate(&spec, Target::Sm80))
    }

    #[test]
    fn one_variant_per_combination_in_declaration_order() {
        let file = expand(quote!(
            head_sizes = [64, 80],
            causal = [true],
            dtypes = [f32, bf16]
        ));
        let (g64f, g64b) = (gpu(64, true, DType::F32), gpu(64, true, DType::BF16));
        let (g80f, g80b) = (gpu(80, true, DType::F32), gpu(80, true, DType::BF16));
        // Head sizes 64 and 80 in bf16 have a Hopper kernel too; f32 does not.
        let h64b = kernels_gen::generate_sm90(&VariantSpec::new(64, true, DType::BF16).unwrap())
            .map(|k| gpu_kernel(&k))
            .expect("a Hopper kernel for d=64 bf16");
        let h80b = kernels_gen::generate_sm90(&VariantSpec::new(80, true, DType::BF16).unwrap())
            .map(|k| gpu_kernel(&k))
            .expect("a Hopper kernel for d=80 bf16");
        assert!(
            kernels_gen::generate_sm90(&VariantSpec::new(80, true, DType::F32).unwrap()).is_none()
        );
        let expected: syn::File = parse_quote! {
            pub struct WanAttention;

            #[automatically_derived]
            impl ::sdpa_runtime::AttentionBackend for WanAttention {
                fn variant_table(&self) -> &'static ::sdpa_runtime::VariantTable {
                    static VARIANTS: [::sdpa_runtime::Variant; 4] = [
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 64, causal: true, dtype: ::sdpa_runtime::DType::F32 },
                            ::sdpa_runtime::cpu::attention_lse::<64, true, ::core::primitive::f32>,
                        )
                        .with_gpu_kernels(&[#g64f]),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 64, causal: true, dtype: ::sdpa_runtime::DType::BF16 },
                            ::sdpa_runtime::cpu::attention_lse::<64, true, ::sdpa_runtime::half::bf16>,
                        )
                        .with_gpu_kernels(&[#h64b, #g64b]),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 80, causal: true, dtype: ::sdpa_runtime::DType::F32 },
                            ::sdpa_runtime::cpu::attention_lse::<80, true, ::core::primitive::f32>,
                        )
                        .with_gpu_kernels(&[#g80f]),
                        ::sdpa_runtime::Variant::new(
                            ::sdpa_runtime::VariantSpec { head_size: 80, causal: true, dtype: ::sdpa_runtime::DType::BF16 },
                            ::sdpa_runtime::cpu::attention_lse::<80, true, ::sdpa_runtime::half::bf16>,
                        )
                        .with_gpu_kernels(&[#h80b, #g80b]),
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
    fn every_variant_embeds_its_ptx_and_launch_metadata() {
        let spec = VariantSpec::new(128, true, DType::BF16).unwrap();
        let kernel = kernels_gen::generate(&spec, Target::Sm80);
        let text = gpu_kernel(&kernel).to_string();
        assert!(
            text.starts_with(":: sdpa_runtime :: GpuKernel :: new ("),
            "{text}"
        );
        // The PTX is one string literal that reads back as the generator's text.
        let lit: syn::LitStr = syn::parse_str(&Literal::string(&kernel.ptx).to_string()).unwrap();
        assert_eq!(lit.value(), kernel.ptx);
        assert!(text.contains("\"sdpa_fwd_d128_causal_bf16\""), "{text}");
        assert!(text.contains(":: sdpa_runtime :: Target :: Sm80"), "{text}");
        let tail = format!(
            "{} , {} , {})",
            kernel.block_m, kernel.threads, kernel.smem_bytes
        );
        assert!(
            text.ends_with(&tail),
            "{}",
            &text[text.len().saturating_sub(80)..]
        );
    }

    #[test]
    fn kernels_with_tensor_maps_declare_their_boxes() {
        let spec = VariantSpec::new(128, false, DType::BF16).unwrap();
        let mut kernel = kernels_gen::generate(&spec, Target::Sm80);
        let plain = gpu_kernel(&kernel).to_string();
        assert!(!plain.contains("with_tensor_maps"), "{plain}");
        kernel.tensor_maps = Some(kernels_gen::contract::TensorMaps {
            q_rows: 128,
            kv_rows: 80,
        });
        let text = gpu_kernel(&kernel).to_string();
        assert_eq!(text, format!("{plain} . with_tensor_maps (128 , 80)"));
    }

    #[test]
    fn generating_in_parallel_keeps_declaration_order() {
        let specs: Vec<VariantSpec> = [8, 16, 24, 32, 40]
            .iter()
            .flat_map(|&d| {
                DType::ALL
                    .into_iter()
                    .map(move |t| VariantSpec::new(d, d % 16 == 0, t).unwrap())
            })
            .collect();
        let kernels = gpu_kernels(&specs, false).unwrap();
        // The portable kernel comes last in each list.
        let entries: Vec<String> = kernels
            .iter()
            .map(|(k, _)| k.last().unwrap().entry.clone())
            .collect();
        let expected: Vec<String> = specs.iter().map(|s| s.kernel_name()).collect();
        assert_eq!(entries, expected);
        assert!(kernels.iter().all(|(_, b)| b.is_none()));
        // With the backward, each variant's own backward kernels.
        let kernels = gpu_kernels(&specs, true).unwrap();
        for ((_, b), spec) in kernels.iter().zip(&specs) {
            assert_eq!(b.as_ref(), Some(&kernels_gen::backward_kernels(spec)));
        }
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
    fn backward_true_adds_each_variants_backward_kernel() {
        let backward = "with_cpu_backward";
        let plain = expand(quote!(head_sizes = [64], causal = [true], dtypes = [f32]));
        assert!(!quote!(#plain).to_string().contains(backward));
        assert!(!quote!(#plain).to_string().contains("with_gpu_backward"));
        let off = expand(quote!(
            head_sizes = [64],
            causal = [true],
            dtypes = [f32],
            backward = false
        ));
        assert_eq!(quote!(#off).to_string(), quote!(#plain).to_string());
        let on = expand(quote!(
            head_sizes = [64, 80],
            causal = [true],
            dtypes = [f32, bf16],
            backward = true
        ));
        let text = quote!(#on).to_string();
        assert_eq!(text.matches(backward).count(), 4);
        let kernel = quote!(.with_cpu_backward(::sdpa_runtime::cpu::backward::<80, true, ::sdpa_runtime::half::bf16>));
        assert!(text.contains(&kernel.to_string()), "{text}");
        // And the GPU backward kernels, embedded as the generator made them.
        assert_eq!(text.matches("with_gpu_backward").count(), 4);
        let spec = VariantSpec::new(80, true, DType::BF16).unwrap();
        let b = kernels_gen::backward_kernels(&spec);
        let (pre, main, convert) = (
            gpu_kernel(&b.preprocess),
            gpu_kernel(&b.main),
            gpu_kernel(&b.convert),
        );
        let block_n = Literal::u32_unsuffixed(b.block_n);
        let embedded = quote! {
            .with_gpu_backward(::sdpa_runtime::GpuBackward::new(#pre, #main, #block_n, #convert))
        };
        assert!(text.contains(&embedded.to_string()), "{text}");
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
