"""Build commands: ``build-index`` (images and captions, or precomputed embeddings -> an index directory) and
``build-anchors`` (anchor pairs -> an anchor directory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from retrieval.api.build import DEFAULT_INDEX
from retrieval.cli.choices import (
    AnchorFlags,
    EncoderNames,
    anchor_options,
    asif_options,
    encoder_options,
    unimodal_encoder_options,
)
from retrieval.cli.common import (
    CAPTION_FLAGS,
    EmbedFlags,
    caption_options,
    caption_settings,
    echo_json,
    embed_options,
    index_type_options,
    option_group,
    run_api,
    setup_logging,
)
from retrieval.cli.export import build_from_embeddings
from retrieval.cli.ray_flags import ray_flags
from retrieval.core.config import CaptionOptions, IndexOptions


@click.command("build-anchors")
@click.option(
    "--pairs",
    "pairs",
    multiple=True,
    required=True,
    help="Pairs file (captions with an image column) or labelled folder root/<label>/*.jpg. Repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the anchor set to.")
@unimodal_encoder_options
@asif_options(
    "Default ASIF top-k for indexes using these anchors (default: the library default).",
    "Default ASIF exponent for indexes using these anchors (default: the library default).",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Reuse and fill an embedding cache folder (e.g. index_data/cache/embeddings).",
)
@caption_options
@embed_options()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def build_anchors_command(
    pairs: Sequence[str],
    out: str,
    encoders: EncoderNames,
    asif: Any,
    cache_dir: str | None,
    caption_options: CaptionOptions,
    embedding: EmbedFlags,
    as_json: bool,
) -> None:
    """Embed (image, caption) anchor pairs with two unimodal encoders, for ASIF cross-modal search."""
    from retrieval.api.build import build_anchors

    setup_logging(embedding.quiet)
    choice = embedding.encoders(image=encoders.image, text=encoders.text)
    anchors = run_api(lambda: build_anchors(pairs, out, choice, caption_options, embedding.options, asif, cache_dir))
    summary = {"out": out, "anchors": len(anchors), "asif": anchors.params.to_json()}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {len(anchors)} anchor pairs to {out} (ASIF k={anchors.params.k}, p={anchors.params.p:g})")


@dataclass(frozen=True)
class BuildInputs:
    """What ``build-index`` indexes: ``--images`` and ``--captions`` read with the caption options, or
    ``--embeddings`` (vectors made already)."""

    images: tuple[str, ...]
    captions: tuple[str, ...]
    embeddings: str | None
    caption_options: CaptionOptions


input_options = option_group(
    "inputs",
    [
        click.option(
            "--images",
            multiple=True,
            help="Image file, folder (recursive) or glob pattern; webdataset tar shards (shards/{00000..00127}.tar, "
            "a glob, or their folder) or parquet files with image bytes. Repeatable.",
        ),
        click.option(
            "--embeddings",
            type=click.Path(exists=True, file_okay=False),
            default=None,
            help="Build from vectors made already: clip-retrieval's inference output (img_emb/, text_emb/, "
            "metadata/), with the --encoder that made them. Nothing is encoded but a 32-item check.",
        ),
        click.option(
            "--captions",
            multiple=True,
            help="Caption file: .txt (one per line), .csv, .tsv, .jsonl, .parquet. A file with an image column also "
            "adds its images. Repeatable.",
        ),
        *CAPTION_FLAGS,
    ],
    lambda images, embeddings, captions, **caption: BuildInputs(
        tuple(images), tuple(captions), embeddings, caption_settings(**caption)
    ),
)
"""The inputs of ``build-index``: one ``inputs: BuildInputs``."""


@click.command("build-index")
@input_options
@click.option(
    "--index",
    "index_path",
    default=str(DEFAULT_INDEX),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Index directory to write.",
)
@encoder_options("Contrastive encoder spec: open_clip:MODEL/PRETRAINED, or open_clip:MODEL with --checkpoint.")
@anchor_options(
    "With unimodal encoders: an anchor directory from build-anchors, or builtin:imagenet. Repeat to fuse several sets.",
    image_views=True,
)
@embed_options(resumable=True)
@index_type_options
@ray_flags(
    "Embed the images on Ray (pip install 'retrieval[ray]'): local starts a one-machine cluster on 127.0.0.1, "
    "auto joins the running cluster (else starts a local one), or give a cluster address. Same index; a rerun "
    "embeds only the units not done."
)
@click.option("--json", "as_json", is_flag=True, help="Print the index summary as JSON.")
def build_index_command(
    inputs: BuildInputs,
    index_path: str,
    encoders: EncoderNames,
    anchors: AnchorFlags,
    embedding: EmbedFlags,
    index_options: IndexOptions,
    ray: Any,
    as_json: bool,
) -> None:
    """Embed images and captions and write a searchable index directory.

    A previous index at the same path stays readable until the new one is complete. A build that
    is killed resumes from its last progress shard when the same command is run again.
    """
    from retrieval.api.build import BuildOptions, build_index

    if inputs.embeddings is not None:
        others: tuple[Any, ...] = (inputs.images, inputs.captions, anchors.refs, encoders.image, encoders.text)
        others += (anchors.asif, ray, anchors.image_views != "none")
        return build_from_embeddings(
            inputs.embeddings, others, index_path, encoders.clip, embedding, index_options, as_json
        )
    setup_logging(embedding.quiet)
    choice = embedding.encoders(encoders.clip, encoders.image, encoders.text)
    options = BuildOptions(
        caption_options=inputs.caption_options,
        index_options=index_options,
        asif=anchors.asif,
        anchor_weights=anchors.weights,
        image_views=anchors.image_views,
        ray=ray,
    )
    refs, embed = list(anchors.refs) or None, embedding.options
    index = run_api(lambda: build_index(inputs.images, inputs.captions, index_path, choice, refs, embed, options))
    info = index.info()
    if as_json:
        echo_json(info)
        return
    counts = info["counts"]
    click.echo(
        f"indexed {counts['image']} images and {counts['caption']} captions into {index_path} ({info['mode']}, "
        f"{info['build']['seconds']:.1f} s)"
    )
    if info["errors"]:
        click.echo(
            f"skipped {info['errors']} unreadable items; reasons in {Path(index_path) / 'errors.jsonl'}", err=True
        )
