"""Measure the CPU miniature preset: one engine in this process, pinned to one core with one torch
thread (as `microserve up --pin-cores` runs each engine), dummy weights of the preset's config.
Decode step time at batch 1, 4, 8, 16 (each request holding the long workload's context), prefill
time of the long workload's input and of 3000 tokens, and the prefill:decode ratio the preset is
sized by. Writes docs/paper/preset.md.

    python benchmarks/paper/preset.py              # core 1, 3 repeats
"""
from __future__ import annotations

import argparse
import os

from _sweep import DOCS, now

from microserve.bench.harness import command_line
from microserve.bench.presets import PRESETS
from microserve.sim.calibrate import measure_engine

PAPER = ("Llama-3.1-70B FP8, TP4 on H100: prefill of 3000 tokens 0.15-0.2 s, decode ~10 ms/step, so 100 "
         "tokens ~1 s: prefill:decode ~1:6")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="miniature")
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    pre = PRESETS[a.preset]
    w = pre.workloads["long"]
    started = now()
    dtype = pre.engine_args[pre.engine_args.index("--dtype") + 1] if "--dtype" in pre.engine_args else "auto"
    r = measure_engine(pre.model, core=a.core, prefill_lens=(w.input_len, 3000), batches=(1, 4, 8, 16),
                       context=w.input_len, steps=20, repeats=a.repeats, engine_args={"dtype": dtype})
    step = r["decode_step_s"]
    t_dec = w.output_len * step[1]
    rows = [f"| decode step, batch {b} | {s * 1e3:.1f} ms | {s / step[1]:.2f}x batch 1 | {b / s:.0f} tok/s |"
            for b, s in step.items()]
    rows += [f"| prefill {n} tokens | {s * 1e3:.0f} ms | {n / s:.0f} tok/s | "
             f"prefill:decode({w.output_len}) = 1:{t_dec / s:.1f} |" for n, s in r["prefill_s"].items()]
    body = (f"# The CPU miniature preset, measured\n\n- command: `{command_line()}`\n- {started}; finished {now()}\n"
            f"- preset `{pre.name}`: {pre.doc}\n- model: {r['params'] / 1e6:.1f}M parameters, "
            f"{r['weight_bytes'] / 2**20:.0f} MiB of weights ({dtype}); engine flags `{' '.join(pre.engine_args)}`\n"
            f"- one engine, core {a.core}, one torch thread; decode contexts of {w.input_len} tokens; medians of "
            f"{a.repeats} prefills and of 20 decode steps; sampling temperature 0.6, top_p 0.9\n"
            f"- the paper's setting: {PAPER}\n\n"
            "| what | time | | |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not a.no_write:
        os.makedirs(DOCS, exist_ok=True)
        (DOCS / "preset.md").write_text(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
