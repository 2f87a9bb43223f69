"""The EMA callback plugin: it averages, its weights are the ones validated, and its state
survives kill -9 + `fer run --resume` exactly."""

from __future__ import annotations

import json
import os
import textwrap

import torch

from fer_core import checkpoint
from test_cli import ENV, fer

EMA = '\n[[callbacks]]\nplugin = "ema"\ndecay = 0.9\n'


def _killer_plugin(root):
    """An installed plugin whose callback SIGKILLs its own process mid-epoch (a real kill -9)."""
    (root / "fer_test_killer.py").write_text(textwrap.dedent("""
        import os, signal
        from fer_core.api import Callback, hookimpl

        class KillAt(Callback):
            def __init__(self, epoch, batch):
                self.at = (epoch, batch)
            def on_train_batch_end(self, run, epoch, batch, logs):
                if (epoch, batch) == self.at:
                    os.kill(os.getpid(), signal.SIGKILL)

        @hookimpl
        def register_callbacks(register):
            register("test_kill", lambda *, epoch=2, batch=2: KillAt(epoch, batch))
    """))
    info = root / "fer_test_killer-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fer-test-killer\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fer.plugins]\ntest_killer = fer_test_killer\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(root), ENV.get("PYTHONPATH", "")])}


def test_ema_state_survives_kill_minus_9_and_resume(write_recipe, tmp_path):
    recipe = write_recipe(epochs=3, accumulate_steps=2)
    recipe.write_text(recipe.read_text() + EMA)
    straight = tmp_path / "straight"
    r = fer("run", str(recipe), "--out", str(straight))
    assert r.returncode == 0, r.stderr

    env = _killer_plugin(tmp_path)
    killed = tmp_path / "killed"
    recipe.write_text(recipe.read_text() + '\n[[callbacks]]\nplugin = "test_kill"\nepoch = 2\nbatch = 3\n')
    r = fer("run", str(recipe), "--out", str(killed), env=env)
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert checkpoint.load(killed / "last.pt")["train_state"]["epoch"] == 1
    r = fer("run", "--resume", str(killed), "-o", 'callbacks=[{plugin = "ema", decay = 0.9}]', env=env)
    assert r.returncode == 0, r.stderr

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]
    wa, wb = (checkpoint.load(d / "best.pt")["model"] for d in (straight, killed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = (checkpoint.load(d / "last.pt")["callbacks"]["ModelEma#0"] for d in (straight, killed))
    assert ea["last_step"] == eb["last_step"] > 0
    assert all(torch.equal(ea["weights"][k], eb["weights"][k]) for k in ea["weights"])
    assert "callbacks" in (killed / "resume.log").read_text()


def test_ema_weights_are_validated_and_differ_from_the_raw_ones(write_recipe, tmp_path):
    from fer_core.runner import train

    recipe = write_recipe(epochs=2)
    recipe.write_text(recipe.read_text() + EMA)
    out = tmp_path / "ema"
    train(recipe, [], out, None)
    last = checkpoint.load(out / "last.pt")
    ema = last["callbacks"]["ModelEma#0"]["weights"]
    raw = last["model"]
    best = checkpoint.load(out / "best.pt")["model"]
    w = "backbone.model.conv1.0.weight" if "backbone.model.conv1.0.weight" in raw else next(iter(raw))
    assert not torch.equal(ema[w], raw[w])  # an average, not a copy
    if checkpoint.load(out / "best.pt")["epoch"] == 2:  # best = the last epoch: its EMA weights were saved
        assert torch.equal(best[w], ema[w])
