"""The index stage on a local Ray cluster: IVF parts filled by Ray tasks and merged, index shards searched by
Ray actors (issue 15 sections 2 and 3). One Ray session for the module, every test under an alarm.

The same machinery without Ray (merging, sharded search in process, moving the directory) is in
test_sharded_index.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from large_index import caption_items, clustered_vectors, image_rows, tiny_clip_record
from ray_helpers import alarm_after, local_ray

from retrieval.core.search import SearchKnobs, SearchOptions

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install 'retrieval[ray]'"
)
TEST_SECONDS = 150  # a build measures recall twice; this machine's 2 cores are shared
N = 2000


@pytest.fixture(autouse=True)
def alarm():
    with alarm_after(TEST_SECONDS):
        yield


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray session on 127.0.0.1 for the module (4 logical CPUs), started as ``--ray local`` starts one."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def collection(tiny_clip_dir):
    record = tiny_clip_record(tiny_clip_dir)
    vectors, clusters = clustered_vectors(N, int(record["dim"]), seed=7)
    return record, vectors, clusters, tiny_clip_dir


def _write(path: Path, collection, index_type: str, shards: int = 1, ray=None):
    from retrieval.api.write import WriteOptions, write_index
    from retrieval.core.config import IndexOptions
    from retrieval.embed.embedded import EmbeddedItems

    record, vectors, clusters, checkpoint = collection
    rows = image_rows(path.parent / f"{path.name}-files", clusters)
    records, caption_vectors = caption_items(rows, vectors, clusters, 100)
    embedded = EmbeddedItems(
        images=rows,
        image_vectors=vectors,
        captions=records,
        caption_vectors=caption_vectors,
        encoders={"image": record, "text": record},
        shared_space=True,
    )
    options = WriteOptions(
        index_options=IndexOptions(index_type=index_type, shards=shards),
        progress=False,
        ray=ray,
        checkpoint=str(checkpoint),
    )
    return write_index(embedded, path, options)


def _search(index, queries: np.ndarray, nprobe: int | None = None):
    return index.search_vectors("image", queries, "image", 10, SearchOptions(knobs=SearchKnobs(nprobe=nprobe)))


def test_ray_tasks_fill_the_parts_of_one_ivf_index(ray_cluster, collection, tmp_path, monkeypatch):
    from retrieval.api.engine import open_index
    from retrieval.embed.ray_pipeline import RayOptions
    from retrieval.index import ray_shards

    monkeypatch.setattr(ray_shards, "MIN_PART_ROWS", 500)  # 2000 rows -> 4 parts on 4 CPUs
    monkeypatch.setattr(ray_shards, "ONDISK_MERGE_BYTES", 100_000)  # the images' lists (~270 KB) go on disk
    _write(tmp_path / "single", collection, "ivf")
    _write(tmp_path / "ray", collection, "ivf", ray=RayOptions(address="auto"))
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["vector_indexes"]["clip/image"]["parts"] == {"count": 4, "merged": "on disk"}
    assert manifest["vector_indexes"]["clip/caption"]["parts"] == {"count": 1, "merged": "in memory"}
    assert manifest["files"]["faiss_lists"]["clip/image"] in manifest["checksums"]
    assert not (tmp_path / "ray" / ".work").exists()
    single, distributed = open_index(tmp_path / "single", device="cpu"), open_index(tmp_path / "ray", device="cpu")
    vectors = collection[1]
    queries = vectors[::83]
    for nprobe in (1, 4, 32):
        a, b = _search(single, queries, nprobe), _search(distributed, queries, nprobe)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    recorded = json.loads((tmp_path / "single" / "manifest.json").read_text())["vector_indexes"]
    for key in ("clip/image", "clip/caption"):  # the same index, so the same measured recall and tuned knobs
        for field in ("knobs", "recall@1", "recall@10"):
            assert manifest["vector_indexes"][key]["measured"][field] == recorded[key]["measured"][field]


def _actor_pids(ray, searcher) -> list[int]:
    return ray.get([actor.pid.remote() for actor in searcher.actors])


def test_ray_actors_search_the_shards_and_come_back_after_a_kill(ray_cluster, collection, tmp_path):
    from retrieval.api.engine import open_index
    from retrieval.index.ray_shards import RayShardedIndex
    from retrieval.serve.served import ServedIndexes

    _write(tmp_path / "whole", collection, "ivf")
    _write(tmp_path / "sharded", collection, "ivf", shards=3)
    whole = open_index(tmp_path / "whole", device="cpu")
    here = open_index(tmp_path / "sharded", device="cpu")
    on_ray = open_index(tmp_path / "sharded", device="cpu", ray="auto")
    searcher = on_ray.vector_index("clip/image")
    assert isinstance(searcher, RayShardedIndex) and len(searcher.actors) == 3
    vectors = collection[1]
    queries = vectors[::71]
    for nprobe in (1, 8):
        expected = _search(whole, queries, nprobe)
        for index in (here, on_ray):
            found = _search(index, queries, nprobe)
            assert np.array_equal(found[1], expected[1])
            np.testing.assert_allclose(found[0], expected[0], rtol=0, atol=1e-6)
    pids = _actor_pids(ray_cluster, searcher)
    assert len(set(pids)) == 3 and os.getpid() not in pids
    os.kill(pids[1], signal.SIGKILL)  # Ray restarts the actor (max_restarts) and retries its search
    time.sleep(0.5)
    found = _search(on_ray, queries, 8)
    assert np.array_equal(found[1], _search(whole, queries, 8)[1])
    assert _actor_pids(ray_cluster, searcher)[1] != pids[1]
    on_ray.close()
    served = ServedIndexes([("s", tmp_path / "sharded")], device="cpu", warm_up=True, ray="auto")  # serve --ray
    snapshot = served.get(None).snapshot()
    assert isinstance(snapshot.index.vector_index("clip/caption"), RayShardedIndex)
    assert np.array_equal(_search(snapshot.index, queries, 8)[1], _search(whole, queries, 8)[1])
    snapshot.index.close()
