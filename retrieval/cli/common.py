"""Helpers shared by the CLI's command modules: errors, JSON output, shared options."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from retrieval.api.build import DEFAULT_INDEX
from retrieval.core.config import CaptionOptions, EncoderChoice, IndexOptions
from retrieval.core.errors import RetrievalError
from retrieval.embed.pipeline import EmbedOptions

IMAGE_ENCODER_HELP = "Unimodal image encoder spec, e.g. efficientnet-lite0 (see list-encoders)."
TEXT_ENCODER_HELP = "Unimodal text encoder spec, e.g. minilm or st:NAME_OR_PATH (see list-encoders)."
INDEX_HELP = "Index directory."


# The library's errors name what its caller set in backticks: a function's parameter (`images`) or an
# option's field (`IndexOptions.target_recall`), sometimes with a value (`EmbedOptions.decode='gpu'`).
# The command line's user set flags instead: this is the one table from those names to the flags.
FLAGS = {
    "images": "--images",
    "captions": "--captions",
    "anchors": "--anchors",
    "index": "--index",
    "out": "--out",
    "ids": "--id",
    "paths": "--path",
    "device": "--device",
    "ray": "--ray",
    "EncoderChoice.clip": "--encoder",
    "EncoderChoice.image": "--image-encoder",
    "EncoderChoice.text": "--text-encoder",
    "EncoderChoice.checkpoint": "--checkpoint",
    "EncoderChoice.device": "--device",
    "IndexOptions.index_type": "--index-type",
    "IndexOptions.target_recall": "--target-recall",
    "IndexOptions.max_memory": "--max-memory",
    "IndexOptions.shards": "--index-shards",
    "EmbedOptions.batch_size": "--batch-size",
    "EmbedOptions.workers": "--workers",
    "EmbedOptions.replicas": "--replicas",
    "EmbedOptions.replicas=False": "--no-replicas",
    "EmbedOptions.compile": "--compile",
    "EmbedOptions.decode": "--decode",
    "EmbedOptions.progress_shard_size": "--progress-shard-size",
    "CaptionOptions.caption_column": "--caption-column",
    "CaptionOptions.image_column": "--image-column",
    "CaptionOptions.template": "--caption-template",
    "CaptionOptions.encoding": "--encoding",
    "AsifParams.k": "--k",
    "AsifParams.p": "--p",
    "RayOptions.address": "--ray",
    "RayOptions.work_dir": "--work-dir",
    "BuildOptions.anchor_weights": "--anchor-weights",
    "BuildOptions.image_views": "--image-views",
    "EvalOptions.routes": "--route",
    "EvalOptions.anchor_weights": "--anchor-weights",
    "EvalOptions.sweep": "--sweep",
    "EvalOptions.center": "--center",
    "EvalOptions.refine": "--refine",
    "EvalOptions.limit": "--limit",
    "k": "-k",
    "SearchOptions.route": "--route",
    "SearchOptions.where": "--where",
    "SearchOptions.min_score": "--min-score",
    "SearchOptions.offset": "--offset",
    "SearchOptions.dedup": "--dedup-threshold",
    "SearchKnobs.nprobe": "--nprobe",
    "SearchKnobs.ef_search": "--ef-search",
    "ServeConfig.indexes": "--index",
    "ServeConfig.max_k": "--max-k",
    "ServeConfig.search_threads": "--search-threads",
}
_NAMED = re.compile(r"`([^`\n]+)`")


def in_flags(message: str) -> str:
    """A library message in the command line's words: each `name` (or `name=value`) in ``FLAGS`` becomes its
    flag (``--flag value``); other quoted names stay as they are."""

    def flag(match: re.Match[str]) -> str:
        named = match[1]
        if named in FLAGS:
            return FLAGS[named]
        name, equals, value = named.partition("=")
        return f"{FLAGS[name]} {value.strip(chr(39) + chr(34))}" if equals and name in FLAGS else match[0]

    return _NAMED.sub(flag, message)


class CliError(click.ClickException):
    """A library error shown as one line in the command line's words (see ``FLAGS``), with the library's exit
    code."""

    def __init__(self, error: RetrievalError) -> None:
        super().__init__(in_flags(str(error)))
        self.exit_code = error.exit_code  # type: ignore[misc]  # click declares a class-wide code; each error has its own


def run_api(call: Callable[[], Any]) -> Any:
    """Call the library; turn its errors into clean one-line CLI errors."""
    try:
        return call()
    except RetrievalError as e:
        raise CliError(e) from e


def echo_json(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, ensure_ascii=False))


def option_group(
    target: str, options: Sequence[Callable[[Callable], Callable]], make: Callable[..., Any]
) -> Callable[[Callable], Callable]:
    """Decorator: add click ``options`` to a command, which receives one value for all of them:
    ``make(**their values)`` as the keyword ``target`` (library errors become one-line CLI errors)."""

    def probe() -> None: ...

    for option in options:
        probe = option(probe)
    names = [param.name for param in probe.__click_params__]  # type: ignore[attr-defined]

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            kwargs[target] = run_api(lambda: make(**values))
            return func(*args, **kwargs)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


CAPTION_FLAGS = [
    click.option(
        "--caption-column",
        default="caption",
        show_default=True,
        help="Column holding the caption text (csv, tsv, jsonl, parquet; also a parquet given to --images).",
    ),
    click.option(
        "--image-column",
        default="image",
        show_default=True,
        help=(
            "Column holding the image path of a pairs file (relative paths resolve against the file's folder); "
            "for a parquet given to --images, the column of image bytes, if not found by itself."
        ),
    ),
    click.option(
        "--caption-template",
        default=None,
        help=(
            'Build captions from other columns, e.g. "a photo of a {class_name}"; for a labelled folder use {label}.'
        ),
    ),
    click.option(
        "--encoding", default="utf-8", show_default=True, help="Text encoding of caption files (e.g. latin-1)."
    ),
]
"""How caption and pairs files are read: the values of ``caption_settings``."""


def caption_settings(
    caption_column: str, image_column: str, caption_template: str | None, encoding: str
) -> CaptionOptions:
    """``CaptionOptions`` from the values of ``CAPTION_FLAGS``."""
    return CaptionOptions(caption_column, image_column, caption_template, encoding)


caption_options = option_group("caption_options", CAPTION_FLAGS, caption_settings)
"""Options shared by commands that read caption or pairs files: one ``caption_options: CaptionOptions``."""


batch_size_flag = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per encoder batch (default: 32 on the CPU, 256 on a GPU).",
)
workers_flag = click.option(
    "--workers",
    default="auto",
    show_default=True,
    help="DataLoader worker processes that decode images, or 'auto' (one per core, none for under 64 images).",
)
replicas_flag = click.option(
    "--replicas/--no-replicas",
    default=None,
    help="On the CPU, each worker also encodes its batches with its own single-threaded copy of the "
    "encoder (default on Linux with 2+ workers: faster than one multi-threaded encoder). "
    "--no-replicas encodes in the main process.",
)
compile_flag = click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="Run the image model through torch.compile (meant for GPUs and large collections: "
    "compiling takes tens of seconds; the main process encodes, so no replicas).",
)
decode_flag = click.option(
    "--decode",
    type=click.Choice(["auto", "gpu", "cpu"]),
    default="auto",
    show_default=True,
    help="Where JPEGs are decoded: gpu decodes them in batches on the encoder's GPU (nvJPEG; any other "
    "image goes the CPU path), cpu in the worker processes; auto is gpu for a CUDA encoder.",
)
checkpoint_flag = click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=True),
    default=None,
    help="Local weights for the (image or CLIP) encoder: a file, or an open_clip model folder.",
)
device_flag = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto uses CUDA (half precision) when present.",
)
quiet_flag = click.option("--quiet", "-q", is_flag=True, help="No progress bars or warnings on stderr.")
progress_shard_flag = click.option(
    "--progress-shard-size",
    type=click.IntRange(min=0),
    default=None,
    help=(
        "Images per progress shard (default 4096; 0 = off). A killed build rerun with the same command resumes from "
        "the last shard."
    ),
)


@dataclass(frozen=True)
class EmbedFlags:
    """The embedding flags of a command: encoder weights and device, quiet, and how the embedding runs."""

    device: str
    quiet: bool
    options: EmbedOptions
    checkpoint: str | None = None

    def encoders(self, clip: str | None = None, image: str | None = None, text: str | None = None) -> EncoderChoice:
        """The encoder choice of ``--encoder`` or ``--image-encoder``/``--text-encoder`` with these weights and
        device."""
        return run_api(
            lambda: EncoderChoice(clip=clip, image=image, text=text, checkpoint=self.checkpoint, device=self.device)
        )


def embed_options(checkpoint: bool = True, resumable: bool = False) -> Callable[[Callable], Callable]:
    """Options shared by commands that embed images: one ``embedding: EmbedFlags``
    (``--checkpoint`` unless ``checkpoint`` is False; ``--progress-shard-size`` with ``resumable``)."""
    flags = ([checkpoint_flag] if checkpoint else []) + [
        device_flag,
        batch_size_flag,
        workers_flag,
        replicas_flag,
        compile_flag,
        decode_flag,
        quiet_flag,
    ]
    flags += [progress_shard_flag] if resumable else []

    def make(device: str, quiet: bool, checkpoint: str | None = None, **settings: Any) -> EmbedFlags:
        """``settings``: the flags of ``embed_settings`` and the other fields of EmbedOptions."""
        options = embed_settings(quiet=quiet, **settings)
        return EmbedFlags(device=device, quiet=quiet, options=options, checkpoint=checkpoint)

    return option_group("embedding", flags, make)


def embed_settings(
    batch_size: int | None, workers: str, replicas: bool | None, compile_model: bool, quiet: bool, **more: Any
) -> EmbedOptions:
    """EmbedOptions from the shared embedding flags."""
    return EmbedOptions(
        batch_size=batch_size,
        workers=workers_option(workers),
        replicas=replicas,
        compile=compile_model,
        progress=not quiet,
        **more,
    )


def workers_option(value: str) -> int | str:
    """``--workers``: 'auto' or a whole number."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a whole number, got {value!r}", param_hint="--workers") from None


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING, format="warning: %(message)s", stream=sys.stderr
    )


