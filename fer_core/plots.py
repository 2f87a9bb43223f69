"""Figures people would rather look at than read (matplotlib, headless); one confusion matrix
drawing for run directories and reports alike."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_figure(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str = "",
                            normalized_text: bool = False):
    """Row-normalised colours; cells show raw counts (or the row share); true class on rows."""
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            text = f"{norm[i, j]:.2f}" if normalized_text else str(cm[i, j])
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def confusion_matrix_png(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    atomic_write_bytes(path, figure_png(confusion_matrix_figure(cm, classes, title)))
    return path
