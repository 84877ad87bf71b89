"""Query commands: ``text-to-image``, ``image-to-caption``, ``image-to-image`` and ``text-to-caption``,
one query or a whole file of them in one pass.

Each command receives its queries (:class:`TextQueries` or :class:`ImageQueries`), its
:class:`~retrieval.core.search.SearchOptions` (see :mod:`retrieval.cli.narrowing`) and its extra query
parts (see :mod:`retrieval.cli.compose`) as one value each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from retrieval.cli.common import echo_json, index_option, open_index_or_fail, option_group, run_api
from retrieval.cli.compose import (
    Composition,
    composition_options,
    image_asker,
    text_asker,
)
from retrieval.cli.narrowing import search_options
from retrieval.core.search import SearchOptions

QUERY_BATCH = 256  # queries encoded and searched together
IMAGE_FIELDS = "rank, score, id, uri, width, height, metadata: the source's fields such as url"
CAPTION_FIELDS = "rank, score, id, caption, source, image_uri, metadata"

TextAsk = Callable[[Any, list[str]], list[list[Any]]]
ImageAsk = Callable[[Any, list[Any], Any], list[list[Any]]]


@dataclass(frozen=True)
class TextQueries:
    """QUERY, or the queries of ``--queries-file`` (the text in its ``--column``); exactly one of them."""

    query: str | None
    queries_file: str | None
    column: str

    def __post_init__(self) -> None:
        if (self.query is None) == (self.queries_file is None):
            raise click.UsageError("give a QUERY or --queries-file FILE (one of them)")


@dataclass(frozen=True)
class ImageQueries:
    """IMAGE arguments (files, folders, globs) and the images listed in ``--queries-file``."""

    images: tuple[str, ...]
    queries_file: str | None

    def paths(self) -> list[str]:
        paths = list(self.images) + (_image_list(self.queries_file) if self.queries_file else [])
        if not paths:
            raise click.UsageError("give an IMAGE (or several, folders, globs) or --queries-file FILE")
        return paths


@dataclass(frozen=True)
class Output:
    """How hits are printed: lines or JSON (``describe`` names a hit in a line); with ``min_score``, how many
    passed it goes with each query's hits."""

    as_json: bool
    describe: Callable[[Any], str]
    min_score: float | None = None

    def single(self, query: str, hits: Sequence[Any]) -> None:
        """The hits of the command's only query."""
        if self.min_score is not None:  # the cutoff's count goes with the hits: one {query, passed, hits} object
            self.batch(query, hits)
        elif self.as_json:
            for hit in hits:
                echo_json(hit.to_dict())
        else:
            self._lines(hits)

    def batch(self, query: str, hits: Sequence[Any]) -> None:
        """The hits of one query of several."""
        passed = {} if self.min_score is None else {"min_score": self.min_score, "passed": len(hits)}
        if self.as_json:
            echo_json({"query": query, **passed, "hits": [hit.to_dict() for hit in hits]})
            return
        click.echo(f"# {query}" + (f"  ({len(hits)} passed --min-score {self.min_score:g})" if passed else ""))
        self._lines(hits)
        click.echo("")

    def _lines(self, hits: Sequence[Any]) -> None:
        if not hits:
            click.echo("no results")
        for hit in hits:
            click.echo(f"{hit.rank:>3}  {hit.score:7.4f}  {self.describe(hit)}")


def _chunks(items: Sequence[Any], size: int = QUERY_BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _device_option(func: Callable[..., Any]) -> Callable[..., Any]:
    choice = click.Choice(["auto", "cpu", "cuda"])
    return click.option("--device", type=choice, default="auto", show_default=True)(func)


def _json_option(per_hit: str, several: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help=f"JSON lines: one object per hit ({per_hit}); {several}.",
    )


def _k_option(default: int, what: str, per: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "-k",
        "k",
        type=click.IntRange(min=1),
        default=default,
        show_default=True,
        help=f"Number of {what} to return per {per}.",
    )


text_queries = option_group(
    "texts",
    [
        click.argument("query", required=False),
        click.option(
            "--queries-file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help=(
                "Answer every query in a file in one pass: .txt (one per line), .csv, .tsv, .jsonl or .parquet (see "
                "--column)."
            ),
        ),
        click.option(
            "--column",
            default="caption",
            show_default=True,
            help="Column holding the query text in a csv/tsv/jsonl/parquet --queries-file.",
        ),
    ],
    TextQueries,
)

image_queries = option_group(
    "images",
    [
        click.argument("images", nargs=-1, type=click.Path()),
        click.option(
            "--queries-file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="A text file listing query images, one path per line; all are answered in one pass.",
        ),
    ],
    lambda images, queries_file: ImageQueries(tuple(images), queries_file),
)


def _answer_texts(texts: TextQueries, index_path: str, device: str, ask: TextAsk, output: Output) -> None:
    """Open the index, ask ``ask(index, texts)`` for QUERY or each query of --queries-file (in batches) and print."""
    from retrieval.sources.captions import read_caption_file

    index = open_index_or_fail(index_path, device)
    if texts.query is not None:
        query = texts.query
        output.single(query, run_api(lambda: ask(index, [query]))[0])
        return
    parsed = run_api(lambda: read_caption_file(str(texts.queries_file), caption_column=texts.column))
    for problem in parsed.errors:
        click.echo(f"warning: skipped {problem.path} row {problem.row}: {problem.reason}", err=True)
    for batch in _chunks([record.text for record in parsed.records]):
        results = run_api(functools.partial(ask, index, list(batch)))
        for text, hits in zip(batch, results, strict=True):
            output.batch(text, hits)


