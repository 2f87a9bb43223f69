"""Grad-CAM (Selvaraju et al. 2017) for fer models, implemented with forward hooks and
``torch.autograd.grad`` (no extra dependency).

For a target class c and a spatial activation A (C×h×w) of a chosen layer, the weights are the
spatial mean of ∂y_c/∂A (y_c: the class logit), the map is ReLU(Σ_k w_k A_k), upsampled
bilinearly to the input resolution and divided by its maximum (an all-zero map stays zero).

Layer choice (``target_layer``): for CNNs the last backbone module whose output is a 4-D
B×C×H×W map with more than one spatial position (the last one of any size when every map is
1×1); for ViT-like models the input of the last block's attention (``blocks[-1].norm1`` in timm,
``encoder.layers[-1].ln_1`` in torchvision), whose patch tokens are reshaped to the patch grid
after dropping the class/register/distillation tokens; for channels-last models (timm Swin,
``output_fmt == "NHWC"``) the last stage's B×H×W×C output, permuted to B×C×H×W. A dotted module
name overrides the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402
from .errors import FerError  # noqa: E402

ALPHA = 0.4
CHUNK = 32  # images per Grad-CAM forward/backward


# ------------------------------------------------------------------ layer choice


@dataclass
class _Target:
    name: str  # dotted name relative to the model given
    module: nn.Module
    layout: str  # "NCHW", "NHWC" or "tokens"


def _inner(model: nn.Module) -> nn.Module:
    """The timm/torchvision module inside a fer backbone (or the model itself)."""
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "model", backbone)


def _prefix(model: nn.Module, sub: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is sub:
            return name
    return ""


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_nhwc(inner: nn.Module) -> bool:
    return getattr(inner, "output_fmt", None) == "NHWC" or "swin" in type(inner).__name__.lower()


def _vit_attention_input(inner: nn.Module) -> tuple[str, nn.Module] | None:
    """timm ViT family (patch_embed + blocks) or torchvision VisionTransformer."""
    blocks = getattr(inner, "blocks", None)
    if hasattr(inner, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        last = len(blocks) - 1
        if isinstance(getattr(blocks[last], "norm1", None), nn.Module):
            return f"blocks.{last}.norm1", blocks[last].norm1
        return f"blocks.{last}", blocks[last]
    try:
        from torchvision.models import VisionTransformer
    except ImportError:  # pragma: no cover
        VisionTransformer = ()  # type: ignore[assignment]
    if isinstance(inner, VisionTransformer):
        layers = inner.encoder.layers
        last = len(layers) - 1
        return f"encoder.layers.{last}.ln_1", layers[last].ln_1
    return None


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example[:1]
    pre = getattr(model, "preprocessing", None) or getattr(getattr(model, "backbone", None), "preprocessing", None)
    if pre is None:
        raise FerError("Grad-CAM: cannot tell the model's input size; pass an example batch")
    return torch.zeros(1, pre.channels, *pre.input_size)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _probe(model: nn.Module, root: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every module under root, in the order their forwards finished."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def hook(name):
        def fn(_m, _inp, out):
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, torch.Tensor):
                seen.append((name, tuple(out.shape)))
        return fn

    for name, m in root.named_modules():
        if m is not root:
            handles.append(m.register_forward_hook(hook(name)))
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


def _resolve(model: nn.Module, layer: str | None, example: torch.Tensor | None = None) -> _Target:
    inner = _inner(model)
    base = _prefix(model, inner)
    nhwc = _is_nhwc(inner)
    if layer:
        modules = dict(model.named_modules())
        for name in (layer, _join(base, layer), _join(_prefix(model, getattr(model, "backbone", model)), layer)):
            if name in modules and name:
                module = modules[name]
                break
        else:
            raise FerError(f"--layer: no module named '{layer}' in the model (names are dotted, relative to the "
                           f"model, e.g. '{base or 'backbone'}.…', or to the timm/torchvision module)")
        shape = dict(_probe(model, model, _example(model, example))).get(name)
        if shape is None:
            raise FerError(f"--layer: module '{name}' is not called in the model's forward")
        if len(shape) == 3:
            return _Target(name, module, "tokens")
        if len(shape) != 4:
            raise FerError(f"--layer: module '{name}' outputs shape {list(shape)}; Grad-CAM needs a B×C×H×W map "
                           "or B×N×D tokens")
        return _Target(name, module, "NHWC" if nhwc else "NCHW")
    vit = _vit_attention_input(inner)
    if vit is not None and not nhwc:
        return _Target(_join(base, vit[0]), vit[1], "tokens")
    shapes = _probe(model, inner, _example(model, example))
    maps = [(n, s) for n, s in shapes if len(s) == 4]
    if maps:
        spatial = (lambda s: s[1] * s[2]) if nhwc else (lambda s: s[2] * s[3])
        wide = [(n, s) for n, s in maps if spatial(s) > 1]
        name = (wide or maps)[-1][0]
        return _Target(_join(base, name), inner.get_submodule(name), "NHWC" if nhwc else "NCHW")
    tokens = [(n, s) for n, s in shapes if len(s) == 3]
    if tokens:
        name = tokens[-1][0]
        return _Target(_join(base, name), inner.get_submodule(name), "tokens")
    raise FerError(f"Grad-CAM: no spatial layer found in {type(inner).__name__}; name one with --layer")


def target_layer(model: nn.Module, layer: str | None = None, example: torch.Tensor | None = None) -> nn.Module:
    """The module whose activation Grad-CAM uses (see the module docstring); ``layer``: a
    dotted module name relative to the model (``backbone.model.layer3``) or to the timm /
    torchvision module inside the backbone (``layer3``, ``blocks.11.norm1``)."""
    return _resolve(model, layer, example).module


def target_layer_name(model: nn.Module, layer: str | None = None, example: torch.Tensor | None = None) -> str:
    """The dotted name (relative to ``model``) of the module ``target_layer`` returns."""
    return _resolve(model, layer, example).name


# ------------------------------------------------------------------ Grad-CAM


def _patch_grid(inner: nn.Module, image_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """(h, w) of the patch grid for an input of image_hw."""
    pe = getattr(inner, "patch_embed", None)
    patch = getattr(pe, "patch_size", None) if pe is not None else getattr(inner, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
        h, w = image_hw[0] // ph, image_hw[1] // pw
        if 0 < h * w <= n_tokens:
            return h, w
    grid = getattr(pe, "grid_size", None)
    if grid is not None and 0 < grid[0] * grid[1] <= n_tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n_tokens)
    return side, side


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B×N×D tokens → B×D×h×w, dropping the N − h·w leading (class/register/distillation) tokens."""
    b, n, d = tokens.shape
    h, w = grid
    prefix = n - h * w
    if prefix < 0:
        raise FerError(f"Grad-CAM: {n} tokens cannot hold a {h}×{w} patch grid")
    return tokens[:, prefix:, :].reshape(b, h, w, d).permute(0, 3, 1, 2)


