"""Command line: parse options, call the Python API, print results (text, or JSON lines with --json)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from retrieval.api.build import DEFAULT_INDEX
from retrieval.cli.common import (
    IMAGE_ENCODER_HELP,
    TEXT_ENCODER_HELP,
    EmbedFlags,
    caption_options,
    echo_json,
    embed_options,
    index_type_options,
    open_index_or_fail,
    option_group,
    quiet_library_warnings,
    run_api,
    setup_logging,
)
from retrieval.cli.dedup import dedup_command
from retrieval.cli.export import build_from_embeddings, export_command
from retrieval.cli.query import (
    image_to_caption_command,
    image_to_image_command,
    text_to_caption_command,
    text_to_image_command,
)
from retrieval.cli.ray_flags import ray_flags
from retrieval.cli.serve import serve_command
from retrieval.cli.update import add_command, remove_command
from retrieval.core.version import __version__


def _weights(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers separated by commas, got {value!r}", param_hint="--anchor-weights"
        ) from None


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected whole numbers separated by commas, got {value!r}", param_hint=option
        ) from None
    if not numbers or min(numbers) < 0:
        raise click.BadParameter(f"expected whole numbers >= 0, got {value!r}", param_hint=option)
    return numbers


def _asif(k: int | None, p: float | None) -> Any:
    """The ASIF settings given (None when neither): an option left out is the anchor set's own, resolved by the API."""
    from retrieval.asif.relative import AsifParams

    if k is None and p is None:
        return None
    return run_api(lambda: AsifParams(k=k, p=p))


@dataclass(frozen=True)
class EncoderNames:
    """``--encoder`` (contrastive) or ``--image-encoder`` + ``--text-encoder`` (unimodal)."""

    clip: str | None
    image: str | None
    text: str | None


def encoder_options(clip_help: str) -> Callable[[Callable], Callable]:
    """The encoder choice options: one ``encoders: EncoderNames``."""
    return option_group(
        "encoders",
        [
            click.option("--encoder", default=None, help=clip_help),
            click.option("--image-encoder", default=None, help=IMAGE_ENCODER_HELP),
            click.option("--text-encoder", default=None, help=TEXT_ENCODER_HELP),
        ],
        lambda encoder, image_encoder, text_encoder: EncoderNames(encoder, image_encoder, text_encoder),
    )


@dataclass(frozen=True)
class AnchorFlags:
    """``--anchors`` (repeatable) and ``--anchor-weights``, parsed."""

    refs: tuple[str, ...]
    weights: list[float] | None


def anchor_options(anchors_help: str) -> Callable[[Callable], Callable]:
    """The anchor options: one ``anchors: AnchorFlags``."""
    return option_group(
        "anchors",
        [
            click.option("--anchors", multiple=True, help=anchors_help),
            click.option(
                "--anchor-weights", default=None, help="Comma-separated weight per anchor set when fusing, e.g. 1,0.5."
            ),
        ],
        lambda anchors, anchor_weights: AnchorFlags(tuple(anchors), _weights(anchor_weights)),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="retrieval")
def main() -> None:
    """Vision-language search: index photos and captions, then ask text -> image and image -> caption.

    \b
    Contrastive model (one shared space):
      retrieval build-index --images photos/ --captions caps.txt --encoder open_clip:ViT-B-32/laion2b_s34b_b79k
    Frozen unimodal models bridged by ASIF anchors (works offline):
      retrieval build-index --images photos/ --captions caps.txt \\
          --image-encoder efficientnet-lite0 --text-encoder minilm --anchors builtin:imagenet
    Then:
      retrieval text-to-image "a dog running on the beach"
      retrieval image-to-caption photos/dog.jpg
      retrieval image-to-image photos/dog.jpg --exclude-self
      retrieval text-to-caption "a dog on a beach"
    """
    quiet_library_warnings()


