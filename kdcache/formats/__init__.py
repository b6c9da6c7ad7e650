"""kdcache.formats: the logit-shard format (FORMAT.md), its codecs, writer, reader and verifier.

The ground floor: it imports no other kdcache component. The names below are its public API;
they are imported on first use (`kdcache.formats.open_dataset`), so that importing one small
module of the package (`kdcache --help` imports `formats.packing`) does not load pyarrow and the
numba codecs.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "PACKING_MODES": "packing", "MODES": "packing", "default_valid": "packing",
    "request_segments": "packing",
    "WindowRecord": "window", "Window": "window",
    "DatasetHeader": "manifest", "ShardInfo": "manifest",
    "open_dataset": "reader", "LogitDataset": "reader", "hf_iterable_dataset": "hf",
    "verify_dataset": "verify",
    "DatasetWriter": "writer", "begin_dataset": "writer", "shard_name": "writer",
    "write_shard": "writer", "finish_dataset": "writer", "make_codec": "codecs",
    "read_stored_codec_table": "writer",
    "get_codec": "codecs", "default_codec": "codecs",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'kdcache.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kdcache.formats.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
