from __future__ import annotations


import pytest
import timm
import torch

from conftest import SHARED_DATA
from fer_core.errors import FerError
from fer_core.registry import get_registry

WEIGHTS = SHARED_DATA.parent / "weights" / "mobilenet_v2-b0353104.pth"
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/weights not present")


def build(spec):
    return get_registry().build("backbone", spec, "model.backbone")


def test_timm_backbone_features_and_preprocessing():
    bb = build({"plugin": "timm", "name": "resnet10t", "in_chans": 1, "input_size": 40})
    assert bb.preprocessing.input_size == (40, 40) and bb.preprocessing.channels == 1
    assert len(bb.preprocessing.mean) == 1
    feats = bb(torch.randn(2, 1, 40, 40))
    assert feats.shape == (2, bb.feature_dim)
    bb.set_grad_checkpointing(True)  # timm supports it; must not raise
    vit = build({"plugin": "timm", "name": "vit_tiny_patch16_224", "input_size": 32})
    assert vit.prefers_channels_last is False
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, vit.feature_dim)  # built for 32×32
    mnv3 = build({"plugin": "timm", "name": "mobilenetv3_small_050", "input_size": 32})
    assert mnv3(torch.randn(2, 3, 32, 32)).shape == (2, mnv3.feature_dim)  # head_hidden_size, not num_features


def test_timm_local_weights_file_loads(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path / "resnet10t.pth"
    torch.save(src.state_dict(), path)
    bb = build({"plugin": "timm", "name": "resnet10t", "pretrained": str(path)})
    for k, v in src.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k


@needs_weights
def test_torchvision_loads_the_shared_mobilenetv2_file_strictly():
    bb = build({"plugin": "torchvision", "name": "mobilenet_v2", "pretrained": str(WEIGHTS), "input_size": 64})
    state = torch.load(WEIGHTS, weights_only=True)
    got = bb.model.state_dict()
    loaded = [k for k in state if not k.startswith("classifier")]
    assert loaded and all(torch.equal(got[k], state[k]) for k in loaded)
    assert bb.feature_dim == 1280 and bb(torch.randn(2, 3, 64, 64)).shape == (2, 1280)


@needs_weights
def test_timm_refuses_a_file_whose_keys_do_not_match():
    # torchvision's layout silently loads nothing into timm's mobilenetv2_100: that must be an error
    with pytest.raises(FerError, match=r"set only 0% of timm 'mobilenetv2_100' weights"):
        build({"plugin": "timm", "name": "mobilenetv2_100", "pretrained": str(WEIGHTS)})


def test_unknown_models_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FerError, match="unknown timm model 'resnet5000'"):
        build({"plugin": "timm", "name": "resnet5000"})
    with pytest.raises(FerError, match="unknown torchvision model 'mobilenet_v9'"):
        build({"plugin": "torchvision", "name": "mobilenet_v9"})
    with pytest.raises(FerError, match="weights file .* not found"):
        build({"plugin": "timm", "name": "resnet10t", "pretrained": str(tmp_path / "none.pth")})
