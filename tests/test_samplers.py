"""The class-rebalancing sampler and the double-correction warning's attributes."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import WeightedRandomSampler

from fer_core.errors import FerError
from fer_core.interfaces import TaskInfo
from fer_core.registry import get_registry
from fer_plugins.samplers import make_oversample

# 7 classes, heavily imbalanced like FER2013 (disgust is tiny)
COUNTS = [400, 40, 300, 900, 500, 250, 600]
LABELS = [c for c, n in enumerate(COUNTS) for _ in range(n)]
TASK = TaskInfo(classes=[f"c{i}" for i in range(7)], class_counts=COUNTS, au_names=[], au_positive_counts=[])


def draws(sampler) -> list[int]:
    return list(iter(sampler))


def test_power_one_balances_classes():
    s = make_oversample(LABELS, TASK, power=1.0)
    sampler = s(123)
    assert isinstance(sampler, WeightedRandomSampler) and sampler.replacement
    idx = draws(sampler)
    assert len(idx) == len(LABELS)  # num_samples 0 = the training set's size
    freq = Counter(LABELS[i] for i in idx)
    n, k = len(idx), len(COUNTS)
    expected = n / k
    chi2 = sum((freq[c] - expected) ** 2 / expected for c in range(k))
    assert chi2 < 22.5, (chi2, freq)  # chi-square, 6 d.o.f.: p ≈ 0.001
    for c, p in s.class_probabilities().items():
        assert p == pytest.approx(1 / k)


def test_power_zero_is_uniform_over_images():
    s = make_oversample(LABELS, TASK, power=0.0)
    assert s.rebalances_classes is False
    freq = Counter(LABELS[i] for i in draws(s(5)))
    n = len(LABELS)
    chi2 = sum((freq[c] - n * COUNTS[c] / n) ** 2 / (n * COUNTS[c] / n) for c in range(len(COUNTS)))
    assert chi2 < 22.5, (chi2, freq)


def test_partial_power_is_in_between():
    probs = make_oversample(LABELS, TASK, power=0.5).class_probabilities()
    natural = [n / len(LABELS) for n in COUNTS]
    assert probs[1] > natural[1] and probs[1] < 1 / 7  # the rare class: boosted, not fully


def test_same_seed_same_draws_different_seed_different():
    s = make_oversample(LABELS, TASK)
    assert draws(s(7)) == draws(s(7))
    assert draws(s(7)) != draws(s(8))
    # a second factory from the same labels (a resumed run) draws the same
    assert draws(make_oversample(LABELS, TASK)(7)) == draws(s(7))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.floats(0.0, 2.0), st.integers(0, 100),
       st.integers(0, 2**31))
def test_draws_are_valid_indices(labels, power, num_samples, seed):
    task = TaskInfo(classes=[f"c{i}" for i in range(5)], class_counts=[labels.count(i) for i in range(5)],
                    au_names=[], au_positive_counts=[])
    s = make_oversample(labels, task, power=power, num_samples=num_samples)
    idx = draws(s(seed))
    assert len(idx) == (num_samples or len(labels))
    assert all(0 <= i < len(labels) for i in idx)
    assert torch.isfinite(s.weights).all() and (s.weights > 0).all()
    assert sum(s.class_probabilities().values()) == pytest.approx(1.0)


def test_bad_parameters_name_their_key():
    with pytest.raises(FerError, match=r"sampler\.power"):
        make_oversample(LABELS, TASK, power=-1.0)
    with pytest.raises(FerError, match=r"sampler\.num_samples"):
        make_oversample(LABELS, TASK, num_samples=-5)
    with pytest.raises(FerError, match=r"sampler: the training split is empty"):
        make_oversample([], TASK)


def test_double_correction_attributes_through_the_registry():
    """build_all warns when `reweights_classes` (loss) meets `rebalances_classes` (sampler)."""
    reg = get_registry()
    sampler = reg.build("sampler", {"plugin": "oversample"}, "sampler", LABELS, TASK)
    assert sampler.rebalances_classes is True
    assert reg.build("sampler", {"plugin": "oversample", "power": 0.0}, "sampler", LABELS, TASK).rebalances_classes \
        is False
    reweighting = [
        reg.build("loss", {"plugin": "focal", "alpha": "auto"}, "loss", TASK),
        reg.build("loss", {"plugin": "weighted_cross_entropy"}, "loss", TASK),
        reg.build("loss", {"plugin": "weighted_cross_entropy", "weights": "effective"}, "loss", TASK),
    ]
    assert all(getattr(loss, "reweights_classes", False) for loss in reweighting)
    not_reweighting = [
        reg.build("loss", {"plugin": "focal"}, "loss", TASK),
        reg.build("loss", {"plugin": "label_smoothing"}, "loss", TASK),
    ]
    assert not any(getattr(loss, "reweights_classes", False) for loss in not_reweighting)
    with pytest.raises(FerError, match=r"sampler\.pwer: unknown key.*did you mean 'power'"):
        reg.build("sampler", {"plugin": "oversample", "pwer": 1.0}, "sampler", LABELS, TASK)


def test_epoch_seeded_loader_uses_the_sampler_every_epoch():
    """The loader calls the factory with the epoch seed: epochs differ, a replayed epoch does not."""
    from fer_core.data import EpochSeededLoader

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return len(LABELS)

        def __getitem__(self, i):
            return i

    s = make_oversample(LABELS, TASK)
    loader = EpochSeededLoader(Tiny(), batch_size=256, shuffle=True, num_workers=0, pin_memory=False, seed=0,
                               drop_last=False, sampler_factory=s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e1 = torch.cat(list(loader.epoch(1))).tolist()
        e1_again = torch.cat(list(loader.epoch(1))).tolist()
        e2 = torch.cat(list(loader.epoch(2))).tolist()
    assert e1 == e1_again and e1 != e2
    assert len(Counter(LABELS[i] for i in e1)) == 7
