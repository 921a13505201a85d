"""The documentation stays a site: the README is a short front door (its details live in docs/),
every page in docs/ is reachable from the mkdocs nav, and nothing cites an outside design
document by section instead of saying the point itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def nav_pages(entries: list[Any]) -> set[str]:
    pages: set[str] = set()
    for entry in entries:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            if isinstance(value, list):
                pages |= nav_pages(value)
            else:
                pages.add(str(value))
    return pages


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move details to docs/"


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    excluded = [
        line.strip() for line in config.get("exclude_docs", "").splitlines() if line.strip()
    ]
    pages = {
        page.relative_to(DOCS).as_posix()
        for page in DOCS.rglob("*.md")
        if not any(page.relative_to(DOCS).as_posix().startswith(x) for x in excluded)
    }
    assert pages - nav == set(), "pages missing from the mkdocs nav"
    assert nav - pages == set(), "nav entries without a page"


def test_the_readme_maps_every_guide() -> None:
    readme = (ROOT / "README.md").read_text()
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    missing = {
        p for p in nav_pages(config["nav"]) if p != "index.md" and f"(docs/{p})" not in readme
    }
    assert missing == set(), "pages the README's map of the docs does not link"


def test_no_tracked_file_cites_a_design_section() -> None:
    # Built so that this file does not match itself.
    needle = "DESIGN " + "\N{SECTION SIGN}"
    found = subprocess.run(
        ["git", "grep", "-l", "-F", needle],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode in (0, 1), found.stderr
    assert found.stdout == "", f"files citing {needle!r} instead of saying the point"


# What a reader of each page has installed besides the standard library: the Python client;
# the webhook receiver's reader, the Standard Webhooks package the page names; the import
# guide's reader runs its decrypt command beside the broker, which brings `cryptography`.
_CLIENT = {"credentialbroker_client"}
_READER_HAS = {
    "events.md": _CLIENT | {"standardwebhooks"},
    "import.md": _CLIENT | {"cryptography"},
}


def test_python_examples_import_only_what_their_reader_has() -> None:
    imported: dict[str, set[str]] = {}
    for page in DOCS.rglob("*.md"):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.Import):
                    names = {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = {node.module}
                else:
                    continue
                top = {name.split(".")[0] for name in names}
                imported.setdefault(page.name, set()).update(
                    t for t in top if t not in sys.stdlib_module_names
                )
    assert imported, "no python examples found"
    assert {page: names - _READER_HAS.get(page, _CLIENT) for page, names in imported.items()} == {
        page: set() for page in imported
    }
