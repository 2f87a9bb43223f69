"""Model EMA as a callback: an exponential moving average of the weights (timm's ModelEmaV3),
updated after every optimizer step, optionally validated (and so checkpointed as best) in place
of the raw weights. Its state is saved in every last.pt, so `--resume` continues it exactly.

    [[callbacks]]
    plugin = "ema"
    decay = 0.999
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from fer_core.api import Callback, RunInfo, hookimpl


class ModelEma(Callback):
    def __init__(self, decay: float, warmup: bool, evaluate: bool) -> None:
        self.decay, self.warmup, self.evaluate = decay, warmup, evaluate
        self.ema: Any = None
        self.last_step = 0
        self._pending: dict[str, Any] | None = None
        self._raw: dict[str, Any] | None = None

    def on_fit_start(self, run: RunInfo) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(run.model, decay=self.decay, use_warmup=self.warmup)
        if self._pending is not None:  # resumed: the average continues from the checkpoint
            self.ema.module.load_state_dict(self._pending["weights"])
            self.last_step = int(self._pending["last_step"])
            self._pending = None

    def on_train_batch_end(self, run: RunInfo, epoch: int, batch: int, logs: dict[str, float]) -> None:
        step = int(logs["step"])
        if step != self.last_step:  # an optimizer step happened (gradient accumulation skips batches)
            self.ema.update(run.model, step=step)
            self.last_step = step

    def on_validation_start(self, run: RunInfo, epoch: int) -> None:
        if self.evaluate:  # validate (and keep as best) the averaged weights
            self._raw = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            run.model.load_state_dict(self.ema.module.state_dict())

    def on_validation_end(self, run: RunInfo, epoch: int, report: dict[str, Any]) -> None:
        if self._raw is not None:  # training goes on with the raw weights
            run.model.load_state_dict(self._raw)
            self._raw = None

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"weights": self.ema.module.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._pending = state


def make_ema(*, decay: Annotated[float, Field(gt=0, lt=1)] = 0.999, warmup: bool = False,
             evaluate: bool = True) -> ModelEma:
    """`decay` per optimizer step (0.999 ≈ an average over the last ~1000 steps); `warmup`
    ramps the decay up over the first steps (timm's decay warmup); with `evaluate` the EMA
    weights are validated, picked as best and saved to best.pt."""
    return ModelEma(decay, warmup, evaluate)


@hookimpl
def register_callbacks(register):
    register("ema", make_ema)
