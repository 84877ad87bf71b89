"""Tests for retrieval.encoders: real bundled EfficientNet-Lite0 / MiniLM, a tiny random OpenCLIP."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.core.errors import EncoderError
from retrieval.encoders import (
    EncoderInfo,
    ImageEncoder,
    TextEncoder,
    is_contrastive,
    list_encoders,
    load_clip_encoder,
    load_image_encoder,
    load_text_encoder,
    resolve_device,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_clip import TINY_EMBED_DIM, make_tiny_clip

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RETRIEVAL_DATA", REPO.parent / "shared" / "data"))
IMAGENET = DATA / "imagenet-sample"
COCO = DATA / "coco-train-mini" / "images"
TEXTS = [
    "a photo of a dog",
    "two cats sleeping on a sofa",
    "a red car parked in the street",
]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="module")
def photos():
    from PIL import Image

    files = sorted(_need(COCO).glob("*.jpg"))[:3]
    return [Image.open(f).convert("RGB") for f in files]


@pytest.fixture(scope="module")
def effnet():
    return load_image_encoder("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_clip_encoder("open_clip:tiny", checkpoint=tiny_dir, device="cpu")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Make every hub access fail at once, as on a machine without internet, with an empty cache."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# --- shapes, norms, determinism ------------------------------------------------------------


def test_efficientnet_dims_norms_determinism(effnet, photos):
    assert isinstance(effnet, ImageEncoder) and not isinstance(effnet, TextEncoder)
    assert (effnet.spec, effnet.dim, effnet.device) == (
        "efficientnet-lite0",
        1280,
        "cpu",
    )
    a = effnet.encode_images(photos)
    _assert_unit_rows(a, len(photos), 1280)
    np.testing.assert_array_equal(a, effnet.encode_images(photos))
    single = effnet.encode_images(photos[0])  # one image counts as a batch of one
    np.testing.assert_allclose(single[0], a[0], atol=1e-5)
    assert effnet.encode_images([]).shape == (0, 1280)


def test_efficientnet_slices_large_cpu_batches_without_changing_vectors(effnet, photos):
    """On the CPU a batch runs in slices of CPU_MICRO_BATCH images (activations stay in cache):
    a batch spanning three slices gives each image the vector it gets alone."""
    import torch

    from retrieval.encoders.efficientnet import CPU_MICRO_BATCH

    transform = effnet.image_transform()
    tensors = [transform(p) for p in photos]
    tensors += [t.flip(-1) for t in tensors] + [t.flip(-2) for t in tensors]
    n = 2 * CPU_MICRO_BATCH + 3
    batch = torch.stack((tensors * n)[:n])
    together = effnet.encode_image_tensors(batch)
    _assert_unit_rows(together, n, 1280)
    alone = np.concatenate([effnet.encode_image_tensors(batch[i : i + 1]) for i in range(n)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_minilm_dims_norms_determinism(minilm):
    assert isinstance(minilm, TextEncoder) and not isinstance(minilm, ImageEncoder)
    assert (minilm.spec, minilm.dim, minilm.device) == ("minilm", 384, "cpu")
    a = minilm.encode_texts(TEXTS, batch_size=2)
    _assert_unit_rows(a, 3, 384)
    np.testing.assert_allclose(a, minilm.encode_texts(TEXTS), atol=1e-6)
    assert minilm.encode_texts([]).shape == (0, 384)
    # related texts are closer than unrelated ones
    q = minilm.encode_texts(["a puppy"])[0]
    assert q @ a[0] > q @ a[2]


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from retrieval.encoders.sentence_transformers import minilm_path

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    cos = (minilm.encode_texts(TEXTS) * ref).sum(axis=1)
    assert (cos > 0.9999).all(), cos


# --- MiniLM computed directly (no sentence-transformers import) -----------------------------------

CAPTIONS = [
    "A man riding a horse on a dirt road.",
    "  a plate of food with broccoli and rice  ",
    "Two dogs play in the snow",
    "A kitchen with a stove, a sink and a refrigerator.",
    "Ünïcödé café: crème brûlée on a tray",
    "a red double decker bus " * 60,  # longer than max_seq_length: truncated
    "",
    "A cat sleeping on a laptop keyboard",
] * 2  # 16 captions
HEAVY = ("torch", "faiss", "open_clip", "sentence_transformers", "transformers")


def _library_encoder(folder: Path, spec: str = "minilm"):
    """The same folder loaded through sentence-transformers (the reference)."""
    from sentence_transformers import SentenceTransformer

    from retrieval.encoders.sentence_transformers import SentenceTransformerEncoder

    return SentenceTransformerEncoder(SentenceTransformer(str(folder), device="cpu"), spec, "cpu")


def _folder_copy(tmp_path: Path, replace: dict[str, str]) -> Path:
    """The bundled MiniLM folder, files linked, with some files' text replaced."""
    from retrieval.encoders.sentence_transformers import minilm_path

    source = minilm_path()
    for path in source.rglob("*"):
        if path.is_file():
            target = tmp_path / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            rel = str(path.relative_to(source))
            if rel in replace:
                target.write_text(replace[rel], encoding="utf-8")
            else:
                target.symlink_to(path)
    return tmp_path


