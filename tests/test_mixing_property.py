"""Property tests of the Mixup/CutMix batch transforms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_core.errors import FerError
from fer_core.interfaces import ScheduleInfo, TaskInfo
from fer_core.registry import get_registry
from fer_plugins.mixing import make_cutmix, make_mix, make_mixup

FAST = settings(max_examples=50, deadline=None)


# Tiny tensors: intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def task_of(c: int, k: int = 0) -> TaskInfo:
    return TaskInfo(classes=[f"c{i}" for i in range(c)], class_counts=[10] * c,
                    au_names=[f"AU{i}" for i in range(k)], au_positive_counts=[3] * k)


INFO = ScheduleInfo(epochs=10, steps_per_epoch=5)


def make_batch(b: int, c: int, h: int, w: int, seed: int, *, k: int = 0, constant: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    if constant:  # image i is the constant i + 1: any pasted pixel differs from the original
        image = (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    else:
        image = torch.randn(b, 3, h, w, generator=g)
    batch = {"image": image, "label": torch.randint(0, c, (b,), generator=g), "index": torch.arange(b)}
    if k:
        batch["au"] = torch.randint(0, 2, (b, k), generator=g).float()
        batch["au_mask"] = torch.randint(0, 2, (b, k), generator=g).float()
    return batch


def snapshot(batch: dict) -> dict:
    return {k: v.clone() for k, v in batch.items()}


shapes = st.tuples(st.integers(1, 8), st.integers(2, 7), st.integers(1, 12), st.integers(1, 12))


def check_targets(out: dict, batch: dict, plan, c: int) -> None:
    soft = out["soft_label"]
    assert soft.shape == (batch["label"].shape[0], c)
    assert torch.all(soft >= 0)
    torch.testing.assert_close(soft.sum(1), torch.ones(soft.shape[0]), rtol=0, atol=1e-6)
    lam = float(out["mix_lambda"])
    assert out["mix_lambda"].dim() == 0 and lam == pytest.approx(plan.lam)
    onehot = F.one_hot(batch["label"], c).float()
    torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot[plan.perm], rtol=0, atol=1e-6)
    assert torch.equal(out["label"], batch["label"])


@FAST
@given(shapes, st.integers(0, 2**31), st.integers(1, 10), st.integers(0, 50), st.floats(0.05, 4.0))
def test_mixup_is_a_convex_combination(shape, seed, epoch, index, alpha):
    b, c, h, w = shape
    mix = make_mixup(task_of(c, 3), INFO, alpha=alpha, seed=seed)
    batch = make_batch(b, c, h, w, seed, k=3)
    before = snapshot(batch)
    plan = mix.draw(epoch, index, b, h, w)
    assert plan.method == "mixup" and 0.0 <= plan.lam <= 1.0
    out = mix.apply(batch, plan)
    check_targets(out, batch, plan, c)
    lam, perm = plan.lam, plan.perm
    torch.testing.assert_close(out["image"], lam * batch["image"] + (1 - lam) * batch["image"][perm])
    torch.testing.assert_close(out["au"], lam * batch["au"] + (1 - lam) * batch["au"][perm])
    assert torch.equal(out["au_mask"], batch["au_mask"] * batch["au_mask"][perm])
    for k, v in before.items():  # nothing mutated in place
        assert torch.equal(batch[k], v), k


@FAST
@given(shapes, st.integers(0, 2**31), st.integers(1, 10), st.integers(0, 50), st.floats(0.05, 4.0))
def test_cutmix_lambda_is_the_fraction_of_pixels_kept(shape, seed, epoch, index, alpha):
    b, c, h, w = shape
    mix = make_cutmix(task_of(c), INFO, alpha=alpha, seed=seed)
    batch = make_batch(b, c, h, w, seed, constant=True)
    before = snapshot(batch)
    plan = mix.draw(epoch, index, b, h, w)
    assert plan.method == "cutmix"
    out = mix.apply(batch, plan)
    check_targets(out, batch, plan, c)
    changed = (out["image"] != batch["image"]).all(dim=1)  # B×H×W, all channels pasted together
    for i in range(b):
        n_changed = int(changed[i].sum())
        if int(plan.perm[i]) == i:
            assert n_changed == 0  # pasted from itself
        else:
            assert n_changed == round((1 - plan.lam) * h * w)
            # the pasted pixels come from the partner, the others are the original
            vals = out["image"][i, 0]
            assert torch.all((vals == i + 1) | (vals == int(plan.perm[i]) + 1))
    y1, y2, x1, x2 = plan.box
    assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w
    assert plan.lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (h * w))
    for k, v in before.items():
        assert torch.equal(batch[k], v), k


@FAST
@given(shapes, st.integers(0, 2**31), st.floats(0.0, 1.0))
def test_existing_soft_labels_are_mixed_again(shape, seed, switch_prob):
    b, c, h, w = shape
    mix = make_mix(task_of(c), INFO, switch_prob=switch_prob, seed=seed)
    batch = make_batch(b, c, h, w, seed)
    raw = torch.rand(b, c, generator=torch.Generator().manual_seed(seed)) + 1e-3
    batch["soft_label"] = raw / raw.sum(1, keepdim=True)
    plan = mix.draw(1, 0, b, h, w)
    out = mix.apply(batch, plan)
    soft = out["soft_label"]
    assert torch.all(soft >= 0)
    torch.testing.assert_close(soft.sum(1), torch.ones(b), rtol=0, atol=1e-6)
    torch.testing.assert_close(soft, plan.lam * batch["soft_label"] + (1 - plan.lam) * batch["soft_label"][plan.perm])


@FAST
@given(st.integers(1, 12), st.integers(0, 12), st.integers(0, 100))
def test_off_last_epochs_disables_mixing_exactly_there(epochs, off, seed):
    mix = make_mix(task_of(3), ScheduleInfo(epochs=epochs, steps_per_epoch=2), off_last_epochs=off, seed=seed)
    for epoch in range(1, epochs + 1):
        batch = make_batch(4, 3, 6, 6, seed)
        out = mix(batch, epoch)
        if epoch > epochs - off:
            assert out is batch and "soft_label" not in out
        else:
            assert "soft_label" in out and "mix_lambda" in out


@FAST
@given(st.integers(0, 2**31), st.floats(0.0, 1.0))
def test_same_seed_epoch_and_batch_order_give_identical_batches(seed, prob):
    """What --resume relies on: a fresh transform replaying an epoch mixes exactly the same."""
    batches = [make_batch(5, 4, 8, 8, seed + i, k=2) for i in range(4)]

    def replay(mix, epochs):
        return [mix(dict(b), e) for e in epochs for b in batches]

    first = replay(make_mix(task_of(4, 2), INFO, prob=prob, seed=seed), [1, 2, 3])
    resumed = replay(make_mix(task_of(4, 2), INFO, prob=prob, seed=seed), [3])  # a run resumed at epoch 3
    again = replay(make_mix(task_of(4, 2), INFO, prob=prob, seed=seed), [1, 2, 3])
    for a, b in zip(first[-len(batches):], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_and_epochs_get_different_draws():
    mix = make_mixup(task_of(4), INFO, seed=0)
    plans = {(e, i): mix.draw(e, i, 16, 32, 32) for e in (1, 2) for i in range(4)}
    lams = {round(p.lam, 12) for p in plans.values()}
    assert len(lams) == len(plans)
    assert mix.draw(1, 0, 16, 32, 32).lam != make_mixup(task_of(4), INFO, seed=1).draw(1, 0, 16, 32, 32).lam


def test_switch_prob_and_prob_choose_the_method():
    both = make_mix(task_of(3), INFO, switch_prob=0.5)
    methods = [both.draw(1, i, 8, 16, 16).method for i in range(400)]
    assert 120 < methods.count("cutmix") < 280 and methods.count("none") == 0
    assert {make_mix(task_of(3), INFO, switch_prob=0.0).draw(1, i, 8, 16, 16).method for i in range(50)} == {"mixup"}
    assert {make_mix(task_of(3), INFO, switch_prob=1.0).draw(1, i, 8, 16, 16).method for i in range(50)} == {"cutmix"}
    assert {make_mix(task_of(3), INFO, mixup_alpha=0.0).draw(1, i, 8, 16, 16).method for i in range(50)} == {"cutmix"}
    assert {make_mix(task_of(3), INFO, cutmix_alpha=0.0).draw(1, i, 8, 16, 16).method for i in range(50)} == {"mixup"}
    assert {make_mix(task_of(3), INFO, mixup_alpha=0.0, cutmix_alpha=0.0).draw(1, i, 8, 16, 16).method
            for i in range(20)} == {"none"}
    half = make_mix(task_of(3), INFO, prob=0.5)
    n_none = [half.draw(1, i, 8, 16, 16).method for i in range(400)].count("none")
    assert 120 < n_none < 280
    assert {make_mix(task_of(3), INFO, prob=0.0).draw(1, i, 8, 16, 16).method for i in range(20)} == {"none"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_any_dtype_and_channels_last(dtype):
    batch = make_batch(6, 5, 10, 12, 0)
    batch["image"] = (batch["image"] * 20 + 100).to(dtype).contiguous(memory_format=torch.channels_last)
    for method in ("mixup", "cutmix"):
        mix = (make_mixup if method == "mixup" else make_cutmix)(task_of(5), INFO)
        out = mix(batch, 1)
        assert out["image"].dtype == dtype and out["image"].shape == batch["image"].shape
        assert out["soft_label"].dtype == torch.float32


def test_empty_and_single_image_batches():
    mix = make_mix(task_of(3), INFO)
    out = mix(make_batch(1, 3, 4, 4, 0), 1)
    torch.testing.assert_close(out["soft_label"], F.one_hot(out["label"], 3).float())
    empty = {"image": torch.zeros(0, 3, 4, 4), "label": torch.zeros(0, dtype=torch.long)}
    assert mix(empty, 1) is empty


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_works_on_cuda():
    batch = {k: v.cuda() for k, v in make_batch(8, 4, 16, 16, 0, k=3).items()}
    for method in ("mixup", "cutmix"):
        mix = (make_mixup if method == "mixup" else make_cutmix)(task_of(4, 3), INFO)
        out = mix(batch, 1)
        cpu = mix.apply({k: v.cpu() for k, v in batch.items()}, mix.draw(1, 0, 8, 16, 16))
        for k in out:
            assert out[k].device.type == "cuda", k
            torch.testing.assert_close(out[k].cpu(), cpu[k])


def test_validation_and_registry():
    reg = get_registry()
    for name in ("mix", "mixup", "cutmix"):
        assert name in reg.components["batch_transform"]
    t = reg.build("batch_transform", {"plugin": "mix", "switch_prob": 0.2, "off_last_epochs": 2}, "batch_transforms[0]",
                  task_of(3), INFO)
    assert (t.switch_prob, t.off_last_epochs, t.mixup_alpha, t.cutmix_alpha) == (0.2, 2, 0.2, 1.0)
    assert reg.build("batch_transform", {"plugin": "mixup"}, "bt", task_of(3), INFO).cutmix_alpha == 0.0
    assert reg.build("batch_transform", {"plugin": "cutmix"}, "bt", task_of(3), INFO).mixup_alpha == 0.0
    with pytest.raises(FerError, match=r"batch_transforms\.prob"):
        make_mix(task_of(3), INFO, prob=1.5)
    with pytest.raises(FerError, match=r"batch_transforms\.switch_prob"):
        make_mix(task_of(3), INFO, switch_prob=-0.1)
    with pytest.raises(FerError, match=r"batch_transforms\.mixup_alpha"):
        make_mix(task_of(3), INFO, mixup_alpha=-1.0)
    with pytest.raises(FerError, match=r"batch_transforms\.alpha"):
        make_cutmix(task_of(3), INFO, alpha=float("nan"))
    with pytest.raises(FerError, match=r"batch_transforms\.off_last_epochs"):
        make_mixup(task_of(3), INFO, off_last_epochs=-1)
    with pytest.raises(FerError, match=r"unknown key"):
        reg.build("batch_transform", {"plugin": "mixup", "cutmix_alpha": 1.0}, "bt", task_of(3), INFO)
