"""`fer report`: one self-contained HTML page per run (figures embedded as base64 PNG data
URIs, inline CSS, no scripts); the PNGs are also written beside the HTML.

Three steps, each usable alone: ``evaluate_split`` (a fresh evaluation of the best checkpoint
on one split), ``draw_figures`` (the PNGs) and ``render_html`` (the page); ``write_report``
runs them in turn.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import typer

from fer_core.api import (Explainer, FerError, Overrides, RunArgument, RunDir, RunPredictor, Sample,
                          atomic_write_bytes, atomic_write_text, confusion_matrix_figure, eval_transform,
                          evaluate_predictions, figure_png, hookimpl, reliability, softmax, split_samples, stdout)
from fer_plugins.explain_gradcam import explainer_spec, overlay, read_image

REPORT_FILE = "report.html"
N_BINS = 15  # the bins of metrics.ece, so the diagram's ECE equals the reported one
TOP_PAIRS = 5
PAIR_EXAMPLES = 4

SECTIONS = {
    "summary": "Summary",
    "curves": "Training curves",
    "confusion": "Confusion matrix",
    "per-class": "Per-class metrics",
    "confused": "Most confused pairs",
    "calibration": "Calibration",
    "gradcam": "Grad-CAM",
    "recipe": "Recipe",
}

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --card:#f6f8fa; --accent:#0969da; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff;
  font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
.wrap { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
header h1 { margin: 0 0 4px; font-size: 28px; }
header .desc { color: var(--muted); margin: 0 0 8px; }
.meta { color: var(--muted); font-size: 13px; margin: 0; }
.meta b { color: var(--fg); font-weight: 600; }
nav { margin: 14px 0 4px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
h2 { font-size: 20px; margin: 40px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0 4px; }
.card { flex: 1 1 150px; background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 16px; }
.card .v { font-size: 28px; font-weight: 650; line-height: 1.2; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .s { color: var(--muted); font-size: 12px; }
figure { margin: 12px 0 18px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.row figure { flex: 1 1 420px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0 12px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; }
th { background: var(--card); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
.pair { margin: 14px 0 20px; }
.pair h3 { font-size: 15px; margin: 0 0 4px; }
.pair .n { color: var(--muted); font-weight: normal; }
.note { color: var(--muted); font-size: 13px; }
.in-sample { color: var(--warn); }
pre { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  overflow-x: auto; font-size: 12.5px; line-height: 1.45; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""


# ------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    """The best checkpoint's predictions on one split, and their metrics (metrics.json schema)."""

    split: str
    samples: list[Sample]
    pred: dict[str, np.ndarray]
    metrics: dict[str, Any]

    @cached_property
    def probs(self) -> np.ndarray:  # calibrated: what fer reports everywhere
        return softmax(self.pred["calibrated.emotion"])

    @cached_property
    def labels(self) -> np.ndarray:
        return np.asarray(self.pred["label"])

    @cached_property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    def image(self, i: int, channels: int) -> np.ndarray:
        """The original image of prediction row i."""
        order = self.pred.get("index", np.arange(len(self.labels)))
        return read_image(self.samples[int(order[i])].path, channels)


def evaluate_split(pred: RunPredictor, split: str | None = None) -> Evaluation:
    split, samples = split_samples(pred, split)
    if not samples:
        raise FerError(f"--split: split '{split}' of {pred.path} has no images")
    p = pred.predict(samples)
    return Evaluation(split, samples, p, evaluate_predictions(pred, p))


@dataclass
class RunFiles:
    """What the run directory says besides its checkpoint."""

    history: list[dict[str, Any]]
    metrics: dict[str, Any]  # metrics.json: the validation split at the end of training
    status: dict[str, Any]  # run.json
    recipe_text: str
    #: the split the calibrator was fitted on (None: never fitted)
    fitted_split: str | None

    @classmethod
    def read(cls, pred: RunPredictor) -> "RunFiles":
        rd = RunDir(pred.path)
        history, metrics = rd.read_json(RunDir.HISTORY, []), rd.read_json(RunDir.METRICS, {}) or {}
        fitted = (metrics.get("calibration") or {}).get("split")
        if fitted is None and pred.calibration.get("state") is not None:
            fitted = pred.recipe.data.val_split  # fer 0.1 fitted its temperature there and did not say so
        return cls(history if isinstance(history, list) else [], metrics, rd.status(),
                   (rd / RunDir.RECIPE).read_text(encoding="utf-8"), fitted)


