"""Experiment 4: context-cache migration vs recompute at 1000 tokens (the paper: 1.7x faster), by
running benchmarks/migration.py (two engine processes over HTTP, each pinned to a core).

    python benchmarks/paper/exp4_migration.py                 # large model, HTTP, 5 repeats
    python benchmarks/paper/exp4_migration.py --args "--models large,small --modes http,inproc --repeats 10"
"""
from __future__ import annotations

import argparse
import shlex

from _external import axes, finish, first_number, run
from _sweep import now

NAME = "exp4_migration"
TITLE = "Experiment 4: migrating a 1000-token context vs recomputing it"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--args", default="--models large --modes http --repeats 5",
                    help="arguments for benchmarks/migration.py (default: %(default)s)")
    a = ap.parse_args()
    started = now()
    cmd, header, rows = run("migration.py", shlex.split(a.args))
    rc, mg = header.index(next(h for h in header if h.startswith("(b)"))), header.index(
        next(h for h in header if h.startswith("(a)")))
    labels = [f"{r[0]}\n{r[1]}" for r in rows]
    x = range(len(rows))
    fig, ax = axes(figsize=(max(4.5, 2.2 * len(rows)), 3.6))
    ax.bar([i - 0.2 for i in x], [first_number(r[rc]) for r in rows], 0.4, label="recompute on B")
    ax.bar([i + 0.2 for i in x], [first_number(r[mg]) for r in rows], 0.4, label="migrate A->B, then run on B")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("time to first token (ms)")
    ax.grid(True, axis="y", linestyle="--", alpha=0.5)
    finish(NAME, TITLE, fig, ax, started, cmd, header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
