"""The committed fixture index (tests/fixtures, written by tools/make_fixture_index.py) still opens and answers
as it did when it was written; a manifest of a format this version does not read is refused by name."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import retrieval
from retrieval.cli import main as cli
from retrieval.core.errors import IndexFormatError
from retrieval.store.layout import FORMAT_VERSION, MANIFEST_NAME
from retrieval.store.manifest import manifest_digest

FIXTURES = Path(__file__).parent / "fixtures"
TOOL = Path(__file__).parents[1] / "tools" / "make_fixture_index.py"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
SCORE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def fixture_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/fixtures (index + query photos), so no test writes into the checkout."""
    root = tmp_path_factory.mktemp("fixture") / "fixtures"
    shutil.copytree(FIXTURES, root)
    return root


@pytest.fixture(scope="module")
def fixture_index(fixture_copy: Path) -> Any:
    return retrieval.open_index(fixture_copy / EXPECTED["index"], device="cpu")


@pytest.fixture(scope="module")
def tool() -> Any:
    """tools/make_fixture_index.py as a module: its ``ask`` asks the queries as it did when it wrote the answers."""
    spec = importlib.util.spec_from_file_location("make_fixture_index", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixture_is_small() -> None:
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 1 << 20, f"tests/fixtures holds {size} bytes"


def test_fixture_manifest_is_current_format(fixture_index: Any) -> None:
    assert fixture_index.manifest["format"] == FORMAT_VERSION
    assert {role: rec["spec"] for role, rec in fixture_index.manifest["encoders"].items()} == EXPECTED["encoders"]


@pytest.mark.parametrize("query", EXPECTED["queries"], ids=lambda q: f"{q['kind']}-{q['query']}-{q['route']}")
def test_fixture_answers(tool: Any, fixture_copy: Path, query: dict[str, Any]) -> None:
    """Through the ``retrieval`` command: the same hits in the same order, scores within SCORE_TOLERANCE."""
    assert query["k"] == tool.K
    hits = tool.ask(query, fixture_copy)
    label = "uri" if query["kind"] == "text_to_image" else "caption"
    assert [(hit["id"], hit[label]) for hit in hits] == [(want["id"], want[label]) for want in query["hits"]]
    for hit, want in zip(hits, query["hits"], strict=True):
        assert hit["score"] == pytest.approx(want["score"], abs=SCORE_TOLERANCE)


def _with_format(fixture_copy: Path, tmp_path: Path, version: object) -> Path:
    """A copy of the fixture index whose manifest says ``format: version``, its own sha256 recomputed
    (so the format check, not the checksum, is what refuses it)."""
    index = tmp_path / "index"
    shutil.copytree(fixture_copy / EXPECTED["index"], index)
    manifest = json.loads((index / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["format"] = version
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (index / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return index


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "2.0-beta"])
def test_unknown_format_is_refused_by_name(fixture_copy: Path, tmp_path: Path, version: object) -> None:
    index = _with_format(fixture_copy, tmp_path, version)
    with pytest.raises(IndexFormatError) as raised:
        retrieval.open_index(index, device="cpu")
    message = str(raised.value)
    assert f"format {version!r}" in message
    assert f"reads format {FORMAT_VERSION}" in message
    assert "upgrade retrieval" in message and "rebuild" in message


def test_unknown_format_cli_message(fixture_copy: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    index = _with_format(fixture_copy, tmp_path, FORMAT_VERSION + 1)
    result = CliRunner().invoke(cli, ["info", "--index", str(index)])
    assert result.exit_code != 0
    assert f"format {FORMAT_VERSION + 1}" in result.output and "upgrade retrieval" in result.output
