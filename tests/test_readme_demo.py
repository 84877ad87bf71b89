"""The README's sample output is the demo's real output: ``examples/demo.sh`` runs into a temporary folder
and every ``rank score item`` line the README shows appears under the same ``==`` heading, with the same
rank and item and a score within 0.01.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = "index_data/demo"  # what the README's lines show: the demo's default output folder
HIT = re.compile(r"^\s+(\d+)\s+(-?\d+\.\d+)\s+(\S.*?)\s*$")
SCORE_TOLERANCE = 0.01

pytestmark = pytest.mark.slow
Hit = tuple[int, float, str]


def sections(lines: list[str], demo_dir: Path | None = None) -> dict[str, list[Hit]]:
    """``== heading`` -> the ``rank score item`` lines under it; ``demo_dir`` in a heading reads as the default."""
    found: dict[str, list[Hit]] = {}
    heading = None
    for line in lines:
        if line.startswith("== "):
            heading = line.strip().replace(str(demo_dir), DEFAULT_DIR) if demo_dir else line.strip()
            found.setdefault(heading, [])
        elif heading is not None and (hit := HIT.match(line)):
            found[heading].append((int(hit.group(1)), float(hit.group(2)), hit.group(3)))
    return found


def readme_sample() -> dict[str, list[Hit]]:
    """The headings and hit lines of the README's code block that shows the demo's output."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```[^\n]*\n(.*?)```", readme, flags=re.DOTALL)
    shown = [sections(block.splitlines()) for block in blocks if "\n== retrieval " in "\n" + block]
    assert len(shown) == 1, "the README shows the demo's output in one code block"
    return shown[0]


def run_demo(out: Path) -> str:
    """``bash examples/demo.sh`` with this interpreter's bin folder first on PATH, writing under ``out``."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RETRIEVAL_DEMO_DIR": str(out)}
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "demo.sh")], capture_output=True, text=True, env=env, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def same_item(shown: str, printed: str, out: Path) -> bool:
    """A caption must match as it is; a path shown as ``.../index_data/demo/X`` must be ``out/X``."""
    prefix = f".../{DEFAULT_DIR}/"
    if shown.startswith(prefix):
        return Path(printed) == out / shown[len(prefix) :]
    return shown == printed


def test_readme_sample_output_is_what_the_demo_prints(tmp_path):
    pytest.importorskip("skimage", reason="the demo's photos come from scikit-image (the demo extra)")
    sample = readme_sample()
    assert sum(len(hits) for hits in sample.values()) >= 4, sample
    out = tmp_path / "demo"
    printed = sections(run_demo(out).splitlines(), demo_dir=out)
    for heading, hits in sample.items():
        assert heading in printed, f"the demo printed no heading {heading!r}; it printed {list(printed)}"
        for rank, score, item in hits:
            check_line(heading, (rank, score, item), printed[heading], out)


def check_line(heading: str, shown: Hit, printed: list[Hit], out: Path) -> None:
    """The README's line is printed at its rank with its score (within the tolerance); two hits whose scores
    lie within the tolerance of each other may trade places, as another CPU's rounding can swap them."""
    rank, score, item = shown
    by_rank = {got_rank: got_score for got_rank, got_score, _ in printed}
    assert rank in by_rank, f"{heading}: no rank {rank} in {printed}"
    found = [(got_rank, got_score) for got_rank, got_score, got_item in printed if same_item(item, got_item, out)]
    assert found, f"{heading}: {item} is not among the hits {printed}"
    got_rank, got_score = found[0]
    assert abs(got_score - score) <= SCORE_TOLERANCE, f"{heading}: {item} scored {got_score}, the README says {score}"
    assert got_rank == rank or abs(by_rank[rank] - got_score) <= SCORE_TOLERANCE, (
        f"{heading}: {item} is at rank {got_rank}, the README says {rank}, and no near-tie explains it: {printed}"
    )


def test_check_line_allows_only_near_ties_to_swap(tmp_path):
    printed = [(1, 0.1586, "a"), (2, 0.1566, "b"), (3, 0.0900, "c")]
    check_line("h", (1, 0.1566, "b"), printed, tmp_path)  # a near-tie: may trade places
    check_line("h", (2, 0.1580, "a"), printed, tmp_path)
    with pytest.raises(AssertionError, match="no near-tie"):
        check_line("h", (1, 0.0900, "c"), printed[:1] + [(2, 0.0950, "c")], tmp_path)
    with pytest.raises(AssertionError, match="scored"):
        check_line("h", (1, 0.2000, "a"), printed, tmp_path)
    with pytest.raises(AssertionError, match="not among"):
        check_line("h", (1, 0.1586, "z"), printed, tmp_path)
