"""Every stage bench/staircase.py trains is a valid recipe with the intended values: a typo in an
override would otherwise surface hours into the staircase. Nothing here trains."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fer_core.recipe import load

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("staircase", REPO / "bench" / "staircase.py")
staircase = importlib.util.module_from_spec(spec)
sys.modules["staircase"] = staircase  # its dataclasses look their module up
spec.loader.exec_module(staircase)


def resolved(stage) -> dict:
    args = staircase.repeat_args(stage)
    ovs = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    return load(REPO / args[1], [*ovs, "train.seed=0"])[1]


TRAINED = [s for s in staircase.STAGES if not s.members]


@pytest.mark.parametrize("stage", TRAINED, ids=lambda s: s.name)
def test_every_stage_is_a_valid_recipe(stage):
    r = resolved(stage)
    assert r["name"] == f"staircase_{stage.name}"
    assert r["description"] == f"FER2013, staircase stage {stage.name}: {stage.adds}"  # packed recipes say which
    assert r["data"]["root"] == "../shared/data/fer2013" and r["train"]["epochs"] == staircase.epochs(stage)


def test_stages_are_cumulative():
    s0, s1, s3 = (resolved(staircase.BY_NAME[n]) for n in ("s0_current", "s1_data", "s3_training"))
    assert s0["augment"]["plugin"] == "basic" and s0["loss"]["plugin"] == "cross_entropy" and not s0["batch_transforms"]
    assert s0["schedule"]["plugin"] == "step" and s0.get("tta") is None
    assert s1["augment"]["preset"] == "faces48" and s1["batch_transforms"][0]["plugin"] == "mix"
    # stage 3 keeps stage 1's data level and stage 2a's input size, and adds its own
    assert s3["augment"]["preset"] == "faces48" and s3["model"]["backbone"]["input_size"] == 64
    assert s3["loss"]["plugin"] == "label_smoothing" and s3["schedule"]["plugin"] == "plateau"
    assert [c["plugin"] for c in s3["callbacks"]] == ["ema"]
    assert s3["tta"]["crops"] == 5 and s3["tta"]["hflip"] is True and s3["tta"]["identity"] is False


def test_the_plan_fits_the_budget():
    """The issue's budget: "about 12" CPU-hours in all on the reference machine, no single run over 3 hours."""
    planned = [s for s in staircase.STAGES if not s.followup]
    assert sum(staircase.estimate_minutes(s) * len(s.seeds) for s in planned) <= 12.5 * 60
    assert max(staircase.estimate_minutes(s) for s in staircase.STAGES) <= 180


def test_a_distilled_stage_is_estimated_with_its_teacher_pass():
    """s4e's estimate of training alone admitted it ~10 minutes too late: the teacher's rebuild and its
    one pass over the training images (at the teacher record's ms/image) are counted too."""
    student = staircase.BY_NAME["s4e_student_s3d"]
    rec = json.loads((staircase.RECORDS / student.teacher / "seed-0.json").read_text())
    training = staircase.epochs(student) * staircase.TRAIN_IMAGES / 100.0 / 60 * 1.08
    extra = staircase.estimate_minutes(student, 100.0) - training
    assert extra == pytest.approx(rec["minutes"] + rec["ms_per_image"] * staircase.TRAIN_IMAGES / 60_000)
    assert extra > 3  # s4d's six members: 8.5 ms/image over 28,709 faces, ~4 minutes, plus the rebuild
    undistilled = staircase.BY_NAME["s3d_mnv2_40ep"]
    assert staircase.estimate_minutes(undistilled, 100.0) == pytest.approx(
        staircase.epochs(undistilled) * staircase.TRAIN_IMAGES / 100.0 / 60 * 1.08)