@main.command("build-anchors")
@click.option(
    "--pairs",
    "pairs",
    multiple=True,
    required=True,
    help="Pairs file (captions with an image column) or labelled folder root/<label>/*.jpg. Repeatable.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the anchor set to.")
@click.option("--image-encoder", required=True, help=IMAGE_ENCODER_HELP)
@click.option("--text-encoder", required=True, help=TEXT_ENCODER_HELP)
@click.option(
    "--k",
    type=int,
    default=None,
    help="Default ASIF top-k for indexes using these anchors (default: the library default).",
)
@click.option(
    "--p",
    type=float,
    default=None,
    help="Default ASIF exponent for indexes using these anchors (default: the library default).",
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
    image_encoder: str,
    text_encoder: str,
    k: int | None,
    p: float | None,
    cache_dir: str | None,
    caption_options: Any,
    embedding: EmbedFlags,
    as_json: bool,
) -> None:
    """Embed (image, caption) anchor pairs with two unimodal encoders, for ASIF cross-modal search."""
    from retrieval.api.build import build_anchors

    setup_logging(embedding.quiet)
    anchors = run_api(
        lambda: build_anchors(
            pairs,
            out,
            image_encoder,
            text_encoder,
            checkpoint=embedding.checkpoint,
            device=embedding.device,
            caption_options=caption_options,
            embed=embedding.options,
            asif=_asif(k, p),
            cache_dir=cache_dir,
        )
    )
    summary = {"out": out, "anchors": len(anchors), "asif": anchors.params.to_json()}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {len(anchors)} anchor pairs to {out} (ASIF k={anchors.params.k}, p={anchors.params.p:g})")


@main.command("build-index")
@click.option(
    "--images",
    multiple=True,
    help=(
        "Image file, folder (recursive) or glob pattern; webdataset tar shards (shards/{00000..00127}.tar, a glob, "
        "or their folder) or parquet files with image bytes. Repeatable."
    ),
)
@click.option(
    "--embeddings",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Build from vectors made already: clip-retrieval's inference output (img_emb/, text_emb/, metadata/), "
    "with the --encoder that made them. Nothing is encoded but a 32-item check.",
)
@click.option(
    "--captions",
    multiple=True,
    help=(
        "Caption file: .txt (one per line), .csv, .tsv, .jsonl, .parquet. A file with an image column also adds its "
        "images. Repeatable."
    ),
)
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
    "With unimodal encoders: an anchor directory from build-anchors, or builtin:imagenet. Repeat to fuse several sets."
)
@click.option(
    "--k", type=int, default=None, help="ASIF top-k (default: the anchor sets'; fused sets must agree unless given)."
)
@click.option(
    "--p",
    type=float,
    default=None,
    help="ASIF exponent (default: the anchor sets'; fused sets must agree unless given).",
)
@caption_options
@embed_options(resumable=True)
@index_type_options
@ray_flags(
    "Embed the images on Ray (pip install 'retrieval[ray]'): local starts a one-machine cluster on 127.0.0.1, "
    "auto joins the running cluster (else starts a local one), or give a cluster address. Same index; a rerun "
    "embeds only the units not done."
)
@click.option(
    "--image-views",
    type=click.Choice(["none", "five"]),
    default="none",
    show_default=True,
    help="ASIF: describe each image by the mean relative row of the whole photo, its four quadrants and a centre "
    "crop (six encoder passes per image; image queries too).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the index summary as JSON.")
