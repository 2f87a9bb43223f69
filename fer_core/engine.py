"""The training loop: device, precision, channels_last, accumulation, clipping, compile,
atomic checkpoints, exact resume, best-by-metric, early stopping, NaN guard, callbacks."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import checkpoint, dist
from .data import EpochSeededLoader, derive_seed, seed_everything
from .errors import FerError, NonFiniteLossError
from .hardware import Precision
from .interfaces import Batch, Callback, Loss, RunInfo
from .metrics import classification_metrics
from .model import FerModel

LAST = "last.pt"
BEST = "best.pt"


@dataclass
class EngineConfig:
    epochs: int
    accumulate_steps: int = 1
    clip_grad_norm: float = 0.0
    monitor: str = "macro_f1"
    monitor_mode: str = "max"
    early_stopping_patience: int = 0
    channels_last: bool = False
    compile: bool = False
    seed: int = 0


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    best_score: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> Batch:
    out: Batch = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def autocast(device: torch.device, precision: Precision):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict[str, Any]], device: torch.device, precision: Precision,
            channels_last: bool = False) -> dict[str, np.ndarray]:
    """Logits of every head over a loader, plus the labels it carried (numpy, in loader order)."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        b = _to_device(batch, device, channels_last)
        with autocast(device, precision):
            outputs = model(b["image"])
        for name, logits in outputs.items():
            chunks.setdefault(f"logits.{name}", []).append(logits.float().cpu().numpy())
        for key in ("label", "au", "au_mask", "index"):
            if key in batch:
                chunks.setdefault(key, []).append(batch[key].cpu().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def metrics_from_predictions(pred: dict[str, np.ndarray], classes: Sequence[str], au_names: Sequence[str]) -> dict[str, Any]:
    au = "logits.au" in pred and "au" in pred
    return classification_metrics(
        pred["label"],
        softmax(pred["logits.emotion"]),
        classes,
        au_true=pred.get("au") if au else None,
        au_probs=sigmoid(pred["logits.au"]) if au else None,
        au_mask=pred.get("au_mask") if au else None,
        au_names=au_names if au else (),
    )


class Engine:
    def __init__(
        self,
        *,
        model: FerModel,
        loss: Loss,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        train_loader: EpochSeededLoader,
        val_loader: Iterable[dict[str, Any]],
        device: torch.device,
        precision: Precision,
        config: EngineConfig,
        run: RunInfo,
        au_names: Sequence[str] = (),
        callbacks: Sequence[Callback] = (),
        batch_transforms: Sequence[Callable[[Batch, int], Batch]] = (),
        checkpoint_extra: dict[str, Any] | None = None,
        finalize: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.precision = precision
        self.cfg = config
        self.run = run
        self.au_names = list(au_names)
        self.callbacks = [c for c in callbacks if dist.is_main() or c.all_ranks]
        self.batch_transforms = list(batch_transforms)
        self.checkpoint_extra = checkpoint_extra or {}
        self.finalize = finalize  # writes the run's result files before callbacks see the end
        self.state = TrainState()
        self.scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
        self.model.to(device)
        if isinstance(self.loss, nn.Module):  # learnable loss weights live on the device too
            self.loss.to(device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if config.compile else self.model

    # ------------------------------------------------------------------ callbacks
    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self.run, *args)

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _meta(self) -> dict[str, Any]:
        return {
            "classes": list(self.run.classes),
            "au_names": self.au_names,
            "preprocessing": self.model.preprocessing.to_dict(),
            "recipe": self.run.recipe,
            "task_sizes": dict(self.model.task_sizes),
            **self.checkpoint_extra,
        }

    def save_last(self) -> None:
        if not dist.is_main():
            return
        checkpoint.save(
            self.run.out_dir / LAST,
            {
                **self._meta(),
                "model": self.model.state_dict(),
                "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "train_state": self.state.to_dict(),
                "rng": self._rng_state(),
                "callback_state": self.run.state,
            },
        )

    def save_best(self) -> None:
        if dist.is_main():
            checkpoint.save(self.run.out_dir / BEST, {**self._meta(), "model": self.model.state_dict(),
                                                       "epoch": self.state.epoch})

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if isinstance(self.loss, nn.Module) and ckpt.get("loss") is not None:
            self.loss.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        self.run.state.update(ckpt.get("callback_state") or {})
        rng = ckpt.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(_as_tuple(rng["python"]))
        if "numpy" in rng:
            np.random.set_state(("MT19937", rng["numpy"]["keys"].numpy().astype(np.uint32), rng["numpy"]["pos"], 0, 0.0))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ loop
    def _better(self, score: float) -> bool:
        best = self.state.best_score
        if best is None:
            return True
        return score > best if self.cfg.monitor_mode == "max" else score < best

    def fit(self) -> dict[str, Any]:
        self._emit("on_fit_start")
        try:
            # a run that stopped early is finished: resuming it only re-evaluates
            while self.state.epoch < self.cfg.epochs and "stopped_early_at" not in self.run.state:
                epoch = self.state.epoch + 1
                train_logs = self._train_epoch(epoch)
                report = self.validate()
                if self.cfg.monitor not in report or not isinstance(report[self.cfg.monitor], (int, float)):
                    raise FerError(
                        f"train.monitor: metric '{self.cfg.monitor}' is not produced; "
                        f"available: {', '.join(k for k, v in report.items() if isinstance(v, float))}"
                    )
                score = float(report[self.cfg.monitor])
                row = {"epoch": epoch, **train_logs, **{f"val_{k}": float(v) for k, v in report.items()
                                                         if isinstance(v, float)}}
                self.state.epoch = epoch
                self.state.history.append(row)
                improved = self._better(score)
                if improved:
                    self.state.best_score, self.state.best_epoch, self.state.bad_epochs = score, epoch, 0
                    self.save_best()
                else:
                    self.state.bad_epochs += 1
                stop = bool(self.cfg.early_stopping_patience) and self.state.bad_epochs >= self.cfg.early_stopping_patience
                if stop:
                    self.run.state["stopped_early_at"] = epoch
                self._emit("on_validation_end", epoch, report)
                self._emit("on_epoch_end", epoch, row)
                self.save_last()
                if stop:
                    break
            final = self.final_evaluation()
            if self.finalize is not None:
                self.finalize(final)
            self._emit("on_fit_end", final)
            return final
        except BaseException as e:
            self._emit("on_exception", e)
            raise

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        seed_everything(derive_seed(self.cfg.seed, epoch) + 17)  # dropout etc.: a function of (seed, epoch)
        loader = self.train_loader.epoch(epoch)
        n_batches = len(self.train_loader)
        accum = self.cfg.accumulate_steps
        self._emit("on_epoch_start", epoch, n_batches)
        total_loss, seen, t0 = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            b = _to_device(batch, self.device, self.cfg.channels_last)
            for bt in self.batch_transforms:
                b = bt(b, epoch)
            with autocast(self.device, self.precision):
                outputs = self.forward(b["image"])
                loss, parts = self.loss(outputs, b)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss became {loss_value} at epoch {epoch}, batch {i + 1}; stopped. The last good "
                    f"checkpoint (epoch {self.state.epoch}) is kept in {self.run.out_dir / LAST} "
                    "(lower the learning rate or enable train.clip_grad_norm)"
                )
            scaled = loss / accum
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            last_in_epoch = i + 1 == n_batches
            if (i + 1) % accum == 0 or last_in_epoch:
                self._optimizer_step()
            n = b["image"].shape[0]
            total_loss += loss_value * n
            seen += n
            elapsed = time.perf_counter() - t0
            self._emit("on_train_batch_end", epoch, i + 1, {
                "loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"],
                "img_s": seen / elapsed if elapsed > 0 else 0.0,
                **{f"loss_{k}": float(v) for k, v in parts.items()},
            })
        if self.scheduler is not None and getattr(self.scheduler, "interval", "epoch") == "epoch":
            self.scheduler.step()
        elapsed = time.perf_counter() - t0
        return {"train_loss": total_loss / max(seen, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "img_per_s": seen / elapsed if elapsed > 0 else 0.0, "epoch_seconds": elapsed}

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        if self.scheduler is not None and getattr(self.scheduler, "interval", "epoch") == "step":
            self.scheduler.step()

    def validate(self) -> dict[str, Any]:
        pred = predict(self.forward, self.val_loader, self.device, self.precision, self.cfg.channels_last)
        self.last_predictions = pred  # logits + labels, e.g. for calibration after the final evaluation
        return metrics_from_predictions(pred, self.run.classes, self.au_names)

    def final_evaluation(self) -> dict[str, Any]:
        """Metrics of the best checkpoint on the validation split."""
        best = self.run.out_dir / BEST
        if best.is_file():
            self.model.load_state_dict(checkpoint.load(best, self.device)["model"])
        report = self.validate()
        report["best_epoch"] = self.state.best_epoch
        report["epochs_run"] = self.state.epoch
        report["monitor"] = self.cfg.monitor
        return report


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
