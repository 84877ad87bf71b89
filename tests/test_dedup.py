"""Near-duplicates: groups over an index (``Index.duplicates``, ``retrieval dedup``), collapsed query results
(``dedup=``, ``--dedup``) and the HTTP ``deduplicate`` flag, one rule for all.

The index holds the 80 COCO photos and 30 planted copies (10 re-encoded at JPEG quality 60, 10 resized
to half, 10 cropped to their central 90%), embedded once per module with the offline EfficientNet-Lite0
in an ASIF index: duplicates compare in the image encoder's own space.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import COCO, require_shared_data
from PIL import Image
from test_engine_asif import QUIET, UNIMODAL, anchor_dir, imagenet_subset  # noqa: F401

import retrieval
from retrieval import InputError, Query
from retrieval.api.dedup import DEFAULT_THRESHOLD, distinct
from retrieval.cli.main import main
from retrieval.index.dedup import greedy_keep, groups_of, near_duplicate_pairs

PLANTS = ("q60", "half", "crop")


def plant(original, kind: str, out) -> None:
    """Write the planted copy of ``original`` of ``kind`` to ``out`` (a JPEG)."""
    with Image.open(original) as image:
        image = image.convert("RGB")
        if kind == "half":
            image = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
        elif kind == "crop":
            dw, dh = round(image.width * 0.05), round(image.height * 0.05)
            image = image.crop((dw, dh, image.width - dw, image.height - dh))
        image.save(out, "JPEG", quality=60 if kind == "q60" else 90)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A folder of the 80 photos and 30 copies; returns (folder, {copy name: (original name, kind)})."""
    require_shared_data()
    folder = tmp_path_factory.mktemp("planted") / "photos"
    folder.mkdir()
    originals = sorted((COCO / "images").glob("*.jpg"))
    assert len(originals) == 80
    copies = {}
    for number, original in enumerate(originals):
        shutil.copy(original, folder / original.name)
        if number % 8 < 3:
            kind = PLANTS[number % 8]
            name = f"zz-{kind}-{original.name}"
            plant(original, kind, folder / name)
            copies[name] = (original.name, kind)
    assert len(copies) == 30
    return folder, copies


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, planted, anchor_dir):  # noqa: F811
    return retrieval.build_index(
        images=[planted[0]],
        index=tmp_path_factory.mktemp("dups") / "i",
        encoders=UNIMODAL,
        anchors=anchor_dir,
        embed=QUIET,
    )


