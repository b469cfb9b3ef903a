"""The served engine's step trace (--step-trace) and what the simulator makes of it: a cost model
fitted from traced steps, with the slowdown of a step while the host's other engines work."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request

import pytest

from microserve.engine.sampling import SamplingParams
from microserve.engine.step_trace import StepShape, TracedStep, read_trace
from microserve.sim import vloop
from microserve.sim.calibrate import fit, neighbour_overlap, refit, trace_groups, trace_speed
from microserve.sim.cluster import ClusterSpec, SimCluster
from microserve.sim.cost import LinearCostModel
from microserve.sim.presets import MODELS

TRUE = {"const": 0.004, "prefill_tokens": 8e-4, "prefill_attn": 1e-8, "prefill_seqs": 0.0, "decode_batch": 1.5e-3,
        "decode_context": 2e-6, "sampled": 0.0}
TRUE_INTERFERENCE = {"decode": 0.12, "prefill": 0.05}


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_a_served_engine_traces_every_step_with_its_exact_shape(engines, tmp_path):
    trace = tmp_path / "trace-{port}.jsonl"
    e = engines.start("--step-trace", str(trace), "--served-model-name", "m")
    prompt = list(range(5, 25))  # 20 token ids
    out = post(e.url, {"model": "m", "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "temperature": 0})
    assert out["usage"]["completion_tokens"] == 5
    engines.stop_all()  # the trace is line-buffered; stopping also closes it
    path = tmp_path / f"trace-{e.url.rsplit(':', 1)[1]}.jsonl"  # '{port}' became the engine's port
    steps = read_trace(str(path))
    # one prefill step samples the first token, then four decodes over a growing context
    assert [s.shape for s in steps] == [StepShape.of(20)] + [StepShape(decode_batch=1, decode_context=20 + k,
                                                                      sampled=1) for k in range(1, 5)]
    assert all(0 < s.step_s <= s.period_s < 10 for s in steps)
    assert all(a.start < b.start for a, b in zip(steps, steps[1:]))


def test_an_unwritable_trace_path_stops_the_engine_with_the_reason(engines, tmp_path):
    from microserve.launch import StartupError
    with pytest.raises(StartupError) as e:
        engines.start("--step-trace", str(tmp_path / "no-such-folder" / "trace.jsonl"))
    assert "--step-trace: cannot write" in str(e.value) and "No such file or directory" in str(e.value)


# ---- fitting traced steps ------------------------------------------------------------------------
def step(start: float, seconds: float, shape: StepShape = StepShape(decode_batch=1, decode_context=100, sampled=1)):
    return TracedStep(shape, start, seconds * 0.97, seconds)


def test_neighbour_overlap_is_the_busy_share_of_each_step():
    a = [step(0.0, 1.0), step(1.0, 1.0), step(2.0, 1.0)]
    b = [step(0.5, 1.0), step(1.5, 0.25, StepShape.of(64))]  # a decode over a's first half-second, then a prefill
    shares = neighbour_overlap([a, b])
    assert shares[0] == [(0.5, 0.0), (0.5, 0.25), (0.0, 0.0)]
    assert shares[1] == [(1.0, 0.0), (1.0, 0.0)]  # a decoded all through both of b's steps
    assert neighbour_overlap([a]) == [[(0.0, 0.0)] * 3]  # alone on its host: never slowed


def synthetic_points(n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    model = LinearCostModel(TRUE, 8, interference=TRUE_INTERFERENCE)
    points, overlap = [], []
    for _ in range(n):
        if rng.random() < 0.3:
            shape = StepShape.of(rng.randint(16, 900), rng.choice([0, 0, 2]), 500, rng.choice([0, 0, 128]))
        else:
            b = rng.randint(1, 16)
            shape = StepShape(decode_batch=b, decode_context=b * rng.randint(50, 900), sampled=b)
        o = rng.choice([(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.25)])
        points.append((shape, model.cost(shape) * model.slowdown(*o)))
        overlap.append(o)
    return points, overlap


def test_the_fit_recovers_the_cost_and_the_interference_it_was_made_from():
    points, overlap = synthetic_points()
    m = fit(points, 8, overlap)
    assert m.interference == pytest.approx(TRUE_INTERFERENCE, abs=1e-3)
    for k, v in TRUE.items():
        assert m.coef[k] == pytest.approx(v, rel=1e-2, abs=1e-9), k
    assert m.meta["fit"]["median_rel_err"] < 1e-3
    # without the busy shares the same steps fit worse and the model has no interference
    plain = fit(points, 8)
    assert plain.interference == {} and plain.meta["fit"]["median_rel_err"] > 0.01


def test_trace_groups_are_runs():
    files = ["/t/dp_0.4qps_r0-8001.jsonl", "/t/dp_0.4qps_r0-8002.jsonl", "/t/pd_0.4qps_r0-8001.jsonl", "/t/prod.jsonl",
             "/u/prod.jsonl"]
    assert trace_groups(files) == {"dp_0.4qps_r0": files[:2], "pd_0.4qps_r0": [files[2]], "/t/prod": [files[3]],
                                   "/u/prod": [files[4]]}  # a name in two folders keeps its folder


def write_trace(path, steps) -> None:
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"t": s.start, "step_s": s.step_s, "period_s": s.period_s,
                                **{k: getattr(s.shape, k) for k in s.shape.__dataclass_fields__}}) + "\n")


def test_calibrate_from_traces_cli_fits_what_the_engines_traced(tmp_path):
    """Two engines of one run, stepping back to back, each slowed while the other decodes: the CLI
    finds the model they were made from, and `refit` gets it back from the JSON's points."""
    model = LinearCostModel(TRUE, 8, interference=TRUE_INTERFERENCE)
    rng = random.Random(1)
    traces = []
    for e in range(2):
        t, steps = 1000.0 + 0.3 * e, []
        for k in range(300):
            if rng.random() < 0.1:
                shape = StepShape.of(rng.randint(16, 900))
            else:
                b = rng.randint(1, 12)
                shape = StepShape(decode_batch=b, decode_context=b * rng.randint(50, 900), sampled=b)
            steps.append(TracedStep(shape, t, 0.0, model.cost(shape)))
            t += model.cost(shape) + (rng.random() < 0.3) * 0.05  # idle gaps: some steps run alone
        traces.append(steps)
    # the recorded seconds are the slowed ones, from the overlap the steps actually had
    shares = neighbour_overlap(traces)
    for e, steps in enumerate(traces):
        steps[:] = [TracedStep(s.shape, s.start, 0.0, model.cost(s.shape) * model.slowdown(*o))
                    for s, o in zip(steps, shares[e])]
        write_trace(tmp_path / f"run_r0-{8001 + e}.jsonl", steps)
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, "-m", "microserve.cli", "sim", "calibrate", "--from-traces", str(tmp_path),
                        "--no-link", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "from step traces" in r.stdout and "busy neighbours" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["source"] == "traces" and doc["traces"]["files"] == 2 and doc["fit"]["points"] == 600
    m = LinearCostModel.from_json(doc)
    # the shares are recomputed from the slowed steps' own spans, so the fit is close, not exact
    assert m.interference["decode"] == pytest.approx(TRUE_INTERFERENCE["decode"], abs=0.03)
    assert m.step_time(0, 4, 500) == pytest.approx(model.step_time(0, 4, 500), rel=0.03)
    assert m.step_time(640) == pytest.approx(model.step_time(640), rel=0.03)
    again = refit(doc)
    assert again.coef == pytest.approx(m.coef) and again.interference == pytest.approx(m.interference)
    bad = subprocess.run([sys.executable, "-m", "microserve.cli", "sim", "calibrate", "--from-traces",
                          str(tmp_path / "nothing-here")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot fit from" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "microserve.cli", "sim", "calibrate", "--served", "--preset",
                              "nope"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "unknown preset 'nope'; known: " in unknown.stderr


def test_trace_speed_says_how_much_slower_each_run_stepped_than_the_model(tmp_path):
    model = LinearCostModel(TRUE, 8, interference=TRUE_INTERFERENCE)
    shape = StepShape(decode_batch=2, decode_context=1200, sampled=2)
    for run, factor in (("fast", 1.0), ("slow", 1.1)):
        t = 0.0
        steps = []
        for _ in range(20):  # one engine per run: no neighbours, so no slowdown
            steps.append(TracedStep(shape, t, 0.0, model.cost(shape) * factor))
            t += 1.0
        write_trace(tmp_path / f"{run}-8001.jsonl", steps)
    speed = trace_speed(sorted(str(p) for p in tmp_path.glob("*.jsonl")), model)
    assert speed["fast"] == (pytest.approx(1.0), 20) and speed["slow"] == (pytest.approx(1.1), 20)


# ---- the simulator applies it ----------------------------------------------------------------------
def test_a_simulated_step_slows_while_its_neighbours_work():
    cost = LinearCostModel(TRUE, 8, interference={"decode": 0.5, "prefill": 0.25})

    async def main():
        c = SimCluster(ClusterSpec(MODELS["llama-3.1-8b"], cost, engines=2), "dp")
        apart = SimCluster(ClusterSpec(MODELS["llama-3.1-8b"], cost, engines=2, gpus_per_node=1), "dp")
        e0, e1 = c.engines
        e0.add_request("a", list(range(3, 67)), SamplingParams(max_tokens=4, ignore_eos=True))
        factors = []
        for neighbour in ("decode", "prefill", None):
            e1.stepping = neighbour
            e0.step()
            factors.append(e0.last_step_s / cost.cost(e0.runner.shape))
        return factors, e0.neighbours == [e1], apart.engines[0].neighbours

    factors, together, apart = vloop.run(main())
    assert together and apart == []  # one engine per node: nobody shares its cores
    assert factors == pytest.approx([1.5, 1.25, 1.0])


def test_served_calibration_fits_both_engines_traces(tmp_path, monkeypatch):
    """`sim calibrate --served` end to end on stories260K: two real engines with --step-trace, the
    grid on one and pulses on the other through the HTTP client, a fit over both traces."""
    from conftest import STORIES
    from microserve.bench.presets import PRESETS, Preset, Workload
    from microserve.sim.calibrate import calibrate_served, summary

    monkeypatch.setitem(PRESETS, "stories-calibration", Preset(
        "stories-calibration", STORIES, engines=2, pin_cores=False, engine_args=("--max-model-len", "512"),
        workloads={"long": Workload("random", input_len=64, output_len=8)}))
    phases = (("one at a time", Workload("random", input_len=64, output_len=6, range_ratio=0.5), 3, 1),
              ("batches", Workload("random", input_len=64, output_len=8, range_ratio=0.5), 6, 3))
    said = []
    doc = calibrate_served("stories-calibration", phases, link=False, trace_dir=str(tmp_path), progress=said.append,
                           pulses=((2, 48, 6),), pulse_gap_s=0.05)
    traces = sorted(tmp_path.glob("step-trace-*.jsonl"))
    steps = [read_trace(str(p)) for p in traces]
    assert len(traces) == 2 and all(steps), "both engines traced"
    # the grid's engine computed every prompt token of its phases (64 +- 50%), nothing of the warm-up
    grid = max(steps, key=lambda tr: max(s.shape.decode_batch for s in tr))
    assert 9 * 32 <= sum(s.shape.prefill_tokens for s in grid) <= 9 * 96
    assert doc["source"] == "served" and doc["fit"]["points"] == sum(map(len, steps))
    m = LinearCostModel.from_json(json.loads(json.dumps(doc)))
    assert set(m.interference) == {"decode", "prefill"} and m.step_time(64) > 0
    assert said == ["one at a time (concurrency 1), the other engine pulsing",
                    "batches (concurrency 3), the other engine pulsing"]
    assert "steps as served" in summary(doc)
