"""Projected ASIF route, anchor-set fusion, rank fusion and the linear baseline vs numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.asif.fusion import fuse_relative, reciprocal_rank_fusion
from retrieval.asif.linear import LinearAlignment
from retrieval.asif.projection import project_to_modality
from retrieval.asif.relative import AnchorSpace, AsifParams
from retrieval.core.errors import IndexFormatError, InputError


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def _random_relative(rng: np.random.Generator, n: int, n_anchors: int, k: int) -> sp.csr_matrix:
    """Random ASIF-like rows: k positive entries per row, L2-normalised; row 1 all zero."""
    dense = np.zeros((n, n_anchors))
    for i in range(n):
        cols = rng.choice(n_anchors, size=k, replace=False)
        dense[i, cols] = rng.random(k) + 0.01
    dense[1] = 0.0
    return sp.csr_matrix(_unit(dense).astype(np.float32))


def _paired(rng: np.random.Generator, n: int, a: np.ndarray, b: np.ndarray, noise: float = 0.3):
    """n pairs sharing a latent z: x = A z + noise, y = B z + noise, rows normalised."""
    z = rng.standard_normal((n, a.shape[1]))
    x = z @ a.T + noise * rng.standard_normal((n, a.shape[0]))
    y = z @ b.T + noise * rng.standard_normal((n, b.shape[0]))
    return _unit(x).astype(np.float32), _unit(y).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    """300 anchor pairs + 100 held-out pairs, d_img=48, d_txt=24, latent 8."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((48, 8)), rng.standard_normal((24, 8))
    img, txt = _paired(rng, 400, a, b, noise=1.5)  # hard enough that recall@1 is well below 1
    return img[:300], txt[:300], img[300:], txt[300:]


def _recall_at_1(queries: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(queries @ targets.T, axis=1) == np.arange(len(queries))))


# --------------------------------------------------------------------------- project_to_modality


