"""A build killed with SIGKILL while its DataLoader workers encode leaves no process holding the index.

Found as a user: ``retrieval add`` killed 6 s in left its two workers alive, re-parented and asleep
on a futex, holding the inherited ``.lock`` descriptor, and every later ``add``, ``remove`` or
``build-index`` failed with "index is locked by another build (pid N)", naming the dead parent.
Now the workers die with their parent (``prctl(PR_SET_PDEATHSIG)``, see
``retrieval.embed.workers.WorkerInit``), a forked child closes its copy of the lock
(``retrieval.store.locking``), and a lock held only by leftovers of a dead build names them.

The kill tests run the real CLI (tiny CLIP, ``--workers 2``, so the workers also encode) with the
test hook ``RETRIEVAL_TEST_PAUSE_AFTER_BATCHES``: the process stops itself after that many batches,
the test sees it stopped (``waitpid(WUNTRACED)``), finds its workers, and SIGKILLs the CLI process
alone, as ``kill -9`` did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COCO, IMAGENET, require_shared_data

import retrieval
from retrieval import EmbedOptions, EncoderChoice, IndexLockedError
from retrieval.embed.workers import PAUSE_ENV, pause_for_tests
from retrieval.store.locking import LOCK_NAME, WriterLock, lock_holders, writer_lock

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers forked, /proc: Linux")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop(PAUSE_ENV, None)
    return env | extra


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _holds_lock_fd(pid: int, index: Path) -> bool:
    lock = os.path.realpath(index / LOCK_NAME)
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == lock for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _kill_mid_encoding(cmd: list[str], tmp_path: Path, batches: int = 2) -> dict:
    """Run ``cmd`` until it has embedded ``batches`` batches, SIGKILL that process only, and watch its workers."""
    err = tmp_path / "killed.err"
    with open(err, "wb") as handle:
        child = subprocess.Popen(
            [sys.executable] + cmd, env=_env(**{PAUSE_ENV: str(batches)}), stdout=subprocess.DEVNULL, stderr=handle
        )
    workers: list[int] = []
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the command ended before its pause point: {err.read_text()[-2000:]}"
        workers = _children(child.pid)
        index = Path(cmd[cmd.index("--index") + 1]) if "--index" in cmd else None
        seen = {
            "parent": child.pid,
            "workers": workers,
            "holding_lock": [pid for pid in workers if index and _holds_lock_fd(pid, index)],
        }
        os.kill(child.pid, signal.SIGKILL)
        os.kill(child.pid, signal.SIGCONT)
        os.waitpid(child.pid, 0)
        child.returncode = -signal.SIGKILL
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(pid) for pid in workers):
            time.sleep(0.05)
        seen["survivors"] = [pid for pid in workers if _running(pid)]
        return seen
    finally:
        if child.returncode is None:
            child.kill()
            child.wait(timeout=30)
        for pid in workers:  # whatever the outcome, leave no process behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _run(cmd: list[str], limit: float = 60) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run([sys.executable] + cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < limit
    return done


def _clip_args(tiny_clip_dir: Path) -> list[str]:
    return ["--encoder", "open_clip:tiny", "--checkpoint", str(tiny_clip_dir)]


@pytest.fixture(scope="module")
def more_photos(tmp_path_factory) -> Path:
    """24 ImageNet photos: enough batches of 2 for two workers to be busy when the add is killed."""
    require_shared_data()
    root = tmp_path_factory.mktemp("more")
    for photo in sorted(IMAGENET.glob("*.JPEG"))[:24]:
        (root / photo.name).symlink_to(photo)
    return root


def _check_killed(seen: dict) -> None:
    assert len(seen["workers"]) == 2, seen
    assert seen["holding_lock"] == [], f"workers hold the writer lock's descriptor: {seen}"
    assert seen["survivors"] == [], f"workers outlived the SIGKILLed command: {seen}"


EMBED = r"""
import sys
from retrieval import EmbedOptions
from retrieval.embed.pipeline import embed_images
from retrieval.encoders.registry import load_image_encoder
from retrieval.sources.discovery import discover_images
refs = discover_images([sys.argv[1]])[0]
encoder = load_image_encoder("efficientnet-lite0", device="cpu")
embed_images(refs, encoder, EmbedOptions(batch_size=16, workers=2, replicas=True, progress=False))
"""


def test_the_workers_of_a_killed_embedding_die_with_it(tmp_path):
    """As found: EfficientNet-Lite0 workers that encode. Their 1280-d batches (80 KB each) fill the pipe to
    the dead parent, so a worker whose parent is gone never finishes exiting (it waits on its queue's
    writer thread): without PR_SET_PDEATHSIG it lives on, asleep, for good."""
    require_shared_data()
    script = tmp_path / "embed.py"
    script.write_text(EMBED)
    seen = _kill_mid_encoding([str(script), str(COCO / "images")], tmp_path, batches=1)
    print(f"\nembedding pid {seen['parent']} killed; workers {seen['workers']}, survivors {seen['survivors']}")
    assert len(seen["workers"]) == 2 and seen["survivors"] == [], seen


def test_a_build_killed_mid_encoding_leaves_no_worker_and_no_lock(tmp_path, tiny_clip_dir, more_photos):
    index = tmp_path / "index"
    cmd = [
        str(ROOT / "cli.py"),
        "build-index",
        "--index",
        str(index),
        "--images",
        str(more_photos),
        *_clip_args(tiny_clip_dir),
        "--device",
        "cpu",
        "-q",
        "--workers",
        "2",
        "--batch-size",
        "2",
    ]
    seen = _kill_mid_encoding(cmd, tmp_path)
    print(f"\nbuild-index pid {seen['parent']} killed; workers {seen['workers']}, survivors {seen['survivors']}")
    _check_killed(seen)
    _run(cmd)  # the same command again
    assert retrieval.open_index(index, device="cpu").manifest["counts"]["image"] == 24


def test_an_add_killed_mid_encoding_leaves_no_worker_and_no_lock(tmp_path, tiny_clip_dir, more_photos):
    """Then remove (a command that does not encode) and the same add again both succeed at once."""
    index = tmp_path / "index"
    first = sorted((COCO / "images").glob("*.jpg"))[:8]
    retrieval.build_index(
        images=first,
        index=index,
        encoders=EncoderChoice(clip="open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu"),
        embed=EmbedOptions(batch_size=8, workers=0, progress=False),
    )
    cmd = [
        str(ROOT / "cli.py"),
        "add",
        "--index",
        str(index),
        "--images",
        str(more_photos),
        "--device",
        "cpu",
        "-q",
        "--workers",
        "2",
        "--batch-size",
        "2",
    ]
    seen = _kill_mid_encoding(cmd, tmp_path)
    print(f"\nadd pid {seen['parent']} killed; workers {seen['workers']}, survivors {seen['survivors']}")
    _check_killed(seen)
    assert retrieval.open_index(index, device="cpu").manifest["counts"]["image"] == 8  # nothing half-added
    _run([str(ROOT / "cli.py"), "remove", "--index", str(index), "--path", str(first[0])], limit=60)
    assert retrieval.open_index(index, device="cpu").manifest["counts"]["image"] == 7
    _run(cmd)  # the same command again
    assert retrieval.open_index(index, device="cpu").manifest["counts"]["image"] == 31
    assert not (index / LOCK_NAME).exists()


HOLDER = r"""
import fcntl, os, subprocess, sys
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
leftover = subprocess.Popen(  # keeps the open file, and so the lock
    ["sleep", "120"], pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
)
print(leftover.pid, flush=True)
os._exit(0)  # the "build" dies; its child lives on
"""


def test_a_lock_held_only_by_leftovers_of_a_dead_build_names_them(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", HOLDER, str(index)], capture_output=True, text=True, timeout=60, check=True
    )
    leftover, build = int(out.stdout.strip()), int((index / LOCK_NAME).read_text())
    try:
        with pytest.raises(IndexLockedError) as raised:
            WriterLock(index)
        message = str(raised.value)
        assert f"leftover worker processes {leftover} of a build (pid {build}) that died" in message, message
        assert "kill them or wait" in message
        fd = os.open(index / LOCK_NAME, os.O_RDONLY)
        try:
            assert lock_holders(fd) == [leftover]
        finally:
            os.close(fd)
    finally:
        os.kill(leftover, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(leftover) and time.monotonic() < deadline:
        time.sleep(0.05)
    with writer_lock(index) as lock:
        assert lock.held


def test_a_live_build_is_still_named_as_the_holder(tmp_path):
    """A build that is alive is reported as such, not as leftovers, even while it has children."""
    index = tmp_path / "index"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, subprocess; from retrieval.store.locking import WriterLock; lock = WriterLock(sys.argv[1]); "
            "child = subprocess.Popen(['sleep', '120']); print('locked', flush=True); child.wait()",
            str(index),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexLockedError, match=f"another build \\(pid {holder.pid}\\)"):
            WriterLock(index)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)


def test_a_forked_child_neither_holds_nor_releases_the_parents_lock(tmp_path):
    index = tmp_path / "index"
    with writer_lock(index) as lock:
        pid = os.fork()
        if pid == 0:  # the child: no descriptor of the lock, and releasing its copy changes nothing
            code = 0
            try:
                code = 3 if _holds_lock_fd(os.getpid(), index) else 0
                lock.release()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the forked child kept the lock's descriptor"
        assert lock.held and (index / LOCK_NAME).is_file()
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from retrieval.store.locking import WriterLock; WriterLock(sys.argv[1])",
                str(index),
            ],
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert f"locked by another build (pid {os.getpid()})" in other.stderr, other.stderr[-2000:]
    assert not (index / LOCK_NAME).exists()


def test_the_pause_hook_is_off_by_default_and_checks_its_value(monkeypatch):
    batches = iter([1, 2, 3])
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    assert pause_for_tests(batches) is batches
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(PAUSE_ENV, bad)
        with pytest.raises(retrieval.InputError, match=PAUSE_ENV):
            pause_for_tests(iter([]))
