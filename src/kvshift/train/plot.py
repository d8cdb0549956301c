"""`kvshift plot RUN... --out PNG`: train loss (thin) and validation loss (markers) against tokens."""

from __future__ import annotations

from pathlib import Path

from kvshift.train.metrics import read_metrics
from kvshift.utils.plot import pyplot, save_figure

__all__ = ["plot_runs", "curves"]


def curves(run_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{'train': [(tokens, loss)], 'val': [(tokens, val_loss)]} of a run directory (non-finite dropped)."""
    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    tr = [(r["tokens"], r["loss"]) for r in recs if isinstance(r.get("loss"), (int, float))]
    va = [(r["tokens"], r["val_loss"]) for r in recs if isinstance(r.get("val_loss"), (int, float))]
    return {"train": tr, "val": va}


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, labels: list[str] | None = None) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, rd in enumerate(run_dirs):
        c = curves(rd)
        label = labels[i] if labels else Path(rd).name
        color = f"C{i % 10}"
        if c["train"]:
            x, y = zip(*c["train"])
            ax.plot(x, y, color=color, alpha=0.35, lw=0.8)
        if c["val"]:
            x, y = zip(*c["val"])
            ax.plot(x, y, "o-", color=color, ms=3, label=f"{label} (val)")
        elif c["train"]:
            ax.plot([], [], color=color, label=f"{label} (train)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("train (thin) and validation (markers) loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out, dpi=120)
