"""Hyperparameter search with Optuna: `fer tune RECIPE`, the `optuna` tuner and the
`optuna_pruning` callback.

A tuning recipe is a training recipe plus a ``[tune]`` table: the tuner's settings and a
``[tune.space]`` of recipe key paths and their ranges. Every trial is a real run (``fer_core.api.
train``) in ``STUDY_DIR/trial-NNNN`` with its resolved recipe; the study lives in a journal file
in the study directory (or any RDB URL), so the same command continues it. docs/tuning.md.

    [tune]
    plugin = "optuna"
    sampler = "tpe"          # seeded by train.seed
    pruner = "median"        # fed the per-epoch validation metric (train.monitor)
    [tune.space]
    "optimizer.lr" = { type = "float", low = 1e-4, high = 1e-2, log = true }
    "loss" = { type = "categorical", choices = [ { plugin = "focal" }, { plugin = "cross_entropy" } ] }

How pruning reaches the trainer: the study appends ``{plugin = "optuna_pruning"}`` to each
trial's ``[[callbacks]]``; the callback finds its live ``optuna.Trial`` in a module-level table
keyed by the run directory (``run.out_dir``), reports ``report[train.monitor]`` at every epoch's
validation end and, when the pruner says so, raises ``TrialPrunedAtEpoch`` (an
``optuna.TrialPruned``) at the start of the next epoch, so the pruned epoch is complete (logged,
checkpointed); the objective catches it. Keying by directory keeps the trial number out of the
saved recipe, so a trial directory resumes unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fcntl
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional

import optuna
import typer
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.table import Table
from rich.text import Text

from fer_core.api import (Callback, FerError, Overrides, RunDir, RunInfo, apply_overrides, atomic_write_bytes,
                          atomic_write_json, atomic_write_text, console, dump_toml, get_registry, hookimpl,
                          read_toml, resolved, stdout, train, validate, validation_message, warn)

PRUNING_CALLBACK = "optuna_pruning"
JOURNAL = "study.journal"
#: RDB storage: seconds between a running trial's heartbeats, and without one before it counts as dead
HEARTBEAT_S, GRACE_S = 30, 120
STUDY_RECIPE = "tune.toml"
BEST = "best.toml"
SUMMARY = "study.json"
#: [tune] keys the command reads itself; every other key is the tuner plugin's
COMMAND_KEYS = ("plugin", "space", "trials", "timeout")
#: what a continued study may change: everything else would mix trials of different searches
CONTINUABLE = ("tune.trials", "tune.timeout", "tune.sampler", "tune.pruner", "tune.seed", "tune.n_startup_trials",
               "tune.multivariate", "tune.pruner_startup_trials", "tune.pruner_warmup_epochs", "tune.percentile",
               "tune.lower", "tune.upper", "tune.reduction_factor", "train.threads", "train.num_workers",
               "train.eval_batch_size", "tracking", "description")


# ------------------------------------------------------------------ the search space


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class FloatRange(_Entry):
    type: Literal["float"]
    low: _Finite
    high: _Finite
    log: Annotated[bool, Field(strict=True)] = False
    step: Optional[Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]] = None


class IntRange(_Entry):
    type: Literal["int"]
    low: Annotated[int, Field(strict=True)]
    high: Annotated[int, Field(strict=True)]
    step: Annotated[int, Field(strict=True, ge=1)] = 1
    log: Annotated[bool, Field(strict=True)] = False


class Choice(_Entry):
    type: Literal["categorical"]
    choices: Annotated[list[Any], Field(min_length=1)]


ENTRY_TYPES: dict[str, type[_Entry]] = {"float": FloatRange, "int": IntRange, "categorical": Choice}


@dataclass
class Param:
    """One searched recipe value: its key path, its range, and for a categorical the labels
    Optuna stores (tables and lists are not storable choices: they are named by a label)."""

    key: str
    parts: list[str | int]
    entry: FloatRange | IntRange | Choice
    labels: list[Any] = field(default_factory=list)

    def candidates(self) -> list[tuple[str, Any]]:
        """The values whose recipes must validate before anything runs: both ends, every choice."""
        e = self.entry
        if isinstance(e, Choice):
            return [(f"choice {lab!r}", c) for lab, c in zip(self.labels, e.choices)]
        if isinstance(e, IntRange):
            return [("low", e.low), ("high", e.low + (e.high - e.low) // e.step * e.step)]
        high = e.high if e.step is None else e.low + math.floor((e.high - e.low) / e.step + 1e-9) * e.step
        return [("low", e.low), ("high", high)]

    def grid(self) -> list[Any] | None:
        e = self.entry
        if isinstance(e, Choice):
            return list(self.labels)
        if isinstance(e, IntRange):
            return None if e.log else list(range(e.low, e.high + 1, e.step))
        if e.step is None:
            return None
        n = int(math.floor((e.high - e.low) / e.step + 1e-9))
        return [round(e.low + i * e.step, 12) for i in range(n + 1)]

    def value(self, param: Any) -> Any:
        """The recipe value of a stored Optuna parameter."""
        if isinstance(self.entry, Choice):
            return copy.deepcopy(self.entry.choices[self.labels.index(param)])
        return param


def _label(choice: Any) -> str:
    if isinstance(choice, dict):
        return "{" + ", ".join(f"{k} = {_label(v)}" for k, v in choice.items()) + "}"
    if isinstance(choice, list):
        return "[" + ", ".join(_label(v) for v in choice) + "]"
    return repr(choice)


def labels_for(choices: list[Any]) -> list[Any]:
    """Optuna stores None/bool/int/float/str choices as they are; tables are named by their
    plugin when that is unique, anything else by its inline-TOML-like text."""
    if all(isinstance(c, (bool, int, float, str)) for c in choices):
        return list(choices)
    plugins = [c.get("plugin") if isinstance(c, dict) else None for c in choices]
    named = [p for p in plugins if isinstance(p, str)]
    out = []
    for c, p in zip(choices, plugins):
        out.append(p if isinstance(p, str) and named.count(p) == 1 and len(c) == 1 else _label(c))
    return out


_PART = re.compile(r"^([A-Za-z0-9_-]+)((?:\[\d+\])*)$")


def parse_key(key: str) -> list[str | int]:
    """``model.heads.emotion.dropout`` / ``batch_transforms[0].alpha`` → its parts."""
    parts: list[str | int] = []
    for piece in key.split("."):
        m = _PART.match(piece)
        if not m:
            raise FerError(f'tune.space."{key}": not a recipe key path (e.g. "optimizer.lr", '
                           '"batch_transforms[0].alpha")')
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return parts


def key_text(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def lookup(tree: Any, parts: list[str | int], key: str) -> Any:
    """The value at a key path of a resolved recipe, or one FerError naming the key (did you mean)."""
    node = tree
    for i, p in enumerate(parts):
        here = key_text(parts[:i]) or "the recipe"
        if isinstance(p, int):
            if not isinstance(node, list):
                raise FerError(f'tune.space."{key}": {here} is not a list')
            if p >= len(node):
                raise FerError(f'tune.space."{key}": {here} has {len(node)} entr{"y" if len(node) == 1 else "ies"} '
                               f"(indices from 0)")
        else:
            if not isinstance(node, dict):
                raise FerError(f'tune.space."{key}": {here} is a value, not a table')
            if p not in node:
                close = difflib.get_close_matches(p, [str(k) for k in node], n=1, cutoff=0.6)
                hint = f" (did you mean '{key_text([*parts[:i], close[0], *parts[i + 1:]])}'?)" if close else ""
                raise FerError(f'tune.space."{key}": unknown key \'{p}\' in {here}{hint}; '
                               f"keys there: {', '.join(map(str, node)) or '(none)'}")
        node = node[p]
    return node


def assign(raw: dict[str, Any], base: dict[str, Any], parts: list[str | int], value: Any) -> None:
    """Set a key path in a raw recipe; tables the raw recipe leaves to defaults are copied from
    the resolved one first (``loss.gamma`` in a recipe without a [loss] table)."""
    node: Any = raw
    ref: Any = base
    for p in parts[:-1]:
        ref = ref[p]
        if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
            node[p] = copy.deepcopy(ref)
        node = node[p]
    node[parts[-1]] = copy.deepcopy(value)


def parse_space(space: Any, base: dict[str, Any]) -> dict[str, Param]:
    """Structure, bounds and key paths of ``[tune.space]`` (the recipes each value gives are
    checked by ``check_tune``)."""
    if not isinstance(space, dict) or not space:
        raise FerError('tune.space: required: a table of recipe key paths, e.g. '
                       '"optimizer.lr" = { type = "float", low = 1e-4, high = 1e-2, log = true }')
    params: dict[str, Param] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in ENTRY_TYPES:
            got = spec.get("type") if isinstance(spec, dict) else spec
            raise FerError(f'tune.space."{key}".type: expected "float", "int" or "categorical" (got {got!r})')
        try:
            entry = ENTRY_TYPES[spec["type"]].model_validate(spec)
        except ValidationError as e:
            raise FerError(f'tune.space."{key}".' + validation_message(e, spec, ENTRY_TYPES[spec["type"]])) from None
        where = f'tune.space."{key}"'
        if isinstance(entry, (FloatRange, IntRange)):
            if not entry.low < entry.high:
                raise FerError(f"{where}: low must be below high (low {entry.low!r}, high {entry.high!r})")
            if entry.log and entry.low <= 0:
                raise FerError(f"{where}: log = true needs low > 0 (got low {entry.low!r})")
            if isinstance(entry, FloatRange) and entry.log and entry.step is not None:
                raise FerError(f"{where}: step and log = true cannot be combined")
            if isinstance(entry, IntRange) and entry.log and entry.step != 1:
                raise FerError(f"{where}: step and log = true cannot be combined")
            if entry.step is not None and entry.step > entry.high - entry.low:
                raise FerError(f"{where}: step {entry.step!r} is larger than high - low")
            labels: list[Any] = []
        else:
            labels = labels_for(entry.choices)
            seen = [(type(x).__name__, x) for x in labels]
            dup = next((x for i, x in enumerate(labels) if seen[i] in seen[:i]), None)
            if dup is not None:
                raise FerError(f"{where}: choice {dup!r} is given twice")
        parts = parse_key(key)
        lookup(base, parts, key)
        params[key] = Param(key, parts, entry, labels)
    keys = sorted(params.values(), key=lambda p: len(p.parts))
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if b.parts[:len(a.parts)] == a.parts:
                raise FerError(f'tune.space."{b.key}": lies inside "{a.key}", which is searched too; '
                               "search one of them")
    return params


# ------------------------------------------------------------------ the tuner plugin

SAMPLERS = ("tpe", "random", "gp", "cmaes", "grid")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")


class OptunaTuner:
    """Optuna samplers and pruners by name. `fer tune` asks it for a sampler per trial (seeded
    by (seed, trial number): the same trial gets the same values after a restart, and parallel
    workers never repeat each other's random draws) and for one pruner per study."""

    def __init__(self, sampler: str, pruner: str, seed: int | None, n_startup_trials: int, multivariate: bool,
                 pruner_startup_trials: int, pruner_warmup_epochs: int, percentile: float, lower: float | None,
                 upper: float | None, reduction_factor: int | None) -> None:
        self.sampler_name, self.pruner_name, self.seed = sampler, pruner, seed
        self.n_startup_trials, self.multivariate = n_startup_trials, multivariate
        self.pruner_startup_trials, self.pruner_warmup_epochs = pruner_startup_trials, pruner_warmup_epochs
        self.percentile, self.lower, self.upper, self.reduction_factor = percentile, lower, upper, reduction_factor
        self.space: dict[str, Param] = {}
        self.direction = "maximize"
        self.epochs = 1

    def bind(self, space: dict[str, Param], direction: str = "maximize", epochs: int = 1,
             seed: int | None = None) -> "OptunaTuner":
        """What a study needs besides the tuner's own settings (the command binds the recipe's)."""
        self.space, self.direction, self.epochs = space, direction, epochs
        if self.seed is None:
            self.seed = seed if seed is not None else 0
        self.check()
        return self

    def check(self) -> None:
        if self.sampler_name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise FerError("tune.sampler: 'cmaes' needs the cmaes package (pip install cmaes)") from None
        if self.sampler_name == "grid":
            for p in self.space.values():
                if p.grid() is None:
                    raise FerError(f'tune.space."{p.key}": sampler "grid" needs a finite grid: give a float a step, '
                                   "drop log from an int, or make it categorical")

    def grid_size(self) -> int | None:
        if self.sampler_name != "grid":
            return None
        return math.prod(len(p.grid() or []) for p in self.space.values())

    def make_sampler(self, trial_seed: int) -> optuna.samplers.BaseSampler:
        s = self.sampler_name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if s == "tpe":
                return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=self.n_startup_trials,
                                                  multivariate=self.multivariate)
            if s == "random":
                return optuna.samplers.RandomSampler(seed=trial_seed)
            if s == "gp":
                return optuna.samplers.GPSampler(seed=trial_seed, n_startup_trials=self.n_startup_trials)
            if s == "cmaes":
                return optuna.samplers.CmaEsSampler(seed=trial_seed, n_startup_trials=self.n_startup_trials)
            # the grid's order is one shuffle per study (trial n takes its n-th point): the study's seed
            return optuna.samplers.GridSampler({k: p.grid() for k, p in self.space.items()}, seed=self.seed)

    def trial_seed(self, number: int) -> int:
        return ((self.seed or 0) * 1_000_003 + number * 7919) % (2**32)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        p, warm = self.pruner_name, self.pruner_warmup_epochs + 1  # steps are epochs, from 1
        if p == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.pruner_startup_trials, n_warmup_steps=warm)
        if p == "percentile":
            return optuna.pruners.PercentilePruner(self.percentile, n_startup_trials=self.pruner_startup_trials,
                                                   n_warmup_steps=warm)
        if p == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=self.reduction_factor or 4)
        if p == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(self.epochs, 1),
                                                  reduction_factor=self.reduction_factor or 3)
        if p == "threshold":
            return optuna.pruners.ThresholdPruner(lower=self.lower, upper=self.upper, n_warmup_steps=warm)
        return optuna.pruners.NopPruner()

    def optimize(self, objective: Callable[[dict[str, Any]], float], n_trials: int) -> dict[str, Any]:
        """The Tuner contract, in memory: ``objective({key path: value})`` → score (for notebooks;
        `fer tune` adds storage, pruning, workers and trial directories)."""
        study = optuna.create_study(direction=self.direction, pruner=self.make_pruner())
        for _ in range(n_trials):
            study.sampler = self.make_sampler(self.trial_seed(len(study.trials)))
            trial = study.ask()
            _tell(study, trial, objective(suggest(trial, self.space)))
        best = study.best_trial
        return {"best_value": best.value, "best_params": {k: self.space[k].value(v) for k, v in best.params.items()},
                "study": study}