def _as_map(act: torch.Tensor, target: _Target, inner: nn.Module, image_hw: tuple[int, int]) -> torch.Tensor:
    if target.layout == "tokens":
        return tokens_to_map(act, _patch_grid(inner, image_hw, act.shape[1]))
    if target.layout == "NHWC":
        return act.permute(0, 3, 1, 2)
    return act


def _grad_cam(model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | None,
              layer: str | None = None, task: str = "emotion") -> tuple[np.ndarray, np.ndarray, str]:
    """(N×H×W heatmaps, N×K logits of ``task``, target layer name). ``target_classes`` None:
    the predicted class of each image."""
    if images.ndim != 4:
        raise FerError(f"Grad-CAM: expected a B×C×H×W batch, got shape {list(images.shape)}")
    n, _, h, w = images.shape
    if target_classes is not None and len(target_classes) != n:
        raise FerError(f"Grad-CAM: {len(target_classes)} target classes for {n} images")
    dev = _device(model)
    target = _resolve(model, layer, images[:1])
    inner = _inner(model)
    grads_before = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    captured: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        captured.clear()
        captured.append(out)

    handle = target.module.register_forward_hook(hook)
    cams: list[torch.Tensor] = []
    logits_all: list[torch.Tensor] = []
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
                if target_classes is None:
                    cls = logits.detach().argmax(1)
                else:
                    cls = torch.as_tensor(list(target_classes[start:start + CHUNK]), device=dev, dtype=torch.long)
                score = logits.gather(1, cls.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, act, allow_unused=True)
                if grad is None:
                    grad = torch.zeros_like(act)
                a = _as_map(act.detach().float(), target, inner, (h, w))
                g = _as_map(grad.float(), target, inner, (h, w))
                weights = g.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * a).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
                peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
                cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp(0, 1)
                cams.append(cam.cpu())
                logits_all.append(logits.detach().float().cpu())
    finally:
        handle.remove()
        for p, req in grads_before.items():
            p.requires_grad_(req)
        model.train(was_training)
    return torch.cat(cams).numpy(), torch.cat(logits_all).numpy(), target.name


