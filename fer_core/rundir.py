"""The one owner of a run directory: its file names, its lock, its status, atomic I/O.

Nothing else in fer spells a run's file names. A run directory is owned by one process for the
run's life (an exclusive ``fcntl`` lock on ``.lock``): a second ``fer run``/``--resume`` on it is
refused at once, naming the holder.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from . import checkpoint, dist
from .errors import FerError


class RunDir:
    RECIPE = "recipe.toml"
    BEST = "best.pt"
    LAST = "last.pt"
    METRICS = "metrics.json"
    HISTORY = "history.json"
    STATUS = "run.json"
    RESUME_LOG = "resume.log"
    CONFUSION = "confusion_matrix.png"
    LOCK = ".lock"
    #: a packed run (`fer pack`, shipped models): the best weights as safetensors, the rest of the
    #: checkpoint (classes, preprocessing, calibration) as JSON beside them, no pickle at all
    PACKED_WEIGHTS = "model.safetensors"
    PACKED_META = "model.json"
    #: stale ``.name.xxxx.tmp`` files of writes killed half-way are older than this
    STALE_TMP_SECONDS = 60

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ what is there
    def is_run(self) -> bool:
        return (self.path / self.RECIPE).is_file()

    def require_run(self) -> "RunDir":
        if not self.path.is_dir():
            raise FerError(f"{self.path}: no such run directory")
        if not self.is_run():
            raise FerError(f"{self.path}: not a fer run directory (no {self.RECIPE})")
        return self

    def has_checkpoint(self) -> bool:
        return (self.path / self.LAST).is_file()

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.is_file():
            return default
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise FerError(f"{path}: not valid JSON ({e}); restore it or remove the file") from None
        if default is not None and not isinstance(obj, type(default)):  # e.g. a list where a dict belongs
            raise FerError(f"{path}: expected a JSON {type(default).__name__}, not {type(obj).__name__}; restore or remove it")
        return obj

    def status(self) -> dict[str, Any]:
        return self.read_json(self.STATUS, {}) or {}

    # ------------------------------------------------------------------ writing (rank 0 only)
    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        if dist.is_main():
            checkpoint.atomic_write_json(path, obj)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        if dist.is_main():
            checkpoint.atomic_write_text(path, text)
        return path

    def write_status(self, *, drop: tuple[str, ...] = (), **fields: Any) -> None:
        """Merge fields into run.json; ``drop`` removes stale ones (e.g. a resumed run's old error)."""
        status = {k: v for k, v in self.status().items() if k not in drop}
        status.update(fields)
        self.write_json(self.STATUS, status)

    def log_resume(self, line: str) -> None:
        if dist.is_main():
            stamp = dt.datetime.now().isoformat(timespec="seconds")
            with open(self.path / self.RESUME_LOG, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {line}\n")

    def load(self, name: str, map_location: Any = "cpu") -> dict[str, Any]:
        return checkpoint.load(self.path / name, map_location)

    def best_file(self) -> Path:
        best = self.path / self.BEST
        return best if best.is_file() or not (self.path / self.PACKED_WEIGHTS).is_file() else self.path / self.PACKED_WEIGHTS

    def load_best(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The best checkpoint: ``best.pt``, or a packed run's safetensors + JSON."""
        path = self.best_file()
        if path.name != self.PACKED_WEIGHTS:
            return self.load(self.BEST, map_location)
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            weights = load_file(path, device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise FerError(f"{path}: not a readable safetensors file ({e})") from None
        return {**self.read_json(self.PACKED_META, {}), "model": weights}

    def save(self, name: str, state: dict[str, Any]) -> None:
        if dist.is_main():
            checkpoint.save(self.path / name, state)

    def store_calibration(self, calibration: dict[str, Any]) -> None:
        """Put the fitted calibrator (plugin, params, state) into best.pt (a packed run's model.json)."""
        if self.best_file().name == self.PACKED_WEIGHTS:
            self.write_json(self.PACKED_META, {**self.read_json(self.PACKED_META, {}), "calibration": calibration})
            return
        best = self.load(self.BEST)
        best["calibration"] = calibration
        best.pop("temperature", None)
        self.save(self.BEST, best)

    def clean_stale_tmp(self) -> int:
        """Remove temporary files left by writes that were killed (older than a minute)."""
        n, now = 0, time.time()
        for p in self.path.glob(".*.tmp"):
            with suppress(OSError):  # gone already, or not ours to remove: not worth failing a run over
                if now - p.stat().st_mtime > self.STALE_TMP_SECONDS:
                    p.unlink()
                    n += 1
        return n

    # ------------------------------------------------------------------ ownership
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for this process; refuse at once if another process holds it."""
        if not dist.is_main():
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / self.LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise FerError(f"{self.path}: in use by {holder}; wait for it to finish, or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
