"""`fer tune --storage postgresql://… --workers 2` against a real, throwaway PostgreSQL server.

The module's fixture starts a server from the Debian package's binaries (/usr/lib/postgresql/*/bin,
installed by .ci/run) in a temporary directory: its own data directory, listening on 127.0.0.1 on
a free port only, fsync off, stopped (immediate) at teardown. As root (CI) the server commands run
as the package's `postgres` system user, since PostgreSQL refuses to run as root. No mock: the
study's trials are read back from that server.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, needs_fer2013

pytestmark = [needs_fer2013]

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
       "OMP_NUM_THREADS": "1"}
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
USER, DATABASE = "fer", "fer_tune"
BUDGET = 4


def server_bin() -> Path:
    """The newest /usr/lib/postgresql/N/bin holding initdb, pg_ctl and postgres (else skip, naming
    what is missing)."""
    dirs = sorted((Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")),
                  key=lambda d: [int(x) if x.isdigit() else 0 for x in d.parent.name.split(".")])
    for d in reversed(dirs):
        if all((d / b).is_file() for b in SERVER_BINARIES):
            return d
    if not dirs:
        pytest.skip("PostgreSQL server not installed: no /usr/lib/postgresql/*/bin (the Debian package "
                    "`postgresql`; .ci/run installs it)")
    missing = [f"{d}/{b}" for d in dirs for b in SERVER_BINARIES if not (d / b).is_file()]
    pytest.skip(f"PostgreSQL server incomplete: missing {', '.join(missing)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server and an empty database; yields its SQLAlchemy URL."""
    bin_dir = server_bin()
    prefix: list[str] = []
    if os.geteuid() == 0:  # "root" execution of the PostgreSQL server is not permitted
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` system user to run the PostgreSQL server as "
                        "(the Debian package `postgresql` creates it)")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` (util-linux) is missing: cannot run the PostgreSQL server "
                        "as the `postgres` user")
        prefix = ["runuser", "-u", "postgres", "--"]
    # not under pytest's basetemp: that is private to the current user (0700), and a unix socket
    # path must stay short (107 bytes); /tmp itself, so that the `postgres` user can reach it
    root = Path(tempfile.mkdtemp(prefix="fer-pg-", dir="/tmp" if prefix and os.path.isdir("/tmp") else None))
    if prefix:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log, port = root / "data", root / "server.log", free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*prefix, *map(str, args)], cwd=root, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                               f"\nserver log:\n{tail}")
        return done

    started = False
    try:
        pg(bin_dir / "initdb", "-D", data, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        started = True  # from here on, stop it whatever happens
        pg(bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        import psycopg  # the driver pyproject.toml installs for --storage postgresql://…

        # CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        # the driver named explicitly: what SQLAlchemy 2.1+ also picks for a plain postgresql:// URL
        yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            pg(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def tune_recipe(write_recipe) -> Path:
    """tests/test_tune.py's pattern: the conftest's seconds-long recipe (1 epoch, tracking off) plus
    a [tune] table."""
    path = write_recipe(epochs=1)
    path.write_text(path.read_text() + """
[tune]
sampler = "random"
[tune.space]
"optimizer.lr" = { type = "float", low = 1e-3, high = 1e-2, log = true }
"model.heads.emotion.dropout" = { type = "float", low = 0.0, high = 0.5 }
""")
    return path


def test_two_workers_share_one_postgresql_study(postgres_url, write_recipe, tmp_path):
    """Two worker processes on one study in PostgreSQL: exactly the budget of trials, distinct
    numbers, both workers took part, every trial a run directory; study.json agrees."""
    import optuna
    from optuna.trial import TrialState

    recipe, study_dir = tune_recipe(write_recipe), tmp_path / "pgstudy"
    cmd = [sys.executable, "-m", "fer_core.cli", "tune", str(recipe), "--trials", str(BUDGET), "--workers", "2",
           "--study-dir", str(study_dir), "--storage", postgres_url,
           "-o", "data.max_train_per_class=4", "-o", "train.threads=1"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on 2 workers" in done.stderr and "[worker 0]" in done.stderr and "[worker 1]" in done.stderr

    # read the study back from the server itself
    study = optuna.load_study(study_name=study_dir.name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == BUDGET
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    assert sorted(t.number for t in trials) == list(range(BUDGET))
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two processes, neither the test's
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == BUDGET
    for t in trials:
        run = study_dir / t.user_attrs["dir"]
        assert run.name == f"trial-{t.number:04d}" and (run / "best.pt").is_file() and (run / "recipe.toml").is_file()
        assert f"lr = {t.params['optimizer.lr']!r}" in (run / "recipe.toml").read_text()
    assert not (study_dir / "study.journal").exists()  # the study lives in PostgreSQL only

    import psycopg

    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:  # libpq takes postgresql://
        row = conn.execute("SELECT count(*), count(DISTINCT t.number) FROM trials t JOIN studies s ON "
                           "s.study_id = t.study_id WHERE s.study_name = %s", (study_dir.name,)).fetchone()
    assert row == (BUDGET, BUDGET)

    summary = json.loads((study_dir / "study.json").read_text())
    assert summary["storage"] == postgres_url and summary["budget"] == BUDGET
    by_number = {t.number: t for t in trials}
    assert [r["number"] for r in summary["trials"]] == list(range(BUDGET))
    for r in summary["trials"]:
        t = by_number[r["number"]]
        assert (r["state"], r["value"], r["params"], r["worker"], r["dir"]) == \
            ("COMPLETE", t.value, t.params, t.user_attrs["worker"], t.user_attrs["dir"])
    assert summary["best_trial"] == study.best_trial.number and summary["best_value"] == study.best_value
    assert (study_dir / "best.toml").is_file()


def test_two_machines_share_one_postgresql_study(postgres_url, write_recipe, tmp_path):
    """Two `fer tune` commands with their own study directories (as on two machines: no lock file
    in common) on one PostgreSQL study at the same time: neither marks the other's running trial
    failed, and together they run exactly the budget."""
    import optuna
    from optuna.trial import TrialState

    recipe = tune_recipe(write_recipe)
    dirs = [tmp_path / "machine-a" / "shared", tmp_path / "machine-b" / "shared"]  # one study name: "shared"

    def start(d: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fer_core.cli", "tune", str(recipe), "--trials", str(BUDGET),
                                 "--study-dir", str(d), "--storage", postgres_url, "-o", "data.max_train_per_class=4",
                                 "-o", "train.threads=1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    first = start(dirs[0])
    deadline = time.monotonic() + 120
    while True:  # the second starts while a trial of the first is running (the case that used to break)
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="shared", storage=postgres_url)
            if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                break
        assert first.poll() is None and time.monotonic() < deadline, "the first command never started a trial"
        time.sleep(0.5)
    second = start(dirs[1])
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outs
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials(deepcopy=False)
    ran = [t for t in trials if not t.user_attrs.get("over_budget")]
    assert len(ran) == BUDGET and all(t.state == TrialState.COMPLETE for t in ran), \
        [(t.number, t.state, t.user_attrs.get("reason")) for t in trials]
    assert not any(t.user_attrs.get("interrupted") for t in trials)  # nobody's live trial was retired
    assert sum(len(list(d.glob("trial-*"))) for d in dirs) == len(ran)
