"""Untrusted index files: damaged or crafted files give an IndexFormatError naming the file; never a crash.

Every damaged directory is read in a child process (``_worker``), so a segfault in FAISS, pyarrow or
numpy shows up as a failed test naming the case instead of killing pytest. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval import EmbedOptions, EncoderChoice
from retrieval.core.errors import IndexFormatError
from retrieval.store.layout import MANIFEST_NAME
from retrieval.store.manifest import manifest_digest
from retrieval.store.reader import StoreReader
from retrieval.store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class Evil:
    """Unpickling this creates the file named in MARKER: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- the directories


def _store_dir(root: Path) -> dict[str, str]:
    """A directory with one file of every type the store writes; returns {label: relative path}."""
    import pyarrow as pa
    import scipy.sparse as sp

    from retrieval.asif.relative import SparseRelativeIndex
    from retrieval.index.vector_index import build_vector_index

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    writer = StoreWriter(root, kind="index")
    files = {
        "npy": writer.write_vectors("clip", "image", vectors)[0],
        "anchors-npy": writer.write_array("anchors", "image", vectors[:5]),
        "parquet": writer.write_table("images", pa.table({"id": [f"i{n}" for n in range(12)], "uri": ["x"] * 12})),
        "faiss": writer.write_faiss("clip-image", build_vector_index(vectors)),
        "npz": writer.write_sparse(
            "image", SparseRelativeIndex(sp.random(12, 5, density=0.4, format="csr", dtype=np.float32, random_state=1))
        ),
    }
    manifest = writer.commit(
        {
            "files": {
                "vectors": [files["npy"]],
                "anchors": files["anchors-npy"],
                "items": files["parquet"],
                "faiss": files["faiss"],
                "relative": files["npz"],
            }
        },
        [{"path": "bad.jpg", "reason": "truncated", "kind": "image", "row": None}],
    )
    files["errors"] = manifest["errors_file"]
    files["manifest"] = MANIFEST_NAME
    return files


def _read_store(root: str, verify: bool) -> None:
    from retrieval.asif.relative import SparseRelativeIndex

    reader = StoreReader(root, kind="index", verify=verify)
    files = reader.manifest["files"]
    vectors = reader.read_vectors(files["vectors"])
    reader.read_array(files["anchors"])
    assert reader.read_table(files["items"]).num_rows == 12
    index = reader.read_faiss(files["faiss"])
    if index.ntotal:
        index.search(np.ascontiguousarray(vectors[:2], np.float32), 3)
    relative = reader.read_sparse(files["relative"], SparseRelativeIndex.load)
    relative.search(relative.rows[:2], 3)
    reader.read_errors()


def _read_index(root: str, verify: bool) -> None:
    index = retrieval.open_index(root, device="cpu")
    index.store.verify = verify
    for kind in ("image", "caption"):
        ids = index.items(kind)["id"]
        if ids:
            _, positions = index.search_vectors(kind, np.ones((1, 32), np.float32) / np.sqrt(32), "text", 3)
            assert all(0 <= p < len(ids) for p in positions[0])
    index.search_collection("image", 2)
    index.search_collection("caption", 2)
    index.errors()
    index.info()


def _worker() -> None:
    """Child process: apply each damage to a fresh copy, read it, print one JSON line per case."""
    cases = json.loads(sys.stdin.read())
    for case in cases:
        print("START " + case["label"], flush=True)
        target = Path(case["copy"])
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(case["source"], target, symlinks=True)
        _damage(target, case)
        try:
            (_read_index if case["kind"] == "index" else _read_store)(str(target), case["verify"])
        except Exception as e:  # reported to the parent, which judges it
            result = {"error": type(e).__name__, "message": str(e)}
        else:
            result = {"error": None}
        result["marker"] = bool(case.get("marker")) and os.path.exists(case["marker"])
        print("END " + json.dumps(result), flush=True)