def name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def test_every_planted_copy_is_found_and_no_false_group(dup_index, planted):
    _, copies = planted
    groups = dup_index.duplicates()
    found = {frozenset(name(item.uri) for item in [g.keeper, *g.duplicates]) for g in groups}
    assert found == {frozenset({copy, original}) for copy, (original, _) in copies.items()}
    for group in groups:
        [duplicate] = group.duplicates
        original, kind = (
            copies[name(duplicate.uri)] if name(duplicate.uri) in copies else copies[name(group.keeper.uri)]
        )
        if kind in ("half", "crop"):  # the keeper has the most pixels: the original
            assert name(group.keeper.uri) == original and duplicate.width < group.keeper.width
        else:  # the same size: the earliest added
            assert group.keeper.position < duplicate.position
        assert DEFAULT_THRESHOLD <= duplicate.similarity < 1
    # the margins the default threshold sits between, in the image encoder's own space
    vectors = dup_index.store.read_vectors(dup_index.manifest["files"]["vectors"]["image/image"]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    uris = [name(u) for u in dup_index.items("image")["uri"]]
    originals = [i for i, u in enumerate(uris) if u not in copies]
    among = vectors[originals] @ vectors[originals].T
    np.fill_diagonal(among, -1)
    planted_sims = [float(vectors[uris.index(c)] @ vectors[uris.index(o)]) for c, (o, _) in copies.items()]
    assert among.max() < DEFAULT_THRESHOLD - 0.1 and min(planted_sims) >= DEFAULT_THRESHOLD + 0.05, (
        among.max(),
        min(planted_sims),
    )


def test_dedup_collapses_query_results_and_still_returns_k(dup_index, planted):
    folder, copies = planted
    copy, (original, _) = next((c, v) for c, v in copies.items() if v[1] == "half")
    plain = dup_index.image_to_image(folder / original, k=4)
    assert {name(h.uri) for h in plain[:2]} == {original, copy}
    deduped = dup_index.search(
        Query.image(folder / original), k=4, options=retrieval.SearchOptions(dedup=DEFAULT_THRESHOLD)
    )
    assert [name(h.uri) for h in deduped[:1]] == [original] and copy not in [name(h.uri) for h in deduped]
    assert len(deduped) == 4 and [h.rank for h in deduped] == [1, 2, 3, 4]
    assert [h.id for h in deduped[1:]] == [h.id for h in dup_index.image_to_image(folder / original, k=5)[2:5]]
    with pytest.raises(InputError, match="`SearchOptions.dedup` must be a cosine in"):
        retrieval.SearchOptions(dedup=1.5)


def test_the_http_deduplicate_flag_uses_the_same_rule(dup_index, planted):
    from retrieval.serve.clip_back import DUPLICATE_SIMILARITY, deduplicated
    from retrieval.serve.queries import Found
    from retrieval.serve.served import Snapshot

    folder, _ = planted
    closest = max(dup_index.duplicates(), key=lambda group: group.duplicates[0].similarity)
    assert closest.duplicates[0].similarity >= DUPLICATE_SIMILARITY  # clip back's threshold (0.94) drops this copy
    hits = dup_index.image_to_image(closest.keeper.uri, k=10)
    positions = [dup_index.items("image")["id"].index(h.id) for h in hits]
    found = [Found(position=p, score=h.score) for p, h in zip(positions, hits, strict=True)]
    kept = deduplicated(Snapshot("x", dup_index), "image", found)
    assert [f.position for f in kept] == [
        positions[i] for i in distinct(dup_index, "image", positions, DUPLICATE_SIMILARITY)
    ]
    assert closest.duplicates[0].position not in [f.position for f in kept]
    vectors = dup_index.store.read_vectors(dup_index.manifest["files"]["vectors"]["image/image"]).astype(np.float64)[
        positions
    ]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected: list[int] = []  # the rule by hand: keep a hit unless a kept, better one is within the threshold
    for row in range(len(positions)):
        if all(vectors[row] @ vectors[other] < DUPLICATE_SIMILARITY for other in expected):
            expected.append(row)
    assert [f.position for f in kept] == [positions[row] for row in expected] and len(kept) < len(found)


def test_cli_dedup_and_query_flag(dup_index, planted):
    folder, copies = planted
    runner = CliRunner()
    result = runner.invoke(main, ["dedup", "--index", str(dup_index.path), "--json"])
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 30 and {"keeper", "duplicates"} <= groups[0].keys()
    result = runner.invoke(main, ["dedup", "--index", str(dup_index.path), "--threshold", "0.999"])
    assert result.exit_code == 0 and "0 groups" in result.output
    copy, (original, _) = next((c, v) for c, v in copies.items() if v[1] == "crop")
    args = [
        "image-to-image",
        str(folder / original),
        "--index",
        str(dup_index.path),
        "--json",
        "-k",
        "3",
        "--device",
        "cpu",
    ]
    plain = [name(json.loads(line)["uri"]) for line in runner.invoke(main, args).stdout.splitlines()]
    result = runner.invoke(main, [*args, "--dedup"])
    assert result.exit_code == 0, result.output
    deduped = [name(json.loads(line)["uri"]) for line in result.stdout.splitlines()]
    assert copy in plain and copy not in deduped and len(deduped) == 3


def test_a_removed_copy_leaves_its_group(tmp_path, dup_index, planted):
    _, copies = planted
    shutil.copytree(dup_index.path, tmp_path / "i")
    copy = next(iter(copies))
    images = dup_index.items("image")
    gone = next(i for i, u in zip(images["id"], images["uri"], strict=True) if name(u) == copy)
    retrieval.remove_from_index(tmp_path / "i", ids=[gone])
    groups = retrieval.open_index(tmp_path / "i", device="cpu").duplicates()
    assert len(groups) == 29 and all(
        copy not in {name(g.keeper.uri), *(name(d.uri) for d in g.duplicates)} for g in groups
    )


def test_vector_level_rules_against_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    vectors = np.vstack(
        [base, base[:10] + 0.05 * rng.normal(size=(10, 16)).astype(np.float32), base[3:4]]
    )  # near and exact copies
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    for threshold in (0.9, 0.99):
        pairs = near_duplicate_pairs(
            lambda a, b: vectors[a:b], len(vectors), threshold, block=7
        )  # blocks across the copies
        expected = {
            (i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors)) if sims[i, j] >= threshold - 1e-6
        }
        assert {tuple(p) for p in pairs.tolist()} == expected
    assert groups_of(np.array([[0, 5], [5, 9], [2, 3]]), 10) == [[0, 5, 9], [2, 3]]  # chains join
    kept = greedy_keep(vectors, 0.9)
    assert all(max(sims[i, j] for j in kept if j < i) < 0.9 for i in kept if i != kept[0])
    assert all(any(sims[i, j] >= 0.9 for j in kept if j < i) for i in range(len(vectors)) if i not in kept)
    assert near_duplicate_pairs(lambda a, b: vectors[a:b], len(vectors), 0.9999).tolist() == [[3, 50]]  # the exact copy
    with pytest.raises(InputError, match="threshold"):
        greedy_keep(vectors, 0)
