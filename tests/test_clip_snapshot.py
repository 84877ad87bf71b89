"""CLIP query snapshots: the same vectors as the open_clip model, without importing open_clip.

A snapshot (retrieval.encoders.clip_snapshot) traces a model's towers to TorchScript so that a query
process skips ``import open_clip`` (about 2 s here). Checked: vectors and identity equal the full
encoder's (texts, real photos, the int8 image tower); a fresh process loads it without importing
open_clip or torchvision; a rewritten checkpoint is never answered from the old snapshot (the index
then reports the weight mismatch); a damaged snapshot falls back to the full load; the CLI writes one
on the first query and the next query's answers are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COCO, coco_pairs, require_shared_data
from tiny_clip import make_tiny_clip

from retrieval.core.errors import EncoderMismatchError
from retrieval.encoders.clip_snapshot import snapshot_key, write_snapshot
from retrieval.encoders.clip_snapshot_encoder import (
    META_NAME,
    TEXT_NAME,
    ClipSnapshotEncoder,
)
from retrieval.encoders.registry import load_clip_encoder
from retrieval.sources.images import load_image

ROOT = Path(__file__).resolve().parents[1]
SPEC = "open_clip:tiny"
TEXTS = ["a man riding a horse", "two dogs on a beach", "", "ünïcödé ✓ and <html> &amp; tags", "x " * 200]


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    return make_tiny_clip(tmp_path / "tiny")


def _photos(n: int = 4) -> list:
    require_shared_data()
    names = sorted({row["image"] for row in coco_pairs(n)})
    return [load_image(COCO / name).image for name in names]


def test_snapshot_gives_the_models_vectors_and_identity(tmp_path, model_dir):
    full = load_clip_encoder(SPEC, checkpoint=model_dir, device="cpu")
    assert write_snapshot(full, tmp_path / "snap")
    snap = ClipSnapshotEncoder.read(tmp_path / "snap")
    assert snap is not None
    assert (snap.spec, snap.dim, snap.fingerprint()) == (full.spec, full.dim, full.fingerprint())
    assert snap.logit_scale == pytest.approx(full.logit_scale)
    np.testing.assert_allclose(snap.encode_texts(TEXTS), full.encode_texts(TEXTS), atol=1e-5)
    photos = _photos()
    pixels = torch.stack([full.image_transform()(photo) for photo in photos])
    with torch.no_grad():
        float32 = torch.nn.functional.normalize(full.model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(snap.encode_images(photos), float32, atol=1e-5)  # the float32 tower
    assert full.numerics == "int8-linear" and snap.numerics == "fp32"
    cosines = np.sum(snap.encode_images(photos) * full.encode_images(photos), axis=1)
    assert cosines.min() >= 0.999, cosines  # and the int8 one a CPU build embeds with
    assert snap.draft_size == full.draft_size
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    traced = sum(p.stat().st_size for p in (tmp_path / "snap").glob("*.pt"))
    assert traced < 1.2 * weights  # each tower holds its own weights only, not the whole model twice


def test_a_fresh_process_loads_the_snapshot_without_open_clip(tmp_path, model_dir):
    full = load_clip_encoder(SPEC, checkpoint=model_dir, device="cpu", snapshots=tmp_path / "snaps")
    assert len(list((tmp_path / "snaps").glob(f"*/{META_NAME}"))) == 1  # written by the first load
    script = textwrap.dedent(f"""
        import json, sys
        from retrieval.encoders.registry import load_clip_encoder
        enc = load_clip_encoder(
            {SPEC!r}, checkpoint={str(model_dir)!r}, device="cpu", snapshots={str(tmp_path / "snaps")!r}
        )
        vectors = enc.encode_texts({TEXTS!r}).tolist()
        heavy = sorted(m for m in ("open_clip", "torchvision", "transformers") if m in sys.modules)
        print(json.dumps({{"type": type(enc).__name__, "heavy": heavy, "vectors": vectors}}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["type"] == "ClipSnapshotEncoder"
    assert answer["heavy"] == []
    np.testing.assert_allclose(np.array(answer["vectors"], np.float32), full.encode_texts(TEXTS), atol=1e-5)


def test_a_rewritten_checkpoint_is_not_answered_from_the_old_snapshot(tmp_path, model_dir, small_collection):
    from retrieval import EmbedOptions, EncoderChoice
    from retrieval.api.build import build_index
    from retrieval.api.engine import open_index

    index = tmp_path / "index"
    build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=index,
        encoders=EncoderChoice(clip=SPEC, checkpoint=str(model_dir), device="cpu"),
        embed=EmbedOptions(batch_size=4, workers=0, progress=False),
    )
    snaps = tmp_path / "snaps"
    before = open_index(index, device="cpu", encoder_snapshots=snaps).text_to_image("a horse", k=3)
    again = open_index(index, device="cpu", encoder_snapshots=snaps)
    assert isinstance(again.text_encoder, ClipSnapshotEncoder)  # the first query wrote it
    assert [h.id for h in again.text_to_image("a horse", k=3)] == [h.id for h in before]
    old_key = snapshot_key(SPEC, model_dir, "cpu")
    make_tiny_clip(model_dir, seed=1)  # other weights, same path
    assert snapshot_key(SPEC, model_dir, "cpu") != old_key
    with pytest.raises(EncoderMismatchError):
        open_index(index, device="cpu", encoder_snapshots=snaps).text_to_image("a horse", k=3)
    assert not (snaps / old_key).exists()  # the stale snapshot of the same spec was replaced


def test_a_damaged_snapshot_falls_back_to_the_full_model(tmp_path, model_dir, caplog):
    snaps = tmp_path / "snaps"
    full = load_clip_encoder(SPEC, checkpoint=model_dir, device="cpu", snapshots=snaps)
    folder = snaps / snapshot_key(SPEC, model_dir, "cpu")
    (folder / TEXT_NAME).write_bytes(b"not a torchscript archive")
    again = load_clip_encoder(SPEC, checkpoint=model_dir, device="cpu", snapshots=snaps)
    assert type(again).__name__ == "OpenClipEncoder"
    assert "ignoring query snapshot" in caplog.text
    np.testing.assert_allclose(again.encode_texts(TEXTS), full.encode_texts(TEXTS), atol=1e-6)


def test_the_cli_answers_the_same_from_its_snapshot(tmp_path, tiny_clip_dir, small_collection, private_cache_dir):
    from click.testing import CliRunner

    from retrieval.cli import main

    index = str(tmp_path / "index")
    runner = CliRunner()
    built = runner.invoke(
        main,
        [
            "build-index",
            "--images",
            str(small_collection / "images"),
            "--captions",
            str(small_collection / "pairs.jsonl"),
            "--encoder",
            SPEC,
            "--checkpoint",
            str(tiny_clip_dir),
            "--index",
            index,
            "--quiet",
        ],
    )
    assert built.exit_code == 0, built.output
    answers = []
    for _ in range(2):
        result = runner.invoke(main, ["text-to-image", "a man riding a horse", "--index", index, "-k", "3", "--json"])
        assert result.exit_code == 0, result.output
        answers.append([json.loads(line) for line in result.output.splitlines() if line.strip()])
    assert answers[0] == answers[1]
    key = snapshot_key(SPEC, tiny_clip_dir, "cpu")
    assert (private_cache_dir / "clip-snapshots" / key / META_NAME).is_file()


def test_retrieval_info_opens_an_index_without_importing_torch(tmp_path, model_dir, small_collection):
    """The CLI opens indexes with the snapshot folder; naming that folder must not import torch
    (it once did: ``retrieval info`` went from 0.3 s to 1.8 s)."""
    from retrieval import EmbedOptions, EncoderChoice
    from retrieval.api.build import build_index

    index = tmp_path / "index"
    build_index(
        images=[small_collection / "images"],
        index=index,
        embed=EmbedOptions(batch_size=4, workers=0, progress=False),
        encoders=EncoderChoice(clip=SPEC, checkpoint=str(model_dir), device="cpu"),
    )
    code = (
        "import sys; from retrieval.cli import main\n"
        f"try:\n    main(['info', '--index', {str(index)!r}])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout[-500:]