def test_breadth_first_runs_every_stage_once_before_any_twice():
    order = staircase.schedule(staircase.STAGES, breadth_first=True)
    names = [s.name for s, _ in order]
    alone = [s.name for s in staircase.STAGES if not (s.members or s.teacher or s.followup)]
    assert names[:len(alone)] == alone
    # the follow-up comparisons run after the system level, which builds on the planned seeds only
    followups = [s.name for s in staircase.STAGES if s.followup]
    assert followups and list(dict.fromkeys(names))[-len(followups):] == followups  # a follow-up may have seeds
    assert sorted(order, key=lambda x: (x[0].name, x[1])) == sorted(
        staircase.schedule(staircase.STAGES, breadth_first=False), key=lambda x: (x[0].name, x[1]))
    assert [k for s, k in order if s.name == "s3_training"] == staircase.BY_NAME["s3_training"].seeds


def test_the_ensemble_stage_combines_every_packed_seed_of_its_members():
    import tomllib

    from fer_plugins.ensembles import validate_spec

    ens = staircase.BY_NAME["s4_ensemble"]
    members = [staircase.seed_record(staircase.BY_NAME[m], k).with_suffix("")
               for m in ens.members for k in staircase.BY_NAME[m].seeds]
    assert len(members) == 4 and all(staircase.BY_NAME[m].keep for m in ens.members)
    text = staircase.ensemble_recipe(ens, members)
    spec = validate_spec(tomllib.loads(text), "ensemble.toml")
    assert spec.members == [str(m.relative_to(REPO)) for m in members]
    assert spec.fit_split == "val" and spec.max_size_mb == 500 and spec.combiner.plugin == "average"


def test_the_student_is_taught_by_the_ensemble_through_a_cached_teacher_before_the_mix():
    st = staircase.BY_NAME["s4_student"]
    r = resolved(st)
    bt = r["batch_transforms"]
    assert [b["plugin"] for b in bt] == ["teacher", "mix"]
    assert bt[0]["run"] == staircase.ENSEMBLE_DIR and bt[0]["cache"] is True
    assert r["loss"]["plugin"] == "distill" and r["loss"]["hard"]["plugin"] == "label_smoothing"
    assert r["model"]["backbone"]["name"] == "mobilenetv3_small_100" and r["augment"]["preset"] == "faces48"
    assert st.teacher == "s4_ensemble" and st.keep
    # it runs after every stage it needs, in either order
    for breadth in (True, False):
        names = [s.name for s, _ in staircase.schedule(staircase.STAGES, breadth)]
        assert names.index("s4_student") > max(i for i, n in enumerate(names) if n == "s3_training")
        assert names.index("s4_student") > names.index("s4_ensemble")


def test_the_pretrained_student_differs_from_the_first_only_in_network_and_optimiser():
    """s4b_student_mnv2 asks whether ImageNet pretraining rescues the deploy student: the same teacher,
    loss, data and EMA as s4_student, the network and optimiser of s2b, at 64 px."""
    first, second, s2b = (resolved(staircase.BY_NAME[n]) for n in ("s4_student", "s4b_student_mnv2", "s2b_mobilenetv2"))
    for key in ("batch_transforms", "loss", "callbacks", "augment", "data"):
        assert first[key] == second[key], key
    bb = second["model"]["backbone"]
    assert bb["plugin"] == "torchvision" and bb["name"] == "mobilenet_v2" and bb["input_size"] == 64
    assert bb["pretrained"] == s2b["model"]["backbone"]["pretrained"] and second["optimizer"] == s2b["optimizer"]
    stage = staircase.BY_NAME["s4b_student_mnv2"]
    assert stage.teacher == "s4_ensemble" and stage.keep and stage.followup


@pytest.mark.parametrize("recipe, stage", [("fer2013_best.toml", "s3d_mnv2_40ep"),
                                           ("fer2013_resnet18_scratch.toml", "s3_training"),
                                           ("fer2013_best_mobilenetv2.toml", "s2b_mobilenetv2")])
def test_the_best_recipes_are_exactly_their_stages(recipe, stage):
    """`fer run recipes/fer2013_best.toml` must reproduce the stage's figures: the same resolved
    recipe, apart from its name and description."""
    ours = load(REPO / "recipes" / recipe)[1]
    theirs = resolved(staircase.BY_NAME[stage])
    for r in (ours, theirs):
        r.pop("name"), r.pop("description")
    assert ours == theirs


