"""TOML recipes → validated pydantic objects. Nothing runs until a recipe validates fully."""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import FerError
from .kinds import BY_NAME
from .registry import Registry, get_registry, pydantic_error


def _default(kind: str, **params: Any) -> Any:
    """A table naming the kind's declared default component (kinds.KINDS)."""
    return Field(default_factory=lambda: Component(plugin=BY_NAME[kind].default, **params))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Component(BaseModel):
    """A table naming a plugin; the other keys are that plugin's parameters."""

    model_config = ConfigDict(extra="allow")
    plugin: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def spec(self) -> dict[str, Any]:
        return {"plugin": self.plugin, **self.params()}


# Section value types. Strict: TOML gives ints for ints and floats for floats, so a boolean is
# never taken for a number (`epochs = true` is not 1) nor a number for a boolean; a strict float
# still takes an int (`clip_grad_norm = 1`).
_Bool = Annotated[bool, Field(strict=True)]
_Count = Annotated[int, Field(ge=0, strict=True)]  # 0 usually means "off" / "default"
_Positive = Annotated[int, Field(ge=1, strict=True)]


class DataSection(Component):
    """Dataset plugin params plus the core's own data options (these names are reserved)."""

    train_split: str = "train"
    val_split: str = "val"
    #: stratified hold-out taken from the training split when the dataset has no `val_split`
    val_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False, strict=True)] = 0.1
    #: skip and count missing/unreadable images instead of stopping with the list of them
    skip_missing: _Bool = False
    #: keep at most this many training images per class (quick experiments); 0 = all
    max_train_per_class: _Count = 0
    #: decode every image once into memory (small datasets: no JPEG decoding per epoch)
    cache_images: _Bool = False


class ModelSection(_Strict):
    backbone: Component
    heads: dict[str, Component] = Field(default_factory=lambda: {"emotion": Component(plugin=BY_NAME["head"].default)})

    @field_validator("heads")
    @classmethod
    def _needs_emotion(cls, v: dict[str, Component]) -> dict[str, Component]:
        if "emotion" not in v:
            raise ValueError("an 'emotion' head is required")
        return v


class TrainSection(_Strict):
    epochs: _Positive = 10
    batch_size: _Positive = 64
    eval_batch_size: _Count = 0  # 0 = 2 × batch_size
    #: torch.manual_seed's range
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64, strict=True)] = 0
    device: Literal["auto", "cpu", "cuda", "mps"] | str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    accumulate_steps: _Positive = 1
    clip_grad_norm: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 0.0  # 0 = off
    grad_checkpointing: _Bool = False
    compile: _Bool = False
    num_workers: _Count | Literal["auto"] = "auto"
    pin_memory: _Bool | Literal["auto"] = "auto"
    deterministic: _Bool = False
    monitor: str = "macro_f1"  # validation metric that picks the best checkpoint
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping_patience: _Count = 0  # epochs without improvement; 0 = off
    threads: _Count = 0  # torch CPU threads; 0 = torch default

    @field_validator("num_workers", "pin_memory", mode="wrap")
    @classmethod
    def _value_or_auto(cls, v: Any, handler: Any) -> Any:
        """One error naming the key, not one per union member (``num_workers.constrained-int``)."""
        try:
            return handler(v)
        except ValidationError as e:
            errors = e.errors()
            value = [x["msg"] for x in errors if not str(x["loc"][-1] if x["loc"] else "").startswith("literal")]
            raise PydanticCustomError("value_or_auto", "{msg}, or 'auto'",
                                      {"msg": value[0] if value else errors[0]["msg"]}) from None


class TrackingSection(Component):
    plugin: str = "mlflow"  # not essential: with tracking off, or another tracker, it may be disabled
    enabled: _Bool = True


class PluginsSection(_Strict):
    disable: list[StrictStr] = Field(default_factory=list)


