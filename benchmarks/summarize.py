"""Print the README's benchmark tables (markdown) from benchmarks/results/*.json.

    python benchmarks/summarize.py benchmarks/results/bench_gating_cpu.json benchmarks/results/bench_moe_cpu.json
"""
from __future__ import annotations

import json
import sys


def gating_table(doc: dict) -> str:
    rows = doc["results"]
    compiled = [r for r in rows if r["backend"] not in ("reference", "eager")]
    out = [
        "| op | T | E | k | backend | ms | x reference | x eager torch | GB/s | copy GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in compiled:
        eager = "-" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.1f}"
        out.append(
            f"| {r['op']} | {r['T']} | {r['E']} | {r['k']} | {r['backend']} | {r['median_ms']:.2f} | "
            f"{r['speedup_vs_reference']:.1f} | {eager} | {r['gbps']:.1f} | {r['copy_gbps']:.1f} | "
            f"{r['fraction_of_copy']:.0%} |"
        )
    return "\n".join(out)


def moe_table(doc: dict) -> str:
    rows = doc["results"]
    out = [
        "| shape (T, D, H, E, k) | mode | ours ms | loop ms | grouped_mm ms | dense ms | x loop | x grouped_mm | of dense rate | peak MB ours / loop / grouped_mm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["shape"], r["mode"]) for r in rows}, key=lambda sm: (sm[0], sm[1] != "forward"))
    for shape, mode in keys:
        d = {r["impl"].split("-")[0] if r["impl"].startswith("ours") else r["impl"]: r for r in rows
             if r["shape"] == shape and r["mode"] == mode}
        o = d["ours"]
        dims = f"{shape} ({o['T']}, {o['D']}, {o['H']}, {o['E']}, {o['k']})"

        def ms(name):
            return f"{d[name]['median_ms']:.0f}" if name in d else "-"

        def mem(name):
            v = d.get(name, {}).get("peak_mem_mb")
            return "-" if v is None else f"{v:.0f}"

        gmm = "-" if o.get("speedup_vs_grouped_mm") is None else f"{o['speedup_vs_grouped_mm']:.2f}"
        out.append(
            f"| {dims} | {mode} | {ms('ours')} | {ms('loop')} | {ms('grouped_mm')} | {ms('dense')} | "
            f"{o['speedup_vs_loop']:.2f} | {gmm} | {o['fraction_of_dense']:.0%} | "
            f"{mem('ours')} / {mem('loop')} / {mem('grouped_mm')} |"
        )
    return "\n".join(out)


def generic_table(doc: dict) -> str:
    """Every field of every row (the step benchmarks: MARS, MCE, MoE-Retriever, expert parallel)."""
    rows = doc["results"]
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def table(doc: dict) -> str:
    first = doc["results"][0] if doc["results"] else {}
    if first.get("op") == "sparse_moe":
        return moe_table(doc)
    if "copy_gbps" in first:
        return gating_table(doc)
    return generic_table(doc)


def main(paths: list[str]) -> None:
    for path in paths:
        doc = json.load(open(path))
        env = doc["environment"]
        print(f"\n{path} — {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}\n")
        print(table(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
