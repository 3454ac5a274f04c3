"""Merge the per-seed rows of several ``mars compare`` result directories into
one table (the rows paired with MARS seed by seed), e.g. the baselines run once
and MARS run again after a change of its defaults:

    python experiments/merge_compare.py OUT.json DIR_A DIR_B [...] [--note TEXT]

A directory given as ``DIR=LABEL`` has LABEL appended to its row names
("mars" -> "mars (pattern)" for ``DIR=(pattern)``): another configuration of
the same method gets its own row, paired with the first directory's MARS row.

Each DIR holds a ``compare.json`` of the same data, protocol and epochs
(checked); the seeds may differ (rows are paired with MARS seed by seed, over
the seeds both have). The masks per step may differ: a row trained at another
P than its method's default (``mars.methods``) is named "ROW (P=N)", so the
same method at two budgets gets two rows. Writes OUT.json in ``compare.json``'s form (plus the source
commands) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mars.cli import PAIRED_NOTE, compare_table  # noqa: E402
from mars.config import default_config  # noqa: E402
from mars.rundir import write_json  # noqa: E402


def _row_name(row: str, summaries: list[dict]) -> str:
    P = summaries[0].get("masks_per_step", 1)
    method = summaries[0].get("method", row.partition("@")[0])
    return row if P == default_config(method).masks_per_step else f"{row} (P={P})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("dirs", nargs="+", help="compare directories, each DIR or DIR=LABEL")
    p.add_argument("--note", default="")
    p.add_argument("--machine", default="")
    a = p.parse_args(argv)
    if a.out.exists():  # replace only an earlier merge (never a file this script did not write)
        try:
            earlier = json.loads(a.out.read_text())
        except (OSError, ValueError, RecursionError):
            earlier = None
        if a.out.is_dir() or not (isinstance(earlier, dict) and {"paired_note", "commands", "table"} <= set(earlier)):
            p.error(f"{a.out}: exists and is not a table written by merge_compare.py; choose another OUT")
    parts, labels, dirs = [], [], []
    for given in a.dirs:
        d, _, label = str(given).partition("=")
        dirs.append(Path(d))
        labels.append(label)
        path = Path(d) / "compare.json"
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            p.error(f"{path}: {e}")
    for part, label in zip(parts, labels):
        if label:
            part["rows"] = {f"{row} {label}": summaries for row, summaries in part["rows"].items()}
    keys = ("data", "protocol", "epochs")
    for part, d in zip(parts[1:], dirs[1:]):
        for k in keys:
            if part.get(k) != parts[0].get(k):
                p.error(f"{d}: {k} is {part.get(k)!r}, the first directory's is {parts[0].get(k)!r}")
    rows: dict[str, list[dict]] = {}
    # MARS first: the other rows are paired with it.
    for part in sorted(parts, key=lambda q: not any(r.split("@")[0] == "mars" for r in q["rows"])):
        for row, summaries in part["rows"].items():
            row = _row_name(row, summaries)
            if row in rows:
                p.error(f"row {row!r} appears in two directories")
            rows[row] = summaries
    table, lines = compare_table(rows, parts[0]["epochs"])
    text = "\n".join(lines)
    print(text + "\n" + PAIRED_NOTE)
    out = {k: parts[0].get(k) for k in keys}
    out["masks_per_step"] = {row: summaries[0].get("masks_per_step", 1) for row, summaries in rows.items()}
    out["seeds"] = {row: [s["seed"] for s in summaries] for row, summaries in rows.items()}
    out.update(rows=rows, table=table, commands=[q["command"] for q in parts], note=a.note, machine=a.machine,
               paired_note=PAIRED_NOTE, markdown=text)
    write_json(a.out, out)  # atomic
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
