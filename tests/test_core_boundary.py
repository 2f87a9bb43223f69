"""The core stays small and ignorant of techniques; plugins use only its public API."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from conftest import REPO

CORE = REPO / "fer_core"
#: libraries that belong to techniques, never to the kernel
FORBIDDEN = {"timm", "torchvision", "albumentations", "mlflow", "optuna", "transformers", "peft", "onnx",
             "onnxruntime", "cv2", "fer_plugins"}
#: issue 9 set 2,500; issue 11's data-parallel training (dist.py, the engine's DDP path, the
#: sharded loader), run groups for trackers and the leak warning, and issue 12's metric-driven
#: schedules added ~110 lines of kernel code
MAX_CODE_LINES = 2650


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not comments, not docstrings (cloc's counting)."""
    src = path.read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return len(lines)


def test_the_core_imports_no_technique_library():
    bad = {f"{p.name}: {m}" for p in CORE.glob("*.py") for m in _imports(p) if m.split(".")[0] in FORBIDDEN}
    assert not bad


def test_the_core_is_small():
    total = sum(code_lines(p) for p in CORE.glob("*.py"))
    assert total <= MAX_CODE_LINES, f"fer_core has {total} code lines (limit {MAX_CODE_LINES})"


def test_plugins_bench_and_the_example_import_only_the_public_api():
    roots = [REPO / "plugins", REPO / "bench", REPO / "examples"]
    bad = sorted(f"{p.relative_to(REPO)}: {m}" for root in roots for p in root.rglob("*.py") for m in _imports(p)
                 if m.startswith("fer_core") and m != "fer_core.api")
    assert not bad


def test_code_line_counter_ignores_docstrings_and_comments(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""doc\nmore"""\n\n# comment\nx = 1  # trailing\n\ndef f():\n    """d"""\n    return x\n')
    assert code_lines(f) == 3