def make_optuna(
    *,
    sampler: Literal["tpe", "random", "gp", "cmaes", "grid"] = "tpe",
    pruner: Literal["median", "percentile", "successive_halving", "hyperband", "threshold", "none"] = "median",
    seed: Optional[Annotated[int, Field(ge=0, lt=2**32)]] = None,
    n_startup_trials: Annotated[int, Field(ge=0)] = 10,
    multivariate: bool = False,
    pruner_startup_trials: Annotated[int, Field(ge=0)] = 5,
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 0,
    percentile: Annotated[float, Field(gt=0, lt=100)] = 25.0,
    lower: Optional[Annotated[float, Field(allow_inf_nan=False)]] = None,
    upper: Optional[Annotated[float, Field(allow_inf_nan=False)]] = None,
    reduction_factor: Optional[Annotated[int, Field(ge=2)]] = None,
) -> OptunaTuner:
    """Optuna search. `sampler` (seeded by `seed`, default train.seed): tpe, random, gp, cmaes
    (needs the cmaes package), grid (every combination once). `n_startup_trials`: random trials
    before TPE/GP/CMA-ES model the results (`multivariate` TPE models parameters jointly).
    `pruner` gets the validation metric (train.monitor) after every epoch: median / percentile
    (stop a trial below the median / `percentile` of earlier trials at the same epoch, once
    `pruner_startup_trials` have finished), successive_halving, hyperband (`reduction_factor`),
    threshold (stop below `lower` or above `upper`), none. No trial is pruned during its first
    `pruner_warmup_epochs` epochs."""
    if pruner == "threshold" and lower is None and upper is None:
        raise FerError("tune.lower: pruner 'threshold' needs lower and/or upper")
    if lower is not None and upper is not None and lower > upper:
        raise FerError(f"tune.lower: must not be above upper ({lower} > {upper})")
    return OptunaTuner(sampler, pruner, seed, n_startup_trials, multivariate, pruner_startup_trials,
                       pruner_warmup_epochs, percentile, lower, upper, reduction_factor)


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """One value per searched key (recipe values: a categorical's label turned back into its choice)."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        e = p.entry
        if isinstance(e, FloatRange):
            out[key] = trial.suggest_float(key, e.low, e.high, log=e.log, step=e.step)
        elif isinstance(e, IntRange):
            out[key] = trial.suggest_int(key, e.low, e.high, step=e.step, log=e.log)
        else:
            out[key] = p.value(trial.suggest_categorical(key, p.labels))
    return out


# ------------------------------------------------------------------ the pruning callback

#: live trials of this process, by their run directory (resolved)
_LIVE: dict[Path, "_Live"] = {}


@dataclass
class _Live:
    trial: optuna.Trial
    monitor: str
    epochs: int = 0


class TrialPrunedAtEpoch(optuna.TrialPruned):
    def __init__(self, epoch: int, value: float, monitor: str) -> None:
        super().__init__(f"pruned at epoch {epoch} ({monitor} {value:.4f})")
        self.epoch, self.value = epoch, value


class OptunaPruning(Callback):
    """Reports the monitored validation metric of every epoch to the live Optuna trial of this
    run directory; when the pruner says stop, the run stops once that epoch is over: every
    callback has seen it (trackers logged it) and last.pt holds it, and the next epoch's start
    raises ``TrialPrunedAtEpoch`` before any of it is trained. Pruning at the last epoch
    changes nothing (the trial is complete). Outside `fer tune` (a trial directory resumed by
    hand) it does nothing."""

    def __init__(self) -> None:
        self.pending: TrialPrunedAtEpoch | None = None

    def on_fit_start(self, run: RunInfo) -> None:
        if _LIVE.get(Path(run.out_dir).resolve()) is None:
            warn(f"{PRUNING_CALLBACK}: {run.out_dir} is not a trial of a running `fer tune`; no pruning")

    def on_validation_end(self, run: RunInfo, epoch: int, report: dict[str, Any]) -> None:
        live = _LIVE.get(Path(run.out_dir).resolve())
        if live is None:
            return
        live.epochs = epoch
        value = float(report[live.monitor])
        live.trial.report(value, epoch)
        if live.trial.should_prune():
            self.pending = TrialPrunedAtEpoch(epoch, value, live.monitor)

    def on_epoch_start(self, run: RunInfo, epoch: int, num_batches: int) -> None:
        if self.pending is not None:
            raise self.pending


def make_pruning() -> OptunaPruning:
    """Added by `fer tune` to every trial's [[callbacks]]: per-epoch reports to the pruner."""
    return OptunaPruning()


