"""webdataset tar shards as ``--images``: written by the webdataset library's own ShardWriter, read
member by member (never extracted), paired with their captions, resumable, added to, and robust to
damaged shards. The same queries over the COCO photos as loose files and as shards find the same photos."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import COCO, require_shared_data

import retrieval
from retrieval import EmbedOptions, EncoderChoice, InputError
from retrieval.embed.resume import PROGRESS_SHARD_ENV
from retrieval.embed.workers import PAUSE_ENV
from retrieval.sources.inputs import read_image_sources
from retrieval.sources.shards import container_files, expand_braces
from retrieval.sources.webdataset_tar import TarMember, read_tar_shard

ROOT = Path(__file__).resolve().parents[1]
QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)
QUERIES = ["a plate of food on a table", "a man riding a horse", "a cat sleeping", "people at a birthday party"]
N_PHOTOS = 24


def _choice(tiny_clip_dir: Path) -> EncoderChoice:
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


def coco_samples(n: int) -> list[dict]:
    """The first ``n`` COCO photos, one caption each, as img2dataset would describe them."""
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["image"], row)
    return [
        {
            "key": f"{i:09d}",
            "file": COCO / image,
            "caption": row["caption"],
            "json": {"url": row["flickr_url"], "key": f"{i:09d}", "caption": row["caption"], "status": "success"},
        }
        for i, (image, row) in enumerate(list(first.items())[:n])
    ]


def write_shards(folder: Path, samples: list[dict], per_shard: int = 10) -> Path:
    """Shards written by webdataset's own ShardWriter, ``folder/00000.tar``, ``00001.tar``, ..."""
    wds = pytest.importorskip("webdataset")
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(
                {
                    "__key__": sample["key"],
                    "jpg": sample["file"].read_bytes(),
                    "txt": sample["caption"],
                    "json": sample["json"],
                }
            )
    return folder


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """(shards folder, loose photos folder, samples): the same N_PHOTOS photos both ways."""
    require_shared_data()
    root = tmp_path_factory.mktemp("shards")
    samples = coco_samples(N_PHOTOS)
    loose = root / "loose"
    loose.mkdir()
    for sample in samples:
        shutil.copy(sample["file"], loose / sample["file"].name)
    return write_shards(root / "shards", samples), loose, samples


def test_brace_ranges_keep_zero_padding_and_lists():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_a_missing_shard_of_a_range_is_named(coco_shards):
    shards, _, _ = coco_shards
    with pytest.raises(InputError, match=r"00003\.tar"):
        container_files(str(shards / "{00000..00003}.tar"))
    assert [p.name for p in container_files(str(shards / "{00000..00002}.tar"))] == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert container_files(str(shards / "*.tar")) == container_files(str(shards))  # a glob, a folder of shards


def test_samples_become_paired_image_and_caption_items_with_their_json(coco_shards):
    shards, _, samples = coco_shards
    got = read_image_sources([str(shards / "{00000..00002}.tar")])
    assert not got.errors
    assert len(got.images) == len(got.captions) == N_PHOTOS
    first = got.images[0]
    assert first.uri == f"{(shards / '00000.tar').resolve()}#{samples[0]['key']}"
    assert first.metadata["url"] == samples[0]["json"]["url"]
    assert [c.image_id for c in got.captions] == [ref.id for ref in got.images]
    assert got.captions[0].text == samples[0]["caption"] and got.captions[0].metadata["key"] == samples[0]["key"]
    assert first.read_bytes() == samples[0]["file"].read_bytes()
    opener = first.opener
    assert (
        isinstance(opener, TarMember) and opener.size == samples[0]["file"].stat().st_size
    )  # offset + size, no tar held


def _by_photo(hits, names: dict[str, str]) -> list[str]:
    return [names.get(hit.uri.rsplit("#", 1)[-1], Path(hit.uri).name) for hit in hits]