def test_minilm_loads_without_sentence_transformers():
    code = (
        "import sys; from retrieval.encoders import load_text_encoder; "
        "load_text_encoder('minilm', device='cpu').encode_texts(['a dog']); "
        "print(sorted(m for m in ('sentence_transformers', 'transformers', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def test_importing_retrieval_and_its_cli_imports_no_heavy_library():
    code = f"import sys, retrieval, retrieval.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_minilm_direct_path_equals_sentence_transformers(minilm, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from retrieval.encoders.sentence_transformers import minilm_path

    library = _library_encoder(minilm_path())
    assert minilm.direct and not library.direct
    # same fingerprint: indexes built through sentence-transformers still open
    assert (minilm.fingerprint(), minilm.dim, minilm.numerics) == (library.fingerprint(), library.dim, library.numerics)
    cos = (minilm.encode_texts(CAPTIONS, batch_size=3) * library.encode_texts(CAPTIONS, batch_size=3)).sum(axis=1)
    assert cos.min() >= 0.99999, cos
    # float32 against sentence-transformers' own encode
    monkeypatch.setattr(minilm, "_cpu_bfloat16", False)
    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(CAPTIONS, normalize_embeddings=True)
    cos = (minilm.encode_texts(CAPTIONS) * ref).sum(axis=1)
    assert cos.min() >= 0.99999, cos


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_direct_pooling_modes_equal_sentence_transformers(pooling, tmp_path):
    config = {"word_embedding_dimension": 384, f"pooling_mode_{pooling}_token{'s' if pooling == 'max' else ''}": True}
    folder = _folder_copy(tmp_path, {"1_Pooling/config.json": json.dumps(config)})
    direct = load_text_encoder(f"st:{folder}", device="cpu")
    library = _library_encoder(folder, direct.spec)
    assert direct.direct and direct.fingerprint() == library.fingerprint()
    cos = (direct.encode_texts(CAPTIONS[:8]) * library.encode_texts(CAPTIONS[:8])).sum(axis=1)
    assert cos.min() >= 0.99999, cos


def test_unsupported_folder_loads_through_sentence_transformers(tmp_path, capsys):
    settings = {"prompts": {"query": "query: "}, "default_prompt_name": "query"}
    folder = _folder_copy(tmp_path, {"config_sentence_transformers.json": json.dumps(settings)})
    encoder = load_text_encoder(f"st:{folder}", device="cpu")
    assert not encoder.direct
    _assert_unit_rows(encoder.encode_texts(CAPTIONS, batch_size=4, progress=True), 16, 384)
    err = capsys.readouterr().err
    assert "Batches" not in err and "captions" in err and "16/16" in err


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_damaged_folder_names_the_folder(damaged, tmp_path):
    folder = _folder_copy(tmp_path, {damaged: "not what it should be"})
    with pytest.raises(EncoderError, match="cannot load sentence-transformers model from .*" + tmp_path.name):
        load_text_encoder(f"st:{folder}", device="cpu")


def test_caption_progress_is_one_bar_in_our_words(minilm, capsys):
    minilm.encode_texts(CAPTIONS, batch_size=4, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "captions" in captured.err and "16/16" in captured.err and "Batches" not in captured.err


def test_build_shows_our_caption_bar_only(tmp_path):
    from click.testing import CliRunner

    from retrieval.cli import main

    photos = sorted(_need(COCO).glob("*.jpg"))[:2]
    (tmp_path / "captions.txt").write_text("\n".join(c.strip() or "x" for c in CAPTIONS) + "\n", encoding="utf-8")
    args = [
        "build-index",
        "--images",
        str(photos[0]),
        "--images",
        str(photos[1]),
        "--captions",
        str(tmp_path / "captions.txt"),
        "--index",
        str(tmp_path / "index"),
        "--image-encoder",
        "efficientnet-lite0",
        "--text-encoder",
        "minilm",
        "--anchors",
        "builtin:imagenet",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Batches" not in result.output and "captions" in result.stderr and "16/16" in result.stderr


def test_tiny_clip_dims_norms_determinism(tiny, photos):
    assert isinstance(tiny, ImageEncoder) and isinstance(tiny, TextEncoder)
    assert (tiny.spec, tiny.dim, tiny.device) == (
        "open_clip:tiny",
        TINY_EMBED_DIM,
        "cpu",
    )
    img = tiny.encode_images(photos)
    txt = tiny.encode_texts(TEXTS, batch_size=2)
    _assert_unit_rows(img, len(photos), TINY_EMBED_DIM)
    _assert_unit_rows(txt, 3, TINY_EMBED_DIM)
    np.testing.assert_array_equal(img, tiny.encode_images(photos))
    np.testing.assert_allclose(txt, tiny.encode_texts(TEXTS), atol=1e-6)
    np.testing.assert_allclose(tiny.encode_texts("a photo of a dog")[0], txt[0], atol=1e-6)
    assert tiny.encode_texts([]).shape == (0, TINY_EMBED_DIM)
    assert tiny.logit_scale > 0


def test_clip_image_tower_runs_int8_on_the_cpu_close_to_float32(tiny, photos):
    import torch

    assert tiny.numerics == "int8-linear"  # a separate embedding-cache key from float32 vectors
    tower = tiny._int8_tower()
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in tower.modules())
    pixels = torch.stack([tiny.image_transform()(p) for p in photos])
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(tiny._model.encode_image(pixels), dim=-1).numpy()
    cosine = (tiny.encode_image_tensors(pixels) * reference).sum(axis=1)
    assert cosine.min() >= 0.99 and not np.allclose(cosine, 1.0, atol=1e-7)  # close, and really int8


def test_encode_image_tensors_rejects_bad_shape(tiny):
    import torch

    with pytest.raises(ValueError, match="B,3,H,W"):
        tiny.encode_image_tensors(torch.zeros(3, 32, 32))


def test_progress_bar_goes_to_stderr(tiny, capsys):
    tiny.encode_texts(TEXTS, batch_size=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "3/3" in captured.err


# --- transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["effnet", "tiny"])
def test_image_transform_is_picklable(name, request, photos):
    enc = request.getfixturevalue(name)
    transform = enc.image_transform()
    clone = pickle.loads(pickle.dumps(transform))
    x, y = transform(photos[0]), clone(photos[0])
    assert x.dtype == y.dtype and str(x.dtype) == "torch.float32" and x.shape[0] == 3
    assert (x == y).all()
    gray = photos[0].convert("L")  # transforms convert to RGB themselves
    assert transform(gray).shape == x.shape


def test_efficientnet_transform_geometry(effnet, photos):
    x = effnet.image_transform()(photos[0])
    assert tuple(x.shape) == (3, 224, 224)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # Normalize(mean=0.5, std=0.5)


# --- EfficientNet classifier anchors ---------------------------------------------------------


def test_efficientnet_classifier_anchors_share_feature_space(effnet):
    import torch
    from PIL import Image

    with open(_need(IMAGENET / "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[::50][:20]
    anchors, names = effnet.classifier_anchors()
    _assert_unit_rows(anchors, 1000, 1280)
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    transform = effnet.image_transform()
    pixels = torch.stack([transform(Image.open(IMAGENET / r["file"])) for r in rows])
    feats = effnet.encode_image_tensors(pixels)
    by_anchor = (feats @ anchors.T).argmax(axis=1)
    by_logits = effnet.classifier_logits(pixels).argmax(axis=1)
    truth = np.array([int(r["class_index"]) for r in rows])
    assert (by_anchor == by_logits).mean() >= 0.8
    assert (by_anchor == truth).mean() >= 0.6
    assert sum(names[i] == r["class_name"] for i, r in zip(truth, rows, strict=True)) >= len(rows) - 1


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprints(effnet, minilm, tiny, tiny_dir, tmp_path):
    for enc in (effnet, minilm, tiny):
        fp = enc.fingerprint()
        assert len(fp) == 16 and set(fp) <= set("0123456789abcdef"), fp  # 16 lowercase hex digits
        assert enc.fingerprint() == fp
    assert len({effnet.fingerprint(), minilm.fingerprint(), tiny.fingerprint()}) == 3
    assert load_image_encoder("efficientnet-lite0", device="cpu").fingerprint() == effnet.fingerprint()
    again = load_clip_encoder("open_clip:tiny", checkpoint=tiny_dir, device="cpu")
    assert again.fingerprint() == tiny.fingerprint()
    other = load_clip_encoder(
        "open_clip:tiny",
        checkpoint=make_tiny_clip(tmp_path / "seed1", seed=1),
        device="cpu",
    )
    assert other.fingerprint() != tiny.fingerprint()
    assert not np.allclose(other.encode_texts(TEXTS), tiny.encode_texts(TEXTS))


def test_fingerprint_same_in_another_process(tiny, tiny_dir):
    code = (
        "import sys; from retrieval.encoders import load_clip_encoder; "
        "print(load_clip_encoder('open_clip:tiny', checkpoint=sys.argv[1], device='cpu').fingerprint())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == tiny.fingerprint()


# --- open_clip loading paths ---------------------------------------------------------------------


def test_tiny_clip_loads_through_every_entry_point(tiny, tiny_dir):
    from safetensors.torch import load_file

    as_image = load_image_encoder("open_clip:tiny", checkpoint=tiny_dir, device="cpu")
    as_text = load_text_encoder("open_clip:tiny", checkpoint=str(tiny_dir), device="cpu")
    by_dir = load_clip_encoder(f"open_clip:local-dir:{tiny_dir}", device="cpu")
    assert by_dir.spec == f"open_clip:local-dir:{tiny_dir.resolve()}"
    for enc in (as_image, as_text, by_dir):
        assert enc.dim == TINY_EMBED_DIM and enc.fingerprint() == tiny.fingerprint()
    np.testing.assert_allclose(by_dir.encode_texts(TEXTS), tiny.encode_texts(TEXTS), atol=1e-6)
    # the weights really came from the file (not a fresh random init)
    saved = load_file(str(tiny_dir / "open_clip_model.safetensors"))
    live = tiny._model.state_dict()
    assert all((live[k] == v).all() for k, v in saved.items())


def test_builtin_architecture_with_checkpoint_file(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-S-32-alt", pretrained=None)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    enc = load_clip_encoder("open_clip:ViT-S-32-alt", checkpoint=path, device="cpu")
    assert enc.spec == "open_clip:ViT-S-32-alt" and enc.dim == 256
    assert (enc._model.positional_embedding == model.positional_embedding.half().float()).all()
    _assert_unit_rows(enc.encode_texts(TEXTS), 3, 256)


def test_missing_checkpoint_and_bad_directory(tmp_path):
    with pytest.raises(EncoderError, match="not found"):
        load_clip_encoder("open_clip:tiny", checkpoint=tmp_path / "nope")
    with pytest.raises(EncoderError, match="open_clip_config.json"):
        load_clip_encoder("open_clip:tiny", checkpoint=tmp_path)
    with pytest.raises(EncoderError, match="names no weights"):
        load_clip_encoder("open_clip:ViT-B-32")


def test_hub_clip_offline_fails_fast_naming_the_model(offline):
    start = time.monotonic()
    with pytest.raises(EncoderError) as info:
        load_clip_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg and "`EncoderChoice.checkpoint`" in msg


def test_unresolvable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, but DNS fails: the loader must not sit in huggingface_hub's retry loop."""
    import huggingface_hub.constants as hf_constants

    from retrieval.encoders._hub import hub_unreachable_reason

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert "cannot resolve" in hub_unreachable_reason()
    start = time.monotonic()
    with pytest.raises(EncoderError, match="ViT-B-32"):
        load_clip_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    with pytest.raises(EncoderError, match="no-such-model"):
        load_text_encoder("st:some-org/no-such-model", device="cpu")
    assert time.monotonic() - start < 10


def test_offline_uses_weights_left_in_the_hub_cache(offline, tmp_path):
    import huggingface_hub.constants as hf_constants
    import open_clip

    from retrieval.encoders.open_clip_loading import cached_tag_weights

    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert cached_tag_weights(cfg) is None
    repo = Path(hf_constants.HF_HUB_CACHE) / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    weights = repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really weights")
    assert Path(cached_tag_weights(cfg)) == weights
    with pytest.raises(EncoderError, match="pretrained tag 'laion2b_s34b_b79k'"):  # found, but unloadable
        load_clip_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")


def test_unknown_open_clip_model_and_tag_suggest_names():
    with pytest.raises(EncoderError, match="ViT-B-32") as info:
        load_clip_encoder("open_clip:ViT-B-33/laion2b_s34b_b79k")
    assert "unknown open_clip model 'ViT-B-33'" in str(info.value)
    with pytest.raises(EncoderError, match="laion2b_s34b_b79k"):
        load_clip_encoder("open_clip:ViT-B-32/laion2b_s34b")


# --- sentence-transformers -----------------------------------------------------------------------


def test_st_unknown_model_raises(offline):
    with pytest.raises(EncoderError) as info:
        load_text_encoder("st:some-org/no-such-model", device="cpu")
    assert "some-org/no-such-model" in str(info.value) and "st:/path/to/model" in str(info.value)
    with pytest.raises(EncoderError, match="not found"):
        load_text_encoder("st:/no/such/dir", device="cpu")


def test_st_local_path_equals_alias(minilm):
    from retrieval.encoders.sentence_transformers import minilm_path

    by_path = load_text_encoder(f"st:{minilm_path()}", device="cpu")
    assert by_path.spec == f"st:{minilm_path().resolve()}"
    assert by_path.fingerprint() == minilm.fingerprint()


# --- timm (optional backend) ---------------------------------------------------------------------


def test_timm_with_local_checkpoint(tmp_path, photos):
    timm = pytest.importorskip("timm")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_vit").eval()
    torch.save(model.state_dict(), tmp_path / "test_vit.pth")
    enc = load_image_encoder("timm:test_vit", checkpoint=tmp_path / "test_vit.pth", device="cpu")
    assert enc.spec == "timm:test_vit" and enc.dim == model.num_features
    pixels = torch.stack([enc.image_transform()(p) for p in photos])
    got = enc.encode_image_tensors(pixels)
    _assert_unit_rows(got, len(photos), enc.dim)
    with torch.inference_mode():
        ref = model.forward_head(model.forward_features(pixels), pre_logits=True)
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    pickle.loads(pickle.dumps(enc.image_transform()))


# --- registry ----------------------------------------------------------------------------------------


def test_unknown_alias_suggests():
    with pytest.raises(EncoderError, match="efficientnet-lite0"):
        load_image_encoder("efficientnet-lite")
    with pytest.raises(EncoderError, match="open_clip:ViT-B-32"):
        load_image_encoder("openclip:ViT-B-32")
    with pytest.raises(EncoderError, match="known:"):
        load_text_encoder("no-such-encoder")


def test_wrong_modality_raises():
    with pytest.raises(EncoderError, match="text"):
        load_image_encoder("minilm")
    with pytest.raises(EncoderError, match="image"):
        load_text_encoder("efficientnet-lite0")
    with pytest.raises(EncoderError, match="contrastive"):
        load_clip_encoder("minilm")


def test_is_contrastive():
    assert is_contrastive("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert is_contrastive("open_clip:tiny")
    assert not is_contrastive("minilm") and not is_contrastive("efficientnet-lite0")


def test_resolve_device():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EncoderError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(EncoderError, match="CUDA is not available"):
            load_image_encoder("efficientnet-lite0", device="cuda")


def test_list_encoders():
    infos = {info.name: info for info in list_encoders()}
    assert all(isinstance(i, EncoderInfo) for i in infos.values())
    assert infos["minilm"].available_offline and infos["minilm"].kind == "text"
    assert infos["efficientnet-lite0"].available_offline and infos["efficientnet-lite0"].kind == "image"
    assert infos["open_clip:MODEL/PRETRAINED"].kind == "image+text"
    assert {"st:NAME_OR_PATH", "open_clip:local-dir:DIR", "timm:NAME"} <= set(infos)


def test_import_is_light():
    code = (
        "import sys, retrieval.encoders; "
        "print(sorted(m for m in ('torch', 'open_clip', 'sentence_transformers', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# --- CUDA (runs only where a GPU is present) -----------------------------------------------------------


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_matches_cpu(effnet, tiny, tiny_dir, photos):
    gpu_eff = load_image_encoder("efficientnet-lite0", device="cuda")
    gpu_clip = load_clip_encoder("open_clip:tiny", checkpoint=tiny_dir, device="cuda")
    assert gpu_eff.device == "cuda" and gpu_clip.device == "cuda"
    assert gpu_eff.fingerprint() == effnet.fingerprint()
    assert gpu_clip.fingerprint() == tiny.fingerprint()
    for cpu_enc, gpu_enc in ((effnet, gpu_eff), (tiny, gpu_clip)):
        a, b = cpu_enc.encode_images(photos), gpu_enc.encode_images(photos)
        _assert_unit_rows(b, len(photos), cpu_enc.dim)
        assert ((a * b).sum(axis=1) > 0.99).all()
    a, b = tiny.encode_texts(TEXTS), gpu_clip.encode_texts(TEXTS)
    _assert_unit_rows(b, 3, TINY_EMBED_DIM)
    assert ((a * b).sum(axis=1) > 0.99).all()


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_minilm_direct_matches_cpu(minilm):
    gpu = load_text_encoder("minilm", device="cuda")
    assert gpu.direct and gpu.fingerprint() == minilm.fingerprint()
    a, b = minilm.encode_texts(CAPTIONS), gpu.encode_texts(CAPTIONS)
    _assert_unit_rows(b, len(CAPTIONS), 384)
    assert ((a * b).sum(axis=1) > 0.999).all()
