"""Read a sentence-transformers model folder without importing sentence-transformers.

:func:`read_st_folder` says whether a folder is a plain ``Transformer -> Pooling [-> Normalize]``
BERT model that :mod:`retrieval.encoders.bert` computes directly, and with which settings
(maximum length, lower-casing, pooling). Anything else (other architectures, Dense layers, default
prompts, several pooling modes) is :class:`Unsupported` and goes through sentence-transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["StFolder", "Unsupported", "read_st_folder"]

# pooling flags of sentence-transformers < 6 (1_Pooling/config.json) -> the mode name of >= 6
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = ("mean", "cls", "max")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# sentence_bert_config.json keys that do not change the vectors of a BERT text model
_HARMLESS_KEYS = {"max_seq_length", "do_lower_case", "transformer_task", "module_output_name"}


class Unsupported(Exception):
    """The folder needs sentence-transformers itself (the message says why)."""


@dataclass(frozen=True)
class StFolder:
    """What the direct BERT path needs to know about a sentence-transformers folder."""

    model_dir: Path  # holds config.json, tokenizer.json and model.safetensors
    module_name: str  # the Transformer module's name in modules.json (prefix of its weights)
    config: dict[str, Any]  # the transformers config.json
    max_seq_length: int
    do_lower_case: bool
    pooling: str  # one of POOLING_MODES


def read_st_folder(folder: Path) -> StFolder:
    """The settings of a plain BERT sentence-transformers folder; :class:`Unsupported` otherwise."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise Unsupported("modules.json lists no modules")
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise Unsupported(f"modules {kinds}")
    model_dir = folder / str(modules[0].get("path", ""))
    config = _read_json(model_dir / "config.json")
    _check_bert_config(config)
    for name in ("tokenizer.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise Unsupported(f"no {name}")
    _check_no_default_prompt(folder)
    st_config = _read_json(model_dir / "sentence_bert_config.json", default={})
    extra = set(st_config) - _HARMLESS_KEYS - {"modality_config"}
    modalities = st_config.get("modality_config", {"text": None})
    if (
        extra
        or modalities.keys() != {"text"}
        or st_config.get("transformer_task", "feature-extraction") != "feature-extraction"
    ):
        raise Unsupported(f"sentence_bert_config.json settings {sorted(extra) or sorted(st_config)}")
    return StFolder(
        model_dir=model_dir,
        module_name=str(modules[0].get("name", "0")),
        config=config,
        max_seq_length=_max_seq_length(st_config, config, model_dir),
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        pooling=_pooling_mode(folder / str(modules[1].get("path", ""))),
    )


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        if default is not None:
            return default
        raise Unsupported(f"no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Unsupported(f"{path.name} unreadable ({e})") from e


def _check_bert_config(config: Any) -> None:
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        raise Unsupported(f"model_type {config.get('model_type') if isinstance(config, dict) else None!r}")
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("is_decoder"):
        raise Unsupported("not an absolute-position BERT encoder")
    if config.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise Unsupported(f"activation {config.get('hidden_act')!r}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise Unsupported("hidden_size not a multiple of the heads")


def _check_no_default_prompt(folder: Path) -> None:
    settings = _read_json(folder / "config_sentence_transformers.json", default={})
    if settings.get("default_prompt_name") or settings.get("prompts", {}).get("query"):
        raise Unsupported("a default prompt")


def _max_seq_length(st_config: dict[str, Any], config: dict[str, Any], model_dir: Path) -> int:
    limit = int(config.get("max_position_embeddings", 512))
    if st_config.get("max_seq_length"):
        return min(int(st_config["max_seq_length"]), limit)
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json", default={})
    return min(int(tokenizer_config.get("model_max_length", limit)), limit)


def _pooling_mode(pooling_dir: Path) -> str:
    config = _read_json(pooling_dir / "config.json")
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _LEGACY_POOLING.items() if config.get(key)]
        mode = modes[0] if len(modes) == 1 else tuple(modes)
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING_MODES or config.get("include_prompt", True) is not True:
        raise Unsupported(f"pooling {mode!r}")
    return str(mode)
