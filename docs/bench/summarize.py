"""Medians of docs/bench/cpu_side_by_side.sh's rounds, as the markdown table of docs/benchmarks.md."""
import glob, json, re, statistics, sys

out, rounds = sys.argv[1], int(sys.argv[2])
PRESETS = ["anchor", "anchor-4k", "anchor-causal", "clip", "decode"]
DTYPES = ["f32", "bf16", "f16"]
med = statistics.median

peaks, round_peak = [], []
for r in range(1, rounds + 1):
    mine = []
    for line in open(f"{out}/peak-{r}.txt"):
        m = re.search(r"([0-9.]+) GFLOP/s", line)
        if m:
            mine.append(float(m.group(1)))
    peaks += mine
    # The round's peak: the better of its two probes (start and end).
    round_peak.append(max(mine))
peak = med(peaks)

ours, torch = {}, {}
for r in range(1, rounds + 1):
    for p in PRESETS:
        for d in DTYPES:
            for rec in json.load(open(f"{out}/ours-{r}-{p}-{d}.json")):
                ours.setdefault((p, d), []).append(rec["tflops"] * 1e3)
                shape = rec["shape"]
                ours.setdefault((p, "shape"), shape)
    for path in glob.glob(f"{out}/torch-{r}-*.json"):
        for rec in json.load(open(path)):
            torch.setdefault((rec["preset"], rec["dtype"]), []).append(rec["gflops"])

print(f"FMA peak probe (2 threads), median of {len(peaks)} runs: {peak:.1f} GFLOP/s "
      f"(runs: {', '.join(f'{x:.0f}' for x in peaks)})")
print("ours / f32 peak: median over rounds of ours / that round's better probe\n")
print("| shape (BxHxSqxSkxD) | dtype | ours GFLOP/s | torch GFLOP/s | ours / torch | ours / f32 peak |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for p in PRESETS:
    for d in DTYPES:
        o, t = med(ours[(p, d)]), med(torch[(p, d)])
        assert len(ours[(p, d)]) == len(torch[(p, d)]) == rounds
        shape = ours[(p, "shape")] + (" causal" if "causal" in p else "")
        # Per-round ratios (ours and torch ran back to back), then their median.
        ratio = med(a / b for a, b in zip(ours[(p, d)], torch[(p, d)]))
        of_peak = "-"
        if d == "f32":
            of_peak = f"{med(a / b for a, b in zip(ours[(p, d)], round_peak)) * 100:.0f}%"
        print(f"| {p}: {shape} | {d} | {o:.1f} | {t:.1f} | {ratio:.2f}x | {of_peak} |")
print()
for d in DTYPES:
    ratios = [c / n for c, n in zip(ours[("anchor-causal", d)], ours[("anchor", d)])]
    print(f"causal / non-causal ({d}, 1x8x2048x128, causal FLOPs halved), median of per-round "
          f"ratios: {med(ratios) * 100:.0f}% (rounds: {', '.join(f'{x * 100:.0f}%' for x in ratios)})")
