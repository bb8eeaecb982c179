//! Tallies how far `sdpa run` gets with each file of a corpus: not a case,
//! too big to compute, refused by the runtime (by message), or computed.
//!
//! `cargo +nightly run --release --example classify [DIR]` (default
//! `corpus/safetensors_case`); a folder named `..._structured` holds inputs
//! of `safetensors_structured`, turned into files as that target does.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use sdpa_fuzz::structured::{self, Input};
use sdpa_fuzz::Outcome;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/safetensors_case".into());
    let is_structured = dir.trim_end_matches('/').ends_with("_structured");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("read the corpus folder") {
        let mut bytes = std::fs::read(entry.expect("a corpus entry").path()).expect("read a file");
        files += 1;
        if is_structured {
            // As libfuzzer-sys decodes a typed input.
            let input = Input::arbitrary_take_rest(Unstructured::new(&bytes));
            match input.ok().as_ref().and_then(structured::file) {
                Some(file) => bytes = file,
                None => {
                    *tally.entry("not written (too big)".into()).or_default() += 1;
                    continue;
                }
            }
        }
        let what = match sdpa_fuzz::run(&bytes) {
            Outcome::NotACase(m) => format!("not a case: {}", head(&m)),
            Outcome::TooBig => "too big to compute".to_string(),
            Outcome::Computed => "computed".to_string(),
            Outcome::Refused(m) => format!("refused: {}", head(&m)),
        };
        *tally.entry(what).or_default() += 1;
    }
    println!("{files} files in {dir}");
    for (what, n) in &tally {
        println!("{n:>7}  {what}");
    }
}

/// The words of a message that name its check: up to its first number,
/// quote or bracket, less the file name.
fn head(message: &str) -> String {
    let message = message.trim_start_matches("fuzz.safetensors ");
    let head: String = message
        .chars()
        .take_while(|c| !c.is_ascii_digit() && !matches!(c, '"' | '[' | '(' | '`'))
        .collect();
    head.trim_end().to_string()
}
