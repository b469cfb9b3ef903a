"""microserve sim: the real router's strategies and the real engine scheduler and KV cache, on
simulated engines in virtual time (docs/sim.md).

    from microserve.sim import ClusterSpec, RooflineModel, simulate

Names load on first use, so that `microserve`'s command line (which registers `sim`) imports
neither torch nor the engine until a simulation runs.
"""
from __future__ import annotations

import importlib

_WHERE = {"ClusterSpec": "cluster", "SimCluster": "cluster", "make_strategy": "cluster", "simulate": "cluster",
          "LinearCostModel": "cost", "LinkModel": "cost", "ModelSpec": "cost", "RooflineModel": "cost",
          "StepCostModel": "cost", "StepShape": "cost", "VirtualTimeLoop": "vloop", "run": "vloop"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"microserve.sim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'microserve.sim' has no attribute {name!r}")