def build_index_command(
    images: Sequence[str],
    embeddings: str | None,
    captions: Sequence[str],
    index_path: str,
    encoders: EncoderNames,
    anchors: AnchorFlags,
    k: int | None,
    p: float | None,
    caption_options: Any,
    embedding: EmbedFlags,
    index_options: Any,
    ray: Any,
    image_views: str,
    as_json: bool,
) -> None:
    """Embed images and captions and write a searchable index directory.

    A previous index at the same path stays readable until the new one is complete. A build that
    is killed resumes from its last progress shard when the same command is run again.
    """
    from retrieval.api.build import build_index

    if embeddings is not None:
        others = (images, captions, anchors.refs, encoders.image, encoders.text, k, p, ray, image_views != "none")
        return build_from_embeddings(embeddings, others, index_path, encoders.clip, embedding, index_options, as_json)
    setup_logging(embedding.quiet)
    choice = embedding.encoders(encoders.clip, encoders.image, encoders.text)
    index = run_api(
        lambda: build_index(
            images,
            captions,
            index_path,
            choice,
            anchors=list(anchors.refs) or None,
            anchor_weights=anchors.weights,
            asif=_asif(k, p),
            caption_options=caption_options,
            embed=embedding.options,
            index_options=index_options,
            ray=ray,
            image_views=image_views,
        )
    )
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


main.add_command(text_to_image_command)
main.add_command(image_to_caption_command)
main.add_command(image_to_image_command)
main.add_command(text_to_caption_command)
main.add_command(add_command)
main.add_command(remove_command)
main.add_command(serve_command)
main.add_command(export_command)
main.add_command(dedup_command)


