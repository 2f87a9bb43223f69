"""Every component kind, declared once.

A kind is what a plugin can contribute: its hook (``register_<kind>s(register)``), what the engine
passes the factory positionally, the contract of what the factory returns, and where its table
sits in a recipe. The hookspecs, the recipe's defaults, ``fer plugins`` and the kind table of
docs/plugins.md are derived from this list. Adding a kind = one ``Kind`` here + one Protocol in
``interfaces``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pluggy

PROJECT = "fer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Kind:
    name: str
    hook: str
    #: positional-only arguments the engine passes the factory (documentation and contract tests)
    context: str
    #: what the factory returns: a Protocol or base class of ``fer_core.interfaces``
    returns: str
    #: where its table sits in a recipe ("" = not in training recipes)
    place: str = ""
    #: the component a recipe falls back to when it has no table for this kind
    default: str | None = None
    doc: str = ""


KINDS: tuple[Kind, ...] = (
    Kind("dataset", "register_datasets", "", "DataSource", "[data]", doc="reads label files into samples per split"),
    Kind("backbone", "register_backbones", "", "Backbone", "[model.backbone]", doc="image → feature vector"),
    Kind("head", "register_heads", "in_features, num_outputs", "nn.Module (B×F → B×N logits)",
         "[model.heads.<task>]", default="linear", doc="features → one task's logits"),
    Kind("loss", "register_losses", "task: TaskInfo", "Loss", "[loss]", default="cross_entropy",
         doc="(outputs, batch) → (total, parts)"),
    Kind("optimizer", "register_optimizers", "param_list", "torch.optim.Optimizer", "[optimizer]", default="adamw"),
    Kind("scheduler", "register_schedulers", "optimizer, info: ScheduleInfo", "Scheduler", "[schedule]",
         doc="learning-rate schedule, stepped per step or per epoch"),
    Kind("augmenter", "register_augmenters", "pre: Preprocessing", "Augmenter", "[augment]", default="basic",
         doc="training-time image transform"),
    Kind("batch_transform", "register_batch_transforms", "task: TaskInfo, info: ScheduleInfo", "BatchTransform",
         "[[batch_transforms]]", doc="(batch, epoch) → batch on the device (Mixup, teachers)"),
    Kind("sampler", "register_samplers", "labels: list[int], task: TaskInfo", "SamplerFactory", "[sampler]",
         doc="seed → torch Sampler over the training set, every epoch"),
    Kind("callback", "register_callbacks", "", "Callback", "[[callbacks]], [tracking]",
         doc="acts at hook points around the loop; trackers are callbacks"),
    Kind("calibrator", "register_calibrators", "", "Calibrator", "[calibration]", default="temperature",
         doc="fitted on validation logits after training, applied to every prediction"),
    Kind("tta", "register_tta", "pre: Preprocessing", "TestTimeAugmentation", "[tta]", default="standard",
         doc="views of an evaluation batch whose predictions are combined"),
    Kind("explainer", "register_explainers", "", "Explainer", "[explain]", default="gradcam",
         doc="saliency maps for a model's predictions"),
    Kind("ensembler", "register_ensemblers", "", "Ensembler", "combiner (ensemble recipes)", default="average",
         doc="combines members' class scores"),
    Kind("artifact", "register_artifacts", "path: Path, overrides: list[str], device: str | None",
         "Predictor | None", "",
         doc="loads a trained artifact (an ensemble, an exported model) as a Predictor"),
    Kind("tuner", "register_tuners", "", "Tuner", "[tune]", doc="searches recipe values"),
    Kind("detector", "register_detectors", "", "Detector", "[detect]", doc="finds faces: boxes, scores, landmarks"),
    Kind("exporter", "register_exporters", "", "Exporter", "", doc="writes a run as a deployable file"),
    Kind("shipped_model", "register_shipped_models", "", "Path (a run directory, e.g. packed by `fer pack`)", "",
         doc="a trained model installed with a package, addressable by name wherever a run is (`fer eval default`)"),
)

BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}

#: Plugins that provide what every training recipe falls back to (the defaults above of kinds a
#: run always builds): like pytest's ``essential_plugins`` they cannot be disabled.
ESSENTIAL_PLUGINS: dict[str, str] = {
    "heads": "head 'linear'",
    "losses": "loss 'cross_entropy'",
    "optimizers": "optimizer 'adamw'",
    "augment_basic": "augmenter 'basic'",
    "calibration": "calibrator 'temperature'",
}


def _spec(hook: str, doc: str):
    def spec(register):  # pragma: no cover - a signature, never called
        ...

    spec.__name__ = hook
    spec.__doc__ = doc
    return hookspec(spec)


def register_commands(cli):  # pragma: no cover - a signature, never called
    """Add commands to the ``fer`` typer app (simonw/llm's ``register_commands``)."""


def validate_recipe(raw, source):  # pragma: no cover - a signature, never called
    """Claim and validate a recipe that is not a training recipe (e.g. an ensemble recipe, by
    its keys): return the resolved dict, or None to leave it to others."""


#: the hook specification class pluggy reads, generated from KINDS
FerSpecs = type("FerSpecs", (), {
    **{k.hook: _spec(k.hook, f"register(name, factory): factory({k.context}{', /, ' if k.context else ''}"
                             f"**params) -> {k.returns}") for k in KINDS},
    "register_commands": hookspec(register_commands),
    "validate_recipe": hookspec(firstresult=True)(validate_recipe),
})
