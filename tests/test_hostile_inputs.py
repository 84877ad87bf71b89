"""The hostile-input corpus (tests/hostile.py) through a whole build_index with the tiny CLIP model.

Every file ends as declared in the corpus: indexed correctly (decoded pixels checked against the
upright photo, not only the embedding), skipped with a precise reason in errors.jsonl (broken and
looping links too), or de-duplicated. The build itself never fails and never hangs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import hostile
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_shared_data
from PIL import Image

import retrieval
from retrieval import BuildOptions, CaptionOptions, EmbedOptions, EncoderChoice
from retrieval.core.errors import ImageDecodeError, InputError
from retrieval.sources.items import load_image

QUIET = EmbedOptions(batch_size=4, workers=0, progress=False)


def _clip(tiny_clip_dir: Path) -> EncoderChoice:
    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip_dir):
    """The corpus on disk and the index built from all of it (unreadable file simulated: tests run as root)."""
    require_shared_data()
    root = tmp_path_factory.mktemp("hostile")
    images = root / "images"
    image_cases = hostile.make_image_corpus(images)
    caption_cases = hostile.make_caption_corpus(root / "captions", images)
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    with pytest.MonkeyPatch.context() as patch, hostile.time_limit(180, "the hostile corpus build"):
        patch.setattr(Path, "read_bytes", read_bytes)
        index = retrieval.build_index(
            images=[images, images / "plain.png"],  # the same photo twice: indexed once
            captions=[root / "captions" / case.name for case in caption_cases],
            index=root / "index",
            encoders=_clip(tiny_clip_dir),
            embed=QUIET,
        )
    return {"root": root, "images": images, "image_cases": image_cases, "caption_cases": caption_cases, "index": index}


def _by_name(corpus) -> dict[str, int]:
    uris = corpus["index"].items("image")["uri"]
    return {os.path.relpath(uri, corpus["images"]): position for position, uri in enumerate(uris)}


def _image_vectors(index) -> np.ndarray:
    return index.store.read_vectors(index.manifest["files"]["vectors"]["clip/image"])


def test_the_build_survives_and_is_self_consistent(corpus):
    index = corpus["index"]
    counts = index.manifest["counts"]
    assert (
        counts["image"]
        == len(index.items("image")["uri"])
        == index.vector_index(f"{index.manifest['spaces']['image']}/image").ntotal
    )
    assert (
        counts["caption"]
        == len(index.items("caption")["caption"])
        == index.vector_index(f"{index.manifest['spaces']['caption']}/caption").ntotal
    )
    assert index.manifest["errors"] == len(index.errors())
    # errors.jsonl stays one JSON object per line, whatever the file names hold (newlines, bad bytes)
    lines = (index.path / "errors.jsonl").read_bytes().decode("utf-8").splitlines()
    assert len(lines) == len(index.errors()) and all(isinstance(json.loads(line), dict) for line in lines)
    vectors = _image_vectors(index)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert len(index.text_to_image("a dog on the beach", k=100)) == counts["image"]
    assert not (index.path / ".lock").exists()


def test_every_image_case_ends_as_declared(corpus):
    index, images = corpus["index"], corpus["images"]
    positions = _by_name(corpus)
    errors = {row["path"]: row for row in index.errors() if row["kind"] == "image"}
    table = index.items("image")
    seen = []
    for case in corpus["image_cases"]:
        path = str(images / case.name)
        if case.outcome == "indexed":
            assert case.name in positions, f"{case.name!r} ({case.hostile}) was not indexed: {errors.get(path)}"
            at = positions[case.name]
            assert (table["width"][at], table["height"][at]) == (case.size or hostile.PHOTO_SIZE), case.name
            assert path not in errors
        elif case.outcome == "skipped":
            assert case.name not in positions, f"{case.name!r} ({case.hostile}) should have been skipped"
            assert path in errors, f"{case.name!r} ({case.hostile}) has no row in errors.jsonl"
            assert re.search(case.reason, errors[path]["reason"]), (case.name, errors[path]["reason"])
        else:  # deduplicated (a link to a file already indexed)
            assert case.name not in positions and path not in errors, case.name
        seen.append(case.outcome)
    # nothing else got in, and nothing indexed twice
    assert sorted(positions) == sorted(c.name for c in corpus["image_cases"] if c.outcome == "indexed")
    assert len(set(table["uri"])) == len(table["uri"])
    assert seen.count("indexed") >= 30 and seen.count("skipped") >= 12


def test_indexed_images_decode_like_the_upright_photo(corpus):
    """Compare decoded pixels, then the stored embeddings: an EXIF-rotated photo must not embed sideways."""
    images = corpus["images"]
    vectors = _image_vectors(corpus["index"])
    positions = _by_name(corpus)
    checked = 0
    for case in corpus["image_cases"]:
        if case.upright is None or case.outcome != "indexed":
            continue
        got = load_image(images / case.name).image
        want = load_image(images / case.upright).image
        assert got.size == want.size, f"{case.name}: decoded {got.size}, upright is {want.size}"
        diff = float(np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).mean())
        assert diff <= case.tolerance, f"{case.name} ({case.hostile}): mean pixel difference {diff:.2f}"
        cosine = float(vectors[positions[case.name]] @ vectors[positions[case.upright]])
        # lossless: the same pixels; the CPU's int8 image tower scales activations per batch, which moves a
        # vector by well under 1e-3 cosine between batches (a missed rotation costs far more: see below)
        assert cosine > (0.999 if case.tolerance == 0 else 0.98), (case.name, cosine)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("orientation", [3, 4, 6])
def test_the_pixel_check_would_catch_a_missed_rotation(corpus, orientation):
    """Control: the stored (unrotated) pixels differ a lot from the upright photo."""
    images = corpus["images"]
    raw = Image.open(images / f"exif-{orientation}.jpg").convert("RGB")
    want = load_image(images / "plain.png").image
    if raw.size != want.size:
        return  # a 90 degree turn: the size check alone catches it
    assert float(np.abs(np.asarray(raw, np.int16) - np.asarray(want, np.int16)).mean()) > 20


def test_transparent_and_animated_images_decode_as_documented(corpus):
    images = corpus["images"]
    half = np.asarray(load_image(images / "rgba-half.png").image)
    assert (half[:, : hostile.PHOTO_SIZE[0] // 2] == 255).all()  # transparent half on white
    first = np.asarray(load_image(images / "animated.gif").image, np.int16)
    photo = np.asarray(hostile.upright_photo(), np.int16)
    assert np.abs(first - photo).mean() < 15  # the first frame, not the second (another photo)
    pixel = load_image(images / "one-pixel.png")
    assert pixel.image.getpixel((0, 0)) == (200, 30, 30)


def test_every_caption_case_ends_as_declared(corpus):
    index, root = corpus["index"], corpus["root"]
    table = index.items("caption")
    errors = index.errors()
    image_errors = {Path(row["path"]).name: row["reason"] for row in errors if row["kind"] == "image"}
    for case in corpus["caption_cases"]:
        source = str(root / "captions" / case.name)
        got = [text for text, src in zip(table["caption"], table["source"], strict=True) if src == source]
        assert got == list(case.captions), f"{case.name} ({case.hostile})"
        rows = {row["row"]: row["reason"] for row in errors if row["path"] == source}
        assert sorted(rows) == sorted(row for row, _ in case.errors), f"{case.name}: {rows}"
        for row, reason in case.errors:
            assert re.search(reason, rows[row]), (case.name, row, rows[row])
        for name, reason in case.image_errors:
            assert re.search(reason, image_errors[name]), (case.name, name)
    assert not any("\r" in text or "\ufeff" in text for text in table["caption"])


def test_a_100000_character_caption_is_truncated_by_the_tokenizers(corpus, tiny_clip_dir):
    index = corpus["index"]
    texts = index.items("caption")["caption"]
    assert hostile.LONG_CAPTION in texts and len(hostile.LONG_CAPTION) == 100_000
    encoder = index.text_encoder
    assert tuple(encoder._tokenizer([hostile.LONG_CAPTION]).shape) == (1, 77)
    stored = index.store.read_vectors(index.manifest["files"]["vectors"]["clip/caption"])[
        texts.index(hostile.LONG_CAPTION)
    ]
    prefix = encoder.encode_texts([hostile.LONG_CAPTION[:1000]])[0]  # same first 77 tokens
    np.testing.assert_allclose(stored, prefix, atol=2e-3)
    assert index.text_to_image(hostile.LONG_CAPTION, k=2)


def test_a_100000_character_caption_through_the_minilm_tokenizer():
    from retrieval.encoders.registry import load_text_encoder

    try:
        minilm = load_text_encoder("minilm", device="cpu")
    except retrieval.EncoderError as e:  # pragma: no cover - the weights ship with the package
        pytest.skip(f"minilm not available: {e}")
    long, prefix = minilm.encode_texts([hostile.LONG_CAPTION, hostile.LONG_CAPTION[:3000]])
    assert np.isfinite(long).all()
    np.testing.assert_allclose(long, prefix, atol=1e-5)  # truncated at max_seq_length


@pytest.mark.parametrize("case", hostile.WHOLE_FILE_CASES, ids=lambda case: case.name)
def test_whole_file_problems_stop_the_build_with_one_clear_line(tmp_path, tiny_clip_dir, case):
    path = tmp_path / case.name
    path.write_bytes(case.data)
    with hostile.time_limit(60, case.name), pytest.raises(InputError) as info:
        retrieval.build_index(
            captions=[path],
            index=tmp_path / "index",
            encoders=_clip(tiny_clip_dir),
            embed=QUIET,
            options=BuildOptions(caption_options=CaptionOptions(encoding=case.encoding)),
        )
    message = str(info.value)
    assert re.search(case.message, message), message
    assert "\n" not in message
    assert not (tmp_path / "index").exists()  # nothing written, not even the lock


def test_latin1_captions_with_the_right_encoding_and_from_the_cli(tmp_path, tiny_clip_dir):
    from retrieval.cli.main import main

    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\nnaïve façade\n".encode("latin-1"))
    args = [
        "build-index",
        "--captions",
        str(path),
        "--index",
        str(tmp_path / "i"),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert str(path) in result.output and "--encoding" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, args + ["--encoding", "latin-1"])
    assert result.exit_code == 0, result.output
    assert retrieval.open_index(tmp_path / "i").items("caption")["caption"] == ["café crème", "naïve façade"]


def test_hostile_query_images(corpus):
    index, images = corpus["index"], corpus["images"]
    for name in ("ycck.jpg", "exif-6.jpg", "grey16.png", "one-pixel.png", "animated.gif", "new\nline.jpg"):
        assert len(index.image_to_caption(images / name, k=2)) == 2, name
    for name, reason in (
        ("truncated.jpg", "truncated"),
        ("bomb.png", "decompression bomb"),
        ("text.jpg", "not an image"),
    ):
        with pytest.raises(ImageDecodeError, match=reason):
            index.image_to_caption(images / name)


def test_really_unreadable_file(tmp_path, corpus):
    """The simulated case above covers root; with real permissions the same reason must come out."""
    path = tmp_path / "locked.jpg"
    path.write_bytes((corpus["images"] / "plain.jpg").read_bytes())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: file permissions are not enforced (the simulated case covers it)")
        with pytest.raises(ImageDecodeError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)
