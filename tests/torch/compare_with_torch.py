#!/usr/bin/env python3
"""Checks `sdpa run` against PyTorch's scaled_dot_product_attention.

Writes attention cases the way a PyTorch user would store them (tensors q, k,
v in [B, S, H, D], an optional attn_mask, metadata strings `causal` and
`scale`), runs `sdpa run` on each, and compares `out` with torch's answer
computed from the same file. torch is not a dependency of the project: run
this from a throwaway virtual environment (see docs/benchmarks.md).

    python3 tests/torch/compare_with_torch.py --sdpa target/release/sdpa
"""

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.bool: "BOOL", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
FROM_NAME = {v: k for k, v in DTYPES.items()}


def save(path, tensors, metadata):
    """Writes a safetensors file (8-byte header length, JSON header, data)."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool \
            else t.to(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def load(path, name):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    info = header[name]
    lo, hi = info["data_offsets"]
    raw = bytearray(data[8 + n + lo:8 + n + hi])
    return torch.frombuffer(raw, dtype=FROM_NAME[info["dtype"]]).reshape(info["shape"])


def torch_reference(q, k, v, mask, causal, scale):
    """torch's answer, with FastVideo's mask normalisation."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    attn_mask = None
    if mask is not None:
        if mask.dtype not in (torch.bool, torch.float32, torch.float16, torch.bfloat16):
            mask = mask != 0
        if mask.shape[-1] < sk:  # front-pad with "attend"
            pad_shape = list(mask.shape[:-1]) + [sk - mask.shape[-1]]
            fill = torch.ones(pad_shape, dtype=torch.bool) if mask.dtype == torch.bool \
                else torch.zeros(pad_shape, dtype=mask.dtype)
            mask = torch.cat([fill, mask], dim=-1)
        if mask.dim() == 2:
            mask = mask[:, None, None, :]
        elif mask.dim() == 3:
            mask = mask[:, None, :, :]
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        attn_mask = mask
        if causal:  # torch refuses mask + is_causal: fold the causal mask in
            tri = torch.ones(sq, sk, dtype=torch.bool).tril()
            if attn_mask.dtype == torch.bool:
                attn_mask = attn_mask & tri
            else:
                attn_mask = attn_mask.masked_fill(~tri, float("-inf"))
            causal = False
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=attn_mask, is_causal=causal, scale=scale,
        enable_gqa=hq != hkv)
    return out.transpose(1, 2)


def cases(gen):
    def rnd(*shape, dtype):
        return (torch.rand(*shape, generator=gen) * 3 - 1.5).to(dtype)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for causal in (False, True):
            yield dict(q=rnd(2, 37, 8, 64, dtype=dtype), k=rnd(2, 70, 2, 64, dtype=dtype),
                       v=rnd(2, 70, 2, 64, dtype=dtype), mask=None, causal=causal, scale=None)
        keep = torch.rand(2, 60, generator=gen) > 0.3
        keep[:, 0] = True
        yield dict(q=rnd(2, 25, 4, 80, dtype=dtype), k=rnd(2, 64, 4, 80, dtype=dtype),
                   v=rnd(2, 64, 4, 80, dtype=dtype), mask=keep, causal=False, scale=0.2)
        bias = torch.randn(1, 1, 30, 40, generator=gen).to(dtype)
        yield dict(q=rnd(1, 30, 6, 128, dtype=dtype), k=rnd(1, 40, 3, 128, dtype=dtype),
                   v=rnd(1, 40, 3, 128, dtype=dtype), mask=bias, causal=True, scale=None)
        ints = (torch.rand(2, 17, 50, generator=gen) > 0.4).to(torch.int64) * 3
        ints[:, :, 0] = 1
        yield dict(q=rnd(2, 17, 2, 40, dtype=dtype), k=rnd(2, 50, 2, 40, dtype=dtype),
                   v=rnd(2, 50, 2, 40, dtype=dtype), mask=ints, causal=False, scale=None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdpa", default="target/release/sdpa")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
    failures, n = 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, c in enumerate(cases(gen)):
            src, dst = f"{tmp}/case{i}.safetensors", f"{tmp}/out{i}.safetensors"
            tensors = {"q": c["q"], "k": c["k"], "v": c["v"]}
            meta = {"causal": "true" if c["causal"] else "false"}
            if c["mask"] is not None:
                tensors["attn_mask"] = c["mask"]
            if c["scale"] is not None:
                meta["scale"] = repr(c["scale"])
            save(src, tensors, meta)
            subprocess.run([args.sdpa, "run", "--input", src, "--output", dst],
                           check=True, stdout=subprocess.DEVNULL)
            ours = load(dst, "out").double()
            want = torch_reference(c["q"], c["k"], c["v"], c["mask"], c["causal"],
                                   c["scale"]).double()
            err = ((ours - want).norm() / want.norm()).item()
            ok = err <= tol[c["q"].dtype]
            failures += not ok
            n += 1
            mask = "none" if c["mask"] is None else f"{c['mask'].dtype} {list(c['mask'].shape)}"
            print(f"{'ok  ' if ok else 'FAIL'} {c['q'].dtype} q{list(c['q'].shape)} "
                  f"k{list(c['k'].shape)} causal={c['causal']} mask={mask}: rel err {err:.2e}")
    print(f"torch {torch.__version__}, seed {seed}: {n - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
