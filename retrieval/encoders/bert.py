"""A sentence-transformers BERT text model (e.g. all-MiniLM-L6-v2) computed directly with torch.

``SentenceTransformer(folder)`` costs about 3 s of imports (sentence_transformers, transformers,
sklearn, ...) before the first text is encoded, more than a whole query should take. This module
reads the same files (``tokenizer.json`` through the ``tokenizers`` library, ``model.safetensors``
through ``safetensors``) and runs the same arithmetic as transformers' ``BertModel`` in eval mode
followed by sentence-transformers' pooling: the vectors agree to float rounding and
:meth:`BertTextModel.named_weights` hashes to the same fingerprint (tests/test_encoders.py checks
both). Which folders qualify: :func:`retrieval.encoders.st_folder.read_st_folder`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .st_folder import StFolder, Unsupported

if TYPE_CHECKING:
    import torch

__all__ = ["BertTextModel"]

# sentence-transformers >= 6 names the Transformer module's model "model" in its state_dict
ST_MODEL_ATTRIBUTE = "model"
_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)


def bert_weight_names(layers: int) -> list[str]:
    """transformers ``BertModel.state_dict()`` keys, in its order (the order fingerprints hash in)."""
    names = [
        f"embeddings.{part}.weight" for part in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]
    names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for layer in range(layers):
        names += [f"encoder.layer.{layer}.{part}.{kind}" for part in _LAYER_PARTS for kind in ("weight", "bias")]
    return names + ["pooler.dense.weight", "pooler.dense.bias"]


class BertTextModel:
    """Tokenizer + BERT weights + pooling of one sentence-transformers folder, on one device."""

    def __init__(self, folder: StFolder, tokenizer: Any, weights: dict[str, torch.Tensor]) -> None:
        config = folder.config
        self.folder = folder
        self.tokenizer = tokenizer
        self.weights = weights
        self.dim = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.activation = str(config.get("hidden_act", "gelu"))

    @classmethod
    def load(cls, folder: StFolder, device: str) -> BertTextModel:
        """Read tokenizer and weights; :class:`Unsupported` when the weights are not a plain float32 BERT."""
        try:
            from safetensors.torch import load_file
            from tokenizers import Tokenizer, normalizers
        except ImportError as e:
            raise Unsupported(f"{e.name} is not installed") from e
        tokenizer = Tokenizer.from_file(str(folder.model_dir / "tokenizer.json"))
        if folder.do_lower_case:  # as sentence-transformers does: lower-case before the model's own normaliser
            steps = [normalizers.Lowercase()] + ([tokenizer.normalizer] if tokenizer.normalizer else [])
            tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.enable_truncation(max_length=folder.max_seq_length)
        pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
        tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
        stored = {
            key.removeprefix("bert."): value
            for key, value in load_file(str(folder.model_dir / "model.safetensors")).items()
        }
        names = bert_weight_names(int(folder.config["num_hidden_layers"]))
        missing = [name for name in names if name not in stored]
        odd = [name for name in names if name in stored and str(stored[name].dtype) != "torch.float32"]
        if missing or odd:
            raise Unsupported(f"weights {(missing or odd)[:3]} {'missing' if missing else 'not float32'}")
        return cls(folder, tokenizer, {name: stored[name].to(device) for name in names})

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under the names a ``SentenceTransformer`` of this folder gives them."""
        prefix = f"{self.folder.module_name}.{ST_MODEL_ATTRIBUTE}."
        for name, tensor in self.weights.items():
            yield prefix + name, tensor

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled (not yet normalised) sentence vectors of ``texts``, shape (len(texts), dim)."""
        import torch

        batch = self.tokenizer.encode_batch(list(texts))
        device = self.weights["pooler.dense.bias"].device
        ids = torch.tensor([item.ids for item in batch], dtype=torch.long, device=device)
        mask = torch.tensor([item.attention_mask for item in batch], dtype=torch.long, device=device)
        return self._pool(self._hidden_states(ids, mask), mask)

    def _hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        w = self.weights
        x = F.embedding(ids, w["embeddings.word_embeddings.weight"]) + w["embeddings.token_type_embeddings.weight"][0]
        x = x + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
        x = self._norm(x, "embeddings.LayerNorm")
        attend = mask.bool()[:, None, None, :]
        for layer in range(self.layers):
            x = self._layer(x, attend, f"encoder.layer.{layer}.")
        return x

    def _layer(self, x: torch.Tensor, attend: torch.Tensor, at: str) -> torch.Tensor:
        from torch.nn import functional as F

        batch, length, width = x.shape
        q, k, v = (
            self._linear(x, f"{at}attention.self.{name}").view(batch, length, self.heads, -1).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        context = (
            F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(batch, length, width)
        )
        x = self._norm(self._linear(context, f"{at}attention.output.dense") + x, f"{at}attention.output.LayerNorm")
        hidden = _activate(self._linear(x, f"{at}intermediate.dense"), self.activation)
        return self._norm(self._linear(hidden, f"{at}output.dense") + x, f"{at}output.LayerNorm")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        from torch.nn import functional as F

        return F.linear(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        from torch.nn import functional as F

        return F.layer_norm(x, (self.dim,), self.weights[f"{name}.weight"], self.weights[f"{name}.bias"], self.eps)

    def _pool(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sentence-transformers' Pooling (mean, cls or max over the unpadded tokens)."""
        if self.folder.pooling == "cls":
            return tokens[:, 0]
        keep = mask.unsqueeze(-1).to(tokens.dtype)
        if self.folder.pooling == "max":
            return tokens.masked_fill(keep == 0, -1e9).max(dim=1).values
        return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


def _activate(x: torch.Tensor, name: str) -> torch.Tensor:
    from torch.nn import functional as F

    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="none" if name == "gelu" else "tanh")
