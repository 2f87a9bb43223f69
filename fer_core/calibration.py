"""Probability calibration: expected calibration error and temperature scaling (Guo et al. 2017).

Temperature scaling divides the emotion logits by one scalar T > 0 fitted on the validation
split by minimising the negative log-likelihood: it never changes the argmax (so accuracy and
F1 are unchanged) and it lowers validation NLL by construction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The T > 0 minimising NLL(logits / T); optimised over log T with L-BFGS."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    # L-BFGS is a local method: never return a T worse than no scaling
    return t if np.isfinite(t) and nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    from .engine import softmax

    return {
        "temperature": float(temperature),
        "ece": ece(softmax(np.asarray(logits)), labels),
        "ece_calibrated": ece(softmax(np.asarray(logits) / temperature), labels),
        "nll": nll(logits, labels),
        "nll_calibrated": nll(logits, labels, temperature),
    }
