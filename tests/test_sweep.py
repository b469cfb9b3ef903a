"""`microserve bench sweep`: two strategies x one rate over real clusters of stories260K engines
(JSONs with vLLM's keys, the markdown table, the PNG), and the table/aggregation on known results."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES
from microserve.bench.sweep import aggregate, markdown_table, run_filename, slug

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sweep_two_strategies_one_rate(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "microserve.cli", "bench", "sweep", "--model", STORIES, "--strategies", "dp",
           "pd:balance=0.1", "--rates", "10", "--num-prompts", "4", "--num-warmups", "1", "--dataset-name", "random",
           "--random-input-len", "48", "--random-output-len", "8", "--result-dir", str(out), "--title", "t",
           "--log-dir", str(tmp_path / "logs"), "--page-size", "4"]  # the last flag goes to the engines
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for strategy in ("dp", "pd:balance=0.1"):
        res = json.loads((out / "runs" / run_filename(strategy, 10, 0)).read_text())
        assert res["strategy"] == strategy and res["completed"] == 4 and res["failed"] == 0
        assert res["total_output_tokens"] == 4 * 8  # ignore_eos: exactly the asked length
        assert res["input_lens"] == [48] * 4 and res["num_warmups"] == 1
        for k in ("mean_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "mean_tpot_ms", "p50_e2el_ms"):
            assert res[k] > 0
    table = (out / "summary.md").read_text()
    assert "| 10 | `dp` | 4/4 |" in table and "| 10 | `pd:balance=0.1` | 4/4 |" in table
    assert "P99 JCT vs dp" in table
    png = (out / "summary.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    r2 = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "sweep" in r2.stderr  # resumed: no cluster started, same table
    assert (out / "summary.md").read_text() == table


def _result(strategy: str, rate: float, jct: float) -> dict:
    keys = {"mean_e2el_ms": jct, "p99_e2el_ms": 2 * jct, "mean_ttft_ms": 10.0, "p99_ttft_ms": 20.0,
            "mean_tpot_ms": 1.0, "p99_tpot_ms": 2.0, "request_throughput": rate}
    return {"strategy": strategy, "request_rate": rate, "completed": 5, "failed": 0, **keys}


def test_aggregate_and_table_on_known_results():
    results = [_result("dp", 1, 100), _result("dp", 1, 120), _result("dp", 1, 110), _result("pd", 1, 55),
               _result("pd", 2, 80)]
    agg = aggregate(results)
    assert agg[("dp", 1.0)]["n"] == 3 and agg[("dp", 1.0)]["mean_e2el_ms"] == 110  # median
    assert agg[("dp", 1.0)]["spread"]["mean_e2el_ms"] == 20 and agg[("dp", 1.0)]["completed"] == 15
    table = markdown_table(agg, "dp", ["dp", "pd"])
    rows = table.splitlines()
    assert rows[2].startswith("| 1 | `dp` | 15/15 | 110 ±10 | 220 ±20 |")
    assert rows[3].endswith("| -50% | -50% |")  # 55 vs 110, 110 vs 220
    assert rows[4].startswith("| 2 | `pd` |") and rows[4].endswith("|  |  |")  # no dp at rate 2


@pytest.mark.parametrize("spec,name", [("pd:balance=0.1", "pd-balance=0.1"), ("migration:min_tokens=16,imbalance=0",
                                                                              "migration-min_tokens=16-imbalance=0")])
def test_slug(spec, name):
    assert slug(spec) == name
