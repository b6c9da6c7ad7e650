"""The experiment's JSON records under DIR: written atomically, and reused when present (which
is what makes `kdcache replicate` resume step by step)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from kdcache.formats.storage import atomic_write_bytes, resolve


def save_json(path: str, data: Any) -> None:
    fs, base = resolve(path)
    atomic_write_bytes(fs, base, (json.dumps(data, indent=2, default=str) + "\n").encode())


def cached_json(path: str, make: Callable[[], Any]) -> Any:
    """The record at `path`, or `make()`'s result, saved there first."""
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    data = make()
    save_json(path, data)
    return data
