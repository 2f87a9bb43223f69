"""The MLflow tracker against a real `mlflow server` (started here, on a free local port), and
run groups: `fer repeat` and `fer tune` give one parent run with the members nested under it.

The server costs ~20 s to start on a loaded machine, so one serves the whole module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import needs_fer2013, tiny_recipe

pytestmark = [needs_fer2013]

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:PORT (sqlite backend, proxied artifacts), killed at teardown."""
    if not MLFLOW.is_file():
        pytest.skip(f"{MLFLOW} not installed")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (root / "server.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                            start_new_session=True)  # its own process group: uvicorn and the job runner
    uri = f"http://127.0.0.1:{port}"
    try:
        import fer_core.cli  # noqa: F401 - the tests' imports, while the server starts
        import mlflow  # noqa: F401
        import timm  # noqa: F401

        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start (exit {proc.poll()}):\n"
                            + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group the server leads: it and its children
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=3)  # uvicorn's graceful shutdown waits for idle keep-alive clients
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def fer(*args, capsys) -> tuple[int, str, str]:
    """`fer ...` in this process (no interpreter start-up per call)."""
    from fer_core.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def recipe(tmp_path: Path, fer_subset: Path, uri: str, experiment: str, **train) -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(tiny_recipe(fer_subset, uri, **{"threads": 1, **train}).replace(
        'experiment = "tests"', f'experiment = "{experiment}"'))
    return p


def runs_of(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def assert_one_group(client, experiment: str, kind: str, group_dir: Path, members: list[str]):
    """One parent (FINISHED, tagged with the group), and exactly `members` nested under it."""
    runs = runs_of(client, experiment)
    parents = [r for r in runs if "fer.group_key" in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time
    assert parent.data.tags["fer.group_kind"] == kind
    assert parent.data.tags["fer.group_id"] == str(group_dir.resolve())
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1  # every other run of the experiment is a member
    assert sorted(r.info.run_name for r in children) == sorted(members)
    assert sorted(r.data.tags["fer.group_member"] for r in children) == sorted(members)
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["fer.group_kind"] == kind
        assert [h.step for h in client.get_metric_history(r.info.run_id, "val_accuracy")] == [1]
    return parent, children


def test_fer_run_against_a_real_mlflow_server(server, tmp_path, fer_subset, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    code, _, err = fer("run", recipe(tmp_path, fer_subset, server, "server", epochs=2), "--out", out,
                       "-o", "name=served", capsys=capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri=server)
    [run] = runs_of(client, "server")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["fer.run_dir"] == str(out.resolve()) and "mlflow.parentRunId" not in run.data.tags
    for name in ("val_accuracy", "val_macro_f1"):
        assert [h.step for h in client.get_metric_history(run.info.run_id, name)] == [1, 2]
    assert run.data.params["model.backbone.name"] == "resnet10t" and run.data.params["name"] == "served"
    assert "final_accuracy" in run.data.metrics
    # artifacts went through the server's proxy (mlflow-artifacts:/), not to a local path
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.toml", "metrics.json", "confusion_matrix.png", "model"} <= artifacts
    text = Path(client.download_artifacts(run.info.run_id, "recipe.toml", str(tmp_path))).read_text()
    assert text == (out / "recipe.toml").read_text()


def test_fer_repeat_nests_its_seeds_under_one_parent(server, tmp_path, fer_subset, capsys):
    from mlflow import MlflowClient

    rep = tmp_path / "seeds"
    args = ("repeat", recipe(tmp_path, fer_subset, server, "repeat", epochs=1), "--seeds", "0,1", "--out", rep)
    code, _, err = fer(*args, capsys=capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri=server)
    parent, _ = assert_one_group(client, "repeat", "repeat", rep, ["seed-0", "seed-1"])
    assert parent.info.run_name == "seeds"
    # the same command again: both runs finished earlier, nothing new, the same one parent
    code, _, err = fer(*args, capsys=capsys)
    assert code == 0, err
    again, _ = assert_one_group(client, "repeat", "repeat", rep, ["seed-0", "seed-1"])
    assert again.info.run_id == parent.info.run_id


def test_parallel_members_make_one_parent_that_ends_with_the_last(server, tmp_path):
    """Four members of one group start at the same moment (threads: the lock file is per open
    file, as between tune's worker processes), on a new experiment: one experiment, one parent;
    the parent runs until the last member ends, and a Ctrl-C'ed last member leaves it KILLED."""
    import threading

    from mlflow import MlflowClient

    from fer_core.api import RunInfo
    from fer_plugins.tracker_mlflow import make_mlflow

    group_dir = tmp_path / "group"
    group_dir.mkdir()
    group = {"kind": "cv", "id": str(group_dir), "name": "race", "member": ""}
    members = []
    for i in range(4):
        (group_dir / f"fold-{i}").mkdir()
        members.append((make_mlflow(uri=server, experiment="race", log_model=False),
                        RunInfo(out_dir=group_dir / f"fold-{i}", recipe={"k": i}, classes=[],
                                group={**group, "member": f"fold-{i}"})))
    barrier, errors = threading.Barrier(len(members)), []

    def start(tracker, run):
        barrier.wait()
        try:
            tracker.on_fit_start(run)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=m) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    client = MlflowClient(tracking_uri=server)
    runs = [r for r in runs_of(client, "race") if r.data.tags.get("fer.group_id") == str(group_dir)]
    [parent] = [r for r in runs if "fer.group_key" in r.data.tags]
    assert parent.info.run_name == "race" and parent.info.status == "RUNNING"
    assert sorted(r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parent) == [parent.info.run_id] * 4
    for tracker, run in members[:3]:
        tracker.on_fit_end(run, {"accuracy": 0.5})
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # fold-3 still runs
    tracker, run = members[3]
    tracker.on_exception(run, KeyboardInterrupt())
    assert client.get_run(run.state["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(parent.info.run_id).info.status == "KILLED"


def test_fer_tune_nests_its_trials_under_one_parent(server, tmp_path, fer_subset, capsys):
    from mlflow import MlflowClient

    path = recipe(tmp_path, fer_subset, server, "study", epochs=1)
    path.write_text(path.read_text() + '\n[tune]\nsampler = "random"\n[tune.space]\n'
                    '"optimizer.lr" = { type = "float", low = 1e-3, high = 1e-2, log = true }\n')
    study = tmp_path / "study-nested"
    code, out, err = fer("tune", path, "--trials", 2, "--study-dir", study, capsys=capsys)
    assert code == 0, err
    client = MlflowClient(tracking_uri=server)
    parent, children = assert_one_group(client, "study", "study", study, ["trial-0000", "trial-0001"])
    assert parent.info.run_name == "study-nested"
    assert {r.data.tags["fer.run_dir"] for r in children} == {str((study / f"trial-000{i}").resolve()) for i in (0, 1)}
