"""Knowledge distillation: the `distill` loss (properties) and the `teacher` batch transform
(on a real tiny teacher run), end to end through `fer_core.runner.train`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_recipe
from fer_core.data import eval_transform, load_image
from fer_core.errors import FerError
from fer_core.api import load_predictor, split_samples
from fer_core.interfaces import Preprocessing, ScheduleInfo, TaskInfo
from fer_core.registry import get_registry
from fer_plugins import distill
from fer_plugins.distill import DistillLoss, TeacherTransform, make_teacher

FAST = settings(max_examples=60, deadline=None)
INFO = ScheduleInfo(epochs=1, steps_per_epoch=1)


# Tiny tensors: intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def task_of(classes: list[str]) -> TaskInfo:
    return TaskInfo(classes=list(classes), class_counts=[1] * len(classes), au_names=[], au_positive_counts=[])


def loss_of(**params) -> DistillLoss:
    return get_registry().build("loss", {"plugin": "distill", **params}, "loss", task_of([f"c{i}" for i in range(7)]))


# ------------------------------------------------------------------ the loss


@st.composite
def logit_rows(draw, lo: float = -50.0, hi: float = 50.0):
    c = draw(st.integers(2, 8))
    b = draw(st.integers(1, 6))
    vals = draw(st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False), min_size=b * c, max_size=b * c))
    return torch.tensor(vals, dtype=torch.float32).view(b, c)


@FAST
@given(logits=logit_rows(), temperature=st.floats(0.5, 20.0))
def test_kd_term_is_zero_when_the_student_equals_the_teacher(logits, temperature):
    loss = DistillLoss(lambda o, b: (o["emotion"].sum() * 0, {}), temperature, 0.7)
    kd = loss.kd(logits.clone(), logits.clone())
    assert abs(float(kd)) <= 1e-6


@FAST
@given(data=st.data(), hard=st.sampled_from([{"plugin": "cross_entropy"}, {"plugin": "focal", "gamma": 2.0},
                                              {"plugin": "label_smoothing", "smoothing": 0.1}]),
       soft=st.booleans(), temperature=st.floats(0.5, 20.0))
def test_alpha_zero_is_the_hard_loss(data, hard, soft, temperature):
    student = data.draw(logit_rows(-20, 20))
    b, c = student.shape
    teacher = data.draw(st.lists(st.floats(-20, 20), min_size=b * c, max_size=b * c))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=b, max_size=b)))
    batch = {"label": labels, "teacher_logits": torch.tensor(teacher, dtype=torch.float32).view(b, c)}
    if soft:
        batch["soft_label"] = torch.softmax(torch.randn(b, c, generator=torch.Generator().manual_seed(b * c)), 1)
    task = task_of([f"c{i}" for i in range(c)])
    reg = get_registry()
    loss = reg.build("loss", {"plugin": "distill", "alpha": 0.0, "temperature": temperature, "hard": hard}, "loss", task)
    ref, _ = reg.build("loss", hard, "loss.hard", task)({"emotion": student}, batch)
    total, parts = loss({"emotion": student}, batch)
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts["hard"], ref, rtol=0, atol=1e-6)


def test_loss_is_the_documented_formula_in_float32():
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(5, 7, generator=g)).to(torch.bfloat16).requires_grad_(True)
    teacher = (3 * torch.randn(5, 7, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, 7, (5,), generator=g)
    t, alpha = 3.0, 0.6
    loss = loss_of(temperature=t, alpha=alpha)
    total, parts = loss({"emotion": student}, {"label": labels, "teacher_logits": teacher})
    assert total.dtype == torch.float32 and set(parts) == {"kd", "hard", "emotion"}
    s, q = student.float().detach(), teacher.float()
    p_t = torch.softmax(q / t, 1)
    kl = (p_t * (torch.log_softmax(q / t, 1) - torch.log_softmax(s / t, 1))).sum(1).mean()
    ce = F.cross_entropy(s, labels)
    torch.testing.assert_close(parts["kd"], t * t * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["hard"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), alpha * t * t * kl + (1 - alpha) * ce, rtol=1e-5, atol=1e-6)
    total.backward()
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()


@FAST
@given(data=st.data(), lam=st.floats(0.0, 1.0), temperature=st.floats(0.5, 10.0))
def test_mixed_after_the_teacher_the_kd_gradient_is_that_of_the_mixed_teacher_distribution(data, lam, temperature):
    """A teacher listed before Mixup/CutMix: the student must learn the mixture of both images'
    teacher distributions, λ·p(t) + (1 − λ)·p(t_partner), whatever λ and T."""
    student = data.draw(logit_rows(-10, 10))
    b, c = student.shape
    teacher = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=b * c, max_size=b * c))).view(b, c)
    perm = torch.tensor(data.draw(st.permutations(list(range(b)))))
    from fer_plugins.mixing import MixPlan, make_mix
    mix = make_mix(task_of([f"c{i}" for i in range(c)]), ScheduleInfo(epochs=10, steps_per_epoch=1))
    batch = mix.apply({"image": torch.zeros(b, 1, 4, 4), "label": torch.zeros(b, dtype=torch.long),
                       "teacher_logits": teacher}, MixPlan("mixup", lam, perm))
    torch.testing.assert_close(batch["teacher_logits"], teacher, rtol=0, atol=0)
    torch.testing.assert_close(batch["teacher_logits_partner"], teacher[perm], rtol=0, atol=0)
    s = student.clone().requires_grad_(True)
    total, _ = DistillLoss(lambda o, b: (o["emotion"].sum() * 0, {}), temperature, 1.0)({"emotion": s}, batch)
    total.backward()
    ref = student.clone().requires_grad_(True)
    target = lam * torch.softmax(teacher / temperature, 1) + (1 - lam) * torch.softmax(teacher[perm] / temperature, 1)
    kl = (target * (torch.log(target.clamp_min(1e-30)) - torch.log_softmax(ref / temperature, 1))).sum(1).mean()
    (kl * temperature**2).backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_t_squared_keeps_the_kd_gradient_scale_for_large_temperatures():
    """d(T²·KL)/ds = T (softmax(s/T) - softmax(t/T)) / B ≈ (s - t)/(C B) (centred) for large T:
    the gradient hardly changes from T = 10 to T = 20, while KL alone would shrink ~4×."""
    g = torch.Generator().manual_seed(1)
    student, teacher = 2 * torch.randn(64, 7, generator=g), 2 * torch.randn(64, 7, generator=g)

    def grad_norm(t: float, scaled: bool = True) -> float:
        s = student.clone().requires_grad_(True)
        kd = DistillLoss(None, t, 1.0).kd(s, teacher)
        (kd if scaled else kd / (t * t)).backward()
        return float(s.grad.norm())

    ratio = grad_norm(10.0) / grad_norm(20.0)
    assert 1 / 1.3 < ratio < 1.3
    assert grad_norm(10.0, scaled=False) / grad_norm(20.0, scaled=False) > 3.0


def test_loss_errors_and_recipe_time_checks():
    with pytest.raises(FerError, match="plugin = \"teacher\""):
        loss_of()({"emotion": torch.zeros(2, 7)}, {"label": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(FerError, match="teacher_logits have shape"):
        loss_of()({"emotion": torch.zeros(2, 7)}, {"label": torch.zeros(2, dtype=torch.long),
                                                  "teacher_logits": torch.zeros(2, 6)})
    reg = get_registry()

    def check(**params):  # what `fer recipe check` does with the [loss] table, nested hard loss included
        return reg.validate("loss", {"plugin": "distill", **params}, "loss")

    for params, msg in [({"temperature": 0.0}, r"loss.temperature: Input should be greater than 0 \(got 0.0\)"),
                        ({"temperature": float("inf")}, "loss.temperature: Input should be a finite number"),
                        ({"alpha": 1.5}, r"loss.alpha: Input should be less than or equal to 1 \(got 1.5\)"),
                        ({"alpha": -0.1}, r"loss.alpha: Input should be greater than or equal to 0"),
                        ({"hard": {"gamma": 2.0}}, "loss.hard: expected a table with a 'plugin' key naming a loss"),
                        ({"hard": {"plugin": "distill"}}, "loss.hard: a 'distill' loss cannot nest itself"),
                        ({"hard": {"plugin": "focall"}}, "unknown loss plugin 'focall'.*did you mean 'focal'"),
                        ({"hard": {"plugin": "focal", "gama": 1.0}}, "loss.hard.gama: unknown key")]:
        with pytest.raises(FerError, match=msg):
            check(**params)
    # the hard loss's defaults are filled in, so the saved recipe states them
    assert check(hard={"plugin": "focal"})["hard"] == {"plugin": "focal", "gamma": 2.0, "alpha": "none"}


def test_hard_loss_traits_pass_through():
    loss = get_registry().build("loss", {"plugin": "distill", "hard": {"plugin": "weighted_cross_entropy"}},
                                "loss", TaskInfo(["a", "b"], [3, 1], [], []))
    assert loss.reweights_classes


# ------------------------------------------------------------------ the teacher transform (real tiny run)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, fer_subset):
    from fer_core.runner import train

    d = tmp_path_factory.mktemp("teacher")
    (d / "r.toml").write_text(tiny_recipe(fer_subset, None, epochs=1))
    train(d / "r.toml", [], d / "run", None)
    return d / "run"


@pytest.fixture(scope="module")
def teacher_run(teacher_dir):
    return load_predictor(teacher_dir, device="cpu")


def run_logits(predictor, images, pre):
    """What a run teacher gives: its raw emotion logits of the batch (the distillation
    temperature plays the calibrator's role)."""
    return predictor.logits(images, pre, calibrated=False)


@pytest.fixture(scope="module")
def train_samples(teacher_run):
    return split_samples(teacher_run, teacher_run.recipe.data.train_split)[1]


STUDENT_PRE = Preprocessing((40, 40), 3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))  # ≠ the teacher's 32×32 gray


