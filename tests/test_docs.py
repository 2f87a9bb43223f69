"""The docs state what the code declares."""

from conftest import REPO
from fer_core.kinds import kind_table


def test_the_kind_table_in_docs_is_generated_from_the_kind_declarations():
    page = (REPO / "docs" / "plugins.md").read_text()
    body = page.split("<!-- kinds:begin")[1].split("-->", 1)[1].split("<!-- kinds:end -->")[0]
    assert body.strip() == kind_table(), "regenerate: python -c 'from fer_core.kinds import kind_table; print(kind_table())'"
