"""``retrieval dedup``: groups of near-identical images in an index, each with a suggested keeper."""

from __future__ import annotations

import click

from retrieval.api.dedup import DEFAULT_THRESHOLD
from retrieval.cli.common import echo_json, index_option, open_index_or_fail, run_api


@click.command("dedup")
@index_option
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Cosine of the stored image vectors at or above which two images are near-duplicates (chains join a group).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help=(
        "JSON lines: one {keeper, duplicates} object per group, each image with id, uri, width, height, position, "
        "similarity."
    ),
)
def dedup_command(index_path: str, threshold: float, as_json: bool) -> None:
    """Find groups of near-identical images (re-encoded, resized, cropped copies). The suggested keeper of
    each group is the image with the most pixels, then the earliest added. Nothing is deleted: pass the
    duplicates' ids to `retrieval remove --id` to drop them."""
    index = open_index_or_fail(index_path, "cpu")
    groups = run_api(lambda: index.duplicates(threshold))
    if as_json:
        for group in groups:
            echo_json(group.to_dict())
        return
    for number, group in enumerate(groups, 1):
        keeper = group.keeper
        click.echo(f"group {number}: keep {keeper.id}  {keeper.uri}  ({keeper.width}x{keeper.height})")
        for item in group.duplicates:
            click.echo(f"  {item.similarity:7.4f}  {item.id}  {item.uri}  ({item.width}x{item.height})")
    copies = sum(len(group.duplicates) for group in groups)
    click.echo(f"{len(groups)} groups, {copies} near-duplicate images (threshold {threshold:g})")
