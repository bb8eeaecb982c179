//! Fuzzing the attribute through its entry point, `sdpa_variants_tokens`.
//! A proc-macro crate cannot be linked into a cargo-fuzz binary, so the
//! fuzzing is a set of property tests over `proc_macro2` tokens:
//!
//! - `random_token_trees`: arbitrary token trees (idents, literals of every
//!   kind, punctuation, nested groups of every delimiter) as the arguments,
//!   on arbitrary items;
//! - `mutated_declarations`: valid declarations with tokens deleted,
//!   repeated, swapped or inserted (odd literals, stray commas, nested
//!   brackets, unicode idents);
//! - `clean_declarations`: well-formed declarations of known and unknown
//!   keys and values, whose outcome (the variant count, or the exact number
//!   of errors) is predicted independently of the macro.
//!
//! Every case must return, without panicking, tokens that parse as items:
//! the expansion (the item and one `AttentionBackend` impl), or the item
//! (when the input is one) followed by `compile_error!`s only, each with a
//! message and pointing at an input token or at the attribute as a whole.
//!
//! Each property runs `SDPA_MACRO_FUZZ_CASES` cases (default 256):
//! `SDPA_MACRO_FUZZ_CASES=100000 cargo test --release -p sdpa-macros
//! fuzz_tests -- --nocapture` runs a long campaign and prints what the cases
//! exercised. `PROPTEST_RNG_SEED` fixes the seed.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use proc_macro2::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use syn::{Expr, ImplItem, Item, Stmt};

use crate::sdpa_variants_tokens;

