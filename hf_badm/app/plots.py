"""Loss curves of one or more runs against optimizer steps and wall-clock time (PNG).

matplotlib is optional (the ``plots`` extra): without it no plot is drawn and the caller says so once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_SKIPPED = "plot skipped: matplotlib is not installed (pip install 'hf-badm[plots]')"


def plot_runs(runs: dict[str, dict[str, Any]], path: str | Path, title: str | None = None) -> Path | None:
    """Draw train loss (lines) and eval loss (markers) of each run's ``log_history`` vs step and vs time;
    None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, (name, metrics) in enumerate(runs.items()):
        color = f"C{i}"
        history = metrics.get("log_history", [])
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            points = [(h["step"], h.get("wall_time"), h[key]) for h in history if key in h]
            if not points:
                continue
            steps, times, values = zip(*points)
            label = f"{name} ({'train' if key == 'loss' else 'eval'})"
            axes[0].plot(steps, values, style, color=color, label=label, markersize=4)
            if all(t is not None for t in times):
                axes[1].plot(times, values, style, color=color, label=label, markersize=4)
    for ax, xlabel in zip(axes, ("optimizer step", "wall-clock seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
