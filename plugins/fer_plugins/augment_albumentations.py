"""The `albumentations` augmenter: the accuracy plan's strong pipeline (§1.1), a light one, and a
generic list of any albumentations 2.x transforms, all from the recipe (albumentations 2.x).

Recipe keys are the keyword parameters of `make_albumentations`; see docs/augmentation.md.
Pipeline order: preset (resize/crop → geometry → colour → noise/blur → distortion → dropout) →
the recipe's ``transforms`` → (resize back to the input size, only when ``transforms`` is set) →
Normalize(pre.mean, pre.std) → ToTensorV2.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError

from fer_core.api import FerError, Preprocessing, hookimpl
from fer_plugins.augment_basic import AlbumentationsAugmenter


#: the recipe table this component lives in (errors name keys below it)
SECTION = "augment"

_BORDERS = {"reflect": "BORDER_REFLECT_101", "constant": "BORDER_CONSTANT", "replicate": "BORDER_REPLICATE"}  # cv2 names

#: added by the plugin itself, from the model's preprocessing; not allowed in `transforms`
_RESERVED = {
    "Normalize": "Normalize is added by the plugin from the model's preprocessing (mean/std)",
    "ToTensorV2": "ToTensorV2 is added by the plugin",
    "Compose": "the plugin builds the Compose; use Sequential to group transforms",
    "ReplayCompose": "the plugin builds the Compose; use Sequential to group transforms",
    "Lambda": "Lambda needs Python callables, which a recipe cannot hold",
}
_BASES = {"BasicTransform", "BaseCompose", "DualTransform", "ImageOnlyTransform", "Transform3D"}


def _transform_classes() -> dict[str, type]:
    """Public albumentations transform classes by name (what `transforms[i].name` may be)."""
    import albumentations as A

    out: dict[str, type] = {}
    for n in dir(A):
        obj = getattr(A, n)
        if (not n.startswith("_") and n not in _BASES and inspect.isclass(obj)
                and issubclass(obj, (A.BasicTransform, A.BaseCompose))):
            out[n] = obj
    return out


TRANSFORMS = _transform_classes()


class AlbumentationsPipeline(AlbumentationsAugmenter):
    """`AlbumentationsAugmenter` that also adapts the input's channels to ``pre.channels``
    (H×W, H×W×1, H×W×3 or H×W×4 uint8 in) and checks the output is C×H×W of the input size."""

    def __init__(self, compose: A.Compose, pre: Preprocessing) -> None:
        super().__init__(compose)
        self.pre = pre

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        import cv2

        img = image[:, :, None] if image.ndim == 2 else image
        c, want = img.shape[2], self.pre.channels
        if c == 4:
            img, c = img[:, :, :3], 3
        if c != want:
            if c == 1 and want == 3:
                img = np.repeat(img, 3, axis=2)
            elif c == 3 and want == 1:
                img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[:, :, None]
            else:
                raise FerError(f"{SECTION}: cannot turn a {c}-channel image into {want} channels")
        out = self.compose(image=np.ascontiguousarray(img))["image"]
        expected = (want, *self.pre.input_size)
        if tuple(out.shape) != expected:
            raise FerError(f"{SECTION}: the pipeline produced an image of shape {tuple(out.shape)}, "
                           f"expected {expected}; a transform in {SECTION}.transforms changes the channels")
        return out


# --------------------------------------------------------------------------------------------
# building one transform with a clear error


def _first_error(e: BaseException) -> tuple[str, str, Any] | None:
    """(argument, message, got) from albumentations' pydantic validation, when there is one."""
    err = e if isinstance(e, ValidationError) else e.__cause__
    if isinstance(err, ValidationError) and err.errors():
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ())]
        return (loc[0] if loc else "", first.get("msg", str(err)), first.get("input"))
    return None


