//! What a bench case computes beyond its shape: a mask (`--mask`) or a
//! packed variable-length batch (`--varlen`), and the useful FLOPs that
//! its throughput counts.

use std::fmt;
use std::str::FromStr;

/// The mask `--mask` asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskArg {
    /// `key-padding:F`: a `[B, Sk]` bool mask keeping the first
    /// `round(F · Sk)` keys of every batch entry (right padding, as a
    /// padded text batch has); throughput counts the kept keys only.
    KeyPadding(f64),
    /// `bool`: a dense `[B, 1, Sq, Sk]` bool mask keeping 90% of the keys
    /// at random.
    Bool,
    /// `additive`: a dense `[B, 1, Sq, Sk]` additive mask in q's dtype,
    /// uniform in `[-2, 2)`.
    Additive,
}

/// The share of keys a `bool` mask keeps.
pub const BOOL_KEEP: f64 = 0.9;

impl FromStr for MaskArg {
    type Err = String;

    fn from_str(text: &str) -> Result<MaskArg, String> {
        let usage = "pass key-padding:FRACTION (e.g. key-padding:0.9), bool or additive";
        match text {
            "bool" => Ok(MaskArg::Bool),
            "additive" => Ok(MaskArg::Additive),
            _ => match text.strip_prefix("key-padding:") {
                Some(f) => match f.parse::<f64>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => Ok(MaskArg::KeyPadding(f)),
                    _ => Err(format!(
                        "{f:?} is not a share of keys to keep; pass a fraction in (0, 1], \
                         like key-padding:0.9"
                    )),
                },
                None => Err(format!("{text:?} is not a mask; {usage}")),
            },
        }
    }
}

impl fmt::Display for MaskArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskArg::KeyPadding(x) => write!(f, "key-padding:{x}"),
            MaskArg::Bool => f.write_str("bool"),
            MaskArg::Additive => f.write_str("additive"),
        }
    }
}

impl MaskArg {
    /// The keys a key-padding mask keeps of `seq_k` (all for the others).
    pub fn kept_keys(&self, seq_k: usize) -> usize {
        match self {
            MaskArg::KeyPadding(f) => ((f * seq_k as f64).round() as usize).clamp(1, seq_k),
            MaskArg::Bool | MaskArg::Additive => seq_k,
        }
    }
}

/// Parses one sequence length of `--varlen 512,8192`.
pub fn parse_len(text: &str) -> Result<usize, String> {
    text.trim().parse::<usize>().map_err(|_| {
        format!("{text:?} is not a sequence length; pass token counts like 512,8192,0,4096")
    })
}

/// The useful FLOPs of a packed batch of `lens` sequences (each attending
/// within itself, `Sq = Sk = len`): `Σ 4·Hq·len²·D`, halved when causal.
pub fn varlen_flops(lens: &[usize], heads_q: usize, head_size: usize, causal: bool) -> f64 {
    let full: f64 = lens
        .iter()
        .map(|&n| 4.0 * heads_q as f64 * (n as f64) * (n as f64) * head_size as f64)
        .sum();
    if causal {
        full / 2.0
    } else {
        full
    }
}

/// `cu_seqlens` of `lens`: `[0, l0, l0 + l1, ...]`, or `None` when the
/// total does not fit an `i32`.
pub fn cu_seqlens(lens: &[usize]) -> Option<Vec<i32>> {
    let mut cu = Vec::with_capacity(lens.len() + 1);
    let mut total = 0i32;
    cu.push(0);
    for &n in lens {
        total = total.checked_add(i32::try_from(n).ok()?)?;
        cu.push(total);
    }
    Some(cu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_parse_and_print_back() {
        for text in ["key-padding:0.9", "bool", "additive", "key-padding:1"] {
            let m: MaskArg = text.parse().unwrap();
            assert_eq!(m.to_string().parse::<MaskArg>().unwrap(), m);
        }
        for bad in [
            "key-padding:0",
            "key-padding:1.5",
            "key-padding:x",
            "dense",
            "",
        ] {
            let err = bad.parse::<MaskArg>().unwrap_err();
            assert!(err.contains("pass"), "{err}");
        }
    }

    #[test]
    fn kept_keys_round_and_stay_in_range() {
        assert_eq!(MaskArg::KeyPadding(0.9).kept_keys(32760), 29484);
        assert_eq!(MaskArg::KeyPadding(0.001).kept_keys(10), 1);
        assert_eq!(MaskArg::Bool.kept_keys(77), 77);
    }

    #[test]
    fn varlen_counts_each_sequence_alone() {
        let f = varlen_flops(&[2, 3, 0], 2, 8, false);
        assert_eq!(f, 4.0 * 2.0 * 8.0 * (4.0 + 9.0));
        assert_eq!(varlen_flops(&[2, 3], 2, 8, true), f / 2.0);
        assert_eq!(cu_seqlens(&[2, 3, 0]).unwrap(), vec![0, 2, 5, 5]);
        assert!(cu_seqlens(&[usize::MAX]).is_none());
    }
}
