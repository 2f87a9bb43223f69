"""The ``gradcam`` explainer (Selvaraju et al. 2017) and the `fer explain` command.

Grad-CAM, with forward hooks and ``torch.autograd.grad`` (no extra dependency): for a target
class c and a spatial activation A (C×h×w) of one layer, the weights are the spatial mean of
∂y_c/∂A (y_c: the class logit), the map is ReLU(Σ_k w_k A_k), upsampled bilinearly to the input
resolution and divided by its maximum (an all-zero map stays zero).

Which layer: a dotted module name (``layer``, ``--layer``) when given; else the layer the
backbone declares with ``Backbone.cam_target()`` (the backbone knows its own internals: a ViT's
tokens, a Swin's channels-last maps); else, for backbones that declare none (CNNs), the last
module whose output is a B×C×H×W map with more than one spatial position (the last of any size
when every map is 1×1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from fer_core.api import (BY_NAME, Backbone, CamTarget, Explainer, FerError, RunArgument, RunPredictor,
                          atomic_write_bytes, class_index, eval_transform, figure_png, hookimpl, load_image, softmax,
                          stdout)

ALPHA = 0.4
CHUNK = 32  # images per Grad-CAM forward/backward


# ------------------------------------------------------------------ which layer


def _name_of(model: nn.Module, sub: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is sub), "")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _network(backbone: nn.Module) -> nn.Module:
    """The network a backbone wraps when it wraps exactly one (timm, torchvision): probing inside
    it names its layers, not the wrapper, which returns the same tensor."""
    children = list(backbone.children())
    return children[0] if len(children) == 1 else backbone


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example[:1]
    pre = getattr(getattr(model, "backbone", model), "preprocessing", None)
    if pre is None:
        raise FerError("Grad-CAM: cannot tell the model's input size; pass an example batch")
    return torch.zeros(1, pre.channels, *pre.input_size)


def _probe(model: nn.Module, root: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name relative to model, output shape) of every module under root, in the order their
    forwards finished."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(name):
        def fn(_m, _inp, out):
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, torch.Tensor):
                seen.append((name, tuple(out.shape)))
        return fn

    base = _name_of(model, root)
    handles = [m.register_forward_hook(hook(_join(base, n))) for n, m in root.named_modules() if m is not root]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(_device(model).type, enabled=False):
            model(x.to(_device(model)).float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def resolve_target(model: nn.Module, layer: str | None = None, example: torch.Tensor | None = None) -> CamTarget:
    """The layer Grad-CAM hooks (see the module docstring), ``name`` relative to ``model``.
    ``layer``: a dotted name relative to the model (``backbone.model.layer3``), to the backbone,
    or to the network inside it (``layer3``, ``blocks.11.norm1``)."""
    backbone = getattr(model, "backbone", model)
    declared = backbone.cam_target() if isinstance(backbone, Backbone) else None
    network = _network(backbone)
    if layer:
        modules = dict(model.named_modules())
        names = [_join(_name_of(model, m), layer) for m in (model, backbone, network)]
        name = next((n for n in names if n and n in modules), None)
        if name is None:
            raise FerError(f"--layer: no module named '{layer}' in the model (names are dotted, relative to the "
                           f"model, e.g. '{_name_of(model, network) or 'backbone'}.…', or to the network inside "
                           "the backbone)")
        shape = dict(_probe(model, model, _example(model, example))).get(name)
        if shape is None:
            raise FerError(f"--layer: module '{name}' is not called in the model's forward")
        if len(shape) not in (3, 4):
            raise FerError(f"--layer: module '{name}' outputs shape {list(shape)}; Grad-CAM needs a B×C×H×W map "
                           "or B×N×D tokens")
        # another layer of the same network reads like the declared one (channels-last, token prefix)
        like = declared if declared is not None else CamTarget(network, "")
        if len(shape) == 3:
            tokens = like.layout == "tokens"
            return CamTarget(modules[name], name, "tokens", like.prefix_tokens if tokens else 0,
                             like.grid if tokens else None)
        return CamTarget(modules[name], name, "NHWC" if like.layout == "NHWC" else "NCHW")
    if declared is not None:
        return replace(declared, name=_name_of(model, declared.module) or declared.name)
    maps = [(n, s) for n, s in _probe(model, network, _example(model, example)) if len(s) == 4]
    if not maps:
        raise FerError(f"Grad-CAM: {type(network).__name__} has no B×C×H×W feature map and its backbone declares "
                       "no cam_target(); name a layer with --layer")
    wide = [n for n, s in maps if s[2] * s[3] > 1]
    name = (wide or [maps[-1][0]])[-1]
    return CamTarget(model.get_submodule(name), name, "NCHW")


# ------------------------------------------------------------------ Grad-CAM


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B×N×D tokens → B×D×h×w, dropping the N − h·w leading (class/register/distillation) tokens."""
    b, n, d = tokens.shape
    h, w = grid
    if n < h * w:
        raise FerError(f"Grad-CAM: {n} tokens cannot hold a {h}×{w} patch grid")
    return tokens[:, n - h * w:, :].reshape(b, h, w, d).permute(0, 3, 1, 2)


