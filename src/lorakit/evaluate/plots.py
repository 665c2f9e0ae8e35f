"""The figures lorakit draws: a run's loss curves, and before/after metric bars for reports."""

from __future__ import annotations

from pathlib import Path


def plot_loss(records: list[dict], out_path: Path, title: str = "") -> Path:
    """Draw train `loss` and `eval_loss` from metrics records; works without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    valid = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", color="tab:blue")
        if valid:
            ax.plot(*zip(*valid), label="validation loss", color="tab:orange", marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if title:
            ax.set_title(title)
        if train or valid:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no loss logged (fewer steps than logging_steps)", ha="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out_path)
    finally:
        plt.close(fig)
    return out_path


def metric_bars_png(labels: list[str], groups: list[tuple[str, list[float]]]) -> bytes:
    """Grouped bars (one group per model, e.g. base and adapter) of 0-100 scores, as PNG bytes."""
    import io

    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.add_subplot()
    positions = range(len(labels))
    width = 0.8 / len(groups)
    for offset, (name, heights) in enumerate(groups):
        xs = [p + (offset - (len(groups) - 1) / 2) * width for p in positions]
        bars = axes.bar(xs, heights, width, label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_xticks(list(positions), labels)
    axes.set_ylim(0, 105)
    axes.set_ylabel("score (0-100)")
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()
