"""What one engine step computed (`StepShape`), and the served engine's step trace (`--step-trace`).

A served engine with `--step-trace FILE` appends one JSON line per step:

    {"t": 1733580000.12, "step_s": 0.0203, "period_s": 0.0209, "prefill_tokens": 0, ..., "sampled": 1}

- `t`: when the step was handed to the step thread (wall clock, so traces of engines on one host
  line up);
- `step_s`: `Engine.step()` itself (scheduler, model, sampler, KV flush), on the step thread;
- `period_s`: from handing the step to that thread until the event loop could hand over the next
  one (the step, the thread hand-offs, and delivering its tokens to the streams): how long the
  engine was busy, which is what a simulated step must last;
- the `StepShape` fields, taken from the scheduled batch before it ran.

Both run while the HTTP server streams tokens on the same pinned core, and while the router and
the client run wherever the OS puts them: the trace measures a step as the served engine pays for
it. `microserve sim calibrate --served` fits the measured cost model from these lines.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import IO


@dataclass(frozen=True)
class StepShape:
    """One engine step, as the scheduler formed it (see SimRunner.run).

    prefill_tokens / prefill_seqs: tokens and rows of the multi-token rows (prefill chunks);
    prefill_attn: their query-key pairs, sum over rows of n * start + n (n + 1) / 2 (start = KV
    already there: cached prefix, received KV or earlier chunks); prefill_context: sum of those
    starts. decode_batch: rows computing one token; decode_context: the sum of their context
    lengths (KV read). sampled: rows whose logits are sampled."""
    prefill_tokens: int = 0
    prefill_seqs: int = 0
    prefill_attn: int = 0
    prefill_context: int = 0
    decode_batch: int = 0
    decode_context: int = 0
    sampled: int = 0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_batch

    @classmethod
    def of(cls, prefill_tokens: int = 0, decode_batch: int = 0, context_tokens: int = 0,
           prefill_start: int = 0) -> "StepShape":
        """A step with one prefill chunk of `prefill_tokens` (after `prefill_start` tokens of KV)
        and `decode_batch` decodes of mean context `context_tokens`."""
        p, s = prefill_tokens, prefill_start
        return cls(prefill_tokens=p, prefill_seqs=int(p > 0), prefill_attn=p * s + p * (p + 1) // 2,
                   prefill_context=s if p else 0, decode_batch=decode_batch,
                   decode_context=decode_batch * context_tokens, sampled=decode_batch + int(p > 0))


def batch_shape(batch) -> StepShape:
    """The StepShape of a scheduled batch (engine.scheduler.ScheduledBatch), before it runs: what
    the simulator prices and what calibration and the step trace record."""
    pt = ps = pa = pc = db = dc = sampled = 0
    for req, n in zip(batch.requests, batch.num_tokens):
        start = req.num_computed
        stop = start + n
        if n == 1:
            db, dc = db + 1, dc + stop
        else:
            pt, ps, pa, pc = pt + n, ps + 1, pa + n * start + n * (n + 1) // 2, pc + start
        sampled += stop == len(req.token_ids) and not req.send_only
    return StepShape(pt, ps, pa, pc, db, dc, sampled)


class StepTrace:
    """The `--step-trace` file of one served engine: a line per step that computed something."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: IO[str] | None = open(path, "a", buffering=1)  # line-buffered: a killed engine keeps its lines

    def record(self, shape: StepShape | None, start: float, step_s: float, period_s: float) -> None:
        """One step: `start` its wall-clock time (time.time(), comparable across engines)."""
        if self._f is None or shape is None or not shape.tokens:
            return
        self._f.write(json.dumps({"t": round(start, 6), "step_s": round(step_s, 7),
                                  "period_s": round(period_s, 7), **dataclasses.asdict(shape)}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


@dataclass(frozen=True)
class TracedStep:
    """One line of a step trace."""
    shape: StepShape
    start: float
    step_s: float
    period_s: float

    @property
    def end(self) -> float:
        return self.start + self.period_s


def read_trace(path: str) -> list[TracedStep]:
    """The steps of a `--step-trace` file, in order."""
    names = [f.name for f in dataclasses.fields(StepShape)]
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(TracedStep(StepShape(*(int(d[n]) for n in names)), float(d["t"]), float(d["step_s"]),
                                      float(d["period_s"])))
    return out
