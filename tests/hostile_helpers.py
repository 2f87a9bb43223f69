"""Helpers of the hostile-input suite: the `fer` command as a user runs it, and what it may leave
behind (hashes of a directory before and after)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
#: what a failed command may add to a directory it was pointed at: the run-dir lock file
MAY_APPEAR = {".lock"}


class Result(subprocess.CompletedProcess):
    wall: float


def fer(*args: str, cwd: Path | None = None, timeout: float = 600) -> Result:
    """`fer ARGS` in a subprocess; the result carries its wall time in ``.wall``."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fer_core.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or REPO, env=ENV, timeout=timeout)
    r.wall = time.monotonic() - t0  # type: ignore[attr-defined]
    return r  # type: ignore[return-value]


def fer_popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fer_core.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)


def snapshot(d: Path) -> dict[str, str]:
    """relative path → sha256 of every file under ``d`` (nothing if it does not exist)."""
    if not d.is_dir():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def assert_untouched(before: dict[str, str], d: Path, may_appear: set[str] = MAY_APPEAR) -> None:
    """Every file that was in ``d`` is byte-identical; nothing new but ``may_appear``."""
    after = snapshot(d)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"{d}: changed or removed: {changed}"
    new = sorted(set(after) - set(before) - may_appear)
    assert not new, f"{d}: new files: {new}"


def error_line(r: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line (the last one) containing every needle;
    with ``alone`` it is the only line on stderr (failures before any training)."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    if alone:
        assert lines == errors, f"more than the error line on stderr:\n{r.stderr}"
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_tmpfs(where: Path, options: str) -> str | None:
    """Mount a tmpfs at ``where``; None on success, else why not (not root, no CAP_SYS_ADMIN, ...)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"mount not available: {e}"
    return None if r.returncode == 0 else f"mount -t tmpfs not permitted here: {r.stderr.strip()}"


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