def images_for(pre: Preprocessing, samples) -> torch.Tensor:
    return torch.stack([eval_transform(pre)(load_image(s.path, pre.channels)) for s in samples])


def build_teacher(run_dir, classes, **params) -> TeacherTransform:
    return get_registry().build("batch_transform", {"plugin": "teacher", "run": str(run_dir), **params},
                                "batch_transforms[0]", task_of(classes), INFO)


def test_on_the_fly_teacher_logits_are_the_runs_on_adapted_images(teacher_dir, teacher_run, train_samples):
    bt = build_teacher(teacher_dir, teacher_run.classes, device="cpu")
    images = images_for(STUDENT_PRE, train_samples[:6])
    batch = {"image": images, "label": torch.zeros(6, dtype=torch.long), "index": torch.arange(6)}
    with pytest.raises(FerError, match="set_student_preprocessing"):
        bt(batch, 1)
    bt.set_student_preprocessing(STUDENT_PRE)
    out = bt(batch, 1)
    assert set(out) == {*batch, "teacher_logits"} and out["image"] is images
    assert out["teacher_logits"].dtype == torch.float32 and out["teacher_logits"].shape == (6, len(teacher_run.classes))
    torch.testing.assert_close(out["teacher_logits"], run_logits(teacher_run, images, STUDENT_PRE))
    assert not out["teacher_logits"].requires_grad


