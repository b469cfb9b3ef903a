"""benchmarks/gpu/run.py: the dry run (tiny config on CPU) exercises every section, and the report
builder formats what it is given."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through the module
    spec.loader.exec_module(mod)
    return mod


def test_render_formats_sections():
    run = _load()
    s = run.Section("Decode", ["batch", "tokens/s", "share"], rows=[[1, 1234.5678, "50.0%"], [8, 0.01234, None]],
                    notes=["a note"], seconds=1.5)
    bad = run.Section("Broken", ["x"], notes=["**error**: `ValueError: no`"])
    md = run.render([s, bad], {"device": "NVIDIA H100"})
    assert "- **device**: NVIDIA H100" in md
    assert "| batch | tokens/s | share |" in md and "| 1 | 1,235 | 50.0% |" in md and "| 8 | 0.0123 | - |" in md
    assert "## Broken" in md and "**error**" in md
    assert run.share(50.0, 200.0) == "25.0%" and run.share(1.0, float("nan")) == "-"


def test_flops_count_matches_llama_8b_size():
    """2 FLOPs per weight per token: the 8B config's linear layers hold ~6.98e9 weights (without
    the embedding and the lm_head, which prefill applies to one row only)."""
    run = _load()
    from microserve.config import ModelConfig
    bench = run.Bench.__new__(run.Bench)
    bench.mc = ModelConfig.from_hf(run.LLAMA_31_8B)
    linear = bench.flops_prefill(1) - 2 * 32 * 128 * 32  # minus attention at n=1
    per_token = linear - 2 * 4096 * 128256
    assert abs(per_token / 2 - 6.98e9) / 6.98e9 < 0.01


def test_dry_run_end_to_end(tmp_path):
    out, js = tmp_path / "report.md", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--json", str(js),
                           "--budget-s", "120"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = out.read_text()
    for title in ("Device ceilings", "Decode", "Prefill", "Per-layer compute vs KV transfer", "Migration vs recompute",
                  "Engine vs HF transformers generate"):
        assert f"## {title}" in md, title
    assert "**error**" not in md and "**skipped**" not in md
    sections = json.loads(js.read_text())
    rows = {s["title"].split(" (")[0]: s["rows"] for s in sections}
    assert [r[0] for r in rows["Decode"]] == [1, 8]
    assert [r[0] for r in rows["Prefill"]] == [64, 128]
    assert len(rows["Per-layer compute vs KV transfer"]) == 2 and all(r[2] > 0 for r in rows["Per-layer compute vs KV transfer"])
    assert [r[0] for r in rows["Engine vs HF transformers generate"]] == [1, 4]
