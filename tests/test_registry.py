from __future__ import annotations

import sys
import textwrap

import pytest

from fer_core.errors import FerError
from fer_core.hookspecs import hookimpl
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
    reg = Registry(disabled=["heads"])
    assert "linear" not in reg.components["head"]
    assert "cosine" in reg.components["scheduler"]
    with pytest.raises(FerError, match=r"model.heads.emotion.plugin: unknown head plugin 'linear'"):
        reg.get("head", "linear", "model.heads.emotion")


def _fake_distribution(root, dist: str, module: str, body: str) -> None:
    """A really installed (dist-info on sys.path) distribution with a fer.plugins entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[fer.plugins]\n{module} = {module}\n")


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "rogue-losses", "rogue_losses", """
        from fer_core.hookspecs import hookimpl
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
    assert comp.validate({"hidden": "128"}, "h") == {"hidden": 128, "dropout": 0.3, "activation": "relu"}
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
