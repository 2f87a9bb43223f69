"""Every configuration that bench/ablation.py runs is a valid recipe with the intended values,
and the `fer repeat` call it makes per (suite, configuration, fold) is the intended one: a typo in
an override would otherwise surface only hours into the ablation. Nothing here trains."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fer_core.api import apply_overrides, read_toml
from fer_core.recipe import load

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)

JOBS = ([("fer2013", c) for c in ablation.FER_CONFIGS] + [("fer2013_long", c) for c in ablation.LONG_CONFIGS]
        + [("ckplus", c) for c in ablation.CK_CONFIGS])
RECORD_KEYS = ["suite", "config", "seed", "fold", "accuracy", "macro_f1", "balanced_accuracy", "au_mean_f1",
               "best_epoch", "seconds", "precision", "command"]


def options(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "-o"]


def resolved_recipe(suite: str, config: str, seed: int = 0) -> dict:
    args = ablation.command(suite, config, [seed], "1" if suite == "ckplus" else None)
    # what `fer repeat` trains for one seed: the plan (recipe + -o) with train.seed set last
    return load(REPO / args[2], [*options(args), f"train.seed={seed}"])[1]  # validation reads no data


@pytest.mark.parametrize(("suite", "config"), JOBS)
def test_configuration_is_a_valid_recipe(suite, config):
    raw = resolved_recipe(suite, config, seed=1)
    assert raw["train"]["seed"] == 1
    if suite == "fer2013_long":
        assert raw["train"]["epochs"] == ablation.LONG_EPOCHS
    elif suite == "fer2013":
        assert raw["train"]["epochs"] == 6


def test_long_suite_keeps_a_replaced_schedule():
    """LONG_OVERRIDES set StepLR's step; a configuration that swaps the schedule must win."""
    assert resolved_recipe("fer2013_long", "baseline")["schedule"]["step_size"] == ablation.LONG_STEP
    together = resolved_recipe("fer2013_long", "all_together")["schedule"]
    assert together["plugin"] == "warmup_cosine" and "step_size" not in together


def test_techniques_reach_the_recipe():
    raw = resolved_recipe("fer2013", "+focal_loss")
    assert raw["loss"]["plugin"] == "focal" and raw["loss"]["gamma"] == 2.0
    assert resolved_recipe("fer2013", "+oversampling")["sampler"]["plugin"] == "oversample"
    assert "au" not in resolved_recipe("ckplus", "emotion_only")["model"]["heads"]
    assert resolved_recipe("ckplus", "au_only")["data"]["holdout_value"] == "1"


# ------------------------------------------------------------------ the `fer repeat` calls


def test_repeat_command_of_a_configuration():
    assert ablation.command("fer2013", "+focal_loss", [0, 1, 2], None) == [
        "fer", "repeat", "recipes/ablation/fer2013_baseline.toml", "--seeds", "0,1,2",
        "--out", "bench/out/ablation/fer2013/plus_focal_loss",
        "-o", "name=fer2013_+focal_loss", "-o", "tracking.uri=sqlite:///bench/out/ablation/mlflow.db",
        "-o", ablation.FOCAL]


def test_repeat_command_of_a_fold():
    args = ablation.command("ckplus", "au_only", [2], "3")
    assert args[:7] == ["fer", "repeat", "recipes/ckplus_multitask.toml", "--seeds", "2",
                        "--out", "bench/out/ablation/ckplus/au_only/fold3"]
    assert options(args) == ["name=ckplus_au_only", "tracking.uri=sqlite:///bench/out/ablation/mlflow.db",
                             "data.holdout_value=3", *ablation.CK_CONFIGS["au_only"]]
    assert not any(o.startswith("train.seed") for o in options(args))  # the seed is fer repeat's


def test_long_suite_command_puts_its_epochs_first():
    args = ablation.command("fer2013_long", "all_together", [0], None)
    assert options(args)[2:] == [*ablation.LONG_OVERRIDES, *ablation.FER_CONFIGS["all_together"]]
    assert "bench/out/ablation/fer2013_long/all_together" in args