def test_teacher_logits_follow_the_students_class_order(teacher_dir, teacher_run, train_samples, monkeypatch):
    original = distill.load_teacher

    def reversed_classes(*args, **kwargs):
        teacher = original(*args, **kwargs)
        teacher.classes = teacher.classes[::-1]  # column j of its logits now "means" class C-1-j
        return teacher

    monkeypatch.setattr(distill, "load_teacher", reversed_classes)
    bt = build_teacher(teacher_dir, teacher_run.classes, device="cpu")
    bt.set_student_preprocessing(teacher_run.preprocessing)
    images = images_for(teacher_run.preprocessing, train_samples[:5])
    got = bt({"image": images, "index": torch.arange(5)}, 1)["teacher_logits"]
    torch.testing.assert_close(got, run_logits(teacher_run, images, teacher_run.preprocessing).flip(1))
    # names match case-insensitively, in any order; a different class set is an error naming both
    shuffled = [c.upper() for c in teacher_run.classes[1:] + teacher_run.classes[:1]]
    other = build_teacher(teacher_dir, shuffled, device="cpu")
    assert [other.teacher.classes[j].upper() for j in other.order] == shuffled
    with pytest.raises(FerError, match=r"teacher's classes \[.*\] are not the student's classes \['a', 'b'\]"):
        build_teacher(teacher_dir, ["a", "b"], device="cpu")


