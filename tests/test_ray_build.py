"""Distributed builds on a local Ray cluster (``build-index --ray``): one Ray session for the module.

The session listens on 127.0.0.1 only (checked below), has 4 logical CPUs for 1-2 actors
(a spare CPU for Ray Data's read task: ray#44687), and every test runs under an alarm.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import json
import operator
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_shared_data
from ray_helpers import alarm_after, local_ray, photos_with_a_broken_one

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install 'retrieval[ray]'"
)
ROOT = Path(__file__).resolve().parents[1]
TEST_SECONDS = 60


@pytest.fixture(autouse=True)
def alarm():
    with alarm_after(TEST_SECONDS):
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray session for the module, started the way ``--ray local`` starts one (so the
    loopback check below checks the build's own way); the builds join it."""
    assert "ray" not in sys.modules, "ray was imported before the loopback setting could apply"
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 COCO photos and one truncated JPEG, as loose files."""
    return photos_with_a_broken_one(tmp_path_factory.mktemp("ray-photos"))


def _build(photos: Path, index: Path, tiny_clip_dir: Path, *extra: str) -> None:
    from retrieval.cli.main import main

    args = [
        "build-index",
        "--images",
        str(photos),
        "--index",
        str(index),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--index-type",
        "flat",
        "--quiet",
        *extra,
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _vectors(index) -> np.ndarray:
    return np.concatenate(list(index.vector_source("clip/image").chunks())).astype(np.float32)


def test_ray_build_is_the_single_machine_build(ray_cluster, photos, tiny_clip_dir, tmp_path, monkeypatch):
    from retrieval.api.engine import open_index
    from retrieval.embed import ray_pipeline

    submitted = []
    run_units = ray_pipeline.embed_images_on_ray

    def spy(refs, encoder, options, work_dir, ray_options):
        submitted.append(ray_options)
        return run_units(refs, encoder, options, work_dir, ray_options)

    monkeypatch.setattr(ray_pipeline, "embed_images_on_ray", spy)
    _build(photos, tmp_path / "single", tiny_clip_dir, "--workers", "0", "--batch-size", "4")
    _build(
        photos, tmp_path / "ray", tiny_clip_dir, "--ray", "local", "--batch-size", "4", "--progress-shard-size", "8"
    )  # 25 photos -> 4 units, one task each
    assert [o.address for o in submitted] == ["local"]  # the CLI went through Ray
    single, distributed = open_index(tmp_path / "single", device="cpu"), open_index(tmp_path / "ray", device="cpu")
    assert distributed.items("image")["id"] == single.items("image")["id"]
    assert len(single.items("image")["id"]) == 24
    a, b = _vectors(single), _vectors(distributed)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.9999, cosine.min()
    for query in ("a dog", "food on a plate", "a street with cars"):
        assert [h.id for h in distributed.text_to_image(query, k=10)] == [
            h.id for h in single.text_to_image(query, k=10)
        ]
    errors = [json.loads(line) for line in (tmp_path / "ray" / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["zz-broken.jpg"], errors
    assert errors == [json.loads(line) for line in (tmp_path / "single" / "errors.jsonl").read_text().splitlines()]
    assert not (tmp_path / "ray" / ".work").exists()  # the units are removed after the commit


def test_rerun_submits_only_the_missing_units(ray_cluster, photos, tiny_clip_dir, tmp_path):
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.embed.ray_pipeline import RayOptions, embed_images_on_ray
    from retrieval.encoders.registry import load_clip_encoder

    refs = gather_items([photos], []).images
    encoder = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    options = EmbedOptions(batch_size=4, progress=False)
    ray_options = RayOptions(address="local", unit_size=8, actors=1, encoders=_choice(tiny_clip_dir))
    first = embed_images_on_ray(refs, encoder, options, tmp_path, ray_options)
    assert first.resumed == 0 and len(first.rows) == 24 and len(first.errors) == 1
    units = sorted((tmp_path / ".work").glob("*/shard-*.npz"))
    assert [u.name for u in units] == [f"shard-{a:010d}-{b:010d}.npz" for a, b in ((0, 8), (8, 16), (16, 24), (24, 25))]
    units[1].unlink()  # lost
    units[3].write_bytes(units[3].read_bytes()[:100])  # cut short: not a valid output
    kept = {u: (os.stat(u).st_ino, os.stat(u).st_mtime_ns) for u in (units[0], units[2])}
    again = embed_images_on_ray(refs, encoder, options, tmp_path, ray_options)
    assert again.resumed == 16  # units 0 and 2 were not submitted again
    assert {u: (os.stat(u).st_ino, os.stat(u).st_mtime_ns) for u in kept} == kept
    assert units[1].is_file() and units[3].is_file()
    assert [r.ref.id for r in again.rows] == [r.ref.id for r in first.rows]
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert [(e.path, e.reason) for e in again.errors] == [(e.path, e.reason) for e in first.errors]


def test_a_unit_that_raises_fails_the_build_with_a_clear_error(ray_cluster, photos, tiny_clip_dir, tmp_path):
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.embed.ray_pipeline import (
        RayBuildError,
        RayOptions,
        embed_images_on_ray,
    )
    from retrieval.encoders.registry import load_clip_encoder

    (tmp_path / ".work").write_text("a file where the work folder goes")  # every unit's write fails
    refs = gather_items([photos], []).images[:8]
    encoder = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    with pytest.raises(RayBuildError, match=r"a work unit failed on Ray \((FileExistsError|NotADirectoryError)"):
        embed_images_on_ray(
            refs,
            encoder,
            EmbedOptions(batch_size=4, progress=False),
            tmp_path,
            RayOptions(address="local", unit_size=4, actors=1, encoders=_choice(tiny_clip_dir)),
        )


def _choice(tiny_clip_dir: Path):
    from retrieval.core.config import EncoderChoice

    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


def _listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    import psutil

    return [
        (c.laddr.ip, c.laddr.port, c.pid)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_every_ray_process_listens_on_loopback_only(ray_cluster):
    import psutil

    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    assert len(pids) >= 3  # the driver, the GCS server, the raylet (and workers)
    listening = _listeners(pids)
    assert listening, "no Ray listener found: the check would pass vacuously"
    outside = [entry for entry in listening if not _is_loopback(entry[0])]
    assert not outside, f"Ray listens beyond loopback: {outside}"


def test_the_cli_imports_ray_only_for_a_ray_build():
    code = "import sys, retrieval.cli.main, retrieval.api.build; assert 'ray' not in sys.modules, 'ray imported'"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr


def test_units_are_one_per_source_shard_and_whole_batches_of_loose_files(tmp_path):
    from retrieval.embed.ray_units import Unit, cut_units
    from retrieval.sources.items import ImageRef
    from retrieval.sources.webdataset_tar import TarMember

    def member(shard: str, key: int) -> ImageRef:  # one source argument (a brace range) names both shards
        return ImageRef(uri=f"{shard}#{key}", opener=TarMember(shard, key, 1), source="{a,b}.tar")

    loose = [ImageRef(path=tmp_path / f"{i}.jpg") for i in range(5)]
    memory = [
        ImageRef(uri=f"mem:{i}", opener=lambda: b"") for i in range(3)
    ]  # an opener without a file: as loose items
    refs = (
        loose[:3] + [member("a.tar", i) for i in range(7)] + [member("b.tar", i) for i in range(2)] + loose[3:] + memory
    )
    assert cut_units(refs, 2) == [
        Unit(0, 2),
        Unit(2, 3),
        Unit(3, 10),
        Unit(10, 12),
        Unit(12, 14),
        Unit(14, 16),
        Unit(16, 17),
    ]
    with pytest.raises(ValueError):
        cut_units(refs, 0)


def test_tar_shards_are_one_unit_each_and_index_as_without_ray(ray_cluster, tiny_clip_dir, tmp_path, monkeypatch):
    from test_sources_shards import QUIET, coco_samples, write_shards

    import retrieval
    from retrieval.embed import ray_pipeline
    from retrieval.embed.ray_pipeline import RayOptions

    require_shared_data()
    shards = write_shards(tmp_path / "shards", coco_samples(12), per_shard=5)
    cuts = []
    cut = ray_pipeline.cut_units
    monkeypatch.setattr(ray_pipeline, "cut_units", lambda refs, size: cuts.append(cut(refs, size)) or cuts[-1])
    built = {}
    for name, ray_options in (("single", None), ("ray", RayOptions(address="local", actors=2))):
        built[name] = retrieval.build_index(
            images=[str(shards / "{00000..00002}.tar")],
            index=tmp_path / name,
            embed=QUIET,
            encoders=_choice(tiny_clip_dir),
            options=retrieval.BuildOptions(ray=ray_options),
        )
    assert [[(u.start, u.stop) for u in units] for units in cuts] == [[(0, 5), (5, 10), (10, 12)]]
    assert built["ray"].items("image")["id"] == built["single"].items("image")["id"]
    a, b = _vectors(built["single"]), _vectors(built["ray"])
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    assert built["ray"].items("caption")["id"] == built["single"].items("caption")["id"]


class _Poison:
    """An opener that cannot be unpickled: the unit holding it fails with ZeroDivisionError on its actor."""

    def __reduce__(self):
        return (operator.truediv, (1, 0))

    def __call__(self) -> bytes:
        raise AssertionError("never called")


def test_a_rerun_after_a_failed_unit_embeds_only_the_units_not_done(ray_cluster, photos, tiny_clip_dir, tmp_path):
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.embed.ray_pipeline import (
        RayBuildError,
        RayOptions,
        embed_images_on_ray,
    )
    from retrieval.encoders.registry import load_clip_encoder
    from retrieval.sources.items import ImageRef

    good = gather_items([photos], []).images[:12]
    fixed = ImageRef(uri="mem:last", version=1, opener=functools.partial(Path.read_bytes, good[0].path))
    poisoned = ImageRef(uri="mem:last", version=1, opener=_Poison())  # the same item to the job key
    encoder = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    options = EmbedOptions(batch_size=4, progress=False)
    ray_options = RayOptions(address="local", unit_size=4, actors=1, encoders=_choice(tiny_clip_dir))
    with pytest.raises(RayBuildError, match="ZeroDivisionError"):
        embed_images_on_ray(good + [poisoned], encoder, options, tmp_path / "index", ray_options)
    done = sorted(p.name for p in (tmp_path / "index" / ".work").glob("*/shard-*.npz"))
    assert done and "shard-0000000012-0000000013.npz" not in done, done
    again = embed_images_on_ray(good + [fixed], encoder, options, tmp_path / "index", ray_options)
    assert again.resumed == 4 * len(done)
    fresh = embed_images_on_ray(good + [fixed], encoder, options, tmp_path / "fresh", ray_options)
    assert fresh.resumed == 0 and [r.ref.id for r in again.rows] == [r.ref.id for r in fresh.rows]
    np.testing.assert_array_equal(again.vectors, fresh.vectors)


def test_add_on_ray_is_the_single_machine_add(ray_cluster, photos, tiny_clip_dir, tmp_path, monkeypatch):
    """``add --ray`` embeds only the new photos on Ray; the grown index equals one grown without Ray."""
    from retrieval.api.engine import open_index
    from retrieval.cli.main import main
    from retrieval.embed import ray_pipeline

    submitted = []
    run_units = ray_pipeline.embed_images_on_ray

    def spy(refs, encoder, options, work_dir, ray_options):
        submitted.append((len(refs), ray_options.address, ray_options.encoders.clip))
        return run_units(refs, encoder, options, work_dir, ray_options)

    monkeypatch.setattr(ray_pipeline, "embed_images_on_ray", spy)

    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    names = sorted(p.name for p in photos.glob("*.jpg") if not p.name.startswith("zz"))
    for name in names[:16]:
        shutil.copy(photos / name, first / name)
    for name in names[16:]:
        shutil.copy(photos / name, later / name)
    for label in ("single", "ray"):
        _build(first, tmp_path / label, tiny_clip_dir, "--workers", "0", "--batch-size", "4")
    for label, extra in (("single", ["--workers", "0"]), ("ray", ["--ray", "local"])):
        result = CliRunner().invoke(
            main,
            [
                "add",
                "--images",
                str(later),
                "--images",
                str(first),
                "--index",
                str(tmp_path / label),
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--quiet",
                "--json",
                *extra,
            ],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output.strip().splitlines()[-1])
        assert report["added"]["image"] == len(names) - 16 and report["already_present"]["image"] == 16, report
    assert submitted == [(len(names) - 16, "local", "open_clip:tiny")]  # only the new photos went to Ray
    single, distributed = open_index(tmp_path / "single", device="cpu"), open_index(tmp_path / "ray", device="cpu")
    assert distributed.items("image")["id"] == single.items("image")["id"]
    a, b = _vectors(single), _vectors(distributed)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    assert [h.id for h in distributed.text_to_image("a dog", k=10)] == [
        h.id for h in single.text_to_image("a dog", k=10)
    ]
    assert not (tmp_path / "ray" / ".work").exists()
