"""Backbones from torchvision.models; a local weights file is loaded strictly (every key)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fer_core.api import Backbone, CamTarget, FerError, Preprocessing, hookimpl, traits


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionBackbone(Backbone):
    def __init__(self, model: nn.Module, feature_dim: int, pre: Preprocessing) -> None:
        import torchvision

        super().__init__()
        self.model = model
        self.feature_dim = feature_dim
        self.preprocessing = pre
        self.prefers_channels_last = not isinstance(model, torchvision.models.VisionTransformer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def cam_target(self) -> CamTarget | None:
        import torchvision

        m = self.model
        if isinstance(m, torchvision.models.VisionTransformer):
            # the input of the last block's attention: the class token, then the patch grid
            name, last = list(m.encoder.layers.named_children())[-1]
            side = m.image_size // m.patch_size
            return CamTarget(last.ln_1, f"model.encoder.layers.{name}.ln_1", "tokens", 1, (side, side))
        if isinstance(m, torchvision.models.SwinTransformer):
            return CamTarget(m.norm, "model.norm", "NHWC")  # features and norm are B×H×W×C; permute follows
        return None  # CNNs: the explainer finds the last spatial feature map itself


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the final classifier by Identity; return the feature size it received."""
    for attr in ("fc", "classifier", "head", "heads"):
        layer = getattr(model, attr, None)
        if layer is None:
            continue
        linears = [m for m in (layer.modules() if isinstance(layer, nn.Module) else []) if isinstance(m, nn.Linear)]
        if linears:
            setattr(model, attr, nn.Identity())
            return linears[0].in_features
    raise FerError(f"model.backbone.name: cannot find the classifier of torchvision model '{name}'")


@traits(example={"name": "mobilenet_v2", "input_size": 32})  # the registry contract tests build this tiny model
def make_torchvision_backbone(*, name: str, pretrained: bool | str = False, input_size: int = 224) -> TorchvisionBackbone:
    """`pretrained`: false, true (torchvision's default weights, downloaded) or a local .pth file."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=3)
        raise FerError(f"model.backbone.name: unknown torchvision model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    weights = "DEFAULT" if pretrained is True else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as e:
        raise FerError(f"model.backbone: torchvision could not create '{name}' (pretrained={pretrained!r}): {e}") from None
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FerError(f"model.backbone.pretrained: weights file '{pretrained}' not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as e:
            raise FerError(f"model.backbone.pretrained: '{path}' does not fit torchvision '{name}': {str(e)[:300]}") from None
    feature_dim = _strip_classifier(model, name)
    pre = Preprocessing(input_size=(input_size, input_size), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return TorchvisionBackbone(model, feature_dim, pre)


@hookimpl
def register_backbones(register):
    register("torchvision", make_torchvision_backbone)
