"""The `fer` command: the kernel's commands (run, eval, data, recipe, plugins); every other
command is contributed by a plugin through the ``register_commands(cli)`` hook.

One error boundary: a problem the user can fix (``FerError``, and OS errors at known places) →
exit code 2 and one line; only a genuine bug prints a traceback, with a line saying how to
report it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

# Nothing may download at run time: no hub retries, no albumentations version check.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer
from rich.table import Table

from .errors import FerError

app = typer.Typer(
    name="fer",
    help="Train, evaluate and deploy facial-expression recognizers from one TOML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Work with recipe files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(recipe_app, name="recipe")

_state = {"debug": False, "commands_added": False}

Overrides = Annotated[
    Optional[list[str]],
    typer.Option("-o", "--override", help="Override a recipe value: key.path=value (TOML value), repeatable.",
                 metavar="KEY=VALUE"),
]
RunArgument = Annotated[Path, typer.Argument(help="A run directory written by `fer run` (or an artifact).",
                                             show_default=False)]
REPORT_BUGS = "this is a bug in fer or a plugin: please report it with the traceback above and the command you ran"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"fer {version('fer-toolkit')}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


@app.command(epilog="Examples: fer run recipes/quickstart.toml -o train.epochs=2 --out runs/try1 ;  "
                    "fer run --resume runs/try1")
def run(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file.", show_default=False)] = None,
    override: Overrides = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<name>-<time>).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory.")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Train in N processes on this machine (DDP via torchrun; "
                                       "train.batch_size stays the global batch).")] = 1,
) -> None:
    """Train a recipe; writes recipe.toml, checkpoints and metrics.json into the run directory."""
    from .console import metrics_tables, stdout
    from .runner import train

    if (recipe is None) == (resume is None):
        raise FerError("give either a RECIPE file or --resume DIR")
    if nproc < 1:
        raise FerError(f"--nproc: expected ≥ 1 (got {nproc})")
    if nproc > 1:
        from . import dist

        argv = ["run", *([str(recipe)] if recipe else []), *(x for o in override or [] for x in ("-o", o)),
                *(["--out", str(out)] if out else []), *(["--resume", str(resume)] if resume else [])]
        raise typer.Exit(dist.launch(nproc, argv))
    out_dir, final = train(recipe, override or [], out, resume)
    metrics_tables(final, title=f"best checkpoint (epoch {final['best_epoch']}) on validation")
    stdout.print(f"run directory: {out_dir}", markup=False, highlight=False)
    for name, path in final.get("files", {}).items():
        stdout.print(f"  {name}: {path}", markup=False, highlight=False)


@app.command("eval", epilog="Examples: fer eval runs/try1 ;  fer eval runs/try1 --split test --tta ;  "
                            "fer eval runs/try1 -o data.root=/data/other-copy")
def eval_(
    run_dir: RunArgument,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: validation).")] = None,
    override: Overrides = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics to this file.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: the recipe's [tta] table, or flips.")] = False,
) -> None:
    """Evaluate a run's best checkpoint (or an artifact: an ensemble, an exported .onnx) on a split of its dataset, or another."""
    from .checkpoint import atomic_write_json
    from .console import metrics_tables, stdout
    from .predictor import evaluate

    report = evaluate(run_dir, split, override or [], tta=tta)
    metrics_tables(report, title=f"{run_dir} on '{report['split']}'")
    inf = report["inference"]
    stdout.print(f"inference: {inf['batched_ms_per_image']:.2f} ms per image (batched), {inf['tta_views']} view(s)",
                 markup=False)
    if json_out:
        atomic_write_json(json_out, report)
        stdout.print(f"wrote {json_out}", markup=False, highlight=False)


@app.command(epilog="Example: fer data recipes/quickstart.toml")
def data(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (a [data] table is enough).")],
    override: Overrides = None,
) -> None:
    """Validate every label line and image; print per-split, per-class counts (and AU frequencies)."""
    from .build import build_source, build_splits
    from .console import stdout, warn
    from .recipe import apply_overrides, read_toml, validate_data

    rec = validate_data(apply_overrides(read_toml(recipe), override or []), str(recipe))
    from .registry import get_registry

    reg = get_registry(rec.plugins.disable)
    source = build_source(rec, reg)
    splits = build_splits(rec, reg, source=source)
    table = Table(title=f"{rec.data.plugin} dataset: {len(splits.classes)} classes")
    table.add_column("class")
    names = ["train (used)", "val (used)"] + sorted(source.splits)
    for n in names:
        table.add_column(n, justify="right")
    counts = [Counter(s.label for s in splits.train), Counter(s.label for s in splits.val)]
    counts += [Counter(s.label for s in source.splits[n]) for n in sorted(source.splits)]
    for i, c in enumerate(splits.classes):
        table.add_row(c, *[str(cnt.get(i, 0)) for cnt in counts])
    table.add_row("total", *[str(sum(cnt.values())) for cnt in counts])
    stdout.print(table, markup=False)  # class and AU names are text: a folder '[happy]' is no markup
    if splits.au_names:
        info = splits.task_info()
        labelled = info.au_labelled
        au = Table(title=f"AU frequency in train ({labelled} images with AU labels)")
        au.add_column("AU")
        au.add_column("positives", justify="right")
        au.add_column("rate", justify="right")
        for name, pos in zip(splits.au_names, info.au_positive_counts):
            au.add_row(name, str(pos), f"{pos / max(labelled, 1):.3f}")
        stdout.print(au, markup=False)
    for note in splits.notes:
        stdout.print(f"note: {note}", markup=False, highlight=False)
    for w in splits.warnings:
        warn(w)
    if splits.skipped:
        stdout.print(f"skipped {splits.skipped} missing/unreadable image(s)", markup=False)
    stdout.print("all label lines valid; all images decode", markup=False)