def grad_cam(model: nn.Module, images: torch.Tensor, target_classes: Sequence[int] | None,
             layer: str | None = None) -> np.ndarray:
    """N×H×W Grad-CAM heatmaps in [0, 1] at the input resolution, for the emotion logit of
    ``target_classes`` (one class index per image; None: each image's predicted class).
    Runs in fp32 with the model in eval mode; the model's train/eval mode and parameters'
    ``requires_grad`` are restored and the hooks removed afterwards."""
    return _grad_cam(model, images, target_classes, layer)[0]


# ------------------------------------------------------------------ pictures


def _rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] < 3:
        raise FerError(f"overlay: expected an H×W, H×W×1 or H×W×3 image, got shape {list(np.shape(image))}")
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def resize_heatmap(heatmap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape == tuple(size_hw):
        return heat
    t = torch.from_numpy(heat)[None, None]
    return F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """H×W×3 uint8: the image (grayscale made RGB) blended with the jet-coloured heatmap
    (resized to the image when their sizes differ)."""
    img = _rgb(image)
    heat = np.clip(np.nan_to_num(resize_heatmap(heatmap, img.shape[:2])), 0, 1)
    colour = matplotlib.colormaps["jet"](heat)[:, :, :3] * 255.0
    out = (1 - alpha) * img.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: Path) -> bytes:
    """Render a figure to PNG, write it atomically, return the bytes."""
    data = _png(fig)
    atomic_write_bytes(path, data)
    return data


# ------------------------------------------------------------------ run-level helpers


def _read_image(path: Path, channels: int) -> np.ndarray:
    from .data import load_image

    if not Path(path).is_file():
        raise FerError(f"{path}: image not found")
    try:
        return load_image(Path(path), channels)
    except Exception as e:
        raise FerError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _class_index(classes: Sequence[str], name: str) -> int:
    index = {c.lower(): i for i, c in enumerate(classes)}
    if name.lower() not in index:
        raise FerError(f"--target: '{name}' is not a class of this run; classes: {', '.join(classes)} "
                       "(or 'predicted')")
    return index[name.lower()]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    used: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        k = used.get(stem, 0)
        used[stem] = k + 1
        out.append(f"{stem}_gradcam.png" if k == 0 else f"{stem}-{k + 1}_gradcam.png")
    return out


def explain_images(run_dir: Path, images: list[Path], out_dir: Path, *, target: str = "predicted",
                   layer: str | None = None) -> list[Path]:
    """One ``<stem>_gradcam.png`` per image in out_dir: the image with the Grad-CAM heatmap of
    the predicted class (or of class ``target``), titled with the prediction and its
    probability at the run's temperature. Returns the written paths, in input order."""
    from .data import eval_transform
    from .inference import load_run, probabilities

    if not images:
        raise FerError("explain: no images given")
    run = load_run(Path(run_dir))
    pre = run.preprocessing
    originals = [_read_image(Path(p), pre.channels) for p in images]  # all checked before any work
    target_idx = None if target.lower() == "predicted" else _class_index(run.classes, target)
    tf = eval_transform(pre)
    x = torch.stack([tf(img) for img in originals])
    targets = None if target_idx is None else [target_idx] * len(originals)
    heat, logits, _ = _grad_cam(run.model, x, targets, layer)
    probs = probabilities(run, logits)
    out_dir = Path(out_dir)
    written = []
    for img, hm, p, name in zip(originals, heat, probs, _unique_names(images)):
        pred = int(p.argmax())
        title = f"pred: {run.classes[pred]} (p={p[pred]:.2f})"
        if target_idx is not None and target_idx != pred:
            title += f"\nGrad-CAM for: {run.classes[target_idx]} (p={p[target_idx]:.2f})"
        if not hm.any():
            title += "\n(no positive evidence: blank map)"
        fig, ax = plt.subplots(figsize=(3.2, 3.2 + 0.2 * (title.count("\n") + 1)))
        ax.imshow(overlay(img, hm))
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        fig.tight_layout()
        path = out_dir / name
        save_figure(fig, path)
        written.append(path)
    return written


