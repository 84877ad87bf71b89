"""Turn an ``open_clip:...`` spec (+ optional checkpoint) into ``create_model_and_transforms`` arguments.

Every check that can fail before the (slow) model build happens here, with a message that says
what to do: unknown model or tag (with close names), missing checkpoint or weights, hub weights
that are neither reachable nor cached. The spec forms are listed in :mod:`retrieval.encoders.open_clip`.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.core.errors import EncoderError

from ._hub import cached_hub_file, hub_unreachable_reason

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CONFIG_NAME = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
FETCH_FIX = (
    "it needs internet to download the weights once, or pass `EncoderChoice.checkpoint` (a local file); "
    "see open_clip.list_pretrained()"
)

__all__ = ["FETCH_FIX", "PREFIX", "LoadPlan", "cached_tag_weights", "plan_load"]


@dataclass
class LoadPlan:
    """Arguments for ``open_clip.create_model_and_transforms`` and how to talk about them."""

    spec: str  # canonical spec stored in indexes
    model_name: str = ""
    what: str = ""  # for messages: "model 'ViT-B-32' with pretrained tag 'openai'"
    pretrained: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    from_hub: bool = False  # the weights come from the network (messages then say how to avoid it)


def plan_load(spec: str, checkpoint: str | Path | None) -> LoadPlan:
    """The plan for ``spec`` + ``checkpoint``, or EncoderError with a clear message."""
    body = spec[len(PREFIX) :].strip() if spec.startswith(PREFIX) else spec.strip()
    if not body:
        raise EncoderError("empty open_clip spec; use open_clip:MODEL/PRETRAINED (see open_clip.list_pretrained())")
    ckpt = Path(checkpoint).expanduser().resolve() if checkpoint is not None else None
    if ckpt is not None and not ckpt.exists():
        raise EncoderError(f"checkpoint not found: {ckpt}")
    if body.startswith((LOCAL_DIR, HF_HUB)):
        if ckpt is not None:
            raise EncoderError(f"open_clip:{body} names its own weights; drop the checkpoint argument")
        return _plan_self_contained(body)
    model, _, tag = (part.strip() for part in body.partition("/"))
    tag = tag.lower().replace("-", "_")
    plan = LoadPlan(spec=f"{PREFIX}{model}/{tag}" if tag else f"{PREFIX}{model}")
    if ckpt is not None and ckpt.is_dir():
        # A custom or downloaded architecture: the directory's config wins, MODEL is only a label.
        check_local_dir(ckpt)
        plan.model_name, plan.what = f"{LOCAL_DIR}{ckpt}", f"model {model!r} from directory {ckpt}"
        return plan
    return _plan_builtin(plan, model, tag, ckpt)


def _plan_self_contained(body: str) -> LoadPlan:
    """``local-dir:DIR`` or ``hf-hub:ORG/REPO``: the spec names architecture and weights."""
    if body.startswith(LOCAL_DIR):
        directory = Path(body[len(LOCAL_DIR) :]).expanduser().resolve()
        check_local_dir(directory)
        return LoadPlan(
            spec=f"{PREFIX}{LOCAL_DIR}{directory}",
            model_name=f"{LOCAL_DIR}{directory}",
            what=f"model from directory {directory}",
        )
    reason = hub_unreachable_reason()
    if reason:
        raise EncoderError(f"cannot load open_clip {body}: the hub is unreachable ({reason}); {FETCH_FIX}")
    return LoadPlan(spec=f"{PREFIX}{body}", model_name=body, what=body, from_hub=True)


def _plan_builtin(plan: LoadPlan, model: str, tag: str, ckpt: Path | None) -> LoadPlan:
    """A built-in architecture with a pretrained tag and/or a local weights file."""
    import open_clip

    if model not in open_clip.list_models():
        raise EncoderError(_unknown_model_message(model, open_clip.list_models(), ckpt))
    plan.model_name = model
    tag_cfg: dict[str, Any] = {}
    if tag:
        tag_cfg = open_clip.get_pretrained_cfg(model, tag)
        if not tag_cfg:
            raise EncoderError(_unknown_tag_message(model, tag, open_clip.list_pretrained_tags_by_model(model)))
        plan.kwargs = _tag_kwargs(tag_cfg)
    if ckpt is not None:
        if ckpt.suffix not in WEIGHT_SUFFIXES:
            raise EncoderError(f"checkpoint {ckpt} is not a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        plan.pretrained, plan.what = str(ckpt), f"model {model!r} with weights {ckpt}"
        return plan
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(model)
        hint = f"open_clip:{model}/{tags[0]}" if tags else f"open_clip:{model} with `EncoderChoice.checkpoint`"
        raise EncoderError(f"open_clip:{model} names no weights; use {hint} (tags: {_few(tags) or 'none'})")
    plan.what = f"model {model!r} with pretrained tag {tag!r}"
    reason = hub_unreachable_reason()
    if reason is None:
        plan.pretrained, plan.from_hub = tag, True
        return plan
    cached = cached_tag_weights(tag_cfg)
    if cached is None:
        raise EncoderError(
            f"cannot load open_clip model {model!r} with pretrained tag {tag!r}: the weights are not in "
            f"the local cache and the hub is unreachable ({reason}); {FETCH_FIX}"
        )
    log.info("hub unreachable (%s); using cached weights %s", reason, cached)
    plan.pretrained = cached
    return plan


def _tag_kwargs(tag_cfg: dict[str, Any]) -> dict[str, Any]:
    """create_model_and_transforms overrides that make a local copy of tagged weights behave like the tag."""
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    for key, arg in (
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ):
        if tag_cfg.get(key) is not None:
            kwargs[arg] = tag_cfg[key]
    return kwargs


def cached_tag_weights(tag_cfg: dict[str, Any]) -> str | None:
    """Local path of a tag's weights if an earlier download left them in the hub cache."""
    if tag_cfg.get("file"):
        return str(tag_cfg["file"])
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub)
    repo_id = repo_id.strip("/")
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = []
    if filename == "open_clip_pytorch_model.bin":
        candidates.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        candidates.append(filename[:-4] + ".safetensors")
    candidates.append(filename)
    return cached_hub_file(repo_id, candidates)


def check_local_dir(directory: Path) -> None:
    """EncoderError unless ``directory`` holds an open_clip config and a weights file."""
    if not directory.is_dir():
        raise EncoderError(f"open_clip model directory not found: {directory}")
    if not (directory / CONFIG_NAME).is_file():
        raise EncoderError(f"{directory} has no {CONFIG_NAME}; an open_clip model directory needs config + weights")
    if not any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in directory.iterdir()):
        raise EncoderError(f"{directory} has {CONFIG_NAME} but no weights file ({', '.join(WEIGHT_SUFFIXES)})")


def _unknown_model_message(model: str, names: list[str], ckpt: Path | None) -> str:
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(model.lower(), list(by_lower), n=5, cutoff=0.5)]
    msg = f"unknown open_clip model {model!r}"
    msg += f"; close names: {', '.join(close)}" if close else f"; e.g. {', '.join(names[:5])}"
    msg += " (all: open_clip.list_models())"
    if ckpt is not None:
        msg += f"; for a custom architecture pass the directory holding {CONFIG_NAME} as checkpoint"
    return msg


def _unknown_tag_message(model: str, tag: str, tags: list[str]) -> str:
    if not tags:
        return (
            f"open_clip model {model!r} has no pretrained tags; pass `EncoderChoice.checkpoint` (a local weights file)"
        )
    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown pretrained tag {tag!r} for open_clip model {model!r}{hint} (available: {_few(tags)})"


def _few(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
