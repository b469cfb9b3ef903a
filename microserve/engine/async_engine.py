"""AsyncEngine: drives the synchronous Engine from an asyncio event loop.

The engine is touched from the event-loop thread only, and never while a step runs: `step()` runs
on one worker thread, and calls that arrive meanwhile wait for it to return (one step at most).
So the engine itself needs no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from microserve.engine.engine import Engine, RequestError
from microserve.engine.request import RequestOutput
from microserve.transfer.base import TransferError
from microserve.engine.sampling import SamplingParams
from microserve.engine.step_trace import StepTrace
from microserve.errors import ServeError
from microserve.kv.cache import Fence

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, expire_interval_s: float = 0.5, step_trace: str | None = None) -> None:
        """`step_trace`: a file to append each step's shape and seconds to (engine/step_trace.py)."""
        self.engine = engine
        self._trace = StepTrace(step_trace) if step_trace else None
        engine.trace_shapes = self._trace is not None
        self._step_s = 0.0
        self._streams: dict[str, asyncio.Queue] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._stepping = False
        self._idle: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._expire_interval = expire_interval_s

    async def start(self) -> None:
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        await self._cancel_loop()
        self._executor.shutdown(wait=True)
        if self._trace:
            self._trace.close()
        self.engine.close()

    async def _cancel_loop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def call(self, fn: Callable, *args, **kw):
        """Run fn(*args) on the engine between steps."""
        while self._stepping:
            await self._idle.wait()
        result = fn(*args, **kw)
        self._wake.set()
        return result

    # ---- streams -------------------------------------------------------------------------------
    async def _stream(self, rid: str, submit: Callable, *args) -> AsyncIterator[RequestOutput]:
        q: asyncio.Queue = asyncio.Queue()
        if rid in self._streams:
            raise RequestError(f"request id {rid!r} is already running", 409, "conflict")
        self._streams[rid] = q
        finished = False
        try:
            await self.call(submit, *args)
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away (client disconnect): free everything now
                await self.call(self.engine.abort, rid)

    def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        return self._stream(rid, self.engine.add_request, rid, prompt_ids, params)

    def start_generate(self, rid: str, begin: int, prompt_ids, params) -> AsyncIterator[RequestOutput]:
        return self._stream(rid, self.engine.start_generate, rid, begin, prompt_ids, params)

    async def remote_send(self, rid: str, prompt_ids: list[int], begin: int, end: int, kv_addr_info: str,
                          fence: Fence | None = None) -> int:
        """Returns once every byte of KV for [begin, end) has landed in the receiver: how many bytes."""
        async for out in self._stream(f"send-{rid}", self.engine.remote_send, rid, prompt_ids, begin, end, kv_addr_info,
                                      fence):
            if out.finished and out.error:
                if out.error_status == 409:  # its fence closed: nothing more was written
                    raise ServeError(out.error, 409, "stale_reservation")
                raise TransferError(out.error, out.error_status)
        L = len(prompt_ids)  # negative window ends count from the end, as in remote_send
        return self.engine.window_bytes((end + L if end < 0 else end) - (begin + L if begin < 0 else begin))

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_expire = 0.0
        while True:
            now = time.monotonic()
            if now >= next_expire:
                for rid in self.engine.expire():
                    log.info("reservation %s expired", rid)
                next_expire = now + self._expire_interval
            if not self.engine.has_work():
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._expire_interval)
                except asyncio.TimeoutError:
                    pass
                continue
            self._stepping = True
            self._idle.clear()
            if self._trace:
                t0, wall0 = time.perf_counter(), time.time()
            try:
                outputs = await loop.run_in_executor(self._executor, self._timed_step if self._trace else self.engine.step)
            except Exception:
                log.error("engine step failed; aborting its requests:\n%s", traceback.format_exc())
                outputs = self.engine.fail_all("internal engine error (see the engine log)")
            finally:
                self._stepping = False
                self._idle.set()
            self._deliver(outputs)
            await asyncio.sleep(0)  # let handlers run between steps
            if self._trace:
                self._trace.record(self.engine.last_shape, wall0, self._step_s, time.perf_counter() - t0)

    def _timed_step(self) -> list[RequestOutput]:
        self.engine.last_shape = None
        t0 = time.perf_counter()
        try:
            return self.engine.step()
        finally:
            self._step_s = time.perf_counter() - t0

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to the streams waiting for them."""
        for out in outputs:
            q = self._streams.get(out.rid)
            if q is not None:
                q.put_nowait(out)
