"""The benchmark scripts' shared harness (benchmarks/*.py, benchmarks/paper/, benchmarks/gpu/).

What every recorded result carries about its run (the command, date, commit, machine, load), the
statistics the scripts report (median, spread, and `percentile`: metrics.percentile, the one
convention `microserve bench` reports too), markdown tables, writing one benchmark's section of a
doc, where raw output goes (benchmarks/results/, ignored by git), and a dummy-weight Llama config.

Scripts import it from the installed package (`pip install -e .`), with no sys.path edits. It
imports neither torch nor the engine. ROOT is the checkout the package runs from (an editable
install): benchmarks/, docs/ and ../shared/models are found from it.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from microserve.bench.metrics import percentile

__all__ = ["DOC", "RESULTS", "ROOT", "STORIES", "Timer", "command_line", "loadavg", "machine", "machine_line",
           "md_table", "median", "median_ms", "model_desc", "percentile", "publish", "results_dir", "run_header",
           "shared_model", "spread", "uptime", "write_model", "write_section"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"  # raw output of the scripts: console logs, per-run JSON (git-ignored)
DOC = ROOT / "docs" / "bench_microserving.md"


def shared_model(name: str) -> str:
    """A model directory of ../shared/models beside the checkout (stories260K, stories260K-hd32)."""
    return str(ROOT.parent / "shared" / "models" / name)


STORIES = shared_model("stories260K")


def results_dir(name: str) -> str:
    """benchmarks/results/<name>: the default folder for a script's raw output (git-ignored)."""
    return str(RESULTS / name)


HEADER = """# Microserving benchmarks: per-layer overlap, context migration, router overhead

Each section below is written by one command (`python benchmarks/<name>.py`), which measures the
compared variants side by side, interleaved, in one run, and replaces only its own section here.
The machine is shared with other jobs (tests, builds), so every number is a median over repeats
with its spread (min-max or p99) beside it; the load average at the start and end of each run is
recorded with it.
"""


# ---- the model --------------------------------------------------------------------------------------
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


# ---- the run: machine, commit, load, command ----------------------------------------------------------
def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as /proc/loadavg gives them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def uptime() -> str:
    """`uptime`'s line (time, users, load averages); the load averages alone where it cannot run."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {loadavg()}"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (a copied tree)
        return ""


def _version(package: str) -> str:
    mod = sys.modules.get(package)
    if mod is not None and hasattr(mod, "__version__"):
        return str(mod.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """The facts every result records: date (UTC), CPUs, CPU model, torch and Python versions, the
    commit and the files under microserve/ changed since it, and `uptime` (the load)."""
    cpu = platform.processor() or platform.machine() or "?"
    vector_flags: list[str] = []  # what CPU numbers depend on: AVX2 and AVX-512 machines differ by 2-6x
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    vector_flags = sorted(f for f in line.partition(":")[2].split()
                                          if f.startswith(("avx", "amx", "sve", "asimd")) or f in ("fma", "f16c", "neon"))
                    break
    except OSError:
        pass
    dirty = [ln[3:] for ln in _git("status", "--porcelain", "--", "microserve").split("\n") if ln.strip()]
    torch = sys.modules.get("torch")  # its thread count only where the script runs torch
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(), "cpu": cpu,
            "torch": _version("torch"), "torch_threads": torch.get_num_threads() if torch else None,
            "python": platform.python_version(), "vector_flags": " ".join(vector_flags), "commit": _git("rev-parse", "--short", "HEAD").strip() or "?",
            "uptime": uptime(), "dirty": dirty}


def command_line() -> str:
    """This process's command as one reruns it from the checkout: `python benchmarks/... ARGS`."""
    rel = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", rel, *map(shlex.quote, sys.argv[1:])])


def machine_line(m: dict | None = None) -> str:
    """One line of `machine()`: date, commit, CPUs and `uptime`."""
    m = m or machine()
    return (f"{m['date']}, commit {m['commit']}" + (" (uncommitted changes)" if m["dirty"] else "")
            + f", {m['nproc']} CPUs ({m['cpu']}; {m.get('vector_flags') or 'no vector flags read'}); "
            f"`uptime`: `{m['uptime']}`")


def run_header(m: dict, load_end: str) -> str:
    """Markdown bullets of a run: its command, date and commit, machine, and the load at start and end."""
    return (f"- command: `{command_line()}`\n"
            f"- date: {m['date']}, commit {m['commit']}"
            + (f" plus uncommitted changes to {', '.join(m['dirty'])}"
               if m["dirty"] else "") + "\n"
            f"- machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, Python {m['python']}\n"
            f"- CPU vector flags (lscpu): {m.get('vector_flags') or '?'}\n"
            f"- `uptime` at start: `{m['uptime']}`; load average at end: {load_end}\n")


# ---- statistics --------------------------------------------------------------------------------------
def median(xs) -> float:
    return percentile(xs, 50)


def spread(xs, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """'median (min-max)' of xs times scale."""
    if not xs:
        return "-"
    return f"{fmt.format(median(xs) * scale)} ({fmt.format(min(xs) * scale)}-{fmt.format(max(xs) * scale)})"


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall milliseconds of fn() over reps calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts) * 1e3


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0


# ---- writing results ---------------------------------------------------------------------------------
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
