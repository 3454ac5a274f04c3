"""The before/after table of run.sh: each measure's value in every round of
the tree before (base, 0af3990) and after (main), and the after/before ratio
of the round medians. python benchmarks/results/product_shape_before_after/summarize.py"""
import glob
import json
import os
import statistics
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
vals = defaultdict(lambda: defaultdict(list))


def load(d, name):
    path = os.path.join(d, f"{name}.json")
    return json.load(open(path))["results"] if os.path.exists(path) else []


def main():
    for tree in ("base", "main"):
        for d in sorted(glob.glob(os.path.join(HERE, f"{tree}-*"))):
            for r in load(d, "gating"):
                if r["backend"] == "cpu":
                    vals[f"topk_gating T={r['T']} E={r['E']} k={r['k']} ms"][tree].append(r["median_ms"])
            for r in load(d, "moe"):
                if r["impl"].startswith("ours"):
                    vals[f"SparseMoE {r['shape']} {r['mode']} ms"][tree].append(r["median_ms"])
                    vals[f"SparseMoE {r['shape']} {r['mode']} x loop"][tree].append(r["speedup_vs_loop"])
            for r in load(d, "mars"):
                vals[f"MARS step ({r['backend']}) ms"][tree].append(r["median_ms"])
            for r in load(d, "hf_experts"):
                vals[f"HF experts {r['shape']} {r['mode']} ms"][tree].append(r["mars_kernels_ms"])
                vals[f"HF experts {r['shape']} {r['mode']} x grouped_mm"][tree].append(r["x_grouped_mm"])
            for r in load(d, "mce"):
                vals["MCE step (batched) ms"][tree].append(r["batched_ms"])
            for r in load(d, "moe_retriever"):
                if r["impl"] == "batched":
                    vals[f"MoE-Retriever step ({r['variant']}) ms"][tree].append(r["median_ms"])

    print("| measure | before (0af3990), rounds | after (main), rounds | after / before (medians) |")
    print("|---|---|---|---|")
    for k, v in vals.items():
        f = lambda xs: " / ".join(f"{x:.3g}" for x in xs) or "-"  # noqa: E731
        ratio = statistics.median(v["main"]) / statistics.median(v["base"]) if v["main"] and v["base"] else float("nan")
        print(f"| {k} | {f(v['base'])} | {f(v['main'])} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
