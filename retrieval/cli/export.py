"""``export``: an index in clip-retrieval's layout; and ``build-index --embeddings``: an index from that layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from retrieval.api.build import DEFAULT_INDEX
from retrieval.cli.common import echo_json, run_api, setup_logging


@click.command("export")
@click.option(
    "--index", "index_path", default=str(DEFAULT_INDEX), show_default=True, help="Index directory (a CLIP index)."
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["clip-retrieval"]),
    default="clip-retrieval",
    show_default=True,
    help="clip-retrieval: img_emb/, text_emb/, metadata/, image.index, text.index and indices_paths.json, "
    "as clip-retrieval back serves them.",
)
@click.option("--name", default=None, help="The index's name in indices_paths.json (default: OUT's folder name).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.argument("out", type=click.Path(file_okay=False))
def export_command(index_path: str, export_format: str, name: str | None, as_json: bool, out: str) -> None:
    """Write the index to the folder OUT (new, or empty) in another tool's layout.

    \b
    Serve it with clip-retrieval:  clip-retrieval back --indices-paths OUT/indices_paths.json
    Come back from it:             retrieval build-index --embeddings OUT --encoder SPEC
    """
    from retrieval.api.export import export_index

    report = run_api(lambda: export_index(index_path, out, export_format, name))
    if as_json:
        echo_json(report.to_json())
        return
    click.echo(
        f"exported {report.images} images and {report.captions} captions ({report.rows} rows, "
        f"{report.partitions} partition(s)) to {report.out}; clip back entry: {report.indices_paths}"
    )


def build_from_embeddings(
    embeddings: str,
    others: Sequence[Any],
    index_path: str,
    encoder: str | None,
    embedding: Any,
    index_options: Any,
    as_json: bool,
) -> None:
    """``build-index --embeddings DIR --encoder SPEC``: no other source, a CLIP encoder; prints like build-index."""
    from retrieval.api.embeddings import EmbeddingsOptions, build_index_from_embeddings

    if any(others):
        raise click.UsageError(
            "--embeddings builds from the embedding folder alone: leave out --images, --captions, --anchors "
            "and the unimodal encoders, and --ray"
        )
    if not encoder:
        raise click.UsageError(
            "--embeddings needs --encoder: the CLIP model that made the vectors (it encodes the queries)"
        )
    setup_logging(embedding.quiet)
    options = EmbeddingsOptions(
        encoder=encoder,
        checkpoint=embedding.checkpoint,
        device=embedding.device,
        index_options=index_options,
        progress=not embedding.quiet,
    )
    index = run_api(lambda: build_index_from_embeddings(embeddings, index_path, options))
    info = index.info()
    if as_json:
        echo_json(info)
        return
    counts = info["counts"]
    click.echo(
        f"indexed {counts['image']} images and {counts['caption']} captions from the embeddings in {embeddings} "
        f"into {index_path} ({info['build']['seconds']:.1f} s, nothing encoded)"
    )
    if info["errors"]:
        click.echo(f"skipped {info['errors']} items; reasons in {Path(index_path) / 'errors.jsonl'}", err=True)