@pytest.mark.slow
def test_the_same_queries_over_loose_photos_and_shards_find_the_same_photos(tmp_path, tiny_clip_dir, coco_shards):
    shards, loose, samples = coco_shards
    from_files = retrieval.build_index(
        images=[loose], index=tmp_path / "files", encoders=_choice(tiny_clip_dir), embed=QUIET
    )
    from_shards = retrieval.build_index(
        images=[str(shards / "{00000..00002}.tar")],
        index=tmp_path / "shards",
        encoders=_choice(tiny_clip_dir),
        embed=QUIET,
    )
    assert from_shards.info()["counts"] == {"image": N_PHOTOS, "caption": N_PHOTOS}
    url_of = {s["key"]: s["json"]["url"] for s in samples}
    photo_of_url = {s["json"]["url"]: s["file"].name for s in samples}
    names = {key: photo_of_url[url] for key, url in url_of.items()}  # shard key -> json url -> photo
    for query in QUERIES:
        a = from_files.text_to_image(query, k=8)
        b = from_shards.text_to_image(query, k=8)
        assert _by_photo(a, {}) == _by_photo(b, names), query
        assert [round(h.score, 5) for h in a] == [round(h.score, 5) for h in b]
    caption_items = from_shards.items("caption")
    assert set(caption_items["image_id"]) == set(from_shards.items("image")["id"])


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def hostile_shard(folder: Path, photo: bytes) -> Path:
    """One good sample and every kind of bad member a shard can hold."""
    return _tar_with(
        folder / "bad.tar",
        [
            _file("good.jpg", photo),
            _file("good.txt", b"a good photo"),
            _file("good.json", b'{"url": "http://x/good.jpg"}'),
            _file("../escape.jpg", photo),
            _file("/abs/evil.jpg", photo),
            _link("sym.jpg", "/etc/passwd", tarfile.SYMTYPE),
            _link("hard.jpg", "good.jpg", tarfile.LNKTYPE),
            _file("notimage.jpg", b"this is not a JPEG at all"),
            _file("notimage.txt", b"caption of a broken image"),
            _file("nocaption.jpg", photo),
            _file("orphan.txt", b"a caption with no image"),
            _file("good.jpg", photo),  # a duplicate key
            _file("badjson.jpg", photo),
            _file("badjson.txt", b"ok"),
            _file("badjson.json", b"{not json"),
        ],
    )


def test_hostile_members_are_reported_never_followed_or_extracted(tmp_path, coco_shards):
    _, _, samples = coco_shards
    work = tmp_path / "work"
    work.mkdir()
    shard = hostile_shard(work, samples[0]["file"].read_bytes())
    cwd = os.getcwd()
    os.chdir(work)
    try:
        got = read_tar_shard(shard)
    finally:
        os.chdir(cwd)
    assert sorted(ref.uri.rsplit("#", 1)[1] for ref in got.images) == ["badjson", "good", "nocaption", "notimage"]
    reasons = "\n".join(e.reason for e in got.errors)
    for expected in (
        "'../escape.jpg' is an absolute name or one with '..'",
        "'/abs/evil.jpg' is an absolute",
        "'sym.jpg' is a link",
        "'hard.jpg' is a link",
        "duplicate key 'good'",
        "sample 'orphan' has no image",
        "sample 'nocaption': no caption",
        "invalid JSON",
    ):
        assert expected in reasons, expected
    assert all(e.path == str(shard.resolve()) for e in got.errors)
    assert not (tmp_path / "escape.jpg").exists() and not (work / "abs").exists()
    assert {c.text for c in got.captions} == {"a good photo", "caption of a broken image", "ok"}


