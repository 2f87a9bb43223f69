"""A command contributed by a third-party plugin: `fer class-similarity RUN`.

It prints, for a trained run, the cosine similarity between the class weight vectors of the
emotion head (a linear or cosine head): classes whose weights point the same way are the ones
the model finds hard to tell apart.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from fer_core.api import FerError, RunArgument, hookimpl, load_predictor, stdout


def class_similarity(run_dir: Path) -> tuple[list[str], torch.Tensor]:
    pred = load_predictor(run_dir, device="cpu")
    head = getattr(pred, "model", None) and pred.model.heads["emotion"]
    weights = [p for n, p in head.named_parameters() if p.ndim == 2] if head is not None else []
    if not weights:
        raise FerError(f"{run_dir}: the emotion head has no class weight matrix")
    w = F.normalize(weights[-1].detach().float(), dim=1)
    return pred.classes, w @ w.T


@hookimpl
def register_commands(cli):
    @cli.command("class-similarity", epilog="Example: fer class-similarity runs/quickstart-20261201-120000")
    def class_similarity_command(run_dir: RunArgument) -> None:
        """Cosine similarity between the emotion head's class weight vectors (example plugin)."""
        classes, sim = class_similarity(Path(run_dir))
        table = Table(title=f"class weight similarity: {run_dir}")
        table.add_column("")
        for c in classes:
            table.add_column(c, justify="right")
        for c, row in zip(classes, sim.tolist()):
            table.add_row(c, *(f"{v:+.2f}" for v in row))
        stdout.print(table)