@recipe_app.command("check", epilog="Example: fer recipe check recipes/quickstart.toml -o train.epochs=3 --show")
def recipe_check(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    override: Overrides = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe.")] = False,
) -> None:
    """Validate a recipe (structure and every plugin's parameters) without running anything."""
    from .console import stdout
    from .recipe import apply_overrides, check_any, dump_toml, read_toml

    raw = check_any(apply_overrides(read_toml(recipe), override or []), str(recipe))
    if show:
        stdout.print(dump_toml(raw), markup=False, highlight=False)
    stdout.print(f"{recipe}: valid", markup=False, highlight=False)


@app.command(epilog="Examples: fer plugins ;  fer plugins loss ;  fer plugins loss focal ;  fer plugins --json")
def plugins(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind (e.g. loss).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Argument(help="Describe this component: keys, types, defaults.",
                                                  show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Tab-separated rows, never truncated.")] = False,
) -> None:
    """List every registered component (kind, name, plugin, distribution, version), or describe one."""
    import inspect

    from .console import stdout
    from .kinds import BY_NAME
    from .registry import _did_you_mean, get_registry

    reg = get_registry()
    if kind is not None and kind not in BY_NAME:
        raise FerError(f"KIND: unknown kind '{kind}'{_did_you_mean(kind, BY_NAME)}; kinds: {', '.join(BY_NAME)}")
    if name is not None:
        comp = reg.get(kind, name, kind)
        keys = comp.describe()
        doc = inspect.getdoc(comp.factory) or ""
        if as_json:
            print(json.dumps({"kind": kind, "name": name, "plugin": comp.plugin, "distribution": comp.distribution,
                              "version": comp.version, "doc": doc, "keys": keys}, indent=2))
            return
        k = BY_NAME[kind]
        print(f"{kind} '{name}' from plugin '{comp.plugin}' ({comp.distribution} {comp.version}); "
              f"recipe table {k.place or '—'}")
        if doc:
            print("\n" + doc + "\n")
        for row in keys or [{"key": "(no keys)", "type": "", "default": ""}]:
            print(f"  {row['key']:<24} {row['type']:<40} {row['default']}")
        return
    rows = [r for r in reg.rows() if kind is None or r["kind"] == kind]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    cols = ("kind", "name", "plugin", "distribution", "version")
    if plain or not stdout.is_terminal:
        for r in rows:
            print("\t".join(r[c] for c in cols))
        return
    table = Table(title="fer plugins")
    for col in cols:
        table.add_column(col, no_wrap=True, overflow="fold")
    for r in rows:
        table.add_row(*(r[c] for c in cols))
    stdout.print(table, markup=False, crop=False)


def add_plugin_commands() -> None:
    """Let every plugin add its commands (once per process)."""
    if _state["commands_added"]:
        return
    from .registry import get_registry

    _state["commands_added"] = True
    get_registry().register_commands(app)


def main(argv: list[str] | None = None) -> None:
    from .errors import user_message

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        add_plugin_commands()
        app(args=argv, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - the one error boundary
        msg = user_message(e)
        if msg is not None and os.environ.get("RANK", "0") != "0":
            # under torchrun rank 0 meets the same error and reports it; leave it the time to, as
            # torchrun stops every process once one has exited
            time.sleep(5)
            os._exit(2)
        if msg is None or debug:
            import traceback

            traceback.print_exc()
            if msg is None:
                print(f"error: {REPORT_BUGS}", file=sys.stderr)
                sys.exit(1)
        print(f"error: {msg}", file=sys.stderr)
        if "WORLD_SIZE" in os.environ:  # under torchrun: no C++ teardown of a process group still held
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)


if __name__ == "__main__":
    main()
