"""Faults of a Ray build (a worker or the driver SIGKILLed mid-job), unit storage through fsspec,
and shipping this package to a joined cluster.

The Ray tests share one local cluster on 127.0.0.1 (ray.init takes 4-6 s); its actors inherit
``RETRIEVAL_TEST_RAY_HOOKS`` (:mod:`retrieval.embed.ray_hooks`), which makes the faults
deterministic: an actor kills itself on a chosen unit, logs each unit it writes, or holds still
so the driver can be killed mid-job. Every test runs under an alarm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from ray_helpers import alarm_after, local_ray, photos_with_a_broken_one

from retrieval.embed.ray_cluster import LOOPBACK_ENV, RayOptions
from retrieval.embed.ray_hooks import HOOKS_ENV
from retrieval.embed.resume import Shard

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install 'retrieval[ray]'")
ROOT = Path(__file__).resolve().parents[1]
TEST_SECONDS = 240


@pytest.fixture(autouse=True)
def alarm():
    with alarm_after(TEST_SECONDS):
        yield


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-hooks")


@pytest.fixture(scope="module")
def ray_cluster(hooks):
    """One local Ray session for the module whose workers see the test hooks' folder."""
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), (
            "another module's Ray session is open: its workers lack the hooks"
        )
    with local_ray({HOOKS_ENV: str(hooks)}) as ray:
        yield ray


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 COCO photos and one truncated JPEG, as loose files."""
    return photos_with_a_broken_one(tmp_path_factory.mktemp("ray-fault-photos"))


def _choice(tiny_clip_dir: Path):
    from retrieval.core.config import EncoderChoice

    return EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


def _embedded(hooks: Path, package: bool = False) -> list[tuple]:
    """(unit start, actor pid[, package folder]) of each unit written since the log was last cleared."""
    log = hooks / "embedded.log"
    rows = [line.split(" ", 2) for line in log.read_text().splitlines()] if log.exists() else []
    return [(int(a), int(b), c) if package else (int(a), int(b)) for a, b, c in rows]


def _clear(hooks: Path) -> None:
    for path in hooks.iterdir():
        path.unlink()


def _single_machine(refs, encoder):
    from retrieval.embed.pipeline import EmbedOptions, embed_images

    return embed_images(refs, encoder, EmbedOptions(batch_size=4, workers=0, progress=False))


def _same(result, reference) -> None:
    """The same rows in the same order (no duplicate, none missing), vectors, errors."""
    assert [r.ref.id for r in result.rows] == [r.ref.id for r in reference.rows]
    assert len({r.ref.id for r in result.rows}) == len(result.rows)
    a, b = result.vectors, reference.vectors
    assert a.shape == b.shape
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    assert [(e.path, e.reason) for e in result.errors] == [(e.path, e.reason) for e in reference.errors]


@needs_ray
def test_a_killed_worker_is_restarted_and_its_unit_run_again(ray_cluster, hooks, photos, tiny_clip_dir, tmp_path):
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.embed.ray_pipeline import embed_images_on_ray
    from retrieval.encoders.registry import load_clip_encoder

    _clear(hooks)
    refs = gather_items([photos], []).images
    encoder = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    (hooks / "kill-8").write_text("1")  # the actor that picks up unit 8..12 SIGKILLs itself, once
    result = embed_images_on_ray(
        refs,
        encoder,
        EmbedOptions(batch_size=4, progress=False),
        tmp_path,
        RayOptions(address="local", unit_size=4, actors=1, encoders=_choice(tiny_clip_dir)),
    )
    assert not (hooks / "kill-8").exists(), "the worker was never killed: the test tested nothing"
    log = _embedded(hooks)
    assert Counter(start for start, _ in log) == Counter(range(0, 25, 4)), log  # each unit written once
    assert len({pid for _, pid in log}) >= 2, log  # one actor, so a second pid is its restart
    _same(result, _single_machine(refs, encoder))


@needs_ray
def test_a_unit_that_kills_every_worker_fails_the_build_after_its_retries(
    ray_cluster, hooks, photos, tiny_clip_dir, tmp_path
):
    from retrieval.api.build import gather_items
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.embed.ray_pipeline import RayBuildError, embed_images_on_ray
    from retrieval.encoders.registry import load_clip_encoder

    _clear(hooks)
    refs = gather_items([photos], []).images[:8]
    encoder = load_clip_encoder("open_clip:tiny", checkpoint=tiny_clip_dir, device="cpu")
    (hooks / "kill-4").write_text("50")  # dies every time it is tried
    with pytest.raises(RayBuildError, match=r"a work unit failed on Ray \(\w*(Actor|Died|Worker)\w*"):
        embed_images_on_ray(
            refs,
            encoder,
            EmbedOptions(batch_size=4, progress=False),
            tmp_path,
            RayOptions(address="local", unit_size=4, actors=1, unit_retries=1, encoders=_choice(tiny_clip_dir)),
        )
    tries = 50 - int((hooks / "kill-4").read_text())
    assert 2 <= tries <= 4, tries  # the first try and its retry (an in-flight unit's retries may add one), not 50


def _session_processes(sid: int) -> set[int]:
    import psutil

    found = set()
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.add(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _kill_driver(child: subprocess.Popen) -> None:
    """SIGKILL ``child`` (started in its own session: a driver, a Ray head) and every process it
    started (Ray's GCS, raylet, agents, workers), by their ids."""
    import psutil

    try:
        tree = {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
    except psutil.Error:
        tree = set()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {pid for pid in tree if psutil.pid_exists(pid)} | _session_processes(child.pid)
        left = {pid for pid in left if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE} if left else left
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise AssertionError(f"Ray processes of the killed driver survived: {sorted(left)}")


def _build_args(photos: Path, index: Path, tiny_clip_dir: Path) -> list[str]:
    return [
        "build-index",
        "--images",
        str(photos),
        "--index",
        str(index),
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        str(tiny_clip_dir),
        "--device",
        "cpu",
        "--index-type",
        "flat",
        "--quiet",
        "--batch-size",
        "4",
    ]


@needs_ray
def test_a_killed_driver_reruns_only_the_missing_units(ray_cluster, hooks, photos, tiny_clip_dir, tmp_path):
    """The driver (with units at an fsspec file:// URL) is SIGKILLed while its actors hold; the
    same command again embeds exactly the units with no output and gives the single-machine index."""
    from retrieval.api.engine import open_index
    from retrieval.cli.main import main

    index, units = tmp_path / "index", tmp_path / "units"
    args = _build_args(photos, index, tiny_clip_dir) + [
        "--progress-shard-size",
        "4",
        "--ray",
        "local",
        "--work-dir",
        units.as_uri(),
    ]
    driver_hooks = tmp_path / "driver-hooks"
    driver_hooks.mkdir()
    (driver_hooks / "hold").write_text("1")  # each actor holds after its first unit
    env = {**os.environ, "PYTHONPATH": str(ROOT), HOOKS_ENV: str(driver_hooks)}
    err = tmp_path / "driver.err"
    with open(err, "wb") as handle:
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )
    try:
        while child.poll() is None and not list(units.glob("*/shard-*.npz")):
            time.sleep(0.05)
        time.sleep(0.5)  # the other actors may finish their first unit too: any number is fine
    finally:
        if child.poll() is None:
            _kill_driver(child)
    assert child.returncode == -signal.SIGKILL, f"the driver was not killed mid-job: {err.read_text()[-2000:]}"
    done = {int(p.name.split("-")[1]) for p in units.glob("*/shard-*.npz")}
    assert done and done < set(range(0, 25, 4)), done

    _clear(hooks)
    result = CliRunner().invoke(main, args, catch_exceptions=False)  # joins this module's cluster
    assert result.exit_code == 0, result.output
    assert sorted(start for start, _ in _embedded(hooks)) == sorted(set(range(0, 25, 4)) - done)
    assert not list(units.glob("*/shard-*")) and not (index / ".work").exists()  # cleaned up after the commit

    CliRunner().invoke(
        main, _build_args(photos, tmp_path / "single", tiny_clip_dir) + ["--workers", "0"], catch_exceptions=False
    )
    single, distributed = open_index(tmp_path / "single", device="cpu"), open_index(index, device="cpu")
    assert distributed.items("image")["id"] == single.items("image")["id"]
    a, b = (np.concatenate(list(i.vector_source("clip/image").chunks())) for i in (single, distributed))
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    assert [h.id for h in distributed.text_to_image("a dog", k=10)] == [
        h.id for h in single.text_to_image("a dog", k=10)
    ]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster started the way a user starts one (``ray start --head``), as its own process
    group on 127.0.0.1, with a clean environment (no PYTHONPATH to this checkout); killed after."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip("no `ray` command beside this Python")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="rh"))  # short: Ray's socket paths live under it
    hooks = tmp_path / "head-hooks"
    hooks.mkdir()
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update({**LOOPBACK_ENV, "RAY_AUTH_MODE": "disabled", HOOKS_ENV: str(hooks)})
    log = tmp_path / "head.log"
    with open(log, "wb") as handle:
        head = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "3",
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(temp),
                "--disable-usage-stats",
                "--block",
            ],
            env=env,
            cwd=temp,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while head.poll() is None and b"Ray runtime started" not in log.read_bytes():
            time.sleep(0.2)
        assert head.poll() is None, log.read_text()[-2000:]
        yield f"127.0.0.1:{port}", head, hooks, temp
    finally:
        _kill_driver(head)
        shutil.rmtree(temp, ignore_errors=True)


