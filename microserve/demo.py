"""The README's first command: two engine processes on the embedded model, PD disaggregation
through the router, real requests, outputs and per-request timings, then everything stopped."""
from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp

from microserve.launch import LocalLauncher, StartupError, engine_specs, free_port
from microserve.router.serve import share_cluster_token, start_router
from microserve.router.strategies import engine_roles

PROMPTS = ["Once upon a time", "The router asked each engine how much of the prompt it had cached",
           "Hello world! How are you today?"]


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, text, usage = None, "", {}
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"router answered {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                ttft = ttft or time.perf_counter() - t0
                text += chunk["choices"][0]["text"]
            usage = chunk.get("usage") or usage
    return {"prompt": prompt, "text": text, "ttft": ttft, "e2e": time.perf_counter() - t0, "usage": usage}


async def _demo(engines, strategy: str, model: str, max_tokens: int) -> None:
    port = free_port()
    runner = await start_router(engines, strategy, model, model, "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    print(f"router  {url}  strategy={strategy}\n")
    try:
        async with aiohttp.ClientSession() as s:
            await asyncio.sleep(0.2)
            results = await asyncio.gather(*(_one(s, url, p, max_tokens) for p in PROMPTS))
        for r in results:
            u = r["usage"]
            print(f"prompt : {r['prompt']!r}\noutput : {r['text']!r}\n"
                  f"timing : TTFT {r['ttft'] * 1e3:.1f} ms, total {r['e2e'] * 1e3:.1f} ms, "
                  f"{u.get('prompt_tokens')} prompt + {u.get('completion_tokens')} generated tokens\n")
    finally:
        await runner.cleanup()


def run_demo(a) -> int:
    t0 = time.perf_counter()
    strategy = "pd"
    share_cluster_token()
    with LocalLauncher() as launcher:
        try:
            engines = launcher.start(engine_specs(a.model, engine_roles(2, strategy, None)))
        except StartupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for e in engines:
            print(f"engine  {e.url}  role={e.role}")
        print(f"2 engines up in {time.perf_counter() - t0:.1f}s (model {a.model})")
        asyncio.run(_demo([(e.url, e.role) for e in engines], strategy, a.model, a.max_tokens))
    print("stopped: engines and router are down.")
    return 0
