"""The one place that turns a validated recipe into components. `fer run`, `fer eval` and
`fer data` all build through here: nothing builds components a second way."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import dist
from .console import console
from .data import EpochSeededLoader, ImageDataset, Splits, eval_transform, make_splits
from .errors import FerError
from .hardware import Precision, resolve_device, resolve_precision
from .interfaces import (Backbone, DataSource, DeclaresTasks, NeedsStudentPreprocessing, NeedsTrainSamples,
                         Preprocessing, RebalancesClasses, ReweightsClasses, ScheduleInfo, Seeded, supports)
from .model import FerModel
from .recipe import Recipe
from .registry import Registry


def build_source(recipe: Recipe, reg: Registry) -> DataSource:
    return reg.build("dataset", {"plugin": recipe.data.plugin, **recipe.data.params()}, "data")


def build_splits(recipe: Recipe, reg: Registry, *, check_files: bool = True,
                 source: DataSource | None = None) -> Splits:
    d = recipe.data
    return make_splits(
        source if source is not None else build_source(recipe, reg),
        train_split=d.train_split,
        val_split=d.val_split,
        val_fraction=d.val_fraction,
        seed=recipe.train.seed,
        skip_missing=d.skip_missing,
        max_train_per_class=d.max_train_per_class,
        check_files=check_files,
        keep_decoded=d.cache_images,  # the check decodes every image anyway: the cache reuses them
    )


def task_sizes(classes: list[str], au_names: list[str]) -> dict[str, int]:
    sizes = {"emotion": len(classes)}
    if au_names:
        sizes["au"] = len(au_names)
    return sizes


def build_model(recipe: Recipe, reg: Registry, classes: list[str], au_names: list[str],
                extra_tasks: dict[str, int] | None = None) -> FerModel:
    """``extra_tasks``: output sizes of tasks a loss derives from the labels (e.g. the basic
    emotions a compound class is made of), declared by the loss as ``task_sizes``."""
    backbone = reg.build("backbone", recipe.model.backbone.spec(), "model.backbone")
    if not isinstance(backbone, Backbone):
        raise FerError(f"model.backbone: plugin '{recipe.model.backbone.plugin}' did not return a fer Backbone")
    sizes = {**task_sizes(classes, au_names), **(extra_tasks or {})}
    heads: dict[str, nn.Module] = {}
    for name, spec in recipe.model.heads.items():
        if name not in sizes:
            why = " (the dataset has no AU labels)" if name == "au" else ""
            raise FerError(f"model.heads.{name}: no such task{why}; available: {', '.join(sizes)}")
        heads[name] = reg.build("head", spec.spec(), f"model.heads.{name}", backbone.feature_dim, sizes[name])
    return FerModel(backbone, heads, sizes)


def resolve_workers(value: int | str, device: torch.device) -> int:
    if value != "auto":
        return int(value)
    # on CPU the workers would compete with the compute threads for the same cores
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


@dataclass
class Built:
    recipe: Recipe
    splits: Splits
    model: FerModel
    device: torch.device
    precision: Precision
    train_loader: EpochSeededLoader
    val_loader: torch.utils.data.DataLoader
    loss: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batch_transforms: list[Any]
    callbacks: list[Any]
    channels_last: bool


def eval_loader(samples, pre: Preprocessing, num_aus: int, batch_size: int, workers: int, pin: bool,
                cache: bool = False, decoded=None) -> torch.utils.data.DataLoader:
    ds = ImageDataset(samples, eval_transform(pre), pre.channels, num_aus, cache=cache, decoded=decoded)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)


def build_all(recipe: Recipe, reg: Registry) -> Built:
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    splits = build_splits(recipe, reg)
    task = splits.task_info()
    loss = reg.build("loss", recipe.loss.spec(), "loss", task)
    torch.manual_seed(t.seed)  # identical initial weights for identical recipes
    model = build_model(recipe, reg, splits.classes, splits.au_names,
                        loss.task_sizes if supports(loss, DeclaresTasks) else None)
    if t.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    pre = model.preprocessing
    augmenter = reg.build("augmenter", recipe.augment.spec(), "augment", pre)
    sampler = None
    if recipe.sampler is not None:
        sampler = reg.build("sampler", recipe.sampler.spec(), "sampler", [s.label for s in splits.train], task)
        if supports(loss, ReweightsClasses) and supports(sampler, RebalancesClasses):
            msg = (f"loss '{recipe.loss.plugin}' re-weights classes and sampler '{recipe.sampler.plugin}' "
                   "re-balances them: the minority classes are corrected twice; use one of the two")
            warnings.warn(msg, stacklevel=2)
            console.print(f"[bold yellow]warning:[/] {msg}")
    workers = resolve_workers(t.num_workers, device)
    pin = device.type == "cuda" if t.pin_memory == "auto" else bool(t.pin_memory)
    num_aus = len(splits.au_names)
    train_ds = ImageDataset(splits.train, augmenter, pre.channels, num_aus, cache=recipe.data.cache_images,
                            decoded=splits.decoded)
    train_loader = EpochSeededLoader(
        train_ds, batch_size=t.batch_size, shuffle=True, num_workers=workers, pin_memory=pin, seed=t.seed,
        drop_last=len(train_ds) > t.batch_size, reseed=augmenter.set_seed if supports(augmenter, Seeded) else None,
        sampler_factory=sampler,
    )
    # under DDP each process predicts every N-th image; the engine gathers them in order (dist.gather_rows)
    val_loader = eval_loader(splits.val[dist.rank()::dist.world_size()], pre, num_aus, t.eval_batch_size or 2 * t.batch_size, workers, pin,
                             cache=recipe.data.cache_images, decoded=splits.decoded)
    # a loss may learn too (e.g. uncertainty task weights): its parameters join the optimizer
    loss_params = list(loss.parameters()) if isinstance(loss, nn.Module) else []
    params = [p for p in [*model.parameters(), *loss_params] if p.requires_grad]
    optimizer = reg.build("optimizer", recipe.optimizer.spec(), "optimizer", params)
    info = ScheduleInfo(epochs=t.epochs, steps_per_epoch=-(-len(train_loader) // t.accumulate_steps),
                        monitor_mode=t.monitor_mode)
    scheduler = None
    if recipe.schedule is not None:
        scheduler = reg.build("scheduler", recipe.schedule.spec(), "schedule", optimizer, info)
    batch_transforms = [reg.build("batch_transform", bt.spec(), f"batch_transforms[{i}]", task, info)
                        for i, bt in enumerate(recipe.batch_transforms)]
    for bt in batch_transforms:  # optional hand-overs, e.g. for a distillation teacher
        if supports(bt, NeedsStudentPreprocessing):
            bt.set_student_preprocessing(pre)
        if supports(bt, NeedsTrainSamples):
            bt.set_train_samples(train_ds.samples)  # batch["index"] indexes this list
    callbacks = [reg.build("callback", cb.spec(), f"callbacks[{i}]") for i, cb in enumerate(recipe.callbacks)]
    if recipe.tracking.enabled:
        callbacks.append(reg.build("callback", recipe.tracking.spec(), "tracking"))
    channels_last = {"on": True, "off": False}.get(t.channels_last, model.backbone.prefers_channels_last
                                                     and device.type != "mps")
    return Built(recipe, splits, model, device, precision, train_loader, val_loader, loss, optimizer, scheduler,
                 batch_transforms, callbacks, channels_last)
