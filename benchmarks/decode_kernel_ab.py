"""A/B of the CPU decode attention kernel: the working tree's csrc/paged_decode.cpp against the same
file at a git revision, both built into this one process and timed interleaved on the same inputs.

Each build gets its own op name (microserve::paged_decode_attention_a / _b), so neither touches
the engine's cached build. Shapes are the two served models' (8 q heads, 4 kv heads; head dim 8 =
stories260K, 32 = stories260K-hd32) and a head-dim-64 one; "seq" pools hold the batch's pages in
order (as a fresh engine's do, in cache), "shuffled" ones are 1 GiB with pages in random order (as
a long-running server's, from DRAM). Context lengths are uniform in [ctx/2, ctx]. Reported: median
per layer call over all 5 layers of a step, and ns per (context token, kv head); outputs of the
two builds must agree to 1e-5.

    python benchmarks/decode_kernel_ab.py --rev 7120e43          # before the shuffle-tree kernel
    python benchmarks/decode_kernel_ab.py --rev HEAD --a-cflags="-O3 -march=native -ffast-math"  # flags A/B
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch

from microserve.bench.harness import ROOT, md_table, median_ms
from microserve.kernels.build import CFLAGS, INCLUDE_DIRS  # the engine's own build flags and headers

SOURCE = "microserve/attention/csrc/paged_decode.cpp"
CASES = [  # name, head dim, batch, ctx, pool MiB, shuffled
    ("D8 B16 ctx<=192 seq", 8, 16, 192, 16, False),
    ("D8 B64 ctx<=232 shuffled", 8, 64, 232, 1024, True),
    ("D32 B16 ctx<=192 seq", 32, 16, 192, 32, False),
    ("D32 B64 ctx<=232 shuffled", 32, 64, 232, 1024, True),
    ("D64 B16 ctx<=512 seq", 64, 16, 512, 256, False),
]


def build(text: str, suffix: str, workdir: str, cflags: list[str]):
    """Compile one version of the kernel under the op name paged_decode_attention_<suffix>."""
    from torch.utils.cpp_extension import load
    text = re.sub(r'"paged_decode_attention(?=[("])', f'"paged_decode_attention_{suffix}', text)
    text = text.replace("paged_decode_attention(Tensor", f"paged_decode_attention_{suffix}(Tensor")
    path = os.path.join(workdir, f"paged_decode_{suffix}.cpp")
    with open(path, "w") as f:
        f.write(text)
    load(f"microserve_decode_ab_{suffix}", [path], extra_cflags=cflags, extra_include_paths=INCLUDE_DIRS,
         build_directory=workdir, is_python_module=False)
    return getattr(torch.ops.microserve, f"paged_decode_attention_{suffix}")


def case(ops, d: int, b: int, ctx: int, pool_mib: int, shuffled: bool, reps: int, layers: int = 5,
         hq: int = 8, hkv: int = 4, ps: int = 16):
    torch.manual_seed(0)
    pages = pool_mib * 2**20 // (layers * 2 * ps * hkv * d * 4)
    pool = torch.empty(layers, 2, pages, ps, hkv, d).normal_()
    width = -(-ctx // ps)
    order = torch.randperm(pages) if shuffled else torch.arange(pages)
    tables = order[:b * width].view(b, width).int().contiguous()
    lens = torch.randint(ctx // 2, ctx + 1, (b,), dtype=torch.int32)
    q = torch.randn(b, hq, d)
    outs = [torch.empty(b, hq, d) for _ in ops]
    for op, out in zip(ops, outs):
        op(q, pool[0], tables, lens, d ** -0.5, out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    ms = {}
    for _ in range(3):  # interleaved rounds; the best round's median per build
        for k, (op, out) in enumerate(zip(ops, outs)):
            t = median_ms(lambda: [op(q, pool[i], tables, lens, d ** -0.5, out) for i in range(layers)], reps) / layers
            ms[k] = min(ms.get(k, t), t)
    rows = int(lens.sum()) * hkv
    return [f"{ms[k] * 1e3:.1f} us ({ms[k] * 1e6 / rows:.2f} ns)" for k in (0, 1)] + [f"**{ms[0] / ms[1]:.2f}x**"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision whose paged_decode.cpp is the baseline (A)")
    ap.add_argument("--a-cflags", default=None, help="compile flags for A (default: the engine's)")
    ap.add_argument("--b-cflags", default=None, help="compile flags for B (default: the engine's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--reps", type=int, default=30, help="timed steps per build per round (default 30)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    old = subprocess.run(["git", "show", f"{a.rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    with tempfile.TemporaryDirectory(prefix="microserve-decode-ab-") as workdir:
        flags = [(f.split() if f else CFLAGS) for f in (a.a_cflags, a.b_cflags)]
        ops = [build(old, "a", workdir, flags[0]), build((ROOT / SOURCE).read_text(), "b", workdir, flags[1])]
        rows = [[name] + case(ops, *shape, reps=a.reps) for name, *shape in CASES]
    print(f"# decode kernel A/B: A = {a.rev} ({' '.join(flags[0])}), B = working tree ({' '.join(flags[1])}); "
          f"{a.threads} thread(s); per layer call (ns per context token and kv head)")
    print(md_table(["case (8 q heads, 4 kv heads, page 16)", f"A ({a.rev})", "B (tree)", "A / B"], rows))


if __name__ == "__main__":
    main()
