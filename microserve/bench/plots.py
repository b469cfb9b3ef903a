"""Sweep plots in the paper's figure style: one panel per metric against request rate, one line
(with markers) per strategy, grid lines, one shared legend."""
from __future__ import annotations

from typing import Any, Sequence

# (result key, panel title); values are ms, shown in seconds for JCT and TTFT.
PANELS = (("mean_e2el_ms", "Mean JCT (s)", 1e-3), ("p99_e2el_ms", "P99 JCT (s)", 1e-3),
          ("mean_ttft_ms", "Mean TTFT (s)", 1e-3), ("mean_tpot_ms", "Mean TPOT (ms)", 1.0))
MARKERS = "osD^vP*Xh<>"


def plot_sweep(agg: dict[tuple[str, float], dict[str, Any]], path: str, title: str = "",
               order: Sequence[str] | None = None) -> None:
    """Write a 2x2 PNG of PANELS vs request rate from `sweep.aggregate`'s output. With repeats,
    error bars span the range over repeats."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(s for s, _ in agg))
    if order:
        strategies = [s for s in order if s in strategies] + [s for s in strategies if s not in order]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, label, scale) in zip(axes.flat, PANELS):
        for i, s in enumerate(strategies):
            rates = sorted(r for t, r in agg if t == s)
            ys = [agg[(s, r)][key] * scale for r in rates]
            err = [agg[(s, r)]["spread"][key] * scale / 2 for r in rates]
            ax.errorbar(rates, ys, yerr=err if any(err) else None, marker=MARKERS[i % len(MARKERS)],
                        markersize=6, linewidth=1.6, capsize=3, label=s)
        ax.set_title(label, fontsize=11)
        ax.set_xlabel("Request rate (req/s)")
        ax.grid(True, linestyle="--", alpha=0.5)
        ax.set_ylim(bottom=0)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, y=0.99, fontsize=12)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, 0.96 if title else 0.995))
    fig.tight_layout(rect=(0, 0, 1, 0.92 if title else 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
