import json, glob, statistics
from collections import defaultdict
vals = defaultdict(lambda: defaultdict(list))
for tree in ("base", "main"):
    for d in sorted(glob.glob(f"benchmarks/results/architecture_before_after/{tree}-*")):
        try:
            g = json.load(open(f"{d}/gating.json"))["results"]
            for r in g:
                if r["backend"] == "cpu":
                    vals[f"gating fwd T={r['T']} E={r['E']} k={r['k']} ms"][tree].append(r["median_ms"])
            m = json.load(open(f"{d}/moe.json"))["results"]
            for r in m:
                if r["impl"].startswith("ours"):
                    vals[f"SparseMoE {r['shape']} {r['mode']} ms"][tree].append(r["median_ms"])
                    vals[f"SparseMoE {r['shape']} {r['mode']} x loop"][tree].append(r["speedup_vs_loop"])
            s = json.load(open(f"{d}/mars.json"))["results"]
            for r in s:
                vals[f"MARS step {r['backend']} ms"][tree].append(r["median_ms"])
                if r["backend"] == "cpu":
                    vals["MARS step cpu x reference"][tree].append(r["speedup_vs_reference"])
        except FileNotFoundError:
            pass
print("| measure | before (5f32519) | after (main) |")
print("|---|---|---|")
for k, v in vals.items():
    f = lambda xs: " / ".join(f"{x:.2f}" if x < 10 else f"{x:.0f}" for x in xs) or "-"
    print(f"| {k} | {f(v['base'])} | {f(v['main'])} |")
