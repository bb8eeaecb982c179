//! Parsing `#[sdpa_variants(...)]` into a model that keeps what the user
//! wrote, with its spans, for `valid` to check and point at.
//!
//! Only syntax is rejected here: a value that is not a bracketed list, a head
//! size that is not an integer literal, a causal value that is not `true` or
//! `false`. Everything that is well formed but not allowed (an unknown key or
//! dtype, a key given twice, an empty list, a duplicate or unsupported head
//! size) is kept in the model, so that `valid` can report it together with
//! every other mistake.

use kernels_gen::DType;
use proc_macro2::{Span, TokenStream, TokenTree};
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{bracketed, token, Error, Ident, LitBool, LitInt, Result, Token};

pub mod kw {
    syn::custom_keyword!(head_sizes);
    syn::custom_keyword!(causal);
    syn::custom_keyword!(dtypes);
    syn::custom_keyword!(backward);
}

/// The attribute's arguments. Each known key keeps every occurrence, in
/// order, so that `valid` can report a key given twice.
#[derive(Default)]
pub struct Attr {
    pub head_sizes: Vec<List<HeadSize>>,
    pub causal: Vec<List<LitBool>>,
    pub dtypes: Vec<List<Dtype>>,
    /// `backward = true|false`, every occurrence.
    pub backward: Vec<Flag>,
    /// Keys that are none of the above; their values are skipped.
    pub unknown_keys: Vec<Ident>,
}

/// `key = [item, item, ...]`.
pub struct List<T> {
    /// The key, for "given twice".
    pub key: Span,
    /// The brackets, for "empty list".
    pub bracket: token::Bracket,
    pub items: Vec<T>,
}

/// `key = true` or `key = false`.
pub struct Flag {
    /// The key, for "given twice".
    pub key: Span,
    pub value: LitBool,
}

/// One entry of `head_sizes`.
pub struct HeadSize {
    pub value: usize,
    pub lit: LitInt,
}

/// One entry of `dtypes`: a name, known or not.
pub struct Dtype {
    /// `None` for a name that is not a dtype.
    pub dtype: Option<DType>,
    pub name: Ident,
}

/// Parses the tokens between the attribute's parentheses.
pub fn parse(args: TokenStream) -> Result<Attr> {
    parse_attr.parse2(args)
}

fn parse_attr(input: ParseStream) -> Result<Attr> {
    let mut attr = Attr::default();
    // Mistakes inside one list do not stop the parse: every bad entry of
    // every list is reported at once.
    let mut errors = Errors::default();
    while !input.is_empty() {
        let lookahead = input.lookahead1();
        if lookahead.peek(kw::head_sizes) {
            let key: kw::head_sizes = input.parse()?;
            let list = parse_list(input, "head_sizes", key.span, &mut errors, head_size)?;
            attr.head_sizes.push(list);
        } else if lookahead.peek(kw::causal) {
            let key: kw::causal = input.parse()?;
            let list = parse_list(input, "causal", key.span, &mut errors, causal)?;
            attr.causal.push(list);
        } else if lookahead.peek(kw::dtypes) {
            let key: kw::dtypes = input.parse()?;
            let list = parse_list(input, "dtypes", key.span, &mut errors, dtype)?;
            attr.dtypes.push(list);
        } else if lookahead.peek(kw::backward) {
            let key: kw::backward = input.parse()?;
            attr.backward
                .push(parse_flag(input, key.span, &mut errors)?);
        } else if input.peek(Ident::peek_any) {
            attr.unknown_keys.push(input.call(Ident::parse_any)?);
            while !input.is_empty() && !input.peek(Token![,]) {
                input.parse::<TokenTree>()?;
            }
        } else {
            return Err(lookahead.error());
        }
        if input.is_empty() {
            break;
        }
        input.parse::<Token![,]>()?;
    }
    errors.finish()?;
    Ok(attr)
}

/// Parses `= true` or `= false` after the `backward` key; a value that is
/// not a bool literal goes to `errors` (the parse goes on, as `false`).
fn parse_flag(input: ParseStream, key: Span, errors: &mut Errors) -> Result<Flag> {
    let message = "`backward` takes `true` or `false`, e.g. `backward = true`";
    if !input.peek(Token![=]) {
        return Err(Error::new(key, message));
    }
    input.parse::<Token![=]>()?;
    let mut tokens = TokenStream::new();
    while !input.is_empty() && !input.peek(Token![,]) {
        tokens.extend([input.parse::<TokenTree>()?]);
    }
    let value = match syn::parse2::<LitBool>(tokens.clone()) {
        Ok(value) => value,
        Err(_) => {
            errors.push(if tokens.is_empty() {
                Error::new(key, message)
            } else {
                Error::new_spanned(&tokens, message)
            });
            LitBool::new(false, key)
        }
    };
    Ok(Flag { key, value })
}

/// Parses `= [item, ...]` after `key`, each item by `item` from its own
/// tokens; bad items go to `errors` and the parse goes on with the next one.
fn parse_list<T>(
    input: ParseStream,
    name: &str,
    key: Span,
    errors: &mut Errors,
    item: fn(TokenStream) -> Result<T>,
) -> Result<List<T>> {
    let example = match name {
        "head_sizes" => "head_sizes = [64, 128]",
        "causal" => "causal = [false, true]",
        _ => "dtypes = [bf16, f16]",
    };
    let not_a_list = || format!("`{name}` takes a list in brackets, e.g. `{example}`");
    if !input.peek(Token![=]) {
        return Err(Error::new(key, not_a_list()));
    }
    input.parse::<Token![=]>()?;
    if !input.peek(token::Bracket) {
        return Err(input.error(not_a_list()));
    }
    let content;
    let bracket = bracketed!(content in input);
    let mut items = Vec::new();
    while !content.is_empty() {
        if content.peek(Token![,]) {
            errors.push(content.error(format!("expected a value before `,` in `{name}`")));
        }
        let mut tokens = TokenStream::new();
        while !content.is_empty() && !content.peek(Token![,]) {
            tokens.extend([content.parse::<TokenTree>()?]);
        }
        if !tokens.is_empty() {
            match item(tokens) {
                Ok(item) => items.push(item),
                Err(err) => errors.push(err),
            }
        }
        if !content.is_empty() {
            content.parse::<Token![,]>()?;
        }
    }
    Ok(List {
        key,
        bracket,
        items,
    })
}