def calibrator_text(pred: RunPredictor) -> str:
    """'temperature calibrator, temperature = 1.23': the calibrator and its fitted numbers."""
    cal = pred.calibration
    state = cal.get("state")
    if state is None:
        return f"{cal['plugin']} calibrator (not fitted)"
    numbers = "".join(f", {k} = {v:.3g}" for k, v in state.items() if isinstance(v, (int, float)))
    return f"{cal['plugin']} calibrator{numbers}"


def confused_pairs(cm: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """(true, predicted, count, share of the true class) of the largest off-diagonal cells."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(i, j, n, n / max(int(rows[i]), 1)) for n, i, j in cells[:top]]


# ------------------------------------------------------------------ figures


def save_figure(fig, path: Path) -> bytes:
    """Render a figure to PNG, write it atomically, return the bytes (to embed)."""
    data = figure_png(fig)
    atomic_write_bytes(path, data)
    return data


def curves_figure(history: list[dict[str, Any]]):
    """Training loss, validation metrics and learning rate per epoch; None without history."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def series(key: str) -> list[float] | None:
        vals = [h.get(key) for h in history]
        if not any(isinstance(v, (int, float)) for v in vals):
            return None
        return [float(v) if isinstance(v, (int, float)) else np.nan for v in vals]

    panels = [("train loss", [("train_loss", "train loss", "#cf222e")]),
              ("validation", [("val_accuracy", "accuracy", "#0969da"), ("val_macro_f1", "macro-F1", "#8250df"),
                              ("val_balanced_accuracy", "balanced acc.", "#1a7f37")]),
              ("learning rate", [("lr", "lr", "#9a6700")])]
    panels = [(t, [(lab, c, ys) for k, lab, c in lines if (ys := series(k)) is not None]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False, dpi=100)
    marker = "o" if len(epochs) <= 30 else None
    for ax, (title, lines) in zip(axes[0], panels):
        for label, colour, ys in lines:
            ax.plot(epochs, ys, marker=marker, markersize=3.5, color=colour, label=label, linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if title == "validation":
            ax.legend(fontsize=8, loc="lower right")
        if len(epochs) == 1:
            ax.set_xticks(epochs)
    fig.tight_layout()
    return fig


def per_class_figure(per_class: dict[str, dict[str, float]], classes: Sequence[str]):
    x = np.arange(len(classes))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.95 * len(classes)), 3.4), dpi=100)
    for k, (key, colour) in enumerate([("precision", "#0969da"), ("recall", "#1a7f37"), ("f1", "#8250df")]):
        ax.bar(x + (k - 1) * width, [per_class[c][key] for c in classes], width, label=key if key != "f1" else "F1",
               color=colour)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=3, fontsize=8, loc="upper right", bbox_to_anchor=(1, 1.16), frameon=False)
    fig.tight_layout()
    return fig


def _reliability_panel(ax, ax_count, rel: dict[str, Any], title: str, colour: str) -> None:
    bins = rel["bins"]
    lo, hi = np.array([b["lo"] for b in bins]), np.array([b["hi"] for b in bins])
    centers, width = (lo + hi) / 2, hi - lo
    acc, conf = np.array([b["accuracy"] for b in bins]), np.array([b["confidence"] for b in bins])
    count = np.array([b["count"] for b in bins])
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width[filled], color=colour, edgecolor="white", linewidth=0.6,
           label=f"accuracy (ECE {rel['ece']:.3f})")
    ax.bar(centers[filled], conf[filled] - acc[filled], width[filled], bottom=acc[filled], color="none",
           edgecolor="#cf222e", hatch="///", linewidth=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="#59636e", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.25)
    ax_count.bar(centers, count, width, color="#8c959f", edgecolor="white", linewidth=0.6)
    ax_count.set_xlim(0, 1)
    ax_count.set_xlabel("confidence (max probability)")
    ax_count.set_ylabel("images")


