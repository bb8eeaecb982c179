#!/usr/bin/env python3
"""Loads the generated PTX through the CUDA driver (ctypes) and checks it
against torch in float64, then times it beside torch's SDPA backends.

A development harness for kernels-gen, independent of the Rust runtime:

    cargo run -p kernels-gen --example emit -- --dir .gpu-ptx 40 64 80 128 256
    python3 tests/gpu/ptx_harness.py .gpu-ptx [--check] [--bench]

It needs a CUDA GPU and torch; it is not run by CI.
"""

import argparse
import ctypes
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# CUtensorMapDataType, and the options kernels_gen::contract::TensorMaps names.
TMAP_DTYPE = {torch.float16: 6, torch.bfloat16: 9}
TMAP_INTERLEAVE_NONE, TMAP_SWIZZLE_128B, TMAP_L2_256B, TMAP_OOB_FILL_NONE = 0, 3, 3, 0


class TensorMap(ctypes.Structure):
    _align_ = 64
    _fields_ = [("opaque", ctypes.c_uint64 * 16)]


class Driver:
    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        torch.zeros(1, device="cuda")  # make torch's primary context current
        self.mods = {}

    def check(self, rc, what):
        if rc != 0:
            name = ctypes.c_char_p()
            self.cu.cuGetErrorString(rc, ctypes.byref(name))
            raise RuntimeError(f"{what}: CUDA error {rc} {name.value}")

    def load(self, ptx_path, entry, smem):
        key = (str(ptx_path), entry)
        if key in self.mods:
            return self.mods[key]
        mod = ctypes.c_void_p()
        t0 = time.perf_counter()
        self.check(self.cu.cuModuleLoadData(ctypes.byref(mod), ptx_path.read_bytes() + b"\0"),
                   f"load {entry}")
        jit_ms = (time.perf_counter() - t0) * 1e3
        fn = ctypes.c_void_p()
        self.check(self.cu.cuModuleGetFunction(ctypes.byref(fn), mod, entry.encode()), entry)
        if smem > 48 * 1024:
            self.check(self.cu.cuFuncSetAttribute(
                fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem), "smem attr")
        self.mods[key] = (fn, jit_ms)
        return self.mods[key]

    def tensor_map(self, t, rows):
        """The map of kernels_gen::contract::TensorMaps for the [B, S, H, D] view t:
        dims [D, S, H, B], box [64, rows, 1, 1], 128-byte swizzle."""
        b, s, h, d = t.shape
        e = t.element_size()
        m = TensorMap()
        dims = (ctypes.c_uint64 * 4)(d, s, h, b)
        # A size-1 dimension's stride is never used: any valid one will do.
        st = [t.stride(1) * e if s > 1 else 16, t.stride(2) * e if h > 1 else 16,
              t.stride(0) * e if b > 1 else 16]
        strides = (ctypes.c_uint64 * 3)(*st)
        box = (ctypes.c_uint32 * 4)(64, rows, 1, 1)
        ones = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
        self.check(self.cu.cuTensorMapEncodeTiled(
            ctypes.byref(m), TMAP_DTYPE[t.dtype], 4, ctypes.c_void_p(t.data_ptr()), dims,
            strides, box, ones, TMAP_INTERLEAVE_NONE, TMAP_SWIZZLE_128B, TMAP_L2_256B,
            TMAP_OOB_FILL_NONE), f"tensor map {tuple(t.shape)} strides {st}")
        return m

    def launch(self, fn, grid, threads, smem, args):
        vals = []
        for kind, v in args:
            if kind == "map":
                vals.append(v)
                continue
            vals.append({"u64": ctypes.c_uint64, "u32": ctypes.c_uint32,
                         "f32": ctypes.c_float}[kind](v))
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        stream = torch.cuda.current_stream().cuda_stream
        self.check(self.cu.cuLaunchKernel(fn, grid[0], grid[1], grid[2], threads, 1, 1, smem,
                                          ctypes.c_void_p(stream), ptrs, None), "launch")


