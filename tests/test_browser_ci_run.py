""".ci/run installs Debian's chromium for the browser tests (apt-get update, then install without
recommends) when none is on PATH, leaves apt alone when one is, and refuses clearly when it would
need root and is not root.

Run on a copy of .ci/run beside fake data, with a PATH of stand-ins (apt-get, id, make) that log calls.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("dirname") is None, reason="needs bash")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _ci_run(tmp_path: Path, *, chromium: bool, uid: int) -> tuple[subprocess.CompletedProcess, str]:
    """Run a copy of .ci/run; returns the process and the log of the stand-ins' calls."""
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", clone / ".ci" / "run")
    for need in ("coco-train-mini", "imagenet-sample", "cifar10-test/test"):
        (tmp_path / "shared" / "data" / need).mkdir(parents=True)
    (tmp_path / "shared" / "data" / "coco-train-mini" / "captions.jsonl").write_text("")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    _script(bin_dir / "id", f"echo {uid}")
    _script(bin_dir / "make", f'echo "make $* CI=$CI" >> {log}')
    # apt-get "installs" chromium by putting a stand-in on PATH
    _script(
        bin_dir / "apt-get",
        f'echo "apt-get $*" >> {log}\n[ "$1" = install ] && printf "#!/bin/sh\\n" > {bin_dir}/chromium '
        f"&& chmod +x {bin_dir}/chromium\nexit 0",
    )
    if chromium:
        _script(bin_dir / "chromium", "exit 0")
    done = subprocess.run(
        [shutil.which("bash"), str(clone / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(bin_dir)},
    )
    return done, log.read_text() if log.exists() else ""


def test_installs_chromium_when_missing(tmp_path):
    done, calls = _ci_run(tmp_path, chromium=False, uid=0)
    assert done.returncode == 0, done.stderr
    assert calls.splitlines() == [
        "apt-get update",
        "apt-get install -y --no-install-recommends chromium",
        "make test CI=1",
    ]


def test_leaves_apt_alone_when_chromium_is_there(tmp_path):
    done, calls = _ci_run(tmp_path, chromium=True, uid=0)
    assert done.returncode == 0 and calls.splitlines() == ["make test CI=1"], (done.stderr, calls)


def test_refuses_clearly_without_root(tmp_path):
    done, calls = _ci_run(tmp_path, chromium=False, uid=1000)
    assert done.returncode == 1 and calls == ""
    assert "chromium is not on PATH" in done.stderr and "root" in done.stderr
