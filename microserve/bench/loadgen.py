"""Load generator for any OpenAI-compatible server (microserve's engine or router, vLLM, SGLang).

Every request is streamed (SSE) with `stream_options.include_usage`, so token counts come from the
server's own `usage`; TTFT, ITL and E2E latency are taken on the client. Arrivals follow a Poisson
process at `request_rate` (gamma-distributed gaps when burstiness != 1, as in vLLM), optionally
capped by `max_concurrency`. A failed request is recorded, never raised.

aiohttp, not httpx: httpx's AsyncClient collapses under concurrency (see notes/dependencies.md),
which would make the client, not the server, the bottleneck.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Sequence

import aiohttp
import numpy as np

from microserve.bench.datasets import SampleRequest
from microserve.bench.metrics import RequestRecord, compute_metrics

CHAT_ENDPOINT = "/v1/chat/completions"


@dataclass
class LoadConfig:
    """How to send a workload.

    model: None asks GET /v1/models and uses its first entry. request_rate: requests per second
    (math.inf sends all at once). burstiness: gamma shape of inter-arrival gaps (1 = Poisson,
    < 1 burstier, > 1 more regular). num_warmups: requests sent (from the workload, cycled) and
    discarded before measuring. extra_body: merged into every request body (e.g.
    {"return_token_ids": True} for exact streamed-token counting on microserve and vLLM).
    """
    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    num_warmups: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 6 * 3600.0
    show_progress: bool = True

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")


@dataclass
class LoadResult:
    """records: one per workload request, in workload order. duration: seconds from the first
    arrival to the last completion. started_at: wall-clock time (epoch s) of the start."""
    records: list[RequestRecord]
    duration: float
    model: str
    started_at: float


# ---- arrivals -----------------------------------------------------------------------------------
def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Planned send offsets (s) of n requests: the first at 0, then gaps drawn from a gamma
    distribution with shape `burstiness` and mean 1/request_rate (exponential, i.e. Poisson
    arrivals, at burstiness 1). All zeros when the rate is infinite."""
    if n <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


# ---- one request --------------------------------------------------------------------------------
def build_payload(req: SampleRequest, model: str, cfg: LoadConfig) -> dict[str, Any]:
    """The JSON body of one streamed request (completions, or chat with the prompt as one user turn)."""
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature}
    if cfg.chat:
        if not isinstance(req.prompt, str):
            raise ValueError("chat requests take text prompts; decode token ids first (datasets.prompts_as_text)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_len
    body.update(sampling_fields(cfg))
    body.update(cfg.extra_body)
    return body


def sampling_fields(cfg: LoadConfig) -> dict[str, Any]:
    """The optional sampling fields a run sets on every request (beyond temperature and max_tokens)."""
    return {k: v for k, v in (("ignore_eos", cfg.ignore_eos or None), ("top_p", cfg.top_p), ("top_k", cfg.top_k))
            if v is not None}


def _chunk_output(choice: dict, chat: bool) -> tuple[str, list[int] | None]:
    if chat:
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    else:
        text = choice.get("text") or ""
    ids = choice.get("token_ids")
    return text, ids if isinstance(ids, list) else None


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict[str, Any], req: SampleRequest,
                       index: int = 0, t0: float = 0.0, headers: dict[str, str] | None = None) -> RequestRecord:
    """Send one streamed request and time it (`time.perf_counter` clock; `start` is relative to t0).

    A chunk "carries output" when it has text or token ids (or, for a first chunk, a finish
    reason: a reply that is only EOS still had a first token). Never raises on request failure:
    the record says success=False and why.
    """
    chat = "messages" in payload
    rec = RequestRecord(index=index, prompt_len=req.prompt_len)
    st = time.perf_counter()
    rec.start = st - t0
    last = st
    first_seen = False
    text_parts: list[str] = []
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = await resp.text()
                rec.error = f"HTTP {resp.status}: {body[:500]}"
                rec.e2el = time.perf_counter() - st
                return rec
            buf = b""
            done_at: float | None = None
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                if done_at is not None:
                    continue  # drain to EOF so the connection can be reused
                buf += data
                *lines, buf = buf.split(b"\n")  # an event may span reads: keep the tail
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, event:/id: fields
                    msg = line[5:].strip()
                    if msg == b"[DONE]":
                        done_at = now
                        break
                    obj = json.loads(msg)
                    if not isinstance(obj, dict):
                        continue
                    if obj.get("error"):
                        err = obj["error"]
                        raise RuntimeError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                    for choice in obj.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        text, ids = _chunk_output(choice, chat)
                        fr = choice.get("finish_reason")
                        if fr:
                            rec.finish_reason = fr
                        if text or ids or (fr and not first_seen):
                            if not first_seen:
                                rec.ttft = now - st
                                first_seen = True
                            else:
                                rec.itl.append(now - last)
                            last = now
                            rec.counted_output_tokens += len(ids) if ids is not None else (1 if text else 0)
                            text_parts.append(text)
                    usage = obj.get("usage")
                    if usage:
                        rec.usage_reported = True
                        rec.prompt_len = int(usage.get("prompt_tokens", rec.prompt_len))
                        rec.output_len = int(usage.get("completion_tokens", 0))
                        details = usage.get("prompt_tokens_details") or {}
                        rec.cached_tokens = int(details.get("cached_tokens") or 0)
        done = done_at is not None
        rec.e2el = (done_at if done else time.perf_counter()) - st
        rec.generated_text = "".join(text_parts)
        if not rec.usage_reported:
            rec.output_len = rec.counted_output_tokens
        if rec.finish_reason == "error":
            rec.error = "the server ended the stream with finish_reason 'error'"
        elif not first_seen:
            rec.error = "the stream carried no output"
        elif not done:
            rec.error = "the stream ended without [DONE]"
        else:
            rec.success = True
    except Exception as e:  # a failed request is data, not a crash (aiohttp, timeouts, bad JSON, server errors)
        rec.e2el = time.perf_counter() - st
        rec.generated_text = "".join(text_parts)
        rec.error = f"{type(e).__name__}: {e}"[:1000]
    return rec


