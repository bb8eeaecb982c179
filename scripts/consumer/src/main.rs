//! A crate outside the repository that declares its variants and runs
//! `sdpa_candle::forward` against candle's own attention (computed in f64),
//! forward and backward, on fresh random inputs. Exits non-zero on a
//! mismatch. Run by `scripts/consumer-check`.

use candle_core::{DType, Device, Tensor, Var};
use sdpa_runtime::prelude::*;

#[sdpa_variants(head_sizes = [64], causal = [false, true], dtypes = [f32], backward = true)]
struct Attention;

/// The largest absolute difference between two tensors, in f64.
fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    d.flatten_all()?.max(0)?.to_scalar::<f64>()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (b, sq, sk, hq, hkv, d) = (2, 37, 53, 4, 2, 64);
    let mut worst = 0f64;
    for causal in [false, true] {
        let layer = Attention.build_impl(
            AttentionParams::new(hq, d)
                .num_kv_heads(hkv)
                .causal(causal),
        )?;
        let q = Var::randn(0f32, 1.0, (b, sq, hq, d), &dev)?;
        let k = Var::randn(0f32, 1.0, (b, sk, hkv, d), &dev)?;
        let v = Var::randn(0f32, 1.0, (b, sk, hkv, d), &dev)?;
        // Key padding: entry 0 keeps its first 41 keys, entry 1 all.
        let keep: Vec<u8> = (0..b * sk).map(|i| u8::from(i >= sk || i < 41)).collect();
        let keep = Tensor::from_vec(keep, (b, sk), &dev)?;

        let out = sdpa_candle::forward(&layer, &q, &k, &v, Some(&keep))?;
        let grads = out.sqr()?.sum_all()?.backward()?;

        let wide = |t: &Var| t.as_tensor().to_dtype(DType::F64).and_then(|t| Var::from_tensor(&t));
        let (q64, k64, v64) = (wide(&q)?, wide(&k)?, wide(&v)?);
        let scale = 1.0 / (d as f64).sqrt();
        let want = sdpa_candle::naive_attention(&q64, &k64, &v64, Some(&keep), scale, causal)?;
        let want_grads = want.sqr()?.sum_all()?.backward()?;

        let mut errors = vec![("out", max_diff(&out, &want)?)];
        for (name, ours, theirs) in [("dq", &q, &q64), ("dk", &k, &k64), ("dv", &v, &v64)] {
            let ours = grads.get(ours).ok_or("no gradient from sdpa")?;
            let theirs = want_grads.get(theirs).ok_or("no gradient from candle")?;
            errors.push((name, max_diff(ours, theirs)?));
        }
        for (name, e) in errors {
            println!("causal={causal} {name}: max |sdpa - candle f64| = {e:.2e}");
            if !(e < 1e-4) {
                return Err(format!("{name} differs by {e} (causal={causal})").into());
            }
            worst = worst.max(e);
        }
    }
    println!("consumer: sdpa_candle::forward agrees with candle's attention (worst {worst:.2e})");
    Ok(())
}
