"""The `albumentations` augmenter: the plan's strong preset, overrides, the generic form, seeds."""

from __future__ import annotations

import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from fer_core.data import eval_transform
from fer_core.errors import FerError
from fer_core.interfaces import Preprocessing
from fer_plugins.augment_albumentations import make_albumentations

GRAY = Preprocessing(input_size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
RGB = Preprocessing(input_size=(112, 112), channels=3)
ZERO = dict(hflip=0.0, vflip=0.0, rotate_p=0.0, affine_p=0.0, color_p=0.0, noise_p=0.0, distort_p=0.0, dropout_p=0.0)


def _img(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _flat(transforms):
    """Every transform of a Compose, nested OneOf members included."""
    for t in transforms:
        yield t
        if isinstance(t, A.BaseCompose):
            yield from _flat(t.transforms)


def _of(aug, cls):
    found = [t for t in _flat(aug.compose.transforms) if type(t) is cls]
    assert len(found) == 1, f"{cls.__name__}: {found}"
    return found[0]


def _build(pre=RGB, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make_albumentations(pre, **kw)


@pytest.mark.parametrize("pre", [
    GRAY,
    Preprocessing(input_size=(112, 112), channels=1, mean=(0.5,), std=(0.5,)),
    Preprocessing(input_size=(32, 48), channels=3),
    RGB,
    Preprocessing(input_size=(224, 224), channels=3),
], ids=lambda p: f"{p.channels}x{p.input_size[0]}x{p.input_size[1]}")
def test_strong_any_size_and_channels(pre):
    aug = _build(pre)
    torch.manual_seed(0)
    for shape in [(48, 48, 1), (100, 100, 3), (48, 48)]:
        for s in range(3):
            out = aug(_img(shape, s))
            assert tuple(out.shape) == (pre.channels, *pre.input_size)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()


def test_big_input_to_small_model():
    aug = _build(Preprocessing(input_size=(64, 64), channels=3))
    assert tuple(aug(_img((480, 640, 3))).shape) == (3, 64, 64)


def test_strong_is_the_plans_pipeline():
    aug = _build(RGB)
    kinds = [type(t) for t in aug.compose.transforms]
    assert kinds == [A.Resize, A.RandomCrop, A.HorizontalFlip, A.VerticalFlip, A.Rotate, A.Affine,
                     A.OneOf, A.OneOf, A.OneOf, A.CoarseDropout, A.Normalize, A.ToTensorV2]
    resize, crop = aug.compose.transforms[:2]
    assert (resize.height, resize.width) == (128, 128)  # 112 · 256/224
    assert (crop.height, crop.width) == (112, 112)
    colour, noise, distort = aug.compose.transforms[6:9]
    assert [type(t) for t in colour.transforms] == [A.RandomBrightnessContrast, A.HueSaturationValue]
    assert [type(t) for t in noise.transforms] == [A.GaussNoise, A.GaussianBlur, A.MotionBlur]
    assert [type(t) for t in distort.transforms] == [A.ElasticTransform, A.GridDistortion]
    assert [colour.p, noise.p, distort.p] == [0.5, 0.3, 0.2]
    assert _of(aug, A.HorizontalFlip).p == 0.5
    assert _of(aug, A.VerticalFlip).p == 0.1
    rot = _of(aug, A.Rotate)
    assert rot.p == 0.5 and tuple(rot.limit) == (-30, 30)
    aff = _of(aug, A.Affine)
    assert aff.p == 0.5
    assert aff.scale == {"x": pytest.approx((0.9, 1.1)), "y": pytest.approx((0.9, 1.1))}
    assert aff.translate_percent == {"x": pytest.approx((-0.1, 0.1)), "y": pytest.approx((-0.1, 0.1))}
    assert tuple(aff.rotate) == (0, 0)
    drop = _of(aug, A.CoarseDropout)
    assert drop.p == 0.3 and tuple(drop.num_holes_range) == (8, 8)
    assert tuple(drop.hole_height_range) == pytest.approx((32 / 224, 32 / 224))
    # holes scale with the input size: 32 px at 224, 16 px at 112
    assert round(drop.hole_width_range[0] * 112) == 16
    norm = _of(aug, A.Normalize)
    assert tuple(norm.mean) == pytest.approx(RGB.mean) and tuple(norm.std) == pytest.approx(RGB.std)


def test_grayscale_drops_hue_saturation_only():
    aug = _build(GRAY)
    colour = aug.compose.transforms[6]
    assert [type(t) for t in colour.transforms] == [A.RandomBrightnessContrast]
    assert not any(isinstance(t, A.HueSaturationValue) for t in _flat(aug.compose.transforms))


def test_overrides_reach_the_transforms():
    aug = _build(RGB, hflip=0.0, vflip=0.0, rotate_limit=10, dropout_holes=4, dropout_size=0.25,
                 noise_p=0.7, blur_limit=5, brightness=0.4, hue=5)
    assert _of(aug, A.HorizontalFlip).p == 0
    assert _of(aug, A.VerticalFlip).p == 0
    assert tuple(_of(aug, A.Rotate).limit) == (-10, 10)
    drop = _of(aug, A.CoarseDropout)
    assert tuple(drop.num_holes_range) == (4, 4) and tuple(drop.hole_height_range) == (0.25, 0.25)
    assert aug.compose.transforms[7].p == 0.7
    assert tuple(_of(aug, A.MotionBlur).blur_limit) == (3, 5)
    assert tuple(_of(aug, A.RandomBrightnessContrast).brightness_limit) == pytest.approx((-0.4, 0.4))
    assert tuple(_of(aug, A.HueSaturationValue).hue_shift_limit) == (-5, 5)


def test_light_and_none_presets():
    light = _build(RGB, preset="light")
    assert [type(t) for t in light.compose.transforms] == [
        A.Resize, A.HorizontalFlip, A.Affine, A.RandomBrightnessContrast, A.Normalize, A.ToTensorV2]
    none = _build(RGB, preset="none")
    assert [type(t) for t in none.compose.transforms] == [A.Resize, A.Normalize, A.ToTensorV2]


def test_faces48_preset_for_small_grey_faces():
    """Crop/scale jitter, flip, small rotation, brightness/contrast and random erasing; nothing
    that blurs or distorts a 48-px face; the keys reach the transforms."""
    aug = _build(GRAY, preset="faces48", crop_min=0.7, erase_p=0.25, erase_max=0.3, rotate_limit=15)
    assert [type(t) for t in aug.compose.transforms] == [
        A.Resize, A.RandomResizedCrop, A.HorizontalFlip, A.Affine, A.RandomBrightnessContrast, A.Erasing,
        A.Normalize, A.ToTensorV2]
    assert tuple(_of(aug, A.RandomResizedCrop).scale) == (0.7, 1.0)
    erase = _of(aug, A.Erasing)
    assert erase.p == 0.25 and tuple(erase.scale) == (0.02, 0.3)
    assert tuple(_of(aug, A.Affine).rotate) == pytest.approx((-5, 5))
    out = aug(_img((48, 48, 1)))
    assert out.shape == (1, GRAY.input_size[0], GRAY.input_size[1]) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["strong", "light", "faces48", "none"])
@pytest.mark.parametrize("pre", [GRAY, RGB], ids=["gray", "rgb"])
def test_building_emits_no_warning(pre, preset):
    """Regression: 1.x argument names are silently dropped by 2.x with only a UserWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug = make_albumentations(pre, preset=preset, transforms=[{"name": "CLAHE", "p": 0.5}])
        aug(_img((40, 40, pre.channels)))
    assert all(not getattr(t, "invalid_args", None) for t in _flat(aug.compose.transforms))


def test_none_preset_equals_eval_transform():
    """Equal without a resize; with one, within one grey level: training resizes with cv2
    (uint8 fixed point), the core's eval transform with torch (then rounds to grey levels)."""
    aug = _build(RGB, preset="none")
    ev = eval_transform(RGB)
    grey_level = 1 / 255 / min(RGB.std) + 1e-6
    for shape, atol in [((112, 112, 3), 1e-6), ((100, 100, 3), grey_level)]:
        img = _img(shape)
        diff = (aug(img) - ev(img)).abs()
        assert diff.max() <= atol
        assert (diff > 1e-6).float().mean() < 0.2  # and most pixels exactly


def test_strong_with_zero_probabilities_is_deterministic_eval():
    """With every probability 0 only resize + random crop remain: with crop_scale = 1 on an image
    already at the input size that is the eval path exactly; with the default 256/224 the crop
    is a random window of the upscaled image, so it is not (and must not silently be) eval."""
    img = _img((112, 112, 3))
    ev = eval_transform(RGB)(img)
    same = _build(RGB, crop_scale=1.0, **ZERO)
    assert torch.allclose(same(img), ev, atol=1e-6, rtol=0)
    gray = _build(GRAY, crop_scale=1.0, **ZERO)
    g = _img((32, 32, 1))
    assert torch.allclose(gray(g), eval_transform(GRAY)(g), atol=1e-6, rtol=0)
    cropped = _build(RGB, **ZERO)
    assert cropped(img).shape == ev.shape
    assert not torch.allclose(cropped(img), ev, atol=1e-3)


def test_generic_transforms_run_after_preset_before_normalize():
    aug = _build(RGB, preset="none", transforms=[
        {"name": "CLAHE", "p": 0.5, "clip_limit": [1, 4]},
        {"name": "Affine", "rotate": [-10, 10], "p": 1.0},
        {"name": "OneOf", "p": 0.3, "transforms": [
            {"name": "GaussianBlur", "blur_limit": [3, 5]},
            {"name": "SomeOf", "n": 1, "transforms": [{"name": "ToGray", "p": 1.0}, {"name": "Sharpen"}]},
        ]},
        {"name": "RandomCrop", "height": 80, "width": 80},  # changes the size: resized back
    ])
    kinds = [type(t) for t in aug.compose.transforms]
    assert kinds == [A.Resize, A.CLAHE, A.Affine, A.OneOf, A.RandomCrop, A.Resize, A.Normalize, A.ToTensorV2]
    assert tuple(aug.compose.transforms[1].clip_limit) == (1, 4)
    nested = aug.compose.transforms[3]
    assert nested.p == 0.3 and [type(t) for t in nested.transforms] == [A.GaussianBlur, A.SomeOf]
    assert [type(t) for t in nested.transforms[1].transforms] == [A.ToGray, A.Sharpen]
    for s in range(4):
        assert tuple(aug(_img((100, 100, 3), s)).shape) == (3, 112, 112)
    strong = _build(GRAY, transforms=[{"name": "CLAHE"}])
    kinds = [type(t) for t in strong.compose.transforms]
    assert kinds.index(A.CLAHE) == kinds.index(A.CoarseDropout) + 1
    assert kinds[-3:] == [A.Resize, A.Normalize, A.ToTensorV2]
    assert tuple(strong(_img((48, 48, 1))).shape) == (1, 32, 32)


@pytest.mark.parametrize(("transforms", "message"), [
    ([{"name": "CLAHE"}, {"name": "HorizontalFlipp"}],
     "augment.transforms[1].name: unknown albumentations transform 'HorizontalFlipp' (did you mean 'HorizontalFlip'?)"),
    ([{"name": "CoarseDropout", "max_holes": 8}], "augment.transforms[0]: unknown argument 'max_holes' for CoarseDropout"),
    ([{"name": "GaussNoise", "var_limit": [10, 50]}], "augment.transforms[0]: unknown argument 'var_limit' for GaussNoise"),
    ([{"name": "Rotate", "limit": "x"}], "augment.transforms[0].limit: "),
    ([{"name": "CLAHE", "p": 2}], "augment.transforms[0].p: Input should be less than or equal to 1"),
    ([{"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "Blurr", "p": 1}]}],
     "augment.transforms[0].transforms[1].name: unknown albumentations transform 'Blurr' (did you mean 'Blur'?)"),
    ([{"name": "OneOf", "transforms": [{"name": "GaussianBlur", "sigma": 1}]}],
     "augment.transforms[0].transforms[0]: unknown argument 'sigma' for GaussianBlur (did you mean 'sigma_limit'?)"),
    ([{"name": "OneOf"}], "augment.transforms[0].transforms: OneOf needs a non-empty list"),
    ([{"p": 0.5}], "augment.transforms[0].name: missing"),
    ([{"name": "Normalize"}], "augment.transforms[0].name: 'Normalize' is not allowed here"),
])
def test_generic_errors(transforms, message):
    with pytest.raises(FerError) as e:
        _build(RGB, transforms=transforms)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_colour_transform_on_grayscale_fails_at_build():
    with pytest.raises(FerError, match=r"augment\.transforms\[0\]: HueSaturationValue cannot run on 1-channel"):
        _build(GRAY, transforms=[{"name": "HueSaturationValue"}])
    with pytest.raises(FerError, match=r"augment\.transforms\[0\]: ToRGB turns 1-channel images into"):
        _build(GRAY, transforms=[{"name": "ToRGB"}])


def test_invalid_override_names_the_key():
    with pytest.raises(FerError, match=r"^augment\.hflip: a probability"):
        _build(RGB, hflip=1.5)
    with pytest.raises(FerError, match=r"^augment\.blur_limit"):
        _build(RGB, blur_limit=4)
    with pytest.raises(FerError, match=r"^augment\.dropout_holes"):
        _build(RGB, dropout_holes=0)
    with pytest.raises(FerError, match=r"^augment\.crop_scale"):
        _build(RGB, crop_scale=0.5)


def _stream(aug, seed, n=6):
    aug.set_seed(seed)
    return [aug(_img((48, 48, 3), i)) for i in range(n)]


@pytest.mark.parametrize("pre", [GRAY, Preprocessing(input_size=(48, 48), channels=3)], ids=["gray", "rgb"])
def test_seed_makes_the_stream_reproducible(pre):
    aug = _build(pre, transforms=[{"name": "OneOf", "p": 0.5, "transforms": [{"name": "CLAHE"}, {"name": "Sharpen"}]}])
    a = _stream(aug, 7)
    np.random.seed(123)  # global state must not matter
    torch.manual_seed(123)
    b = _stream(aug, 7)
    other = _build(pre, transforms=[{"name": "OneOf", "p": 0.5, "transforms": [{"name": "CLAHE"}, {"name": "Sharpen"}]}])
    c = _stream(other, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    d = _stream(aug, 8)
    assert not all(torch.equal(x, y) for x, y in zip(a, d))


def test_registry_validates_the_keys():
    from fer_core.registry import Registry

    comp = Registry().get("augmenter", "albumentations", "augment")
    with pytest.raises(FerError, match=r"augment\.hflip"):
        comp.validate({"hflip": "x"}, "augment")
    with pytest.raises(FerError, match=r"augment\.hflipp: unknown key .*did you mean 'hflip'"):
        comp.validate({"hflipp": 0.5}, "augment")
    ok = comp.validate({"preset": "light", "noise_std": [0.01, 0.02],
                        "transforms": [{"name": "CLAHE", "p": 0.5}]}, "augment")
    assert ok["preset"] == "light" and tuple(ok["noise_std"]) == (0.01, 0.02)
    assert ok["hflip"] == 0.5 and ok["dropout_size"] == pytest.approx(32 / 224)
    aug = comp.factory(RGB, **ok)
    assert tuple(aug(_img((100, 100, 3))).shape) == (3, 112, 112)


def test_albumentations_1x_arguments_fail_the_test_suite():
    """The pytest config turns albumentations' 'argument not valid' warning into an error, so a
    1.x argument anywhere in fer cannot silently run with defaults."""
    import albumentations as A

    with pytest.raises(UserWarning, match="are not valid for transform CoarseDropout"):
        A.CoarseDropout(max_holes=8, max_height=32, max_width=32, p=0.3)
