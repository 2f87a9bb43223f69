"""What plugin authors may import: ``from fer_core.api import ...``. Built-in plugins, bench
scripts and the example plugin import nothing else from fer_core, so everything a plugin needs
is here, and everything here is kept stable.
"""

from .build import eval_loader
from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from .cli import Overrides, RunArgument
from .console import console, metrics_tables, stdout, warn
from .data import eval_transform, load_image
from .errors import FerError
from .hardware import Precision, autocast, resolve_device, resolve_precision
from .interfaces import (Augmenter, Backbone, Batch, BatchTransform, Calibrator, Callback, CamTarget, DataSource,
                         DeclaresTasks,
                         Detector, Ensembler, Explainer, Exporter, Loss, NeedsStudentPreprocessing, NeedsTrainSamples,
                         Outputs, Predictor, Preprocessing, RebalancesClasses, ReweightsClasses, RunInfo, Sample,
                         SamplerFactory, ScheduleInfo, Scheduler, Seeded, TaskInfo, TestTimeAugmentation, Traits,
                         Tuner, supports, traits, traits_of)
from .kinds import KINDS, Kind, hookimpl
from .metrics import classification_metrics, ece, nll, reliability, sigmoid, softmax
from .plots import confusion_matrix_figure, confusion_matrix_png, figure_png
from .predictor import (RunPredictor, adapt_images, calibrate_run, calibration_report, class_index,
                        evaluate_predictions, guard_not_test, load_predictor, predict, single_image_latency_ms,
                        split_samples)
from .recipe import Component as RecipeTable
from .recipe import apply_overrides, dump_toml, read_toml
from .registry import Registry, get_registry
from .rundir import RunDir

__all__ = [name for name in dir() if not name.startswith("_")]
