"""What plugin authors (and notebooks, bench scripts) may import: ``from fer_core.api import ...``.
Built-in plugins, bench scripts and the example plugin import nothing else from fer_core, so
everything they need is here, and everything here is kept stable. The programmatic training
path is here too: ``validate`` → ``build_all`` → ``Engine``, or ``train`` for all of `fer run`.
"""

from .build import Built, build_all, build_model, eval_loader
from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from .cli import Overrides, RunArgument
from .console import ProgressBar, console, metrics_tables, stdout, warn
from .data import EpochSeededLoader, eval_transform, load_image
from .engine import Engine, EngineConfig
from .errors import FerError
from .hardware import Precision, autocast, cpu_has_native_bf16, resolve_device, resolve_precision
from .interfaces import (Augmenter, Backbone, Batch, BatchTransform, Calibrator, Callback, CamTarget, DataSource,
                         DeclaresTasks,
                         Detector, Ensembler, Explainer, Exporter, Loss, NeedsStudentPreprocessing, NeedsTrainSamples,
                         Outputs, Predictor, Preprocessing, RebalancesClasses, ReweightsClasses, RunInfo, Sample,
                         SamplerFactory, ScheduleInfo, Scheduler, Seeded, TaskInfo, TestTimeAugmentation, Traits,
                         Tuner, supports, traits, traits_of)
from .kinds import BY_NAME, KINDS, Kind, hookimpl
from .metrics import classification_metrics, ece, nll, reliability, sigmoid, softmax
from .plots import confusion_matrix_figure, confusion_matrix_png, figure_png
from .predictor import (RunPredictor, adapt_images, calibration_report, class_index, fit_calibrator,
                        evaluate_predictions, guard_not_test, load_predictor, predict, shipped_model,
                        single_image_latency_ms, split_samples)
from .recipe import Component as RecipeTable
from .recipe import Recipe, apply_overrides, dump_toml, load, read_toml, resolved, validate, validation_message
from .registry import Registry, get_registry
from .rundir import RunDir
from .runner import train

__all__ = [name for name in dir() if not name.startswith("_")]
