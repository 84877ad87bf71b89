"""Fast decoding (JPEG draft) + fast preprocessing vs the encoders' reference transforms.

The fast path is ``load_image(path, draft_size=enc.draft_size)`` + ``enc.image_transform()``; the
reference is a full decode + ``enc.reference_transform()`` (torchvision). Embeddings must agree
(cosine >= 0.99, measured >= 0.998 for EfficientNet-Lite0) and, without draft or reduction, the
pixel tensors must agree to one 8-bit level. Run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.encoders import load_clip_encoder, load_image_encoder
from retrieval.encoders.preprocess import (
    RESAMPLERS,
    FastImageTransform,
    default_resampler,
    efficientnet_transform,
    open_clip_transform,
)
from retrieval.sources.images import load_image

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(os.environ.get("RETRIEVAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
COCO = DATA / "coco-train-mini" / "images"
IMAGENET = DATA / "imagenet-sample"
CIFAR = DATA / "cifar10-test" / "test"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return path


def _level(transform) -> float:
    """One 8-bit level in the transform's normalised units (the largest over channels)."""
    return 1.0 / (255.0 * min(transform.std))


# --- data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_photos() -> list[Path]:
    """8 COCO + 8 ImageNet photos (~640x480, ~500x375) + 4 ImageNet photos >= 1024 px on one side."""
    from PIL import Image

    coco = sorted(_need(COCO).glob("*.jpg"))
    imagenet = sorted(_need(IMAGENET).glob("*.JPEG"))
    big = [p for p in imagenet[::7] if min(Image.open(p).size) >= 600][:4]
    return coco[::10][:8] + imagenet[::125][:8] + big


@pytest.fixture(scope="module")
def thumbnails() -> list[Path]:
    return [min((_need(CIFAR) / c).glob("*.jpg")) for c in ("cat", "ship", "truck")]


def _save_jpeg(img, path: Path, orientation: int = 1, **kwargs) -> Path:
    from PIL import Image

    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(path, quality=90, exif=exif, **kwargs)
    return path


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> list[Path]:
    """COCO photos upscaled to 4000x3000 JPEGs: plain, EXIF-rotated (orientation 6), and an MPO."""
    from PIL import Image

    root = tmp_path_factory.mktemp("large")
    coco = sorted(_need(COCO).glob("*.jpg"))
    out = []
    for i, (src, orientation) in enumerate(zip(coco[1:4], (1, 6, 1), strict=True)):
        img = Image.open(src).convert("RGB").resize((4000, 3000), Image.Resampling.LANCZOS)
        if i == 2:
            extra = img.resize((400, 300))
            out.append(_save_jpeg(img, root / "large.mpo", format="MPO", save_all=True, append_images=[extra]))
        else:
            out.append(_save_jpeg(img, root / f"large_{i}.jpg", orientation))
    return out


@pytest.fixture(scope="module")
def effnet():
    return load_image_encoder("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")


def _reference(enc, paths: list[Path]):
    """Full decode (load_image without draft: same EXIF handling) + the reference transform."""
    import torch

    transform = enc.reference_transform()
    return torch.stack([transform(load_image(p).image) for p in paths])


def _fast(enc, paths: list[Path]):
    import torch

    transform = enc.image_transform()
    return torch.stack([transform(load_image(p, draft_size=enc.draft_size).image) for p in paths])


# --- embeddings and pixels -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["effnet", "tiny"])
def test_fast_path_embeddings_match_reference(name, request, real_photos, thumbnails, large_jpegs):
    enc = request.getfixturevalue(name)
    level = _level(enc.image_transform())
    for label, paths in (("real", real_photos), ("cifar", thumbnails), ("large", large_jpegs)):
        ref, fast = _reference(enc, paths), _fast(enc, paths)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        cos = (enc.encode_image_tensors(ref) * enc.encode_image_tensors(fast)).sum(axis=1)
        diff = (fast - ref).abs()
        print(
            f"\n{name} {label:<5} n={len(paths)} cosine min {cos.min():.5f} mean {cos.mean():.5f}; "
            f"pixels max {float(diff.max()) / level:.1f} mean {float(diff.mean()) / level:.3f} levels"
        )
        assert cos.min() >= 0.99, (label, cos)
        assert float(diff.mean()) <= 1.0 * level, label  # under one 8-bit level on average


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_fast_transform_matches_reference_to_one_level(effnet, real_photos, thumbnails, resampler):
    """No draft, no reduction: Pillow resampling only the crop region, or torch's uint8 resize of
    the whole image (then the crop), changes nothing but rounding."""
    from PIL import Image

    ref = effnet.reference_transform()
    base = effnet.image_transform()
    fast = FastImageTransform(base.resize, base.crop, base.mean, base.std, base.interpolation, resampler=resampler)
    level = _level(fast)
    for path in real_photos + thumbnails:
        img = Image.open(path).convert("RGB")
        diff = (fast(img) - ref(img)).abs()
        assert float(diff.max()) <= 1.01 * level, path
        assert float((diff > 0.5 * level).float().mean()) < 0.02, path  # almost all bit-identical