def test_project_matches_dense_reference():
    rng = np.random.default_rng(0)
    rel = _random_relative(rng, 20, 31, 5)
    anchors = rng.standard_normal((31, 12)).astype(np.float32)
    out = project_to_modality(rel, anchors)
    ref = _unit(rel.toarray().astype(np.float64) @ anchors.astype(np.float64))
    assert out.shape == (20, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert not out[1].any() and np.isfinite(out).all()
    nz = np.ones(20, bool)
    nz[1] = False
    np.testing.assert_allclose(np.linalg.norm(out[nz], axis=1), 1.0, atol=1e-5)


def test_project_rejects_mismatched_anchors():
    rel = _random_relative(np.random.default_rng(1), 4, 10, 3)
    with pytest.raises(InputError):
        project_to_modality(rel, np.ones((9, 5), np.float32))
    with pytest.raises(InputError):
        project_to_modality(rel.toarray(), np.ones((10, 5), np.float32))


def test_projected_asif_route_beats_chance(synthetic):
    img_a, txt_a, img_q, txt_q = synthetic
    space = AnchorSpace(img_a[:200], txt_a[:200])
    rel = space.relative(img_q, "image", AsifParams(k=20, p=3.0))
    projected = project_to_modality(rel, txt_a[:200])  # held-out images in the text space
    # text -> image: query with raw text vectors against the projected images
    r1 = _recall_at_1(txt_q, projected)
    chance = 1.0 / len(txt_q)
    assert r1 >= 15 * chance, r1


# --------------------------------------------------------------------------- fuse_relative


def test_fuse_relative_scoring_identity():
    rng = np.random.default_rng(2)
    parts = [_random_relative(rng, 15, n_anch, 4) for n_anch in (11, 23, 7)]
    parts[2] = sp.csr_matrix(parts[2].toarray() * 0.5)  # a part whose rows are not unit length
    weights = [0.5, 2.0, 1.5]
    fused = fuse_relative(parts, weights)
    assert sp.isspmatrix_csr(fused) and fused.shape == (15, 41) and fused.dtype == np.float32
    dense = [p.toarray().astype(np.float64) for p in parts]
    inner = sum(w * d @ d.T for w, d in zip(weights, dense, strict=True))
    sq = np.array([sum(w * d[i] @ d[i] for w, d in zip(weights, dense, strict=True)) for i in range(15)])
    norms = np.sqrt(sq)
    denom = np.outer(norms, norms)
    ref = np.divide(inner, denom, out=np.zeros_like(inner), where=denom > 0)
    got = (fused @ fused.T).toarray()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert fused[1].nnz == 0  # row 1 empty in every part


def test_fuse_relative_default_weights_and_zero_weight():
    rng = np.random.default_rng(3)
    a, b = _random_relative(rng, 6, 9, 3), _random_relative(rng, 6, 5, 2)
    equal = fuse_relative([a, b]).toarray()
    ref = _unit(np.hstack([a.toarray(), b.toarray()]).astype(np.float64))
    np.testing.assert_allclose(equal, ref, atol=1e-6)
    only_a = fuse_relative([a, b], [1.0, 0.0]).toarray()
    np.testing.assert_allclose(only_a[:, :9], a.toarray(), atol=1e-6)
    assert not only_a[:, 9:].any()


@pytest.mark.parametrize("weights", [[1.0], [1.0, -0.5], [0.0, 0.0], [1.0, float("nan")], [1, 2, 3]])
def test_fuse_relative_rejects_bad_weights(weights):
    rng = np.random.default_rng(4)
    parts = [_random_relative(rng, 5, 8, 2), _random_relative(rng, 5, 6, 2)]
    with pytest.raises(InputError):
        fuse_relative(parts, weights)


def test_fuse_relative_rejects_bad_parts():
    rng = np.random.default_rng(5)
    with pytest.raises(InputError):
        fuse_relative([_random_relative(rng, 5, 8, 2), _random_relative(rng, 4, 8, 2)])
    with pytest.raises(InputError):
        fuse_relative([])


# --------------------------------------------------------------------------- reciprocal rank fusion


def _rrf_reference(rankings, k, constant, weights):
    weights = [1.0] * len(rankings) if weights is None else weights
    n_q = rankings[0].shape[0]
    per_query = []
    for q in range(n_q):
        score: dict[int, float] = {}
        for r, w in zip(rankings, weights, strict=True):
            if w == 0:
                continue
            seen = set()
            for rank, pos in enumerate(r[q].tolist()):
                if pos < 0 or pos in seen:
                    continue
                seen.add(pos)
                score[pos] = score.get(pos, 0.0) + w / (constant + rank + 1)
        per_query.append(sorted(score.items(), key=lambda t: (-t[1], t[0]))[:k])
    width = min(k, max((len(s) for s in per_query), default=0))
    scores = np.zeros((n_q, width))
    positions = np.full((n_q, width), -1, dtype=np.int64)
    for q, items in enumerate(per_query):
        for j, (pos, s) in enumerate(items[:width]):
            scores[q, j], positions[q, j] = s, pos
    return scores, positions


def _check_rrf(rankings, k, constant=60.0, weights=None):
    scores, positions = reciprocal_rank_fusion(rankings, k, constant, weights)
    ref_s, ref_p = _rrf_reference(rankings, k, constant, weights)
    assert scores.dtype == np.float32 and positions.dtype == np.int64
    assert positions.shape == ref_p.shape
    np.testing.assert_array_equal(positions, ref_p)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-6)


def test_rrf_random_against_reference():
    rng = np.random.default_rng(6)
    for trial in range(40):
        n_q, n_items = 4, int(rng.integers(3, 25))
        rankings = []
        for _ in range(int(rng.integers(1, 4))):
            m = int(rng.integers(0, 10))
            if trial % 4 == 0:  # repeated positions within a row
                r = rng.integers(-1, n_items, size=(n_q, m))
            else:
                r = np.full((n_q, m), -1, dtype=np.int64)
                for q in range(n_q):
                    perm = rng.permutation(n_items)[:m]
                    r[q, : perm.size] = perm
                r[rng.random(r.shape) < 0.2] = -1  # padding, also in the middle
            rankings.append(r.astype(np.int64))
        weights = None
        if trial % 2 == 0:
            weights = [float(w) for w in rng.integers(0, 3, len(rankings))]
            weights[0] = max(weights[0], 1.0)
        constant = float(rng.choice([0.0, 1.0, 60.0]))
        _check_rrf(rankings, int(rng.integers(1, 12)), constant, weights)


