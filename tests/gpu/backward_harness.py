#!/usr/bin/env python3
"""Loads the generated backward kernels through the CUDA driver (ctypes),
checks dq, dk and dv against float64 autograd, and times them beside
torch's flash backward.

A development harness for kernels-gen, independent of the Rust runtime:

    cargo run -p kernels-gen --example emit_backward -- .gpu-bwd 40 64 128
    python3 tests/gpu/backward_harness.py .gpu-bwd [--check] [--bench]
        [--mask-kind f32|f16|bf16|bool|i32|i64] [--mask-pad N]
        [--varlen 3,0,17,64 [--varlen-k 5,9,0,70]]

--mask-kind stores the masks of --check's masked shapes in that element
kind, read in place (random additive biases for the float kinds, keep
masks for the others), --mask-pad drops their first N key columns (those
keys attend). --varlen runs packed variable-length batches (cu_seqlens,
batch strides 0) of those query lengths (keys: --varlen-k, or the same),
checked per sequence against float64 autograd, causal top-left in local
positions, then key padding: whole query rows against keys
[k_start, k_start + len) of a padded layout (--varlen-k lengths).

It needs a CUDA GPU and torch; it is not run by CI.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from ptx_harness import DT, Driver  # noqa: E402

LOG2E = math.log2(math.e)
# attention::mask::MaskKind codes and the torch dtype of each element kind.
MASK_KINDS = {"f32": (0, torch.float32), "f16": (1, torch.float16), "bf16": (2, torch.bfloat16),
              "bool": (3, torch.bool), "u8": (3, torch.uint8), "i32": (4, torch.int32),
              "i64": (5, torch.int64)}


def reference(q, k, v, causal, mask, scale):
    """Float64 attention on [B, S, H, D] inputs: (out, lse [B, H, Sq])."""
    hq, hkv = q.shape[2], k.shape[2]
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    kd = kd.repeat_interleave(hq // hkv, dim=1)
    vd = vd.repeat_interleave(hq // hkv, dim=1)
    s = (qd @ kd.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    # Rows that see no key: lse -inf, weights (and gradients) zero.
    none = torch.isinf(s).all(dim=-1, keepdim=True) & (s < 0).all(dim=-1, keepdim=True)
    s_safe = s.masked_fill(none, 0.0)
    lse = torch.logsumexp(s_safe, dim=-1).masked_fill(none[..., 0], float("-inf"))
    p = torch.softmax(s_safe, dim=-1).masked_fill(none, 0.0)
    return (p @ vd).transpose(1, 2), lse


class Backward:
    def __init__(self, drv, ptx_dir, manifest, variant):
        self.drv, self.dir, self.params, self.var = drv, ptx_dir, manifest["params"], variant

    def launch_all(self, q, k, v, out, dout, lse, dq, dk, dv, mask=None, scale=None,
                   mask_kind="f32", mask_pad=0, seqs=None, packed=True):
        """seqs: None, or (q_start, q_end, k_start, k_end, batch, seq_q, seq_k): int32
        device arrays indexed by batch entry (or None), the batch entries and the
        bounds. packed: the tensors are one batch of tokens (batch strides 0)."""
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        tokens_q, tokens_k = sq, sk
        bounds = [0, 0, 0, 0]
        if seqs is not None:
            bounds = [0 if t is None else t.data_ptr() for t in seqs[:4]]
            b, sq, sk = seqs[4:]
        scale = 1 / math.sqrt(d) if scale is None else scale
        dev = q.device
        main = self.var["main"]
        nqb = (sq + main["block_m"] - 1) // main["block_m"]
        accum = torch.zeros(b, hq, sq, d, dtype=torch.float32, device=dev)
        lse2 = torch.empty(b, hq, sq, dtype=torch.float32, device=dev)
        delta = torch.empty(b, hq, sq, dtype=torch.float32, device=dev)
        sem = torch.zeros(b, hq, max(nqb, 1), dtype=torch.int32, device=dev)
        ms = [0, 0, 0]
        if mask is not None:
            st = mask.stride()
            ms = [st[0] if mask.shape[0] > 1 else 0, st[1] if mask.shape[1] > 1 else 0,
                  st[2] if mask.shape[2] > 1 else 0]
        vals = {}
        for name, t in [("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout),
                        ("dq", dq), ("dk", dk), ("dv", dv)]:
            vals[name] = t.data_ptr()
            vals[f"{name}_stride_b"], vals[f"{name}_stride_s"], vals[f"{name}_stride_h"] = \
                t.stride(0), t.stride(1), t.stride(2)
        vals.update(lse=lse.data_ptr(), lse_stride_b=lse.stride(0), lse_stride_h=lse.stride(1),
                    lse_stride_q=lse.stride(2), mask=0 if mask is None else mask.data_ptr(),
                    mask_stride_b=ms[0], mask_stride_h=ms[1], mask_stride_q=ms[2],
                    dq_accum=accum.data_ptr(), lse_log2=lse2.data_ptr(),
                    delta=delta.data_ptr(), sem=sem.data_ptr(), seq_q=sq, seq_k=sk,
                    heads_q=hq, group=hq // hkv, scale_log2=scale * LOG2E, scale=scale,
                    q_start=bounds[0], q_end=bounds[1], k_start=bounds[2], k_end=bounds[3],
                    tokens_q=tokens_q, tokens_k=tokens_k, mask_kind=MASK_KINDS[mask_kind][0],
                    mask_pad=mask_pad)
        if seqs is not None and packed:  # one batch of tokens, batch strides 0
            for name in ["q", "k", "v", "out", "dout", "dq", "dk", "dv", "lse"]:
                vals[f"{name}_stride_b"] = 0
        kinds = {".u64": "u64", ".u32": "u32", ".f32": "f32"}
        args = [(kinds[ty], vals[name]) for name, ty in self.params]
        for part, grid in [("pre", ((sq + 7) // 8, hq, b)),
                           ("main", ((sk + self.var["block_n"] - 1) // self.var["block_n"], hkv, b)),
                           ("convert", ((sq + 7) // 8, hq, b))]:
            meta = self.var[part]
            grid = ((sq + meta["block_m"] - 1) // meta["block_m"], hq, b) if part != "main" else grid
            # A kernel that stages the mask in shared memory needs more with one.
            extra = meta.get("mask_smem_bytes", 0)
            fn, _ = self.drv.load(self.dir / f"{meta['entry']}.ptx", meta["entry"],
                                  meta["smem_bytes"] + extra)
            smem = meta["smem_bytes"] + (extra if mask is not None else 0)
            self.drv.launch(fn, grid, meta["threads"], smem, args)


def make_mask(mask_kind, elem, pad, shape, dev):
    """The mask of a case, stored as `elem` with its first `pad` key columns
    dropped, and its float64 additive form over every key (None, None
    without one)."""
    if mask_kind is None:
        return None, None
    code, dt = MASK_KINDS[elem]
    bm, hm, sq, sk = shape
    pad = min(pad, sk)
    if mask_kind == "additive" and dt.is_floating_point:
        full = torch.randn(bm, hm, sq, sk, device=dev).to(dt)
        add = full.double()
    else:
        keep = torch.rand(bm, hm, sq, sk, device=dev) > 0.3
        keep[..., 0, pad:] = False  # a row that sees no key (unless padded)
        if dt.is_floating_point:
            full = torch.zeros(bm, hm, sq, sk, device=dev).masked_fill(~keep, float("-inf")).to(dt)
        else:
            full = keep.to(dt)
        add = torch.zeros(bm, hm, sq, sk, device=dev, dtype=torch.float64).masked_fill(
            ~keep, float("-inf"))
    add[..., :pad] = 0.0
    return full[..., pad:].contiguous(), add


def case(drv, ptx_dir, manifest, var, b, sq, sk, hq, hkv, mask_kind, seed, strided=False,
         elem="f32", pad=0):
    torch.manual_seed(seed)
    d, causal, dt = var["d"], var["causal"], DT[var["dtype"]]
    dev = "cuda"

    def rnd(s_, h):
        if strided:  # [B, S, H, D] view of a [B, H, S, D + 8] buffer
            t = torch.randn(b, h, s_, d + 8, device=dev).to(dt)[..., :d]
            return t.transpose(1, 2)
        return torch.randn(b, s_, h, d, device=dev).to(dt)

    q, k, v = rnd(sq, hq), rnd(sk, hkv), rnd(sk, hkv)
    dout = rnd(sq, hq)
    shape = (b, 1, sq, sk) if mask_kind == "additive" else (1, hq, sq, sk)
    stored, mask = make_mask(mask_kind, elem, pad, shape, dev)
    scale = 1 / math.sqrt(d)
    out_ref, lse = reference(q, k, v, causal, mask, scale)
    out = out_ref.to(dt)
    lse32 = lse.float().contiguous()
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    o2, _ = reference(qd, kd, vd, causal, mask, scale)
    o2.backward(dout.double())
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    bw = Backward(drv, ptx_dir, manifest, var)
    bw.launch_all(q, k, v, out, dout, lse32, dq, dk, dv, stored, scale, elem, min(pad, sk))
    torch.cuda.synchronize()
    errs = []
    # Relative to the gradients' scale (dq and dk can be ~0 where one key
    # takes all the weight: their error is then the rounding of out).
    scale_ = max(g.abs().max().item() for g in (qd.grad, kd.grad, vd.grad)) + 1e-6
    for name, got, want in [("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)]:
        den = scale_
        err = ((got.double() - want).abs().max().item()) / den
        if math.isnan(err):
            err = float("inf")
        errs.append((name, err))
    # Determinism: a second run gives the same bits.
    dq2, dk2, dv2 = (torch.full_like(t, float("nan")) for t in (q, k, v))
    bw.launch_all(q, k, v, out, dout, lse32, dq2, dk2, dv2, stored, scale, elem, min(pad, sk))
    torch.cuda.synchronize()
    same = all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b_.view(torch.int16 if b_.element_size() == 2 else torch.int32))
               for a, b_ in [(dq, dq2), (dk, dk2), (dv, dv2)])
    return errs, same


def check(drv, ptx_dir, manifest, seed, elem="f32", pad=0):
    tol = {"bf16": 3e-2, "f16": 5e-3, "f32": 1e-4}
    bad = 0
    shapes = [(1, 64, 64, 2, 2, None), (2, 100, 37, 4, 2, None), (1, 1, 200, 2, 1, None),
              (1, 257, 129, 3, 3, "additive"), (2, 70, 70, 2, 2, "bool"),
              (1, 130, 300, 4, 1, None), (1, 300, 130, 2, 2, None)]
    for var in manifest["variants"]:
        if var["dtype"] == "f32" and "--f32" not in sys.argv:
            continue
        for i, (b, sq, sk, hq, hkv, mk) in enumerate(shapes):
            for strided in [False, True] if i == 1 else [False]:
                errs, same = case(drv, ptx_dir, manifest, var, b, sq, sk, hq, hkv, mk,
                                  seed + i, strided, elem, pad)
                ok = all(e < tol[var["dtype"]] for _, e in errs) and same
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} d={var['d']} causal={var['causal']} "
                      f"{var['dtype']} B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} mask={mk}"
                      f"{'' if mk is None else f'/{elem}/pad{pad}'} "
                      f"strided={strided} " + " ".join(f"{n}={e:.2e}" for n, e in errs)
                      + ("" if same else " NONDETERMINISTIC"), flush=True)
    print(f"{bad} bad")
    return bad


def varlen_case(drv, ptx_dir, manifest, var, lens_q, lens_k, hq, hkv, seed):
    """A packed batch of sequences (cu_seqlens for queries and keys, batch
    strides 0), checked per sequence against float64 autograd: (errors,
    deterministic)."""
    torch.manual_seed(seed)
    d, causal, dt = var["d"], var["causal"], DT[var["dtype"]]
    dev = "cuda"
    n = len(lens_q)
    cu_q = [0]
    cu_k = [0]
    for lq, lk in zip(lens_q, lens_k):
        cu_q.append(cu_q[-1] + lq)
        cu_k.append(cu_k[-1] + lk)
    tq, tk = cu_q[-1], cu_k[-1]
    # Padding tokens around the sequences (never read, never written).
    q = torch.randn(1, tq + 3, hq, d, device=dev).to(dt)[:, 1:tq + 1]
    k = torch.randn(1, tk + 3, hkv, d, device=dev).to(dt)[:, 2:tk + 2]
    v = torch.randn(1, tk + 3, hkv, d, device=dev).to(dt)[:, 2:tk + 2]
    dout = torch.randn(1, tq, hq, d, device=dev).to(dt)
    scale = 1 / math.sqrt(d)
    out = torch.zeros(1, tq, hq, d, device=dev, dtype=dt)
    lse = torch.full((1, hq, tq), float("-inf"), device=dev)
    grads = [torch.zeros(t.shape, dtype=torch.float64, device=dev) for t in (q, k, v)]
    for i in range(n):
        (q0, q1), (k0, k1) = (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1])
        if q1 == q0:
            continue
        if k1 == k0:
            continue  # no key: out 0, lse -inf, gradients 0
        qs, ks, vs = (t.double().requires_grad_() for t in (q[:, q0:q1], k[:, k0:k1],
                                                              v[:, k0:k1]))
        o, l_ = reference(qs, ks, vs, causal, None, scale)
        out[:, q0:q1] = o.detach().to(dt)
        lse[:, :, q0:q1] = l_.detach().float()
        gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), dout[:, q0:q1].double(),
                                         allow_unused=True)
        for g, got, (a, b_) in zip(grads, (gq, gk, gv), [(q0, q1), (k0, k1), (k0, k1)]):
            if got is not None:
                g[:, a:b_] += got
    cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    ck = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    seqs = (cq[:-1], cq[1:], ck[:-1], ck[1:], n, max(max(lens_q), 1), max(max(lens_k), 1))
    bw = Backward(drv, ptx_dir, manifest, var)

    def run():
        # Tokens outside every sequence must stay NaN.
        dq = torch.full((1, tq + 2, hq, d), float("nan"), device=dev).to(dt)
        dk = torch.full((1, tk + 2, hkv, d), float("nan"), device=dev).to(dt)
        dv = torch.full((1, tk + 2, hkv, d), float("nan"), device=dev).to(dt)
        views = dq[:, 1:tq + 1], dk[:, 1:tk + 1], dv[:, 1:tk + 1]
        bw.launch_all(q, k, v, out, dout, lse, *views, None, scale, seqs=seqs)
        torch.cuda.synchronize()
        outside = all(torch.isnan(t[:, 0]).all() and torch.isnan(t[:, -1]).all()
                      for t in (dq, dk, dv))
        return views, outside

    got, outside = run()
    scale_ = max(g.abs().max().item() for g in grads) + 1e-6
    errs = []
    for name, g, want in zip(("dq", "dk", "dv"), got, grads):
        err = (g.double() - want).abs().max().item() / scale_ if g.numel() else 0.0
        errs.append((name, float("inf") if math.isnan(err) else err))
    again, _ = run()
    same = all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b_.view(torch.int16 if b_.element_size() == 2 else torch.int32))
               for a, b_ in zip(got, again))
    return errs, same and outside, outside


def padded_case(drv, ptx_dir, manifest, var, lens_k, sq, hq, hkv, seed):
    """Key padding: dense [B, Sq] queries (no query bounds) and keys
    [k_start[b], k_end[b]) of a padded [B, Sk + 3] layout: (errors,
    deterministic and nothing written outside)."""
    torch.manual_seed(seed)
    d, causal, dt = var["d"], var["causal"], DT[var["dtype"]]
    dev = "cuda"
    n, skp = len(lens_k), max(lens_k) + 3
    q = torch.randn(n, sq, hq, d, device=dev).to(dt)
    k = torch.randn(n, skp, hkv, d, device=dev).to(dt)
    v = torch.randn(n, skp, hkv, d, device=dev).to(dt)
    dout = torch.randn(n, sq, hq, d, device=dev).to(dt)
    scale = 1 / math.sqrt(d)
    starts = [1 + (b % 2) for b in range(n)]
    out = torch.zeros_like(q)
    lse = torch.full((n, hq, sq), float("-inf"), device=dev)
    grads = [torch.zeros(t.shape, dtype=torch.float64, device=dev) for t in (q, k, v)]
    for b, (s0, lk) in enumerate(zip(starts, lens_k)):
        if lk == 0:
            continue
        qs, ks, vs = (t.double().requires_grad_() for t in (q[b:b + 1], k[b:b + 1, s0:s0 + lk],
                                                              v[b:b + 1, s0:s0 + lk]))
        o, l_ = reference(qs, ks, vs, causal, None, scale)
        out[b:b + 1] = o.detach().to(dt)
        lse[b:b + 1] = l_.detach().float()
        gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), dout[b:b + 1].double())
        grads[0][b] += gq[0]
        grads[1][b, s0:s0 + lk] += gk[0]
        grads[2][b, s0:s0 + lk] += gv[0]
    ks_ = torch.tensor(starts, dtype=torch.int32, device=dev)
    ke_ = torch.tensor([s0 + lk for s0, lk in zip(starts, lens_k)], dtype=torch.int32,
                       device=dev)
    seqs = (None, None, ks_, ke_, n, sq, max(max(lens_k), 1))
    bw = Backward(drv, ptx_dir, manifest, var)

    def run():
        got = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        bw.launch_all(q, k, v, out, dout, lse, *got, None, scale, seqs=seqs, packed=False)
        torch.cuda.synchronize()
        outside = True
        for b, (s0, lk) in enumerate(zip(starts, lens_k)):
            for t in got[1:]:
                outside &= bool(torch.isnan(t[b, :s0]).all() and torch.isnan(t[b, s0 + lk:]).all())
                t[b, :s0] = 0
                t[b, s0 + lk:] = 0
        return got, outside

    got, outside = run()
    scale_ = max(g.abs().max().item() for g in grads) + 1e-6
    errs = []
    for name, g, want in zip(("dq", "dk", "dv"), got, grads):
        err = (g.double() - want).abs().max().item() / scale_
        errs.append((name, float("inf") if math.isnan(err) else err))
    again, _ = run()
    same = all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b_.view(torch.int16 if b_.element_size() == 2 else torch.int32))
               for a, b_ in zip(got, again))
    return errs, same and outside, outside


def check_varlen(drv, ptx_dir, manifest, seed, lens_q, lens_k):
    tol = {"bf16": 3e-2, "f16": 5e-3, "f32": 1e-4}
    bad = 0
    for var in manifest["variants"]:
        if var["dtype"] == "f32" and "--f32" not in sys.argv:
            continue
        for i, (hq, hkv) in enumerate([(2, 2), (4, 2)]):
            errs, ok_bits, outside = varlen_case(drv, ptx_dir, manifest, var, lens_q, lens_k,
                                                 hq, hkv, seed + i)
            ok = all(e < tol[var["dtype"]] for _, e in errs) and ok_bits
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} varlen d={var['d']} causal={var['causal']} "
                  f"{var['dtype']} q={lens_q} k={lens_k} Hq={hq} Hkv={hkv} "
                  + " ".join(f"{n}={e:.2e}" for n, e in errs)
                  + ("" if outside else " WROTE-OUTSIDE")
                  + ("" if ok_bits or not outside else " NONDETERMINISTIC"), flush=True)
        # Key padding over a padded layout, queries whole.
        sq = max(max(lens_q), 1)
        errs, ok_bits, outside = padded_case(drv, ptx_dir, manifest, var, lens_k, sq, 4, 2,
                                             seed + 7)
        ok = all(e < tol[var["dtype"]] for _, e in errs) and ok_bits
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} key-padding d={var['d']} causal={var['causal']} "
              f"{var['dtype']} Sq={sq} k={lens_k} Hq=4 Hkv=2 "
              + " ".join(f"{n}={e:.2e}" for n, e in errs)
              + ("" if outside else " WROTE-OUTSIDE")
              + ("" if ok_bits or not outside else " NONDETERMINISTIC"), flush=True)
    print(f"{bad} bad (varlen)")
    return bad


def bench(drv, ptx_dir, manifest, shapes):
    for b, hq, sq, d, causal, hkv in shapes:
        var = next((x for x in manifest["variants"] if x["d"] == d and x["causal"] == causal
                    and x["dtype"] == "bf16"), None)
        if var is None:
            continue
        torch.manual_seed(0)
        dt = torch.bfloat16
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=dt)
        k = torch.randn(b, sq, hkv, d, device="cuda", dtype=dt)
        v = torch.randn(b, sq, hkv, d, device="cuda", dtype=dt)
        dout = torch.randn_like(q)
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                               enable_gqa=hq != hkv)
        out = o.detach().transpose(1, 2).contiguous()
        # lse from the float32 scores, chunked by head to bound memory.
        lse = torch.empty(b, hq, sq, device="cuda")
        for h in range(hq):
            s = (q[:, :, h].float() @ k[:, :, h * hkv // hq].float().transpose(1, 2)) / math.sqrt(d)
            if causal:
                s = s.masked_fill(torch.ones(sq, sq, device="cuda", dtype=torch.bool).triu(1),
                                  float("-inf"))
            lse[:, h] = torch.logsumexp(s, -1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bw = Backward(drv, ptx_dir, manifest, var)
        go = lambda: bw.launch_all(q, k, v, out, dout, lse, dq, dk, dv)  # noqa: E731
        tg = lambda: torch.autograd.grad(o, (qt, kt, vt), dout.transpose(1, 2),  # noqa: E731
                                         retain_graph=True)
        flops = 2.5 * 4 * b * hq * sq * sq * d * (0.5 if causal else 1.0)
        res = {}
        for name, fn in [("ours", go), ("torch_flash", tg)]:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
                e0.record()
                fn()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1))
            times.sort()
            res[name] = flops / (times[len(times) // 2] * 1e-3) / 1e12
        print(f"bench B={b} H={hq}/{hkv} S={sq} d={d} causal={causal}: ours "
              f"{res['ours']:.0f} TFLOP/s, torch flash {res['torch_flash']:.0f} "
              f"({res['ours'] / res['torch_flash']:.2f}x)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ptx_dir", type=Path)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--f32", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mask-kind", default="f32", choices=sorted(MASK_KINDS))
    ap.add_argument("--mask-pad", type=int, default=0)
    ap.add_argument("--varlen", help="query lengths of a packed batch, e.g. 3,0,17,64")
    ap.add_argument("--varlen-k", help="key lengths (default: the query lengths)")
    a = ap.parse_args()
    manifest = json.loads((a.ptx_dir / "manifest.json").read_text())
    drv = Driver()
    bad = 0
    if a.check:
        bad = check(drv, a.ptx_dir, manifest, a.seed, a.mask_kind, a.mask_pad)
    if a.varlen:
        lens_q = [int(x) for x in a.varlen.split(",")]
        lens_k = [int(x) for x in (a.varlen_k or a.varlen).split(",")]
        assert len(lens_q) == len(lens_k), "--varlen and --varlen-k give one length per sequence"
        bad += check_varlen(drv, a.ptx_dir, manifest, a.seed, lens_q, lens_k)
    if a.bench:
        bench(drv, a.ptx_dir, manifest, [
            (1, 12, 32760, 128, False, 12), (1, 24, 16384, 128, False, 24),
            (1, 24, 16384, 64, False, 24), (1, 8, 16384, 256, False, 8),
            (4, 32, 4096, 128, True, 32), (4, 32, 4096, 128, True, 8),
            (16, 16, 257, 80, False, 16)])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