def _as_map(act: torch.Tensor, target: CamTarget) -> torch.Tensor:
    if target.layout == "tokens":
        side = math.isqrt(act.shape[1] - target.prefix_tokens)  # no declared grid: a square one
        return tokens_to_map(act, target.grid or (side, side))
    return act.permute(0, 3, 1, 2) if target.layout == "NHWC" else act


def grad_cam(model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | None,
             target: CamTarget | str | None = None, task: str = "emotion") -> np.ndarray:
    """N×H×W Grad-CAM heatmaps in [0, 1] at the input resolution, for the ``task`` logit of
    ``target_classes`` (one class index per image; None: each image's predicted class), at
    ``target`` (a resolved CamTarget, a layer name, or None: see ``resolve_target``).
    Runs in fp32 with the model in eval mode; the model's train/eval mode and parameters'
    ``requires_grad`` are restored and the hook removed afterwards."""
    if images.ndim != 4:
        raise FerError(f"Grad-CAM: expected a B×C×H×W batch, got shape {list(images.shape)}")
    n, _, h, w = images.shape
    if target_classes is not None and len(target_classes) != n:
        raise FerError(f"Grad-CAM: {len(target_classes)} target classes for {n} images")
    if not isinstance(target, CamTarget):
        target = resolve_target(model, target, images[:1])
    dev = _device(model)
    grads_before = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    captured: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        captured[:] = [out[0] if isinstance(out, (tuple, list)) else out]

    handle = target.module.register_forward_hook(hook)
    cams: list[torch.Tensor] = []
    try:
        model.eval()
        for p in model.parameters():  # gradients wrt the activation only, not the weights
            p.requires_grad_(False)
        with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
            for start in range(0, n, CHUNK):
                x = images[start:start + CHUNK].to(dev).float().requires_grad_(True)
                captured.clear()
                out = model(x)
                logits = out[task] if isinstance(out, dict) else out
                if not captured:
                    raise FerError(f"Grad-CAM: layer '{target.name}' was not called in the forward pass")
                act = captured[-1]
                cls = (logits.detach().argmax(1) if target_classes is None else
                       torch.as_tensor(list(target_classes[start:start + CHUNK]), device=dev, dtype=torch.long))
                (grad,) = torch.autograd.grad(logits.gather(1, cls.view(-1, 1)).sum(), act, allow_unused=True)
                a = _as_map(act.detach().float(), target)
                g = _as_map(torch.zeros_like(act) if grad is None else grad.float(), target)
                cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
                peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
                cams.append(torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp(0, 1).cpu())
    finally:
        handle.remove()
        for p, req in grads_before.items():
            p.requires_grad_(req)
        model.train(was_training)
    return torch.cat(cams).numpy()


class GradCam:
    """The ``Explainer``; ``layer_used`` names the layer of the last call (for captions)."""

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self.layer_used: str | None = None

    def explain(self, model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | None) -> np.ndarray:
        target = resolve_target(model, self.layer, images[:1])
        self.layer_used = target.name
        return grad_cam(model, images, target_classes, target)


def make_gradcam(*, layer: str | None = None) -> GradCam:
    """Grad-CAM of the explained class's logit. `layer`: a dotted module name (default: the
    backbone's declared CAM layer, else its last spatial feature map)."""
    return GradCam(layer)


@hookimpl
def register_explainers(register):
    register("gradcam", make_gradcam)


# ------------------------------------------------------------------ pictures and images


def read_image(path: Path, channels: int) -> np.ndarray:
    """H×W×C uint8, or a FerError naming the file."""
    if not Path(path).is_file():
        raise FerError(f"{path}: image not found")
    try:
        return load_image(Path(path), channels)
    except Exception as e:
        raise FerError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] < 3:
        raise FerError(f"overlay: expected an H×W, H×W×1 or H×W×3 image, got shape {list(np.shape(image))}")
    return np.clip(img[:, :, :3], 0, 255).astype(np.uint8)


