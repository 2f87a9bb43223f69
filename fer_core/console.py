"""What people see in the terminal: a progress bar while training, tables afterwards."""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .interfaces import Callback, RunInfo

_QUIET = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
console = Console(stderr=True, soft_wrap=True, quiet=_QUIET)
stdout = Console(quiet=_QUIET)


def warn(message: str) -> None:
    """A warning line on stderr, printed as text (names in it are never read as markup)."""
    console.print(f"warning: {message}", markup=False, highlight=False, style="bold yellow")


class ProgressBar(Callback):
    """Epoch, batch, loss, lr and img/s: a live bar on a terminal; otherwise (a log file, nohup,
    CI) a plain line every ``plain_interval`` seconds. Every line also goes to the run's
    ``train.log``."""

    #: seconds between bar updates: updating per batch costs ~5% of a fast CPU step
    min_interval = 0.2
    plain_interval = 30.0
    #: validation accuracy that, in the first fifth of training, suggests a leak between the splits
    leak_accuracy = 0.98

    def __init__(self, epochs: int, live: bool | None = None) -> None:
        self.epochs = epochs
        self.live = console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.task: Any = None
        self._last = 0.0
        self._num_batches = 0
        self._log: Any = None
        self._epoch_t0 = 0.0
        self._leak_warned = False

    def _line(self, text: str, echo: bool = True) -> None:
        if echo:
            console.print(text, markup=False, highlight=False)
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self._log.flush()

    def on_fit_start(self, run: RunInfo) -> None:
        try:
            self._log = open(run.out_dir / "train.log", "a", encoding="utf-8")
        except OSError:
            self._log = None
        run.files["log"] = run.out_dir / "train.log"
        self._line(f"fit: {self.epochs} epoch(s), run dir {run.out_dir}" + (" (resumed)" if run.resumed else ""),
                   echo=False)
        if not self.live:
            return
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
        self._num_batches = num_batches
        self._epoch_t0 = self._last = time.monotonic()
        if self.progress is not None:
            self.task = self.progress.add_task("train", total=num_batches, epoch=epoch, epochs=self.epochs,
                                               loss=float("nan"), lr=0.0, img_s=0.0)

    def on_train_batch_end(self, run: RunInfo, epoch: int, batch: int, logs: dict[str, float]) -> None:
        now = time.monotonic()
        if self.progress is not None:
            if now - self._last < self.min_interval and batch < self._num_batches:
                return
            self._last = now
            self.progress.update(self.task, completed=batch, loss=logs["loss"], lr=logs["lr"], img_s=logs["img_s"])
            return
        if now - self._last < self.plain_interval:
            return
        self._last = now
        elapsed = now - self._epoch_t0
        eta = elapsed / batch * (self._num_batches - batch)
        self._line(f"epoch {epoch}/{self.epochs} batch {batch}/{self._num_batches} loss {logs['loss']:.4f} "
                   f"lr {logs['lr']:.2e} {logs['img_s']:.0f} img/s elapsed {elapsed:.0f}s eta {eta:.0f}s")

    def on_epoch_end(self, run: RunInfo, epoch: int, metrics: dict[str, float]) -> None:
        acc = metrics.get("val_accuracy", 0.0)
        self._line(
            f"  epoch {epoch}: train_loss {metrics['train_loss']:.4f}  val acc {acc:.4f}  "
            f"val macro-F1 {metrics.get('val_macro_f1', 0):.4f}  ({metrics['epoch_seconds']:.0f}s, "
            f"{metrics['img_per_s']:.0f} img/s)"
        )
        # CK+ frames split at random: val 0.988 in the first epochs, test 0.746 (issue 11)
        if acc >= self.leak_accuracy and epoch <= max(2, self.epochs // 5) and not self._leak_warned:
            self._leak_warned = True
            msg = (f"validation accuracy {acc:.3f} after epoch {epoch} of {self.epochs}: near-perfect this early "
                   "usually means the validation images also appear in training (duplicates, or frames of one "
                   "subject on both sides); check `fer data` and split by group (docs/data.md)")
            warn(msg)
            self._line(f"warning: {msg}", echo=False)

    def on_fit_end(self, run: RunInfo, final: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, run: RunInfo, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._log is not None:
            self._log.close()
            self._log = None


def metrics_tables(m: dict[str, Any], title: str = "validation") -> None:
    summary = Table(title=Text(f"{title}: {m.get('num_samples', '?')} images"))  # titles name run dirs: no markup
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
        per.add_row(Text(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    stdout.print(per)
    cal = m.get("calibration")
    if cal:
        state = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in (cal.get("state") or {}).items())
        fitted = " (fitted on this split: in-sample)" if cal.get("in_sample") else ""
        stdout.print(f"calibration {cal.get('calibrator', cal.get('calibration', ''))} {state}{fitted}; ECE {cal['ece']:.4f} → "
                     f"{cal['ece_calibrated']:.4f}; NLL {cal['nll']:.4f} → {cal['nll_calibrated']:.4f}",
                     markup=False, highlight=False)