def reliability_figure(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, calibrator: str):
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 4.8), sharex="col", gridspec_kw={"height_ratios": [3, 1]}, dpi=100)
    _reliability_panel(axes[0][0], axes[1][0], reliability(softmax(raw), labels, N_BINS), "before calibration",
                       "#0969da")
    _reliability_panel(axes[0][1], axes[1][1], reliability(softmax(calibrated), labels, N_BINS),
                       f"after: {calibrator}", "#1a7f37")
    fig.tight_layout()
    return fig


def pair_figure(images: list[np.ndarray], probs: list[float], pred_name: str):
    fig, axes = plt.subplots(1, PAIR_EXAMPLES, figsize=(1.55 * PAIR_EXAMPLES, 1.85), squeeze=False, dpi=100)
    for k, ax in enumerate(axes[0]):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if k < len(images):
            img = images[k]
            ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255) if img.shape[2] == 1 else ax.imshow(img)
            ax.set_title(f"p({pred_name})={probs[k]:.2f}", fontsize=8)
    fig.tight_layout()
    return fig


def _pick_examples(ev: Evaluation, cls: int, per_class: int) -> tuple[list[int], list[int]]:
    """The most confident correct and the most confident wrong predictions of true class cls."""
    order = np.argsort(-ev.probs.max(1), kind="stable")
    mine = order[ev.labels[order] == cls]
    right = ev.preds[mine] == cls
    return mine[right][:per_class].tolist(), mine[~right][:per_class].tolist()


