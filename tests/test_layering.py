"""Imports point down (docs/architecture.md): the router never reaches model code, the engine or torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Packages the router must never load, directly or through a shared module such as config.py.
ROUTER_FORBIDDEN = ("torch", "microserve.model", "microserve.engine", "microserve.attention", "microserve.kv",
                    "microserve.transfer", "microserve.server")

ROUTER_IMPORTS = """
import importlib, json, pkgutil, sys
import microserve.router
for m in pkgutil.walk_packages(microserve.router.__path__, "microserve.router."):
    importlib.import_module(m.name)
from microserve.router.serve import load_tokenizer
tok = load_tokenizer("embedded")  # the default model's tokenizer, found without the model package
assert tok is not None and tok.encode("Hello world") == [1] + tok.encode("Hello world", add_special_tokens=False)
print(json.dumps(sorted(sys.modules)))
"""


def forbidden(modules: list[str], packages: tuple[str, ...] = ROUTER_FORBIDDEN) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)]


def test_router_never_imports_model_engine_or_torch(tmp_path):
    env = {**os.environ, "MICROSERVE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", ROUTER_IMPORTS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "microserve.router.serve" in modules and "microserve.router.strategies.pd" in modules
    assert forbidden(modules) == []


BENCH_FORBIDDEN = ("torch", "microserve.engine", "microserve.model", "microserve.attention", "microserve.kv",
                   "microserve.sim")

BENCH_IMPORTS = """
import importlib, json, pkgutil, sys
import microserve.bench
for m in pkgutil.walk_packages(microserve.bench.__path__, "microserve.bench."):
    importlib.import_module(m.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_bench_is_a_client_never_the_engine_or_torch():
    """bench/ measures servers over HTTP: importing any of its modules loads neither torch nor the
    engine, and no bench module names them even in a lazy import (the in-process step timing is
    sim/calibrate.py's)."""
    import ast
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", BENCH_IMPORTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "microserve.bench.harness" in modules and "microserve.bench.presets" in modules
    assert forbidden(modules, BENCH_FORBIDDEN) == []
    named = []
    for f in sorted((Path(__file__).resolve().parents[1] / "microserve" / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            named += [f"{f.name}: {n}" for n in forbidden(names, BENCH_FORBIDDEN)]
    assert named == []


def test_forbidden_matches_packages_not_prefixes():
    assert forbidden(["microserve.model_files", "microserve.modelx", "torchvision_like"]) == []
    assert forbidden(["microserve.model", "microserve.model.loader", "torch.nn"]) == \
        ["microserve.model", "microserve.model.loader", "torch.nn"]


def test_engine_and_router_resolve_the_same_embedded_dir(tmp_path, monkeypatch):
    from microserve.model.loader import resolve_model_path
    from microserve.model_files import TOKENIZER_FILES, model_dir

    monkeypatch.setenv("MICROSERVE_CACHE", str(tmp_path))
    path = resolve_model_path("embedded")
    assert path.startswith(str(tmp_path)) and path == model_dir("embedded", TOKENIZER_FILES)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(path, f))
    assert resolve_model_path(path) == path  # a local directory as is
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_path(str(tmp_path / "file"))


def test_embedded_model_is_built_once_safely_by_concurrent_starts(tmp_path):
    """Engines start side by side on a fresh machine and each may build the embedded model's files
    into the same cache; every one of them must come up (one copy wins, the others are dropped)."""
    env = {**os.environ, "MICROSERVE_CACHE": str(tmp_path)}
    code = "from microserve.model_files import embedded_model_dir; print(embedded_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [e[-500:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["embedded-tiny-llama-v2"]  # no temporary copies left
