"""Warmup-cosine schedule (property tests) and the multi-task emotion + AU losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fer_core.errors import FerError
from fer_core.interfaces import ScheduleInfo, TaskInfo
from fer_core.recipe import validate
from fer_core.registry import get_registry

RAFCE_CLASSES = ["Happily surprised", "Happily disgusted", "Sadly fearful", "Sadly angry", "Sadly surprised",
                 "Sadly disgusted", "Fearfully angry", "Fearfully surprised", "Fearfully disgusted",
                 "Angrily surprised", "Angrily disgusted", "Disgustedly surprised", "Happily fearful", "Happily sad"]


def schedule(lr, epochs, steps, **params):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_registry().build("scheduler", {"plugin": "warmup_cosine", **params}, "schedule", opt,
                                 ScheduleInfo(epochs=epochs, steps_per_epoch=steps))
    return opt, sched


def lrs(opt, sched, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(1e-5, 1.0), epochs=st.integers(1, 6), steps=st.integers(1, 40),
       warmup=st.floats(0, 3), min_frac=st.floats(0, 1), start=st.floats(0, 1))
def test_warmup_cosine_is_bounded_warms_up_monotonically_and_ends_at_min_lr(lr, epochs, steps, warmup, min_frac, start):
    min_lr = lr * min_frac
    opt, sched = schedule(lr, epochs, steps, warmup_epochs=warmup, min_lr=min_lr, warmup_start_factor=start)
    total = epochs * steps
    seq = lrs(opt, sched, total)
    tol = 1e-9 * lr
    assert all(min(min_lr, lr * start) - tol <= x <= lr + tol for x in seq)
    n_warm = min(round(warmup * steps), max(total - 1, 0))
    warm = seq[:n_warm]
    assert all(a <= b + tol for a, b in zip(warm, warm[1:]))
    if n_warm:
        assert warm[-1] == pytest.approx(lr)
    cos = seq[n_warm:]
    assert all(a + tol >= b for a, b in zip(cos, cos[1:]))  # never rises after warmup
    if total >= 2:
        assert seq[-1] == pytest.approx(min_lr, abs=tol)  # the last optimizer step runs at min_lr
    assert opt.param_groups[0]["lr"] == pytest.approx(min_lr, abs=tol)  # and it stays there


def test_warmup_in_steps_wins_and_resume_continues_exactly():
    opt, sched = schedule(0.1, 3, 10, warmup_epochs=2, warmup_steps=5, min_lr=0.001)
    first = lrs(opt, sched, 5)
    assert first == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    rest = lrs(opt, sched, 25)
    # a resumed run: fresh objects, then the checkpointed states (as the engine restores them)
    opt2, sched2 = schedule(0.1, 3, 10, warmup_epochs=2, warmup_steps=5, min_lr=0.001)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert lrs(opt2, sched2, 25) == pytest.approx(rest)


def test_schedule_counts_optimizer_steps_under_gradient_accumulation(write_recipe, tmp_path):
    from fer_core import checkpoint
    from fer_core.runner import train

    recipe = write_recipe(epochs=2, accumulate_steps=3)
    text = recipe.read_text().replace('[schedule]\nplugin = "cosine"',
                                      '[schedule]\nplugin = "warmup_cosine"\nwarmup_epochs = 1\nmin_lr = 0.0001')
    recipe.write_text(text)
    train(recipe, [], tmp_path / "acc", None)
    ck = checkpoint.load(tmp_path / "acc" / "last.pt")
    # 70 images, batch 16, drop_last → 4 batches → ceil(4/3) = 2 optimizer steps per epoch
    assert ck["train_state"]["global_step"] == 4
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # ended at min_lr
    # 2 warmup steps (epoch 1) end at the base lr; epoch 2's 2 steps anneal: 0.003, then 1e-4
    assert ck["train_state"]["history"][0]["lr"] == pytest.approx(0.003)


def task(classes=("a", "b", "c"), counts=(10, 5, 1), au=("AU1", "AU2"), au_pos=(2, 8), labelled=10):
    return TaskInfo(classes=list(classes), class_counts=list(counts), au_names=list(au),
                    au_positive_counts=list(au_pos), au_labelled=labelled)


def test_au_loss_is_masked_bce_with_logits_and_stable_for_extreme_logits():
    reg = get_registry()
    loss = reg.build("loss", {"plugin": "au_bce", "pos_weight": "none"}, "loss", task())
    logits = torch.tensor([[3.0, -2.0], [1e4, -1e4], [0.5, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    value, parts = loss({"au": logits}, {"au": target, "au_mask": mask})
    expected = F.binary_cross_entropy_with_logits(logits[:2], target[:2], reduction="sum") / 4
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert logits.grad[2].abs().sum() == 0  # unlabelled image: no gradient
    assert set(parts) == {"au"}


def test_au_positive_weights_follow_rarity():
    w = get_registry().build("loss", {"plugin": "au_bce"}, "loss", task()).pos_weight
    assert w.tolist() == pytest.approx([8 / 2, 1.0])  # 2 of 10 positive → 4; 8 of 10 → clipped to 1
    capped = get_registry().build("loss", {"plugin": "au_bce", "max_pos_weight": 3.0}, "loss", task()).pos_weight
    assert capped.tolist() == pytest.approx([3.0, 1.0])


def test_compound_components_derive_from_class_names():
    from fer_plugins.multitask import compound_components

    basic, m = compound_components(RAFCE_CLASSES)
    assert basic == ["happy", "sad", "fear", "anger", "surprise", "disgust"]
    assert m.sum(1).tolist() == [2.0] * 14
    hs = m[RAFCE_CLASSES.index("Happily surprised")]
    assert [basic[i] for i in hs.nonzero().flatten().tolist()] == ["happy", "surprise"]
    with pytest.raises(FerError, match="class 'happy' is not a compound"):
        compound_components(["happy", "sad"])


def test_multitask_fixed_and_uncertainty_weighting():
    reg = get_registry()
    t = task(classes=RAFCE_CLASSES, counts=[3] * 14)
    spec = {"plugin": "multitask", "losses": {"emotion": {"plugin": "cross_entropy"},
                                              "au": {"plugin": "au_bce", "pos_weight": "none"},
                                              "components": {"plugin": "compound_components"}},
            "weights": {"emotion": 0.7, "au": 0.3, "components": 0.5}}
    loss = reg.build("loss", spec, "loss", t)
    assert loss.task_sizes == {"components": 6}
    torch.manual_seed(0)
    out = {"emotion": torch.randn(4, 14), "au": torch.randn(4, 2), "components": torch.randn(4, 6)}
    batch = {"label": torch.tensor([0, 3, 5, 13]), "au": torch.tensor([[1.0, 0.0]] * 4), "au_mask": torch.ones(4, 2)}
    total, parts = loss(out, batch)
    assert total.item() == pytest.approx(0.7 * parts["emotion"] + 0.3 * parts["au"] + 0.5 * parts["components"])

    unc = reg.build("loss", {**spec, "weights": {}, "weighting": "uncertainty"}, "loss", t)
    out = {k: v.clone().requires_grad_() for k, v in out.items()}
    total, parts = unc(out, batch)
    total.backward()
    assert unc.log_vars.grad is not None and torch.isfinite(unc.log_vars.grad).all()
    assert parts["weight_au"].item() == pytest.approx(1.0)  # exp(-0) at init
    assert [n for n, _ in unc.named_parameters()] == ["log_vars"]


def test_nested_loss_tables_are_checked_with_the_recipe():
    raw = {"data": {"plugin": "folder", "root": "x"}, "model": {"backbone": {"plugin": "timm", "name": "resnet18"}},
           "loss": {"plugin": "multitask", "losses": {"au": {"plugin": "au_bce", "pos_wieght": "auto"}}}}
    with pytest.raises(FerError, match=r"loss\.losses\.au\.pos_wieght: unknown key .*did you mean 'pos_weight'"):
        validate(raw, "r.toml")
    raw["loss"] = {"plugin": "multitask", "losses": {"emotion": {"plugin": "cross_entropy"}}, "weights": {"au": 1.0}}
    with pytest.raises(FerError, match=r"loss.weights: \['au'\] are not among loss.losses"):
        get_registry().build("loss", raw["loss"], "loss", task())
