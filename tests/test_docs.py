"""The docs hang together: the README is a short front page that reaches every page, and
every relative link in them points at a file that exists."""

from __future__ import annotations

import re

from testkit.helpers import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_page_that_reaches_every_doc_page() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(LINK.findall(readme))
    assert {f"docs/{page.name}" for page in DOCS.glob("*.md")} <= linked


def test_every_relative_link_points_at_a_file() -> None:
    for page in [PROJECT_ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
