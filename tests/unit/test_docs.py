"""Documentation that must not drift from the code."""

from __future__ import annotations

from pathlib import Path

from app.settings import configuration_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_is_generated_from_the_settings() -> None:
    """The README's configuration table equals the one generated from `Settings`."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- configuration:start")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- configuration:end -->")]
    assert table == configuration_markdown(), "run: python -m app.settings, paste into README"


def test_readme_shows_the_two_quickstart_commands() -> None:
    """A newcomer finds `make run` and `make test` in the README."""
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


def test_the_code_cites_no_document_the_repository_does_not_ship() -> None:
    """Docstrings and comments say the behaviour, or point at README and docs/: a "SPEC section
    N" names a contract file the distribution does not have."""
    cited = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("app", "mozrest_outbox", "migrations")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "SPEC" in line
    ]
    assert cited == []
