"""Shared bits of the microserving benchmarks: the dummy-weight model config, machine facts, stats,
and writing one benchmark's section of docs/bench_microserving.md (other sections are kept)."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bench_microserving.md"
STORIES = str(ROOT.parent / "shared" / "models" / "stories260K")

HEADER = """# Microserving benchmarks: per-layer overlap, context migration, router overhead

Each section below is written by one command (`python benchmarks/<name>.py`), which measures the
compared variants side by side, interleaved, in one run, and replaces only its own section here.
The machine is shared with other jobs (tests, builds), so every number is a median over repeats
with its spread (min-max or p99) beside it; the load average at the start and end of each run is
recorded with it.
"""


def write_model(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int = 8192,
                max_pos: int = 8192, path: str | None = None) -> str:
    """A Llama config.json (dummy weights are generated from it) in a temp dir; returns the dir."""
    d = path or tempfile.mkdtemp(prefix="microserve-bench-model-")
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
               rope_theta=500000.0, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return d


def model_desc(hidden, intermediate, layers, heads, kv_heads, vocab=8192) -> str:
    per_layer = hidden * (heads + 2 * kv_heads) * (hidden // heads) + heads * (hidden // heads) * hidden \
        + 3 * hidden * intermediate
    return (f"Llama, dummy weights, fp32: hidden {hidden}, intermediate {intermediate}, {layers} layers, "
            f"{heads} heads / {kv_heads} KV heads (head_dim {hidden // heads}), vocab {vocab}; "
            f"{per_layer * layers / 1e6:.0f}M layer params")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "microserve"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    dirty = [ln[3:] for ln in dirty if ln.strip()]
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(), "cpu": cpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "commit": rev, "uptime": up, "dirty": dirty}


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", rel, *map(shlex.quote, sys.argv[1:])])


def run_header(m: dict, load_end: str) -> str:
    return (f"- command: `{command_line()}`\n"
            f"- date: {m['date']}, commit {m['commit']}"
            + (f" plus uncommitted changes to {', '.join(m['dirty'])}"
               if m["dirty"] else "") + "\n"
            f"- machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, Python {m['python']}\n"
            f"- `uptime` at start: `{m['uptime']}`; load average at end: {load_end}\n")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def spread(xs, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """'median (min-max)' of xs times scale."""
    if not xs:
        return "-"
    return f"{fmt.format(median(xs) * scale)} ({fmt.format(min(xs) * scale)}-{fmt.format(max(xs) * scale)})"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_section(key: str, title: str, body: str, path: Path = DOC) -> None:
    """Replace (or append) the section between <!-- key:begin --> and <!-- key:end --> markers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- {key}:begin -->\n## {title}\n\n{body.rstrip()}\n<!-- {key}:end -->"
    pat = re.compile(rf"<!-- {re.escape(key)}:begin -->.*?<!-- {re.escape(key)}:end -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def publish(key: str, title: str, header: list[str], rows: list[list], m: dict, setup: str, notes: str,
            no_write: bool = False, path: Path = DOC) -> str:
    """The end of a benchmark: print its markdown table and, unless `no_write`, replace its section
    `key` of `path` with the run header (command, machine, load at the end), `setup` (the run's own
    bullet lines), the table and `notes`. Returns the table."""
    table = md_table(header, rows)
    print()
    print(table)
    if not no_write:
        write_section(key, title, run_header(m, loadavg()) + setup + f"\n{table}\n" + notes, path)
    return table


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall milliseconds of fn() over reps calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
