"""bench/latency.py caches each model's ONNX export in bench/out; the cache must follow the weights,
not the model's name: `default` names whatever is shipped now, and a swapped default was once timed
(and scored) through the previous model's ONNX file. Nothing here exports or times anything."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("latency_bench", REPO / "bench" / "latency.py")
latency = importlib.util.module_from_spec(spec)
sys.modules["latency_bench"] = latency
spec.loader.exec_module(latency)


def test_the_export_cache_key_changes_with_the_weights_and_only_with_them(tmp_path):
    shipped = REPO / "plugins" / "fer_plugins" / "models" / "default"
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    assert latency.weights_fingerprint(str(copy)) == latency.weights_fingerprint("default")
    (copy / "confusion_matrix.png").write_bytes(b"not weights")  # a figure is not what is exported
    assert latency.weights_fingerprint(str(copy)) == latency.weights_fingerprint("default")
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert latency.weights_fingerprint(str(copy)) != latency.weights_fingerprint("default")
