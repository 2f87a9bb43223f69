"""TensorBoard tracking as a callback: the recipe (text and hparams), per-epoch train/val scalars,
the final metrics and the confusion matrix, in one event directory per run.

    [tracking]
    plugin = "tensorboard"
    log_dir = ""              # default: <run dir>/tensorboard

The x axis is the epoch (global_step = epoch). A resumed fer run appends to the same directory:
its writer purges every event from the last checkpointed epoch on (what a crash after that
checkpoint left, and the final summary of a shorter run) and re-logs that epoch, so each step
is there once, in TensorBoard's own reader and in its data server alike.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from fer_core.api import Callback, FerError, RunDir, RunInfo, confusion_matrix_figure, dump_toml, hookimpl, warn

#: metrics the hparams dashboard shows beside each run's hyperparameters (scalars logged at fit end)
HPARAM_METRICS = ("final/accuracy", "final/macro_f1", "final/balanced_accuracy")


def scalar_tag(key: str) -> str:
    """History keys as TensorBoard sections: val_accuracy → val/accuracy, train_loss → train/loss,
    lr → train/lr (anything else the loop reports per epoch belongs to training too)."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe → {"model.backbone.name": "resnet18", ...}: numbers, bools and strings kept,
    anything else (lists, empty tables) as its text, as the hparams plugin wants."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)[:500]
    return out


class TensorboardTracker(Callback):
    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.writer: Any = None
        self.path: Path | None = None
        self.last: dict[str, Any] = {}  # the last epoch logged: {"epoch": N, "row": {...}}, kept in last.pt
        self._resumed_from: dict[str, Any] = {}

    # --------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return dict(self.last)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resumed_from = dict(state)
            self.last = dict(state)

    # --------------------------------------------------------------- hooks
    def on_fit_start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(self.log_dir) if self.log_dir else run.out_dir / "tensorboard"
        start, purge = 0, None
        if run.resumed:
            if self._resumed_from:  # continue after the checkpointed epoch N: drop steps >= N, re-log N
                start = purge = int(self._resumed_from["epoch"])
            elif not (run.out_dir / RunDir.LAST).is_file():  # nothing was checkpointed: start over
                purge = 0
            # else: the checkpoint was written without this tracker; append what comes
        elif _has_events(self.path) and not self.log_dir:  # this run's own directory: a failed earlier start
            purge = 0
        elif _has_events(self.path):
            warn(f"tracking.log_dir {self.path}: already holds TensorBoard events of another run; this run's "
                 "are added to them (give each run its own log_dir)")
        try:
            self.writer = SummaryWriter(log_dir=str(self.path), purge_step=purge)
        except OSError as e:
            raise FerError(f"tracking.log_dir {self.path}: cannot write TensorBoard events "
                           f"({e.strerror or e}); fix it, or run without tracking: -o tracking.enabled=false") from None
        run.files["tensorboard"] = self.path
        self._log_recipe(run, start)
        if purge and self._resumed_from.get("row"):
            self._log_row(purge, self._resumed_from["row"])
        self.writer.flush()

    def _log_recipe(self, run: RunInfo, step: int) -> None:
        toml = dump_toml(run.recipe)
        head = f"run dir `{run.out_dir.resolve()}`" + (f", resumed after epoch {step}" if run.resumed else "")
        # indented: a markdown code block, so the TOML shows verbatim
        self.writer.add_text("recipe", head + "\n\n" + "\n".join("    " + line for line in toml.splitlines()), step)
        if run.plugin_versions:
            self.writer.add_text("plugins", "\n".join(f"- {d} {v}" for d, v in sorted(run.plugin_versions.items())),
                                 step)
        from torch.utils.tensorboard.summary import hparams

        # in this run's own directory (add_hparams would make a sub-run): the HPARAMS dashboard
        # lists each run's recipe values beside its final metrics
        for summary in hparams(flatten(run.recipe), {m: 0.0 for m in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary, step)

    def _log_row(self, epoch: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(key), float(value), epoch)

    def on_epoch_end(self, run: RunInfo, epoch: int, metrics: dict[str, float]) -> None:
        self._log_row(epoch, metrics)
        self.writer.flush()  # an epoch is minutes: show it now, and keep it if the process dies
        self.last = {"epoch": epoch, "row": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}

    def on_fit_end(self, run: RunInfo, final: dict[str, Any]) -> None:
        step = int(final.get("epochs_run") or self.last.get("epoch") or 0)
        for key, value in final.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"final/{key}", value, step)
        if final.get("confusion_matrix") and final.get("classes"):
            fig = confusion_matrix_figure(final["confusion_matrix"], final["classes"],
                                          title=f"validation, best epoch {final.get('best_epoch')}")
            self.writer.add_figure("val/confusion_matrix", fig, step)  # closes the figure
        self._close()

    def on_exception(self, run: RunInfo, error: BaseException) -> None:
        try:
            self._close()  # what was logged stays readable; a resume purges and continues
        except Exception:  # noqa: BLE001 - a failing writer must not hide the first error
            pass

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _has_events(path: Path) -> bool:
    return path.is_dir() and any(p.name.startswith("events.out.tfevents.") for p in path.iterdir())


def make_tensorboard(*, log_dir: str = "") -> TensorboardTracker:
    """`log_dir`: this run's event directory (default: `<run dir>/tensorboard`; a relative path is
    taken from the working directory). View with `tensorboard --logdir runs`."""
    # checked while the recipe is built, before the run directory is written
    if importlib.util.find_spec("tensorboard") is None:
        raise FerError("tracking.plugin 'tensorboard': the tensorboard package is not installed "
                       "(pip install tensorboard), or run without tracking: -o tracking.enabled=false")
    if log_dir:
        check_log_dir(Path(log_dir))
    return TensorboardTracker(log_dir)


def check_log_dir(path: Path) -> None:
    """A log_dir that is a file, or under a file or an unwritable directory, fails here and now."""
    fix = "; fix it, or run without tracking: -o tracking.enabled=false"
    node = path
    while not node.exists() and node != node.parent:
        node = node.parent
    if not node.is_dir():
        raise FerError(f"tracking.log_dir {path}: {node} is not a directory" + fix)
    if not os.access(node, os.W_OK | os.X_OK):
        raise FerError(f"tracking.log_dir {path}: {node} is not writable" + fix)


@hookimpl
def register_callbacks(register):
    register("tensorboard", make_tensorboard)