# ------------------------------------------------------------------ a tuning recipe


@dataclass
class TuneSpec:
    source: str
    raw: dict[str, Any]  # the training recipe as written (overrides applied), without [tune]
    base: dict[str, Any]  # the same, resolved
    table: dict[str, Any]  # the [tune] table resolved (command keys + the tuner's keys with defaults)
    space: dict[str, Param]
    tuner: OptunaTuner
    trials: int
    timeout: float

    @property
    def monitor(self) -> str:
        return self.base["train"]["monitor"]

    @property
    def direction(self) -> str:
        return "maximize" if self.base["train"]["monitor_mode"] == "max" else "minimize"

    def resolved(self) -> dict[str, Any]:
        return {**self.base, "tune": self.table}

    def recipe_with(self, values: dict[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(self.raw)
        for key, v in values.items():
            assign(raw, self.base, self.space[key].parts, v)
        return raw


def _strip(e: FerError, source: str) -> str:
    text = str(e)
    return text[len(source) + 2:] if text.startswith(f"{source}: ") else text


def check_tune(raw: dict[str, Any], source: str) -> TuneSpec:
    """Validate a tuning recipe before anything runs: the training recipe, the tuner's table,
    every key path of the space, every bound and every choice (each must give a valid recipe)."""
    raw = copy.deepcopy(raw)
    table = raw.pop("tune", None)
    if not isinstance(table, dict):
        raise FerError(f"{source}: tune: expected a [tune] table with a [tune.space]")
    recipe = validate(raw, source)
    base = resolved(recipe)
    try:
        trials, timeout = table.get("trials", 20), table.get("timeout", 0)
        if type(trials) is not int or trials < 1:
            raise FerError(f"tune.trials: expected a whole number ≥ 1 (got {trials!r})")
        if type(timeout) not in (int, float) or not math.isfinite(timeout) or timeout < 0:
            raise FerError(f"tune.timeout: expected seconds ≥ 0, 0 = none (got {timeout!r})")
        reg = get_registry(recipe.plugins.disable)
        tuner_spec = {"plugin": table.get("plugin", "optuna"),
                      **{k: v for k, v in table.items() if k not in COMMAND_KEYS}}
        checked = reg.validate("tuner", tuner_spec, "tune")
        tuner = reg.build("tuner", checked, "tune")
        if not isinstance(tuner, OptunaTuner):
            raise FerError(f"tune.plugin: `fer tune` drives Optuna tuners; '{checked['plugin']}' is not one")
        space = parse_space(table.get("space"), base)
        tuner.bind(space, "maximize" if recipe.train.monitor_mode == "max" else "minimize", recipe.train.epochs,
                   recipe.train.seed % (2**32))
    except FerError as e:
        raise FerError(f"{source}: {e}") from None
    for key, p in space.items():
        for what, value in p.candidates():
            candidate = copy.deepcopy(raw)
            assign(candidate, base, p.parts, value)
            try:
                validate(candidate, source)
            except FerError as e:
                raise FerError(f'{source}: tune.space."{key}": {what} ({_label(value)}) makes the recipe invalid: '
                               f"{_strip(e, source)}") from None
    table_out = {"plugin": checked["plugin"], "trials": trials, "timeout": timeout,
                 **{k: v for k, v in checked.items() if k != "plugin" and v is not None},
                 "space": {k: p.entry.model_dump(exclude_none=True) for k, p in space.items()}}
    return TuneSpec(source, raw, base, table_out, space, tuner, trials, float(timeout))


# ------------------------------------------------------------------ the study directory


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def study_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Keys a continued study would change that it cannot (they would mix two searches)."""
    a, b = _flat(saved), _flat(wanted)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in changed
            if not any(k == c or k.startswith(c + ".") for c in CONTINUABLE)]


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[None]:
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FerError(f"{path.parent}: this study is being run by {holder}; wait for it, or use another "
                           "--study-dir") from None
        if not blocking:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}")
            f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_storage(study_dir: Path, url: str | None) -> Any:
    """The journal file in the study directory (safe for several local workers: docs/tuning.md),
    or an RDB URL (sqlite:///..., later PostgreSQL)."""
    if url:
        try:
            # a database may be shared by several machines: a trial is stale (its process gone) only
            # when its heartbeat stops, never merely because it is RUNNING when a command starts
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: a warning per process
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                  heartbeat_stale_trial_callback=_requeue_stale)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's many errors: one line naming the URL
            first = (str(e).splitlines() or [""])[0][:200]
            raise FerError(f"--storage {url}: cannot open it ({type(e).__name__}: {first})") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(study_dir / JOURNAL)))


