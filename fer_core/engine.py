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

from . import dist
from .data import RANK_SEED_STEP, EpochSeededLoader, derive_seed, seed_everything
from .errors import NonFiniteLossError
from .hardware import Precision, autocast, to_device
from .interfaces import Batch, Callback, Loss, RunInfo
from .metrics import metrics_from_predictions
from .model import FerModel
from .predictor import predict
from .rundir import RunDir


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
        self.rundir = RunDir(run.out_dir)
        run.model, run.optimizer = model, optimizer  # callbacks may act on them (EMA, pruning)
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
        self.train_forward: Any = self.forward
        if dist.world_size() > 1:  # gradients averaged across processes in backward
            from torch.nn.parallel import DistributedDataParallel

            self.train_forward = DistributedDataParallel(self.model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)

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

    def _callback_keys(self) -> list[str]:
        """Class name + occurrence (``ModelEma#0``): stable when other callbacks come or go on resume."""
        seen: dict[str, int] = {}
        keys = []
        for cb in self.callbacks:
            name = type(cb).__name__
            keys.append(f"{name}#{seen.get(name, 0)}")
            seen[name] = seen.get(name, 0) + 1
        return keys

    def _callback_states(self) -> dict[str, Any]:
        return {k: cb.state_dict() for k, cb in zip(self._callback_keys(), self.callbacks)}

    def save_last(self) -> None:
        self.rundir.save(
            RunDir.LAST,
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
                "callbacks": self._callback_states(),
            },
        )

    def save_best(self) -> None:
        self.rundir.save(RunDir.BEST, {**self._meta(), "model": self.model.state_dict(), "epoch": self.state.epoch})

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
        saved = ckpt.get("callbacks") or {}
        for key, cb in zip(self._callback_keys(), self.callbacks):
            if key in saved:
                cb.load_state_dict(saved[key])
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
                t_epoch = time.perf_counter()
                train_logs = self._train_epoch(epoch)
                self._emit("on_validation_start", epoch)
                report = self.validate()
                # training + validation: summed over history, the compute of a run resumed any number of times
                train_logs["epoch_wall_seconds"] = time.perf_counter() - t_epoch
                score = float(report[self.cfg.monitor])  # a name it does not produce is refused before epoch 1 (runner)
                if self.scheduler is not None and self.scheduler.interval == "metric":
                    self.scheduler.step(score)
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
        # dropout etc.: a function of (seed, epoch, rank)
        seed_everything(derive_seed(self.cfg.seed, epoch) + 17 + RANK_SEED_STEP * dist.rank())
        loader = self.train_loader.epoch(epoch)
        n_batches = len(self.train_loader)
        accum = self.cfg.accumulate_steps
        self._emit("on_epoch_start", epoch, n_batches)
        total_loss, seen, t0 = 0.0, 0, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            b = to_device(batch, self.device, self.cfg.channels_last)
            for bt in self.batch_transforms:
                b = bt(b, epoch)
            step_now = (i + 1) % accum == 0 or i + 1 == n_batches
            # DDP: average gradients across processes only on the micro-batch that steps
            sync = contextlib.nullcontext() if step_now or self.train_forward is self.forward else self.train_forward.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    outputs = self.train_forward(b["image"])
                    loss, parts = self.loss(outputs, b)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss became {loss_value} at epoch {epoch}, batch {i + 1}; stopped. "
                        + ("The last good " if self.state.epoch else "")
                        + (f"checkpoint (epoch {self.state.epoch}) is kept in {self.rundir / RunDir.LAST} "
                           if self.state.epoch else "no checkpoint was written (it failed in the first epoch) ")
                        + "(lower the learning rate or enable train.clip_grad_norm)"
                    )
                scaled = loss / accum
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if step_now:
                self._optimizer_step()
            n = b["image"].shape[0]
            total_loss += loss_value * n
            seen += n
            elapsed = time.perf_counter() - t0
            self._emit("on_train_batch_end", epoch, i + 1, {
                "loss": loss_value, "lr": self.optimizer.param_groups[0]["lr"], "step": self.state.global_step,
                "img_s": seen / elapsed if elapsed > 0 else 0.0,
                **{f"loss_{k}": float(v) for k, v in parts.items()},
            })
        if self.scheduler is not None and self.scheduler.interval == "epoch":
            self.scheduler.step()
        elapsed = time.perf_counter() - t0
        total_loss, seen = dist.sum_all([total_loss, float(seen)])  # every process's images
        return {"train_loss": total_loss / max(seen, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "img_per_s": seen / elapsed if elapsed > 0 else 0.0, "epoch_seconds": elapsed}

    def _optimizer_step(self) -> None:
        if isinstance(self.loss, nn.Module):
            dist.average_gradients(self.loss.parameters())
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
        if self.scheduler is not None and self.scheduler.interval == "step":
            self.scheduler.step()

    def validate(self) -> dict[str, Any]:
        pred = dist.gather_rows(predict(self.forward, self.val_loader, self.device, self.precision, self.cfg.channels_last))
        self.last_predictions = pred  # logits + labels, e.g. for calibration after the final evaluation
        return metrics_from_predictions(pred, self.run.classes, self.au_names)

    def final_evaluation(self) -> dict[str, Any]:
        """Metrics of the best checkpoint on the validation split."""
        dist.barrier()  # rank 0 has written best.pt
        if (self.rundir / RunDir.BEST).is_file():
            self.model.load_state_dict(self.rundir.load(RunDir.BEST, self.device)["model"])
        report = self.validate()
        report["best_epoch"] = self.state.best_epoch
        report["epochs_run"] = self.state.epoch
        report["monitor"] = self.cfg.monitor
        return report


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
