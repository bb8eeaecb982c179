//! The rules a declaration must follow, one check each, all reported at once.

use std::collections::HashSet;
use std::hash::Hash;

use kernels_gen::{DType, VariantSpec};
use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Error, Item, ItemStruct, Result};

use crate::attr::{Attr, Errors, List};

/// The causal values generated when `causal` is left out.
const DEFAULT_CAUSAL: [bool; 2] = [false, true];

/// A declaration that passed every check: what `expand` generates from.
pub struct Valid<'a> {
    pub item: &'a ItemStruct,
    /// As declared, in order.
    pub head_sizes: Vec<usize>,
    /// As declared, in order, or the default.
    pub causal: Vec<bool>,
    /// As declared, in order, or the default.
    pub dtypes: Vec<DType>,
    /// Whether each variant gets its CPU backward kernel.
    pub backward: bool,
    /// Every combination: head sizes outer, then causal, then dtype.
    pub variants: Vec<VariantSpec>,
}

/// Checks `attr` on `item` and, if every check passes, resolves defaults and
/// builds the variants through `kernels-gen`'s own rules.
pub fn validate<'a>(attr: &Attr, item: &'a Item) -> Result<Valid<'a>> {
    let target = as_struct(item);
    let mut errors = Errors::default();
    errors.check(target.clone().and_then(check_not_generic));
    errors.check(check_keys_known(attr));
    errors.check(check_keys_once("head_sizes", &attr.head_sizes));
    errors.check(check_keys_once("causal", &attr.causal));
    errors.check(check_keys_once("dtypes", &attr.dtypes));
    for flag in attr.backward.iter().skip(1) {
        errors.push(Error::new(
            flag.key,
            "`backward` is given twice; give it once, `backward = true` or `backward = false`",
        ));
    }
    errors.check(check_head_sizes_given(attr));
    errors.check(check_not_empty(&attr.head_sizes, || {
        "`head_sizes` is empty; declare at least one head size, e.g. `head_sizes = [64]`".into()
    }));
    errors.check(check_not_empty(&attr.causal, || {
        "`causal` is empty; declare `[false]`, `[true]` or both, \
         or leave the key out for `[false, true]`"
            .into()
    }));
    errors.check(check_not_empty(&attr.dtypes, || {
        format!(
            "`dtypes` is empty; declare some of {}, or leave the key out for all three",
            dtype_names()
        )
    }));
    errors.check(check_head_sizes_supported(attr));
    errors.check(check_unique(
        &attr.head_sizes,
        |h| (h.value, h.lit.span()),
        |h| format!("head size {h} is already declared; declare each head size once"),
    ));
    errors.check(check_unique(
        &attr.causal,
        |c| (c.value, c.span),
        |c| format!("causal value `{c}` is already declared; declare each value once"),
    ));
    errors.check(check_dtypes_known(attr));
    errors.check(check_unique(
        &attr.dtypes,
        // Compare names, not dtypes: a repeated unknown name is a repeat too.
        |d| (d.name.to_string(), d.name.span()),
        |d| format!("dtype `{d}` is already declared; declare each dtype once"),
    ));
    errors.finish()?;

    let item = target?;
    // The first list of each key: any other is an error above.
    let declared = attr.head_sizes.first().map_or(&[][..], |list| &list.items);
    let head_sizes: Vec<usize> = declared.iter().map(|h| h.value).collect();
    let causal: Vec<bool> = match attr.causal.first() {
        Some(list) => list.items.iter().map(|c| c.value).collect(),
        None => DEFAULT_CAUSAL.to_vec(),
    };
    let dtypes: Vec<DType> = match attr.dtypes.first() {
        Some(list) => list.items.iter().filter_map(|d| d.dtype).collect(),
        None => DType::ALL.to_vec(),
    };
    let mut variants = Vec::with_capacity(head_sizes.len() * causal.len() * dtypes.len());
    for head_size in declared {
        for &causal in &causal {
            for &dtype in &dtypes {
                let spec = VariantSpec::new(head_size.value, causal, dtype)
                    .map_err(|err| Error::new(head_size.lit.span(), err))?;
                variants.push(spec);
            }
        }
    }
    let backward = attr.backward.first().is_some_and(|flag| flag.value.value);
    Ok(Valid {
        item,
        head_sizes,
        causal,
        dtypes,
        backward,
        variants,
    })
}

/// The item, if it is a struct.
fn as_struct(item: &Item) -> Result<&ItemStruct> {
    let (what, span) = match item {
        Item::Struct(item) => return Ok(item),
        Item::Enum(item) => ("an enum", item.enum_token.span),
        Item::Union(item) => ("a union", item.union_token.span),
        Item::Fn(item) => ("a function", item.sig.fn_token.span),
        Item::Trait(item) => ("a trait", item.trait_token.span),
        Item::Impl(item) => ("an impl block", item.impl_token.span),
        Item::Type(item) => ("a type alias", item.type_token.span),
        Item::Mod(item) => ("a module", item.mod_token.span),
        Item::Const(item) => ("a constant", item.const_token.span),
        Item::Static(item) => ("a static", item.static_token.span),
        Item::Use(item) => ("a `use` declaration", item.use_token.span),
        other => ("this item", other.span()),
    };
    Err(Error::new(
        span,
        format!(
            "`#[sdpa_variants]` goes on a struct, not on {what}; \
             declare a struct such as `pub struct MyAttention;`"
        ),
    ))
}

