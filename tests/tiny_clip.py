"""A tiny, randomly initialised OpenCLIP model saved to disk for fast tests.

Usage::

    from tiny_clip import make_tiny_clip   # tests/ is on sys.path under pytest (no tests/__init__.py)
    model_dir = make_tiny_clip(tmp_path / "tiny")
    # -> a directory: open_clip_config.json + open_clip_model.safetensors

    # Python: any of these load it through open_clip's own "local-dir:" loading path
    enc = load_clip_encoder("open_clip:tiny", checkpoint=model_dir)        # spec "open_clip:tiny"
    enc = load_image_encoder("open_clip:tiny", checkpoint=model_dir)       # same object type
    enc = load_clip_encoder(f"open_clip:local-dir:{model_dir}")            # spec embeds the path

    # CLI
    retrieval ... --encoder open_clip:tiny --checkpoint <model_dir>

The word after ``open_clip:`` is only a label when the checkpoint is a directory (the
directory's config defines the architecture). The model: ViT image tower (32x32 input, patch 16,
width 64, 2 layers), text tower (width 64, 2 layers, 77 tokens, the default 49408-token simple
tokenizer), embed_dim 32. Weights are a pure function of ``seed``; the global torch RNG is left
untouched. Takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_EMBED_DIM = 32
TINY_IMAGE_SIZE = 32

TINY_MODEL_CFG = {
    "embed_dim": TINY_EMBED_DIM,
    "vision_cfg": {
        "image_size": TINY_IMAGE_SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
TINY_PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def make_tiny_clip(dirpath: Path, seed: int = 0) -> Path:
    """Write a tiny random open_clip model into ``dirpath`` (created if needed) and return it.

    Load it with ``load_clip_encoder("open_clip:tiny", checkpoint=dirpath)`` (or
    ``load_image_encoder`` / ``load_text_encoder`` with the same arguments). Different ``seed``
    values give different weights (hence different fingerprints).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_MODEL_CFG)))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dirpath / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (dirpath / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dirpath
