"""ONNX export: the `onnx` exporter, the `fer export` command, and the `onnx` artifact (an
exported ``.onnx`` file loads as a Predictor backed by onnxruntime: `fer eval model.onnx`,
ensembles, teachers, `fer predict`).

The file is self-describing: its ``metadata_props`` hold the classes, AU names, the run's
preprocessing, the fitted calibrator, the training recipe and the export's own checks (see
docs/export.md). The graph has one input ``image`` (N×C×H×W float32, normalised as the
preprocessing says, N dynamic) and one output per head of *raw* logits (``emotion``, then
``au`` when the model has an AU head, then any head a loss added): calibration is applied by the
reader from the metadata, so an int8 file and its fp32 source share one calibrator and the
graph stays a plain classifier for any ONNX consumer.

Before a file is written, its outputs are compared with the torch model's on real validation
faces of the run's dataset; above the tolerance (default 1e-3 on the logits) nothing is written
and the command exits 2. ``--int8`` quantises statically (QDQ, per-channel int8 weights, int8
activations calibrated on train images) and prints the validation accuracy of fp32 and int8.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import tomllib
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import numpy as np
import torch
import typer
from pydantic import Field

from fer_core.api import (Calibrator, FerError, Overrides, Predictor, Preprocessing, RunArgument, Sample,
                          TestTimeAugmentation, adapt_images, apply_overrides, classification_metrics, dump_toml,
                          eval_loader, get_registry, hookimpl, load_predictor, predict, resolve_precision, resolved,
                          softmax, split_samples, stdout, validate)

#: bump when the meaning of a metadata key changes; readers refuse newer files
FORMAT_VERSION = 1
PREFIX = "fer."
INPUT_NAME = "image"
SUFFIX = ".onnx"
DEFAULT_OPSET = 20  # torch 2.5+'s default for the dynamo exporter; ORT ≥ 1.17 runs it
DEFAULT_TOLERANCE = 1e-3

_FP32 = resolve_precision("fp32", torch.device("cpu"))


def _v(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        return "?"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------ the artifact (reading)


class _Session(torch.nn.Module):
    """An onnxruntime session as a module ``images → {task: logits}``, so that the kernel's
    ``predict`` loop (labels, AU masks, ordering) serves it unchanged. With TTA, the views'
    outputs are combined as the torch path combines them (mean probability, or mean logit)."""

    def __init__(self, session: Any, outputs: Sequence[str], tta: TestTimeAugmentation | None = None) -> None:
        super().__init__()
        self.session, self.outputs, self.tta = session, list(outputs), tta

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        got = self.session.run(self.outputs, {INPUT_NAME: x})
        return {name: torch.from_numpy(np.asarray(v, dtype=np.float32)) for name, v in zip(self.outputs, got)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tta is None:
            return self.run(images)
        outs = [self.run(v) for v in self.tta(images)]
        combined = {}
        for k in outs[0]:
            stack = torch.stack([o[k] for o in outs])
            if self.tta.combine == "logits":
                combined[k] = stack.mean(0)
            elif k == "emotion":
                combined[k] = torch.logsumexp(torch.log_softmax(stack, -1), 0) - float(np.log(len(outs)))
            else:
                p = torch.sigmoid(stack).mean(0).clamp(1e-7, 1 - 1e-7)
                combined[k] = torch.log(p) - torch.log1p(-p)
        return combined


def _json_meta(meta: dict[str, str], key: str, path: Path, default: Any = ...) -> Any:
    if PREFIX + key not in meta:
        if default is not ...:
            return default
        raise FerError(f"{path}: metadata '{PREFIX}{key}' is missing; re-export it with `fer export`")
    try:
        return json.loads(meta[PREFIX + key])
    except ValueError as e:
        raise FerError(f"{path}: metadata '{PREFIX}{key}' is not valid JSON ({e}); re-export it with `fer export`") \
            from None


class OnnxPredictor:
    """An ONNX file written by `fer export`, run by onnxruntime, as a Predictor: the same
    classes, AU names, preprocessing and calibration as the run it came from."""

    def __init__(self, path: Path, overrides: Sequence[str] = (), device: str | None = None) -> None:
        import onnxruntime as ort

        self.path, self.name = Path(path), Path(path).stem
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # the process's thread budget, as for torch
        opts.log_severity_level = 3
        cpu = ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.path), opts, providers=cpu)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for every unreadable file
            raise FerError(f"{self.path}: not a readable ONNX model ({_first_line(e)})") from None
        meta = dict(session.get_modelmeta().custom_metadata_map)
        if PREFIX + "format" not in meta:
            raise FerError(f"{self.path}: an ONNX model without fer metadata (not written by `fer export`); "
                           "fer needs its classes, preprocessing and calibration")
        fmt = _json_meta(meta, "format", self.path)
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise FerError(f"{self.path}: fer metadata format {fmt} is newer than this fer reads ({FORMAT_VERSION}); "
                           "upgrade fer")
        self.meta = meta
        self.classes = list(_json_meta(meta, "classes", self.path))
        self.au_names = list(_json_meta(meta, "au_names", self.path, []))
        self.outputs = list(_json_meta(meta, "outputs", self.path))
        try:
            self.preprocessing = Preprocessing.from_dict(_json_meta(meta, "preprocessing", self.path))
        except (KeyError, TypeError, ValueError) as e:
            raise FerError(f"{self.path}: metadata '{PREFIX}preprocessing' is unreadable ({_first_line(e)})") from None
        graph_outputs = [o.name for o in session.get_outputs()]
        if [i.name for i in session.get_inputs()] != [INPUT_NAME] or not set(self.outputs) <= set(graph_outputs) \
                or "emotion" not in self.outputs:
            raise FerError(f"{self.path}: the graph's inputs/outputs ({[i.name for i in session.get_inputs()]} → "
                           f"{graph_outputs}) are not those its fer metadata declares; re-export it")
        self.source = _json_meta(meta, "source", self.path, {})
        self.quantization = _json_meta(meta, "quantization", self.path, {"method": "none"})
        self.parity = _json_meta(meta, "parity", self.path, {})
        recipe_text = meta.get(PREFIX + "recipe")
        if recipe_text is None:
            raise FerError(f"{self.path}: metadata '{PREFIX}recipe' is missing; re-export it with `fer export`")
        try:
            raw = tomllib.loads(recipe_text)
        except tomllib.TOMLDecodeError as e:
            raise FerError(f"{self.path}: metadata '{PREFIX}recipe' is not valid TOML ({e})") from None
        self.recipe = validate(apply_overrides(raw, list(overrides)), f"{self.path} ({PREFIX}recipe)")
        self.registry = get_registry(self.recipe.plugins.disable)
        self.calibration: dict[str, Any] = _json_meta(meta, "calibration", self.path)
        try:
            self.calibrator: Calibrator = self.registry.build(
                "calibrator", {"plugin": self.calibration["plugin"], **self.calibration.get("params", {})},
                "calibration")
            if self.calibration.get("state") is not None:
                self.calibrator.load_state(self.calibration["state"])
        except FerError as e:
            raise FerError(f"{self.path} ({PREFIX}calibration): {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise FerError(f"{self.path}: metadata '{PREFIX}calibration' is unreadable ({_first_line(e)})") from None
        # GPU through onnxruntime's CUDA provider when it is installed and the device allows it
        want = (device or self.recipe.train.device or "cpu").lower()
        if want != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            session = ort.InferenceSession(str(self.path), opts, providers=["CUDAExecutionProvider", *cpu])
        elif want.startswith("cuda") and device is not None:
            raise FerError(f"--device {device}: onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
        self.session = session
        self.providers = session.get_providers()
        self.device = torch.device("cpu")  # where tensors are handed over (onnxruntime copies to the GPU itself)
        self.module = _Session(session, self.outputs)

    def loader(self, samples: Sequence[Sample], batch_size: int | None = None):
        t = self.recipe.train
        return eval_loader(samples, self.preprocessing, len(self.au_names),
                           batch_size or t.eval_batch_size or 2 * t.batch_size, 0, False)

    def predict(self, samples: Sequence[Sample], tta: TestTimeAugmentation | None = None,
                batch_size: int | None = None) -> dict[str, np.ndarray]:
        module = self.module if tta is None else _Session(self.session, self.outputs, tta)
        pred = predict(module, self.loader(samples, batch_size), self.device, _FP32)
        pred["calibrated.emotion"] = self.calibrator(pred["logits.emotion"])
        return pred

    @torch.no_grad()
    def logits(self, images: torch.Tensor, pre: Preprocessing, calibrated: bool = True) -> torch.Tensor:
        """Emotion logits of a batch prepared with preprocessing ``pre`` (adapted to the model's)."""
        x = images.float()
        if pre != self.preprocessing:
            x = adapt_images(x, pre, self.preprocessing)
        raw = self.module(x)["emotion"]
        if not calibrated:
            return raw.to(images.device)
        return torch.as_tensor(self.calibrator(raw.numpy()), dtype=torch.float32, device=images.device)

    def size_mb(self) -> float:
        return self.path.stat().st_size / 2**20

    def describe(self) -> dict[str, Any]:
        return {"kind": "onnx", "path": str(self.path), "calibration": self.calibration["plugin"],
                "quantization": self.quantization.get("method", "none"),
                "runtime": f"onnxruntime {_v('onnxruntime')} ({', '.join(self.providers)})"}


def load_onnx(path: Path, overrides: list[str], device: str | None, /) -> OnnxPredictor | None:
    """A ``.onnx`` file (written by `fer export`)."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX or not path.is_file():
        return None
    return OnnxPredictor(path, overrides, device)


# ------------------------------------------------------------------ the exporter (writing)


class _Outputs(torch.nn.Module):
    """The model with a tuple of outputs in a fixed order (ONNX outputs are positional)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(image)
        return tuple(out[n].float() for n in self.names)


def _spread(samples: Sequence[Sample], n: int) -> list[Sample]:
    """At most ``n`` samples evenly spread over the list (deterministic; every class when the
    list is ordered by class, as readers order it)."""
    if len(samples) <= n:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]


