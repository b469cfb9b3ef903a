"""Experiment 5: the per-layer overlap ratio (KV transfer time / layer compute time) for 1000-5000
input tokens (the paper: 15.8% at 1000, 55.4% at 5000), by running benchmarks/overlap.py.

    python benchmarks/paper/exp5_overlap.py                  # 1 repeat per length
    python benchmarks/paper/exp5_overlap.py --args "--repeats 3"
"""
from __future__ import annotations

import argparse
import shlex

from _external import axes, finish, first_number, run
from _sweep import now

NAME = "exp5_overlap"
TITLE = "Experiment 5: per-layer overlap ratio T_transfer / T_layer"
PAPER = {1000: 15.8, 5000: 55.4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--args", default="--repeats 1", help="arguments for benchmarks/overlap.py (default: %(default)s)")
    a = ap.parse_args()
    started = now()
    cmd, header, rows = run("overlap.py", shlex.split(a.args))
    col = header.index(next(h for h in header if h.startswith("overlap ratio")))
    xs = [int(r[0]) for r in rows]
    fig, ax = axes(figsize=(5, 3.6))
    ax.plot(xs, [first_number(r[col]) for r in rows], marker="o", label="microserve, CPU (shm)")
    ax.plot(list(PAPER), list(PAPER.values()), marker="s", linestyle="--", label="paper (Llama-70B, H100)")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("overlap ratio (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(True, linestyle="--", alpha=0.5)
    finish(NAME, TITLE, fig, ax, started, cmd, header, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
