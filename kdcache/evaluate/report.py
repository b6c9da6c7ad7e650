"""Output helpers shared by eval and analysis commands: atomic JSON and figures, plain-text
tables."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from kdcache.formats import storage


def write_json(path: str, data: Any) -> str:
    """Write JSON atomically (formats.storage: temp file + fsync + rename)."""
    fs, target = storage.resolve(path)
    storage.atomic_write_bytes(fs, target, json.dumps(data, indent=1, default=_jsonable).encode())
    return path


def save_figure(fig: Any, path: str) -> str:
    """Write a matplotlib figure as PNG atomically (formats.storage) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    fs, target = storage.resolve(path)
    storage.atomic_write_bytes(fs, target, buf.getvalue())
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def one_line(data: Any) -> str:
    return json.dumps(data, default=_jsonable, separators=(",", ":"))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) if cells else len(h)
              for j, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
