"""docs/results.md is shared by several resumable scripts: each owns one marked section."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fer_core.api import atomic_write_text  # noqa: E402

RESULTS = REPO / "docs" / "results.md"
HEADER = """# Results

Every figure on this page was produced by a script in `bench/` from real `fer` runs on the faces
in `../shared/data`, on the development machine (2-core AMD EPYC with AVX512-BF16, no GPU), with
the command given beside it. The scripts are resumable: rerunning one fills in what is missing.
Percentages are on validation splits; FER2013's private test split is never used.
"""


def update_section(name: str, body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.is_file() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
