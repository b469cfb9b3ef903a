"""`microserve` command line: engine | router | up | demo | bench."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from microserve.cluster import TOKEN_ENV, resolve_token
from microserve.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="embedded",
                   help="a local Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a hub id "
                        "(downloaded when the network allows), or 'embedded' for the built-in tiny Llama with "
                        "dummy weights (default: %(default)s)")
    g.add_argument("--served-model-name", default=None, help="name clients use in 'model' (default: --model)")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="where weights come from: the checkpoint's safetensors, or deterministic random weights "
                        "of the same shapes (like vLLM's --load-format dummy) (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for dummy weights and unseeded sampling (default: %(default)s)")
    g = p.add_argument_group("KV cache and scheduling")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: %(default)s)")
    g.add_argument("--kv-cache-memory-mb", type=int, default=256,
                   help="memory for the paged KV pool on CPU, in MiB (default: %(default)s)")
    g.add_argument("--num-pages", type=int, default=None,
                   help="KV pages in the pool; overrides --kv-cache-memory-mb and --gpu-memory-utilization")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on CUDA: share of GPU memory for weights, activations and KV; KV gets what a measured "
                        "warm-up leaves (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step: decodes plus prefill chunks (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="most requests running at once (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn off the radix prefix cache")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch", "triton"],
                   help="cpu: C++ paged decode and prefill kernels compiled on first use; torch: torch SDPA "
                        "only; triton: Triton kernels (CUDA default). auto on CPU: each kernel where it "
                        "measures at least as fast as torch on this machine (timed once, cached with the "
                        "kernel build, logged at start-up) (default: %(default)s)")
    g.add_argument("--linear-backend", default="auto", choices=["auto", "kernel", "torch"],
                   help="CPU fp32 linear layers: kernel: oneDNN brgemm on blocked weights plus the fused "
                        "layer ops; torch: oneDNN matmul / F.linear; auto: the kernel route where it "
                        "measures at least as fast here (default: %(default)s)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured at start-up "
                        "(one per batch size 1, 2, 4, 8, 16, 24, ... up to --max-num-seqs, capped at 512; with "
                        "the triton attention backend only). Starts faster and uses a little less memory; "
                        "small-batch decode is slower. CPU never uses graphs")
    g.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: the cores this process may use, minus one for the HTTP event loop)")
    g.add_argument("--cpu-affinity", default=None, help="pin the engine to these CPU cores, e.g. '0' or '2,3'")
    g.add_argument("--step-trace", default=None, metavar="FILE",
                   help="append a JSON line per engine step to FILE: the batch's shape (prefill tokens, decode rows, "
                        "contexts), the step's seconds and how long the engine was busy with it; '{port}' in FILE "
                        "becomes the engine's port, so `up` can pass one flag to every engine. About 250 bytes a "
                        "step, never rotated. `microserve sim calibrate --from-traces` fits the simulator's cost "
                        "model from these files")
    g = p.add_argument_group("microserving")
    g.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "nixl", "cuda_ipc", "none"],
                   help="how KV reaches other engines: shm (shared host memory, one host), cuda_ipc (GPU memory "
                        "by CUDA IPC handle, one host), nixl (UCX, across hosts); auto = shm on CPU, cuda_ipc on "
                        "CUDA (default: %(default)s)")
    g.add_argument("--recv-lease-s", type=float, default=60.0,
                   help="seconds a prep_recv reservation is kept without start_generate, commit or abort "
                        "(default: %(default)s)")
    g.add_argument("--transfer-timeout-s", type=float, default=30.0,
                   help="remote_send fails if its KV has not landed after this many seconds (default: %(default)s)")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model, served_model_name=a.served_model_name, load_format=a.load_format, dtype=a.dtype,
        device=a.device, seed=a.seed, page_size=a.page_size, num_pages=a.num_pages,
        kv_cache_memory_mb=a.kv_cache_memory_mb, gpu_memory_utilization=a.gpu_memory_utilization,
        max_model_len=a.max_model_len,
        max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        enable_prefix_caching=not a.no_prefix_caching, attention_backend=a.attention_backend,
        linear_backend=a.linear_backend,
        enforce_eager=a.enforce_eager,
        kv_transport=a.kv_transport, recv_lease_s=a.recv_lease_s, transfer_timeout_s=a.transfer_timeout_s,
        num_threads=a.num_threads,
        cpu_affinity=[int(c) for c in a.cpu_affinity.split(",")] if a.cpu_affinity else None,
        step_trace=a.step_trace)


def cmd_engine(a: argparse.Namespace) -> int:
    from microserve.server.app import serve
    asyncio.run(serve(engine_config(a), a.host, a.port, a.debug_api, resolve_token(a.cluster_token),
                      a.api_key or os.environ.get("MICROSERVE_API_KEY"), a.insecure))
    return 0


def cmd_router(a: argparse.Namespace) -> int:
    from microserve.router.serve import run_router, share_cluster_token
    if resolve_token(a.cluster_token):
        share_cluster_token(a.cluster_token)
    engines = [(u, "both") for u in a.engine] + [(u, "prefill") for u in a.prefill] + [(u, "decode") for u in a.decode]
    if not engines:
        raise SystemExit("give at least one --engine, --prefill or --decode URL")
    asyncio.run(run_router(engines, a.strategy, a.model, a.served_model_name, a.host, a.port,
                           a.admin_token or os.environ.get("MICROSERVE_ADMIN_TOKEN"), a.timeout_s))
    return 0


def cmd_up(a: argparse.Namespace, extra: list[str]) -> int:
    from microserve.router.serve import up
    return up(a, extra)


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="least_loaded",
                   help="routing strategy: round_robin, least_loaded (alias dp), cache_aware, pd, balanced_pd, "
                        "cache_aware_pd, migration, adaptive, or package.module:Class; parameters after a colon, "
                        "e.g. pd:balance=0.2 (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="router port (default: %(default)s)")
    p.add_argument("--admin-token", default=None,
                   help="bearer token for /admin/* (default: $MICROSERVE_ADMIN_TOKEN; `up` makes one if unset)")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="an engine that sends nothing for this long is taken as failed (default: %(default)s)")
    add_cluster_token_arg(p)


def add_cluster_token_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-token", default=None,
                   help=f"shared secret of this deployment's engines and router: the microserving calls need it "
                        f"as 'Authorization: Bearer <token>', and KV metadata is signed with it (default: "
                        f"${TOKEN_ENV}; `up` and `demo` make one)")


def cmd_demo(a: argparse.Namespace) -> int:
    from microserve.demo import run_demo
    return run_demo(a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="microserve", description=__doc__.splitlines()[0] + "\n\n"
                                     "LLM microserving: engines with prep_recv / remote_send / start_generate, "
                                     "and a programmable router.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("engine", help="serve one engine: OpenAI API + microserving API",
                       description="Serve one engine over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health, /metrics and /microserving/{prep_recv,remote_send,start_generate,"
                                   "commit,abort,match}.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    p.add_argument("--debug-api", action="store_true", help="expose /debug/kv (KV page accounting) for tests")
    add_cluster_token_arg(p)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer <key>' on the OpenAI API, as vLLM's --api-key (default: "
                        "$MICROSERVE_API_KEY, else open)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without a cluster token (anyone who reaches the "
                        "engine could then move KV)")
    p.set_defaults(fn=cmd_engine)

    p = sub.add_parser("router", help="the programmable router in front of running engines",
                       description="Route OpenAI requests over engines started elsewhere (e.g. one `microserve "
                                   "engine` per host) with a strategy; /admin/* reconfigures it at run time.")
    p.add_argument("--engine", action="append", default=[], metavar="URL", help="an engine that prefills and decodes")
    p.add_argument("--prefill", action="append", default=[], metavar="URL", help="a prefill engine")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode engine")
    p.add_argument("--model", default=None, help="model directory (or 'embedded') whose tokenizer the router uses")
    add_router_args(p)
    p.set_defaults(fn=cmd_router)

    p = sub.add_parser("up", help="start N engines (here, or on a Ray cluster) and a router; Ctrl-C stops everything",
                       description="Start N engine processes (on this host, or with --ray as Ray actors across a "
                                   "Ray cluster) and the router here, wait until all are "
                                   "healthy, print the URLs, serve until Ctrl-C or SIGTERM, then stop every "
                                   "process. Flags not listed here (e.g. --page-size, --kv-transport) are "
                                   "passed to every engine: see `microserve engine --help`.")
    p.add_argument("--model", default="embedded", help="model for every engine (default: %(default)s)")
    p.add_argument("--engines", type=int, default=2, help="engine processes to start (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=None,
                   help="how many of them are prefill engines, the rest decode (default: 1 for pd strategies, "
                        "else 0: every engine does both)")
    p.add_argument("--pin-cores", action="store_true",
                   help="pin engine i to CPU core i with one torch thread (the CPU miniature)")
    p.add_argument("--log-dir", default="microserve-logs", help="engine logs go here (default: %(default)s)")
    g = p.add_argument_group("Ray (engines as Ray actors across a Ray cluster; pip install 'microserve[ray]')")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="start the engines as Ray actors: on the cluster at ADDRESS ('auto': the one running on "
                        "this machine, 'ray://head:10001', or host:6379), or without ADDRESS on $RAY_ADDRESS or a "
                        "new local Ray. The router runs here and finds the engines through Ray")
    g.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs each engine's actor reserves (default: %(default)s)")
    g.add_argument("--ray-num-gpus", type=float, default=None,
                   help="GPUs each engine's actor reserves (default: 1 where the cluster has GPUs, else 0)")
    g.add_argument("--ray-place-by-role", action="store_true",
                   help="an engine of role R needs one unit of the custom resource R: start nodes with e.g. "
                        "`ray start --resources '{\"prefill\": 1}'` to choose where prefill and decode engines run")
    p.add_argument("--startup-timeout-s", type=float, default=120.0,
                   help="fail an engine that is not healthy and has logged nothing for this long; a first start "
                        "that builds the CPU kernels logs a heartbeat, so it waits as long as the build runs "
                        "(default: %(default)s)")
    add_router_args(p)
    p.set_defaults(fn=cmd_up, passthrough=True)

    p = sub.add_parser("demo", help="bring up engines on the embedded model, send real requests, print, shut down",
                       description="The README's first command: engines and a router on one host, a few real "
                                   "requests through them, outputs and timings printed, everything stopped.")
    p.add_argument("--model", default="embedded", help="model to serve (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request (default: %(default)s)")
    p.set_defaults(fn=cmd_demo)
    from microserve.bench.cli import register as register_bench
    register_bench(sub)
    from microserve.sim.cli import register as register_sim
    register_sim(sub)  # `microserve sim`: the router's strategies over simulated engines (docs/sim.md)

    a, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(a, "passthrough", False):
        return a.fn(a, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