/// Cases per property: `SDPA_MACRO_FUZZ_CASES`, else 256.
fn config() -> Config {
    let cases = std::env::var("SDPA_MACRO_FUZZ_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(256);
    Config {
        cases,
        // Shrinking re-expands valid declarations (PTX for every variant):
        // keep it short.
        max_shrink_iters: 2048,
        // A failure is kept as a named test below, not in a file.
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// The check every case goes through.

/// What one call of the attribute gave.
#[derive(Debug)]
enum Outcome {
    /// The expansion, with this many variants.
    Expanded(usize),
    /// `compile_error!`s after the item (or alone, if the input was not an
    /// item), with their messages and whether each points at the attribute as
    /// a whole rather than at a token.
    Errors(Vec<(String, bool)>),
}

/// Runs the attribute on `args` and `item` and checks the properties every
/// output must have, whatever the input.
fn check(args: &TokenStream, item: &TokenStream) -> Result<Outcome, TestCaseError> {
    let out = catch_unwind(AssertUnwindSafe(|| {
        sdpa_variants_tokens(args.clone(), item.clone())
    }))
    .map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        TestCaseError::fail(format!("the attribute panicked: {why}"))
    })?;
    let file: syn::File = syn::parse2(out.clone())
        .map_err(|e| TestCaseError::fail(format!("the output does not parse as items: {e}")))?;
    let input: Option<Item> = syn::parse2(item.clone()).ok();

    // Where an error may point: within the arguments, within the item (a
    // joined span covers several tokens), or at the call site.
    let inputs = [extent(args), extent(item)];
    let call_site = range(Span::call_site());
    let errors = compile_errors(&out);
    for (message, start, end) in &errors {
        prop_assert!(!message.is_empty(), "an error without a message");
        prop_assert!(
            !message.starts_with(|c: char| c.is_ascii_uppercase()),
            "messages are lowercase: {message:?}"
        );
        for at in [start, end] {
            prop_assert!(
                *at == call_site || inputs.iter().flatten().any(|r| r.0 <= at.0 && at.1 <= r.1),
                "the error {message:?} points at bytes {at:?}, outside the input {inputs:?}"
            );
        }
    }
    let macros = file
        .items
        .iter()
        .filter(|i| {
            matches!(i, Item::Macro(m)
                if m.mac.path.segments.last().is_some_and(|s| s.ident == "compile_error"))
        })
        .count();
    prop_assert_eq!(
        macros,
        errors.len(),
        "every compile_error! is a top-level item"
    );

    let Some(input) = input else {
        // Not an item: the parse error alone.
        prop_assert!(
            !errors.is_empty(),
            "no error for an input that is not an item"
        );
        prop_assert_eq!(file.items.len(), errors.len(), "only errors for a non-item");
        return Ok(Outcome::Errors(
            errors
                .into_iter()
                .map(|(m, s, _)| (m, s == call_site))
                .collect(),
        ));
    };
    // The user's item comes first, unchanged, expanded or not.
    prop_assert!(
        !file.items.is_empty(),
        "the item is missing from the output"
    );
    prop_assert_eq!(
        tokens(&file.items[0]),
        tokens(&input),
        "the item is not emitted unchanged"
    );
    if !errors.is_empty() {
        prop_assert_eq!(
            file.items.len(),
            1 + errors.len(),
            "an error output holds the item and errors only"
        );
        return Ok(Outcome::Errors(
            errors
                .into_iter()
                .map(|(m, s, _)| (m, s == call_site))
                .collect(),
        ));
    }
    // Expanded: the item is a plain struct, followed by its impl.
    let Item::Struct(target) = &input else {
        return Err(TestCaseError::fail(
            "expanded on an item that is not a struct",
        ));
    };
    prop_assert!(
        target.generics.params.is_empty(),
        "expanded on a generic struct"
    );
    prop_assert_eq!(
        file.items.len(),
        2,
        "the expansion is the item and one impl"
    );
    let Item::Impl(imp) = &file.items[1] else {
        return Err(TestCaseError::fail("the second item is not an impl"));
    };
    let trait_path = imp.trait_.as_ref().map(|(_, p, _)| tokens(p));
    prop_assert_eq!(
        trait_path.as_deref(),
        Some(":: sdpa_runtime :: AttentionBackend")
    );
    prop_assert_eq!(tokens(&imp.self_ty), target.ident.to_string());
    Ok(Outcome::Expanded(variant_count(imp)?))
}

fn tokens(t: &impl quote::ToTokens) -> String {
    t.to_token_stream().to_string()
}

/// The length of the `VARIANTS` array in the expansion's `variant_table`.
fn variant_count(imp: &syn::ItemImpl) -> Result<usize, TestCaseError> {
    for item in &imp.items {
        let ImplItem::Fn(f) = item else { continue };
        for stmt in &f.block.stmts {
            if let Stmt::Item(Item::Static(s)) = stmt {
                if s.ident == "VARIANTS" {
                    if let Expr::Array(a) = &*s.expr {
                        return Ok(a.elems.len());
                    }
                }
            }
        }
    }
    Err(TestCaseError::fail("no VARIANTS array in the expansion"))
}

/// A span's byte range in proc-macro2's source map (its `Debug` text with
/// `span-locations`: `bytes(lo..hi)`); the call site is `(0, 0)`.
type ByteRange = (u32, u32);

/// The byte range of `span`.
fn range(span: Span) -> ByteRange {
    let text = format!("{span:?}");
    let inner = text
        .strip_prefix("bytes(")
        .and_then(|t| t.strip_suffix(')'))
        .expect("spans print as bytes(lo..hi)");
    let (lo, hi) = inner.split_once("..").expect("lo..hi");
    (lo.parse().unwrap(), hi.parse().unwrap())
}

/// The byte range the tokens of `tokens` were lexed from, if any were.
fn extent(tokens: &TokenStream) -> Option<ByteRange> {
    fn walk(tokens: &TokenStream, out: &mut Vec<ByteRange>) {
        for tt in tokens.clone() {
            out.push(range(tt.span()));
            if let TokenTree::Group(g) = &tt {
                walk(&g.stream(), out);
            }
        }
    }
    let mut all = Vec::new();
    walk(tokens, &mut all);
    let lexed = all.into_iter().filter(|r| *r != (0, 0));
    lexed.reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))
}

/// The top-level `::core::compile_error! { "message" }` of `out`: message,
/// start span (of `compile_error`) and end span (of the message), as syn's
/// `Error::to_compile_error` writes them.
fn compile_errors(out: &TokenStream) -> Vec<(String, ByteRange, ByteRange)> {
    let tts: Vec<TokenTree> = out.clone().into_iter().collect();
    let mut found = Vec::new();
    for (i, tt) in tts.iter().enumerate() {
        let TokenTree::Ident(ident) = tt else {
            continue;
        };
        if ident != "compile_error" {
            continue;
        }
        let Some(TokenTree::Group(g)) = tts.get(i + 2) else {
            continue;
        };
        let Some(TokenTree::Literal(lit)) = g.stream().into_iter().next() else {
            continue;
        };
        let message = syn::parse_str::<syn::LitStr>(&lit.to_string())
            .map(|s| s.value())
            .unwrap_or_default();
        found.push((message, range(ident.span()), range(lit.span())));
    }
    found
}