def test_open_clip_fast_transform_matches_reference_without_reduction(tiny, real_photos, thumbnails):
    from PIL import Image

    fast = tiny.image_transform()
    assert isinstance(fast, FastImageTransform)
    exact = FastImageTransform(fast.resize, fast.crop, fast.mean, fast.std, fast.interpolation, reducing_gap=None)
    ref = tiny.reference_transform()
    level = _level(fast)
    for path in real_photos[:6] + thumbnails:
        img = Image.open(path).convert("RGB")
        assert float((exact(img) - ref(img)).abs().max()) <= 1.01 * level, path
        # reducing_gap=3 (a 640x480 photo is 15x the 32 px tiny input): close, not identical
        assert float((fast(img) - ref(img)).abs().mean()) <= 1.0 * level, path


# --- JPEG draft ----------------------------------------------------------------------------------


def test_draft_engages_on_large_jpegs_but_never_below_needed(effnet, tiny, large_jpegs):
    for enc in (effnet, tiny):
        need_w, need_h = enc.draft_size
        for path in large_jpegs:
            full, drafted = load_image(path), load_image(path, draft_size=enc.draft_size)
            got_w, got_h = drafted.image.size
            assert got_w * got_h * 4 <= full.image.width * full.image.height, (path, drafted.image.size)
            assert got_w >= need_w and got_h >= need_h, (path, drafted.image.size)
            # metadata: the full-resolution upright size and the file's hash, as without draft
            assert (drafted.width, drafted.height, drafted.sha256) == (full.width, full.height, full.sha256)
            assert (got_w > got_h) == (full.width > full.height)  # EXIF orientation still applied


def test_draft_keeps_the_exif_rotated_size_on_the_right_axis(large_jpegs):
    rotated = large_jpegs[1]  # stored 4000x3000, orientation 6: upright 3000x4000
    full = load_image(rotated)
    assert (full.width, full.height) == (3000, 4000)
    # needs 1000 px of upright width: the stored image must keep 1000 rows (1/2 scale, not 1/4)
    got = load_image(rotated, draft_size=(1000, 200))
    assert got.image.size == (1500, 2000) and (got.width, got.height) == (3000, 4000)
    got = load_image(rotated, draft_size=(200, 1000))
    assert got.image.size == (750, 1000) and (got.width, got.height) == (3000, 4000)


@pytest.mark.parametrize(
    "size, orientation, need, stored",
    [
        ((199, 300), 1, (100, 100), (199, 300)),  # under 2x on one side: full decode
        ((200, 300), 1, (100, 100), (100, 150)),  # 1/2
        ((801, 801), 1, (100, 100), (101, 101)),  # 1/8, rounded up
        ((1700, 900), 1, (100, 100), (213, 113)),  # 900 // 100 = 9 -> 1/8
        ((800, 400), 1, (50, 100), (200, 100)),  # non-square need: 400 // 100 = 4 -> 1/4
        # upright 400x800 needs (100, 50): stored need (50, 100) -> 1/4 (unswapped would give 1/8: 50 px wide)
        ((800, 400), 6, (100, 50), (200, 100)),
        ((800, 400), 8, (50, 100), (100, 50)),  # stored need (100, 50) -> 1/8
    ],
)
def test_draft_scale_rule(tmp_path, size, orientation, need, stored):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize(size)
    path = _save_jpeg(img, tmp_path / "x.jpg", orientation)
    full = load_image(path)
    got = load_image(path, draft_size=need)
    transposed = orientation in (5, 6, 7, 8)
    assert ((got.image.height, got.image.width) if transposed else got.image.size) == stored
    assert got.image.width >= need[0] and got.image.height >= need[1]
    assert (got.width, got.height, got.sha256) == (full.width, full.height, full.sha256)


