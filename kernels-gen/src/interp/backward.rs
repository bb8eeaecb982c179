//! The backward kernels' harness: a forward [`Case`]'s inputs, the
//! forward's `out` and `lse` from the float64 reference, a random `dout`,
//! the three kernels of the backward's launch contract run over their
//! grids in order (the main kernel's CTAs in grid order, key block 0
//! first, so that no `dq` counter ever waits), and `dq`, `dk`, `dv`
//! checked against the float64 reference gradients.

// The reference indexes several tensors by the same positions.
#![allow(clippy::needless_range_loop)]

use super::forward::{get, inputs, put, quantise, Case, Launch};
use super::{Grid, Memory, Program};
use crate::backward::BACKWARD_PARAMS;
use crate::ptx::Kernel;
use std::collections::HashMap;

/// A variant's three backward kernels and their launches.
pub struct Backward {
    /// `delta` and `lse_log2`; its `block_m` is the query rows per CTA.
    pub pre: (Kernel, Launch),
    /// The main kernel; its `block_m` is the rows of a `dq` block.
    pub main: (Kernel, Launch),
    /// Keys per CTA of the main kernel.
    pub block_n: usize,
    /// `dq` from `dq_accum`.
    pub convert: (Kernel, Launch),
}

/// Runs the CTAs of a `grid` in grid order (x fastest).
fn run_grid(
    mem: &mut Memory,
    kernel: &Kernel,
    launch: Launch,
    params: &HashMap<String, u64>,
    grid: [usize; 3],
) {
    let prog = Program::new(kernel);
    let params: HashMap<String, u64> = params
        .iter()
        .map(|(n, &v)| (format!("{}_{n}", kernel.name()), v))
        .collect();
    let grid = Grid {
        size: grid,
        threads: launch.threads,
        smem_bytes: launch.smem_bytes,
        divergence: true,
    };
    super::launch(&prog, &params, grid, mem);
}

/// Relative L2 error of `got` against `want`.
fn rel(num: f64, den: f64) -> f64 {
    (num / den.max(1e-30)).sqrt()
}