fn check_not_generic(item: &ItemStruct) -> Result<()> {
    if item.generics.params.is_empty() {
        return Ok(());
    }
    Err(Error::new_spanned(
        &item.generics,
        "a struct with `#[sdpa_variants]` cannot be generic (its variant table is \
         a single static); remove the generic parameters",
    ))
}

fn check_keys_known(attr: &Attr) -> Result<()> {
    let mut errors = Errors::default();
    for key in &attr.unknown_keys {
        let hint = match key_meant(&key.to_string()) {
            Some(meant) => format!("did you mean `{meant}`? "),
            None => String::new(),
        };
        errors.push(Error::new(
            key.span(),
            format!("unknown key `{key}`; {hint}the keys are `head_sizes`, `causal`, `dtypes` and `backward`"),
        ));
    }
    errors.finish()
}

/// The key a misspelt one most likely stands for: `dtype`, `head_size`,
/// `headsizes`, `is_causal`.
fn key_meant(unknown: &str) -> Option<&'static str> {
    let fold = |s: &str| -> String {
        let s: String = s.chars().filter(|&c| c != '_').collect();
        s.to_lowercase().trim_end_matches('s').to_owned()
    };
    let unknown = fold(unknown);
    ["head_sizes", "causal", "dtypes", "backward"]
        .into_iter()
        .find(|key| {
            let key = fold(key);
            unknown == key
                || (unknown.len() >= 4 && (unknown.contains(&key) || key.contains(&unknown)))
        })
}

/// Reports every list of `name` after the first, at its key.
fn check_keys_once<T>(name: &str, lists: &[List<T>]) -> Result<()> {
    let mut errors = Errors::default();
    for list in lists.iter().skip(1) {
        errors.push(Error::new(
            list.key,
            format!("`{name}` is given twice; put all its values in one list"),
        ));
    }
    errors.finish()
}

fn check_head_sizes_given(attr: &Attr) -> Result<()> {
    if !attr.head_sizes.is_empty() {
        return Ok(());
    }
    // The call site of an attribute macro is the whole attribute.
    Err(Error::new(
        Span::call_site(),
        "missing `head_sizes`; declare the head sizes to generate kernels for, \
         e.g. `#[sdpa_variants(head_sizes = [64, 128])]`",
    ))
}

fn check_not_empty<T>(lists: &[List<T>], message: impl Fn() -> String) -> Result<()> {
    let mut errors = Errors::default();
    for list in lists.iter().filter(|list| list.items.is_empty()) {
        errors.push(Error::new(list.bracket.span.join(), message()));
    }
    errors.finish()
}

/// Applies `kernels-gen`'s rule to every head size, so that the macro and
/// the generator agree on what exists.
fn check_head_sizes_supported(attr: &Attr) -> Result<()> {
    let mut errors = Errors::default();
    for head_size in attr.head_sizes.iter().flat_map(|list| &list.items) {
        if let Err(err) = kernels_gen::check_head_size(head_size.value) {
            errors.push(Error::new(head_size.lit.span(), err));
        }
    }
    errors.finish()
}

/// Reports, within each list, every entry equal to an earlier one, at the
/// repeat.
fn check_unique<T, K: Eq + Hash + std::fmt::Display>(
    lists: &[List<T>],
    key: impl Fn(&T) -> (K, Span),
    message: impl Fn(&K) -> String,
) -> Result<()> {
    let mut errors = Errors::default();
    for list in lists {
        let mut seen = HashSet::new();
        for item in &list.items {
            let (value, span) = key(item);
            if seen.contains(&value) {
                errors.push(Error::new(span, message(&value)));
            } else {
                seen.insert(value);
            }
        }
    }
    errors.finish()
}

fn check_dtypes_known(attr: &Attr) -> Result<()> {
    let mut errors = Errors::default();
    for dtype in attr.dtypes.iter().flat_map(|list| &list.items) {
        if dtype.dtype.is_none() {
            let hint = match dtype_meant(&dtype.name.to_string()) {
                Some(meant) => format!("did you mean `{meant}`? "),
                None => String::new(),
            };
            errors.push(Error::new(
                dtype.name.span(),
                format!(
                    "unknown dtype `{}`; {hint}the dtypes are {}",
                    dtype.name,
                    dtype_names()
                ),
            ));
        }
    }
    errors.finish()
}

/// The dtype a name from elsewhere (PyTorch, NumPy, upper case) stands for.
fn dtype_meant(unknown: &str) -> Option<DType> {
    match unknown.to_lowercase().as_str() {
        "bfloat16" => Some(DType::BF16),
        "half" | "float16" => Some(DType::F16),
        "float" | "float32" | "single" => Some(DType::F32),
        other => DType::from_name(other),
    }
}