def _damage(root: Path, case: dict) -> None:
    path = root / case["file"]
    data = bytearray(path.read_bytes())
    how, arg = case["how"], case.get("arg")
    if how == "flip":
        data[arg % len(data)] ^= 0xFF
    elif how == "truncate":
        del data[arg:]
    elif how == "append":
        data += b"\0"
    elif how == "garbage":
        data = bytearray(np.random.default_rng(arg).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "replace":  # crafted content, with the manifest's checksums and digest made to match
        data = bytearray(bytes.fromhex(arg))
        path.write_bytes(data)
        _rehash(root, case["file"])
        return
    path.write_bytes(bytes(data))


def _rehash(root: Path, rel: str) -> None:
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    data = (root / rel).read_bytes()
    manifest["checksums"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _run(cases: list[dict], timeout: int = 300) -> list[dict]:
    """Run the cases in one child process; a crash fails with the name of the case that caused it."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_untrusted_files import _worker; _worker()"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(cases), capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = child.stdout.splitlines()
    started = [line[6:] for line in lines if line.startswith("START ")]
    results = [json.loads(line[4:]) for line in lines if line.startswith("END ")]
    assert child.returncode == 0 and len(results) == len(cases), (
        f"the reader process died (exit {child.returncode}) on case {started[-1] if started else '?'!r}: "
        f"{child.stderr[-3000:]}"
    )
    return results


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("store") / "dir"
    return root, _store_dir(root)


@pytest.fixture(scope="module")
def clip_index_dir(tmp_path_factory, tiny_clip_dir, small_collection) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "index"
    retrieval.build_index(
        images=[small_collection / "images"],
        captions=[small_collection / "pairs.jsonl"],
        index=path,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=4, workers=0, progress=False),
    )
    return path


def _damages(size: int) -> list[tuple[str, int | None]]:
    flips = sorted({0, 3, 8, 12, 20, 40, 64, 100, size // 2, size - 8, size - 1})
    return [("flip", f) for f in flips if f < size] + [
        ("truncate", size - 2),
        ("truncate", size // 2),
        ("truncate", 0),
        ("append", None),
        ("garbage", 7),
    ]


def _expect_clear_error(case: dict, result: dict, numpy_may_pass: bool) -> None:
    where = f"{case['file']} {case['how']} {case.get('arg')} verify={case['verify']}"
    if result["error"] is None:
        assert numpy_may_pass, f"{where}: damage went unnoticed"
        return
    assert result["error"] == "IndexFormatError", f"{where}: {result['error']}: {result['message']}"
    assert Path(case["file"]).name in result["message"], f"{where}: the message does not name the file: {result}"
    assert "\n" not in result["message"]


# --------------------------------------------------------------------------- tests


def test_every_damaged_store_file_is_a_clear_error(tmp_path, store_dir):
    source, files = store_dir
    cases = []
    for verify in (True, False):
        for label, rel in files.items():
            size = (source / rel).stat().st_size
            for how, arg in _damages(size):
                cases.append(
                    {
                        "label": f"{label} {how} {arg} verify={verify}",
                        "kind": "store",
                        "source": str(source),
                        "copy": str(tmp_path / "copy"),
                        "file": rel,
                        "how": how,
                        "arg": arg,
                        "verify": verify,
                    }
                )
    results = _run(cases)
    unnoticed = []
    for case, result in zip(cases, results, strict=True):
        # without hashing, a flipped byte inside numpy data (not its header) may go unnoticed: documented
        numpy_body = (
            not case["verify"] and case["file"].endswith((".npy", ".npz")) and case["how"] in ("flip", "garbage")
        )
        _expect_clear_error(case, result, numpy_body)
        if result["error"] is None:
            unnoticed.append(case["label"])
    assert len(cases) > 150
    assert all("verify=False" in label and ("npy" in label or "npz" in label) for label in unnoticed)


def test_every_damaged_index_file_is_a_clear_error(tmp_path, clip_index_dir):
    manifest = json.loads((clip_index_dir / MANIFEST_NAME).read_text())
    cases = []
    for rel in list(manifest["checksums"]) + [MANIFEST_NAME]:
        size = (clip_index_dir / rel).stat().st_size
        for how, arg in _damages(size)[::2]:
            cases.append(
                {
                    "label": f"{rel} {how} {arg}",
                    "kind": "index",
                    "source": str(clip_index_dir),
                    "copy": str(tmp_path / "copy"),
                    "file": rel,
                    "how": how,
                    "arg": arg,
                    "verify": True,
                }
            )
    for case, result in zip(cases, _run(cases), strict=True):
        _expect_clear_error(case, result, numpy_may_pass=False)


def test_crafted_files_with_matching_checksums_are_refused_without_unpickling(tmp_path, store_dir):
    """An attacker who also rewrites the manifest: sizes and hashes match, the contents are hostile."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    source, files = store_dir
    marker = tmp_path / "UNPICKLED"
    Evil.marker = str(marker)

    def npy(array, **kw) -> str:
        buffer = io.BytesIO()
        np.save(buffer, array, **kw)
        return buffer.getvalue().hex()

    evil_npy = npy(np.array([Evil(), 1], dtype=object), allow_pickle=True)
    npz = io.BytesIO()
    np.savez(
        npz,
        data=np.array([Evil()], dtype=object),
        indices=np.array([0]),
        indptr=np.array([0, 1]),
        format=np.array("csr"),
        shape=np.array([1, 1]),
    )
    header_lies = bytearray.fromhex(npy(np.zeros((4, 8), np.float16)))
    header_lies = header_lies.replace(b"(4, 8)", b"(9, 8)")
    faiss_data = bytearray((source / files["faiss"]).read_bytes())
    huge = bytearray(faiss_data)
    huge[8:16] = (10**12).to_bytes(8, "little")  # ntotal: a trillion vectors
    zero_d = bytearray(faiss_data)
    zero_d[4:8] = (0).to_bytes(4, "little")
    evil_field = pa.field(
        "id",
        pa.int64(),
        metadata={
            b"ARROW:extension:name": b"arrow.py_extension_type",
            b"ARROW:extension:metadata": pickle.dumps(Evil()),
        },
    )
    parquet = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(range(12))}).cast(pa.schema([evil_field])), parquet)
    crafted = [
        (files["npy"], evil_npy, r"Python objects"),
        (files["anchors-npy"], evil_npy, r"Python objects"),
        (files["npz"], npz.getvalue().hex(), r"not a readable relative-row file.*(pickle|Object)"),
        (files["npy"], bytes(header_lies).hex(), r"header says \(9, 8\)"),
        (files["faiss"], bytes(huge).hex(), r"FAISS header says 1000000000000 vectors"),
        (files["faiss"], bytes(zero_d).hex(), r"implausible FAISS header"),
        (files["parquet"], parquet.getvalue().hex(), None),  # pyarrow must not unpickle the extension type
    ]
    cases = [
        {
            "label": f"crafted {rel} #{n}",
            "kind": "store",
            "source": str(source),
            "copy": str(tmp_path / "copy"),
            "file": rel,
            "how": "replace",
            "arg": data,
            "verify": verify,
            "marker": str(marker),
        }
        for n, (rel, data, _) in enumerate(crafted)
        for verify in (True, False)
    ]
    for case, result in zip(cases, _run(cases), strict=True):
        assert not result["marker"], f"{case['label']}: something was unpickled"
        expected = crafted[int(case["label"].rsplit("#", 1)[1])][2]
        if expected is None:
            assert result["error"] in (None, "IndexFormatError"), result
        else:
            assert result["error"] == "IndexFormatError" and re.search(expected, result["message"]), (
                case["label"],
                result,
            )
    assert not marker.exists()


