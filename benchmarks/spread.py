"""
``python -m benchmarks.spread RUN.json RUN.json ...`` (or ``make bench BENCH_ARGS=--runs 3``): several
``make bench`` runs side by side, one line per row with a target: jds's cell in each run and in how many
runs the target was met. Issue 22 asks for three quiet runs and their spread; a target met in one run
of three is not met.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def spread(tables: list[dict]) -> str:
    """A Markdown table: each row that has a target, jds's cell per run, and the verdicts counted."""
    runs = len(tables)
    jds_column = 2 + tables[0]["proxies"].index("jds")
    verdicts = [dict(t["verdicts"]) for t in tables]
    head = ["row", *(f"run {n + 1}" for n in range(runs)), "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in tables[0]["rows"]:
        what = row[0]
        if what not in verdicts[0]:
            continue
        cells = []
        for table in tables:
            same = [r for r in table["rows"] if r[0] == what]
            cells.append(same[0][jds_column] if same else "—")
        met = sum(1 for v in verdicts if v.get(what) is True)
        lines.append("| " + " | ".join([what, *cells, row[-2], f"{met} of {runs}"]) + " |")
    return "\n".join(lines)


def summary(tables: list[dict]) -> str:
    """One line: how many targets every run met, and which were missed in some run."""
    verdicts = [dict(t["verdicts"]) for t in tables]
    rows = list(verdicts[0])
    every = [what for what in rows if all(v.get(what) is True for v in verdicts)]
    missed = [what for what in rows if what not in every]
    text = f"met in all {len(tables)} runs: {len(every)} of {len(rows)} targets"
    return text + "".join(f"\n  not met in every run: {what}" for what in missed)


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip())
        return 2
    tables = [json.loads(Path(p).read_text())["table"] for p in paths]
    print(spread(tables))
    print()
    print(summary(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