def test_the_deploy_recipe_is_the_pretrained_student_stage():
    """The shipped model's recipe reproduces s4b_student_mnv2; only the teacher's path differs (the
    stage's is the ensemble it rebuilds in bench/out, the recipe's the one fer2013_best_ensemble.toml's
    commands write)."""
    ours = load(REPO / "recipes" / "fer2013_deploy.toml")[1]
    theirs = resolved(staircase.BY_NAME["s4b_student_mnv2"])
    assert ours["batch_transforms"][0]["run"] == "runs/ensemble4"
    assert theirs["batch_transforms"][0]["run"] == staircase.ENSEMBLE_DIR
    for r in (ours, theirs):
        r.pop("name"), r.pop("description"), r["batch_transforms"][0].pop("run")
    assert ours == theirs


def test_the_best_ensemble_recipe_is_the_best_ensemble_stage_with_its_members_in_order():
    """fer2013_best_ensemble.toml combines what s4d_ensemble combines, each member trained by the shipped
    recipe its comment names: the from-scratch seeds, the 15-epoch MobileNetV2, the best single model at
    25 epochs (s3c = s3d with only the length changed) and at 40; its first four members are s4_ensemble,
    the deploy recipe's teacher."""
    import tomllib

    raw = tomllib.loads((REPO / "recipes" / "fer2013_best_ensemble.toml").read_text())
    ens = staircase.BY_NAME["s4d_ensemble"]
    seeds = {m: ens.member_seeds.get(m, staircase.BY_NAME[m].seeds) for m in ens.members}
    assert ens.members == ["s3_training", "s2b_mobilenetv2", "s3c_mnv2_training", "s3d_mnv2_40ep"]
    assert seeds == {"s3_training": [0, 1, 2], "s2b_mobilenetv2": [0], "s3c_mnv2_training": [0],
                     "s3d_mnv2_40ep": [0]}
    expected = ([f"runs/scratch/seed-{k}" for k in seeds["s3_training"]]
                + ["runs/best_mobilenetv2", "runs/best_25ep", "runs/best"])
    assert raw["members"] == expected
    assert staircase.BY_NAME["s4_ensemble"].members == ens.members[:2]  # its four: the first four here
    stage = tomllib.loads(staircase.ensemble_recipe(ens, [REPO / m for m in expected]))
    assert {k: v for k, v in raw.items() if k != "name"} == {k: v for k, v in stage.items() if k != "name"}
    comment = (REPO / "recipes" / "fer2013_best_ensemble.toml").read_text()
    assert "fer run recipes/fer2013_best.toml -o train.epochs=25 --out runs/best_25ep" in comment
    s3c = resolved(staircase.BY_NAME["s3c_mnv2_training"])
    best = load(REPO / "recipes" / "fer2013_best.toml", ["train.epochs=25"])[1]
    for r in (s3c, best):
        r.pop("name"), r.pop("description")
    assert best == s3c


def test_stages_given_by_name_run_in_the_order_given():
    s0, s1, s2a = (staircase.BY_NAME[n] for n in ("s0_current", "s1_data", "s2a_input64"))
    order = staircase.schedule([s0, s2a, s1], breadth_first=True)
    assert [(s.name, k) for s, k in order[:3]] == [("s0_current", 0), ("s2a_input64", 0), ("s1_data", 0)]


def test_a_resumed_seeds_minutes_count_every_epoch_once(tmp_path):
    # a run interrupted after epoch 2 and resumed: run.json's span covers only the resumed part
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": e, "epoch_wall_seconds": 600.0} for e in (1, 2, 3)]))
    status = {"started": "2026-12-02T10:20:00", "ended": "2026-12-02T10:30:00"}
    assert staircase.run_minutes(staircase.history_rows(tmp_path), status, t0=0.0) == pytest.approx(30.0)
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 1}]))  # a run from before the field existed
    assert staircase.run_minutes(staircase.history_rows(tmp_path), status, t0=0.0) == pytest.approx(10.0)


def test_two_machines_with_the_same_model_name_are_told_apart_by_their_instruction_set():
    from machine import cpu_name

    zen1 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    zen5 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"
    assert cpu_name(zen1) == "AMD EPYC (avx2)" and cpu_name(zen5) == "AMD EPYC (avx512_bf16)"
    assert cpu_name("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n") == "Xeon (amx_bf16)"


