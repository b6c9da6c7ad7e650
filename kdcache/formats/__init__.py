"""kdcache.formats: the logit-shard format (FORMAT.md), its codecs, writer, reader and verifier.

Names below are loaded on first use (`kdcache.formats.hf_iterable_dataset`), so importing the
package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "open_dataset": "reader", "LogitDataset": "reader",
    "hf_iterable_dataset": "hf",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kdcache.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kdcache.formats.{_HOMES[name]}"), name)