def test_draft_ignores_other_formats_and_small_jpegs(tmp_path, real_photos):
    from PIL import Image

    png = tmp_path / "big.png"
    Image.open(real_photos[0]).convert("RGB").resize((1200, 900)).save(png)
    for path in (png, real_photos[0]):
        full, drafted = load_image(path), load_image(path, draft_size=(100, 100) if path == png else (512, 512))
        assert drafted.image.size == full.image.size
        assert np.array_equal(np.asarray(drafted.image), np.asarray(full.image))


def test_metadata_unchanged_by_draft(effnet, tiny, real_photos, thumbnails):
    for path in real_photos + thumbnails:
        full = load_image(path)
        for enc in (effnet, tiny):
            got = load_image(path, draft_size=enc.draft_size)
            assert (got.width, got.height, got.sha256) == (full.width, full.height, full.sha256)


@pytest.mark.parametrize("bad", [(0, 10), (10, -1), (5,), ("a", "b"), 7])
def test_bad_draft_size_is_a_programming_error(real_photos, bad):
    with pytest.raises(ValueError, match="draft_size"):
        load_image(real_photos[0], draft_size=bad)


def test_corrupt_jpeg_still_reports_decode_errors(tmp_path, real_photos):
    from retrieval.core.errors import ImageDecodeError

    data = real_photos[-1].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError) as plain:
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageDecodeError) as drafted:
        load_image(tmp_path / "cut.jpg", draft_size=(64, 64))
    assert "truncated" in plain.value.reason and "truncated" in drafted.value.reason


# --- interface, config, pickling -----------------------------------------------------------------


def test_encoder_interface(effnet, tiny):
    assert effnet.draft_size == (512, 512)  # 2 x Resize(256)
    assert tiny.draft_size == (64, 64)  # 2 x the tiny model's 32 px
    for enc in (effnet, tiny):
        assert isinstance(enc.image_transform(), FastImageTransform)
        assert not isinstance(enc.reference_transform(), FastImageTransform)


def test_transforms_pickle(effnet, tiny, real_photos):
    from PIL import Image

    img = Image.open(real_photos[0]).convert("RGB")
    for enc in (effnet, tiny):
        transform = enc.image_transform()
        clone = pickle.loads(pickle.dumps(transform))
        x, y = transform(img), clone(img)
        assert x.is_contiguous() and str(x.dtype) == "torch.float32" and bool((x == y).all())
        assert clone.draft_size == enc.draft_size and clone.resampler == transform.resampler
        pickle.loads(pickle.dumps(enc.reference_transform()))


def test_resampler_choice():
    import torch

    fast_uint8_resize = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert default_resampler() == ("torch" if fast_uint8_resize else "pillow")
    assert efficientnet_transform().resampler == default_resampler()
    assert "resampler=" in repr(efficientnet_transform())  # part of a resumable job's key
    with pytest.raises(ValueError, match="resampler"):
        FastImageTransform(256, 224, 0.5, 0.5, resampler="opencv")


def test_torch_resampler_leaves_drafted_and_huge_images_to_pillow(effnet, large_jpegs, tmp_path):
    """A drafted JPEG's crop region needs Pillow's fractional box, and an image >= 2 * reducing_gap
    times the output is box-reduced first: both take Pillow's path, whatever the resampler."""
    from PIL import Image

    torch_t = FastImageTransform(256, 224, 0.5, 0.5, resampler="torch")
    pillow_t = FastImageTransform(256, 224, 0.5, 0.5, resampler="pillow")
    drafted = load_image(large_jpegs[0], draft_size=torch_t.draft_size).image
    huge = load_image(large_jpegs[0]).image
    png = tmp_path / "huge.png"
    huge.save(png)
    for img in (drafted, huge, Image.open(png).convert("RGB")):
        assert bool((torch_t(img) == pillow_t(img)).all())


