"""What the ``llava`` backbone plugs into: the ``answer_scores`` head (class log-likelihoods as
logits), the ``llava_lm`` loss (the language-model loss on the target class name), the
``llava_adamw`` optimizer (one learning rate for adapters, one for heads) and the adapter export
(peft's safetensors format, the ``llava_adapters`` callback and `fer llava-adapters`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_core.api import Batch, Callback, FerError, Outputs, RunInfo, atomic_write_bytes, atomic_write_text, warn

from .backbone import ADAPTER_GROUP, LlavaBackbone


class AnswerScores(nn.Module):
    """Per-class scores → logits, unchanged (``select``: which features are the classes' scores)."""

    def __init__(self, select: list[int] | None) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(select, dtype=torch.long) if select else None, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.index is None else features[:, self.index]


def answer_scores(in_features: int, num_outputs: int, select: list[int]) -> AnswerScores:
    if select:
        if len(select) != num_outputs:
            raise FerError(f"head 'answer_scores': select names {len(select)} features for {num_outputs} outputs")
        bad = [i for i in select if i >= in_features]
        if bad:
            raise FerError(f"head 'answer_scores': select {bad} beyond the backbone's {in_features} features")
        return AnswerScores(select)
    if in_features != num_outputs:
        raise FerError(f"head 'answer_scores' passes one score per class through, but the backbone gives {in_features} "
                       f"features for {num_outputs} outputs: use the llava backbone with mode = \"likelihood\" and one "
                       "answer per class (or pick the features with select = [...])")
    return AnswerScores(None)


class AnswerNLL:
    """-log P(target class name | prompt, image): the head's outputs are the answers' log-likelihoods."""

    def __call__(self, outputs: Outputs, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ll = outputs["emotion"].float()
        if "soft_label" in batch:  # mixed targets: the expected loss under the label distribution
            loss = -(batch["soft_label"] * ll).sum(1).mean()
        else:
            loss = -ll.gather(1, batch["label"][:, None]).mean()
        return loss, {"emotion": loss.detach()}


def adamw_groups(params: list[torch.Tensor], *, lr: float, adapter_lr: float, weight_decay: float,
                 betas: tuple[float, float]) -> torch.optim.Optimizer:
    tagged = [p for p in params if getattr(p, "fer_group", None) == ADAPTER_GROUP]
    rest = [p for p in params if getattr(p, "fer_group", None) != ADAPTER_GROUP]
    groups = [g for g in ({"params": rest, "lr": lr, "name": "heads"},
                          {"params": tagged, "lr": adapter_lr, "name": ADAPTER_GROUP}) if g["params"]]
    return torch.optim.AdamW(groups or params, lr=lr, weight_decay=weight_decay, betas=betas)


# ---------------------------------------------------------------------- adapter export


def export_adapters(backbone: LlavaBackbone, heads: nn.Module | None, out: Path, classes: list[str] | None = None) -> Path:
    """``out``/: peft's ``adapter_model.safetensors`` + ``adapter_config.json`` (its base path: the
    local model directory), ``trainable.safetensors`` (the heads and any other trained tensor, e.g.
    the projector) and ``fer_llava.json`` (base directory, config hash, mode, prompt, answers)."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    if backbone.lora:
        backbone.net.save_pretrained(str(out), safe_serialization=True)
    rest = {f"backbone.{n}": p.detach().cpu().clone().contiguous() for n, p in backbone.named_parameters()
            if p.requires_grad and "lora_" not in n}
    if heads is not None:
        rest.update({f"heads.{k}": v.detach().cpu().clone().contiguous() for k, v in heads.state_dict().items()})
    atomic_write_bytes(out / "trainable.safetensors", save(rest) if rest else save({}))
    info = {**backbone.get_extra_state(), "prompt": backbone.prompt, "answer_classes": backbone.answer_classes,
            "classes": classes, "files": sorted(p.name for p in out.iterdir() if not p.name.startswith("."))}
    atomic_write_text(out / "fer_llava.json", json.dumps(info, indent=2) + "\n")
    return out


class ExportAdapters(Callback):
    """At the end of training (the model then holds the best checkpoint's weights): the adapters
    and heads in safetensors under ``<run dir>/<dir>``."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_fit_end(self, run: RunInfo, final: dict[str, Any]) -> None:
        model = run.model
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, LlavaBackbone):
            warn(f"callback 'llava_adapters': the backbone is not 'llava' ({type(backbone).__name__}); nothing exported")
            return
        run.files["adapters"] = export_adapters(backbone, getattr(model, "heads", None), run.out_dir / self.dir,
                                                list(run.classes))