def test_manifest_tampering(tmp_path, store_dir):
    source, files = store_dir

    def fresh() -> Path:
        target = tmp_path / "copy"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return target

    def edit(change, rehash: bool = True) -> Path:
        root = fresh()
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        change(manifest)
        if rehash:
            manifest["manifest_sha256"] = manifest_digest(manifest)
        (root / MANIFEST_NAME).write_text(json.dumps(manifest))
        return root

    # an edit that keeps the JSON valid is caught by the manifest's own checksum
    root = edit(lambda m: m["files"].update(items=files["parquet"]) or m.update(errors=5), rehash=False)
    with pytest.raises(IndexFormatError, match=r"manifest\.json: the manifest does not match its own checksum"):
        StoreReader(root, kind="index")
    # paths that leave the directory are refused before anything is opened
    for bad in ("../../../etc/passwd", "/etc/passwd", "items/../../x", "items//x", ".lock"):
        root = edit(lambda m, bad=bad: m["checksums"].update({bad: {"bytes": 1, "sha256": "0" * 64}}))
        with pytest.raises(IndexFormatError, match="unsafe file path"):
            StoreReader(root, kind="index")
    # a file named under 'files' must have a checksum; checksum entries must be well formed
    root = edit(lambda m: m["files"].update(items="items/not-listed.parquet"))
    with pytest.raises(IndexFormatError, match="has no checksum"):
        StoreReader(root, kind="index")
    root = edit(lambda m: m["checksums"][files["faiss"]].update(sha256="xyz"))
    with pytest.raises(IndexFormatError, match="bad checksum entry"):
        StoreReader(root, kind="index")
    root = edit(lambda m: m.pop("checksums"))
    with pytest.raises(IndexFormatError, match="no checksums"):
        StoreReader(root, kind="index")
    # deep nesting and non-objects
    root = fresh()
    (root / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IndexFormatError, match="manifest"):
        StoreReader(root, kind="index")
    # a manifest from before manifest_sha256 and versioned errors still opens
    root = edit(lambda m: m.pop("errors_file"), rehash=False)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest.pop("manifest_sha256")
    manifest["checksums"].pop(files["errors"])
    (root / files["errors"]).unlink()
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert StoreReader(root, kind="index").read_errors() == [
        {"path": "bad.jpg", "reason": "truncated", "kind": "image", "row": None}
    ]


