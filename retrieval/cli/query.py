"""Query commands: ``text-to-image``, ``image-to-caption``, ``image-to-image`` and ``text-to-caption``,
one query or a whole file of them in one pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from retrieval.cli.common import echo_json, index_option, open_index_or_fail, run_api
from retrieval.cli.compose import (
    Composition,
    composition_options,
    image_asker,
    text_asker,
)
from retrieval.cli.narrowing import Narrowing, narrowing_options
from retrieval.index.spec import SearchKnobs

QUERY_BATCH = 256  # queries encoded and searched together


def _search_options(func: Callable) -> Callable:
    options = [
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option(
            "--route",
            type=click.Choice(["clip", "asif", "projected", "unimodal"]),
            default=None,
            help="Route (default: the query's first in this index; see info: query_routes).",
        ),
        click.option(
            "--nprobe",
            type=click.IntRange(min=1),
            default=None,
            help=(
                "IVF lists to visit per query (default: tuned at build time; see info). Higher: better recall, slower."
            ),
        ),
        click.option(
            "--ef-search",
            type=click.IntRange(min=1),
            default=None,
            help="HNSW search breadth (default: tuned at build time; see info).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _print_hits(
    hits: Sequence[Any],
    as_json: bool,
    describe: Callable[[Any], str],
    query: str = "",
    narrowing: Narrowing = Narrowing(),
) -> None:
    if narrowing.min_score is not None:  # the cutoff's count goes with the hits: one {query, passed, hits} object
        _print_batch(query, hits, as_json, describe, narrowing)
        return
    if as_json:
        for hit in hits:
            echo_json(hit.to_dict())
        return
    if not hits:
        click.echo("no results")
    for hit in hits:
        click.echo(f"{hit.rank:>3}  {hit.score:7.4f}  {describe(hit)}")


def _print_batch(
    query: str, hits: Sequence[Any], as_json: bool, describe: Callable[[Any], str], narrowing: Narrowing = Narrowing()
) -> None:
    passed = {} if narrowing.min_score is None else {"min_score": narrowing.min_score, "passed": len(hits)}
    if as_json:
        echo_json({"query": query, **passed, "hits": [hit.to_dict() for hit in hits]})
        return
    click.echo(f"# {query}" + (f"  ({len(hits)} passed --min-score {narrowing.min_score:g})" if passed else ""))
    _print_hits(hits, False, describe)
    click.echo("")


def _chunks(items: Sequence[Any], size: int = QUERY_BATCH) -> Any:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _text_query_options(func: Callable) -> Callable:
    options = [
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
        index_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _answer_texts(
    query: str | None,
    queries_file: str | None,
    column: str,
    index_path: str,
    device: str,
    ask: Callable[[Any, list[str]], list[list[Any]]],
    as_json: bool,
    describe: Callable[[Any], str],
    narrowing: Narrowing = Narrowing(),
) -> None:
    """Open the index, ask ``ask(index, texts)`` for QUERY or each query of --queries-file (in batches) and print."""
    from retrieval.sources.captions import read_caption_file

    if (query is None) == (queries_file is None):
        raise click.UsageError("give a QUERY or --queries-file FILE (one of them)")
    index = open_index_or_fail(index_path, device)
    if query is not None:
        _print_hits(run_api(lambda: ask(index, [query]))[0], as_json, describe, query, narrowing)
        return
    parsed = run_api(lambda: read_caption_file(queries_file, caption_column=column))
    for problem in parsed.errors:
        click.echo(f"warning: skipped {problem.path} row {problem.row}: {problem.reason}", err=True)
    texts = [record.text for record in parsed.records]
    for batch in _chunks(texts):
        results = run_api(lambda batch=batch: ask(index, batch))
        for text, hits in zip(batch, results, strict=True):
            _print_batch(text, hits, as_json, describe, narrowing)


@click.command("text-to-image")
@_text_query_options
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of images to return per query."
)
@_search_options
@composition_options
@narrowing_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "JSON lines: one object per hit (rank, score, id, uri, width, height, metadata: the source's fields such as "
        "url); with --queries-file one {query, hits} object per query."
    ),
)
def text_to_image_command(
    query: str | None,
    queries_file: str | None,
    column: str,
    index_path: str,
    k: int,
    device: str,
    route: str | None,
    nprobe: int | None,
    ef_search: int | None,
    composition: Composition,
    as_json: bool,
    narrowing: Narrowing,
) -> None:
    """Find the images that best match QUERY (or each query of --queries-file)."""
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search)
    _answer_texts(
        query,
        queries_file,
        column,
        index_path,
        device,
        text_asker(
            composition,
            "image",
            k,
            route,
            knobs,
            narrowing.api(),
            lambda index, texts: index.texts_to_images(texts, k=k, route=route, knobs=knobs, **narrowing.api()),
        ),
        as_json,
        lambda hit: hit.uri,
        narrowing,
    )


@click.command("text-to-caption")
@_text_query_options
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Number of captions to return per query."
)
@_search_options
@composition_options
@narrowing_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "JSON lines: one object per hit (rank, score, id, caption, source, image_uri, metadata); with --queries-file "
        "one {query, hits} object per query."
    ),
)
def text_to_caption_command(
    query: str | None,
    queries_file: str | None,
    column: str,
    index_path: str,
    k: int,
    device: str,
    route: str | None,
    nprobe: int | None,
    ef_search: int | None,
    composition: Composition,
    as_json: bool,
    narrowing: Narrowing,
) -> None:
    """Find the indexed captions closest to QUERY (or each query of --queries-file): caption search."""
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search)
    _answer_texts(
        query,
        queries_file,
        column,
        index_path,
        device,
        text_asker(
            composition,
            "caption",
            k,
            route,
            knobs,
            narrowing.api(),
            lambda index, texts: index.texts_to_captions(texts, k=k, route=route, knobs=knobs, **narrowing.api()),
        ),
        as_json,
        lambda hit: hit.caption,
        narrowing,
    )


def _image_list(path: str) -> list[str]:
    """Image paths listed in a text file, one per line; relative ones resolve against the file's folder."""
    base = Path(path).resolve().parent
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path}: cannot read ({e})", param_hint="--queries-file") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [str(Path(entry) if Path(entry).is_absolute() else base / entry) for entry in entries]