def test_non_rgb_inputs_are_converted(real_photos):
    from PIL import Image

    fast = efficientnet_transform()
    img = Image.open(real_photos[0]).convert("RGB")
    for mode in ("L", "RGBA", "P", "CMYK"):
        other = img.convert(mode)
        assert bool((fast(other) == fast(other.convert("RGB"))).all()), mode


def test_open_clip_config_is_read_not_assumed(tiny_clip_dir, real_photos):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    cfg = {
        "size": (160, 224),
        "mode": "RGB",
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "interpolation": "bilinear",
        "resize_mode": "squash",
        "fill_color": 0,
    }
    fast = open_clip_transform(cfg)
    assert fast.mean == (0.1, 0.2, 0.3) and fast.std == (0.4, 0.5, 0.6) and fast.interpolation == "bilinear"
    assert fast.output_size == (160, 224) and fast.draft_size == (448, 320)
    ref = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    img = Image.open(real_photos[0]).convert("RGB")
    assert float((fast(img) - ref(img)).abs().max()) <= 1.01 * _level(fast)

    assert open_clip_transform({**cfg, "resize_mode": "longest"}) is None  # pads: no fast path
    assert open_clip_transform({**cfg, "resize_mode": "shortest"}) is None  # non-square: ResizeKeepRatio
    square = open_clip_transform({**cfg, "size": 192, "resize_mode": "shortest"})
    assert square.resize == 192 and square.crop == (192, 192) and square.draft_size == (384, 384)

    # an encoder whose config has no fast equivalent keeps open_clip's own transform
    enc = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    open_clip.set_model_preprocess_cfg(
        enc._model, {**open_clip.get_model_preprocess_cfg(enc._model), "resize_mode": "longest"}
    )
    assert enc.image_transform() is enc.reference_transform() and enc.draft_size is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_drafted_crop_region_matches_full_decode_for_every_orientation(tmp_path, real_photos, orientation):
    """817 = 8 * 102 + 1: at 1/8 scale the last JPEG block holds one real column of eight, and
    EXIF mirroring moves that partial block to the start; the crop must still line up."""
    from PIL import Image

    from retrieval.sources.images import DRAFT_INFO

    fast = FastImageTransform(48, 48, 0.5, 0.5, reducing_gap=None)  # draft_size (96, 96): 1/8 of 817x777
    img = Image.open(real_photos[0]).convert("RGB").resize((817, 777), Image.Resampling.LANCZOS)
    path = _save_jpeg(img, tmp_path / "o.jpg", orientation, subsampling=0)
    full, drafted = load_image(path), load_image(path, draft_size=fast.draft_size)
    assert drafted.image.info[DRAFT_INFO][2] == 8
    ref = fast(full.image)
    good = float((fast(drafted.image) - ref).abs().mean())
    drafted.image.info[DRAFT_INFO] = (*drafted.image.info[DRAFT_INFO][:3], 0, 0)  # forget the offsets
    unshifted = float((fast(drafted.image) - ref).abs().mean())
    drafted.image.info.pop(DRAFT_INFO)  # and the geometry altogether
    naive = float((fast(drafted.image) - ref).abs().mean())
    level = _level(fast)
    print(
        f"\norientation {orientation}: mean diff {good / level:.2f} levels "
        f"(offsets ignored {unshifted / level:.2f}, no geometry {naive / level:.2f})"
    )
    assert good <= 1.5 * level
    assert good < naive
    if orientation in (2, 3, 4, 6, 7, 8):  # a mirrored axis: the offset matters
        assert good < unshifted


def test_efficientnet_fast_cpu_inference_keeps_embeddings():
    """channels-last + bfloat16 autocast (where native) against plain float32 on real photos."""
    import torch

    encoder = load_image_encoder("efficientnet-lite0", device="cpu")
    photos = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample").glob("*.JPEG"))[:12]
    if not photos:
        pytest.skip("real photos not available")
    transform = encoder.reference_transform()
    pixels = torch.stack([transform(load_image(p).image) for p in photos])
    fast = encoder.encode_image_tensors(pixels)
    with torch.inference_mode():
        model = encoder._model.to(memory_format=torch.contiguous_format)
        plain = model.extract_features(pixels).mean(dim=(2, 3)).numpy()
        encoder._model.to(memory_format=torch.channels_last)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert float(np.sum(fast * plain, axis=1).min()) >= 0.99
