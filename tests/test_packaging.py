"""The package as users install it: a wheel carries every module and every C++ source and header,
and an installed wheel builds and loads the CPU kernels from its own files."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "microserve"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: setuptools is already here, and CI must not need the network for this
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("microserve-*.whl")
    return whl


def test_wheel_carries_every_source(wheel):
    """Every .py, .cpp and .h under microserve/ is in the wheel (the .h files once were not, and a
    non-editable install could not build the kernels)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
            if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts}
    assert any(n.endswith(".h") for n in want) and any(n.endswith(".cpp") for n in want)
    assert sorted(want - names) == []


@pytest.mark.slow
def test_installed_wheel_builds_and_loads_the_kernels(wheel, tmp_path):
    """Into a new venv (sharing this environment's torch and other dependencies), outside the
    source tree, with an empty kernel cache: the wheel's own sources build and load."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    code = ("import microserve, torch; from microserve.kernels.build import kernel_error; "
            "print(microserve.__file__); print(kernel_error()); "
            "print(hasattr(torch.ops.microserve, 'paged_decode_attention'))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "kernels"), "MICROSERVE_REQUIRE_KERNELS": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    path, error, loaded = r.stdout.split()
    assert path.startswith(str(venv)), f"imported {path}, not the installed wheel"
    assert (error, loaded) == ("None", "True")