@main.command("info")
@click.option("--index", "index_path", default=str(DEFAULT_INDEX), show_default=True, help="Index directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def info_command(index_path: str, as_json: bool) -> None:
    """Summarise an index: encoders, counts, ASIF parameters, skipped items, size."""
    info = run_api(lambda: open_index_or_fail(index_path).info())
    if as_json:
        echo_json(info)
        return
    click.echo(
        f"index      {info['path']} (format {info['format']}, built {info['created']} by retrieval "
        f"{info['tool_version']})"
    )
    click.echo(f"mode       {info['mode']}")
    for role, record in info["encoders"].items():
        click.echo(f"{role:<10} {record['spec']} (dim {record['dim']}, weights {record['fingerprint']})")
    click.echo(
        f"items      {info['counts']['image']} images, {info['counts']['caption']} captions, {info['errors']} skipped"
    )
    deleted = info.get("deleted") or {}
    if any(deleted.values()):
        click.echo(
            f"deleted    {deleted.get('image', 0)} images, {deleted.get('caption', 0)} captions (hidden from results)"
        )
    requested = info["index"]
    budget = f", budget {requested['max_memory'] / 2**30:.2f} GB" if requested.get("max_memory") else ""
    click.echo(
        f"index type {requested.get('index_type', 'flat')} "
        f"(target recall@10 {requested.get('target_recall', 1.0)}{budget})"
    )
    for key, described in info.get("vector_indexes", {}).items():
        knobs = " ".join(f"{name}={value}" for name, value in described["knobs"].items()) or "exact"
        recall = described["recall@10"]
        measured = (
            (
                f"recall@1 {described['recall@1']:.3f} recall@10 {recall:.3f}, {described['latency_ms_median']:.3f} "
                "ms/query "
                f"({described['recall_queries']} queries: {described['query_source']})"
            )
            if recall is not None
            else "not measured (empty)"
        )
        click.echo(f"  {key:<18} {described['factory']} [{knobs}] {measured}")
        click.echo(f"  {'':<18} why: {described['why']}")
    if "anchors" in info:
        sets = ", ".join(f"{a['name']} ({a['count']} pairs, weight {a['weight']:g})" for a in info["anchors"])
        click.echo(f"anchors    {sets}; ASIF k={info['asif']['k']} p={info['asif']['p']:g}")
    click.echo(f"routes     {', '.join(info['routes'])}")
    queries = "; ".join(
        f"{query.replace('_', '-')} {'/'.join(routes)}" for query, routes in info["query_routes"].items()
    )
    click.echo(f"queries    {queries}")
    build = info["build"]
    speed = f", {build['images_per_second']} images/s" if build.get("images_per_second") else ""
    if build.get("workers"):
        speed += f" ({build['workers']} workers{' encoding too' if build.get('encoder_replicas') else ''})"
    click.echo(f"build      {build['seconds']:.1f} s on {build['device']}{speed}")
    click.echo(f"disk       {info['disk_bytes'] / 1e6:.2f} MB")


def _format_eval_row(row: dict[str, Any]) -> str:
    label = row["route"] + (f" [{row['split']}]" if row.get("split") else "")
    if "top1" in row:
        return f"{label:<34}{row['top1']:>8.3f}{row['top5']:>8.3f}{row['scored']['images']:>8}"
    cells = []
    for task in ("text_to_image", "image_to_caption"):
        values = row[task]
        first = 8 if task == "text_to_image" else 9
        cells += [
            f"{values['R@1']:>{first}.3f}",
            f"{values['R@5']:>7.3f}",
            f"{values['R@10']:>7.3f}",
            f"{values['median_rank']:>6.1f}",
        ]
    return f"{label:<34}" + "".join(cells) + f"{row['scored']['text_queries']:>7}{row['scored']['image_queries']:>7}"


def _print_eval(report: dict[str, Any]) -> None:
    anchors = ", ".join(f"{a['name']} ({a['count']})" for a in report["anchors"]) or "none"
    click.echo(
        f"{report['task']} on {report['data']}  encoders: {report['encoders']['image']} + "
        f"{report['encoders']['text']}  anchors: {anchors}"
    )
    if report["split"]:
        click.echo(f"split: {report['split']}")
    if report["task"] == "zero-shot":
        click.echo(f"{'route':<34}{'top-1':>8}{'top-5':>8}{'images':>8}")
    else:
        click.echo(
            f"{'route':<34}{'t2i R@1':>8}{'R@5':>7}{'R@10':>7}{'medR':>6}"
            f"{'i2c R@1':>9}{'R@5':>7}{'R@10':>7}{'medR':>6}{'texts':>7}{'images':>7}"
        )
    for row in report["rows"]:
        click.echo(_format_eval_row(row))
    if report["chosen"]:
        click.echo("best on the tuning half, reported on the other half:")
        click.echo(_format_eval_row(report["chosen"]))
    final = report["chosen"] or (report["rows"][0] if len(report["rows"]) == 1 else None)
    if final and "per_class_top1" in final:
        click.echo(
            "per-class top-1: " + ", ".join(f"{name} {acc:.2f}" for name, acc in final["per_class_top1"].items())
        )


@dataclass(frozen=True)
class EvalFlags:
    """What ``eval`` measures, and on how much of the data."""

    routes: tuple[str, ...]
    align: str | None
    sweep_values: tuple[str, ...]
    center: str
    refine: str
    split: bool
    limit: int | None
    cache_dir: str | None

    def chosen_routes(self, contrastive: bool) -> list[str] | None:
        """The routes to report (None: the encoders' default)."""
        chosen = list(self.routes) or None
        if chosen and "all" in chosen:
            chosen = ["clip"] if contrastive else ["asif", "projected", "linear"]
        if self.align:
            chosen = list(dict.fromkeys((chosen or (["clip"] if contrastive else ["asif"])) + [self.align]))
        return chosen


eval_options = option_group(
    "evaluation",
    [
        click.option(
            "--route",
            "routes",
            multiple=True,
            type=click.Choice(["clip", "asif", "projected", "linear", "all"]),
            help=(
                "How images and texts are compared; repeatable. 'all' = every route the encoders allow. Default: "
                "clip or asif."
            ),
        ),
        click.option(
            "--align",
            type=click.Choice(["linear"]),
            default=None,
            help="Also report the linear (ridge) alignment baseline.",
        ),
        click.option(
            "--sweep",
            "sweep_values",
            multiple=True,
            help="Grid over ASIF settings, e.g. --sweep k=5,10,30,100 --sweep p=1,3,8.",
        ),
        click.option(
            "--center",
            type=click.Choice(["none", "anchors", "collection"]),
            default="none",
            show_default=True,
            help=(
                "Subtract each modality's mean first: anchors = the anchors' means; collection = evaluated images by "
                "their own mean (transductive, label-free)."
            ),
        ),
        click.option(
            "--refine",
            default="0",
            show_default=True,
            help=(
                "Zero-shot only: rounds of label-free prototype refinement on the evaluated images (transductive); "
                "comma list to sweep."
            ),
        ),
        click.option(
            "--split",
            is_flag=True,
            help="Pick the best setting on even-numbered images, report it on the odd-numbered half.",
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Evaluate an evenly spread subset of this many images.",
        ),
        click.option(
            "--cache",
            "cache_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Embedding cache folder (default index_data/cache/embeddings).",
        ),
    ],
    lambda routes, sweep_values, **rest: EvalFlags(routes=tuple(routes), sweep_values=tuple(sweep_values), **rest),
)


@main.command("eval")
@click.argument("data", type=click.Path())
@encoder_options("Contrastive encoder spec (route clip).")
@anchor_options("Anchor directory or builtin:imagenet; repeat to fuse several sets.")
@click.option(
    "--k", type=int, default=None, help="ASIF top-k (default: the anchor sets'; fused sets must agree unless given)."
)
@click.option(
    "--p",
    type=float,
    default=None,
    help="ASIF exponent (default: the anchor sets'; fused sets must agree unless given).",
)
@eval_options
@caption_options
@embed_options()
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as one JSON object.")
def eval_command(
    data: str,
    encoders: EncoderNames,
    anchors: AnchorFlags,
    k: int | None,
    p: float | None,
    evaluation: EvalFlags,
    caption_options: Any,
    embedding: EmbedFlags,
    as_json: bool,
) -> None:
    """Measure quality on DATA: a pairs file (text -> image and image -> caption recall@1/5/10, median rank),
    a labelled folder root/<label>/* with --caption-template (zero-shot top-1/top-5 and per-class accuracy),
    or an index directory built from a pairs file (its own pairs, every route it answers by).

    Embeddings are cached by (encoder fingerprint, content hash): reruns with other settings encode nothing.
    """
    from retrieval.eval.data import evaluate_index, run_eval
    from retrieval.store.layout import directory_exists

    setup_logging(embedding.quiet)
    if directory_exists(data) and (Path(data) / "items").is_dir():  # an existing index: its own pairs, every route
        report = run_api(lambda: evaluate_index(data))
        echo_json(report) if as_json else _print_eval(report)
        return
    choice = embedding.encoders(encoders.clip, encoders.image, encoders.text)
    report = run_api(
        lambda: run_eval(
            data,
            choice,
            anchors=anchors.refs,
            routes=evaluation.chosen_routes(choice.is_contrastive),
            params=_asif(k, p),
            sweep_values=evaluation.sweep_values,
            anchor_weights=anchors.weights,
            split=evaluation.split,
            center=evaluation.center,
            refine=_int_list(evaluation.refine, "--refine"),
            limit=evaluation.limit,
            cache_dir=evaluation.cache_dir,
            caption_options=caption_options,
            embed=embedding.options,
        )
    )
    if as_json:
        echo_json(report)
    else:
        _print_eval(report)


@main.command("list-encoders")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per encoder.")
def list_encoders_command(as_json: bool) -> None:
    """Show the encoder specs this tool knows and whether each works offline here."""
    from dataclasses import asdict

    from retrieval.asif.anchors import list_builtin_anchor_sets
    from retrieval.encoders.registry import list_encoders

    encoders = list_encoders()
    if as_json:
        for info in encoders:
            echo_json(asdict(info))
        return
    width = max(len(info.name) for info in encoders)
    for info in encoders:
        status = "offline ok" if info.available_offline else "needs download"
        click.echo(
            f"{info.name:<{width}}  {info.kind:<10}  {status:<14}  {info.description}"
            + (f" ({info.note})" if info.note else "")
        )
    click.echo("built-in anchor sets: " + ", ".join(list_builtin_anchor_sets()))


if __name__ == "__main__":  # pragma: no cover
    main()
