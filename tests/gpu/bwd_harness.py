#!/usr/bin/env python3
"""Runs the generated backward kernels (preprocess, main, convert) through
the CUDA driver (ctypes) and checks dq, dk and dv against torch autograd in
float64; optionally times them.

A development harness for kernels-gen, independent of the Rust runtime, for
any dtype (the f32 CUDA-core main kernel and the 16-bit mma.sync one):

    BWD_PTX_DIR=.gpu-bwd cargo test -p kernels-gen writes_ptx_for_the_gpu_harness
    python3 tests/gpu/bwd_harness.py .gpu-bwd [--only f32] [--bench]

(`BWD_HEAD_SIZES=64,128` limits the head sizes written.) The launch follows
the contract in kernels-gen/src/backward/mod.rs: one argument list for the
three kernels, in the order of BACKWARD_PARAMS. It needs a CUDA GPU and
torch; it is not run by CI.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptx_harness import DT, Driver, bench_one  # noqa: E402


def cdiv(a, b):
    return (a + b - 1) // b


def strides3(t):
    return [t.stride(0), t.stride(1), t.stride(2)]


def launch_backward(drv, meta, ptx_dir, q, k, v, out, dout, lse, mask, scale, dq, dk, dv):
    """q, k, v, out, dout, dq, dk, dv: [B, S, H, D] views (last dim contiguous);
    lse: f32 [B, Hq, Sq]; mask: f32 [Bm, Hm, Sq, Sk] (broadcast dims allowed) or None.
    Returns the scratch buffers (for inspection)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    dev = q.device
    main = meta["main"]
    dq_accum = torch.zeros(b, hq, sq, d, dtype=torch.float32, device=dev)
    lse_log2 = torch.full((b, hq, sq), float("nan"), dtype=torch.float32, device=dev)
    delta = torch.full((b, hq, sq), float("nan"), dtype=torch.float32, device=dev)
    sem = torch.zeros(b, hq, cdiv(sq, main["block_m"]), dtype=torch.int32, device=dev)
    ms, mptr = [0, 0, 0], 0
    if mask is not None:
        mptr = mask.data_ptr()
        st = mask.stride()
        ms = [st[i] if mask.shape[i] > 1 else 0 for i in range(3)]
    ptrs = [q, k, v, out, dout, lse]
    args = [("u64", t.data_ptr()) for t in ptrs] + [("u64", mptr)]
    args += [("u64", t.data_ptr()) for t in (dq, dk, dv, dq_accum, lse_log2, delta, sem)]
    for t in (q, k, v, out, dout, dq, dk, dv):
        args += [("u64", x) for x in strides3(t)]
    args += [("u64", x) for x in lse.stride()]
    args += [("u64", x) for x in ms]
    args += [("u32", sq), ("u32", sk), ("u32", hq), ("u32", hq // hkv),
             ("f32", scale * math.log2(math.e)), ("f32", scale)]
    for role, grid in (("preprocess", (cdiv(sq, meta["preprocess"]["block_m"]), hq, b)),
                       ("main", (cdiv(sk, meta["block_n"]), hkv, b)),
                       ("convert", (cdiv(sq, meta["convert"]["block_m"]), hq, b))):
        m = meta[role]
        fn, _ = drv.load(ptx_dir / f"{m['entry']}.ptx", m["entry"], m["smem_bytes"])
        if grid[0] > 0:
            drv.launch(fn, grid, m["threads"], m["smem_bytes"], args)
    return dq_accum, lse_log2, delta, sem


def reference(q, k, v, causal, mask, scale):
    """Attention in float64 (rows that see no key give zeros) and its lse."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))
    kd = kd.repeat_interleave(hq // hkv, dim=1)
    vd = vd.repeat_interleave(hq // hkv, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = (p @ vd) / torch.where(l == 0, torch.ones_like(l), l)
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m + torch.log(l))
    return o.transpose(1, 2), lse.squeeze(-1)


SHAPES = [  # B, Sq, Sk, Hq, Hkv, strided, mask
    (2, 77, 130, 4, 2, False, None),
    (1, 200, 33, 2, 2, False, None),
    (1, 33, 200, 3, 1, True, "add"),
    (2, 64, 64, 2, 1, False, "pad"),
    (1, 1, 5, 1, 1, False, None),
    (1, 300, 300, 2, 2, False, None),
    (1, 129, 517, 4, 1, False, "pad"),
    (1, 530, 250, 2, 1, True, None),
]


def check(drv, ptx_dir, manifest, seed, quick=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    fails, rows = 0, []
    for meta in manifest:
        d, dt, causal = meta["head_size"], DT[meta["dtype"]], meta["causal"]
        tol = 2e-5 if meta["dtype"] == "f32" else 2e-2
        for shape in (SHAPES[:4] if quick else SHAPES):
            b, sq, sk, hq, hkv, strided, mk = shape

            def rnd(*s):
                return (torch.rand(*s, generator=gen, device="cuda") * 3 - 1.5).to(dt)

            if strided:  # [B, H, S, D] storage seen as [B, S, H, D]
                q = rnd(b, hq, sq, d).transpose(1, 2)
                k = rnd(b, hkv, sk, d).transpose(1, 2)
                v = rnd(b, hkv, sk, d).transpose(1, 2)
                dout = rnd(b, hq, sq, d).transpose(1, 2)
            else:
                q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d)
                dout = rnd(b, sq, hq, d)
            mask = None
            if mk == "pad":
                keep = torch.rand(b, sk, generator=gen, device="cuda") > 0.3
                keep[0, :] = False  # batch 0 sees nothing: zero gradients
                mask = torch.where(keep, 0.0, float("-inf"))[:, None, None, :].float()
            elif mk == "add":
                mask = (torch.rand(b, 1, sq, sk, generator=gen, device="cuda") * 4 - 2).float()
            scale = 1 / math.sqrt(d)
            qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
            o, lse = reference(qd, kd, vd, causal, mask, scale)
            o.backward(dout.double())
            out = o.detach().to(dt)
            lse32 = lse.detach().float().contiguous()
            grads = []
            for _ in range(2):  # twice: the sums must be bit-identical
                dq = torch.full_like(q, float("nan"))
                dk = torch.full_like(k, float("nan"))
                dv = torch.full_like(v, float("nan"))
                launch_backward(drv, meta, ptx_dir, q, k, v, out, dout, lse32, mask, scale,
                                dq, dk, dv)
                torch.cuda.synchronize()
                grads.append((dq, dk, dv))
            errs = []
            for got, ref in zip(grads[0], (qd.grad, kd.grad, vd.grad)):
                e = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                if ref.norm().item() == 0:
                    e = got.double().abs().max().item()
                errs.append(e if not torch.isnan(got).any().item() else float("nan"))
            same = all(torch.equal(a, c) for a, c in zip(grads[0], grads[1]))
            ok = all(e <= tol for e in errs) and same
            fails += not ok
            rows.append((meta["main"]["entry"], shape, errs, ok))
            if not ok:
                print(f"FAIL {meta['main']['entry']} {shape} dq/dk/dv err "
                      f"{errs[0]:.2e} {errs[1]:.2e} {errs[2]:.2e} deterministic {same}",
                      flush=True)
    worst = {}
    for entry, _, errs, _ in rows:
        worst[entry] = max(worst.get(entry, 0.0), *[e if e == e else 1e9 for e in errs])
    print("max rel err: " + ", ".join(f"{e} {w:.2e}" for e, w in worst.items()), flush=True)
    print(f"check: {len(rows) - fails} passed, {fails} failed (seed {seed})", flush=True)
    return fails


BENCH = [  # name, B, Hq, Hkv, Sq, Sk, causal
    ("h16-4k", 1, 16, 16, 4096, 4096, False),
    ("h16-4k-causal", 1, 16, 16, 4096, 4096, True),
    ("gqa-2k", 2, 16, 4, 2048, 2048, False),
]


def bench(drv, ptx_dir, manifest):
    print(f"{'entry':34} {'shape':14} {'ms':>8} {'TF/s':>6}", flush=True)
    for meta in manifest:
        d, dt, causal = meta["head_size"], DT[meta["dtype"]], meta["causal"]
        for (name, b, hq, hkv, sq, sk, c) in BENCH:
            if c != causal:
                continue
            q = torch.randn(b, sq, hq, d, device="cuda", dtype=dt)
            k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt)
            v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt)
            dout = torch.randn_like(q)
            out = torch.randn_like(q)
            lse = torch.randn(b, hq, sq, device="cuda") + 10
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            # Backward FLOPs: 2.5 times the forward's 4·B·H·Sq·Sk·D.
            flops = 2.5 * 4 * b * hq * sq * sk * d / (2 if causal else 1)
            ms = bench_one(lambda: launch_backward(drv, meta, ptx_dir, q, k, v, out, dout,
                                                   lse, None, 1 / math.sqrt(d), dq, dk, dv),
                           warmup=2, iters=5)
            print(f"{meta['main']['entry']:34} {name:14} {ms:8.3f} {flops / ms / 1e9:6.2f}",
                  flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx_dir", type=Path)
    ap.add_argument("--only", default=None, help="substring filter on main entry names")
    ap.add_argument("--quick", action="store_true", help="the first four shapes only")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    manifest = json.loads((a.ptx_dir / "manifest.json").read_text())
    if a.only:
        manifest = [m for m in manifest if a.only in m["main"]["entry"]]
    drv = Driver()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    fails = 0
    if not a.no_check:
        seed = a.seed if a.seed is not None else int(time.time()) % 100000
        fails = check(drv, a.ptx_dir, manifest, seed, quick=a.quick)
    if a.bench:
        bench(drv, a.ptx_dir, manifest)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
