"""One contract per kind, checked on every registered component (timm's test_models.py style).

The parametrisation is the registry itself, so a third-party plugin that is installed is checked
by exactly these tests. A component is built from its defaults, plus the parameters its factory
declares as ``@traits(example=...)`` when defaults are not enough; a component with required
keys and no example must at least report every missing key as one FerError.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fer_core.api import (Callback, DeclaresTasks, FerError, Preprocessing, ScheduleInfo, Seeded, TaskInfo, get_registry,
                          supports, traits_of)
from fer_core.kinds import KINDS

REG = get_registry()
CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
TASK = TaskInfo(classes=CLASSES, class_counts=[30, 3, 20, 50, 40, 25, 10], au_names=["AU1", "AU2", "AU4"],
                au_positive_counts=[5, 7, 2], au_labelled=40)
COMPOUND = TaskInfo(classes=["Happily surprised", "Happily disgusted", "Sadly fearful", "Sadly angry", "Fearfully surprised",
                             "Angrily disgusted", "Disgustedly surprised"], class_counts=[5] * 7, au_names=["AU1", "AU2", "AU4"],
                    au_positive_counts=[1, 1, 1], au_labelled=5)
INFO = ScheduleInfo(epochs=3, steps_per_epoch=4)
PRE = Preprocessing(input_size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
COMPONENTS = [(c.kind, c.name) for kind in KINDS for c in sorted(REG.components[kind.name].values(), key=lambda c: c.name)]


def test_every_kind_is_declared_once_and_every_component_is_checked():
    assert len({k.name for k in KINDS}) == len(KINDS) and len({k.hook for k in KINDS}) == len(KINDS)
    assert {k for k, _ in COMPONENTS} <= set(CONTRACTS)
    assert set(CONTRACTS) <= {k.name for k in KINDS}


def _params(kind: str, name: str) -> dict:
    comp = REG.get(kind, name, kind)
    example = dict(traits_of(comp.factory).example)
    required = [k for k, p in comp.params().items() if p.default is p.empty and k not in example]
    if required:  # the contract for what cannot be built blind: one clear error per missing key
        with pytest.raises(FerError, match=rf"{kind}\.{required[0]}: "):
            comp.validate({k: v for k, v in example.items()}, kind)
        pytest.skip(f"{kind} '{name}' needs {required} (declare @traits(example=...) to test it fully)")
    return example


def _build(kind: str, name: str, *context):
    return REG.build(kind, {"plugin": name, **_params(kind, name)}, kind, *context)


def _outputs(sizes: dict[str, int], n: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {t: torch.randn(n, k, requires_grad=True) for t, k in sizes.items()}


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, len(CLASSES), (n,), generator=g)
    return {"image": torch.randn(n, 1, 32, 32, generator=g), "label": label, "index": torch.arange(n),
            "au": torch.randint(0, 2, (n, 3), generator=g).float(), "au_mask": torch.ones(n, 3),
            "teacher_logits": torch.randn(n, len(CLASSES), generator=g)}


def check_dataset(name):
    """Readers need files: pointed at a directory that does not exist they must say so in one
    FerError naming it (real data: tests/test_data_plugins.py)."""
    comp = REG.get("dataset", name, "data")
    example = dict(traits_of(comp.factory).example)
    wraps = [key for key, kind in traits_of(comp.factory).nested.items() if kind == "dataset"]
    if wraps:  # a dataset around another (folds): the wrapped reader must name the missing folder
        with pytest.raises(FerError, match="/nonexistent/fer-contract"):
            REG.build("dataset", {"plugin": name, **example,
                                  wraps[0]: {"plugin": "folder", "root": "/nonexistent/fer-contract"}}, "data")
        return
    if example:
        source = REG.build("dataset", {"plugin": name, **example}, "data")
        assert source.classes and source.splits
    with pytest.raises(FerError, match="/nonexistent/fer-contract"):
        REG.build("dataset", {"plugin": name, **example, "root": "/nonexistent/fer-contract"}, "data")


def check_backbone(name):
    backbone = _build("backbone", name).eval()
    pre = backbone.preprocessing
    x = torch.randn(2, pre.channels, *pre.input_size)
    with torch.no_grad():
        f = backbone(x)
    assert f.shape == (2, backbone.feature_dim)
    assert len(pre.mean) == len(pre.std) == pre.channels


def check_head(name):
    head = _build("head", name, 16, 5)
    assert isinstance(head, nn.Module)
    assert head(torch.randn(3, 16)).shape == (3, 5)


def check_loss(name):
    try:
        loss = _build("loss", name, TASK)
    except FerError:  # e.g. compound components: needs compound classes
        loss = _build("loss", name, COMPOUND)
    sizes = {"emotion": len(CLASSES), "au": 3, **(loss.task_sizes if supports(loss, DeclaresTasks) else {})}
    for soft in (False, True) if REG.accepts_soft_labels({"plugin": name}) else (False,):
        batch = _batch()
        if soft:
            batch["soft_label"] = torch.softmax(torch.randn(6, len(CLASSES)), 1)
        outputs = _outputs(sizes)
        total, parts = loss(outputs, batch)
        assert total.ndim == 0 and torch.isfinite(total)
        total.backward()
        assert outputs["emotion"].grad is not None or any(o.grad is not None for o in outputs.values())
        assert all(not p.requires_grad and p.ndim == 0 for p in parts.values())


def check_optimizer(name):
    w = nn.Parameter(torch.ones(3))
    opt = _build("optimizer", name, [w])
    assert isinstance(opt, torch.optim.Optimizer)
    (w ** 2).sum().backward()
    opt.step()
    assert (w < 1).all()  # it descends


def check_scheduler(name):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    sched = _build("scheduler", name, opt, INFO)
    assert sched.interval in ("step", "epoch", "metric")
    n = INFO.epochs * (INFO.steps_per_epoch if sched.interval == "step" else 1)
    for i in range(n):
        opt.step()
        if sched.interval == "metric":  # after each validation, with the monitored value
            sched.step(0.5 if i % 2 else 0.4)
        else:
            sched.step()
        lr = opt.param_groups[0]["lr"]
        assert np.isfinite(lr) and 0 <= lr <= 0.1 + 1e-12
    state = sched.state_dict()
    sched.load_state_dict(state)


def check_augmenter(name):
    aug = _build("augmenter", name, PRE)
    img = np.random.default_rng(0).integers(0, 256, (48, 48, 1), dtype=np.uint8)
    assert supports(aug, Seeded)
    aug.set_seed(3)
    a = aug(img)
    aug.set_seed(3)
    b = aug(img)
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)  # a function of the seed: what makes --resume exact


def check_batch_transform(name):
    bt = _build("batch_transform", name, TASK, INFO)
    batch = _batch()
    out = bt(dict(batch), 1)
    assert out["image"].shape == batch["image"].shape and torch.equal(out["label"], batch["label"])
    if traits_of(REG.get("batch_transform", name, "bt").factory).produces_soft_labels:
        assert torch.allclose(out["soft_label"].sum(1), torch.ones(6), atol=1e-5)


def check_sampler(name):
    labels = [i % len(CLASSES) for i in range(40)]
    factory = _build("sampler", name, labels, TASK)
    a, b = list(factory(5)), list(factory(5))
    assert a == b and all(0 <= i < len(labels) for i in a)


def check_callback(name):
    cb = _build("callback", name)
    assert isinstance(cb, Callback)
    json.dumps(cb.state_dict())  # state before training: JSON-able (it is checkpointed)


def check_calibrator(name):
    cal = _build("calibrator", name)
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 7)) * 4, rng.integers(0, 7, 50)
    cal.fit(logits, labels)
    out = cal(logits)
    assert out.shape == logits.shape and (out.argmax(1) == logits.argmax(1)).all()
    again = _build("calibrator", name)
    again.load_state(json.loads(json.dumps(cal.state())))
    assert np.allclose(again(logits), out)


def check_tta(name):
    tta = _build("tta", name, PRE)
    views = tta(torch.randn(2, 1, 32, 32))
    assert views and all(v.shape == (2, 1, 32, 32) for v in views)
    assert tta.combine in ("probs", "logits")


def check_explainer(name):
    from fer_core.model import FerModel

    backbone = REG.build("backbone", {"plugin": "timm", "name": "resnet10t", "in_chans": 1, "input_size": 32,
                                      "pretrained": False}, "b")
    model = FerModel(backbone, {"emotion": nn.Linear(backbone.feature_dim, 7)}, {"emotion": 7}).eval()
    maps = _build("explainer", name).explain(model, torch.randn(2, 1, 32, 32), None)
    maps = np.asarray(maps)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def check_ensembler(name):
    comb = _build("ensembler", name)
    rng = np.random.default_rng(0)
    per = [rng.dirichlet(np.ones(7), 40) for _ in range(2)]
    if comb.space == "logits":
        per = [np.log(p) for p in per]
    labels = rng.integers(0, 7, 40)
    comb.fit(per, labels)
    probs = comb(per)
    assert probs.shape == (40, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    again = _build("ensembler", name)
    again.load_state(json.loads(json.dumps(comb.state())))
    assert np.allclose(again(per), probs)


def check_artifact(name, tmp_path):
    # an artifact reader claims only what it recognises
    assert REG.get("artifact", name, "artifact").factory(tmp_path, [], None) is None


def check_shipped_model(name):
    # the factory names a run directory that fer can open
    from fer_core.api import RunDir

    path = REG.get("shipped_model", name, "shipped_model").factory()
    assert RunDir(path).is_run() and RunDir(path).best_file().is_file()


def check_generic(kind, name):
    _build(kind, name)


CONTRACTS = {"dataset": check_dataset, "backbone": check_backbone, "head": check_head, "loss": check_loss,
             "optimizer": check_optimizer, "scheduler": check_scheduler, "augmenter": check_augmenter,
             "batch_transform": check_batch_transform, "sampler": check_sampler, "callback": check_callback,
             "calibrator": check_calibrator, "tta": check_tta, "explainer": check_explainer,
             "ensembler": check_ensembler, "artifact": check_artifact, "tuner": None, "detector": None,
             "exporter": None, "shipped_model": check_shipped_model}


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_component_contract(kind, name, tmp_path, one_thread):
    check = CONTRACTS[kind]
    if check is None:
        check_generic(kind, name)
    elif kind == "artifact":
        check(name, tmp_path)
    else:
        check(name)
