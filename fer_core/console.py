"""What people see in the terminal: a progress bar while training, tables afterwards."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .interfaces import Callback, RunInfo

console = Console(stderr=True)
stdout = Console()


class ProgressBar(Callback):
    """Epoch, batch, loss, lr and img/s, refreshed a few times a second."""

    #: seconds between bar updates: updating per batch costs ~5% of a fast CPU step
    min_interval = 0.2

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.progress: Progress | None = None
        self.task: Any = None
        self._last = 0.0
        self._num_batches = 0

    def on_fit_start(self, run: RunInfo) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[img_s]:.0f} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.progress.start()

    def on_epoch_start(self, run: RunInfo, epoch: int, num_batches: int) -> None:
        assert self.progress is not None
        self.task = self.progress.add_task("train", total=num_batches, epoch=epoch, epochs=self.epochs,
                                           loss=float("nan"), lr=0.0, img_s=0.0)
        self._num_batches = num_batches

    def on_train_batch_end(self, run: RunInfo, epoch: int, batch: int, logs: dict[str, float]) -> None:
        assert self.progress is not None
        now = time.monotonic()
        if now - self._last < self.min_interval and batch < self._num_batches:
            return
        self._last = now
        self.progress.update(self.task, completed=batch, loss=logs["loss"], lr=logs["lr"], img_s=logs["img_s"])

    def on_epoch_end(self, run: RunInfo, epoch: int, metrics: dict[str, float]) -> None:
        console.print(
            f"  epoch {epoch}: train_loss {metrics['train_loss']:.4f}  val acc {metrics.get('val_accuracy', 0):.4f}  "
            f"val macro-F1 {metrics.get('val_macro_f1', 0):.4f}  ({metrics['epoch_seconds']:.0f}s, "
            f"{metrics['img_per_s']:.0f} img/s)"
        )

    def on_fit_end(self, run: RunInfo, final: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, run: RunInfo, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def metrics_tables(m: dict[str, Any], title: str = "validation") -> None:
    summary = Table(title=f"{title}: {m.get('num_samples', '?')} images")
    for col in ("accuracy", "macro-F1", "balanced acc (UAR)"):
        summary.add_column(col, justify="right")
    cols = [f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['balanced_accuracy']:.4f}"]
    if "au_mean_f1" in m:
        summary.add_column("AU mean F1", justify="right")
        cols.append(f"{m['au_mean_f1']:.4f}")
    summary.add_row(*cols)
    stdout.print(summary)
    per = Table(title="per class")
    for col, j in (("class", "left"), ("precision", "right"), ("recall", "right"), ("f1", "right"), ("support", "right")):
        per.add_column(col, justify=j)
    for name, row in m["per_class"].items():
        per.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    stdout.print(per)
    cal = m.get("calibration")
    if cal:
        stdout.print(f"calibration: temperature {cal['temperature']:.3f}; ECE {cal['ece']:.4f} → "
                     f"{cal['ece_calibrated']:.4f}; NLL {cal['nll']:.4f} → {cal['nll_calibrated']:.4f}")
