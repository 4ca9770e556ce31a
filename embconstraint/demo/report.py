"""The demo's results: the table rows, the printed table and the embedding plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .data import DemoData

__all__ = ["RunResult", "DemoResult", "format_table", "plot_embeddings"]


@dataclass
class RunResult:
    """One row of the demo table."""

    name: str
    num_items: int
    seconds: float
    acc_old: float
    acc_new: float = math.nan
    max_dev: float | None = None  # max |Δ| of the old rows w.r.t. model 1 (None for model 1)
    weights: Tensor | None = field(default=None, repr=False)  # the (V, D) item embedding after training


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    runs: list[RunResult]
    out: Path
    png: Path | None
    checkpoints: dict[str, Path]
    data: DemoData = field(repr=False)

    def table(self) -> str:
        return format_table(self.runs)


def _percent(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}%"


def format_table(runs: list[RunResult]) -> str:
    """The demo's result table (max |Δ| printed with 3 significant digits).

    >>> print(format_table([RunResult("model 1", 12, 1.25, 0.9), RunResult("model 2", 16, 2.0, 0.8, 0.5, 0.0),
    ...                     RunResult("model 2", 16, 2.0, 0.8, 0.5, 0.7649759948253632)]))
    model    items  max |Δ| old rows  acc. old items  acc. new items  train time
    -------  -----  ----------------  --------------  --------------  ----------
    model 1     12                 —           90.0%               —       1.2 s
    model 2     16                 0           80.0%           50.0%       2.0 s
    model 2     16             0.765           80.0%           50.0%       2.0 s
    """
    header = ("model", "items", "max |Δ| old rows", "acc. old items", "acc. new items", "train time")
    rows = [header] + [
        (
            r.name,
            str(r.num_items),
            "—" if r.max_dev is None else f"{r.max_dev:.3g}",
            _percent(r.acc_old),
            _percent(r.acc_new),
            f"{r.seconds:.1f} s",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_embeddings(runs: list[RunResult], data: DemoData, path: str | Path) -> Path | None:
    """Plot the item embeddings of ``runs`` side by side, projected on the first two principal
    axes of the first run's (model 1's) rows, the same projection in every panel. Returns
    ``path``, or None (with a message) when matplotlib is not installed.

    >>> import os, tempfile
    >>> from embconstraint.demo import make_data
    >>> w1 = torch.randn(12, 4)
    >>> runs = [RunResult("model 1", 12, 0.0, 1.0, weights=w1),
    ...         RunResult("model 2", 16, 0.0, 1.0, 1.0, max_dev=0.0, weights=torch.cat([w1, torch.randn(4, 4)]))]
    >>> path = plot_embeddings(runs, make_data(), os.path.join(tempfile.mkdtemp(), "emb.png"))
    >>> path.stat().st_size > 10_000
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install 'embconstraint[demo]')")
        return None
    ref = runs[0].weights.double()
    mean = ref.mean(dim=0)
    _, _, v = torch.linalg.svd(ref - mean, full_matrices=False)
    axes2 = v[:2].T  # (D, 2)

    def project(w: Tensor) -> Tensor:
        return (w.double() - mean) @ axes2

    ref_xy = project(ref)
    all_xy = torch.cat([project(r.weights) for r in runs])
    lo, hi = all_xy.min(dim=0).values, all_xy.max(dim=0).values
    pad = 0.12 * (hi - lo)
    colors = {"fruit": "#e07b00", "vegetable": "#2a8a2a"}
    fig, axs = plt.subplots(
        1, len(runs), figsize=(5.2 * len(runs), 5.0), sharex=True, sharey=True, squeeze=False
    )
    axs = axs[0]
    for ax, run in zip(axs, runs, strict=True):
        xy = project(run.weights)
        for i in range(run.num_items):
            old = i < data.num_old
            x, y = xy[i].tolist()
            if old and run is not runs[0]:
                x0, y0 = ref_xy[i].tolist()
                ax.plot([x0, x], [y0, y], color="#999999", lw=0.8, zorder=1)
                ax.scatter([x0], [y0], s=30, facecolors="none", edgecolors="#999999", zorder=1)
            ax.scatter(
                [x],
                [y],
                s=70 if old else 150,
                marker="o" if old else "*",
                color=colors[data.categories[i]],
                edgecolors="black",
                linewidths=0.5,
                zorder=2,
            )
            ax.annotate(
                data.items[i] + ("" if old else " (new)"),
                (x, y),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
                fontweight="normal" if old else "bold",
            )
        dev = "" if run.max_dev is None else f"\nmax |Δ| old rows = {run.max_dev:.3g}"
        ax.set_title(f"{run.name} ({run.num_items} items){dev}", fontsize=10)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel("PC 1 of model 1's item embeddings")
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("PC 2 of model 1's item embeddings")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colors["fruit"], label="fruit"),
        plt.Line2D([], [], marker="o", ls="", color=colors["vegetable"], label="vegetable"),
        plt.Line2D([], [], marker="o", ls="", color="white", markeredgecolor="black", label="old item"),
        plt.Line2D(
            [], [], marker="*", ls="", color="white", markeredgecolor="black", markersize=12, label="new item"
        ),
        plt.Line2D(
            [], [], marker="o", ls="-", color="#999999", markerfacecolor="none", label="old item in model 1"
        ),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Item embeddings before and after the vocabulary grew (same 2-D projection in every panel)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