@dataclass
class StudyContext:
    """What every worker process needs (picklable: plain data)."""

    source: str
    raw_with_tune: dict[str, Any]
    study_dir: str
    study_name: str
    storage_url: str | None
    budget: int
    deadline: float | None
    threads: int | None
    workers: int = 1


def _count(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that use the budget: started ones, except those interrupted (they are retried) and
    those another machine's trial left over the budget."""
    return sum(1 for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted")
               and not t.user_attrs.get("over_budget"))


def _requeue_stale(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
    """Optuna failed a trial whose heartbeat stopped (its machine or process died): retry its values."""
    storage = study._storage
    tid = frozen._trial_id
    storage.set_trial_user_attr(tid, "interrupted", True)
    storage.set_trial_user_attr(tid, "reason", "interrupted (its heartbeat stopped); retried by a later trial")
    study.enqueue_trial(dict(frozen.params), user_attrs={"resumes": frozen.number})


@contextlib.contextmanager
def _heartbeat(storage: Any, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat while it trains (RDB storage; Optuna does it only inside optimize)."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    import threading

    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; the grace period covers it
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"fer-tune-heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def retire(study: optuna.Study, storage: Any, frozen: optuna.trial.FrozenTrial, why: str) -> None:
    """A trial whose process stopped: FAIL, and its values queued again, to be resumed from its
    trial directory by the next trial that is started."""
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                          frozen.number)
    storage.set_trial_user_attr(tid, "interrupted", True)
    storage.set_trial_user_attr(tid, "reason", f"interrupted ({why}); retried by a later trial, resuming its "
                                               "directory")
    study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    study.enqueue_trial(dict(frozen.params), user_attrs={"resumes": frozen.number})


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None,
          state: TrialState | None = None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as e:
        # GridSampler.after_trial calls study.stop() once the grid is visited, which only works
        # inside study.optimize; the trial is stored by then and the budget is capped at the grid
        if "Study.stop" not in str(e):
            raise


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial-{number:04d}"


def _reason(e: BaseException) -> str:
    text = str(e) if isinstance(e, FerError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _label(v) if isinstance(v, (dict, list)) else str(v)


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def run_trial(spec: TuneSpec, ctx: StudyContext, study: optuna.Study, storage: Any, trial: optuna.Trial,
              k: int, worker: int) -> None:
    """One trial: a real run in STUDY_DIR/trial-NNNN; its outcome told to the study."""
    study_dir = Path(ctx.study_dir)
    out = trial_dir(study_dir, trial.number)
    values = suggest(trial, spec.space)
    raw = spec.recipe_with(values)
    raw.setdefault("callbacks", []).append({"plugin": PRUNING_CALLBACK})
    if ctx.threads:
        raw.setdefault("train", {})["threads"] = ctx.threads
    trial.set_user_attr("dir", out.name)
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("pid", os.getpid())
    resumes = trial.user_attrs.get("resumes")
    shown = ", ".join(f"{key}={_fmt(trial.params[key])}" for key in spec.space)
    who = f" [worker {worker}]" if ctx.workers > 1 else ""
    _line(f"trial {k}/{ctx.budget} (#{trial.number}){who}: {shown}"
          + (f" (resuming interrupted trial #{resumes})" if resumes is not None else ""))
    live = _Live(trial, spec.monitor)
    key = out.resolve()
    # trackers nest the trials of one study under one parent (MLflow: a parent run)
    group = {"kind": "study", "id": str(study_dir.resolve()), "name": ctx.study_name, "member": out.name}
    _LIVE[key] = live
    tmp: Path | None = None
    t0 = time.monotonic()
    try:
        if resumes is not None:
            old = trial_dir(study_dir, int(resumes))
            if old.is_dir() and not out.exists():
                old.rename(out)
            previous = next((t for t in study.get_trials(deepcopy=False) if t.number == int(resumes)), None)
            for step, v in sorted((previous.intermediate_values if previous else {}).items()):
                trial.report(v, step)
        if resumes is not None and (out / RunDir.RECIPE).is_file():
            _, final = train(None, [f"train.threads={ctx.threads}"] if ctx.threads else [], None, out, group=group)
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix=f".{out.name}-", dir=study_dir,
                                             delete=False, encoding="utf-8") as f:
                f.write(dump_toml(raw))
                tmp = Path(f.name)
            _, final = train(tmp, [], out, None, group=group)
    except TrialPrunedAtEpoch as e:
        trial.set_user_attr("epochs_run", e.epoch)
        trial.set_user_attr("reason", str(e))
        _tell(study, trial, state=TrialState.PRUNED)
        with contextlib.suppress(FerError, OSError):
            RunDir(out).write_status(status="pruned", pruned_at_epoch=e.epoch, drop=("error", "traceback"))
        outcome = str(e)
    except KeyboardInterrupt:
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        retire(study, storage, frozen, "Ctrl-C")
        raise
    except Exception as e:  # noqa: BLE001 - any crash is this trial's outcome, the study goes on
        reason = _reason(e)
        trial.set_user_attr("epochs_run", live.epochs)
        trial.set_user_attr("reason", reason)
        _tell(study, trial, state=TrialState.FAIL)
        outcome = f"failed: {reason}"
    else:
        value = float(final[spec.monitor])
        trial.set_user_attr("epochs_run", int(final.get("epochs_run", live.epochs)))
        trial.set_user_attr("best_epoch", int(final.get("best_epoch", 0)))
        if math.isfinite(value):
            _tell(study, trial, value)
            outcome = f"{spec.monitor} {value:.4f}"
        else:
            trial.set_user_attr("reason", f"{spec.monitor} is {value}")
            _tell(study, trial, state=TrialState.FAIL)
            outcome = f"failed: {spec.monitor} is {value}"
    finally:
        _LIVE.pop(key, None)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    best = ""
    with contextlib.suppress(ValueError):
        top = study.best_trial  # one read: value and number of the same trial
        best = f" (best so far {top.value:.4f}, #{top.number})"
    _line(f"trial {k}/{ctx.budget} (#{trial.number}): {outcome} in {time.monotonic() - t0:.0f}s{best}")
    with contextlib.suppress(Exception):
        write_summary(spec, ctx, study)


def work(ctx: StudyContext, worker: int = 0, spec: TuneSpec | None = None) -> None:
    """One worker: ask for trials until the study holds its budget (under a file lock, so that
    several workers never start more than the budget) or the deadline passes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec or check_tune(ctx.raw_with_tune, ctx.source)  # a worker process checks it again
    study_dir = Path(ctx.study_dir)
    storage = make_storage(study_dir, ctx.storage_url)
    study = optuna.load_study(study_name=ctx.study_name, storage=storage, pruner=spec.tuner.make_pruner())
    budget = ctx.budget
    while ctx.deadline is None or time.time() < ctx.deadline:
        with _flock(study_dir / ".ask.lock"):
            trials = study.get_trials(deepcopy=False)
            counted = _count(trials)
            if counted >= budget:
                return
            study.sampler = spec.tuner.make_sampler(spec.tuner.trial_seed(len(trials)))
            trial = study.ask()
        # machines sharing a database do not share the lock: the trial numbers decide who is over
        before = _count([t for t in study.get_trials(deepcopy=False) if t.number < trial.number])
        if before >= budget:
            trial.set_user_attr("over_budget", True)
            trial.set_user_attr("reason", "not run: other processes had started the whole budget")
            _tell(study, trial, state=TrialState.FAIL)
            return
        with _heartbeat(storage, trial):
            run_trial(spec, ctx, study, storage, trial, before + 1, worker)


def _worker_main(ctx: StudyContext, worker: int) -> None:
    try:
        work(ctx, worker)
    except KeyboardInterrupt:
        sys.exit(130)
    except FerError as e:
        print(f"error: worker {worker}: {e}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------ results


def trial_rows(spec: TuneSpec, study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        rows.append({
            "number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
            "epochs_run": t.user_attrs.get("epochs_run", max(t.intermediate_values, default=0)),
            "best_epoch": t.user_attrs.get("best_epoch"),
            "reason": t.user_attrs.get("reason", ""), "dir": t.user_attrs.get("dir", f"trial-{t.number:04d}"),
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "resumes": t.user_attrs.get("resumes"), "worker": t.user_attrs.get("worker"),
            "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
            "completed": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        })
    return rows


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def write_summary(spec: TuneSpec, ctx: StudyContext, study: optuna.Study) -> Path:
    best = _best(study)
    return atomic_write_json(Path(ctx.study_dir) / SUMMARY, {
        "study": ctx.study_name, "recipe": spec.source, "monitor": spec.monitor, "direction": spec.direction,
        "storage": ctx.storage_url or JOURNAL, "budget": ctx.budget,
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else None, "best_recipe": BEST if best else None,
        "trials": trial_rows(spec, study),
    })


def write_best(spec: TuneSpec, study_dir: Path, best: optuna.trial.FrozenTrial) -> Path:
    """The winning recipe, resolved (every default stated), ready for `fer run`."""
    values = {k: spec.space[k].value(v) for k, v in best.params.items() if k in spec.space}
    recipe = resolved(validate(spec.recipe_with(values), f"{study_dir / BEST}"))
    header = (f"# best trial #{best.number} of `fer tune {spec.source}`: {spec.monitor} {best.value:.6g}\n"
              f"# {', '.join(f'{k} = {_fmt(v)}' for k, v in best.params.items())}\n"
              f"# trial directory: {trial_dir(study_dir, best.number)}\n")
    path = study_dir / BEST
    atomic_write_text(path, header + dump_toml(recipe))
    return path


def write_plots(study: optuna.Study, study_dir: Path, monitor: str) -> tuple[list[Path], list[str]]:
    """Optuna's matplotlib figures as PNGs; a figure that cannot be drawn is skipped with a note."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    n_params = len({k for t in complete for k in t.params})
    plots: dict[str, tuple[Callable[..., Any], str | None]] = {
        "optimization_history": (partial(ovm.plot_optimization_history, target_name=monitor),
                                 None if complete else "no complete trial"),
        "intermediate_values": (ovm.plot_intermediate_values,
                                None if any(t.intermediate_values for t in study.get_trials(deepcopy=False))
                                else "no epoch was reported"),
        "parallel_coordinate": (partial(ovm.plot_parallel_coordinate, target_name=monitor),
                                None if complete else "no complete trial"),
        "param_importances": (partial(ovm.plot_param_importances, target_name=monitor),
                              None if len(complete) >= 2 and n_params > 1
                              else "needs at least 2 complete trials and more than 1 parameter"),
    }
    written, skipped = [], []
    for name, (plot, why) in plots.items():
        if why is not None:
            skipped.append(f"{name}: {why}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # long key paths as tick labels
            plt.close(fig)
            path = study_dir / f"{name}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
        except Exception as e:  # noqa: BLE001 - a figure is never worth failing the study over
            skipped.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    return written, skipped


def short_names(keys: list[str]) -> list[str]:
    """Column headers: the last part of each key path, more parts where two would read alike."""
    parts = {k: re.split(r"[.\[]", k) for k in keys}
    for n in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = [".".join(p[-n:]) for p in parts.values()]
        if len(set(names)) == len(names):
            return names
    return list(keys)


def print_table(spec: TuneSpec, study: optuna.Study) -> None:
    """One row per trial (values as text, never markup); * marks the best."""
    from rich import box

    rows, best = trial_rows(spec, study), _best(study)
    names = short_names(list(spec.space))
    legend = ", ".join(f"{n} = {k}" for n, k in zip(names, spec.space) if n != k)
    table = Table(title=f"trials: {spec.monitor} ({spec.direction})", caption=legend or None,
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("#", "right"), ("state", "left"), (spec.monitor, "right"), ("epochs", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for name in names:
        table.add_column(name, overflow="fold", min_width=max(len(name), 7))
    notes = any(r["reason"] for r in rows)
    if notes:
        table.add_column("note", overflow="fold", ratio=1)
    for r in rows:
        mark = "*" if best is not None and r["number"] == best.number else ""
        cells = [Text(f"{r['number']}{mark}"), Text(r["state"].lower()),
                 Text("" if r["value"] is None else f"{r['value']:.4f}"), Text(str(r["epochs_run"])),
                 *[Text(_fmt(r["params"].get(k, ""), 3)) for k in spec.space]]
        table.add_row(*cells, *([Text(r["reason"][:160])] if notes else []))
    stdout.print(table, markup=False, crop=False)


# ------------------------------------------------------------------ the command


def default_study_dir(spec: TuneSpec) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.base["name"]).strip("-") or "study"
    return Path("runs") / f"tune-{safe}"


def tune(recipe: Path, overrides: list[str], trials: int | None = None, timeout: float | None = None,
         study_dir: Path | None = None, storage_url: str | None = None, workers: int = 1) -> dict[str, Any]:
    """`fer tune`: validate everything, create or continue the study, run the trials (in this
    process, or in ``workers`` processes), write study.json, best.toml and the figures."""
    raw = apply_overrides(read_toml(recipe), overrides)
    spec = check_tune(raw, str(recipe))
    if workers < 1:
        raise FerError(f"--workers: expected ≥ 1 (got {workers})")
    budget = trials if trials is not None else spec.trials
    if budget < 1:
        raise FerError(f"--trials: expected ≥ 1 (got {budget})")
    grid = spec.tuner.grid_size()
    if grid is not None and budget > grid:
        warn(f"sampler 'grid' has {grid} combination(s): the study stops after {grid} trials, not {budget}")
        budget = grid
    seconds = timeout if timeout is not None else spec.timeout
    study_dir = Path(study_dir) if study_dir is not None else default_study_dir(spec)
    if study_dir.exists() and not study_dir.is_dir():
        raise FerError(f"--study-dir {study_dir}: exists and is not a directory")
    study_dir.mkdir(parents=True, exist_ok=True)
    name = study_dir.resolve().name
    with _flock(study_dir / ".lock", blocking=False):
        storage = make_storage(study_dir, storage_url)
        exists = name in optuna.study.get_all_study_names(storage)
        saved_path = study_dir / STUDY_RECIPE
        if exists and saved_path.is_file():
            refused = study_changes(read_toml(saved_path), spec.resolved())
            if refused:
                raise FerError(f"{study_dir}: this study was started from a different search; it cannot change "
                               f"{'; '.join(refused[:5])}{' …' if len(refused) > 5 else ''} "
                               "(use another --study-dir)")
        if not exists and any(study_dir.glob("trial-*")):
            raise FerError(f"{study_dir}: holds trial directories but no study in "
                           f"{storage_url or study_dir / JOURNAL}; remove them or use another --study-dir")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=name, storage=storage, direction=spec.direction, load_if_exists=True)
        if study.direction.name.lower() != spec.direction:
            raise FerError(f"{study_dir}: the study maximises/minimises the other way ({study.direction.name.lower()})")
        atomic_write_text(saved_path, dump_toml(spec.resolved()))
        if isinstance(storage, optuna.storages.RDBStorage):
            optuna.storages.fail_stale_trials(study)  # only trials whose heartbeat stopped: others may be alive
        else:  # the journal file is this study directory's, and we hold its lock: nothing else runs
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                retire(study, storage, t, "its process stopped while it ran")
                _line(f"trial #{t.number} was running when its process stopped: marked failed; its values are "
                      "retried, resuming its directory")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        given = spec.base["train"]["threads"]
        threads = None
        if "train.threads" not in spec.space:
            if given == 0:
                threads = max(1, cores // workers)
            elif given * workers > cores:
                warn(f"train.threads = {given} × {workers} workers > {cores} cores: the trainings will compete")
        remaining = budget - _count(study.get_trials(deepcopy=False))
        ctx = StudyContext(spec.source, raw, str(study_dir), name, storage_url, budget,
                           time.time() + seconds if seconds else None, threads, workers)
        started = time.monotonic()
        if remaining > 0:
            _line(f"study {name} in {study_dir}: {remaining} more trial(s) of {budget}"
                  f"{f' on {min(workers, remaining)} workers' if workers > 1 else ''}; {spec.monitor} "
                  f"({spec.direction}), sampler {spec.tuner.sampler_name}, pruner {spec.tuner.pruner_name}")
            if workers == 1 or remaining == 1:
                work(ctx, 0, spec)
            else:
                run_workers(ctx, min(workers, remaining))
        else:
            _line(f"study {name}: all {budget} trial(s) done; raise --trials to run more")
        study = optuna.load_study(study_name=name, storage=make_storage(study_dir, storage_url))
        write_summary(spec, ctx, study)
        plots, skipped = write_plots(study, study_dir, spec.monitor)
        for note in skipped:
            _line(f"figure skipped: {note}")
        print_table(spec, study)
        best = _best(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if best is None:
            raise FerError(f"{study_dir}: no trial completed ({states.count(TrialState.PRUNED)} pruned, "
                           f"{states.count(TrialState.FAIL)} failed); see {study_dir / SUMMARY}")
        best_path = write_best(spec, study_dir, best)
        line = dict(markup=False, highlight=False, soft_wrap=True)
        stdout.print(f"best: trial #{best.number}, {spec.monitor} {best.value:.4f} "
                     f"({time.monotonic() - started:.0f}s this session)", **line)
        stdout.print(f"best recipe: {best_path}", **line)
        stdout.print(f"study: {study_dir / SUMMARY}; figures: {', '.join(p.name for p in plots) or 'none'}", **line)
        return {"study_dir": study_dir, "best": best_path, "best_trial": best.number, "best_value": best.value}


def run_workers(ctx: StudyContext, k: int) -> None:
    """K worker processes on the study created above (Optuna's advice: create, then start)."""
    mp = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    procs = [mp.Process(target=_worker_main, args=(ctx, w), name=f"fer-tune-worker-{w}") for w in range(k)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # they got the same Ctrl-C and retire their trials
            p.join(timeout=60)
        raise
    bad = [(p.name, p.exitcode) for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise FerError(f"tune: worker(s) stopped with an error: {', '.join(f'{n} (exit {c})' for n, c in bad)}; "
                       "the messages are above; run the command again to continue the study")


# ------------------------------------------------------------------ hooks


@hookimpl
def register_tuners(register):
    register("optuna", make_optuna)


@hookimpl
def register_callbacks(register):
    register(PRUNING_CALLBACK, make_pruning)


@hookimpl
def validate_recipe(raw, source):
    """Tuning recipes are those with a [tune] table: the space and the training recipe."""
    if not isinstance(raw, dict) or "tune" not in raw:
        return None
    return check_tune(raw, source).resolved()


@hookimpl
def register_commands(cli):
    @cli.command("tune", epilog="Examples: fer tune recipes/tune_quickstart.toml --trials 20 ;  "
                                "fer tune recipes/tune_quickstart.toml --trials 40   (continues the study) ;  "
                                "fer tune recipes/tune_quickstart.toml --workers 2 --study-dir runs/tq")
    def tune_(
        recipe: Annotated[Path, typer.Argument(help="A recipe with a [tune] table.", show_default=False)],
        trials: Annotated[Optional[int], typer.Option("--trials", help="Trials in the study in all "
                                                      "(default: tune.trials, 20).")] = None,
        timeout: Annotated[Optional[float], typer.Option("--timeout", help="Start no trial after this many "
                                                         "seconds (default: tune.timeout; 0 = none).")] = None,
        study_dir: Annotated[Optional[Path], typer.Option("--study-dir", help="Study directory (default "
                                                          "runs/tune-<name>); run again to continue.")] = None,
        storage: Annotated[Optional[str], typer.Option("--storage", help="An RDB URL (sqlite:///study.db) "
                                                       "instead of the study directory's journal file.")] = None,
        workers: Annotated[int, typer.Option("--workers", help="Worker processes on this machine; each "
                                             "trains with cores // workers threads.")] = 1,
        override: Overrides = None,
    ) -> None:
        """Search recipe values with Optuna: every trial a real run, pruned by its epochs' metric."""
        tune(recipe, override or [], trials, timeout, study_dir, storage, workers)
