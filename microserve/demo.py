"""The README's first command: real engine processes on the embedded model, real requests, timings."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from microserve.launch import free_port, spawn, stop, wait_healthy

PROMPTS = ["Once upon a time", "The router asked each engine", "Hello world! How are you"]


async def _send(url: str, model: str, prompts: list[str], max_tokens: int) -> None:
    async with aiohttp.ClientSession() as s:
        async def one(prompt: str):
            t0 = time.perf_counter()
            ttft = None
            text = ""
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            async with s.post(url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        ttft = ttft or time.perf_counter() - t0
                        import json
                        text += json.loads(line[6:])["choices"][0]["text"] if json.loads(line[6:])["choices"] else ""
            return prompt, text, ttft, time.perf_counter() - t0

        for prompt, text, ttft, e2e in await asyncio.gather(*(one(p) for p in prompts)):
            print(f"--- {prompt!r}\n    -> {text!r}\n    TTFT {ttft * 1e3:.1f} ms, total {e2e * 1e3:.1f} ms")


def run_demo(a) -> int:
    port = free_port()
    t0 = time.perf_counter()
    procs = [spawn("engine", ["engine", "--model", a.model], port)]
    try:
        wait_healthy(procs)
        print(f"engine up at {procs[0].url} in {time.perf_counter() - t0:.1f}s (model {a.model})")
        asyncio.run(_send(procs[0].url, a.model, PROMPTS, a.max_tokens))
    finally:
        stop(procs)
    print("stopped.")
    return 0
