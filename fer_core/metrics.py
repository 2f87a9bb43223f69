"""One function from (labels, probabilities[, AU labels/probabilities]) to the metrics dict."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    au_true: np.ndarray | None = None,
    au_probs: np.ndarray | None = None,
    au_mask: np.ndarray | None = None,
    au_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of the schema written to metrics.json.

    ``probs`` is N×C (any scores: argmax is the prediction). Classes absent from ``y_true``
    still get a row (support 0) so that every run of a dataset has the same keys.
    """
    # scikit-learn loads in ~1 s: only when metrics are computed, not at every `fer` start
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(probs).argmax(axis=1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = sorted(set(y_true.tolist()))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # macro over the classes present in y_true: a class with no support has no recall to average
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "num_samples": int(len(y_true)),
        "classes": list(classes),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if au_true is not None and au_probs is not None and len(au_names):
        out.update(au_metrics(au_true, au_probs, au_mask, au_names))
    return out


def au_metrics(
    au_true: np.ndarray, au_probs: np.ndarray, au_mask: np.ndarray | None, au_names: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Per-AU F1 over the samples that carry AU labels (mask 1), and their mean."""
    from sklearn.metrics import f1_score

    au_true = np.asarray(au_true) > 0.5
    au_pred = np.asarray(au_probs) >= threshold
    mask = np.ones_like(au_true, dtype=bool) if au_mask is None else np.asarray(au_mask) > 0.5
    per_au: dict[str, float] = {}
    for k, name in enumerate(au_names):
        m = mask[:, k]
        if not m.any():
            continue
        per_au[name] = float(f1_score(au_true[m, k], au_pred[m, k], zero_division=0))
    return {"au_f1": per_au, "au_mean_f1": float(np.mean(list(per_au.values()))) if per_au else 0.0}


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def metrics_from_predictions(pred: dict[str, np.ndarray], classes: Sequence[str], au_names: Sequence[str],
                             emotion_key: str = "logits.emotion") -> dict[str, Any]:
    """metrics.json from a prediction dict (logits per head + labels); ``emotion_key`` picks
    raw or calibrated logits (argmax, hence accuracy and F1, are the same for both)."""
    au = "logits.au" in pred and "au" in pred
    return classification_metrics(
        pred["label"],
        softmax(pred[emotion_key]),
        classes,
        au_true=pred.get("au") if au else None,
        au_probs=sigmoid(pred["logits.au"]) if au else None,
        au_mask=pred.get("au_mask") if au else None,
        au_names=au_names if au else (),
    )


# ---------------------------------------------------------------- calibration metrics


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Confidence bins (equal width): per-bin mean confidence, accuracy and count; and the ECE,
    the count-weighted mean |accuracy − confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else 0.0
        c = float(conf[m].mean()) if n else 0.0
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "accuracy": acc, "confidence": c})
        if n:
            ece += n / len(labels) * abs(acc - c)
    return {"ece": float(ece), "bins": bins}


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    return reliability(probs, labels, n_bins)["ece"]


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return float(F.cross_entropy(t, torch.as_tensor(np.asarray(labels), dtype=torch.long)))
