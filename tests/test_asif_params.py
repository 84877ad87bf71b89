"""ASIF k and p from the command line: an option left out is the anchor set's own, and fused sets must agree."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import COCO, coco_pairs, require_shared_data

import retrieval
from retrieval import AsifParams, EmbedOptions, EncoderChoice
from retrieval.asif.anchors import AnchorSet, load_anchor_set, save_anchor_set
from retrieval.cli.main import main

QUIET = EmbedOptions(batch_size=8, workers=0, progress=False)
UNIMODAL = ["--image-encoder", "efficientnet-lite0", "--text-encoder", "minilm", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def anchor_dirs(tmp_path_factory):
    """Anchors from COCO photos 7-18 (none of the small collection's six) with k=4, p=1.5, and a copy with p=3."""
    require_shared_data()
    root = tmp_path_factory.mktemp("anchors")
    rows = coco_pairs(18)[len(coco_pairs(6)) :]
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"image": str(COCO / row["image"]), "caption": row["caption"]}) + "\n")
    retrieval.build_anchors(
        [root / "pairs.jsonl"],
        root / "a",
        EncoderChoice(image="efficientnet-lite0", text="minilm", device="cpu"),
        embed=QUIET,
        asif=AsifParams(k=4, p=1.5),
    )
    a = load_anchor_set(root / "a")
    other = AnchorSet(
        "b",
        a.image_vectors,
        a.text_vectors,
        a.captions,
        a.image_encoder,
        a.text_encoder,
        AsifParams(k=4, p=3.0),
        a.uris,
    )
    save_anchor_set(other, root / "b")
    return root / "a", root / "b"


def test_build_index_k_without_p_keeps_the_anchor_sets_p(anchor_dirs, small_collection, tmp_path):
    a, _ = anchor_dirs
    result = CliRunner().invoke(
        main,
        [
            "build-index",
            "--captions",
            str(small_collection / "pairs.jsonl"),
            "--index",
            str(tmp_path / "i"),
            "--anchors",
            str(a),
            "--k",
            "3",
            *UNIMODAL,
        ],
    )
    assert result.exit_code == 0, result.output
    index = retrieval.open_index(tmp_path / "i", device="cpu")
    assert index.asif_params == AsifParams(k=3, p=1.5)  # was p=3.0, AsifParams' placeholder
    assert index.relative_index("image").rows.getnnz(axis=1).max() <= 3
    info = CliRunner().invoke(main, ["info", "--index", str(tmp_path / "i")])
    assert "ASIF k=3 p=1.5" in info.output


def test_fused_anchor_sets_with_different_p_need_one_chosen(anchor_dirs, small_collection, tmp_path):
    a, b = anchor_dirs
    args = [
        "build-index",
        "--captions",
        str(small_collection / "pairs.jsonl"),
        "--index",
        str(tmp_path / "i"),
        "--anchors",
        str(a),
        "--anchors",
        str(b),
        "--k",
        "3",
        *UNIMODAL,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "different ASIF p" in result.output and "--p" in result.output
    assert str(a) in result.output and str(b) in result.output
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_eval_k_without_p_keeps_the_anchor_sets_p(anchor_dirs, small_collection, tmp_path):
    a, b = anchor_dirs
    common = [
        "eval",
        str(small_collection / "pairs.jsonl"),
        "--anchors",
        str(a),
        "--route",
        "asif",
        "--cache",
        str(tmp_path / "cache"),
        *UNIMODAL,
    ]
    result = CliRunner().invoke(main, [*common, "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    assert (row["route"], row["k"], row["p"]) == ("asif k=3 p=1.5", 3, 1.5)  # was p=3
    result = CliRunner().invoke(main, [*common, "--json"])
    assert json.loads(result.stdout)["rows"][0]["route"] == "asif k=4 p=1.5"  # was k=100 p=2
    fused = CliRunner().invoke(main, [*common, "--anchors", str(b)])
    assert fused.exit_code != 0 and "different ASIF p" in fused.output
    swept = CliRunner().invoke(main, [*common, "--anchors", str(b), "--sweep", "p=1,2", "--json"])
    assert swept.exit_code == 0, swept.output
    assert [r["route"] for r in json.loads(swept.stdout)["rows"]] == ["asif k=4 p=1", "asif k=4 p=2"]
