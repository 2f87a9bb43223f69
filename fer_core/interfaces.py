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


# A head is any nn.Module mapping B×F features to B×N logits; its factory is
# ``factory(in_features, num_outputs, /, **recipe_params) -> nn.Module``.
HeadFactory = Callable[..., nn.Module]


@dataclass
class Sample:
    """One labelled image on disk."""

    path: Path
    label: int
    au: tuple[float, ...] | None = None  # 0/1 per AU name, or None when the image has no AU labels


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


class Scheduler(Protocol):
    """A torch LR scheduler plus when to step it: ``interval`` is "step" or "epoch"."""

    interval: str

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """Hook points around the training loop; override what you need. Only rank 0 gets them
    unless ``all_ranks`` is true."""

    all_ranks: bool = False

    def on_fit_start(self, run: "RunInfo") -> None: ...

    def on_epoch_start(self, run: "RunInfo", epoch: int, num_batches: int) -> None: ...

    def on_train_batch_end(self, run: "RunInfo", epoch: int, batch: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(self, run: "RunInfo", epoch: int, metrics: dict[str, float]) -> None: ...

    def on_validation_end(self, run: "RunInfo", epoch: int, report: dict[str, Any]) -> None: ...

    def on_fit_end(self, run: "RunInfo", final: dict[str, Any]) -> None: ...

    def on_exception(self, run: "RunInfo", error: BaseException) -> None: ...


@dataclass
class RunInfo:
    """What callbacks may read about the run."""

    out_dir: Path
    recipe: dict[str, Any]
    classes: list[str]
    resumed: bool = False
    plugin_versions: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # callbacks may keep small JSON-able state here


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