def test_a_truncated_shard_keeps_its_complete_samples(tmp_path, coco_shards):
    shards, _, _ = coco_shards
    data = (shards / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    whole = read_tar_shard(shards / "00000.tar")
    last = whole.images[-1].opener
    cut.write_bytes(data[: last.offset + last.size // 2])  # the last image's data is cut in half
    got = read_tar_shard(cut)
    assert len(got.images) == len(whole.images) - 1
    assert any("truncated" in e.reason for e in got.errors)
    garbage = tmp_path / "garbage.tar"
    header = whole.images[1].opener.offset - 512  # the tar header of the second sample's image
    garbage.write_bytes(data[:header] + b"\x17" * 512 + data[header + 512 :])
    damaged = read_tar_shard(garbage)
    assert [ref.uri.rsplit("#")[1] for ref in damaged.images] == [whole.images[0].uri.rsplit("#")[1]]
    assert len(damaged.errors) == 1 and "damaged" in damaged.errors[0].reason
    assert damaged.errors[0].reason.endswith("the members after it are not read")
    assert damaged.errors[0].path == str(garbage.resolve())


@pytest.mark.slow
def test_bad_members_land_in_errors_jsonl_and_the_rest_is_indexed(tmp_path, tiny_clip_dir, coco_shards):
    shards, _, samples = coco_shards
    bad = hostile_shard(tmp_path, samples[0]["file"].read_bytes())
    index = retrieval.build_index(
        images=[str(shards / "00000.tar"), str(bad)], index=tmp_path / "i", encoders=_choice(tiny_clip_dir), embed=QUIET
    )
    assert index.info()["counts"]["image"] == 10 + 3  # notimage.jpg fails to decode
    errors = index.errors()
    assert any(e["path"].endswith("bad.tar#notimage") and "not an image" in e["reason"] for e in errors)
    assert any("escape.jpg" in e["reason"] for e in errors)
    with pytest.raises(InputError, match="not a readable tar"):
        (tmp_path / "zero.tar").write_bytes(b"not a tar" * 100)
        retrieval.build_index(
            images=[str(tmp_path / "zero.tar")], index=tmp_path / "j", encoders=_choice(tiny_clip_dir), embed=QUIET
        )
    assert index.info()["counts"]["image"] == 13  # a failed build loses nothing already built


@pytest.mark.slow
def test_add_takes_shards_and_skips_the_samples_already_indexed(tmp_path, tiny_clip_dir, coco_shards):
    shards, _, _ = coco_shards
    index = tmp_path / "i"
    retrieval.build_index(
        images=[str(shards / "{00000..00001}.tar")], index=index, encoders=_choice(tiny_clip_dir), embed=QUIET
    )
    report = retrieval.add_to_index(index, images=[str(shards / "{00000..00002}.tar")], embed=QUIET, device="cpu")
    assert report.already_present == {"image": 20, "caption": 20}
    assert report.added == {"image": N_PHOTOS - 20, "caption": N_PHOTOS - 20}
    assert retrieval.open_index(index, device="cpu").info()["counts"] == {"image": N_PHOTOS, "caption": N_PHOTOS}


SLOW_TAR_BOOT = r"""
import runpy, sys, time
import retrieval.sources.webdataset_tar as tars
_call = tars.TarMember.__call__
tars.TarMember.__call__ = lambda self: (time.sleep(0.02), _call(self))[1]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[PROGRESS_SHARD_ENV] = "4"
    return env | extra


@pytest.mark.slow
def test_a_killed_shard_build_resumes_shard_by_shard(tmp_path, tiny_clip_dir, coco_shards):
    shards, _, _ = coco_shards
    index = tmp_path / "i"
    cmd = [
        str(ROOT / "cli.py"),
        "build-index",
        "--index",
        str(index),
        "--images",
        str(shards / "{00000..00002}.tar"),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "2",
    ]
    boot = tmp_path / "slow_boot.py"
    boot.write_text(SLOW_TAR_BOOT)
    child = subprocess.Popen(
        [sys.executable, str(boot)] + cmd,
        env=_env(**{PAUSE_ENV: "6"}),  # 12 of 24 photos
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the build ended before its pause point"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        os.killpg(child.pid, signal.SIGCONT)
        child.wait(timeout=60)
    written = sorted(p.name for p in (index / ".work").glob("*/shard-*.npz"))
    assert written and not (index / "manifest.json").exists()
    rerun = subprocess.run([sys.executable] + cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {4 * len(written)} of {N_PHOTOS} images already embedded" in rerun.stderr
    fresh = retrieval.build_index(
        images=[str(shards / "{00000..00002}.tar")],
        index=tmp_path / "fresh",
        encoders=_choice(tiny_clip_dir),
        embed=EmbedOptions(batch_size=2, workers=0, progress=False),
    )
    resumed = retrieval.open_index(index, device="cpu")
    for query in QUERIES:
        assert [(h.uri, h.score) for h in resumed.text_to_image(query, k=6)] == [
            (h.uri, h.score) for h in fresh.text_to_image(query, k=6)
        ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_reader_agrees_with_tarfile(tmp_path, fmt):
    from retrieval.sources.tar_headers import iter_members

    path = tmp_path / "t.tar"
    long_dir = "d" * 90 + "/" + "e" * 60  # ustar splits it into prefix + name; GNU and pax write long names
    members = [
        _file("a.jpg", b"x" * 700),
        _file(f"{long_dir}/000000017.jpg", b"y" * 513),
        _file("b/c.txt", b""),
        _link("s.jpg", "a.jpg", tarfile.SYMTYPE),
        _link("h.jpg", "a.jpg", tarfile.LNKTYPE),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(_file("é" * 120 + ".json", b"{}"))
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    members.append((folder, None))
    with tarfile.open(path, "w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size, m.linkname) for m in tar.getmembers()]
    with open(path, "rb") as handle:
        got = [(m.name, m.offset, m.size, m.linkname) for m in iter_members(handle, path.stat().st_size)]
    assert got == expected


def _tar_of(path: Path, files: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info, _ = _file(name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.parametrize("where", [0, 100, 147, 156, 300, 511])
def test_any_changed_header_byte_is_damage(tmp_path, where):
    from retrieval.sources.tar_headers import TarDamage, iter_members

    path = tmp_path / "t.tar"
    data = bytearray(_tar_of(path, {"a.jpg": b"x" * 700, "a.txt": b"a caption"}))
    second = 512 + 1024  # the second member's header (after the first's header and two data blocks)
    data[second + where] = (data[second + where] + 1) % 256 or 1
    path.write_bytes(bytes(data))
    with open(path, "rb") as handle, pytest.raises(TarDamage) as caught:
        names = [m.name for m in iter_members(handle, len(data))]
        assert names[:1] == ["a.jpg"]
    assert caught.value.offset == second


def test_a_negative_size_is_damage_not_a_loop(tmp_path):
    from retrieval.sources.tar_headers import BLOCK, TarDamage, iter_members

    path = tmp_path / "t.tar"
    data = bytearray(_tar_of(path, {"a.jpg": b"x" * 700}))
    data[124:136] = b" -1000\0\0\0\0\0\0"
    data[148:156] = b"        "
    data[148:156] = f"{sum(data[:BLOCK]):06o}\0 ".encode()  # a valid checksum over the negative size
    path.write_bytes(bytes(data))
    with open(path, "rb") as handle, pytest.raises(TarDamage, match="negative number"):
        list(iter_members(handle, len(data)))


def _pax_tar(path: Path, records: bytes, data: bytes) -> Path:
    """A tar of one pax block holding ``records``, then a ustar member "plain.bin" with ``data``
    (its ustar header says 700 bytes whatever the data: a pax size record overrides that)."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    info = tarfile.TarInfo("plain.bin")
    info.size = 700
    with open(path, "wb") as out:
        out.write(pax.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512))
        out.write(info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512) + bytes(1024))
    return path


@pytest.mark.parametrize(
    "records, name, size",
    [
        (b"30 mtime=1796015980.0446277\n", "plain.bin", 700),  # webdataset's pax block: nothing this reader uses
        (b"20 path=renamed.jpg\n11 size=10\n", "renamed.jpg", 10),  # the records that rename and resize the member
    ],
)
def test_pax_records_name_and_size_the_next_member(tmp_path, records, name, size):
    from retrieval.sources.tar_headers import iter_members

    path = _pax_tar(tmp_path / "t.tar", records, b"x" * size)
    with open(path, "rb") as handle:
        got = [(m.name, m.size) for m in iter_members(handle, path.stat().st_size)]
    assert got[:1] == [(name, size)]
    with tarfile.open(path) as tar:  # Python's tarfile reads the same
        assert [(m.name, m.size) for m in tar.getmembers()][:1] == [(name, size)]


@pytest.mark.parametrize("records", [b"99 path=a.jpg\n", b"x path=a.jpg\n", b"15 path=a.jpg\n", b"11 size=1x\n"])
def test_a_damaged_pax_path_or_size_record_is_damage(tmp_path, records):
    from retrieval.sources.tar_headers import TarDamage, iter_members

    path = _pax_tar(tmp_path / "t.tar", records, b"x" * 700)
    with open(path, "rb") as handle, pytest.raises(TarDamage, match="pax"):
        list(iter_members(handle, path.stat().st_size))


def test_an_item_reads_back_by_its_uri(coco_shards, tmp_path):
    from retrieval.sources.inputs import read_item_bytes

    shards, loose, samples = coco_shards
    uri = f"{(shards / '00001.tar').resolve()}#{samples[12]['key']}"
    assert read_item_bytes(uri) == samples[12]["file"].read_bytes()
    assert read_item_bytes(str(loose / samples[0]["file"].name)) == samples[0]["file"].read_bytes()
    with pytest.raises(FileNotFoundError, match="no sample 'nope'"):
        read_item_bytes(f"{(shards / '00001.tar').resolve()}#nope")