def _pick_examples(labels: np.ndarray, preds: np.ndarray, conf: np.ndarray, cls: int,
                   per_class: int) -> tuple[list[int], list[int]]:
    """The most confident correct and the most confident wrong predictions of true class cls."""
    order = np.argsort(-conf, kind="stable")
    right = [int(i) for i in order if labels[i] == cls and preds[i] == cls][:per_class]
    wrong = [int(i) for i in order if labels[i] == cls and preds[i] != cls][:per_class]
    return right, wrong


def class_grid_figure(run, samples, pred: dict[str, np.ndarray], out_png: Path, per_class: int = 4,
                      layer: str | None = None) -> bytes:
    """The Grad-CAM class grid from existing predictions (see ``class_grid``); returns the PNG."""
    from .data import eval_transform
    from .inference import probabilities

    classes = run.classes
    probs = probabilities(run, pred["logits.emotion"])
    order = pred.get("index", np.arange(len(probs)))
    labels = np.asarray(pred["label"])
    preds, conf = probs.argmax(1), probs.max(1)
    rows = [_pick_examples(labels, preds, conf, c, per_class) for c in range(len(classes))]
    shown = sorted({i for r, w in rows for i in r + w})
    tf = eval_transform(run.preprocessing)
    originals = {i: _read_image(samples[int(order[i])].path, run.preprocessing.channels) for i in shown}
    heat: dict[int, np.ndarray] = {}
    if shown:
        x = torch.stack([tf(originals[i]) for i in shown])
        maps, _, _ = _grad_cam(run.model, x, [int(preds[i]) for i in shown], layer)
        heat = dict(zip(shown, maps))
    ncols = 2 * per_class
    cell = 1.35
    fig, axes = plt.subplots(len(classes), ncols + 1, squeeze=False,
                             figsize=(1.3 + cell * ncols + 0.25, 0.5 + (cell + 0.3) * len(classes)),
                             gridspec_kw={"width_ratios": [1] * per_class + [0.18] + [1] * per_class})
    for r, (right, wrong) in enumerate(rows):
        cells = ([right[k] if k < len(right) else None for k in range(per_class)] + [None]
                 + [wrong[k] if k < len(wrong) else None for k in range(per_class)])
        for c, i in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c == per_class:
                continue  # spacer column between correct and misclassified
            if i is None:
                ax.set_facecolor("#f3f3f3")
                continue
            ax.imshow(overlay(originals[i], heat[i]))
            ok = preds[i] == labels[i]
            ax.set_title(f"{classes[preds[i]]}\np={conf[i]:.2f}", fontsize=7.5,
                         color="#1a7f37" if ok else "#c62828", pad=2)
        axes[r][0].set_ylabel(classes[r], rotation=0, ha="right", va="center", fontsize=10, labelpad=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    left = axes[0][0].get_position().x0
    mid_l = axes[0][per_class - 1].get_position().x1
    mid_r = axes[0][per_class + 1].get_position().x0
    right_x = axes[0][-1].get_position().x1
    top = 1 - 0.12 / fig.get_figheight()
    fig.text((left + mid_l) / 2, top, "correctly classified (most confident)", ha="center", va="top", fontsize=10)
    fig.text((mid_r + right_x) / 2, top, "misclassified (most confident)", ha="center", va="top", fontsize=10)
    return save_figure(fig, Path(out_png))


def class_grid(run_dir: Path, out_png: Path, *, split: str | None = None, per_class: int = 4,
               overrides: Sequence[str] = ()) -> Path:
    """One figure: a row per true class with ``per_class`` correctly classified then
    ``per_class`` misclassified examples of the split (most confident first), each a Grad-CAM
    overlay of the predicted class titled with it and its probability; empty cells where a
    class has too few examples."""
    from .inference import load_run, run_predictions, split_samples

    run = load_run(Path(run_dir), overrides)
    _, samples = split_samples(run, split)
    pred = run_predictions(run, samples)
    class_grid_figure(run, samples, pred, Path(out_png), per_class)
    return Path(out_png)


__all__: list[str] = ["target_layer", "target_layer_name", "grad_cam", "tokens_to_map", "overlay", "explain_images",
                      "class_grid", "class_grid_figure", "resize_heatmap", "save_figure"]
