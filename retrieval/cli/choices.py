"""Option groups that choose the encoders, the anchor sets and the ASIF settings (build-index, build-anchors,
eval): each command receives one value per group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from retrieval.cli.common import IMAGE_ENCODER_HELP, TEXT_ENCODER_HELP, option_group

if TYPE_CHECKING:
    from retrieval.asif.relative import AsifParams

ASIF_K_HELP = "ASIF top-k (default: the anchor sets'; fused sets must agree unless given)."
ASIF_P_HELP = "ASIF exponent (default: the anchor sets'; fused sets must agree unless given)."


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


unimodal_encoder_options = option_group(
    "encoders",
    [
        click.option("--image-encoder", required=True, help=IMAGE_ENCODER_HELP),
        click.option("--text-encoder", required=True, help=TEXT_ENCODER_HELP),
    ],
    lambda image_encoder, text_encoder: EncoderNames(None, image_encoder, text_encoder),
)
"""``--image-encoder`` and ``--text-encoder``, both required: one ``encoders: EncoderNames``."""


def asif_flags(k_help: str = ASIF_K_HELP, p_help: str = ASIF_P_HELP) -> list[Callable[[Callable], Callable]]:
    """``--k`` and ``--p``, read by :func:`asif_params`."""
    return [
        click.option("--k", type=int, default=None, help=k_help),
        click.option("--p", type=float, default=None, help=p_help),
    ]


def asif_params(k: int | None, p: float | None) -> AsifParams | None:
    """The ASIF settings given (None when neither): a field left out is the anchor sets' own, resolved by the API."""
    from retrieval.asif.relative import AsifParams

    return None if k is None and p is None else AsifParams(k=k, p=p)


def asif_options(k_help: str, p_help: str) -> Callable[[Callable], Callable]:
    """``--k`` and ``--p``: one ``asif: AsifParams | None``."""
    return option_group("asif", asif_flags(k_help, p_help), asif_params)


@dataclass(frozen=True)
class AnchorFlags:
    """``--anchors`` (repeatable), ``--anchor-weights``, ``--k`` / ``--p`` and (build-index) ``--image-views``."""

    refs: tuple[str, ...]
    weights: list[float] | None
    asif: AsifParams | None
    image_views: str = "none"


def _weights(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected numbers separated by commas, got {value!r}", param_hint="--anchor-weights"
        ) from None


IMAGE_VIEWS_FLAG = click.option(
    "--image-views",
    type=click.Choice(["none", "five"]),
    default="none",
    show_default=True,
    help="ASIF: describe each image by the mean relative row of the whole photo, its four quadrants and a centre "
    "crop (six encoder passes per image; image queries too).",
)


def anchor_options(anchors_help: str, image_views: bool = False) -> Callable[[Callable], Callable]:
    """The anchor and ASIF options: one ``anchors: AnchorFlags`` (``--image-views`` with ``image_views``)."""
    flags: list[Callable[[Callable], Callable]] = [
        click.option("--anchors", multiple=True, help=anchors_help),
        click.option(
            "--anchor-weights", default=None, help="Comma-separated weight per anchor set when fusing, e.g. 1,0.5."
        ),
        *asif_flags(),
    ]

    def make(
        anchors: tuple[str, ...], anchor_weights: str | None, k: int | None, p: float | None, **views: str
    ) -> AnchorFlags:
        return AnchorFlags(tuple(anchors), _weights(anchor_weights), asif_params(k, p), **views)

    return option_group("anchors", flags + ([IMAGE_VIEWS_FLAG] if image_views else []), make)