/// Tallies of what a property's cases exercised, printed at its end.
#[derive(Default)]
struct Stats(BTreeMap<String, usize>);

impl Stats {
    fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }

    fn outcome(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Expanded(_) => self.add("expanded"),
            Outcome::Errors(errors) => {
                self.add("errors");
                for (message, at_call_site) in errors {
                    if *at_call_site {
                        // The first words say which error it is.
                        let head: String = message.split(';').next().unwrap_or("").into();
                        self.add(format!("error at the call site: {head}"));
                    }
                }
            }
        }
    }

    fn print(&self, name: &str) {
        let runs = self.0.get("cases").copied().unwrap_or(0);
        eprintln!("{name}: {runs} cases");
        for (what, n) in &self.0 {
            eprintln!("  {n:>8}  {what}");
        }
    }
}

/// Runs `test` on `cases()` values of `strategy`, failing with the smallest
/// failing value proptest finds, and prints the tallies.
fn run<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value, &mut Stats) -> Result<(), TestCaseError>,
) {
    let stats = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(config());
    let result = runner.run(&strategy, |value| {
        let mut stats = stats.borrow_mut();
        stats.add("cases");
        let result = test(value, &mut stats);
        // Spans made from text live in a per-thread source map; drop them,
        // as 100 000 cases would otherwise keep every input's text.
        proc_macro2::extra::invalidate_current_thread_spans();
        result
    });
    stats.borrow().print(name);
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
}

// ---------------------------------------------------------------------------
// Items.

/// Items of every kind, as source text; `{}` is the name. Whether each is a
/// plain struct (the one kind the attribute accepts) is decided by parsing,
/// not written here.
const ITEMS: &[&str] = &[
    "pub struct {};",
    "struct {} { x: u8, pub y: [f32; 4] }",
    "pub(crate) struct {}(u32, ());",
    "/// Docs.\n#[derive(Clone, Copy, Debug)]\n#[repr(C)]\npub struct {};",
    "struct {} where u8: Copy;",
    "struct {}<T>(T);",
    "struct {}<'a> { x: &'a u8 }",
    "struct {}<const N: usize>;",
    "pub struct {}<T: Clone = u8> where T: Copy { t: T }",
    "enum {} { A, B(u8), C { x: f32 } }",
    "pub fn {}() -> u8 { 0 }",
    "async unsafe fn {}<T>(t: T) {}",
    "union {} { a: u32, b: f32 }",
    "trait {} { fn f(&self); }",
    "impl {} { fn new() -> Self { {} } }",
    "type {} = u8;",
    "mod {} {}",
    "const {}: u8 = 1;",
    "static {}: &str = \"x\";",
    "use std::{}::*;",
    "extern crate {};",
    "macro_rules! {} { () => {}; }",
    "extern \"C\" { fn {}(); }",
    // Not items: the attribute reports the parse error alone.
    "struct {}",
    "{} {}",
    "let {} = 1;",
    "",
    "struct Self;",
    "pub struct {}; pub struct Other;",
];

/// Names: plain, raw, unicode, keyword-like.
const NAMES: &[&str] = &[
    "WanAttention",
    "A",
    "_",
    "r#type",
    "r#Attention",
    "Атеншн",
    "注意力",
    "Ünïcödé",
    "sdpa_runtime",
    "AttentionBackend",
    "VARIANTS",
    "TABLE",
    "core",
    "x",
];

/// An item, as tokens parsed from text (with positions), for the check; and
/// its text, for failure reports.
#[derive(Clone, Debug)]
struct ItemSrc(String);

impl ItemSrc {
    fn tokens(&self) -> Option<TokenStream> {
        self.0.parse().ok()
    }
}

/// How many of `ITEMS` come first and are plain structs.
const PLAIN_STRUCTS: usize = 5;

/// An item of any kind, or (with weight `plain`) a plain struct.
fn item_src(plain: u32) -> impl Strategy<Value = ItemSrc> {
    let template = prop_oneof![
        1 => prop::sample::select(ITEMS),
        plain => prop::sample::select(&ITEMS[..PLAIN_STRUCTS]),
    ];
    (template, prop::sample::select(NAMES))
        .prop_map(|(template, name)| ItemSrc(template.replace("{}", name)))
}

// ---------------------------------------------------------------------------
// Random token trees.