def test_the_table_reads_the_instruction_set_back_only_where_cpu_name_wrote_one():
    from machine import speed_isa

    assert speed_isa("AMD EPYC (avx2)") == "avx2" and speed_isa("Intel(R) Xeon(R) (amx_bf16)") == "amx_bf16"
    assert speed_isa("AMD EPYC") is None and speed_isa("Intel(R) Xeon(R) Platinum 8480+") is None
    assert speed_isa("Intel(R) Xeon(R) CPU @ 2.10GHz (R)") is None


def test_a_stage_with_some_seeds_finished_shows_them_and_says_how_many(tmp_path, monkeypatch):
    monkeypatch.setattr(staircase, "RECORDS", tmp_path)
    (tmp_path / "s0_current").mkdir()
    (tmp_path / "s0_current" / "seed-0.json").write_text(json.dumps(
        {"seed": 0, "accuracy": 0.5952, "macro_f1": 0.5705, "minutes": 42.9, "cpu": "AMD EPYC (avx512_bf16)"}))
    row = next(ln for ln in staircase.report().splitlines() if ln.startswith("| s0_current"))
    assert "| 1 of 3 | 59.52 | 57.05 |" in row and row.endswith("| 43 (avx512_bf16) |")


def test_the_record_keeps_the_training_rate_and_the_table_shows_it_beside_the_minutes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    assert staircase.train_img_s(staircase.history_rows(run)) is None  # no history: no rate, rather than a made-up one
    (run / "history.json").write_text(json.dumps(
        [{"epoch": 1, "img_per_s": 150.0}, {"epoch": 2, "img_per_s": 290.4}, {"epoch": 3, "img_per_s": 300.0}]))
    assert staircase.train_img_s(staircase.history_rows(run)) == 290  # median: one slow epoch (a busy machine) does not set it
    records = tmp_path / "records"
    monkeypatch.setattr(staircase, "RECORDS", records)
    (records / "s0_current").mkdir(parents=True)
    for seed, rate in [(0, 290), (1, None)]:  # a record from before the field: the table uses the others
        (records / "s0_current" / f"seed-{seed}.json").write_text(json.dumps(
            {"seed": seed, "accuracy": 0.59, "macro_f1": 0.57, "minutes": 43.0, "cpu": "AMD EPYC (avx512_bf16)",
             **({"train_img_s": rate} if rate else {})}))
    row = next(ln for ln in staircase.report().splitlines() if ln.startswith("| s0_current"))
    assert row.endswith("| 43 (avx512_bf16, 290 img/s) |")


def test_the_schedule_comparison_is_stage_3_with_only_the_schedule_swapped():
    s3, s3b = (resolved(staircase.BY_NAME[n]) for n in ("s3_training", "s3b_cosine"))
    assert s3["schedule"]["plugin"] == "plateau"
    assert s3b["schedule"]["plugin"] == "warmup_cosine" and s3b["schedule"]["warmup_epochs"] == 2
    assert {k: v for k, v in s3b.items() if k not in ("schedule", "name", "description")} == \
        {k: v for k, v in s3.items() if k not in ("schedule", "name", "description")}


def test_stage_3_on_the_mobilenet_adds_only_stage_3s_training_level_to_s2b():
    """s3c_mnv2_training answers whether stage 3's techniques lift the best stage-2 network: s2b's
    network, data and optimiser unchanged; label smoothing, EMA, more epochs and ten-crop TTA added."""
    s2b, s3, s3c = (resolved(staircase.BY_NAME[n]) for n in ("s2b_mobilenetv2", "s3_training", "s3c_mnv2_training"))
    changed = {"loss", "callbacks", "tta", "train", "name", "description"}
    assert {k: v for k, v in s3c.items() if k not in changed} == {k: v for k, v in s2b.items() if k not in changed}
    assert (s3c["loss"], s3c["callbacks"], s3c["tta"]) == (s3["loss"], s3["callbacks"], s3["tta"])
    assert s3c["train"] == s2b["train"] | {"epochs": 25}
    assert staircase.BY_NAME["s3c_mnv2_training"].tta and staircase.BY_NAME["s3c_mnv2_training"].keep


