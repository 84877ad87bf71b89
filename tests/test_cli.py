"""The command line through click's CliRunner: it parses, calls the API and prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import retrieval
from retrieval.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, tiny_clip_dir, small_collection) -> Path:
    path = tmp_path_factory.mktemp("cli") / "index"
    result = run(
        "build-index",
        "--images",
        small_collection / "images",
        "--captions",
        small_collection / "pairs.jsonl",
        "--index",
        path,
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        tiny_clip_dir,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "3",
        "--quiet",
    )
    assert "indexed 6 images and 30 captions" in result.output
    assert "skipped 1 unreadable items" in result.output
    return path


def test_text_to_image_json_lines(cli_index):
    lines = run("text-to-image", "a plate of food", "--index", cli_index, "-k", "3", "--json").stdout.splitlines()
    hits = [json.loads(line) for line in lines]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert {"rank", "score", "id", "uri"} <= set(hits[0])
    assert all(Path(h["uri"]).is_file() for h in hits)


def test_image_to_caption_text_and_json(cli_index, small_collection):
    photo = sorted((small_collection / "images").glob("0*.jpg"))[0]
    text = run("image-to-caption", photo, "--index", cli_index, "-k", "2").stdout.splitlines()
    assert len(text) == 2 and text[0].split()[0] == "1"
    hits = [
        json.loads(line) for line in run("image-to-caption", photo, "--index", cli_index, "--json").stdout.splitlines()
    ]
    assert len(hits) == 5 and {"rank", "score", "id", "caption"} <= set(hits[0])
    assert hits[0]["caption"] in text[0]


def test_info_text_and_json(cli_index):
    info = json.loads(run("info", "--index", cli_index, "--json").stdout)
    assert info["counts"] == {"image": 6, "caption": 30} and info["errors"] == 1
    text = run("info", "--index", cli_index).output
    assert "open_clip:tiny" in text and "6 images, 30 captions, 1 skipped" in text
    assert "queries    text-to-image clip; image-to-caption clip; image-to-image clip; text-to-caption clip" in text
    build = info["build"]  # the embedding throughput of the build, and how it ran
    # the embedding stage is part of the build: its speed is at least the images over the whole build's time
    assert build["images_per_second"] >= 6 / build["seconds"] and build["images_resumed"] == 0
    assert (build["device"], build["workers"], build["encoder_replicas"]) == ("cpu", 0, False)
    assert f"on cpu, {build['images_per_second']} images/s" in text
    assert build["decode"] == "cpu"  # --decode auto on the CPU: the PIL path
    assert 0 < build["startup_seconds"] <= build["seconds"]  # start-up is a part of the build, counted


def test_decode_gpu_on_a_cpu_encoder_is_a_clear_error(tmp_path, tiny_clip_dir, small_collection):
    result = run(
        "build-index",
        "--images",
        small_collection / "images",
        "--index",
        tmp_path / "index",
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        tiny_clip_dir,
        "--device",
        "cpu",
        "--decode",
        "gpu",
        "--quiet",
        ok=False,
    )
    assert result.exit_code != 0 and "--decode gpu" in result.output and "runs on cpu" in result.output
    assert not (tmp_path / "index").exists()


def test_list_encoders():
    output = run("list-encoders").output
    assert "efficientnet-lite0" in output and "minilm" in output and "builtin:imagenet" in output
    rows = [json.loads(line) for line in run("list-encoders", "--json").stdout.splitlines()]
    assert {row["name"] for row in rows} >= {"efficientnet-lite0", "minilm"}


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["build-index", "--images", "/no/such/folder", "--encoder", "open_clip:tiny"], "/no/such/folder", 2),
        (["build-index", "--captions", "x.txt"], "--encoder", 2),
        (["text-to-image", "a dog", "--index", "/no/such/index"], "no such index", 4),
        (
            ["build-index", "--captions", "x.txt", "--image-encoder", "efficientnet-lite0", "--text-encoder", "minilm"],
            "anchor",
            2,
        ),
    ],
)
def test_errors_are_one_clean_line(args, message, code):
    result = run(*args, ok=False)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("Error: ")


def test_missing_caption_column_names_the_file(tmp_path, tiny_clip_dir):
    (tmp_path / "c.csv").write_text("text,other\nhello,1\n", encoding="utf-8")
    result = run(
        "build-index",
        "--captions",
        tmp_path / "c.csv",
        "--index",
        tmp_path / "i",
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        tiny_clip_dir,
        "--quiet",
        ok=False,
    )
    assert result.exit_code == 2 and "c.csv" in result.output and "caption" in result.output
    ok = run(
        "build-index",
        "--captions",
        tmp_path / "c.csv",
        "--caption-column",
        "text",
        "--index",
        tmp_path / "i",
        "--encoder",
        "open_clip:tiny",
        "--checkpoint",
        tiny_clip_dir,
        "--quiet",
        "--json",
    )
    assert json.loads(ok.stdout)["counts"]["caption"] == 1


@pytest.mark.parametrize(
    "args, message",
    [  # the library names its parameters (`EncoderChoice.clip`, `images`); the command line says its flags
        (
            ["build-index", "--captions", "x.txt", "--encoder", "open_clip:tiny", "--image-encoder", "e"],
            "give either --encoder (a contrastive model) or --image-encoder with --text-encoder, not both",
        ),
        (["build-index", "--encoder", "open_clip:tiny"], "nothing to index: give --images and/or --captions"),
        (
            ["build-index", "--captions", "x.txt", "--image-encoder", "efficientnet-lite0", "--text-encoder", "minilm"],
            "need an anchor set for cross-modal search: --anchors (an anchor directory",
        ),
        (["remove", "--index", "/no/such/index"], "nothing to remove: give --id and/or --path"),
    ],
)
def test_library_errors_name_the_flags(args, message):
    result = run(*args, ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and "`" not in result.output


def test_in_flags_turns_the_librarys_names_into_flags():
    from retrieval.cli.common import in_flags

    assert in_flags("`IndexOptions.target_recall` must be in (0, 1]") == "--target-recall must be in (0, 1]"
    assert (
        in_flags("`EmbedOptions.decode='gpu'` needs a GPU: use `EmbedOptions.decode='cpu'` or 'auto'")
        == "--decode gpu needs a GPU: use --decode cpu or 'auto'"
    )
    assert in_flags("use it with `EmbedOptions.replicas=False`") == "use it with --no-replicas"
    assert in_flags("`no_such_name` and ``code``") == "`no_such_name` and ``code``"  # not a name in the table


def test_every_flag_in_the_table_is_an_option_of_a_command():
    from retrieval.cli.common import FLAGS

    options = {
        opt
        for command in main.commands.values()
        for param in command.params
        for opt in [*param.opts, *param.secondary_opts]
    }
    assert set(FLAGS.values()) - options == set()


@pytest.mark.parametrize(
    "args, message",
    [  # options parsed in groups (one dataclass per group) fail as usage errors naming the flag
        (["build-index", "--captions", "x.txt", "--encoder", "open_clip:tiny", "--workers", "many"], "--workers"),
        (["build-index", "--captions", "x.txt", "--encoder", "open_clip:tiny", "--max-memory", "lots"], "lots"),
        (
            ["build-index", "--captions", "x.txt", "--encoder", "open_clip:tiny", "--anchor-weights", "1,x"],
            "--anchor-weights",
        ),
        (["add", "--captions", "x.txt", "--workers", "-2"], "--workers"),
        (["eval", "x.txt", "--encoder", "open_clip:tiny", "--refine", "a"], "--refine"),
    ],
)
def test_bad_option_values_are_clean_errors(args, message):
    result = run(*args, ok=False)
    assert result.exit_code == 2, result.output
    assert message in result.output.splitlines()[-1] and "Traceback" not in result.output


def test_grouped_options_reach_the_api(monkeypatch, tmp_path):
    """build-index's flags arrive in the API's option objects exactly as given."""
    import retrieval.api.build as build_module

    seen = {}

    def fake_build(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise retrieval.InputError("stop here")

    monkeypatch.setattr(build_module, "build_index", fake_build)
    run(
        "build-index",
        "--images",
        "a",
        "--captions",
        "b.txt",
        "--index",
        tmp_path / "i",
        "--image-encoder",
        "ie",
        "--text-encoder",
        "te",
        "--anchors",
        "builtin:imagenet",
        "--anchors",
        "x",
        "--anchor-weights",
        "1,0.5",
        "--k",
        "7",
        "--caption-column",
        "text",
        "--encoding",
        "latin-1",
        "--device",
        "cpu",
        "--batch-size",
        "5",
        "--workers",
        "3",
        "--no-replicas",
        "--quiet",
        "--progress-shard-size",
        "16",
        "--index-type",
        "hnsw",
        "--max-memory",
        "1GB",
        "--target-recall",
        "0.9",
        ok=False,
    )
    images, captions, index, choice, anchors, embed, options = seen["args"]
    assert (images, captions, index) == (("a",), ("b.txt",), str(tmp_path / "i"))
    assert (choice.image, choice.text, choice.clip, choice.device) == ("ie", "te", None, "cpu")
    assert anchors == ["builtin:imagenet", "x"] and options.anchor_weights == [1.0, 0.5] and options.asif.k == 7
    assert (options.caption_options.caption_column, options.caption_options.encoding) == ("text", "latin-1")
    assert (embed.batch_size, embed.workers, embed.replicas, embed.progress, embed.progress_shard_size) == (
        5,
        3,
        False,
        False,
        16,
    )
    assert (
        options.index_options.index_type,
        options.index_options.max_memory,
        options.index_options.target_recall,
    ) == ("hnsw", 2**30, 0.9)


def test_cli_py_from_a_checkout_and_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0
    for command in (
        "build-anchors",
        "build-index",
        "text-to-image",
        "image-to-caption",
        "image-to-image",
        "text-to-caption",
        "info",
        "list-encoders",
    ):
        assert command in result.stdout