/// "`bf16`, `f16` and `f32`".
fn dtype_names() -> String {
    let names: Vec<String> = DType::ALL.iter().map(|d| format!("`{d}`")).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;
    use syn::parse_quote;

    fn item() -> Item {
        parse_quote!(
            pub struct Attention;
        )
    }

    fn errors(args: proc_macro2::TokenStream, item: &Item) -> Vec<String> {
        let attr = crate::attr::parse(args).unwrap();
        match validate(&attr, item) {
            Ok(_) => Vec::new(),
            Err(err) => err.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn defaults_and_order() {
        let item = item();
        let attr = crate::attr::parse(quote!(head_sizes = [128, 64])).unwrap();
        let valid = validate(&attr, &item).unwrap();
        assert_eq!(valid.head_sizes, [128, 64]);
        assert_eq!(valid.causal, [false, true]);
        assert_eq!(valid.dtypes, [DType::BF16, DType::F16, DType::F32]);
        assert_eq!(valid.variants.len(), 12);
        assert_eq!(
            valid.variants[0],
            VariantSpec::new(128, false, DType::BF16).unwrap()
        );
        assert_eq!(
            valid.variants[1],
            VariantSpec::new(128, false, DType::F16).unwrap()
        );
        assert_eq!(
            valid.variants[3],
            VariantSpec::new(128, true, DType::BF16).unwrap()
        );
        assert_eq!(
            valid.variants[6],
            VariantSpec::new(64, false, DType::BF16).unwrap()
        );
    }

    #[test]
    fn every_mistake_is_reported_at_once() {
        let got = errors(
            quote!(
                head_sizes = [64, 65, 64, 512],
                causal = [true, true],
                dtypes = [f32, f64, f32],
                dtypes = [],
                tile = [64],
            ),
            &item(),
        );
        assert_eq!(
            got,
            [
                "unknown key `tile`; the keys are `head_sizes`, `causal`, `dtypes` and `backward`",
                "`dtypes` is given twice; put all its values in one list",
                "`dtypes` is empty; declare some of `bf16`, `f16` and `f32`, \
                 or leave the key out for all three",
                "head size 65 is not supported; declare a multiple of 8 from 8 to 256 \
                 (8, 16, 24, ..., 256)",
                "head size 512 is not supported; declare a multiple of 8 from 8 to 256 \
                 (8, 16, 24, ..., 256)",
                "head size 64 is already declared; declare each head size once",
                "causal value `true` is already declared; declare each value once",
                "unknown dtype `f64`; the dtypes are `bf16`, `f16` and `f32`",
                "dtype `f32` is already declared; declare each dtype once",
            ]
        );
    }

    #[test]
    fn backward_is_given_once() {
        assert_eq!(
            errors(
                quote!(head_sizes = [64], backward = true, backward = false),
                &item()
            ),
            ["`backward` is given twice; give it once, `backward = true` or `backward = false`"]
        );
    }

    #[test]
    fn head_sizes_are_required() {
        assert_eq!(
            errors(quote!(causal = [true]), &item()),
            [
                "missing `head_sizes`; declare the head sizes to generate kernels for, \
              e.g. `#[sdpa_variants(head_sizes = [64, 128])]`"
            ]
        );
    }

    #[test]
    fn only_plain_structs() {
        let not_struct: Item = parse_quote!(
            enum Attention {}
        );
        assert_eq!(
            errors(quote!(head_sizes = [64]), &not_struct),
            ["`#[sdpa_variants]` goes on a struct, not on an enum; \
              declare a struct such as `pub struct MyAttention;`"]
        );
        let generic: Item = parse_quote!(
            struct Attention<T>(T);
        );
        assert_eq!(errors(quote!(head_sizes = [64]), &generic).len(), 1);
    }

    #[test]
    fn misspellings_get_a_hint() {
        assert_eq!(key_meant("dtype"), Some("dtypes"));
        assert_eq!(key_meant("head_size"), Some("head_sizes"));
        assert_eq!(key_meant("headsizes"), Some("head_sizes"));
        assert_eq!(key_meant("is_causal"), Some("causal"));
        assert_eq!(key_meant("tile"), None);
        assert_eq!(key_meant("d"), None);
        assert_eq!(dtype_meant("bfloat16"), Some(DType::BF16));
        assert_eq!(dtype_meant("F16"), Some(DType::F16));
        assert_eq!(dtype_meant("f64"), None);
        assert_eq!(
            errors(quote!(head_sizes = [64], dtype = [half]), &item()),
            ["unknown key `dtype`; did you mean `dtypes`? \
              the keys are `head_sizes`, `causal`, `dtypes` and `backward`"]
        );
        assert_eq!(
            errors(quote!(head_sizes = [64], dtypes = [half]), &item()),
            ["unknown dtype `half`; did you mean `f16`? the dtypes are `bf16`, `f16` and `f32`"]
        );
    }

    #[test]
    fn dtype_names_read_as_a_list() {
        assert_eq!(dtype_names(), "`bf16`, `f16` and `f32`");
    }
}