def _text_command(target: str, default_k: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The arguments and options of a text query command for ``target`` items."""
    what, fields = ("images", IMAGE_FIELDS) if target == "image" else ("captions", CAPTION_FIELDS)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                text_queries,
                index_option,
                _k_option(default_k, what, "query"),
                _device_option,
                search_options,
                composition_options,
                _json_option(fields, "with --queries-file one {query, hits} object per query"),
            ]
        ):
            func = option(func)
        return func

    return decorate


def _ask_texts(
    target: str, k: int, options: SearchOptions, composition: Composition
) -> Callable[[Any, list[str]], list[list[Any]]]:
    def plain(index: Any, texts: list[str]) -> list[list[Any]]:
        batch = index.texts_to_images if target == "image" else index.texts_to_captions
        hits: list[list[Any]] = batch(texts, k, options)
        return hits

    return text_asker(composition, target, k, options, plain)


@click.command("text-to-image")
@_text_command("image", 10)
def text_to_image_command(
    texts: TextQueries,
    index_path: str,
    k: int,
    device: str,
    options: SearchOptions,
    composition: Composition,
    as_json: bool,
) -> None:
    """Find the images that best match QUERY (or each query of --queries-file)."""
    output = Output(as_json, lambda hit: hit.uri, options.min_score)
    _answer_texts(texts, index_path, device, _ask_texts("image", k, options, composition), output)


@click.command("text-to-caption")
@_text_command("caption", 5)
def text_to_caption_command(
    texts: TextQueries,
    index_path: str,
    k: int,
    device: str,
    options: SearchOptions,
    composition: Composition,
    as_json: bool,
) -> None:
    """Find the indexed captions closest to QUERY (or each query of --queries-file): caption search."""
    output = Output(as_json, lambda hit: hit.caption, options.min_score)
    _answer_texts(texts, index_path, device, _ask_texts("caption", k, options, composition), output)


def _image_list(path: str) -> list[str]:
    """Image paths listed in a text file, one per line; relative ones resolve against the file's folder."""
    base = Path(path).resolve().parent
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path}: cannot read ({e})", param_hint="--queries-file") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [str(Path(entry) if Path(entry).is_absolute() else base / entry) for entry in entries]


def _answer_images(images: ImageQueries, index_path: str, device: str, ask: ImageAsk, output: Output) -> None:
    """Open the index and ask ``ask(index, pictures_or_paths, ids)`` for the query images; unreadable ones are reported
    and skipped."""
    from retrieval.core.errors import ImageDecodeError
    from retrieval.sources.discovery import discover_images
    from retrieval.sources.items import load_image

    paths = images.paths()
    index = open_index_or_fail(index_path, device)
    if len(paths) == 1 and not images.queries_file and not Path(paths[0]).is_dir():
        output.single(paths[0], run_api(lambda: ask(index, [paths[0]], None))[0])
        return
    refs, skipped = run_api(lambda: discover_images(paths))
    for problem in skipped:
        click.echo(f"warning: skipped {problem.path}: {problem.reason}", err=True)
    for batch in _chunks(refs):
        pictures, names, ids = [], [], []
        for ref in batch:
            try:
                pictures.append(load_image(ref.path).image)
            except ImageDecodeError as e:
                click.echo(f"warning: skipped {e}", err=True)
                if output.as_json:
                    echo_json({"query": str(ref.path), "error": e.reason})
                continue
            names.append(str(ref.path))
            ids.append(ref.id)
        if not pictures:
            continue
        results = run_api(functools.partial(ask, index, pictures, ids))
        for name, hits in zip(names, results, strict=True):
            output.batch(name, hits)


def _image_command(target: str, default_k: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The arguments and options of an image query command for ``target`` items."""
    what, fields = ("images", IMAGE_FIELDS) if target == "image" else ("captions", CAPTION_FIELDS)
    exclude_self = click.option(
        "--exclude-self",
        is_flag=True,
        help="Leave a query image that is itself in the index (same path) out of its own results.",
    )

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
            image_queries,
            index_option,
            _k_option(default_k, what, "image"),
            *([exclude_self] if target == "image" else []),
            _device_option,
            search_options,
            composition_options,
            _json_option(fields, "for several images one {query, hits} object per image"),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@click.command("image-to-caption")
@_image_command("caption", 5)
def image_to_caption_command(
    images: ImageQueries,
    index_path: str,
    k: int,
    device: str,
    options: SearchOptions,
    composition: Composition,
    as_json: bool,
) -> None:
    """Find the captions that best describe IMAGE. Several images, folders or globs (or --queries-file) are
    answered in one pass; unreadable ones are reported and skipped."""

    def plain(index: Any, pictures: list[Any], ids: Any) -> list[list[Any]]:
        hits: list[list[Any]] = index.images_to_captions(pictures, k, options)
        return hits

    ask = image_asker(composition, "caption", k, options, False, plain)
    _answer_images(images, index_path, device, ask, Output(as_json, lambda hit: hit.caption, options.min_score))


@click.command("image-to-image")
@_image_command("image", 10)
def image_to_image_command(
    images: ImageQueries,
    index_path: str,
    k: int,
    exclude_self: bool,
    device: str,
    options: SearchOptions,
    composition: Composition,
    as_json: bool,
) -> None:
    """Find the indexed images most like IMAGE ("more like this photo"). Several images, folders or globs
    (or --queries-file) are answered in one pass; unreadable ones are reported and skipped."""

    def plain(index: Any, pictures: list[Any], ids: Any) -> list[list[Any]]:
        hits: list[list[Any]] = index.images_to_images(pictures, k, options, exclude_self=exclude_self, query_ids=ids)
        return hits

    ask = image_asker(composition, "image", k, options, exclude_self, plain)
    _answer_images(images, index_path, device, ask, Output(as_json, lambda hit: hit.uri, options.min_score))