/// A token tree that proptest can shrink.
#[derive(Clone, Debug)]
enum Tt {
    Leaf(TokenTree),
    Group(Delimiter, Vec<Tt>),
}

fn to_stream(tts: &[Tt]) -> TokenStream {
    tts.iter()
        .map(|tt| match tt {
            Tt::Leaf(t) => t.clone(),
            Tt::Group(d, inner) => TokenTree::Group(Group::new(*d, to_stream(inner))),
        })
        .collect()
}

/// Idents that matter to the attribute, near misses, raw and unicode ones.
const IDENTS: &[&str] = &[
    "head_sizes",
    "causal",
    "dtypes",
    "bf16",
    "f16",
    "f32",
    "f64",
    "true",
    "false",
    "head_size",
    "dtype",
    "is_causal",
    "HEAD_SIZES",
    "Causal",
    "half",
    "bfloat16",
    "héad_sizes",
    "データ",
    "Σ",
    "_",
    "self",
    "Self",
    "crate",
    "struct",
    "where",
    "dyn",
];

/// Idents written raw: `r#head_sizes` is not the key `head_sizes`.
const RAW_IDENTS: &[&str] = &["head_sizes", "causal", "dtypes", "bf16", "type", "match"];

/// Literals whose text matters: integer forms, floats, suffixes, huge and
/// negative values, and every other literal kind.
const LITERALS: &[&str] = &[
    "64",
    "0",
    "8",
    "256",
    "264",
    "65",
    "64u8",
    "256u8",
    "64usize",
    "64i128",
    "64_u32",
    "1_000",
    "6_4",
    "0x40",
    "0X40",
    "0o100",
    "0b1000000",
    "0xffff_ffff_ffff_ffff_ffff",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "-64",
    "64.0",
    "6.4e1",
    "1e3",
    "64f32",
    "64f64",
    "64e0",
    "\"64\"",
    "\"bf16\"",
    "r#\"raw\"#",
    "b\"bytes\"",
    "br\"raw\"",
    "c\"cstr\"",
    "'c'",
    "b'b'",
    "'\\u{1F600}'",
    "\"\\u{0}\"",
];

fn leaf() -> impl Strategy<Value = TokenTree> {
    let span = Span::call_site();
    prop_oneof![
        3 => prop::sample::select(IDENTS).prop_map(move |s| Ident::new(s, span).into()),
        1 => prop::sample::select(RAW_IDENTS).prop_map(move |s| Ident::new_raw(s, span).into()),
        1 => "[a-zA-Z][a-zA-Z0-9_]{0,8}".prop_map(move |s| Ident::new(&s, span).into()),
        3 => prop::sample::select(LITERALS)
            .prop_map(|s| s.parse::<Literal>().expect("a literal").into()),
        1 => any::<i128>().prop_map(|n| Literal::i128_unsuffixed(n).into()),
        1 => any::<u128>().prop_map(|n| Literal::u128_suffixed(n).into()),
        2 => (0usize..300).prop_map(|n| Literal::usize_unsuffixed(n).into()),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Literal::f64_unsuffixed(f).into()),
        1 => any::<f32>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Literal::f32_suffixed(f).into()),
        1 => ".{0,6}".prop_map(|s| Literal::string(&s).into()),
        1 => any::<char>().prop_map(|c| Literal::character(c).into()),
        1 => prop::collection::vec(any::<u8>(), 0..6)
            .prop_map(|b| Literal::byte_string(&b).into()),
        4 => (prop::sample::select(&b"=,;:+-*/%^!&|<>@.#$?~"[..]), any::<bool>()).prop_map(
            |(c, joint)| {
                let spacing = if joint { Spacing::Joint } else { Spacing::Alone };
                Punct::new(c as char, spacing).into()
            }
        ),
    ]
}

fn token_trees() -> impl Strategy<Value = Vec<Tt>> {
    let tree = leaf().prop_map(Tt::Leaf).prop_recursive(4, 48, 6, |inner| {
        (
            prop::sample::select(vec![
                Delimiter::Bracket,
                Delimiter::Parenthesis,
                Delimiter::Brace,
                Delimiter::None,
            ]),
            prop::collection::vec(inner, 0..6),
        )
            .prop_map(|(d, tts)| Tt::Group(d, tts))
    });
    prop::collection::vec(tree, 0..10)
}

