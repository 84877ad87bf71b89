"""The documentation holds together: the mkdocs site under docs/ builds with ``--strict`` (every link and
anchor resolves, every page is in the nav), and every relative link in the README names a file that exists.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import under_ci

REPO = Path(__file__).resolve().parents[1]
# [text](target) and <a href="target">; the target ends at whitespace or the closing parenthesis
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.IGNORECASE)
NOT_FILES = ("http://", "https://", "mailto:", "#")


def relative_links(markdown: str) -> list[str]:
    """The link targets in ``markdown`` that name a file of the repository (external URLs and anchors left out)."""
    without_code = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    without_code = re.sub(r"`[^`\n]*`", "", without_code)
    targets = MARKDOWN_LINK.findall(without_code) + HTML_LINK.findall(without_code)
    return [target for target in targets if not target.startswith(NOT_FILES)]


def test_relative_links_are_found():
    assert relative_links("[a](docs/x.md#part) [b](https://e.org) [c](#top) `[d](no.md)` <a href='y.md'>y</a>") == [
        "docs/x.md#part",
        "y.md",
    ]


def test_readme_links_point_at_existing_files():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = relative_links(readme)
    assert links, "the README links into the docs site"
    missing = [link for link in links if not (REPO / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_mkdocs_builds_strictly(tmp_path):
    try:
        import material  # noqa: F401  (the theme mkdocs.yml names)
        import mkdocs  # noqa: F401
    except ImportError as missing:
        if under_ci():
            pytest.fail(f"{missing}: the test extras install mkdocs and mkdocs-material")
        pytest.skip(f"{missing} (pip install mkdocs mkdocs-material)")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [*command, "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "serving" / "index.html").is_file()
