"""Benchmark metrics, with the result keys of `vllm bench serve` so results from either tool compare
directly (and so do plots/sweeps built on them).

Definitions (per request, client-side):
- TTFT: from sending the request to the first chunk that carries output.
- ITL: gaps between successive output-carrying chunks.
- E2EL (JCT): from sending the request to the end of its stream.
- TPOT: (E2EL - TTFT) / (output_len - 1), only for requests with more than one output token.
Aggregates cover successful requests only; durations are reported in ms, throughputs per second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

# (key stem, console title, console abbreviation)
LATENCY_METRICS = (("ttft", "Time to First Token", "TTFT"),
                   ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                   ("itl", "Inter-token Latency", "ITL"),
                   ("e2el", "End-to-end Latency", "E2EL"))


@dataclass
class RequestRecord:
    """What the load generator measured for one request (times in seconds).

    prompt_len / output_len: the server's `usage` when it sent one, else the dataset's prompt length
    and the counted output tokens. counted_output_tokens: token ids streamed (when the server
    returns them) or else output-carrying chunks, a cross-check on usage. start: when the request
    was sent, relative to the benchmark start; scheduled: its planned arrival time.
    """
    index: int
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    cached_tokens: int = 0
    counted_output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    start: float = 0.0
    scheduled: float = 0.0
    finish_reason: str | None = None
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)


def parse_percentiles(spec: str | Iterable[float]) -> list[float]:
    """'50,90,99' -> [50.0, 90.0, 99.0]; each in [0, 100]."""
    vals = [float(x) for x in spec.split(",") if x.strip()] if isinstance(spec, str) else [float(x) for x in spec]
    for v in vals:
        if not 0.0 <= v <= 100.0:
            raise ValueError(f"percentile {v} is outside [0, 100]")
    return vals


def percentile_label(p: float) -> str:
    """99.0 -> '99', 99.9 -> '99.9' (the `p{label}_..._ms` key part, as vLLM writes it)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of `values`, interpolated linearly between the closest ranks
    (numpy's default, the convention of `vllm bench serve`); nan when there are none. Every
    percentile the project reports (bench results' p{P}_*_ms, the benchmark scripts' p99) is this one."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


def _summary(values_s: Sequence[float], stem: str, percentiles: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    empty = a.size == 0  # no data (e.g. every request failed): zeros, as vLLM reports
    out = {f"mean_{stem}_ms": 0.0 if empty else float(a.mean()),
           f"median_{stem}_ms": 0.0 if empty else float(np.median(a)),
           f"std_{stem}_ms": 0.0 if empty else float(a.std())}
    for p in percentiles:
        out[f"p{percentile_label(p)}_{stem}_ms"] = 0.0 if empty else percentile(a, p)
    return out


def max_concurrency_seen(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (from send and end times)."""
    events = sorted([(r.start, 1) for r in records] + [(r.start + r.e2el, -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # ends before starts at equal times
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def compute_metrics(records: Sequence[RequestRecord], duration: float,
                    percentiles: Sequence[float] = (99.0,)) -> dict[str, float | int]:
    """vLLM-compatible aggregate keys from per-request records.

    Returns completed, failed, total_input_tokens, total_output_tokens, total_cached_tokens,
    request_throughput, output_throughput, total_token_throughput, duration, max_concurrent_requests,
    and for each of ttft/tpot/itl/e2el: mean_*_ms, median_*_ms, std_*_ms and p{P}_*_ms per percentile.
    """
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    dur = max(duration, 1e-9)
    res: dict[str, float | int] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_concurrent_requests": max_concurrency_seen(records),
    }
    series = {"ttft": [r.ttft for r in ok],
              "tpot": [t for r in ok if (t := r.tpot) is not None],
              "itl": [x for r in ok for x in r.itl],
              "e2el": [r.e2el for r in ok]}
    for stem, _, _ in LATENCY_METRICS:
        res.update(_summary(series[stem], stem, percentiles))
    return res


def format_results(result: dict, percentiles: Sequence[float] = (99.0,), title: str = "Serving Benchmark Result",
                   width: int = 50) -> str:
    """The console block (same layout and wording as vLLM's)."""
    def line(label: str, value) -> str:
        v = f"{value:.2f}" if isinstance(value, float) else str(value)
        return f"{label:<40} {v:<10}"

    def header(text: str, fill: str) -> str:
        return f"{text:{fill}^{width}}"

    rows = [header(f" {title} ", "="),
            line("Successful requests:", result["completed"]),
            line("Failed requests:", result.get("failed", 0)),
            line("Benchmark duration (s):", float(result["duration"])),
            line("Total input tokens:", result["total_input_tokens"]),
            line("Total generated tokens:", result["total_output_tokens"])]
    if result.get("total_cached_tokens"):
        rows.append(line("Total cached prompt tokens:", result["total_cached_tokens"]))
    rows += [line("Request throughput (req/s):", float(result["request_throughput"])),
             line("Output token throughput (tok/s):", float(result["output_throughput"])),
             line("Total Token throughput (tok/s):", float(result["total_token_throughput"]))]
    if "max_concurrent_requests" in result:
        rows.append(line("Peak concurrent requests:", result["max_concurrent_requests"]))
    for stem, name, abbr in LATENCY_METRICS:
        rows.append(header(name, "-"))
        rows.append(line(f"Mean {abbr} (ms):", float(result[f"mean_{stem}_ms"])))
        rows.append(line(f"Median {abbr} (ms):", float(result[f"median_{stem}_ms"])))
        for p in percentiles:
            lab = percentile_label(p)
            rows.append(line(f"P{lab} {abbr} (ms):", float(result[f"p{lab}_{stem}_ms"])))
    rows.append("=" * width)
    return "\n".join(rows)