def open_index_or_fail(index_path: str, device: str = "auto") -> Any:
    """Open an index for the CLI (errors as one line)."""
    from retrieval.api.engine import open_index
    from retrieval.encoders.clip_snapshot import default_snapshot_root

    return run_api(lambda: open_index(index_path, device=device, encoder_snapshots=default_snapshot_root()))


def index_option(func: Callable) -> Callable:
    return click.option("--index", "index_path", default=str(DEFAULT_INDEX), show_default=True, help=INDEX_HELP)(func)


def index_options(index_type: str, max_memory: str | None, target_recall: float, index_shards: int = 1) -> IndexOptions:
    """``IndexOptions`` from the CLI's strings."""
    from retrieval.index.spec import parse_memory

    return IndexOptions(
        index_type=index_type, max_memory=parse_memory(max_memory), target_recall=target_recall, shards=index_shards
    )


index_type_options = option_group(
    "index_options",
    [
        click.option(
            "--index-type",
            default="auto",
            show_default=True,
            help="flat (exact), hnsw, ivf (IVF-Flat), ivfsq (IVF over float16 vectors), ivfpq (OPQ+IVF+PQ, "
            "re-ranked from the stored vectors), a FAISS factory "
            "string, or auto: chosen from the collection size within --max-memory.",
        ),
        click.option(
            "--max-memory",
            default=None,
            help="Memory budget for the vector indexes together, e.g. 4GB (default: no limit).",
        ),
        click.option(
            "--target-recall",
            type=click.FloatRange(0, 1, min_open=True),
            default=0.95,
            show_default=True,
            help="recall@10 against exact search that auto and the nprobe/efSearch tuning aim for.",
        ),
        click.option(
            "--index-shards",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Split each vector index into N index shards over contiguous id ranges (flat or IVF types): "
            "searched shard by shard, or by one Ray actor each (open_index(..., ray=...), serve --ray).",
        ),
    ],
    index_options,
)
"""Options choosing the vector index of a build: one ``index_options: IndexOptions``."""


def quiet_library_warnings() -> None:
    """The command line's warning filters: torch's int8 quantisation and TorchScript (CLIP query
    snapshots) announce their deprecation, and Pillow warns about odd files that the build reports
    in errors.jsonl anyway.

    Set here, by the application, once per command: the library never changes warning filters
    (they are process-wide and ``warnings.catch_warnings`` is not thread-safe).
    """
    import warnings

    warnings.filterwarnings("ignore", module=r"torch\.ao(\.|$)")
    warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*\bthe trace\b")  # TorchScript's TracerWarnings: the trace is checked
