"""torch's SDPA on the GPU with the masks and variable-length batches that
`sdpa bench --mask ... / --varlen ...` times, for side-by-side ratios.

Usage (FastVideo layout [B, S, H, D], viewed as [B, H, S, D] for torch):
  torch_gpu_masked.py DTYPE CASE [CASE ...]
  CASE = NAME,B,Hq,Hkv,Sq,Sk,D,causal,MASK
  MASK = none | key-padding:FRACTION | bool | additive | varlen:L1/L2/...
- key-padding:F  a [B, 1, 1, Sk] bool mask keeping the first round(F*Sk) keys
                 of every batch entry (what `sdpa bench --mask key-padding:F`
                 builds); TFLOP/s counted on the kept keys.
- bool           a dense [B, 1, Sq, Sk] bool mask, 90% of keys kept at random.
- additive       a dense [B, 1, Sq, Sk] additive mask in q's dtype, N(0, 1).
- varlen:L/...   sequences of these lengths (B and Sq, Sk ignored), timed with
                 torch.nn.attention.varlen.varlen_attn where this torch has
                 it, else skipped.
Prints one line per case and backend, and writes $OUT/torch_masked_DTYPE.json.
Times are triton's do_bench medians after warm-up."""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

dt = {"bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[1]]
BACKENDS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}
rows = []
print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)


def bench(fn):
    fn()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def record(name, backend, ms, flops):
    rows.append(dict(shape=name, backend=backend, ms=ms, tflops=flops / ms / 1e9))
    print(f"{name:22s} {backend:9s} {ms:9.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)


for spec in sys.argv[2:]:
    name, B, Hq, Hkv, Sq, Sk, D, causal, mask = spec.split(",")
    B, Hq, Hkv, Sq, Sk, D = map(int, (B, Hq, Hkv, Sq, Sk, D))
    causal = causal == "1"
    g = torch.Generator(device="cuda").manual_seed(0)
    if mask.startswith("varlen:"):
        lens = [int(x) for x in mask.split(":")[1].split("/")]
        T = sum(lens)
        q = torch.randn(T, Hq, D, device="cuda", dtype=dt, generator=g)
        k = torch.randn(T, Hkv, D, device="cuda", dtype=dt, generator=g)
        v = torch.randn(T, Hkv, D, device="cuda", dtype=dt, generator=g)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
        flops = sum(4.0 * Hq * n * n * D / (2 if causal else 1) for n in lens)
        try:
            from torch.nn.attention.varlen import varlen_attn
            fn = lambda: varlen_attn(q, k, v, cu, cu, max(lens), max(lens), is_causal=causal)
            record(name, "varlen", bench(fn), flops)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:22s} varlen    unsupported: {type(e).__name__}: {str(e)[:100]}", flush=True)
        continue
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, generator=g).transpose(1, 2)
    kept = Sk
    if mask == "none":
        m = None
    elif mask.startswith("key-padding:"):
        kept = round(float(mask.split(":")[1]) * Sk)
        m = torch.zeros(B, 1, 1, Sk, device="cuda", dtype=torch.bool)
        m[..., :kept] = True
    elif mask == "bool":
        m = torch.rand(B, 1, Sq, Sk, device="cuda", generator=g) < 0.9
    elif mask == "additive":
        m = torch.randn(B, 1, Sq, Sk, device="cuda", dtype=dt, generator=g)
    else:
        sys.exit(f"unknown mask {mask}")
    kw = dict(attn_mask=m, is_causal=causal, scale=D ** -0.5, enable_gqa=Hq != Hkv)
    if m is not None and causal:
        # torch refuses attn_mask with is_causal: fold causal into the mask.
        tri = torch.ones(Sq, Sk, device="cuda", dtype=torch.bool).tril()
        m = (m & tri) if m.dtype == torch.bool else m.masked_fill(~tri, float("-inf"))
        kw.update(attn_mask=m, is_causal=False)
    flops = 4.0 * B * Hq * Sq * kept * D / (2 if causal else 1)
    for bname, be in BACKENDS.items():
        fn = lambda: F.scaled_dot_product_attention(q, k, v, **kw)
        try:
            if be is None:
                ms = bench(fn)
            else:
                with sdpa_kernel([be]):
                    ms = bench(fn)
            record(name, bname, ms, flops)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:22s} {bname:9s} unsupported: {type(e).__name__}: {str(e)[:100]}", flush=True)
    del q, k, v, m
    torch.cuda.empty_cache()
out = os.path.join(os.environ.get("OUT", "/tmp"), f"torch_masked_{sys.argv[1]}.json")
json.dump(rows, open(out, "w"), indent=1)