def run(drv, meta, ptx_dir, q, k, v, out, mask=None, scale=None):
    """q, k, v, out: [B, S, H, D] views (any strides, last contiguous).
    mask: dense f32 [Bm, Hm, Qm, Sk] with broadcast dims allowed (stride 0)."""
    fn, _ = drv.load(ptx_dir / f"{meta['entry']}.ptx", meta["entry"], meta["smem_bytes"])
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    ms = [0, 0, 0]
    mptr = 0
    if mask is not None:
        mptr = mask.data_ptr()
        st = mask.stride()
        ms = [st[0] if mask.shape[0] > 1 else 0, st[1] if mask.shape[1] > 1 else 0,
              st[2] if mask.shape[2] > 1 else 0]
    args = [("u64", t.data_ptr()) for t in (q, k, v, out)] + [("u64", mptr)]
    for t in (q, k, v, out):
        args += [("u64", t.stride(0)), ("u64", t.stride(1)), ("u64", t.stride(2))]
    args += [("u64", x) for x in ms]
    args += [("u32", sq), ("u32", sk), ("u32", hq // hkv), ("f32", scale * math.log2(math.e))]
    maps = meta.get("tensor_maps")
    if maps:
        args += [("map", drv.tensor_map(q, maps["q_rows"])),
                 ("map", drv.tensor_map(k, maps["kv_rows"])),
                 ("map", drv.tensor_map(v, maps["kv_rows"]))]
    grid = ((sq + meta["block_m"] - 1) // meta["block_m"], hq, b)
    drv.launch(fn, grid, meta["threads"], meta["smem_bytes"], args)


def reference(q, k, v, causal, mask, scale):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    kd = kd.repeat_interleave(hq // hkv, dim=1)
    vd = vd.repeat_interleave(hq // hkv, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    if mask is not None:
        s = s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = (p @ vd) / torch.where(l == 0, torch.ones_like(l), l)
    return o.transpose(1, 2)


def check(drv, ptx_dir, manifest, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    fails = 0
    rows = []
    for meta in manifest:
        d, dt, causal = meta["head_size"], DT[meta["dtype"]], meta["causal"]
        tol = 1e-5 if meta["dtype"] == "f32" else 2e-2
        shapes = [(2, 77, 130, 4, 2, False, None), (1, 1, 300, 8, 1, False, None),
                  (1, 200, 33, 2, 2, True, None), (2, 64, 64, 6, 3, False, "pad"),
                  (1, 129, 257, 2, 1, False, "add"),
                  # Long enough to cycle pipeline stages several times.
                  (1, 520, 1111, 4, 2, False, None), (2, 700, 700, 2, 1, True, "pad")]
        for (b, sq, sk, hq, hkv, transposed, mk) in shapes:
            def rnd(*s):
                return (torch.rand(*s, generator=gen, device="cuda") * 3 - 1.5).to(dt)
            if transposed:
                q = rnd(b, hq, sq, d).transpose(1, 2)
                k = rnd(b, hkv, sk, d).transpose(1, 2)
                v = rnd(b, hkv, sk, d).transpose(1, 2)
            else:
                q, k, v = rnd(b, sq, hq, d), rnd(b, sk, hkv, d), rnd(b, sk, hkv, d)
            mask = None
            if mk == "pad":
                keep = torch.rand(b, sk, generator=gen, device="cuda") > 0.3
                keep[0, :] = False  # batch 0 sees nothing: zeros
                mask = torch.where(keep, 0.0, float("-inf"))[:, None, None, :].float()
            elif mk == "add":
                mask = (torch.rand(b, 1, sq, sk, generator=gen, device="cuda") * 4 - 2).float()
            out = torch.full((b, sq, hq, d), float("nan"), dtype=dt, device="cuda")
            run(drv, meta, ptx_dir, q, k, v, out, mask)
            torch.cuda.synchronize()
            ref = reference(q, k, v, causal, mask, None)
            err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            ok = err <= tol and not torch.isnan(out).any().item()
            fails += not ok
            rows.append((meta["entry"], (b, sq, sk, hq, hkv, transposed, mk), err, ok))
            if not ok:
                print(f"FAIL {meta['entry']} {(b, sq, sk, hq, hkv, transposed, mk)} err {err:.3e}",
                      flush=True)
    worst = {}
    for (entry, _, err, _) in rows:
        worst[entry] = max(worst.get(entry, 0.0), err)
    print("max rel err: " + ", ".join(f"{e} {w:.2e}" for e, w in worst.items()), flush=True)
    print(f"check: {len(rows) - fails} passed, {fails} failed (seed {seed})", flush=True)
    return fails


def bench_one(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


SHAPES = [  # name, B, H, Hkv, Sq, Sk, D, causal
    ("wan-self", 1, 12, 12, 32760, 32760, 128, False),
    ("wan-cross", 1, 12, 12, 32760, 512, 128, False),
    ("h24-d128", 1, 24, 24, 16384, 16384, 128, False),
    ("h24-d64", 1, 24, 24, 16384, 16384, 64, False),
    ("h8-d256", 1, 8, 8, 16384, 16384, 256, False),
    ("causal-d256", 2, 8, 8, 8192, 8192, 256, True),
    ("h8-d224", 1, 8, 8, 16384, 16384, 224, False),
    ("h12-d192", 1, 12, 12, 16384, 16384, 192, False),
    ("h12-d160", 1, 12, 12, 16384, 16384, 160, False),
    ("h16-d112", 1, 16, 16, 16384, 16384, 112, False),
    ("h16-d96", 1, 16, 16, 16384, 16384, 96, False),
    ("causal-d96", 4, 16, 16, 4096, 4096, 96, True),
    ("h16-d80", 1, 16, 16, 16384, 16384, 80, False),
    ("clip-d80", 16, 16, 16, 257, 257, 80, False),
    ("h16-d48", 1, 16, 16, 16384, 16384, 48, False),
    ("h16-d32", 1, 16, 16, 16384, 16384, 32, False),
    ("causal", 4, 32, 32, 4096, 4096, 128, True),
    ("causal-gqa", 1, 32, 8, 8192, 8192, 128, True),
]


def bench(drv, ptx_dir, manifest, dtype="bf16", torch_too=True, only_shapes=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    by = {(m["head_size"], m["causal"], m["dtype"]): m for m in manifest}
    print(f"{'shape':12} {'ours ms':>9} {'TF/s':>7} {'flash TF/s':>10} {'cudnn TF/s':>10} "
          f"{'vs flash':>8} {'vs cudnn':>8}", flush=True)
    results = []
    for (name, b, h, hkv, sq, sk, d, causal) in SHAPES:
        meta = by.get((d, causal, dtype))
        if meta is None or (only_shapes and name not in only_shapes):
            continue
        dt = DT[dtype]
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dt)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dt)
        out = torch.empty_like(q)
        flops = 4 * b * h * sq * sk * d / (2 if causal else 1)
        ours = bench_one(lambda: run(drv, meta, ptx_dir, q, k, v, out))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        res = {"shape": name, "ours_ms": ours, "ours": flops / ours / 1e9}
        res["flash"] = res["cudnn"] = float("nan")
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                               ("cudnn", SDPBackend.CUDNN_ATTENTION))[:2 if torch_too else 0]:
            try:
                with sdpa_kernel(backend):
                    ms = bench_one(lambda: F.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=causal, enable_gqa=h != hkv))
                res[label] = flops / ms / 1e9
            except Exception as e:  # noqa: BLE001 - a backend may refuse a shape
                res[label] = float("nan")
                print(f"  {label} refused {name}: {str(e)[:80]}", flush=True)
        results.append(res)
        print(f"{name:12} {ours:9.3f} {res['ours']:7.1f} {res['flash']:10.1f} {res['cudnn']:10.1f} "
              f"{res['ours'] / res['flash']:8.2f} {res['ours'] / res['cudnn']:8.2f}", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx_dir", type=Path)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--only", default=None, help="substring filter on entry names")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-torch", action="store_true", help="time only our kernels")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names to time")
    a = ap.parse_args()
    manifest = json.loads((a.ptx_dir / "manifest.json").read_text())
    if a.only:
        manifest = [m for m in manifest if a.only in m["entry"]]
    drv = Driver()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    fails = 0
    if a.check:
        fails = check(drv, a.ptx_dir, manifest, seed=int(time.time()) % 100000)
    if a.bench:
        res = bench(drv, a.ptx_dir, manifest, torch_too=not a.no_torch,
                    only_shapes=a.shapes.split(",") if a.shapes else None)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    jit = sorted(ms for (_, ms) in drv.mods.values())
    if jit:
        print(f"JIT load per module: median {jit[len(jit) // 2]:.1f} ms, max {jit[-1]:.1f} ms")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
