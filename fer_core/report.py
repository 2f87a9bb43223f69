"""`fer report`: one self-contained HTML page per run (figures embedded as base64 PNG data
URIs, inline CSS, no scripts), computed from a fresh evaluation of the run's best checkpoint on
a split and from its history.json. The PNGs are also written beside the HTML."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .calibration import reliability  # noqa: E402
from .checkpoint import atomic_write_text  # noqa: E402
from .engine import softmax  # noqa: E402
from .errors import FerError  # noqa: E402
from .explain import _read_image, class_grid_figure, save_figure  # noqa: E402

REPORT_FILE = "report.html"
N_BINS = 15  # the bins of calibration.ece, so the diagram's ECE equals the reported one
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
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --card:#f6f8fa; --accent:#0969da; }
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
pre { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  overflow-x: auto; font-size: 12.5px; line-height: 1.45; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""


# ------------------------------------------------------------------ figures


def _imshow_matrix(ax, values: np.ndarray, text: list[list[str]], classes: Sequence[str], vmax: float,
                   title: str) -> None:
    n = len(classes)
    ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax if vmax > 0 else 1)
    ax.set_xticks(range(n), classes, rotation=40, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            dark = vmax > 0 and values[i, j] > 0.55 * vmax
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8 if n <= 10 else 6,
                    color="white" if dark else "black")


def confusion_figures(cm: np.ndarray, classes: Sequence[str], out: Path) -> tuple[bytes, bytes]:
    cm = np.asarray(cm)
    n = len(classes)
    size = (1.6 + 0.62 * n, 1.3 + 0.55 * n)
    fig, ax = plt.subplots(figsize=size)
    _imshow_matrix(ax, cm.astype(float), [[str(int(v)) for v in row] for row in cm], classes,
                   float(cm.max()) if cm.size else 0.0, "counts")
    fig.tight_layout()
    counts = save_figure(fig, out / "confusion_counts.png")
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=size)
    _imshow_matrix(ax, norm, [[f"{v:.2f}" for v in row] for row in norm], classes, 1.0,
                   "row-normalised (recall on the diagonal)")
    fig.tight_layout()
    return counts, save_figure(fig, out / "confusion_normalized.png")


def curves_figure(history: list[dict[str, Any]], out: Path) -> bytes | None:
    if not history:
        return None
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]

    def series(key: str) -> list[float] | None:
        vals = [h.get(key) for h in history]
        return [float(v) if isinstance(v, (int, float)) else np.nan for v in vals] if any(
            isinstance(v, (int, float)) for v in vals) else None

    panels = [("train loss", [("train_loss", "train loss", "#cf222e")]),
              ("validation", [("val_accuracy", "accuracy", "#0969da"), ("val_macro_f1", "macro-F1", "#8250df"),
                              ("val_balanced_accuracy", "balanced acc.", "#1a7f37")]),
              ("learning rate", [("lr", "lr", "#9a6700")])]
    panels = [(t, [(k, lab, c, series(k)) for k, lab, c in lines]) for t, lines in panels]
    panels = [(t, [ln for ln in lines if ln[3] is not None]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    marker = "o" if len(epochs) <= 30 else None
    for ax, (title, lines) in zip(axes[0], panels):
        for _key, label, colour, ys in lines:
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
    return save_figure(fig, out / "training_curves.png")


def per_class_figure(per_class: dict[str, dict[str, float]], classes: Sequence[str], out: Path) -> bytes:
    n = len(classes)
    x = np.arange(n)
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.95 * n), 3.4))
    for k, (key, colour) in enumerate([("precision", "#0969da"), ("recall", "#1a7f37"), ("f1", "#8250df")]):
        ax.bar(x + (k - 1) * width, [per_class[c][key] for c in classes], width, label=key if key != "f1" else "F1",
               color=colour)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=3, fontsize=8, loc="upper right", bbox_to_anchor=(1, 1.16), frameon=False)
    fig.tight_layout()
    return save_figure(fig, out / "per_class.png")


def _reliability_panel(ax, ax_count, rel: dict[str, Any], title: str, colour: str) -> None:
    bins = rel["bins"]
    lo = np.array([b["lo"] for b in bins])
    hi = np.array([b["hi"] for b in bins])
    centers, width = (lo + hi) / 2, hi - lo
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
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


def reliability_figure(logits: np.ndarray, labels: np.ndarray, temperature: float, out: Path) -> bytes:
    before = reliability(softmax(np.asarray(logits)), labels, N_BINS)
    after = reliability(softmax(np.asarray(logits) / temperature), labels, N_BINS)
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 4.8), sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]})
    _reliability_panel(axes[0][0], axes[1][0], before, "before temperature scaling (T = 1)", "#0969da")
    _reliability_panel(axes[0][1], axes[1][1], after, f"after temperature scaling (T = {temperature:.3g})", "#1a7f37")
    fig.tight_layout()
    return save_figure(fig, out / "reliability.png")


def pair_figure(images: list[np.ndarray], probs: list[float], pred_name: str, path: Path) -> bytes:
    fig, axes = plt.subplots(1, PAIR_EXAMPLES, figsize=(1.55 * PAIR_EXAMPLES, 1.85), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if k < len(images):
            img = images[k]
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(img)
            ax.set_title(f"p({pred_name})={probs[k]:.2f}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------ html


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(caption)}</p>'
    return (f'<figure><img src="{_uri(png)}" alt="{html.escape(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _card(key: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="s">{html.escape(sub)}</div>' if sub else ""
    return (f'<div class="card"><div class="k">{html.escape(key)}</div>'
            f'<div class="v">{html.escape(value)}</div>{sub_html}</div>')


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _h2(key: str) -> str:
    return f'<h2 id="{key}">{SECTIONS[key]}</h2>'


def confused_pairs(cm: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, int, float]]:
    """(true, predicted, count, share of the true class) of the largest off-diagonal cells."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(i, j, n, n / max(int(rows[i]), 1)) for n, i, j in cells[:top]]


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_report(run_dir: Path, out_dir: Path | None = None, *, split: str | None = None,
                 overrides: Sequence[str] = (), gradcam: bool = True) -> Path:
    """Evaluate the run's best checkpoint on ``split`` (default: the recipe's validation split)
    and write ``out_dir/report.html`` (default ``run_dir/report``) with its figures as PNGs
    beside it and embedded in it. Returns the HTML path."""
    from .inference import RECIPE_FILE, evaluate_predictions, load_run, probabilities, run_predictions, split_samples

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    run = load_run(run_dir, overrides)
    split, samples = split_samples(run, split)
    if not samples:
        raise FerError(f"--split: split '{split}' of {run_dir} has no images")
    pred = run_predictions(run, samples)
    metrics = evaluate_predictions(run, pred)
    history = _read_json(run_dir / "history.json", [])
    saved_metrics = _read_json(run_dir / "metrics.json", {})
    status = _read_json(run_dir / "run.json", {})
    classes = run.classes
    recipe = run.recipe
    cal = metrics["calibration"]
    cm = np.asarray(metrics["confusion_matrix"])
    probs = probabilities(run, pred["logits.emotion"])
    labels = np.asarray(pred["label"])
    preds = probs.argmax(1)
    order = pred.get("index", np.arange(len(labels)))

    # ---- figures
    curves = curves_figure(history if isinstance(history, list) else [], out)
    cm_counts, cm_norm = confusion_figures(cm, classes, out)
    per_class_png = per_class_figure(metrics["per_class"], classes, out)
    rel_png = reliability_figure(pred["logits.emotion"], labels, run.temperature, out)
    pairs = confused_pairs(cm)
    pair_pngs = []
    for k, (i, j, n, share) in enumerate(pairs):
        idx = [int(x) for x in np.flatnonzero((labels == i) & (preds == j))]
        idx.sort(key=lambda x: -probs[x, j])
        idx = idx[:PAIR_EXAMPLES]
        imgs = [_read_image(samples[int(order[x])].path, 3 if run.preprocessing.channels == 3 else 1) for x in idx]
        png = pair_figure(imgs, [float(probs[x, j]) for x in idx], classes[j], out / f"confused_{k + 1}.png")
        pair_pngs.append((i, j, n, share, png))
    grid_png, grid_layer, grid_error = None, "", ""
    if gradcam:
        from .explain import target_layer_name

        try:
            grid_layer = target_layer_name(run.model)
            grid_png = class_grid_figure(run, samples, pred, out / "gradcam_grid.png")
        except FerError as e:  # an architecture Grad-CAM cannot handle must not cost the whole report
            grid_error = str(e)

    # ---- html
    esc = html.escape
    data = recipe.data
    dataset = data.plugin + "".join(f" · {k}={v}" for k, v in data.params().items() if k in ("root", "labels", "name"))
    best_epoch = saved_metrics.get("best_epoch")
    val_split = (saved_metrics.get("calibration") or {}).get("split") or saved_metrics.get("split") or data.val_split
    cards = [
        _card("accuracy", _pct(metrics["accuracy"])),
        _card("macro-F1", _pct(metrics["macro_f1"])),
        _card("balanced accuracy", _pct(metrics["balanced_accuracy"])),
    ]
    if "au_mean_f1" in metrics:
        cards.append(_card("AU mean F1", _pct(metrics["au_mean_f1"]), f"{len(metrics.get('au_f1', {}))} AUs"))
    cards += [
        _card("ECE", f"{cal['ece']:.3f} → {cal['ece_calibrated']:.3f}", f"before → after T = {cal['temperature']:.3g}"),
        _card("images", f"{len(labels):,}", f"split '{split}'"),
    ]
    meta = [f"<b>dataset</b> {esc(dataset)}", f"<b>split</b> {esc(split)} ({len(labels):,} images)",
            f"<b>backbone</b> {esc(recipe.model.backbone.plugin)}:{esc(str(recipe.model.backbone.params().get('name', '')))}",
            f"<b>input</b> {run.preprocessing.input_size[0]}×{run.preprocessing.input_size[1]}×{run.preprocessing.channels}",
            f"<b>classes</b> {len(classes)}"]
    if best_epoch is not None:
        meta.append(f"<b>best epoch</b> {esc(str(best_epoch))} of {len(history) if isinstance(history, list) else '?'}")
    if status.get("device"):
        meta.append(f"<b>trained on</b> {esc(str(status['device']))} ({esc(str(status.get('precision', '')))})")
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS.items() if k != "gradcam" or gradcam)

    parts: list[str] = []
    parts.append(f"""<header><h1>{esc(run_dir.resolve().name)}</h1>
<p class="desc">recipe <b>{esc(recipe.name)}</b>{(' — ' + esc(recipe.description)) if recipe.description else ''}</p>
<p class="meta">{' &nbsp;·&nbsp; '.join(meta)}</p>
<nav>{nav}</nav></header>""")

    parts.append(_h2("summary"))
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    parts.append(f'<p class="note">Metrics of the best checkpoint re-evaluated on split <b>{esc(split)}</b>; '
                 f"probabilities at the run's temperature T = {cal['temperature']:.3g}. "
                 f"NLL {cal['nll']:.3f} → {cal['nll_calibrated']:.3f} with temperature scaling.</p>")

    parts.append(_h2("curves"))
    parts.append(_figure(curves, "training curves",
                         "Training loss, validation accuracy / macro-F1 and learning rate per epoch (history.json). "
                         "The validation split here is the one the run monitored during training."
                         if curves is not None else "No history.json in the run directory: no training curves."))

    parts.append(_h2("confusion"))
    parts.append('<div class="row">' + _figure(cm_counts, "confusion matrix (counts)",
                                               "Counts: rows are the true class, columns the prediction.")
                 + _figure(cm_norm, "confusion matrix (row-normalised)",
                           "Row-normalised: each row sums to 1; the diagonal is each class's recall.") + "</div>")

    parts.append(_h2("per-class"))
    parts.append(_figure(per_class_png, "per-class precision, recall and F1",
                         "Precision (of the images predicted as the class, the share that are), recall (of the "
                         "class's images, the share found) and F1 per class."))
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td><b>{m['f1']:.3f}</b></td><td>{m['support']:,}</td></tr>"
        for c, m in ((c, metrics["per_class"][c]) for c in classes))
    parts.append(f"<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
                 f"</tr></thead><tbody>{rows}</tbody></table>")

    parts.append(_h2("confused"))
    if not pair_pngs:
        parts.append('<p class="note">No misclassified images on this split.</p>')
    else:
        parts.append(f'<p class="note">The {len(pair_pngs)} largest off-diagonal cells of the confusion matrix '
                     "(true → predicted), with the images predicted most confidently into the wrong class.</p>")
    for i, j, n, share, png in pair_pngs:
        parts.append(f'<div class="pair"><h3>{esc(classes[i])} → {esc(classes[j])} '
                     f'<span class="n">{n} image{"s" if n != 1 else ""}, {_pct(share)} of true '
                     f"{esc(classes[i])}</span></h3>"
                     + _figure(png, f"{classes[i]} predicted as {classes[j]}",
                               f"True {esc(classes[i])}, predicted {esc(classes[j])}; p = calibrated probability "
                               "of the wrong class.") + "</div>")

    parts.append(_h2("calibration"))
    same = split == val_split
    parts.append(_figure(rel_png, "reliability diagram",
                         f"Reliability diagram ({N_BINS} equal-width confidence bins): bar height is the accuracy "
                         "of the images whose top probability falls in the bin; a well-calibrated model follows the "
                         "diagonal. Bars under the diagonal mean over-confidence, above it under-confidence. "
                         "The lower panels count the images per bin. "
                         f"ECE {cal['ece']:.3f} before and {cal['ece_calibrated']:.3f} after temperature scaling "
                         f"(T = {cal['temperature']:.3g})."))
    parts.append('<p class="note">ECE (expected calibration error) is the image-weighted mean gap between accuracy '
                 "and confidence over the bins. Temperature scaling divides the logits by one scalar T fitted on "
                 f"the validation split ('{esc(str(val_split))}'): it never changes a prediction, only how sure it "
                 "is (T &gt; 1 softens over-confident probabilities)."
                 + (" This report's split is the one T was fitted on, so the calibrated ECE is optimistic."
                    if same else "")
                 + (" <b>This run has no fitted temperature</b> (T = 1; metrics.json has no calibration): "
                    f"<code>fer calibrate {esc(str(run_dir))}</code> fits one on the validation split."
                    if run.temperature == 1.0 and not saved_metrics.get("calibration") else "") + "</p>")

    if gradcam:
        parts.append(_h2("gradcam"))
        if grid_png is None:
            parts.append(f'<p class="note">No Grad-CAM: {esc(grid_error)}</p>')
        else:
            parts.append(_figure(
                grid_png, "Grad-CAM class grid",
                "Grad-CAM of the predicted class, one row per true class: the most confident correct predictions "
                "on the left, the most confident mistakes on the right (title: predicted class and its probability; "
                "green correct, red wrong; grey cells: not enough examples). Red regions raised the predicted logit "
                f"most. Layer: <code>{esc(grid_layer)}</code>."))

    parts.append(_h2("recipe"))
    recipe_text = (run_dir / RECIPE_FILE).read_text(encoding="utf-8")
    note = f" (with overrides: {esc(', '.join(overrides))})" if overrides else ""
    parts.append(f'<p class="note">The resolved recipe of the run (recipe.toml){note}.</p>'
                 f"<pre>{esc(recipe_text)}</pre>")

    stamp = dt.datetime.now().isoformat(timespec="seconds")
    body = "\n".join(parts)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(run_dir.resolve().name)} — fer report</title>
<style>{CSS}</style>
</head>
<body>
<div class="wrap">
{body}
<footer>Generated by fer report on {esc(stamp)} from {esc(str(run_dir))}.</footer>
</div>
</body>
</html>
"""
    path = out / REPORT_FILE
    atomic_write_text(path, page)
    # figures of an earlier report in the same directory that this one did not redraw
    stale = [p for p in out.glob("confused_*.png") if p.stem.split("_")[-1].isdigit()
             and int(p.stem.split("_")[-1]) > len(pair_pngs)]
    if grid_png is None:
        stale.append(out / "gradcam_grid.png")
    if curves is None:
        stale.append(out / "training_curves.png")
    for p in stale:
        p.unlink(missing_ok=True)
    return path
