"""``train/curves.png``: loss and mIoU curves of a run, drawn from its ``metrics.jsonl`` at the end.

A picture anyone can open without TensorBoard (or a copy of an S3 folder). Matplotlib's Agg canvas is
used directly, never ``pyplot``, so no display backend or global matplotlib state is touched.
"""
from __future__ import annotations

import io
import json

LOSSES = ("loss", "seg_loss", "aff_loss", "adapter_loss")
MIOUS = (("val_miou", "segmentation mIoU"), ("val_cam_miou", "CAM pseudo-label mIoU"))
FIGSIZE = (10, 4)  # inches at DPI: a 1000 x 400 px picture, two panels side by side
DPI = 100


def read_records(text: str) -> list[dict]:
    """The train and eval records of ``metrics.jsonl``; after a worker restart a step's last record wins."""
    by_step: dict[tuple[str, int], dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("kind") in ("train", "eval"):
            by_step[(r["kind"], int(r["step"]))] = r
    return sorted(by_step.values(), key=lambda r: int(r["step"]))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_png(records: list[dict]) -> bytes:
    """Two panels: the losses per logged step, and validation mIoUs per validation step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_loss, ax_miou = fig.subplots(1, 2)
    for key in LOSSES:
        x, y = _series(records, key)
        if x:
            ax_loss.plot(x, y, marker="." if len(x) < 50 else None, label=key,
                         linewidth=2 if key == "loss" else 1)
    ax_loss.set(title="training losses", xlabel="step")
    evals = [r for r in records if r.get("kind") == "eval"]
    for key, label in MIOUS:
        x, y = _series(evals, key)
        if x:
            ax_miou.plot(x, y, marker="o", label=label)
    ax_miou.set(title="validation", xlabel="step", ylabel="mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
