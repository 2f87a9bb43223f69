"""Typed contracts between the core and plugins. Nothing concrete lives here.

Conventions (see docs/plugins.md):
- a batch is a dict: ``image`` B×C×H×W float, ``label`` B long, optionally ``au`` B×K float and
  ``au_mask`` B×K, ``index`` B long; keys a component does not know pass through untouched;
- model outputs are a dict task → logits (``emotion`` always; ``au`` and others when heads exist);
- a loss maps (outputs, batch) → (total, parts) where parts are detached scalars for logging;
- heads emit logits; softmax/sigmoid happen only in metrics, ensembling and prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

Batch = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """What an image must look like before the model sees it; stored in every checkpoint."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(
            input_size=tuple(d["input_size"]),
            channels=int(d["channels"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
        )


class Backbone(nn.Module):
    """Image → feature vector. Subclasses set ``feature_dim`` and ``preprocessing``."""

    feature_dim: int
    preprocessing: Preprocessing
    #: conv nets run faster in channels_last; transformers do not care
    prefers_channels_last: bool = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # B×C×H×W → B×F
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory; backbones that cannot do it raise FerError."""
        from .errors import FerError

        raise FerError(f"backbone {type(self).__name__} does not support gradient checkpointing")

    def cam_target(self) -> "CamTarget | None":
        """The layer saliency explainers (Grad-CAM) should hook: the backbone knows its own
        internals; None = let the explainer fall back to the last spatial feature map."""
        return None


@dataclass(frozen=True)
class CamTarget:
    """A module whose output an explainer hooks, and how to read that output as a map:
    ``layout`` "NCHW" (CNNs), "NHWC" (Swin-like) or "tokens" (ViT: B×N×C, ``prefix_tokens``
    class/register tokens first, then a ``grid`` h×w of patch tokens)."""

    module: nn.Module
    name: str
    layout: str = "NCHW"
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None


# A head is any nn.Module mapping B×F features to B×N logits; its factory is
# ``factory(in_features, num_outputs, /, **recipe_params) -> nn.Module``.
HeadFactory = Callable[..., nn.Module]


@dataclass
class Sample:
    """One labelled image on disk."""

    path: Path
    label: int
    au: tuple[float, ...] | None = None  # 0/1 per AU name, or None when the image has no AU labels
    group: str | None = None  # e.g. the subject: the core's holdout (and cv folds) keep a group on one side


@dataclass
class DataSource:
    """What a dataset plugin returns: class names and samples per split, nothing loaded yet."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    au_names: list[str] = field(default_factory=list)
    description: str = ""
    #: problems the reader tolerated by a documented rule (e.g. stray AU tokens), for `fer data`
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskInfo:
    """What the engine tells loss/callback factories about the data they will see."""

    classes: list[str]
    class_counts: list[int]  # training split
    au_names: list[str]
    au_positive_counts: list[int]  # training split, per AU
    au_labelled: int = 0  # training images that carry AU labels


@runtime_checkable
class Loss(Protocol):
    def __call__(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@runtime_checkable
class Augmenter(Protocol):
    """Training-time image transform: H×W×C uint8 array → C×H×W float tensor (normalized).

    ``set_seed`` is called by the engine at every epoch start (and per DataLoader worker) so that
    augmentation is a function of (seed, epoch): that is what makes ``--resume`` exact.
    """

    def __call__(self, image: "np.ndarray") -> torch.Tensor: ...

    def set_seed(self, seed: int) -> None: ...


@dataclass(frozen=True)
class ScheduleInfo:
    epochs: int
    steps_per_epoch: int  # optimizer steps (after gradient accumulation)
    monitor_mode: str = "max"  # whether train.monitor improves upwards (for schedules that read it)


class Scheduler(Protocol):
    """A torch LR scheduler plus when to step it: ``interval`` is "step", "epoch", or "metric"
    (after each validation, ``step(value of train.monitor)``: ReduceLROnPlateau)."""

    interval: str

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """Hook points around the training loop; override what you need. Only rank 0 gets them
    unless ``all_ranks`` is true.

    ``run.model`` and ``run.optimizer`` are the live objects: a callback may read or change them
    at its hook points (EMA weights, pruning). What it returns from ``state_dict`` is saved in
    every ``last.pt`` and handed back to ``load_state_dict`` when the run resumes (Lightning's
    per-callback state), so a callback with state resumes exactly."""

    all_ranks: bool = False

    def on_fit_start(self, run: "RunInfo") -> None: ...

    def on_epoch_start(self, run: "RunInfo", epoch: int, num_batches: int) -> None: ...

    def on_train_batch_end(self, run: "RunInfo", epoch: int, batch: int, logs: dict[str, float]) -> None: ...

    def on_validation_start(self, run: "RunInfo", epoch: int) -> None: ...

    def on_validation_end(self, run: "RunInfo", epoch: int, report: dict[str, Any]) -> None: ...

    def on_epoch_end(self, run: "RunInfo", epoch: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, run: "RunInfo", final: dict[str, Any]) -> None: ...

    def on_exception(self, run: "RunInfo", error: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunInfo:
    """What callbacks may read about the run (and, for model/optimizer, act on)."""

    out_dir: Path
    recipe: dict[str, Any]
    classes: list[str]
    resumed: bool = False
    plugin_versions: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # small JSON-able state shared by callbacks
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    #: files the run wrote (name → path), filled as they are written, e.g. for a tracker to log
    files: dict[str, Path] = field(default_factory=dict)
    #: the group this run is one member of (a study's trial, a cv fold, a seed repeat), for trackers
    #: to nest it: {"kind": "study"|"cv"|"repeat", "id": absolute path of the group's directory,
    #: "name": the group's name, "member": this run's name in it (e.g. "trial-0003")}; None: alone
    group: dict[str, str] | None = None


class TestTimeAugmentation(Protocol):
    """Deterministic views of a normalised batch (B×C×H×W each, same size as the input) whose
    predictions are combined: ``combine`` is "probs" (mean of probabilities) or "logits"."""

    combine: str

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]: ...


class Ensembler(Protocol):
    """Combines members' class scores (N×C numpy arrays, aligned by class name: probabilities,
    or logits when the combiner says ``space = "logits"``) into N×C probabilities. ``fit`` sees
    the validation split only; ``state`` must be JSON-able (it is stored in the ensemble artifact)."""

    space: str

    def fit(self, per_model: Sequence["np.ndarray"], labels: "np.ndarray") -> None: ...

    def __call__(self, per_model: Sequence["np.ndarray"]) -> "np.ndarray": ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class Tuner(Protocol):
    """Searches recipe overrides: ``objective(overrides) -> score``."""

    def optimize(self, objective: Callable[[dict[str, Any]], float], n_trials: int) -> dict[str, Any]: ...


BatchTransform = Callable[[Batch, int], Batch]  # (batch on the device, epoch from 1) → batch
SamplerFactory = Callable[[int], "torch.utils.data.Sampler"]  # epoch seed → sampler over the training set


class Calibrator(Protocol):
    """Maps emotion logits (N×C numpy) to calibrated logits (softmax of them = the probabilities
    fer reports). ``fit`` sees validation predictions only; ``state`` is JSON-able and stored in
    ``best.pt``."""

    def fit(self, logits: "np.ndarray", labels: "np.ndarray") -> None: ...

    def __call__(self, logits: "np.ndarray") -> "np.ndarray": ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class Explainer(Protocol):
    """Saliency maps: ``explain(model, images, classes)`` → N×H×W maps in [0, 1] at the input
    resolution, for the class index given per image (None: the predicted class)."""

    def explain(self, model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | None) -> "np.ndarray": ...


class Predictor(Protocol):
    """A trained artifact (a run, an ensemble, an exported model) seen as one model: samples or
    image batches in, calibrated emotion scores out. ``predict`` returns numpy arrays:
    ``logits.emotion`` (raw), ``calibrated.emotion`` (logits whose softmax are the reported
    probabilities), ``label`` and, when the artifact has them, AU logits."""

    name: str
    path: Path
    classes: list[str]
    au_names: list[str]
    preprocessing: Preprocessing
    recipe: Any  # the training recipe (an ensemble: its first member's), for finding data splits
    registry: Any
    device: torch.device

    def predict(self, samples: Sequence[Sample], tta: "TestTimeAugmentation | None" = None,
                batch_size: int | None = None) -> dict[str, "np.ndarray"]: ...

    def logits(self, images: torch.Tensor, pre: Preprocessing, calibrated: bool = True) -> torch.Tensor: ...

    def size_mb(self) -> float: ...

    def describe(self) -> dict[str, Any]: ...


class Detector(Protocol):
    """H×W×3 uint8 image → faces: N×4 boxes (x1, y1, x2, y2), N scores, N×5×2 landmarks."""

    def __call__(self, image: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]: ...


class Exporter(Protocol):
    """Writes a Predictor as a deployable file; returns its path."""

    def export(self, predictor: Predictor, out: Path) -> Path: ...


# ---------------------------------------------------------------- optional capabilities
# What a built component may declare beyond its kind's contract. The engine checks them with
# ``supports`` and nothing else, so a third party can see every capability the core looks for.


@runtime_checkable
class Seeded(Protocol):
    """Reseeded by the engine at every epoch start (and per DataLoader worker): augmenters."""

    def set_seed(self, seed: int) -> None: ...


@runtime_checkable
class DeclaresTasks(Protocol):
    """A loss that trains extra heads: ``task_sizes`` = {task: outputs} (e.g. components)."""

    task_sizes: dict[str, int]


@runtime_checkable
class ReweightsClasses(Protocol):
    """A loss that corrects class imbalance (set the flag true)."""

    reweights_classes: bool


@runtime_checkable
class RebalancesClasses(Protocol):
    """A sampler that corrects class imbalance (set the flag true)."""

    rebalances_classes: bool


@runtime_checkable
class NeedsStudentPreprocessing(Protocol):
    """A batch transform told the model's preprocessing once after building (teachers)."""

    def set_student_preprocessing(self, pre: Preprocessing) -> None: ...


@runtime_checkable
class NeedsTrainSamples(Protocol):
    """A batch transform given the training samples once (``batch["index"]`` indexes them)."""

    def set_train_samples(self, samples: Sequence[Sample]) -> None: ...


_FLAGS = {ReweightsClasses: "reweights_classes", RebalancesClasses: "rebalances_classes"}


def supports(obj: Any, capability: type) -> bool:
    """Whether ``obj`` declares a capability above (flag capabilities: with the flag true)."""
    if not isinstance(obj, capability):
        return False
    flag = _FLAGS.get(capability)
    return bool(getattr(obj, flag)) if flag else True


@dataclass(frozen=True)
class Traits:
    """What a factory declares about its components before any is built (``recipe check``):

    - ``nested``: parameter → kind, for parameters that hold component tables (one table, or a
      table of named tables when ``many``); the registry validates them with the recipe's own
      registry and the factory receives the built components;
    - ``accepts_soft_labels`` (losses): True, or the nested parameter path whose loss decides
      (e.g. ``"losses.emotion"``); a recipe mixing labels in front of a loss without it is refused;
    - ``produces_soft_labels`` (batch transforms): adds ``batch["soft_label"]``;
    - ``example``: parameters for the registry contract tests when the defaults are not enough.
    """

    nested: Mapping[str, str] = field(default_factory=dict)
    many: frozenset[str] = frozenset()
    accepts_soft_labels: bool | str = False
    produces_soft_labels: bool = False
    example: Mapping[str, Any] = field(default_factory=dict)


NO_TRAITS = Traits()


def traits(**declared: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for factories: ``@traits(accepts_soft_labels=True)``."""
    if "many" in declared:
        declared["many"] = frozenset(declared["many"])
    value = Traits(**declared)

    def mark(factory: Callable[..., Any]) -> Callable[..., Any]:
        factory.fer_traits = value  # type: ignore[attr-defined]
        return factory

    return mark


def traits_of(factory: Callable[..., Any]) -> Traits:
    found = getattr(factory, "fer_traits", NO_TRAITS)
    return found if isinstance(found, Traits) else NO_TRAITS