def class_grid_figure(pred: RunPredictor, ev: Evaluation, explainer: Explainer, per_class: int = 4):
    """A row per true class: ``per_class`` correctly classified then ``per_class``
    misclassified images (most confident first), each overlaid with the saliency map of its
    predicted class and titled with it and its probability; empty cells where a class has too
    few examples."""
    classes, preds, conf = pred.classes, ev.preds, ev.probs.max(1)
    rows = [_pick_examples(ev, c, per_class) for c in range(len(classes))]
    shown = sorted({i for r, w in rows for i in r + w})
    originals = {i: ev.image(i, pred.preprocessing.channels) for i in shown}
    heat: dict[int, np.ndarray] = {}
    if shown:
        tf = eval_transform(pred.preprocessing)
        maps = explainer.explain(pred.model, torch.stack([tf(originals[i]) for i in shown]),
                                 [int(preds[i]) for i in shown])
        heat = dict(zip(shown, maps))
    cell = 1.35
    fig, axes = plt.subplots(len(classes), 2 * per_class + 1, squeeze=False, dpi=100,
                             figsize=(1.3 + cell * 2 * per_class + 0.25, 0.5 + (cell + 0.3) * len(classes)),
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
            ax.set_title(f"{classes[preds[i]]}\np={conf[i]:.2f}", fontsize=7.5, pad=2,
                         color="#1a7f37" if preds[i] == ev.labels[i] else "#c62828")
        axes[r][0].set_ylabel(classes[r], rotation=0, ha="right", va="center", fontsize=10, labelpad=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    top = 1 - 0.12 / fig.get_figheight()
    x = [axes[0][k].get_position() for k in (0, per_class - 1, per_class + 1, -1)]
    fig.text((x[0].x0 + x[1].x1) / 2, top, "correctly classified (most confident)", ha="center", va="top", fontsize=10)
    fig.text((x[2].x0 + x[3].x1) / 2, top, "misclassified (most confident)", ha="center", va="top", fontsize=10)
    return fig


@dataclass
class Figures:
    """The report's PNGs (already written beside the HTML); None where there is nothing to draw."""

    curves: bytes | None
    confusion_counts: bytes
    confusion_normalized: bytes
    per_class: bytes
    reliability: bytes
    #: (true, predicted, count, share of the true class, PNG) of the most confused pairs
    pairs: list[tuple[int, int, int, float, bytes]] = field(default_factory=list)
    gradcam: bytes | None = None
    explainer: str = ""
    gradcam_layer: str | None = None  # where the explainer says it looked
    gradcam_error: str = ""  # why there is no grid


def draw_figures(pred: RunPredictor, ev: Evaluation, files: RunFiles, out: Path, gradcam: bool = True) -> Figures:
    classes, cm = pred.classes, np.asarray(ev.metrics["confusion_matrix"])
    curves = curves_figure(files.history)
    figs = Figures(
        curves=save_figure(curves, out / "training_curves.png") if curves is not None else None,
        confusion_counts=save_figure(confusion_matrix_figure(cm, classes, "counts"), out / "confusion_counts.png"),
        confusion_normalized=save_figure(
            confusion_matrix_figure(cm, classes, "row-normalised (recall on the diagonal)", normalized_text=True),
            out / "confusion_normalized.png"),
        per_class=save_figure(per_class_figure(ev.metrics["per_class"], classes), out / "per_class.png"),
        reliability=save_figure(reliability_figure(ev.pred["logits.emotion"], ev.pred["calibrated.emotion"],
                                                   ev.labels, calibrator_text(pred)), out / "reliability.png"))
    channels = pred.preprocessing.channels
    for k, (i, j, n, share) in enumerate(confused_pairs(cm)):
        idx = sorted(np.flatnonzero((ev.labels == i) & (ev.preds == j)).tolist(), key=lambda x: -ev.probs[x, j])
        idx = idx[:PAIR_EXAMPLES]
        fig = pair_figure([ev.image(x, channels) for x in idx], [float(ev.probs[x, j]) for x in idx], classes[j])
        figs.pairs.append((i, j, n, share, save_figure(fig, out / f"confused_{k + 1}.png")))
    if gradcam:
        spec = explainer_spec(pred)
        figs.explainer = spec["plugin"]
        try:
            explainer = pred.registry.build("explainer", spec, "explain")
            figs.gradcam = save_figure(class_grid_figure(pred, ev, explainer), out / "gradcam_grid.png")
            figs.gradcam_layer = getattr(explainer, "layer_used", None)
        except FerError as e:  # an architecture the explainer cannot handle must not cost the whole report
            figs.gradcam_error = str(e)
    return figs


# ------------------------------------------------------------------ html

esc = html.escape


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return f'<p class="note">{caption}</p>'
    return f'<figure><img src="{_uri(png)}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>'


def _card(key: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="s">{esc(sub)}</div>' if sub else ""
    return f'<div class="card"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>{sub_html}</div>'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _h2(key: str) -> str:
    return f'<h2 id="{key}">{SECTIONS[key]}</h2>'


def _header(pred: RunPredictor, ev: Evaluation, files: RunFiles, gradcam: bool) -> str:
    recipe, pre, data = pred.recipe, pred.preprocessing, pred.recipe.data
    dataset = data.plugin + "".join(f" · {k}={v}" for k, v in data.params().items() if k in ("root", "labels", "name"))
    backbone = recipe.model.backbone
    meta = [f"<b>dataset</b> {esc(dataset)}", f"<b>split</b> {esc(ev.split)} ({len(ev.labels):,} images)",
            f"<b>backbone</b> {esc(backbone.plugin)}:{esc(str(backbone.params().get('name', '')))}",
            f"<b>input</b> {pre.input_size[0]}×{pre.input_size[1]}×{pre.channels}",
            f"<b>classes</b> {len(pred.classes)}"]
    if files.metrics.get("best_epoch") is not None:
        meta.append(f"<b>best epoch</b> {esc(str(files.metrics['best_epoch']))} of {len(files.history) or '?'}")
    if files.status.get("device"):
        meta.append(f"<b>trained on</b> {esc(str(files.status['device']))} "
                    f"({esc(str(files.status.get('precision', '')))})")
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items() if k != "gradcam" or gradcam)
    desc = f" — {esc(recipe.description)}" if recipe.description else ""
    return (f'<header><h1>{esc(pred.path.resolve().name)}</h1>\n<p class="desc">recipe <b>{esc(recipe.name)}</b>'
            f'{desc}</p>\n<p class="meta">{" &nbsp;·&nbsp; ".join(meta)}</p>\n<nav>{nav}</nav></header>')


def _summary(pred: RunPredictor, ev: Evaluation, in_sample: bool) -> str:
    m, cal = ev.metrics, ev.metrics["calibration"]
    cards = [_card("accuracy", _pct(m["accuracy"])), _card("macro-F1", _pct(m["macro_f1"])),
             _card("balanced accuracy", _pct(m["balanced_accuracy"]))]
    if "au_mean_f1" in m:
        cards.append(_card("AU mean F1", _pct(m["au_mean_f1"]), f"{len(m.get('au_f1', {}))} AUs"))
    cards += [_card("ECE", f"{cal['ece']:.3f} → {cal['ece_calibrated']:.3f}",
                    "before → after calibration" + (" (in-sample)" if in_sample else "")),
              _card("images", f"{len(ev.labels):,}", f"split '{ev.split}'")]
    return (_h2("summary") + f'<div class="cards">{"".join(cards)}</div>'
            f'<p class="note">Metrics of the best checkpoint re-evaluated on split <b>{esc(ev.split)}</b>; '
            f"probabilities calibrated by the {esc(calibrator_text(pred))}. "
            f"NLL {cal['nll']:.3f} → {cal['nll_calibrated']:.3f} with calibration.</p>")


def _curves(figs: Figures) -> str:
    return _h2("curves") + _figure(
        figs.curves, "training curves",
        "Training loss, validation accuracy / macro-F1 and learning rate per epoch (history.json). "
        "The validation split here is the one the run monitored during training."
        if figs.curves is not None else "No history.json in the run directory: no training curves.")


def _confusion(figs: Figures) -> str:
    return (_h2("confusion") + '<div class="row">'
            + _figure(figs.confusion_counts, "confusion matrix (counts)",
                      "Counts: rows are the true class, columns the prediction; colour is the row share.")
            + _figure(figs.confusion_normalized, "confusion matrix (row-normalised)",
                      "Row-normalised: each row sums to 1; the diagonal is each class's recall.") + "</div>")


def _per_class(pred: RunPredictor, ev: Evaluation, figs: Figures) -> str:
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td><b>{m['f1']:.3f}</b></td><td>{m['support']:,}</td></tr>"
        for c, m in ((c, ev.metrics["per_class"][c]) for c in pred.classes))
    return (_h2("per-class") + _figure(
        figs.per_class, "per-class precision, recall and F1",
        "Precision (of the images predicted as the class, the share that are), recall (of the class's images, "
        "the share found) and F1 per class.")
        + "<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>")


def _confused(pred: RunPredictor, figs: Figures) -> str:
    if not figs.pairs:
        return _h2("confused") + '<p class="note">No misclassified images on this split.</p>'
    parts = [_h2("confused"), f'<p class="note">The {len(figs.pairs)} largest off-diagonal cells of the confusion '
             "matrix (true → predicted), with the images predicted most confidently into the wrong class.</p>"]
    for i, j, n, share, png in figs.pairs:
        a, b = esc(pred.classes[i]), esc(pred.classes[j])
        parts.append(f'<div class="pair"><h3>{a} → {b} <span class="n">{n} image{"s" if n != 1 else ""}, '
                     f"{_pct(share)} of true {a}</span></h3>"
                     + _figure(png, f"{pred.classes[i]} predicted as {pred.classes[j]}",
                               f"True {a}, predicted {b}; p = calibrated probability of the wrong class.") + "</div>")
    return "".join(parts)


def _calibration(pred: RunPredictor, ev: Evaluation, figs: Figures, files: RunFiles, in_sample: bool) -> str:
    cal, desc = ev.metrics["calibration"], esc(calibrator_text(pred))
    parts = [_h2("calibration"), _figure(
        figs.reliability, "reliability diagram",
        f"Reliability diagram ({N_BINS} equal-width confidence bins): bar height is the accuracy of the images "
        "whose top probability falls in the bin; a well-calibrated model follows the diagonal. Bars under the "
        "diagonal mean over-confidence, above it under-confidence. The lower panels count the images per bin. "
        f"ECE {cal['ece']:.3f} before and {cal['ece_calibrated']:.3f} after calibration ({desc}).")]
    if in_sample:
        parts.append(f'<p class="note in-sample"><b>In-sample:</b> the calibrator was fitted on this split '
                     f"('{esc(ev.split)}'), so the right-hand diagram and the calibrated ECE are optimistic; "
                     "a report on another split (<code>--split</code>) shows how calibration generalises.</p>")
    note = ("ECE (expected calibration error) is the image-weighted mean gap between accuracy and confidence over "
            "the bins.")
    if files.fitted_split is not None:
        note += (f" The {desc} was fitted on split '{esc(files.fitted_split)}' after training; it maps the logits "
                 "to the probabilities fer reports.")
    else:
        note += (" <b>This run has no fitted calibrator</b>: "
                 f"<code>fer calibrate {esc(str(pred.path))}</code> fits one on the validation split.")
    return "".join(parts) + f'<p class="note">{note}</p>'


def _gradcam(figs: Figures) -> str:
    if figs.gradcam is None:
        return _h2("gradcam") + f'<p class="note">No Grad-CAM: {esc(figs.gradcam_error)}</p>'
    layer = f", layer <code>{esc(figs.gradcam_layer)}</code>" if figs.gradcam_layer else ""
    return _h2("gradcam") + _figure(
        figs.gradcam, "Grad-CAM class grid",
        "Saliency of the predicted class, one row per true class: the most confident correct predictions on the "
        "left, the most confident mistakes on the right (title: predicted class and its probability; green "
        "correct, red wrong; grey cells: not enough examples). Red regions raised the predicted logit most. "
        f"Explainer <code>{esc(figs.explainer)}</code>{layer}.")


def render_html(pred: RunPredictor, ev: Evaluation, figs: Figures, files: RunFiles, *,
                overrides: Sequence[str] = (), gradcam: bool = True) -> str:
    """The whole page; every section in SECTIONS order."""
    in_sample = ev.split == files.fitted_split
    with_overrides = f" (with overrides: {esc(', '.join(overrides))})" if overrides else ""
    body = [_header(pred, ev, files, gradcam), _summary(pred, ev, in_sample), _curves(figs), _confusion(figs),
            _per_class(pred, ev, figs), _confused(pred, figs), _calibration(pred, ev, figs, files, in_sample),
            _gradcam(figs) if gradcam else "",
            _h2("recipe") + f'<p class="note">The resolved recipe of the run (recipe.toml){with_overrides}.</p>'
            f"<pre>{esc(files.recipe_text)}</pre>"]
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    newline = "\n"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(pred.path.resolve().name)} — fer report</title>
<style>{CSS}</style>
</head>
<body>
<div class="wrap">
{newline.join(b for b in body if b)}
<footer>Generated by fer report on {esc(stamp)} from {esc(str(pred.path))}.</footer>
</div>
</body>
</html>
"""


def write_report(run_dir: Path, out_dir: Path | None = None, *, split: str | None = None,
                 overrides: Sequence[str] = (), gradcam: bool = True) -> Path:
    """Evaluate the run's best checkpoint on ``split`` (default: the recipe's validation split)
    and write ``out_dir/report.html`` (default ``run_dir/report``) with its figures as PNGs
    beside it and embedded in it. Returns the HTML path."""
    pred = RunPredictor(Path(run_dir), overrides)
    # a shipped model's directory is installed read-only: its report goes to ./report-<name>
    out = Path(out_dir) if out_dir is not None else (Path(f"report-{pred.name}") if pred.shipped else pred.path / "report")
    ev = evaluate_split(pred, split)
    files = RunFiles.read(pred)
    figs = draw_figures(pred, ev, files, out, gradcam)
    path = out / REPORT_FILE
    atomic_write_text(path, render_html(pred, ev, figs, files, overrides=overrides, gradcam=gradcam))
    # figures of an earlier report in the same directory that this one did not redraw
    stale = [p for p in out.glob("confused_*.png")
             if p.stem.split("_")[-1].isdigit() and int(p.stem.split("_")[-1]) > len(figs.pairs)]
    stale += [out / name for name, png in (("gradcam_grid.png", figs.gradcam), ("training_curves.png", figs.curves))
              if png is None]
    for p in stale:
        p.unlink(missing_ok=True)
    return path


@hookimpl
def register_commands(cli):
    @cli.command(epilog="Examples: fer report runs/try1 ;  fer report runs/try1 --split test --no-gradcam")
    def report(
        run_dir: RunArgument,
        split: Annotated[Optional[str], typer.Option("--split", help="Split to analyse (default: validation).")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default RUN/report; ./report-NAME for a shipped model).")] = None,
        no_gradcam: Annotated[bool, typer.Option("--no-gradcam", help="Skip the Grad-CAM grid (faster).")] = False,
        override: Overrides = None,
    ) -> None:
        """Write a self-contained HTML report: curves, confusion, per-class bars, confused pairs,
        reliability diagram and Grad-CAM grid."""
        path = write_report(run_dir, out, split=split, overrides=override or [], gradcam=not no_gradcam)
        stdout.print(f"report: {path}", markup=False, highlight=False)