class Recipe(_Strict):
    name: str = "experiment"
    description: str = ""
    data: DataSection
    model: ModelSection
    loss: Component = _default("loss")
    optimizer: Component = _default("optimizer", lr=1e-3)
    schedule: Component | None = None
    augment: Component = _default("augmenter")
    batch_transforms: list[Component] = Field(default_factory=list)
    sampler: Component | None = None
    tta: Component | None = None  # test-time augmentation for `fer eval --tta` (default: kinds' "tta")
    callbacks: list[Component] = Field(default_factory=list)
    calibration: Component = _default("calibrator")
    explain: Component | None = None  # saliency maps for `fer explain` / `fer report` (default: kinds' "explainer")
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    plugins: PluginsSection = Field(default_factory=PluginsSection)


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise FerError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise FerError(f"override '{text}': empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise FerError(f"override '{text}': '{part}' is not a table")
            node = nxt
        node[path[-1]] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FerError(f"{path}: recipe file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise FerError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise FerError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except RecursionError:
        raise FerError(f"{path}: nested too deeply to be a recipe") from None


def validation_message(e: ValidationError, raw: Any, model: type[BaseModel]) -> str:
    """One line for a pydantic error of a TOML table: an unknown key (a typo) first, with "did
    you mean" and the accepted keys; then a missing key; then a bad value with what was given."""
    errs = e.errors()
    err = next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        # suggest a sibling key of the table that rejected it
        parent: Any = model
        for part in loc[:-1]:
            fields = getattr(parent, "model_fields", {})
            f = fields.get(part)
            parent = getattr(f, "annotation", None) if f else None
        options = list(getattr(parent, "model_fields", {}) or [])
        close = difflib.get_close_matches(loc[-1], options, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key}: unknown key{hint}" + (f"; accepted: {', '.join(options)}" if options and not close else "")
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    key, msg, got = pydantic_error(e, raw)
    return f"{key}: {msg} (got {got!r})"


def validate(raw: dict[str, Any], source: str, registry: Registry | None = None) -> Recipe:
    """Validate structure, then every component table against its plugin's factory signature."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise FerError(f"{source}: {validation_message(e, raw, Recipe)}") from None
    reg = registry or get_registry(recipe.plugins.disable)
    try:
        check_components(recipe, reg)
    except FerError as e:
        raise FerError(f"{source}: {e}") from None
    return recipe


def components(recipe: Recipe) -> list[tuple[str, Component, str]]:
    """Every plugin table of a recipe as (kind, table, recipe path)."""
    out: list[tuple[str, Component, str]] = [
        ("dataset", recipe.data, "data"), ("backbone", recipe.model.backbone, "model.backbone")]
    out += [("head", head, f"model.heads.{name}") for name, head in recipe.model.heads.items()]
    out += [("loss", recipe.loss, "loss"), ("optimizer", recipe.optimizer, "optimizer")]
    if recipe.schedule is not None:
        out.append(("scheduler", recipe.schedule, "schedule"))
    out.append(("augmenter", recipe.augment, "augment"))
    if recipe.sampler is not None:
        out.append(("sampler", recipe.sampler, "sampler"))
    if recipe.tta is not None:
        out.append(("tta", recipe.tta, "tta"))
    if recipe.explain is not None:
        out.append(("explainer", recipe.explain, "explain"))
    out.append(("calibrator", recipe.calibration, "calibration"))
    out += [("batch_transform", bt, f"batch_transforms[{i}]") for i, bt in enumerate(recipe.batch_transforms)]
    out += [("callback", cb, f"callbacks[{i}]") for i, cb in enumerate(recipe.callbacks)]
    if recipe.tracking.enabled:
        out.append(("callback", recipe.tracking, "tracking"))
    return out


def check_components(recipe: Recipe, reg: Registry) -> None:
    """Validate each table against its factory and fill in the plugin's defaults, so that the
    saved recipe states every value the run used."""
    from pydantic_core import to_jsonable_python

    for kind, comp, where in components(recipe):
        validated = reg.validate(kind, comp.spec(), where)
        validated.pop("plugin")
        comp.__pydantic_extra__ = to_jsonable_python(validated)
    mixing = [f"batch_transforms[{i}]" for i, bt in enumerate(recipe.batch_transforms)
              if reg.produces_soft_labels(bt.spec(), f"batch_transforms[{i}]")]
    if mixing and not reg.accepts_soft_labels(recipe.loss.spec()):
        raise FerError(f"{mixing[0]}: plugin '{recipe.batch_transforms[int(mixing[0][17:-1])].plugin}' mixes labels "
                       f"(batch['soft_label']) but loss '{recipe.loss.plugin}' does not declare that it accepts soft "
                       "labels (@traits(accepts_soft_labels=True)): it would train on the unmixed hard labels")


class DataOnly(_Strict):
    """What `fer data` needs: a recipe may have only its [data] table (and seed / plugins)."""

    model_config = ConfigDict(extra="ignore")
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    plugins: PluginsSection = Field(default_factory=PluginsSection)


def validate_data(raw: dict[str, Any], source: str) -> DataOnly:
    try:
        rec = DataOnly.model_validate(raw)
    except ValidationError as e:
        raise FerError(f"{source}: {validation_message(e, raw, DataOnly)}") from None
    reg = get_registry(rec.plugins.disable)
    try:
        values = reg.validate("dataset", rec.data.spec(), "data")
    except FerError as e:
        raise FerError(f"{source}: {e}") from None
    values.pop("plugin")
    rec.data.__pydantic_extra__ = values
    return rec


def check_any(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`fer recipe check`: a training recipe, or any recipe a plugin claims (ensembles)."""
    try:
        disabled = PluginsSection.model_validate(raw.get("plugins", {})).disable
    except ValidationError as e:
        raise FerError(f"{source}: plugins.{validation_message(e, raw.get('plugins', {}), PluginsSection)}") from None
    claimed = get_registry(disabled).pm.hook.validate_recipe(raw=raw, source=source)
    if claimed is not None:
        return claimed
    return resolved(validate(raw, source))


def load(path: Path, overrides: list[str] = ()) -> tuple[Recipe, dict[str, Any]]:
    """Read, override and validate a recipe; returns (recipe, resolved raw dict)."""
    raw = apply_overrides(read_toml(path), list(overrides))
    recipe = validate(raw, str(path))
    return recipe, resolved(recipe)


def resolved(recipe: Recipe) -> dict[str, Any]:
    """The full recipe with every default (core and plugin) filled in: what a run saves."""
    return recipe.model_dump(mode="json", exclude_none=True)


def dump_toml(data: dict[str, Any]) -> str:
    """TOML text of a resolved recipe (tomli-w: quoting and escaping done right)."""
    return tomli_w.dumps(data)