def test_rrf_ties_and_padding():
    # position 3 and 1 tie (rank 0 + rank 1 each); lower position wins
    a = np.array([[3, 1, -1], [-1, -1, -1]], dtype=np.int64)
    b = np.array([[1, 3, 5], [2, -1, -1]], dtype=np.int64)
    scores, positions = reciprocal_rank_fusion([a, b], k=10, constant=60.0)
    assert positions.shape == (2, 3)
    np.testing.assert_array_equal(positions, [[1, 3, 5], [2, -1, -1]])
    assert scores[0, 0] == scores[0, 1]
    np.testing.assert_allclose(scores[1], [1 / 61, 0.0, 0.0], rtol=1e-6)
    _check_rrf([a, b], 2)
    # a repeated position counts once, at its best rank
    _check_rrf([np.array([[4, 4, 2]]), np.array([[2, 4, 4]])], 5)
    # all padding -> zero-width result
    s, p = reciprocal_rank_fusion([np.full((3, 4), -1)], k=5)
    assert s.shape == p.shape == (3, 0)


def test_rrf_rejects_bad_input():
    good = np.array([[0, 1]], dtype=np.int64)
    for args in [
        {"rankings": [good], "k": 0},
        {"rankings": [], "k": 3},
        {"rankings": [good, np.array([[0], [1]])], "k": 3},
        {"rankings": [np.array([[0, -2]])], "k": 3},
        {"rankings": [good.astype(float)], "k": 3},
        {"rankings": [good], "k": 3, "constant": -1.0},
        {"rankings": [good, good], "k": 3, "weights": [1.0]},
        {"rankings": [good], "k": 3, "weights": [0.0]},
    ]:
        with pytest.raises(InputError):
            reciprocal_rank_fusion(**args)


# --------------------------------------------------------------------------- LinearAlignment


def test_linear_alignment_retrieval_beats_chance(synthetic):
    img_a, txt_a, img_q, txt_q = synthetic
    model = LinearAlignment.fit(img_a, txt_a)  # ridge chosen by cross-validation
    assert model.ridge in np.logspace(-3, 2, 6)
    assert model.image_to_text.shape == (48, 24) and model.text_to_image.shape == (24, 48)
    mapped_img = model.map_images(img_q)
    mapped_txt = model.map_texts(txt_q)
    assert mapped_img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mapped_img, axis=1), 1.0, atol=1e-5)
    chance = 1.0 / len(img_q)
    assert _recall_at_1(mapped_img, txt_q) >= 20 * chance
    assert _recall_at_1(mapped_txt, img_q) >= 20 * chance
    # deterministic
    assert LinearAlignment.fit(img_a, txt_a).ridge == model.ridge


def _reference_cv_ridge(x, y, grid, folds=5):
    """Brute-force CV with np.linalg.solve: recall@1, then MRR, then larger ridge."""
    fold = np.arange(len(x)) % folds
    best = None
    for ridge in grid:
        r1 = mrr = 0.0
        for f in range(folds):
            tr, te = fold != f, fold == f
            for src, dst in ((x, y), (y, x)):
                d = src.shape[1]
                w = np.linalg.solve(src[tr].T @ src[tr] + ridge * np.eye(d), src[tr].T @ dst[tr])
                s = _unit(src[te] @ w) @ _unit(dst[te]).T
                rank = (s >= np.diag(s)[:, None]).sum(axis=1) - 1
                r1 += np.mean(rank == 0)
                mrr += np.mean(1.0 / (rank + 1.0))
        if best is None or (r1, mrr, ridge) > best:
            best = (r1, mrr, ridge)
    return best[2]


def test_linear_alignment_cv_matches_bruteforce(synthetic):
    img_a, txt_a, _, _ = synthetic
    grid = np.logspace(-3, 2, 6)
    for n in (120, 30):  # primal (N > d) and, for image -> text, dual folds (N < 48)
        x, y = img_a[:n].astype(np.float64), txt_a[:n].astype(np.float64)
        expected = _reference_cv_ridge(x, y, grid)
        assert LinearAlignment.fit(img_a[:n], txt_a[:n]).ridge == pytest.approx(expected)