def test_special_files_in_place_of_data_files_do_not_hang(tmp_path, store_dir):
    source, files = store_dir
    for make in ("fifo", "devzero", "directory"):
        root = tmp_path / make
        shutil.copytree(source, root)
        target = root / files["faiss"]
        target.unlink()
        if make == "fifo":
            os.mkfifo(target)
        elif make == "devzero":
            target.symlink_to("/dev/zero")
        else:
            target.mkdir()
        with pytest.raises(IndexFormatError, match=re.escape(files["faiss"])):
            StoreReader(root, kind="index")


def test_verify_false_still_hashes_faiss_and_parquet(tmp_path, store_dir):
    source, files = store_dir
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    for label in ("npy", "faiss", "parquet"):
        path = root / files[label]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # the last byte: inside the data, after every header
        path.write_bytes(bytes(data))
    reader = StoreReader(root, kind="index", verify=False)
    assert reader.read_vectors([files["npy"]]).shape == (12, 8)  # numpy data: not hashed, by choice
    with pytest.raises(IndexFormatError, match=re.escape(files["faiss"]) + ".*sha256"):
        reader.read_faiss(files["faiss"])
    with pytest.raises(IndexFormatError, match=re.escape(files["parquet"]) + ".*sha256"):
        reader.read_table(files["parquet"])
    with pytest.raises(IndexFormatError, match=re.escape(files["npy"]) + ".*sha256"):
        StoreReader(root, kind="index").read_vectors([files["npy"]])  # the default hashes everything


def test_nothing_in_the_package_can_unpickle():
    """Source check: every np.load refuses pickles, every torch.load is weights_only, no pickle import."""
    offenders = []
    for path in sorted((ROOT / "retrieval").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if re.search(r"\b(np|numpy)\.load\(", line) and "allow_pickle=False" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
            if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M):
            offenders.append(f"{path.name}: imports a pickle library")
        if re.search(r"allow_pickle\s*=\s*True|weights_only\s*=\s*False", text):
            offenders.append(f"{path.name}: enables pickle")
    assert not offenders, offenders
