"""The docs state what the code declares."""

from conftest import REPO
from fer_core.kinds import KINDS


def kind_table() -> str:
    """The kind table of docs/plugins.md, from the kind declarations."""
    rows = ["| kind | hook | factory signature | returns | recipe table | default |", "|---|---|---|---|---|---|"]
    for k in KINDS:
        sig = f"f({k.context}, /, **params)" if k.context else "f(**params)"
        rows.append(f"| {k.name} | `{k.hook}` | `{sig}` | {k.returns} | {k.place or '—'} | {k.default or '—'} |")
    return "\n".join(rows)


def test_the_kind_table_in_docs_is_generated_from_the_kind_declarations():
    page = (REPO / "docs" / "plugins.md").read_text()
    body = page.split("<!-- kinds:begin")[1].split("-->", 1)[1].split("<!-- kinds:end -->")[0]
    assert body.strip() == kind_table(), "regenerate: python -c 'import sys; sys.path[:0] = [\"tests\"]; from test_docs import kind_table; print(kind_table())'"