def test_linear_alignment_matches_numpy_ridge(synthetic):
    img_a, txt_a, _, _ = synthetic
    ridge = 0.7
    x, y = img_a.astype(np.float64), txt_a.astype(np.float64)
    # primal form (N=300 > d): solve; check against augmented least squares too
    model = LinearAlignment.fit(img_a, txt_a, ridge=ridge)
    w_xy = np.linalg.solve(x.T @ x + ridge * np.eye(48), x.T @ y)
    x_aug = np.vstack([x, np.sqrt(ridge) * np.eye(48)])
    y_aug = np.vstack([y, np.zeros((48, 24))])
    w_lstsq = np.linalg.lstsq(x_aug, y_aug, rcond=None)[0]
    np.testing.assert_allclose(w_xy, w_lstsq, atol=1e-8)
    np.testing.assert_allclose(model.image_to_text, w_xy, atol=1e-5)
    w_yx = np.linalg.solve(y.T @ y + ridge * np.eye(24), y.T @ x)
    np.testing.assert_allclose(model.text_to_image, w_yx, atol=1e-5)
    # dual form (N=20 < d=48) agrees with the primal solution
    small = LinearAlignment.fit(img_a[:20], txt_a[:20], ridge=ridge)
    xs, ys = x[:20], y[:20]
    primal = np.linalg.solve(xs.T @ xs + ridge * np.eye(48), xs.T @ ys)
    dual = xs.T @ np.linalg.solve(xs @ xs.T + ridge * np.eye(20), ys)
    np.testing.assert_allclose(primal, dual, atol=1e-8)
    np.testing.assert_allclose(small.image_to_text, primal, atol=1e-5)


def test_linear_alignment_rejects_bad_input(synthetic):
    img_a, txt_a, _, _ = synthetic
    with pytest.raises(InputError):
        LinearAlignment.fit(img_a[:10], txt_a[:11], ridge=1.0)
    with pytest.raises(InputError):
        LinearAlignment.fit(img_a, txt_a, ridge=0.0)
    model = LinearAlignment.fit(img_a[:50], txt_a[:50], ridge=1.0)
    with pytest.raises(InputError):
        model.map_images(txt_a[:3])
    with pytest.raises(InputError):
        model.map_texts(img_a[:3])


def test_linear_alignment_save_load_round_trip(tmp_path, synthetic):
    img_a, txt_a, img_q, _ = synthetic
    model = LinearAlignment.fit(img_a, txt_a, ridge=0.3)
    path = tmp_path / "align.npz"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["align.npz"]  # no temp file left behind
    loaded = LinearAlignment.load(path)
    np.testing.assert_array_equal(loaded.image_to_text, model.image_to_text)
    np.testing.assert_array_equal(loaded.text_to_image, model.text_to_image)
    assert loaded.ridge == model.ridge
    np.testing.assert_array_equal(loaded.map_images(img_q), model.map_images(img_q))
    with np.load(path, allow_pickle=False) as data:  # really no pickled objects
        assert all(data[key].dtype != object for key in data.files)


def test_linear_alignment_load_errors(tmp_path, synthetic):
    img_a, txt_a, _, _ = synthetic
    missing = tmp_path / "missing.npz"
    with pytest.raises(IndexFormatError, match="missing.npz"):
        LinearAlignment.load(missing)
    path = tmp_path / "align.npz"
    LinearAlignment.fit(img_a[:40], txt_a[:40], ridge=1.0).save(path)
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexFormatError, match="truncated.npz"):
        LinearAlignment.load(truncated)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(IndexFormatError, match="garbage.npz"):
        LinearAlignment.load(garbage)
    wrong = tmp_path / "wrong.npz"
    np.savez(
        wrong,
        format_version=np.int64(1),
        image_to_text=np.ones((4, 3)),
        text_to_image=np.ones((4, 3)),
        ridge=np.float64(1.0),
    )
    with pytest.raises(IndexFormatError, match="wrong.npz"):
        LinearAlignment.load(wrong)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        format_version=np.int64(1),
        image_to_text=np.array([object()], dtype=object),
        text_to_image=np.ones((3, 4)),
        ridge=np.float64(1.0),
    )
    with pytest.raises(IndexFormatError, match="pickled.npz"):
        LinearAlignment.load(pickled)