def _construct(cls: type, kwargs: dict[str, Any], name_of: Callable[[str], str], where: str) -> Any:
    """``cls(**kwargs)`` with every albumentations warning an error and every failure a FerError.

    ``name_of(arg)`` names the recipe key behind a transform argument; ``where`` names the
    transform when no single argument is to blame.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return cls(**kwargs)
    except FerError:
        raise
    except Exception as e:  # pydantic ValidationError wrapped in ValueError, TypeError, UserWarning…
        found = _first_error(e)
        if found is not None:
            arg, msg, got = found
            key = name_of(arg) if arg and arg != "__root__" else where
            raise FerError(f"{key}: {msg} (got {got!r})") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FerError(f"{where}: albumentations rejected {cls.__name__}: {msg}") from None


def _preset(cls: type, keys: dict[str, str], **kwargs: Any) -> Any:
    """A preset transform; ``keys`` maps its arguments to the recipe keys that set them."""
    return _construct(cls, kwargs, lambda arg: f"{SECTION}.{keys[arg]}" if arg in keys
                      else f"{SECTION} ({cls.__name__}.{arg})", f"{SECTION} ({cls.__name__})")


# --------------------------------------------------------------------------------------------
# the generic form: transforms = [{name = "CLAHE", p = 0.5}, ...]


def _tuples(v: Any) -> Any:
    """TOML gives lists; albumentations' ranges are tuples."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def _build_generic(spec: Any, where: str, channels: int, probe_size: tuple[int, int]) -> Any:
    import albumentations as A

    if not isinstance(spec, dict):
        raise FerError(f"{where}: expected a table like {{name = \"CLAHE\", p = 0.5}}, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise FerError(f"{where}.name: missing or not a string; every transform needs "
                       f"name = \"<albumentations class>\" (got {name!r})")
    if name in _RESERVED:
        raise FerError(f"{where}.name: '{name}' is not allowed here: {_RESERVED[name]}")
    cls = TRANSFORMS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(TRANSFORMS), n=1, cutoff=0.6)
        if not close:  # case slips: "clahe", "horizontalflip"
            lower = {n.lower(): n for n in TRANSFORMS}
            close = [lower[name.lower()]] if name.lower() in lower else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FerError(f"{where}.name: unknown albumentations transform '{name}'{hint}")

    params = inspect.signature(cls.__init__).parameters
    accepted = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for arg in spec:
        if arg not in accepted:
            close = difflib.get_close_matches(arg, accepted, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise FerError(f"{where}: unknown argument '{arg}' for {name}{hint}; "
                           f"accepted: {', '.join(accepted) or '(none)'}")

    is_compose = issubclass(cls, A.BaseCompose)
    if is_compose:
        children = spec.pop("transforms", None)
        if not isinstance(children, list) or not children:
            raise FerError(f"{where}.transforms: {name} needs a non-empty list of transform tables")
        built = [_build_generic(c, f"{where}.transforms[{j}]", channels, probe_size) for j, c in enumerate(children)]
        kwargs = {"transforms": built, **{k: _tuples(v) for k, v in spec.items()}}
    else:
        kwargs = {k: _tuples(v) for k, v in spec.items()}
    transform = _construct(cls, kwargs, lambda arg: f"{where}.{arg}", where)
    if not is_compose:
        _probe(cls, kwargs, where, channels, probe_size)
    return transform


def _probe(cls: type, kwargs: dict[str, Any], where: str, channels: int, size: tuple[int, int]) -> None:
    """Run a p=1 copy once on a noise image of the model's channels, so that e.g. a colour-only
    transform on grayscale input fails now, with its recipe path, not in a DataLoader worker."""
    h, w = size
    img = np.random.default_rng(0).integers(0, 256, (h, w, channels), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            t = cls(**{**kwargs, "p": 1.0}) if "p" in inspect.signature(cls.__init__).parameters else cls(**kwargs)
            out = t(image=img)["image"]
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FerError(f"{where}: {cls.__name__} cannot run on {channels}-channel "
                       f"{h}×{w} uint8 images: {msg}") from None
    if out.ndim != 3 or out.shape[2] != channels:
        raise FerError(f"{where}: {cls.__name__} turns {channels}-channel images into {tuple(out.shape)}; "
                       f"the model takes {channels} channel(s) (preprocessing.channels)")


# --------------------------------------------------------------------------------------------
# the factory


def _check_p(**probs: float) -> None:
    for key, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise FerError(f"{SECTION}.{key}: a probability must be in [0, 1] (got {p!r})")


#: a probability, in [0, 1]
_P = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
#: a fraction of the image size or of the intensity range, in [0, 1]
_Frac = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]
#: an HSV shift limit for saturation / value (uint8 units)
_Shift255 = Annotated[int, Field(ge=0, le=255, strict=True)]


def make_albumentations(
    pre: Preprocessing,
    /,
    *,
    preset: Literal["strong", "light", "faces48", "none"] = "strong",
    transforms: list[dict[str, Any]] = (),  # type: ignore[assignment]  # immutable default
    crop_scale: Annotated[float, Field(ge=1, allow_inf_nan=False, strict=True)] = 256 / 224,
    hflip: _P = 0.5,
    vflip: _P = 0.1,
    rotate_limit: Annotated[float, Field(ge=0, le=180, allow_inf_nan=False, strict=True)] = 30.0,  # degrees
    rotate_p: _P = 0.5,
    shift: _Frac = 0.1,
    scale: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False, strict=True)] = 0.1,  # zoom 1 ± scale: stays > 0
    affine_p: _P = 0.5,
    border: Literal["reflect", "constant", "replicate"] = "reflect",
    color_p: _P = 0.5,
    brightness: _Frac = 0.2,
    contrast: _Frac = 0.2,
    hue: Annotated[int, Field(ge=0, le=180, strict=True)] = 20,
    saturation: _Shift255 = 30,
    value: _Shift255 = 20,
    noise_p: _P = 0.3,
    noise_std: tuple[_Frac, _Frac] = (0.0124, 0.0277),
    blur_limit: Annotated[int, Field(ge=3, strict=True)] = 7,  # and odd: checked below
    distort_p: _P = 0.2,
    elastic_alpha: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = 1.0,
    elastic_sigma: Annotated[float, Field(ge=1, allow_inf_nan=False, strict=True)] = 50.0,  # albumentations' bound
    grid_distort: _Frac = 0.3,
    dropout_holes: Annotated[int, Field(ge=1, strict=True)] = 8,
    dropout_size: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] = 32 / 224,
    dropout_p: _P = 0.3,
    crop_min: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] = 0.8,
    erase_p: _P = 0.5,
    erase_max: Annotated[float, Field(gt=0.02, lt=1, allow_inf_nan=False, strict=True)] = 0.25,
) -> AlbumentationsPipeline:
    """Training augmentation with albumentations 2.x.

    ``preset = "strong"`` is the accuracy plan's §1.1 pipeline, scaled to ``pre.input_size``
    (h, w): Resize(round(crop_scale·h), round(crop_scale·w)) → RandomCrop(h, w) → HorizontalFlip
    → VerticalFlip → Rotate → Affine (shift/scale) → OneOf[RandomBrightnessContrast,
    HueSaturationValue] → OneOf[GaussNoise, GaussianBlur, MotionBlur] → OneOf[ElasticTransform,
    GridDistortion] → CoarseDropout. Its defaults are the plan's (the 1.x defaults it relied on,
    written with 2.x arguments). VerticalFlip (``vflip`` = 0.1) is kept because the plan asks for
    it, but upside-down faces never occur at test time: consider ``vflip = 0``.

    ``preset = "light"``: Resize(h, w) → HorizontalFlip → Affine(±rotate_limit/3 degrees,
    ±shift/2, 1±scale/2; p = affine_p) → RandomBrightnessContrast (p = color_p).
    ``preset = "faces48"``, made for small grey face crops such as FER2013's 48×48 (the recipe of
    the best published FER2013 networks: crop/scale jitter, flip, small rotation, random erasing):
    Resize(h, w) → RandomResizedCrop(h, w; area crop_min–1, aspect 0.9–1.1) → HorizontalFlip →
    Affine(±rotate_limit/3 degrees, ±shift; p = affine_p) → RandomBrightnessContrast (p = color_p)
    → Erasing (random erasing, Zhong et al. 2020: one rectangle of 2 %–erase_max of the area
    filled with noise; p = erase_p). No colour jitter beyond brightness/contrast, no blur or
    elastic distortion: at 48 px they destroy the few pixels an expression has.
    ``preset = "none"``: Resize(h, w) only.

    Then ``transforms`` (any albumentations transforms, ``{name = ..., <args>}``, OneOf/SomeOf
    nest with their own ``transforms``), then Normalize(pre.mean, pre.std) and ToTensorV2.

    Grayscale (``pre.channels == 1``): HueSaturationValue is left out of the colour OneOf
    (hue and saturation do not exist for one channel); brightness/contrast stay.
    """
    import albumentations as A
    import cv2

    h, w = pre.input_size
    channels = pre.channels
    _check_p(hflip=hflip, vflip=vflip, rotate_p=rotate_p, affine_p=affine_p, color_p=color_p,
             noise_p=noise_p, distort_p=distort_p, dropout_p=dropout_p)
    if crop_scale < 1.0:
        raise FerError(f"{SECTION}.crop_scale: must be >= 1 (the image is resized to crop_scale × "
                       f"the input size, then randomly cropped to it) (got {crop_scale!r})")
    if blur_limit < 3 or blur_limit % 2 == 0:
        raise FerError(f"{SECTION}.blur_limit: the largest blur kernel must be odd and >= 3 (got {blur_limit!r})")
    bm = getattr(cv2, _BORDERS[border])

    steps: list[Any] = []
    if preset == "strong":
        rh, rw = max(h, round(h * crop_scale)), max(w, round(w * crop_scale))
        steps += [
            _preset(A.Resize, {"height": "crop_scale", "width": "crop_scale"}, height=rh, width=rw),
            _preset(A.RandomCrop, {}, height=h, width=w),
            _preset(A.HorizontalFlip, {"p": "hflip"}, p=hflip),
            _preset(A.VerticalFlip, {"p": "vflip"}, p=vflip),
            _preset(A.Rotate, {"limit": "rotate_limit", "p": "rotate_p", "border_mode": "border"},
                    limit=rotate_limit, border_mode=bm, p=rotate_p),
            _preset(A.Affine, {"translate_percent": "shift", "scale": "scale", "p": "affine_p",
                               "border_mode": "border"},
                    translate_percent=(-shift, shift), scale=(1 - scale, 1 + scale), rotate=0,
                    border_mode=bm, p=affine_p),
        ]
        colour = [_preset(A.RandomBrightnessContrast, {"brightness_limit": "brightness", "contrast_limit": "contrast"},
                          brightness_limit=brightness, contrast_limit=contrast, p=1.0)]
        if channels == 3:
            colour.append(_preset(A.HueSaturationValue, {"hue_shift_limit": "hue", "sat_shift_limit": "saturation",
                                                         "val_shift_limit": "value"},
                                  hue_shift_limit=hue, sat_shift_limit=saturation, val_shift_limit=value, p=1.0))
        blur_keys = {"blur_limit": "blur_limit"}
        steps += [
            _preset(A.OneOf, {"p": "color_p"}, transforms=colour, p=color_p),
            _preset(A.OneOf, {"p": "noise_p"}, transforms=[
                _preset(A.GaussNoise, {"std_range": "noise_std"}, std_range=tuple(noise_std), p=1.0),
                _preset(A.GaussianBlur, blur_keys, blur_limit=(3, blur_limit), p=1.0),
                _preset(A.MotionBlur, blur_keys, blur_limit=(3, blur_limit), p=1.0),
            ], p=noise_p),
            _preset(A.OneOf, {"p": "distort_p"}, transforms=[
                _preset(A.ElasticTransform, {"alpha": "elastic_alpha", "sigma": "elastic_sigma",
                                             "border_mode": "border"},
                        alpha=elastic_alpha, sigma=elastic_sigma, border_mode=bm, p=1.0),
                _preset(A.GridDistortion, {"distort_limit": "grid_distort", "border_mode": "border"},
                        distort_limit=grid_distort, border_mode=bm, p=1.0),
            ], p=distort_p),
            _preset(A.CoarseDropout, {"num_holes_range": "dropout_holes", "hole_height_range": "dropout_size",
                                      "hole_width_range": "dropout_size", "p": "dropout_p"},
                    num_holes_range=(dropout_holes, dropout_holes),
                    hole_height_range=(dropout_size, dropout_size),
                    hole_width_range=(dropout_size, dropout_size), fill=0, p=dropout_p),
        ]
    elif preset == "light":
        steps += [
            _preset(A.Resize, {}, height=h, width=w),
            _preset(A.HorizontalFlip, {"p": "hflip"}, p=hflip),
            _preset(A.Affine, {"translate_percent": "shift", "scale": "scale", "rotate": "rotate_limit",
                               "p": "affine_p", "border_mode": "border"},
                    translate_percent=(-shift / 2, shift / 2), scale=(1 - scale / 2, 1 + scale / 2),
                    rotate=(-rotate_limit / 3, rotate_limit / 3), border_mode=bm, p=affine_p),
            _preset(A.RandomBrightnessContrast, {"brightness_limit": "brightness", "contrast_limit": "contrast",
                                                 "p": "color_p"},
                    brightness_limit=brightness, contrast_limit=contrast, p=color_p),
        ]
    elif preset == "faces48":
        steps += [
            _preset(A.Resize, {}, height=h, width=w),
            _preset(A.RandomResizedCrop, {"scale": "crop_min"}, size=(h, w), scale=(crop_min, 1.0), ratio=(0.9, 1.1),
                    p=1.0),
            _preset(A.HorizontalFlip, {"p": "hflip"}, p=hflip),
            _preset(A.Affine, {"translate_percent": "shift", "rotate": "rotate_limit", "p": "affine_p",
                               "border_mode": "border"},
                    translate_percent=(-shift, shift), rotate=(-rotate_limit / 3, rotate_limit / 3),
                    border_mode=bm, p=affine_p),
            _preset(A.RandomBrightnessContrast, {"brightness_limit": "brightness", "contrast_limit": "contrast",
                                                 "p": "color_p"},
                    brightness_limit=brightness, contrast_limit=contrast, p=color_p),
            _preset(A.Erasing, {"scale": "erase_max", "p": "erase_p"}, scale=(0.02, erase_max), ratio=(0.3, 3.3),
                    fill="random", p=erase_p),
        ]
    else:  # "none"
        steps.append(_preset(A.Resize, {}, height=h, width=w))

    if not isinstance(transforms, (list, tuple)):
        raise FerError(f"{SECTION}.transforms: expected a list of transform tables (got {transforms!r})")
    extra = [_build_generic(t, f"{SECTION}.transforms[{i}]", channels, (h, w)) for i, t in enumerate(transforms)]
    if extra:
        # a user transform may change the size (crops, RandomScale…): the model needs (h, w);
        # a same-size Resize is a plain copy
        extra.append(_preset(A.Resize, {}, height=h, width=w))
    steps += extra
    steps += [
        _preset(A.Normalize, {}, mean=tuple(pre.mean), std=tuple(pre.std), max_pixel_value=255.0),
        _preset(A.ToTensorV2, {}),
    ]
    compose = _construct(A.Compose, {"transforms": steps, "seed": 0},
                         lambda arg: f"{SECTION} (Compose.{arg})", SECTION)
    return AlbumentationsPipeline(compose, pre)


@hookimpl
def register_augmenters(register):
    register("albumentations", make_albumentations)
