"""Shared helpers of the toy trainers: threads, checkpoints, metrics log, loss plots, AP."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import time

import numpy as np


def one_thread() -> None:
    """Pin this process to one CPU thread (call before heavy torch work)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line, each with ``step`` and ``kind``)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "metrics.jsonl")

    def write(self, kind: str, step: int, **values) -> None:
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 1)}
        rec.update({k: (float(v) if isinstance(v, (np.floating, float, int, np.integer)) and not isinstance(v, bool) else v)
                    for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run re-does those steps)."""
        recs = [r for r in self.read() if r["step"] <= step]
        with open(self.path, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")


def warmup_cosine(steps: int, warmup: int):
    """The toy trainers' LR multiplier at step ``s``: linear warm-up over ``warmup`` steps, then a cosine to 0
    at ``steps``."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))


def latest_checkpoint(out: str) -> str | None:
    paths = glob.glob(os.path.join(out, "ckpt_*.pt"))
    if not paths:
        return None
    return max(paths, key=lambda p: int(re.findall(r"ckpt_(\d+)\.pt", p)[0]))


def save_checkpoint(out: str, step: int, state: dict, keep: int = 2) -> str:
    import torch

    path = os.path.join(out, f"ckpt_{step:07d}.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    old = sorted(glob.glob(os.path.join(out, "ckpt_*.pt")))[:-keep]
    for p in old:
        os.remove(p)
    return path


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of AP (area under the precision-recall curve, step-wise)."""
    aps = []
    for c in range(labels.shape[1]):
        y = labels[:, c] > 0
        if not y.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        y = y[order]
        tp = np.cumsum(y)
        precision = tp / np.arange(1, len(y) + 1)
        aps.append(float((precision * y).sum() / y.sum()))
    return float(np.mean(aps)) if aps else float("nan")


def plot_metrics(out: str, panels: list[tuple[str, list[str]]], title: str) -> str:
    """One PNG with a panel per (kind, keys) from metrics.jsonl; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = MetricsLog(out).read()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    axes = np.atleast_1d(axes)
    for ax, (kind, keys) in zip(axes, panels):
        rows = [r for r in recs if r["kind"] == kind]
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
            if pts:
                x, y = zip(*pts)
                if kind == "train" and len(y) > 20:  # smooth the noisy train losses
                    w = max(1, len(y) // 50)
                    y = np.convolve(y, np.ones(w) / w, mode="valid")
                    x = x[len(x) - len(y):]
                ax.plot(x, y, label=k)
        ax.set_xlabel("step")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