def test_the_fer_repeat_cli_reads_the_command_as_intended(monkeypatch):
    """The argv, given to the real `fer` command line, reaches repeat_seeds as recipe, seeds,
    --out and overrides (repeat_seeds itself replaced: nothing trains)."""
    from fer_core.cli import add_plugin_commands, app
    from fer_plugins import crossval

    calls = []
    monkeypatch.setattr(crossval, "repeat_seeds", lambda recipe, seeds, *, out, overrides: calls.append(
        (recipe, seeds, out, overrides)))
    add_plugin_commands()
    args = ablation.command("ckplus", "emotion_only", [0, 1, 2], "4")
    r = CliRunner().invoke(app, args[1:], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert calls == [(Path("recipes/ckplus_multitask.toml"), [0, 1, 2], Path("bench/out/ablation/ckplus/emotion_only/fold4"),
                      ablation.overrides("ckplus", "emotion_only", "4"))]


def test_a_directory_keeps_one_plan_whatever_the_seeds(tmp_path):
    """`fer repeat` refuses a directory whose saved plan differs: every call into one
    directory must give the same recipe and overrides, and no two jobs share a directory."""
    from fer_plugins.crossval import _same_plan

    for seeds in ([0, 1, 2], [2], [3, 4]):
        args = ablation.command("ckplus", "multitask", seeds, "2")
        plan = apply_overrides(read_toml(REPO / args[2]), options(args))
        _same_plan(tmp_path / "repeat_recipe.toml", plan, "seed repeat")  # raises on a different plan
    dirs = [ablation.repeat_dir(s, c, f) for s, c, f, _ in ablation.jobs("all", [0, 1, 2])]
    assert len(dirs) == len(set(dirs)) == len(ablation.FER_CONFIGS) + len(ablation.CK_CONFIGS) * len(
        ablation.CK_FOLDS) + len(ablation.LONG_CONFIGS)


# ------------------------------------------------------------------ the records


def test_committed_records_are_found_under_their_names():
    """The records written before `fer repeat` keep their names, so they are read and their
    seeds never rerun."""
    paths = sorted(ablation.RECORDS.glob("*/*/*.json"))
    if not paths:
        pytest.skip("no committed ablation records")
    for p in paths:
        rec = json.loads(p.read_text())
        assert list(rec) == RECORD_KEYS, p
        assert ablation.record_path(rec["suite"], rec["config"], rec["seed"], rec["fold"]) == p
        assert ablation.missing_seeds(rec["suite"], rec["config"], rec["fold"], [rec["seed"]]) == []


FAKE_FER = """\
import json, sys
from pathlib import Path
args = sys.argv[1:]
seeds = [int(s) for s in args[args.index("--seeds") + 1].split(",")]
out = Path(args[args.index("--out") + 1])
runs = []
for n in seeds:
    run = out / f"seed-{n}"
    run.mkdir(parents=True, exist_ok=True)
    m = {"accuracy": 0.5 + n / 100, "macro_f1": 0.4, "balanced_accuracy": 0.45, "best_epoch": 3.0}
    (run / "metrics.json").write_text(json.dumps(m))
    (run / "run.json").write_text(json.dumps({"precision": "bf16", "started": "2024-01-01T10:00:00",
                                              "ended": "2024-01-01T10:01:00"}))
    print(f"seed-{n}: trained", file=sys.stderr, flush=True)
    runs.append({"seed": n, "dir": f"seed-{n}", "metrics": m})
(out / "repeat.json").write_text(json.dumps({"kind": "repeat", "seeds": seeds, "runs": runs}))
(out.parent / "calls.txt").open("a").write(" ".join(args) + "\\n")
"""


def test_one_repeat_per_configuration_writes_the_same_records(tmp_path, monkeypatch):
    """A stand-in `fer` (writing what `fer repeat` writes) checks the loop: one call for the
    seeds without a record, records of the old schema from repeat.json and the run dirs, and
    no call at all once every seed has one."""
    fake = tmp_path / "fer"
    fake.write_text(f"#!{sys.executable}\n{FAKE_FER}")
    fake.chmod(0o755)
    monkeypatch.setattr(ablation, "FER", fake)
    monkeypatch.setattr(ablation, "OUT", tmp_path / "out")
    monkeypatch.setattr(ablation, "RECORDS", tmp_path / "records")
    ablation.record_path("ckplus", "au_only", 0, "2").parent.mkdir(parents=True)
    ablation.record_path("ckplus", "au_only", 0, "2").write_text("{}")  # seed 0 recorded earlier

    recs = ablation.run_configuration("ckplus", "au_only", "2", [0, 1, 2])
    assert [r["seed"] for r in recs] == [1, 2]
    calls = (tmp_path / "out" / "ckplus" / "au_only" / "calls.txt").read_text().splitlines()
    assert len(calls) == 1 and "--seeds 1,2" in calls[0] and "data.holdout_value=2" in calls[0]
    for seed, rec in zip([1, 2], recs):
        path = tmp_path / "records" / "ckplus" / "au_only" / f"fold2_seed{seed}.json"
        assert json.loads(path.read_text()) == rec and list(rec) == RECORD_KEYS
        assert rec["fold"] == "2" and rec["best_epoch"] == 3 and isinstance(rec["best_epoch"], int)
        assert rec["accuracy"] == 0.5 + seed / 100 and rec["au_mean_f1"] is None and rec["precision"] == "bf16"
        assert rec["command"].startswith("fer repeat recipes/ckplus_multitask.toml --seeds 1,2 --out "
                                         f"{tmp_path / 'out' / 'ckplus' / 'au_only' / 'fold2'} ")
        assert isinstance(rec["seconds"], float)
    assert "seed-2: trained" in (tmp_path / "out" / "ckplus" / "au_only" / "fold2" / "repeat.log").read_text()
    assert ablation.run_configuration("ckplus", "au_only", "2", [0, 1, 2]) is None  # all recorded: no call
    assert len((tmp_path / "out" / "ckplus" / "au_only" / "calls.txt").read_text().splitlines()) == 1