def resize_heatmap(heatmap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape == tuple(size_hw):
        return heat
    return F.interpolate(torch.from_numpy(heat)[None, None], size=tuple(size_hw), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """H×W×3 uint8: the image (grayscale made RGB) blended with the jet-coloured heatmap
    (resized to the image when their sizes differ)."""
    img = _rgb(image)
    heat = np.clip(np.nan_to_num(resize_heatmap(heatmap, img.shape[:2])), 0, 1)
    colour = matplotlib.colormaps["jet"](heat)[:, :, :3] * 255.0
    return np.clip(np.rint((1 - alpha) * img.astype(np.float32) + alpha * colour), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ `fer explain`


def explainer_spec(pred: RunPredictor, layer: str | None = None) -> dict[str, Any]:
    """The recipe's [explain] table, or the kind's default explainer; ``layer`` overrides its key."""
    spec = pred.recipe.explain.spec() if pred.recipe.explain is not None else {"plugin": BY_NAME["explainer"].default}
    return {**spec, "layer": layer} if layer else spec


def build_explainer(pred: RunPredictor, layer: str | None = None) -> Explainer:
    return pred.registry.build("explainer", explainer_spec(pred, layer), "explain")


def _unique_names(paths: Sequence[Path]) -> list[str]:
    used: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        k = used[stem] = used.get(stem, 0) + 1
        out.append(f"{stem}_gradcam.png" if k == 1 else f"{stem}-{k}_gradcam.png")
    return out


@dataclass(frozen=True)
class Explained:
    image: Path
    path: Path  # the overlay written
    predicted: str
    probability: float  # calibrated


def explain_images(run_dir: Path, images: Sequence[Path], out_dir: Path, *, target: str = "predicted",
                   layer: str | None = None) -> list[Explained]:
    """One ``<stem>_gradcam.png`` per image in out_dir: the image with the saliency map of the
    predicted class (or of class ``target``), titled with the prediction and its calibrated
    probability. Returns what was written and predicted, in input order."""
    if not images:
        raise FerError("explain: no images given")
    pred = RunPredictor(Path(run_dir))
    pre = pred.preprocessing
    originals = [read_image(Path(p), pre.channels) for p in images]  # all checked before any work
    index = class_index(pred.classes)
    if target.lower() != "predicted" and target.lower() not in index:
        raise FerError(f"--target: '{target}' is not a class of this run; classes: {', '.join(pred.classes)} "
                       "(or 'predicted')")
    explainer = build_explainer(pred, layer)
    tf = eval_transform(pre)
    x = torch.stack([tf(img) for img in originals])
    probs = softmax(pred.logits(x, pre).numpy())
    predicted = probs.argmax(1)
    # explain the class the calibrated prediction names, not the explainer's own (fp32) argmax
    targets = predicted.tolist() if target.lower() == "predicted" else [index[target.lower()]] * len(images)
    heat = explainer.explain(pred.model, x, targets)
    written = []
    for img, hm, p, k, t, name, src in zip(originals, heat, probs, predicted, targets, _unique_names(images), images):
        title = f"pred: {pred.classes[k]} (p={p[k]:.2f})"
        if t != k:
            title += f"\nexplained: {pred.classes[t]} (p={p[t]:.2f})"
        if not hm.any():
            title += "\n(no positive evidence: blank map)"
        fig, ax = plt.subplots(figsize=(3.2, 3.2 + 0.2 * (title.count("\n") + 1)), dpi=100)
        ax.imshow(overlay(img, hm))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        fig.tight_layout()
        path = Path(out_dir) / name
        atomic_write_bytes(path, figure_png(fig))
        written.append(Explained(Path(src), path, pred.classes[k], float(p[k])))
    return written


@hookimpl
def register_commands(cli):
    @cli.command(epilog="Examples: fer explain runs/try1 face.png ;  fer explain runs/try1 a.png b.png --target sad")
    def explain(
        run_dir: RunArgument,
        images: Annotated[list[Path], typer.Argument(help="Face images to explain.", show_default=False)],
        out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default RUN/explain).")] = None,
        target: Annotated[str, typer.Option("--target", help="Class to explain (default: the predicted one).")]
        = "predicted",
        layer: Annotated[Optional[str], typer.Option("--layer", help="Module name of the Grad-CAM layer "
                                                                      "(default: the backbone's own).")] = None,
    ) -> None:
        """Saliency overlays (Grad-CAM by default): which parts of each face drove the prediction."""
        shown = explain_images(run_dir, images, out or Path(run_dir) / "explain", target=target, layer=layer)
        for e in shown:
            stdout.print(f"{e.image}: {e.predicted} (p={e.probability:.2f}) → {e.path}", markup=False,
                         highlight=False)
        stdout.print(f"wrote {len(shown)} overlay(s) to {shown[0].path.parent}", markup=False, highlight=False)
