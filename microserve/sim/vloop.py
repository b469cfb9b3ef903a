"""Virtual time for asyncio: an event loop whose clock jumps to the next timer when nothing is ready.

`loop.time()` is a number the loop owns, starting at 0. Where a normal loop would block in
`select(timeout)` until the earliest timer is due, this loop polls its file descriptors without
waiting and moves its clock forward by `timeout` instead. Code that waits only through the loop
(`asyncio.sleep`, `wait_for`, `call_later`, events, queues) therefore runs unchanged, in
simulated seconds, as fast as the CPU executes its callbacks. Nothing may read the wall clock for
scheduling decisions (`time.monotonic()` keeps counting real seconds).

A run is deterministic: callbacks run in the order asyncio gives them (FIFO, timers by due time,
ties by insertion), and nothing here depends on wall time. If every task waits and no timer is
set, the simulation has deadlocked; `select` then waits `deadlock_wall_s` real seconds for a
thread to wake the loop (executors, `call_soon_threadsafe`) and raises `SimDeadlock` otherwise.

    from microserve.sim.vloop import run
    result = run(main())          # like asyncio.run, in virtual time; returns main's result

Written here rather than taken from PyPI's `looptime` (which does the same with a pytest plugin
and more options) to keep the package's dependencies as they are; the mechanism is 30 lines.
"""
from __future__ import annotations

import asyncio
import selectors
from typing import Any, Coroutine


class SimDeadlock(RuntimeError):
    """Every task is waiting and no timer is set: nothing can ever happen again."""


class _JumpingSelector:
    """Wraps the loop's real selector: polls without blocking and advances virtual time instead."""

    def __init__(self, real: selectors.BaseSelector, loop: "VirtualTimeLoop") -> None:
        self._real, self._loop = real, loop

    def select(self, timeout: float | None = None):
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled: only another thread could still wake us
            events = self._real.select(self._loop.deadlock_wall_s)
            if not events:
                raise SimDeadlock("virtual-time loop: every task is waiting and no timer is set")
            return events
        self._loop._vnow += timeout
        return events

    def __getattr__(self, name: str) -> Any:  # register, unregister, modify, get_map, close, ...
        return getattr(self._real, name)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A SelectorEventLoop on a virtual clock (see the module doc)."""

    def __init__(self, start: float = 0.0, deadlock_wall_s: float = 5.0) -> None:
        super().__init__(selectors.DefaultSelector())
        self._vnow = float(start)
        self.deadlock_wall_s = deadlock_wall_s
        self._selector = _JumpingSelector(self._selector, self)

    def time(self) -> float:
        return self._vnow


def run(main: Coroutine, start: float = 0.0, debug: bool = False) -> Any:
    """Run `main` to completion on a fresh VirtualTimeLoop (asyncio.run's contract: cancels the
    tasks it leaves behind, closes async generators and the loop)."""
    loop = VirtualTimeLoop(start)
    loop.set_debug(debug)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
