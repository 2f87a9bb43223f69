"""MLflow tracking as a callback: recipe, params, per-epoch metrics, confusion matrix, model.

Any tracking URI works (a sqlite file by default, or an MLflow server). A run that raises is
marked FAILED; a resumed fer run continues the same MLflow run.

Run groups (``RunInfo.group``: the trials of a `fer tune` study, the folds of `fer cv`, the seeds
of `fer repeat`): each group has one parent run in the same experiment (found by its tag
``fer.group_key``, created under a lock file in the group's directory, so that parallel workers
make one), and each member is a nested run (tag ``mlflow.parentRunId``). The parent is RUNNING
while any of its members runs, and FINISHED (KILLED after a Ctrl-C) when the last running one
ends; its end time is that member's. A member's own status says how it ended.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fer_core.api import Callback, FerError, RunDir, RunInfo, hookimpl


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowTracker(Callback):
    def __init__(self, uri: str, experiment: str, run_name: str, log_model: bool) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.log_model = log_model
        self.client: Any = None
        self.run_id: str | None = None
        self.group: dict[str, str] | None = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def on_fit_start(self, run: RunInfo) -> None:
        with _store_errors(self.uri), _sqlite_creation_lock(self.uri):
            self._start(run)
        run.files["mlflow"] = (f"{self.uri} (experiment '{self.experiment}', run {self.run_id}"
                               + (f", nested in {self.parent_id})" if self.parent_id else ")"))

    def _start(self, run: RunInfo) -> None:
        self.client = self._client()
        self.group = dict(run.group) if run.group else None
        self.run_id = run.state.get("mlflow_run_id")
        if self.run_id:  # resumed fer run: continue its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            if self.group:
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
                self.parent_id = self._parent()
                # a resumed tune trial may have a new number; a run from before groups gets its parent
                for k, v in self._member_tags().items():
                    self.client.set_tag(self.run_id, k, v)
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database file
                db = Path(self.uri.removeprefix("sqlite:///")).resolve()
                artifact_location = (db.parent / "mlartifacts" / self.experiment).as_uri()
            try:
                exp_id = self.client.create_experiment(self.experiment, artifact_location=artifact_location)
            except Exception:  # noqa: BLE001 - another process (a tune worker) created it just now
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        tags = {"fer.run_dir": str(run.out_dir.resolve())}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        for dist, version in run.plugin_versions.items():
            tags[f"fer.plugin.{dist}"] = version
        self.experiment_id = exp_id
        if self.group:
            self.parent_id = self._parent()
            tags.update(self._member_tags())
        name = self.run_name or (self.group or {}).get("member") or run.out_dir.name
        created = self.client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = created.info.run_id
        run.state["mlflow_run_id"] = self.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(run.recipe).items()]
        for i in range(0, len(params), 90):
            self.client.log_batch(self.run_id, params=params[i:i + 90])
        recipe_file = run.out_dir / RunDir.RECIPE
        if recipe_file.is_file():
            self.client.log_artifact(self.run_id, str(recipe_file))

    def on_epoch_end(self, run: RunInfo, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with _store_errors(self.uri):
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, epoch) for k, v in metrics.items()
                                                        if k != "epoch"])

    def on_fit_end(self, run: RunInfo, final: dict[str, Any]) -> None:
        with _store_errors(self.uri):
            self._finish(run, final)

    def _finish(self, run: RunInfo, final: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        scalars = [Metric(f"final_{k}", float(v), ts, 0) for k, v in final.items() if isinstance(v, float)]
        self.client.log_batch(self.run_id, metrics=scalars)
        for f in [run.files.get(n) for n in ("metrics", "history", "confusion_matrix", "log")] + [run.out_dir / RunDir.STATUS]:
            if f is not None and Path(f).is_file():
                self.client.log_artifact(self.run_id, str(f))
        best = run.files.get("best")
        if self.log_model and best is not None and Path(best).is_file():
            self.client.log_artifact(self.run_id, str(best), artifact_path="model")
        self.client.set_terminated(self.run_id, status="FINISHED")
        self._member_ended("FINISHED")

    def on_exception(self, run: RunInfo, error: BaseException) -> None:
        try:
            self._fail(error)
        except Exception:  # noqa: BLE001 - the store itself failing must not hide the first error
            pass

    def _fail(self, error: BaseException) -> None:
        if self.client is not None and self.run_id:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self.client.set_tag(self.run_id, "fer.error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, status=status)
            self._member_ended(status)

    # ---------------------------------------------------------------- run groups: parent and nested runs

    def _member_tags(self) -> dict[str, str]:
        g = self.group or {}
        return {"mlflow.parentRunId": self.parent_id or "", "fer.group_id": str(g.get("id", "")),
                "fer.group_kind": str(g.get("kind", "")), "fer.group_member": str(g.get("member", ""))}

    def _parents(self, key: str) -> list[Any]:
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`fer.group_key` = '{key}'",
                                        max_results=100)
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _parent(self) -> str:
        """The group's parent run (RUNNING from now on): found by its key, else created. The lock
        makes parallel members of one machine create one; members whose lock is not shared (other
        machines) settle on the oldest parent, and a duplicate just created is deleted."""
        g = self.group or {}
        key = group_key(g)
        with _group_lock(g):
            found = self._parents(key)
            if found:
                parent = found[0].info.run_id
                self.client.update_run(parent, status="RUNNING")
                return parent
            kind = str(g.get("kind", "group"))
            created = self.client.create_run(self.experiment_id, run_name=str(g.get("name") or kind), tags={
                "fer.group_key": key, "fer.group_id": str(g.get("id", "")), "fer.group_kind": kind,
                "fer.group_name": str(g.get("name", "")), "mlflow.note.content":
                    f"fer {kind} {g.get('name', '')}: its runs are nested under this one ({g.get('id', '')})"})
            mine = created.info.run_id
            oldest = (self._parents(key) or [created])[0].info.run_id
            if oldest != mine:
                self.client.delete_run(mine)
            return oldest

    def _member_ended(self, status: str) -> None:
        """This member has ended (its own status is set): the parent ends with the last running one."""
        if not self.parent_id:
            return
        with _group_lock(self.group or {}):
            running = self.client.search_runs(
                [self.experiment_id], max_results=1,
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and attributes.status = 'RUNNING'")
            if not running:
                self.client.set_terminated(self.parent_id, status="KILLED" if status == "KILLED" else "FINISHED")


def make_mlflow(*, uri: str = "sqlite:///mlflow.db", experiment: str = "fer", run_name: str = "",
                log_model: bool = True) -> MlflowTracker:
    """`uri`: any MLflow tracking URI (sqlite:///path.db, http://server:5000, ...)."""
    # checked here, while the recipe is built: a store that cannot work must fail the run before its
    # directory is written (fit start is too late: a resume would already have rewritten the run's files)
    check_reachable(uri)
    check_sqlite_file(uri)
    return MlflowTracker(uri, experiment, run_name, log_model)


def check_sqlite_file(uri: str) -> None:
    """A sqlite store in a missing or unwritable directory, or whose file is unwritable or no
    SQLite database, without creating anything (the store is opened when training starts)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    fix = "; fix it, or run without tracking: -o tracking.enabled=false"
    if not db.parent.is_dir():
        raise FerError(f"tracking.uri {uri}: directory {db.parent} does not exist" + fix)
    # sqlite writes a journal beside the database: the directory must be writable too
    unwritable = [p for p in (db.parent, db) if p.exists() and not os.access(p, os.W_OK)]
    if unwritable:
        raise FerError(f"tracking.uri {uri}: {unwritable[0]} is not writable" + fix)
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return  # a new store
    except OSError as e:
        raise FerError(f"tracking.uri {uri}: cannot read {db} ({e.strerror or e})" + fix) from None
    if header and header != b"SQLite format 3\x00":  # an empty file is what sqlite itself creates
        raise FerError(f"tracking.uri {uri}: {db} is not an SQLite database" + fix)


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """An MLflow server that cannot be reached fails in seconds, not after minutes of retries."""
    from urllib.parse import urlparse

    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        socket.create_connection((u.hostname or "localhost", u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        raise FerError(f"tracking.uri {uri}: MLflow server not reachable ({e.strerror or e}); start it, or run "
                       "without tracking: -o tracking.enabled=false") from None


@contextmanager
def _store_errors(uri: str):
    """Store failures (corrupt or unwritable sqlite file, server errors) as one line."""
    try:
        yield
    except FerError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException, sqlalchemy and OS errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise FerError(f"tracking.uri {uri}: the MLflow store failed ({type(e).__name__}: {first}); fix or "
                       "move it, or run without tracking: -o tracking.enabled=false") from None


def group_key(group: dict[str, Any]) -> str:
    """The parent run's search key: a hash of the group's kind and id (a path may hold quotes)."""
    return hashlib.sha256(f"{group.get('kind', '')}\0{group.get('id', '')}".encode()).hexdigest()[:32]


@contextmanager
def _group_lock(group: dict[str, Any]):
    """A lock file in the group's directory (or, when its id is no directory here, in the temp dir)."""
    where = Path(str(group.get("id", "")))
    path = where / ".mlflow-group.lock" if where.is_absolute() and where.is_dir() else \
        Path(tempfile.gettempdir()) / f"fer-mlflow-group-{group_key(group)}.lock"
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def _sqlite_creation_lock(uri: str):
    """Two processes creating one new sqlite store at once crash in its schema migration:
    creation (and the first access) is serialised by a lock file beside the database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.parent.is_dir():
        raise FerError(f"tracking.uri {uri}: directory {db.parent} does not exist")
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@hookimpl
def register_callbacks(register):
    register("mlflow", make_mlflow)
