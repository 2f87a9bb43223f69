from __future__ import annotations

import sys
import textwrap

import pytest

from fer_core.errors import FerError
from fer_core.api import hookimpl
from fer_core.registry import Registry, get_registry


def test_builtins_are_registered_through_entry_points():
    reg = get_registry()
    rows = {(r["kind"], r["name"]): r for r in reg.rows()}
    for key in [("backbone", "timm"), ("backbone", "torchvision"), ("head", "linear"), ("head", "mlp"),
                ("loss", "cross_entropy"), ("optimizer", "adamw"), ("optimizer", "sgd"),
                ("scheduler", "cosine"), ("scheduler", "step"), ("augmenter", "basic"),
                ("dataset", "csv"), ("dataset", "folder"), ("dataset", "rafce"), ("dataset", "rafdb"),
                ("callback", "mlflow")]:
        assert key in rows, key
        assert rows[key]["distribution"] == "fer-toolkit"


def test_blocking_a_plugin_by_name_removes_its_components():
    reg = Registry(disabled=["schedules"])
    assert "cosine" not in reg.components["scheduler"]
    assert "linear" in reg.components["head"]
    with pytest.raises(FerError, match=r"schedule.plugin: unknown scheduler plugin 'cosine'.*disabled plugins: schedules"):
        reg.get("scheduler", "cosine", "schedule")


@pytest.mark.parametrize("name", ["heads", "losses", "optimizers", "augment_basic", "calibration"])
def test_essential_plugins_cannot_be_disabled(name):
    with pytest.raises(FerError, match=rf"plugins.disable: plugin '{name}' is essential: it provides .*cannot be disabled"):
        Registry(disabled=[name])


def test_a_typo_in_plugins_disable_is_an_error_with_a_suggestion():
    with pytest.raises(FerError, match=r"plugins.disable: no plugin named 'schedulez' \(did you mean 'schedules'\?\)"):
        Registry(disabled=["schedulez"])


def test_a_plugin_disabled_in_the_recipe_is_not_used_inside_a_nested_table():
    """A multitask loss whose emotion child is focal: disabling the plugin that provides focal
    must fail validation (the nested table is validated by the recipe's own registry)."""
    from fer_core.recipe import validate

    raw = {"data": {"plugin": "csv", "root": "x"}, "model": {"backbone": {"plugin": "timm", "name": "resnet10t"}},
           "loss": {"plugin": "multitask", "losses": {"emotion": {"plugin": "focal"}, "au": {"plugin": "au_bce"}}},
           "tracking": {"enabled": False}}
    validate(raw, "r.toml")  # fine with everything enabled
    with pytest.raises(FerError, match=r"r.toml: loss.losses.emotion.plugin: unknown loss plugin 'focal'.*"
                                       r"disabled plugins: losses_imbalance"):
        validate({**raw, "plugins": {"disable": ["losses_imbalance"]}}, "r.toml")


def test_nested_tables_get_their_defaults_filled_and_cannot_nest_themselves():
    from fer_core.recipe import validate, resolved

    raw = {"data": {"plugin": "csv", "root": "x"}, "model": {"backbone": {"plugin": "timm", "name": "resnet10t"}},
           "loss": {"plugin": "distill", "hard": {"plugin": "focal"}}, "tracking": {"enabled": False}}
    assert resolved(validate(raw, "r"))["loss"]["hard"] == {"plugin": "focal", "gamma": 2.0, "alpha": "none"}
    raw["loss"]["hard"] = {"plugin": "distill"}
    with pytest.raises(FerError, match=r"loss.hard: a 'distill' loss cannot nest itself"):
        validate(raw, "r")


def test_mixing_in_front_of_a_loss_without_soft_labels_is_refused():
    from fer_core.recipe import validate

    class Poly1:
        @hookimpl
        def register_losses(self, register):
            register("poly1_hard_only", lambda task, /, *, epsilon=1.0: None)

    get_registry().add_plugin(Poly1(), "poly1_plugin")
    try:
        raw = {"data": {"plugin": "csv", "root": "x"}, "model": {"backbone": {"plugin": "timm", "name": "resnet10t"}},
               "loss": {"plugin": "poly1_hard_only"}, "batch_transforms": [{"plugin": "mixup"}],
               "tracking": {"enabled": False}}
        with pytest.raises(FerError, match=r"batch_transforms\[0\]: plugin 'mixup' mixes labels .* loss "
                                           r"'poly1_hard_only' does not declare"):
            validate(raw, "r")
        raw["loss"] = {"plugin": "multitask", "losses": {"emotion": {"plugin": "cross_entropy"}}}
        validate(raw, "r")  # the emotion child decides, and cross-entropy accepts soft labels
    finally:
        get_registry().pm.unregister(name="poly1_plugin")
        get_registry().components["loss"].pop("poly1_hard_only")


def _fake_distribution(root, dist: str, module: str, body: str) -> None:
    """A really installed (dist-info on sys.path) distribution with a fer.plugins entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[fer.plugins]\n{module} = {module}\n")


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "rogue-losses", "rogue_losses", """
        from fer_core.api import hookimpl
        @hookimpl
        def register_losses(register):
            register("cross_entropy", lambda task, /: None)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FerError) as e:
        Registry()
    msg = str(e.value)
    assert "loss 'cross_entropy' is registered twice" in msg
    assert "fer-toolkit" in msg and "rogue-losses" in msg
    # and blocking the rogue plugin by name resolves it
    reg = Registry(disabled=["rogue_losses"])
    assert reg.components["loss"]["cross_entropy"].distribution == "fer-toolkit"
    sys.modules.pop("rogue_losses", None)


def test_factory_signature_is_the_recipe_schema():
    reg = get_registry()
    comp = reg.get("head", "mlp", "model.heads.emotion")
    assert comp.validate({"hidden": 128}, "h") == {"hidden": 128, "dropout": 0.3, "activation": "relu"}
    with pytest.raises(FerError, match=r"h\.hidden: .*integer"):
        comp.validate({"hidden": True}, "h")  # a boolean is not a number
    csv = reg.get("dataset", "csv", "data")
    assert csv.validate({"root": "x", "holdout_column": "fold", "holdout_value": 5}, "data")["holdout_value"] == "5"
    with pytest.raises(FerError, match=r"h\.activation: .*'relu' or 'gelu'"):
        comp.validate({"activation": "tanh"}, "h")
    with pytest.raises(FerError, match=r"h\.hiden: unknown key .*did you mean 'hidden'"):
        comp.validate({"hiden": 3}, "h")


def test_runtime_plugin_objects_register_like_entry_points():
    class Plugin:
        @hookimpl
        def register_heads(self, register):
            register("test_identity_head", lambda i, o, /, *, scale=1.0: None)

    reg = Registry()
    reg.add_plugin(Plugin(), "runtime_heads")
    assert reg.components["head"]["test_identity_head"].plugin == "runtime_heads"
