"""Backbones from timm: any `timm.list_models()` name, pretrained from the hub or a local file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fer_core.api import Backbone, CamTarget, FerError, Preprocessing, hookimpl, traits


class TimmBackbone(Backbone):
    def __init__(self, model: torch.nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.model = model
        # with num_classes=0 timm returns the pre-logits features: head_hidden_size where a model
        # has a hidden head layer (e.g. MobileNetV3), else num_features
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.preprocessing = pre
        # patch-token models gain nothing from channels_last
        self.prefers_channels_last = not hasattr(model, "patch_embed")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def cam_target(self) -> CamTarget | None:
        m = self.model
        if getattr(m, "output_fmt", "NCHW") == "NHWC":  # Swin-like: every stage emits B×H×W×C
            info = getattr(m, "feature_info", None)
            if not info:
                return None
            last = info[-1]["module"]  # the last stage
            return CamTarget(m.get_submodule(last), f"model.{last}", "NHWC")
        blocks = getattr(m, "blocks", None)
        if hasattr(m, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
            # ViT family: the input of the last block's attention, prefix (class/register/distillation)
            # tokens first, then the patch grid the model was built for
            last, name = blocks[-1], f"model.blocks.{len(blocks) - 1}"
            if isinstance(getattr(last, "norm1", None), nn.Module):
                last, name = last.norm1, f"{name}.norm1"
            grid = getattr(m.patch_embed, "grid_size", None)
            return CamTarget(last, name, "tokens", int(getattr(m, "num_prefix_tokens", 1)),
                             (int(grid[0]), int(grid[1])) if grid is not None else None)
        return None  # CNNs: the explainer finds the last spatial feature map itself


def _create(name: str, pretrained: bool, in_chans: int, drop_path_rate: float, file: str | None, seed: int,
            input_size: int = 0) -> torch.nn.Module:
    import timm

    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if file:
        kwargs["pretrained_cfg_overlay"] = {"file": file}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if input_size:
            # fixed-size models (ViT, Swin, ...) must be built for the input size; CNNs reject the argument
            try:
                return timm.create_model(name, pretrained=pretrained, img_size=input_size, **kwargs)
            except TypeError:
                torch.manual_seed(seed)
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def loaded_fraction(model: torch.nn.Module, init_a: torch.nn.Module, init_b: torch.nn.Module) -> float:
    """Share of randomly initialised tensors that loading changed.

    ``model`` and ``init_a`` were created with the same seed, ``init_b`` with another: tensors
    that differ between the two inits are the random ones (constant inits such as BatchNorm's
    are ignored); a tensor that loading set no longer equals ``init_a``.
    """
    a, b = init_a.state_dict(), init_b.state_dict()
    random_keys = [k for k, v in a.items() if v.is_floating_point() and not torch.equal(v, b[k])]
    got = model.state_dict()
    changed = sum(not torch.equal(got[k], a[k]) for k in random_keys)
    return changed / max(len(random_keys), 1)


@traits(example={"name": "resnet10t", "in_chans": 1, "input_size": 32})  # the registry contract tests build this tiny model
def make_timm_backbone(
    *,
    name: str,
    pretrained: bool | str = False,
    input_size: int = 0,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
) -> TimmBackbone:
    """`pretrained`: false, true (from the hub, for connected machines) or a local weights file.

    `input_size` 0 keeps the model's default; `in_chans` 1 trains on grayscale directly.
    """
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise FerError(f"model.backbone.name: unknown timm model '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
    file = None
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FerError(f"model.backbone.pretrained: weights file '{pretrained}' not found")
        file = str(path.resolve())
    try:
        model = _create(name, bool(pretrained), in_chans, drop_path_rate, file, seed=0, input_size=input_size)
    except FerError:
        raise
    except Exception as e:
        raise FerError(f"model.backbone: timm could not create '{name}' (pretrained={pretrained!r}): {e}") from None
    if pretrained:
        # timm may load a file with foreign key names without complaint; make sure it loaded
        frac = loaded_fraction(model, _create(name, False, in_chans, drop_path_rate, None, 0, input_size),
                               _create(name, False, in_chans, drop_path_rate, None, 1, input_size))
        if frac < 0.5:
            raise FerError(
                f"model.backbone.pretrained: '{pretrained}' set only {frac:.0%} of timm '{name}' weights; "
                "the file's key layout does not match this model (a torchvision file needs the torchvision plugin)"
            )
    cfg = model.pretrained_cfg or {}
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return TimmBackbone(model, Preprocessing(input_size=(size, size), channels=in_chans, mean=mean, std=std))


@hookimpl
def register_backbones(register):
    register("timm", make_timm_backbone)