@needs_ray
def test_a_joined_cluster_runs_the_drivers_code(ray_head, photos, tiny_clip_dir, tmp_path):
    """``--ray ADDRESS``: the cluster's workers import the driver's ``retrieval`` as shipped by
    runtime_env py_modules (without it they import whatever the cluster has installed)."""
    import psutil

    address, head, hooks, temp = ray_head
    args = _build_args(photos, tmp_path / "index", tiny_clip_dir) + ["--progress-shard-size", "8", "--ray", address]
    # the driver runs outside this checkout: on one machine Ray puts the driver's folder (a script's,
    # or the working directory) before the shipped code on the workers' path; other nodes lack it
    done = subprocess.run(
        [sys.executable, "-c", "from retrieval.cli.main import main; main()", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=200,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _embedded(hooks, package=True)
    assert sorted(start for start, _, _ in rows) == [0, 8, 16, 24]
    for folder in {Path(package) for _, _, package in rows}:
        assert folder.is_relative_to(temp.resolve()) and "runtime_resources" in folder.parts, folder
        for name in ("embed/ray_pipeline.py", "embed/unit_store.py", "sources/items.py"):
            assert (folder / name).read_bytes() == (ROOT / "retrieval" / name).read_bytes(), name
    pids = _session_processes(head.pid)
    listening = [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening


# -- storage: unit outputs through fsspec (no Ray) -----------------------------------------------


def _shard(start: int, stop: int, dim: int = 3) -> Shard:
    ok = [(p, 10, 20, f"{p:064x}") for p in range(start, stop - 1)]
    vectors = np.arange(len(ok) * dim, dtype=np.float32).reshape(len(ok), dim)
    return Shard(start, stop, ok, [(stop - 1, "cannot decode")], vectors)


@pytest.mark.parametrize("kind", ["memory", "file", "path"])
def test_units_round_trip_through_fsspec_and_damaged_ones_are_dropped(kind, tmp_path):
    from retrieval.embed.unit_store import UnitStore

    location = {
        "memory": f"memory://units-{os.getpid()}",
        "file": (tmp_path / "u").as_uri(),
        "path": str(tmp_path / "u"),
    }[kind]
    store = UnitStore(location, "job", 10, 3)
    assert store.load() == []
    store.write(_shard(4, 8))
    store.write(_shard(0, 4))
    loaded = store.load()
    assert [(s.start, s.stop, s.ok, s.failed) for s in loaded] == [
        (0, 4, _shard(0, 4).ok, _shard(0, 4).failed),
        (4, 8, _shard(4, 8).ok, _shard(4, 8).failed),
    ]
    np.testing.assert_array_equal(loaded[1].vectors, _shard(4, 8).vectors)
    assert UnitStore(location, "another-job", 10, 3).load() == []  # keyed by job
    data = store.fs.cat_file(f"{store.folder}/shard-0000000004-0000000008.npz")
    store.fs.pipe_file(f"{store.folder}/shard-0000000004-0000000008.npz", data[: len(data) // 2])  # cut short
    store.fs.pipe_file(f"{store.folder}/.shard-0000000008-0000000010.npz.abc.tmp", b"partial")  # a write cut short
    assert [(s.start, s.stop) for s in UnitStore(location, "job", 10, 3).load()] == [(0, 4)]
    assert not store.fs.exists(f"{store.folder}/shard-0000000004-0000000008.npz")  # removed, embedded again
    store.remove()
    assert not store.fs.exists(store.folder)


def test_a_unit_write_that_fails_leaves_no_unit(tmp_path, monkeypatch):
    from retrieval.embed.unit_store import UnitStore

    store = UnitStore((tmp_path / "u").as_uri(), "job", 10, 3)
    assert not store.single_put

    def broken_move(source, target, **kwargs):
        raise OSError("the rename failed")

    monkeypatch.setattr(store.fs, "mv", broken_move)
    with pytest.raises(OSError):
        store.write(_shard(0, 4))
    assert list((tmp_path / "u" / "job").iterdir()) == []  # neither the unit nor its temporary file


def test_an_object_store_gets_one_put_per_unit(tmp_path, monkeypatch):
    from retrieval.embed import unit_store
    from retrieval.embed.unit_store import UnitStore

    store = UnitStore(f"memory://single-put-{os.getpid()}", "job", 10, 3)
    calls = []
    monkeypatch.setattr(store, "single_put", True)  # as for s3://, gs://: a put is atomic, a rename a copy
    monkeypatch.setattr(store.fs, "pipe_file", lambda path, data, **kw: calls.append(path))
    store.write(_shard(0, 4))
    assert calls == [f"{store.folder}/shard-0000000000-0000000004.npz"]
    assert {"s3", "gs", "gcs", "abfs"} <= unit_store.OBJECT_STORES


def test_a_work_url_that_cannot_be_opened_names_it(tmp_path):
    from retrieval.core.errors import InputError
    from retrieval.embed.unit_store import UnitStore

    with pytest.raises(InputError, match="nosuchscheme://bucket/units"):
        UnitStore("nosuchscheme://bucket/units", "job", 10, 3)
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(InputError, match="s3://bucket/units"):
            UnitStore("s3://bucket/units", "job", 10, 3)


def test_the_shard_format_is_the_progress_shards(tmp_path):
    """A unit written through fsspec is a progress shard the single-machine resume reads."""
    from retrieval.embed.resume import WorkFolder
    from retrieval.embed.unit_store import UnitStore

    UnitStore(tmp_path / ".work", "job", 10, 3).write(_shard(0, 4))
    (loaded,) = WorkFolder(tmp_path, "job", 10, 3).load()
    assert (loaded.start, loaded.stop, loaded.failed) == (0, 4, [(3, "cannot decode")])


# -- options and code shipping -------------------------------------------------------------------


def test_the_cli_passes_work_dir_and_ship_code(monkeypatch, tmp_path):
    from retrieval.api import build
    from retrieval.cli.main import main

    seen = []

    def fake_build(*args, **kwargs):
        """Record the BuildOptions' Ray settings the command passed, then stop before building."""
        options = kwargs["options"] if "options" in kwargs else args[6]
        seen.append(options.ray)
        raise SystemExit(0)

    monkeypatch.setattr(build, "build_index", fake_build)
    runner = CliRunner()
    runner.invoke(
        main,
        [
            "build-index",
            "--images",
            str(tmp_path),
            "--index",
            str(tmp_path / "i"),
            "--encoder",
            "open_clip:tiny",
            "--ray",
            "10.0.0.1:6379",
            "--work-dir",
            "s3://bucket/units",
            "--no-ship-code",
        ],
    )
    assert seen == [RayOptions(address="10.0.0.1:6379", work_dir="s3://bucket/units", ship_code=False)]
    result = runner.invoke(
        main,
        [
            "build-index",
            "--images",
            str(tmp_path),
            "--index",
            str(tmp_path / "i"),
            "--encoder",
            "open_clip:tiny",
            "--work-dir",
            "s3://bucket/units",
        ],
    )
    assert result.exit_code != 0 and "--work-dir is for Ray builds" in result.output
    result = runner.invoke(main, ["add", "--index", str(tmp_path), "--images", str(tmp_path), "--work-dir", "/x"])
    assert result.exit_code != 0 and "--work-dir is for Ray builds" in result.output


class _FakeRay:
    """Records how ray_session connects (no cluster)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)

    def shutdown(self) -> None:
        pass


def test_a_joined_cluster_gets_this_package_unless_told_not_to(monkeypatch):
    import retrieval
    from retrieval.embed import ray_cluster

    fake = _FakeRay()
    monkeypatch.setattr(ray_cluster, "import_ray", lambda: fake)
    for options in (
        RayOptions(address="10.0.0.1:6379"),
        RayOptions(address="auto"),
        RayOptions(address="ray://head:10001", ship_code=False),
        RayOptions(address="local"),
    ):
        with ray_cluster.ray_session(options):
            pass
    package = Path(retrieval.__file__).resolve().parent
    shipped = {"py_modules": [str(package)], "excludes": ["__pycache__", "*.pyc"]}
    assert [(c.get("address"), c.get("runtime_env")) for c in fake.calls] == [
        ("10.0.0.1:6379", shipped),
        ("auto", shipped),
        ("ray://head:10001", None),
        (None, None),
    ]
    assert fake.calls[-1]["_node_ip_address"] == "127.0.0.1"  # a local cluster runs this checkout's code
    assert (package / "__init__.py").is_file() and (package / "embed" / "ray_pipeline.py").is_file()


def test_hooks_are_off_without_the_variable(monkeypatch, tmp_path):
    from retrieval.embed import ray_hooks

    monkeypatch.delenv(HOOKS_ENV, raising=False)
    (tmp_path / "kill-0").write_text("1")
    ray_hooks.before_unit(0)  # would SIGKILL this process if the hooks were on
    ray_hooks.after_unit(0, 1)
    assert (tmp_path / "kill-0").exists() and not (tmp_path / "embedded.log").exists()


def test_the_error_of_a_failed_unit_is_the_innermost_that_says_something():
    from retrieval.embed.ray_pipeline import root_cause

    class SystemException(Exception):
        pass

    class ActorDiedError(Exception):
        def __init__(self, message: str, cause: BaseException) -> None:
            super().__init__(message)
            self.cause = cause

    died = ActorDiedError(
        "The actor died because of an error raised in its creation task\n"
        "TypeError: UnitEncoder.__init__() got an unexpected keyword argument 'location'",
        SystemException(),
    )
    try:
        raise RuntimeError("Ray Data failed") from died
    except RuntimeError as wrapped:
        assert (
            root_cause(wrapped)
            == "ActorDiedError: TypeError: UnitEncoder.__init__() got an unexpected keyword argument 'location'"
        )
    assert root_cause(ZeroDivisionError("division by zero")) == "ZeroDivisionError: division by zero"