fn head_size(tokens: TokenStream) -> Result<HeadSize> {
    let lit: LitInt = syn::parse2(tokens.clone())
        .map_err(|_| Error::new_spanned(&tokens, "head sizes are integer literals, e.g. `64`"))?;
    if !lit.suffix().is_empty() {
        return Err(Error::new(
            lit.span(),
            format!(
                "head sizes are plain integers; write `{}` without the `{}` suffix",
                lit.base10_digits(),
                lit.suffix()
            ),
        ));
    }
    let value = lit.base10_parse().map_err(|_| {
        let digits = lit.base10_digits();
        Error::new(
            lit.span(),
            format!(
                "head size {digits} is not supported; declare a multiple of {} from {} to {}",
                kernels_gen::HEAD_SIZE_STEP,
                kernels_gen::MIN_HEAD_SIZE,
                kernels_gen::MAX_HEAD_SIZE,
            ),
        )
    })?;
    Ok(HeadSize { value, lit })
}

fn causal(tokens: TokenStream) -> Result<LitBool> {
    syn::parse2(tokens.clone())
        .map_err(|_| Error::new_spanned(&tokens, "causal values are `false` or `true`"))
}

fn dtype(tokens: TokenStream) -> Result<Dtype> {
    let name = Ident::parse_any.parse2(tokens.clone()).map_err(|_| {
        Error::new_spanned(
            &tokens,
            "dtypes are written as bare names: `bf16`, `f16` or `f32`",
        )
    })?;
    let dtype = DType::from_name(&name.to_string());
    Ok(Dtype { dtype, name })
}

/// Errors gathered so far, combined into one.
#[derive(Default)]
pub struct Errors(Option<Error>);

impl Errors {
    pub fn push(&mut self, err: Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(err),
            None => self.0 = Some(err),
        }
    }

    /// Adds the error of `result`, if any.
    pub fn check(&mut self, result: Result<()>) {
        if let Err(err) = result {
            self.push(err);
        }
    }

    pub fn finish(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn messages(err: Error) -> Vec<String> {
        err.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn parses_every_key_in_any_order() {
        let attr = parse(quote!(
            dtypes = [f32, bf16,],
            causal = [true],
            head_sizes = [64, 8,]
        ))
        .unwrap();
        let sizes: Vec<usize> = attr.head_sizes[0].items.iter().map(|h| h.value).collect();
        assert_eq!(sizes, [64, 8]);
        let causal: Vec<bool> = attr.causal[0].items.iter().map(|c| c.value).collect();
        assert_eq!(causal, [true]);
        let dtypes: Vec<_> = attr.dtypes[0].items.iter().map(|d| d.dtype).collect();
        assert_eq!(dtypes, [Some(DType::F32), Some(DType::BF16)]);
        assert!(attr.unknown_keys.is_empty());
    }

    #[test]
    fn keeps_unknown_keys_and_names_and_repeats_for_valid() {
        let attr = parse(quote!(
            head_sizes = [64],
            tile = 64 + 1,
            head_sizes = [],
            dtypes = [f64],
        ))
        .unwrap();
        assert_eq!(attr.head_sizes.len(), 2);
        assert_eq!(attr.unknown_keys[0], "tile");
        assert_eq!(attr.dtypes[0].items[0].dtype, None);
        assert_eq!(attr.dtypes[0].items[0].name, "f64");
    }

    #[test]
    fn reports_every_bad_entry() {
        let err = parse(quote!(head_sizes = [64, x, 1.5], causal = [1, yes]))
            .err()
            .unwrap();
        assert_eq!(
            messages(err),
            [
                "head sizes are integer literals, e.g. `64`",
                "head sizes are integer literals, e.g. `64`",
                "causal values are `false` or `true`",
                "causal values are `false` or `true`",
            ]
        );
    }

    #[test]
    fn a_value_that_is_not_a_list_is_rejected() {
        let err = parse(quote!(causal = true)).err().unwrap();
        assert_eq!(
            messages(err),
            ["`causal` takes a list in brackets, e.g. `causal = [false, true]`"]
        );
        let err = parse(quote!(head_sizes)).err().unwrap();
        assert_eq!(
            messages(err),
            ["`head_sizes` takes a list in brackets, e.g. `head_sizes = [64, 128]`"]
        );
    }

    #[test]
    fn backward_takes_a_bool() {
        let attr = parse(quote!(head_sizes = [64], backward = true)).unwrap();
        assert!(attr.backward[0].value.value);
        for bad in [
            quote!(backward = 1),
            quote!(backward = [true]),
            quote!(backward),
        ] {
            let err = parse(bad).err().unwrap();
            assert_eq!(
                messages(err),
                ["`backward` takes `true` or `false`, e.g. `backward = true`"]
            );
        }
    }

    #[test]
    fn a_huge_head_size_is_rejected() {
        let err = parse(quote!(head_sizes = [100000000000000000000000]))
            .err()
            .unwrap();
        assert!(messages(err)[0].starts_with("head size 100000000000000000000000 is not supported"));
    }
}
