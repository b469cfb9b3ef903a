"""Run one of the microserving benchmarks (benchmarks/overlap.py, benchmarks/migration.py) as its
own command with --no-write, keep its printed markdown table, and write it with a plot into
docs/paper/<name>.md / .png. The measuring is theirs; this only records it for the paper set."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from _sweep import DOCS, ROOT, now

from microserve.bench.harness import command_line


def run(script: str, args: list[str]) -> tuple[str, list[str], list[list[str]]]:
    """Run benchmarks/<script> with `args` + --no-write (output streamed through); returns the
    command line, the last markdown table's header and its rows (cells as strings)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-write"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if p.wait() != 0:
        raise SystemExit(f"{script} failed with code {p.returncode}")
    table = []
    for line in reversed(lines):  # the last block of |-lines
        if line.startswith("|"):
            table.insert(0, line)
        elif table:
            break
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table if not re.match(r"^\|\s*-", row)]
    return " ".join(["python", f"benchmarks/{script}", *args, "--no-write"]), cells[0], cells[1:]


def first_number(cell: str) -> float:
    """'15.8 (12.0-20.1) %' -> 15.8 (the median, which the benchmarks print first)."""
    m = re.search(r"[-+]?\d+(?:\.\d+)?", cell)
    return float(m.group()) if m else float("nan")


def axes(figsize: tuple[float, float]):
    """A matplotlib (figure, axes) on the Agg backend; matplotlib is imported only here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=figsize)


def finish(name: str, title: str, fig, ax, started: str, cmd: str, header: list[str], rows: list[list[str]]) -> Path:
    """Legend and title on `ax`, docs/paper/<name>.png from `fig`, then docs/paper/<name>.md (`write`)."""
    ax.legend(frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / f"{name}.png", dpi=120)
    return write(name, title, started, cmd, header, rows)


def write(name: str, title: str, started: str, cmd: str, header: list[str], rows: list[list[str]],
          notes: str = "") -> Path:
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    body = (f"# {title}\n\n- command: `{command_line()}`, which runs `{cmd}`\n"
            f"- started: {started}\n- finished: {now()}\n\n" + "\n".join(md) + f"\n\n![{title}]({name}.png)\n")
    if notes:
        body += "\n" + notes.strip() + "\n"
    path = DOCS / f"{name}.md"
    DOCS.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    print(body)
    return path
