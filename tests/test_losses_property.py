"""Property tests of the class-imbalance losses (focal, label smoothing, weighted CE)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_core.errors import FerError
from fer_core.interfaces import TaskInfo
from fer_core.registry import Registry
from fer_plugins.losses_imbalance import (
    effective_number_weights,
    inverse_frequency_weights,
    make_focal,
    make_label_smoothing,
    make_weighted_cross_entropy,
)

FAST = settings(max_examples=60, deadline=None)


# Tiny tensors: intra-op threads only add contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def task_of(counts: list[int]) -> TaskInfo:
    return TaskInfo(classes=[f"c{i}" for i in range(len(counts))], class_counts=list(counts),
                    au_names=[], au_positive_counts=[])


@st.composite
def problems(draw, lo: float = -30.0, hi: float = 30.0, soft: bool = False):
    """(logits B×C, labels B, soft labels B×C or None, class counts C)."""
    c = draw(st.integers(2, 7))
    b = draw(st.integers(1, 6))
    vals = draw(st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False), min_size=b * c, max_size=b * c))
    logits = torch.tensor(vals, dtype=torch.float32).view(b, c)
    labels = torch.tensor(draw(st.lists(st.integers(0, c - 1), min_size=b, max_size=b)))
    counts = draw(st.lists(st.integers(0, 5000), min_size=c, max_size=c))
    soft_label = None
    if soft:
        raw = torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=b * c, max_size=b * c))).view(b, c)
        raw[torch.arange(b), labels] += 1e-3  # never an all-zero row
        soft_label = raw / raw.sum(1, keepdim=True)
    return logits, labels, soft_label, counts


def run(loss, logits, labels, soft_label=None):
    batch = {"label": labels}
    if soft_label is not None:
        batch["soft_label"] = soft_label
    return loss({"emotion": logits}, batch)


def all_losses(task: TaskInfo, gamma: float, smoothing: float):
    return [
        make_focal(task, gamma=gamma),
        make_focal(task, gamma=gamma, alpha="auto"),
        make_label_smoothing(task, smoothing=smoothing),
        make_weighted_cross_entropy(task, weights="inverse"),
        make_weighted_cross_entropy(task, weights="effective", beta=0.999),
    ]


# --------------------------------------------------------------------------- equalities


@FAST
@given(problems())
def test_focal_gamma0_is_cross_entropy(p):
    logits, labels, _, counts = p
    total, parts = run(make_focal(task_of(counts), gamma=0.0), logits, labels)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(total, ce, rtol=1e-6, atol=1e-6)
    assert parts["emotion"].requires_grad is False


@FAST
@given(problems(), st.floats(0.0, 5.0))
def test_focal_not_above_cross_entropy_elementwise(p, gamma):
    logits, labels, _, counts = p
    focal = make_focal(task_of(counts), gamma=gamma).per_sample(logits, {"label": labels})
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.all(focal <= ce + 1e-6)
    assert torch.all(focal >= 0)


@FAST
@given(problems())
def test_label_smoothing_zero_is_cross_entropy(p):
    logits, labels, _, counts = p
    total, _ = run(make_label_smoothing(task_of(counts), smoothing=0.0), logits, labels)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels), rtol=1e-6, atol=1e-6)


@FAST
@given(problems(), st.floats(0.0, 0.99))
def test_label_smoothing_matches_torch_and_its_soft_form(p, s):
    logits, labels, _, counts = p
    loss = make_label_smoothing(task_of(counts), smoothing=s)
    expected = F.cross_entropy(logits, labels, label_smoothing=s)
    torch.testing.assert_close(run(loss, logits, labels)[0], expected, rtol=1e-6, atol=1e-6)
    onehot = F.one_hot(labels, logits.shape[1]).float()
    torch.testing.assert_close(run(loss, logits, labels, onehot)[0], expected, rtol=1e-5, atol=1e-5)


@FAST
@given(problems(), st.sampled_from(["inverse", "effective", "list"]), st.floats(0.0, 0.9999))
def test_weighted_ce_hard_labels_match_torch(p, kind, beta):
    logits, labels, _, counts = p
    task = task_of(counts)
    if kind == "list":
        w = [0.5 + i for i in range(len(counts))]
        loss = make_weighted_cross_entropy(task, weights=w)
    else:
        loss = make_weighted_cross_entropy(task, weights=kind, beta=beta)
        w = (inverse_frequency_weights(counts) if kind == "inverse" else effective_number_weights(counts, beta))
    weight = torch.tensor(w, dtype=torch.float32)
    expected = F.cross_entropy(logits, labels, weight=weight)
    torch.testing.assert_close(run(loss, logits, labels)[0], expected, rtol=1e-6, atol=1e-6)
    # one-hot soft labels give the same value (the documented soft generalisation)
    onehot = F.one_hot(labels, logits.shape[1]).float()
    torch.testing.assert_close(run(loss, logits, labels, onehot)[0], expected, rtol=1e-5, atol=1e-5)


@FAST
@given(problems(soft=True), st.floats(0.0, 5.0))
def test_focal_soft_form_is_the_documented_formula(p, gamma):
    logits, labels, soft, counts = p
    task = task_of(counts)
    loss = make_focal(task, gamma=gamma, alpha="auto")
    alpha = torch.tensor(inverse_frequency_weights(counts))
    logp = F.log_softmax(logits.double(), 1)
    expected = -(soft.double() * alpha.double() * (1 - logp.exp()).clamp(min=1e-12) ** gamma * logp).sum(1).mean()
    torch.testing.assert_close(run(loss, logits, labels, soft)[0].double(), expected, rtol=1e-4, atol=1e-5)
    # and one-hot soft labels equal the hard-label value
    onehot = F.one_hot(labels, logits.shape[1]).float()
    torch.testing.assert_close(run(loss, logits, labels, onehot)[0], run(loss, logits, labels)[0],
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- numerics


@settings(max_examples=40, deadline=None)
@given(problems(lo=-1e4, hi=1e4, soft=False), st.booleans(), st.floats(0.0, 3.0), st.floats(0.0, 0.99),
       st.booleans())
def test_every_loss_finite_nonnegative_with_finite_grads_for_extreme_logits(p, use_soft, gamma, s, bf16):
    logits, labels, _, counts = p
    if bf16:  # what autocast hands the loss
        logits = logits.to(torch.bfloat16)
    soft = None
    if use_soft:
        perm = torch.roll(labels, 1)
        c = logits.shape[1]
        soft = 0.3 * F.one_hot(labels, c).float() + 0.7 * F.one_hot(perm, c).float()
    for loss in all_losses(task_of(counts), gamma, s):
        x = logits.clone().requires_grad_(True)
        total, parts = run(loss, x, labels, soft)
        assert total.dtype == torch.float32
        assert torch.isfinite(total) and total >= 0, (loss, total)
        total.backward()
        assert torch.isfinite(x.grad).all(), (loss, x.grad)
        assert torch.equal(parts["emotion"], total.detach())


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_focal_gradient_finite_when_the_model_is_certain(gamma):
    # p_true == 1 exactly in float32: (1-p)^gamma with gamma < 1 has an infinite derivative at 0
    logits = torch.tensor([[1e4, -1e4, 0.0], [50.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    total, _ = run(make_focal(task_of([1, 1, 1]), gamma=gamma), logits, labels)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


@FAST
@given(problems(soft=True), st.floats(0.0, 3.0), st.floats(0.0, 0.99))
def test_every_loss_with_soft_labels_is_finite_and_nonnegative(p, gamma, s):
    logits, labels, soft, counts = p
    for loss in all_losses(task_of(counts), gamma, s):
        x = logits.clone().requires_grad_(True)
        total, _ = run(loss, x, labels, soft)
        total.backward()
        assert torch.isfinite(total) and total >= 0
        assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- class weights


@FAST
@given(st.lists(st.integers(0, 100_000), min_size=2, max_size=10), st.floats(0.0, 0.99999))
def test_effective_number_weights_monotone_and_finite(counts, beta):
    w = effective_number_weights(counts, beta)
    assert all(math.isfinite(v) and v > 0 for v in w)
    assert math.isclose(sum(w) / len(w), 1.0, rel_tol=1e-9)
    nonzero = sorted((n, v) for n, v in zip(counts, w) if n > 0)
    for (n1, v1), (n2, v2) in zip(nonzero, nonzero[1:]):
        assert v2 <= v1 * (1 + 1e-12), (n1, v1, n2, v2)  # more images → no larger weight
    if nonzero:
        assert all(v == max(w) for n, v in zip(counts, w) if n == 0)  # empty classes: the max weight


def test_effective_number_weights_limits():
    counts = [10, 100, 1000]
    assert effective_number_weights(counts, 0.0) == [1.0, 1.0, 1.0]
    w = effective_number_weights(counts, 0.999999)  # beta → 1: inverse frequency
    for a, b in zip(w, inverse_frequency_weights(counts)):
        assert math.isclose(a, b, rel_tol=1e-2)
    assert effective_number_weights([0, 0, 0], 0.9) == [1.0, 1.0, 1.0]
    assert inverse_frequency_weights([0, 0]) == [1.0, 1.0]


@FAST
@given(st.lists(st.integers(0, 100_000), min_size=2, max_size=10))
def test_inverse_weights_finite_with_zero_counts(counts):
    w = inverse_frequency_weights(counts)
    assert all(math.isfinite(v) and v > 0 for v in w)
    assert math.isclose(sum(w) / len(w), 1.0, rel_tol=1e-9)


# --------------------------------------------------------------------------- validation, registry


def test_bad_parameters_name_their_key():
    task = task_of([10, 20, 30])
    with pytest.raises(FerError, match=r"loss\.weights: 2 weights given for 3 classes"):
        make_weighted_cross_entropy(task, weights=[1.0, 2.0])
    with pytest.raises(FerError, match=r"loss\.weights: every weight must be finite and > 0"):
        make_weighted_cross_entropy(task, weights=[1.0, 0.0, 2.0])
    with pytest.raises(FerError, match=r"loss\.alpha: 4 weights given for 3 classes"):
        make_focal(task, alpha=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(FerError, match=r"loss\.gamma"):
        make_focal(task, gamma=-1.0)
    with pytest.raises(FerError, match=r"loss\.smoothing"):
        make_label_smoothing(task, smoothing=1.0)
    with pytest.raises(FerError, match=r"loss\.beta"):
        make_weighted_cross_entropy(task, weights="effective", beta=1.0)


def test_registered_and_flag_class_reweighting():
    reg = Registry()
    task = task_of([100, 10, 1])
    assert reg.build("loss", {"plugin": "focal"}, "loss", task).reweights_classes is False
    assert reg.build("loss", {"plugin": "focal", "alpha": "auto"}, "loss", task).reweights_classes is True
    assert reg.build("loss", {"plugin": "focal", "alpha": [1, 2, 3]}, "loss", task).reweights_classes is True
    assert reg.build("loss", {"plugin": "weighted_cross_entropy"}, "loss", task).reweights_classes is True
    assert reg.build("loss", {"plugin": "weighted_cross_entropy", "weights": "effective", "beta": 0.99},
                     "loss", task).reweights_classes is True
    assert reg.build("loss", {"plugin": "label_smoothing", "smoothing": 0.2}, "loss", task).reweights_classes is False
    with pytest.raises(FerError, match=r"loss\.alpha"):
        reg.build("loss", {"plugin": "focal", "alpha": "inverse"}, "loss", task)
    with pytest.raises(FerError, match=r"loss\.gama: unknown key.*did you mean 'gamma'"):
        reg.build("loss", {"plugin": "focal", "gama": 1.0}, "loss", task)