/// A random stream, sometimes starting as a declaration does, so that the
/// parse goes past the first token.
fn random_args() -> impl Strategy<Value = Vec<Tt>> {
    (
        prop::option::of(prop::sample::select(
            &["head_sizes", "causal", "dtypes"][..],
        )),
        any::<bool>(),
        token_trees(),
    )
        .prop_map(|(key, eq, mut tts)| {
            let mut head = Vec::new();
            if let Some(key) = key {
                head.push(Tt::Leaf(Ident::new(key, Span::call_site()).into()));
                if eq {
                    head.push(Tt::Leaf(Punct::new('=', Spacing::Alone).into()));
                }
            }
            head.append(&mut tts);
            head
        })
}

#[test]
fn random_token_trees() {
    let items = prop_oneof![
        4 => item_src(0).prop_map(Ok),
        1 => token_trees().prop_map(Err),
    ];
    run(
        "random_token_trees",
        (random_args(), items),
        |(args, item), stats| {
            let args = to_stream(&args);
            let item = match item {
                Ok(src) => match src.tokens() {
                    Some(item) => item,
                    None => return Ok(()),
                },
                Err(tts) => to_stream(&tts),
            };
            // As built (every span the call site), then re-lexed from its text
            // (every token with a position of its own) when that lexes.
            // The tallies are of the re-lexed run, whose spans say where an
            // error points.
            let built = check(&args, &item)?;
            match (
                args.to_string().parse::<TokenStream>(),
                item.to_string().parse::<TokenStream>(),
            ) {
                (Ok(args), Ok(item)) => {
                    stats.add("re-lexed");
                    stats.outcome(&check(&args, &item)?);
                }
                _ => {
                    stats.add("not re-lexable");
                    stats.outcome(&built);
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Declarations: clean ones with a predicted outcome, and mutations of valid
// ones.

/// A head size as written, with the value the macro must read from it
/// (`None`: does not fit a `usize`, a parse error). Suffixed literals
/// (`64u8`, `64f32`) are left to the mutations: what the macro should make
/// of them is not settled (see `docs/reliability.md`).
fn head_size() -> impl Strategy<Value = (String, Option<usize>)> {
    prop_oneof![
        // Supported sizes, written in every unsuffixed integer form.
        4 => (1usize..=32, 0..6usize).prop_map(|(k, form)| (int_form(8 * k, form), Some(8 * k))),
        // Unsupported ones.
        2 => (0usize..600, 0..6usize).prop_map(|(n, form)| (int_form(n, form), Some(n))),
        1 => prop::sample::select(vec![
            ("1_000".to_string(), Some(1000)),
            ("18446744073709551615".to_string(), Some(usize::MAX)),
            ("18446744073709551616".to_string(), None),
            ("0xffff_ffff_ffff_ffff_ffff".to_string(), None),
        ]),
    ]
}

/// `n` as decimal, hexadecimal, octal, binary or with an underscore.
fn int_form(n: usize, form: usize) -> String {
    match form {
        0 | 1 => n.to_string(),
        2 => format!("{n:#x}"),
        3 => format!("{n:#o}"),
        4 => format!("{n:#b}"),
        _ => format!("{}_{}", n / 10, n % 10),
    }
}

/// A dtype name and whether it is one.
fn dtype() -> impl Strategy<Value = (&'static str, bool)> {
    prop::sample::select(vec![
        ("bf16", true),
        ("f16", true),
        ("f32", true),
        ("f64", false),
        ("half", false),
        ("BF16", false),
        ("bfloat16", false),
        ("i8", false),
        ("r#f32", false),
        ("ƒ32", false),
    ])
}

/// One `key = [...]` of a clean declaration.
#[derive(Clone, Debug)]
enum Entry {
    HeadSizes(Vec<(String, Option<usize>)>),
    Causal(Vec<bool>),
    Dtypes(Vec<(&'static str, bool)>),
    /// An unknown key and the text of its value.
    Unknown(&'static str, &'static str),
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => prop::collection::vec(head_size(), 0..4).prop_map(Entry::HeadSizes),
        2 => prop::collection::vec(any::<bool>(), 0..3).prop_map(Entry::Causal),
        2 => prop::collection::vec(dtype(), 0..4).prop_map(Entry::Dtypes),
        1 => (
            prop::sample::select(vec![
                "tile", "dtype", "head_size", "is_causal", "Causal", "héad_sizes", "r#dtypes",
            ]),
            prop::sample::select(vec!["[64]", "64 + 1", "", "= [true]", "(1, 2) [3]"]),
        )
            .prop_map(|(k, v)| Entry::Unknown(k, v)),
    ]
}

/// A clean declaration: entries separated by commas, maybe a trailing one,
/// and trailing commas inside the lists.
#[derive(Clone, Debug)]
struct Decl {
    entries: Vec<Entry>,
    trailing: bool,
    inner_trailing: bool,
}

impl Decl {
    fn text(&self) -> String {
        let list = |items: Vec<String>| {
            let comma = if self.inner_trailing && !items.is_empty() {
                ","
            } else {
                ""
            };
            format!("[{}{comma}]", items.join(", "))
        };
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|e| match e {
                Entry::HeadSizes(v) => {
                    format!(
                        "head_sizes = {}",
                        list(v.iter().map(|h| h.0.clone()).collect())
                    )
                }
                Entry::Causal(v) => {
                    format!(
                        "causal = {}",
                        list(v.iter().map(|c| c.to_string()).collect())
                    )
                }
                Entry::Dtypes(v) => {
                    format!(
                        "dtypes = {}",
                        list(v.iter().map(|d| d.0.to_string()).collect())
                    )
                }
                Entry::Unknown(k, v) => format!("{k} {v}"),
            })
            .collect();
        let comma = if self.trailing && !entries.is_empty() {
            ","
        } else {
            ""
        };
        format!("{}{comma}", entries.join(", "))
    }

    /// The outcome on a plain struct, predicted from the rules in the
    /// crate's docs: `Ok(variants)` or `Err(number of errors)`.
    fn expected(&self) -> Result<usize, usize> {
        // A head size that does not fit a usize is a parse error, and parse
        // errors stop before validation.
        let overflow = self
            .entries
            .iter()
            .map(|e| match e {
                Entry::HeadSizes(v) => v.iter().filter(|h| h.1.is_none()).count(),
                _ => 0,
            })
            .sum::<usize>();
        if overflow > 0 {
            return Err(overflow);
        }
        let supported = |n: usize| (8..=256).contains(&n) && n.is_multiple_of(8);
        fn repeats<T: Eq + std::hash::Hash + Copy>(items: impl IntoIterator<Item = T>) -> usize {
            let mut seen = HashSet::new();
            items.into_iter().filter(|&x| !seen.insert(x)).count()
        }
        let (mut heads, mut causals, mut dtypes) = (Vec::new(), Vec::new(), Vec::new());
        let mut errors = 0;
        for e in &self.entries {
            match e {
                Entry::HeadSizes(v) => {
                    let values: Vec<usize> = v.iter().map(|h| h.1.unwrap()).collect();
                    errors += values.iter().filter(|&&n| !supported(n)).count();
                    errors += repeats(values.iter().copied());
                    errors += usize::from(v.is_empty());
                    heads.push(values);
                }
                Entry::Causal(v) => {
                    errors += repeats(v.iter().copied()) + usize::from(v.is_empty());
                    causals.push(v.len());
                }
                Entry::Dtypes(v) => {
                    errors += v.iter().filter(|d| !d.1).count();
                    errors += repeats(v.iter().map(|d| d.0)) + usize::from(v.is_empty());
                    dtypes.push(v.len());
                }
                Entry::Unknown(..) => errors += 1,
            }
        }
        // A key given twice, once per extra list; head_sizes is required.
        errors += heads.len().saturating_sub(1);
        errors += causals.len().saturating_sub(1) + dtypes.len().saturating_sub(1);
        errors += usize::from(heads.is_empty());
        if errors > 0 {
            return Err(errors);
        }
        let causal = causals.first().copied().unwrap_or(2);
        let dtype = dtypes.first().copied().unwrap_or(3);
        Ok(heads[0].len() * causal * dtype)
    }
}

/// A declaration that passes every check: distinct supported head sizes,
/// distinct causal values and dtypes, each key at most once, any order.
fn valid_decl() -> impl Strategy<Value = Decl> {
    let sizes = prop::sample::subsequence((1..=32).map(|k| 8 * k).collect::<Vec<usize>>(), 1..4);
    (
        sizes.prop_flat_map(|v| {
            (prop::sample::select(vec![0usize, 2, 3, 5]), Just(v)).prop_map(|(form, v)| {
                v.into_iter()
                    .map(|n| (int_form(n, form), Some(n)))
                    .collect::<Vec<_>>()
            })
        }),
        prop::option::of(prop::sample::subsequence(vec![false, true], 1..=2)),
        prop::option::of(prop::sample::subsequence(
            vec![("bf16", true), ("f16", true), ("f32", true)],
            1..=3,
        )),
        any::<prop::sample::Index>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(sizes, causal, dtypes, order, trailing, inner_trailing)| {
            let mut entries = vec![Entry::HeadSizes(sizes)];
            entries.extend(causal.map(Entry::Causal));
            entries.extend(dtypes.map(Entry::Dtypes));
            let n = entries.len();
            entries.rotate_left(order.index(n));
            Decl {
                entries,
                trailing,
                inner_trailing,
            }
        })
}

fn decl() -> impl Strategy<Value = Decl> {
    (
        prop::collection::vec(entry(), 0..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(entries, trailing, inner_trailing)| Decl {
            entries,
            trailing,
            inner_trailing,
        })
}

/// What a declaration expands to costs about 10 ms a variant (the PTX and
/// its re-parse): big valid declarations are skipped.
const MAX_VARIANTS: usize = 12;

#[test]
fn clean_declarations() {
    run(
        "clean_declarations",
        (prop_oneof![1 => valid_decl(), 2 => decl()], item_src(3)),
        |(decl, item), stats| {
            let expected = decl.expected();
            if matches!(expected, Ok(n) if n > MAX_VARIANTS) {
                stats.add("skipped: too many variants to expand");
                return Ok(());
            }
            let text = decl.text();
            let args: TokenStream = text.parse().expect("a clean declaration lexes");
            let Some(item_tokens) = item.tokens() else {
                return Ok(());
            };
            let outcome = check(&args, &item_tokens)?;
            stats.outcome(&outcome);
            let plain_struct = matches!(
                syn::parse2::<Item>(item_tokens),
                Ok(Item::Struct(s)) if s.generics.params.is_empty()
            );
            if !plain_struct {
                prop_assert!(
                    matches!(outcome, Outcome::Errors(_)),
                    "{text:?} on {:?} expanded",
                    item.0
                );
                return Ok(());
            }
            match (&outcome, expected) {
                (Outcome::Expanded(got), Ok(want)) => {
                    prop_assert_eq!(*got, want, "variant count of {:?}", text)
                }
                (Outcome::Errors(errors), Err(want)) => {
                    prop_assert_eq!(
                        errors.len(),
                        want,
                        "error count of {:?}: {:?}",
                        text,
                        errors
                    );
                    // Each error points at its token, except the one about
                    // the attribute as a whole.
                    for (message, at_call_site) in errors {
                        prop_assert!(
                            !at_call_site || message.starts_with("missing `head_sizes`"),
                            "{message:?} does not point at a token of {text:?}"
                        );
                    }
                }
                (got, want) => {
                    return Err(TestCaseError::fail(format!(
                        "{text:?}: got {got:?}, expected {want:?}"
                    )))
                }
            }
            stats.add(match expected {
                Ok(_) => "predicted: expands",
                Err(_) => "predicted: errors",
            });
            Ok(())
        },
    );
}

/// Tokens inserted by `mutated_declarations`: delimiters only in balanced
/// pairs, so that most mutants still lex.
const INSERTS: &[&str] = &[
    ",",
    ",,",
    "=",
    "==",
    ":",
    ";",
    "#",
    "::",
    "..",
    "=>",
    "[]",
    "[[64]]",
    "[true, 1]",
    "(64)",
    "{}",
    "64u8",
    "1_000",
    "0x40",
    "-64",
    "64.0",
    "1e3",
    "\"64\"",
    "'a'",
    "true",
    "1",
    "head_sizes",
    "causal",
    "dtypes",
    "héad_sizes",
    "r#type",
    "f64",
];

/// One edit of a declaration's token list.
#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Repeat(usize),
    Swap(usize, usize),
    Insert(usize, &'static str),
    Replace(usize, &'static str),
}

/// The tokens of a valid declaration as strings (a group's brackets are
/// tokens too), then edited.
fn words(text: &str) -> Vec<String> {
    let spaced = text
        .replace('[', " [ ")
        .replace(']', " ] ")
        .replace(',', " , ")
        .replace('=', " = ");
    spaced.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn mutated_declarations() {
    let valid = prop::sample::select(vec![
        "head_sizes = [64]",
        "head_sizes = [64, 80, 128], causal = [false, true], dtypes = [bf16, f16, f32]",
        "dtypes = [f32,], causal = [true], head_sizes = [8, 256,],",
        "head_sizes = [0x40, 96usize], causal = [false]",
    ]);
    let mutation = prop_oneof![
        (0usize..64).prop_map(Mutation::Delete),
        (0usize..64).prop_map(Mutation::Repeat),
        (0usize..64, 0usize..64).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (0usize..64, prop::sample::select(INSERTS)).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (0usize..64, prop::sample::select(INSERTS)).prop_map(|(i, s)| Mutation::Replace(i, s)),
    ];
    let mutations = prop::collection::vec(mutation, 1..5);
    run(
        "mutated_declarations",
        (valid, mutations, item_src(1)),
        |(valid, mutations, item), stats| {
            let mut words = words(valid);
            // Brackets stay where they are, so that most mutants lex.
            let movable = |w: &String| w != "[" && w != "]";
            for m in &mutations {
                let n = words.len().max(1);
                match *m {
                    Mutation::Delete(i) if words.get(i % n).is_some_and(movable) => {
                        words.remove(i % n);
                    }
                    Mutation::Repeat(i) if words.get(i % n).is_some_and(movable) => {
                        words.insert(i % n, words[i % n].clone());
                    }
                    Mutation::Swap(a, b)
                        if words.get(a % n).is_some_and(movable)
                            && words.get(b % n).is_some_and(movable) =>
                    {
                        words.swap(a % n, b % n)
                    }
                    Mutation::Insert(i, s) => words.insert(i % (words.len() + 1), s.into()),
                    Mutation::Replace(i, s) if words.get(i % n).is_some_and(movable) => {
                        words[i % n] = s.into()
                    }
                    _ => {}
                }
            }
            let text = words.join(" ");
            let Ok(args) = text.parse::<TokenStream>() else {
                stats.add("not lexable (unbalanced brackets)");
                return Ok(());
            };
            let Some(item) = item.tokens() else {
                return Ok(());
            };
            stats.outcome(&check(&args, &item)?);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Cases worth keeping by name.

fn outcome(args: &str, item: &str) -> Outcome {
    check(&args.parse().unwrap(), &item.parse().unwrap()).unwrap()
}

#[test]
fn odd_literals_and_nesting_give_errors_not_panics() {
    for args in [
        "causal = [true, 1]",
        "head_sizes = [[64]]",
        "head_sizes = [64.0]",
        "head_sizes = [-64]",
        "head_sizes = [18446744073709551616]",
        "head_sizes = [64] dtypes = [f32]",
        "head_sizes = [64],, causal = [true]",
        "head_sizes = [,64]",
        "head_sizes = (64)",
        "head_sizes: [64]",
        "head_sizes == [64]",
        "head_sizes = [64], =",
        "= [64]",
        "64",
        "héad_sizes = [64]",
        "r#head_sizes = [64]",
        "head_sizes = [64], dtypes = [\"f32\"]",
    ] {
        let got = outcome(args, "pub struct A;");
        assert!(matches!(got, Outcome::Errors(_)), "{args}: {got:?}");
    }
}

#[test]
fn integer_forms_are_read_by_value() {
    for args in [
        "head_sizes = [0x40]",
        "head_sizes = [0o100]",
        "head_sizes = [6_4]",
    ] {
        let got = outcome(
            &format!("{args}, causal = [true], dtypes = [f32]"),
            "struct A;",
        );
        assert!(matches!(got, Outcome::Expanded(1)), "{args}: {got:?}");
    }
    // 64 twice.
    let got = outcome("head_sizes = [64, 0x40]", "struct A;");
    assert!(
        matches!(&got, Outcome::Errors(e) if e.len() == 1),
        "{got:?}"
    );
}

#[test]
fn a_none_delimited_group_is_not_a_list() {
    // Tokens from a `macro_rules!` fragment arrive in an invisible group.
    let list = Group::new(Delimiter::None, "[64]".parse().unwrap());
    let mut args: TokenStream = "head_sizes =".parse().unwrap();
    args.extend([TokenTree::Group(list)]);
    let got = check(&args, &"struct A;".parse().unwrap()).unwrap();
    assert!(
        matches!(got, Outcome::Errors(_) | Outcome::Expanded(6)),
        "{got:?}"
    );
}
