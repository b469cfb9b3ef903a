"""Strategies shipped with microserve, by name; `load_strategy` also takes `package.module:Class`."""
from __future__ import annotations

import importlib

from microserve.router.router import Router
from microserve.router.strategies.adaptive import Adaptive
from microserve.router.strategies.dp import CacheAware, LeastLoaded, RoundRobin
from microserve.router.strategies.migration import Migration
from microserve.router.strategies.pd import PD, BalancedPD, CacheAwarePD

STRATEGIES: dict[str, type[Router]] = {cls.name: cls for cls in (
    RoundRobin, LeastLoaded, CacheAware, PD, BalancedPD, CacheAwarePD, Migration, Adaptive)}
STRATEGIES["dp"] = LeastLoaded


class UnknownStrategy(ValueError):
    pass


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'pd:balance=0.1' -> ('pd', {'balance': '0.1'}); 'pkg.mod:Class:k=v' -> ('pkg.mod:Class', {...})."""
    parts = spec.split(":")
    name, rest = parts[0], parts[1:]
    if rest and "=" not in rest[0]:  # package.module:Class
        name, rest = f"{name}:{rest[0]}", rest[1:]
    params: dict[str, str] = {}
    for item in ",".join(rest).split(","):
        if item:
            k, sep, v = item.partition("=")
            if not sep:
                raise UnknownStrategy(f"strategy parameter {item!r} is not key=value")
            params[k.strip()] = v.strip()
    return name, params


def strategy_class(name: str) -> type[Router]:
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        raise UnknownStrategy(f"unknown strategy {name!r}; built in: {', '.join(sorted(STRATEGIES))}, "
                              "or package.module:Class")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownStrategy(f"cannot load strategy {name!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Router)):
        raise UnknownStrategy(f"{name!r} is not a microserve.router.Router subclass")
    return cls


def tunables(cls: type[Router]) -> dict[str, object]:
    """A strategy's parameters: its public int/float/bool/str class attributes."""
    out = {}
    for klass in reversed(cls.__mro__):
        for k, v in vars(klass).items():
            if not k.startswith("_") and k != "name" and isinstance(v, (int, float, bool, str)):
                out[k] = v
    return out


def coerce_params(cls: type[Router], params: dict[str, object]) -> dict[str, object]:
    """Typed copies of user-given parameters; unknown names and bad values raise UnknownStrategy."""
    known = tunables(cls)
    out = {}
    for k, v in params.items():
        if k not in known:
            raise UnknownStrategy(f"strategy {cls.name!r} has no parameter {k!r}; it has: {', '.join(sorted(known))}")
        kind = type(known[k])
        try:
            out[k] = (str(v).lower() in ("1", "true", "yes")) if kind is bool else kind(v)
        except (TypeError, ValueError):
            raise UnknownStrategy(f"parameter {k}={v!r} is not a {kind.__name__}") from None
    return out


# Strategies that split prefill and decode: `microserve up` (and the simulator) give them one
# prefill engine by default.
PD_STRATEGIES = ("pd", "balanced_pd", "cache_aware_pd")


def engine_roles(n: int, strategy: str, prefill: int | None) -> list[str]:
    """First `prefill` engines prefill, the rest decode; by default 1 prefill engine for PD
    strategies and role "both" for everything else."""
    if prefill is None:
        prefill = 1 if parse_spec(strategy)[0] in PD_STRATEGIES and n > 1 else 0
    if prefill >= n and prefill:
        raise ValueError(f"--prefill {prefill} leaves no decode engine out of {n}")
    return ["both"] * n if prefill == 0 else ["prefill"] * prefill + ["decode"] * (n - prefill)
