"""``retrieval eval``: recall on a pairs file or an index's own pairs, zero-shot accuracy on a labelled folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from retrieval.cli.choices import AnchorFlags, EncoderNames, anchor_options, encoder_options
from retrieval.cli.common import (
    EmbedFlags,
    caption_options,
    echo_json,
    embed_options,
    option_group,
    run_api,
    setup_logging,
)
from retrieval.core.config import CaptionOptions

if TYPE_CHECKING:
    from retrieval.eval.data import EvalOptions


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

    def options(self, contrastive: bool, anchors: AnchorFlags) -> EvalOptions:
        """The ``EvalOptions`` of these flags and the anchor flags (weights, ASIF settings)."""
        from retrieval.eval.data import EvalOptions

        return EvalOptions(
            routes=self.chosen_routes(contrastive),
            asif=anchors.asif,
            sweep=self.sweep_values,
            anchor_weights=anchors.weights,
            center=self.center,
            refine=_int_list(self.refine, "--refine"),
            split=self.split,
            limit=self.limit,
            cache_dir=self.cache_dir,
        )

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


@click.command("eval")
@click.argument("data", type=click.Path())
@encoder_options("Contrastive encoder spec (route clip).")
@anchor_options("Anchor directory or builtin:imagenet; repeat to fuse several sets.")
@eval_options
@caption_options
@embed_options()
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as one JSON object.")
def eval_command(
    data: str,
    encoders: EncoderNames,
    anchors: AnchorFlags,
    evaluation: EvalFlags,
    caption_options: CaptionOptions,
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
    options = evaluation.options(choice.is_contrastive, anchors)
    report = run_api(lambda: run_eval(data, choice, anchors.refs, options, caption_options, embedding.options))
    if as_json:
        echo_json(report)
    else:
        _print_eval(report)
