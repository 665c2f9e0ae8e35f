"""The loss-curve PNG of a run: train loss and validation loss against the optimizer step."""

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