def _image_query_options(func: Callable) -> Callable:
    options = [
        click.argument("images", nargs=-1, type=click.Path()),
        click.option(
            "--queries-file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="A text file listing query images, one path per line; all are answered in one pass.",
        ),
        index_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _answer_images(
    images: Sequence[str],
    queries_file: str | None,
    index_path: str,
    device: str,
    ask: Callable[[Any, list[Any], list[str]], list[list[Any]]],
    as_json: bool,
    describe: Callable[[Any], str],
    narrowing: Narrowing = Narrowing(),
) -> None:
    """Open the index and ask ``ask(index, pictures_or_paths, ids)`` for the query images; unreadable ones are reported
    and skipped."""
    from retrieval.core.errors import ImageDecodeError
    from retrieval.sources.discovery import discover_images
    from retrieval.sources.items import load_image

    paths = list(images) + (_image_list(queries_file) if queries_file else [])
    if not paths:
        raise click.UsageError("give an IMAGE (or several, folders, globs) or --queries-file FILE")
    index = open_index_or_fail(index_path, device)
    if len(paths) == 1 and not queries_file and not Path(paths[0]).is_dir():
        _print_hits(run_api(lambda: ask(index, [paths[0]], None))[0], as_json, describe, paths[0], narrowing)
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
                if as_json:
                    echo_json({"query": str(ref.path), "error": e.reason})
                continue
            names.append(str(ref.path))
            ids.append(ref.id)
        if not pictures:
            continue
        results = run_api(lambda pictures=pictures, ids=ids: ask(index, pictures, ids))
        for name, hits in zip(names, results, strict=True):
            _print_batch(name, hits, as_json, describe, narrowing)


@click.command("image-to-caption")
@_image_query_options
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Number of captions to return per image."
)
@_search_options
@composition_options
@narrowing_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "JSON lines: one object per hit (rank, score, id, caption, source, image_uri, metadata); for several images "
        "one {query, hits} object per image."
    ),
)
def image_to_caption_command(
    images: Sequence[str],
    queries_file: str | None,
    index_path: str,
    k: int,
    device: str,
    route: str | None,
    nprobe: int | None,
    ef_search: int | None,
    composition: Composition,
    as_json: bool,
    narrowing: Narrowing,
) -> None:
    """Find the captions that best describe IMAGE. Several images, folders or globs (or --queries-file) are
    answered in one pass; unreadable ones are reported and skipped."""
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search)
    _answer_images(
        images,
        queries_file,
        index_path,
        device,
        image_asker(
            composition,
            "caption",
            k,
            route,
            knobs,
            False,
            narrowing.api(),
            lambda index, pictures, ids: index.images_to_captions(
                pictures, k=k, route=route, knobs=knobs, **narrowing.api()
            ),
        ),
        as_json,
        lambda hit: hit.caption,
        narrowing,
    )


@click.command("image-to-image")
@_image_query_options
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of images to return per image."
)
@click.option(
    "--exclude-self",
    is_flag=True,
    help="Leave a query image that is itself in the index (same path) out of its own results.",
)
@_search_options
@composition_options
@narrowing_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "JSON lines: one object per hit (rank, score, id, uri, width, height, metadata: the source's fields such as "
        "url); for several images one {query, hits} object per image."
    ),
)
def image_to_image_command(
    images: Sequence[str],
    queries_file: str | None,
    index_path: str,
    k: int,
    exclude_self: bool,
    device: str,
    route: str | None,
    nprobe: int | None,
    ef_search: int | None,
    composition: Composition,
    as_json: bool,
    narrowing: Narrowing,
) -> None:
    """Find the indexed images most like IMAGE ("more like this photo"). Several images, folders or globs
    (or --queries-file) are answered in one pass; unreadable ones are reported and skipped."""
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search)
    _answer_images(
        images,
        queries_file,
        index_path,
        device,
        image_asker(
            composition,
            "image",
            k,
            route,
            knobs,
            exclude_self,
            narrowing.api(),
            lambda index, pictures, ids: index.images_to_images(
                pictures, k=k, exclude_self=exclude_self, route=route, knobs=knobs, query_ids=ids, **narrowing.api()
            ),
        ),
        as_json,
        lambda hit: hit.uri,
        narrowing,
    )