def test_not_a_teacher_directory(tmp_path, teacher_run):
    with pytest.raises(FerError, match=r"batch_transforms.run: '.*' cannot be loaded as a teacher \(a run or ensemble "
                                       r"directory, or an artifact a plugin reads\): .*not a fer run directory"):
        make_teacher(task_of(teacher_run.classes), INFO, run=str(tmp_path))
    with pytest.raises(FerError, match="cannot be loaded as a teacher .*no such run directory or file"):
        make_teacher(task_of(teacher_run.classes), INFO, run=str(tmp_path / "missing"))


def test_a_teacher_loaded_on_one_device_follows_the_batch(teacher_dir, teacher_run, monkeypatch):
    """A Predictor is placed when loaded: moving the teacher loads it again on the new device
    (and not when the device is the same)."""
    teacher = distill.load_teacher(teacher_dir, "cpu")
    loads = []
    original = distill.load_predictor
    monkeypatch.setattr(distill, "load_predictor", lambda *a, **k: loads.append(k) or original(*a, **k))
    teacher.to(torch.device("cpu"))
    assert loads == []
    before = teacher.predictor
    teacher.predictor = type("Elsewhere", (), {"device": torch.device("meta")})()
    teacher.to(torch.device("cpu"))
    assert loads == [{"device": "cpu"}] and teacher.predictor is not before
    assert teacher.predictor.device == torch.device("cpu")


class CountingTeacher:
    """A deterministic fake teacher: logits = mean pixel × (1..C); counts the images it sees."""

    def __init__(self, classes, pre):
        self.classes, self.preprocessing, self.seen, self.device = list(classes), pre, 0, None

    def to(self, device):
        self.device = device

    def logits(self, images, pre):
        assert pre == self.preprocessing  # the cache uses the teacher's own clean view
        self.seen += images.shape[0]
        return images.float().mean((1, 2, 3))[:, None] * torch.arange(1, len(self.classes) + 1).float()


def test_cache_computes_each_training_image_once_on_its_clean_view(teacher_run, train_samples):
    fake = CountingTeacher(teacher_run.classes[::-1], teacher_run.preprocessing)
    bt = TeacherTransform(fake, teacher_run.classes, cache=True)
    idx = torch.tensor([3, 0, 7, 3])
    augmented = torch.randn(4, 1, 32, 32)  # the batch's (augmented) images are not what is cached
    with pytest.raises(FerError, match="set_train_samples"):
        bt({"image": augmented, "index": idx}, 1)
    bt.set_train_samples(train_samples)
    first = bt({"image": augmented, "index": idx}, 1)["teacher_logits"]
    second = bt({"image": torch.randn(4, 1, 32, 32), "index": idx}, 2)["teacher_logits"]
    assert fake.seen == len(train_samples)  # filled once, every image once
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[0], first[3], rtol=0, atol=0)
    clean = images_for(teacher_run.preprocessing, [train_samples[i] for i in idx.tolist()])
    torch.testing.assert_close(first, fake.logits(clean, teacher_run.preprocessing).flip(1))
    bt({"image": augmented, "index": torch.arange(len(train_samples))}, 3)
    assert fake.seen == len(train_samples) + 4  # (the direct call above), no refill
    with pytest.raises(FerError, match="cache = true cannot be combined with a mix transform listed before teacher"):
        bt({"image": augmented, "index": idx, "mix_lambda": torch.tensor(0.5)}, 1)
    with pytest.raises(FerError, match="outside the"):
        bt({"image": augmented, "index": torch.tensor([len(train_samples)])}, 1)