def test_each_ensemble_stage_builds_its_own_artifact_and_the_students_teacher_stays_the_first():
    ensembles = [s for s in staircase.STAGES if s.members]
    assert len(ensembles) >= 2
    dirs = [staircase.ensemble_dir(s) for s in ensembles]
    assert len(set(dirs)) == len(dirs)
    assert staircase.ensemble_dir(staircase.BY_NAME["s4_ensemble"]) == REPO / staircase.ENSEMBLE_DIR
    later = staircase.BY_NAME["s4c_ensemble"]
    assert set(staircase.BY_NAME["s4_ensemble"].members) < set(later.members) and later.followup
    # measured with s3c's seed 0 only: its later seeds do not change what the record describes
    dirs = [d.relative_to(staircase.RECORDS).as_posix() for d in staircase.member_dirs(later) or []]
    assert dirs[-1] == "s3c_mnv2_training/seed-0" and len(dirs) == 5


def test_the_longer_mobilenet_run_changes_only_the_number_of_epochs():
    """s3d_mnv2_40ep answers whether s3c was still short of training: nothing but its length differs."""
    s3c, s3d = (resolved(staircase.BY_NAME[n]) for n in ("s3c_mnv2_training", "s3d_mnv2_40ep"))
    assert {k: v for k, v in s3d.items() if k not in ("train", "name", "description")} == \
        {k: v for k, v in s3c.items() if k not in ("train", "name", "description")}
    assert s3d["train"] == s3c["train"] | {"epochs": 40}
    assert staircase.epochs(staircase.BY_NAME["s3d_mnv2_40ep"]) == 40


def test_the_sixth_member_ensemble_adds_only_s3ds_first_seed_to_s4c():
    s4c, s4d = staircase.BY_NAME["s4c_ensemble"], staircase.BY_NAME["s4d_ensemble"]
    before, after = staircase.member_dirs(s4c) or [], staircase.member_dirs(s4d) or []
    assert after[:-1] == before and after[-1].relative_to(staircase.RECORDS).as_posix() == "s3d_mnv2_40ep/seed-0"
    assert staircase.ensemble_dir(s4d) != staircase.ensemble_dir(s4c)


def test_the_distilled_deploy_student_is_s3d_plus_only_the_teacher():
    """s4e_student_s3d is paired with s3d: the same network, data, optimiser, schedule, EMA, length and mix;
    only the loss becomes distillation (its hard part s3d's loss) and the cached s4d teacher comes first."""
    s3d, s4e = (resolved(staircase.BY_NAME[n]) for n in ("s3d_mnv2_40ep", "s4e_student_s3d"))
    assert s4e["loss"]["plugin"] == "distill" and s4e["loss"]["hard"] == s3d["loss"]
    assert s4e["batch_transforms"][1:] == s3d["batch_transforms"]
    teacher = s4e["batch_transforms"][0]
    stage = staircase.BY_NAME["s4e_student_s3d"]
    assert teacher["plugin"] == "teacher" and teacher["cache"] is True
    assert teacher["run"] == str(staircase.ensemble_dir(staircase.BY_NAME[stage.teacher]).relative_to(staircase.REPO))
    for r in (s3d, s4e):
        for key in ("name", "description", "loss", "batch_transforms"):
            r.pop(key)
    assert s3d == s4e
    assert stage.teacher == "s4d_ensemble" and stage.keep and stage.followup and stage.tta


def test_the_fast_deploy_candidate_is_s3d_at_48_px():
    s3d, s3e = (resolved(staircase.BY_NAME[n]) for n in ("s3d_mnv2_40ep", "s3e_mnv2_48"))
    assert s3e["model"]["backbone"]["input_size"] == 48 and s3d["model"]["backbone"]["input_size"] == 96
    for r in (s3d, s3e):
        for key in ("name", "description"):
            r.pop(key)
        r["model"]["backbone"].pop("input_size")
    assert s3d == s3e
