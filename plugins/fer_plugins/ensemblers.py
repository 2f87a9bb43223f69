"""Ensemble combiners: weighted averaging (given, equal or fitted weights) and stacking."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch

from fer_core.api import FerError, hookimpl


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class WeightedAverage:
    """p = Σ w_i p_i (space "probs") or softmax(Σ w_i z_i) (space "logits"), weights summing to 1."""

    def __init__(self, space: str, weights: list[float] | str) -> None:
        self.space = space
        self.mode = weights if isinstance(weights, str) else "given"
        self.weights: list[float] | None = None if isinstance(weights, str) else list(weights)

    def _combine(self, per_model: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
        stacked = np.stack([np.asarray(p, dtype=np.float64) for p in per_model])
        mixed = np.tensordot(w, stacked, axes=1)
        return mixed if self.space == "probs" else _softmax(mixed)

    def fit(self, per_model: Sequence[np.ndarray], labels: np.ndarray) -> None:
        n = len(per_model)
        if self.mode == "equal":
            self.weights = [1.0 / n] * n
        elif self.mode == "given":
            if len(self.weights or []) != n:
                raise FerError(f"combiner.weights: {len(self.weights or [])} weights for {n} members (one per member)")
            total = sum(self.weights)
            self.weights = [w / total for w in self.weights]
        else:  # fit: minimise validation NLL over softmax-parametrised weights
            stacked = torch.tensor(np.stack(per_model), dtype=torch.float64)
            y = torch.tensor(np.asarray(labels), dtype=torch.long)
            theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                w = torch.softmax(theta, 0)
                mixed = torch.tensordot(w, stacked, dims=1)
                logp = torch.log(mixed.clamp_min(1e-12)) if self.space == "probs" else torch.log_softmax(mixed, 1)
                loss = torch.nn.functional.nll_loss(logp, y)
                loss.backward()
                return loss

            opt.step(closure)
            self.weights = torch.softmax(theta.detach(), 0).tolist()

    def __call__(self, per_model: Sequence[np.ndarray]) -> np.ndarray:
        if self.weights is None:
            raise FerError("ensemble: the combiner was not fitted")
        return self._combine(per_model, np.asarray(self.weights))

    def state(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def load_state(self, state: dict[str, Any]) -> None:
        self.weights = list(state["weights"])


class Stacking:
    """Multinomial logistic regression on the members' log-probabilities (scikit-learn)."""

    space = "probs"

    def __init__(self, c: float) -> None:
        self.c = c
        self.coef: list[list[float]] | None = None
        self.intercept: list[float] | None = None
        self.classes_: list[int] | None = None

    @staticmethod
    def _features(per_model: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1)) for p in per_model], axis=1)

    def fit(self, per_model: Sequence[np.ndarray], labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=self.c, max_iter=2000)
        clf.fit(self._features(per_model), np.asarray(labels))
        self.coef, self.intercept = clf.coef_.tolist(), clf.intercept_.tolist()
        self.classes_ = [int(c) for c in clf.classes_]

    def __call__(self, per_model: Sequence[np.ndarray]) -> np.ndarray:
        if self.coef is None:
            raise FerError("ensemble: the stacking combiner was not fitted")
        x = self._features(per_model)
        scores = x @ np.asarray(self.coef).T + np.asarray(self.intercept)
        n_classes = per_model[0].shape[1]
        out = np.zeros((x.shape[0], n_classes))
        out[:, self.classes_] = _softmax(scores)  # classes absent from the fit split get probability 0
        return out

    def state(self) -> dict[str, Any]:
        return {"coef": self.coef, "intercept": self.intercept, "classes": self.classes_}

    def load_state(self, state: dict[str, Any]) -> None:
        self.coef, self.intercept, self.classes_ = state["coef"], state["intercept"], state["classes"]


def make_average(*, space: Literal["probs", "logits"] = "probs",
                 weights: Literal["equal", "fit"] | list[float] = "fit") -> WeightedAverage:
    """`weights`: "fit" (minimise NLL on the fit split), "equal", or one weight per member."""
    if isinstance(weights, list) and (any(w < 0 for w in weights) or not sum(weights) > 0):
        raise FerError(f"combiner.weights: weights must be ≥ 0 and not all 0 (got {weights})")
    return WeightedAverage(space, weights)


def make_stacking(*, c: float = 1.0) -> Stacking:
    """`c`: inverse L2 regularisation strength of the logistic regression."""
    return Stacking(c)


@hookimpl
def register_ensemblers(register):
    register("average", make_average)
    register("stacking", make_stacking)
