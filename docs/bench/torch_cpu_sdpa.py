"""PyTorch CPU SDPA on the CPU target shapes of issue 3 (torch's side of docs/benchmarks.md)."""
import json, sys, time
import torch, torch.nn.functional as F

torch.manual_seed(0)

def bench(fn, min_time=1.0, min_reps=5):
    fn(); fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_reps or time.perf_counter() - start < min_time:
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts) // 2]

# name, B, H, Sq, Sk, D, causal
SHAPES = [("anchor", 1, 8, 2048, 2048, 128, False),
          ("anchor-4k", 1, 4, 4096, 4096, 128, False),
          ("anchor-causal", 1, 8, 2048, 2048, 128, True),
          ("clip", 4, 16, 257, 257, 80, False),
          ("decode", 1, 8, 1, 4096, 128, False)]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Usage: torch_cpu_sdpa.py OUT.json [DTYPES] [PRESETS], lists comma-separated.
want = sys.argv[2].split(",") if len(sys.argv) > 2 else list(DTYPES)
presets = sys.argv[3].split(",") if len(sys.argv) > 3 else [s[0] for s in SHAPES]
print("# torch", torch.__version__, "threads", torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), flush=True)
rows = []
for dn in want:
    dt = DTYPES[dn]
    for name, B, H, Sq, Sk, D, causal in SHAPES:
        if name not in presets:
            continue
        # FastVideo's layout [B, S, H, D], handed to torch as [B, H, S, D] views.
        q = torch.randn(B, Sq, H, D, dtype=dt).transpose(1, 2)
        k = torch.randn(B, Sk, H, D, dtype=dt).transpose(1, 2)
        v = torch.randn(B, Sk, H, D, dtype=dt).transpose(1, 2)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=D ** -0.5)
        t = bench(fn)
        fl = 4.0 * B * H * Sq * Sk * D / (2 if causal else 1)
        rows.append(dict(preset=name, shape=f"{B}x{H}x{Sq}x{Sk}x{D}", dtype=dn, causal=causal, median_ms=t * 1e3, gflops=fl / t / 1e9))
        print(f"{name:14s} {dn:5s} {t*1e3:9.3f} ms {fl/t/1e9:7.1f} GFLOP/s", flush=True)
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/torch_cpu.json", "w"), indent=1)
