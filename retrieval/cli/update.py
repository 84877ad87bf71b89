"""Update commands: ``add`` items to a built index, ``remove`` items from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from retrieval.cli.common import (
    EmbedFlags,
    caption_options,
    echo_json,
    embed_options,
    index_option,
    run_api,
    setup_logging,
)
from retrieval.cli.ray_flags import ray_flags
from retrieval.core.errors import InputError

NOTHING_NEW_EXIT = InputError.exit_code  # add --strict: what the library's "nothing new" error exited with


def _report(report: Any, as_json: bool, index_path: str) -> None:
    if as_json:
        echo_json(report.to_json())
        return
    counts = report.counts
    if report.nothing_new:
        present = report.already_present
        click.echo(
            f"nothing new to add to {index_path}: {present.get('image', 0)} images and {present.get('caption', 0)} "
            f"captions already in the index (now {counts['image']} images, {counts['caption']} captions)"
        )
    elif report.operation == "add":
        click.echo(
            f"added {report.added['image']} images and {report.added['caption']} captions to {index_path} "
            f"(now {counts['image']} images, {counts['caption']} captions; {report.seconds:.1f} s)"
        )
        present = report.already_present
        if any(present.values()):
            click.echo(
                f"already in the index, not added again: {present['image']} images, {present['caption']} captions"
            )
        for key, why in report.retrained.items():
            click.echo(f"retrained {key}: {why}")
    else:
        click.echo(
            f"removed {report.removed['image']} images and {report.removed['caption']} captions from {index_path} "
            f"(now {counts['image']} images, {counts['caption']} captions)"
        )
        if report.compacted:
            click.echo(f"compacted: {', '.join(report.compacted)}")
        if report.not_found:
            click.echo(f"not found: {', '.join(report.not_found)}", err=True)
    if report.skipped:
        click.echo(f"skipped {report.skipped} unreadable items; reasons in errors.jsonl", err=True)


@click.command("add")
@click.option(
    "--images",
    multiple=True,
    help=(
        "Image file, folder (recursive) or glob pattern to add; also tar shards or parquet files with image bytes "
        "(samples already indexed are skipped). Repeatable."
    ),
)
@click.option("--captions", multiple=True, help="Caption file to add (a pairs file also adds its images). Repeatable.")
@index_option
@caption_options
@embed_options(checkpoint=False)
@ray_flags("Embed the new images on Ray (pip install 'retrieval[ray]'), as build-index --ray does.")
@click.option(
    "--strict",
    is_flag=True,
    help=f"Exit with status {NOTHING_NEW_EXIT} when there is nothing new to add (default: 0, as a rerun is no error).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was done as one JSON object.")
def add_command(
    images: Sequence[str],
    captions: Sequence[str],
    index_path: str,
    caption_options: Any,
    embedding: EmbedFlags,
    ray: Any,
    strict: bool,
    as_json: bool,
) -> None:
    """Add images and captions to a built index, encoding only the new ones.

    Items already in the index (same id) are skipped; with nothing new the index is left as it is and the
    command says so (exit status 0, or 2 with --strict). The vector indexes are not retrained unless the
    new data drifted from the training data or the collection grew past 4x; recall is measured again.
    Readers keep seeing the previous state until the update is committed.
    """
    from retrieval.api.update import add_to_index

    setup_logging(embedding.quiet)
    report = run_api(
        lambda: add_to_index(
            index_path, images, captions, caption_options, embedding.options, device=embedding.device, ray=ray
        )
    )
    _report(report, as_json, index_path)
    if strict and report.nothing_new:
        click.get_current_context().exit(NOTHING_NEW_EXIT)


@click.command("remove")
@click.option("--id", "ids", multiple=True, help="Item id to remove (see the JSON output of queries). Repeatable.")
@click.option(
    "--path",
    "paths",
    multiple=True,
    help="Remove the image at this path, or every caption read from this caption file. Repeatable.",
)
@index_option
@click.option("--json", "as_json", is_flag=True, help="Print what was done as one JSON object.")
def remove_command(ids: Sequence[str], paths: Sequence[str], index_path: str, as_json: bool) -> None:
    """Remove items by id or path. Removed items disappear from results at once; once a quarter of a kind is
    removed its files are compacted. Readers keep seeing the previous state until the update is committed."""
    from retrieval.api.update import remove_from_index

    setup_logging(False)
    report = run_api(lambda: remove_from_index(index_path, ids, paths))
    _report(report, as_json, index_path)