/// Runs the backward of `c` in the interpreter and checks `dq`, `dk` and
/// `dv` against float64 reference gradients (given the reference's `out`,
/// as the kernels get it, and its exact `lse`); tokens outside the
/// sequences keep their NaN poison in all three. Returns the relative L2
/// errors of `[dq, dk, dv]`.
pub fn check(c: Case, k: &Backward) -> [f64; 3] {
    assert!(c.lse && !c.nan_q && c.mask_batches.is_none(), "{c:?}");
    let mut inp = inputs(&c);
    let (d, b, hq, hkv) = (c.d, c.b, c.hq, c.hkv);
    let group = hq / hkv;
    let (tq, tk) = inp.lay.tokens;
    let (sq, sk) = inp.lay.bounds;
    let nb = inp.lay.batches;
    let es = c.dtype.size_bytes();
    let entries = inp.lay.entries.clone();

    // out and lse from the reference forward; dout random. Rows outside
    // the sequences hold NaN: never read.
    let q_len = nb * tq * hq * d;
    let k_len = nb * tk * hkv * d;
    let mem = &mut inp.mem;
    let o_ptr = mem.alloc(q_len * es, 0xFF);
    let do_ptr = mem.alloc(q_len * es, 0xFF);
    let mut ov = vec![f64::NAN; q_len];
    let mut dov = vec![f64::NAN; q_len];
    // Probabilities per (entry, head, row): exp(s - lse).
    let mut probs: Vec<Vec<Vec<Vec<f64>>>> = Vec::new();
    for (bi, &((qs, ql), (ks, _), tb)) in entries.iter().enumerate() {
        let mut per_head = Vec::new();
        for h in 0..hq {
            let kh = h / group;
            let mut rows = Vec::new();
            for i in 0..ql {
                let sc = inp.scores(&c, bi, h, i);
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let qrow = inp.q_row(&c, tb, qs + i, h);
                let mut out = vec![0f64; d];
                let mut p = vec![0f64; sc.len()];
                let mut lse = f64::NEG_INFINITY;
                if mx > f64::NEG_INFINITY {
                    let sum: f64 = sc.iter().map(|&s| (s - mx).exp()).sum();
                    lse = mx + sum.ln();
                    for (j, &s) in sc.iter().enumerate() {
                        p[j] = (s - lse).exp();
                        let vrow = inp.k_row(&c, tb, ks + j, kh);
                        for x in 0..d {
                            out[x] += p[j] * inp.vv[vrow + x];
                        }
                    }
                }
                for x in 0..d {
                    let (bits, val) = quantise(c.dtype, out[x] as f32);
                    put(&mut inp.mem, c.dtype, o_ptr, qrow + x, bits);
                    ov[qrow + x] = val as f64;
                    let (bits, val) = quantise(c.dtype, inp.rng.next());
                    put(&mut inp.mem, c.dtype, do_ptr, qrow + x, bits);
                    dov[qrow + x] = val as f64;
                }
                let n = tb * inp.lse_st[0] + h * inp.lse_st[1] + (qs + i) * inp.lse_st[2];
                let o = inp.mem.check(inp.lse_ptr + 4 * n as u64, 4);
                inp.mem.bytes[o..o + 4].copy_from_slice(&(lse as f32).to_le_bytes());
                rows.push(p);
            }
            per_head.push(rows);
        }
        probs.push(per_head);
    }

    // Gradients (NaN poison) and the scratch buffers.
    let mem = &mut inp.mem;
    let dq_ptr = mem.alloc(q_len * es, 0xFF);
    let dk_ptr = mem.alloc(k_len * es, 0xFF);
    let dv_ptr = mem.alloc(k_len * es, 0xFF);
    let main_bm = k.main.1.block_m;
    let accum_ptr = mem.alloc(b * hq * sq * d * 4, 0);
    let lse2_ptr = mem.alloc(b * hq * sq * 4, 0xFF);
    let delta_ptr = mem.alloc(b * hq * sq * 4, 0xFF);
    let sem_ptr = mem.alloc(b * hq * sq.div_ceil(main_bm) * 4, 0);

    let mut params: HashMap<String, u64> = HashMap::new();
    let mut set = |n: &str, v: u64| {
        params.insert(n.to_string(), v);
    };
    for (n, v) in [
        ("q", inp.q_ptr),
        ("k", inp.k_ptr),
        ("v", inp.v_ptr),
        ("out", o_ptr),
        ("dout", do_ptr),
        ("lse", inp.lse_ptr),
        ("mask", inp.m_ptr),
        ("dq", dq_ptr),
        ("dk", dk_ptr),
        ("dv", dv_ptr),
        ("dq_accum", accum_ptr),
        ("lse_log2", lse2_ptr),
        ("delta", delta_ptr),
        ("sem", sem_ptr),
    ] {
        set(n, v);
    }
    for (n, ptr) in ["q_start", "q_end", "k_start", "k_end"]
        .iter()
        .zip(inp.bounds)
    {
        set(n, ptr);
    }
    for (t, st) in [
        ("q", inp.q_st),
        ("k", inp.kv_st),
        ("v", inp.kv_st),
        ("out", inp.q_st),
        ("dout", inp.q_st),
        ("dq", inp.q_st),
        ("dk", inp.kv_st),
        ("dv", inp.kv_st),
    ] {
        for (dim, x) in ["b", "s", "h"].iter().zip(st) {
            set(&format!("{t}_stride_{dim}"), x as u64);
        }
    }
    for (t, st) in [("lse", inp.lse_st), ("mask", inp.m_st)] {
        for (dim, x) in ["b", "h", "q"].iter().zip(st) {
            set(&format!("{t}_stride_{dim}"), x as u64);
        }
    }
    set("seq_q", sq as u64);
    set("seq_k", sk as u64);
    set("tokens_q", tq as u64);
    set("tokens_k", tk as u64);
    set("mask_kind", c.mask_kind.code() as u64);
    set("mask_pad", c.mask_pad as u64);
    set("heads_q", hq as u64);
    set("group", group as u64);
    set(
        "scale_log2",
        (c.scale * std::f32::consts::LOG2_E).to_bits() as u64,
    );
    set("scale", c.scale.to_bits() as u64);
    assert_eq!(params.len(), BACKWARD_PARAMS.len());

    let rows_grid = |l: Launch| [sq.div_ceil(l.block_m), hq, b];
    run_grid(&mut inp.mem, &k.pre.0, k.pre.1, &params, rows_grid(k.pre.1));
    run_grid(
        &mut inp.mem,
        &k.main.0,
        k.main.1,
        &params,
        [sk.div_ceil(k.block_n), hkv, b],
    );
    run_grid(
        &mut inp.mem,
        &k.convert.0,
        k.convert.1,
        &params,
        rows_grid(k.convert.1),
    );

    // The reference gradients, in f64.
    let mut dq = vec![0f64; q_len];
    let mut dk = vec![0f64; k_len];
    let mut dv = vec![0f64; k_len];
    let mut q_in = vec![false; q_len];
    let mut k_in = vec![false; k_len];
    let scale = c.scale as f64;
    for (bi, &((qs, ql), (ks, kl), tb)) in entries.iter().enumerate() {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..ql {
                let qrow = inp.q_row(&c, tb, qs + i, h);
                q_in[qrow..qrow + d].fill(true);
                let delta: f64 = (0..d).map(|x| dov[qrow + x] * ov[qrow + x]).sum();
                for j in 0..kl {
                    let p = probs[bi][h][i][j];
                    let krow = inp.k_row(&c, tb, ks + j, kh);
                    let dp: f64 = (0..d).map(|x| dov[qrow + x] * inp.vv[krow + x]).sum();
                    let ds = p * (dp - delta);
                    for x in 0..d {
                        dq[qrow + x] += scale * ds * inp.kv[krow + x];
                        dk[krow + x] += scale * ds * inp.qv[qrow + x];
                        dv[krow + x] += p * dov[qrow + x];
                    }
                }
            }
        }
        for kh in 0..hkv {
            for j in 0..kl {
                let krow = inp.k_row(&c, tb, ks + j, kh);
                k_in[krow..krow + d].fill(true);
            }
        }
    }
    let mut errs = [0f64; 3];
    for (n, (name, ptr, want, inside)) in [
        ("dq", dq_ptr, &dq, &q_in),
        ("dk", dk_ptr, &dk, &k_in),
        ("dv", dv_ptr, &dv, &k_in),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut num, mut den) = (0f64, 0f64);
        for (e, (&w, &is_in)) in want.iter().zip(inside.iter()).enumerate() {
            let got = get(&inp.mem, c.dtype, ptr, e);
            if is_in {
                assert!(got.is_finite(), "{c:?}: {name}[{e}] = {got}");
                num += (got - w).powi(2);
                den += w.powi(2);
            } else {
                assert!(
                    got.is_nan(),
                    "{c:?}: {name}[{e}] outside the sequences was written"
                );
            }
        }
        errs[n] = rel(num, den);
    }
    errs
}
