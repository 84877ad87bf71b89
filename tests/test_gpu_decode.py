"""The batched JPEG decode (issue 17 section 2): JPEGs decoded in batches on the encoder's device,
every other image through the CPU path alone, with the CPU path's vectors, sizes, hashes and errors.

The batched path runs here on device="cpu" (torchvision's libjpeg decode and torch's resize);
the same checks on CUDA run where a GPU is (skipped otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path

import hostile
import numpy as np
import pytest
import torch
from conftest import COCO, IMAGENET, require_shared_data

import retrieval.embed.pipeline as pipeline
from retrieval import EmbedOptions, InputError
from retrieval.embed.gpu_decode import JpegBytesDataset, decode_device, gpu_jpeg_size
from retrieval.embed.pipeline import embed_images
from retrieval.embed.resume import job_key
from retrieval.sources.discovery import discover_images

CUDA = torch.cuda.is_available()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _batched_on(monkeypatch, device: str) -> None:
    """Have embed_images take the batched decode on ``device`` (the option picks it only on CUDA)."""
    monkeypatch.setattr(pipeline, "decode_device", lambda choice, encoder_device, transform: device)


@pytest.fixture(scope="module")
def photos():
    """Real photos of both collections: COCO (640 px) and ImageNet (various sizes), and the three
    largest ImageNet photos (1,200-1,600 px: the PIL path decodes them at reduced JPEG scale, the
    batched path in full)."""
    from PIL import Image

    require_shared_data()
    imagenet = sorted(IMAGENET.glob("*.JPEG"))
    largest = sorted(imagenet, key=lambda path: min(Image.open(path).size))[-3:]
    picked = sorted((COCO / "images").glob("*.jpg"))[::8][:10] + imagenet[::100][:10] + largest
    return discover_images(picked)[0]


@pytest.fixture(scope="module")
def effnet():
    from retrieval.encoders import load_image_encoder

    return load_image_encoder("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    from retrieval.encoders import load_clip_encoder

    return load_clip_encoder("open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


def _compare(pil, batched, min_cosine: float) -> None:
    def rows(result) -> list[tuple]:
        return [(r.ref.location, r.width, r.height, r.sha256) for r in result.rows]

    assert rows(batched) == rows(pil)
    assert [(e.path, e.reason) for e in batched.errors] == [(e.path, e.reason) for e in pil.errors]
    cosines = _cosines(pil.vectors, batched.vectors)
    assert cosines.min() >= min_cosine, sorted(zip(cosines, rows(pil), strict=True))[:3]


def test_batched_decode_matches_the_pil_path_on_real_photos(monkeypatch, photos, effnet):
    pil = embed_images(photos, effnet, EmbedOptions(batch_size=8, workers=2, replicas=False, progress=False))
    assert pil.decode_device is None and pil.decoded_on_device == 0
    _batched_on(monkeypatch, "cpu")
    batched = embed_images(photos, effnet, EmbedOptions(batch_size=8, workers=2, replicas=False, progress=False))
    plain = [ref for ref in photos if gpu_jpeg_size(Path(ref.location).read_bytes()) is not None]
    assert len(plain) >= len(photos) - 2  # ImageNet has a few greyscale / CMYK JPEGs: the CPU path's
    assert batched.decode_device == "cpu" and batched.decoded_on_device == len(plain)
    _compare(pil, batched, 0.999)


def test_every_image_the_batched_decode_cannot_take_goes_the_cpu_path(monkeypatch, tmp_path, tiny):
    """The hostile corpus: only plain YCbCr JPEGs with orientation 1 are decoded in batches; every
    other file (PNG, CMYK, YCCK, greyscale, EXIF-rotated, truncated, bomb, unreadable, bad name)
    gives exactly what the CPU path gives, error rows included."""
    require_shared_data()
    images = tmp_path / "images"
    cases = hostile.make_image_corpus(images)
    refs = discover_images([images])[0]
    batched_names = {
        os.path.relpath(ref.location, images)
        for ref in refs
        if gpu_jpeg_size(Path(ref.location).read_bytes()) is not None
    }
    plain = {
        "plain.jpg",
        "café 写真 ünïcode.jpg",
        "with  spaces .jpg",
        "new\nline.jpg",
        "dup-a.jpg",
        "dup-b.jpg",
        "exif-invalid.jpg",
    }  # orientation 9: no rotation, on either path
    refused = {os.fsdecode(b"latin1-\xe9t\xe9.jpg"), "locked.jpg"}  # plain JPEG bytes the CPU path refuses
    assert batched_names <= plain | refused
    assert {"plain.jpg", "dup-a.jpg", "exif-invalid.jpg"} <= batched_names
    assert {case.name for case in cases} >= {
        "cmyk.jpg",
        "ycck.jpg",
        "grey.jpg",
        "exif-6.jpg",
        "truncated.jpg",
        "bomb.jpg",
    }
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    options = EmbedOptions(batch_size=8, workers=0, progress=False)  # in this process: the patch applies
    pil = embed_images(refs, tiny, options)
    _batched_on(monkeypatch, "cpu")
    batched = embed_images(refs, tiny, options)
    expected_batched = len(batched_names - refused)
    assert batched.decoded_on_device == expected_batched
    assert any("permission denied" in e.reason for e in batched.errors)
    assert any("not valid UTF-8" in e.reason for e in batched.errors)
    _compare(pil, batched, 0.999)


def test_a_jpeg_the_device_refuses_falls_back_alone(monkeypatch, photos, tiny):
    """A JPEG the probe lets through but the decode refuses costs the batch nothing: that image
    alone goes the CPU path (here: the device transform fails for one of them)."""
    from retrieval.encoders.preprocess import FastImageTransform

    real = FastImageTransform.transform_tensor
    calls = []

    def refuse_second(self, chw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device out of memory (simulated)")
        return real(self, chw)

    pil = embed_images(photos[:6], tiny, EmbedOptions(batch_size=6, workers=0, progress=False))
    _batched_on(monkeypatch, "cpu")
    monkeypatch.setattr(FastImageTransform, "transform_tensor", refuse_second)
    batched = embed_images(photos[:6], tiny, EmbedOptions(batch_size=6, workers=0, progress=False))
    assert batched.decoded_on_device == 5
    _compare(pil, batched, 0.999)


def test_huge_and_odd_jpegs_are_not_probed_for_the_batched_decode(tmp_path):
    require_shared_data()
    photo = sorted((COCO / "images").glob("*.jpg"))[0]
    data = photo.read_bytes()
    assert gpu_jpeg_size(data) is not None
    assert gpu_jpeg_size(data, max_pixels=1000) is None  # a huge image
    assert gpu_jpeg_size(data[: len(data) // 2]) is None  # truncated: no end marker
    assert gpu_jpeg_size(b"\xff\xd8 not a jpeg \xff\xd9") is None
    assert gpu_jpeg_size(b"") is None

    class Cpu:
        refs = discover_images([photo])[0]

        def __getitem__(self, position):
            return (position, "cpu path", 0, 0, "", None)

    assert JpegBytesDataset(Cpu(), max_pixels=1000)[0][1] == "cpu path"
    sample = JpegBytesDataset(Cpu())[0]
    assert sample[1] == data and sample[2:4] == gpu_jpeg_size(data)


def test_decode_option_follows_the_device():
    from retrieval.encoders.preprocess import efficientnet_transform

    fast = efficientnet_transform()
    assert decode_device("auto", "cpu", fast) is None
    assert decode_device("cpu", "cuda", fast) is None
    with pytest.raises(InputError, match="`EmbedOptions.decode='gpu'` .* runs on cpu"):
        decode_device("gpu", "cpu", fast)
    with pytest.raises(InputError, match="`EmbedOptions.decode` must be one of"):
        EmbedOptions(decode="nvjpeg")
    if CUDA:
        assert decode_device("auto", "cuda", fast) == "cuda"
        assert decode_device("auto", "cuda", object()) is None  # no fast transform: the CPU path


def test_a_resumed_build_does_not_mix_decode_paths(tmp_path):
    from retrieval.encoders.preprocess import efficientnet_transform

    class Encoder:
        spec, dim, device = "x", 4, "cuda"

        def fingerprint(self):
            return "f"

    items = [tmp_path / "a.jpg"]
    plain = job_key(items, Encoder(), 8, efficientnet_transform())
    assert job_key(items, Encoder(), 8, efficientnet_transform(), decode=None) == plain
    assert job_key(items, Encoder(), 8, efficientnet_transform(), decode="cuda") != plain


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_decode_matches_the_cpu_path_on_real_photos(photos):
    from retrieval.encoders import load_image_encoder

    encoder = load_image_encoder("efficientnet-lite0", device="cuda")
    pil = embed_images(photos, encoder, EmbedOptions(batch_size=8, workers=2, decode="cpu", progress=False))
    gpu = embed_images(photos, encoder, EmbedOptions(batch_size=8, workers=2, decode="gpu", progress=False))
    assert gpu.decode_device == "cuda" and gpu.decoded_on_device >= len(photos) - 2
    _compare(pil, gpu, 0.999)
