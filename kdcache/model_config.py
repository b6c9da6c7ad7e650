"""Facts read from a Hugging Face model's config.json that several components check."""

from __future__ import annotations

import json
import os
from typing import Any

# The names architectures give their context length (Llama and most: the first; GPT-2: n_positions).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def read_config(model_dir: str) -> dict[str, Any]:
    """The text model's config (`text_config` of a multimodal one); {} if unreadable."""
    try:
        with open(os.path.join(model_dir, "config.json"), "rb") as fh:
            config = json.loads(fh.read())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def max_positions(config: dict[str, Any]) -> tuple[str, int] | None:
    """(field name, positions) of the model's context length, or None if its config has none."""
    key = next((k for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
    return (key, int(config[key])) if key else None