def test_cache_with_the_real_teacher_matches_run_logits(teacher_dir, teacher_run, train_samples):
    bt = build_teacher(teacher_dir, teacher_run.classes, cache=True, device="cpu")
    bt.set_train_samples(train_samples)
    idx = torch.tensor([5, 1, 2])
    got = bt({"image": torch.zeros(3, 3, 40, 40), "index": idx}, 1)["teacher_logits"]
    clean = images_for(teacher_run.preprocessing, [train_samples[i] for i in idx.tolist()])
    torch.testing.assert_close(got, run_logits(teacher_run, clean, teacher_run.preprocessing), rtol=1e-4, atol=1e-5)


def test_an_ensemble_directory_is_a_teacher(teacher_dir, teacher_run, train_samples, tmp_path):
    from fer_plugins.ensembles import EnsemblePredictor, build, validate_spec

    out = tmp_path / "ens"
    build(validate_spec({"members": [str(teacher_dir)]}, "t"), out)
    bt = build_teacher(out, teacher_run.classes, device="cpu")
    assert isinstance(bt.teacher.predictor, EnsemblePredictor)
    assert bt.teacher.preprocessing == teacher_run.preprocessing  # its first member's clean view
    bt.set_student_preprocessing(STUDENT_PRE)
    images = images_for(STUDENT_PRE, train_samples[:4])
    got = bt({"image": images, "index": torch.arange(4)}, 1)["teacher_logits"]
    ensemble = load_predictor(out, device="cpu")
    torch.testing.assert_close(got, ensemble.logits(images, STUDENT_PRE), rtol=1e-4, atol=1e-5)
    # one member: the log of its calibrated probabilities, i.e. its calibrated logits up to a constant per row
    calibrated = teacher_run.logits(images, STUDENT_PRE)  # an ensemble's members are always calibrated
    torch.testing.assert_close(torch.log_softmax(got, 1), torch.log_softmax(calibrated, 1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ end to end


def student_recipe(fer_subset, teacher_dir, cache: bool) -> str:
    return tiny_recipe(fer_subset, None, epochs=1).replace("in_chans = 1", "in_chans = 3") + f"""
[loss]
plugin = "distill"
temperature = 4.0
alpha = 0.7

[[batch_transforms]]
plugin = "teacher"
run = "{teacher_dir}"
cache = {str(cache).lower()}
"""


@pytest.mark.parametrize("cache", [False, True])
def test_a_student_distils_from_a_teacher_run(fer_subset, teacher_dir, tmp_path, cache):
    from fer_core.runner import train

    recipe = tmp_path / "student.toml"
    recipe.write_text(student_recipe(fer_subset, teacher_dir, cache))
    out, final = train(recipe, [], tmp_path / "student", None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and "accuracy" in final
    saved = (out / "recipe.toml").read_text()
    assert 'plugin = "teacher"' in saved and 'class_weights = "none"' in saved  # hard loss defaults stated


def test_the_core_hands_the_student_preprocessing_over(fer_subset, teacher_dir, tmp_path):
    from fer_core.runner import train

    recipe = tmp_path / "student.toml"
    recipe.write_text(student_recipe(fer_subset, teacher_dir, cache=False))
    out, _ = train(recipe, [], tmp_path / "student", None)
    assert (out / "metrics.json").is_file()