def _check_out(out: Path) -> None:
    """Refuse an --out we cannot write before minutes of export, with one line."""
    if out.suffix.lower() != SUFFIX:
        raise FerError(f"--out: '{out}' must end in {SUFFIX} (that is how fer recognises the file)")
    if out.is_dir():
        raise FerError(f"--out: '{out}' is a directory; give a file name ending in {SUFFIX}")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FerError(f"--out: cannot write '{out}': '{blocker}' is a file, not a directory; choose a writable "
                       "location")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FerError(f"--out: cannot write '{out}' ({e.strerror or e}); choose a writable location") from None


class _TrainImages:
    """onnxruntime's CalibrationDataReader over normalised training images."""

    def __init__(self, loader) -> None:
        self.batches = iter(loader)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch["image"].float().numpy())}


class OnnxExporter:
    """Writes a run's model as an ONNX file (fp32, or int8 with ``int8``); ``report`` then holds
    the parity and, for int8, the accuracy figures the command prints."""

    suffix = SUFFIX

    def __init__(self, opset: int = DEFAULT_OPSET, int8: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                 parity_images: int = 256, calibration_images: int = 256) -> None:
        self.opset, self.int8, self.tolerance = opset, int8, tolerance
        self.parity_images, self.calibration_images = parity_images, calibration_images
        self.report: dict[str, Any] = {}

    def default_out(self, predictor: Predictor) -> Path:
        """Next to the run directory, never inside it: ``runs/a`` → ``runs/a.onnx`` (``.int8.onnx``); a
        shipped model (installed read-only) → ``./<name>.onnx``."""
        shipped = getattr(predictor, "shipped", None)
        p = Path(shipped) if shipped else Path(predictor.path)
        return p.with_name(p.name + (".int8" if self.int8 else "") + SUFFIX)

    # -- steps
    def _metadata(self, pred: Predictor, names: list[str]) -> dict[str, str]:
        cal = dict(getattr(pred, "calibration", None) or {"plugin": "identity", "params": {}, "state": None})
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "classes": list(pred.classes),
            "au_names": list(pred.au_names),
            "outputs": names,
            "preprocessing": pred.preprocessing.to_dict(),
            "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "batch": "dynamic",
                      "pixels": "x / 255 then (x - mean) / std per channel, after a bilinear resize (half-pixel "
                                "centres, no antialiasing) to input_size; grey images replicated to 3 channels "
                                "when channels = 3"},
            "outputs_are": "raw logits per head; probabilities = softmax(calibrator(emotion)), sigmoid(au)",
            "calibration": cal,
            "source": {"run": str(Path(pred.path).resolve()), "name": pred.name, "exported": datetime.now(timezone.utc)
                       .isoformat(timespec="seconds"), "fer": _v("fer-toolkit"), "torch": torch.__version__,
                       "onnx_opset": self.opset},
        }
        if cal.get("plugin") == "temperature" and isinstance(cal.get("state"), dict) \
                and "temperature" in cal["state"]:
            meta["temperature"] = float(cal["state"]["temperature"])
        props = {PREFIX + k: json.dumps(v) for k, v in meta.items()}
        props[PREFIX + "recipe"] = dump_toml(resolved(pred.recipe))
        return props

    def _torch_export(self, model: torch.nn.Module, pre: Preprocessing):
        dummy = torch.zeros(2, pre.channels, *pre.input_size)
        with torch.no_grad():
            names = list(model(dummy))
        if "emotion" not in names:
            raise FerError("the model has no 'emotion' output; nothing to export")
        order = ["emotion", *(["au"] if "au" in names else []), *(n for n in names if n not in ("emotion", "au"))]
        wrapped = _Outputs(model, order).eval()
        log = io.StringIO()
        try:  # the dynamo exporter narrates its steps on stdout and logs fallbacks on stderr
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings_silenced():
                program = torch.onnx.export(wrapped, (dummy,), None, input_names=[INPUT_NAME], output_names=order,
                                            dynamic_shapes=({0: torch.export.Dim("batch")},),
                                            opset_version=self.opset, dynamo=True, optimize=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - any exporter failure is this model's, told in one line
            raise FerError(f"torch.onnx.export (opset {self.opset}) failed: {_first_line(e)} "
                           "(fer --debug export ... for the traceback)") from e
        proto = program.model_proto
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != self.opset:  # torch falls back to its base opset when the version converter fails
            raise FerError(f"--opset {self.opset}: torch.onnx {torch.__version__} could not produce it (it fell back "
                           f"to opset {got}); choose a lower --opset (default {DEFAULT_OPSET})")
        return proto, order

    @staticmethod
    def _write(proto, props: dict[str, str], path: Path) -> None:
        import onnx

        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
        proto.producer_name, proto.producer_version = "fer", _v("fer-toolkit")
        proto.doc_string = "fer facial-expression model: input 'image', raw logits out; see metadata fer.*"
        onnx.save_model(proto, str(path))

    def _parity(self, model: torch.nn.Module, onnx_pred: OnnxPredictor, samples: list[Sample]) -> dict[str, Any]:
        ref = predict(model, onnx_pred.loader(samples), torch.device("cpu"), _FP32)
        got = onnx_pred.predict(samples)
        per = {n: float(np.abs(got[f"logits.{n}"] - ref[f"logits.{n}"]).max()) for n in onnx_pred.outputs}
        scale = max(float(np.abs(ref[f"logits.{n}"]).max()) for n in onnx_pred.outputs)
        return {"max_abs_diff": max(per.values()), "per_output": per, "max_abs_logit": scale,
                "images": len(samples), "tolerance": self.tolerance, "runtime": f"onnxruntime {_v('onnxruntime')}"}

    def _quantize(self, fp32: Path, dst: Path, pred: Predictor, tmp: Path) -> dict[str, Any]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        train_split = pred.recipe.data.train_split
        split, samples = split_samples(pred, train_split)
        picked = _spread(samples, self.calibration_images)
        if not picked:
            raise FerError(f"--int8: the training split '{split}' has no images to calibrate the activations on")
        pre = tmp / "pre.onnx"
        with warnings_silenced():
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # folds BN, fuses; shapes for QDQ
            quantize_static(str(pre), str(dst), _TrainImages(eval_loader(picked, pred.preprocessing,
                                                                        len(pred.au_names), 32, 0, False)),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        return {"method": "static", "format": "QDQ", "weights": "int8, per channel, symmetric",
                "activations": "int8, per tensor, asymmetric, MinMax", "calibration_split": split,
                "calibration_images": len(picked), "runtime": f"onnxruntime {_v('onnxruntime')}"}

    def export(self, predictor: Predictor, out: Path) -> Path:
        out = Path(out)
        torch_model = getattr(predictor, "model", None)
        if not isinstance(torch_model, torch.nn.Module):
            kind = predictor.describe().get("kind", type(predictor).__name__)
            raise FerError(f"{predictor.path}: only run directories can be exported (this is a '{kind}' artifact, "
                           "it has no torch model)")
        _check_out(out)
        model = copy.deepcopy(torch_model).float().cpu().eval()
        pre = predictor.preprocessing
        split, val = split_samples(predictor, None)
        if not val:
            raise FerError(f"the validation split '{split}' has no images for the parity check")
        proto, names = self._torch_export(model, pre)
        props = self._metadata(predictor, names)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
            tmp = Path(td)
            fp32 = tmp / "fp32.onnx"
            self._write(proto, props, fp32)
            fp32_pred = OnnxPredictor(fp32, device="cpu")
            parity = {"split": split, **self._parity(model, fp32_pred, _spread(val, self.parity_images))}
            self.report = {"out": str(out), "outputs": names, "opset": self.opset, "parity": parity,
                           "size_mb_fp32": fp32.stat().st_size / 2**20}
            if not parity["max_abs_diff"] <= self.tolerance:  # NaN fails too
                raise FerError(f"parity check failed: max |Δ logits| torch vs onnxruntime = "
                               f"{parity['max_abs_diff']:.3g} on {parity['images']} '{split}' images, above the "
                               f"tolerance {self.tolerance:g}; nothing written (--tolerance to accept it)")
            props[PREFIX + "parity"] = json.dumps(parity)
            final = fp32
            if not self.int8:
                props[PREFIX + "quantization"] = json.dumps({"method": "none"})
                self._write(proto, props, fp32)
            else:
                import onnx

                int8 = tmp / "int8.onnx"
                quant = self._quantize(fp32, int8, predictor, tmp)
                q_pred = OnnxPredictor(int8, device="cpu")
                a = fp32_pred.predict(val)
                b = q_pred.predict(val)
                labels = a["label"]
                acc = {k: classification_metrics(labels, softmax(p["calibrated.emotion"]),
                                                 predictor.classes)["accuracy"] for k, p in (("fp32", a), ("int8", b))}
                quant.update({"val_split": split, "val_images": len(val), "val_accuracy_fp32": acc["fp32"],
                              "val_accuracy_int8": acc["int8"], "val_accuracy_change": acc["int8"] - acc["fp32"],
                              "top1_agreement": float(np.mean(a["logits.emotion"].argmax(1)
                                                              == b["logits.emotion"].argmax(1))),
                              "max_abs_diff_vs_fp32": float(np.abs(a["logits.emotion"] - b["logits.emotion"]).max()),
                              "size_mb_fp32": self.report["size_mb_fp32"]})
                props[PREFIX + "quantization"] = json.dumps(quant)
                self._write(onnx.load_model(str(int8)), props, int8)
                self.report["quantization"] = quant
                final = int8
            os.replace(final, out)
        self.report["size_mb"] = out.stat().st_size / 2**20
        return out


@contextlib.contextmanager
def warnings_silenced():
    """The exporter and the quantiser warn about things that are not the user's to act on."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def make_onnx(*, opset: Annotated[int, Field(ge=18)] = DEFAULT_OPSET, int8: bool = False,
              tolerance: Annotated[float, Field(gt=0, allow_inf_nan=False)] = DEFAULT_TOLERANCE,
              parity_images: Annotated[int, Field(ge=1)] = 256,
              calibration_images: Annotated[int, Field(ge=1)] = 256) -> OnnxExporter:
    """ONNX through torch.onnx (dynamo, onnxscript): dynamic batch, raw logits per head, classes,
    AU names, preprocessing, calibrator and recipe in the metadata; parity with torch checked on
    validation faces (max |Δ logits| ≤ tolerance); int8: static QDQ calibrated on train images."""
    return OnnxExporter(opset, int8, tolerance, parity_images, calibration_images)


# ------------------------------------------------------------------ hooks


@hookimpl
def register_exporters(register):
    register("onnx", make_onnx)


@hookimpl
def register_artifacts(register):
    register("onnx", load_onnx)


def _print_report(run: Path, report: dict[str, Any]) -> None:
    line = dict(markup=False, highlight=False, soft_wrap=True)
    p = report["parity"]
    stdout.print(f"parity on {p['images']} '{p['split']}' images: max |Δ logits| torch vs onnxruntime = "
                 f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']:g}; largest |logit| {p['max_abs_logit']:.2f})",
                 **line)
    q = report.get("quantization")
    if q:
        stdout.print(f"int8 ({q['method']} {q['format']}, {q['calibration_images']} calibration images from "
                     f"'{q['calibration_split']}'): {report['size_mb']:.2f} MB (fp32 {q['size_mb_fp32']:.2f} MB)", **line)
        stdout.print(f"val accuracy on {q['val_images']} '{q['val_split']}' images: fp32 {q['val_accuracy_fp32']:.4f}"
                     f" → int8 {q['val_accuracy_int8']:.4f} (change {q['val_accuracy_change']:+.4f}); top-1 "
                     f"agreement {q['top1_agreement']:.3f}, max |Δ logits| vs fp32 {q['max_abs_diff_vs_fp32']:.3g}",
                     **line)
    stdout.print(f"exported {run} → {report['out']} ({report['size_mb']:.2f} MB; input '{INPUT_NAME}' N×C×H×W, "
                 f"outputs {', '.join(report['outputs'])}: raw logits; opset {report['opset']})", **line)


@hookimpl
def register_commands(cli):
    @cli.command("export", epilog="Examples: fer export runs/a ;  fer export runs/a --int8 --out deploy/a.int8.onnx ;  "
                                  "fer export runs/a -o data.root=/data/fer2013  (where the parity faces are now)")
    def export_(
        run_dir: RunArgument,
        fmt: Annotated[str, typer.Option("--format", help="Exporter plugin (`fer plugins exporter`).")] = "onnx",
        int8: Annotated[bool, typer.Option("--int8", help="Quantise to int8 (static, calibrated on train images); "
                                                          "prints the val accuracy change.")] = False,
        out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: next to the run, "
                                                                  "RUN.onnx or RUN.int8.onnx).")] = None,
        opset: Annotated[Optional[int], typer.Option("--opset", help=f"ONNX opset (default {DEFAULT_OPSET}).")] = None,
        tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Largest accepted max |Δ logits| "
                                                           f"torch vs runtime (default {DEFAULT_TOLERANCE:g}).")] = None,
        override: Overrides = None,
    ) -> None:
        """Export a run as a deployable file (ONNX), checked against the torch model on validation faces."""
        reg = get_registry()
        if fmt not in reg.components["exporter"]:
            raise FerError(f"--format: unknown format '{fmt}'; available: {', '.join(sorted(reg.components['exporter']))}")
        table: dict[str, Any] = {"plugin": fmt}
        for key, value in (("int8", int8 or None), ("opset", opset), ("tolerance", tolerance)):
            if value is not None:
                table[key] = value
        try:
            exporter = reg.build("exporter", table, "(export)")
        except FerError as e:  # name the option, not the table: "--opset: ..."
            raise FerError(str(e).replace("(export).", "--", 1)) from None
        pred = load_predictor(run_dir, override or [], "cpu")
        default = getattr(exporter, "default_out", None)
        target = out or (default(pred) if default else Path(f"{run_dir}.{fmt}"))
        written = exporter.export(pred, target)
        report = getattr(exporter, "report", None)
        if report:
            _print_report(run_dir, report)
        else:
            stdout.print(f"exported {run_dir} → {written}", markup=False, highlight=False)