async def get_model_info(session: aiohttp.ClientSession, base_url: str,
                         headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The first entry of GET /v1/models (keys: id, and on microserve/vLLM root and max_model_len)."""
    async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as r:
        r.raise_for_status()
        data = (await r.json()).get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return data[0]


def model_info(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Synchronous `get_model_info`."""
    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            return await get_model_info(s, base_url, _headers(api_key))
    return asyncio.run(go())


def _headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


# ---- a whole run --------------------------------------------------------------------------------
def concurrency_limit(most: int | None):
    """`limited(coro)` awaits coro with at most `most` of them running at once (None: no limit)."""
    sem = asyncio.Semaphore(most) if most else None

    async def limited(coro):
        if sem is None:
            return await coro
        async with sem:
            return await coro
    return limited


async def run_load(requests: Sequence[SampleRequest], cfg: LoadConfig) -> LoadResult:
    """Send `requests` as `cfg` says and measure each. Returns one record per request, in order."""
    from tqdm.auto import tqdm

    headers = _headers(cfg.api_key)
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    # limit=0: the connector must not cap concurrency behind our back (its default is 100).
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
                                     read_bufsize=1 << 20) as session:
        model = cfg.model or (await get_model_info(session, cfg.base_url, headers))["id"]
        payloads = [build_payload(r, model, cfg) for r in requests]  # bad inputs fail before any load
        limited = concurrency_limit(cfg.max_concurrency)

        if cfg.num_warmups > 0 and requests:
            warm = [send_request(session, url, payloads[i % len(payloads)], requests[i % len(requests)],
                                 headers=headers) for i in range(cfg.num_warmups)]
            warm_recs = await asyncio.gather(*(limited(c) for c in warm))
            if not any(r.success for r in warm_recs):
                raise RuntimeError(f"every warm-up request failed; the first: {warm_recs[0].error}")

        offsets = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        bar = tqdm(total=len(requests), disable=not cfg.show_progress, desc="requests")
        started_at = time.time()
        t0 = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            # Absolute schedule: sleeping until t0 + offset does not drift as gaps accumulate.
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = await limited(send_request(session, url, payloads[i], requests[i], i, t0, headers))
            rec.scheduled = offsets[i]
            bar.update(1)
            return rec

        records = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - t0
        bar.close()
    return LoadResult(list(records), duration, model, started_at)


def run(requests: Sequence[SampleRequest], cfg: LoadConfig) -> LoadResult:
    """Synchronous `run_load` (starts its own event loop)."""
    return asyncio.run(run_load(requests, cfg))


def build_result(load: LoadResult, cfg: LoadConfig, percentiles: Sequence[float] = (99.0,),
                 detailed: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result JSON (vLLM's keys): run settings, `compute_metrics`' aggregates and, when
    `detailed`, per-request lists (input_lens, output_lens, cached_tokens, ttfts, itls, e2els,
    start_times, generated_texts, errors; times in seconds). `extra` is merged in (dataset settings)."""
    res: dict[str, Any] = {
        "date": datetime.fromtimestamp(load.started_at).strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if cfg.chat else "openai",
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model_id": load.model,
        "num_prompts": len(load.records),
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "ignore_eos": cfg.ignore_eos,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "percentiles": list(percentiles),
    }
    res.update(extra or {})
    res.update(compute_metrics(load.records, load.duration, percentiles))
    if detailed:
        recs = load.records
        res.update({"input_lens": [r.prompt_len for r in recs], "output_lens": [r.output_len for r in recs],
                    "cached_tokens": [r.cached_tokens for r in recs], "ttfts": [r.ttft for r in recs],
                    "itls": [r.itl for r in recs], "e2els": [r.e2el for r in recs],
                    "start_times": [r.start for r in recs], "successes": [r.success for r in recs],
                    "generated_texts": [r.generated_text for r in recs], "errors": [r.error for r in recs]})
    return res


def benchmark(requests: Sequence[SampleRequest], cfg: LoadConfig, percentiles: Sequence[float] = (99.0,),
              detailed: bool = True, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], LoadResult]:
    """Run the load and build its result dict: the one call a sweep driver needs."""
    load = run(requests, cfg)
    return build_result(load, cfg, percentiles, detailed, extra), load


def record_dicts(load: LoadResult) -> list[dict[str, Any]]:
    return [asdict(r) for r in load.records]
