"""The release stands alone: ``python -m build`` makes a wheel and an sdist, and the wheel installed into a fresh
venv (not the checkout) builds an index and answers queries through its ``retrieval`` console script.

The fresh venv gets the wheel with ``--no-deps``; its dependencies come from this test's own environment through a
``.pth`` file holding that site-packages path. A path line in a ``.pth`` does not process the ``.pth`` files inside
that folder, so the editable install's finder of the checkout stays inactive: the tests assert that ``retrieval``
is imported from the fresh venv, and every command runs in a temporary folder, away from the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from retrieval.core.version import __version__

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ["retrieval/py.typed", "retrieval/serve/page/index.html", "retrieval/asif/data/imagenet_wordnet.tsv"]
PHOTOS = {
    "chelsea": "a ginger tabby cat resting and looking to the side",
    "coffee": "a cup of coffee with a saucer and a spoon",
    "rocket": "a rocket standing on the launch pad",
    "astronaut": "an astronaut in a white spacesuit",
}


def _run(command: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run ``command`` in ``cwd`` without PYTHONPATH or an active venv; its stdout (stderr shown on failure)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build`` of the checkout (the sdist, then the wheel built from it) into a temporary folder."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel only; its dependencies are this environment's site-packages, by path."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    python = root / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=root,
    )
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip())
    (site / "_retrieval_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    return root


def test_build_makes_wheel_and_sdist_with_package_data(dist: Path) -> None:
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"retrieval-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"retrieval-{__version__}.tar.gz"]
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"retrieval-{__version__}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"retrieval-{__version__}.dist-info/entry_points.txt").decode()
    assert set(PACKAGE_DATA) <= names
    assert {
        "retrieval/serve/page/app.js",
        "retrieval/serve/page/style.css",
        "retrieval/asif/data/WORDNET_LICENSE",
    } <= names
    assert f"Version: {__version__}" in metadata
    assert "retrieval = retrieval.cli:main" in entry_points
    with tarfile.open(sdists[0]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert set(PACKAGE_DATA) | {"pyproject.toml", "README.md"} <= in_sdist


def test_installed_wheel_is_what_runs(venv: Path, tmp_path: Path) -> None:
    """``retrieval`` comes from the fresh venv, not the checkout; its dependencies from this environment."""
    code = "import retrieval, torch; print(retrieval.__file__); print(torch.__file__)"
    package, torch = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path).split()
    assert Path(package).is_relative_to(venv)
    assert not Path(package).is_relative_to(ROOT)
    assert Path(torch).is_relative_to(sysconfig.get_paths()["purelib"])


def test_installed_version(venv: Path, tmp_path: Path) -> None:
    assert (
        _run([str(venv / "bin" / "retrieval"), "--version"], cwd=tmp_path).strip()
        == f"retrieval, version {__version__}"
    )


def _photos(folder: Path) -> Path:
    """A few of scikit-image's sample photos as PNG files, and a caption file for them."""
    from PIL import Image
    from skimage import data

    (folder / "photos").mkdir(parents=True)
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / "photos" / f"{name}.png")
    captions = list(PHOTOS.values()) + ["a dog running on the beach"]
    (folder / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return folder


def _hits(command: list[str], cwd: Path) -> list[dict]:
    """The hits a query command prints with ``--json`` (one JSON object a line), best first."""
    return [json.loads(line) for line in _run(command, cwd).splitlines() if line.strip()]


def test_installed_builds_and_queries(venv: Path, tmp_path: Path) -> None:
    """The main job through the installed console script: an offline ASIF index, then text->image and image->caption."""
    work = _photos(tmp_path)
    cli = str(venv / "bin" / "retrieval")
    encoders = ["--image-encoder", "efficientnet-lite0", "--text-encoder", "minilm", "--anchors", "builtin:imagenet"]
    _run([cli, "build-index", "--images", "photos", "--captions", "captions.txt", "--index", "index", *encoders], work)
    assert json.loads((work / "index" / "manifest.json").read_text())["tool"]["version"] == __version__
    found = _hits([cli, "text-to-image", "a cat", "--index", "index", "-k", "2", "--json"], work)
    assert Path(found[0]["uri"]).name == "chelsea.png"
    found = _hits([cli, "image-to-caption", "photos/rocket.png", "--index", "index", "-k", "2", "--json"], work)
    assert found[0]["caption"] == PHOTOS["rocket"]
